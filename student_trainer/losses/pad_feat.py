"""``pad-feat``: Zhang, Lan, Dai, Zeng, Bai, Chang, Wei 2020, "Prime-Aware Adaptive
Distillation" (ECCV 2020), feature form.

PAD models the teacher's feature as a Gaussian around the student's prediction with a
learned, input-dependent variance: samples (and dimensions) the student finds hard get a
large variance and so a small weight, the "prime" (easy, reliable) samples dominate.
A connector (``PADConnector``) predicts from the student map both the regressed feature
mu = r(S) and a log-variance v = log sigma^2 (per sample and per element, like the
teacher map):

    L = weight * sum_matches mean_{n, elements} ( (mu - T)^2 / (eps + exp(v)) + v )

This is the form of the authors' code as torchdistill reproduces it (``PADL2Loss``: mean
over dimensions, then over the batch, no 1/2 factors, eps = 1e-6); it is twice the
Gaussian negative log-likelihood (mu - T)^2 / (2 sigma^2) + log(sigma^2) / 2 up to a
constant, so it has the same minimiser (v* = log((mu - T)^2), for eps -> 0). Defaults:
weight = 1 (torchdistill's ImageNet config), eps = 1e-6.

Connector (torchdistill ``VarianceBranch4PAD``: Linear(d, d) + BatchNorm1d(d) on the
student's embedding): for vectors mu = Linear (identity when the sizes agree) and
v = Linear + BN1d; for [C, H, W] maps (our generalisation) mu = 1x1 conv + BN (identity
when the shapes agree) and v = 1x1 conv + BN, both to the teacher's channels and size.
The paper distils the penultimate embedding (e.g. ``pool=pool``); any layer works.
The logit form is ``pad``.
"""

from __future__ import annotations

import torch
from torch import nn

from kd.student_trainer.features import ConvBN, auto
from kd.student_trainer.losses import register_feature


class PADConnector(nn.Module):
    """Returns (mu, log_variance), both of the teacher's shape."""

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
        super().__init__()
        s, t = tuple(student_shape), tuple(teacher_shape)
        if len(s) != len(t) or len(s) not in (1, 3):
            raise ValueError(
                f"pad-feat joins two vectors or two [C, H, W] maps, got student {list(s)} and teacher {list(t)}"
            )
        self.mean = auto(s, t)
        if len(s) == 1:
            self.log_var: nn.Module = nn.Sequential(nn.Linear(s[0], t[0]), nn.BatchNorm1d(t[0]))
        else:
            self.log_var = ConvBN(s[0], t[0], (t[1], t[2]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean(x), self.log_var(x)


def pad_connector(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    return PADConnector(student_shape, teacher_shape)


def gaussian_term(mu: torch.Tensor, log_var: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    """Elementwise (mu - target)^2 / (eps + exp(log_var)) + log_var (log_var broadcasts)."""
    return (mu - target).pow(2) / (eps + log_var.exp()) + log_var


@register_feature(
    "pad-feat",
    "Zhang et al. 2020, Prime-Aware Adaptive Distillation (ECCV), feature form",
    connector=pad_connector,
    teacher_logits_shift_invariant=True,
    couples=False,
)
def pad_feat_loss(
    student_feats: list[tuple[torch.Tensor, torch.Tensor]],
    teacher_feats: list[torch.Tensor],
    *,
    weight: float = 1.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(f"pad-feat: {len(student_feats)} student and {len(teacher_feats)} teacher features")
    if eps < 0:
        raise ValueError(f"pad-feat: eps must be >= 0, got {eps}")
    terms = []
    for k, (f, t) in enumerate(zip(student_feats, teacher_feats)):
        if not (isinstance(f, tuple) and len(f) == 2):
            raise ValueError(f"pad-feat: match {k}: expected the PAD connector's (mu, log_variance)")
        mu, log_var = f
        if mu.shape != t.shape:
            raise ValueError(f"pad-feat: match {k}: regressed student {tuple(mu.shape)} != teacher {tuple(t.shape)}")
        if log_var.shape != mu.shape:
            raise ValueError(f"pad-feat: match {k}: log-variance {tuple(log_var.shape)} != mu {tuple(mu.shape)}")
        terms.append(gaussian_term(mu, log_var, t.to(mu.dtype), eps).mean())
    return weight * torch.stack(terms).sum()
