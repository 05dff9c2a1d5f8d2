"""``tat``: Lin, Xie, Wang, Yu, Chang, Liang, Wang 2022, "Knowledge Distillation via the
Target-aware Transformer" (CVPR 2022; arXiv 2205.10793; code: sihaoevery/TaT).

One-to-all spatial matching: every teacher pixel t_i (a C-vector of the teacher map,
i over the H*W positions) is distilled to a *reconfiguration* of all student pixels,
weighted by their similarity to that teacher pixel:

    w_ij   = softmax_j( <theta(t_i), gamma(s_j)> )          (over student positions j)
    s'_i   = sum_j w_ij * phi(s_j)
    L_TaT  = mean_{n, i, c} (s'_i - t_i)^2

gamma and phi are trainable projections of the student map to the teacher's channels
(the connector, ``TaTConnector``: a 3x3 conv + BN each, as the official ``AttnEmbed``
"query" and "value" embeddings); theta is the identity on the teacher map (the official
code's teacher "key" is ``nn.Identity()``, its 3x3 conv is only an ablation). No
1/sqrt(d) scaling (none in the official ``MaskedFM`` loss).

Hierarchical distillation (paper Sec. 3.3), for large maps where H*W x H*W attention is
too costly or too global:

* patch-group distillation (``patch`` = p > 0): both maps are cut into P = (H/p)(W/p)
  patches of p x p (raster order) and split into ``groups`` = G runs of g = P/G consecutive
  patches; the g patches of a group are concatenated along channels, so a group is p*p
  positions of g*C channels (the patches of a group see each other through the channels);
  the attention above runs inside each group and L_pg is the mean squared error over all
  groups (= over the whole map). groups = P: every patch on its own.
  ``patch = 0`` is one patch = the whole map (plain TaT, the official ImageNet setting).
* anchor-point distillation (``anchor`` = a > 0): gamma(s), phi(s) and the teacher map
  are average-pooled to an a x a grid of anchors (each summarising a local area) and
  the attention above runs over the anchors; L_anchor compares with the pooled teacher.

    L = weight * sum_matches ( L_pg + anchor_weight * L_anchor [if anchor > 0] )

Defaults: weight = 0.2 is the official ImageNet config's factor for the TaT term
(``resnet18_from_resnet34_attn.yaml``; that run scales CE by 0.1, so set ce_weight=0.1 for
its exact ratio; with KD it uses 0.1 and 0.5 CE + 0.5 KD). patch = 0, groups = 1,
anchor = 0 reproduce the official classification code (7x7 maps, no hierarchy).

Assumptions (the paper's text could not be retrieved through the search tool, only the
official ImageNet code, which has no patch-group / anchor code):
* direction. By default (``direction="paper"``) the index order follows the paper's
  description: rows of the similarity = teacher pixels, columns = student pixels,
  w_ij = softmax_j(<theta(t_i), gamma(s_j)>). The only official code (sihaoevery/TaT,
  ``torchdistill/losses/single.py`` ``MaskedFM`` with ``heads: 1``) attends the other way
  round: student queries against teacher keys,

      w_ij = softmax_j( <gamma(s_i), theta(t_j)> ),   s'_i = sum_j w_ij * phi(s_j)

  (the softmax runs over *teacher* positions j, and the values phi(s_j) are taken at those
  positions), then MSE(s', t). ``direction="official"`` computes exactly that. The two agree
  when the attention is one-to-one; kd's measured numbers (README) use the default.
* the segmentation defaults of p, g and a are not known here; they are options.
* anchors pool the projected maps (gamma(s), phi(s)); the paper pools the features.
* a student map of another spatial size is resized to the teacher's first (average
  pooling down, bilinear up), as ``student_trainer.features.ConvBN`` does.

The connector takes the teacher map (``takes_teacher = True``) to apply theta; the attention
itself is computed in the loss so that ``patch`` / ``groups`` / ``anchor`` are method
options (connector factories only see shapes).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kd.student_trainer.losses import register_feature


class TaTFeatures(NamedTuple):
    """The connector's output for one match: projected student maps and the teacher key."""

    gamma: torch.Tensor  # [N, C_t, H, W]: student embedding compared with the teacher pixels
    phi: torch.Tensor  # [N, C_t, H, W]: student values the teacher pixel is rebuilt from
    theta: torch.Tensor | None  # [N, C_t, H, W]: teacher key (the teacher map), None without a teacher


def _embed(cin: int, cout: int) -> nn.Module:
    # The official ``Embed``: 3x3 conv (no bias) + BN.
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))


class TaTConnector(nn.Module):
    """gamma and phi (3x3 conv + BN, student channels -> teacher channels); theta = identity."""

    takes_teacher = True

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
        super().__init__()
        if len(student_shape) != 3 or len(teacher_shape) != 3:
            raise ValueError(
                f"tat joins [C, H, W] maps, got student {list(student_shape)} and teacher {list(teacher_shape)}"
            )
        self.teacher_shape = tuple(teacher_shape)
        self.gamma = _embed(student_shape[0], teacher_shape[0])
        self.phi = _embed(student_shape[0], teacher_shape[0])

    def forward(self, s: torch.Tensor, t: torch.Tensor | None) -> TaTFeatures:
        size = self.teacher_shape[1:]
        if tuple(s.shape[2:]) != size:
            if s.shape[2] >= size[0]:
                s = F.adaptive_avg_pool2d(s, size)
            else:
                s = F.interpolate(s, size=size, mode="bilinear", align_corners=False)
        if t is not None and tuple(t.shape[1:]) != self.teacher_shape:
            raise ValueError(f"tat: teacher map {tuple(t.shape)} but the connector was built for {self.teacher_shape}")
        return TaTFeatures(self.gamma(s), self.phi(s), t)


