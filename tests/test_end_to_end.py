"""End to end through the CLI: `kd serve` as a real subprocess on loopback,
`kd precompute` through it, the cache read back, `kd train` from every source,
and `kd demo` in a reduced form.

The client commands run in this process (typer's CliRunner on ``kd.cli.app``, the
function ``python -m kd`` calls): the same code without a new interpreter and torch
import (seconds each on a busy 2-core machine) per call. The server stays a real
process (started, SIGTERMed, exit 0); real `kd` processes of the client commands are
run in test_precompute_cli.py (precompute, cache verify, cache export) and
test_train_loop.py (train, train under torchrun, plot)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import Result
from typer.testing import CliRunner

from kd.cache import CacheReader
from kd.cli import app
from kd.core.data import load_dataset
from kd.teacher_server.loading import Teacher

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def kd(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kd", *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def cli(*args: str) -> Result:
    """``kd ARGS`` in this process: exit_code, stdout and stderr as a process would give them."""
    return CliRunner().invoke(app, list(args))


def ok(r: Result) -> Result:
    """``r`` after asserting it exited 0 (else its output and any traceback in the message)."""
    assert r.exit_code == 0, (r.output, r.exception)
    return r


@pytest.fixture()
def served(tmp_path: Path, teacher_spec: str):
    port_file = tmp_path / "port"
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kd", "serve", "--teacher", f"digits={teacher_spec}", "--port", "0",
         "--port-file", str(port_file)],
        stdout=log, stderr=subprocess.STDOUT, env=ENV,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not port_file.exists():
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()
        assert time.monotonic() < deadline, "kd serve did not start"
        time.sleep(0.05)
    yield proc, f"127.0.0.1:{port_file.read_text()}"
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


def test_serve_precompute_verify_train_from_every_source(tmp_path: Path, served, teacher: Teacher, teacher_spec):
    proc, address = served
    cache_dir = tmp_path / "cache"
    r = ok(cli("precompute", "--source", f"server:{address}", "--out", str(cache_dir), "--dataset", "digits"))
    train = load_dataset("digits", "train")
    assert f"wrote {len(train)}" in r.stderr
    again = cli("precompute", "--source", f"server:{address}", "--out", str(cache_dir))
    assert again.exit_code == 0 and f"wrote 0, skipped {len(train)}" in again.stderr

    ok(cli("cache", "verify", str(cache_dir)))
    reader = CacheReader(cache_dir, teacher_fingerprint=teacher.fingerprint, dataset_id=train.dataset_id)
    with torch.inference_mode():
        torch.testing.assert_close(reader.get(range(len(train))), teacher.model(train.inputs), rtol=1e-5, atol=1e-5)

    from safetensors.torch import load_file

    from kd.models import digits_student

    test = load_dataset("digits", "test")
    accs = {}
    for source in (f"cache:{cache_dir}", f"server:{address}/digits", f"local:{teacher_spec}"):
        out = tmp_path / f"student-{source.split(':')[0]}.safetensors"
        r = ok(cli("train", "--source", source, "--method", "kd", "--epochs", "2", "--subset", "200", "--opt",
                   "temperature=2", "--out", str(out)))  # fmt: skip
        result = json.loads(r.stdout.strip().splitlines()[-1])
        student = digits_student()
        student.load_state_dict(load_file(out))
        with torch.no_grad():
            correct = int((student(test.inputs).argmax(1) == test.labels).sum())
        assert result["test_acc"] == pytest.approx(correct / len(test), abs=1e-9)  # the saved student's accuracy
        accs[source.split(":")[0]] = result["test_acc"]
    # Same targets, same seed: the three students agree (to float rounding of batched forwards).
    assert max(accs.values()) - min(accs.values()) <= 0.01, accs

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def test_cli_errors_are_clear(tmp_path: Path, address: str) -> None:
    # The refused teacher in a real `kd serve` process (in this process a regression would serve
    # forever rather than fail); it starts up while the client commands run here, against `address`:
    # a real gRPC server on loopback serving "digits" (conftest).
    serve = subprocess.Popen(
        [sys.executable, "-m", "kd", "serve", "--teacher",
         f"t=kd.models:digits_teacher@{tmp_path / 'missing.safetensors'}", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    try:
        r = cli("train", "--source", f"server:{address}/ghost", "--epochs", "1")
        assert r.exit_code != 0 and "unknown teacher 'ghost'" in r.stderr
        r = cli("train", "--source", f"cache:{tmp_path / 'none'}", "--epochs", "1")
        assert r.exit_code != 0 and "no cache at" in r.stderr
        r = cli("train", "--method", "nope", "--source", f"server:{address}", "--epochs", "1")
        assert r.exit_code != 0 and "unknown method 'nope'" in r.stderr
        r = cli("precompute", "--source", f"server:{address}", "--out", str(tmp_path / "c"), "--codec", "zip")
        assert r.exit_code != 0 and "unknown codec 'zip'" in r.stderr
        _, serve_err = serve.communicate(timeout=300)
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    assert serve.returncode != 0 and "does not exist" in serve_err


def test_demo_reduced(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    r = kd("demo", "--out", str(out), "--seeds", "2", "--epochs", "4", "--labeled", "60", "--teacher-epochs", "3")
    assert r.returncode == 0, r.stderr
    results = json.loads((out / "results.json").read_text())
    for key in ("teacher_acc", "student_ce_acc", "student_kd_cache_acc", "student_kd_server_acc"):
        assert 0.0 < results[key] <= 1.0, key
    assert results["seeds"] == [0, 1]
    assert results["cache_bytes"] == 1198 * results["cache_bytes_per_sample"]
    # what the README says the demo checks (it exits 1 otherwise)
    assert results["max_abs_diff_cache_vs_server"] == 0.0
    assert results["checks"] == {"max_abs_diff_cache_vs_server_is_0": True, "cache_and_server_students_equal": True}
    assert results["problems"] == []
    assert results["student_acc_per_seed"]["kd_cache"] == results["student_acc_per_seed"]["kd_server"]
    assert results["server_exit_code"] == 0 and results["seconds"] > 0
    assert (out / "curves.png").stat().st_size > 10_000
    assert "KD from the live server" in r.stdout
