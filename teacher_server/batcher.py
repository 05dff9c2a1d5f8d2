"""Dynamic batching: requests from every client are queued and merged into
forwards of up to ``max_batch_size`` samples.

Semantics follow Triton's dynamic batcher: a partial batch waits at most
``max_queue_delay`` after its oldest request arrived; requests larger than
``max_batch_size`` are split across forwards and reassembled; a bounded queue
(``max_queue_size`` samples) rejects new work at once instead of growing.
One thread per batcher owns the model; callers only ever get futures.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch


class QueueFullError(RuntimeError):
    """The batcher's queue holds ``max_queue_size`` samples already."""


class BatcherClosedError(RuntimeError):
    """Submitted after ``close()``: the server is draining."""


@dataclass(eq=False)
class _Request:
    inputs: torch.Tensor
    future: Future
    arrival: float
    next_row: int = 0  # first row not yet handed to a forward
    done_rows: int = 0
    out: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return int(self.inputs.shape[0])


@dataclass
class BatcherStats:
    requests: int = 0
    samples: int = 0
    forwards: int = 0
    batch_sizes: deque = field(default_factory=lambda: deque(maxlen=10_000))


class DynamicBatcher:
    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        *,
        max_batch_size: int = 256,
        max_queue_delay_s: float = 0.002,
        max_queue_size: int = 0,
        name: str = "teacher",
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self._forward = forward
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max(0.0, max_queue_delay_s)
        self.max_queue_size = max_queue_size
        self.stats = BatcherStats()
        self._queue: deque[_Request] = deque()
        self._queued_rows = 0
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    @property
    def queued_samples(self) -> int:
        return self._queued_rows

    def submit(self, inputs: torch.Tensor) -> Future:
        """Queue a batch [N, ...]; the future resolves to the outputs [N, ...]."""
        n = int(inputs.shape[0])
        if n == 0:
            raise ValueError("empty batch")
        req = _Request(inputs, Future(), time.monotonic())
        with self._cv:
            if self._closed:
                raise BatcherClosedError("the teacher is shutting down and takes no new requests")
            if self.max_queue_size and self._queued_rows + n > self.max_queue_size:
                raise QueueFullError(
                    f"queue full: {self._queued_rows} samples queued, {n} more would exceed "
                    f"max_queue_size={self.max_queue_size}"
                )
            self._queue.append(req)
            self._queued_rows += n
            self.stats.requests += 1
            self._cv.notify()
        return req.future

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests, finish everything queued, stop the thread."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout)

    def _take_batch(self) -> list[tuple[_Request, int, int]] | None:
        with self._cv:
            while not self._queue and not self._closed:
                self._cv.wait()
            if not self._queue:
                return None  # closed and drained
            deadline = self._queue[0].arrival + self.max_queue_delay_s
            while self._queued_rows < self.max_batch_size and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cv.wait(remaining)
            pieces: list[tuple[_Request, int, int]] = []
            room = self.max_batch_size
            while self._queue and room:
                req = self._queue[0]
                # Marks the future running, so it cannot be cancelled mid-forward;
                # False means the caller already gave up: do not compute it.
                if req.next_row == 0 and not req.future.set_running_or_notify_cancel():
                    self._queue.popleft()
                    self._queued_rows -= req.rows - req.next_row
                    continue
                take = min(room, req.rows - req.next_row)
                pieces.append((req, req.next_row, take))
                req.next_row += take
                room -= take
                self._queued_rows -= take
                if req.next_row == req.rows:
                    self._queue.popleft()
            return pieces

    def _loop(self) -> None:
        while True:
            pieces = self._take_batch()
            if pieces is None:
                return
            if not pieces:
                continue
            if len(pieces) == 1 and pieces[0][2] == pieces[0][0].rows:
                x = pieces[0][0].inputs
            else:
                x = torch.cat([req.inputs[start : start + k] for req, start, k in pieces])
            try:
                y = self._forward(x)
            except BaseException as e:  # noqa: BLE001 - the error belongs to the callers
                for req, _, _ in pieces:
                    if not req.future.done():
                        req.future.set_exception(e)
                continue
            self.stats.forwards += 1
            self.stats.samples += int(x.shape[0])
            self.stats.batch_sizes.append(int(x.shape[0]))
            offset = 0
            for req, start, k in pieces:
                chunk = y[offset : offset + k]
                offset += k
                if req.future.done():
                    continue
                if start == 0 and k == req.rows:
                    req.future.set_result(chunk)
                    continue
                if req.out is None:
                    req.out = torch.empty((req.rows, *y.shape[1:]), dtype=y.dtype)
                req.out[start : start + k] = chunk
                req.done_rows += k
                if req.done_rows == req.rows:
                    req.future.set_result(req.out)
