"""`kd demo-datafree --quick` end to end: a real `kd serve` subprocess with one teacher name per
access tier, every registered data-free method run against it, queries accounted by the server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from kd.student_trainer.datafree import DATAFREE


def test_demo_datafree_quick_runs_every_method_at_its_tier(tmp_path: Path) -> None:
    out = tmp_path / "df"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "kd", "demo-datafree", "--quick", "--teacher-epochs", "2",
                        "--out", str(out)], capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == set(DATAFREE)
    assert res["server_exit_code"] == 0 and 0 <= res["real_data_kd_acc"] <= 1 and 0 <= res["teacher_acc"] <= 1
    for name, m in res["methods"].items():
        assert m.get("error") is None, (name, m.get("error"))
        assert m["tier"] == DATAFREE[name].tier
        assert 0 <= m["test_acc"] <= 1, name
        # What the run reports is what the server counted for its client id.
        assert (m["samples"], m["gradient_samples"]) == (m["server_samples"], m["server_gradient_samples"]), name
        assert m["queries"] == m["samples"] + m["gradient_samples"] > 0, name
        if m["tier"] in ("scores", "labels"):  # black-box methods never ask for gradients
            assert m["gradient_samples"] == 0, name
    assert "kd demo-datafree" in r.stdout
