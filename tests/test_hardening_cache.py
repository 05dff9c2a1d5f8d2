"""Cache hardening (issue 14, items 12-15) on real LMDB files in tmp_path: truncated files
are refused before they are mapped (a SIGBUS would kill the process, so those runs are
subprocesses), a full disk names the cache and the disk and keeps committed records, the
metadata record carries a checksum, and NaN/Inf targets with a valid CRC are refused where
records are read."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lmdb
import pytest
import torch

from kd.cache import CacheMeta, CacheReader, CacheWriter, CorruptRecordError, StaleCacheError
from kd.cache.codecs import get_codec
from kd.cache.store import META_KEY, _release, _seal_rows, record_key

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def meta(**overrides: object) -> CacheMeta:
    fields: dict[str, object] = dict(teacher_fingerprint="fp-A", dataset_id="ds", dataset_size=3000, codec="fp32",
                                     num_classes=100)  # fmt: skip
    fields.update(overrides)
    return CacheMeta(**fields)  # type: ignore[arg-type]


def build(path: Path, m: CacheMeta, *, seed: int = 0) -> torch.Tensor:
    logits = torch.randn(m.dataset_size, m.num_classes, generator=torch.Generator().manual_seed(seed)) * 3
    with CacheWriter(path, m, commit_every=512) as w:
        w.put(range(m.dataset_size), logits)
    return logits


def edit(path: Path, fn) -> None:
    """Apply ``fn(txn)`` to a closed cache with lmdb itself (what another program could do);
    this process's shared read handle is closed first (LMDB allows one per file), as in a new process."""
    _release(path)
    env = lmdb.open(str(path), subdir=True)
    try:
        with env.begin(write=True) as txn:
            fn(txn)
    finally:
        env.close()


def run_kd(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kd", *args], capture_output=True, text=True, timeout=timeout,
                          env=ENV, cwd=ROOT)  # fmt: skip


# ---- item 12: a truncated data.mdb is a CacheError naming the file, never SIGBUS ----

_OPEN_ALL = textwrap.dedent(
    """
    import json, sys
    from kd.cache import CacheError, CacheMeta, CacheReader, CacheWriter
    out = {}
    meta = CacheMeta.from_json(open(sys.argv[1], "rb").read())
    for path in sys.argv[2:]:
        got = []
        for what in ("read", "write"):
            try:
                if what == "read":
                    r = CacheReader(path)
                    r.get(range(r.meta.dataset_size))
                    r.verify()
                else:
                    CacheWriter(path, meta).close()
                got.append("opened")
            except CacheError as e:
                got.append(str(e))
        out[path] = got
    print(json.dumps(out))
    """
)


