"""DeepInversion and Adaptive DeepInversion against a served teacher.

Paper: Hongxu Yin, Pavlo Molchanov, Zhizhong Li, Jose M. Alvarez, Arun Mallya, Derek Hoiem,
Niraj K. Jha, Jan Kautz. "Dreaming to Distill: Data-free Knowledge Transfer via
DeepInversion." CVPR 2020, arXiv:1912.08795. Official code: NVlabs/DeepInversion
(``deepinversion.py`` for ImageNet, ``cifar10/deepinversion_cifar10.py`` for CIFAR-10).

Each outer step synthesises one batch ``x`` (B samples, targets ``y``) by optimising the
inputs themselves, starting from Gaussian noise, with Adam for ``iterations`` steps on

    L(x) = CE(t(x'), y) + a_bn * R_bn(x') + a_tv * R_tv(x') + a_l2 * mean_i ||x'_i||_2
           [+ a_adi * R_adi(x')]                                   (paper eq. 3-4, 8)

    R_bn(x)  = sum_l w_l (||mu_l(x) - running_mean_l||_2 + ||var_l(x) - running_var_l||_2)
               over the inputs of the teacher's BatchNorm layers (batch statistics, biased var;
               w_1 = first_bn_multiplier, the other w_l = 1)
    R_tv(x)  = ||D_h x||_2 + ||D_v x||_2 + ||D_d x||_2 + ||D_a x||_2, the L2 norms of the
               differences between neighbouring pixels along rows, columns and both diagonals
    R_adi(x) = 1 - clamp(JS(p_s, p_t), 0, 1)  (Adaptive DeepInversion's competition term)
    JS       = 1/2 KL(m || p_s) + 1/2 KL(m || p_t), p = softmax(logits / 3) clamped to
               [0.01, 0.99], m = (p_s + p_t) / 2 clamped the same way, KL batch-mean -- as the
               official code computes it (``nn.KLDivLoss(log p, m)`` is KL(m || p)).

``x'`` is ``x`` after a random jitter (``torch.roll`` by up to ``jitter`` pixels) and, with
``flip``, a random horizontal flip; ``clip`` clamps ``x`` to the teacher's input range after
each step. The batch joins a memory bank together with the teacher's logits on it, and the
student takes ``kd_steps`` steps (the shared trainer's, Adam by default) of Hinton KD
(``common.kd_loss``, ``config.temperature``)
on random batches of the bank (``config.batch_size``, ``config.lr``, decayed with a cosine over
the run unless ``student_schedule="constant"``). Competing with a
student that is being trained between batches is what makes ADI adaptive: R_adi pushes the
next batch to where the current student disagrees with the teacher.

Two modes:

* ``mode="server"`` submits each batch's synthesis to the server (``Synthesize``: the loop runs
  next to the model and streams the batch back; CE + R_bn + R_tv + L2 with the same formulas,
  no jitter, flip, clip or first-layer multiplier) and then asks once for the logits of the
  batch. Queries per batch: B * iterations gradient samples + B samples.
* ``mode="client"`` runs the loop here. Each step asks the server for R_bn and the logits in
  one BatchNormLoss call and, in the backward pass, for the VJP of the logits' gradient
  (InputGradient); the priors and R_adi (the student is here, the server never sees it) are
  computed locally. Queries per batch: 2 * B * iterations gradient samples + B samples.
  With jitter 0, no flip, no clip, first_bn_multiplier 1 and adi_scale 0 the two modes
  compute the same batch (the same seeded noise, the same loss and Adam(betas=(0.5, 0.9))).

Defaults and their source: bn_weight 10, lr 0.05, tv_weight 2.5e-5, l2_weight 0, 2000
iterations, jitter 2 and no flip are the CIFAR-10 "paper parameters" of the official
``cifar10/README.md`` (``--r_feature_weight=10 --di_lr=0.05``, ``--di_var_scale`` 2.5e-5,
``--di_l2_scale`` 0, ``--iters_mi`` 2000, ``lim_0 = lim_1 = 2``); adi_scale 0.2 ("value 0.2
was used in the paper", official README) with T = 3; first_bn_multiplier 1 as in the CIFAR-10
code (the ImageNet code uses 10); Adam betas (0.5, 0.9) and the per-sample L2 mean are the
ImageNet code's (settings 0/1), chosen so the two modes agree. Targets cycle through the
classes like the official CIFAR-10 code's ``[0..9] * 25 + ...``. The alternation of synthesis
and distillation, kd_steps 400 per batch and the cosine decay of the student's learning rate
follow Fast-Datafree's DeepInversion baseline (``scripts/deepinv_cifar.sh``: ``--kd_steps 400
--ep_steps 400``, ``datafree_kd.py``), the official DeepInversion code having no student loop.

Assumed or simplified: the paper synthesises a data set first and then distils; here synthesis
and distillation alternate in one loop over a growing bank (which ADI's competition needs: a
student that changes between batches). No multi-resolution schedule, cosine learning-rate policy
for the inputs, TV-L1 term or mixed precision; the last iterate is kept (the ImageNet code's
``best_inputs`` is in effect the last iterate too, its ``best_cost`` never being updated). The
student is distilled with the config's recipe (Adam by default) instead of SGD, on the bank's
stored logits (one Infer per batch) without augmentation. Clipping needs the teacher's input
range, which the service does not declare (``clip``, off by default). In client mode R_adi's
gradient reaches ``x`` through the student locally and through the teacher via the server's VJP.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kd.core.data import Dataset
from kd.student_trainer.datafree import register
from kd.student_trainer.datafree.common import DataFreeConfig, DataFreeResult, Run, ServedTeacher, kd_loss

NAME = "deepinversion"
PAPER = (
    "Yin, Molchanov, Li, Alvarez, Mallya, Hoiem, Jha, Kautz. Dreaming to Distill: Data-free Knowledge Transfer "
    "via DeepInversion. CVPR 2020, arXiv:1912.08795"
)

DEFAULTS: dict[str, object] = {
    "mode": "client",  # "server": Synthesize on the server; "client": the loop runs here
    "iterations": 2000,  # input-optimisation steps per batch
    "lr": 0.05,  # Adam on the inputs
    "bn_weight": 10.0,
    "tv_weight": 2.5e-5,
    "l2_weight": 0.0,
    "kd_steps": 400,  # student steps on the bank after each batch
    "student_schedule": "cosine",  # or "constant": the student's learning rate over the run
    "targets": "cycle",  # "cycle" (balanced classes) or "random"
    # client mode only:
    "first_bn_multiplier": 1.0,
    "jitter": 2,
    "flip": False,
    "clip": None,  # (low, high): clamp the inputs after each step
    "adi_scale": None,  # None: 0.2 in client mode (ADI), 0 in server mode (plain DI)
    "adi_temperature": 3.0,
}
CLIENT_ONLY = ("first_bn_multiplier", "jitter", "flip", "clip", "adi_scale", "adi_temperature")
ADI_SCALE = 0.2


# -- shared helpers (also used by fast_dfkd) -----------------------------------------------------
def merge_options(method: str, defaults: dict[str, object], options: dict[str, object]) -> dict[str, object]:
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(f"{method}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(defaults))}")
    return {**defaults, **options}


def require_white(method: str, teacher: ServedTeacher) -> None:
    """Refuse before any query when the teacher is not served at the WHITE tier or has no BN layers."""
    if teacher.access != "white":
        raise ValueError(
            f"{method} needs input gradients and BatchNorm statistics (tier 'white'); teacher {teacher.name!r} is "
            f"served at tier {teacher.access!r}"
        )
    if not teacher.batch_norms:
        raise ValueError(f"{method} matches BatchNorm statistics; teacher {teacher.name!r} has no BatchNorm layers")


class _BNAndLogits(torch.autograd.Function):
    """(R_bn, logits) of a batch from one BatchNormLoss call; the backward adds the server's VJP
    of the logits' gradient (one InputGradient call) to the R_bn input gradient."""

    @staticmethod
    def forward(ctx, teacher: ServedTeacher, state_id: str, momentum: float, ttl: float,
                layer_weights: tuple[float, ...], x: torch.Tensor):  # fmt: skip
        ctx.set_materialize_grads(False)
        res = teacher.client.batchnorm_loss(teacher.name, teacher.to_wire(x), state_id=state_id, momentum=momentum,
                                            ttl_seconds=ttl, layer_weights=layer_weights)  # fmt: skip
        ctx.teacher = teacher
        ctx.save_for_backward(x.detach(), res.input_grad.reshape(x.shape).to(x.device))
        return x.new_tensor(res.loss), res.logits.to(x.device)

    @staticmethod
    def backward(ctx, g_bn: torch.Tensor | None, g_logits: torch.Tensor | None):
        x, bn_grad = ctx.saved_tensors
        grad = torch.zeros_like(x) if g_bn is None else g_bn * bn_grad
        if g_logits is not None and bool(g_logits.ne(0).any()):
            teacher: ServedTeacher = ctx.teacher
            upstream = {"logits": g_logits.detach().cpu()}
            vjp, _ = teacher.client.input_gradient(teacher.name, teacher.to_wire(x), upstream)
            grad = grad + vjp.reshape(x.shape).to(x.device)
        return None, None, None, None, None, grad


