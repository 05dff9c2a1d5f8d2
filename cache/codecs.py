"""Codecs: a batch of logits [B, C] <-> B fixed-size byte strings.

Every codec has a fixed record size for a given class count, so a batch
decodes with one ``frombuffer`` instead of a Python loop per row. A token
cache stores one record per sequence: ``S`` such rows behind a small header
(``kd.cache.store``), so bytes per token = ``record_bytes(V)`` + header / S.

* ``fp32``, ``fp16``, ``bf16``: full logits.
* ``int8``: per-row affine quantisation of the logits (fp32 scale and offset, 256 levels).
* ``q8``, ``q4``: dense log-probabilities at the cache temperature T_c, quantised
  below the row's maximum in 255 / 15 equal steps (fp32 step; two classes a byte
  for q4). Values more than ``log C + 20`` (q8) / ``log C + 10`` (q4) nats below
  the maximum are clipped there: together they hold at most e^-20 / e^-10 of the
  mass. Meant for flat teachers, whose mass is spread over many classes, where no
  sparse codec covers it.
* ``topk:K``: the classes of the K largest logits (the smallest unsigned type that
  holds the class count), their log-probabilities at T_c (fp16: ``z / T_c - logsumexp``,
  which lie in (-inf, 0], so a probability keeps fp16's *relative* precision) and the log of
  the mass outside them at T_c (fp32), computed in float64 from the fp32 top-k parts
  (``TopKCodec``). The top K of z are the top K at every temperature; the mass they cover
  does depend on T (``covered_mass``; ``kd cache info`` reports it). Decodes to
  ``SparseTargets("topk")`` with the K probabilities rescaled so that they and the stored
  rest sum to 1: the KD losses compare the K stored classes plus one **rest bucket**
  holding the remaining mass (never spread over the other classes); ``decode`` (dense
  logits, for methods that need them) is the maximum-entropy completion: the remaining
  mass spread evenly. The decoded values are ``T_c * log p`` with ``logsumexp`` 0 (the
  logits up to a constant per row).
* ``sample:K`` and ``sample:KxR`` (Anshumann et al. 2025, "Sparse Logit
  Sampling"): K ids drawn with replacement from softmax(z / T_s), T_s the cache
  temperature (1 by default, the paper's), stored as unique ids with uint8
  counts; no logits (they would not reach the loss). The target is the empirical
  distribution counts / K, trained at T_s: its cross-entropy gradient is an
  unbiased estimate of the full KL gradient. ``xR`` stores R independent rounds
  of K draws; each read uses one round per record, drawn from torch's global RNG
  (so every epoch can see other draws; seeded runs repeat). With record keys the
  draws are a function of (index, view, round), so re-encoding gives the same
  record.
* ``rand:M`` (``rand:MbB``: B bits, 2..8): M classes chosen uniformly without
  replacement by a hash of the record key (index, view), so the ids cost no bytes;
  their log-probabilities at T_c in 4 (B) bits relative to the subset's maximum
  (fp16 step, at most 12 nats covered) and the log of the mass they cover (fp16).
  Decodes to ``SparseTargets("subset")``: the KD loss uses the M classes plus the
  rest bucket. Across records every class is
  seen with its probability, which is what a student needs from a flat teacher
  at T = 4 whose mass is mostly outside any top-K.
* ``pca:K`` (``pca:KbB``): K coefficients of the row-centred logits in a low-rank basis
  (``LowRankBasis``: the mean and top K principal directions, fitted once on the first
  records), B bits each (4 by default) with per-coefficient steps from the basis, no
  header. A teacher's logits are ``W h + b``: they lie near a subspace of its hidden width
  (on the 1000-class bench 64 directions hold 99% of the spread), so 32 bytes carry almost
  the whole row. Decodes to dense logits (every method and temperature). The basis is stored
  once per cache (``to_bytes``, CRC32-checked; about ``2 K C`` bytes), committed with the
  metadata before the first record (``kd.cache.store``; see ``LowRankCodec``).
* ``pca:K@N``: the same records in N bits in all (``ceil(N / 8)`` bytes), allocated over the K
  coefficients by the basis's spreads (``allocate_bits``: 5-7 bits for the leading ones, 1 or 0
  for the tail), the cells chosen for the KL at T = 1 rather than for the logits' squared error
  (``LowRankCodec``). ``pca:40@80`` is 10 bytes per token: 1/50 of fp16 at V = 259.

Codec version 2 (``CODEC_VERSION``, stored in the cache metadata): ``sample:K``
changed layout (version 1 stored one draw at T with replacement and its unused
logits); a version-1 ``sample:K`` cache is refused with a message to rebuild it.
Every other version-1 cache reads as before (same bytes; topk's loss now uses
the rest bucket).

Codec version 3: ``topk:K`` stores log-probabilities at T_c and the log of the rest mass
instead of the raw logits (fp16) and ``logsumexp(z / T_c)`` (fp32), same record size.
fp16's absolute rounding of a raw logit (~0.016 for |z| in 32..64) made a confident
teacher's stored probabilities sum to 1.0135 and the rest go negative. A cache of
version 2 or older is decoded with the layout it was written with (``TopKCodec.version``,
from the metadata's ``codec_version``); a version-3 cache is refused by a kd that reads up
to version 2 ("upgrade kd"), so neither is read with the other's layout. Every other
codec's records are unchanged.
"""

from __future__ import annotations

import functools
import math
import re
import zlib
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from kd.core.sparse import sample_parts, topk_parts
from kd.core.targets import SparseTargets
from kd.core.tokens import TokenTargets

CODEC_VERSION = 3
MAX_SAMPLE_DRAWS = 255  # counts are uint8
# Rounds of sample:KxR at most: each sample draws K x R uniforms (float64) per record, so an
# unbounded R (sample:12x1000000000) was one allocation of terabytes at the first batch. The
# server's bound on OutputSpec.sample_rounds (teacher_server.service.MAX_SAMPLE_ROUNDS) is the same.
MAX_SAMPLE_ROUNDS = 256


def _index_dtype(num_classes: int) -> np.dtype:
    for dt in (np.uint8, np.uint16, np.uint32):
        if num_classes - 1 <= np.iinfo(dt).max:
            return np.dtype(dt).newbyteorder("<")
    raise ValueError(f"{num_classes} classes do not fit uint32 indices")


def index_bytes(num_classes: int) -> int:
    """Bytes of one stored class / token id: 1 up to 256 classes, 2 up to 65536, else 4."""
    return _index_dtype(num_classes).itemsize


_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, vectorised: a fixed, platform-independent hash of uint64s."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + _GOLD
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def key_seeds(keys: np.ndarray, salt: int) -> np.ndarray:
    """One uint64 seed per record key (index, view) [B, 2] and codec salt."""
    k = np.asarray(keys, dtype=np.int64).reshape(-1, 2).astype(np.uint64)
    with np.errstate(over="ignore"):
        return _mix(_mix(k[:, 0] ^ np.uint64(salt)) + k[:, 1])


