"""``cd``: Zhou, Zhuge, Guan, Liu 2020, "Channel Distillation: Channel-Wise Attention for
Knowledge Distillation" (arXiv 2006.01683): the channel-distillation (CD) feature loss, with the
paper's Early Decay Teacher (EDT) on its weight.

The channel-wise attention of a map F in R^{C x H x W} is the global average of each channel,
w_c(F) = 1/(H W) sum_{h,w} F_{c,h,w} (``kd.core.reductions.pool``, so a server sends only the [C]
vector as ``layer@pool``). The student's map first passes through a trainable connector r --
1x1 conv + BN + ReLU to the teacher's channel count, as the authors' code builds it
(zhouzaida/channel-distillation ``models/channel_distillation.py``, ``conv1x1_bn``, applied to
*every* matched stage, also where the channel counts already agree) -- and the loss
(``losses/cd_loss.py``) sums over the matched stages the mean over samples and channels:

    CD   = sum_k mean_{n, c} (w_c(r_k(F_k))_n - w_c(G_k)_n)^2
    w(e) = weight * decay ** floor((e + 1) / round(decay_every * epochs))      (EDT)
    L    = w(epoch) * CD                 (+ ce_weight * CE + kd_weight * KD, FEATURE_COMMON)

Defaults: weight = 6 (the reference's ``loss_rate`` for CDLoss in both its ImageNet and CIFAR
configs), decay = 0.9 every 30% of training (its EDT: ``factor`` 0.9, a step every 30 of 100
ImageNet epochs; ``utils/util.py``, ``adjust_loss_alpha``), the same schedule as
``student_trainer.losses.gkd.edt_weight`` (0-based epochs, hence e + 1). decay = 1 gives the
constant weight of the reference's plain "cd.ce" runs. Not reproduced: the "lrdv2" variant that
switches CE and KD off for the first 30 epochs, and the reference's uneven CIFAR steps (60 and
160 of 200). The paper's GKD term is the separate logit method ``gkd``.

Assumption: the connector is built from the student map's shape [C_s, H, W] and the teacher's
*pooled* shape [C_t] (the trainer builds connectors from the reduced teacher feature), so the
spatial sizes of the two maps need not agree -- pooling removes them.
"""

from __future__ import annotations

import torch
from torch import nn

from kd.student_trainer.losses import register_feature
from kd.student_trainer.losses.gkd import edt_weight


class ChannelConnector(nn.Module):
    """1x1 conv (no bias) + BN + ReLU from C_s to C_t channels (the reference's ``conv1x1_bn``)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"cd: the connector needs a 4-D [N, C, H, W] student map, got {tuple(x.shape)}")
        return self.relu(self.bn(self.conv(x)))


def cd_connector(s: tuple[int, ...], t: tuple[int, ...]) -> nn.Module:
    """Connector factory: student map [C_s, H, W]; teacher map [C_t, H, W] (or its pooled [C_t],
    when the source only has the statistic)."""
    if len(s) != 3:
        raise ValueError(f"cd matches [C, H, W] feature maps; the student layer gives shape {list(s)}")
    if len(t) not in (1, 3):
        raise ValueError(f"cd: the teacher's feature should be a map [C, H, W] or pooled [C], got {list(t)}")
    return ChannelConnector(s[0], t[0])


@register_feature(
    "cd",
    "Zhou et al. 2020, Channel Distillation: Channel-Wise Attention for Knowledge Distillation (CD + EDT)",
    reduce="pool",
    connector=cd_connector,
    teacher_logits_shift_invariant=True,
    couples=False,
)
def cd_loss(
    student_feats: list[torch.Tensor],
    teacher_feats: list[torch.Tensor],
    *,
    weight: float = 6.0,
    decay: float = 0.9,
    decay_every: float = 0.3,
    epoch: int,
    epochs: int,
) -> torch.Tensor:
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(f"cd: {len(student_feats)} student and {len(teacher_feats)} teacher features")
    total = student_feats[0].new_zeros(())
    for k, (s, t) in enumerate(zip(student_feats, teacher_feats)):
        if s.ndim != 2 or s.shape != t.shape:
            raise ValueError(
                f"cd: match {k} has student channel attention {tuple(s.shape)} and teacher {tuple(t.shape)}; "
                "both must be [N, C] with the same C (the connector maps the student to the teacher's channels)"
            )
        total = total + (s - t.to(s.dtype)).pow(2).mean()
    return edt_weight(epoch, epochs, weight, decay, decay_every) * total
