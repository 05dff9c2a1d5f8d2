"""``mgd``: Kaiyu Yue, Jiangfan Deng, Feng Zhou 2020, "Matching Guided Distillation" (ECCV 2020,
arXiv 2008.09958; project page kaiyuyue.com/mgd).

Instead of a trainable 1x1 conv that maps the student's C_s channels onto the teacher's C_t
(C_t >= C_s), MGD *assigns* teacher channels to student channels and reduces the teacher's map
to C_s channels, which the student's own channels (after a BN, the only connector) then match.

Assignment. The distance between student channel j and teacher channel k is
d_jk = mean_n (2 - 2 cos(S_nj, T_nk)), each channel's map flattened over H*W (the authors' code,
KaiyuYue/mgd ``mgd/builder.py``, ``track_running_stats``). It is solved as a linear assignment
problem (``scipy.optimize.linear_sum_assignment``):

- ``reduction="sm"`` (sparse matching): each student channel gets one distinct teacher channel
  (a C_s x C_t rectangular assignment); the other teacher channels are ignored.
- ``"rd"`` / ``"amp"``: the cost rows are repeated G = C_t // C_s times, so each student channel
  gets G distinct teacher channels; per position, ``rd`` (random drop) keeps one of the G at
  random, ``amp`` (absolute max pooling) keeps the one of largest absolute value, with its sign.

Loss (the authors' ``distillation_loss`` summed over elements, divided by the batch and by
``--loss-factor`` in their training loop, each of the n stages divided by 2^(n-1-k)):

    L = weight * sum_k stage_decay^-(n-1-k) * (1/N) sum_{n,c,h,w} (BN(S_k) - reduce(T_k))^2

Defaults: reduction = "amp" (the authors' default ``--mgd-reducer``), weight = 1e-4 (their
``--loss-factor`` 1e4 "for input size 224"; the sum over elements grows with H*W, so smaller
inputs may want a larger weight), stage_decay = 2 (matches listed shallow to deep).

Assumptions / differences from the authors' code:
- The assignment is recomputed *from each batch* (the loss is a pure function); the authors
  accumulate the distance matrix over ~20k training images with the model in eval mode and
  re-solve it every ``--mgd-update-freq`` = 2 epochs. A per-batch assignment follows the current
  student more closely but can switch between near-equal channels from batch to batch. The
  cost is computed from the connected (BN'd) student map, detached; the authors use the raw one
  (the cosine ignores a positive per-channel scale but not BN's shift).
- Loss: plain L2 as the paper writes it. The authors' code distils *pre-ReLU* features with
  the margin-based partial L2 of Heo et al. 2019 (teacher clipped from below by a margin from
  the teacher's BN statistics, no loss where both are below it); a teacher server sends module
  outputs and no BN statistics, so neither is reproduced.
- When C_t is not a multiple of C_s, the authors drop the last C_t - G C_s teacher channels by
  index (``shave``); here the rectangular assignment leaves out the C_t - G C_s channels that
  fit worst.
- ``amp`` takes the value of largest *absolute* value, sign kept, as the paper and project page
  describe it ("the maximum activations ... including positive (usable) and negative (adverse)
  information"), and as the released code does since its commit cc25dd3 of 2021-03-04 ("fix the
  bug of missing torch.abs() in AMP": ``argmax(abs(t))`` in ``mgd/builder.py``, then gathers the
  signed value); earlier versions took a plain argmax (identical on non-negative maps).
- ``rd`` draws from torch's global generator (seeded by the training run).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kd.student_trainer.losses import register_feature

REDUCTIONS = ("sm", "rd", "amp")


def mgd_connector(s: tuple[int, ...], t: tuple[int, ...]) -> nn.Module:
    """BN on the student's channels (the authors' ``BNs``); checks the shapes MGD needs."""
    if len(s) != 3 or len(t) != 3:
        raise ValueError(f"mgd matches [C, H, W] feature maps, got student {list(s)} and teacher {list(t)}")
    if tuple(s[1:]) != tuple(t[1:]):
        raise ValueError(f"mgd: student map {list(s)} and teacher map {list(t)} need the same spatial size")
    if t[0] < s[0]:
        raise ValueError(f"mgd: the teacher needs at least as many channels as the student ({t[0]} < {s[0]})")
    return nn.BatchNorm2d(s[0])


def channel_distance(s: torch.Tensor, t: torch.Tensor) -> np.ndarray:
    """d[j, k] = mean_n (2 - 2 cos(s[n, j], t[n, k])) over flattened spatial maps (float64)."""
    sn = F.normalize(s.detach().double().flatten(2), dim=2)
    tn = F.normalize(t.detach().double().flatten(2), dim=2)
    cos = torch.einsum("njd,nkd->jk", sn, tn) / s.shape[0]
    return (2.0 - 2.0 * cos).cpu().numpy()


def assign_channels(cost: np.ndarray, reduction: str) -> torch.Tensor:
    """Teacher channel indices [G, C_s]: row g gives, for each student channel, its g-th teacher channel.

    ``sm``: G = 1; ``rd`` / ``amp``: G = C_t // C_s, all G * C_s indices distinct.
    """
    from scipy.optimize import linear_sum_assignment

    cs, ct = cost.shape
    groups = 1 if reduction == "sm" else ct // cs
    rows, cols = linear_sum_assignment(np.tile(cost, (groups, 1)))
    order = np.argsort(rows)
    return torch.from_numpy(cols[order].reshape(groups, cs).astype(np.int64))


def reduce_teacher(t: torch.Tensor, index: torch.Tensor, reduction: str) -> torch.Tensor:
    """The teacher map reduced to C_s channels with the assignment ``index`` [G, C_s]."""
    groups, cs = index.shape
    n, _, h, w = t.shape
    picked = t[:, index.to(t.device).flatten()].reshape(n, groups, cs, h, w)
    if reduction == "sm" or groups == 1:
        return picked[:, 0]
    if reduction == "amp":
        which = picked.abs().argmax(dim=1, keepdim=True)
    elif reduction == "rd":
        which = torch.randint(0, groups, (n, 1, cs, h, w), device=t.device)
    else:
        raise ValueError(f"mgd: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return picked.gather(1, which).squeeze(1)


@register_feature(
    "mgd",
    "Yue, Deng, Zhou 2020, Matching Guided Distillation (ECCV)",
    connector=mgd_connector,
    teacher_logits_shift_invariant=True,
    couples=True,
)
def mgd_loss(
    student_feats: list[torch.Tensor],
    teacher_feats: list[torch.Tensor],
    *,
    reduction: str = "amp",
    weight: float = 1e-4,
    stage_decay: float = 2.0,
) -> torch.Tensor:
    if stage_decay <= 0:  # as ofd's: 0 divides by zero, a negative value flips every other stage's sign
        raise ValueError(f"mgd: stage_decay must be > 0, got {stage_decay}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"mgd: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(f"mgd: {len(student_feats)} student and {len(teacher_feats)} teacher features")
    total = student_feats[0].new_zeros(())
    n_stages = len(student_feats)
    for k, (s, t) in enumerate(zip(student_feats, teacher_feats)):
        if s.ndim != 4 or t.ndim != 4:
            raise ValueError(f"mgd: match {k} needs 4-D maps, got student {tuple(s.shape)}, teacher {tuple(t.shape)}")
        if s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:]:
            raise ValueError(
                f"mgd: match {k}: student {tuple(s.shape)} and teacher {tuple(t.shape)} differ in batch or spatial size"
            )
        if t.shape[1] < s.shape[1]:
            raise ValueError(
                f"mgd: match {k}: teacher has fewer channels ({t.shape[1]}) than the student ({s.shape[1]})"
            )
        t = t.to(s.dtype).detach()
        index = assign_channels(channel_distance(s, t), reduction)
        target = reduce_teacher(t, index, reduction)
        term = (s - target).pow(2).sum() / s.shape[0]
        total = total + term / stage_decay ** (n_stages - 1 - k)
    return weight * total
