"""``tfkd-reg``: Yuan, Tay, Li, Wang, Feng 2019, "Revisiting Knowledge Distillation via Label
Smoothing Regularization" (Teacher-free KD, CVPR 2020), Tf-KD_reg: a manually designed virtual
teacher instead of a trained one.

    u_c  = a                  if c == y
         = (1 - a) / (C - 1)  otherwise                 (the virtual teacher; sums to 1)
    p_v  = softmax(u / T)                               (u, a probability vector, used as logits)
    L    = (1 - alpha) * CE(z_s, y) + alpha * m * KL_mean(p_v || softmax(z_s))

Where T applies follows the reference code (yuanli2333/Teacher-free-Knowledge-Distillation
``my_loss_function.py``, ``loss_kd_regularization``): on the virtual teacher only; the student
distribution is the plain softmax(z_s) (the paper writes a softened student p_tau; the code,
whose numbers the hyper-parameters below come from, does not soften it). Note that softmax(u / T)
at T = 20 is close to uniform (C = 100: about 0.0105 on the true class), so the term acts as a
label-smoothing-like regulariser.

KL reduction: PyTorch's ``"mean"`` (sum over classes and batch / (B * C)), reproducing the
reference's ``nn.KLDivLoss()`` default, so that its per-architecture multipliers m keep their
meaning. Relative to the true per-sample KL ("batchmean") the soft weight is alpha * m / C: on
CIFAR-100 (C = 100) the default m = 100 is exactly batchmean with weight 1. With another class
count, rescale m by C / 100 to keep the CIFAR-100 strength.

Defaults (ResNet18, CIFAR-100, the reference's ``base_resnet18/params.json``): a = 0.99,
alpha = 0.1, T = 20, m = 100. No teacher: ``teacher_logits`` is ignored and may be None.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.student_trainer.losses import register


def virtual_teacher(
    labels: torch.Tensor, num_classes: int, correct_prob: float = 0.99, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The designed distribution u [B, C]: ``correct_prob`` on the label, the rest spread evenly."""
    if num_classes < 2:
        raise ValueError(f"the virtual teacher needs at least 2 classes, got {num_classes}")
    if not 0.0 <= correct_prob <= 1.0:
        raise ValueError(f"correct_prob must be in [0, 1], got {correct_prob}")
    u = torch.full((labels.shape[0], num_classes), (1.0 - correct_prob) / (num_classes - 1), dtype=dtype)
    u = u.to(labels.device)
    return u.scatter_(1, labels[:, None].long(), correct_prob)


@register(
    "tfkd-reg",
    "Yuan et al. 2019, Revisiting Knowledge Distillation via Label Smoothing Regularization (Tf-KD_reg)",
    needs_teacher=False,
    teacher_logits_shift_invariant=True,
    couples=False,
)
def tfkd_reg_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    alpha: float = 0.1,
    temperature: float = 20.0,
    multiplier: float = 100.0,
    correct_prob: float = 0.99,
) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dt = torch.promote_types(student_logits.dtype, torch.float32)
    b, c = student_logits.shape
    u = virtual_teacher(labels, c, correct_prob, dtype=dt)
    log_v = F.log_softmax(u / temperature, dim=1)
    log_s = F.log_softmax(student_logits.to(dt), dim=1)
    kl_mean = F.kl_div(log_s, log_v, reduction="sum", log_target=True) / (b * c)
    soft = multiplier * kl_mean
    if alpha == 1.0:
        return alpha * soft
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student_logits, labels)