def test_truncated_data_file_is_refused_before_mapping(tmp_path: Path) -> None:
    m = meta()
    build(tmp_path / "full", m)
    data = tmp_path / "full" / "data.mdb"
    size = data.stat().st_size
    assert size > 40 * 4096  # many pages, so the cuts below land inside the B-tree
    cuts = {"75": size * 3 // 4, "50": size // 2, "3pages": 3 * 4096, "empty": 0}
    for name, n in cuts.items():
        (tmp_path / name).mkdir()
        with open(data, "rb") as src, open(tmp_path / name / "data.mdb", "wb") as dst:
            dst.write(src.read(n))
    (tmp_path / "meta.json").write_bytes(m.to_json())
    paths = [str(tmp_path / name) for name in cuts]
    proc = subprocess.run([sys.executable, "-c", _OPEN_ALL, str(tmp_path / "meta.json"), *paths],
                          capture_output=True, text=True, timeout=120, env=ENV)  # fmt: skip
    assert proc.returncode == 0, (proc.returncode, -signal.SIGBUS, proc.stderr[-2000:])
    out = json.loads(proc.stdout)
    for name in ("75", "50", "3pages"):
        read, write = out[str(tmp_path / name)]
        for msg in (read, write):
            assert "truncated" in msg and str(tmp_path / name / "data.mdb") in msg, (name, msg)
            assert f"holds {size} " in msg or name == "3pages", msg  # the header's own size
    # An empty file: readers are told so; a writer may initialise it (LMDB does).
    read, write = out[str(tmp_path / "empty")]
    assert "is empty (0 bytes)" in read and str(tmp_path / "empty" / "data.mdb") in read
    assert write == "opened"
    # The intact file still opens and reads back what was written.
    assert len(CacheReader(tmp_path / "full")) == m.dataset_size


def test_kd_cache_commands_name_a_truncated_file(tmp_path: Path) -> None:
    build(tmp_path / "c", meta(dataset_size=1500))
    data = tmp_path / "c" / "data.mdb"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    r = run_kd("cache", "verify", str(tmp_path / "c"))
    err = " ".join(r.stderr.split())
    assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
    assert "is truncated" in err and "data.mdb" in err, err


# ---- item 13: a full disk names the cache and the disk; committed records survive ----


@pytest.fixture()
def small_disk(tmp_path: Path):
    """A real 256 KiB tmpfs (needs root; skipped where mounting is not allowed)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_names_cache_and_disk_and_keeps_committed_records(small_disk: Path, teacher_spec: str) -> None:
    out = small_disk / "cache"
    r = run_kd("precompute", "--source", f"local:{teacher_spec}", "--out", str(out), "--views", "8",
               "--commit-every", "512", timeout=300)  # fmt: skip
    err = " ".join(r.stderr.split())
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])  # a clean CacheError, not SIGABRT (-6)
    assert "terminate called" not in r.stderr
    assert f"cannot write cache {str(out)!r}" in err and "disk holding it" in err and "is full" in err, err
    assert f"mounted at {str(small_disk)!r}" in err and "of 262,144 bytes free" in err, err  # the disk
    assert "every record committed before it is intact" in err, err
    reader = CacheReader(out)
    report = reader.verify()
    assert report.problems == [] and report.present > 0 and report.present % 512 == 0, report.present
    assert report.present + len(report.missing) == report.expected


def test_file_size_limit_is_a_cache_error_and_keeps_committed_records(tmp_path: Path) -> None:
    """The same failure without root: RLIMIT_FSIZE makes the file's writes fail (EFBIG, which LMDB
    reports as an I/O error) once it reaches 1 MiB."""
    script = textwrap.dedent(
        f"""
        import resource, signal, torch
        from kd.cache import CacheError, CacheMeta, CacheWriter
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        meta = CacheMeta(teacher_fingerprint="fp", dataset_id="ds", dataset_size=20000, codec="fp32", num_classes=100)
        w = CacheWriter({str(tmp_path / "c")!r}, meta, commit_every=256)
        try:
            for s in range(0, 20000, 256):
                w.put(range(s, min(s + 256, 20000)), torch.ones(min(256, 20000 - s), 100))
        except CacheError as e:
            print("ERROR", e, "COMMITTED", w.committed)
            w.close()  # nothing left to retry: the failed batch was dropped
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("ERROR ") and "size or quota limit" in r.stdout and "(256 records)" in r.stdout, r.stdout
    committed = int(r.stdout.split("COMMITTED")[1])
    assert committed > 0
    report = CacheReader(tmp_path / "c").verify()
    assert report.problems == [] and report.present == committed


# ---- item 14: the metadata record has a checksum ----


def test_metadata_edit_of_same_length_is_refused(tmp_path: Path) -> None:
    m = meta(dataset_size=20, codec="fp16", num_classes=10)
    build(tmp_path / "c", m)
    assert CacheReader(tmp_path / "c").meta == m
    edit(tmp_path / "c", lambda txn: txn.put(META_KEY, txn.get(META_KEY).replace(b'"fp16"', b'"bf16"')))
    with pytest.raises(CorruptRecordError, match="metadata record of cache .* fails its checksum"):
        CacheReader(tmp_path / "c")
    with pytest.raises(CorruptRecordError, match="fails its checksum"):
        CacheWriter(tmp_path / "c", m)


