"""ZSKT: Micaelli and Storkey, "Zero-shot Knowledge Transfer via Adversarial Belief
Matching", NeurIPS 2019 (arXiv:1905.09768). Official code: polo5/ZeroShotKnowledgeTransfer
(``solver.py``, ``main.py``, ``models/generator.py``, ``utils/loaders.py``).

A generator G and the student S play an adversarial game on the teacher-student
divergence; the student also matches the teacher's spatial attention maps::

    D(x)   = KL(softmax(T(x)/tau) || softmax(S(x)/tau)), averaged over the n*K entries
             (the official ``F.kl_div`` default reduction, i.e. the batch-mean KL / K)
    a(A)   = normalize_rows(mean_c A_c^2)   (Zagoruyko & Komodakis; kd.core.reductions.attention)
    L_G    = -D(G(z))
    L_S    = D(x) + beta * sum_l mean_{i,j} (a(A_l^S(x))_ij - a(A_l^T(x))_ij)^2,  x = G(z) fixed

Each of ``config.steps`` pseudo-batches draws one z, takes ``ng`` generator steps on G(z)
(differentiable through the served teacher's input gradient), then ``ns`` student steps on
the same (now fixed) G(z), for which the teacher's logits and attention maps are asked
once (the attention map computed server-side as feature ``<layer>@at``). Per step the
teacher answers ``(ng + 1) * batch_size`` samples and ``ng * batch_size`` gradient samples.

Defaults and their source: ng = 1, ns = 10 (the paper; the official ``main.py`` defaults to
7), beta = 250, tau = 1 (``config.temperature`` is used; set it to 1 for the paper's),
Adam for both with cosine annealing to 0 over the run and gradient-norm clipping at 5
(official ``solver.py``; lr_S = 2e-3, lr_G = 1e-3 there), nz = 100. The attention is
matched at every pair in ``attention`` -- by default each ``layer<N>`` block served by the
teacher that the student also has (the official code matches the outputs of each
WideResNet group); for ``DigitsCNN`` set ``attention=(("layer2", "layer2"),)`` to match
the last block only.

Assumed or simplified:

* The generator is ``common.Generator`` (DAFL's: a tanh before the last BatchNorm); the
  official ZSKT generator has no tanh and a 1.6x first upsampling for 32x32 images.
* The paper writes the attention term as a norm of the difference of the normalised
  maps; the official code, followed here, uses the mean squared difference.
* The student optimiser is ``student_optimizer`` (Adam by default, as official) at
  ``config.lr``; ``cosine`` and ``clip`` can be turned off. They are the shared trainer's
  recipe (where ``DataFreeConfig`` leaves it at its defaults): the cosine anneals per student
  step, and the generator's rate with it.
* The generator's last BatchNorm standardises its images; the official teachers take
  standardised inputs, so the default hands them over as they are.
  ``input_mean``/``input_std``/``clamp`` (``dafl.to_input``) map them into another
  teacher's input range: the digits DEMO uses 0.5 + 0.5 x clamped to [0, 1], derived
  from the pixel range alone (no statistics of the real data).

Measured (``DEMO``; digits CNN teacher at 98.0% test accuracy, width-8 student, one CPU
core): 59% / 60% test accuracy (seeds 0 / 1) in ~27 s, 38,400 samples + 19,200 gradient
samples. Matching both blocks (``layer1`` and ``layer2``) instead of ``layer2`` alone gave
about the same; the student needed lr 1e-2 (at the official 2e-3 it is far behind after
a few hundred pseudo-batches).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kd.core.data import Dataset
from kd.core.reductions import attention as attention_map
from kd.student_trainer.datafree import register
from kd.student_trainer.datafree.common import (
    DataFreeConfig,
    DataFreeResult,
    Generator,
    Run,
    ServedTeacher,
    given_options,
)
from kd.student_trainer.datafree.dafl import check_options, finite_or_raise, require_tier, student_recipe, to_input

NAME = "zskt"
PAPER = (
    "Micaelli & Storkey, Zero-shot Knowledge Transfer via Adversarial Belief Matching, NeurIPS 2019 (arXiv:1905.09768)"
)
TIER = "white"

# ``kd demo-datafree``: digits CNN teacher (width 32) -> width-8 student; see "Measured" above.
DEMO = {
    "config": {"steps": 300, "batch_size": 64, "lr": 1e-2, "generator_lr": 1e-3, "temperature": 1.0},
    "options": {"ns": 10, "ng": 1, "beta": 250.0, "attention": [["layer2", "layer2"]], "nz": 64, "generator_width": 32,
                "input_mean": 0.5, "input_std": 0.5, "clamp": [0.0, 1.0]},
}  # fmt: skip


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the softened distributions, averaged over all n*K entries."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits / t, 1), F.log_softmax(teacher_logits / t, 1), reduction="sum",
                  log_target=True)  # fmt: skip
    return kl / student_logits.numel()


def attention_loss(student_maps: list[torch.Tensor], teacher_attention: list[torch.Tensor]) -> torch.Tensor:
    """sum over pairs of the mean squared difference of attention maps; the student's are
    full feature maps (reduced here), the teacher's already reduced ([N, H*W])."""
    total = student_maps[0].new_zeros(())
    for s, t in zip(student_maps, teacher_attention):
        a = attention_map(s)
        if a.shape != t.shape:
            raise ValueError(f"zskt: student attention map {list(a.shape)} does not match the teacher's {list(t.shape)}"
                             " (the paired layers need the same spatial size)")  # fmt: skip
        total = total + (a - t).pow(2).mean()
    return total