def _uniforms(seeds: np.ndarray, n: int, offset: int = 0) -> np.ndarray:
    """[B, n] uniforms in [0, 1) from per-row seeds (float64, 53 random bits)."""
    with np.errstate(over="ignore"):
        j = np.arange(offset + 1, offset + n + 1, dtype=np.uint64)
        h = _mix(seeds[:, None] + j[None, :] * _GOLD)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class Codec:
    name: str
    temperature: float = 1.0  # T_c: the temperature the cache was made for (sparse and q codecs)

    needs_keys = False  # True: encode/decode need the record keys (index, view)
    needs_basis = False  # True: encode/decode need a LowRankBasis fitted on the teacher logits (pca:K)

    @property
    def max_abs(self) -> float | None:
        """Largest |logit| the codec stores without overflow (None: no limit)."""
        return None

    def record_bytes(self, num_classes: int) -> int:
        raise NotImplementedError

    def encode(self, logits: torch.Tensor, keys: np.ndarray | None = None) -> np.ndarray:
        """[B, C] logits -> uint8 array [B, record_bytes]. ``keys``: int64 [B, 2] (index, view)."""
        raise NotImplementedError

    def decode(self, raw: np.ndarray, num_classes: int, keys: np.ndarray | None = None) -> torch.Tensor:
        """uint8 [B, record_bytes] -> float32 dense logits [B, C]."""
        raise NotImplementedError

    def decode_targets(
        self, raw: np.ndarray, num_classes: int, keys: np.ndarray | None = None
    ) -> torch.Tensor | SparseTargets:
        """What a loss consumes: dense logits, or sparse targets for sparse codecs."""
        return self.decode(raw, num_classes, keys)

    def _need_keys(self, keys: np.ndarray | None, n: int) -> np.ndarray:
        if keys is None:
            raise ValueError(f"codec {self.name} derives its classes from the record keys; pass keys (index, view)")
        k = np.asarray(keys, dtype=np.int64).reshape(-1, 2)
        if len(k) != n:
            raise ValueError(f"codec {self.name}: {len(k)} keys for {n} records")
        return k


@dataclass(frozen=True)
class FullCodec(Codec):
    torch_dtype: torch.dtype = torch.float32

    @property
    def max_abs(self) -> float | None:
        return float(torch.finfo(self.torch_dtype).max)

    def record_bytes(self, num_classes: int) -> int:
        return num_classes * torch.empty((), dtype=self.torch_dtype).element_size()

    def encode(self, logits: torch.Tensor, keys: np.ndarray | None = None) -> np.ndarray:
        t = logits.detach().to("cpu", self.torch_dtype).contiguous()
        return t.view(torch.uint8).numpy().reshape(t.shape[0], self.record_bytes(t.shape[1]))

    def decode(self, raw: np.ndarray, num_classes: int, keys: np.ndarray | None = None) -> torch.Tensor:
        if not len(raw):  # torch.from_numpy gives no rows a byte stride of 0, which cannot be viewed as floats
            return torch.empty(0, num_classes, dtype=torch.float32)
        t = torch.from_numpy(np.require(raw, requirements=["C", "W"])).view(self.torch_dtype)
        return t.reshape(raw.shape[0], num_classes).float()


@dataclass(frozen=True)
class Int8Codec(Codec):
    """Row-wise affine: q = round((z - lo) / scale) - 128, scale = (hi - lo) / 255."""

    def record_bytes(self, num_classes: int) -> int:
        return 8 + num_classes

    def encode(self, logits: torch.Tensor, keys: np.ndarray | None = None) -> np.ndarray:
        z = logits.detach().to("cpu", torch.float32).numpy()
        lo = z.min(axis=1, keepdims=True)
        hi = z.max(axis=1, keepdims=True)
        scale = np.maximum((hi - lo) / 255.0, np.finfo(np.float32).tiny).astype(np.float32)
        q = (np.rint((z - lo) / scale) - 128).clip(-128, 127).astype(np.int8)
        head = np.concatenate([scale, lo.astype(np.float32)], axis=1).astype("<f4")
        return np.concatenate([head.view(np.uint8), q.view(np.uint8)], axis=1)

    def decode(self, raw: np.ndarray, num_classes: int, keys: np.ndarray | None = None) -> torch.Tensor:
        raw = np.ascontiguousarray(raw)
        head = raw[:, :8].copy().view("<f4")
        q = raw[:, 8:].view(np.int8).astype(np.float32) + 128.0
        return torch.from_numpy(q * head[:, :1] + head[:, 1:2])


def _pack_bits(q: np.ndarray, bits: int = 4) -> np.ndarray:
    """uint8 [B, N] values < 2^bits -> [B, ceil(N * bits / 8)], little-endian bit order
    (4 bits: the even column in the low nibble)."""
    b = np.unpackbits(q[..., None], axis=-1, bitorder="little")[..., :bits]
    return np.packbits(b.reshape(q.shape[0], -1), axis=1, bitorder="little")


def _unpack_bits(raw: np.ndarray, n: int, bits: int = 4) -> np.ndarray:
    b = np.unpackbits(raw, axis=1, bitorder="little")[:, : n * bits].reshape(raw.shape[0], n, bits)
    return (b.astype(np.uint8) << np.arange(bits, dtype=np.uint8)).sum(axis=2).astype(np.uint8)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    return _pack_bits(q, 4)


def _unpack_nibbles(b: np.ndarray, n: int) -> np.ndarray:
    return _unpack_bits(b, n, 4)


