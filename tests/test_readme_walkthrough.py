"""The README's "Your own image folder, start to finish" walk-through, run as written.

The bash block marked ``<!-- walkthrough ... -->`` in README.md is extracted and run by
bash (``set -euo pipefail``: any failing command fails the test) on a small image folder
generated here, in the layout the README describes: PNG and JPEG files of mixed sizes
(resized by ``?size=``), one folder per class, train and val splits. Only the variables the
README reads from the environment change (``DATA``, ``SIZE``, ``EPOCHS``, ``PORT``), so
what runs is what a user copies.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from ports import unused_port

ROOT = Path(__file__).resolve().parents[1]
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 6, 6, 2


def walkthrough_block() -> str:
    """The bash block right after the README's walk-through marker."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- walkthrough\b[^>]*-->\s*```bash\n(.*?)```", text, re.S)
    assert m, "README.md has no '<!-- walkthrough -->' marker followed by a ```bash block"
    return m.group(1)


def write_image_folder(root: Path) -> None:
    """root/{train,val}/<class>/<image>: colours by class, PNG and JPEG, sizes that need resizing."""
    rs = np.random.RandomState(0)
    base = rs.randint(0, 256, (CLASSES, 1, 1, 3))
    for split, n in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c in range(CLASSES):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True)
            for i in range(n):
                h, w = (12, 10) if i % 2 else (9, 9)
                img = np.clip(base[c] + rs.randint(-40, 41, (h, w, 3)), 0, 255).astype(np.uint8)
                fmt, ext = ("JPEG", "jpg") if (i + c) % 2 else ("PNG", "png")
                Image.fromarray(img).save(d / f"{split}_{i:03d}.{ext}", format=fmt)


def test_readme_walkthrough_runs_start_to_finish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    block = walkthrough_block()
    for command in ("kd train", "kd serve", "kd precompute", "kd cache verify", "kd evaluate"):
        assert command in block, f"the walk-through lost its `{command}` step"
    write_image_folder(tmp_path / "data")
    (tmp_path / "configs").symlink_to(ROOT / "configs")  # "from the repository root"
    port = unused_port()  # below the ephemeral range: the other worker cannot take it first
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # this venv's `kd`
        "DATA": "data",
        "SIZE": "8",
        "EPOCHS": "1",
        "PORT": str(port),
        "KD_CACHE_DIR": str(tmp_path / "kd-cache"),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    # A failing step stops the script; the server left in the background is stopped either way.
    script = "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true; wait' EXIT\n" + block
    # ~25 s on a 2-core box. Its own process group, so a hang is cut off whole (no server left
    # behind holding the port) and reported with where the script stood.
    proc = subprocess.Popen(["bash", "-c", script], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the walk-through did not finish in 240 s; its last output:\n{stdout[-1500:]}\n{stderr[-3000:]}")
    r = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]

    n_train, n_val = CLASSES * TRAIN_PER_CLASS, CLASSES * VAL_PER_CLASS
    assert (tmp_path / "teacher.safetensors").is_file() and (tmp_path / "student.safetensors").is_file()
    assert f"serving on 127.0.0.1:{port}" in out
    # The lines the README quotes, each whole on its own line: stderr is a pipe here, where rich once
    # wrapped them at 80 columns ("... on cpu, \naccess white").
    teacher_line = r"^teacher teacher fingerprint [0-9a-f]{16} input \[3, 8, 8\] classes 6 on cpu, access white$"
    assert re.search(teacher_line, r.stderr, re.M), r.stderr[-3000:]
    assert f"wrote {n_train * 4}, skipped 0 already cached" in out  # every image x 4 views
    assert f"{n_train * 4}/{n_train * 4} records good, 0 corrupt, 0 missing" in out
    lines = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    teacher, student, evaluated = lines  # kd train (teacher), kd train (student), kd evaluate
    assert teacher["method"] == "ce" and student["method"] == "kd" and student["source"] == ["cache:cache"]
    assert student["epochs"] == 1 and student["dataset"].startswith("data/train@")
    # The final accuracy line: the saved student's top-1/top-5 on val, as training reported them.
    assert evaluated["n"] == n_val and evaluated["dataset"] == student["val_dataset"]
    assert evaluated["top1"] == student["test_acc"] and evaluated["top5"] == student["test_top5"]
    final = f"top-1 {evaluated['top1']:.4f}, top-5 {evaluated['top5']:.4f} on {evaluated['dataset']} ({n_val} samples)"
    assert final in r.stderr, r.stderr[-2000:]
    metrics = (tmp_path / "runs" / "student" / "metrics.csv").read_text().splitlines()
    assert metrics[0].startswith("epoch,") and len(metrics) == 2  # header + the one epoch
    # The cached targets are the served teacher's outputs on the seeded views of the images.
    from kd.cache import CacheReader
    from kd.core.data import open_source
    from kd.teacher_server.loading import load_teacher

    monkeypatch.setenv("KD_CACHE_DIR", env["KD_CACHE_DIR"])
    src = open_source(f"imagefolder:{tmp_path / 'data' / 'train'}?size=8&views=crop:pad=4;flip")
    spec = f"kd.student_trainer.zoo:wrn_40_2@{tmp_path / 'teacher.safetensors'}?num_classes={CLASSES}"
    reader = CacheReader(tmp_path / "cache")
    assert reader.meta.views == 4 and len(reader) == n_train * 4
    idx, views = torch.arange(n_train), torch.arange(n_train) % 4
    with torch.inference_mode():
        want = load_teacher("t", spec + "&input_shape=3x8x8").model(src.get(idx, views))
    torch.testing.assert_close(reader.get(idx, views), want, rtol=1e-5, atol=1e-5)
