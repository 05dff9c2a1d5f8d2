"""``kd.core.signals.wait_for_signal``: how `kd serve` (and the bench's servers) wait for SIGTERM.

A real child process waits in its main thread while busy threads run beside it (as gRPC's do)
and this test sends it real signals. The old way (``signal.signal(SIGTERM, lambda *_:
stop.set()); stop.wait()``) deadlocked when a second signal landed while the first handler's
``Event.set`` held the Event's lock: ~1% of pairs sent a few microseconds apart (seen in CI as
a README walk-through whose server never exited after ``kill $SERVER`` and the EXIT trap's
``kill``). The pairs test below hung on that code in every run tried.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys, threading, time
from kd.core.signals import wait_for_signal

def spin():  # busy threads, like a server's: the kernel may hand a signal to any of them
    while True:
        sum(range(500)); time.sleep(0.0001)

for _ in range(3):
    threading.Thread(target=spin, daemon=True).start()
mode, rounds = sys.argv[1], int(sys.argv[2])
for i in range(rounds):
    print("waiting", i, flush=True)
    got = wait_for_signal()
    print("got", i, got, flush=True)
    if mode == "drain":  # signals during the drain must neither kill nor interrupt it
        t = time.monotonic()
        while time.monotonic() - t < 1.0:
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


def test_pairs_of_signals_microseconds_apart_never_hang_the_waiter() -> None:
    rounds = 300
    proc = _child("pairs", rounds)
    lines = Lines(proc)
    try:
        for i in range(rounds):
            assert lines.next(30) == f"waiting {i}", proc.stderr.read() if proc.poll() is not None else ""
            if i == 0:
                time.sleep(0.3)  # inside wait_for_signal by now (a signal before it would be fatal: default action)
            # Two signals back to back, as `kill $SERVER` and then a trap's `kill`. From round 1 on the
            # child may not be inside wait_for_signal yet (then it drops them), so repeat until it answers.
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
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_first_signal_is_returned_and_later_ones_do_not_cut_the_drain_short() -> None:
    proc = _child("drain", 1)
    try:
        lines = Lines(proc)
        assert lines.next(30) == "waiting 0"
        time.sleep(0.3)  # inside wait_for_signal by now (a signal before it would be fatal: default action)
        proc.send_signal(signal.SIGINT)
        assert lines.next(10) == f"got 0 {int(signal.SIGINT)}"
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM):  # during the drain
            proc.send_signal(s)
            time.sleep(0.05)
        assert lines.next(10) == "drained"
        proc.stdin.close()
        assert proc.wait(timeout=10) == 0, proc.stderr.read()
        assert b"Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
