"""Reduced forms of feature maps: what feature methods actually compare.

Many feature-level methods only need a statistic of a feature map, far
smaller than the map: AT an attention map, FSP a Gram matrix between two
layers, NST a spatial Gram, AdaIN per-channel moments, SP/CC a similarity
matrix of the batch. The server can compute that statistic next to the model
(so only it travels and is cached), and the trainer computes the same
function on the student's map, so both sides go through one implementation.

A feature is named ``LAYER`` (the full map) or ``LAYER@REDUCTION[:ARG...]``:

=================  ===================  ===========================================================
name               shape per request    definition (F = the layer's output, N samples)
=================  ===================  ===========================================================
``L@pool``         [N, C]               mean over the spatial / token dims
``L@at[:p]``       [N, H*W]             normalize_rows(mean_c |F_c|^p), p = 2 (Zagoruyko & Komodakis)
``L@adain``        [N, 2, C]            per-channel mean and std over H*W (std = sqrt(var + 1e-5))
``L@nst``          [N, H*W, H*W]        f^T f / C, f = each channel's map L2-normalised over H*W;
                                        NST's MMD with the kernel (x^T y)^2 is ||G_s - G_t||_F^2
``L@fsp:M``        [N, C_L, C_M]        F_L F_M^T / (H*W); the larger map is average-pooled to the
                                        smaller's size (Yim et al.)
``L@sp``           [N, N]  (batch)      normalize_rows(Q Q^T), Q = F flattened per sample (Tung & Mori)
``L@cc[:g[:P]]``   [N, N]  (batch)      sum_{p<=P} exp(-2g) (2g)^p / p! (e_i^T e_j)^p with e the
                                        L2-normalised embeddings: the Taylor-expanded Gaussian RBF
                                        of CCKD (Peng et al.), g = 0.4, P = 2
=================  ===================  ===========================================================

Batch reductions (``sp``, ``cc``) relate the samples of one request to each
other: a server computes them over each request's samples (never across the
requests it batches together), and they cannot be cached per sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SEP = "@"


@dataclass(frozen=True)
class FeatureName:
    """A parsed feature name: ``layer``, or ``layer@reduction:args``."""

    layer: str
    reduction: str | None = None
    args: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        if self.reduction is None:
            return self.layer
        return SEP.join([self.layer, ":".join([self.reduction, *self.args])])

    @property
    def layers(self) -> tuple[str, ...]:
        """The layers whose full maps this feature is computed from."""
        if self.reduction == "fsp":
            return (self.layer, self.args[0])
        return (self.layer,)

    @property
    def per_sample(self) -> bool:
        return self.reduction not in BATCH_REDUCTIONS


def _flat_spatial(x: torch.Tensor, what: str) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, H*W]; tokens [N, T, D] -> [N, D, T]."""
    if x.ndim == 4:
        return x.flatten(2)
    if x.ndim == 3:
        return x.transpose(1, 2)
    raise ValueError(f"{what} needs a 4-D [N, C, H, W] or 3-D [N, T, D] feature map, got shape {tuple(x.shape)}")


def pool(x: torch.Tensor) -> torch.Tensor:
    if x.ndim == 2:
        return x
    return _flat_spatial(x, "pool").mean(dim=2)


def attention(x: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    a = _flat_spatial(x, "at").abs().pow(p).mean(dim=1)  # [N, H*W]
    return F.normalize(a, dim=1)


def channel_moments(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    f = _flat_spatial(x, "adain")
    mean = f.mean(dim=2)
    std = (f.var(dim=2, unbiased=False) + eps).sqrt()
    return torch.stack([mean, std], dim=1)


def spatial_gram(x: torch.Tensor) -> torch.Tensor:
    f = F.normalize(_flat_spatial(x, "nst"), dim=2)  # each channel's map, unit norm
    return f.transpose(1, 2) @ f / f.shape[1]


def fsp_matrix(x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    if x.ndim != 4 or other.ndim != 4:
        raise ValueError(f"fsp needs two 4-D feature maps, got {tuple(x.shape)} and {tuple(other.shape)}")
    hx, ho = x.shape[2:], other.shape[2:]
    if hx != ho:
        if hx[0] * hx[1] > ho[0] * ho[1]:
            x = F.adaptive_avg_pool2d(x, ho)
        else:
            other = F.adaptive_avg_pool2d(other, hx)
    a, b = x.flatten(2), other.flatten(2)
    return a @ b.transpose(1, 2) / a.shape[2]


def similarity(x: torch.Tensor) -> torch.Tensor:
    q = x.flatten(1)
    return F.normalize(q @ q.t(), dim=1)


def rbf_taylor(x: torch.Tensor, gamma: float = 0.4, order: int = 2) -> torch.Tensor:
    e = F.normalize(x.flatten(1), dim=1)
    dot = e @ e.t()
    out = torch.zeros_like(dot)
    for p in range(order + 1):
        out = out + math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * dot.pow(p)
    return out


BATCH_REDUCTIONS = frozenset({"sp", "cc"})
REDUCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "pool": pool,
    "at": attention,
    "adain": channel_moments,
    "nst": spatial_gram,
    "fsp": fsp_matrix,
    "sp": similarity,
    "cc": rbf_taylor,
}
# How many ``:`` arguments each reduction takes (min, max).
_ARITY = {"pool": (0, 0), "at": (0, 1), "adain": (0, 0), "nst": (0, 0), "fsp": (1, 1), "sp": (0, 0), "cc": (0, 2)}


def parse(name: str) -> FeatureName:
    """Parse and validate a feature name; errors name what is wrong."""
    layer, sep, rest = name.partition(SEP)
    if not layer:
        raise ValueError(f"feature {name!r}: empty layer name")
    if not sep:
        return FeatureName(layer)
    reduction, *args = rest.split(":")
    if reduction not in REDUCTIONS:
        raise ValueError(f"feature {name!r}: unknown reduction {reduction!r}; known: {', '.join(sorted(REDUCTIONS))}")
    lo, hi = _ARITY[reduction]
    if not lo <= len(args) <= hi or any(not a for a in args):
        raise ValueError(f"feature {name!r}: reduction {reduction!r} takes {lo}..{hi} ':'-separated argument(s)")
    if reduction in ("at", "cc"):
        try:
            [float(a) for a in args]
        except ValueError:
            raise ValueError(f"feature {name!r}: {reduction} arguments must be numbers") from None
    return FeatureName(layer, reduction, tuple(args))


def layers_needed(names: Iterable[str]) -> list[str]:
    """The distinct layers to capture for these feature names, in first-use order."""
    out: dict[str, None] = {}
    for n in names:
        for layer in parse(n).layers:
            out[layer] = None
    return list(out)


def reduce(name: str | FeatureName, maps: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The feature ``name`` computed from full layer outputs ``maps`` (layer -> tensor).

    Differentiable (the trainer uses it on the student's maps); computed in at
    least float32 so a half-precision map gives the same statistic on either side.
    """
    f = parse(name) if isinstance(name, str) else name
    x = maps[f.layer]
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if f.reduction is None:
        return x
    fn = REDUCTIONS[f.reduction]
    if f.reduction == "fsp":
        other = maps[f.args[0]]
        return fn(x, other.to(x.dtype))
    if f.reduction == "at":
        return fn(x, *(float(a) for a in f.args))
    if f.reduction == "cc":
        args = [float(a) for a in f.args]
        return fn(x, *args[:1], *(int(a) for a in args[1:]))
    return fn(x)
