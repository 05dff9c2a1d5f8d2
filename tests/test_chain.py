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
        (["--labeled", "5000"], "labeled must be <= 1198 (the digits training split), got 5000"),
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
