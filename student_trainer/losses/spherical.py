"""``spherical``: Guo et al. 2020, "Reducing the Teacher-Student Gap via Spherical
Knowledge Distillation" (SKD, arXiv:2010.07485).

SKD removes the logits' norm (the teacher's "confidence") before distilling:
each logit vector is centred and rescaled to a fixed length, so the student
only has to match the direction of the teacher's logits, then Hinton KD runs
on the projected logits:

    n(z)  = m * (z - mean(z)) / sqrt(var(z) + eps)     var biased (mean of squares), per sample
    L     = alpha * T^2 * KL(softmax(n(z_t) / T) || softmax(n(z_s) / T))
            + (1 - alpha) * CE(n(z_s), y)

n(z) is ``F.layer_norm`` over the class dimension without affine parameters,
times a constant multiplier m: exactly the "two lines" of the authors' code
(forjiuzhou/Spherical-Knowledge-Distillation README; PaddleClas ``SKDLoss``
is the same). Every n(z) lies on the sphere of radius m * sqrt(C) (up to eps)
in the zero-sum hyperplane. The radius is a constant set by the multiplier
(the authors recommend m between 2 and 3), not the teacher's average logit
norm. References disagree here: one revision of the authors' ImageNet script
(``skd_main.py``) instead rescales only the student's logits to the teacher's
per-sample standard deviation and leaves the teacher's logits as they are;
this function follows the README / PaddleClas form, which normalises both.

Choices:

* The CE term is taken on the normalised student logits n(z_s), as in the
  authors' code (the logits are replaced right after the forward pass) and in
  PaddleClas. n is a positive affine map per row, so the argmax, hence the
  accuracy, of the raw logits is the same.
* The soft term is the KL, "batchmean" (summed over classes, averaged over
  samples), times T^2. PaddleClas uses the soft cross-entropy instead; it
  differs by the teacher's entropy, a constant with the same gradient. With the
  KL, the soft term is zero iff n(z_s) = n(z_t), i.e. iff z_s = a * z_t + b per
  row with a > 0.
* eps = 1e-7 inside the square root, the value in the authors' code.

Defaults: T = 4 and m = 2 (the authors' ImageNet command line), alpha = 0.9
(PaddleClas's default; also this project's ``kd`` default).

Needs dense teacher logits (the mean and variance are over all classes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.student_trainer.losses import register
from kd.student_trainer.losses.kd import soft_kl

EPS = 1e-7


def spherical_normalize(logits: torch.Tensor, multiplier: float, eps: float = EPS) -> torch.Tensor:
    """m * (z - mean z) / sqrt(var z + eps) per row (layer norm without affine, times m)."""
    return F.layer_norm(logits, logits.shape[-1:], None, None, eps) * multiplier


@register(
    "spherical",
    "Guo et al. 2020, Reducing the Teacher-Student Gap via Spherical Knowledge Distillation",
    teacher_logits_shift_invariant=True,
    couples=False,
)
def spherical_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 4.0,
    multiplier: float = 2.0,
    alpha: float = 0.9,
) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if multiplier <= 0:
        raise ValueError(f"multiplier (the sphere's scale) must be > 0, got {multiplier}")
    dt = torch.promote_types(student_logits.dtype, torch.float32)
    n_s = spherical_normalize(student_logits.to(dt), multiplier)
    n_t = spherical_normalize(teacher_logits.to(dt), multiplier)
    soft = soft_kl(n_s, n_t, temperature) * temperature**2
    if alpha == 1.0:
        return alpha * soft
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(n_s, labels)
