"""The cache commands at millions of records, on real LMDB caches in tmp_path: ``verify`` finds every
defect it found record by record, in batches and without a set of all keys; ``export`` writes the npz
in chunks (the same bytes as one ``np.savez``); ``len()`` and ``kd cache info`` read counts without
walking every key."""

from __future__ import annotations

import json
import math
import re
import struct
import subprocess
import sys
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from cli_checks import refused
from test_cache import tamper
from typer.testing import CliRunner

from kd.cache import CacheMeta, CacheReader, CacheWriter, CorruptRecordError, store
from kd.cache.store import record_key

ROOT = Path(__file__).resolve().parents[1]
HEADER = b"KD\x01\x00"


def sealed(key: bytes, payload: bytes, header: bytes = HEADER) -> bytes:
    """A record value written by hand: header + payload + crc32 over key and both, little-endian."""
    body = header + payload
    return body + zlib.crc32(body, zlib.crc32(key)).to_bytes(4, "little")


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
    tamper(tmp_path / "c", lambda txn: [txn.put(k, v) for k, (v, _) in edits.items()])
    assert len(fine) == width

    report = CacheReader(tmp_path / "c").verify()
    assert report.problems == [why for _, (_, why) in sorted(edits.items())]
    bad = {crc, short, header, nan, nan_f}
    assert report.missing == sorted(gone)  # a corrupt record is stored: not missing as well
    assert report.present == len(kept) - len(bad) and report.corrupt == len(bad) and not report.ok
    assert report.present + report.corrupt + len(report.missing) == report.expected == len(owned)


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


# ---------------------------------------------------------------------------------------------- export


def savez_reference(reader, out: Path) -> None:
    """What `kd cache export` wrote before it was chunked: every record read at once, one np.savez."""
    from kd.core.targets import SparseTargets

    keys = sorted(reader.keys())
    idx, views = [i for i, _ in keys], [v for _, v in keys]
    t = reader.targets(idx, views)
    arrays = {"index": np.asarray(idx, dtype=np.int64), "view": np.asarray(views, dtype=np.int64)}
    if isinstance(t, SparseTargets) and t.kind == "sample":
        arrays.update(class_index=t.indices.numpy(), counts=t.counts.numpy())
    elif isinstance(t, SparseTargets):
        arrays.update(class_index=t.indices.numpy(), logits=t.logits.numpy(), logsumexp=t.logsumexp.numpy())
    else:
        arrays["logits"] = t.numpy()
    np.savez(out, meta=np.asarray(json.dumps(dict(vars(reader.meta)))), **arrays)


