"""``token-gjsd``: the generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024, Eq. 1).

    m = beta p_t + (1 - beta) p_s,  JSD(beta) = beta KL(p_t || m) + (1 - beta) KL(p_s || m)

as TRL's ``GKDTrainer.generalized_jsd_loss`` computes it, including its convention that
beta = 0 *is* forward KL and beta = 1 *is* reverse KL (the mixture form itself vanishes
there). Per token, mean over unmasked tokens, times T^2 (TRL has no T^2; equal at T = 1).
Default beta = 0.5 (TRL's default).
"""

from __future__ import annotations

import torch

from kd.core.tokens import TokenTargets
from kd.student_trainer.losses import register
from kd.student_trainer.losses.token_kd import token_kd_loss


@register(
    "token-gjsd",
    "Agarwal et al. 2024, On-Policy Distillation of Language Models (GKD)",
    accepts_sparse=True,
    teacher_logits_shift_invariant=True,
    couples=True,
)
def token_gjsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | TokenTargets,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    ce_weight: float = 0.0,
) -> torch.Tensor:
    return token_kd_loss(
        "gjsd", student_logits, teacher_logits, labels, temperature=temperature, beta=beta, ce_weight=ce_weight
    )
