"""``eskd``: Cho & Hariharan 2019, "On the Efficacy of Knowledge Distillation": early-stopped KD.

Hinton KD for the first part of the student's training, then cross-entropy alone:

    stop = stop_epoch                      if given (0-based: the first epoch without KD)
         = stop_fraction * epochs          otherwise
    L(epoch) = alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE(z_s, y)    if epoch < stop
             = CE(z_s, y)                                                 otherwise

The KD phase is exactly ``kd`` (KL "batchmean": the true per-sample KL averaged over the batch,
times T^2; sparse ``topk:K`` / ``sample:K`` targets via ``kd.targets.sparse_kl``). After the stop
the CE weight is 1, not 1 - alpha (as in the ESKD distiller of mdistiller-style code bases): the
student trains as it would without a teacher. The motivation is the paper's capacity-gap finding:
a small student cannot mimic a much larger teacher, so the KD term that helps early in training
can hold the student back late in training.

The paper's other remedy, distilling from an early-stopped *teacher* checkpoint, is a choice of
source, not of loss: precompute a cache (or serve a model) from the early checkpoint and train
with ``kd`` or ``eskd`` against it.

Defaults: T = 4, alpha = 0.9 (those of ``kd``), stop_fraction = 0.5 (KD for the first half of
training). The stop point is this project's default; the paper's exact per-dataset stop epochs
were not checked against its text -- set ``stop_epoch`` or ``stop_fraction`` to match a schedule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.targets import SparseTargets
from student_trainer.losses import register
from student_trainer.losses.kd import kd_loss


def kd_stop_epoch(epochs: int, stop_fraction: float, stop_epoch: int | None) -> float:
    """The first epoch (0-based) trained with CE alone; KD runs while ``epoch < stop``."""
    if stop_epoch is not None:
        return float(stop_epoch)
    if not 0.0 <= stop_fraction <= 1.0:
        raise ValueError(f"stop_fraction must be in [0, 1], got {stop_fraction}")
    return stop_fraction * epochs


@register(
    "eskd",
    "Cho & Hariharan 2019, On the Efficacy of Knowledge Distillation (early-stopped KD)",
    accepts_sparse=True,
)
def eskd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | SparseTargets,
    labels: torch.Tensor,
    *,
    temperature: float = 4.0,
    alpha: float = 0.9,
    stop_fraction: float = 0.5,
    stop_epoch: int | None = None,
    epoch: int,
    epochs: int,
) -> torch.Tensor:
    if epoch < kd_stop_epoch(epochs, stop_fraction, stop_epoch):
        return kd_loss(student_logits, teacher_logits, labels, temperature=temperature, alpha=alpha)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return F.cross_entropy(student_logits, labels)