def test_metadata_temperature_edit_cannot_bypass_the_temperature_check(tmp_path: Path) -> None:
    m = meta(dataset_size=20, codec="sample:4", num_classes=10, temperature=4.0)
    build(tmp_path / "c", m)
    with pytest.raises(StaleCacheError, match="temperature=4.0"):
        CacheReader(tmp_path / "c", temperature=2.0)
    edit(tmp_path / "c", lambda txn: txn.put(META_KEY, txn.get(META_KEY).replace(b'"temperature": 4.0',
                                                                                 b'"temperature": 2.0')))  # fmt: skip
    with pytest.raises(CorruptRecordError, match="fails its checksum"):
        CacheReader(tmp_path / "c", temperature=2.0)


def test_metadata_written_before_the_checksum_is_still_read(tmp_path: Path) -> None:
    m = meta(dataset_size=20, num_classes=10)
    logits = build(tmp_path / "c", m)
    legacy = json.dumps(json.loads(m.to_json().rsplit(b"\ncrc32=", 1)[0]), sort_keys=True).encode()
    assert legacy.startswith(b"{") and b"crc32" not in legacy
    edit(tmp_path / "c", lambda txn: txn.put(META_KEY, legacy))
    r = CacheReader(tmp_path / "c")
    assert r.meta == m and torch.equal(r.get(range(20)), logits)
    edit(tmp_path / "c", lambda txn: txn.put(META_KEY, b'{"codec": "fp32", "teacher_fi'))
    with pytest.raises(CorruptRecordError, match="metadata record of cache .* is unreadable"):
        CacheReader(tmp_path / "c")


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_cache_temperature_must_be_finite_and_positive(bad: float) -> None:
    with pytest.raises(ValueError, match="cache temperature must be a finite number > 0"):
        meta(codec="sample:4", temperature=bad)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        get_codec("sample:4", bad)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        get_codec("topk:3", bad)


# ---- item 15: NaN/Inf targets with a valid CRC are refused where records are read ----


def _put_sealed(path: Path, m: CacheMeta, index: int, row: torch.Tensor) -> None:
    """Store ``row`` for ``index`` with a correct checksum (as code other than CacheWriter.put could)."""
    payload = get_codec(m.codec, m.temperature).encode(row[None])
    ((key, value),) = _seal_rows([record_key(m.record_prefix, index, 0)], payload)
    edit(path, lambda txn: txn.put(key, value))


@pytest.mark.parametrize("codec", ["fp32", "topk:3"])
def test_non_finite_targets_are_refused_on_read(tmp_path: Path, codec: str) -> None:
    m = meta(dataset_size=40, codec=codec, num_classes=10)
    build(tmp_path / "c", m)
    row = torch.randn(10)
    row[3] = math.nan if codec == "fp32" else math.inf
    _put_sealed(tmp_path / "c", m, 17, row)
    r = CacheReader(tmp_path / "c")
    assert r.verify().problems == ["record (index=17, view=0) decodes to NaN/Inf"]
    r.targets(range(17))  # the records before it are fine
    for read in (r.targets, r.get) if codec == "fp32" else (r.targets,):
        with pytest.raises(CorruptRecordError, match=r"record \(index=17, view=0\) of cache .* holds NaN or Inf"):
            read([3, 17, 5])


@pytest.mark.parametrize("per_token", [False, True])
def test_verify_lists_a_sparse_record_with_nan_logsumexp(tmp_path: Path, per_token: bool) -> None:
    """A top-k record with a valid checksum but a NaN log-sum-exp: readers refuse it (and say
    `kd cache verify` lists every such record), so verify must list it."""
    m = meta(dataset_size=6, codec="topk:2", num_classes=5, temperature=1.0, per_token=per_token)
    values, classes = torch.tensor([[1.0, 0.5]]), torch.tensor([[0, 1]])
    with CacheWriter(tmp_path / "c", m) as w:
        for i in range(m.dataset_size):
            lse = torch.tensor([float("nan") if i == 4 else 2.0])
            rows = w.codec._pack(values, classes, lse, m.num_classes)  # what a server's top-k reply encodes to
            if per_token:
                w.put_sequence_rows([i], [rows])
            else:
                w._pending.extend(_seal_rows([record_key(w._prefix, i, 0)], rows))
    r = CacheReader(tmp_path / "c")
    with pytest.raises(CorruptRecordError, match=r"index=4, .* holds NaN or Inf"):
        r.token_targets([3, 4]) if per_token else r.targets([3, 4])
    (r.token_targets if per_token else r.targets)([0, 1, 2, 3, 5])  # the others read fine
    report = r.verify()
    assert report.problems == ["record (index=4, view=0) decodes to NaN/Inf"], report.problems


