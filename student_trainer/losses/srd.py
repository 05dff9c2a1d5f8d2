"""``srd``: Yang, Martinez, Bulat, Tzimiropoulos 2021, "Knowledge Distillation via Softmax
Regression Representation Learning" (ICLR 2021; authors' code jingyang2017/KD_SRRL).

SRD (also SRRL) trains the student's penultimate representation two ways: to match the
teacher's (feature matching) and to be *classified like the teacher's by the teacher's own
classifier* (softmax regression). The student's last map s (e.g. DigitsCNN's ``layer2``,
``--match layer2=layer2``) goes through a connector r (1x1 conv without bias + BN + ReLU,
the authors' ``transfer_conv``, to the teacher's width); t is the teacher's map at the same
place and (W, b) the teacher's frozen linear classifier, applied after global average pooling:

    p(x)  = mean_{h, w} x[:, :, h, w]                           (the models' average pooling)
    L_fm  = mean_{n, c} (p(r(s)) - p(t))^2                      (the authors' ``statm_loss``)
    L_sr  = mean_{n, k} (W p(r(s)) + b - z_t)^2                 (``F.mse_loss(pred_sc, pred_t)``)
    L     = weight * (fm_weight * L_fm + sr_weight * L_sr)      (+ CE, weight 1; + L_fit below)

Defaults: weight = fm_weight = sr_weight = 1, CE weight 1 (the authors' ImageNet script:
``loss_ce + (loss_stat + mse(pred_sc, pred_t)) * args.weight``, ``--weight 1``).

The teacher's classifier. With an in-process teacher (``--source local:SPEC``) the connector
copies, once, the teacher model's last ``nn.Linear`` whose output size is the number of
classes (frozen buffers, saved with the connector): the paper's method. A teacher behind a
server or a cache gives outputs, not weights; then kd uses a variant (``head="fit"``, chosen
automatically, or forced with ``--opt head=fit``): since the teacher's logits are the linear
head of its pooled map, z_t = W p(t) + b, the connector *estimates* (W, b) by regressing the
teacher's own logits on its own pooled map,

    L_fit = mean_{n, k} (W' p(t) + b' - z_t)^2           (trains only (W', b'), added to L)

and the student's feature goes through (W', b') detached, so the student's terms never move
the head, as with the frozen one. (W', b') tends to the teacher's head as it fits (exactly
when the pooled maps span their space); early in training it is not yet the teacher's
classifier. ``head="teacher"`` refuses a source without weights instead.

Where kd differs from the authors' code: their connector conv uses He-normal initialisation,
kd's PyTorch's default; their teacher head is called through the teacher model itself
(``net_t(x=None, feat_s=...)``), kd's through the copied (W, b), which is the same function
for a pooled linear head. ``z_t`` is the teacher's logits as the source gives them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kd.student_trainer.losses import register_feature


class SRDFeatures(NamedTuple):
    feature: torch.Tensor  # r(s) [N, C_t, H, W]
    logits: torch.Tensor  # W p(r(s)) + b [N, K]
    teacher_fit: torch.Tensor | None = None  # W' p(t) + b' [N, K] (the "fit" variant), else None


def teacher_classifier(model: nn.Module, num_classes: int) -> nn.Linear:
    """The model's last ``nn.Linear`` with ``num_classes`` outputs (its classifier head)."""
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not heads:
        raise ValueError(f"srd: the teacher has no nn.Linear layer with {num_classes} outputs (its classifier)")
    return heads[-1]


