"""Waiting in the main thread for a stop signal, without a lock in the signal handler.

The obvious ``signal.signal(SIGTERM, lambda *_: stop.set()); stop.wait()`` can deadlock
for good: ``Event.set`` takes the Event's lock, and Python runs a handler in the main
thread between two bytecodes, so a second signal that lands while the first handler's
``set`` holds that lock waits on itself. A shell script's ``kill $SERVER`` followed by an
EXIT trap's ``kill $(jobs -p)`` sends exactly two; measured: 1 hang in 300 such pairs a few
microseconds to 2 ms apart. Here the handler only appends the signal's number to a list,
and the main thread sleeps in ``poll`` on a pipe that CPython's C-level handler writes to
(``signal.set_wakeup_fd``), so it wakes at once.

``StopSignals`` is installed before a process announces that it is ready (prints its port,
writes its port file), so a signal sent as soon as it is ready is recorded, never fatal;
``wait`` returns at once if one came before it.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_RECHECK_MS = 500  # a signal taken by another thread wakes the pipe before its handler ran here


class StopSignals:
    """Catch ``signums`` from construction on (main thread only) and record each one.

    After the first, a further ``force`` signal (default SIGINT: Ctrl-C pressed again) ends
    the process at once with status 128 + signal, as a user at a terminal expects of a long
    drain; any other further signal (a second SIGTERM) is recorded and ignored, so a drain is
    never cut short by an orchestrator or a shell trap repeating itself. ``force_after_s``: a
    ``force`` signal within that many seconds of the first is the same press arriving twice (a
    Ctrl-C reaches a torchrun rank from the terminal and again forwarded by torchrun), recorded
    and ignored like a second SIGTERM.

    ``kd train`` and ``kd precompute`` use it without ``wait``: ``close()`` at once gives the
    wake-up fd back, and their loops look at ``first()`` between steps.
    """

    def __init__(self, signums: tuple[int, ...] = STOP_SIGNALS, force: int | None = signal.SIGINT,
                 force_after_s: float = 0.0) -> None:  # fmt: skip
        if threading.current_thread() is not threading.main_thread():
            raise ValueError("StopSignals must be created in the main thread (Python runs signal handlers there)")
        self.received: list[int] = []
        self.force = force
        self.force_after_s = force_after_s
        self._first_at = 0.0
        self._previous: dict[int, object] = {}
        self._previous_fd: int | None = None  # the wake-up fd before ours, once ours is set
        self._r, self._w = os.pipe()
        try:
            os.set_blocking(self._w, False)  # set_wakeup_fd requires it: a full pipe never blocks a handler
            os.set_blocking(self._r, False)
            self._previous_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
            for s in signums:
                self._previous[s] = signal.signal(s, self._on_signal)
        except BaseException:
            self.close(restore_handlers=True)
            raise

    def _on_signal(self, signum: int, _frame: object) -> None:
        now = time.monotonic()
        if self.received and signum == self.force and now - self._first_at >= self.force_after_s:
            os.write(2, f"\nsignal {signal.Signals(signum).name} again: exiting now, without draining\n".encode())
            os._exit(128 + signum)
        if not self.received:
            self._first_at = now
        self.received.append(signum)

    def first(self) -> int | None:
        """The first signal caught, or None: what a loop asks between its steps."""
        return self.received[0] if self.received else None

    def wait(self) -> int:
        """Block until a signal was caught (at once if one already was); return the first."""
        poller = select.poll()  # not select(): it refuses descriptors >= 1024
        poller.register(self._r, select.POLLIN)
        while not self.received:
            # Every caught signal writes a byte; the Python handler runs in this thread at the
            # next bytecode boundary, so look again after a short timeout, not only on a byte.
            if poller.poll(_RECHECK_MS):
                try:
                    os.read(self._r, 4096)
                except BlockingIOError:
                    pass
        return self.received[0]

    def close(self, restore_handlers: bool = False) -> None:
        """Give back the wake-up fd and the pipe. The handlers stay (later signals are still
        caught as described above) unless ``restore_handlers``."""
        if restore_handlers:  # also after an earlier close() that kept them
            for s, handler in self._previous.items():
                signal.signal(s, handler)
            self._previous = {}
        if self._r < 0:
            return
        if self._previous_fd is not None:
            signal.set_wakeup_fd(self._previous_fd)
        os.close(self._r)
        os.close(self._w)
        self._r = self._w = -1


class Stopped(Exception):
    """A run ended early by a stop signal, at a step boundary: raised by a trainer that asks its
    ``stop()`` between steps and has nothing left to finish (no result to return), so that
    nothing after the loop (an evaluation, a conversion, saving the student) runs on a half-trained
    model. ``signum``: the signal; ``where``: where the run stopped, e.g. "in epoch 2 after 5
    step(s)", for the command's one ``stopped by`` line."""

    def __init__(self, signum: int, where: str) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}")
        self.signum = signum
        self.where = where
