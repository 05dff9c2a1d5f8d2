"""``dfa``: Guan, Zhao, Wang, Zhang, Yao, Bian, Tang 2020, "Differentiable Feature Aggregation
Search for Knowledge Distillation" (ECCV 2020; arXiv 2008.00506).

DFA imitates multi-teacher distillation with one teacher: the target of a student stage
is a learned aggregation of several feature maps of the teacher's matching stage,

    T_agg = sum_k softmax(alpha)_k * T_k           (architecture weights alpha, DARTS-style)
    L     = weight * sum_stages mean_{n, c, h, w} (r(S) - T_agg)^2

with r the student regressor (a 1x1 conv + BN for maps, a linear map for vectors, or
nothing when the shapes already agree). The paper runs two stages: a *search* stage that
finds alpha by bi-level optimisation (student weights on the training split, alpha on a
validation split) with a "bridge loss" (student-to-teacher and teacher-to-student paths
through the other network's later layers), then a *distillation* stage with alpha fixed.

What this implementation does, within the feature plumbing:

* Matches name one layer per side (``layers=1``). The candidates of one student stage are
  separate matches with the same student layer, e.g. ``layer2=layer2.0``,
  ``layer2=layer2.1``, ``layer2=layer2``; each match's connector (``DFAConnector``,
  ``takes_teacher``) holds that candidate's logit alpha_k and a regressor r_k, and returns
  (r_k(S), alpha_k, S). The loss groups the matches whose student map is the very same
  tensor (the trainer hands every match of a layer the same captured map), takes
  softmax over the group's alphas, and compares the mean of the group's regressed maps
  (one affine regressor, parameterised as a mean) with T_agg. All candidates of a group
  must have the same shape (as the maps inside one ResNet stage do).
* Search: first-order, single-level (stated approximation). During the first
  ceil(search_fraction * epochs) epochs alpha is trained on the training batches together
  with the student, by this distillation loss; afterwards the weights are detached (alpha
  frozen: the derived aggregation) and distillation continues in the same run (the paper
  restarts the student for its second stage). The bridge loss is not available here: it
  runs the regressed student map through the *teacher's* later layers and the aggregated
  teacher map through the *student's* later layers, and a teacher served remotely exposes
  neither; without it, alpha drifts towards the candidates the student can already
  imitate (the paper's "learnability" side only).
* Distance: plain mean squared error (FitNets form). The paper builds its distillation on
  an existing feature loss (we could not verify which from the searchable text); weight =
  100 is CRD's / mdistiller's FitNets setting. search_fraction = 0.25 is our choice.

Limitation: after the search alpha takes no part in the graph, so a multi-process run
(DistributedDataParallel without ``find_unused_parameters``) would stop on the unused
parameters; use search_fraction = 1 (search throughout) or 0 (fixed uniform weights) there.

Shared-file change that would make this exact: let a match name several teacher layers
for one student layer (e.g. ``layer2=layer2.0+layer2.1+layer2``) and hand the connector
the list of teacher maps, so the aggregation and its alphas live in one connector.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from kd.student_trainer.features import auto
from kd.student_trainer.losses import register_feature


class DFAFeatures(NamedTuple):
    """The connector's output for one candidate: regressed student map, its logit, the raw map."""

    regressed: torch.Tensor  # r_k(S), the teacher's shape
    alpha: torch.Tensor  # 0-d logit of this teacher candidate
    student: torch.Tensor  # the raw student map: matches sharing it form one aggregation group


class DFAConnector(nn.Module):
    """One aggregation candidate: a regressor to the teacher's shape and the logit alpha_k (init 0)."""

    takes_teacher = True

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.teacher_shape = tuple(teacher_shape)
        self.regressor = auto(tuple(student_shape), tuple(teacher_shape))
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, s: torch.Tensor, t: torch.Tensor | None) -> DFAFeatures:
        if t is not None and tuple(t.shape[1:]) != self.teacher_shape:
            raise ValueError(f"dfa: teacher map {tuple(t.shape)} but the connector was built for {self.teacher_shape}")
        return DFAFeatures(self.regressor(s), self.alpha, s)


def dfa_connector(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    return DFAConnector(student_shape, teacher_shape)


def _groups(feats: list[DFAFeatures]) -> list[list[int]]:
    """Indices of matches grouped by their student map (identity), in first-seen order."""
    groups: list[list[int]] = []
    for k, f in enumerate(feats):
        for g in groups:
            if feats[g[0]].student is f.student:
                g.append(k)
                break
        else:
            groups.append([k])
    return groups


def search_epochs(search_fraction: float, epochs: int) -> int:
    """How many leading epochs train alpha: ceil(search_fraction * epochs)."""
    return math.ceil(search_fraction * epochs)


@register_feature(
    "dfa",
    "Guan et al. 2020, Differentiable Feature Aggregation Search for Knowledge Distillation (ECCV)",
    connector=dfa_connector,
    teacher_logits_shift_invariant=True,
    couples=False,
)
def dfa_loss(
    student_feats: list[DFAFeatures],
    teacher_feats: list[torch.Tensor],
    *,
    weight: float = 100.0,
    search_fraction: float = 0.25,
    epoch: int,
    epochs: int,
) -> torch.Tensor:
    if not 0.0 <= search_fraction <= 1.0:
        raise ValueError(f"dfa: search_fraction must be in [0, 1], got {search_fraction}")
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(f"dfa: {len(student_feats)} student and {len(teacher_feats)} teacher features")
    for k, f in enumerate(student_feats):
        if not (isinstance(f, tuple) and len(f) == 3):
            raise ValueError(f"dfa: match {k}: expected the DFA connector's (regressed, alpha, student)")
    searching = epoch < search_epochs(search_fraction, epochs)
    terms = []
    for group in _groups(student_feats):
        shapes = {tuple(teacher_feats[k].shape) for k in group}
        if len(shapes) != 1:
            raise ValueError(
                f"dfa: matches {group} share a student layer, so their teacher maps are aggregated, but their "
                f"shapes differ: {sorted(shapes)}; aggregate only teacher layers of one shape (one stage)"
            )
        pred = torch.stack([student_feats[k].regressed for k in group]).mean(0)
        target_shape = shapes.pop()
        if tuple(pred.shape) != target_shape:
            raise ValueError(f"dfa: matches {group}: regressed student {tuple(pred.shape)} != teacher {target_shape}")
        w = torch.softmax(torch.stack([student_feats[k].alpha for k in group]).to(pred.dtype), 0)
        if not searching:
            w = w.detach()
        target = sum(w[i] * teacher_feats[k].to(pred.dtype) for i, k in enumerate(group))
        terms.append((pred - target).pow(2).mean())
    return weight * torch.stack(terms).sum()