class SRDConnector(nn.Module):
    """r (1x1 conv + BN + ReLU) and the teacher's classifier: frozen buffers ``head_weight``,
    ``head_bias`` copied from an in-process teacher, or a linear ``head_fit`` estimated from the
    teacher's outputs (the variant for servers and caches)."""

    takes_teacher = True

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
        super().__init__()
        if len(student_shape) != 3 or len(teacher_shape) != 3:
            raise ValueError(
                f"srd joins [C, H, W] maps, got student {list(student_shape)} and teacher {list(teacher_shape)}"
            )
        self.transfer = nn.Sequential(
            nn.Conv2d(student_shape[0], teacher_shape[0], 1, bias=False), nn.BatchNorm2d(teacher_shape[0]), nn.ReLU()
        )
        self.teacher_channels = teacher_shape[0]
        self.head_fit: nn.Linear | None = None

    def bind(self, *, source: object = None, options: dict | None = None, **_: object) -> None:
        """Copy the teacher's classifier from an in-process teacher (``local:``); else, unless
        ``head="teacher"`` (the method's option), make the linear head fitted to the teacher's outputs."""
        head = (options or {}).get("head", "auto")
        if head not in ("auto", "teacher", "fit"):
            raise ValueError(f"srd: head must be 'auto', 'teacher' or 'fit', got {head!r}")
        model = getattr(getattr(source, "teacher", None), "model", None)
        if head == "fit" or (head == "auto" and not isinstance(model, nn.Module)):
            self.head_fit = nn.Linear(self.teacher_channels, int(source.num_classes))
            return
        if not isinstance(model, nn.Module):
            name = getattr(source, "name", type(source).__name__)
            raise ValueError(
                f"srd needs the teacher's classifier weights; the {name!r} source gives outputs, not weights. "
                "Use an in-process teacher (--source local:SPEC), or --opt head=fit"
            )
        head = teacher_classifier(model, int(source.num_classes))
        if head.in_features != self.teacher_channels:
            raise ValueError(
                f"srd: the teacher's classifier takes {head.in_features} features but the matched teacher map has "
                f"{self.teacher_channels} channels; match the map the classifier pools (e.g. the last stage)"
            )
        bias = head.bias if head.bias is not None else torch.zeros(head.out_features)
        self.register_buffer("head_weight", head.weight.detach().clone().float().cpu())
        self.register_buffer("head_bias", bias.detach().clone().float().cpu())

    def forward(self, s: torch.Tensor, t: torch.Tensor | None = None) -> SRDFeatures:
        f = self.transfer(s)
        pooled = f.mean(dim=(2, 3))
        if self.head_fit is not None:
            w, b = self.head_fit.weight, self.head_fit.bias
            fit = None if t is None else self.head_fit(t.detach().to(pooled.dtype).mean(dim=(2, 3)))
            return SRDFeatures(f, F.linear(pooled, w.detach(), b.detach()), fit)
        if not hasattr(self, "head_weight"):
            raise ValueError("srd: the connector has no teacher classifier (the trainer binds it from the source)")
        logits = pooled @ self.head_weight.to(pooled.dtype).t() + self.head_bias.to(pooled.dtype)
        return SRDFeatures(f, logits)


def srd_connector(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    return SRDConnector(student_shape, teacher_shape)


def _srd_invariant(options: dict[str, object]) -> bool:
    """L_sr regresses the student's logits onto the teacher's raw logits, and L_fit the fitted head's
    (``head="fit"``, chosen for a server or a cache): both see a per-row shift of z_t."""
    sr_off = options["weight"] == 0 or options["sr_weight"] == 0
    return sr_off and (options["fit_weight"] == 0 or options["head"] == "teacher")


@register_feature(
    "srd",
    "Yang, Martinez, Bulat, Tzimiropoulos 2021, Knowledge Distillation via Softmax Regression "
    "Representation Learning (ICLR)",
    connector=srd_connector,
    teacher_logits_shift_invariant=_srd_invariant,
    couples=False,
    accepts_sparse=False,  # L_sr and L_fit regress onto every class's logit
)
def srd_loss(
    student_feats: list[SRDFeatures],
    teacher_feats: list[torch.Tensor],
    *,
    teacher_logits: torch.Tensor,
    weight: float = 1.0,
    fm_weight: float = 1.0,
    sr_weight: float = 1.0,
    fit_weight: float = 1.0,
    head: str = "auto",
) -> torch.Tensor:
    if head not in ("auto", "teacher", "fit"):
        raise ValueError(f"srd: head must be 'auto', 'teacher' or 'fit', got {head!r}")
    if not student_feats or len(student_feats) != len(teacher_feats):
        raise ValueError(f"srd: got {len(student_feats)} student and {len(teacher_feats)} teacher features")
    if not isinstance(teacher_logits, torch.Tensor):
        raise ValueError("srd needs the teacher's dense logits")
    terms = []
    for k, (f, t) in enumerate(zip(student_feats, teacher_feats)):
        if not isinstance(f, SRDFeatures):
            raise ValueError(f"srd: match {k}: expected the SRD connector's output, got {type(f).__name__}")
        if t.ndim != 4 or f.feature.shape[:2] != t.shape[:2]:
            raise ValueError(
                f"srd: match {k}: connected student map {tuple(f.feature.shape)} and teacher map {tuple(t.shape)} "
                "need the same batch and channels ([N, C, H, W])"
            )
        if f.logits.shape != teacher_logits.shape:
            raise ValueError(f"srd: student logits via the teacher's head {tuple(f.logits.shape)} != teacher logits "
                             f"{tuple(teacher_logits.shape)}")  # fmt: skip
        dt = f.feature.dtype
        fm = (f.feature.mean(dim=(2, 3)) - t.detach().to(dt).mean(dim=(2, 3))).pow(2).mean()
        sr = (f.logits - teacher_logits.detach().to(f.logits.dtype)).pow(2).mean()
        term = weight * (fm_weight * fm + sr_weight * sr)
        if f.teacher_fit is not None:  # the "fit" variant: (W', b') learns the teacher's head
            term = term + fit_weight * (f.teacher_fit - teacher_logits.detach().to(f.teacher_fit.dtype)).pow(2).mean()
        terms.append(term)
    return torch.stack(terms).sum()
