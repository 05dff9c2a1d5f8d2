"""Dynamic batching: requests from every client are queued and merged into
forwards of up to ``max_batch_size`` samples.

Semantics follow Triton's dynamic batcher:

* a partial batch waits at most ``max_queue_delay`` after its oldest request
  arrived; a batch that reaches ``max_batch_size`` (or one of
  ``preferred_batch_sizes``) runs at once; unlike Triton, the delay is waited only
  where company comes (a recent batch held several requests, or one arrived while
  another was unanswered): a lone client with one request at a time never waits for
  it; and a request that queued behind a serial forward waits it from that forward's
  end, when the callers it answered come back;
* requests larger than ``max_batch_size`` are split across forwards and
  reassembled, many small ones are merged; each caller gets its own rows back;
* a bounded queue (``max_queue_size`` samples) rejects new work at once
  instead of growing; a request whose deadline passes while queued is dropped
  before the forward, and so is one whose caller cancelled.

A batch is formed only when the model can take it. Forming batches ahead of a
busy model would split closed-loop clients into small batches; waiting lets the
queue fill up to a full batch instead. Where nothing overlaps the forward (a
runner without ``overlaps_copy``: CPU), one *model* thread per teacher forms each
batch, runs it and answers the callers, so a request crosses two threads (its
handler's and this one), not four; with one such lane, a request whose caller waits for
it (``submit(waits=True)``: a unary handler), with no company expected (or no queue
delay), that finds the queue empty and the model idle crosses none: it runs on its
caller's thread (``inline``), and the model thread forms no batch until it is done.
Where the copy to the device overlaps the forward (CUDA), three threads form a
pipeline: the *assembler* forms one batch ahead and starts its copy (pin, side
stream) while the *model* thread runs the current forward; the *completion* thread
copies outputs back and hands each caller its slice. Either way forwards never overlap:
the model thread, or one inline caller while the model thread forms no batch, runs the model.

Several runners (``kd serve --instances N``, Triton's instance groups: copies of
one teacher on one or several devices) each get their own threads (a *lane*);
every lane takes the next batch from the one queue when its model is free.

A request may carry ``post``: its outputs are post-processed (top-k, probabilities,
reductions: ``kd.teacher_server.outputs``) while still on the model's device,
and only that result is copied to the host (``runner.to_host``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

Outputs = torch.Tensor | dict[str, torch.Tensor]
log = logging.getLogger("kd.serve")


class QueueFullError(RuntimeError):
    """The batcher's queue holds ``max_queue_size`` samples already."""


class BatcherClosedError(RuntimeError):
    """Submitted after ``close()``: the server is draining."""


class DeadlineExpiredError(TimeoutError):
    """The request's deadline passed while it was queued; it was not computed."""


class BatchRunner(Protocol):
    """What the batcher drives. ``forward`` runs on the model thread; ``prepare`` and
    ``to_host`` on it too, or on the assembler and completion threads where the runner
    says ``overlaps_copy = True`` (an optional attribute; so is ``on_thread_start()``,
    called on the model thread before its first forward)."""

    def prepare(self, x: torch.Tensor) -> Any: ...

    def forward(self, prepared: Any, layers: frozenset[str]) -> Outputs: ...

    def to_host(self, outputs: Outputs) -> Outputs: ...


class FunctionRunner:
    """Adapts a plain ``fn(x) -> outputs`` (CPU, no features) to ``BatchRunner``."""

    def __init__(self, fn: Callable[[torch.Tensor], Outputs]) -> None:
        self.fn = fn

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, prepared: torch.Tensor, layers: frozenset[str]) -> Outputs:
        return self.fn(prepared)

    def to_host(self, outputs: Outputs) -> Outputs:
        return outputs


@dataclass(eq=False)
class _Request:
    inputs: torch.Tensor
    future: Future
    arrival: float
    layers: frozenset[str]
    deadline: float | None
    post: Callable[[Outputs], Outputs] | None = None  # on the model's device, before the host copy
    next_row: int = 0  # first row not yet handed to a forward
    done_rows: int = 0
    parts: list[tuple[int, Outputs]] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return int(self.inputs.shape[0])


