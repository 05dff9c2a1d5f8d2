"""`kd bench serve --quick` end to end: a real server subprocess and client processes.

Only the shape of the results is checked, never a speed: timings on a shared
CI machine are noise."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_bench_serve_quick_writes_every_result(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, "-m", "kd", "bench", "serve", "--quick", "--seconds", "0.5", "--clients", "4",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    assert "served_over_inprocess" in r.stdout and "batching_gain" in r.stdout
    res = json.loads(out.read_text())

    for key in ("served_over_inprocess", "merged_over_inprocess", "batched_over_inprocess", "batching_gain",
                "torch_threads", "mean_batch_16x4", "floor_share_b1", "floor_share_b64", "large_input_share_f32",
                "large_input_share_u8", "batched_floor_share", "floor_batched_over_inprocess",
                "mean_batch_16x4_floor"):  # fmt: skip
        assert _positive(res[key]), (key, res[key])
    for key in ("served_over_inprocess", "batching_gain", "floor_share_b1", "floor_share_b64",
                "large_input_share_f32", "large_input_share_u8", "batched_floor_share"):  # fmt: skip
        assert len(res[f"{key}_rounds"]) == res["settings"]["rounds"] == 1, key  # every round is kept
    for key in ("free_b1", "floor_b1", "free_b64", "floor_b64", "large_f32", "echo_f32", "large_u8", "echo_u8",
                "floor_batched"):  # fmt: skip
        assert _positive(res["phases"][key]["samples_per_s"]), (key, res["phases"][key])
    assert res["phases"]["free_b64"]["mean_forward"] == res["settings"]["served_batch"]
    assert res["phases"]["large_u8"]["mean_forward"] == res["settings"]["large_batch"]
    assert set(res["large_input_mb_per_s"]) == {"large_f32", "echo_f32", "large_u8", "echo_u8"}
    for load in ("low_load", "saturation"):
        for q in ("p50", "p99"):
            assert _positive(res["latency_ms"][load][q]), (load, q, res["latency_ms"])
        assert res["latency_ms"][load]["p50"] <= res["latency_ms"][load]["p99"]
    for key in ("inprocess", "served", "merged", "batcher_on", "batcher_off", "low_load", "floor_batched"):
        assert _positive(res["samples_per_s"][key]), (key, res["samples_per_s"])

    over = res["overload"]
    assert over["other_errors"] == 0, res["phases"]["overload"]
    assert res["other_errors_all_phases"] == 0, {k: p["codes"] for k, p in res["phases"].items()}
    assert over["requests"] == over["ok"] + over["resource_exhausted"] > 0
    assert over["ok"] > 0

    assert res["device"] == "cpu" and res["device_name"]
    assert res["settings"]["clients"] == 4 and res["settings"]["seconds"] == 0.5
    assert res["phases"]["served"]["mean_forward"] == res["settings"]["served_batch"]
    assert res["phases"]["batcher_off"]["mean_forward"] == res["settings"]["small_batch"]
    # The batched floor's forwards are counted: merged requests of the 4 x 4 load, never over the cap.
    floor = res["phases"]["floor_batched"]
    assert res["settings"]["small_batch"] <= floor["mean_forward"] <= res["settings"]["merged_max_batch"]
    assert res["batched_floor_share"] == res["samples_per_s"]["batcher_on"] / res["samples_per_s"]["floor_batched"]
