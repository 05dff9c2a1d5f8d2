"""``cskd``: Yun, Park, Lee, Shin, CVPR 2020, "Regularizing Class-wise Predictions via
Self-knowledge Distillation" (CS-KD).

No teacher: each sample x is paired with another sample x' of the same class, and the
student's own softened prediction on x' (detached, a fixed target) supervises x:

    L = CE(z(x), y) + lambda * T^2 * KL(softmax(z(x') / T) || softmax(z(x) / T))

KL "batchmean" over the B pairs. Defaults T = 4, lambda = 1 (alinlab/cs-kd, CIFAR).
The loop (``Method.pairs``) builds each batch as [x; x'] with the partners drawn, seeded,
from the same class within the training subset, so the loss receives 2B student logits
and 2B labels: the first half are the samples, the second their partners.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.student_trainer.losses import register


@register("cskd", "Yun, Park, Lee, Shin 2020, Class-wise Self-Knowledge Distillation (CVPR)", needs_teacher=False,
          pairs=True, teacher_logits_shift_invariant=True, couples=False)  # fmt: skip
def cskd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    temperature: float = 4.0,
    lam: float = 1.0,
) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = student_logits.shape[0]
    if n % 2:
        raise ValueError(f"cskd needs a batch of samples followed by their partners (even size), got {n}")
    b = n // 2
    z, z_partner = student_logits[:b], student_logits[b:].detach()
    if not torch.equal(labels[:b], labels[b:]):
        raise ValueError("cskd partners must share their sample's class")
    dt = torch.promote_types(z.dtype, torch.float32)
    log_p = F.log_softmax(z.to(dt) / temperature, dim=1)
    log_q = F.log_softmax(z_partner.to(dt) / temperature, dim=1)
    kl = (log_q.exp() * (log_q - log_p)).sum(dim=1).mean()
    return F.cross_entropy(z.to(dt), labels[:b]) + lam * temperature**2 * kl
