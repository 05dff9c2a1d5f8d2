"""`kd demo-datafree --quick` end to end: a real `kd serve` subprocess with one teacher name per
access tier, every registered data-free method run against it, queries accounted by the server."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kd.core.data import load_dataset
from kd.student_trainer.datafree import DATAFREE
from kd.teacher_server.loading import load_teacher

TEST = load_dataset("digits", "test")


def test_demo_datafree_quick_runs_every_method_at_its_tier(tmp_path: Path) -> None:
    out = tmp_path / "df"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "kd", "demo-datafree", "--quick", "--teacher-epochs", "2",
                        "--out", str(out)], capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == set(DATAFREE)
    assert res["server_exit_code"] == 0 and res["problems"] == []
    # the reported teacher accuracy is that of the weights the server loaded
    teacher = load_teacher("t", f"kd.models:digits_cnn@{out / 'teacher.safetensors'}").model
    with torch.no_grad():
        correct = int((teacher(TEST.inputs).argmax(1) == TEST.labels).sum())
    assert res["teacher_acc"] == pytest.approx(correct / len(TEST), abs=1e-9)
    for name, m in res["methods"].items():
        assert m.get("error") is None, (name, m.get("error"))
        assert m["tier"] == DATAFREE[name].tier
        # an accuracy on this test split: a whole number of its samples
        assert m["test_acc"] * len(TEST) == pytest.approx(round(m["test_acc"] * len(TEST)), abs=1e-6), name
        # What the run reports is what the server counted for its client id.
        assert (m["samples"], m["gradient_samples"]) == (m["server_samples"], m["server_gradient_samples"]), name
        assert m["queries"] == m["samples"] + m["gradient_samples"] > 0, name
        if m["tier"] in ("scores", "labels"):  # black-box methods never ask for gradients
            assert m["gradient_samples"] == 0, name
        # the student trained through the shared trainer: its run directory's last row is the result
        with open(out / "runs" / name / "metrics.csv", newline="") as f:
            assert float(list(csv.DictReader(f))[-1]["test_acc"]) == m["test_acc"], name
    assert "kd demo-datafree" in r.stdout


def test_demo_datafree_exits_1_when_a_method_fails(tmp_path: Path) -> None:
    """A data-free method registered through the public registry that raises: the demo records it,
    still writes results.json, and exits 1 naming it (it used to exit 0 whatever happened)."""
    code = (
        "import sys\n"
        "from kd.student_trainer.datafree import register\n"
        "@register('broken', 'a method that raises', tier='scores')\n"
        "def broken(teacher, student, config, **options):\n"
        "    raise RuntimeError('broken on purpose')\n"
        "from kd.cli import app\n"
        "app(sys.argv[1:], prog_name='kd')\n"
    )
    out = tmp_path / "df"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code, "demo-datafree", "--quick", "--method", "broken", "--out",
                        str(out)], capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    assert "broken failed: RuntimeError: broken on purpose" in " ".join(r.stderr.split())
    res = json.loads((out / "results.json").read_text())
    assert res["problems"] == ["broken failed: RuntimeError: broken on purpose"]
