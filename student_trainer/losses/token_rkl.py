"""``token-rkl``: per-token reverse KL(p_s || p_t) (mode seeking; MiniLLM's divergence, Gu et al. 2024).

Mean over the unmasked tokens, times T^2; dense teacher logits or sparse ``TokenTargets``
with logits + lse (rest bucket). Sampled counts alone are refused: reverse KL is not
linear in the teacher's distribution, so the count estimate would bias it.
"""

from __future__ import annotations

import torch

from kd.core.tokens import TokenTargets
from kd.student_trainer.losses import register
from kd.student_trainer.losses.token_kd import token_kd_loss


@register("token-rkl", "per-token reverse KL (Gu et al. 2024, MiniLLM; Agarwal et al. 2024, GKD beta = 1)",
          accepts_sparse=True, teacher_logits_shift_invariant=True, couples=True)  # fmt: skip
def token_rkl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | TokenTargets,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
) -> torch.Tensor:
    return token_kd_loss("rkl", student_logits, teacher_logits, labels, temperature=temperature, ce_weight=ce_weight)
