"""`kd bench methods --quick` end to end, in a subprocess.

No accuracy is compared with another: --quick trains one seed for a few epochs, and a
method that loses to plain KD is not wrong. But every registered method must run: a method
that raises is a failure (listed in ``failed``, exit 1), never accepted as a skip."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kd.cli import app
from kd.student_trainer.losses import METHODS
from kd.student_trainer.online import METHODS as ONLINE


def _acc(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0


def _run(*args: str, register_broken: bool = False) -> subprocess.CompletedProcess:
    # register_broken: a user's method registered through the public registry that raises on every
    # call, as a bug in a new method would; the bench must report it.
    code = (
        "import sys\n"
        "from kd.student_trainer.losses import register\n"
        "if sys.argv[1] == 'broken':\n"
        "    @register('broken', 'a method that raises')\n"
        "    def broken(student_logits, teacher_logits, labels, *, temperature: float = 4.0):\n"
        "        raise RuntimeError('broken on purpose')\n"
        "from kd.cli import app\n"
        "app(['bench', 'methods', *sys.argv[2:]], prog_name='kd')\n"
    )
    # --threads 1 (the bench's default is 2): tiny models gain nothing from a second OpenMP thread, and on
    # a shared 2-core machine it made the quick run 3-4x slower (47-64 s against 14-21 s at load ~2.8).
    return subprocess.run(
        [sys.executable, "-c", code, "broken" if register_broken else "-", *args, "--threads", "1"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


def test_bench_methods_quick_covers_every_registered_method(tmp_path: Path) -> None:
    out = tmp_path / "methods.json"
    r = _run("--quick", "--epochs", "3", "--json", str(out))  # every method runs; accuracy is not the point
    assert r.returncode == 0, r.stderr[-4000:]
    assert "kd bench methods" in r.stdout
    res = json.loads(out.read_text())

    # Logit methods on the MLP pair, feature methods on the CNN pair: together, every method.
    assert set(res["methods"]) | set(res["feature_methods"]) == set(METHODS)
    assert set(res["feature_methods"]) == {n for n, m in METHODS.items() if m.kind == "feature"} | {"ce", "kd"}
    assert res["failed"] == []
    for name, m in res["feature_methods"].items():
        if name in ("ce", "kd"):
            continue
        assert m["matches"], name
        assert "failed" not in m and "skipped" not in m, (name, m)
        assert _acc(m["acc_mean"]) and math.isfinite(m["delta_vs_kd_mean"]), (name, m)
        # what the method's teacher features cost in the cache, per sample (fp16)
        assert m["feature_bytes_per_sample"] == sum(res["cnn"]["cache_features"][f] for f in m["teacher_features"])
    assert res["feature_methods"]["at"]["feature_bytes_per_sample"] == 2 * 2 * 64  # two 8x8 attention maps
    for name, m in res["methods"].items():
        method = METHODS[name]
        if name in ("ce", "kd") or method.kind != "feature":
            assert m["options"] == method.defaults, name  # registered defaults, no overrides
        assert m["needs_teacher"] == method.needs_teacher
        assert (m["source"] is None) == (not method.needs_teacher), (name, m["source"])
        assert "failed" not in m and "skipped" not in m, (name, m)
        assert len(m["acc_per_seed"]) == res["settings"]["seeds"] == 1
        assert all(_acc(a) for a in m["acc_per_seed"]), (name, m)
        assert _acc(m["acc_mean"]) and math.isfinite(m["acc_std"]), (name, m)
        assert math.isfinite(m["delta_vs_kd_mean"]) and math.isfinite(m["delta_vs_ce_mean"])
        assert m["seconds"] >= 0

    # The baselines are never skipped and are repeated at the top level.
    for ref in ("ce", "kd"):
        assert res[ref]["acc_per_seed"] == res["methods"][ref]["acc_per_seed"]
        assert _acc(res[ref]["acc_mean"])
    assert res["methods"]["kd"]["delta_vs_kd_mean"] == 0.0
    for part in ("methods", "feature_methods"):  # CE's paired difference to KD, filled in after KD ran
        ce, kd = res[part]["ce"], res[part]["kd"]
        assert ce["delta_vs_kd_mean"] == pytest.approx(ce["acc_per_seed"][0] - kd["acc_per_seed"][0])
    assert _acc(res["teacher_acc"])
    s = res["settings"]
    assert s["quick"] is True and s["labeled"] == 100 and s["methods"] == ["ce", "kd", *[
        n for n in METHODS if n not in ("ce", "kd")
    ]]  # fmt: skip

    # The online section (--quick: one epoch of okddip and dist-plus) next to CE and KD on the CNN pair, same
    # subset and seed; each reports its deployed head, which is one of its evaluated heads.
    online = res["online_methods"]
    assert list(online) == ["ce", "kd", "okddip", "dist-plus"] and res["online"]["epochs"] == 1
    assert set(ONLINE) >= {"okddip", "dist-plus"}
    assert res["online"]["teacher_acc"] == res["cnn"]["teacher_acc"]  # one CNN teacher for both sections
    for name, m in online.items():
        assert "failed" not in m, (name, m)
        assert len(m["acc_per_seed"]) == 1 and _acc(m["acc_mean"]) and math.isfinite(m["delta_vs_kd_mean"]), name
        if name in ("ce", "kd"):
            continue
        heads = m["accuracies_per_seed"][0]
        assert m["acc_per_seed"][0] == heads[m["head"]], (name, m["head"], heads)
        assert m["best_single_per_seed"][0] == max(v for k, v in heads.items() if "ensemble" not in k), name
        assert m["delta_vs_ce_mean"] == pytest.approx(m["acc_per_seed"][0] - online["ce"]["acc_per_seed"][0])
    assert set(online["dist-plus"]["accuracies_per_seed"][0]) == {"student", "teacher"}


def test_bench_methods_subset_and_a_method_that_raises(tmp_path: Path) -> None:
    out = tmp_path / "subset.json"
    r = _run("--quick", "--epochs", "2", "--methods", "dkd,broken", "--online-methods", "none", "--json", str(out),
             register_broken=True)  # fmt: skip
    assert r.returncode == 1, (r.returncode, r.stderr[-4000:])
    assert "1 method(s) raised: broken" in " ".join(r.stderr.split())
    res = json.loads(out.read_text())  # the results are still written, with the failure in them
    assert set(res["methods"]) == {"ce", "kd", "dkd", "broken"} and res["failed"] == ["broken"]
    assert res["methods"]["broken"]["failed"] == "RuntimeError: broken on purpose"
    assert res["methods"]["broken"]["acc_mean"] is None and _acc(res["methods"]["dkd"]["acc_mean"])
    assert "online_methods" not in res and res["settings"]["online_methods"] == []  # --online-methods none

    # Refused before any work: in this process (typer's CliRunner on kd.cli.app), sparing two interpreters.
    bad = CliRunner().invoke(app, ["bench", "methods", "--quick", "--methods", "no-such-method"])
    assert bad.exit_code == 2 and "unknown method" in bad.stderr
    bad = CliRunner().invoke(app, ["bench", "methods", "--quick", "--online-methods", "dml"])
    assert bad.exit_code == 2 and "unknown online method(s) ['dml']" in bad.stderr