@dataclass(frozen=True)
class QuantCodec(Codec):
    """Dense log-probabilities at T_c in ``bits`` (8 or 4) below the row's maximum."""

    bits: int = 8

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    def cap(self, num_classes: int) -> float:
        """Nats below the maximum that the steps cover (lower values are clipped there)."""
        return math.log(num_classes) + (20.0 if self.bits == 8 else 10.0)

    def record_bytes(self, num_classes: int) -> int:
        return 4 + (num_classes if self.bits == 8 else -(-num_classes // 2))

    def encode(self, logits: torch.Tensor, keys: np.ndarray | None = None) -> np.ndarray:
        u = logits.detach().to("cpu", torch.float64) / self.temperature
        u = (u - u.max(dim=1, keepdim=True).values).numpy()  # <= 0; the shift does not change softmax
        c = u.shape[1]
        span = np.minimum(-u.min(axis=1, keepdims=True), self.cap(c))
        step = np.maximum(span / self.levels, 1e-30).astype(np.float32)
        q = np.rint(-u / step.astype(np.float64)).clip(0, self.levels).astype(np.uint8)
        body = q if self.bits == 8 else _pack_nibbles(q)
        return np.concatenate([step.astype("<f4").view(np.uint8), body], axis=1)

    def decode(self, raw: np.ndarray, num_classes: int, keys: np.ndarray | None = None) -> torch.Tensor:
        raw = np.ascontiguousarray(raw)
        step = raw[:, :4].copy().view("<f4")
        body = raw[:, 4:]
        q = body if self.bits == 8 else _unpack_nibbles(body, num_classes)
        return torch.from_numpy((-q.astype(np.float32) * step) * np.float32(self.temperature))


@dataclass(frozen=True)
class TopKCodec(Codec):
    """``topk:K``: the K largest logits' classes and their probabilities at T_c (see the module).

    Record layout, version 3 (``CODEC_VERSION``): K **log-probabilities** at T_c,
    ``l_k = z_k / T_c - logsumexp(z / T_c)`` (fp16, rounded to nearest, clipped to fp16's
    range: -65504 is probability 0 in any float), K class ids (``index_bytes``), then the
    **log of the rest mass** ``log(1 - sum_k p_k)`` at T_c (fp32; -inf when nothing is left).
    Both are computed in float64 from the top-k parts (``kd.core.sparse.topk_parts``: fp32
    values and fp32 logsumexp, what a server sends), so a cache filled from a server's reply
    holds the same bytes as one filled from full logits.

    What is exact: each decoded probability to fp16's *relative* precision, |dp| / p <=
    2^-11 |l_k| + 2^-24 / p (normal and subnormal fp16 steps), doubled by the renormalisation
    below; the rest mass to the fp32 parts' precision (an absolute error of a few fp32 ulps
    of ``logsumexp``: ~1e-6 at logits of 40). Decoding rescales the K probabilities so that
    they and the stored rest sum to exactly 1 (so the stored mass never exceeds 1 and a
    student equal to the teacher has a loss of ~0), and returns ``values = T_c * log p``
    (fp32, rounded toward -inf) with ``logsumexp`` 0: logits shifted by a constant per row,
    which no softmax sees. The teacher's own logit scale is not kept.

    Version 2 and older (caches written before; ``get_codec(..., version=2)``): the K raw
    logits in fp16 and ``logsumexp(z / T_c)`` in fp32, decoded as stored. fp16's absolute
    rounding of a logit (~0.016 for |z| in 32..64) made a confident teacher's stored
    probabilities sum to more than 1 there; such caches still read exactly as before."""

    k: int = 10
    version: int = CODEC_VERSION  # the record layout (see the class)

    @property
    def log_probs(self) -> bool:
        """Whether the records hold log-probabilities and the rest mass (version 3 on)."""
        return self.version >= 3

    @property
    def max_abs(self) -> float | None:
        if self.log_probs:
            return None  # log-probabilities are stored: any finite logit fits
        return float(torch.finfo(torch.float16).max)  # version 2: values are stored as fp16

    def _layout(self, num_classes: int) -> tuple[np.dtype, int, int]:
        idx = _index_dtype(num_classes)
        return idx, 2 * self.k, idx.itemsize * self.k

    def record_bytes(self, num_classes: int) -> int:
        if self.k > num_classes:
            raise ValueError(f"topk:{self.k} needs at least {self.k} classes, got {num_classes}")
        _, vbytes, ibytes = self._layout(num_classes)
        return vbytes + ibytes + 4

    def encode(self, logits: torch.Tensor, keys: np.ndarray | None = None) -> np.ndarray:
        z = logits.detach().to("cpu", torch.float32)
        self.record_bytes(z.shape[1])
        values, indices, lse = topk_parts(z, self.k, self.temperature)
        return self._pack(values, indices, lse, z.shape[1])

    def decode_sparse(self, raw: np.ndarray, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (values fp32 [B, K], indices int64 [B, K], logsumexp fp32 [B]) with
        ``log p = values / T_c - logsumexp`` at T_c. Version 3: ``values = T_c * log p``
        (renormalised with the stored rest, see the class), ``logsumexp`` 0; version 2: the
        stored fp16 logits and fp32 logsumexp."""
        idx_dt, vbytes, ibytes = self._layout(num_classes)
        raw = np.ascontiguousarray(raw)
        stored = raw[:, :vbytes].copy().view("<f2")
        indices = raw[:, vbytes : vbytes + ibytes].copy().view(idx_dt).astype(np.int64)
        last = raw[:, vbytes + ibytes :].copy().view("<f4")[:, 0]
        if not self.log_probs:
            values, lse = stored.astype(np.float32), last.copy()
        else:
            values, lse = self._probs_values(stored.astype(np.float64), last.astype(np.float64)), np.zeros_like(last)
        return torch.from_numpy(values), torch.from_numpy(indices), torch.from_numpy(lse)

    def _probs_values(self, log_p: np.ndarray, log_rest: np.ndarray) -> np.ndarray:
        """float64 stored log p [B, K] and log rest [B] -> fp32 ``T_c * log p'`` with the K
        probabilities rescaled to ``1 - rest`` (their fp16 errors no longer add up past 1)."""
        top = log_p.max(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_s = top[:, 0] + np.log(np.exp(log_p - top).sum(axis=1))  # log sum p_k, float64
            log_target = np.log1p(-np.exp(log_rest))  # log(1 - rest): exact for a tiny rest
        scaled = self.temperature * (log_p + (log_target - log_s)[:, None])
        out = scaled.astype(np.float32)
        # Round toward -inf, so no decoded probability exceeds its float64 value (the sum stays <= 1).
        up = out.astype(np.float64) > scaled
        out[up] = np.nextafter(out[up], np.float32(-np.inf))
        return out

    def _pack(self, values: torch.Tensor, indices: torch.Tensor, lse: torch.Tensor, num_classes: int) -> np.ndarray:
        """Records from the top-k parts: values fp32 [B, K] (the logits z), indices [B, K] and
        ``logsumexp(z / T_c)`` fp32 [B] (``kd.core.sparse.topk_parts``, a server's reply)."""
        idx_dt, _, _ = self._layout(num_classes)
        if not self.log_probs:
            head = values.to(torch.float16).numpy().view(np.uint8)
            tail = lse.reshape(-1, 1).numpy().astype("<f4").view(np.uint8)
        else:
            # float64 from the fp32 parts: log p at T_c, and the rest 1 - sum p as log(-expm1(log sum p))
            # so a tiny rest keeps its digits (clipped to 0 where the parts' rounding leaves sum p >= 1).
            log_p = values.double().numpy() / self.temperature - lse.double().numpy()[:, None]
            log_s = np.logaddexp.reduce(log_p, axis=1) if log_p.shape[1] else np.full(len(log_p), -np.inf)
            with np.errstate(divide="ignore"):
                log_rest = np.where(log_s < 0, np.log(-np.expm1(np.minimum(log_s, 0.0))), -np.inf)
            fp16_min = float(np.finfo(np.float16).min)
            head = np.clip(log_p, fp16_min, 0.0).astype("<f2").view(np.uint8)
            tail = log_rest.reshape(-1, 1).astype("<f4").view(np.uint8)
        return np.concatenate([head, indices.numpy().astype(idx_dt).view(np.uint8), tail], axis=1)

    def decode_targets(self, raw: np.ndarray, num_classes: int, keys: np.ndarray | None = None) -> SparseTargets:
        values, indices, lse = self.decode_sparse(raw, num_classes)
        return SparseTargets("topk", indices, values, lse, num_classes, self.temperature)

    def decode(self, raw: np.ndarray, num_classes: int, keys: np.ndarray | None = None) -> torch.Tensor:
        return self.decode_targets(raw, num_classes).dense()


@dataclass(frozen=True)
class SampleCodec(Codec):
    """R rounds of K draws from softmax(z / T_s): unique ids and uint8 counts per round."""

    k: int = 12
    rounds: int = 1
    seed: int = 0  # mixed into the draws (without keys: with the rows' content)

    def record_bytes(self, num_classes: int) -> int:
        return self.rounds * self.k * (index_bytes(num_classes) + 1)

    def uniforms(self, keys: np.ndarray) -> torch.Tensor:
        """The uniforms the records with these keys ([B, 2] int64: index, view) are drawn with,
        float64 [B, R * K]. A server given them draws exactly the records ``encode`` makes."""
        return torch.from_numpy(_uniforms(key_seeds(self._need_keys(keys, len(keys)), 0x5A17 + self.seed),
                                          self.rounds * self.k))  # fmt: skip

    def encode(self, logits: torch.Tensor, keys: np.ndarray | None = None) -> np.ndarray:
        z = logits.detach().to("cpu", torch.float64)
        b, c = z.shape
        n = self.rounds * self.k
        if keys is not None:
            u = self.uniforms(self._need_keys(keys, b))
        else:  # seeded from the batch's content: re-encoding the same rows gives the same draws
            seed = (self.seed * 1_000_003 + int(z.numel()) + int(z.abs().sum().item() * 1e3)) % (2**63)
            u = torch.rand(b, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        ids, counts = sample_parts(z, self.k, self.rounds, self.temperature, u)  # [B, R, K] each
        idx_dt = _index_dtype(c)
        parts = []
        for r in range(self.rounds):
            parts += [ids[:, r].numpy().astype(idx_dt).view(np.uint8), counts[:, r].numpy().astype(np.uint8)]
        return np.concatenate(parts, axis=1)

    def decode_rounds(self, raw: np.ndarray, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (ids int64 [B, R, K], counts float32 [B, R, K])."""
        idx_dt = _index_dtype(num_classes)
        raw = np.ascontiguousarray(raw)
        per = self.k * (idx_dt.itemsize + 1)
        ids, counts = [], []
        for r in range(self.rounds):
            part = raw[:, r * per : (r + 1) * per]
            ids.append(part[:, : self.k * idx_dt.itemsize].copy().view(idx_dt).astype(np.int64))
            counts.append(part[:, self.k * idx_dt.itemsize :].astype(np.float32))
        return torch.from_numpy(np.stack(ids, axis=1)), torch.from_numpy(np.stack(counts, axis=1))

    def decode_targets(self, raw: np.ndarray, num_classes: int, keys: np.ndarray | None = None) -> SparseTargets:
        ids, counts = self.decode_rounds(raw, num_classes)
        if self.rounds == 1:
            pick = torch.zeros(len(ids), dtype=torch.int64)
        else:
            pick = torch.randint(self.rounds, (len(ids),))  # the global RNG: seeded runs repeat
        rows = torch.arange(len(ids))
        ids, counts = ids[rows, pick], counts[rows, pick]
        return SparseTargets("sample", ids, counts, counts.sum(dim=1), num_classes, self.temperature)

    def decode(self, raw: np.ndarray, num_classes: int, keys: np.ndarray | None = None) -> torch.Tensor:
        raise ValueError(
            f"{self.name} targets are sampled counts with no dense form; use a method that accepts sparse "
            "targets (kd, token-fkl) or a dense codec (fp32, fp16, bf16, int8, q8, q4, topk:K)"
        )


@dataclass(frozen=True)
class RandomSubsetCodec(Codec):
    """M key-derived classes, their log-probs at T_c in ``bits`` (4; ``rand:MbB`` for B in 2..8)
    below the subset's maximum, and the log of the mass they cover."""

    m: int = 64
    bits: int = 4

    needs_keys = True

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    def record_bytes(self, num_classes: int) -> int:
        if self.m > num_classes:
            raise ValueError(f"rand:{self.m} needs at least {self.m} classes, got {num_classes}")
        return 4 + -(-self.m * self.bits // 8)

    def class_ids(self, keys: np.ndarray, num_classes: int) -> np.ndarray:
        """int64 [B, M], sorted: the classes a record with these keys stores (a hash of the key)."""
        seeds = key_seeds(keys, 0x7A4D)
        with np.errstate(over="ignore"):
            scores = _mix(seeds[:, None] ^ (np.arange(num_classes, dtype=np.uint64)[None, :] * _GOLD))
        ids = np.argpartition(scores, self.m - 1, axis=1)[:, : self.m] if self.m < num_classes else None
        if ids is None:
            ids = np.broadcast_to(np.arange(num_classes), scores.shape)
        return np.sort(ids, axis=1).astype(np.int64)

    def encode(self, logits: torch.Tensor, keys: np.ndarray | None = None) -> np.ndarray:
        z = logits.detach().to("cpu", torch.float64)
        b, c = z.shape
        self.record_bytes(c)
        ids = torch.from_numpy(self.class_ids(self._need_keys(keys, b), c))
        logp = torch.log_softmax(z / self.temperature, dim=1).gather(1, ids)  # [B, M]
        log_cov = torch.logsumexp(logp, dim=1).clamp(min=-60000.0)
        rel = (logp - logp.max(dim=1, keepdim=True).values).numpy()  # <= 0
        span = np.minimum(-rel.min(axis=1, keepdims=True), 12.0)
        step = np.maximum(span / self.levels, 1e-4).astype(np.float16).astype(np.float64)
        q = np.rint(-rel / step).clip(0, self.levels).astype(np.uint8)
        head = np.concatenate([step, log_cov.numpy()[:, None]], axis=1).astype("<f2")
        return np.concatenate([head.view(np.uint8), _pack_bits(q, self.bits)], axis=1)

    def decode_targets(self, raw: np.ndarray, num_classes: int, keys: np.ndarray | None = None) -> SparseTargets:
        raw = np.ascontiguousarray(raw)
        ids = torch.from_numpy(self.class_ids(self._need_keys(keys, len(raw)), num_classes))
        head = raw[:, :4].copy().view("<f2").astype(np.float32)
        rel = -_unpack_bits(raw[:, 4:], self.m, self.bits).astype(np.float32) * head[:, :1]
        rel_t = torch.from_numpy(rel)
        logp = rel_t - torch.logsumexp(rel_t, dim=1, keepdim=True) + torch.from_numpy(head[:, 1].copy())[:, None]
        # Stored as logits at T_c with logsumexp 0: p_k = exp(v / T_c - 0).
        return SparseTargets("subset", ids, logp * self.temperature, torch.zeros(len(raw)), num_classes,
                             self.temperature)  # fmt: skip

    def decode(self, raw: np.ndarray, num_classes: int, keys: np.ndarray | None = None) -> torch.Tensor:
        raise ValueError(
            f"{self.name} stores a random subset of the classes and the mass of the rest, with no dense form; use a "
            "method that accepts sparse targets (kd, token-fkl) or a dense codec"
        )


# Step of the uniform quantiser with 2^B levels that has the least squared error on a unit
# Gaussian (Max 1960), per B: a coefficient of spread sigma is quantised in steps of sigma * this.
GAUSS_STEP = {1: 1.5958, 2: 0.9957, 3: 0.5860, 4: 0.3352, 5: 0.1881, 6: 0.1041, 7: 0.0568, 8: 0.0308}
# The mean squared error of that quantiser per unit variance (Max 1960), per B (0 bits: the
# coefficient is dropped, its whole variance is the error): what ``allocate_bits`` trades.
GAUSS_MSE = (1.0, 0.3634, 0.1188, 0.03744, 0.01154, 0.00349, 0.00103, 0.000297, 0.0000845)
# ``pca:K@N`` quantises with steps this much wider than GAUSS_STEP: its encoder feeds each
# coefficient's quantisation error into the ones quantised after it, which pushes them past
# the Gaussian-optimal range; on the kd demo-lm teacher (10,000 positions) the mean KL of
# pca:40@80's decoded targets was 0.0146 nats at 1.0, 0.0134 at 1.25, 0.0151 at 1.5, 0.0180 at 1.75.
ADAPTIVE_STEP_SCALE = 1.25
_BASIS_MAGIC, _BASIS_VERSION = b"KDLR", 1


@dataclass(frozen=True, eq=False)
class LowRankBasis:
    """The basis of a ``pca:K`` cache: the mean and the top principal directions of the
    row-centred teacher logits, fitted once on records spread over the data and stored beside them.

    A teacher's logits are ``W h + b`` with ``h`` of the teacher's hidden width, so they lie
    in a subspace far smaller than the class count (a language model's in one of its model
    dimension); on a dataset they concentrate further. Row centring drops the log-sum-exp,
    so the basis is the same at every temperature."""

    mean: np.ndarray  # float32 [C]
    components: np.ndarray  # float32 [K, C] holding fp16 values (as stored), near-orthonormal rows by decreasing spread
    sigma: np.ndarray  # float32 [K]: each coefficient's standard deviation on the fitted rows

    @property
    def num_classes(self) -> int:
        return int(self.mean.shape[0])

    @property
    def rank(self) -> int:
        return int(self.components.shape[0])

    @classmethod
    def fit(cls, logits: torch.Tensor, k: int, weighted: bool = False) -> LowRankBasis:
        """The top ``k`` principal directions of the row-centred logits [N, C] (float64 SVD).

        ``weighted``: directions of the spread measured with class weights w_c = sqrt(p_c), p_c
        the class's mean teacher probability at T = 1 relative to the largest (floored at 1e-4),
        so that classes the teacher never predicts do not take directions; the components are then
        not orthonormal, and sigma is the spread of the weighted least-squares coefficients. What
        ``pca:K@N`` fits (``LowRankCodec.fit_basis``): a KL weighs a class by its probability.
        (On the kd demo-lm teacher, ``pca:40@80``: mean KL 0.0134 nats against 0.0150 unweighted.)"""
        z = logits.detach().to("cpu", torch.float64)
        if z.dim() != 2 or not 1 <= k <= min(z.shape):
            raise ValueError(f"a rank-{k} basis needs logits [N, C] with N and C at least {k}, got {list(z.shape)}")
        if not bool(torch.isfinite(z).all()):
            raise ValueError("the logits to fit a basis on hold NaN or Inf")
        x = z - z.mean(dim=1, keepdim=True)
        mean = x.mean(dim=0)
        if not weighted:
            _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
            comps = vh[:k].half().double()  # stored in fp16: the encoder uses what the decoder will read
            sigma = ((x - mean) @ comps.T).std(dim=0, correction=0)
            return cls(mean.float().numpy(), comps.float().numpy(), sigma.float().numpy())
        p = torch.softmax(z, dim=1).mean(dim=0)
        w = (p / p.max()).sqrt().clamp(min=1e-2)  # sqrt(p / max p), p / max p floored at 1e-4
        _, _, vh = torch.linalg.svd((x - mean) * w.sqrt(), full_matrices=False)
        comps = (vh[:k] / w.sqrt()).half().double()
        g = comps * w  # weighted least squares: c = (B W B^T)^-1 B W x
        coef = torch.linalg.solve(g @ comps.T, g @ (x - mean).T).T
        sigma = coef.std(dim=0, correction=0)
        return cls(mean.float().numpy(), comps.float().numpy(), sigma.float().numpy())

    def to_bytes(self) -> bytes:
        """``KDLR``, u32 version, u32 C, u32 K, float32 mean [C], float32 sigma [K], float16
        components [K, C], crc32 of all before: ``20 + 4 C + 4 K + 2 K C`` bytes."""
        body = _BASIS_MAGIC + np.array([_BASIS_VERSION, self.num_classes, self.rank], "<u4").tobytes()
        body += np.ascontiguousarray(self.mean, "<f4").tobytes() + np.ascontiguousarray(self.sigma, "<f4").tobytes()
        body += np.ascontiguousarray(self.components, "<f2").tobytes()
        return body + np.array([zlib.crc32(body)], "<u4").tobytes()

    @staticmethod
    def size(num_classes: int, rank: int) -> int:
        """Bytes of a stored basis (``to_bytes``)."""
        return 20 + 4 * num_classes + 4 * rank + 2 * rank * num_classes

    @classmethod
    def from_bytes(cls, raw: bytes) -> LowRankBasis:
        raw = bytes(raw)
        if len(raw) < 20 or raw[:4] != _BASIS_MAGIC:
            raise ValueError("not a kd low-rank basis (bad magic or too short)")
        if zlib.crc32(raw[:-4]) != int(np.frombuffer(raw[-4:], "<u4")[0]):
            raise ValueError("the low-rank basis fails its checksum: it is corrupted")
        version, c, k = (int(v) for v in np.frombuffer(raw[4:16], "<u4"))
        if version != _BASIS_VERSION:
            raise ValueError(f"low-rank basis version {version}; this kd reads version {_BASIS_VERSION}")
        if len(raw) != cls.size(c, k):
            raise ValueError(f"a low-rank basis of {k} x {c} has {cls.size(c, k)} bytes, not {len(raw)}")
        f = np.frombuffer(raw[16 : 16 + 4 * (c + k)], "<f4").astype(np.float32)
        comps = np.frombuffer(raw[16 + 4 * (c + k) : -4], "<f2").astype(np.float32).reshape(k, c)
        return cls(f[:c].copy(), comps, f[c:].copy())


@functools.lru_cache(maxsize=64)
def _allocation(sigma: bytes, total: int) -> np.ndarray:
    """``allocate_bits`` of float32 sigma bytes, once per basis (every record's encode and decode asks)."""
    bits = allocate_bits(np.frombuffer(sigma, dtype=np.float32), total)
    bits.flags.writeable = False
    return bits


def allocate_bits(sigma: np.ndarray, total: int, max_bits: int = 8) -> np.ndarray:
    """int64 [K]: bits per coefficient, ``total`` in all, for coefficients of spreads ``sigma``.

    Reverse water-filling done greedily (classic transform coding): each of the ``total`` bits
    goes to the coefficient whose expected squared error it lowers most, sigma_j^2 (GAUSS_MSE[b_j]
    - GAUSS_MSE[b_j + 1]), the first such on a tie, at most ``max_bits`` each. The errors fall
    convexly with b, so the greedy allocation is the optimal one for this model. Leading
    components get 5 to 7 bits, the tail 1 or 0 (dropped). A pure function of the stored sigma
    (float64 arithmetic): the encoder and every decoder derive the same allocation."""
    var = np.asarray(sigma, dtype=np.float64) ** 2
    if not 1 <= max_bits <= 8:
        raise ValueError(f"max_bits must lie in 1..8, got {max_bits}")
    if total < 0 or total > max_bits * len(var):
        raise ValueError(f"{total} bits do not fit {len(var)} coefficients of at most {max_bits} bits")
    mse = np.asarray(GAUSS_MSE, dtype=np.float64)
    bits = np.zeros(len(var), dtype=np.int64)
    for _ in range(total):
        gain = np.where(bits < max_bits, var * (mse[bits] - mse[np.minimum(bits + 1, 8)]), -1.0)
        bits[int(np.argmax(gain))] += 1
    return bits


def _pack_fields(q: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """uint [B, A] values, value j in ``widths[j]`` bits -> uint8 [B, ceil(sum / 8)]: the fields
    one after another, each least significant bit first, little-endian bit order (equal widths:
    the layout of ``_pack_bits``); the unused bits of the last byte are 0."""
    shifts = np.arange(8, dtype=np.uint8)
    b = (q.astype(np.uint8)[:, :, None] >> shifts) & 1  # [B, A, 8]
    keep = shifts[None, :] < np.asarray(widths)[:, None]  # [A, 8]
    return np.packbits(b[:, keep], axis=1, bitorder="little")


def _unpack_fields(raw: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """The inverse of ``_pack_fields``: uint8 [B, bytes] -> int64 [B, A]."""
    widths = np.asarray(widths, dtype=np.int64)
    flat = np.unpackbits(np.ascontiguousarray(raw), axis=1, bitorder="little")[:, : int(widths.sum())]
    weight = np.zeros((int(widths.sum()), len(widths)), dtype=np.int64)
    at = 0
    for j, w in enumerate(widths):
        weight[at : at + w, j] = 1 << np.arange(w)
        at += w
    return flat.astype(np.int64) @ weight


@dataclass(frozen=True)
class LowRankCodec(Codec):
    """``pca:K[bB]``: K coefficients of the row-centred logits in a fitted ``LowRankBasis``,
    each in B bits (4 by default) with a step fixed by the basis (``GAUSS_STEP[B] * sigma``),
    no header: ``ceil(K * B / 8)`` bytes. Decodes to dense logits (up to a constant per row,
    which no softmax sees), so every method and every temperature can use them.

    ``pca:K@N``: the same decoder with N bits per row in all, spread over the K coefficients by
    ``allocate_bits`` on the basis's sigma (the leading ones more, the tail 1 or 0), steps
    ``ADAPTIVE_STEP_SCALE * GAUSS_STEP[b] * sigma``, ``ceil(N / 8)`` bytes. Its encoder chooses
    the cells for the KL the student is trained on rather than for the squared error of the
    logits: for each row it takes the coefficients that minimise the second-order KL at T = 1,
    (x - B^T c)^T F (x - B^T c) with F = diag(p) - p p^T the row's Fisher matrix (a class
    counts by its probability; the row's constant costs nothing; F + lambda I in fact, lambda =
    1e-9 tr(B F B^T) / A + 1e-12 tr(B B^T) / A over the A stored coefficients, so that a row whose
    softmax is one-hot, where F vanishes, gets the least-squares coefficients), then quantises them one
    after another from the last to the first, moving the not yet quantised ones to absorb each
    error in that metric (GPTQ, Frantar et al. 2023; Babai's nearest plane). On the kd demo-lm
    teacher at 80 bits this cuts the decoded targets' mean KL from 0.072 (``pca:20b4``, the same
    10 bytes) to 0.013 nats. The KL is that at T = 1; other temperatures get a good, not
    an optimised, code.

    A cache stores the basis once (``cache.store``: fitted by ``kd.precompute`` on the first
    records' teacher outputs, committed with the metadata before any record, reused on resume,
    checked on open); shards fit their own unless given one (``--basis``). Outside a cache,
    ``get_codec(name, basis=...)`` takes the basis explicitly; ``fit_basis`` fits the one the
    codec is meant for (``pca:K@N``: ``LowRankBasis.fit(..., weighted=True)``)."""

    k: int = 64
    bits: int = 4
    total_bits: int | None = None  # pca:K@N: N bits per row, allocated over the K coefficients
    basis: LowRankBasis | None = field(default=None, compare=False, repr=False)

    needs_basis = True

    def record_bytes(self, num_classes: int) -> int:
        n = self.k * self.bits if self.total_bits is None else self.total_bits
        return -(-n // 8)

    def fit_basis(self, logits: torch.Tensor) -> LowRankBasis:
        """The basis this codec is meant for, fitted on teacher logits [N, C] (see the class)."""
        return LowRankBasis.fit(logits, self.k, weighted=self.total_bits is not None)

    def with_basis(self, basis: LowRankBasis | bytes) -> LowRankCodec:
        b = LowRankBasis.from_bytes(basis) if isinstance(basis, (bytes, bytearray, memoryview)) else basis
        if b.rank < self.k:
            raise ValueError(f"codec {self.name} needs a basis of rank {self.k} or more, got {b.rank}")
        return replace(self, basis=b)

    def _basis(self, num_classes: int) -> LowRankBasis:
        if self.basis is None:
            raise ValueError(
                f"codec {self.name} needs its low-rank basis (LowRankBasis.fit on the first records' logits) and "
                "none was given (a cache stores its own: open it with CacheReader; in memory: "
                "get_codec(name, basis=...))"
            )
        if self.basis.num_classes != num_classes:
            n = self.basis.num_classes
            raise ValueError(f"codec {self.name}: the basis has {n} classes, the rows {num_classes}")
        return self.basis

    def allocation(self, num_classes: int) -> np.ndarray:
        """int64 [K]: bits of each coefficient (``pca:K@N``: ``allocate_bits`` on the basis's sigma)."""
        if self.total_bits is None:
            return np.full(self.k, self.bits, dtype=np.int64)
        sigma = np.ascontiguousarray(self._basis(num_classes).sigma[: self.k], dtype=np.float32)
        return _allocation(sigma.tobytes(), self.total_bits)

    def steps(self, num_classes: int) -> np.ndarray:
        """float64 [K]: each coefficient's quantisation step (tiny spreads get a tiny floor)."""
        sigma = self._basis(num_classes).sigma[: self.k].astype(np.float64)
        if self.total_bits is None:
            return np.maximum(GAUSS_STEP[self.bits] * sigma, 1e-12)
        table = np.array([0.0] + [GAUSS_STEP[b] for b in range(1, 9)]) * ADAPTIVE_STEP_SCALE
        return np.maximum(table[self.allocation(num_classes)] * sigma, 1e-12)

    def encode(self, logits: torch.Tensor, keys: np.ndarray | None = None) -> np.ndarray:
        z = logits.detach().to("cpu", torch.float64).numpy()
        b = self._basis(z.shape[1])
        if not np.isfinite(z).all():
            raise ValueError(f"codec {self.name}: the logits hold NaN or Inf")
        x = z - z.mean(axis=1, keepdims=True) - b.mean.astype(np.float64)
        if self.total_bits is not None:
            return self._encode_fisher(z, x, b)
        coef = x @ b.components[: self.k].astype(np.float64).T  # [B, K]
        half = 1 << (self.bits - 1)
        q = np.floor(coef / self.steps(z.shape[1])).clip(-half, half - 1) + half  # the cell, 0 .. 2^B - 1
        return _pack_bits(q.astype(np.uint8), self.bits)

    def _encode_fisher(self, z: np.ndarray, x: np.ndarray, b: LowRankBasis) -> np.ndarray:
        c_count = z.shape[1]
        widths = self.allocation(c_count)
        act = np.flatnonzero(widths)[::-1]  # the stored coefficients, quantised last to first
        comps = b.components[act].astype(np.float64)  # [A, C]
        steps, half = self.steps(c_count)[act], (1 << widths[act]) >> 1
        cells = np.zeros((len(z), len(act)), dtype=np.int64)
        gram = comps @ comps.T  # B B^T: the squared error's metric on the coefficients
        floor = 1e-12 * np.trace(gram) / len(act)
        # B diag(p) B^T of every row as one GEMM, p [rows, C] @ (b_c b_c^T)_c [C, A(A+1)/2] (the
        # outer products' upper triangles, built a slice of classes at a time: 16 MiB at most), rows
        # of probabilities 32 MiB at a time. Through B diag(p) [rows * A, C] instead it took 340 ms
        # a row at C = 32,000, A = 40 (memory-bound); this ~20 ms.
        iu, ju = np.triu_indices(len(act))
        pairs = len(iu)
        chunk = max(1, (1 << 22) // max(c_count, pairs))
        per = max(1, (1 << 21) // pairs)
        for lo in range(0, len(z), chunk):
            zc, xc = z[lo : lo + chunk], x[lo : lo + chunk]
            p = np.exp(zc - zc.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            pb = p @ comps.T  # B p, [n, A]
            upper = np.zeros((len(p), pairs))
            for c0 in range(0, c_count, per):
                bc = comps[:, c0 : c0 + per]  # [A, classes]
                upper += p[:, c0 : c0 + per] @ (bc[iu] * bc[ju]).T
            fisher = np.empty((len(p), len(act), len(act)))  # B diag(p) B^T, [n, A, A]
            fisher[:, iu, ju] = upper
            fisher[:, ju, iu] = upper
            fisher -= pb[:, :, None] * pb[:, None, :]  # B F B^T
            rhs = (p * xc) @ comps.T - pb * (p * xc).sum(axis=1, keepdims=True)  # B F x
            # A little of the squared error in the metric, F + lambda I: a vanishing Fisher (a row
            # whose softmax is one-hot in float64) leaves the least-squares coefficients, not a
            # singular system; elsewhere lambda changes the metric by 1e-9 of its scale.
            ridge = 1e-9 * np.trace(fisher, axis1=1, axis2=2) / len(act) + floor
            h = fisher + ridge[:, None, None] * gram
            # H^-1 = U^T U (U upper): quantising coefficient j moves the later ones by its error
            # times U[j, j+1:] / U[j, j], the least-squares answer given those already fixed.
            # U = R^-1 with H = R R^T (R upper: the Cholesky factor of H in reversed order), not
            # the Cholesky factor of a computed H^-1: on a confident row (top probability 0.96
            # and up) H's condition number reaches ~1e10, and its computed inverse was not
            # positive definite ("Matrix is not positive definite" from a confident teacher).
            r = np.linalg.cholesky(h[:, ::-1, ::-1])[:, ::-1, ::-1]
            u = np.triu(np.linalg.inv(r))
            coef = (u.transpose(0, 2, 1) @ (u @ (rhs + ridge[:, None] * (xc @ comps.T))[..., None]))[..., 0]
            for j in range(len(act)):
                cell = np.floor(coef[:, j] / steps[j]).clip(-half[j], half[j] - 1)
                cells[lo : lo + len(zc), j] = cell
                err = (coef[:, j] - (cell + 0.5) * steps[j]) / u[:, j, j]
                coef[:, j + 1 :] -= err[:, None] * u[:, j, j + 1 :]
        stored = np.zeros((len(z), self.k), dtype=np.int64)
        stored[:, act] = cells + half
        on = widths > 0
        return _pack_fields(stored[:, on], widths[on])

    def coefficients(self, raw: np.ndarray, num_classes: int) -> np.ndarray:
        """float64 [B, K]: the midpoints of the stored cells (0 for a coefficient of 0 bits)."""
        if self.total_bits is None:
            q = _unpack_bits(np.ascontiguousarray(raw), self.k, self.bits).astype(np.float64)
            return (q - (1 << (self.bits - 1)) + 0.5) * self.steps(num_classes)
        widths = self.allocation(num_classes)
        on = widths > 0
        c = np.zeros((len(raw), self.k), dtype=np.float64)
        c[:, on] = _unpack_fields(raw, widths[on]) - (1 << widths[on] >> 1) + 0.5
        return c * self.steps(num_classes)

    def decode(self, raw: np.ndarray, num_classes: int, keys: np.ndarray | None = None) -> torch.Tensor:
        b = self._basis(num_classes)
        c = self.coefficients(raw, num_classes).astype(np.float32)
        return torch.from_numpy(b.mean[None, :] + c @ b.components[: self.k])


CODECS: dict[str, Codec] = {
    "fp32": FullCodec("fp32", torch_dtype=torch.float32),
    "fp16": FullCodec("fp16", torch_dtype=torch.float16),
    "bf16": FullCodec("bf16", torch_dtype=torch.bfloat16),
    "int8": Int8Codec("int8"),
}
TEMPERED = ("topk:", "sample:", "rand:", "q8", "q4")  # codecs whose records depend on the cache temperature


def codec_uses_temperature(name: str) -> bool:
    return name.startswith(TEMPERED)


# Codecs whose decoded targets are the teacher's logits themselves, up to rounding: stored as they
# are, or (int8) with each row's offset and scale.
FULL_LOGIT_CODECS = ("fp32", "fp16", "bf16", "int8")


def logit_offsets_lost(name: str) -> str | None:
    """None where a cache of codec ``name`` gives the teacher's logits as computed; else what it
    keeps instead. Losses that read only softmax(z) see no difference; losses that read the absolute
    logits (their magnitude, a regression onto them) would silently train on other targets."""
    if name in FULL_LOGIT_CODECS:
        return None
    if name.startswith("topk:"):
        # Version 3 decodes T_c * log p (logsumexp 0), version 2 the raw top K; both fill in the others.
        return (f"{name} keeps the top {name[5:]} classes' probabilities, decoded as logits shifted by a constant "
                "per row with the other classes' logits made up (top-k targets lose the logits' offsets)")  # fmt: skip
    if name in ("q8", "q4"):
        return f"{name} keeps log-probabilities below each row's maximum, not the logits (their offsets are lost)"
    if name.startswith("pca:"):
        return f"{name} keeps the row-centred logits in a low-rank basis (each row's offset is lost)"
    if name.startswith(("sample:", "rand:")):
        return f"{name} keeps sampled or subset classes' probabilities, no logits"
    return f"codec {name} is not known to keep the teacher's logits"


def sparse_targets_of(name: str) -> str | None:
    """None where a cache of codec ``name`` decodes to dense logits ``[B, C]``; else what its sparse
    targets (``SparseTargets``: ``decode_targets`` of topk, sample and rand) hold, for the trainer's
    refusal of methods whose loss needs every class's logit."""
    if name.startswith("topk:"):
        return f"{name} gives sparse targets (the top {name[5:]} classes and the rest mass, not every class's logit)"
    if name.startswith("sample:"):
        return f"{name} gives sparse targets (sampled classes with their counts, no logits)"
    if name.startswith("rand:"):
        return f"{name} gives sparse targets (a subset of the classes chosen per record, not every class's logit)"
    return None


def get_codec(
    name: str,
    temperature: float | None = None,
    version: int = CODEC_VERSION,
    basis: LowRankBasis | bytes | None = None,
) -> Codec:
    """``fp32``, ``fp16``, ``bf16``, ``int8``, ``q8``, ``q4``, ``topk:K``, ``sample:K[xR]``,
    ``rand:M[bB]``, ``pca:K[bB]`` or ``pca:K@N``.

    ``temperature``: the cache's T_c (1 when None). ``version``: the codec version the
    cache was written with (``CODEC_VERSION`` for new caches). ``basis``: a ``pca:K``
    cache's ``LowRankBasis`` (or its bytes); without it the codec only reports its sizes."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"codec version must be a positive integer, got {version!r}")
    if version > CODEC_VERSION:
        raise ValueError(
            f"this cache was written with codec version {version}, newer than this kd reads ({CODEC_VERSION}); "
            "upgrade kd"
        )
    if name in CODECS:
        return CODECS[name]
    pca = re.fullmatch(r"pca:([0-9]+)(?:b([2-8])|@([0-9]+))?", name)
    if pca:  # the row-centred logits: no temperature in the record
        k, bits = int(pca.group(1)), int(pca.group(2) or 4)
        total = None if pca.group(3) is None else int(pca.group(3))
        if k < 1:
            raise ValueError(f"codec {name!r}: K must be a positive integer, as in pca:64")
        if total is not None and not 1 <= total <= 8 * k:
            raise ValueError(f"codec {name!r}: N bits over {k} coefficients of at most 8 bits must lie in 1..{8 * k}, "
                             "as in pca:40@80")  # fmt: skip
        codec = LowRankCodec(name, 1.0, k=k, bits=bits, total_bits=total)
        return codec if basis is None else codec.with_basis(basis)
    if name.startswith("pca:"):
        raise ValueError(
            f"codec {name!r}: expected pca:K, pca:KbB (B bits, 2..8) or pca:K@N (N bits in all), as in pca:64, "
            "pca:80b3 or pca:40@80"
        )
    t = 1.0 if temperature is None else temperature
    # z / T with T <= 0, NaN or Inf gives NaN or inverted targets (and no distribution to draw from).
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise ValueError(f"codec {name!r}: temperature must be a finite number > 0, got {temperature!r}")
    t = float(t)
    if name in ("q8", "q4"):
        return QuantCodec(name, t, bits=int(name[1]))
    kind, _, arg = name.partition(":")
    if kind in ("topk", "sample", "rand"):
        m = re.fullmatch(r"([0-9]+)(?:x([0-9]+)|b([2-8]))?", arg)
        k = int(m.group(1)) if m else 0
        rounds = int(m.group(2)) if m and m.group(2) else 1
        bits = int(m.group(3)) if m and m.group(3) else 4
        if k < 1 or rounds < 1 or (m and m.group(2) and kind != "sample") or (m and m.group(3) and kind != "rand"):
            example = "sample:12 or sample:12x4" if kind == "sample" else f"{kind}:10"
            raise ValueError(f"codec {name!r}: K must be a positive integer, as in {example}")
        if kind == "topk":
            return TopKCodec(name, t, k=k, version=version)
        if kind == "rand":
            return RandomSubsetCodec(name, t, m=k, bits=bits)
        if version < 2:
            raise ValueError(
                f"this {name} cache was written with codec version {version}: one draw at the training temperature "
                "with replacement, reused every epoch, whose stored logits never reached the loss (it pulls the "
                "student away from the teacher). kd no longer reads it; rebuild it with `kd precompute --codec "
                f"{name}` (version {CODEC_VERSION}: unique ids with counts, drawn at T = 1)"
            )
        if k > MAX_SAMPLE_DRAWS:
            raise ValueError(f"codec {name!r}: at most {MAX_SAMPLE_DRAWS} draws per round (uint8 counts)")
        if rounds > MAX_SAMPLE_ROUNDS:
            raise ValueError(f"codec {name!r}: at most {MAX_SAMPLE_ROUNDS} rounds (R of sample:KxR)")
        return SampleCodec(name, t, k=k, rounds=rounds)
    raise ValueError(
        f"unknown codec {name!r}; choose from {', '.join(CODECS)}, q8, q4, topk:K, sample:K, sample:KxR, rand:M, "
        "pca:K or pca:K@N"
    )


def covered_mass(targets: SparseTargets | TokenTargets, temperature: float | None = None) -> torch.Tensor:
    """The teacher's mass on the stored classes of topk/subset targets, at T (default the
    targets' T_c; exact there): ``[B]`` for ``SparseTargets``, one value per real position
    (flattened) for ``TokenTargets`` with logits + lse. Sampled counts cover their draws: 1."""
    if isinstance(targets, TokenTargets):
        if targets.logits is None or targets.lse is None:
            return torch.ones(int((targets.ids >= 0).any(-1).sum()))
        t = targets.temperature if temperature is None else temperature
        if not math.isclose(t, targets.temperature, rel_tol=1e-6):
            raise ValueError(f"token targets hold their lse at T = {targets.temperature}, not {t}")
        slot = targets.ids >= 0
        p = torch.where(slot, torch.exp(targets.logits.double() / t - targets.lse.double()[..., None]), 0.0)
        return p.sum(-1)[slot.any(-1)]
    if targets.kind == "sample":
        return torch.ones(len(targets))
    log_p, _ = targets.bucket_log_probs(targets.temperature or 1.0 if temperature is None else temperature,
                                        torch.float64)  # fmt: skip
    return log_p.exp().sum(dim=1)


def bytes_per_sample(codec: str, num_classes: int) -> int:
    return get_codec(codec).record_bytes(num_classes) + RECORD_OVERHEAD


RECORD_OVERHEAD = 8  # header (4) + crc32 (4); see cache.store
