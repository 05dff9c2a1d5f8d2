"""``token-fkl``: per-token forward KL(p_t || p_s) for language models (Hinton KD per position).

Mean over the unmasked tokens (labels != -100), times T^2; dense ``[B, S, V]`` teacher
logits or sparse ``TokenTargets`` (rest bucket, or sampled counts: Anshumann et al. 2025).
See ``token_kd`` for the shared definitions. Default T = 1, the LM setting.
"""

from __future__ import annotations

import torch

from kd.core.tokens import TokenTargets
from kd.student_trainer.losses import register
from kd.student_trainer.losses.token_kd import token_kd_loss


@register("token-fkl", "per-token forward KL (Hinton et al. 2015; Agarwal et al. 2024, GKD beta = 0)",
          accepts_sparse=True, teacher_logits_shift_invariant=True, couples=True)  # fmt: skip
def token_fkl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | TokenTargets,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
) -> torch.Tensor:
    return token_kd_loss("fkl", student_logits, teacher_logits, labels, temperature=temperature, ce_weight=ce_weight)
