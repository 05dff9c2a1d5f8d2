"""`kd bench cache --quick` end to end, in a subprocess.

Only the shape of the results is checked, never a speed or an accuracy:
timings on a shared CI machine are noise, and --quick trains for a few epochs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from kd.bench.cache import ACC_CODECS, CODECS
from kd.cache.codecs import bytes_per_sample


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _finite(value: object, lo: float = 0.0) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= lo


def test_bench_cache_quick_writes_every_result(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, "-m", "kd", "bench", "cache", "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    assert "cache / raw LMDB" in r.stdout and "precompute / bare forward" in r.stdout
    res = json.loads(out.read_text())

    assert set(res["codecs"]) == set(CODECS)
    for name, c in res["codecs"].items():
        for classes in (1000, 32000):
            assert c[f"bytes_{classes}"] == bytes_per_sample(name, classes)
            assert c[f"ratio_to_fp32_{classes}"] == bytes_per_sample(name, classes) / bytes_per_sample("fp32", classes)
        for tag in ("T1", "T4"):
            assert _finite(c[f"kl_rel_error_{tag}"]), (name, tag, c)
            assert _finite(c[f"kl_batch_rel_error_{tag}"]), (name, tag, c)
            if name.startswith("sample:"):
                assert math.isfinite(c[f"sample_bias_rel_{tag}"])
                assert _positive(c[f"sample_bias_stderr_rel_{tag}"])
        if name in ACC_CODECS:
            assert 0 < c["student_acc_mean"] <= 1 and _finite(c["student_acc_std"]), (name, c)
        else:
            assert c["student_acc_mean"] is None and c["student_acc_std"] is None
    assert res["codecs"]["fp32"]["kl_rel_error_T1"] == 0.0  # fp32 decodes to the exact logits
    assert res["codecs"]["fp16"]["ratio_to_fp32_1000"] == 2008 / 4008
    # The digits teacher is trained to ~0.98; a CE student on 100 samples is far above chance (0.1).
    assert res["student"]["teacher_acc"] > 0.9 and 0.3 < res["student"]["ce_acc_mean"] <= 1

    v = res["views"]
    assert v["views"] == 4
    for key in ("v1_acc", "v4_acc", "augmented_plain_targets_acc", "ce_v1_acc", "ce_augmented_acc"):
        assert 0 < v[key] <= 1 and _finite(v[f"{key}_std"]), (key, v)
    assert v["v4_bytes_per_sample"] == 4 * v["v1_bytes_per_sample"] == 4 * bytes_per_sample("fp32", 10)

    for key in ("cache_records_per_s", "cache_read_raw_records_per_s", "raw_lmdb_records_per_s", "ratio"):
        assert _positive(res["read"][key]), (key, res["read"])
    assert res["read"]["record_bytes"] == bytes_per_sample("fp16", 1000)
    for key in ("precompute_samples_per_s", "bare_forward_samples_per_s", "ratio"):
        assert _positive(res["precompute"][key]), (key, res["precompute"])
    for step in (res["step"], res["step"]["digits"]):
        for key in ("cache_over_no_teacher", "cache_over_inprocess_teacher", "memory_targets_over_no_teacher",
                    "cache_over_memory_targets"):  # fmt: skip
            assert _positive(step[key]), (key, step)
        assert all(_positive(ms) for ms in step["median_step_ms"].values())

    # The CRD/CIFAR-100 pair (resnet32x4 -> resnet8x4) on generated 3x32x32 inputs.
    crd = res["crd"]
    assert "CRD precompute / bare forward" in r.stdout and "CRD step: cache / no teacher" in r.stdout
    assert crd["teacher"].endswith(":resnet32x4") and crd["student"].endswith(":resnet8x4")
    assert crd["input_shape"] == [3, 32, 32] and crd["num_classes"] == 100
    for key in ("precompute_samples_per_s", "bare_forward_samples_per_s", "ratio"):
        assert _positive(crd["precompute"][key]), (key, crd["precompute"])
    assert crd["precompute"]["samples"] == res["settings"]["crd_samples"]
    for key in ("cache_over_no_teacher", "cache_over_inprocess_teacher", "inprocess_over_cache",
                "memory_targets_over_no_teacher", "cache_over_memory_targets"):  # fmt: skip
        assert _positive(crd["step"][key]), (key, crd["step"])
    assert all(_positive(ms) for ms in crd["step"]["median_step_ms"].values())
    assert crd["step"]["student_parameters"] == 1_233_540 and crd["step"]["teacher_parameters"] == 7_433_860
    for key in ("crd_precompute_ratio_at_least_0_9", "crd_step_cache_over_no_teacher_at_most_1_05"):
        assert isinstance(res["goals"][key], bool)

    s = res["settings"]
    assert s["quick"] is True and s["torch_threads"] >= 1
    assert isinstance(res["goals"]["codecs_at_most_1_50_of_fp32_bytes_at_1000"], list)
    assert res["notes"] and _positive(res["seconds"])
