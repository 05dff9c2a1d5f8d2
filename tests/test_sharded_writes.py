"""Writing onto a cache made of shards (``kd precompute --shard I/N``, torchrun): a read-through
source fills the shards themselves and checks the teacher against them, and a precompute in
another layout is refused instead of writing an environment that hides the shards (readers take
a root ``data.mdb`` over shard folders)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from kd.cache import CacheError, CacheWriter
from kd.cache.sharded import open_cache, shard_dir
from kd.core.data import load_dataset
from kd.precompute import precompute
from kd.student_trainer.sources import LocalSource, ReadThroughSource
from kd.teacher_server.loading import Teacher, load_teacher


@pytest.fixture(scope="module")
def train():
    return load_dataset("digits", "train")


@pytest.fixture()
def half_done(tmp_path: Path, teacher: Teacher, train) -> Path:
    """A 2-shard cache of ``teacher`` whose shard 0 is complete and shard 1 has no record yet
    (its run was stopped before its first commit)."""
    root = tmp_path / "sharded"
    precompute(train, LocalSource(teacher), root, shard=(0, 2), progress=False, workers=0)
    meta = open_cache(shard_dir(root, 0, 2)).meta
    CacheWriter(shard_dir(root, 1, 2), dataclasses.replace(meta, shard_index=1)).close()
    return root


def test_read_through_fills_the_shards_of_a_sharded_cache(half_done: Path, teacher: Teacher, train) -> None:
    idx = torch.arange(0, 200)
    with ReadThroughSource(str(half_done), LocalSource(teacher), train) as rt:
        first = rt.targets(idx, train.get(idx))
        assert (rt.hits, rt.misses) == (100, 100)  # shard 0 is read; shard 1's samples are computed
        again = rt.targets(idx, train.get(idx))
        assert rt.hits == 300 and torch.equal(first, again)
    assert not (half_done / "data.mdb").exists()  # nothing beside the shards to hide them
    reader = open_cache(half_done)
    assert len(reader.shards[1]) == 100 and all(i % 2 == 1 for i, _ in reader.shards[1].keys())
    assert torch.equal(reader.targets(idx), first)
    assert torch.allclose(first, LocalSource(teacher).targets(idx, train.get(idx)), atol=1e-5)


def test_read_through_onto_shards_refuses_another_teacher(half_done: Path, train) -> None:
    torch.manual_seed(7)
    other = load_teacher("digits", "kd.models:digits_teacher")  # the same name, other weights
    with pytest.raises(CacheError, match="teacher_fingerprint") as e:
        ReadThroughSource(str(half_done), LocalSource(other), train)
    assert "shard-00000-of-00002" in str(e.value)
    assert not (half_done / "data.mdb").exists()


def test_precompute_refuses_another_layout_than_the_one_at_out(half_done: Path, teacher: Teacher, train) -> None:
    src = LocalSource(teacher)
    with pytest.raises(CacheError, match=r"in 2 shards.*--shard I/2"):
        precompute(train, src, half_done, progress=False, workers=0)
    with pytest.raises(CacheError, match=r"in 2 shards, not 3"):
        precompute(train, src, half_done, shard=(0, 3), progress=False, workers=0)
    assert not (half_done / "data.mdb").exists()
    one = half_done.parent / "one"
    precompute(train, src, one, progress=False, workers=0, batch_size=600)
    with pytest.raises(CacheError, match="in one environment"):
        precompute(train, src, one, shard=(1, 2), progress=False, workers=0)
