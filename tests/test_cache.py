"""The soft-label cache on a real LMDB in tmp_path: codecs, metadata checks,
checksums, missing records, resume, map growth, readers across processes and
the ``kd cache`` commands."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import pickle
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch

from kd.cache import CacheError, CacheMeta, CacheReader, CacheWriter, CorruptRecordError, StaleCacheError, get_codec
from kd.cache.codecs import RECORD_OVERHEAD, bytes_per_sample
from kd.cache.store import MissingRecordError, record_key

ROOT = Path(__file__).resolve().parents[1]
F32_EPS = float(np.finfo(np.float32).eps)


def make_meta(**overrides: object) -> CacheMeta:
    fields: dict[str, object] = {
        "teacher_fingerprint": "sha256:teacher-A",
        "dataset_id": "digits/train",
        "dataset_size": 10,
        "codec": "fp32",
        "num_classes": 7,
        "teacher": "digits",
    }
    fields.update(overrides)
    return CacheMeta(**fields)  # type: ignore[arg-type]


def random_logits(n: int, c: int, *, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * scale


def build(path: Path, meta: CacheMeta, logits: torch.Tensor, indices: list[int] | None = None) -> None:
    """Write ``logits[i]`` for each i in ``indices`` (default: all of them) and close."""
    idx = list(range(meta.dataset_size)) if indices is None else indices
    with CacheWriter(path, meta, commit_every=4) as w:
        w.put(idx, logits[idx])


def tamper(path: Path, edit) -> None:
    """Open the closed cache with lmdb directly and apply ``edit(txn)`` in one write transaction."""
    env = lmdb.open(str(path), subdir=True)
    try:
        with env.begin(write=True) as txn:
            edit(txn)
    finally:
        env.close()


def run_forked(target, *args: object, timeout: float = 60) -> None:
    """Run ``target(*args)`` in a forked child and require a clean exit."""
    proc = multiprocessing.get_context("fork").Process(target=target, args=args, daemon=True)
    proc.start()
    proc.join(timeout)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        pytest.fail(f"{target.__name__} did not finish in {timeout} s")
    assert proc.exitcode == 0


def run_kd(*commands: list[str]) -> list[tuple[int, str, str]]:
    """Run ``python -m kd ARGS`` for each command, concurrently; (returncode, stdout, stderr) each."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "kd", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for args in commands
    ]
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        results.append((proc.returncode, out, err))
    return results


# --------------------------------------------------------------------------- codecs


@pytest.mark.parametrize("codec", ["fp32", "fp16", "bf16", "int8"])
def test_dense_codec_round_trip_through_the_store(tmp_path: Path, codec: str) -> None:
    n, c = 12, 33
    z = random_logits(n, c, seed=1)
    z[3] += 1000.0  # far from zero: int8 must keep the offset, fp16/bf16 lose relative precision only
    z[4] = 2.5  # constant row: int8 scale collapses to ~0 and must still decode exactly
    z[5] *= 1e-3  # tiny values
    meta = make_meta(codec=codec, num_classes=c, dataset_size=n)
    build(tmp_path / "c", meta, z)

    reader = CacheReader(tmp_path / "c", codec=codec)
    got = reader.get(range(n))
    assert got.dtype == torch.float32 and got.shape == (n, c)
    assert reader.read_raw([0]).shape == (1, reader.record_bytes)
    err = (got - z).abs()

    if codec == "fp32":
        assert torch.equal(got, z)
    elif codec == "fp16":
        # Round-to-nearest to an 11-bit significand: relative error <= 2^-11 (2^-25 absolute for subnormals).
        assert torch.equal(got, z.half().float())
        assert (err <= torch.clamp(z.abs() * 2.0**-11, min=2.0**-25)).all()
        assert err[3].max() > 0  # 1000 + x really was rounded
    elif codec == "bf16":
        # 8-bit significand: relative error <= 2^-8.
        assert torch.equal(got, z.bfloat16().float())
        assert (err <= z.abs() * 2.0**-8 + 1e-30).all()
        assert err[3].max() > 0.5  # bf16 spacing near 1000 is 4
    else:
        lo = z.min(dim=1, keepdim=True).values
        hi = z.max(dim=1, keepdim=True).values
        scale = (hi - lo) / 255.0
        # Quantisation error is at most half a step; allow a few float32 roundings on the row's magnitude.
        bound = scale / 2 + 8 * F32_EPS * (lo.abs() + hi.abs())
        assert (err <= bound).all(), (err - bound).max()
        assert torch.equal(got[4], z[4])  # constant row is exact
        assert torch.allclose(got.min(dim=1).values, lo.squeeze(1), rtol=0, atol=1e-4)
        # The bound is not vacuous: 256 levels over ~20 units cannot be exact everywhere.
        assert (err[0].max() > scale[0] / 10).item()


