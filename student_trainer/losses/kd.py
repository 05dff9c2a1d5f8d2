"""``kd``: Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network".

    p_t = softmax(z_t / T),  log p_s = log_softmax(z_s / T)
    L   = alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE(z_s, y)

KL is "batchmean": summed over classes, averaged over samples (the true KL per
sample, not PyTorch's reduction="mean" which also divides by the class count).
T^2 keeps the soft term's gradient magnitude comparable across temperatures.
Sparse targets (cache codecs ``topk:K``, ``rand:M``, ``sample:K``) use ``kd.core.targets.sparse_kl``,
never materialising the teacher's [B, C] distribution: the KL over the stored classes plus one
rest bucket holding the exact remaining mass (minimised by the teacher; the tail is not spread
evenly), or, for ``sample:K``, against the empirical distribution of the draws, at the
temperature they were drawn at (T = 1 by default: pass temperature=1).
Defaults T = 4, alpha = 0.9 (mdistiller's CIFAR-100 setting: CE weight 0.1,
KD weight 0.9). With alpha = 1 the loss is zero iff the student's softened
distribution equals the teacher's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.core.targets import SparseTargets, sparse_kl
from kd.student_trainer.losses import register


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(z_t/T) || softmax(z_s/T)), batchmean, computed in float32 or wider."""
    dt = torch.promote_types(student_logits.dtype, torch.float32)
    log_s = F.log_softmax(student_logits.to(dt) / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits.to(dt) / temperature, dim=1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)


@register(
    "kd",
    "Hinton, Vinyals, Dean 2015, Distilling the Knowledge in a Neural Network",
    accepts_sparse=True,
    teacher_logits_shift_invariant=True,
    couples=False,
)
def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | SparseTargets,
    labels: torch.Tensor,
    *,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if isinstance(teacher_logits, SparseTargets):
        soft = sparse_kl(student_logits, teacher_logits, temperature) * temperature**2
    else:
        soft = soft_kl(student_logits, teacher_logits, temperature) * temperature**2
    if alpha == 1.0:
        return alpha * soft
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student_logits, labels)
