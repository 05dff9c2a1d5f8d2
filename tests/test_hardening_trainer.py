"""Trainer and CLI hardening (issue 14, items 16-17): method options are validated with a
message naming them, run-directory files are replaced atomically, and resuming refuses a
missing, truncated or malicious checkpoint with a message naming the file."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from cli_checks import refused
from typer.testing import CliRunner

from kd.cli import app
from kd.core.data import load_dataset
from kd.models import digits_student
from kd.student_trainer.losses import get_method
from kd.student_trainer.sources import LocalSource
from kd.student_trainer.train import TrainConfig, seed_everything, train_student
from kd.teacher_server.loading import Teacher

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def run(data, teacher: Teacher | None, config: TrainConfig, **kw):
    train, test = data
    seed_everything(config.seed)
    student = digits_student()
    source = None if teacher is None else LocalSource(teacher)
    return student, train_student(student, train, test, config, source=source, subset=torch.arange(64), **kw)


# ---- item 16: every option is validated, with a message naming it ----

BAD_OPTIONS = [
    ("kd", "temperature", math.nan, "must be finite"),
    ("kd", "temperature", math.inf, "must be finite"),
    ("kd", "temperature", 0, "must be > 0"),
    ("kd", "temperature", -1.0, "must be > 0"),
    ("kd", "temperature", "4", "must be a number"),
    ("kd", "alpha", 2, "must be >= 0 and <= 1"),
    ("kd", "alpha", -0.1, "must be >= 0 and <= 1"),
    ("dkd", "beta", -8.0, "must be >= 0"),
    ("dkd", "warmup", 2.5, "must be an integer"),
    ("eskd", "stop_fraction", 1.5, "must be >= 0 and <= 1"),
    ("fitnet", "kd_temperature", math.nan, "must be finite"),
    ("fitnet", "ce_weight", -1.0, "must be >= 0"),
    ("fitnet", "weight", math.inf, "must be finite"),
]


@pytest.mark.parametrize(("method", "name", "value", "why"), BAD_OPTIONS)
def test_method_options_out_of_range_are_refused(method: str, name: str, value: object, why: str) -> None:
    with pytest.raises(ValueError, match=f"method '{method}': option {name}=.* {why}"):
        get_method(method).check_options({name: value})


def test_valid_options_pass_and_method_specific_ranges_apply() -> None:
    get_method("kd").check_options({"temperature": 1e-3, "alpha": 0.0})
    get_method("kd").check_options({"temperature": 20, "alpha": 1})
    get_method("dkd").check_options({"alpha": 2.0, "warmup": 20.0})  # DKD's alpha is a weight, not a mix
    get_method("noisy").check_options({"seed": None})
    with pytest.raises(TypeError, match=r"method 'kd' has no option\(s\) \['temprature'\]"):
        get_method("kd").check_options({"temprature": 4})


def test_training_refuses_a_nan_temperature_at_its_first_step(data, teacher: Teacher) -> None:
    with pytest.raises(ValueError, match="option temperature=nan must be finite"):
        run(data, teacher, TrainConfig(method="kd", epochs=1, method_options={"temperature": math.nan}))


def test_cli_refuses_bad_train_options_and_precompute_temperatures(
    tmp_path: Path, teacher_spec: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In process (the CLI's own code path, as `python -m kd` runs it): four interpreters importing
    # torch took ~12 s of CI for four refusals.
    monkeypatch.chdir(ROOT)
    r = CliRunner().invoke(app, ["train", "--method", "kd", "--opt", "temperature=NaN", "--epochs", "1"])
    refused(r, "option temperature=nan must be finite")
    for t in ("-1", "inf", "nan"):
        out = tmp_path / f"c{t}"
        r = CliRunner().invoke(app, ["precompute", "--source", f"local:{teacher_spec}", "--out", str(out), "--codec",
                                     "sample:4", "--temperature", t])  # fmt: skip
        refused(r, "--temperature must be a finite number > 0")
        assert not out.exists()  # refused before a cache was written


# ---- item 17: run-directory files and resume ----


def test_metrics_and_checkpoint_are_replaced_never_rewritten_in_place(data, teacher: Teacher, tmp_path: Path) -> None:
    """A reader (or a kill) sees either the old file or the new one: each epoch writes a new file and
    renames it over the old one, so the file open before the epoch still holds its complete old content."""
    train, test = data
    run_dir = tmp_path / "run"
    seen: dict[str, tuple[int, bytes]] = {}

    def watch(epoch: int, loss: float, acc: float) -> None:
        for name in ("metrics.csv", "checkpoint.pt", "config.json"):
            path = run_dir / name
            if name in seen:
                inode, before = seen[name]
                if name != "config.json":
                    assert path.stat().st_ino != inode, f"{name} was rewritten in place"
                with open(f"/proc/self/fd/{fds[name]}", "rb") as old:
                    assert old.read() == before, f"{name}'s previous version changed"
            seen[name] = (path.stat().st_ino, path.read_bytes())
            fds[name] = os.open(path, os.O_RDONLY)

    fds: dict[str, int] = {}
    try:
        seed_everything(0)
        train_student(digits_student(), train, test, TrainConfig(method="kd", epochs=3), source=LocalSource(teacher),
                      subset=torch.arange(64), run_dir=run_dir, on_epoch=watch)  # fmt: skip
    finally:
        for fd in fds.values():
            os.close(fd)
    assert seen["metrics.csv"][1].decode().count("\n") == 4  # header + 3 epochs
    assert not list(run_dir.glob("*.tmp"))


def test_resume_without_a_checkpoint_is_refused(data, teacher: Teacher, tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    with pytest.raises(ValueError, match=r"cannot resume '.*run': it has no checkpoint.pt"):
        run(data, teacher, TrainConfig(method="kd", epochs=2), run_dir=tmp_path / "run", resume=True)


def test_resume_from_a_truncated_checkpoint_names_the_file(data, teacher: Teacher, tmp_path: Path) -> None:
    cfg = TrainConfig(method="kd", epochs=2)
    run(data, teacher, cfg, run_dir=tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoint.pt"
    for cut in (ckpt.stat().st_size // 2, 10, 0):
        with open(ckpt, "r+b") as f:
            f.truncate(cut)
        with pytest.raises(ValueError, match=r"checkpoint '.*checkpoint.pt' is unreadable \(truncated or corrupted"):
            run(data, teacher, cfg, run_dir=tmp_path / "run", resume=True)


class _Payload:
    """Unpickling this would create a file: proof of code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_refuses_a_malicious_checkpoint_without_running_it(data, teacher: Teacher, tmp_path: Path) -> None:
    cfg = TrainConfig(method="kd", epochs=2)
    run(data, teacher, cfg, run_dir=tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    marker = tmp_path / "payload-ran"
    state["history"].append(_Payload(marker))
    torch.save(state, ckpt)
    with pytest.raises(ValueError) as err:
        run(data, teacher, cfg, run_dir=tmp_path / "run", resume=True)
    msg = str(err.value)
    assert str(ckpt) in msg and "was refused" in msg and "Do not re-run with weights_only=False" in msg, msg
    assert not marker.exists()
    # What the refusal protects against: the same file loaded without weights_only runs the payload.
    torch.load(ckpt, weights_only=False)
    assert marker.exists()


def test_every_registered_methods_defaults_pass_its_own_validation() -> None:
    """A method registered later with an option that the shared ranges would refuse at its own
    default (an ``alpha`` that is not a KD/CE mix, say) fails here, not in a user's run: give it a
    ``METHOD_OPTION_RANGES`` entry."""
    from kd.student_trainer.losses import METHODS

    for method in METHODS.values():
        method.check_options(dict(method.defaults))