def without_times(path: Path) -> bytes:
    """The file's bytes with the zip's member dates and times (np.savez takes them from the clock) zeroed."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        infos, start = zf.infolist(), zf.start_dir
    for info in infos:
        assert data[info.header_offset : info.header_offset + 4] == b"PK\x03\x04"
        data[info.header_offset + 10 : info.header_offset + 14] = bytes(4)
    at = start
    for _ in infos:
        assert data[at : at + 4] == b"PK\x01\x02"
        data[at + 12 : at + 16] = bytes(4)
        n, m, k = struct.unpack_from("<HHH", data, at + 28)
        at += 46 + n + m + k
    return bytes(data)


@pytest.mark.parametrize("codec", ["fp32", "fp16", "topk:3", "sample:4", "rand:4"])
def test_export_in_chunks_writes_the_bytes_of_one_savez(tmp_path: Path, codec: str) -> None:
    """The chunked export (chunks of 7 records, and the CLI's default) against one np.savez of all
    records: the same file but for the zip's timestamps, for dense and sparse codecs, views, a cache
    in 3 shards (merged in key order) and an empty cache."""
    from kd.cache.export import export_npz
    from kd.cache.sharded import open_cache, shard_dir
    from kd.cli import app

    g = torch.Generator().manual_seed(1)
    z = torch.randn(50, 2, 12, generator=g) * 3
    gone = {(4, 1), (17, 0), (30, 0), (30, 1)}
    caches = {"one": [tmp_path / "one"], "sharded": [shard_dir(tmp_path / "sharded", s, 3) for s in range(3)],
              "empty": [tmp_path / "empty"]}  # fmt: skip
    for name, paths in caches.items():
        for s, path in enumerate(paths):
            m = CacheMeta("fp-A", "ds", 50, codec, 12, views=2, augmentation="aug", temperature=2.0,
                          shard_index=s, shard_count=len(paths))  # fmt: skip
            keys = [(i, v) for i in range(s, 50, len(paths)) for v in range(2) if (i, v) not in gone]
            with CacheWriter(path, m, commit_every=16) as w:
                if name != "empty":
                    w.put(
                        [i for i, _ in keys], z[[i for i, _ in keys], [v for _, v in keys]], views=[v for _, v in keys]
                    )
    for name in caches:
        reader = open_cache(tmp_path / name)
        savez_reference(reader, tmp_path / f"{name}-ref.npz")
        want = without_times(tmp_path / f"{name}-ref.npz")
        assert export_npz(reader, tmp_path / f"{name}-7.npz", chunk=7) == {"one": 96, "sharded": 96, "empty": 0}[name]
        assert without_times(tmp_path / f"{name}-7.npz") == want, name
        r = CliRunner().invoke(app, ["cache", "export", str(tmp_path / name), "--out", str(tmp_path / f"{name}-cli")])
        assert r.exit_code == 0, r.output
        assert without_times(tmp_path / f"{name}-cli.npz") == want, name
    with np.load(tmp_path / "sharded-7.npz") as f:  # what the bytes hold: every record once, in key order
        assert f["index"].tolist() == sorted(i for i in range(50) for v in range(2) if (i, v) not in gone)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_a_failed_export_leaves_nothing_behind(tmp_path: Path) -> None:
    """A record that fails its checksum in the second chunk: the export is refused (exit 2, the record
    named) and neither the output nor a temporary file is left, as when it was read all at once."""
    from kd.cache.export import export_npz
    from kd.cli import app

    m = CacheMeta("fp-A", "ds", 40, "fp32", 5)
    with CacheWriter(tmp_path / "c", m) as w:
        w.put(range(40), torch.randn(40, 5, generator=torch.Generator().manual_seed(0)))
    key = record_key(m.record_prefix, 37)

    def flip(txn) -> None:
        v = bytearray(txn.get(key))
        v[5] ^= 1
        txn.put(key, bytes(v))

    tamper(tmp_path / "c", flip)
    (tmp_path / "out").mkdir()
    with pytest.raises(CorruptRecordError, match=r"record \(index=37, view=0\) .* fails its checksum"):
        export_npz(CacheReader(tmp_path / "c"), tmp_path / "out" / "x.npz", chunk=8)  # chunks 1-4 were written
    assert list((tmp_path / "out").iterdir()) == []
    r = CliRunner().invoke(app, ["cache", "export", str(tmp_path / "c"), "--out", str(tmp_path / "out" / "x.npz")])
    refused(r, "record (index=37, view=0)", "fails its checksum")
    assert list((tmp_path / "out").iterdir()) == []


_EXPORT_PEAK = """
import re, runpy, sys
from kd.cache.sharded import open_cache

def status(field):
    return int(re.search(rf"{field}:\\s+(\\d+) kB", open("/proc/self/status").read())[1])

# The cache's file pages the export maps (counted in RSS once touched) and the B-tree check at open
# (its own transient peak) come before the mark; then the peak (VmHWM) is reset to the RSS now.
assert sum(1 for _ in open_cache(sys.argv[1]).keys()) > 0
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
sys.argv = ["kd", "cache", "export", sys.argv[1], "--out", sys.argv[2]]
try:
    runpy.run_module("kd", run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
print(f"peak growth KiB: {status('VmHWM') - before}", file=sys.stderr)
"""


def test_export_peak_memory_does_not_grow_with_the_record_count(tmp_path: Path) -> None:
    """`kd cache export` held every key, index, value and decoded row at once (782 MB peak for a 56 MB
    npz at 10^6 records); now a chunk. Its peak RSS above the mapped cache, in a fresh process, at
    40k and 200k records."""
    growth = {}
    for n in (40_000, 200_000):
        m = CacheMeta("fp-A", "ds", n, "fp32", 10)
        with CacheWriter(tmp_path / f"c{n}", m, commit_every=65536) as w:
            w.put(range(n), torch.randn(n, 10, generator=torch.Generator().manual_seed(0)))
        proc = subprocess.run([sys.executable, "-c", _EXPORT_PEAK, str(tmp_path / f"c{n}"), str(tmp_path / f"{n}.npz")],
                              capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        growth[n] = int(re.search(r"peak growth KiB: (\d+)", proc.stderr)[1])
        with np.load(tmp_path / f"{n}.npz") as f:
            assert f["logits"].shape == (n, 10)
    # all at once: 69 MB more at 200k records than at 40k; in chunks of 16384: within 1 MB
    assert growth[200_000] - growth[40_000] < 8 * 1024, growth


# ------------------------------------------------------------------------------------- len and info


def test_len_counts_records_exactly_beside_metadata_basis_and_foreign_keys(tmp_path: Path) -> None:
    """len() from LMDB's entry count: the metadata, a pca:K basis and keys of other caches or tools
    (before and after this cache's key range) are not records; shards add up; no record is 0."""
    from kd.cache.codecs import LowRankBasis
    from kd.cache.sharded import open_cache, shard_dir

    g = torch.Generator().manual_seed(2)
    z = torch.randn(30, 8, generator=g) * 3
    m = CacheMeta("fp-A", "ds", 15, "fp32", 8, views=2, augmentation="aug")
    keep = [(i, v) for i in range(15) for v in range(2) if (i + v) % 4]
    other = CacheMeta("fp-B", "ds", 15, "fp32", 8).record_prefix  # another teacher's records
    foreign = [b"\x00zz", b"a-tool", other + bytes(12), b"r", b"z-after", b"\xff" * 30]
    assert sum(1 for k in foreign if k < m.record_prefix) >= 3 and sum(1 for k in foreign if k > m.record_prefix) >= 2
    for name in ("c", "f"):
        with CacheWriter(tmp_path / name, m) as w:
            w.put([i for i, _ in keep], z[: len(keep)], views=[v for _, v in keep])
    tamper(tmp_path / "f", lambda txn: [txn.put(k, b"x") for k in foreign])
    assert len(CacheReader(tmp_path / "c")) == len(CacheReader(tmp_path / "f")) == len(keep) == 23

    p = CacheMeta("fp-A", "ds", 30, "pca:4", 8)
    basis = LowRankBasis.fit(z.double(), 4).to_bytes()
    with CacheWriter(tmp_path / "pca", p, basis=basis) as w:
        w.put(range(0, 30, 3), z[:10])
    assert len(CacheReader(tmp_path / "pca")) == 10
    with CacheWriter(tmp_path / "empty", CacheMeta("fp-A", "ds", 5, "fp32", 8)):
        pass
    assert len(CacheReader(tmp_path / "empty")) == 0
    for s in range(3):
        with CacheWriter(shard_dir(tmp_path / "s", s, 3), CacheMeta("fp-A", "ds", 30, "fp16", 8, shard_index=s,
                                                                     shard_count=3)) as w:  # fmt: skip
            w.put(range(s, 30 - 3 * s, 3), z[: len(range(s, 30 - 3 * s, 3))])
    assert len(open_cache(tmp_path / "s")) == 10 + 9 + 8


def test_cache_info_samples_the_first_records_in_key_order(tmp_path: Path) -> None:
    """`kd cache info` on a topk cache in 3 shards with more than 1024 records: its covered mass is
    that of the first 1024 (index, view) in sorted order (the shards merged), computed here in float64."""
    from kd.cache.codecs import get_codec
    from kd.cache.sharded import shard_dir
    from kd.cli import app

    g = torch.Generator().manual_seed(3)
    n, c, t = 700, 20, 2.0
    z = torch.randn(n, 2, c, generator=g) * 4
    for s in range(3):
        m = CacheMeta("fp-A", "ds", n, "topk:3", c, views=2, augmentation="aug", temperature=t, shard_index=s,
                      shard_count=3)  # fmt: skip
        idx = [i for i in range(s, n, 3) for _ in range(2)]
        with CacheWriter(shard_dir(tmp_path / "s", s, 3), m) as w:
            w.put(
                idx,
                z[idx, [v for _ in range(s, n, 3) for v in range(2)]],
                views=[v for _ in idx[::2] for v in range(2)],
            )
    r = CliRunner().invoke(app, ["cache", "info", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    first = sorted((i, v) for i in range(n) for v in range(2))[:1024]
    codec = get_codec("topk:3", t)
    p = torch.softmax(torch.stack([z[i, v] for i, v in first]).double() / t, 1)
    stored = codec.decode_targets(codec.encode(torch.stack([z[i, v] for i, v in first])), c).indices
    mass = p.gather(1, stored).sum(1)
    assert info["records"] == 2 * n and info["covered_mass"]["records"] == 1024
    assert info["covered_mass"]["mean"] == round(float(mass.mean()), 6)
    assert info["covered_mass"]["min"] == round(float(mass.min()), 6)
