"""Caches written in shards (``kd precompute --shard I/N``, or one shard per
``torchrun`` rank) and read back as one.

A sharded cache is a directory of ``shard-IIIII-of-NNNNN`` LMDB environments;
shard I holds the samples i with i % N == I. ``open_cache`` returns a reader
with the same interface for a single environment or a directory of shards.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from kd.cache.store import CacheError, CacheMeta, CacheReader, CacheWriter, VerifyReport
from kd.core.targets import SparseTargets, Targets
from kd.core.tokens import TokenTargets

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
    if isinstance(first, tuple):  # (token targets, hidden states)
        return tuple(_merge_rows([(pos, part[j]) for pos, part in parts], n) for j in range(len(first)))
    if isinstance(first, TokenTargets):
        fields = {}
        for name in ("ids", "logits", "lse", "counts"):
            if getattr(first, name) is not None:
                fields[name] = _merge_rows([(pos, getattr(part, name)) for pos, part in parts], n)
        return TokenTargets(vocab_size=first.vocab_size, temperature=first.temperature, **fields)
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
        # A folder past the last shard (shard-00005-of-00004: copied or renamed by hand) was skipped without
        # a word, and `kd cache verify` passed with its records unread
        extra = sorted(p.name for p in found if int(_SHARD_RE.match(p.name)[1]) >= count)
        if extra:
            raise CacheError(f"cache {str(self.path)!r} has shard folder(s) {extra} beyond its {count} shards "
                             f"(0..{count - 1}); remove or rename them")  # fmt: skip
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

    def read_sequences(self, indices: Iterable[int] | torch.Tensor) -> list[np.ndarray]:
        """Each sequence's checked codec rows from its shard (``per_token`` caches), in request order."""
        idx = list(indices.tolist() if isinstance(indices, torch.Tensor) else indices)
        out: list[np.ndarray] = [np.empty(0, np.uint8)] * len(idx)
        for pos, r, i, _ in self._route(idx, None):
            for p, rows in zip(pos, r.read_sequences(i)):
                out[p] = rows
        return out

    def token_targets(self, indices: Iterable[int] | torch.Tensor, width: int | None = None) -> Targets | TokenTargets:
        """``CacheReader.token_targets`` over the shards: each shard decodes its own sequences (its own
        codec and basis) and the rows go back to their places, padded to one width."""
        return self._token_parts("token_targets", indices, width)

    def token_targets_hidden(
        self, indices: Iterable[int] | torch.Tensor, width: int | None = None
    ) -> tuple[Targets | TokenTargets, dict[str, torch.Tensor]]:  # fmt: skip
        """``CacheReader.token_targets_hidden`` over the shards, as ``token_targets``."""
        return self._token_parts("token_targets_hidden", indices, width)

    def _token_parts(self, fn_name: str, indices: Iterable[int] | torch.Tensor, width: int | None):
        idx = list(indices.tolist() if isinstance(indices, torch.Tensor) else indices)
        routes = self._route(idx, None)
        if not routes:
            return getattr(self.shards[0], fn_name)([], width)
        if width is None:  # the longest sequence of the request, whichever shard holds it
            width = max(len(rows) for _, r, i, _ in routes for rows in r.read_sequences(i))
        return _merge_rows([(pos, getattr(r, fn_name)(i, width)) for pos, r, i, _ in routes], len(idx))

    def token_stats(self) -> dict[str, float]:
        """``CacheReader.token_stats`` summed over the shards."""
        stats = [r.token_stats() for r in self.shards]
        total = {k: sum(s[k] for s in stats) for k in ("sequences", "positions", "bytes")}
        return {**total, "bytes_per_token": total["bytes"] / total["positions"] if total["positions"] else math.nan}

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
            report.corrupt += part.corrupt
            report.missing += part.missing
            report.problems += part.problems
        report.missing.sort()
        return report

    def close(self) -> None:
        pass


def shard_count_at(root: str | Path) -> int | None:
    """N of the ``shard-*-of-N`` folders in ``root`` (None: no shard folders there)."""
    path = Path(root)
    if not path.is_dir():
        return None
    counts = {int(m[2]) for p in path.iterdir() if p.is_dir() and (m := _SHARD_RE.match(p.name))}
    if len(counts) > 1:
        raise CacheError(f"cache {str(path)!r} mixes shard counts {sorted(counts)}")
    return counts.pop() if counts else None


