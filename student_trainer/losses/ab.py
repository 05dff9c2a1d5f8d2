"""``ab``: Heo, Lee, Yun, Choi 2019, "Knowledge Transfer via Distillation of Activation
Boundaries Formed by Hidden Neurons" (AAAI 2019; authors' code bhheo/AB_distillation;
RepDistiller ``distiller_zoo/AB.py``).

AB transfers where each neuron of the teacher is active (its activation boundary), not its
value: the student's *pre-ReLU* map s (after the connector) is pushed above +mu where the
teacher's pre-ReLU response t is positive and below -mu where it is not, with a squared hinge
(the paper's alternative loss, a differentiable surrogate of matching the ReLU's on/off state):

    d = (s + mu)^2   where s > -mu and t <= 0
        (s - mu)^2   where s <= mu and t > 0
        0            otherwise
    L = weight * sum_k 2^(k - n + 1) * (1/N) sum_{n, c, h, w} d          (matches shallow to deep: the
                                                                          deepest gets 1, each earlier half)

Defaults: margin mu = 1, weight = 3/1000 (RepDistiller's ``ABLoss``: sum / batch, then
``/ 1000 * 3``, weights ``2 ** (i - feat_num + 1)``), CE weight 1. Tap pre-ReLU maps (the BN
before a ReLU, e.g. ``layer2.1`` of DigitsCNN) on both sides, as RepDistiller's ``preact=True``.

Stages, and where kd differs: the paper and RepDistiller use AB to *initialise* the student:
a first stage trains the student's feature layers and the connector on the AB loss alone
(RepDistiller ``helper/pretrain.py``, 30 epochs), then the main stage trains with CE + KD and
no AB term (``loss_kd = 0`` for ``abound`` in ``helper/loops.py``). kd trains the AB term
jointly with CE (and KD via ``kd_weight``); RepDistiller's recipe is ``--opt ce_weight=0``
for a first run, then ``--method kd`` from that student. The connector is kd's ``auto``
(identity where the shapes agree, as theirs; else a 1x1 conv without bias + BN, where
RepDistiller uses ``ConvReg(use_relu=False)``, a conv with bias + BN).
"""

from __future__ import annotations

import torch

from kd.student_trainer.losses import register_feature


def ab_hinge(s: torch.Tensor, t: torch.Tensor, margin: float) -> torch.Tensor:
    """The element terms above summed over everything (RepDistiller's ``criterion_alternative_l2``)."""
    on = t > 0
    d = (s + margin).pow(2) * ((s > -margin) & ~on) + (s - margin).pow(2) * ((s <= margin) & on)
    return d.sum()


@register_feature(
    "ab",
    "Heo, Lee, Yun, Choi 2019, Knowledge Transfer via Distillation of Activation Boundaries "
    "Formed by Hidden Neurons (AAAI)",
    connector="auto",
    teacher_logits_shift_invariant=True,
    couples=False,
)
def ab_loss(
    student_feats: list[torch.Tensor],
    teacher_feats: list[torch.Tensor],
    *,
    weight: float = 3e-3,
    margin: float = 1.0,
) -> torch.Tensor:
    if margin < 0:
        raise ValueError(f"ab: margin must be >= 0, got {margin}")
    if not student_feats or len(student_feats) != len(teacher_feats):
        raise ValueError(f"ab: got {len(student_feats)} student and {len(teacher_feats)} teacher maps")
    n = len(student_feats)
    total = student_feats[0].new_zeros(())
    for k, (s, t) in enumerate(zip(student_feats, teacher_feats)):
        if s.shape != t.shape:
            raise ValueError(
                f"ab: match {k}: connected student map {tuple(s.shape)} != teacher map {tuple(t.shape)}; "
                "AB compares the two neuron by neuron"
            )
        total = total + 2.0 ** (k - n + 1) * ab_hinge(s, t.detach().to(s.dtype), margin) / len(s)
    return weight * total
