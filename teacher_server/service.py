"""The RPC layer: validates requests, hands tensors to batchers, encodes replies.

Handler threads never run a model: they parse the raw request bytes (a body
that does not parse is INVALID_ARGUMENT naming the RPC), validate everything
(names against layer shapes, numeric options, the answer's size) before any
work, decode (or load samples by reference), submit to the teacher's batcher or
job queue, wait on a future and encode the outputs. What the request asks for
(top-k with its log-sum-exp at T, probabilities, labels, reductions, pooling and
dtype casts) is made by ``kd.teacher_server.outputs.postprocess`` on the model's
device before the copy to the host, so only that crosses it. Every refusal is
a ``RequestError`` with a precise status; an output that is not finite is
refused, never sent. Streams are bounded in number (per client and overall, on
threads of their own, so idle streams cannot starve unary calls and health
checks) and flow-controlled (a bounded window of requests between read and
answered per stream).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import torch

from kd.core import reductions
from kd.core.reductions import pool, shorten  # noqa: F401 - pool: re-exported (tests, older callers)
from kd.core.samples import VIEW_STRIDE, SampleSource
from kd.core.signature import SignatureError, TeacherSignature, TensorSpec, format_shape
from kd.core.views import pixels_to_input
from kd.core.wire import WireError, dtype_name, fill_proto, from_proto, proto_dtype, split_payload, to_proto
from kd.teacher_server import access as tiers
from kd.teacher_server import lm
from kd.teacher_server.access import STREAM_CLOSED_KEY, Accounting, BudgetExceeded, client_identity, stream_key
from kd.teacher_server.batcher import (
    Answered,
    BatcherClosedError,
    DeadlineExpiredError,
    DynamicBatcher,
    QueueFullError,
)
from kd.teacher_server.gradients import (
    BNStates,
    JobQueue,
    PackLayout,
    SynthesisDiverged,
    SynthesisParams,
    VJPRunner,
    batchnorm_layers,
    batchnorm_loss,
    synthesize,
)
from kd.teacher_server.loading import Teacher
from kd.teacher_server.metrics import ServerMetrics
from kd.teacher_server.outputs import OutputRangeError, all_finite, nothing_asked, postprocess
from kd.v1 import teacher_pb2 as pb
from kd.v1 import teacher_pb2_grpc as pb_grpc

log = logging.getLogger("kd.serve")

_FLOAT_OUT = {pb.FLOAT32: torch.float32, pb.FLOAT16: torch.float16, pb.BFLOAT16: torch.bfloat16}
_OUT_ITEMSIZE = {pb.DTYPE_UNSPECIFIED: 4, pb.FLOAT32: 4, pb.FLOAT16: 2, pb.BFLOAT16: 2}
_REPLY_SLACK = 4096  # bytes of a reply beyond its tensors' data (names, shapes, usage)
_SPEC_CACHE_SIZE = 256  # output specs remembered per teacher
_MAX_LISTED = 40
_MAX_DETAILS = 1000  # characters of a status message: gRPC's metadata limit is a few KB
# Numeric options: outside these ranges the arithmetic overflows or means nothing.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 1e3
MAX_TTL_SECONDS = 7 * 24 * 3600.0
MAX_STATE_ID = 256
MAX_LR = 10.0
MAX_WEIGHT = 1e6
MAX_CLASS_SAMPLES, MAX_SAMPLE_ROUNDS = 4096, 256  # draws per round, rounds (OutputSpec.class_samples)
SERVICE = pb.DESCRIPTOR.services_by_name["TeacherService"].full_name
_F255 = np.float32(255.0)


class RequestError(Exception):
    """A request the server refuses: a gRPC status code and a precise message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _MAX_LISTED else "")


def _clip(message: str) -> str:
    """A status message short enough for gRPC's metadata whatever the request echoed."""
    return message if len(message) <= _MAX_DETAILS else message[: _MAX_DETAILS - 20] + " ... (truncated)"


_CANCEL_GRACE_S = 2.0  # how long a short upload waits for its client's cancel to arrive


def _upload_chunks(request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[pb.WeightsChunk]:
    """An upload's ``WeightsChunk`` messages, each parsed; a call its client cancelled (or whose
    deadline passed) while it was read is CANCELLED (DEADLINE_EXCEEDED), not a server error."""
    received = announced = size = 0
    terminated = threading.Event()
    context.add_callback(terminated.set)  # a cancel or a passed deadline ends the call before its handler

    def ended() -> RequestError:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return RequestError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"PublishWeights: the call's deadline passed after {received} chunk(s); "
                                "the weights are unchanged")  # fmt: skip
        return RequestError(grpc.StatusCode.CANCELLED,
                            f"PublishWeights: the client cancelled the upload after {received} chunk(s); "
                            "the weights are unchanged")  # fmt: skip

    try:
        for raw in request_iterator:
            chunk = _parse("PublishWeights", pb.WeightsChunk, raw, f" (chunk #{received})")
            announced = chunk.total_bytes if received == 0 else announced
            size += len(chunk.data)
            yield chunk
            received += 1
    except grpc.RpcError:
        raise ended() from None
    # A cancelled call's requests may also just end (no RpcError), and the cancel can reach the
    # server a moment after that end: an upload short of its announced bytes waits a moment for
    # it before it is the client's mistake (INVALID_ARGUMENT, from WeightSlot.receive).
    if not context.is_active() or (size < announced and terminated.wait(_CANCEL_GRACE_S)):
        raise ended()


def _abort(context: grpc.ServicerContext, e: RequestError) -> None:
    context.abort(e.code, _clip(e.message))


def _finite_number(what: str, value: float, lo: float, hi: float, *, open_lo: bool = False) -> None:
    ok = math.isfinite(value) and (lo < value if open_lo else lo <= value) and value <= hi
    if not ok:
        interval = f"{'(' if open_lo else '['}{lo:g}, {hi:g}]"
        raise _invalid(f"{what} must be a finite number in {interval}, got {value}")


# Whether every value is finite, from two scalars (kd.teacher_server.outputs.all_finite): min
# and max propagate NaN and surface +-Inf, so one pass without a boolean tensor the size of
# the batch (``isfinite`` of a 19 MB batch allocated 4.8 MB and took ~5x longer).
_all_finite = all_finite


def _check_outputs(outputs: dict[str, torch.Tensor]) -> None:
    """Refuse (OUT_OF_RANGE) rather than send NaN or Inf: the inputs are finite, so a
    non-finite output means they (or the dtype asked for) overflow the teacher's range."""
    for key, t in outputs.items():
        if not _all_finite(t):
            raise RequestError(
                grpc.StatusCode.OUT_OF_RANGE,
                f"output {shorten(key)} has NaN or Inf values for these inputs ({str(t.dtype).removeprefix('torch.')}):"
                " inputs or options outside the range the teacher computes in; nothing is sent",
            )


# Streams idle for at least this long may be closed to make room when a limit is reached: a
# stream between two requests of a busy client (nothing in flight for milliseconds) is never
# taken, one that waits on its client for a second or more gives way to a client that has none.
STREAM_RECLAIM_IDLE_S = 1.0


class StreamSlot:
    """One open long-lived call's place in ``StreamSlots``; calling it releases the place (once).
    An InferStream tells it when a request is read (``begin``) and when its reply is sent
    (``end``): a slot with nothing in flight is idle since its last read or reply."""

    __slots__ = ("_slots", "client", "last_active", "pending", "closed", "_on_reclaim")

    def __init__(self, slots: StreamSlots, client: str, on_reclaim) -> None:
        self._slots = slots
        self.client = client
        self.last_active = time.monotonic()
        self.pending = 0  # requests read whose reply is not sent yet
        self.closed = ""  # why the server closed it ("idle", "reclaimed"), or "released"
        self._on_reclaim = on_reclaim  # None: never reclaimed (Synthesize: busy until it ends)

    def __call__(self) -> None:
        self._slots._release(self, "released")

    def begin(self) -> bool:
        """A request was read; False if the server has closed the stream (drop the request
        unanswered and uncharged: the client resends it on its next stream)."""
        with self._slots._lock:
            if self.closed:
                return False
            self.pending += 1
            self.last_active = time.monotonic()
            return True

    def end(self) -> None:
        """A reply was sent."""
        with self._slots._lock:
            self.pending -= 1
            self.last_active = time.monotonic()

    def idle_for(self) -> float:
        """Seconds without anything in flight (0 while a request is)."""
        with self._slots._lock:
            return 0.0 if self.pending else time.monotonic() - self.last_active

    def close_if_idle(self, timeout: float) -> bool:
        """Close the stream (free its place) if nothing was in flight for ``timeout`` seconds."""
        with self._slots._lock:
            if self.closed or self.pending or time.monotonic() - self.last_active < timeout:
                return False
            self._slots._free(self, "idle")
            self._slots.closed_idle += 1
        self._slots._changed()
        return True


