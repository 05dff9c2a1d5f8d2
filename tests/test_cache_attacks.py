"""Caches damaged or edited by hand (session 17's attack on them), on real LMDB files in tmp_path,
through the real ``kd cache`` commands where the user would meet the problem."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lmdb
import pytest
import torch

from kd.cache import CacheError, CacheMeta, CacheReader, CacheWriter, CorruptRecordError
from kd.cache.sharded import open_cache, shard_dir
from kd.cache.store import META_KEY, _release
from kd.core.data import load_dataset
from kd.precompute import precompute
from kd.student_trainer.sources import LocalSource
from kd.teacher_server.loading import Teacher

ROOT = Path(__file__).resolve().parents[1]


def build(path: Path, m: CacheMeta) -> torch.Tensor:
    logits = torch.randn(m.dataset_size, m.num_classes, generator=torch.Generator().manual_seed(0))
    with CacheWriter(path, m) as w:
        w.put(range(m.dataset_size), logits)
    return logits


def run_kd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kd", *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip


def put_meta(path: Path, raw: bytes) -> None:
    """Write the metadata record with lmdb itself (what an editor of the cache could do)."""
    _release(path)
    env = lmdb.open(str(path), subdir=True)
    try:
        with env.begin(write=True) as txn:
            txn.put(META_KEY, raw)
    finally:
        env.close()


EDITS = [
    ({"teacher_fingerprint": 7}, "teacher_fingerprint must be a string, got 7"),
    ({"dataset_id": None}, "dataset_id must be a string, got None"),
    ({"features": {"layer1": "abc"}}, "features must map each layer name to its shape"),
    ({"features": ["layer1"]}, "features must map each layer name to its shape"),
    ({"shard_index": 5}, "shard_index must be an integer 0..0, got 5"),
    ({"per_token": "yes"}, "per_token must be true or false, got 'yes'"),
    ({"view_params": -3}, "view_params must be an integer >= 0, got -3"),
    ({"format_version": 2}, "written in format 2, newer than this kd reads (1); upgrade kd"),
    ([1, 2], "expected a JSON object, got list"),
]


@pytest.mark.parametrize(("change", "message"), EDITS, ids=[str(m).split(" must")[0][:24] for _, m in EDITS])
def test_metadata_edited_by_hand_is_refused_naming_the_field(tmp_path: Path, change: object, message: str) -> None:
    # A record without its checksum line is read (caches from before it had one), so a hand edit that drops
    # the line is not caught by the CRC: the old code took these values and crashed far from the metadata
    # (a traceback from `kd cache info`: AttributeError, TypeError) or read on with them (shard 5 of 1)
    m = CacheMeta(teacher_fingerprint="fp", dataset_id="ds", dataset_size=20, codec="fp16", num_classes=5)
    path = tmp_path / "c"
    build(path, m)
    body = json.loads(m.to_json().rsplit(b"\ncrc32=", 1)[0])
    if isinstance(change, dict):
        body.update(change)
    else:
        body = change
    put_meta(path, json.dumps(body).encode())
    with pytest.raises(CorruptRecordError) as e:
        CacheReader(path)
    assert str(e.value).startswith(f"the metadata record of cache {str(path)!r} is unreadable: ")
    assert message in str(e.value)
    if change not in (EDITS[0][0], EDITS[2][0]):
        return  # kd starts in seconds: the commands are run on two of the edits (the library refuses all)
    for command in ("info", "verify"):
        r = run_kd("cache", command, str(path))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert message in r.stderr and f"metadata record of cache {str(path)!r} is unreadable" in r.stderr


def test_a_shard_folder_beyond_the_shard_count_is_refused_not_skipped(tmp_path: Path) -> None:
    root = tmp_path / "s"
    for i in range(2):
        m = CacheMeta(teacher_fingerprint="fp", dataset_id="ds", dataset_size=9, codec="fp32", num_classes=3,
                      shard_index=i, shard_count=2)  # fmt: skip
        with CacheWriter(shard_dir(root, i, 2), m) as w:
            w.put(range(i, 9, 2), torch.randn(len(range(i, 9, 2)), 3))
    assert open_cache(root).verify().ok
    shutil.copytree(shard_dir(root, 1, 2), root / "shard-00002-of-00002")  # a copy renamed by hand
    # the old reader skipped it: verify passed with the copy's records never read
    with pytest.raises(CacheError) as e:
        open_cache(root)
    assert str(e.value) == (
        f"cache {str(root)!r} has shard folder(s) ['shard-00002-of-00002'] beyond its 2 shards (0..1); "
        "remove or rename them"
    )
    r = run_kd("cache", "verify", str(root))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "beyond its 2 shards" in r.stderr, r.stderr


def test_verify_finds_records_whose_view_params_are_gone(tmp_path: Path, teacher: Teacher) -> None:
    train = load_dataset("digits", "train")
    out = tmp_path / "v"
    precompute(train, LocalSource(teacher), out, views=2, progress=False, workers=0)
    whole = open_cache(out).verify()
    assert whole.ok and whole.present == 2 * len(train)
    # `cp cache/*.mdb` copies the targets without the params folder; the old verify passed such a cache,
    # and only read_view_params (a replay of the views) failed, later
    shutil.rmtree(out / "view-params")
    gone = open_cache(out).verify()
    assert not gone.ok and gone.corrupt == 2 * len(train) and gone.present == 0
    assert gone.problems[0].startswith(f"record (index=0, view=0) has no view params in {str(out / 'view-params')!r} (")
    # a resume redoes no target it holds, so it writes no params for them either: still refused
    precompute(train, LocalSource(teacher), out, views=2, progress=False, workers=0)
    lost = [(3, 1), (700, 0)]
    edited = open_cache(out / "view-params")
    assert len(edited) == 0
    edited.close()
    with CacheWriter(out / "view-params", CacheReader(out / "view-params").meta) as w:
        w.put([i for i, _ in lost], torch.zeros(2, CacheReader(out / "view-params").meta.num_classes),
              [v for _, v in lost])  # fmt: skip
    some = open_cache(out).verify()
    assert some.corrupt == 2 * len(train) - 2 and some.present == 2
    assert some.problems[0] == (
        f"record (index=0, view=0) has no view params in {str(out / 'view-params')!r}; rebuild the cache with "
        "`kd precompute` into an empty --out"
    )
    r = run_kd("cache", "verify", str(out))
    n = 2 * len(train)
    assert r.returncode == 1 and f"2/{n} records good, {n - 2} corrupt, 0 missing\n" in r.stderr, r.stderr
