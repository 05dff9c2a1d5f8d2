"""``eskd``: Cho & Hariharan 2019, "On the Efficacy of Knowledge Distillation": early-stopped KD.

Hinton KD for the first part of the student's training, then cross-entropy alone:

    stop = stop_epoch                      if given (0-based: the first epoch without KD)
         = stop_fraction * epochs          otherwise
    L(epoch) = alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE(z_s, y)    if epoch < stop
             = CE(z_s, y)                                                 otherwise

The KD phase is exactly ``kd`` (KL "batchmean": the true per-sample KL averaged over the batch,
times T^2; sparse ``topk:K`` / ``sample:K`` targets via ``kd.core.targets.sparse_kl``). After the stop
the CE weight is 1, not 1 - alpha (as in the ESKD distiller of mdistiller-style code bases): the
student trains as it would without a teacher. The motivation is the paper's capacity-gap finding:
a small student cannot mimic a much larger teacher, so the KD term that helps early in training
can hold the student back late in training.

Checked against (the paper's body text itself could not be retrieved -- only its abstract):

* arXiv 1910.01348 / ICCV 2019 abstract: larger teachers are often worse teachers (capacity
  mismatch) and "this effect can be mitigated by stopping the teacher's training early" -- the
  paper's headline remedy is an early-stopped *teacher* (see below).
* The student-side schedule implemented here (the KD term removed partway through the student's
  training, which then continues on the classification loss alone) is the paper's early-stopped
  KD as described by a third-party summary of the paper citing its Tables 1 and 3 (ImageNet,
  ResNet18 student, top-1 error: scratch 30.24; full KD from ResNet34 / ResNet50 30.79 / 30.95;
  early-stopped KD 29.16 / 29.35), and consistent with HobbitLong/RepDistiller issue #10, whose
  90-epoch ImageNet run shows "exactly" the pattern of the paper's Figure 3 (KD ahead of scratch
  in the first two learning-rate stages, behind in the last one).
* A third-party mdistiller-style ``ESKD`` distiller ("On the Efficacy of Knowledge
  Distillation"): ``ce_weight * CE + kd_weight * KD`` while ``epoch < STOP_EPOCH``, then plain CE
  with weight 1 -- the same switch, and the same full CE weight after it, as here.

Still unverified: the paper's stop point. ``stop_fraction = 0.5`` is this project's default, not a
value read from the paper; set ``stop_epoch`` (or ``stop_fraction``) to match a schedule.

Early-stopped teacher (the paper's other remedy) is a choice of *source*, not of loss, so it is not
an option here. With ``kd train``: train the teacher architecture with ``--method ce`` for fewer
epochs and ``--out`` its weights (``kd train`` uses Adam at a constant learning rate and the seed
fixes the initialisation and every epoch's order, so ``--epochs E`` gives the weights a longer run
with the same seed had after epoch E, up to nondeterministic kernels; ``--run-dir`` keeps only
the latest ``checkpoint.pt``), e.g.

    kd train --student kd.models:digits_teacher --method ce --epochs 10 --out teacher-e10.safetensors
    kd train --method eskd --source local:kd.models:digits_teacher@teacher-e10.safetensors

(or serve it with ``kd serve --teacher t=kd.models:digits_teacher@teacher-e10.safetensors`` /
cache it with ``kd precompute``, and train with ``kd`` or ``eskd`` against that). With ``kd
chain``: pass the early checkpoint as ``--teacher module:factory@WEIGHTS``, or, for a teacher
trained by the chain itself, lower ``--teacher-epochs``.

Defaults: T = 4, alpha = 0.9 (those of ``kd``), stop_fraction = 0.5 (see above).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.core.targets import SparseTargets
from kd.student_trainer.losses import register
from kd.student_trainer.losses.kd import kd_loss


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
    teacher_logits_shift_invariant=True,
    couples=False,
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
