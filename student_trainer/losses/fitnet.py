"""``fitnet``: Romero, Ballas, Kahou, Chassang, Gatta, Bengio 2015, "FitNets: Hints for Thin
Deep Nets" (ICLR 2015).

The student's guided layer F passes through a trainable regressor r (here the
connector: a 1x1 conv + BN for maps, a linear map for vectors; CRD and mdistiller build
theirs with a bias and a ReLU after the BN, which ``fitnet-convreg`` uses; the paper used a
convolutional regressor) to the shape of the teacher's hint layer G:

    L = weight * mean_{n, c, h, w} (r(F) - G)^2

The paper trains in two stages (hints first, then KD); like CRD's and mdistiller's
re-implementations we train the hint term jointly with CE (and optionally KD via
``kd_weight``). Default weight = 100 (CRD's CIFAR-100 setting); mdistiller also uses 100.
"""

from __future__ import annotations

import torch

from kd.student_trainer.losses import register_feature


@register_feature(
    "fitnet",
    "Romero et al. 2015, FitNets: Hints for Thin Deep Nets (ICLR)",
    connector="auto",
    teacher_logits_shift_invariant=True,
    couples=False,
)
def fitnet_loss(
    student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor], *, weight: float = 100.0
) -> torch.Tensor:
    total = student_feats[0].new_zeros(())
    for k, (s, t) in enumerate(zip(student_feats, teacher_feats)):
        if s.shape != t.shape:
            raise ValueError(f"fitnet: match {k}: regressed student {tuple(s.shape)} != teacher {tuple(t.shape)}")
        total = total + (s - t.to(s.dtype)).pow(2).mean()
    return weight * total
