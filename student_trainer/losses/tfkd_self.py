"""``tfkd-self``: Yuan, Tay, Li, Wang, Feng 2019, "Revisiting Knowledge Distillation via Label
Smoothing Regularization" (Teacher-free KD, CVPR 2020), Tf-KD_self: self-training, the teacher
being a pretrained copy of the student itself (the source supplies its logits: serve or cache the
pretrained student as the teacher).

    p_t = softmax(z_t / T),  p_s = softmax(z_s / T)
    L   = (1 - alpha) * CE(z_s, y) + alpha * T^2 * m * KL_mean(p_t || p_s)

KL reduction: PyTorch's ``"mean"`` (sum over classes and batch / (B * C)), reproducing the
reference (yuanli2333/Teacher-free-Knowledge-Distillation ``my_loss_function.py``,
``loss_kd_self``, whose ``nn.KLDivLoss()`` uses the default reduction) so that its published
multipliers m (1, 10 or 50 depending on the model) keep their meaning. Relative to the true
per-sample KL ("batchmean", as in ``kd``) the soft weight is alpha * T^2 * m / C; on CIFAR-100
the default m = 50 equals batchmean with weight 0.5 * T^2. With another class count, rescale m
by C / 100 to keep the CIFAR-100 strength.

Defaults (ResNet18 self-teacher, CIFAR-100, the reference's
``resnet18_self_teacher/params.json``): alpha = 0.95, T = 6, m = 50. Sparse targets (``topk:K``,
``sample:K`` caches) use ``kd.core.targets.sparse_kl`` (batchmean) divided by C: the same quantity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.core.targets import SparseTargets, sparse_kl
from kd.student_trainer.losses import register


@register(
    "tfkd-self",
    "Yuan et al. 2019, Revisiting Knowledge Distillation via Label Smoothing Regularization (Tf-KD_self)",
    accepts_sparse=True,
    teacher_logits_shift_invariant=True,
    couples=False,
)
def tfkd_self_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | SparseTargets,
    labels: torch.Tensor,
    *,
    alpha: float = 0.95,
    temperature: float = 6.0,
    multiplier: float = 50.0,
) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b, c = student_logits.shape
    if isinstance(teacher_logits, SparseTargets):
        kl_mean = sparse_kl(student_logits, teacher_logits, temperature) / c
    else:
        dt = torch.promote_types(student_logits.dtype, torch.float32)
        log_s = F.log_softmax(student_logits.to(dt) / temperature, dim=1)
        log_t = F.log_softmax(teacher_logits.to(dt) / temperature, dim=1)
        kl_mean = F.kl_div(log_s, log_t, reduction="sum", log_target=True) / (b * c)
    soft = temperature**2 * multiplier * kl_mean
    if alpha == 1.0:
        return alpha * soft
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student_logits, labels)