class StreamSlots:
    """Long-lived calls (InferStream, Synthesize) each hold a handler thread: at most
    ``max_streams`` at once and ``per_client`` per stream key (``access.stream_key``). A new
    stream beyond a limit takes the place of the longest-idle stream (nothing in flight for at
    least ``STREAM_RECLAIM_IDLE_S``; of the same key at the per-client limit, of any at the
    overall one), which is closed with UNAVAILABLE and the ``kd-stream-closed`` trailer; with
    none idle it is refused (RESOURCE_EXHAUSTED) at once. So idle streams never lock out a
    client that has work. Per-key entries exist only while open."""

    def __init__(self, max_streams: int, per_client: int, on_change=None,
                 reclaim_idle_s: float = STREAM_RECLAIM_IDLE_S) -> None:  # fmt: skip
        if max_streams < 1 or per_client < 1:
            raise ValueError(f"stream limits must be >= 1, got {max_streams} overall, {per_client} per client")
        self.max_streams = max_streams
        self.per_client = per_client
        self.reclaim_idle_s = reclaim_idle_s
        self.open = 0
        self.reclaimed = 0  # streams closed to make room, and closed past the idle timeout (counters)
        self.closed_idle = 0
        self._by_client: dict[str, int] = {}
        self._live: dict[StreamSlot, None] = {}  # insertion-ordered set
        self._lock = threading.Lock()
        self._on_change = on_change

    def acquire(self, client: str, on_reclaim=None) -> StreamSlot:
        """A place for a new stream of ``client``. ``on_reclaim()`` (None: the stream is never
        reclaimed) is called, outside the lock, when its place is given to another stream."""
        victim = None
        with self._lock:
            mine = self._by_client.get(client, 0)
            if mine >= self.per_client or self.open >= self.max_streams:
                victim = self._longest_idle(client if mine >= self.per_client else None)
                if victim is None and mine >= self.per_client:
                    raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                       f"client {shorten(client)} has {mine} streams open, the limit per client "
                                       f"(max_streams_per_client={self.per_client}), none of them idle")  # fmt: skip
                if victim is None:
                    raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                       f"{self.open} streams open, the server's limit (max_streams={self.max_streams}),"
                                       " none of them idle; retry later or use unary calls")  # fmt: skip
                self._free(victim, "reclaimed")
                self.reclaimed += 1
            slot = StreamSlot(self, client, on_reclaim)
            self._live[slot] = None
            self._by_client[client] = self._by_client.get(client, 0) + 1
            self.open += 1
        if victim is not None:
            victim._on_reclaim()
        self._changed()
        return slot

    def _longest_idle(self, client: str | None) -> StreamSlot | None:
        """The reclaimable stream (of ``client``; any when None) idle longest, if idle enough."""
        now, best = time.monotonic(), None
        for s in self._live:
            if s._on_reclaim is None or s.pending or (client is not None and s.client != client):
                continue
            if now - s.last_active >= self.reclaim_idle_s and (best is None or s.last_active < best.last_active):
                best = s
        return best

    def _free(self, slot: StreamSlot, why: str) -> None:  # under the lock
        slot.closed = why
        self._live.pop(slot, None)
        left = self._by_client.get(slot.client, 1) - 1
        if left:
            self._by_client[slot.client] = left
        else:
            self._by_client.pop(slot.client, None)
        self.open -= 1

    def _release(self, slot: StreamSlot, why: str) -> None:
        with self._lock:
            if slot.closed:
                return
            self._free(slot, why)
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.open)


