"""``fitnet-convreg``: FitNets (Romero et al. 2015) with the regressor CRD and mdistiller build.

The loss is ``fitnet``'s, weight * mean (r(F) - G)^2 with weight = 100 (the hint weight of
RepDistiller and mdistiller for CIFAR-100); only the regressor r differs. ``fitnet``'s
default connector is a 1x1 conv without bias + BN; RepDistiller (``models/util.py``
``ConvReg``) and mdistiller (``distillers/_common.py`` ``ConvReg``) use a conv *with* bias
whose kernel and stride follow the two spatial sizes (3x3 stride 2 when the student map is
twice the teacher's, a 4x4 stride-2 transposed conv when half, a (1 + Hs - Ht) x (1 + Ws - Wt)
kernel otherwise), then BN and ReLU: the connector ``convreg`` of
``student_trainer.features``. Their hint is the output of the second stage ("hint layer 2");
give it as ``--match``. Because of the ReLU the regressed map is non-negative, which suits
post-ReLU hints; the student map may not be smaller than the teacher's except by half.
"""

from __future__ import annotations

import torch

from kd.student_trainer.losses import register_feature
from kd.student_trainer.losses.fitnet import fitnet_loss


@register_feature(
    "fitnet-convreg",
    "Romero et al. 2015, FitNets: Hints for Thin Deep Nets (ICLR); regressor as CRD / mdistiller build it",
    connector="convreg",
    teacher_logits_shift_invariant=True,
    couples=False,
)
def fitnet_convreg_loss(
    student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor], *, weight: float = 100.0
) -> torch.Tensor:
    return fitnet_loss(student_feats, teacher_feats, weight=weight)
