"""Session 17's CLI leftovers: each a refusal before any work where a run used to fail late or take a
value it then ignored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from kd.cli import app
from tests.cli_checks import refused


def _npz(path: Path, n: int, features: int, classes: int = 10) -> str:
    """An npz dataset of ``n`` samples of ``features`` values in ``classes`` classes."""
    g = np.random.default_rng(0)
    np.savez(path, x=g.normal(size=(n, features)).astype(np.float32), y=np.arange(n) % classes)
    return f"npz:{path}"


def test_train_refuses_a_val_dataset_of_another_sample_shape_before_training(tmp_path: Path) -> None:
    """The student is evaluated on --val-dataset after each epoch: a split of 12 features for the
    64-feature digits student trained epoch 1 (its checkpoint written) and then failed with torch's
    shape error. Refused up front now, naming both shapes, with nothing written."""
    train, val = _npz(tmp_path / "train.npz", 40, 64), _npz(tmp_path / "val.npz", 20, 12)
    run = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "--method", "ce", "--dataset", train, "--val-dataset", val, "--epochs", "1",
                                 "--run-dir", str(run)])  # fmt: skip
    refused(r, "--student 'kd.models:digits_student' cannot take the samples of --val-dataset", "shaped [12]",
            "while --dataset", "are shaped [64]")  # fmt: skip
    assert not run.exists()
    # the same student and splits of one shape train (the check refuses only what would fail)
    r = CliRunner().invoke(app, ["train", "--method", "ce", "--dataset", train, "--val-dataset", train, "--epochs",
                                 "1"])  # fmt: skip
    assert r.exit_code == 0, r.output