def default_pairs(teacher: ServedTeacher, student: nn.Module) -> list[tuple[str, str]]:
    mods = dict(student.named_modules())
    return [(n, n) for n in teacher.layers if re.fullmatch(r"layer\d+", n) and n in mods]


@register(NAME, PAPER, tier=TIER)
def run(
    teacher: ServedTeacher,
    student: nn.Module,
    config: DataFreeConfig,
    *,
    test: Dataset | None = None,
    ng: int = 1,
    ns: int = 10,
    beta: float = 250.0,
    attention: list[tuple[str, str]] | tuple[tuple[str, str], ...] | None = None,
    nz: int = 100,
    generator_width: int = 64,
    clip: float = 5.0,
    cosine: bool = True,
    input_mean: float = 0.0,
    input_std: float = 1.0,
    clamp: tuple[float, float] | None = None,
    student_optimizer: str = "adam",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    generator: Generator | None = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    **unknown,
) -> DataFreeResult:
    """ZSKT: ``config.steps`` pseudo-batches of ``ng`` generator and ``ns`` student steps.

    ``attention``: (teacher layer, student module) pairs whose attention maps are matched
    (``beta = 0`` or an empty list: no attention term); ``generator``: train this one
    instead of a fresh ``Generator(teacher.input_shape, nz, generator_width)``;
    ``callback(step, losses)`` receives each pseudo-batch's loss values."""
    check_options(NAME, run, unknown)
    require_tier(teacher, NAME)
    if ng < 1 or ns < 1:
        raise ValueError(f"zskt: ng and ns must be >= 1, got {ng} and {ns}")
    pairs = [tuple(p) for p in (default_pairs(teacher, student) if attention is None else attention)]
    if beta == 0:
        pairs = []
    modules = dict(student.named_modules())
    for t_layer, s_layer in pairs:
        if t_layer not in teacher.layers:
            raise ValueError(f"zskt: teacher {teacher.name!r} has no layer {t_layer!r}: {', '.join(teacher.layers)}")
        if s_layer not in modules:
            raise ValueError(f"zskt: the student has no module {s_layer!r}")
    t_features = tuple(f"{t}@at" for t, _ in pairs)

    device = config.device
    book = Run(NAME, teacher, student, config, test)
    book.keep(given_options(run, locals()))
    if generator is None:
        generator = Generator(teacher.input_shape, nz=nz, width=generator_width)
    generator.to(device).train()
    student.to(device).train()
    opt_g = torch.optim.Adam(generator.parameters(), lr=config.generator_lr)

    seen: dict[str, torch.Tensor] = {}
    hooks = [modules[s].register_forward_hook(lambda _m, _i, out, s=s: seen.__setitem__(s, out)) for _, s in pairs]

    def sample(z: torch.Tensor) -> torch.Tensor:
        return to_input(generator(z), input_mean, input_std, clamp)

    now: dict[str, object] = {}

    def rounds(first: int, end: int):
        """Per pseudo-batch: ``ng`` generator steps on G(z), then ``ns`` student batches of the same
        (now fixed) G(z) with the teacher's logits and attention maps, asked once."""
        for step in range(first, end):
            z = torch.randn(config.batch_size, generator.nz, device=device)
            for _ in range(ng):
                x = sample(z)
                loss_g = -divergence(student(x), teacher(x), config.temperature)
                finite_or_raise(NAME, step, {"generator": float(loss_g.detach())})
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward(inputs=list(generator.parameters()))  # the student's step is the trainer's
                if clip:
                    nn.utils.clip_grad_norm_(generator.parameters(), clip)
                opt_g.step()
            with torch.no_grad():
                x = sample(z)
                out = teacher(x, features=t_features)
            t_logits, now["t_att"] = (out[0], [out[1][f] for f in t_features]) if t_features else (out, [])
            now["x"] = x
            for _ in range(ns):
                yield x, None, t_logits
            if callback is not None:
                callback(step, {"generator": float(loss_g.detach()), "student": book.last_loss,
                                "kl": now["kl"], "attention": now["attention"]})  # fmt: skip

    def loss(ctx) -> torch.Tensor:
        kl = divergence(ctx.model(ctx.inputs), ctx.teacher_logits, config.temperature)
        at = attention_loss([seen[s] for _, s in pairs], now["t_att"]) if pairs else kl.new_zeros(())
        now["kl"], now["attention"] = float(kl.detach()), float(at.detach())
        return kl + beta * at

    try:
        asks = student_recipe(student_optimizer, momentum, weight_decay, cosine, clip)
        book.train(rounds, loss, steps_per_round=ns, extra=[(generator, opt_g)], asks=asks)
    finally:
        for h in hooks:
            h.remove()
        seen.clear()
    return book.result(now.get("x"))