@dataclass
class Endpoint:
    """One served teacher, its batcher, and how it takes uint8 inputs."""

    teacher: Teacher
    batcher: DynamicBatcher
    mean: torch.Tensor | None = None  # per channel, for uint8 inputs
    std: torch.Tensor | None = None
    accepted: tuple[int, ...] = field(default=(pb.FLOAT16, pb.UINT8))
    access: str = "white"
    # Lopes et al. activation records (teacher_server.records), computed by the operator.
    records: dict[str, torch.Tensor] | None = None
    records_dataset: str = ""
    class_names: list[str] = field(default_factory=list)
    # Operator limits of the gradient paths: samples per BatchNormLoss / InputGradient call,
    # iterations per Synthesize, jobs waiting per job queue (BatchNormLoss, Synthesize).
    max_gradient_batch: int = 1024
    max_synthesis_iterations: int = 10_000
    max_jobs_queued: int = 8
    jobs: dict[str, JobQueue] = field(default_factory=dict)
    # Input-gradient batchers, one per set of feature layers with an upstream gradient, least
    # recently used first; the calls holding each (``vjp_batcher``); requests of those retired.
    vjp_batchers: dict[frozenset[str], DynamicBatcher] = field(default_factory=dict)
    vjp_users: dict[frozenset[str], int] = field(default_factory=dict)
    vjp_retired_requests: int = 0
    vjp_lock: threading.Lock = field(default_factory=threading.Lock)
    bn_states: BNStates = field(default_factory=BNStates)
    # The target fingerprint (kd.core.signature.target_fingerprint of the serving options,
    # named in target_options) and the signature as served; the teacher's own when empty.
    fingerprint: str = ""
    target_options: dict[str, str] = field(default_factory=dict)
    signature: TeacherSignature | None = None
    # Live weight updates (kd.teacher_server.weights.WeightSlot; accept_weights): None = off.
    weights: Any = None
    # Output specs that passed the checks, by their bytes -> (layers, reply bytes per sample).
    spec_cache: dict[bytes, tuple[frozenset[str], int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        t = self.teacher
        self.fingerprint = self.fingerprint or t.fingerprint
        if self.signature is None:
            base = t.signature or TeacherSignature.classifier(t.input_shape, t.num_classes, input_dtype=t.input_dtype)
            self.signature = dataclasses.replace(
                base,
                class_names=tuple(self.class_names),
                mean=None if self.mean is None else tuple(self.mean.tolist()),
                std=None if self.std is None else tuple(self.std.tolist()),
            )

    MAX_VJP_BATCHERS = 16

    @contextlib.contextmanager
    def vjp_batcher(self, layers: frozenset[str]) -> Iterator[tuple[DynamicBatcher, PackLayout]]:
        """The input-gradient batcher of ``layers`` and its layout, held for the ``with`` block.

        At most ``MAX_VJP_BATCHERS`` sets are served at once: a new set retires the least
        recently used batcher that no call holds (its threads end); only when every one is
        held is the call refused. (They were never retired: 16 sets asked once, by anyone,
        refused every later new set for good, logits alone included.)"""
        t = self.teacher
        layout = PackLayout(t.input_shape, t.num_classes, tuple((n, tuple(t.layers[n])) for n in sorted(layers)))
        retired = None
        with self.vjp_lock:
            b = self.vjp_batchers.pop(layers, None)
            if b is None:
                if len(self.vjp_batchers) >= self.MAX_VJP_BATCHERS:
                    idle = next((k for k, v in self.vjp_batchers.items()
                                 if not self.vjp_users.get(k) and not v.unresolved), None)  # fmt: skip
                    if idle is None:
                        raise RequestError(
                            grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"teacher {t.name!r}: at most {self.MAX_VJP_BATCHERS} distinct sets of feature layers "
                            "with upstream gradients are served at once",
                        )
                    retired = self.vjp_batchers.pop(idle)
                    self.vjp_retired_requests += retired.stats.requests
                b = DynamicBatcher(
                    VJPRunner(t, layout),
                    max_batch_size=self.batcher.max_batch_size,
                    max_queue_delay_s=self.batcher.max_queue_delay_s,
                    max_queue_size=self.batcher.max_queue_size,
                    name=f"{t.name}-vjp",
                )
            self.vjp_batchers[layers] = b  # (re)inserted last: the most recently used
            self.vjp_users[layers] = self.vjp_users.get(layers, 0) + 1
        if retired is not None:
            retired.close(timeout=None)  # idle: nothing to drain
        try:
            yield b, layout
        finally:
            with self.vjp_lock:
                self.vjp_users[layers] -= 1
                if not self.vjp_users[layers]:
                    del self.vjp_users[layers]

    def all_vjp_batchers(self) -> list[DynamicBatcher]:
        with self.vjp_lock:
            return list(self.vjp_batchers.values())

    def busy(self) -> bool:
        """Whether accepted work is still queued or running (a drain waits for False)."""
        batchers = [self.batcher, *self.all_vjp_batchers()]
        return any(b.unresolved for b in batchers) or any(q.busy for q in self.jobs.values())

    def job_queue(self, kind: str) -> JobQueue:
        """The queue whose one thread runs this teacher's ``kind`` jobs (made on first use)."""
        with self.vjp_lock:
            q = self.jobs.get(kind)
            if q is None:
                q = self.jobs[kind] = JobQueue(f"{self.teacher.name}-{kind}", self.max_jobs_queued)
            return q

    def close(self, timeout: float | None) -> None:
        self.batcher.close(timeout=timeout)
        for b in self.all_vjp_batchers():
            b.close(timeout=timeout)
        for q in list(self.jobs.values()):
            q.close(timeout=timeout)

    def info(self, datasets: list[str], dataset_infos: Sequence[pb.DatasetInfo] = ()) -> pb.TeacherInfo:
        t = self.teacher
        norm = pb.Normalization(
            mean=[] if self.mean is None else self.mean.tolist(), std=[] if self.std is None else self.std.tolist()
        )
        info = pb.TeacherInfo(
            name=t.name,
            fingerprint=self.fingerprint,
            weights_fingerprint=t.weights_fingerprint,
            target_options=self.target_options,
            input_shape=list(t.input_shape),
            input_dtype=proto_dtype(t.input_dtype),
            num_classes=t.num_classes,
            max_batch_size=self.batcher.max_batch_size,
            device=str(t.device),
            accepted_input_dtypes=list(self.accepted),
            normalization=norm,
            layers=[pb.LayerInfo(name=n, shape=list(s)) for n, s in t.layers.items()],
            datasets=datasets,
            dataset_infos=list(dataset_infos),
            access=tiers.PROTO[self.access],
            batch_norms=[
                pb.BatchNormInfo(name=n, num_features=m.num_features, eps=m.eps) for n, m in batchnorm_layers(t.model)
            ],
            has_activation_records=self.records is not None,
            class_names=self.class_names,
        )
        if self.weights is not None:  # the live version and its fingerprints
            self.weights.describe(info)
        return self.signature.fill_info(info)

    def from_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """x / 255, then (x - mean[c]) / std[c]: in place on the one float copy (the same
        operations in the same order as out of place, so the same values bit for bit).
        On the host, numpy's division casts as it goes (one pass, not a cast then a divide)
        into memory it allocates with huge pages: ~16% less time on 32 x 3x224x224, and
        float32(v) / float32(255) either way, so the same bits."""
        if x.device.type == "cpu" and x.is_contiguous() and not x.requires_grad:
            y = torch.from_numpy(np.divide(x.numpy(), _F255, dtype=np.float32))
        else:
            y = x.to(torch.float32).div_(255.0)
        if self.mean is None:
            return y
        shape = (1, -1) + (1,) * (y.ndim - 2)
        return y.sub_(self.mean.view(shape)).div_(self.std.view(shape))


@dataclass
class _Prepared:
    endpoint: Endpoint
    inputs: torch.Tensor
    spec: pb.OutputSpec
    usage: pb.Usage | None = None
    layers: frozenset[str] = frozenset()  # the layers spec's features need
    view_params: torch.Tensor | None = None  # DatasetRef.return_view_params: float32 [N, PARAM_WIDTH]
    uniforms: torch.Tensor | None = None  # OutputSpec.sample_uniforms: float64 [N, R * K]


class TeacherServicer(pb_grpc.TeacherServiceServicer):
    def __init__(
        self,
        endpoints: dict[str, Endpoint],
        datasets: dict[str, SampleSource] | None = None,
        metrics: ServerMetrics | None = None,
        accounting: Accounting | None = None,
        *,
        max_message_bytes: int = 256 << 20,
        max_streams: int = 64,
        max_streams_per_client: int = 16,
        stream_window: int = 32,
        stream_idle_timeout_s: float = 300.0,
    ) -> None:
        self.endpoints = endpoints
        self.datasets = datasets or {}
        self._infos: list[pb.DatasetInfo] | None = None  # _dataset_infos, made on the first ListTeachers
        self.metrics = metrics
        self.accounting = accounting or Accounting()
        self.max_message_bytes = max_message_bytes
        if stream_window < 1:
            raise ValueError(f"stream_window must be >= 1, got {stream_window}")
        self.stream_window = stream_window
        if not 0 < stream_idle_timeout_s < math.inf:
            raise ValueError(f"stream_idle_timeout_s must be a number of seconds > 0, got {stream_idle_timeout_s}")
        self.stream_idle_timeout_s = stream_idle_timeout_s
        self.streams = StreamSlots(max_streams, max_streams_per_client,
                                   on_change=metrics.streams_open.set if metrics is not None else None)  # fmt: skip
        # Set by RunningServer.stop: new work is refused with UNAVAILABLE while accepted work finishes.
        self.draining = threading.Event()
        # Small requests are decoded and their replies encoded by one handler thread at a time.
        # That work is many short torch calls, and each releases the GIL: with several handler
        # threads at it, every release hands the GIL to another thread (a context switch or
        # two), which tripled its CPU at 3 concurrent batch-64 requests (246 -> 651 us a
        # request); waiting on this lock instead costs one hand-off per section. Large tensors
        # are not held to it (their few long calls run in parallel with the GIL released), nor
        # inputs by reference (dataset reads), nor a costly forward (queued requests merge).
        self._small_work = threading.Lock()
        # The lock above hides the callers queued on it from the batcher: which unary calls
        # overlapped another of their teacher is counted here instead (_UnaryCalls).
        self._unary = _UnaryCalls()

    def _one_at_a_time(self, small: bool):
        return self._small_work if small else contextlib.nullcontext()

    # -- validation ---------------------------------------------------------------
    def _check_open(self) -> None:
        if self.draining.is_set():
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "the server is draining (shutting down): retry elsewhere")

    def _endpoint(self, name: str, needed: str | None = None, what: str = "") -> Endpoint:
        ep = self.endpoints.get(name)
        if ep is None:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"unknown teacher {shorten(name)}; this server has: {_listing(sorted(self.endpoints))}",
            )
        if needed is not None and not tiers.allows(ep.access, needed):
            denied = tiers.AccessDenied(name, ep.access, needed, what)
            raise RequestError(grpc.StatusCode.PERMISSION_DENIED, str(denied))
        if needed == "white" and lm.is_token_teacher(ep.teacher):
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"teacher {name!r} takes token ids: {what or 'this call'} needs a teacher with "
                               "float inputs (kd.teacher_server.lm serves Infer and InferStream)")  # fmt: skip
        if needed == "white" and getattr(ep, "weights", None) is not None:
            # A swap copies into the parameters in place: a backward running across it would mix
            # versions or fail, so the gradient paths are not served for a live-weights teacher.
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"teacher {name!r} takes live weight updates (--accept-weights): {what or 'this call'} "
                               "is served only for teachers with fixed weights")  # fmt: skip
        return ep

    def _charge(self, context, *, samples: int = 0, gradient_samples: int = 0) -> pb.Usage:
        try:
            return self.accounting.charge(client_identity(context), samples=samples, gradient_samples=gradient_samples)
        except BudgetExceeded as e:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None

    def _prepare(
        self,
        request: pb.InferRequest,
        context: grpc.ServicerContext | None = None,
        *,
        payload: memoryview | None = None,
    ) -> _Prepared:
        """Validate and decode ``request``; ``payload``: the data of ``request.inputs``, read
        apart from the message (``_parse_infer``)."""
        self._check_open()
        ep = self._endpoint(request.teacher)
        if lm.is_token_teacher(ep.teacher):
            return self._prepare_tokens(ep, request, context, payload)
        token_only = lm.token_only_fields(request)
        if token_only:
            raise _invalid(f"{', '.join(token_only)}: only for token teachers; teacher {ep.teacher.name!r} is not one")
        kind = request.WhichOneof("input")
        params = None
        if kind == "inputs":
            x = self._decode_inputs(ep, request.inputs, payload=payload)
        elif kind == "ref":
            x, params = self._load_ref(ep, request.ref)
        else:
            raise _invalid("request has no inputs: set `inputs` (a tensor) or `ref` (dataset samples)")
        layers = self._checked_spec(ep, request.outputs, int(x.shape[0]))
        uniforms = self._sample_uniforms(request.outputs, int(x.shape[0]))
        usage = self._charge(context, samples=int(x.shape[0]))
        return _Prepared(ep, x, request.outputs, usage, layers, params, uniforms)

    @staticmethod
    def _sample_uniforms(spec: pb.OutputSpec, n: int) -> torch.Tensor | None:
        """The uniforms of the draws ``class_samples`` asks for (None: the server draws them)."""
        if not spec.HasField("sample_uniforms"):
            return None
        if not spec.class_samples:
            raise _invalid("sample_uniforms without class_samples: set class_samples (K draws per round)")
        want = (n, (spec.class_sample_rounds or 1) * spec.class_samples)
        msg = spec.sample_uniforms
        if msg.dtype != pb.FLOAT64:
            raise _invalid(f"sample_uniforms have dtype {dtype_name(msg.dtype)}; FLOAT64 expected")
        try:
            u = from_proto(msg, copy=False)
        except WireError as e:
            raise _invalid(f"sample_uniforms: {e}") from None
        if tuple(u.shape) != want:
            raise _invalid(f"sample_uniforms have shape {list(u.shape)}, expected {list(want)} "
                           "(one per draw: samples x rounds x class_samples)")  # fmt: skip
        lo, hi = torch.aminmax(u) if u.numel() else (torch.tensor(0.0), torch.tensor(0.0))
        if not (float(lo) >= 0.0 and float(hi) < 1.0):  # NaN fails both
            raise _invalid(f"sample_uniforms must lie in [0, 1), got values in [{float(lo)}, {float(hi)}]")
        return u

    def _prepare_tokens(
        self, ep: Endpoint, request: pb.InferRequest, context, payload: memoryview | None = None
    ) -> _Prepared:
        """A token teacher's request (kd.teacher_server.lm): ids [N, S] int64/int32 with lengths and
        positions, or a token dataset's samples by reference (asked: the next-token targets)."""
        kind = request.WhichOneof("input")
        lengths, default = list(request.lengths), None
        if request.outputs.class_samples or request.outputs.HasField("sample_uniforms"):
            raise _invalid(f"class_samples: for class outputs; token teacher {ep.teacher.name!r} draws per "
                           "position with token_samples")  # fmt: skip
        try:
            if kind == "ref":
                tokens, lengths, default = lm.read_ref(self.datasets, request.ref)
            elif kind == "inputs":
                if request.inputs.dtype not in (pb.INT64, pb.INT32):
                    raise _invalid(f"inputs have dtype {dtype_name(request.inputs.dtype)} but token teacher "
                                   f"{ep.teacher.name!r} takes token ids, INT64 or INT32")  # fmt: skip
                tokens = from_proto(request.inputs, copy=False, data=payload)
            else:
                raise _invalid("request has no inputs: set `inputs` (token ids) or `ref` (a token dataset's samples)")
            positions = default
            if request.HasField("positions"):
                try:
                    positions = from_proto(request.positions)
                except WireError as e:  # named as what it is, not as the inputs
                    raise _invalid(f"positions: {e}") from None
            work = lm.prepare(ep.teacher, tokens, lengths, positions, request.outputs, access=ep.access,
                              max_batch_tokens=ep.batcher.max_batch_tokens, max_message_bytes=self.max_message_bytes,
                              echo_positions=kind == "ref")  # fmt: skip
        except WireError as e:
            raise _invalid(f"inputs: {e}") from None
        except lm.TokenRequestError as e:
            raise RequestError(e.code, e.message) from None
        usage = self._charge(context, samples=work.rows)
        return _Prepared(ep, work, request.outputs, usage)

    @staticmethod
    def _check_tier(ep: Endpoint, spec: pb.OutputSpec) -> None:
        name, tier = ep.teacher.name, ep.access
        if spec.features and not tiers.allows(tier, "features"):
            raise RequestError(grpc.StatusCode.PERMISSION_DENIED,
                               str(tiers.AccessDenied(name, tier, "features", "features")))  # fmt: skip
        scores = spec.logits or spec.top_k or spec.probs_temperature > 0 or spec.class_samples
        if scores and not tiers.allows(tier, "scores"):
            raise RequestError(
                grpc.StatusCode.PERMISSION_DENIED,
                str(tiers.AccessDenied(name, tier, "scores", "logits, probabilities and top-k")) + "; ask for labels",
            )

    def _decode_inputs(self, ep: Endpoint, msg: pb.Tensor, *, payload: memoryview | None = None) -> torch.Tensor:
        t = ep.teacher
        want = proto_dtype(t.input_dtype)
        if msg.dtype != want and msg.dtype not in ep.accepted:
            takes = ", ".join(dtype_name(d) for d in (want, *ep.accepted))
            raise _invalid(f"inputs have dtype {dtype_name(msg.dtype)} but teacher {t.name!r} takes {takes}")
        shape = tuple(msg.shape)
        self._check_shape(t, shape)
        try:
            # One copy of the payload (kd.core.wire): a read-only view, converted (uint8,
            # float16) or handed to the model as is; nothing here writes to it.
            x = from_proto(msg, copy=False, data=payload)
        except WireError as e:
            raise _invalid(f"inputs: {e}") from None
        if msg.dtype == pb.UINT8:
            return ep.from_uint8(x)
        if x.dtype != t.input_dtype:
            x = x.to(t.input_dtype)
        self._check_finite(x)
        return x

    @staticmethod
    def _check_shape(t: Teacher, shape: tuple[int, ...]) -> None:
        # Per the signature: a variable dim (-1, the positions axis of a token teacher) takes any size.
        spec = t.signature.inputs[0] if t.signature is not None else TensorSpec("input", t.input_dtype, t.input_shape)
        if len(shape) == 0 or not spec.matches(shape[1:]):
            want = format_shape(spec.shape, batch=True)
            raise _invalid(f"inputs have shape {list(shape)} but teacher {t.name!r} takes {want}")
        if shape[0] == 0:
            raise _invalid("empty batch: inputs have 0 samples")

    @staticmethod
    def _check_finite(x: torch.Tensor) -> None:
        # One reduction on the common path; the per-sample search only for the error message.
        if _all_finite(x):
            return
        bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
        if bad.any():
            first = int(bad.nonzero()[0])
            # The row in this request: the one index the server knows (by value, the client's
            # rows are its own); kd's stream client adds the dataset index the row holds.
            raise _invalid(f"inputs contain NaN or Inf in {int(bad.sum())} of the request's {len(bad)} sample(s), "
                           f"first in row {first} of the inputs (counted from 0)")  # fmt: skip

    def _load_ref(self, ep: Endpoint, ref: pb.DatasetRef) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The samples of ``ref`` as the teacher's inputs, and their view params when asked for."""
        data = self.datasets.get(ref.dataset)
        if data is None:
            have = ", ".join(sorted(self.datasets)) or "none"
            raise RequestError(
                grpc.StatusCode.NOT_FOUND, f"unknown dataset {ref.dataset!r}; this server has registered: {have}"
            )
        if not ref.indices:
            raise _invalid("empty batch: ref has no indices")
        idx = torch.tensor(list(ref.indices), dtype=torch.long)
        bad = (idx < 0) | (idx >= len(data))
        if bad.any():
            raise _invalid(f"index {int(idx[bad][0])} out of range for dataset {ref.dataset!r} of {len(data)} samples")
        if ref.view_seeds and len(ref.view_seeds) != len(ref.indices):
            raise _invalid(f"ref has {len(ref.view_seeds)} view_seeds for {len(ref.indices)} indices")
        seeds = torch.tensor(list(ref.view_seeds), dtype=torch.long) if ref.view_seeds else None
        params = None
        if ref.return_view_params:
            if seeds is None:
                raise _invalid("return_view_params needs view_seeds: plain samples have no view params")
            if not callable(getattr(data, "read", None)):
                raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"dataset {ref.dataset!r} cannot report view params (it has no read())")  # fmt: skip
        try:
            if ref.return_view_params:
                # The params this server drew for these very pixels (SampleSource.read), not a
                # recomputation: what the teacher saw is what the client stores.
                rows = [data.read(int(i), int(s)) for i, s in zip(idx.tolist(), seeds.tolist())]
                x = torch.stack([r[0] for r in rows])
                params = torch.stack([r[1] for r in rows]).float()
            else:
                x = _read_samples(data, idx, seeds)
        except RequestError:
            raise
        except (ValueError, OSError, RuntimeError, KeyError) as e:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION, f"dataset {ref.dataset!r}: cannot read the samples: {e}"
            ) from None
        return self._conform(ep, x, ref.dataset), params

    def _conform(self, ep: Endpoint, x: torch.Tensor, dataset: str) -> torch.Tensor:
        """Dataset samples in the teacher's input shape and dtype (kd.core.signature):
        image views [C, H, W] (pixels, uint8 or float in [0, 1]) through the teacher's final
        transform (kd.core.views.pixels_to_input: resized to its H x W, normalised with its
        mean/std), as a client sending them by value does; other samples reshaped when the
        element count matches, uint8 normalised like uint8 inputs."""
        spec = ep.signature.input
        if spec.dtype.is_floating_point and spec.static:
            mean, std = (None, None) if ep.mean is None else (ep.mean.tolist(), ep.std.tolist())
            y = pixels_to_input(x, spec.shape, mean, std)
            if y is not None:
                y = y.to(spec.dtype)
                self._check_finite(y)
                return y
        try:
            x = spec.conform(x, f"dataset {dataset!r}")
        except SignatureError as e:
            raise _invalid(f"{e}; teacher {ep.teacher.name!r} takes {spec}") from None
        if x.dtype == torch.uint8 and spec.dtype.is_floating_point:
            return ep.from_uint8(x)
        if x.dtype != spec.dtype:
            if x.dtype.is_floating_point != spec.dtype.is_floating_point:
                raise _invalid(
                    f"dataset {dataset!r} gives {str(x.dtype).removeprefix('torch.')} samples but teacher "
                    f"{ep.teacher.name!r} takes {spec}"
                )
            x = x.to(spec.dtype)
        if x.is_floating_point():
            self._check_finite(x)
        return x

    @staticmethod
    def _check_spec(t: Teacher, spec: pb.OutputSpec) -> frozenset[str]:
        """Refuse a bad output spec; the layers its features need (computed once per request)."""
        for what, dt in (("logits_dtype", spec.logits_dtype), ("features_dtype", spec.features_dtype)):
            if dt not in (pb.DTYPE_UNSPECIFIED, *_FLOAT_OUT):
                raise _invalid(f"{what} {dtype_name(dt)} not offered; use FLOAT32, FLOAT16 or BFLOAT16")
        if not 0 <= spec.top_k <= t.num_classes:
            raise _invalid(f"top_k={spec.top_k} out of range: teacher {t.name!r} has {t.num_classes} classes")
        if not 0 <= spec.class_samples <= MAX_CLASS_SAMPLES or not 0 <= spec.class_sample_rounds <= MAX_SAMPLE_ROUNDS:
            raise _invalid(f"class_samples={spec.class_samples} must be in 0..{MAX_CLASS_SAMPLES} and "
                           f"class_sample_rounds={spec.class_sample_rounds} in 0..{MAX_SAMPLE_ROUNDS}")  # fmt: skip
        for what in ("probs_temperature", "sparse_temperature"):
            temp = getattr(spec, what)
            if temp != 0 and not (math.isfinite(temp) and MIN_TEMPERATURE <= temp <= MAX_TEMPERATURE):
                raise _invalid(
                    f"{what} must be a finite number in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] "
                    f"(or 0 for {'none' if what == 'probs_temperature' else '1'}), got {temp}"
                )
        try:
            layers = reductions.layers_needed(spec.features)
        except ValueError as e:
            raise _invalid(str(e)) from None
        unknown = [shorten(name) for name in layers if name not in t.layers]
        if unknown:
            raise _invalid(
                f"unknown layer(s) [{', '.join(unknown[:8])}] of teacher {t.name!r}; valid: {_listing(list(t.layers))}"
            )
        for name in spec.features:  # each reduction against its layers' shapes, before any work
            try:
                reductions.output_shape(name, t.layers, 1, pool_raw=spec.pool_features)
            except ValueError as e:
                raise _invalid(str(e)) from None
        return frozenset(layers)

    def _checked_spec(self, ep: Endpoint, spec: pb.OutputSpec, n: int) -> frozenset[str]:
        """``_check_spec``, ``_check_tier`` and ``_check_reply_size`` of ``spec`` for ``n`` samples;
        the layers its features need. A client sends the same spec request after request, so a
        spec that passed is remembered by its bytes (per endpoint: tier, layers and limits are
        the endpoint's) with its reply bytes per sample: ~5 us less per request. Not a spec that
        carries its own uniforms: they are the request's data, up to the message limit, and
        remembering them by their bytes pinned each such request's payload in memory."""
        key = None if spec.HasField("sample_uniforms") else spec.SerializeToString()
        hit = None if key is None else ep.spec_cache.get(key)
        if hit is None:
            layers = self._check_spec(ep.teacher, spec)
            self._check_tier(ep, spec)
            self._check_reply_size(ep, spec, n)
            # (a spec with features is not remembered: their reply sizes need the shapes per n)
            if key is not None and not spec.features and len(ep.spec_cache) < _SPEC_CACHE_SIZE:
                ep.spec_cache[key] = (layers, self._reply_bytes(ep, spec, 1) - _REPLY_SLACK)
            return layers
        layers, per_sample = hit
        if n * per_sample + _REPLY_SLACK > self.max_message_bytes:
            self._check_reply_size(ep, spec, n)  # raises, with the message
        return layers

    @staticmethod
    def _reply_bytes(ep: Endpoint, spec: pb.OutputSpec, n: int) -> int:
        """An upper bound on the reply's size for ``n`` samples."""
        c, isz = ep.teacher.num_classes, _OUT_ITEMSIZE[spec.logits_dtype]
        empty = nothing_asked(spec)
        labels_only = not tiers.allows(ep.access, "scores")
        per_sample = 0
        if spec.logits or (empty and not labels_only):
            per_sample += c * isz
        if spec.labels or (empty and labels_only):
            per_sample += 8
        if spec.top_k:
            per_sample += spec.top_k * (isz + 4) + 4
        if spec.probs_temperature > 0:
            per_sample += c * isz
        per_sample += 8 * spec.class_samples * (spec.class_sample_rounds or 1)  # ids and counts, INT32
        total = n * per_sample + _REPLY_SLACK
        fsz = _OUT_ITEMSIZE[spec.features_dtype]
        for name in spec.features:
            shape = reductions.output_shape(name, ep.teacher.layers, n, pool_raw=spec.pool_features)
            total += math.prod(shape) * fsz + 64
        return total

    def _check_reply_size(self, ep: Endpoint, spec: pb.OutputSpec, n: int) -> None:
        """Refuse (RESOURCE_EXHAUSTED) before the forward an answer that could not be sent."""
        total = self._reply_bytes(ep, spec, n)
        if total > self.max_message_bytes:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the answer to this request would be {total / 2**20:.1f} MiB, over the server's message limit of "
                f"{self.max_message_bytes / 2**20:.1f} MiB: send fewer samples per request or ask for smaller outputs",
            )

    # -- batching -----------------------------------------------------------------
    def _submit(self, p: _Prepared, context: grpc.ServicerContext | None, *, waits: bool = False,
                overlapped: bool = False) -> Future | Answered:  # fmt: skip
        """Hand ``p`` to its batcher; ``waits``: the caller blocks on the result at once (Infer),
        so the batcher may run it on this thread when the model is idle (no hand-off);
        ``overlapped``: another call for this teacher overlapped it (``_UnaryCalls``,
        ``DynamicBatcher.submit``)."""
        remaining = context.time_remaining() if context is not None else None
        deadline = time.monotonic() + remaining if remaining is not None else None
        try:
            # The outputs asked for are made next to the model, before the copy to the host.
            labels_only = not tiers.allows(p.endpoint.access, "scores")
            post = functools.partial(postprocess, p.spec, labels_only=labels_only, uniforms=p.uniforms)
            if p.endpoint.weights is not None:  # live weights: the rows keep their version tags
                post = p.endpoint.weights.tag(post)
            batcher = p.endpoint.batcher
            unary = waits and isinstance(batcher, DynamicBatcher)  # token batchers have no inline path
            more = {"waits": True, "overlapped": overlapped} if unary else {}
            future = batcher.submit(p.inputs, layers=p.layers, deadline=deadline, post=post, **more)
        except QueueFullError as e:
            name = p.endpoint.teacher.name
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"teacher {name!r}: {e}") from None
        except BatcherClosedError as e:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(e)) from None
        if self.metrics is not None:
            self.metrics.accepted(p.endpoint.teacher.name, int(p.inputs.shape[0]))
        return future

    @staticmethod
    def _failed(future: Future | Answered) -> RequestError:
        if future.cancelled():  # the client went away or its deadline passed while queued
            return RequestError(grpc.StatusCode.CANCELLED, "cancelled while queued: the caller went away")
        e = future.exception()
        if isinstance(e, DeadlineExpiredError):
            return RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, f"not computed: {e}")
        if isinstance(e, OutputRangeError):  # refused rather than sending NaN or Inf
            return RequestError(grpc.StatusCode.OUT_OF_RANGE, str(e))
        return RequestError(grpc.StatusCode.INTERNAL, f"teacher forward failed: {type(e).__name__}: {e}")

    # -- encoding -----------------------------------------------------------------
    def _encode(self, request: pb.InferRequest, p: _Prepared, out: dict[str, torch.Tensor]) -> pb.InferResponse:
        """The reply from the outputs ``postprocess`` made (on the model's device, checked finite)."""
        fingerprint, version = p.endpoint.fingerprint, 0
        if p.endpoint.weights is not None:  # live weights: one version answers (recomputed if mixed)
            out, fingerprint, version = p.endpoint.weights.settle(out, lambda: self._recompute(p))
        if self.metrics is not None:
            self.metrics.replied(p.endpoint.teacher.name, sum(t.numel() * t.element_size() for t in out.values()))
        resp = pb.InferResponse(
            request_id=request.request_id, teacher=p.endpoint.teacher.name, fingerprint=fingerprint,
            weights_version=version,
        )  # fmt: skip
        # Filled in place: tensor messages built apart and assigned would be copied once more.
        for key, t in out.items():
            fill_proto(resp.outputs[key], t)
        if p.usage is not None:
            resp.usage.CopyFrom(p.usage)
        if p.view_params is not None:
            fill_proto(resp.view_params, p.view_params)
        return resp

    def _recompute(self, p: _Prepared) -> dict[str, torch.Tensor]:
        future = self._submit(p, None)
        try:
            return future.result()
        except Exception:  # noqa: BLE001
            raise self._failed(future) from None

    def PublishWeights(self, request_iterator, context) -> pb.PublishWeightsResponse:
        """Live weight update (kd.teacher_server.weights): off unless the teacher accepts them."""
        from kd.teacher_server.weights import publish_rpc

        release = None
        try:
            self._check_open()
            if not any(getattr(ep, "weights", None) is not None for ep in self.endpoints.values()):
                # refused before reading a byte: an upload to a server that takes none holds no thread
                raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                                   "no teacher on this server accepts weight updates; its operator allows them "
                                   "with `kd serve --accept-weights` (or accept_weights = true in its [[teacher]] "
                                   "table)")  # fmt: skip
            release = self._open_stream(context)  # an upload is a long-lived call: it takes a stream slot
            return publish_rpc(self.endpoints, _upload_chunks(request_iterator, context), self._endpoint)
        except RequestError as e:
            self._count_error("", e.code)
            _abort(context, e)
        finally:
            if release is not None:
                release()

    def _count_error(self, teacher: str, code: grpc.StatusCode) -> None:
        if self.metrics is not None:
            self.metrics.error(teacher if teacher in self.endpoints else "", code.name)

    def _dataset_infos(self) -> list[pb.DatasetInfo]:
        """The identity of each registered dataset (its id is hashed once, on the first call)."""
        infos = self._infos
        if infos is None:
            infos = self._infos = [
                pb.DatasetInfo(
                    name=name,
                    dataset_id=str(getattr(d, "dataset_id", "")),
                    num_samples=len(d),
                    augmentation=str(getattr(d, "augmentation", "")),
                )
                for name, d in sorted(self.datasets.items())
            ]
        return infos

    # -- RPCs ---------------------------------------------------------------------
    def ListTeachers(self, request: pb.ListTeachersRequest, context: grpc.ServicerContext) -> pb.ListTeachersResponse:
        datasets = sorted(self.datasets)
        infos = self._dataset_infos()
        return pb.ListTeachersResponse(
            teachers=[ep.info(datasets, infos) for _, ep in sorted(self.endpoints.items())],
            usage=self.accounting.usage(client_identity(context)),
        )

    def Infer(
        self, request: pb.InferRequest, context: grpc.ServicerContext, payload: memoryview | None = None
    ) -> pb.InferResponse:
        """``payload``: the input tensor's data, read apart from ``request`` (``_parse_infer``)."""
        # Small requests hold ``_small_work`` (see __init__): one hold for the decode, a cheap
        # inline forward and the encode; a costly forward runs without it, so that requests
        # arriving meanwhile queue up and merge into one forward after it; a request that
        # queues (the model busy) never waits for its answer holding the lock.
        teacher, hold, submitted = request.teacher, _Hold(), False
        arrival = self._unary.arrive(teacher)
        try:
            if _small_request(request, payload):
                hold.take(self._small_work)
            p = self._prepare(request, context, payload=payload)
            if getattr(p.endpoint.batcher, "forward_cpu_s", 1.0) > _CHEAP_FORWARD_S:
                hold.release()
            if not context.is_active():  # its client went away (or its deadline passed) while it waited
                raise RequestError(grpc.StatusCode.CANCELLED, "the caller went away before the forward")
            overlapped, submitted = self._unary.submitting(teacher, arrival), True
            future = self._submit(p, context, waits=True, overlapped=overlapped)
            if not future.done():  # the inline path has answered already: nothing to cancel
                hold.release()
                # A client that goes away cancels its queued work instead of leaving it to run.
                context.add_callback(future.cancel)
            try:
                out = future.result()
            except Exception:  # noqa: BLE001
                raise self._failed(future) from None
            if p.endpoint.weights is None and _small_outputs(out):
                hold.take(self._small_work)
            else:  # large outputs; or live weights, whose encode may wait for a recompute
                hold.release()
            return self._encode(request, p, out)
        except RequestError as e:
            self._count_error(request.teacher, e.code)
            _abort(context, e)
        finally:
            hold.release()
            if submitted:
                self._unary.returned(teacher)

    def InferStream(self, request_iterator: Iterator[bytes | pb.InferRequest], context: grpc.ServicerContext):
        # A reader thread parses and submits requests as they arrive, so many batches are in
        # flight at once; this handler thread encodes replies and sends them in request order
        # (a reply that completes early waits for those before it). Flow control: at most
        # `stream_window` requests are between read and sent, so a client that does not read
        # its answers stops the reader instead of piling answers up in memory. A request that
        # does not parse or is refused is answered in-band and the stream goes on. A stream
        # with nothing in flight for `stream_idle_timeout_s`, or whose place another stream took
        # at a limit (StreamSlots), is closed: UNAVAILABLE with the kd-stream-closed trailer.
        done: queue.Queue = queue.Queue()
        slot = self._open_stream(context, on_reclaim=lambda: done.put(_RECLAIMED))
        window = threading.Semaphore(self.stream_window)
        inflight: dict[int, Future] = {}
        stop = threading.Event()
        total: list[int] = []  # set by the reader when the client half-closes

        def read() -> None:
            n = 0
            try:
                while not stop.is_set():
                    if not window.acquire(timeout=0.25):
                        continue
                    try:
                        raw = next(request_iterator)
                    except StopIteration:
                        break
                    if not slot.begin():  # closed as idle meanwhile: unanswered, uncharged, resent
                        # A reclaim frees the place under StreamSlots' lock and tells this handler only
                        # after (on_reclaim): this reader's end (None below) may come first and must
                        # not end the call OK with this request dropped, so the handler is told here too.
                        done.put(_RECLAIMED)
                        return
                    seq, n = n, n + 1
                    request = pb.InferRequest()
                    try:
                        request, payload = _parse_infer("InferStream", raw, f" (message #{seq} of the stream)")
                        with self._one_at_a_time(_small_request(request, payload)):
                            p = self._prepare(request, context, payload=payload)
                        future = self._submit(p, context)
                    except RequestError as e:
                        done.put((seq, request, None, e))
                        continue
                    except Exception as e:  # noqa: BLE001 - a server bug: answer it in-band, keep the stream
                        log.exception("InferStream: request #%d failed", seq)
                        done.put((seq, request, None, RequestError(grpc.StatusCode.INTERNAL, _internal(e))))
                        continue
                    inflight[seq] = future
                    # Fires on completion, failure or cancellation: one item per request.
                    future.add_done_callback(lambda f, s=seq, r=request, p=p: done.put((s, r, p, f)))
            except Exception:  # noqa: BLE001 - stream broken by the client; nothing to answer
                pass
            finally:
                total.append(n)
                done.put(None)

        def on_end() -> None:  # the call ended (completed, cancelled, deadline): free everything
            stop.set()
            for f in list(inflight.values()):
                f.cancel()
            done.put(_CLOSED)
            slot()

        context.add_callback(on_end)
        threading.Thread(target=read, name="infer-stream-reader", daemon=True).start()
        ready: dict[int, tuple] = {}
        next_seq = 0
        idle_timeout = self.stream_idle_timeout_s
        try:
            while not total or next_seq < total[0]:
                try:
                    # Nothing in flight: wait out what is left of the idle timeout, then check again.
                    item = done.get(timeout=max(idle_timeout - slot.idle_for(), 0.0) if idle_timeout else None)
                except queue.Empty:
                    if slot.close_if_idle(idle_timeout):
                        why = f"{idle_timeout:g} s with nothing in flight (stream_idle_timeout_s)"
                        self._close_stream(context, "idle", f"InferStream closed by the server after {why}")
                    continue
                if item is _CLOSED:
                    return
                if item is _RECLAIMED:
                    self._close_stream(context, "reclaimed",
                                       "InferStream closed by the server: idle while its stream limit was reached, "
                                       "its place went to another stream")  # fmt: skip
                if item is None:
                    continue
                ready[item[0]] = item[1:]
                while next_seq in ready:
                    request, p, result = ready.pop(next_seq)
                    inflight.pop(next_seq, None)
                    next_seq += 1
                    reply = self._reply(request, p, result)
                    if reply is not None:
                        yield reply  # returns once gRPC has sent it (HTTP/2 flow control)
                    slot.end()
                    window.release()
        finally:
            stop.set()
            for f in list(inflight.values()):
                f.cancel()
            slot()

    def _open_stream(self, context: grpc.ServicerContext, on_reclaim=None) -> StreamSlot:
        """A slot for a long-lived call (RequestError RESOURCE_EXHAUSTED when none is free)."""
        self._check_open()
        return self.streams.acquire(stream_key(context), on_reclaim)

    def _close_stream(self, context: grpc.ServicerContext, why: str, message: str) -> None:
        """End an idle stream: UNAVAILABLE (gRPC's status for "retry on a new call", as for a
        connection closed by max_connection_idle/age) with the trailer naming why, so a kd
        client reopens and resends; nothing was in flight, so nothing is lost."""
        self._count_error("", grpc.StatusCode.UNAVAILABLE)
        context.set_trailing_metadata(((STREAM_CLOSED_KEY, why),))
        context.abort(grpc.StatusCode.UNAVAILABLE, message + "; open a new stream to go on")

    # -- data-free distillation (WHITE tier) ----------------------------------------
    def _float_inputs(self, ep: Endpoint, msg: pb.Tensor) -> torch.Tensor:
        if msg.dtype not in (pb.FLOAT32, pb.FLOAT16):
            raise _invalid(f"inputs have dtype {dtype_name(msg.dtype)}; gradients need FLOAT32 (or FLOAT16) inputs")
        return self._decode_inputs(ep, msg).float()

    @staticmethod
    def _tensor(msg: pb.Tensor, what: str, shape: tuple[int, ...]) -> torch.Tensor:
        try:
            t = from_proto(msg)
        except WireError as e:
            raise _invalid(f"{what}: {e}") from None
        if tuple(t.shape) != shape:
            raise _invalid(f"{what} has shape {list(t.shape)}, expected {list(shape)}")
        if not t.is_floating_point():
            raise _invalid(f"{what} must be a float tensor, got {dtype_name(msg.dtype)}")
        t = t.float()
        if not bool(torch.isfinite(t).all()):
            raise _invalid(f"{what} contains NaN or Inf")
        return t

    def _submit_job(self, ep: Endpoint, kind: str, fn, context) -> Future:
        try:
            future = ep.job_queue(kind).submit(fn)
        except QueueFullError as e:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"teacher {ep.teacher.name!r}: {e}") from None
        except BatcherClosedError as e:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(e)) from None
        context.add_callback(future.cancel)
        return future

    def _check_gradient_batch(self, ep: Endpoint, n: int, what: str, bytes_per_sample: int) -> None:
        if n > ep.max_gradient_batch:
            raise _invalid(f"{what}: {n} samples, at most {ep.max_gradient_batch} per call "
                           "(the operator's max_gradient_batch); split the batch")  # fmt: skip
        if n * bytes_per_sample + 4096 > self.max_message_bytes:
            size, limit = n * bytes_per_sample / 2**20, self.max_message_bytes / 2**20
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{what}: the answer would be {size:.1f} MiB, over the server's message limit of "
                               f"{limit:.1f} MiB; send fewer samples")  # fmt: skip

    def InputGradient(self, request: pb.GradientRequest, context: grpc.ServicerContext) -> pb.GradientResponse:
        try:
            self._check_open()
            ep = self._endpoint(request.teacher, "white", "input gradients")
            t = ep.teacher
            x = self._float_inputs(ep, request.inputs)
            n = int(x.shape[0])
            if not request.upstream:
                raise _invalid("upstream is empty: give your loss's gradient for 'logits' and/or 'feature/<layer>'")
            upstream: dict[str, torch.Tensor] = {}
            layers = set()
            for key, msg in request.upstream.items():
                if key == "logits":
                    upstream[key] = self._tensor(msg, "upstream 'logits'", (n, t.num_classes))
                elif key.startswith("feature/") and key[len("feature/") :] in t.layers:
                    name = key[len("feature/") :]
                    upstream[key] = self._tensor(msg, f"upstream {key!r}", (n, *t.layers[name]))
                    layers.add(name)
                else:
                    raise _invalid(
                        f"upstream key {shorten(key)}: use 'logits' or 'feature/<layer>' with a layer of teacher "
                        f"{t.name!r}: {_listing(list(t.layers))}"
                    )
            per_sample = 4 * math.prod(t.input_shape)
            if request.return_outputs:
                per_sample += 4 * sum(t.num_classes if k == "logits" else math.prod(v.shape[1:])
                                      for k, v in upstream.items())  # fmt: skip
            self._check_gradient_batch(ep, n, "InputGradient", per_sample)
            usage = self._charge(context, gradient_samples=n)
            with ep.vjp_batcher(frozenset(layers)) as (batcher, layout):
                remaining = context.time_remaining()
                deadline = time.monotonic() + remaining if remaining is not None else None
                try:
                    future = batcher.submit(layout.pack(x, upstream), deadline=deadline)
                except QueueFullError as e:
                    raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"teacher {t.name!r}: {e}") from None
                except BatcherClosedError as e:
                    raise RequestError(grpc.StatusCode.UNAVAILABLE, str(e)) from None
                context.add_callback(future.cancel)
                try:
                    out = future.result()
                except Exception:  # noqa: BLE001
                    raise self._failed(future) from None
            results = {"input_grad": out["input_grad"]}
            if request.return_outputs:
                results.update({key: out[key] for key in upstream})
            _check_outputs(results)
            outputs = {key: to_proto(out[key]) for key in upstream} if request.return_outputs else {}
            return pb.GradientResponse(request_id=request.request_id, input_grad=to_proto(out["input_grad"]),
                                       outputs=outputs, usage=usage)  # fmt: skip
        except RequestError as e:
            self._count_error(request.teacher, e.code)
            _abort(context, e)

    def GetBatchNormStats(self, request: pb.BatchNormStatsRequest, context) -> pb.BatchNormStatsResponse:
        try:
            ep = self._endpoint(request.teacher, "white", "BatchNorm statistics")
            stats, infos = {}, []
            for name, m in batchnorm_layers(ep.teacher.model):
                stats[f"{name}/running_mean"] = to_proto(m.running_mean.detach().float().cpu())
                stats[f"{name}/running_var"] = to_proto(m.running_var.detach().float().cpu())
                infos.append(pb.BatchNormInfo(name=name, num_features=m.num_features, eps=m.eps))
            return pb.BatchNormStatsResponse(stats=stats, layers=infos)
        except RequestError as e:
            self._count_error(request.teacher, e.code)
            _abort(context, e)

    def BatchNormLoss(self, request: pb.BatchNormLossRequest, context) -> pb.BatchNormLossResponse:
        try:
            self._check_open()
            ep = self._endpoint(request.teacher, "white", "the BatchNorm loss")
            x = self._float_inputs(ep, request.inputs)
            n = int(x.shape[0])
            upstream = None
            if request.HasField("upstream_logits"):
                upstream = self._tensor(request.upstream_logits, "upstream_logits", (n, ep.teacher.num_classes))
            _finite_number("momentum", request.momentum, 0.0, 1.0)
            if request.momentum >= 1:
                raise _invalid(f"momentum must be in [0, 1), got {request.momentum}")
            _finite_number("ttl_seconds", request.ttl_seconds, 0.0, MAX_TTL_SECONDS)
            if request.state_id and not request.ttl_seconds > 0:
                raise _invalid("a state_id needs ttl_seconds > 0 (how long the server keeps the momentum state)")
            if len(request.state_id) > MAX_STATE_ID:
                raise _invalid(f"state_id has {len(request.state_id)} characters, at most {MAX_STATE_ID}")
            weights = list(request.layer_weights)
            bad = [w for w in weights if not (math.isfinite(w) and 0 <= w <= MAX_WEIGHT)]
            if bad:
                raise _invalid(f"layer_weights must be finite numbers in [0, {MAX_WEIGHT:g}], got {bad[:4]}")
            t = ep.teacher
            self._check_gradient_batch(ep, n, "BatchNormLoss", 4 * (math.prod(t.input_shape) + t.num_classes))
            usage = self._charge(context, gradient_samples=n)
            # Momentum states are each client's own: the same state_id from another client (its
            # token, certificate, kd-client-id or host) names another state, never the first's
            # batch statistics (which it would otherwise read back through its losses).
            state_id = f"{client_identity(context)}\x00{request.state_id}" if request.state_id else ""

            def job():
                return batchnorm_loss(t, x, states=ep.bn_states, state_id=state_id,
                                      momentum=request.momentum, ttl=request.ttl_seconds,
                                      upstream_logits=upstream, layer_weights=weights)  # fmt: skip

            # On the teacher's job thread (a bounded queue), never on this handler thread.
            future = self._submit_job(ep, "batchnorm-loss", job, context)
            try:
                res = future.result()
            except ValueError as e:
                raise _invalid(str(e)) from None
            except Exception:  # noqa: BLE001
                raise self._failed(future) from None
            return pb.BatchNormLossResponse(request_id=request.request_id, loss=res.loss, per_layer=res.per_layer,
                                            input_grad=to_proto(res.input_grad), logits=to_proto(res.logits),
                                            usage=usage)  # fmt: skip
        except RequestError as e:
            self._count_error(request.teacher, e.code)
            _abort(context, e)

    def GetActivationRecords(self, request: pb.ActivationRecordsRequest, context) -> pb.ActivationRecordsResponse:
        try:
            ep = self._endpoint(request.teacher, "white", "activation records")
            if ep.records is None:
                raise RequestError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"teacher {ep.teacher.name!r} has no activation records; the operator computes them with "
                    "`kd records` and serves them with `kd serve --records NAME=FILE`",
                )
            layers = sorted({k.rsplit("/", 1)[0] for k in ep.records})
            return pb.ActivationRecordsResponse(records={k: to_proto(v) for k, v in ep.records.items()},
                                                dataset=ep.records_dataset, layers=layers)  # fmt: skip
        except RequestError as e:
            self._count_error(request.teacher, e.code)
            _abort(context, e)

    MAX_SYNTHESIS_BATCH = 1024

    def Synthesize(self, request: pb.SynthesisRequest, context):
        release = None
        try:
            self._check_open()
            ep = self._endpoint(request.teacher, "white", "server-side synthesis")
            t = ep.teacher
            b = request.batch_size
            if not 1 <= b <= self.MAX_SYNTHESIS_BATCH:
                raise _invalid(f"batch_size must be in 1..{self.MAX_SYNTHESIS_BATCH}, got {b}")
            if not 1 <= request.iterations <= ep.max_synthesis_iterations:
                raise _invalid(f"iterations must be in 1..{ep.max_synthesis_iterations} "
                               f"(the operator's max_synthesis_iterations), got {request.iterations}")  # fmt: skip
            _finite_number("lr", request.lr, 0.0, MAX_LR, open_lo=True)
            for what in ("bn_weight", "tv_weight", "l2_weight"):
                _finite_number(what, getattr(request, what), 0.0, MAX_WEIGHT)
            if request.report_every < 0:
                raise _invalid(f"report_every must be >= 0, got {request.report_every}")
            targets = list(request.targets) or [i % t.num_classes for i in range(b)]
            if len(targets) != b or any(not 0 <= y < t.num_classes for y in targets):
                raise _invalid(f"targets: {b} classes in 0..{t.num_classes - 1} expected, got {targets[:8]}...")
            if b * 4 * math.prod(t.input_shape) + 4096 > self.max_message_bytes:
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"Synthesize: a batch of {b} inputs is over the server's message limit "
                                   f"of {self.max_message_bytes / 2**20:.1f} MiB")  # fmt: skip
            params = SynthesisParams(
                batch_size=b, targets=targets, iterations=request.iterations, lr=request.lr,
                bn_weight=request.bn_weight, tv_weight=request.tv_weight, l2_weight=request.l2_weight,
                seed=request.seed, report_every=request.report_every,
            )  # fmt: skip
            release = self._open_stream(context)
            usage = self._charge(context, gradient_samples=b * request.iterations)
            updates: queue.Queue = queue.Queue()
            stop = threading.Event()

            def job() -> None:  # on the teacher's synthesis thread; progress goes to this handler
                for update in synthesize(t, params, should_stop=lambda: stop.is_set() or not context.is_active()):
                    updates.put(update)

            future = self._submit_job(ep, "synthesis", job, context)
            context.add_callback(stop.set)
            future.add_done_callback(lambda f: updates.put(_CLOSED))
            while (update := updates.get()) is not _CLOSED:
                msg = pb.SynthesisUpdate(request_id=request.request_id, iteration=update["iteration"],
                                         loss=update["loss"], terms=update["terms"], usage=usage)  # fmt: skip
                if update.get("done"):
                    msg.done = True
                    msg.inputs.CopyFrom(to_proto(update["inputs"]))
                    msg.targets.CopyFrom(to_proto(update["targets"]))
                yield msg
            if not future.cancelled() and future.exception() is not None:
                e = future.exception()
                if isinstance(e, SynthesisDiverged):
                    raise _invalid(str(e))
                raise self._failed(future)
        except RequestError as e:
            self._count_error(request.teacher, e.code)
            _abort(context, e)
        finally:
            if release is not None:
                release()

    def _reply(self, request: pb.InferRequest, p: _Prepared | None, result) -> pb.InferResponse | None:
        if isinstance(result, RequestError):
            self._count_error(request.teacher, result.code)
            return _error_response(request, result)
        if result.cancelled():
            return None  # the stream is going away
        if result.exception() is not None:
            err = self._failed(result)
            self._count_error(request.teacher, err.code)
            return _error_response(request, err)
        try:
            out = result.result()
            with self._one_at_a_time(p.endpoint.weights is None and _small_outputs(out)):  # no recompute
                return self._encode(request, p, out)
        except RequestError as e:
            self._count_error(request.teacher, e.code)
            return _error_response(request, e)
        except Exception as e:  # noqa: BLE001 - a server bug: answer it in-band, keep the stream
            log.exception("InferStream: encoding a reply failed")
            self._count_error(request.teacher, grpc.StatusCode.INTERNAL)
            return _error_response(request, RequestError(grpc.StatusCode.INTERNAL, _internal(e)))


