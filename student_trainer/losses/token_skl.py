"""``token-skl``: skew KL of DistiLLM (Ko et al. 2024), per token.

    SKL(alpha)  = KL(p_t || alpha p_t + (1 - alpha) p_s)
    SRKL(alpha) = KL(p_s || alpha p_s + (1 - alpha) p_t)      (``reverse=true``)

The mixture keeps the log-ratio bounded by -log(alpha) where the student puts ~0 mass,
which stabilises early training. alpha = 0 is forward (reverse) KL; DistiLLM's default
alpha = 0.1. Mean over unmasked tokens, times T^2.
"""

from __future__ import annotations

import torch

from kd.core.tokens import TokenTargets
from kd.student_trainer.losses import register
from kd.student_trainer.losses.token_kd import token_kd_loss


@register(
    "token-skl",
    "Ko et al. 2024, DistiLLM: Towards Streamlined Distillation for LLMs",
    accepts_sparse=True,
    teacher_logits_shift_invariant=True,
    couples=True,
)
def token_skl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | TokenTargets,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    alpha: float = 0.1,
    reverse: bool = False,
    ce_weight: float = 0.0,
) -> torch.Tensor:
    kind = "srkl" if reverse else "skl"
    return token_kd_loss(
        kind, student_logits, teacher_logits, labels, temperature=temperature, alpha=alpha, ce_weight=ce_weight
    )
