"""``ofd``: Heo, Kim, Yun, Park, Kwak, Choi 2019, "A Comprehensive Overhaul of Feature
Distillation" (ICCV 2019; authors' code clovaai/overhaul-distillation; mdistiller ``OFD.py``).

OFD distils *pre-ReLU* maps (tap the BatchNorm before a ReLU, e.g. ``layer2.1`` of DigitsCNN)
through a 1x1 conv + BN connector r, with a partial L2 that ignores what the teacher's ReLU
would discard. The teacher's negative responses are replaced by a per-channel margin m_c,
the expected value of a negative response:

    m_c = mu_c - sigma_c * phi(mu_c / sigma_c) / Phi(-mu_c / sigma_c)   if Phi(-mu_c / sigma_c) > 0.001
          -3 sigma_c                                                    otherwise

(phi, Phi: the standard normal density and distribution function). With s = r(F) and t the
teacher's pre-ReLU map (average-pooled to s's size if larger), element by element:

    d = (s - m)^2   where s > m and t <= m
        (s - t)^2   where s > t and m < t <= 0
        (s - t)^2   where t > 0
        0           otherwise
    L = weight * sum_k stage_decay^-(n-1-k) * (1/N) sum_{n, c, h, w} d        (matches shallow to deep)

exactly mdistiller's ``feat_loss`` (``abs(loss).mean(dim=0).sum()``) and its stage weights
``1 / 2 ** (feat_num - i - 1)``. Defaults: weight = 1e-3 (mdistiller ``OFD.LOSS.FEAT_WEIGHT``),
stage_decay = 2, CE weight 1.

Difference from the reference code, and why: the authors take mu_c and sigma_c from the
teacher's BN *parameters* (beta_c and |gamma_c| of the BN before the ReLU), i.e. the
Gaussian that BN's output follows on its training distribution. A teacher behind a server or
a cache gives maps, not parameters, so kd estimates the same Gaussian from the batch: mu_c and
sigma_c are the mean and (biased) standard deviation of the teacher's pre-ReLU map over the
batch and the positions, recomputed each step (detached). On the data the teacher was trained
on these agree with beta_c and |gamma_c| up to sampling noise. The connector is kd's
``conv1x1bn`` (1x1 conv without bias + BN, the authors' ``ConnectorConvBN`` with kernel 1, but
PyTorch's default initialisation instead of their He-normal one), which resizes a student map
to the teacher's size (mdistiller pools the teacher to the student's size instead).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kd.student_trainer.losses import register_feature


def ofd_margin(t: torch.Tensor) -> torch.Tensor:
    """Per-channel margin [1, C, 1, 1]: E[x | x < 0] of a Gaussian fitted to t over (N, H, W)."""
    x = t.detach().double().transpose(0, 1).reshape(t.shape[1], -1)
    mu = x.mean(dim=1)
    sigma = x.std(dim=1, unbiased=False).clamp_min(1e-12)
    z = mu / sigma
    cdf = 0.5 * (1.0 + torch.erf(-z / math.sqrt(2.0)))  # Phi(-mu / sigma)
    pdf = torch.exp(-(z**2) / 2.0) / math.sqrt(2.0 * math.pi)
    margin = torch.where(cdf > 0.001, mu - sigma * pdf / cdf.clamp_min(1e-300), -3.0 * sigma)
    return margin.to(t.dtype).view(1, -1, 1, 1)


def partial_l2(s: torch.Tensor, t: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """mdistiller's ``feat_loss``: the element terms above, summed over C, H, W, averaged over N."""
    d = (
        (s - margin).pow(2) * ((s > margin) & (t <= margin))
        + (s - t).pow(2) * ((s > t) & (t > margin) & (t <= 0))
        + (s - t).pow(2) * (t > 0)
    )
    return d.mean(dim=0).sum()


@register_feature(
    "ofd",
    "Heo, Kim, Yun, Park, Kwak, Choi 2019, A Comprehensive Overhaul of Feature Distillation (ICCV)",
    connector="conv1x1bn",
    teacher_logits_shift_invariant=True,
    couples=True,
)
def ofd_loss(
    student_feats: list[torch.Tensor],
    teacher_feats: list[torch.Tensor],
    *,
    weight: float = 1e-3,
    stage_decay: float = 2.0,
) -> torch.Tensor:
    if stage_decay <= 0:
        raise ValueError(f"ofd: stage_decay must be > 0, got {stage_decay}")
    if not student_feats or len(student_feats) != len(teacher_feats):
        raise ValueError(f"ofd: got {len(student_feats)} student and {len(teacher_feats)} teacher maps")
    n = len(student_feats)
    total = student_feats[0].new_zeros(())
    for k, (s, t) in enumerate(zip(student_feats, teacher_feats)):
        if s.ndim != 4 or t.ndim != 4 or s.shape[:2] != t.shape[:2]:
            raise ValueError(
                f"ofd: match {k}: connected student map {tuple(s.shape)} and teacher map {tuple(t.shape)} "
                "need the same batch and channels ([N, C, H, W])"
            )
        t = t.detach().to(s.dtype)
        margin = ofd_margin(t)  # of the teacher's own map, before any pooling
        if t.shape[2:] != s.shape[2:]:
            t = F.adaptive_avg_pool2d(t, s.shape[2:])
        total = total + partial_l2(s, t, margin) / stage_decay ** (n - 1 - k)
    return weight * total
