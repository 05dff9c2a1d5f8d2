"""``sskd``: Xu, Liu, Li, Loy 2020, "Knowledge Distillation Meets Self-Supervision" (ECCV 2020;
arXiv 2006.12000; authors' code xuguodong03/SSKD, ``student.py`` and ``wrapper.py``).

SSKD transfers, besides the teacher's predictions, what the teacher knows about a
self-supervised task: recognising which original image a rotated image comes from. The loop
turns each batch of B samples into 4B (every sample followed by its rotations by 90, 180 and
270 degrees; the method registers ``rotations=True``), the teacher answers for all 4B, so it
needs a source that runs the teacher on the pixels it is given (``local:`` or ``server:``).
Both penultimate features (``--match pool=pool``) go through a projection head each (Linear,
ReLU, Linear, the width of the feature: the authors' ``proj_head``), giving r_s and r_t. With
"nor" the B unrotated rows and "aug" the 3B rotated ones:

    sim[i, j]  = cos(r[aug i], r[nor j])                                             ([3B, B])
    L_ce       = CE(z_s[nor], y)                                         (ce_weight = 0.1)
    L_kd       = T^2 KL(softmax(z_t[nor] / T) || softmax(z_s[nor] / T)),  T = 4        (kd_weight = 0.9)
    L_tf       = T_tf^2 KL(softmax(z_t[aug] / T_tf) || softmax(z_s[aug] / T_tf)) over kept rows
                                                               (tf_weight = 2.7, T_tf = 4)
    L_ss       = T_ss^2 KL(softmax(sim_t / T_ss) || softmax(sim_s / T_ss)) over kept rows
                                                               (ss_weight = 10, T_ss = 0.5)
    L          = ce_weight L_ce + kd_weight L_kd + tf_weight L_tf + ss_weight L_ss

(KL "batchmean" over the kept rows). Kept rows, the authors' "error level ranking": for L_tf
the rank of the true class in the teacher's prediction on the rotated image; for L_ss the rank
of the row's own original among the B originals in sim_t; every row of rank 0 is kept, and of
the others the int(ratio * count) of lowest rank (ratio_tf = 1, ratio_ss = 0.75). L_ce and L_kd
are the feature methods' common ``ce_weight`` / ``kd_weight`` / ``kd_temperature`` terms, on the
unrotated rows (SSKD's defaults registered for them).

The teacher's projection head is trained on the self-supervised task, the backbone frozen:
CE(sim_t / 1, own original) over the 3B rotated rows (the authors' first stage, plain cosine
similarities as logits). Where kd differs: the authors train it first, alone, for 60 epochs,
then freeze it; kd trains it in the same steps as the student (``teacher_ss_weight`` = 1, its
features detached from the student's terms), so early on the student learns the similarities
of a head still being fitted. Ties of rank are broken by position (a stable sort; the
authors' ``argsort`` leaves them unspecified), which matters only for ratio < 1.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kd.student_trainer.losses import register_feature


class SSKDFeatures(NamedTuple):
    student: torch.Tensor  # r_s [4B, D_s]
    teacher: torch.Tensor | None  # r_t [4B, D_t], through the (trained) teacher head


def _head(d: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))


class SSKDConnector(nn.Module):
    """The student's and the teacher's projection heads (teacher features detached)."""

    takes_teacher = True

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.student_head = _head(math.prod(student_shape))
        self.teacher_head = _head(math.prod(teacher_shape))

    def forward(self, s: torch.Tensor, t: torch.Tensor | None) -> SSKDFeatures:
        r_t = None if t is None else self.teacher_head(t.detach().flatten(1).to(s.dtype))
        return SSKDFeatures(self.student_head(s.flatten(1)), r_t)


def sskd_connector(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    return SSKDConnector(student_shape, teacher_shape)


def similarity(r: torch.Tensor) -> torch.Tensor:
    """[3B, B]: cosine similarity of each rotated row with each unrotated row (rows 4i are unrotated)."""
    nor, aug = r[0::4], r.reshape(-1, 4, r.shape[1])[:, 1:].reshape(-1, r.shape[1])
    return F.cosine_similarity(aug.unsqueeze(2), nor.t().unsqueeze(0), dim=1)


def kept_rows(scores: torch.Tensor, target: torch.Tensor, ratio: float) -> torch.Tensor:
    """Rows whose target ranks first, plus int(ratio * others) of the others of lowest rank (sorted)."""
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    rank = (order == target.unsqueeze(1)).long().argmax(dim=1)
    wrong = int((rank > 0).sum())
    keep = len(rank) - wrong + int(wrong * ratio)
    return torch.sort(torch.argsort(rank, stable=True)[:keep])[0]


def _kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    if len(student) == 0:
        return student.sum() * 0.0
    log_s = F.log_softmax(student / temperature, dim=1)
    p_t = F.softmax(teacher / temperature, dim=1)
    return F.kl_div(log_s, p_t, reduction="batchmean") * temperature**2


@register_feature(
    "sskd",
    "Xu, Liu, Li, Loy 2020, Knowledge Distillation Meets Self-Supervision (ECCV, arXiv 2006.12000)",
    connector=sskd_connector,
    rotations=True,
    common={"ce_weight": 0.1, "kd_weight": 0.9, "kd_temperature": 4.0},
    teacher_logits_shift_invariant=True,
    couples=True,
    accepts_sparse=False,  # its rotation terms read the teacher's logits of every class on all four views
)
def sskd_loss(
    student_feats: list[SSKDFeatures],
    teacher_feats: list[torch.Tensor],
    *,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    tf_weight: float = 2.7,
    ss_weight: float = 10.0,
    tf_temperature: float = 4.0,
    ss_temperature: float = 0.5,
    ratio_tf: float = 1.0,
    ratio_ss: float = 0.75,
    teacher_ss_weight: float = 1.0,
) -> torch.Tensor:
    for name, value in (("ratio_tf", ratio_tf), ("ratio_ss", ratio_ss)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"sskd: {name} must be in [0, 1], got {value}")
    for name, value in (("tf_temperature", tf_temperature), ("ss_temperature", ss_temperature)):
        if value <= 0:
            raise ValueError(f"sskd: {name} must be > 0, got {value}")
    if len(student_feats) != 1 or len(teacher_feats) != 1:
        raise ValueError(f"sskd takes one match (the penultimate features), got {len(student_feats)}")
    f = student_feats[0]
    if not isinstance(f, SSKDFeatures) or f.teacher is None:
        raise ValueError("sskd: expected the SSKD connector's projections of both sides")
    n = len(student_logits)
    if n % 4 or n != len(f.student) or teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"sskd: expected 4 rows per sample (the loop's rotations), got {n} logits, {len(f.student)} features "
            f"and teacher logits {tuple(teacher_logits.shape)}"
        )
    b = n // 4
    dt = student_logits.dtype
    z_t = teacher_logits.detach().to(dt)
    aug = torch.arange(n, device=student_logits.device) % 4 != 0
    y_aug = labels.reshape(b, 4)[:, 1:].reshape(-1)
    keep_tf = kept_rows(z_t[aug], y_aug, ratio_tf)
    l_tf = _kl(student_logits[aug][keep_tf], z_t[aug][keep_tf], tf_temperature)

    own = torch.arange(b, device=student_logits.device).repeat_interleave(3)
    sim_s = similarity(f.student)
    sim_t_trained = similarity(f.teacher.to(dt))  # trains the teacher head (its own task)
    sim_t = sim_t_trained.detach()
    keep_ss = kept_rows(sim_t, own, ratio_ss)
    l_ss = _kl(sim_s[keep_ss], sim_t[keep_ss], ss_temperature)
    total = tf_weight * l_tf + ss_weight * l_ss
    if teacher_ss_weight:
        total = total + teacher_ss_weight * F.cross_entropy(sim_t_trained, own)
    return total
