"""Codecs: a batch of logits [B, C] <-> B fixed-size byte strings.

Every codec has a fixed record size for a given class count, so a batch
decodes with one ``frombuffer`` instead of a Python loop per row.

* ``fp32``, ``fp16``, ``bf16``: full logits.
* ``int8``: per-row affine quantisation (fp32 scale and offset, 256 levels).
* ``topk:K``: the K largest logits (fp16), their class indices (the smallest
  unsigned type that holds the class count) and the row's log-sum-exp of
  z / T (fp32; T the cache's temperature, 1 unless precomputed with one),
  so the probability mass outside the top K stays known. Decodes to
  ``kd.core.targets.SparseTargets`` (the KD loss uses it without densifying) or,
  for small class counts, to dense logits with that mass spread evenly.
* ``sample:K``: K classes drawn with replacement from softmax(z / T) (T the
  cache's temperature), their logits (fp16) and log-sum-exp of z / T: an
  unbiased sparse estimate of the KL at T (Anshumann et al. 2025).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from kd.core.targets import SparseTargets


def _index_dtype(num_classes: int) -> np.dtype:
    for dt in (np.uint8, np.uint16, np.uint32):
        if num_classes - 1 <= np.iinfo(dt).max:
            return np.dtype(dt).newbyteorder("<")
    raise ValueError(f"{num_classes} classes do not fit uint32 indices")


@dataclass(frozen=True)
class Codec:
    name: str

    @property
    def max_abs(self) -> float | None:
        """Largest |logit| the codec stores without overflow (None: no limit)."""
        return None

    def record_bytes(self, num_classes: int) -> int:
        raise NotImplementedError

    def encode(self, logits: torch.Tensor) -> np.ndarray:
        """[B, C] logits -> uint8 array [B, record_bytes]."""
        raise NotImplementedError

    def decode(self, raw: np.ndarray, num_classes: int) -> torch.Tensor:
        """uint8 [B, record_bytes] -> float32 dense logits [B, C]."""
        raise NotImplementedError

    def decode_targets(self, raw: np.ndarray, num_classes: int) -> torch.Tensor | SparseTargets:
        """What a loss consumes: dense logits, or sparse targets for sparse codecs."""
        return self.decode(raw, num_classes)


@dataclass(frozen=True)
class FullCodec(Codec):
    torch_dtype: torch.dtype = torch.float32

    @property
    def max_abs(self) -> float | None:
        return float(torch.finfo(self.torch_dtype).max)

    def record_bytes(self, num_classes: int) -> int:
        return num_classes * torch.empty((), dtype=self.torch_dtype).element_size()

    def encode(self, logits: torch.Tensor) -> np.ndarray:
        t = logits.detach().to("cpu", self.torch_dtype).contiguous()
        return t.view(torch.uint8).numpy().reshape(t.shape[0], self.record_bytes(t.shape[1]))

    def decode(self, raw: np.ndarray, num_classes: int) -> torch.Tensor:
        t = torch.from_numpy(np.require(raw, requirements=["C", "W"])).view(self.torch_dtype)
        return t.reshape(raw.shape[0], num_classes).float()


@dataclass(frozen=True)
class Int8Codec(Codec):
    """Row-wise affine: q = round((z - lo) / scale) - 128, scale = (hi - lo) / 255."""

    def record_bytes(self, num_classes: int) -> int:
        return 8 + num_classes

    def encode(self, logits: torch.Tensor) -> np.ndarray:
        z = logits.detach().to("cpu", torch.float32).numpy()
        lo = z.min(axis=1, keepdims=True)
        hi = z.max(axis=1, keepdims=True)
        scale = np.maximum((hi - lo) / 255.0, np.finfo(np.float32).tiny).astype(np.float32)
        q = (np.rint((z - lo) / scale) - 128).clip(-128, 127).astype(np.int8)
        head = np.concatenate([scale, lo.astype(np.float32)], axis=1).astype("<f4")
        return np.concatenate([head.view(np.uint8), q.view(np.uint8)], axis=1)

    def decode(self, raw: np.ndarray, num_classes: int) -> torch.Tensor:
        raw = np.ascontiguousarray(raw)
        head = raw[:, :8].copy().view("<f4")
        q = raw[:, 8:].view(np.int8).astype(np.float32) + 128.0
        return torch.from_numpy(q * head[:, :1] + head[:, 1:2])


@dataclass(frozen=True)
class TopKCodec(Codec):
    k: int = 10
    temperature: float = 1.0  # the row's log-sum-exp is of z / temperature

    @property
    def max_abs(self) -> float | None:
        return float(torch.finfo(torch.float16).max)  # values are stored as fp16

    def _layout(self, num_classes: int) -> tuple[np.dtype, int, int]:
        idx = _index_dtype(num_classes)
        return idx, 2 * self.k, idx.itemsize * self.k

    def record_bytes(self, num_classes: int) -> int:
        if self.k > num_classes and not isinstance(self, SampleCodec):  # draws may repeat; top-k may not
            raise ValueError(f"topk:{self.k} needs at least {self.k} classes, got {num_classes}")
        _, vbytes, ibytes = self._layout(num_classes)
        return vbytes + ibytes + 4

    def encode(self, logits: torch.Tensor) -> np.ndarray:
        z = logits.detach().to("cpu", torch.float32)
        self.record_bytes(z.shape[1])
        values, indices = z.topk(self.k, dim=1)
        return self._pack(values, indices, torch.logsumexp(z / self.temperature, dim=1), z.shape[1])

    def decode_sparse(self, raw: np.ndarray, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (values fp32 [B, K], indices int64 [B, K], logsumexp fp32 [B])."""
        idx_dt, vbytes, ibytes = self._layout(num_classes)
        raw = np.ascontiguousarray(raw)
        values = raw[:, :vbytes].copy().view("<f2").astype(np.float32)
        indices = raw[:, vbytes : vbytes + ibytes].copy().view(idx_dt).astype(np.int64)
        lse = raw[:, vbytes + ibytes :].copy().view("<f4")[:, 0]
        return torch.from_numpy(values), torch.from_numpy(indices), torch.from_numpy(lse.copy())

    def _pack(self, values: torch.Tensor, indices: torch.Tensor, lse: torch.Tensor, num_classes: int) -> np.ndarray:
        idx_dt, _, _ = self._layout(num_classes)
        parts = [
            values.to(torch.float16).numpy().view(np.uint8),
            indices.numpy().astype(idx_dt).view(np.uint8),
            lse.reshape(-1, 1).numpy().astype("<f4").view(np.uint8),
        ]
        return np.concatenate(parts, axis=1)

    def decode_targets(self, raw: np.ndarray, num_classes: int) -> SparseTargets:
        values, indices, lse = self.decode_sparse(raw, num_classes)
        return SparseTargets("topk", indices, values, lse, num_classes, self.temperature)

    def decode(self, raw: np.ndarray, num_classes: int) -> torch.Tensor:
        return self.decode_targets(raw, num_classes).dense()


