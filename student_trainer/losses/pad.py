"""``pad``: Zhang, Lan, Dai, Zeng, Bai, Chang, Wei 2020, "Prime-Aware Adaptive Distillation"
(ECCV 2020), logit form: an uncertainty-weighted per-sample distillation loss.

PAD "refines existing distillation methods" by weighting each sample's distillation term
with a learned inverse variance: a connector predicts from the student's penultimate
feature a per-sample log-variance v_i = log sigma_i^2, and

    d_i = T^2 * KL(softmax(z_t,i / T) || softmax(z_s,i / T))          (distance = "kl")
        = mean_c (z_s,ic - z_t,ic)^2                                  (distance = "l2")
    L   = weight * mean_i ( d_i / (eps + exp(v_i)) + v_i )

Hard samples (large d_i) get a large variance (the optimum is v_i = log d_i) and so a low
weight; the v_i term keeps the variances from growing without bound. This is the same
Gaussian-likelihood form as the feature loss ``pad-feat`` (the authors' code as
torchdistill reproduces it: no 1/2 factors, eps = 1e-6), with the per-sample distance of
the refined method in place of the squared feature error.

Plumbing: the match is "<student penultimate layer>=logits" (``pool=logits`` for
DigitsCNN): the student side feeds the variance connector (``PADLogitConnector``: flatten,
Linear(d, 1) + BatchNorm1d(1), after torchdistill's ``VarianceBranch4PAD``), the teacher
side ``logits`` is the teacher's output (so ``teacher_feats[k]`` are the teacher's logits);
the student's logits come as the ``student_logits`` keyword.

Defaults: weight = 1; temperature = 4 (this repo's Hinton-KD default); distance = "kl".
Assumption: the paper's experiments apply PAD to feature / embedding distillation (the
``pad-feat`` form); this per-sample KD variant follows its "applies to existing methods"
claim and the project issue's wording; the paper's exact logit variant was not verified.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.student_trainer.losses import register_feature


class PADLogitConnector(nn.Module):
    """Per-sample log-variance [N] from the student's penultimate feature."""

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
        super().__init__()
        if len(teacher_shape) != 1:
            raise ValueError(
                "pad: the teacher side of the match must be the teacher's logits (a vector), got "
                f"{list(teacher_shape)}; match the student's penultimate layer with 'logits', e.g. pool=logits"
            )
        dim = 1
        for d in student_shape:
            dim *= int(d)
        self.log_var = nn.Sequential(nn.Flatten(), nn.Linear(dim, 1), nn.BatchNorm1d(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_var(x).squeeze(1)


def pad_logit_connector(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    return PADLogitConnector(student_shape, teacher_shape)


def per_sample_distance(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, distance: str, temperature: float
) -> torch.Tensor:
    """d_i for each sample: T^2 * KL(p_t || p_s) at temperature T, or the mean squared logit error."""
    if distance == "kl":
        log_p_s = F.log_softmax(student_logits / temperature, dim=1)
        log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
        return temperature**2 * (log_p_t.exp() * (log_p_t - log_p_s)).sum(1)
    if distance == "l2":
        return (student_logits - teacher_logits).pow(2).mean(1)
    raise ValueError(f"pad: distance must be 'kl' or 'l2', got {distance!r}")


def _pad_invariant(options: dict[str, object]) -> bool:
    """distance = "l2" compares the raw logits (a per-row shift of the teacher's moves d_i); "kl" sees
    only their softmax; weight = 0 drops the term."""
    return options["distance"] != "l2" or options["weight"] == 0


@register_feature(
    "pad",
    "Zhang et al. 2020, Prime-Aware Adaptive Distillation (ECCV), per-sample uncertainty-weighted KD",
    connector=pad_logit_connector,
    teacher_logits_shift_invariant=_pad_invariant,
    couples=False,
    teacher_side_logits=True,
)
def pad_loss(
    student_feats: list[torch.Tensor],
    teacher_feats: list[torch.Tensor],
    *,
    student_logits: torch.Tensor,
    weight: float = 1.0,
    temperature: float = 4.0,
    distance: str = "kl",
    eps: float = 1e-6,
) -> torch.Tensor:
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(f"pad: {len(student_feats)} student and {len(teacher_feats)} teacher features")
    if temperature <= 0 or eps < 0:
        raise ValueError(f"pad: temperature must be > 0 and eps >= 0, got {temperature}, {eps}")
    terms = []
    for k, (log_var, t) in enumerate(zip(student_feats, teacher_feats)):
        t = t.flatten(1).to(student_logits.dtype)
        if t.shape != student_logits.shape:
            raise ValueError(
                f"pad: match {k}: teacher feature {tuple(t.shape)} is not the teacher's logits (the student's are "
                f"{tuple(student_logits.shape)}); the teacher side of the match must be 'logits'"
            )
        if log_var.shape != student_logits.shape[:1]:
            raise ValueError(f"pad: match {k}: log-variance {tuple(log_var.shape)}, expected one per sample")
        d = per_sample_distance(student_logits, t, distance, temperature)
        terms.append((d / (eps + log_var.exp()) + log_var).mean())
    return weight * torch.stack(terms).sum()