def _read_samples(source: SampleSource, idx: torch.Tensor, seeds: torch.Tensor | None) -> torch.Tensor:
    """The samples through ``SampleSource.get``. A view seed is ``index * VIEW_STRIDE + view``
    (kd.core.samples.view_seeds), so view ids are recovered from the seeds; other seeds only
    reach a source that takes any seed (the bundled digits' ``views``)."""
    if seeds is None:
        return source.get(idx, None)
    views = seeds - idx * VIEW_STRIDE
    if bool(((views >= 0) & (views < VIEW_STRIDE)).all()):
        return source.get(idx, views)
    by_seed = getattr(source, "views", None)
    if callable(by_seed):
        return by_seed(idx, seeds)
    bad = int((~((views >= 0) & (views < VIEW_STRIDE))).nonzero()[0])
    raise _invalid(
        f"view seed {int(seeds[bad])} of index {int(idx[bad])} is not index * {VIEW_STRIDE} + view "
        f"(kd.core.samples.view_seeds); this dataset serves views by id only"
    )


def _error_response(request: pb.InferRequest, e: RequestError) -> pb.InferResponse:
    return pb.InferResponse(
        request_id=request.request_id[:_MAX_DETAILS],
        teacher=request.teacher[:_MAX_DETAILS],
        error=pb.Error(code=e.code.value[0], message=_clip(e.message)),
    )