def bn_loss_and_logits(
    teacher: ServedTeacher, x: torch.Tensor, *, layer_weights: tuple[float, ...] = (), state_id: str = "",
    momentum: float = 0.0, ttl: float = 600.0,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """R_bn(x) (weighted per BN layer, with Fast-DFKD's momentum state under ``state_id``) and the
    teacher's logits, both differentiable w.r.t. ``x``. Costs B gradient samples, plus B more when
    a gradient flows back through the logits."""
    return _BNAndLogits.apply(teacher, state_id, momentum, ttl, tuple(float(w) for w in layer_weights), x)


def total_variation_l2(x: torch.Tensor) -> torch.Tensor:
    """R_tv: L2 norms of the differences between neighbouring pixels (rows, columns, both diagonals)
    of [N, C, H, W] images; 0 for inputs that are not images (as on the server)."""
    if x.ndim != 4:
        return x.new_zeros(())
    d1 = x[..., :, :-1] - x[..., :, 1:]
    d2 = x[..., :-1, :] - x[..., 1:, :]
    d3 = x[..., 1:, :-1] - x[..., :-1, 1:]
    d4 = x[..., :-1, :-1] - x[..., 1:, 1:]
    return d1.norm() + d2.norm() + d3.norm() + d4.norm()


def input_l2(x: torch.Tensor) -> torch.Tensor:
    """The batch mean of the per-sample L2 norms."""
    return x.reshape(len(x), -1).norm(dim=1).mean()


def adi_competition(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 3.0):
    """ADI's R_adi = 1 - clamp(JS, 0, 1) with the official clamped, KL(m || p) form of JS."""
    p = F.softmax(student_logits / temperature, dim=1)
    q = F.softmax(teacher_logits / temperature, dim=1)
    m = (0.5 * (p + q)).clamp(0.01, 0.99)
    p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
    n = len(p)
    js = 0.5 * (m * (m.log() - p.log())).sum() / n + 0.5 * (m * (m.log() - q.log())).sum() / n
    return 1.0 - js.clamp(0.0, 1.0)


def jitter_flip(x: torch.Tensor, jitter: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """DeepInversion's augmentation: roll the batch by random offsets in [-jitter, jitter] along H and
    W, then flip it horizontally with probability 1/2 when ``flip``."""
    if (jitter or flip) and x.ndim != 4:
        raise ValueError(f"jitter and flip need [N, C, H, W] images, got inputs of shape {list(x.shape)}")
    if jitter:
        dy, dx = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=gen))
        x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    if flip and float(torch.rand((), generator=gen)) < 0.5:
        x = torch.flip(x, dims=(-1,))
    return x


