"""``dist``: Huang, You, Wang, Qian, Xu 2022, "Knowledge Distillation from A Stronger Teacher" (DIST, NeurIPS).

DIST replaces the KL of Hinton KD by correlation ("relation") matching, which
only asks the student to rank / co-vary like the teacher, not to match its
probabilities exactly. With Y = softmax(Z / tau) ([B, C], row-wise):

    rho(a, b) = <a - mean a, b - mean b> / (||a - mean a|| * ||b - mean b|| + eps)    (Pearson)
    inter = 1 - (1/B) * sum_i rho(Y_s[i, :], Y_t[i, :])     (across classes, per sample)
    intra = 1 - (1/C) * sum_c rho(Y_s[:, c], Y_t[:, c])     (across the batch, per class)
    L     = ce_weight * CE(z_s, y) + beta * tau^2 * inter + gamma * tau^2 * intra

tau^2 is applied, as in the official code (hunto/image_classification_sota
``lib/models/losses/dist_kd.py``, which mmrazor's ``DISTLoss`` and other ports
copy); some versions omit it, which only matters for tau != 1. eps = 1e-8 is added to the
product of the norms, as there; so a row or column on which Y is constant
(e.g. a class no sample in the batch puts mass on, after saturation) gives
rho = 0 rather than 0/0, and its gradient is zero. Because of eps, inter and
intra for a student equal to the teacher are eps / (||.||^2 + eps), not exactly
0: negligible unless Y is nearly constant along the row or column (a large tau
with many classes, or a batch in which a class is never likely).

Reduction: plain means over samples (inter) and classes (intra); there is no
KL here. intra needs a batch of at least 2 samples to carry any signal (with
B = 1 every column is constant, so intra = 1 and has zero gradient).

The option for tau is called ``temperature``, as in the other methods.
Defaults beta = gamma = tau = 1 and CE weight 1 are the paper's and the
official code's ImageNet setting; some CIFAR-100 ports use beta = gamma = 2,
tau = 4.

Needs dense teacher logits (Pearson across all classes and the whole batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.student_trainer.losses import register

EPS = 1e-8


def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Pearson correlation of each row of a with the same row of b: [N, D] x [N, D] -> [N]."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def inter_class_relation(y_s: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
    """1 - mean over samples of the Pearson correlation across classes."""
    return 1.0 - pearson_rows(y_s, y_t).mean()


def intra_class_relation(y_s: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
    """1 - mean over classes of the Pearson correlation across the batch."""
    return 1.0 - pearson_rows(y_s.t(), y_t.t()).mean()


@register(
    "dist",
    "Huang, You, Wang, Qian, Xu 2022, Knowledge Distillation from A Stronger Teacher (DIST)",
    teacher_logits_shift_invariant=True,
    couples=True,
)
def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    ce_weight: float = 1.0,
) -> torch.Tensor:
    tau = temperature
    if tau <= 0:
        raise ValueError(f"temperature (tau) must be > 0, got {tau}")
    dt = torch.promote_types(student_logits.dtype, torch.float32)
    y_s = F.softmax(student_logits.to(dt) / tau, dim=1)
    y_t = F.softmax(teacher_logits.to(dt) / tau, dim=1)
    kd = tau**2 * (beta * inter_class_relation(y_s, y_t) + gamma * intra_class_relation(y_s, y_t))
    if ce_weight == 0:
        return kd
    return ce_weight * F.cross_entropy(student_logits.to(dt), labels) + kd
