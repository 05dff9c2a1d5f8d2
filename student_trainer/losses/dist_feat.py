"""``dist-feat``: DIST's relation loss on feature maps -- the feature-level extension of DIST
(Huang, You, Wang, Qian, Xu 2022, "Knowledge Distillation from A Stronger Teacher", NeurIPS,
arXiv 2205.10536) that DIST+ (the same authors, "DIST+: Knowledge Distillation From a Stronger
Adaptive Teacher", TPAMI 2025) describes, in the one form published as code: the authors'
dense DIST (hunto/DIST_KD ``segmentation/losses/dist_kd.py``).

Every position of a map is one "sample" whose channels are the "classes": with s the connected
student map and t the teacher's ([N, C, H, W], the connector ``auto``: identity at equal
shapes, else a 1x1 conv + BN), rows r = (n, h, w) and Y = softmax over the channels:

    inter = 1 - mean_r rho(Y_s[r, :], Y_t[r, :])       (Pearson across channels, per position)
    intra = 1 - mean_c rho(Y_s[:, c], Y_t[:, c])       (Pearson across all positions, per channel)
    L     = weight * sum_matches (beta * inter + gamma * intra)

with rho the Pearson correlation with eps = 1e-8 added to the product of the norms (as
``dist``). Defaults: weight = beta = gamma = 1, no temperature (the segmentation code's
``DIST(beta=1., gamma=1.)``, softmax, loss_weight 1), CE weight 1.

What is not here: DIST+'s *teacher acclimation* (adapting the teacher to reduce its discrepancy
with the student), which needs a teacher the run can train: that is the online method
``dist-plus`` (``kd.student_trainer.online.dist_plus``, ``kd online dist-plus --teacher SPEC``),
whose docstring says what of it could be checked (neither code nor equations are public). The
logit-level DIST is ``dist``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.student_trainer.losses import register_feature
from kd.student_trainer.losses.dist import pearson_rows


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N * H * W, C] (a flat [N, C] feature stays as it is)."""
    if x.ndim == 2:
        return x
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


@register_feature(
    "dist-feat",
    "Huang, You, Wang, Qian, Xu 2022, Knowledge Distillation from A Stronger Teacher (DIST; arXiv 2205.10536): "
    "the dense relation loss (DIST+'s feature-level extension)",
    connector="auto",
    teacher_logits_shift_invariant=True,
    couples=True,
)
def dist_feat_loss(
    student_feats: list[torch.Tensor],
    teacher_feats: list[torch.Tensor],
    *,
    weight: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
) -> torch.Tensor:
    if not student_feats or len(student_feats) != len(teacher_feats):
        raise ValueError(f"dist-feat: got {len(student_feats)} student and {len(teacher_feats)} teacher maps")
    terms = []
    for k, (s, t) in enumerate(zip(student_feats, teacher_feats)):
        if s.shape != t.shape or s.ndim not in (2, 4) or s.shape[1] < 2:
            raise ValueError(
                f"dist-feat: match {k}: connected student map {tuple(s.shape)} and teacher map {tuple(t.shape)} "
                "need the same shape, [N, C, H, W] or [N, C] with C >= 2"
            )
        dt = torch.promote_types(s.dtype, torch.float32)
        y_s = F.softmax(_rows(s).to(dt), dim=1)
        y_t = F.softmax(_rows(t.detach()).to(dt), dim=1)
        inter = 1.0 - pearson_rows(y_s, y_t).mean()
        intra = 1.0 - pearson_rows(y_s.t(), y_t.t()).mean()
        terms.append(beta * inter + gamma * intra)
    return weight * torch.stack(terms).sum()