@dataclass
class BatchObservation:
    """One forward, as reported to an observer (metrics)."""

    size: int
    queue_waits: list[float]  # seconds each request piece waited before its forward started
    compute_seconds: float
    instance: int = 0  # which runner (lane) ran it


@dataclass
class BatcherStats:
    requests: int = 0
    samples: int = 0
    forwards: int = 0
    rejected: int = 0
    expired: int = 0
    cancelled: int = 0
    max_queued_samples: int = 0
    batch_sizes: deque = field(default_factory=lambda: deque(maxlen=10_000))
    instance_forwards: list[int] = field(default_factory=lambda: [0])  # forwards per runner (lane)


def _slice(out: Outputs, start: int, stop: int) -> Outputs:
    if isinstance(out, dict):
        return {k: v[start:stop] for k, v in out.items()}
    return out[start:stop]


def _concat(parts: list[tuple[int, Outputs]]) -> Outputs:
    parts = [p for _, p in sorted(parts, key=lambda item: item[0])]
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], dict):
        # Each forward computed the union of its requests' layers: keep the keys
        # every part has (this request's own layers are among them).
        keys = set.intersection(*(set(p) for p in parts))
        return {k: torch.cat([p[k].to(parts[0][k].device) for p in parts]) for k in parts[0] if k in keys}
    # Parts of one request may come from instances on different devices: gathered on the first's.
    return torch.cat([p.to(parts[0].device) for p in parts])


_STOP = object()


@dataclass(eq=False)
class _Lane:
    """One runner (model instance) and the threads that drive it."""

    index: int
    runner: BatchRunner
    suffix: str  # of its threads' names: "" for the first lane, "-1", "-2", ... after
    pipelined: bool
    # Pipeline: batches formed and not yet through their forward, at most one ahead.
    slots: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(2))
    to_model: queue.Queue = field(default_factory=lambda: queue.Queue(maxsize=1))
    to_completion: queue.Queue = field(default_factory=lambda: queue.Queue(maxsize=2))


