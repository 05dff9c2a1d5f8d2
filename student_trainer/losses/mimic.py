"""``mimic``: Wang, Ge, Wu 2020, "In Defense of Feature Mimicking for Knowledge Distillation"
(arXiv 2011.01424; extended as "Distilling Knowledge by Mimicking Features", IEEE TPAMI 2022).

The student mimics the teacher's penultimate feature f_t in R^D (after global pooling; the
match names the pooling layer, e.g. ``pool=pool``, and only the pooled [D] vector travels as
``layer@pool``). The student's feature f_s passes through a trainable linear connector to D
where its dimension differs (the paper gives the student an extra FC to the teacher's width).

The paper decomposes a feature into magnitude and direction, argues the student should copy
the direction more than the magnitude, and adds a locality-sensitive-hashing (LSH) term for the
direction: N random hyperplanes (w_j, b_j) hash the teacher's feature to bits
h_j = 1[w_j . f_t + b_j > 0]; the student predicts them with a logistic regression through the
same hyperplanes (BCE on the logits w_j . f_s + b_j). A sign of a projection depends on the
feature's direction only (for b = 0), so the term constrains direction and leaves magnitude
free. With ``variant``:

    l2     L = weight * sum_k mean_{n, d} (f_s - f_t)^2
    lsh    L = weight * sum_k mean_{n, j} BCE(w_j . f_s + b_j, h_j(f_t))
    lshl2  L = weight * sum_k [ l2 term + lsh term ]            (the paper's method, default)

Defaults follow the authors' CIFAR-100 training script (``train_student.py`` with the
``LSH`` loss of its ``distiller_zoo``): weight (their ``beta``) = 6 on top of CE with weight 1,
N = 32 D hash bits (``hash_num = 32 * t_dim``), W ~ N(0, std^2) fixed (not trained),
BCE-with-logits on the hash bits, L2 = ``MSELoss(reduction="mean")``.

Assumptions (the pure loss function holds no state):
- W is drawn from a generator seeded with ``lsh_seed`` (same hyperplanes at every step and in
  every process; cached per device). The authors use ``std`` = the std of the teacher's
  classifier weights, which a teacher server does not expose; here ``lsh_std`` = None means
  1/sqrt(D). The hash bits do not depend on std, only the scale of the student's BCE logits does.
- The bias: the authors set b = -median over the *training set* of W f_t (one pass before
  training); here ``lsh_bias="median"`` takes the median over the current batch (each bit splits
  the batch in half), ``"zero"`` uses b = 0 (their ``--bias 0`` option).
- Not reproduced: their ``lshl2_s`` variant (terms averaged over the samples the teacher
  classifies correctly only) and the paper's use of the mimicked feature as the input of the
  student's classifier (here the connector is a side branch).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from kd.core import reductions
from kd.student_trainer.losses import register_feature

VARIANTS = ("l2", "lsh", "lshl2")


class PoolLinear(nn.Module):
    """Global average pooling (maps or tokens), then a linear map to the teacher's dimension
    (identity where the dimensions agree)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.linear: nn.Module = nn.Identity() if cin == cout else nn.Linear(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(reductions.pool(x).flatten(1))


def mimic_connector(s: tuple[int, ...], t: tuple[int, ...]) -> nn.Module:
    """Connector factory: any student layer ([C], [C, H, W] or tokens [T, C]); the teacher's layer
    likewise (its pooled size D is what the student is mapped to)."""
    if len(t) in (1, 3):
        t = (t[0],)
    elif len(t) == 2:
        t = (t[1],)
    else:
        raise ValueError(f"mimic: cannot pool a teacher feature of shape {list(t)}")
    if len(s) in (1, 3):
        cin = s[0]
    elif len(s) == 2:
        cin = s[1]
    else:
        raise ValueError(f"mimic: cannot pool a student feature of shape {list(s)}")
    return PoolLinear(cin, t[0])


@functools.lru_cache(maxsize=8)
def _hyperplanes(dim: int, bits: int, std: float, seed: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(bits, dim, generator=gen, dtype=torch.float64) * std
    return w.to(device=device, dtype=dtype)


def lsh_hyperplanes(
    dim: int, bits: int, std: float | None, seed: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """The fixed LSH projection W [bits, dim], W_ij ~ N(0, std^2) (std None: 1/sqrt(dim))."""
    s = 1.0 / math.sqrt(dim) if std is None else float(std)
    if not s > 0:
        raise ValueError(f"mimic: lsh_std must be > 0, got {std}")
    return _hyperplanes(dim, bits, s, seed, str(device), dtype)


def lsh_term(s: torch.Tensor, t: torch.Tensor, w: torch.Tensor, bias: str) -> torch.Tensor:
    """mean_{n,j} BCE-with-logits(W s + b, 1[W t + b > 0]); b from the (detached) teacher projections."""
    pt = t @ w.t()
    if bias == "median":
        b = -pt.median(dim=0).values
    elif bias == "zero":
        b = torch.zeros_like(pt[0])
    else:
        raise ValueError(f"mimic: lsh_bias must be 'median' or 'zero', got {bias!r}")
    bits = (pt + b > 0).to(s.dtype)
    return F.binary_cross_entropy_with_logits(s @ w.t() + b, bits)


@register_feature(
    "mimic",
    "Wang, Ge, Wu 2020, In Defense of Feature Mimicking for Knowledge Distillation (arXiv 2011.01424)",
    reduce="pool",
    connector=mimic_connector,
    teacher_logits_shift_invariant=True,
    couples=True,
)
def mimic_loss(
    student_feats: list[torch.Tensor],
    teacher_feats: list[torch.Tensor],
    *,
    variant: str = "lshl2",
    weight: float = 6.0,
    hash_ratio: float = 32.0,
    lsh_std: float | None = None,
    lsh_bias: str = "median",
    lsh_seed: int = 0,
) -> torch.Tensor:
    if variant not in VARIANTS:
        raise ValueError(f"mimic: variant must be one of {VARIANTS}, got {variant!r}")
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(f"mimic: {len(student_feats)} student and {len(teacher_feats)} teacher features")
    total = student_feats[0].new_zeros(())
    for k, (s, t) in enumerate(zip(student_feats, teacher_feats)):
        if s.ndim != 2 or s.shape != t.shape:
            raise ValueError(
                f"mimic: match {k} has student feature {tuple(s.shape)} and teacher feature {tuple(t.shape)}; "
                "both must be [N, D] with the same D (the connector maps the student to D)"
            )
        t = t.to(s.dtype).detach()
        if variant in ("l2", "lshl2"):
            total = total + (s - t).pow(2).mean()
        if variant in ("lsh", "lshl2"):
            bits = max(1, round(hash_ratio * s.shape[1]))
            w = lsh_hyperplanes(s.shape[1], bits, lsh_std, lsh_seed, s.device, s.dtype)
            total = total + lsh_term(s, t, w, lsh_bias)
    return weight * total
