"""`kd bench data` runs tiny end to end and its JSON is complete and self-consistent."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from kd.cache.sharded import open_cache
from kd.core.data import open_source


def kd(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kd", *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, "KD_CACHE_DIR": str(cwd / "kd-cache")})  # fmt: skip


def test_tiny_bench_data_writes_consistent_json(tmp_path: Path) -> None:
    out = tmp_path / "data.json"
    r = kd("bench", "data", "--samples", "200", "--batch", "32", "--window", "64", "--rounds", "2",
           "--step-batch", "8", "--step-block", "2", "--step-rounds", "1", "--workers", "2", "--root",
           str(tmp_path / "work"), "--json", str(out), cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    for key in ("precompute_over_min", "rss_mb_10k", "rss_mb_50k", "step_over_no_teacher"):
        assert res[key] > 0, key
    rounds = {k: res[f"{k}_rounds"] for k in ("decode", "forward", "precompute")}
    assert [len(v) for v in rounds.values()] == [2, 2, 2]
    decode, forward = statistics.median(rounds["decode"]), statistics.median(rounds["forward"])
    assert res["decode_samples_per_s"] == pytest.approx(decode)
    assert res["forward_samples_per_s"] == pytest.approx(forward)
    ratios = [p / min(d, f) for d, f, p in zip(rounds["decode"], rounds["forward"], rounds["precompute"])]
    assert res["ratio_rounds"] == pytest.approx(ratios)
    assert res["precompute_over_min"] == pytest.approx(statistics.median(ratios))
    assert res["full_pass_over_min"] == pytest.approx(res["full_pass_samples_per_s"] / min(decode, forward))
    marks = [c["samples"] for c in res["rss_checkpoints"]]
    assert marks[0] >= 40 and marks[-1] == 200 and marks == sorted(marks)
    trace = res["rss_trace"]  # (samples, median, max) per tenth
    assert [t[0] for t in trace] == list(range(20, 201, 20)) and all(0 < t[1] <= t[2] for t in trace)
    assert res["rss_mb_10k"] == pytest.approx(trace[1][1], abs=0.1)
    assert res["rss_mb_50k"] == pytest.approx(trace[-1][1], abs=0.1)
    assert res["rss_checkpoints"][0]["workers_mb"] > 0  # the workers were alive and measured
    assert isinstance(res["malloc_bounded"], bool) and res["rss_workers_mb_10k"] > 0  # worker RSS measured apart
    step = res["step"]
    ms = step["median_step_ms"]
    assert step["step_over_no_teacher"] == pytest.approx(ms["cache"] / ms["no_teacher"]) and step["steps_per_mode"] == 1
    assert res["workers"] == 2 and res["records"] == 200 and res["bytes_per_sample"] == 208  # fp16, 100 classes
    # The bench's data and cache are real: 200 JPEG files in 100 class folders, one record each.
    src = open_source(f"imagefolder:{tmp_path / 'work' / 'images'}")
    assert len(src) == 200 and src.num_classes == 100
    assert len(open_cache(tmp_path / "work" / "cache")) == 200
    assert "kd bench data: 200 JPEGs" in r.stdout


def test_bench_data_refuses_bad_settings(tmp_path: Path) -> None:
    r = kd("bench", "data", "--samples", "5", cwd=tmp_path)
    assert r.returncode != 0 and "--samples must be >= 10" in r.stderr