class Answered:
    """The future of a request answered on its caller's thread (the inline path): done when
    ``submit`` returns, so it needs none of a ``Future``'s locking; the same reading methods."""

    __slots__ = ("_result", "_exception")

    def __init__(self, result: Any = None, exception: BaseException | None = None) -> None:
        self._result, self._exception = result, exception

    def done(self) -> bool:
        return True

    def running(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False

    def cancel(self) -> bool:
        return False  # answered already: nothing left to cancel

    def result(self, timeout: float | None = None) -> Any:
        if self._exception is not None:
            raise self._exception
        return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self._exception

    def add_done_callback(self, fn: Callable[[Answered], Any]) -> None:
        try:  # at once, as a done Future calls it, and like it logs what the callback raises
            fn(self)
        except Exception:
            log.exception("exception calling callback for %r", self)


class QueueAccounting:
    """What every batcher keeps about its queue for the service (drain, limits, metrics): rows
    queued, requests not yet answered, the max-depth statistic and the depth callback, and the
    admission of a request (closed? over ``max_queue_size``?). ``DynamicBatcher`` (tensor rows)
    and ``kd.teacher_server.lm.TokenBatcher`` (token rows) share it; the subclass sets
    ``name``, ``stats``, ``max_queue_size`` and ``_on_queue_depth`` and holds ``_cv`` around
    ``_admit``."""

    def _init_accounting(self) -> None:
        self._queued_rows = 0
        self._unresolved = 0  # requests submitted whose future is not done yet
        self._cv = threading.Condition()
        self._closed = False

    @property
    def queued_samples(self) -> int:
        return self._queued_rows

    @property
    def unresolved(self) -> int:
        """Requests accepted and not yet answered (queued or in the pipeline): a drain waits for 0."""
        return self._unresolved

    def _resolved(self, _future: Future) -> None:
        with self._cv:
            self._unresolved -= 1

    def _depth_changed(self) -> None:
        self.stats.max_queued_samples = max(self.stats.max_queued_samples, self._queued_rows)
        if self._on_queue_depth is not None:
            try:
                self._on_queue_depth(self._queued_rows)
            except Exception:  # noqa: BLE001 - a gauge; raised in the model thread, it would kill it
                log.exception("batcher %s: the queue-depth observer failed", self.name)

    def _admit(self, future: Future | None, n: int, unit: str = "samples") -> None:
        """Accept a request of ``n`` rows (under ``_cv``) or raise why not; an accepted request
        counts as unresolved until its future is done."""
        if self._closed:
            raise BatcherClosedError("the teacher is shutting down and takes no new requests")
        if self.max_queue_size and self._queued_rows + n > self.max_queue_size:
            self.stats.rejected += 1
            if n > self.max_queue_size:
                raise QueueFullError(
                    f"queue full: a request of {n} {unit} can never fit max_queue_size={self.max_queue_size}; split it"
                )
            raise QueueFullError(
                f"queue full: {self._queued_rows} {unit} queued, {n} more would exceed "
                f"max_queue_size={self.max_queue_size}"
            )
        self._unresolved += 1
        if future is not None:  # None: the caller answers it before returning and counts it resolved itself
            future.add_done_callback(self._resolved)
        self.stats.requests += 1


# Batches in a row of a single request, nothing overlapping them, after which the queue delay
# is no longer waited (a lone client); any overlap or batch of several waits it again.
LONE_AFTER = 4


class Company:
    """Whether a batcher waits its queue delay for more requests, and until when: only where
    company comes. A lone closed-loop client (batches of one, nothing overlapping) never
    waits for it; closed-loop clients of a fixed-cost forward, whose first returner finds
    the queue empty, still wait for the others instead of running alone. The batcher calls
    every method with its lock held."""

    __slots__ = ("_last_requests", "_overlap", "_lone_streak", "free_since")

    def __init__(self) -> None:
        self._last_requests = 0  # requests in the last batch formed
        self._overlap = False  # a request arrived while another was unanswered, since the last batch
        self._lone_streak = LONE_AFTER  # batches in a row of one request that nothing overlapped
        # When a serial forward last ended (set by the batcher): with company expected, a
        # request that queued behind it waits the delay from then, not from its arrival, since
        # the callers it just answered come back only now (two closed-loop callers started
        # together would otherwise alternate in batches of one for good).
        self.free_since = 0.0

    def arrived(self, others_unanswered: bool) -> None:
        """A request arrives; ``others_unanswered``: another was accepted and not answered yet,
        or was in the caller's hands when this one arrived (``DynamicBatcher.submit``'s
        ``overlapped``)."""
        if others_unanswered:
            self._overlap = True

    def expected(self) -> bool:
        """Whether more requests are likely within the queue delay: one arrived while another
        was unanswered since the last batch, or a batch of the last ``LONE_AFTER`` had several
        requests or such an overlap. One batch of one is not enough to stop waiting: slow
        closed-loop clients make those now and then."""
        return self._overlap or self._last_requests > 1 or self._lone_streak < LONE_AFTER

    def deadline(self, oldest_arrival: float, delay_s: float) -> float:
        """Until when a partial batch whose oldest request arrived then waits for more."""
        if not delay_s or not self.expected():
            return oldest_arrival
        return max(oldest_arrival, self.free_since) + delay_s

    def formed(self, requests: int) -> None:
        """A batch of ``requests`` requests starts: close the last one's record."""
        if self._last_requests == 1 and not self._overlap:
            self._lone_streak += 1
        elif self._last_requests:
            self._lone_streak = 0
        self._last_requests, self._overlap = requests, False


class DynamicBatcher(QueueAccounting):
    def __init__(
        self,
        runner: BatchRunner | Callable[[torch.Tensor], Outputs] | Sequence[BatchRunner],
        *,
        max_batch_size: int = 256,
        preferred_batch_sizes: Iterable[int] = (),
        max_queue_delay_s: float = 0.002,
        max_queue_size: int = 0,
        name: str = "teacher",
        observer: Callable[[BatchObservation], None] | None = None,
        on_queue_depth: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        preferred = sorted({int(p) for p in preferred_batch_sizes})
        if any(not 1 <= p <= max_batch_size for p in preferred):
            raise ValueError(f"preferred_batch_sizes {preferred} must lie in 1..max_batch_size={max_batch_size}")
        # Several runners: instances of one teacher (identical targets), each on its own lane.
        runners = list(runner) if isinstance(runner, (list, tuple)) else [runner]
        if not runners:
            raise ValueError("a batcher needs at least one runner")
        self.runners: list[BatchRunner] = [r if hasattr(r, "forward") else FunctionRunner(r) for r in runners]  # type: ignore[arg-type]
        self.runner = self.runners[0]
        self.name = name
        self.max_batch_size = max_batch_size
        self.preferred_batch_sizes = preferred
        self.max_queue_delay_s = max(0.0, max_queue_delay_s)
        self.max_queue_size = max_queue_size
        self.stats = BatcherStats(instance_forwards=[0] * len(self.runners))
        self._stats_lock = threading.Lock()  # lanes complete concurrently
        self._observer = observer
        self._on_queue_depth = on_queue_depth
        self._queue: deque[_Request] = deque()
        self._init_accounting()
        # Pipelined only where a stage overlaps the forward (see the module docstring).
        self._lanes = [
            _Lane(i, r, f"-{i}" if i else "", bool(getattr(r, "overlaps_copy", False)))
            for i, r in enumerate(self.runners)
        ]
        self.pipelined = self._lanes[0].pipelined
        # The inline path: with one serial lane and no queue delay, a request that arrives with
        # nothing queued and the model idle runs on its caller's thread (no hand-off: the
        # caller's future is done when submit returns); the model thread forms no batch
        # meanwhile, so forwards never overlap, and what arrives during it is merged after.
        self.inline = len(self._lanes) == 1 and not self.pipelined
        # The queue delay is waited only where company comes (``Company``); a lone client
        # takes the inline path.
        self._company = Company()
        self._inline_busy = False
        self._model_busy = False
        # CPU time of the last forward on its thread (waits for the GIL excluded): the service
        # runs a cheap one inline under its small-work lock (TeacherServicer._small_work).
        self.forward_cpu_s = 0.0
        self._tls = threading.local()  # callers' threads that ran the runner's per-thread set-up
        self._threads: list[threading.Thread] = []
        for lane in self._lanes:
            if lane.pipelined:
                self._threads += [
                    threading.Thread(target=self._assemble_loop, args=(lane,), name=f"batcher-{name}{lane.suffix}",
                                     daemon=True),
                    threading.Thread(target=self._model_loop, args=(lane,), name=f"model-{name}{lane.suffix}",
                                     daemon=True),
                    threading.Thread(target=self._completion_loop, args=(lane,),
                                     name=f"completion-{name}{lane.suffix}", daemon=True),
                ]  # fmt: skip
            else:
                self._threads.append(threading.Thread(target=self._serial_loop, args=(lane,),
                                                      name=f"model-{name}{lane.suffix}", daemon=True))  # fmt: skip
        for t in self._threads:
            t.start()

    def submit(
        self,
        inputs: torch.Tensor,
        *,
        layers: Iterable[str] = (),
        deadline: float | None = None,
        post: Callable[[Outputs], Outputs] | None = None,
        waits: bool = False,
        overlapped: bool = False,
    ) -> Future | Answered:
        """Queue a batch [N, ...]; the future resolves to the outputs for these N rows.

        ``waits``: the caller blocks on the result right after (a unary RPC handler), so where
        the inline path applies (``inline``: one serial lane, no queue delay, nothing queued,
        the model idle) the forward runs here and the future is done on return.

        ``overlapped``: the caller saw another request for this batcher overlap this one
        before it reached ``submit``, which may be answered by now (the service's unary calls,
        which may wait for its small-work lock first): company, as a request that arrives
        while another is unanswered here.

        ``deadline`` is a ``time.monotonic()`` instant after which the request is
        dropped unanswered (DeadlineExpiredError) if it has not started. ``post`` maps
        this request's outputs (all N rows, on the model's device) to what is copied
        to the host and returned; an exception it raises is the request's.
        """
        n = int(inputs.shape[0])
        if n == 0:
            raise ValueError("empty batch")
        arrival = time.monotonic()
        layers = frozenset(layers)  # before admission: a bad argument must leave nothing admitted or busy
        with self._cv:
            self._company.arrived(bool(self._unresolved) or overlapped)
            alone = self.max_queue_delay_s == 0 or not self._company.expected()  # no company to wait for
            inline = (waits and self.inline and alone and not self._queue and not self._model_busy
                      and not self._inline_busy and n <= self.max_batch_size)  # fmt: skip
            if inline:
                self._admit(None, n)
                self._inline_busy = True
                self._company.formed(1)
            else:
                req = _Request(inputs, Future(), arrival, layers, deadline, post)
                self._admit(req.future, n)
                self._queue.append(req)
                self._queued_rows += n
                self._depth_changed()
                self._cv.notify()
        if inline:
            return self._run_inline(inputs, layers, deadline, post, arrival)
        return req.future

    def _run_inline(self, inputs: torch.Tensor, layers: frozenset[str], deadline: float | None,
                    post: Callable[[Outputs], Outputs] | None, arrival: float) -> Answered:  # fmt: skip
        """Run and answer one request alone on the caller's thread (see ``inline``): the
        same forward, post-processing, statistics and observation as a batch of one on the
        model thread, without a queue entry, a Future or a batch to slice (~40 us less a
        request on this path, most of a near-free teacher's batcher cost)."""
        lane = self._lanes[0]
        try:
            if not getattr(self._tls, "started", False):
                self._tls.started = True
                self._thread_start(lane)
            started = time.monotonic()
            if deadline is not None and started > deadline:
                self.stats.expired += 1
                return Answered(exception=DeadlineExpiredError("deadline passed before the forward"))
            try:
                prepared = lane.runner.prepare(inputs)
                t0, c0 = time.perf_counter(), time.thread_time()
                out = lane.runner.forward(prepared, layers)
                self.forward_cpu_s = time.thread_time() - c0
                if post is None:  # as _complete: a failed whole-batch host copy counts no forward
                    result = lane.runner.to_host(out)
            except BaseException as e:  # noqa: BLE001 - the request's, as on the model thread
                return Answered(exception=e)
            error: BaseException | None = None
            if post is not None:  # as _complete: this request's error, after its forward is counted and observed
                try:
                    result = lane.runner.to_host(post(out))
                except BaseException as e:  # noqa: BLE001
                    error = e
            try:
                self._count_forward(int(inputs.shape[0]), [started - arrival], time.perf_counter() - t0, 0)
            except BaseException as e:  # noqa: BLE001 - the observer's; as _run_batch: the batch's callers' error
                log.exception("batcher %s: a batch failed outside the forward", self.name)
                return Answered(exception=e)
            return Answered(exception=error) if error is not None else Answered(result)
        finally:
            with self._cv:
                self._inline_busy = False
                self._company.free_since = time.monotonic()
                self._unresolved -= 1
                # The model thread may form the batch that queued meanwhile, or finish a drain;
                # with neither, waking it costs ~20% of a batch-1 request's server CPU for nothing.
                if self._queue or self._closed:
                    self._cv.notify_all()

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests, finish everything queued, stop the threads."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout)

    # -- stage 1: form a batch and prepare its input -----------------------------------
    def _ready_size(self) -> int | None:
        """Rows to take now, or None to keep waiting (caller holds the lock)."""
        if self._queued_rows >= self.max_batch_size:
            return self.max_batch_size
        fitting = [p for p in self.preferred_batch_sizes if p <= self._queued_rows]
        return fitting[-1] if fitting else None

    def _drop_dead(self, now: float) -> None:
        """Remove requests that were cancelled or expired before any row ran (lock held)."""
        keep: deque[_Request] = deque()
        for req in self._queue:
            if req.next_row == 0:
                if req.deadline is not None and now > req.deadline:
                    if req.future.set_running_or_notify_cancel():
                        req.future.set_exception(
                            DeadlineExpiredError(f"deadline passed after {now - req.arrival:.3f}s in the queue")
                        )
                        self.stats.expired += 1
                    else:
                        self.stats.cancelled += 1
                    self._queued_rows -= req.rows
                    continue
                if req.future.cancelled():
                    self.stats.cancelled += 1
                    self._queued_rows -= req.rows
                    continue
            keep.append(req)
        self._queue = keep

    def _take_batch(self) -> list[tuple[_Request, int, int]] | None:
        with self._cv:
            while True:
                while (not self._queue and not self._closed) or self._inline_busy:
                    self._cv.wait()
                if not self._queue:
                    return None  # closed and drained
                deadline = self._company.deadline(self._queue[0].arrival, self.max_queue_delay_s)
                size = self._ready_size()
                while size is None and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cv.wait(remaining)
                    size = self._ready_size()
                self._drop_dead(time.monotonic())
                if self._queue:
                    break
                self._depth_changed()
            room = min(size or self.max_batch_size, self.max_batch_size)
            pieces: list[tuple[_Request, int, int]] = []
            while self._queue and room:
                req = self._queue[0]
                # Marks the future running, so it cannot be cancelled mid-forward.
                if req.next_row == 0 and not req.future.set_running_or_notify_cancel():
                    self._queue.popleft()
                    self._queued_rows -= req.rows
                    self.stats.cancelled += 1
                    continue
                take = min(room, req.rows - req.next_row)
                pieces.append((req, req.next_row, take))
                req.next_row += take
                room -= take
                self._queued_rows -= take
                if req.next_row == req.rows:
                    self._queue.popleft()
            self._depth_changed()
            self._model_busy = True  # until this batch is answered (the serial loop clears it)
            self._company.formed(len({id(req) for req, _, _ in pieces}))
            return pieces

    def _thread_start(self, lane: _Lane) -> None:
        start = getattr(lane.runner, "on_thread_start", None)  # optional: per-thread set-up (torch threads)
        if start is not None:
            try:
                start()
            except Exception:  # noqa: BLE001 - the forwards still run, with torch's defaults
                log.exception("batcher %s: the runner's thread set-up failed", self.name)

    def _assemble(self, lane: _Lane, pieces: list[tuple[_Request, int, int]]) -> tuple | None:
        """Concatenate and prepare a batch -> the model's work item (None: failed, callers told)."""
        started = time.monotonic()
        try:
            if len(pieces) == 1 and pieces[0][2] == pieces[0][0].rows:
                x = pieces[0][0].inputs
            else:
                x = torch.cat([req.inputs[start : start + k] for req, start, k in pieces])
            prepared = lane.runner.prepare(x)
        except BaseException as e:  # noqa: BLE001 - belongs to the callers
            self._fail(pieces, e)
            return None
        layers = frozenset().union(*(req.layers for req, _, _ in pieces))
        waits = [started - req.arrival for req, _, _ in pieces]
        return pieces, prepared, layers, int(x.shape[0]), waits

    def _forward(self, lane: _Lane, item: tuple) -> tuple | None:
        """Run a work item -> the completion's item (None: failed, callers told)."""
        pieces, prepared, layers, size, waits = item
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            out = lane.runner.forward(prepared, layers)
        except BaseException as e:  # noqa: BLE001
            self._fail(pieces, e)
            return None
        self.forward_cpu_s = time.thread_time() - c0
        return pieces, out, size, waits, t0

    # -- no overlap to gain (CPU): one thread forms, runs and answers each batch -----------
    def _serial_loop(self, lane: _Lane) -> None:
        self._thread_start(lane)
        while (pieces := self._take_batch()) is not None:
            try:
                self._run_batch(lane, pieces)
            finally:
                with self._cv:
                    self._model_busy = False
                    self._company.free_since = time.monotonic()

    def _run_batch(self, lane: _Lane, pieces: list[tuple[_Request, int, int]]) -> None:
        """Assemble, run and answer one batch on this thread. Whatever goes wrong is the
        batch's callers' error, never the thread's: a model thread that died would leave
        every later request queued until its caller's deadline."""
        try:
            if pieces and (item := self._assemble(lane, pieces)) is not None:
                if (done := self._forward(lane, item)) is not None:
                    self._complete(lane, done)
        except BaseException as e:  # noqa: BLE001 - e.g. an observer or a host copy that raised
            log.exception("batcher %s: a batch failed outside the forward", self.name)
            self._fail(pieces, e)

    # -- pipelined (CUDA): stage 1, form a batch and start its copy to the device ----------
    def _assemble_loop(self, lane: _Lane) -> None:
        try:
            while True:
                lane.slots.acquire()  # released by the model thread once a forward is done
                if (pieces := self._take_batch()) is None:
                    break
                item = self._assemble(lane, pieces) if pieces else None
                if item is None:
                    lane.slots.release()
                    continue
                lane.to_model.put(item)
        finally:
            lane.to_model.put(_STOP)

    # -- stage 2: the forward ----------------------------------------------------------
    def _model_loop(self, lane: _Lane) -> None:
        try:
            self._thread_start(lane)
            while (item := lane.to_model.get()) is not _STOP:
                try:
                    done = self._forward(lane, item)
                finally:
                    lane.slots.release()  # the assembler may form the next batch now
                if done is not None:
                    lane.to_completion.put(done)
        finally:
            lane.to_completion.put(_STOP)

    # -- stage 3: copy back and answer -------------------------------------------------
    def _completion_loop(self, lane: _Lane) -> None:
        while (item := lane.to_completion.get()) is not _STOP:
            try:
                self._complete(lane, item)
            except BaseException as e:  # noqa: BLE001 - the batch's callers', not the thread's (see _run_batch)
                log.exception("batcher %s: a batch failed while answering", self.name)
                self._fail(item[0], e)

    def _complete(self, lane: _Lane, item: tuple) -> None:
        pieces, out, size, waits, t0 = item
        # With a request to post-process, the outputs stay on the device until each
        # request's own result is made; then only that result is copied to the host.
        on_device = any(req.post is not None for req, _, _ in pieces)
        try:
            if not on_device:
                out = lane.runner.to_host(out)
        except BaseException as e:  # noqa: BLE001
            self._fail(pieces, e)
            return
        answers: list[tuple[_Request, Any, BaseException | None]] = []
        offset = 0
        for req, start, k in pieces:
            chunk = out if k == size else _slice(out, offset, offset + k)  # one whole request: no slicing
            offset += k
            if req.future.done():
                continue
            if k != req.rows:  # one piece of a request split over forwards (maybe over lanes)
                with self._stats_lock:
                    req.parts.append((start, chunk))
                    req.done_rows += k
                    if req.done_rows < req.rows:
                        continue
                    parts, req.parts = req.parts, []
                chunk = _concat(parts)
            try:
                if on_device:
                    chunk = lane.runner.to_host(req.post(chunk) if req.post is not None else chunk)
                answers.append((req, chunk, None))
            except BaseException as e:  # noqa: BLE001 - this request's, not the batch's
                answers.append((req, None, e))
        self._count_forward(size, waits, time.perf_counter() - t0, lane.index)
        for req, result, error in answers:
            if req.future.done():
                continue
            if error is not None:
                req.future.set_exception(error)
            else:
                req.future.set_result(result)

    def _count_forward(self, size: int, waits: list[float], compute: float, lane_index: int) -> None:
        """Count a forward that ran (whatever its callers' answers) and report it to the
        observer, which may raise: the model thread's batches and inline answers alike."""
        with self._stats_lock:
            self.stats.forwards += 1
            self.stats.samples += size
            self.stats.batch_sizes.append(size)
            self.stats.instance_forwards[lane_index] += 1
        if self._observer is not None:
            self._observer(BatchObservation(size, waits, compute, lane_index))

    @staticmethod
    def _fail(pieces: list[tuple[_Request, int, int]], e: BaseException) -> None:
        for req, _, _ in pieces:
            if not req.future.done():
                req.future.set_exception(e)
