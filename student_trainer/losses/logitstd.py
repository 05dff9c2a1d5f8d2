"""``logitstd`` and ``dkd-logitstd``: Sun, Ren, Li, Wang, Cao 2024, "Logit Standardization in
Knowledge Distillation" (CVPR 2024; arXiv 2403.01427; code: sunshangquan/logit-standardization-KD,
an mdistiller fork).

A shared temperature asks the student to match the teacher's logits in range and variance as
well as in their relations. Logit standardisation removes that: both sides' logits are z-scored
per sample before the softmax of the KD term,

    Z(z) = (z - mean_c z) / (std_c z + 1e-7)          (std with Bessel's correction, N - 1)

and the distillation loss is computed on Z(z_s), Z(z_t) at a base temperature T. It is a
plug-in over a logit method; kd offers it over Hinton KD and over DKD:

    logitstd:     L = ce_weight * CE(z_s, y) + kd_weight * T^2 * KL(softmax(Z(z_t)/T) || softmax(Z(z_s)/T))
    dkd-logitstd: L = ce_weight * CE(z_s, y) + dkd's decoupled term on Z(z_s), Z(z_t)
                      (tckd_weight * TCKD + nckd_weight * NCKD, warm-up min((epoch + 1) / warmup, 1);
                      ``dkd``'s alpha and beta, renamed here because kd's option "alpha" is a
                      KD/CE mix in [0, 1] and these are weights)

CE is on the raw student logits, as in the authors' ``KD.py`` / ``DKD.py``. KL is "batchmean"
(the true KL per sample, as theirs: ``kl_div(..., reduction="none").sum(1).mean()``).

Defaults are the authors' CIFAR-100 command (``--logit-stand --base-temp 2 --kd-weight 9``):
KD: T = 2, kd_weight = 9, ce_weight = 0.1 (their ``CFG.KD.LOSS.CE_WEIGHT``); DKD: T = 2,
tckd_weight = alpha = 1 * 9, nckd_weight = beta = 8 * 9 (their ``tools/train.py`` multiplies
DKD's alpha and beta by kd-weight), warm-up 20 epochs, ce_weight = 1.

Where this differs from that code: the std is torch's default (N - 1), as there; a 1/N
standard deviation would multiply every standardised logit by sqrt((C - 1) / C), i.e. act as
a temperature T * sqrt(C / (C - 1)). ``dkd-logitstd`` inherits ``dkd``'s exact non-target
softmax (mdistiller subtracts 1000 from the target logit instead; see ``dkd``), which matters
even less here because standardised logits are bounded by sqrt(C - 1) in absolute value.
The loss is invariant to a positive scale and a shift of either side's logits (apart from
the CE term); a constant logit row (std 0) standardises to 0, a uniform distribution.
Needs dense teacher logits (mean and std over all classes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.student_trainer.losses import register
from kd.student_trainer.losses.dkd import dkd_loss
from kd.student_trainer.losses.kd import soft_kl

EPS = 1e-7


def standardize(logits: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Z-score each row: (z - mean) / (std + eps), std with Bessel's correction (as the authors')."""
    if logits.shape[1] < 2:
        raise ValueError(f"logit standardisation needs at least 2 classes, got logits {tuple(logits.shape)}")
    dt = torch.promote_types(logits.dtype, torch.float32)
    z = logits.to(dt)
    return (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + eps)


def _check(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
        )


@register(
    "logitstd",
    "Sun, Ren, Li, Wang, Cao 2024, Logit Standardization in Knowledge Distillation (CVPR); over KD",
    teacher_logits_shift_invariant=True,
    couples=False,
)
def logitstd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 2.0,
    kd_weight: float = 9.0,
    ce_weight: float = 0.1,
) -> torch.Tensor:
    _check(student_logits, teacher_logits, temperature)
    kd = soft_kl(standardize(student_logits), standardize(teacher_logits), temperature) * temperature**2
    total = kd_weight * kd
    if ce_weight:
        total = total + ce_weight * F.cross_entropy(student_logits.to(total.dtype), labels)
    return total


@register(
    "dkd-logitstd",
    "Sun, Ren, Li, Wang, Cao 2024, Logit Standardization in Knowledge Distillation (CVPR); over DKD",
    teacher_logits_shift_invariant=True,
    couples=False,
)
def dkd_logitstd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    epoch: int,
    tckd_weight: float = 9.0,
    nckd_weight: float = 72.0,
    temperature: float = 2.0,
    warmup: int = 20,
    ce_weight: float = 1.0,
) -> torch.Tensor:
    _check(student_logits, teacher_logits, temperature)
    total = dkd_loss(standardize(student_logits), standardize(teacher_logits), labels, epoch=epoch, alpha=tckd_weight,
                     beta=nckd_weight, temperature=temperature, warmup=warmup, ce_weight=0.0)  # fmt: skip
    if ce_weight:
        total = total + ce_weight * F.cross_entropy(student_logits.to(total.dtype), labels)
    return total
