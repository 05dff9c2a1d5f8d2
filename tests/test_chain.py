"""`kd chain` through the CLI: real `kd serve` subprocesses on loopback, one per stage."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_checks import refused
from typer.testing import CliRunner

from kd.chain import run_chain, tolerant_loss
from kd.cli import app
from kd.core.data import load_dataset
from kd.teacher_server.loading import load_teacher

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
TEST = load_dataset("digits", "test")


@torch.no_grad()
def probs_of(spec: str) -> torch.Tensor:
    """Test-split probabilities of the model saved at ``spec`` (module:factory@weights)."""
    return torch.softmax(load_teacher("check", spec).model(TEST.inputs), dim=1)


def acc_of(probs: torch.Tensor) -> float:
    return int((probs.argmax(1) == TEST.labels).sum()) / len(TEST)


def kd_chain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kd", "chain", "--epochs", "3", "--teacher-epochs", "3", "--labeled", "100", *args],
        capture_output=True,
        text=True,
        timeout=240,
        env=ENV,
    )


def check_chain(out: Path, models: list[str]) -> dict:
    result = json.loads((out / "chain.json").read_text())
    teacher = result["teacher"]
    # every reported accuracy is that of the saved weights on the test split
    assert teacher["test_acc"] == pytest.approx(acc_of(probs_of(teacher["spec"])), abs=1e-6)  # 1/599 apart
    stages = result["runs"][0]["stages"]
    assert [s["stage"] for s in stages] == list(range(1, len(models) + 1))
    assert [s["model"] for s in stages] == models
    prev_weights = Path(teacher["spec"].split("@", 1)[1])
    prev_factory = teacher["model"]
    for s in stages:
        assert s["params"] > 0 and s["seconds"] >= 0
        assert s["server_exit_code"] == 0
        # the model served at this stage is exactly the previous stage's saved weights
        assert s["served_fingerprint"] == load_teacher("prev", f"{prev_factory}@{prev_weights}").fingerprint
        weights = out / f"stage-{s['stage']}.safetensors"
        assert weights.is_file()
        assert s["fingerprint"] == load_teacher("this", f"{s['model']}@{weights}").fingerprint
        assert s["test_acc"] == pytest.approx(acc_of(probs_of(f"{s['model']}@{weights}")), abs=1e-6)
        assert (out / f"server-stage-{s['stage']}.log").is_file()
        prev_weights, prev_factory = weights, s["model"]
    return result


def test_takd_chain(tmp_path: Path):
    out = tmp_path / "takd"
    models = ["kd.chain:digits_assistant", "kd.models:digits_student"]
    r = kd_chain("--mode", "takd", "--model", models[0], "--model", models[1], "--out", str(out))
    assert r.returncode == 0, r.stderr
    result = check_chain(out, models)
    assert result["teacher"]["model"] == "kd.models:digits_teacher"
    direct = result["runs"][0]["direct"]
    # not saved: at least a count of correct test samples, and not the chained student's result
    assert direct["test_acc"] * len(TEST) == pytest.approx(round(direct["test_acc"] * len(TEST)), abs=1e-3)
    assert direct["teacher_fingerprint"] == result["teacher"]["fingerprint"]
    assert "kd chain (takd)" in r.stdout


def test_born_again_chain_with_tolerant_teacher(tmp_path: Path):
    out = tmp_path / "ban"
    student = "kd.models:digits_student"
    r = kd_chain("--mode", "born-again", "--teacher-factory", student, "--model", student, "--model", student,
                 "--tolerant-gamma", "0.5", "--out", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = check_chain(out, [student, student])
    assert result["teacher"]["tolerant_gamma"] == 0.5
    # the ensemble is the mean softmax of the generations' saved weights
    mean = torch.stack([probs_of(f"{student}@{out / f'stage-{i}.safetensors'}") for i in (1, 2)]).mean(0)
    assert result["runs"][0]["ensemble_acc"] == pytest.approx(acc_of(mean), abs=1e-6)
    assert "direct" not in result["runs"][0]


def test_bad_mode_is_refused(tmp_path: Path):
    # In process, as the option checks below: an interpreter importing torch for one refusal took seconds.
    r = CliRunner().invoke(app, ["chain", "--epochs", "3", "--teacher-epochs", "3", "--labeled", "100", "--mode",
                                 "nope", "--out", str(tmp_path / "out")])  # fmt: skip
    refused(r, "--mode must be one of takd, born-again")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--alpha", "2"], "option alpha=2.0 must be >= 0 and <= 1"),
        (["-T", "nan"], "option temperature=nan must be finite"),
        (["--tolerant-gamma", "-1"], "--tolerant-gamma must be a finite number >= 0 (0: off), got -1.0"),
        (["--tolerant-gamma", "nan"], "--tolerant-gamma must be a finite number >= 0 (0: off), got nan"),
        (["--model", "kd.models:digits_student", "--model", "kd.models:no_such_model"],
         "module 'kd.models' has no attribute 'no_such_model'"),
        (["--model", "kd.models:digits_student@w.safetensors"], "@WEIGHTS is for teachers"),
        (["--labeled", "5000"], "labeled must be <= 1198 (the samples of digits:train), got 5000"),
        (["--optimizer", "lamb"], "unknown optimizer 'lamb'"),
        (["--dataset", "npz:/no/such.npz"], "/no/such.npz"),
        (["--model", "kd.models:digits_student", "--model", "kd.models:MLP?sizes=[64,16,20]"],
         "model 'kd.models:MLP?sizes=[64,16,20]' gives 20 outputs per sample but digits/train"),
    ],
)  # fmt: skip
def test_chain_options_are_checked_before_the_teacher_trains(tmp_path: Path, args: list[str], why: str):
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["chain", "--epochs", "1", "--teacher-epochs", "1", "--no-serve", "--out", str(out),
                                 *args])  # fmt: skip
    assert r.exit_code == 2, r.output
    assert r.output.count("error:") == 1 and "Traceback" not in r.output, r.output
    assert why in " ".join(r.output.split())
    assert not out.exists()  # refused before anything was trained or written


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [({"alpha": 2.0}, "alpha=2.0"), ({"tolerant_gamma": float("nan")}, "tolerant_gamma must be"),
     ({"tolerant_gamma": -1.0}, "tolerant_gamma must be"), ({"epochs": 0}, "epochs must be >= 1"),
     ({"tolerant_k": 1}, "tolerant_k must be >= 2"), ({"models": ["kd.models:no_such_model"]}, "no_such_model")],
)  # fmt: skip
def test_run_chain_checks_its_arguments_first(tmp_path: Path, kwargs: dict, why: str):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=re.escape(why)):
        run_chain(out, epochs=kwargs.pop("epochs", 1), teacher_epochs=1, serve=False, **kwargs)
    assert not out.exists()


def test_tolerant_loss():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0]])
    labels = torch.tensor([0])
    ce = torch.nn.functional.cross_entropy(logits, labels)
    # gap between top-1 (3) and the mean of the next K-1 = 2 logits (1, 0): 2.5
    torch.testing.assert_close(tolerant_loss(logits, labels, 0.4, k=3), ce + 0.4 * 2.5)
    torch.testing.assert_close(tolerant_loss(logits, labels, 0.0), ce)


def _blobs(path: Path, n: int, seed: int) -> str:
    """An npz of ``n`` samples of 12 features in 3 classes (a Gaussian blob per class)."""
    import numpy as np

    g = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = (g.normal(size=(n, 12)) + 2.0 * np.eye(3, 12)[y] * 1.5).astype(np.float32)
    np.savez(path, x=x, y=y)
    return f"npz:{path}"


def test_a_chain_on_the_users_own_data_with_a_recipe(tmp_path: Path) -> None:
    """kd chain reads any dataset URI (an npz here, 90 samples: every one, as --labeled is left out),
    trains each stage with the recipe flags (SGD, cosine, batch 16), and each stage is exactly the
    model train_student makes from the previous stage's saved weights with that recipe."""
    from kd.core.data import open_source
    from kd.student_trainer.sources import LocalSource
    from kd.student_trainer.train import TrainConfig, seed_everything, train_student

    train, val = _blobs(tmp_path / "train.npz", 90, 0), _blobs(tmp_path / "val.npz", 60, 1)
    mlp = "kd.models:MLP?sizes=[12,8,3]"
    teacher = tmp_path / "teacher.safetensors"
    seed_everything(0)
    from kd.core.factory import build
    from kd.teacher_server.loading import save_weights

    t = build("kd.models:MLP?sizes=[12,32,3]", "teacher")
    train_student(t, open_source(train), open_source(val), TrainConfig(method="ce", epochs=5, batch_size=16))
    save_weights(t, teacher)
    out = tmp_path / "out"
    args = ["chain", "--mode", "born-again", "--teacher", f"kd.models:MLP@{teacher}?sizes=[12,32,3]", "--model", mlp,
            "--dataset", train, "--val-dataset", val, "--epochs", "2", "--batch-size", "16", "--optimizer", "sgd",
            "--lr", "0.05", "--schedule", "cosine", "--no-serve", "--out", str(out)]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    result = json.loads((out / "chain.json").read_text())
    assert (result["dataset"], result["labeled_samples"], result["batch_size"]) == (open_source(train).dataset_id,
                                                                                      90, 16)  # fmt: skip
    assert (result["recipe"]["optimizer"], result["recipe"]["schedule"]) == ("sgd", "cosine")

    seed_everything(0)
    want = build(mlp, "student")
    subset = torch.randperm(90, generator=torch.Generator().manual_seed(1000))[:90]
    cfg = TrainConfig(method="kd", method_options={"temperature": 4.0, "alpha": 0.9}, epochs=2, seed=0,
                      batch_size=16, optimizer="sgd", lr=0.05, schedule="cosine")  # fmt: skip
    train_student(want, open_source(train), open_source(val), cfg, subset=subset,
                  source=LocalSource(f"kd.models:MLP@{teacher}?sizes=[12,32,3]"))  # fmt: skip
    got = load_teacher("s", f"{mlp.split('?')[0]}@{out / 'stage-1.safetensors'}?sizes=[12,8,3]").model
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), want.state_dict().values()))
    stage = result["runs"][0]["stages"][0]
    from kd.student_trainer.train import accuracy

    assert stage["test_acc"] == accuracy(got, open_source(val))


