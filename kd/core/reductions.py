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
from collections.abc import Callable, Iterable, Mapping, Sequence
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


# Argument ranges: outside them a statistic overflows or is undefined (|F|^p with p <= 0
# is Inf at zeros; exp(2g) and (2g)^P / P! overflow for large g or P).
AT_P_RANGE = (0.0, 8.0)  # 0 < p <= 8
CC_GAMMA_RANGE = (0.0, 10.0)  # 0 < g <= 10
CC_MAX_ORDER = 16  # P in 0..16
_MAX_SHOWN = 80


def shorten(text: str, limit: int = _MAX_SHOWN) -> str:
    """``repr`` of a client-given name, cut to ``limit`` characters: error messages echo
    names, and gRPC's status metadata is small (a 100 KB name must not overflow it)."""
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + f"... ({len(text)} characters)"


def _number(name: str, reduction: str, arg: str) -> float:
    try:
        v = float(arg)
    except ValueError:
        raise ValueError(f"feature {shorten(name)}: {reduction} arguments must be numbers") from None
    if not math.isfinite(v):
        raise ValueError(f"feature {shorten(name)}: {reduction} argument {shorten(arg)} is not a finite number")
    return v


def _check_args(name: str, reduction: str, args: list[str]) -> None:
    if reduction == "at" and args:
        p = _number(name, reduction, args[0])
        if not AT_P_RANGE[0] < p <= AT_P_RANGE[1]:
            raise ValueError(f"feature {shorten(name)}: at's power p must be in ({AT_P_RANGE[0]:g}, {AT_P_RANGE[1]:g}]")
    if reduction == "cc":
        if args:
            g = _number(name, reduction, args[0])
            if not CC_GAMMA_RANGE[0] < g <= CC_GAMMA_RANGE[1]:
                raise ValueError(
                    f"feature {shorten(name)}: cc's gamma must be in ({CC_GAMMA_RANGE[0]:g}, {CC_GAMMA_RANGE[1]:g}]"
                )
        if len(args) > 1:
            order = _number(name, reduction, args[1])
            if order != int(order) or not 0 <= order <= CC_MAX_ORDER:
                raise ValueError(f"feature {shorten(name)}: cc's order P must be an integer in 0..{CC_MAX_ORDER}")


def parse(name: str) -> FeatureName:
    """Parse and validate a feature name (its syntax and its arguments' ranges);
    errors name what is wrong."""
    layer, sep, rest = name.partition(SEP)
    if not layer:
        raise ValueError(f"feature {shorten(name)}: empty layer name")
    if not sep:
        return FeatureName(layer)
    reduction, *args = rest.split(":")
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"feature {shorten(name)}: unknown reduction {shorten(reduction)}; known: {', '.join(sorted(REDUCTIONS))}"
        )
    lo, hi = _ARITY[reduction]
    if not lo <= len(args) <= hi or any(not a for a in args):
        raise ValueError(f"feature {shorten(name)}: reduction {reduction!r} takes {lo}..{hi} ':'-separated argument(s)")
    _check_args(name, reduction, args)
    return FeatureName(layer, reduction, tuple(args))


def _spatial(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(channels, positions) of a per-sample map [C, H, W] or tokens [T, D]; None otherwise."""
    if len(shape) == 3:
        return shape[0], shape[1] * shape[2]
    if len(shape) == 2:
        return shape[1], shape[0]
    return None


def output_shape(
    name: str | FeatureName, layer_shapes: Mapping[str, Sequence[int]], n: int, *, pool_raw: bool = False
) -> tuple[int, ...]:
    """The shape of feature ``name`` for a request of ``n`` samples, given the per-sample
    shapes of the layers (``[C, H, W]``, ``[T, D]`` or ``[D]``), *without computing it*:
    a server checks a name against the layer before any work (a reduction that cannot
    apply is a ValueError naming the problem) and sizes the answer up front.
    ``pool_raw``: a plain layer name is pooled (OutputSpec.pool_features)."""
    f = parse(name) if isinstance(name, str) else name
    for layer in f.layers:
        if layer not in layer_shapes:
            raise ValueError(f"feature {shorten(f.text)}: unknown layer {shorten(layer)}")
    shape = tuple(int(d) for d in layer_shapes[f.layer])
    r = f.reduction
    if r is None and not pool_raw:
        return (n, *shape)
    if r is None or r == "pool":
        if len(shape) == 1:
            return (n, *shape)
        cp = _spatial(shape)
        if cp is None:
            raise ValueError(f"feature {shorten(f.text)}: pool needs a per-sample map [C, H, W], [T, D] or [D], "
                             f"layer {shorten(f.layer)} has {list(shape)}")  # fmt: skip
        return (n, cp[0])
    if r in ("sp", "cc"):
        if not shape:
            raise ValueError(f"feature {shorten(f.text)}: {r} needs a per-sample feature, layer has shape []")
        return (n, n)
    if r == "fsp":
        other = tuple(int(d) for d in layer_shapes[f.args[0]])
        if len(shape) != 3 or len(other) != 3:
            raise ValueError(f"feature {shorten(f.text)}: fsp needs two 4-D feature maps [N, C, H, W], "
                             f"layers have per-sample shapes {list(shape)} and {list(other)}")  # fmt: skip
        return (n, shape[0], other[0])
    cp = _spatial(shape)
    if cp is None:
        raise ValueError(f"feature {shorten(f.text)}: {r} needs a 4-D [N, C, H, W] or 3-D [N, T, D] feature map, "
                         f"layer {shorten(f.layer)} has per-sample shape {list(shape)}")  # fmt: skip
    c, hw = cp
    return {"at": (n, hw), "adain": (n, 2, c), "nst": (n, hw, hw)}[r]


def check_name(name: str, layer_shapes: Mapping[str, Sequence[int]]) -> FeatureName:
    """Validate ``name`` against the layers it reads (syntax, argument ranges, the
    layer's rank): a ValueError naming the problem, else the parsed name."""
    f = parse(name)
    output_shape(f, layer_shapes, 1)
    return f


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
