"""``ft``: Kim, Park, Kwak 2018, "Paraphrasing Complex Network: Network Compression via Factor
Transfer" (NeurIPS 2018; torchdistill ``FTLoss``, RepDistiller ``distiller_zoo/FT.py``).

A *paraphraser* P (a convolutional autoencoder on the teacher's map t, bottleneck k * C_t
channels, k = 0.5) is trained to reconstruct t; its code, the teacher factor F_t = P_enc(t),
is what the student transfers, through a *translator* T on the student's map s (convolutions
to the same k * C_t channels), F_s = T(s). With the factors flattened per sample:

    L_FT  = mean_{n, d} | F_s[n, d] / ||F_s[n]||_2 - F_t[n, d] / ||F_t[n]||_2 |          (p = 1)
    L_rec = mean_{n, c, h, w} (P_dec(P_enc(t)) - t)^2
    L     = weight * L_FT + rec_weight * L_rec

L_FT is torchdistill's ``FTLoss(p=1, reduction="mean")``, the paper's || . ||_1 of the
difference of the normalised factors, as a mean over the entries. Defaults: weight = 1000
(torchdistill's ImageNet config for FT), rec_weight = 1, k = 0.5; P: three 3x3 convs
(C_t -> C_t -> k C_t -> k C_t, LeakyReLU 0.1 after each) and three 3x3 transposed convs back,
no BN; T: three 3x3 convs (C_s -> C_s -> k C_t -> k C_t, BN + LeakyReLU 0.1 after each), as
RepDistiller's ``Paraphraser`` / ``Translator`` (``models/util.py``). A student map of another
spatial size is resized to the teacher's first (average pooling down, bilinear up).

Where kd differs, and why:
* Stages. The paper, torchdistill and RepDistiller train the paraphraser first, alone, on
  L_rec (stage 1), then freeze it and train the student and translator on CE + L_FT. kd's
  connector (``FTConnector``, trained with the student) holds both: P is trained on L_rec in
  the same steps, and F_t is detached in L_FT, so the paraphraser learns only to reconstruct,
  as in stage 1; but the factor the student chases moves while P trains (early on it is the
  code of an untrained encoder). kd has no separate first stage for a connector; a two-stage
  run needs trainer support (train P alone, then load it frozen), which is not here.
* RepDistiller's ``FactorTransfer`` compares normalize(mean_c F^2) (an attention map of the
  factor, like AT's) instead of the flattened factor itself, with weight 200 (``-b 200``);
  kd follows the paper and torchdistill.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kd.student_trainer.losses import register_feature

RATE = 0.5


class FTFeatures(NamedTuple):
    student_factor: torch.Tensor  # T(s): [N, k C_t, H, W]
    teacher_factor: torch.Tensor | None  # P_enc(t), None without a teacher map (evaluation)
    reconstruction: torch.Tensor | None  # P_dec(P_enc(t))
    teacher: torch.Tensor | None  # t, the target of the reconstruction


def _stack(channels: list[int], transpose: bool, bn: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for cin, cout in zip(channels[:-1], channels[1:]):
        conv = nn.ConvTranspose2d if transpose else nn.Conv2d
        layers.append(conv(cin, cout, 3, 1, 1))
        if bn:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(*layers)


class FTConnector(nn.Module):
    """Paraphraser (encoder + decoder on the teacher map) and translator (on the student map)."""

    takes_teacher = True

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
        super().__init__()
        if len(student_shape) != 3 or len(teacher_shape) != 3:
            raise ValueError(
                f"ft joins [C, H, W] maps, got student {list(student_shape)} and teacher {list(teacher_shape)}"
            )
        cs, ct = student_shape[0], teacher_shape[0]
        factor = max(1, int(ct * RATE))
        self.size = tuple(teacher_shape[1:])
        self.encoder = _stack([ct, ct, factor, factor], transpose=False, bn=False)
        self.decoder = _stack([factor, factor, ct, ct], transpose=True, bn=False)
        self.translator = _stack([cs, cs, factor, factor], transpose=False, bn=True)

    def forward(self, s: torch.Tensor, t: torch.Tensor | None) -> FTFeatures:
        if tuple(s.shape[2:]) != self.size:
            if s.shape[2] >= self.size[0]:
                s = F.adaptive_avg_pool2d(s, self.size)
            else:
                s = F.interpolate(s, size=self.size, mode="bilinear", align_corners=False)
        if t is None:
            return FTFeatures(self.translator(s), None, None, None)
        t = t.detach().to(s.dtype)
        code = self.encoder(t)
        return FTFeatures(self.translator(s), code, self.decoder(code), t)


def ft_connector(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    return FTConnector(student_shape, teacher_shape)


def factor_distance(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """mean | F_s / ||F_s|| - F_t / ||F_t|| | over samples and entries (flattened per sample)."""
    a, b = fs.flatten(1), ft.flatten(1).to(fs.dtype)
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (a - b).abs().mean()


@register_feature(
    "ft",
    "Kim, Park, Kwak 2018, Paraphrasing Complex Network: Network Compression via Factor Transfer (NeurIPS)",
    connector=ft_connector,
    teacher_logits_shift_invariant=True,
    couples=False,
)
def ft_loss(
    student_feats: list[FTFeatures],
    teacher_feats: list[torch.Tensor],
    *,
    weight: float = 1000.0,
    rec_weight: float = 1.0,
) -> torch.Tensor:
    if not student_feats or len(student_feats) != len(teacher_feats):
        raise ValueError(f"ft: got {len(student_feats)} student and {len(teacher_feats)} teacher features")
    terms = []
    for k, f in enumerate(student_feats):
        if not (isinstance(f, tuple) and len(f) == 4):
            raise ValueError(f"ft: match {k}: expected the FT connector's factors, got {type(f).__name__}")
        if f.teacher_factor is None or f.reconstruction is None or f.teacher is None:
            raise ValueError(f"ft: match {k}: the connector got no teacher map, so there is no teacher factor")
        if f.student_factor.shape != f.teacher_factor.shape:
            raise ValueError(
                f"ft: match {k}: student factor {tuple(f.student_factor.shape)} != teacher factor "
                f"{tuple(f.teacher_factor.shape)}"
            )
        term = weight * factor_distance(f.student_factor, f.teacher_factor.detach())
        if rec_weight:
            term = term + rec_weight * (f.reconstruction - f.teacher).pow(2).mean()
        terms.append(term)
    return torch.stack(terms).sum()
