"""``kp``: Zhi Zhang, Guanghan Ning, Zhihai He 2017, "Knowledge Projection for Deep Neural
Networks" (arXiv 1710.09505; also titled "Knowledge Projection for Effective Design of Thinner
and Faster Deep Neural Networks").

A trainable projection P carries the teacher's intermediate feature T (C_t channels) into the
representation of the student's *injection layer* S (C_s channels): a 1x1 convolution (the
paper's "projection matrix", C_t -> C_s) followed by a ReLU, applied to the teacher's map
resized to the student's spatial size. The student is regulated towards the projected teacher
knowledge with an L2 distance:

    P(T) = ReLU(BN_0(conv1x1(resize(T))))
    L    = weight * sum_k mean_{n, c, h, w} (S_k - P_k(T_k))^2

Both S (through the student) and P are trained by this term. Plumbing: the trainer applies
connectors to the student's map only, so P lives in a connector with ``takes_teacher = True``:
it receives the student map and the teacher's full map (``reduce=None``: the full teacher map
travels) and returns the pair (S, P(T)).

Assumptions (the full text was not available to check every detail):
- BN_0 is a batch normalisation *without* affine parameters, our addition: it fixes the scale of
  the projection, so the pair cannot reach the trivial minimum P(T) = S = 0. In the paper P is
  anchored differently -- the projected feature also feeds the student's upper layers (the
  "projection route") and is trained with the classification loss there; this trainer cannot
  run the student's upper layers on another input, so that route is not reproduced.
- The paper's iterative pruning that selects the teacher layer and the student injection layer
  is out of scope: the match (``--match S=T``) names them.
- weight = 1 (our choice, a mean squared error of the order of the CE term); the paper's
  weighting of the projection term against the classification loss and any schedule of it are
  not reproduced.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.student_trainer.losses import register_feature


def resize_map(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Average-pool down / bilinear up to ``size`` (as ``features.ConvBN`` resizes)."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    if x.shape[2] >= size[0]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class KnowledgeProjection(nn.Module):
    """The teacher-side projection: ``forward(student_map, teacher_map) -> (student_map, P(teacher))``."""

    takes_teacher = True

    def __init__(self, c_teacher: int, c_student: int, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = size
        self.conv = nn.Conv2d(c_teacher, c_student, 1)
        self.norm = nn.BatchNorm2d(c_student, affine=False)

    def project(self, t: torch.Tensor) -> torch.Tensor:
        if t.ndim != 4 or t.shape[1] != self.conv.in_channels:
            raise ValueError(
                f"kp: the projection expects a teacher map [N, {self.conv.in_channels}, H, W], got {tuple(t.shape)}"
            )
        # clone: a source may hand out inference-mode tensors, which autograd cannot save.
        t = resize_map(t.to(self.conv.weight.dtype).clone(), self.size)
        return F.relu(self.norm(self.conv(t)))

    def forward(self, s: torch.Tensor, t: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return s, None if t is None else self.project(t)


def kp_connector(s: tuple[int, ...], t: tuple[int, ...]) -> nn.Module:
    if len(s) != 3 or len(t) != 3:
        raise ValueError(f"kp projects [C, H, W] feature maps, got student {list(s)} and teacher {list(t)}")
    return KnowledgeProjection(t[0], s[0], (s[1], s[2]))


@register_feature(
    "kp",
    "Zhang, Ning, He 2017, Knowledge Projection for Deep Neural Networks (arXiv 1710.09505)",
    connector=kp_connector,
    teacher_logits_shift_invariant=True,
    couples=False,
)
def kp_loss(
    student_feats: list[tuple[torch.Tensor, torch.Tensor]],
    teacher_feats: list[torch.Tensor],
    *,
    weight: float = 1.0,
) -> torch.Tensor:
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(f"kp: {len(student_feats)} student and {len(teacher_feats)} teacher features")
    total: torch.Tensor | None = None
    for k, pair in enumerate(student_feats):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or pair[1] is None:
            raise ValueError(
                f"kp: match {k} needs (student map, projected teacher map) from the kp connector, got {type(pair)}"
            )
        s, p = pair
        if s.shape != p.shape:
            raise ValueError(f"kp: match {k}: student map {tuple(s.shape)} != projected teacher {tuple(p.shape)}")
        term = (s - p.to(s.dtype)).pow(2).mean()
        total = term if total is None else total + term
    assert total is not None
    return weight * total
