"""SIGTERM stops the study commands and the demos politely: one `stopped by SIGTERM`
line, exit 143, no traceback, and the `kd serve` subprocesses they started are stopped too (a
SIGTERM used to kill kd chain and kd demo at once and leave their servers serving, parentless)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kd.models import digits_student
from kd.teacher_server.loading import save_weights

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/PID/status (Linux)")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def catches_sigterm(pid: int) -> bool:
    """Whether the process has a SIGTERM handler (SigCgt of /proc/PID/status): the command is in
    its work, past the imports, where a signal is its to handle."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line holds ``text`` (this test's tmp path): left-over servers."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd:
                found.append(int(d.name))
    return found


def sigterm_when(args: list[str], ready, cwd: Path, within_s: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-m", "kd", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, cwd=cwd)  # fmt: skip
    try:
        deadline = time.monotonic() + within_s
        while not ready(proc.pid):
            assert proc.poll() is None, f"ended ({proc.returncode}) before it could be stopped: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "never got ready"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def assert_stopped(r: subprocess.CompletedProcess, command: str) -> None:
    assert r.returncode == 128 + signal.SIGTERM, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr and "error:" not in r.stderr, r.stderr[-3000:]
    lines = [x for x in r.stderr.splitlines() if x.startswith("stopped by")]
    assert lines == [f"stopped by SIGTERM: {command} did not finish; what it had not written yet is not saved "
                     "(run it again from the start)"], r.stderr[-3000:]  # fmt: skip


LONG = "100000"


@pytest.mark.parametrize(
    ("args", "command"),
    [
        (["graph", "--seeds", "1", "--epochs", LONG, "--teacher-epochs", LONG, "--json", "g.json"], "kd graph"),
        (["multitask", "--seeds", "1", "--epochs", LONG, "--teacher-epochs", LONG], "kd multitask"),
        (["taskdistill", "--seeds", "1", "--epochs", LONG], "kd taskdistill"),
        (["explain", "--model", "s=kd.models:digits_student@s.safetensors", "--steps", "10000000"], "kd explain"),
    ],
    ids=["graph", "multitask", "taskdistill", "explain"],
)
def test_sigterm_stops_a_study_with_one_line(tmp_path: Path, args: list[str], command: str) -> None:
    save_weights(digits_student(), tmp_path / "s.safetensors")
    r = sigterm_when(args, catches_sigterm, tmp_path)
    assert_stopped(r, command)
    assert not (tmp_path / "g.json").exists()


def _serving(out: Path):
    """Ready once a kd serve subprocess wrote its port file under ``out`` (and the command its handler)."""

    def ready(pid: int) -> bool:
        return catches_sigterm(pid) and any(out.glob("*.port"))

    return ready


def _port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


# kd chain stops at a step and stops its stage's server: tests/test_chain.py.
@pytest.mark.parametrize("args", [["demo", "--seeds", "1", "--epochs", LONG, "--teacher-epochs", "1"]], ids=["demo"])
def test_sigterm_stops_the_kd_serve_it_started(tmp_path: Path, args: list[str]) -> None:
    out = tmp_path / "out"
    r = sigterm_when([*args, "--out", str(out)], _serving(out), tmp_path)
    left = processes_mentioning(str(out))
    for pid in left:  # the old code's orphans: stop them before failing
        os.kill(pid, signal.SIGKILL)
    assert left == [], "kd serve left running after its parent was stopped"
    assert_stopped(r, f"kd {args[0]}")
    port = int(next(out.glob("*.port")).read_text())
    assert _port_closed(port), subprocess.run(["ss", "-tanp"], capture_output=True, text=True).stdout