def value(t: torch.Tensor) -> float:
    return float(t.detach())


def batch_targets(kind: str, step: int, batch: int, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "cycle":
        return (torch.arange(batch) + step * batch) % num_classes
    if kind == "random":
        return torch.randint(0, num_classes, (batch,), generator=gen)
    raise ValueError(f"targets must be 'cycle' or 'random', got {kind!r}")


def synthesis_seed(config: DataFreeConfig, step: int) -> int:
    return (config.seed * 1_000_003 + step) % (2**31)


class SyntheticBank:
    """The synthesised batches so far with the teacher's logits on them; the student is distilled
    on random batches of it."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device  # where a checkpoint's bank goes back to (where its batches were made)
        self.inputs: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        self._x: torch.Tensor | None = None
        self._t: torch.Tensor | None = None

    def add(self, x: torch.Tensor, logits: torch.Tensor) -> None:
        self.inputs.append(x.detach())
        self.logits.append(logits.detach())
        self._x = self._t = None

    def __len__(self) -> int:
        return sum(len(x) for x in self.inputs)

    def state_dict(self) -> dict[str, list[torch.Tensor]]:
        return {"inputs": [x.cpu() for x in self.inputs], "logits": [t.cpu() for t in self.logits]}

    def load_state_dict(self, state: dict[str, list[torch.Tensor]]) -> None:
        self.inputs = [x.to(self.device) for x in state["inputs"]]
        self.logits = [t.to(self.device) for t in state["logits"]]
        self._x = self._t = None

    def sample(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self._x is None:
            self._x, self._t = torch.cat(self.inputs), torch.cat(self.logits)
        idx = torch.randint(0, len(self._x), (min(n, len(self._x)),), generator=gen)
        return self._x[idx], self._t[idx]


def student_asks(schedule: str) -> dict[str, object]:
    """The student's recipe default: a per-step cosine decay to 0 over the run for ``"cosine"``
    (Fast-Datafree anneals its student's learning rate with a cosine too), else the config's."""
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"student_schedule must be 'cosine' or 'constant', got {schedule!r}")
    return {"schedule": "cosine" if schedule == "cosine" else None}


def bank_batches(bank: SyntheticBank, steps: int, config: DataFreeConfig, gen: torch.Generator):
    """``steps`` KD batches drawn from the bank: (inputs, None, the teacher's stored logits)."""
    for _ in range(steps):
        x, t = bank.sample(config.batch_size, gen)
        yield x, None, t


def kd_on_bank(config: DataFreeConfig):
    """The student's loss on a bank batch: Hinton KD at ``config.temperature``."""
    return lambda ctx: kd_loss(ctx.model(ctx.inputs), ctx.teacher_logits, config.temperature)


# -- synthesis ------------------------------------------------------------------------------------
def synthesize_on_server(teacher: ServedTeacher, y: torch.Tensor, seed: int, o: dict) -> torch.Tensor:
    last = None
    for update in teacher.client.synthesize(teacher.name, len(y), targets=y.tolist(), iterations=o["iterations"],
                                            lr=o["lr"], bn_weight=o["bn_weight"], tv_weight=o["tv_weight"],
                                            l2_weight=o["l2_weight"], seed=seed):  # fmt: skip
        last = update
    if last is None or not last.get("done"):
        raise RuntimeError(f"teacher {teacher.name!r}: the synthesis stream ended without a batch")
    return last["inputs"]


def synthesis_loss(teacher: ServedTeacher, student: nn.Module, x: torch.Tensor, y: torch.Tensor, o: dict,
                   layer_weights: tuple[float, ...]) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    """DeepInversion's L(x) for an (already jittered) batch, with R_bn and the logits from the server."""
    bn, logits = bn_loss_and_logits(teacher, x, layer_weights=layer_weights)
    ce = F.cross_entropy(logits, y)
    tv, l2 = total_variation_l2(x), input_l2(x)
    loss = ce + o["bn_weight"] * bn + o["tv_weight"] * tv + o["l2_weight"] * l2
    terms = {"ce": value(ce), "bn": value(bn), "tv": value(tv), "l2": value(l2)}
    if o["adi_scale"]:
        adi = adi_competition(student(x), logits, o["adi_temperature"])
        loss = loss + o["adi_scale"] * adi
        terms["adi"] = value(adi)
    return loss, terms


def synthesize_here(teacher: ServedTeacher, student: nn.Module, y: torch.Tensor, seed: int, o: dict,
                    gen: torch.Generator, on_step: Callable[[dict], None] | None = None) -> torch.Tensor:  # fmt: skip
    """The client-side loop: the same noise, optimiser and loss as the server's, plus jitter, flip,
    clip, the first-BN multiplier and ADI's competition with ``student``."""
    noise = torch.randn(len(y), *teacher.input_shape, generator=torch.Generator().manual_seed(seed))
    x = noise.to(y.device).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=o["lr"], betas=(0.5, 0.9))
    weights = (float(o["first_bn_multiplier"]),) + (1.0,) * (len(teacher.batch_norms) - 1)
    was = student.training
    student.eval()
    for _ in range(o["iterations"]):
        xj = jitter_flip(x, o["jitter"], o["flip"], gen)
        loss, terms = synthesis_loss(teacher, student, xj, y, o, weights)
        if not math.isfinite(value(loss)):
            raise FloatingPointError(f"deepinversion: the synthesis loss is not finite ({terms})")
        opt.zero_grad(set_to_none=True)
        loss.backward(inputs=[x])  # the student's parameters get no gradient from synthesis
        opt.step()
        if o["clip"] is not None:
            with torch.no_grad():
                x.clamp_(*o["clip"])
        if on_step is not None:
            on_step({"loss": value(loss), **terms})
    student.train(was)
    return x.detach()


def _check(o: dict, explicit: set[str]) -> dict:
    if o["mode"] not in ("server", "client"):
        raise ValueError(f"deepinversion: mode must be 'server' or 'client', got {o['mode']!r}")
    if o["mode"] == "server":
        given = sorted(k for k in CLIENT_ONLY if k in explicit and not (k == "adi_scale" and not o[k]))
        if given:
            raise ValueError(f"deepinversion: {', '.join(given)} only apply in mode='client' (the server's loop has "
                             "no jitter, flip, clip or first-layer multiplier and cannot see the student)")  # fmt: skip
        o["adi_scale"] = 0.0
    elif o["adi_scale"] is None:
        o["adi_scale"] = ADI_SCALE
    if int(o["iterations"]) < 1 or int(o["kd_steps"]) < 0:
        raise ValueError("deepinversion: iterations must be >= 1 and kd_steps >= 0")
    if o["clip"] is not None:
        lo, hi = o["clip"]
        o["clip"] = (float(lo), float(hi))
    return o


@register(NAME, PAPER, tier="white")
def run(teacher: ServedTeacher, student: nn.Module, config: DataFreeConfig, *, test: Dataset | None = None,
        **options) -> DataFreeResult:  # fmt: skip
    """``config.steps`` batches of ``config.batch_size`` synthesised inputs, each followed by
    ``kd_steps`` KD steps of the student on all batches so far. Options: see ``DEFAULTS``."""
    o = _check(merge_options(NAME, DEFAULTS, options), set(options))
    require_white(NAME, teacher)
    if config.batch_size < 2:
        raise ValueError("deepinversion: BatchNorm statistics need config.batch_size >= 2")
    batch_targets(o["targets"], 0, 1, teacher.num_classes, torch.Generator())  # validates the option
    if o["student_schedule"] not in ("cosine", "constant"):
        raise ValueError(
            f"deepinversion: student_schedule must be 'cosine' or 'constant', got {o['student_schedule']!r}"
        )
    r = Run(NAME, teacher, student, config, test)
    gen = torch.Generator().manual_seed(config.seed)
    student.to(config.device)
    bank = SyntheticBank(config.device)
    r.keep(o, gen=gen, bank=bank)
    last: dict[str, torch.Tensor] = {}

    def rounds(first: int, end: int):
        """Per round: synthesise a batch, add it to the bank, then ``kd_steps`` student batches of the bank."""
        for step in range(first, end):
            y = batch_targets(o["targets"], step, config.batch_size, teacher.num_classes, gen).to(config.device)
            seed = synthesis_seed(config, step)
            if o["mode"] == "server":
                x = synthesize_on_server(teacher, y, seed, o).to(config.device)
            else:
                x = synthesize_here(teacher, student, y, seed, o, gen)
            bank.add(x, teacher.logits(x))
            last["x"] = x
            yield from bank_batches(bank, o["kd_steps"], config, gen)

    r.train(rounds, kd_on_bank(config), steps_per_round=o["kd_steps"], asks=student_asks(o["student_schedule"]))
    return r.result(last.get("x"))


# `kd demo-datafree` on the bundled digits (DigitsCNN teacher, width-8 student). ADI's competition is
# off: on digits it cost 6-9 points of test accuracy in each of four paired runs (adi_scale 0.2).
DEMO = {
    "config": {"steps": 40, "batch_size": 32, "lr": 3e-3, "temperature": 4.0, "seed": 0},
    "options": {
        "mode": "client",
        "iterations": 30,
        "lr": 0.1,
        "bn_weight": 1.0,
        "kd_steps": 40,
        "clip": (0.0, 1.0),
        "jitter": 1,
        "adi_scale": 0.0,
        "student_schedule": "constant",
    },
}
