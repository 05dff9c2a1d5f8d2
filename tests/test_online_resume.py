"""Checkpoints of online methods: a run interrupted after an epoch and resumed from its run
directory ends with the same weights as an uninterrupted run -- the student, and every extra
module the method trains beside it (PCL's temporal mean and its EMA step counter; DCM's second
network and its optimiser; DIST+'s acclimated teacher and its optimiser) -- and a checkpoint of
another method or other options is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kd.cli import app
from kd.core.data import load_dataset
from kd.models import digits_cnn
from kd.student_trainer.online import OnlineResult, train_online
from kd.student_trainer.train import TrainConfig

TRAIN = load_dataset("digits", "train")
TEST = load_dataset("digits", "test")
SUBSET = torch.arange(64)
CONFIG = TrainConfig(epochs=3, batch_size=32, seed=3)


class Interrupt(Exception):
    pass


def _teacher() -> torch.nn.Module:
    torch.manual_seed(11)
    return digits_cnn()


def _run(name: str, run_dir: Path | None, options: dict, **kwargs) -> OnlineResult:
    teacher = _teacher() if name == "dist-plus" else None
    return train_online(name, TRAIN, TEST, CONFIG, subset=SUBSET, options=options, run_dir=run_dir, teacher=teacher,
                        **kwargs)  # fmt: skip


def _weights(res: OnlineResult) -> dict[str, torch.Tensor]:
    modules = {"student": res.student, **res.others}
    return {f"{k}.{n}": v for k, m in modules.items() for n, v in m.state_dict().items()}


# pcl: an EMA model outside any optimiser, and a step counter; dcm and dist-plus: an extra module with its
# own (Adam) optimiser. A large EMA decay keeps the counter's warm-up (1 - 1/(t+1)) active across the
# interruption, so a lost counter would change the temporal mean.
@pytest.mark.parametrize(("name", "options"), [("pcl", {"ema_decay": 0.999, "rampup": 0.5}), ("dcm", {}),
                                               ("dist-plus", {})])  # fmt: skip
def test_an_interrupted_run_resumes_to_the_uninterrupted_weights(tmp_path: Path, name: str, options: dict) -> None:
    straight = _run(name, tmp_path / "a", options)

    def stop_after_first(epoch: int, loss: float, acc: float) -> None:
        if epoch == 0:
            raise Interrupt

    with pytest.raises(Interrupt):
        _run(name, tmp_path / "b", options, on_epoch=stop_after_first)
    resumed = _run(name, tmp_path / "b", options, resume=True)  # fresh modules, as a new process builds them

    want, got = _weights(straight), _weights(resumed)
    assert want.keys() == got.keys() and len(want) > len(dict(resumed.student.state_dict()))
    for k, v in want.items():
        assert torch.allclose(v.double(), got[k].double(), rtol=0, atol=1e-6), k
    assert resumed.acc_per_epoch == straight.acc_per_epoch and len(resumed.acc_per_epoch) == 3
    assert resumed.accuracies == straight.accuracies


def test_a_checkpoint_of_another_method_or_other_options_is_refused(tmp_path: Path) -> None:
    one_epoch = TrainConfig(epochs=1, batch_size=32, seed=3)
    train_online("pcl", TRAIN, TEST, one_epoch, subset=SUBSET, run_dir=tmp_path)
    with pytest.raises(ValueError, match="cannot resume: the checkpoint is of .*'pcl'"):
        train_online("okddip", TRAIN, TEST, one_epoch, subset=SUBSET, run_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="cannot resume: the checkpoint is of .*'ema_decay': 0.999"):
        train_online("pcl", TRAIN, TEST, one_epoch, subset=SUBSET, run_dir=tmp_path, resume=True,
                     options={"ema_decay": 0.9})  # fmt: skip
    # a method with a pretrained teacher: a resume with another teacher is refused, the same one continues
    train_online("dist-plus", TRAIN, TEST, one_epoch, subset=SUBSET, run_dir=tmp_path / "t", teacher=_teacher())
    other = _teacher()
    with torch.no_grad():
        other.head.bias.add_(0.5)  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="cannot resume: the checkpoint is of .*'teacher'"):
        train_online("dist-plus", TRAIN, TEST, one_epoch, subset=SUBSET, run_dir=tmp_path / "t", resume=True,
                     teacher=other)  # fmt: skip
    train_online("dist-plus", TRAIN, TEST, one_epoch, subset=SUBSET, run_dir=tmp_path / "t", resume=True,
                 teacher=_teacher())  # fmt: skip


def test_kd_online_resume_restores_every_head(tmp_path: Path) -> None:
    runner = CliRunner()
    cmd = ["online", "pcl", "--epochs", "2", "--labeled", "64", "--run-dir", str(tmp_path)]
    first = runner.invoke(app, cmd)
    assert first.exit_code == 0, first.output
    # every epoch is done: --resume trains nothing, and the heads it evaluates (the temporal mean's too)
    # are the checkpoint's
    again = runner.invoke(app, [*cmd, "--resume"])
    assert again.exit_code == 0, again.output
    a, b = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (first, again))
    assert b["accuracies"] == a["accuracies"] and b["acc_per_epoch"] == a["acc_per_epoch"]
    assert (tmp_path / "checkpoint.pt").exists()
    bad = runner.invoke(app, ["online", "pcl", "--epochs", "1", "--resume"])
    assert bad.exit_code == 2 and "give --run-dir" in bad.output, bad.output


def test_a_module_trained_as_extra_is_saved_once(tmp_path: Path) -> None:
    """DCM's second network is an ``extra`` module (saved by the loop with its optimiser) and one of
    the method's ``others``: the checkpoint holds it once, and the resume test above shows the
    loop's copy is enough. PCL's temporal mean, outside any optimiser, stays in ``others``."""
    one_epoch = TrainConfig(epochs=1, batch_size=32, seed=3)
    res = train_online("dcm", TRAIN, TEST, one_epoch, subset=SUBSET, run_dir=tmp_path / "dcm")
    ckpt = torch.load(tmp_path / "dcm" / "checkpoint.pt", map_location="cpu", weights_only=True)
    peer = res.others["peer"].state_dict()
    assert len(ckpt["extra"]) == 1 and ckpt["extra"][0]["module"].keys() == peer.keys()
    assert ckpt["hooks"]["others"] == {}
    train_online("pcl", TRAIN, TEST, one_epoch, subset=SUBSET, run_dir=tmp_path / "pcl")
    pcl = torch.load(tmp_path / "pcl" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert list(pcl["hooks"]["others"]) == ["temporal_mean"] and pcl["extra"] == []