def check_layout(root: str | Path, shard_count: int) -> None:
    """Refuse to write a cache at ``root`` in ``shard_count`` shards (1: one environment at the
    root) where another layout is already there: readers take a root ``data.mdb`` over shard
    folders, so a root environment written beside shards would hide them (and shards beside a
    root environment would never be read), and shards of another count are a different split."""
    path = Path(root)
    existing = shard_count_at(path)
    if shard_count == 1 and existing is not None and not (path / "data.mdb").is_file():
        raise CacheError(
            f"{str(path)!r} holds a cache in {existing} shards (shard-*-of-{existing:05d}): writing it as one "
            f"environment would hide them from every reader; resume it with --shard I/{existing} (one run per "
            "shard, or torchrun with that many ranks), or give another --out"
        )
    if shard_count > 1 and (path / "data.mdb").is_file():
        raise CacheError(
            f"{str(path)!r} holds a cache in one environment (data.mdb): shards written beside it would never be "
            "read; resume it without --shard, or give another --out"
        )
    if shard_count > 1 and existing is not None and existing != shard_count:
        raise CacheError(
            f"{str(path)!r} holds a cache in {existing} shards, not {shard_count}: resume it with "
            f"--shard I/{existing}, or give another --out"
        )


class ShardedCacheWriter:
    """Adds records to an existing directory of ``count`` shards (``ReadThroughSource`` on a
    sharded cache): sample i goes to shard i % count, as ``kd precompute --shard`` puts it.
    Each shard's writer checks ``meta`` (the teacher's fingerprint, the dataset, the codec...)
    against what the shard holds, so a stale or other teacher is refused as for one environment."""

    def __init__(self, root: str | Path, meta: CacheMeta, count: int) -> None:
        self.writers: list[CacheWriter] = []
        try:
            for i in range(count):
                shard_meta = dataclasses.replace(meta, shard_index=i, shard_count=count)
                self.writers.append(CacheWriter(shard_dir(root, i, count), shard_meta))
        except BaseException:
            self.close()
            raise
        self.meta = meta
        self.codec = self.writers[0].codec

    def _route(self, indices: Iterable[int], views: Iterable[int] | None) -> list[tuple[int, list[int]]]:
        groups: dict[int, list[int]] = {}
        for pos, i in enumerate(indices):
            groups.setdefault(int(i) % len(self.writers), []).append(pos)
        return sorted(groups.items())

    @staticmethod
    def _pick(values: list[int] | None, pos: list[int]) -> list[int] | None:
        return None if values is None else [values[p] for p in pos]

    def put(self, indices: Iterable[int], logits: torch.Tensor, views: Iterable[int] | None = None) -> None:
        idx, vw = list(indices), None if views is None else list(views)
        for s, pos in self._route(idx, vw):
            self.writers[s].put([idx[p] for p in pos], logits[pos], self._pick(vw, pos))

    def put_topk(self, indices: Iterable[int], targets: SparseTargets, views: Iterable[int] | None = None) -> None:
        idx, vw = list(indices), None if views is None else list(views)
        for s, pos in self._route(idx, vw):
            part = dataclasses.replace(targets, indices=targets.indices[pos], logits=targets.logits[pos],
                                       logsumexp=targets.logsumexp[pos])  # fmt: skip
            self.writers[s].put_topk([idx[p] for p in pos], part, self._pick(vw, pos))

    def put_samples(self, indices: Iterable[int], ids: torch.Tensor, counts: torch.Tensor,
                    views: Iterable[int] | None = None) -> None:  # fmt: skip
        idx, vw = list(indices), None if views is None else list(views)
        for s, pos in self._route(idx, vw):
            self.writers[s].put_samples([idx[p] for p in pos], ids[pos], counts[pos], self._pick(vw, pos))

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        for w in self.writers:
            w.close()


def keys_in_order(reader: CacheReader | ShardedCacheReader) -> Iterator[tuple[int, int]]:
    """(index, view) of every record of ``reader`` in increasing order, lazily: one environment's cursor
    walk is in that order already (big-endian keys); a sharded cache's shards are merged, not sorted."""
    shards = getattr(reader, "shards", None)
    return reader.keys() if shards is None else heapq.merge(*(s.keys() for s in shards))


def open_cache(path: str | Path, **expect: object) -> CacheReader | ShardedCacheReader:
    """A reader for one LMDB environment, or for a directory of shards."""
    path = Path(path)
    if (path / "data.mdb").is_file():
        return CacheReader(path, **expect)
    if path.is_dir():
        return ShardedCacheReader(path, **expect)
    raise CacheError(f"no cache at {str(path)!r}; create one with `kd precompute`")