def test_labeled_defaults_to_the_digits_experiments_100_and_to_all_of_another_dataset(tmp_path: Path) -> None:
    from kd.chain import open_splits

    assert open_splits("digits:train", "digits:test", None)[2] == 100
    assert open_splits(_blobs(tmp_path / "d.npz", 30, 0), "digits:test", None)[2] == 30
    assert open_splits("digits:train", "digits:test", 7)[2] == 7


def _alive_with(text: str) -> list[int]:
    """Pids of live processes whose command line holds ``text``."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def test_sigterm_stops_a_chain_at_a_step_and_stops_its_stage_server(tmp_path: Path) -> None:
    """A SIGTERM while a stage trains from its served teacher: one "stopped by" line, exit 143, the
    teacher's weights kept, the stage in training not saved, and its kd serve process stopped
    (killed outright before, the chain left its server running)."""
    import signal
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "kd", "chain", "--epochs", "100000", "--teacher-epochs", "1",
                             "--labeled", "100", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not (out / "server-stage-1.log.port").exists():  # stage 1's server listens: training begins
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    line = [x for x in err.splitlines() if x.startswith("stopped by")]
    assert len(line) == 1 and re.fullmatch(r"stopped by SIGTERM: training kd.chain:digits_assistant \(seed 0\), in "
                                           r"epoch \d+ after \d+ step\(s\); the stages finished before are in .*",
                                           " ".join(line[0].split())), line  # fmt: skip
    assert (out / "stage-0.safetensors").is_file() and not (out / "stage-1.safetensors").exists()
    assert _alive_with(str(out / "server-stage-1.log.port")) == []


def test_ctrl_c_while_a_stage_server_starts_is_a_stop_not_a_failed_server(tmp_path: Path) -> None:
    """Ctrl-C signals the terminal's whole process group: the stage's kd serve child, still starting,
    dies of it. The chain says it was stopped (exit 130, one line), not 'kd serve exited with -2'
    (exit 1, which it said before), and leaves no server running."""
    import signal
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "kd", "chain", "--epochs", "100000", "--teacher-epochs", "1",
                             "--labeled", "100", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not (out / "server-stage-1.log").exists():  # the child is spawned: it imports for seconds
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)
        assert not (out / "server-stage-1.log.port").exists()  # still starting
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the chain and its child
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "error:" not in err, err[-3000:]
    line = [x for x in err.splitlines() if x.startswith("stopped by")]
    assert len(line) == 1 and " ".join(line[0].split()).startswith(
        "stopped by SIGINT: starting the server of stage 1 (seed 0); the stages finished before are in"
    ), line
    assert (out / "stage-0.safetensors").is_file() and not (out / "stage-1.safetensors").exists()
    assert _alive_with(str(out / "server-stage-1.log.port")) == []


def test_a_stop_in_the_direct_baseline_keeps_the_finished_first_stage(tmp_path: Path) -> None:
    """TAKD trains the direct baseline (teacher -> last model) after stage 1, from stage 1's server.
    A stop there must leave stage 1, which finished, in --out: it was saved only after the baseline,
    so the stop lost it while the message said the finished stages were kept."""
    from kd.core.signals import Stopped

    calls = []

    def stop() -> int | None:
        # asked before every step and once more at each epoch's end: the teacher's epoch (1198
        # samples in batches of 64: 20), stage 1's (100 samples, batch 64: 3), then the baseline's first step
        calls.append(1)
        return 15 if len(calls) == 24 else None

    with pytest.raises(Stopped) as stopped:
        run_chain(tmp_path, mode="takd", epochs=1, teacher_epochs=1, serve=False, stop=stop, batch_size=64)
    assert stopped.value.where.startswith("training kd.models:digits_student (seed 0), in epoch 0 after 0 step(s)")
    assert (tmp_path / "stage-1.safetensors").is_file() and not (tmp_path / "stage-2.safetensors").exists()


def test_a_val_split_the_models_cannot_take_is_refused_before_the_teacher_trains(tmp_path: Path) -> None:
    """Every model is evaluated on --val-dataset after each epoch: a split of 12 features for digits'
    64-feature models failed there, after the teacher's first epoch, with torch's shape error (exit
    1). It is refused up front now (exit 2, one line naming the split), and the same for --model."""
    val = _blobs(tmp_path / "val.npz", 30, 0)
    out = tmp_path / "out"
    cases = [([], "teacher factory 'kd.models:digits_teacher'"),
             (["--teacher", "kd.models:MLP?sizes=[12,8,10]"], "model 'kd.chain:digits_assistant'")]  # fmt: skip
    for extra, who in cases:
        r = CliRunner().invoke(app, ["chain", "--epochs", "1", "--teacher-epochs", "1", "--no-serve", "--out", str(out),
                                     "--val-dataset", val, *extra])  # fmt: skip
        refused(r, f"{who} cannot take the samples of val_dataset", "shaped [12]")
        assert not out.exists()


def test_the_default_stage_recipe_is_the_one_before_the_recipe_flags(tmp_path: Path) -> None:
    """The stages trained with TrainConfig's defaults (Adam, lr 3e-3, batch 32) before kd chain took
    recipe flags; the flags' defaults (lr 1e-3, batch 64) changed every default chain, whose
    published digits numbers came from the old recipe. A stage of a default chain is again the
    model train_student makes with TrainConfig's defaults, bit for bit."""
    from kd.core.factory import build
    from kd.student_trainer.sources import LocalSource
    from kd.student_trainer.train import TrainConfig, seed_everything, train_student
    from kd.teacher_server.loading import save_weights

    seed_everything(0)
    weights = save_weights(build("kd.models:digits_teacher", "teacher"), tmp_path / "t.safetensors")
    teacher = f"kd.models:digits_teacher@{weights}"
    out = tmp_path / "out"
    args = ["chain", "--mode", "born-again", "--teacher", teacher, "--model", "kd.models:digits_student",
            "--epochs", "2", "--no-serve", "--out", str(out)]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    result = json.loads((out / "chain.json").read_text())
    assert (result["batch_size"], result["recipe"]["lr"], result["recipe"]["optimizer"]) == (32, 3e-3, "adam")

    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    seed_everything(0)
    want = build("kd.models:digits_student", "student")
    subset = torch.randperm(len(train), generator=torch.Generator().manual_seed(1000))[:100]
    cfg = TrainConfig(method="kd", method_options={"temperature": 4.0, "alpha": 0.9}, epochs=2, seed=0)
    train_student(want, train, test, cfg, source=LocalSource(teacher), subset=subset)
    got = load_teacher("s", f"kd.models:digits_student@{out / 'stage-1.safetensors'}").model
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), want.state_dict().values()))
