"""A data loader starts one worker per batch at most: ``--workers 1000`` on 24 samples started 1000
processes that got nothing (4 minutes before the first batch). The loaders of training, of the
streaming data path and of precompute are capped; the batches, keyed, are the same."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from kd.core.data import loader as data_loader
from kd.core.data import open_source
from kd.models import digits_student
from kd.precompute import batch_loader
from kd.student_trainer.train import TrainConfig, train_student


def npz(tmp_path: Path, n: int = 24) -> str:
    rs = np.random.RandomState(0)
    np.savez(tmp_path / "d.npz", x=rs.rand(n, 64).astype(np.float32), y=np.arange(n) % 10)
    return f"npz:{tmp_path / 'd.npz'}"


def test_the_streaming_and_precompute_loaders_start_a_worker_per_batch_at_most(tmp_path: Path) -> None:
    source = open_source(npz(tmp_path))
    assert data_loader(source, batch_size=12, workers=1000).num_workers == 2  # 24 samples: 2 batches
    assert data_loader(source, batch_size=12, workers=1).num_workers == 1
    assert data_loader(source, batch_size=12, workers=0).num_workers == 0
    keys = np.arange(24, dtype=np.int64)
    assert batch_loader(source, keys, batch_size=16, views=1, workers=1000).num_workers == 2
    plain = [b.inputs for b in data_loader(source, batch_size=12, workers=0)]
    capped = [b.inputs for b in data_loader(source, batch_size=12, workers=1000)]
    assert all(torch.equal(a, b) for a, b in zip(plain, capped, strict=True))


def test_training_starts_a_worker_per_batch_at_most(tmp_path: Path) -> None:
    source = open_source(npz(tmp_path))
    notes = tmp_path / "workers"
    notes.mkdir()

    class Noting(type(source)):  # the same source, noting how many workers its reader has
        def get(self, *args, **kwargs):
            info = torch.utils.data.get_worker_info()
            if info is not None:
                (notes / str(os.getpid())).write_text(str(info.num_workers))
            return super().get(*args, **kwargs)

    noting = Noting.__new__(Noting)
    noting.__dict__.update(source.__dict__)
    config = TrainConfig(method="ce", epochs=1, batch_size=8, workers=50, seed=0)
    train_student(digits_student(), noting, source, config, subset=torch.arange(16))  # 2 batches
    assert sorted(p.read_text() for p in notes.iterdir()) == ["2", "2"]  # 2 workers, one batch each