def test_training_stops_on_non_finite_targets(tmp_path: Path) -> None:
    """What ``kd train --source cache:`` runs: the loop gets the reader's error naming the record
    instead of a NaN loss every epoch."""
    from kd.core.data import load_dataset
    from kd.models import digits_student
    from kd.student_trainer.sources import CacheSource
    from kd.student_trainer.train import TrainConfig, train_student

    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    m = meta(teacher_fingerprint="fp-digits", dataset_id=train.dataset_id, dataset_size=len(train), num_classes=10)
    build(tmp_path / "c", m)
    row = torch.randn(10)
    row[0] = math.nan
    _put_sealed(tmp_path / "c", m, 5, row)
    source = CacheSource(str(tmp_path / "c"), dataset_id=train.dataset_id)
    with pytest.raises(CorruptRecordError, match=r"record \(index=5, view=0\) of cache .* holds NaN or Inf"):
        train_student(digits_student(), train, test, TrainConfig(method="kd", epochs=1, batch_size=64),
                      source=source, subset=torch.arange(64))  # fmt: skip


# ---- two writers creating one new cache at once: one metadata, the other writer refused ----

_RACER = textwrap.dedent(
    """
    import sys, torch
    from kd.cache import CacheError, CacheMeta, CacheWriter
    path, teacher, codec, first, size = sys.argv[1:6]
    meta = CacheMeta(teacher_fingerprint=teacher, dataset_id="d", dataset_size=int(size), codec=codec, num_classes=3)
    print("ready", flush=True)
    try:
        with CacheWriter(path, meta) as w:
            w.put([int(first), int(first) + 1], torch.tensor([[1.0, 2.0, 3.0]] * 2))
        print("acknowledged", flush=True)
    except CacheError as e:
        print(f"refused {type(e).__name__}: {e}", flush=True)
    """
)


@pytest.mark.parametrize(
    ("field", "racers"),
    [
        ("teacher_fingerprint", [(f"teacher{n}", "fp32") for n in range(5)]),
        ("codec", [("same", codec) for codec in ("fp16", "bf16", "fp32", "int8")]),
    ],
)
def test_writers_creating_one_cache_at_once_cannot_both_succeed(tmp_path: Path, field: str, racers) -> None:
    """The writers are lined up behind LMDB's writer lock (held here) after opening the new, empty
    cache, then let go together: the metadata must be checked and written in one write transaction,
    so the later ones see the first's and are refused, instead of overwriting it (its records then were
    foreign keys, or decoded with the other codec while verify passed)."""
    path = tmp_path / "c"
    env = lmdb.open(str(path), subdir=True)  # the new cache's file, as a first writer would create it
    txn = env.begin(write=True)  # LMDB's writer lock
    size = str(2 * len(racers))
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(path), teacher, codec, str(2 * n), size],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
             for n, (teacher, codec) in enumerate(racers)]  # fmt: skip
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        time.sleep(3)  # all open the cache and read its (absent) metadata, then wait for the lock
    finally:
        txn.abort()
        env.close()
    outs = [p.communicate(timeout=120) for p in procs]
    results = [out.strip() for out, _ in outs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sorted(r.split(" ")[0] for r in results) == ["acknowledged"] + ["refused"] * (len(racers) - 1), results
    won = results.index("acknowledged")
    for refused in results[:won] + results[won + 1 :]:
        assert refused.startswith("refused StaleCacheError") and f"built with {field}=" in refused, refused
        assert str(path) in refused
    r = CacheReader(path)
    assert (r.meta.teacher_fingerprint, r.meta.codec) == racers[won]
    assert r.verify().problems == []
    assert torch.allclose(r.get([2 * won, 2 * won + 1]), torch.tensor([[1.0, 2.0, 3.0]] * 2), atol=0.01)
