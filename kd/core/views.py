"""Seeded, replayable image views (augmentations) and per-model final transforms.

A *view* of a sample is a pure function of (image, params), and params are a
pure function of (seed, image size), with ``seed = index * 65536 + view``
(``kd.core.samples.view_seeds``). Params are a fixed-width float32 vector
(``PARAM_WIDTH`` values, named by ``PARAM_NAMES``) that a cache stores next to
the teacher's targets, as FKD stores crop boxes and flips: any reader that
replays ``policy.apply(image, params)`` gets exactly the pixels the teacher saw,
whatever the RNG of this or any library does later.

API::

    policy = ViewPolicy.parse("rrc:size=32,scale=0.08-1;flip")   # or "crop:pad=4;flip", "shift1", "none"
    params = policy.draw(seed, height, width)      # float32 [PARAM_WIDTH], deterministic
    view = policy.apply(image, params)             # image: CHW float in [0, 1] (uint8 accepted)
    final = Final(size=160, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    x = final(batch)                               # per-model resolution + normalisation, any device
    x = pixels_to_input(views, (3, 224, 224), mean, std)   # a teacher's Final from its signature
    x = conform(batch, (1, 8, 8))                  # shape a batch as a model's signature requires

Ops (applied in this order; random draws are made in this order too):

- ``rrc:size=S,scale=a-b,ratio=c-d``: random-resized crop (torchvision's
  algorithm: 10 tries, then a centre crop), box stored normalised to the image,
  resized to SxS (bilinear, antialiased). ``size`` defaults to the source size;
  at most ``MAX_IMAGE_SIDE`` (8192, kd.core.samples).
- ``crop:pad=P``: padded random crop = a shift by (dy, dx) in [-P, P] with zero
  fill (same distribution as ``RandomCrop(size, padding=P)``); P at most
  ``MAX_CROP_PAD`` (1024).
  ``shift1`` = ``crop:pad=1`` (the digits augmentation, pixel-identical).
- ``flip`` (or ``flip:p=0.5``): horizontal flip.
- ``jitter:brightness=b,contrast=c,saturation=s``: multiplicative factors
  drawn uniformly from [1-x, 1+x], result clamped to [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kd.core.samples import MAX_CROP_PAD, MAX_IMAGE_SIDE

PARAM_NAMES = ("top", "left", "height", "width", "dy", "dx", "flip", "brightness", "contrast", "saturation")
PARAM_WIDTH = len(PARAM_NAMES)
IDENTITY_PARAMS = torch.tensor([0, 0, 1, 1, 0, 0, 0, 1, 1, 1], dtype=torch.float32)
POLICY_VERSION = "v1"
OPS = ("rrc", "crop", "flip", "jitter", "shift1", "none")


def _range(text: str, what: str) -> tuple[float, float]:
    lo, sep, hi = text.partition("-")
    try:
        a, b = (float(lo), float(hi)) if sep else (float(lo), float(lo))
    except ValueError:
        raise ValueError(f"{what}: expected a range like 0.08-1, got {text!r}") from None
    if not (0 < a <= b):
        raise ValueError(f"{what}: need 0 < low <= high, got {text!r}")
    return a, b


def _fmt(v: float) -> str:
    s = repr(float(v))  # shortest text that parses back to the same float
    return s[:-2] if s.endswith(".0") else s


@dataclass(frozen=True)
class ViewPolicy:
    """A view policy: which seeded ops make a view. Build with ``ViewPolicy.parse``."""

    rrc_size: int | None = None  # 0: the source size
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    use_rrc: bool = False
    pad: int = 0
    flip_p: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0

    @classmethod
    def parse(cls, spec: str | ViewPolicy | None) -> ViewPolicy:
        """``"rrc:size=32,scale=0.08-1;flip"``, ``"crop:pad=4;flip"``, ``"shift1"``, ``"none"``."""
        if isinstance(spec, ViewPolicy):
            return spec
        kw: dict = {}
        for part in (spec or "none").split(";"):
            part = part.strip()
            if not part:
                continue
            op, _, args = part.partition(":")
            op = op.strip().lower()
            opts: dict[str, str] = {}
            for a in filter(None, (s.strip() for s in args.split(","))):
                k, eq, v = a.partition("=")
                if not eq:
                    raise ValueError(f"view op {op!r}: option {a!r} is not key=value")
                opts[k.strip().lower()] = v.strip()

            def take(name: str, default: str | None = None, _opts: dict = opts) -> str | None:
                return _opts.pop(name, default)

            if op == "none":
                pass
            elif op == "rrc":
                kw["use_rrc"] = True
                size = take("size")
                try:
                    kw["rrc_size"] = int(size) if size else None
                except ValueError:
                    raise ValueError(f"rrc size={size!r}: expected a whole number of pixels") from None
                if kw["rrc_size"] is not None and not 1 <= kw["rrc_size"] <= MAX_IMAGE_SIDE:
                    raise ValueError(f"rrc size={size}: must be 1..{MAX_IMAGE_SIDE} pixels")
                kw["rrc_scale"] = _range(take("scale", "0.08-1"), "rrc scale")
                ratio = take("ratio")
                kw["rrc_ratio"] = _range(ratio, "rrc ratio") if ratio else (3 / 4, 4 / 3)  # torchvision's
                if kw["rrc_scale"][1] > 1:
                    raise ValueError("rrc scale must lie in (0, 1]")
            elif op in ("crop", "shift1"):
                pad = take("pad", "4")
                try:
                    kw["pad"] = 1 if op == "shift1" else int(pad)
                except ValueError:
                    raise ValueError(f"crop pad={pad!r}: expected a whole number of pixels") from None
                if not 1 <= kw["pad"] <= MAX_CROP_PAD:
                    raise ValueError(f"crop pad={kw['pad']}: must be 1..{MAX_CROP_PAD} pixels")
            elif op == "flip":
                kw["flip_p"] = float(take("p", "0.5"))
                if not 0 < kw["flip_p"] <= 1:
                    raise ValueError("flip p must lie in (0, 1]")
            elif op == "jitter":
                default = "0" if opts else "0.4"  # bare "jitter": all three at 0.4
                for k in ("brightness", "contrast", "saturation"):
                    kw[k] = float(take(k, default))
                    if not 0 <= kw[k] < 1:
                        raise ValueError(f"jitter {k} must lie in [0, 1)")
            else:
                raise ValueError(f"unknown view op {op!r}; known: {', '.join(OPS)}")
            if opts:
                raise ValueError(f"view op {op!r}: unknown option(s) {sorted(opts)}")
        return cls(**kw)

    @property
    def is_identity(self) -> bool:
        return not (self.use_rrc or self.pad or self.flip_p or self.brightness or self.contrast or self.saturation)

    @property
    def needs_raw(self) -> bool:
        """True when the view starts from the decoded image at its own size (a crop box on it)."""
        return self.use_rrc

    @property
    def name(self) -> str:
        """Canonical spec plus version: what a cache records as its augmentation."""
        parts = []
        if self.use_rrc:
            size = f"size={self.rrc_size}," if self.rrc_size else ""
            sc, ra = self.rrc_scale, self.rrc_ratio
            parts.append(f"rrc:{size}scale={_fmt(sc[0])}-{_fmt(sc[1])},ratio={_fmt(ra[0])}-{_fmt(ra[1])}")
        if self.pad:
            parts.append(f"crop:pad={self.pad}")
        if self.flip_p:
            parts.append(f"flip:p={_fmt(self.flip_p)}")
        if self.brightness or self.contrast or self.saturation:
            b, c, s = (_fmt(v) for v in (self.brightness, self.contrast, self.saturation))
            parts.append(f"jitter:brightness={b},contrast={c},saturation={s}")
        return (";".join(parts) or "none") + f"@{POLICY_VERSION}"

    def __str__(self) -> str:
        return self.name

    # -- drawing ------------------------------------------------------------------
    def draw(self, seed: int, height: int, width: int) -> torch.Tensor:
        """The params (float32 [PARAM_WIDTH]) of the view ``seed`` of an image of this size.

        One ``torch.Generator`` per (sample, view): independent of worker
        scheduling and of any global RNG.
        """
        p = IDENTITY_PARAMS.clone()
        if self.is_identity:
            return p
        g = torch.Generator().manual_seed(int(seed))
        if self.use_rrc:
            i, j, h, w = _rrc_box(g, height, width, self.rrc_scale, self.rrc_ratio)
            p[0], p[1], p[2], p[3] = i / height, j / width, h / height, w / width
        if self.pad:
            dy, dx = torch.randint(-self.pad, self.pad + 1, (2,), generator=g).tolist()
            p[4], p[5] = dy, dx
        if self.flip_p:
            p[6] = float(torch.rand(1, generator=g).item() < self.flip_p)
        for k, amount in ((7, self.brightness), (8, self.contrast), (9, self.saturation)):
            if amount:
                p[k] = torch.empty(1).uniform_(1 - amount, 1 + amount, generator=g).item()
        return p

    # -- applying -----------------------------------------------------------------
    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The view's spatial size for a source of ``size`` (rrc resizes; the rest keep it)."""
        if self.use_rrc and self.rrc_size:
            return (self.rrc_size, self.rrc_size)
        return size

    def apply(self, image: torch.Tensor, params: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Replay the view ``params`` on ``image`` (CHW; uint8 is read as value/255).

        ``size``: the output size of a random-resized crop when the policy does
        not fix one (the source size). A pure function of its arguments.
        """
        return apply_params(image, params, self.output_size(size) if size else self.output_size(image.shape[-2:]))


def apply_params(image: torch.Tensor, params: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
    """Replay stored view params on a CHW image (the policy is not needed: params say it all).

    ``size``: output size of the crop box (defaults to the image size). Float
    math only on values read from ``params``, so the result is bit-identical
    in every process and for every worker count.
    """
    if image.dim() != 3:
        raise ValueError(f"views need CHW images, got shape {list(image.shape)}")
    x = image.float() / 255 if image.dtype == torch.uint8 else image.float()
    p = params.tolist()
    if len(p) != PARAM_WIDTH:
        raise ValueError(f"view params need {PARAM_WIDTH} values, got {len(p)}")
    top, left, bh, bw, dy, dx, flip, bright, contrast, sat = p
    h, w = x.shape[-2:]
    out_h, out_w = (int(size[0]), int(size[1])) if size is not None else (h, w)
    if (top, left, bh, bw) != (0.0, 0.0, 1.0, 1.0) or (out_h, out_w) != (h, w):
        i, j = round(top * h), round(left * w)
        ch, cw = max(1, round(bh * h)), max(1, round(bw * w))
        x = x[:, i : i + ch, j : j + cw]
        if (ch, cw) != (out_h, out_w):
            x = F.interpolate(x[None], size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=True)[0]
    dy, dx = int(dy), int(dx)
    if dy or dx:
        pad = max(abs(dy), abs(dx))
        hh, ww = x.shape[-2:]
        padded = F.pad(x, (pad, pad, pad, pad))
        x = padded[:, pad - dy : pad - dy + hh, pad - dx : pad - dx + ww]
    if flip >= 0.5:
        x = x.flip(-1)
    if bright != 1.0:
        x = (x * bright).clamp(0, 1)
    if contrast != 1.0:
        m = _gray(x).mean()
        x = ((x - m) * contrast + m).clamp(0, 1)
    if sat != 1.0 and x.shape[0] == 3:
        gray = _gray(x)
        x = ((x - gray) * sat + gray).clamp(0, 1)
    return x.contiguous()


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] != 3:
        return x.mean(dim=0, keepdim=True)
    return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]


def _rrc_box(
    g: torch.Generator, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, driven by our own generator."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=g).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, (1,), generator=g).item())
            j = int(torch.randint(0, width - w + 1, (1,), generator=g).item())
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize_center(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize the shorter side to fit ``size`` (H, W), then centre-crop: the plain (eval) view."""
    h, w = image.shape[-2:]
    th, tw = int(size[0]), int(size[1])
    if (h, w) == (th, tw):
        return image
    x = image.float() / 255 if image.dtype == torch.uint8 else image
    s = max(th / h, tw / w)
    nh, nw = max(th, round(h * s)), max(tw, round(w * s))
    x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
    i, j = (nh - th) // 2, (nw - tw) // 2
    return x[:, i : i + th, j : j + tw].contiguous()


@dataclass(frozen=True)
class Final:
    """A model's own input transform, after the (shared) view: resolution and normalisation.

    A teacher at 224 pixels with ImageNet normalisation and a student at 160
    read the same views through two ``Final`` transforms. Batched, on any device.
    """

    size: int | tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255
        if self.size is not None:
            size = (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        if self.mean is not None or self.std is not None:
            c = x.shape[1]
            mean = torch.tensor(self.mean or (0.0,) * c, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(self.std or (1.0,) * c, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x

    @classmethod
    def for_input(
        cls, shape: Sequence[int], mean: Sequence[float] | None = None, std: Sequence[float] | None = None
    ) -> Final:
        """The final transform of a model whose per-sample input is ``shape`` ([C, H, W]: views
        are resized to H x W) with its own per-channel normalisation ``mean``/``std``."""
        shape = tuple(int(s) for s in shape)
        size = shape[1:] if len(shape) == 3 and min(shape[1:]) > 0 else None
        return cls(
            size=size,  # type: ignore[arg-type]
            mean=None if mean is None else tuple(float(v) for v in mean),
            std=None if std is None else tuple(float(v) for v in std),
        )


def is_image_batch(x: torch.Tensor, shape: Sequence[int]) -> bool:
    """Whether ``x`` is a batch of images [B, C, H, W] for a model taking images ``shape`` =
    [C, h, w] (same channels, any size): view pixels that a model's ``Final`` maps to its input."""
    shape = tuple(int(s) for s in shape)
    return x.ndim == 4 and len(shape) == 3 and min(shape) > 0 and int(x.shape[1]) == shape[0]


def pixels_to_input(
    x: torch.Tensor, shape: Sequence[int], mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> torch.Tensor | None:
    """The teacher's side of "the view is shared, the final transform is per model".

    ``x``: view pixels [B, C, H, W], uint8 (read as value/255) or float in [0, 1], as every kd
    image source gives them. Returns ``Final.for_input(shape, mean, std)(x)``: float32 in the
    model's resolution and normalisation. None when ``x`` is not an image batch for such a model
    (flat samples, tokens): the caller shapes those as before (a reshape; uint8 normalisation).
    One definition for every place a teacher meets pixels (a local teacher, the client sending
    them by value, the server reading them by reference), so all of them give the same targets.
    """
    if not is_image_batch(x, shape):
        return None
    return Final.for_input(shape, mean, std)(x)


def model_input(x: torch.Tensor, final: Final | None = None, shape: Sequence[int] | None = None) -> torch.Tensor:
    """A batch of samples as a (student) model's input: the one conversion every path uses.

    uint8 samples are pixels, read as value/255 (as ``Final``, ``pixels_to_input`` and the server
    read them), before anything else: a model fed raw 0..255 values (or a resize of them) would
    see another input than the one it was trained or served on. Then ``conform`` to ``shape``
    (when given) and the model's ``final`` transform (resolution and normalisation).
    """
    if x.dtype == torch.uint8:
        x = x.float() / 255
    if shape is not None:
        x = conform(x, shape)
    return x if final is None else final(x)


def conform(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Shape a batch ``[B, ...]`` as a model's per-sample input ``shape`` requires.

    Same element count: a reshape (digits' flat [64] -> a CNN's [1, 8, 8]).
    Same channels, other size: a bilinear resize. Otherwise a ValueError that
    names both shapes.
    """
    shape = tuple(int(s) for s in shape)
    have = tuple(x.shape[1:])
    if have == shape:
        return x
    if math.prod(have) == math.prod(shape):
        return x.reshape(x.shape[0], *shape)
    if len(have) == 3 and len(shape) == 3 and have[0] == shape[0]:
        return F.interpolate(x.float(), size=shape[1:], mode="bilinear", align_corners=False, antialias=True)
    raise ValueError(f"samples of shape {list(have)} cannot be fed to a model that takes {list(shape)}")
