"""SoftTargetDataset: kd's cached targets as a plain torch Dataset, through DataLoader workers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from kd.cache import StaleCacheError
from kd.cache.sharded import open_cache
from kd.core.data import load_dataset, open_source, view_seeds
from kd.core.targets import SparseTargets
from kd.core.views import model_input
from kd.models import digits_cnn
from kd.precompute import precompute
from kd.student_trainer.soft_dataset import SoftTargetDataset
from kd.student_trainer.sources import LocalSource
from kd.teacher_server.loading import Teacher, load_teacher, save_weights


@pytest.fixture(scope="module")
def train():
    return load_dataset("digits", "train")


def test_sparse_targets_through_workers_equal_the_cache(tmp_path: Path, teacher: Teacher, train) -> None:
    precompute(train, LocalSource(teacher), tmp_path / "c", codec="topk:3", shard=(0, 1), workers=0, progress=False)
    reader = open_cache(tmp_path / "c")
    data = SoftTargetDataset(train, tmp_path / "c", sparse=True)
    loader = DataLoader(data, batch_size=100, shuffle=True, num_workers=2, collate_fn=SoftTargetDataset.collate,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    seen = []
    for x, y, t in loader:
        assert isinstance(t, SparseTargets) and t.indices.shape == (len(x), 3)
        # Rows found by their inputs: each worker paired every sample with its own record.
        idx = torch.cdist(x, train.inputs).argmin(1)
        want = reader.targets(idx)
        assert torch.equal(t.indices, want.indices) and torch.equal(t.logits, want.logits)
        assert torch.equal(y, train.labels[idx])
        seen.append(idx)
    assert sorted(torch.cat(seen).tolist()) == list(range(len(train)))
    dense = SoftTargetDataset(train, tmp_path / "c")  # the default: densified, a plain float tensor
    x, y, t = dense[7]
    assert t.shape == (10,) and torch.equal(t, reader.targets([7]).dense()[0]) and int(y) == int(train.labels[7])


def test_views_all_and_per_epoch_replay_the_cached_views(tmp_path: Path, teacher: Teacher, train) -> None:
    precompute(train, LocalSource(teacher), tmp_path / "v", views=2, workers=0, progress=False)
    every = SoftTargetDataset(train, tmp_path / "v", views="all")
    assert len(every) == 2 * len(train)
    x, _, t = every[2 * 5 + 1]  # sample 5, view 1
    seeds = view_seeds(torch.tensor([5]), torch.tensor([1]), 2)
    assert torch.equal(x, train.views(torch.tensor([5]), seeds)[0])
    with torch.inference_mode():
        torch.testing.assert_close(t, teacher.model(x[None])[0], rtol=1e-5, atol=1e-5)
    per_epoch = SoftTargetDataset(train, tmp_path / "v")
    drawn = [per_epoch.keys(list(range(200)))[1] for _ in range(2)]
    assert torch.equal(drawn[0], drawn[1])  # a pure function of (seed, epoch)
    per_epoch.set_epoch(1)
    other = per_epoch.keys(list(range(200)))[1]
    assert not torch.equal(drawn[0], other) and set(other.tolist()) == {0, 1}


def test_refuses_other_data_and_dense_sampled_targets(tmp_path: Path, teacher: Teacher, train) -> None:
    precompute(train, LocalSource(teacher), tmp_path / "s", codec="sample:4", temperature=4.0, workers=0,
               progress=False)  # fmt: skip
    with pytest.raises(StaleCacheError, match="built on dataset"):
        SoftTargetDataset(load_dataset("digits", "test"), tmp_path / "s", sparse=True)
    with pytest.raises(ValueError, match="no dense form"):
        SoftTargetDataset(train, tmp_path / "s")
    x, y, t = SoftTargetDataset.collate([SoftTargetDataset(train, tmp_path / "s", sparse=True)[i] for i in (3, 4)])
    assert isinstance(t, SparseTargets) and t.kind == "sample" and t.indices.shape == (2, 4)


def test_uint8_images_come_out_as_kd_feeds_a_student(tmp_path: Path, train) -> None:
    """A uint8 image dataset (an npz of 1x8x8 pixels the test writes, read with dtype=uint8): each item's
    inputs are float32 value/255 (``kd.core.views.model_input``, what kd train feeds its student), and
    the targets are the teacher's on those very inputs, from a cache and from an in-process teacher.
    Before, the items held the raw 0..255 bytes: a user's loop fed its student 255 times the pixels its
    teacher saw."""
    import numpy as np

    pixels = (train.inputs[:40].reshape(-1, 1, 8, 8) * 255).round().to(torch.uint8)
    np.savez(tmp_path / "u8.npz", x=pixels.numpy(), y=train.labels[:40].numpy())
    data = open_source(f"npz:{tmp_path / 'u8.npz'}?dtype=uint8")  # pixels as bytes, as image sources give them
    assert data.get(torch.tensor([5])).dtype == torch.uint8
    torch.manual_seed(7)  # seeded weights: what matters is that both sides see the same inputs
    teacher = load_teacher("cnn", f"kd.models:digits_cnn@{save_weights(digits_cnn(), tmp_path / 'cnn.safetensors')}")
    precompute(data, LocalSource(teacher), tmp_path / "c", workers=0, progress=False)
    for targets in (tmp_path / "c", LocalSource(teacher)):
        x, y, t = SoftTargetDataset(data, targets)[5]
        assert x.dtype == torch.float32 and torch.equal(x, pixels[5].double().div(255).float())
        assert torch.equal(x, model_input(data.get(torch.tensor([5])))[0]) and int(y) == int(train.labels[5])
        with torch.inference_mode():
            torch.testing.assert_close(t, teacher.model(x[None])[0], rtol=1e-6, atol=1e-6)
    x, _, _ = SoftTargetDataset.collate([SoftTargetDataset(data, tmp_path / "c", sparse=True)[i] for i in (1, 2)])
    assert x.dtype == torch.float32 and torch.equal(x, model_input(data.get(torch.tensor([1, 2]))))


def test_a_topk_cache_is_densified_as_documented(tmp_path: Path, teacher: Teacher, train) -> None:
    """The default (sparse=False) on a topk:K cache: dense logits whose softmax at the cache's T gives
    the K stored probabilities and spreads the rest mass evenly over the other classes (float64 check)."""
    precompute(train, LocalSource(teacher), tmp_path / "k", codec="topk:3", workers=0, progress=False)
    stored = open_cache(tmp_path / "k").targets([9])
    _, _, t = SoftTargetDataset(train, tmp_path / "k")[9]
    p = torch.softmax(t.double(), 0)
    want = torch.exp(stored.logits[0].double() - stored.logsumexp[0].double())
    torch.testing.assert_close(p[stored.indices[0]], want, rtol=1e-6, atol=0)  # float32 dense logits
    rest = torch.ones(10, dtype=torch.bool)
    rest[stored.indices[0]] = False
    torch.testing.assert_close(p[rest], torch.full((7,), (1 - float(want.sum())) / 7, dtype=torch.float64),
                               rtol=1e-6, atol=0)  # fmt: skip
