"""``kd.core.signals``: how `kd serve` (and the bench's servers) wait for SIGTERM / Ctrl-C.

Real child processes wait in their main thread while busy threads run beside them (as gRPC's
do), and these tests send them real signals. The old way (``signal.signal(SIGTERM, lambda *_:
stop.set()); stop.wait()``) deadlocked when a second signal landed while the first handler's
``Event.set`` held the Event's lock: ~1% of pairs sent a few microseconds apart (seen in CI as a
README walk-through whose server never exited after ``kill $SERVER`` and the EXIT trap's
``kill``). The pairs test below hung on that code in every run tried.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kd.core.signals import StopSignals

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import os, sys, threading, time
from kd.core.signals import StopSignals

def spin():  # busy threads, like a server's: the kernel may hand a signal to any of them
    while True:
        sum(range(500)); time.sleep(0.0001)

for _ in range(3):
    threading.Thread(target=spin, daemon=True).start()
mode, rounds = sys.argv[1], int(sys.argv[2])
if mode == "manyfds":  # the wake-up pipe's descriptors land above 1024 (select() refuses those)
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
for i in range(rounds):
    stop = StopSignals()  # installed before we say we are waiting: nothing sent after is fatal
    print("waiting", i, flush=True)
    got = stop.wait()
    stop.close()
    print("got", i, got, flush=True)
    if mode in ("drain", "force"):  # further signals: SIGTERM ignored, Ctrl-C exits at once
        t = time.monotonic()
        while time.monotonic() - t < 1.5:
            time.sleep(0.01)
        print("drained", flush=True)
sys.stdin.read()  # exit only when told: a signal sent after this point could meet the default handler
"""


def _child(mode: str, rounds: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, mode, str(rounds)], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


class Lines:
    """The child's stdout, line by line, with a timeout (select on the raw pipe)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.fd, self.buf = proc, proc.stdout.fileno(), b""

    def next(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return ""
            chunk = os.read(self.fd, 4096)
            if not chunk:
                return ""
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()


def _finish(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_pairs_of_signals_microseconds_apart_never_hang_the_waiter() -> None:
    rounds = 300
    proc = _child("pairs", rounds)
    lines = Lines(proc)
    try:
        for i in range(rounds):
            assert lines.next(30) == f"waiting {i}", proc.stderr.read() if proc.poll() is not None else ""
            # Two signals back to back, as `kill $SERVER` and then a trap's `kill`. A pair's second signal
            # may reach the next round's waiter (each round's handlers record it), so send until answered.
            got = ""
            deadline = time.monotonic() + 10
            while not got and time.monotonic() < deadline:
                os.kill(proc.pid, signal.SIGTERM)
                os.kill(proc.pid, signal.SIGTERM)
                got = lines.next(0.01)
            assert got == f"got {i} {int(signal.SIGTERM)}", f"round {i}: the waiter hung ({got!r})"
        proc.stdin.close()
        assert proc.wait(timeout=10) == 0, proc.stderr.read()
    finally:
        _finish(proc)


def test_the_first_signal_is_returned_and_further_sigterms_do_not_cut_the_drain_short() -> None:
    proc = _child("drain", 1)
    try:
        lines = Lines(proc)
        assert lines.next(30) == "waiting 0"
        proc.send_signal(signal.SIGINT)
        assert lines.next(10) == f"got 0 {int(signal.SIGINT)}"
        for _ in range(3):  # during the drain
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.05)
        assert lines.next(10) == "drained"
        proc.stdin.close()
        assert proc.wait(timeout=10) == 0, proc.stderr.read()
        assert b"Traceback" not in proc.stderr.read()
    finally:
        _finish(proc)


def test_ctrl_c_again_during_the_drain_exits_at_once() -> None:
    proc = _child("force", 1)
    try:
        lines = Lines(proc)
        assert lines.next(30) == "waiting 0"
        proc.send_signal(signal.SIGTERM)
        assert lines.next(10) == f"got 0 {int(signal.SIGTERM)}"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 128 + signal.SIGINT
        assert lines.next(1) == ""  # never drained
        assert b"SIGINT again: exiting now" in proc.stderr.read()
    finally:
        _finish(proc)


def test_the_wake_up_pipe_works_above_descriptor_1024() -> None:
    proc = _child("manyfds", 1)
    try:
        lines = Lines(proc)
        assert lines.next(30) == "waiting 0", proc.stderr.read() if proc.poll() is not None else ""
        proc.send_signal(signal.SIGTERM)
        assert lines.next(10) == f"got 0 {int(signal.SIGTERM)}", proc.stderr.read() if proc.poll() is not None else ""
        proc.stdin.close()
        assert proc.wait(timeout=10) == 0
    finally:
        _finish(proc)


def test_outside_the_main_thread_it_refuses_and_leaks_nothing() -> None:
    before, handler = len(os.listdir("/proc/self/fd")), signal.getsignal(signal.SIGTERM)
    errors: list[BaseException] = []

    def make() -> None:
        try:
            StopSignals()
        except ValueError as e:
            errors.append(e)

    t = threading.Thread(target=make)
    t.start()
    t.join()
    assert len(errors) == 1 and "main thread" in str(errors[0])
    assert len(os.listdir("/proc/self/fd")) == before
    assert signal.getsignal(signal.SIGTERM) == handler  # nothing was installed


def test_a_signal_it_cannot_catch_leaves_every_handler_as_it_was() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises((OSError, ValueError)):
        StopSignals((signal.SIGTERM, signal.SIGKILL))
    assert {s: signal.getsignal(s) for s in before} == before
    assert len(os.listdir("/proc/self/fd")) == fds
    assert signal.set_wakeup_fd(-1) == -1  # and the wake-up fd given back


@pytest.mark.serial
def test_kd_serve_drains_on_a_sigterm_sent_the_moment_its_port_file_appears(tmp_path: Path, teacher_spec: str) -> None:
    # The handlers are installed before the port file is written (and before "serving on" is
    # printed): a SIGTERM sent as soon as the server says it is ready drains it, never kills it.
    # Before, 2 of 12 such runs died of the signal's default action (rc -15, nothing drained).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for i in range(3):
        port_file = tmp_path / f"port{i}"
        proc = subprocess.Popen([sys.executable, "-m", "kd", "serve", "--teacher", f"digits={teacher_spec}",
                                 "--port", "0", "--port-file", str(port_file)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while not port_file.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.0005)
            assert port_file.exists(), proc.communicate(timeout=10)[0] if proc.poll() is not None else "no port file"
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0 and "drained: 0 requests accepted, 0 unanswered" in out, (i, out)
        finally:
            _finish(proc)


@pytest.mark.serial
def test_kd_serve_says_1_request_not_1_requests_when_it_drains(tmp_path: Path, teacher_spec: str) -> None:
    """The drain line counted in the plural whatever the number ("drained: 1 requests accepted")."""
    import torch

    from kd.teacher_server.client import TeacherClient

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    port_file = tmp_path / "port"
    proc = subprocess.Popen([sys.executable, "-m", "kd", "serve", "--teacher", f"digits={teacher_spec}",
                             "--port", "0", "--port-file", str(port_file)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert port_file.exists(), proc.communicate(timeout=10)[0] if proc.poll() is not None else "no port file"
        with TeacherClient(f"127.0.0.1:{port_file.read_text()}", timeout=60) as c:
            assert c.infer("digits", torch.rand(3, 64))["logits"].shape == (3, 10)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "drained: 1 request accepted, 0 unanswered; bye" in out, out
    finally:
        _finish(proc)
