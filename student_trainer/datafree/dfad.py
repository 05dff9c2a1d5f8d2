"""DFAD: Fang, Song, Shen, Wang, Chen and Song, "Data-Free Adversarial Distillation",
2019 (arXiv:1912.11006). Official code: VainF/Data-Free-Adversarial-Distillation
(``DFAD_mnist.py``, ``DFAD_cifar.py``, ``network/gan.py``).

A generator G and the student S play a min-max game on the discrepancy between the
student's and the teacher's raw logits, measured by the mean absolute error::

    MAE(s, t) = (1 / (n K)) sum_i sum_k |s_ik - t_ik|
    student:    min_S MAE(S(x), T(x)),  x = G(z) detached
    generator:  max_G MAE(S(G(z)), T(G(z)))   i.e.  L_G = -MAE

The generator's gradient flows through the frozen teacher (the server's input-gradient
RPC on raw logits: probabilities would not do) and through the local student. ``steps``
are generator steps; before each, the student takes ``k`` steps on fresh batches (the
teacher's logits only, no gradient): per step the teacher answers
``(k + 1) * batch_size`` samples and ``batch_size`` gradient samples.

Defaults and their source (official ``DFAD_mnist.py``): k = 5 student steps per generator
step, nz = 100, generator Adam at ``config.generator_lr`` (official 1e-3), the
DCGAN-style ``GeneratorA`` of the official code (width 64, tanh, a last BatchNorm without
affine) -- the same network as ``common.Generator``.

Assumed or simplified:

* The student optimiser is ``student_optimizer`` at ``config.lr``: Adam by default (the
  shared ``DataFreeConfig`` convention); the official code uses SGD, momentum 0.9 (MNIST:
  lr 0.01, weight decay 1e-4, batch 512, 2,000 generator steps; CIFAR: lr 0.1, weight
  decay 5e-4, nz 256, an optional step schedule) -- ``student_optimizer="sgd"``.
  ``cosine`` (off by default) anneals both learning rates to 0 over the run, per student
  step (the shared trainer's schedule; these options fill the recipe fields that
  ``DataFreeConfig`` leaves at their defaults).
* The generator's last BatchNorm standardises its images; the official teachers take
  standardised inputs, so the default hands them over as they are.
  ``input_mean``/``input_std``/``clamp`` (``dafl.to_input``) map them into another
  teacher's input range: the digits DEMO uses 0.5 + 0.5 x clamped to [0, 1], derived
  from the pixel range alone (no statistics of the real data).
* The official code keeps a log-form generator loss, -log(MAE + 1), commented out; only
  -MAE is implemented.

Measured (``DEMO``; digits CNN teacher at 98.0% test accuracy, width-8 student, one CPU
core): 80% / 77% test accuracy (seeds 0 / 1) in ~36 s, 153,600 samples + 25,600 gradient
samples. The small generator learning rate (1e-4) matters at this budget: at 1e-3 the
generator chases the student between a few teacher classes and the student stays at
20-50%; with the generator frozen, the same recipe reaches ~60%.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kd.core.data import Dataset
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

NAME = "dfad"
PAPER = "Fang et al., Data-Free Adversarial Distillation, 2019 (arXiv:1912.11006)"
TIER = "white"

# ``kd demo-datafree``: digits CNN teacher (width 32) -> width-8 student; see "Measured" above.
DEMO = {
    "config": {"steps": 400, "batch_size": 64, "lr": 0.1, "generator_lr": 1e-4},
    "options": {"k": 5, "nz": 64, "generator_width": 32, "input_mean": 0.5, "input_std": 0.5, "clamp": [0.0, 1.0],
                "student_optimizer": "sgd", "weight_decay": 1e-4, "cosine": True},
}  # fmt: skip


def mae(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean absolute error between logits, over samples and classes."""
    return F.l1_loss(student_logits, teacher_logits)


@register(NAME, PAPER, tier=TIER)
def run(
    teacher: ServedTeacher,
    student: nn.Module,
    config: DataFreeConfig,
    *,
    test: Dataset | None = None,
    k: int = 5,
    nz: int = 100,
    generator_width: int = 64,
    input_mean: float = 0.0,
    input_std: float = 1.0,
    clamp: tuple[float, float] | None = None,
    student_optimizer: str = "adam",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    cosine: bool = False,
    generator: Generator | None = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    **unknown,
) -> DataFreeResult:
    """DFAD: ``config.steps`` rounds of ``k`` student steps then one generator step.

    ``generator``: train this one instead of a fresh ``Generator(teacher.input_shape, nz,
    generator_width)``; ``callback(step, losses)`` receives each round's loss values."""
    check_options(NAME, run, unknown)
    require_tier(teacher, NAME)
    if k < 1:
        raise ValueError(f"dfad: k (student steps per generator step) must be >= 1, got {k}")
    device = config.device
    book = Run(NAME, teacher, student, config, test)
    book.keep(given_options(run, locals()))
    if generator is None:
        generator = Generator(teacher.input_shape, nz=nz, width=generator_width)
    generator.to(device).train()
    student.to(device).train()
    opt_g = torch.optim.Adam(generator.parameters(), lr=config.generator_lr)

    def sample() -> torch.Tensor:
        z = torch.randn(config.batch_size, generator.nz, device=device)
        return to_input(generator(z), input_mean, input_std, clamp)

    last: dict[str, torch.Tensor] = {}

    def rounds(first: int, end: int):
        """Per round: ``k`` student batches (fresh images, the teacher's logits), then a generator step."""
        for step in range(first, end):
            for _ in range(k):
                with torch.no_grad():  # (never yield inside it: the trainer's step would run without grad)
                    x = sample()
                    t_logits = teacher.logits(x)
                yield x, None, t_logits
            x = sample()
            loss_g = -mae(student(x), teacher(x))
            losses = {"student": book.last_loss, "generator": float(loss_g.detach())}
            finite_or_raise(NAME, step, losses)
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward(inputs=list(generator.parameters()))  # the student's own step is the trainer's
            opt_g.step()
            last["x"] = x.detach()
            if callback is not None:
                callback(step, losses)

    book.train(rounds, lambda ctx: mae(ctx.model(ctx.inputs), ctx.teacher_logits), steps_per_round=k,
               extra=[(generator, opt_g)],
               asks=student_recipe(student_optimizer, momentum, weight_decay, cosine))  # fmt: skip
    return book.result(last.get("x"))
