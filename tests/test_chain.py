"""`kd chain` through the CLI: real `kd serve` subprocesses on loopback, one per stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from kd.chain import tolerant_loss
from kd.teacher_server.loading import load_teacher

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


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
    assert 0.0 <= teacher["test_acc"] <= 1.0
    stages = result["runs"][0]["stages"]
    assert [s["stage"] for s in stages] == list(range(1, len(models) + 1))
    assert [s["model"] for s in stages] == models
    prev_weights = Path(teacher["spec"].split("@", 1)[1])
    prev_factory = teacher["model"]
    for s in stages:
        assert 0.0 <= s["test_acc"] <= 1.0 and s["params"] > 0 and s["seconds"] >= 0
        assert s["server_exit_code"] == 0
        # the model served at this stage is exactly the previous stage's saved weights
        assert s["served_fingerprint"] == load_teacher("prev", f"{prev_factory}@{prev_weights}").fingerprint
        weights = out / f"stage-{s['stage']}.safetensors"
        assert weights.is_file()
        assert s["fingerprint"] == load_teacher("this", f"{s['model']}@{weights}").fingerprint
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
    assert 0.0 <= direct["test_acc"] <= 1.0
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
    assert 0.0 <= result["runs"][0]["ensemble_acc"] <= 1.0
    assert "direct" not in result["runs"][0]


def test_bad_mode_is_refused(tmp_path: Path):
    r = kd_chain("--mode", "nope", "--out", str(tmp_path))
    assert r.returncode == 2 and "--mode" in r.stderr


def test_tolerant_loss():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0]])
    labels = torch.tensor([0])
    ce = torch.nn.functional.cross_entropy(logits, labels)
    # gap between top-1 (3) and the mean of the next K-1 = 2 logits (1, 0): 2.5
    torch.testing.assert_close(tolerant_loss(logits, labels, 0.4, k=3), ce + 0.4 * 2.5)
    torch.testing.assert_close(tolerant_loss(logits, labels, 0.0), ce)
