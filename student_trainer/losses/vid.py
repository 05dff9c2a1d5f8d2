"""``vid``: Ahn, Hu, Damianou, Lawrence, Dai 2019, "Variational Information Distillation for
Knowledge Transfer" (CVPR 2019; authors' code ssahn0215/variational-information-distillation).

VID maximises a variational lower bound on the mutual information between a teacher map t
and a student map s: the teacher's activation is modelled as a Gaussian whose mean mu(s) a
small network predicts from the student's map and whose variance sigma_c^2 is one trainable
value per teacher channel. The loss is the negative log-likelihood (constants dropped):

    sigma_c^2 = softplus(alpha_c) + eps                         (alpha: trainable, one per channel)
    L = weight * sum_matches mean_{n, c, h, w} 1/2 * ( (mu(s) - t)^2 / sigma_c^2 + log sigma_c^2 )

mu is the connector ``VIDConnector``: 1x1 conv (no bias) C_s -> C_t, ReLU, 1x1 conv C_t -> C_t,
ReLU, 1x1 conv C_t -> C_t, as RepDistiller (``distiller_zoo/VID.py``, ``VIDLoss(s, t, t)``)
and mdistiller (``distillers/VID.py``) build it; alpha starts at log(exp(5 - eps) - 1) so that
sigma^2 = 5 (``init_pred_var`` = 5), eps = 1e-5. The larger of the two maps is average-pooled
to the smaller's spatial size first (as there). Defaults: weight = 1 and CE weight 1 (both
libraries' CIFAR-100 setting, ``-b 1`` / ``VID.LOSS.FEAT_WEIGHT`` = 1).

Differences from the reference code: mdistiller keeps its ``log_scales`` in a plain Python
list, so they are not registered parameters and never trained (sigma^2 stays 5 there);
RepDistiller registers them and trains them, as the paper's variance is learned; kd trains
them (they are the connector's ``log_scale``). The hint layers of both libraries are the
outputs of every stage; name them with ``--match``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kd.student_trainer.losses import register_feature

INIT_PRED_VAR = 5.0
EPS = 1e-5


class VIDFeatures(NamedTuple):
    mean: torch.Tensor  # [N, C_t, H, W]: the predicted teacher activation mu(s)
    var: torch.Tensor  # [C_t]: sigma_c^2


class VIDConnector(nn.Module):
    """mu(s) (three 1x1 convs with ReLUs between) and the per-channel variance softplus(alpha) + eps."""

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
        super().__init__()
        if len(student_shape) != 3 or len(teacher_shape) != 3:
            raise ValueError(
                f"vid joins [C, H, W] maps, got student {list(student_shape)} and teacher {list(teacher_shape)}"
            )
        cs, ct = student_shape[0], teacher_shape[0]
        self.size = tuple(teacher_shape[1:])
        self.regressor = nn.Sequential(
            nn.Conv2d(cs, ct, 1, bias=False), nn.ReLU(),
            nn.Conv2d(ct, ct, 1, bias=False), nn.ReLU(),
            nn.Conv2d(ct, ct, 1, bias=False),
        )  # fmt: skip
        self.log_scale = nn.Parameter(torch.full((ct,), math.log(math.exp(INIT_PRED_VAR - EPS) - 1.0)))

    def forward(self, s: torch.Tensor) -> VIDFeatures:
        if s.shape[2] > self.size[0]:
            s = F.adaptive_avg_pool2d(s, self.size)
        return VIDFeatures(self.regressor(s), F.softplus(self.log_scale) + EPS)


def vid_connector(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    return VIDConnector(student_shape, teacher_shape)


@register_feature(
    "vid",
    "Ahn, Hu, Damianou, Lawrence, Dai 2019, Variational Information Distillation for Knowledge Transfer (CVPR)",
    connector=vid_connector,
    teacher_logits_shift_invariant=True,
    couples=False,
)
def vid_loss(
    student_feats: list[VIDFeatures], teacher_feats: list[torch.Tensor], *, weight: float = 1.0
) -> torch.Tensor:
    if not student_feats or len(student_feats) != len(teacher_feats):
        raise ValueError(f"vid: got {len(student_feats)} student and {len(teacher_feats)} teacher features")
    terms = []
    for k, (f, t) in enumerate(zip(student_feats, teacher_feats)):
        if not (isinstance(f, tuple) and len(f) == 2):
            raise ValueError(f"vid: match {k}: expected the VID connector's (mean, var), got {type(f).__name__}")
        mean, var = f
        t = t.to(mean.dtype)
        if t.ndim != 4 or mean.ndim != 4 or t.shape[:2] != mean.shape[:2] or var.shape != (t.shape[1],):
            raise ValueError(
                f"vid: match {k}: predicted mean {tuple(mean.shape)}, variance {tuple(var.shape)} and teacher map "
                f"{tuple(t.shape)} do not fit ([N, C_t, H, W], [C_t], [N, C_t, H', W'])"
            )
        if t.shape[2] > mean.shape[2]:
            t = F.adaptive_avg_pool2d(t, mean.shape[2:])
        if t.shape != mean.shape:
            raise ValueError(f"vid: match {k}: predicted mean {tuple(mean.shape)} != teacher map {tuple(t.shape)}")
        v = var.to(mean.dtype).view(1, -1, 1, 1)
        terms.append((0.5 * ((mean - t.detach()).pow(2) / v + torch.log(v))).mean())
    return weight * torch.stack(terms).sum()