def test_topk_keeps_top_classes_and_spreads_the_tail_evenly(tmp_path: Path) -> None:
    n, c, k = 16, 50, 5
    z = random_logits(n, c, seed=2, scale=2.0)
    meta = make_meta(codec=f"topk:{k}", num_classes=c, dataset_size=n)
    build(tmp_path / "c", meta, z)
    reader = CacheReader(tmp_path / "c")

    ref_vals, ref_idx = z.topk(k, dim=1)
    ref_logp = torch.log_softmax(z.double(), dim=1).gather(1, ref_idx)
    values, indices, lse = reader.codec.decode_sparse(reader.read_raw(range(n)), c)
    assert torch.equal(indices, ref_idx)
    # Codec version 3: log p at T_c = 1 (fp16, <= 2^-11 |log p|; rescaled with the stored rest by at most
    # the largest of those) with logsumexp 0, plus fp32 rounding of the parts.
    log_tol = ref_logp.abs() * 2.0**-11 + (ref_logp.abs() * 2.0**-11).amax(1, keepdim=True) + 1e-5
    assert bool(((values.double() - lse.double()[:, None] - ref_logp).abs() <= log_tol).all())
    assert not lse.any()

    dense = reader.get(range(n))
    assert dense.shape == (n, c)
    assert torch.equal(dense.gather(1, ref_idx), values)
    assert torch.equal(dense.argmax(dim=1), z.argmax(dim=1))

    p = torch.softmax(z, dim=1)
    p_dec = torch.softmax(dense, dim=1)
    assert torch.allclose(p_dec.sum(dim=1), torch.ones(n), atol=1e-5)

    # Top-K probabilities: off by at most the log-probability bound above.
    p_top = p.gather(1, ref_idx)
    p_dec_top = p_dec.gather(1, ref_idx)
    tol_top = p_top * torch.expm1(log_tol.float())
    assert ((p_dec_top - p_top).abs() <= tol_top).all()

    # Tail: every other class gets (1 - sum(top-K probs)) / (C - K).
    tail_mask = torch.ones(n, c, dtype=torch.bool).scatter_(1, ref_idx, False)
    p_dec_tail = p_dec[tail_mask].view(n, c - k)
    expected_each = (1.0 - p_top.sum(dim=1)) / (c - k)
    tol_each = (tol_top.sum(dim=1) + 1e-6) / (c - k)
    assert ((p_dec_tail - expected_each[:, None]).abs() <= tol_each[:, None]).all()
    assert (p_dec_tail.max(dim=1).values - p_dec_tail.min(dim=1).values <= 1e-6 * expected_each).all()
    # ... and that mass is real (the test would not notice a dropped tail otherwise).
    assert (expected_each * (c - k) > 0.05).all()


def test_topk_edge_cases() -> None:
    # K == C: nothing in the tail, the dense decode is the log-probabilities themselves (fp16, then
    # rescaled to sum to 1: within twice fp16's relative step of |log p|).
    z = random_logits(4, 6, seed=3)
    codec = get_codec("topk:6")
    dense = codec.decode(codec.encode(z), 6)
    ref = torch.log_softmax(z.double(), dim=1)
    assert bool(((dense.double() - ref).abs() <= 2 * 2.0**-11 * ref.abs().amax(1, keepdim=True) + 1e-6).all())
    assert float(dense.double().exp().sum(1).sub(1).abs().max()) < 1e-6
    # K > C is refused, for the codec and for a writer.
    with pytest.raises(ValueError, match="topk:7 needs at least 7 classes"):
        get_codec("topk:7").record_bytes(6)
    for bad in ("topk:0", "topk:x", "topk:-3", "fp8"):
        with pytest.raises(ValueError, match="codec"):
            get_codec(bad)