def tat_connector(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    return TaTConnector(student_shape, teacher_shape)


def _tokens(x: torch.Tensor, patch: int, groups: int) -> torch.Tensor:
    """[N, C, H, W] -> [N * G, p*p, g*C]: p x p patches in raster order, split into G = groups
    runs of g = P / G consecutive patches concatenated along channels (patch = 0: the whole
    map, [N, H*W, C])."""
    n, c, h, w = x.shape
    if patch == 0:
        return x.flatten(2).transpose(1, 2)
    ph, pw = h // patch, w // patch
    per = (ph * pw) // groups
    # [N, C, ph, p, pw, p] -> [N, ph, pw, p, p, C] -> [N, P, p*p, C]
    x = x.reshape(n, c, ph, patch, pw, patch).permute(0, 2, 4, 3, 5, 1).reshape(n, ph * pw, patch * patch, c)
    # [N, G, g, p*p, C] -> [N, G, p*p, g, C] -> [N*G, p*p, g*C]
    x = x.reshape(n, groups, per, patch * patch, c).transpose(2, 3)
    return x.reshape(n * groups, patch * patch, per * c)


DIRECTIONS = ("paper", "official")


def _reconfigure(gamma: torch.Tensor, phi: torch.Tensor, theta: torch.Tensor, direction: str = "paper") -> torch.Tensor:
    """On token tensors [B, P, D]: ``paper``: s'_i = sum_j softmax_j(<theta_i, gamma_j>) phi_j;
    ``official``: s'_i = sum_j softmax_j(<gamma_i, theta_j>) phi_j (sihaoevery/TaT ``MaskedFM``)."""
    if direction == "official":
        weights = torch.softmax(gamma @ theta.transpose(1, 2), dim=-1)  # [B, P_student i, P_teacher j]
    else:
        weights = torch.softmax(theta @ gamma.transpose(1, 2), dim=-1)  # [B, P_teacher, P_student]
    return weights @ phi


@register_feature(
    "tat",
    "Lin et al. 2022, Knowledge Distillation via the Target-aware Transformer (CVPR)",
    connector=tat_connector,
    teacher_logits_shift_invariant=True,
    couples=False,
)
def tat_loss(
    student_feats: list[TaTFeatures],
    teacher_feats: list[torch.Tensor],
    *,
    weight: float = 0.2,
    patch: int = 0,
    groups: int = 1,
    anchor: int = 0,
    anchor_weight: float = 1.0,
    direction: str = "paper",
) -> torch.Tensor:
    if direction not in DIRECTIONS:
        raise ValueError(f"tat: direction must be one of {DIRECTIONS}, got {direction!r}")
    if patch < 0 or groups < 1 or anchor < 0:
        raise ValueError(f"tat: patch and anchor must be >= 0 and groups >= 1, got {patch}, {groups}, {anchor}")
    if patch == 0 and groups != 1:
        raise ValueError("tat: groups > 1 needs patch > 0 (patch = 0 is one patch, the whole map)")
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(f"tat: {len(student_feats)} student and {len(teacher_feats)} teacher features")
    terms = []
    for k, (f, t) in enumerate(zip(student_feats, teacher_feats)):
        if not (isinstance(f, tuple) and len(f) == 3):
            raise ValueError(
                f"tat: match {k}: expected the TaT connector's (gamma, phi, theta), got {type(f).__name__}"
            )
        gamma, phi, theta = f
        theta = t if theta is None else theta
        t = t.to(gamma.dtype)
        theta = theta.to(gamma.dtype)
        if t.ndim != 4:
            raise ValueError(f"tat: match {k}: teacher feature {tuple(t.shape)} is not a [N, C, H, W] map")
        for what, x in (("gamma(student)", gamma), ("phi(student)", phi), ("theta(teacher)", theta)):
            if x.shape != t.shape:
                raise ValueError(f"tat: match {k}: {what} {tuple(x.shape)} != teacher map {tuple(t.shape)}")
        h, w = t.shape[2:]
        if patch and (h % patch or w % patch):
            raise ValueError(f"tat: match {k}: patch {patch} does not divide the {h}x{w} map")
        if patch and ((h // patch) * (w // patch)) % groups:
            raise ValueError(f"tat: match {k}: {(h // patch) * (w // patch)} patches do not split into {groups} groups")
        rebuilt = _reconfigure(
            _tokens(gamma, patch, groups), _tokens(phi, patch, groups), _tokens(theta, patch, groups), direction
        )
        terms.append((rebuilt - _tokens(t, patch, groups)).pow(2).mean())
        if anchor:
            if anchor > min(h, w):
                raise ValueError(f"tat: match {k}: {anchor}x{anchor} anchors on a {h}x{w} map")
            pooled = [F.adaptive_avg_pool2d(x, anchor) for x in (gamma, phi, theta, t)]
            rebuilt = _reconfigure(*(_tokens(x, 0, 1) for x in pooled[:3]), direction)
            terms.append(anchor_weight * (rebuilt - _tokens(pooled[3], 0, 1)).pow(2).mean())
    return weight * torch.stack(terms).sum()