@dataclass(frozen=True)
class SampleCodec(TopKCodec):
    """K draws from softmax(z / T) with their logits and logsumexp(z / T)."""

    seed: int = 0

    def encode(self, logits: torch.Tensor) -> np.ndarray:
        z = logits.detach().to("cpu", torch.float32)
        c = z.shape[1]
        self.record_bytes(c)
        scaled = z / self.temperature
        # Seeded from the batch's content: re-encoding the same rows gives the same draws.
        seed = (self.seed * 1_000_003 + int(z.numel()) + int(z.abs().sum().item() * 1e3)) % (2**63)
        g = torch.Generator().manual_seed(seed)
        draws = torch.multinomial(torch.softmax(scaled, dim=1), self.k, replacement=True, generator=g)
        return self._pack(z.gather(1, draws), draws, torch.logsumexp(scaled, dim=1), c)

    def decode_targets(self, raw: np.ndarray, num_classes: int) -> SparseTargets:
        values, indices, lse = self.decode_sparse(raw, num_classes)
        return SparseTargets("sample", indices, values, lse, num_classes, self.temperature)

    def decode(self, raw: np.ndarray, num_classes: int) -> torch.Tensor:
        raise ValueError(
            f"{self.name} targets are a sampled estimator with no dense form; use a method that "
            "accepts sparse targets (kd) or a dense codec (fp32, fp16, bf16, int8, topk:K)"
        )


CODECS: dict[str, Codec] = {
    "fp32": FullCodec("fp32", torch.float32),
    "fp16": FullCodec("fp16", torch.float16),
    "bf16": FullCodec("bf16", torch.bfloat16),
    "int8": Int8Codec("int8"),
}


def get_codec(name: str, temperature: float | None = None) -> Codec:
    """``fp32``, ``fp16``, ``bf16``, ``int8``, ``topk:K`` or ``sample:K`` (needs ``temperature``)."""
    if name in CODECS:
        return CODECS[name]
    kind, _, arg = name.partition(":")
    if kind in ("topk", "sample"):
        try:
            k = int(arg)
        except ValueError:
            k = 0
        if k < 1:
            raise ValueError(f"codec {name!r}: K must be a positive integer, as in {kind}:10")
        t = 1.0 if temperature is None else temperature
        # z / T with T <= 0, NaN or Inf gives NaN or inverted targets (and no distribution to draw from).
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"codec {name!r}: temperature must be a finite number > 0, got {temperature!r}")
        if kind == "topk":
            return TopKCodec(name, k, temperature=float(t))
        return SampleCodec(name, k, temperature=float(t))
    raise ValueError(f"unknown codec {name!r}; choose from {', '.join(CODECS)}, topk:K or sample:K")


def bytes_per_sample(codec: str, num_classes: int) -> int:
    return get_codec(codec).record_bytes(num_classes) + RECORD_OVERHEAD


RECORD_OVERHEAD = 8  # header (4) + crc32 (4); see cache.store