@pytest.mark.parametrize("c", [10, 1000])
def test_dense_record_sizes(c: int) -> None:
    assert get_codec("fp32").record_bytes(c) == 4 * c
    assert get_codec("fp16").record_bytes(c) == 2 * c
    assert get_codec("bf16").record_bytes(c) == 2 * c
    assert get_codec("int8").record_bytes(c) == c + 8
    z = random_logits(3, c, seed=4)
    for name in ("fp32", "fp16", "bf16", "int8"):
        codec = get_codec(name)
        raw = codec.encode(z)
        assert raw.dtype == np.uint8 and raw.shape == (3, codec.record_bytes(c))
        assert bytes_per_sample(name, c) == codec.record_bytes(c) + RECORD_OVERHEAD


@pytest.mark.parametrize(
    ("c", "index_bytes"), [(256, 1), (257, 2), (65536, 2), (65537, 4)], ids=["256", "257", "65536", "65537"]
)
def test_topk_index_width_switches_at_256_and_65536_classes(c: int, index_bytes: int) -> None:
    k = 3
    codec = get_codec(f"topk:{k}")
    assert codec.record_bytes(c) == 2 * k + index_bytes * k + 4
    # The highest class index must survive: a too-narrow index type would wrap it.
    z = torch.zeros(2, c)
    z[0, c - 1], z[0, c - 2], z[0, 0] = 9.0, 8.0, 7.0
    z[1, 1], z[1, c // 2], z[1, c - 1] = 5.0, 4.0, 3.0
    raw = codec.encode(z)
    assert raw.shape == (2, codec.record_bytes(c))
    _, indices, _ = codec.decode_sparse(raw, c)
    assert indices.tolist() == [[c - 1, c - 2, 0], [1, c // 2, c - 1]]
    dense = codec.decode(raw, c)  # log p (codec version 3): the logits up to a constant per row
    ref = torch.log_softmax(z.double(), dim=1)
    for r, j in ((0, c - 1), (0, c - 2), (1, c // 2)):
        assert abs(float(dense[r, j]) - float(ref[r, j])) <= 2 * 2.0**-11 * abs(float(ref[r, j])) + 1e-5


# --------------------------------------------------------------------------- metadata


def test_reader_refuses_other_teacher_or_dataset(tmp_path: Path) -> None:
    meta = make_meta()
    build(tmp_path / "c", meta, random_logits(10, 7, seed=5))

    with pytest.raises(StaleCacheError, match="teacher_fingerprint") as e:
        CacheReader(tmp_path / "c", teacher_fingerprint="sha256:teacher-B")
    assert "sha256:teacher-A" in str(e.value) and "sha256:teacher-B" in str(e.value)
    with pytest.raises(StaleCacheError, match="dataset_id"):
        CacheReader(tmp_path / "c", dataset_id="digits/test")
    with pytest.raises(StaleCacheError, match="codec"):
        CacheReader(tmp_path / "c", codec="fp16")
    with pytest.raises(TypeError, match="unknown cache fields"):
        CacheReader(tmp_path / "c", colour="blue")
    # Matching expectations open fine.
    reader = CacheReader(
        tmp_path / "c", teacher_fingerprint="sha256:teacher-A", dataset_id="digits/train", codec="fp32"
    )
    assert reader.meta == meta


@pytest.mark.parametrize(
    ("field", "value"),
    [("codec", "fp16"), ("teacher_fingerprint", "sha256:teacher-B"), ("num_classes", 8), ("dataset_size", 11)],
)
def test_writer_reopened_with_other_identity_is_stale(tmp_path: Path, field: str, value: object) -> None:
    meta = make_meta()
    z = random_logits(10, 7, seed=6)
    build(tmp_path / "c", meta, z)
    with pytest.raises(StaleCacheError, match=field):
        CacheWriter(tmp_path / "c", make_meta(**{field: value}))
    # The refused writer changed nothing.
    reader = CacheReader(tmp_path / "c")
    assert reader.meta == meta
    assert torch.equal(reader.get(range(10)), z)


def test_missing_cache_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="no data.mdb"):
        CacheReader(tmp_path / "nothing-here")


# --------------------------------------------------------------------------- checksums


def _flip(pos: int):
    def edit(value: bytes) -> bytes:
        b = bytearray(value)
        b[pos] ^= 0x01
        return bytes(b)

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_flip(0), "fails its checksum"),  # header
        (_flip(4 + 9), "fails its checksum"),  # payload
        (_flip(-1), "fails its checksum"),  # crc itself
        (lambda v: v[:-1], "has 35 bytes, expected 36"),  # truncated
    ],
    ids=["header", "payload", "crc", "truncated"],
)
def test_corrupted_record_is_caught_by_index(tmp_path: Path, edit, message: str) -> None:
    meta = make_meta()
    z = random_logits(10, 7, seed=7)
    build(tmp_path / "c", meta, z)
    key3 = record_key(meta.record_prefix, 3)

    def corrupt(txn: lmdb.Transaction) -> None:
        value = txn.get(key3)
        assert len(value) == 4 * 7 + RECORD_OVERHEAD == bytes_per_sample("fp32", 7)
        txn.put(key3, edit(value))

    tamper(tmp_path / "c", corrupt)

    reader = CacheReader(tmp_path / "c")
    with pytest.raises(CorruptRecordError, match=message) as e:
        reader.get([3])
    assert "index=3" in str(e.value)
    with pytest.raises(CorruptRecordError, match="index=3"):
        reader.get([2, 3, 4])
    others = [i for i in range(10) if i != 3]
    assert torch.equal(reader.get(others), z[others])

    report = reader.verify()
    assert not report.ok
    assert len(report.problems) == 1 and "index=3" in report.problems[0] and message in report.problems[0]
    # counted once, as corrupt: not also missing (verify reported it both ways), and the totals add up
    assert report.present == 9 and report.corrupt == 1 and report.missing == []


def test_value_moved_under_another_key_fails_the_checksum(tmp_path: Path) -> None:
    meta = make_meta()
    z = random_logits(10, 7, seed=8)
    build(tmp_path / "c", meta, z)
    key3, key4 = record_key(meta.record_prefix, 3), record_key(meta.record_prefix, 4)
    tamper(tmp_path / "c", lambda txn: txn.put(key4, txn.get(key3)))

    reader = CacheReader(tmp_path / "c")
    with pytest.raises(CorruptRecordError, match="fails its checksum") as e:
        reader.get([4])
    assert "index=4" in str(e.value)
    assert torch.equal(reader.get([3]), z[[3]])
    report = reader.verify()
    assert len(report.problems) == 1 and "index=4" in report.problems[0]
    assert report.missing == [] and report.corrupt == 1 and report.present == 9


def test_a_sharded_cache_counts_a_corrupt_record_once(tmp_path: Path) -> None:
    """Two shards, one record of shard 1 corrupt and one of shard 0 absent: the report over the shards
    sums each shard's counts, the corrupt one counted as corrupt and not also as missing."""
    from kd.cache.sharded import open_cache, shard_dir

    z = random_logits(10, 7, seed=21)
    for si in range(2):
        meta = make_meta(shard_index=si, shard_count=2)
        owned = [i for i in range(si, 10, 2) if i != 4]  # 4 (shard 0) is never written
        with CacheWriter(shard_dir(tmp_path / "c", si, 2), meta) as w:
            w.put(owned, z[owned])
    key = record_key(make_meta(shard_index=1, shard_count=2).record_prefix, 7)
    tamper(shard_dir(tmp_path / "c", 1, 2), lambda txn: txn.put(key, _flip(10)(txn.get(key))))
    report = open_cache(tmp_path / "c").verify()
    assert (report.present, report.corrupt, report.missing, report.expected) == (8, 1, [(4, 0)], 10)
    assert len(report.problems) == 1 and "index=7" in report.problems[0]


# --------------------------------------------------------------------------- missing records


def test_missing_record_is_a_key_error_naming_the_index(tmp_path: Path) -> None:
    meta = make_meta(views=2)
    z = random_logits(20, 7, seed=9)
    pairs = [(i, v) for i in range(10) for v in range(2) if (i, v) not in {(5, 1), (7, 0)}]
    with CacheWriter(tmp_path / "c", meta) as w:
        w.put([i for i, _ in pairs], z[[2 * i + v for i, v in pairs]], views=[v for _, v in pairs])

    reader = CacheReader(tmp_path / "c")
    with pytest.raises(MissingRecordError, match=r"index=7, view=0"):
        reader.get([7])
    with pytest.raises(KeyError) as e:
        reader.get([5, 5], views=[0, 1])
    assert "index=5, view=1" in str(e.value)
    assert torch.equal(reader.get([5], views=[0]), z[[10]])
    assert torch.equal(reader.get(torch.tensor([7, 6]), views=torch.tensor([1, 0])), z[[15, 12]])

    report = reader.verify()
    assert report.missing == [(5, 1), (7, 0)]
    assert report.problems == [] and report.present == 18 and report.expected == 20 and not report.ok
    assert report.corrupt == 0
    assert len(reader) == 18


# --------------------------------------------------------------------------- resume


def test_resume_writes_only_the_rest(tmp_path: Path) -> None:
    meta = make_meta(dataset_size=15, views=2)
    z = random_logits(30, 7, seed=10)
    order = [(i, v) for i in range(15) for v in range(2)]
    first, rest = order[::2] + order[1:6:2], order[7::2]
    assert sorted(first + rest) == order

    def write(pairs: list[tuple[int, int]]) -> CacheWriter:
        w = CacheWriter(tmp_path / "c", meta, commit_every=4)
        for s in range(0, len(pairs), 3):
            chunk = pairs[s : s + 3]
            w.put([i for i, _ in chunk], z[[2 * i + v for i, v in chunk]], views=[v for _, v in chunk])
        w.close()
        return w

    w1 = write(first)
    assert w1.committed == len(first)
    with CacheWriter(tmp_path / "c", meta) as w:
        assert w.present() == set(first)
    w2 = write(rest)
    assert w2.committed == len(rest)

    reader = CacheReader(tmp_path / "c")
    assert list(reader.keys()) == order  # each exactly once, in (index, view) order
    report = reader.verify()
    assert report.ok and report.present == 30
    assert torch.equal(reader.get([i for i, _ in order], views=[v for _, v in order]), z)


def _killed_writer(path: Path, meta: CacheMeta, z: torch.Tensor) -> None:
    torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork (as in DataLoader workers)
    w = CacheWriter(path, meta, commit_every=8)
    for s in range(0, 20, 4):
        w.put(range(s, s + 4), z[s : s + 4])
    os._exit(0)  # no flush, no close: the last 4 records were never committed


def test_killed_writer_keeps_committed_batches_and_resumes(tmp_path: Path) -> None:
    meta = make_meta(dataset_size=20)
    z = random_logits(20, 7, seed=11)
    run_forked(_killed_writer, tmp_path / "c", meta, z)

    with CacheWriter(tmp_path / "c", meta) as w:
        present = w.present()
        assert present == {(i, 0) for i in range(16)}
        todo = [i for i in range(20) if (i, 0) not in present]
        w.put(todo, z[todo])
    reader = CacheReader(tmp_path / "c")
    assert reader.verify().ok
    assert torch.equal(reader.get(range(20)), z)


def test_pending_records_are_invisible_until_flushed(tmp_path: Path) -> None:
    meta = make_meta()
    z = random_logits(10, 7, seed=12)
    w = CacheWriter(tmp_path / "c", meta, commit_every=100)
    w.put(range(5), z[:5])
    assert w.present() == set() and w.committed == 0
    w.flush()
    assert w.present() == {(i, 0) for i in range(5)} and w.committed == 5
    w.close()


# --------------------------------------------------------------------------- map growth


def test_writer_grows_the_map_past_64_mib(tmp_path: Path) -> None:
    n, c = 20000, 1000
    meta = make_meta(dataset_size=n, num_classes=c)
    z = random_logits(n, c, seed=13)
    assert n * bytes_per_sample("fp32", c) > 64 << 20  # the data really exceeds the initial map
    with CacheWriter(tmp_path / "c", meta) as w:
        for s in range(0, n, 2500):
            w.put(range(s, s + 2500), z[s : s + 2500])
    assert (tmp_path / "c" / "data.mdb").stat().st_size > 64 << 20

    reader = CacheReader(tmp_path / "c")
    assert len(reader) == n
    assert torch.equal(reader.get(range(n)), z)


def _grow_in_child(path: Path, meta: CacheMeta, z: torch.Tensor) -> None:
    torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork (as in DataLoader workers)
    with CacheWriter(path, meta) as w:  # resumes; grows the map in this process
        for s in range(10, z.shape[0], 2000):
            w.put(range(s, min(s + 2000, z.shape[0])), z[s : s + 2000])


def test_reader_follows_a_map_grown_by_another_process(tmp_path: Path) -> None:
    n, c = 18000, 1000
    meta = make_meta(dataset_size=n, num_classes=c)
    z = random_logits(n, c, seed=14)
    build(tmp_path / "c", meta, z, indices=list(range(10)))
    early = CacheReader(tmp_path / "c")  # maps the 64 MiB environment in this process
    assert torch.equal(early.get(range(10)), z[:10])

    run_forked(_grow_in_child, tmp_path / "c", meta, z)
    assert (tmp_path / "c" / "data.mdb").stat().st_size > 64 << 20

    late = CacheReader(tmp_path / "c")  # opening on the stale mapping must adopt the new size
    assert late.meta == meta
    assert torch.equal(early.get([0, n // 2, n - 1]), z[[0, n // 2, n - 1]])
    assert torch.equal(late.get(range(n)), z)


# --------------------------------------------------------------------------- concurrency


class CachedTargets(torch.utils.data.Dataset):
    """Reads its targets from a CacheReader inside whichever process calls it."""

    def __init__(self, reader: CacheReader, n: int) -> None:
        self.reader = reader
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, int]:
        return i, self.reader.get([i])[0], os.getpid()


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_read_the_cache(tmp_path: Path, context: str) -> None:
    n = 24
    meta = make_meta(dataset_size=n, codec="fp16")
    z = random_logits(n, 7, seed=15)
    build(tmp_path / "c", meta, z)
    reader = CacheReader(tmp_path / "c", teacher_fingerprint=meta.teacher_fingerprint)
    expected = z.half().float()
    assert torch.equal(reader.get(range(n)), expected)  # the parent holds an open handle when workers start
    assert torch.equal(pickle.loads(pickle.dumps(reader)).get([5]), expected[[5]])

    loader = torch.utils.data.DataLoader(
        CachedTargets(reader, n), batch_size=4, shuffle=False, num_workers=2, multiprocessing_context=context
    )
    seen: list[int] = []
    pids: set[int] = set()
    for idx, targets, pid in loader:
        assert torch.equal(targets, expected[idx])
        seen += idx.tolist()
        pids.update(pid.tolist())
    assert sorted(seen) == list(range(n))
    assert len(pids) == 2 and os.getpid() not in pids
    assert torch.equal(reader.get(range(n)), expected)  # the parent's handle survived the workers


def test_reader_alongside_an_open_writer_in_one_process(tmp_path: Path) -> None:
    meta = make_meta(dataset_size=12)
    z = random_logits(12, 7, seed=16)
    w = CacheWriter(tmp_path / "c", meta, commit_every=100)
    w.put(range(5), z[:5])
    w.flush()

    reader = CacheReader(tmp_path / "c", dataset_id="digits/train")
    assert torch.equal(reader.get(range(5)), z[:5])
    w.put(range(5, 10), z[5:10])  # buffered, not committed
    with pytest.raises(MissingRecordError, match="index=7"):
        reader.get([7])
    w.flush()
    assert torch.equal(reader.get(range(10)), z[:10]) and len(reader) == 10
    w.close()
    assert torch.equal(reader.get(range(10)), z[:10])  # reopens read-only after the writer let go

    with CacheWriter(tmp_path / "c", meta) as w2:  # upgrades the process's read-only handle
        w2.put([10, 11], z[10:])
    assert reader.verify().ok
    assert torch.equal(reader.get(range(12)), z)


# --------------------------------------------------------------------------- put() checks


def test_put_rejects_bad_input_and_stores_nothing(tmp_path: Path) -> None:
    meta = make_meta(views=2)
    z = random_logits(3, 7, seed=17)
    with CacheWriter(tmp_path / "c", meta) as w:
        with pytest.raises(ValueError, match="logits have 8 classes, cache has 7"):
            w.put([0, 1, 2], random_logits(3, 8, seed=18))
        nan = z.clone()
        nan[1, 2] = math.nan
        with pytest.raises(ValueError, match="NaN"):
            w.put([0, 1, 2], nan)
        inf = z.clone()
        inf[2, 0] = -math.inf
        with pytest.raises(ValueError, match="Inf"):
            w.put([0, 1, 2], inf)
        with pytest.raises(ValueError, match=r"index=10, view=0\) outside dataset_size=10"):
            w.put([0, 1, 10], z)
        with pytest.raises(ValueError, match=r"index=-1"):
            w.put([-1, 1, 2], z)
        with pytest.raises(ValueError, match=r"view=2\) outside .*views=2"):
            w.put([0, 1, 2], z, views=[0, 1, 2])
        with pytest.raises(ValueError, match=r"2 indices, 2 views but logits of shape \(3, 7\)"):
            w.put([0, 1], z)
        w.flush()
        assert w.present() == set()  # no half-accepted batch
        w.put([0, 1, 2], z, views=[1, 1, 0])
    assert torch.equal(CacheReader(tmp_path / "c").get([0, 1, 2], views=[1, 1, 0]), z)


# --------------------------------------------------------------------------- CLI


def test_cli_verify_exit_codes(tmp_path: Path) -> None:
    meta = make_meta()
    z = random_logits(10, 7, seed=19)
    build(tmp_path / "good", meta, z)
    build(tmp_path / "bad", meta, z)
    build(tmp_path / "partial", meta, z, indices=[i for i in range(10) if i != 6])
    build(tmp_path / "both", meta, z, indices=[i for i in range(10) if i != 6])
    key = record_key(meta.record_prefix, 3)
    for name in ("bad", "both"):
        tamper(tmp_path / name, lambda txn: txn.put(key, _flip(10)(txn.get(key))))
    stray = record_key(meta.record_prefix, 12)  # past the dataset's end: a problem, but no expected record
    tamper(tmp_path / "both", lambda txn: txn.put(stray, txn.get(record_key(meta.record_prefix, 2))))

    names = ("good", "bad", "partial", "both")
    good, bad, partial, both = run_kd(*(["cache", "verify", str(tmp_path / name)] for name in names))

    rc, _, err = good
    assert rc == 0, err
    assert "10/10 records good, 0 corrupt, 0 missing" in err
    rc, _, err = bad
    assert rc == 1, err
    # the corrupt record is counted once (it was also listed as missing: "missing 1 of 10 ... 3/0")
    assert "index=3" in err and "9/10 records good, 1 corrupt, 0 missing" in err and "missing 1" not in err, err
    rc, _, err = partial
    assert rc == 1, err
    assert "missing 1 of 10" in err and "6/0" in err and "9/10 records good, 0 corrupt, 1 missing" in err
    rc, _, err = both
    assert rc == 1, err
    assert "missing 1 of 10 (index/view): 6/0\n" in err, err
    assert "8/10 records good, 1 corrupt, 1 missing, 1 stray key" in err, err


def test_cli_info_prints_json(tmp_path: Path) -> None:
    meta = make_meta(codec="int8", num_classes=7, dataset_size=10)
    build(tmp_path / "c", meta, random_logits(10, 7, seed=20), indices=[0, 2, 4, 6, 8, 9, 1])
    ((rc, out, err),) = run_kd(["cache", "info", str(tmp_path / "c")])
    assert rc == 0, err
    info = json.loads(out)
    assert info["records"] == 7
    assert info["codec"] == "int8"
    assert info["dataset_size"] == 10 and info["num_classes"] == 7
    assert info["teacher_fingerprint"] == meta.teacher_fingerprint
    assert info["bytes_per_sample"] == 7 + 8 + RECORD_OVERHEAD
    assert info["file_bytes"] == (tmp_path / "c" / "data.mdb").stat().st_size


def test_fp16_overflow_is_refused_not_stored_as_inf(tmp_path: Path) -> None:
    from kd.cache import CacheMeta, CacheReader, CacheWriter

    meta = CacheMeta("fp", "ds", 4, "fp16", 3)
    with CacheWriter(tmp_path / "c", meta) as w:
        with pytest.raises(ValueError, match="exceed the fp16 range"):
            w.put([0], torch.tensor([[1.0, 7e4, 0.0]]))
        w.put([1], torch.tensor([[1.0, 6e4, 0.0]]))
    r = CacheReader(tmp_path / "c")
    assert len(r) == 1 and torch.isfinite(r.get([1])).all()