_CLOSED = object()
_RECLAIMED = object()  # StreamSlots gave this stream's place to another


def _internal(e: BaseException) -> str:
    return f"internal error: {type(e).__name__}: {e}"


_INPUTS_FIELD = pb.InferRequest.DESCRIPTOR.fields_by_name["inputs"].number
_SPLIT_MIN_BYTES = 1 << 16  # below this, scanning the body costs more than the copies it saves


class _UnaryCalls:
    """Which unary Infer calls overlapped another of their teacher, for the batcher's company
    rule (``DynamicBatcher.submit``'s ``overlapped``): a call did when, as it arrived, another
    had been submitted to the batcher and not returned (its answer may be done already:
    inline, while this one waited for the small-work lock), or when another was submitted
    between its arrival and its own submit. Calls refused before the batcher never count, and
    a call never overlaps its client's previous one: gRPC sends a reply after its handler
    returned."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._teachers: dict[str, list[int]] = {}  # name -> [submitted and not returned, submitted ever]

    def arrive(self, teacher: str) -> tuple[bool, int]:
        with self._lock:  # read only: a name that never reaches the batcher adds nothing
            counts = self._teachers.get(teacher)
            return (counts is not None and counts[0] > 0), (counts[1] if counts is not None else 0)

    def submitting(self, teacher: str, arrival: tuple[bool, int]) -> bool:
        """The call that ``arrive`` returned ``arrival`` for is about to be submitted (a valid
        teacher name): whether it overlapped another. ``returned`` must follow."""
        with self._lock:
            counts = self._teachers.setdefault(teacher, [0, 0])
            overlapped = arrival[0] or counts[1] != arrival[1]
            counts[0] += 1
            counts[1] += 1
        return overlapped

    def returned(self, teacher: str) -> None:
        with self._lock:
            self._teachers[teacher][0] -= 1


class _Hold:
    """A hold on a lock, taken when needed, that can be let go early and taken again."""

    __slots__ = ("lock",)

    def __init__(self) -> None:
        self.lock: threading.Lock | None = None

    def take(self, lock: threading.Lock) -> None:
        if self.lock is None:
            lock.acquire()
            self.lock = lock

    def release(self) -> None:
        if self.lock is not None:
            self.lock, lock = None, self.lock
            lock.release()


_SMALL_VALUES = 1 << 14  # values (64 KB of float32) up to which a tensor's work takes the lock
_CHEAP_FORWARD_S = 0.0005  # a forward of this much CPU or less runs inline under the lock


def _small_request(request: pb.InferRequest, payload: memoryview | None) -> bool:
    """Whether decoding ``request`` is small work (``TeacherServicer._small_work``): tensor
    inputs of few values, read from the message (a large body's payload comes apart)."""
    return (
        payload is None
        and request.WhichOneof("input") == "inputs"
        and (math.prod(request.inputs.shape) <= _SMALL_VALUES)
    )


def _small_outputs(out: dict[str, torch.Tensor]) -> bool:
    return sum(t.numel() for t in out.values()) <= _SMALL_VALUES


def _parse_infer(rpc: str, data, where: str = "") -> tuple[pb.InferRequest, memoryview | None]:
    """An InferRequest from its raw bytes, and for a large body the input tensor's payload
    as a view of them (``kd.core.wire.split_payload``: the payload is not copied by the
    parser nor by reading it); None: it is in the message. Errors as ``_parse``'s."""
    if isinstance(data, bytes) and len(data) >= _SPLIT_MIN_BYTES:
        parts = split_payload(data, _INPUTS_FIELD)
        if parts is not None:
            try:
                return pb.InferRequest.FromString(parts[0]), parts[1]
            except Exception:  # noqa: BLE001 - parsed whole below, for the same error as always
                pass
    return _parse(rpc, pb.InferRequest, data, where), None


def _parse(rpc: str, cls, data, where: str = ""):
    """The request message of ``rpc`` from its raw bytes (INVALID_ARGUMENT naming the RPC
    when they do not parse); a message object (in-process callers) passes through."""
    if isinstance(data, cls):
        return data
    try:
        return cls.FromString(data)
    except Exception as e:  # noqa: BLE001 - DecodeError and whatever else a corrupt body raises
        size = len(data) if isinstance(data, (bytes, bytearray)) else "?"
        raise _invalid(
            f"{rpc}: the request body{where} ({size} bytes) does not parse as {cls.DESCRIPTOR.full_name}: "
            f"{type(e).__name__}: {e}"
        ) from None


# RPC -> (request streaming, response streaming, request class, response class).
_RPCS = {
    "ListTeachers": (False, False, pb.ListTeachersRequest, pb.ListTeachersResponse),
    "Infer": (False, False, pb.InferRequest, pb.InferResponse),
    "InferStream": (True, True, pb.InferRequest, pb.InferResponse),
    "InputGradient": (False, False, pb.GradientRequest, pb.GradientResponse),
    "GetBatchNormStats": (False, False, pb.BatchNormStatsRequest, pb.BatchNormStatsResponse),
    "BatchNormLoss": (False, False, pb.BatchNormLossRequest, pb.BatchNormLossResponse),
    "GetActivationRecords": (False, False, pb.ActivationRecordsRequest, pb.ActivationRecordsResponse),
    "Synthesize": (False, True, pb.SynthesisRequest, pb.SynthesisUpdate),
    "PublishWeights": (True, False, pb.WeightsChunk, pb.PublishWeightsResponse),
}


def add_to_server(servicer: TeacherServicer, server: grpc.Server) -> None:
    """Register ``servicer`` with raw-bytes request handlers: the servicer parses each body
    itself, so one that does not parse is INVALID_ARGUMENT naming the RPC (gRPC's own
    deserializer answers INTERNAL, and on a stream ends it), and an unexpected exception is
    INTERNAL with its message (never gRPC's bare UNKNOWN)."""

    def failed(rpc: str, e: Exception, context: grpc.ServicerContext) -> None:
        if context.code() is not None:  # the servicer aborted the call with its own status
            raise e
        if isinstance(e, RequestError):
            servicer._count_error("", e.code)
            _abort(context, e)
        log.exception("%s failed", rpc)
        servicer._count_error("", grpc.StatusCode.INTERNAL)
        context.abort(grpc.StatusCode.INTERNAL, _clip(f"{rpc}: {_internal(e)}"))

    def unary(rpc: str, cls, method):
        def handle(data, context):
            try:
                return method(_parse(rpc, cls, data), context)
            except Exception as e:  # noqa: BLE001
                failed(rpc, e, context)

        def handle_infer(data, context):
            try:
                request, payload = _parse_infer(rpc, data)
                return method(request, context, payload=payload)
            except Exception as e:  # noqa: BLE001
                failed(rpc, e, context)

        return handle_infer if cls is pb.InferRequest else handle

    def unary_stream(rpc: str, cls, method):
        def handle(data, context):
            try:
                yield from method(_parse(rpc, cls, data), context)
            except Exception as e:  # noqa: BLE001
                failed(rpc, e, context)

        return handle

    def stream_unary(rpc: str, method):
        def handle(iterator, context):
            try:
                return method(iterator, context)
            except Exception as e:  # noqa: BLE001
                failed(rpc, e, context)

        return handle

    def stream_stream(rpc: str, method):
        def handle(iterator, context):
            try:
                yield from method(iterator, context)
            except Exception as e:  # noqa: BLE001
                failed(rpc, e, context)

        return handle

    handlers = {}
    for rpc, (req_streaming, resp_streaming, req_cls, resp_cls) in _RPCS.items():
        method, ser = getattr(servicer, rpc), resp_cls.SerializeToString
        if req_streaming:
            handlers[rpc] = grpc.stream_stream_rpc_method_handler(stream_stream(rpc, method), response_serializer=ser)
            if not resp_streaming:  # client streaming (PublishWeights): the method parses each message
                handlers[rpc] = grpc.stream_unary_rpc_method_handler(stream_unary(rpc, method), response_serializer=ser)
        elif resp_streaming:
            handlers[rpc] = grpc.unary_stream_rpc_method_handler(unary_stream(rpc, req_cls, method),
                                                                 response_serializer=ser)  # fmt: skip
        else:
            handlers[rpc] = grpc.unary_unary_rpc_method_handler(unary(rpc, req_cls, method), response_serializer=ser)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
