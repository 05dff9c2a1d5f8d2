"""``ce``: plain cross-entropy with the labels; the no-teacher baseline.

L = CE(z_s, y)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.student_trainer.losses import register


@register(
    "ce",
    "cross-entropy only (no distillation)",
    needs_teacher=False,
    teacher_logits_shift_invariant=True,
    couples=False,
)
def ce_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(student_logits, labels)
