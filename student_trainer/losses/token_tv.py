"""``token-tv``: per-token total variation distance 1/2 sum_v |p_t(v) - p_s(v)| (DistillKit's TVD).

Bounded in [0, 1] per token, so single tokens with a very confident wrong student cannot
dominate the batch as they do under KL. Mean over unmasked tokens, times T^2.
"""

from __future__ import annotations

import torch

from kd.core.tokens import TokenTargets
from kd.student_trainer.losses import register
from kd.student_trainer.losses.token_kd import token_kd_loss


@register("token-tv", "per-token total variation distance (Wen et al. 2023, f-divergence KD; DistillKit TVD)",
          accepts_sparse=True, teacher_logits_shift_invariant=True, couples=True)  # fmt: skip
def token_tv_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | TokenTargets,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
) -> torch.Tensor:
    return token_kd_loss("tv", student_logits, teacher_logits, labels, temperature=temperature, ce_weight=ce_weight)
