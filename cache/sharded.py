"""Caches written in shards (``kd precompute --shard I/N``, or one shard per
``torchrun`` rank) and read back as one.

A sharded cache is a directory of ``shard-IIIII-of-NNNNN`` LMDB environments;
shard I holds the samples i with i % N == I. ``open_cache`` returns a reader
with the same interface for a single environment or a directory of shards.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from kd.cache.store import CacheError, CacheMeta, CacheReader, VerifyReport
from kd.core.targets import SparseTargets, Targets

_SHARD_RE = re.compile(r"^shard-(\d{5})-of-(\d{5})$")


def shard_dir(root: str | Path, index: int, count: int) -> Path:
    return Path(root) / f"shard-{index:05d}-of-{count:05d}"


def parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` -> (I, N) with 0 <= I < N."""
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise ValueError(f"shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"shard {text!r}: need 0 <= I < N")
    return i, n


def _merge_rows(parts: list[tuple[list[int], Targets]], n: int) -> Targets:
    """Put each shard's rows back at their positions in the request."""
    first = parts[0][1]
    if isinstance(first, dict):
        return {k: _merge_rows([(pos, part[k]) for pos, part in parts], n) for k in first}
    if isinstance(first, SparseTargets):
        k = first.indices.shape[1]
        out = SparseTargets(
            first.kind,
            torch.empty(n, k, dtype=first.indices.dtype),
            torch.empty(n, k, dtype=first.logits.dtype),
            torch.empty(n, dtype=first.logsumexp.dtype),
            first.num_classes,
            first.temperature,
        )
        for pos, part in parts:
            out.indices[pos], out.logits[pos], out.logsumexp[pos] = part.indices, part.logits, part.logsumexp
        return out
    out_t = torch.empty((n, *first.shape[1:]), dtype=first.dtype)
    for pos, part in parts:
        out_t[pos] = part
    return out_t


class ShardedCacheReader:
    """Several shard environments read as one cache (same metadata but the shard fields)."""

    def __init__(self, root: str | Path, **expect: object) -> None:
        self.path = Path(root)
        found = sorted(p for p in self.path.iterdir() if p.is_dir() and _SHARD_RE.match(p.name))
        if not found:
            raise CacheError(f"no cache at {str(self.path)!r} (no data.mdb and no shard-*-of-* folders)")
        counts = {int(_SHARD_RE.match(p.name)[2]) for p in found}
        if len(counts) != 1:
            raise CacheError(f"cache {str(self.path)!r} mixes shard counts {sorted(counts)}")
        count = counts.pop()
        present = {int(_SHARD_RE.match(p.name)[1]) for p in found}
        missing = sorted(set(range(count)) - present)
        if missing:
            raise CacheError(f"cache {str(self.path)!r} is missing shard(s) {missing} of {count}")
        self.shards = [CacheReader(shard_dir(self.path, i, count), **expect) for i in range(count)]
        base = dataclasses.replace(self.shards[0].meta, shard_index=0, shard_count=1)
        for i, r in enumerate(self.shards):
            # pca:K: each shard decodes with its own stored basis (one fitted per shard unless
            # `kd precompute --basis` shared one), so the bases may differ
            # codec_version: a shard written (or resumed) by another kd release keeps its own record
            # layout, and each shard's reader decodes with its own (the record size is the same).
            same = dict(shard_index=0, shard_count=1, created_by=base.created_by, basis_sha256=base.basis_sha256,
                        codec_version=base.codec_version)  # fmt: skip
            if dataclasses.replace(r.meta, **same) != base:
                mine = dataclasses.asdict(dataclasses.replace(r.meta, **same))
                differ = [f"{k} {v!r} (shard 0: {getattr(base, k)!r})"
                          for k, v in mine.items() if getattr(base, k) != v]  # fmt: skip
                raise CacheError(f"shard {i} of {str(self.path)!r} was built with other metadata than shard 0: "
                                 + "; ".join(differ))  # fmt: skip
            if (r.meta.shard_index, r.meta.shard_count) != (i, count):
                raise CacheError(f"shard folder {i}/{count} of {str(self.path)!r} holds shard {r.meta.shard_index}")
        self.meta: CacheMeta = base
        self.codec = self.shards[0].codec  # sizes and name; records decode with their shard's codec
        self.basis_bytes = sum(getattr(r, "basis_bytes", 0) for r in self.shards)
        self.record_bytes = self.shards[0].record_bytes
        self.logit_bytes = self.shards[0].logit_bytes

    def _route(self, indices, views) -> list[tuple[list[int], CacheReader, list[int], list[int] | None]]:
        idx = indices.tolist() if isinstance(indices, torch.Tensor) else [int(i) for i in indices]
        vw = None if views is None else (views.tolist() if isinstance(views, torch.Tensor) else [int(v) for v in views])
        n = len(self.shards)
        groups: dict[int, list[int]] = {}
        for pos, i in enumerate(idx):
            groups.setdefault(i % n, []).append(pos)
        return [
            (pos, self.shards[s], [idx[p] for p in pos], None if vw is None else [vw[p] for p in pos])
            for s, pos in sorted(groups.items())
        ]

    def _gather(self, fn_name: str, indices, views, n: int) -> Targets:
        parts = [(pos, getattr(r, fn_name)(i, v)) for pos, r, i, v in self._route(indices, views)]
        if not parts:
            return getattr(self.shards[0], fn_name)([], None)
        return _merge_rows(parts, n)

    def get(self, indices: Iterable[int] | torch.Tensor, views=None) -> torch.Tensor:
        idx = list(indices.tolist() if isinstance(indices, torch.Tensor) else indices)
        return self._gather("get", idx, views, len(idx))

    def targets(self, indices: Iterable[int] | torch.Tensor, views=None) -> Targets:
        idx = list(indices.tolist() if isinstance(indices, torch.Tensor) else indices)
        return self._gather("targets", idx, views, len(idx))

    def features(self, indices: Iterable[int] | torch.Tensor, views=None) -> dict[str, torch.Tensor]:
        idx = list(indices.tolist() if isinstance(indices, torch.Tensor) else indices)
        return self._gather("features", idx, views, len(idx))

    def read_raw(self, indices: Iterable[int], views=None) -> np.ndarray:
        idx = list(indices)
        out = np.empty((len(idx), self.record_bytes), dtype=np.uint8)
        for pos, r, i, v in self._route(idx, views):
            out[pos] = r.read_raw(i, v)
        return out

    def present(self, indices: Iterable[int], views=None) -> list[bool]:
        idx = list(indices)
        out = [False] * len(idx)
        for pos, r, i, v in self._route(idx, views):
            for p, ok in zip(pos, r.present(i, v)):
                out[p] = ok
        return out

    def keys(self) -> Iterator[tuple[int, int]]:
        for r in self.shards:
            yield from r.keys()

    def __len__(self) -> int:
        return sum(len(r) for r in self.shards)

    def verify(self) -> VerifyReport:
        report = VerifyReport(expected=0)
        for r in self.shards:
            part = r.verify()
            report.expected += part.expected
            report.present += part.present
            report.missing += part.missing
            report.problems += part.problems
        report.missing.sort()
        return report

    def close(self) -> None:
        pass


def open_cache(path: str | Path, **expect: object) -> CacheReader | ShardedCacheReader:
    """A reader for one LMDB environment, or for a directory of shards."""
    path = Path(path)
    if (path / "data.mdb").is_file():
        return CacheReader(path, **expect)
    if path.is_dir():
        return ShardedCacheReader(path, **expect)
    raise CacheError(f"no cache at {str(path)!r}; create one with `kd precompute`")
