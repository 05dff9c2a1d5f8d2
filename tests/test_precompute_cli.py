"""`kd precompute` as a process: kill -9 and resume, shards, inputs by
reference through `kd serve`, export, read-through training, concurrent readers.

Real `kd` processes where the process is the point (kill -9, resume, `kd serve` to
SIGTERM, and one `kd cache verify` and one `kd cache export`); the other commands run
in this process (typer's CliRunner on ``kd.cli.app``, what ``python -m kd`` calls),
sparing a new interpreter and torch import per call."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import Result
from typer.testing import CliRunner

from kd.cache import CacheMeta, CacheReader, CacheWriter
from kd.cache.sharded import open_cache
from kd.cli import app
from kd.core.data import load_dataset, view_seeds
from kd.teacher_server.loading import Teacher

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def kd(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kd", *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def cli(*args: str) -> Result:
    """``kd ARGS`` in this process: exit_code, stdout and stderr as a process would give them."""
    return CliRunner().invoke(app, list(args))


def ok(r: Result) -> Result:
    """``r`` after asserting it exited 0 (else its output and any exception in the message)."""
    assert r.exit_code == 0, (r.output, r.exception)
    return r


def _wait_for_commits(proc: subprocess.Popen, out: Path, at_least: int) -> None:
    """Until precompute ``proc`` has committed ``at_least`` records to ``out`` (some transactions,
    far from done: 1198 * 4 records; 0: the cache's metadata, committed as its writer opens),
    failing if it ends or stalls first."""
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, "precompute finished before it could be stopped"
        assert time.monotonic() < deadline, "precompute made no progress"
        try:
            if len(CacheReader(out)) >= at_least:
                return
        except Exception:  # noqa: BLE001 - no cache, or its metadata not committed yet
            pass
        time.sleep(0.02)


def test_kill_9_during_precompute_loses_only_the_open_batch(tmp_path: Path, teacher_spec: str, teacher: Teacher):
    out = tmp_path / "c"
    cmd = [sys.executable, "-m", "kd", "precompute", "--source", f"local:{teacher_spec}", "--out", str(out),
           "--views", "4", "--batch-size", "8", "--commit-every", "64"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        _wait_for_commits(proc, out, 200)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    train = load_dataset("digits", "train")
    after_kill = CacheReader(out).verify()
    assert after_kill.problems == [], after_kill.problems
    assert 200 <= after_kill.present < len(train) * 4 and after_kill.present % 64 == 0
    resumed = kd("precompute", "--source", f"local:{teacher_spec}", "--out", str(out), "--views", "4")
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipped {after_kill.present} already cached" in resumed.stderr
    verify = kd("cache", "verify", str(out))
    assert verify.returncode == 0, verify.stderr
    reader = CacheReader(out)
    keys = list(reader.keys())
    assert len(keys) == len(set(keys)) == len(train) * 4
    idx, views = torch.tensor([3, 900]), torch.tensor([3, 0])
    with torch.inference_mode():
        ref = teacher.model(train.views(idx, view_seeds(idx, views, 4)))
    torch.testing.assert_close(reader.get(idx, views), ref, rtol=1e-5, atol=1e-5)


def test_sigterm_commits_the_open_batch_and_a_rerun_resumes(tmp_path: Path, teacher_spec: str):
    # SIGTERM used to kill precompute outright (status -15) and lose its uncommitted records; now it
    # commits them and ends 143, with one line on how to resume. --commit-every above the run's
    # 4792 records: no transaction ends before the stop, so every record done when the signal is
    # seen is pending then, and a stop that dropped them leaves none (with commits every 64 records
    # the signal mostly landed during a commit, so nothing was pending and a drop went unseen).
    out = tmp_path / "c"
    cmd = ["precompute", "--source", f"local:{teacher_spec}", "--out", str(out), "--views", "4", "--batch-size", "8",
           "--commit-every", "100000", "--workers", "0"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "kd", *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**ENV, "OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        # The cache's metadata is committed when its writer opens, after the signal handlers are
        # installed and before the first batch; the stop is asked after each batch.
        _wait_for_commits(proc, out, 0)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("stopped by SIGTERM")]
    assert "run the same command again to resume" in line, line
    verify = cli("cache", "verify", str(out))  # exits 1: records are missing, none corrupt
    assert ", 0 corrupt, " in verify.stderr, verify.stderr
    present = CacheReader(out).verify().present
    assert line.startswith(f"stopped by SIGTERM: {present} more records committed")  # the open batch too
    assert 8 <= present < 1198 * 4 and present % 8 == 0
    resumed = ok(cli(*cmd))
    assert f"skipped {present} already cached" in resumed.stderr
    ok(cli(*cmd[:4], str(tmp_path / "straight"), *cmd[5:]))
    a, b = CacheReader(out), CacheReader(tmp_path / "straight")
    assert a.verify().ok and len(a) == len(b) == 1198 * 4
    idx = torch.arange(1198).repeat_interleave(4)
    views = torch.arange(4).repeat(1198)
    assert torch.equal(a.get(idx, views), b.get(idx, views))


def test_shards_by_reference_through_the_server_then_export(
    tmp_path: Path, teacher_spec: str, teacher: Teacher, monkeypatch: pytest.MonkeyPatch
):
    port_file = tmp_path / "port"
    serve = subprocess.Popen(
        [sys.executable, "-m", "kd", "serve", "--teacher", f"digits={teacher_spec}", "--dataset", "train=digits:train",
         "--port", "0", "--port-file", str(port_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert serve.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        address = f"127.0.0.1:{port_file.read_text()}"
        out = tmp_path / "sharded"
        for i in range(2):
            ok(cli("precompute", "--source", f"server:{address}", "--by-reference", "train", "--views", "2",
                   "--shard", f"{i}/2", "--out", str(out), "--codec", "fp16"))  # fmt: skip
        # torchrun-style: rank/world from the environment pick the shard.
        env_out = tmp_path / "ranked"
        for rank in range(2):
            with monkeypatch.context() as env:
                env.setenv("RANK", str(rank))
                env.setenv("WORLD_SIZE", "2")
                ok(cli("precompute", "--source", f"server:{address}", "--out", str(env_out)))
            # the rank picked its own shard: samples rank, rank + 2, ... (599 of them)
            assert len(CacheReader(env_out / f"shard-{rank:05d}-of-00002")) == 599
        assert len(open_cache(env_out)) == 1198
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=30) == 0
    info = json.loads(ok(cli("cache", "info", str(out))).stdout)
    assert info["records"] == 2 * 1198 and info["shards"] == 2 and info["codec"] == "fp16"
    assert cli("cache", "verify", str(out)).exit_code == 0
    train = load_dataset("digits", "train")
    reader = open_cache(out)
    idx, views = torch.tensor([10, 11, 12]), torch.tensor([1, 0, 1])
    with torch.inference_mode():
        ref = teacher.model(train.views(idx, view_seeds(idx, views, 2)))
    torch.testing.assert_close(reader.get(idx, views), ref, rtol=2e-3, atol=2e-3)
    npz = tmp_path / "export.npz"
    r = kd("cache", "export", str(out), "--to", "npz", "--out", str(npz))
    assert r.returncode == 0, r.stderr
    data = np.load(npz)
    assert data["logits"].shape == (2 * 1198, 10) and json.loads(str(data["meta"]))["views"] == 2
    row = int(np.nonzero((data["index"] == 12) & (data["view"] == 1))[0][0])
    np.testing.assert_allclose(data["logits"][row], ref[2].numpy(), rtol=2e-3, atol=2e-3)


def test_read_through_training_from_the_cli(tmp_path: Path, teacher_spec: str) -> None:
    cache = tmp_path / "rt"
    ok(cli("train", "--source", f"cache:{cache}", "--read-through", f"local:{teacher_spec}", "--subset", "120",
           "--epochs", "2"))  # fmt: skip
    assert len(CacheReader(cache)) == 120 and cli("cache", "info", str(cache)).exit_code == 0


class CachedTargets(torch.utils.data.Dataset):
    """Inputs and labels with teacher targets read from the cache in each worker."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, reader: CacheReader) -> None:
        self.inputs, self.labels, self.reader = inputs, labels, reader

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return i, self.inputs[i], self.labels[i], self.reader.get([i])[0]


def test_training_from_a_cache_while_another_process_reads_it(tmp_path: Path, teacher: Teacher) -> None:
    from torch.utils.data import DataLoader

    from kd.student_trainer.losses import get_method

    train = load_dataset("digits", "train")
    meta = CacheMeta(teacher.fingerprint, train.dataset_id, len(train), "fp32", 10)
    with torch.inference_mode():
        logits = teacher.model(train.inputs)
    with CacheWriter(tmp_path / "c", meta) as w:
        w.put(range(len(train)), logits)
    reader = CacheReader(tmp_path / "c", teacher_fingerprint=teacher.fingerprint)
    other = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, torch; from kd.cache import CacheReader; r = CacheReader(sys.argv[1]);"
         "[r.get(torch.randint(0, 1198, (64,))) for _ in range(300)]; print(len(r))", str(tmp_path / "c")],
        stdout=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip

    dataset = CachedTargets(train.inputs, train.labels, reader)
    torch.manual_seed(0)
    student = torch.nn.Linear(64, 10)
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    kd_loss = get_method("kd")
    loader = DataLoader(dataset, batch_size=64, shuffle=True, num_workers=2, multiprocessing_context="spawn")
    seen = 0
    for i, x, y, t in loader:
        torch.testing.assert_close(t, logits[i])  # each worker read the right records
        loss = kd_loss(student(x), t, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += len(x)
    assert seen == len(train) and torch.isfinite(loss)
    out, _ = other.communicate(timeout=120)
    assert other.returncode == 0 and out.strip() == str(len(train))


def test_samples_the_teacher_cannot_take_are_refused_before_any_work(tmp_path: Path, teacher_spec: str, server):
    from PIL import Image

    from tests.cli_checks import refused

    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "img" / f"c{c}").mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                tmp_path / "img" / f"c{c}" / f"{i}.png"
            )
    gray, rgb = f"imagefolder:{tmp_path / 'img'}?mode=L", f"imagefolder:{tmp_path / 'img'}"
    address = f"server:127.0.0.1:{server.port}"
    # [3, 8, 8] (192 values) to a teacher of 64 values: the old code failed at its first batch inside the
    # model ("mat1 and mat2 shapes cannot be multiplied"), naming no shape.
    for source in (f"local:{teacher_spec}", address):
        out = tmp_path / f"rgb-{source[:5]}"
        refused(cli("precompute", "--source", source, "--dataset", rgb, "--out", str(out)),
                "the dataset's samples are [3, 8, 8] but teacher", "takes input [64]")  # fmt: skip
        assert not (out / "data.mdb").exists()
    # kd train with a teacher run per step: the old code failed at its first step, inside the teacher
    refused(cli("train", "--source", f"local:{teacher_spec}", "--dataset", rgb + "?classes=10", "--val-dataset",
                rgb + "?classes=10", "--student", "kd.models:digits_cnn_student", "--epochs", "1", "--out",
                str(tmp_path / "run.safetensors")),
            "the dataset's samples are [3, 8, 8] but teacher", "takes input [64]")  # fmt: skip
    assert not (tmp_path / "run.safetensors").exists()
    # What each path does take: [1, 8, 8] holds 64 values, put in the teacher's layout by a server's client
    # and by an in-process teacher alike (the same targets); ?shape=64 gives the samples that shape.
    ok(cli("precompute", "--source", address, "--dataset", gray, "--out", str(tmp_path / "served")))
    ok(cli("precompute", "--source", f"local:{teacher_spec}", "--dataset", gray, "--out", str(tmp_path / "local")))
    ok(cli("precompute", "--source", f"local:{teacher_spec}", "--dataset", gray + "&shape=64", "--out",
           str(tmp_path / "flat")))  # fmt: skip
    served, local = CacheReader(tmp_path / "served"), CacheReader(tmp_path / "local")
    keys = torch.arange(10)
    torch.testing.assert_close(served.targets(keys), local.targets(keys), rtol=1e-6, atol=1e-6)
    assert len(CacheReader(tmp_path / "served")) == len(CacheReader(tmp_path / "flat")) == 10
