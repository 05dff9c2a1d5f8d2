"""``reviewkd``: Chen, Liu, Zhao, Jia 2021, "Distilling Knowledge via Knowledge Review" (CVPR 2021;
arXiv 2104.09044; authors' code dvlab-research/ReviewKD; mdistiller ``distillers/ReviewKD.py``).

ReviewKD lets each student stage learn from the teacher's stage at the same level *and* from
the deeper ones: the student's stages are fused from the deepest to the shallowest by
attention-based fusion (ABF), and each fused map is compared with the teacher's map of its
level by the hierarchical context loss (HCL). One match names all levels, shallow to deep, on
both sides (DigitsCNN: ``--match layer1,layer2,pool=layer1,layer2,pool``); a flat [N, C]
feature counts as an [N, C, 1, 1] map.

ABF at level i (student map x_i, C_i channels; residual r from level i + 1; mid channels
M = min(512, C_last), mdistiller's ``mid_channel``):

    a   = BN(conv1x1_{C_i -> M}(x_i))
    r'  = nearest-resize(r, size of x_i);   [w_a, w_r] = sigmoid(conv1x1_{2M -> 2}([a, r']))
    a   = a * w_a + r' * w_r                (not at the deepest level, which has no residual)
    a   = nearest-resize(a, size of the teacher's map at level i)        (if it differs)
    out_i = BN(conv3x3_{M -> C_t,i}(a)),  the residual for level i - 1 is a

HCL of a student output s and teacher map t ([N, C, H, W]):

    HCL(s, t) = ( MSE(s, t) + sum_{l in (4, 2, 1), l < H} 2^-j(l) MSE(P_l(s), P_l(t)) ) / (1 + sum 2^-j(l))

with P_l average pooling to l x l and j(l) = 1, 2, 3 for the pooled levels actually used
(MSE: the mean over all entries). Then, with the warm-up of mdistiller:

    L = weight * min((epoch + 1) / warmup, 1) * sum_levels HCL(out_i, t_i)        (+ CE, weight 1)

Defaults: weight = 1, warmup = 20 epochs, CE weight 1 (mdistiller ``REVIEWKD.*``); both
checked against mdistiller's ``hcl_loss`` and ``ABF``, with its init (``kaiming_uniform_``,
a = 1, on both convs).

Where kd differs: mdistiller counts epochs from 1 (epoch / warmup); kd's epochs count from 0,
so (epoch + 1) / warmup is the same factor. mdistiller takes the teacher's *pre-activation*
stage maps (and post-activation student maps); kd compares whatever layers the match names
(tap a BatchNorm before a ReLU for a pre-activation map). mdistiller's HCL uses the height
alone for the pyramid levels and pools to squares; kd does the same (square maps assumed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.student_trainer.losses import register_feature

PYRAMID = (4, 2, 1)


def _as_map(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(*x.shape, 1, 1) if x.ndim == 2 else x


def _as_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) == 1:
        return (shape[0], 1, 1)
    if len(shape) != 3:
        raise ValueError(f"reviewkd takes [C, H, W] maps or [C] features, got a layer of shape {list(shape)}")
    return tuple(shape)  # type: ignore[return-value]


class ABF(nn.Module):
    """Attention-based fusion of a student map with the residual of the deeper level."""

    def __init__(self, cin: int, mid: int, cout: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid))
        self.conv2 = nn.Sequential(nn.Conv2d(mid, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))
        self.att = nn.Sequential(nn.Conv2d(2 * mid, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, out_size: tuple[int, int]):
        a = self.conv1(x)
        if self.att is not None:
            if residual is None:
                raise ValueError("reviewkd: a fusing level needs the deeper level's residual")
            r = F.interpolate(residual, size=a.shape[2:], mode="nearest")
            w = self.att(torch.cat([a, r], dim=1))
            a = a * w[:, 0:1] + r * w[:, 1:2]
        if tuple(a.shape[2:]) != tuple(out_size):
            a = F.interpolate(a, size=out_size, mode="nearest")
        return self.conv2(a), a


class ReviewKDConnector(nn.Module):
    """The ABFs of one match (shallow to deep); ``forward(maps)`` returns one output per level."""

    takes_layers = True

    def __init__(self, student_shapes: list[tuple[int, ...]], teacher_shapes: list[tuple[int, ...]]) -> None:
        super().__init__()
        s = [_as_shape(tuple(x)) for x in student_shapes]
        t = [_as_shape(tuple(x)) for x in teacher_shapes]
        if len(s) != len(t) or not s:
            raise ValueError(f"reviewkd: {len(s)} student and {len(t)} teacher levels")
        mid = min(512, s[-1][0])
        self.out_sizes = [(h, w) for _, h, w in t]
        self.abfs = nn.ModuleList(ABF(si[0], mid, ti[0], fuse=i < len(s) - 1) for i, (si, ti) in enumerate(zip(s, t)))

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(maps) != len(self.abfs):
            raise ValueError(f"reviewkd: got {len(maps)} student maps for {len(self.abfs)} levels")
        outs: list[torch.Tensor] = [None] * len(maps)  # type: ignore[list-item]
        residual = None
        for i in reversed(range(len(maps))):
            outs[i], residual = self.abfs[i](_as_map(maps[i]), residual, self.out_sizes[i])
        return outs


def hcl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """mdistiller's ``hcl_loss`` for one level."""
    h = s.shape[2]
    loss = F.mse_loss(s, t)
    weight, total = 1.0, 1.0
    for level in PYRAMID:
        if level >= h:
            continue
        weight /= 2.0
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(s, level), F.adaptive_avg_pool2d(t, level))
        total += weight
    return loss / total


@register_feature(
    "reviewkd",
    "Chen, Liu, Zhao, Jia 2021, Distilling Knowledge via Knowledge Review (CVPR, arXiv 2104.09044)",
    connector=ReviewKDConnector,
    layers=0,
    teacher_logits_shift_invariant=True,
    couples=False,
)
def reviewkd_loss(
    student_feats: list[list[torch.Tensor]],
    teacher_feats: list[list[torch.Tensor]],
    *,
    epoch: int,
    weight: float = 1.0,
    warmup: int = 20,
) -> torch.Tensor:
    if warmup < 0:
        raise ValueError(f"reviewkd: warmup must be >= 0, got {warmup}")
    if not student_feats or len(student_feats) != len(teacher_feats):
        raise ValueError(f"reviewkd: got {len(student_feats)} student and {len(teacher_feats)} teacher matches")
    total = None
    for k, (outs, maps) in enumerate(zip(student_feats, teacher_feats)):
        outs = [outs] if isinstance(outs, torch.Tensor) else list(outs)
        maps = [maps] if isinstance(maps, torch.Tensor) else list(maps)
        if len(outs) != len(maps):
            raise ValueError(f"reviewkd: match {k}: {len(outs)} student outputs but {len(maps)} teacher maps")
        for level, (s, t) in enumerate(zip(outs, maps)):
            t = _as_map(t).detach().to(s.dtype)
            if s.shape != t.shape:
                raise ValueError(
                    f"reviewkd: match {k}, level {level}: student output {tuple(s.shape)} != teacher map "
                    f"{tuple(t.shape)}"
                )
            term = hcl(s, t)
            total = term if total is None else total + term
    factor = min((epoch + 1) / warmup, 1.0) if warmup > 0 else 1.0
    return weight * factor * total
