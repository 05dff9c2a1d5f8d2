"""Precompute at dataset scale: DataLoader workers decode, a pool of servers shares
the work, and torchrun ranks each fill (and read) only their own shard."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kd.cache import CacheReader
from kd.cache.sharded import open_cache
from kd.core.data import load_dataset, open_source, view_seeds
from kd.core.views import apply_params
from kd.precompute import precompute, read_view_params, todo_samples
from kd.student_trainer.sources import LocalSource, ServerSource
from kd.teacher_server.client import TeacherClient
from kd.teacher_server.loading import Teacher
from kd.teacher_server.server import BatchingOptions, start_server

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def train():
    return load_dataset("digits", "train")


def test_workers_decode_the_same_views_as_the_main_process(tmp_path: Path, teacher: Teacher, train) -> None:
    local = LocalSource(teacher)
    a = precompute(train, local, tmp_path / "w0", views=3, batch_size=100, workers=0, progress=False)
    b = precompute(train, local, tmp_path / "w2", views=3, batch_size=100, workers=2, progress=False)
    assert a.written == b.written == 3 * len(train)
    ra, rb = CacheReader(tmp_path / "w0"), CacheReader(tmp_path / "w2")
    assert sorted(ra.keys()) == sorted(rb.keys()) and len(ra) == 3 * len(train)
    idx = torch.arange(len(train)).repeat_interleave(3)
    vw = torch.arange(3).repeat(len(train))
    assert np.array_equal(ra.read_raw(idx.tolist(), vw.tolist()), rb.read_raw(idx.tolist(), vw.tolist()))
    pick = torch.tensor([0, 5, 700, 1197]), torch.tensor([2, 1, 0, 2])
    with torch.inference_mode():
        want = teacher.model(train.views(pick[0], view_seeds(pick[0], pick[1], 3)))
    torch.testing.assert_close(rb.get(*pick), want, rtol=1e-5, atol=1e-5)
    # Every record's view params are stored: replaying them on the plain sample gives the view's pixels.
    assert rb.meta.view_params == 10 and rb.meta.dataset_manifest["dataset_id"] == train.dataset_id
    params = read_view_params(tmp_path / "w2", idx, vw)
    assert torch.equal(params, read_view_params(tmp_path / "w0", idx, vw))
    replayed = torch.stack([apply_params(train.inputs[i].reshape(1, 8, 8), p).flatten() for i, p in zip(idx, params)])
    assert torch.equal(replayed, train.views(idx, view_seeds(idx, vw, 3)))
    assert len({tuple(p.tolist()) for p in params[:30]}) > 3  # the views do differ


def test_todo_samples_skip_what_is_present_and_respect_the_shard(teacher: Teacher, train) -> None:
    from kd.cache import CacheMeta

    meta = CacheMeta("fp", "ds", 10, "fp32", 10, views=2, shard_index=1, shard_count=3)
    # sample 1 has view 0, sample 4 both views (done), sample 7 view 1
    samples, skip = todo_samples(meta, np.array([1 * 2 + 0, 4 * 2 + 1, 7 * 2 + 1, 4 * 2 + 0]))
    assert samples.dtype == np.int32 and samples.tolist() == [1, 7] and sorted(skip.tolist()) == [2, 15]
    samples, skip = todo_samples(meta, np.array([], dtype=np.int64))
    assert samples.dtype == np.int32 and samples.tolist() == [1, 4, 7] and skip.tolist() == []
    one = CacheMeta("fp", "ds", 10, "fp32", 10, views=1, shard_index=0, shard_count=2)
    samples, skip = todo_samples(one, np.array([4, 0, 8]))
    assert samples.tolist() == [2, 6] and skip.tolist() == []
    # a plan over several of todo_samples' 2**20-position chunks, sharded, one in three samples present
    big = CacheMeta("fp", "ds", 7_000_001, "fp32", 10, views=1, shard_index=1, shard_count=2)
    mine = np.arange(1, 7_000_001, 2)
    present = np.random.default_rng(0).permutation(mine[::3])
    samples, skip = todo_samples(big, present)
    assert samples.dtype == np.int32 and np.array_equal(samples, np.setdiff1d(mine, present)) and len(skip) == 0


def test_a_pool_of_two_servers_shares_the_precompute(tmp_path: Path, teacher: Teacher, train) -> None:
    servers = [
        start_server([teacher], port=0, batching=BatchingOptions(max_batch_size=64, max_queue_delay_us=2000))
        for _ in range(2)
    ]
    try:
        pool = ",".join(f"127.0.0.1:{s.port}" for s in servers)
        out = tmp_path / "pooled"
        r = subprocess.run(
            [sys.executable, "-m", "kd", "precompute", "--source", f"server:{pool}", "--out", str(out),
             "--batch-size", "64", "--workers", "1"],
            capture_output=True, text=True, timeout=300, env=ENV,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        shares = []
        for s in servers:
            # The accounting names a client without a token by its peer host: the same one for this query.
            with TeacherClient(f"127.0.0.1:{s.port}") as c:
                c.list_teachers()
                shares.append(c.usage.samples)
    finally:
        for s in servers:
            s.stop(grace=1)
    # 1198 samples in 19 batches of <= 64, alternating: 10 batches to one server, 9 to the other.
    assert sorted(shares) == [9 * 64, 1198 - 9 * 64], shares
    reader = CacheReader(out)
    assert len(reader) == len(train)
    with torch.inference_mode():
        want = teacher.model(train.inputs)
    torch.testing.assert_close(reader.get(range(len(train))), want, rtol=1e-5, atol=1e-5)


def test_pool_stream_keeps_order_and_reports_a_server_error(teacher: Teacher, train) -> None:
    servers = [start_server([teacher], port=0) for _ in range(3)]
    try:
        with ServerSource([f"127.0.0.1:{s.port}" for s in servers], depth=2) as src:
            assert len(src.pool) == 3
            batches = [(i, train.inputs[i], train.labels[i]) for i in torch.split(torch.randperm(500), 23)]
            got = list(src.iter_targets(batches))
            assert [b.indices.tolist() for b, _ in got] == [b[0].tolist() for b in batches]
            with torch.inference_mode():
                for b, t in got:
                    torch.testing.assert_close(t, teacher.model(b.inputs), rtol=1e-5, atol=1e-5)
            bad = [(torch.arange(4), torch.zeros(4, 64), torch.zeros(4, dtype=torch.long))] * 3
            bad.append((torch.arange(4), torch.zeros(4, 65), torch.zeros(4, dtype=torch.long)))
            with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
                list(src.iter_targets(bad))
    finally:
        for s in servers:
            s.stop(grace=1)


def test_an_interrupted_run_resumes_without_redoing_committed_views(tmp_path: Path, teacher: Teacher, train) -> None:
    local = LocalSource(teacher)

    def crash(done: int) -> None:
        if done >= 200:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # batches of 40 records cut samples' 3 views apart
        precompute(train, local, tmp_path / "c", views=3, batch_size=40, commit_every=40, workers=1,
                   progress=False, on_batch=crash)  # fmt: skip
    first = CacheReader(tmp_path / "c")
    have = sorted(first.keys())
    assert len(have) == 200 and have[-1] == (66, 1)  # sample 66 has views 0 and 1 only
    seen: list[int] = []
    again = precompute(train, local, tmp_path / "c", views=3, batch_size=40, workers=2, progress=False,
                       on_batch=seen.append)  # fmt: skip
    assert again.skipped == 200 and again.written == 3 * len(train) - 200
    assert seen[-1] == 3 * len(train)  # the teacher ran each missing record once, no committed one again
    assert first.verify().ok
    idx = torch.tensor([66, 66, 66, 67, 1197])
    vw = torch.tensor([0, 1, 2, 0, 2])
    with torch.inference_mode():
        want = teacher.model(train.views(idx, view_seeds(idx, vw, 3)))
    torch.testing.assert_close(first.get(idx, vw), want, rtol=1e-5, atol=1e-5)
    params = read_view_params(tmp_path / "c", idx, vw)
    replayed = torch.stack([apply_params(train.inputs[i].reshape(1, 8, 8), p).flatten() for i, p in zip(idx, params)])
    assert torch.equal(replayed, train.views(idx, view_seeds(idx, vw, 3)))


@pytest.mark.serial
def test_torchrun_ranks_each_precompute_their_shard_of_an_npz(tmp_path: Path, teacher_spec: str, teacher: Teacher):
    train = load_dataset("digits", "train")
    x, y = train.inputs[:300].numpy(), train.labels[:300].numpy()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    uri = f"npz:{tmp_path / 'd.npz'}"
    out = tmp_path / "c"
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "kd",
         "precompute", "--source", f"local:{teacher_spec}", "--dataset", uri, "--out", str(out), "--workers", "1",
         "--batch-size", "64"],
        capture_output=True, text=True, timeout=300, env=ENV,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    reader = open_cache(out)
    assert [(s.meta.shard_index, s.meta.shard_count) for s in reader.shards] == [(0, 2), (1, 2)]
    assert sorted(i for i, _ in reader.shards[1].keys()) == list(range(1, 300, 2))
    assert reader.meta.dataset_manifest["uri"] == uri and reader.meta.dataset_manifest["format"] == "npz"
    with torch.inference_mode():
        want = teacher.model(torch.from_numpy(x))
    torch.testing.assert_close(reader.get(range(300)), want, rtol=1e-5, atol=1e-5)

    # A rank decodes only its own samples: with row 1 poisoned, shard 0 of 2 never reads it ...
    x[1] = np.nan
    np.savez(tmp_path / "bad.npz", x=x, y=y)
    bad = open_source(f"npz:{tmp_path / 'bad.npz'}")
    local = LocalSource(teacher)
    report = precompute(bad, local, tmp_path / "bad", shard=(0, 2), workers=1, progress=False)
    assert report.written == 150 and len(CacheReader(tmp_path / "bad" / "shard-00000-of-00002")) == 150
    # ... while shard 1 does, and refuses to cache the NaN it gives.
    with pytest.raises(ValueError, match="NaN"):
        precompute(bad, local, tmp_path / "bad", shard=(1, 2), workers=1, progress=False)
