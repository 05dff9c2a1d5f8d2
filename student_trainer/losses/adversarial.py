"""``adversarial``: Xu, Hsu, Huang 2017, "Learning Loss for Knowledge Distillation with
Conditional Adversarial Networks" (arXiv 1709.00513; ICLR 2018 workshop).

A discriminator D looks at logits and learns to tell the teacher's (real) from the
student's (fake); the student learns to fool it, so the *loss* that transfers the
teacher's knowledge is learned rather than fixed. D is conditional / category-aware:
besides the real-vs-fake score it predicts the class (C + 1 outputs), which the paper
found to stabilise training. With z_s, z_t the logits, y the label, sigma the sigmoid:

    L_D = -log sigma(D_0(z_t)) - log(1 - sigma(D_0(z_s))) + CE(D_1:(z_t), y) + CE(D_1:(z_s), y)
    L_S = adv_weight * [ -log sigma(D_0(z_s)) + CE(D_1:(z_s), y) ] + l1_weight * mean |z_s - z_t|

(the student's term is the usual non-saturating GAN loss). Both are minimised in the
same step with one optimiser: D's term sees the student's logits detached, and the
student's term evaluates D with detached parameters, so each player only moves its
own weights. D is the connector of the match ``logits=logits``: trained with the
student and saved with it.

Defaults / assumptions (the paper gives the architecture only loosely): D is an MLP
C -> 256 -> 256 -> C + 1 with LeakyReLU(0.2); adv_weight = 1, l1_weight = 1 (the paper
combines the adversarial loss with an L1 term on logits, as pix2pix does); plus the
trainer's CE on labels (ce_weight = 1). Needs dense teacher logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from kd.student_trainer.losses import register_feature


class LogitDiscriminator(nn.Module):
    """D of the match ``logits=logits``; ``forward(z_s, z_t)`` returns D's outputs on the
    teacher's logits, on the detached student logits, and on the student logits through
    D's detached parameters: ([B, C + 1] each)."""

    takes_teacher = True

    def __init__(self, num_classes: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(num_classes, hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, num_classes + 1),
        )  # fmt: skip

    def forward(self, z_s: torch.Tensor, z_t: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        if z_t is None:
            raise ValueError("adversarial: the discriminator needs the teacher's logits")
        frozen = {k: v.detach() for k, v in self.net.named_parameters()}
        return self.net(z_t.to(z_s.dtype)), self.net(z_s.detach()), functional_call(self.net, frozen, (z_s,))


def discriminator(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    if len(student_shape) != 1 or tuple(student_shape) != tuple(teacher_shape):
        raise ValueError(
            f"adversarial compares logits of the same classes: match logits=logits "
            f"(got student {list(student_shape)}, teacher {list(teacher_shape)})"
        )
    return LogitDiscriminator(student_shape[0])


@register_feature(
    "adversarial",
    "Xu, Hsu, Huang 2017, Learning Loss for Knowledge Distillation with Conditional Adversarial Networks",
    connector=discriminator,
    default_matches=("logits=logits",),
    # D is trained on the raw teacher logits (real) against the student's: a per-row shift changes it.
    teacher_logits_shift_invariant=False,
    couples=False,
    teacher_side_logits=True,
)
def adversarial_loss(
    student_feats: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    teacher_feats: list[torch.Tensor],
    *,
    labels: torch.Tensor,
    student_logits: torch.Tensor,
    adv_weight: float = 1.0,
    l1_weight: float = 1.0,
) -> torch.Tensor:
    if len(student_feats) != 1:
        raise ValueError("adversarial takes one match: logits=logits")
    d_teacher, d_student_detached, d_student = student_feats[0]
    z_t = teacher_feats[0]
    labels = labels.reshape(-1).long()
    ones = torch.ones(len(labels), device=d_teacher.device, dtype=d_teacher.dtype)
    # D: teacher logits are real, student logits fake; both labelled with their class.
    loss_d = (
        F.binary_cross_entropy_with_logits(d_teacher[:, 0], ones)
        + F.binary_cross_entropy_with_logits(d_student_detached[:, 0], 1 - ones)
        + F.cross_entropy(d_teacher[:, 1:], labels)
        + F.cross_entropy(d_student_detached[:, 1:], labels)
    )
    # Student: make D call its logits real and of the right class (D's weights held fixed).
    loss_g = F.binary_cross_entropy_with_logits(d_student[:, 0], ones) + F.cross_entropy(d_student[:, 1:], labels)
    l1 = (student_logits - z_t.to(student_logits.dtype)).abs().mean()
    return loss_d + adv_weight * loss_g + l1_weight * l1
