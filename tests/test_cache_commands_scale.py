"""The cache commands at millions of records, on real LMDB caches in tmp_path: ``verify`` finds every
defect it found record by record, in batches and without a set of all keys; ``export`` writes the npz
in chunks (the same bytes as one ``np.savez``); ``len()`` and ``kd cache info`` read counts without
walking every key."""

from __future__ import annotations

import math
import tracemalloc
import zlib
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch

from kd.cache import CacheMeta, CacheReader, CacheWriter, store
from kd.cache.store import record_key

ROOT = Path(__file__).resolve().parents[1]
HEADER = b"KD\x01\x00"


def sealed(key: bytes, payload: bytes, header: bytes = HEADER) -> bytes:
    """A record value written by hand: header + payload + crc32 over key and both, little-endian."""
    body = header + payload
    return body + zlib.crc32(body, zlib.crc32(key)).to_bytes(4, "little")


def edit(path: Path, fn) -> None:
    env = lmdb.open(str(path), subdir=True)
    try:
        with env.begin(write=True) as txn:
            fn(txn)
    finally:
        env.close()


@pytest.mark.parametrize("shard", [(0, 1), (1, 3)])
def test_verify_finds_every_defect_across_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shard) -> None:
    """Each kind of defect verify knows (foreign keys, size, checksum, header, NaN in the targets or
    a stored feature, records outside the dataset or of another shard) with its message, in key
    order, and the missing (index, view), checked a few records per batch so that defects and gaps
    fall on batch boundaries. The messages are those of the per-record walk it replaced (this test
    passes on it too, with its batch size setting ignored)."""
    monkeypatch.setattr(store, "_VERIFY_BATCH", 7, raising=False)
    si, sc = shard
    m = CacheMeta("fp-A", "ds", 40, "fp32", 5, views=2, augmentation="aug", shard_index=si, shard_count=sc,
                  features={"f": [3]})  # fmt: skip
    owned = [(i, v) for i in range(si, 40, sc) for v in range(2)]
    gone = {owned[0], owned[8], owned[9], owned[10], owned[-1]}  # a run of three across a batch boundary
    kept = [iv for iv in owned if iv not in gone]
    g = torch.Generator().manual_seed(0)
    with CacheWriter(tmp_path / "c", m, commit_every=5) as w:
        w.put([i for i, _ in kept], torch.randn(len(kept), 5, generator=g), views=[v for _, v in kept],
              features={"f": torch.randn(len(kept), 3, generator=g)})  # fmt: skip
    prefix, path = m.record_prefix, str(tmp_path / "c")
    width = 5 * 4 + 3 * 2

    def where(i: int, v: int) -> str:
        return f"record (index={i}, view={v}) of cache {path!r}"

    nan_row = np.zeros(5, np.float32)
    nan_row[2] = math.nan
    nan_feature = np.zeros(3, np.float16)
    nan_feature[1] = np.inf
    fine = np.zeros(5, np.float32).tobytes() + np.zeros(3, np.float16).tobytes()
    edits: dict[bytes, tuple[bytes, str]] = {}  # key -> (value, its problem)
    crc, short, header, nan, nan_f = kept[3], kept[6], kept[7], kept[13], kept[14]
    with lmdb.open(path, subdir=True, readonly=True, lock=False) as env, env.begin() as txn:
        v = bytearray(txn.get(record_key(prefix, *crc)))
        v[6] ^= 0x40
        edits[record_key(prefix, *crc)] = (
            bytes(v),
            f"{where(*crc)} fails its checksum: the stored targets are corrupted",
        )
        v = txn.get(record_key(prefix, *short))
        edits[record_key(prefix, *short)] = (v[:-2], f"{where(*short)} has {len(v) - 2} bytes, expected {len(v)}")
    k, other = record_key(prefix, *header), b"KX\x01\x00"
    edits[k] = (sealed(k, fine, other), f"{where(*header)} has an unknown header {other!r}")
    k = record_key(prefix, *nan)
    edits[k] = (sealed(k, nan_row.tobytes() + bytes(6)), f"record (index={nan[0]}, view={nan[1]}) decodes to NaN/Inf")
    k = record_key(prefix, *nan_f)
    edits[k] = (sealed(k, bytes(20) + nan_feature.tobytes()), f"record (index={nan_f[0]}, view={nan_f[1]}) decodes "
                "to NaN/Inf")  # fmt: skip
    outside = [(40 + si, 0), (si, 2)] + ([(si + 1, 0)] if sc > 1 else [])  # past the end, view 2, another shard
    for i, v in outside:
        k = record_key(prefix, i, v)
        edits[k] = (sealed(k, fine), f"record (index={i}, view={v}) is outside the dataset")
    for k in (b"q-before", prefix + b"\x00short", b"z-after"):
        edits[k] = (b"x", f"foreign key {k[:40]!r}")
    edit(tmp_path / "c", lambda txn: [txn.put(k, v) for k, (v, _) in edits.items()])
    assert len(fine) == width

    report = CacheReader(tmp_path / "c").verify()
    assert report.problems == [why for _, (_, why) in sorted(edits.items())]
    bad = {crc, short, header, nan, nan_f}
    assert report.missing == sorted(gone | bad)
    assert report.present == len(kept) - len(bad) and report.expected == len(owned) and not report.ok


def test_verify_memory_does_not_grow_with_the_record_count(tmp_path: Path) -> None:
    """verify held every expected (index, view) in a list and every good one in a set (+251 MB at
    10^6 records); its Python and numpy allocations now stay within a batch (and the missing list)."""
    peaks = {}
    for n in (8_000, 64_000):
        m = CacheMeta("fp-A", "ds", n, "fp16", 4)
        with CacheWriter(tmp_path / str(n), m, commit_every=65536) as w:
            w.put(range(n), torch.randn(n, 4, generator=torch.Generator().manual_seed(0)))
        reader = CacheReader(tmp_path / str(n))
        tracemalloc.start()
        try:
            report = reader.verify()
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert report.ok and report.present == n
    # the per-record walk peaked 11.7 MB higher at 64k records than at 8k; in batches of 4096: +68 kB
    assert peaks[64_000] - peaks[8_000] < 1_000_000, peaks
