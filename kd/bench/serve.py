"""``kd bench serve``: the teacher server against the same model run in-process, in one run.

Absolute numbers depend on the machine and its neighbours, so the results that
matter are ratios of windows measured in the same run, alternated (ABBA) over
``rounds`` and reported as the median of the per-round ratios:

* ``served_over_inprocess``: samples/s through ``kd serve`` / samples/s of the
  same model's forward in a loop in this process, both at batch 64 with the same
  torch threads. The served side runs with ``max_batch_size`` = the client batch,
  so its forwards have the in-process size and the ratio isolates what serving
  costs (RPCs, encoding, the batcher's threads). The same clients against
  default batching (forwards merged up to 256) are reported as ``merged``.
* ``batching_gain``: samples/s of N clients sending batch 4 with the batcher
  merging (max 256 + a queue delay) / with ``max_batch_size`` 4 (each request
  alone).
* ``batched_floor_share``: the same N x 4 load with the batcher on / against the
  batched floor, a bare grpcio servicer running the same model through the plainest
  greedy batching (``_GreedyBatcher``: no delay, no validation); with
  ``floor_batched_over_inprocess`` it tells what of ``batched_over_inprocess`` is kd's
  and what is any Python gRPC server's on this machine.
* latency p50/p99 of batch-4 requests at low load (1 client, sequential) and at
  saturation (N clients); under overload (a small ``max_queue_size``, clients
  offering twice what the server holds, no back-off) every answer must be OK or
  RESOURCE_EXHAUSTED.

Each configuration is its own ``kd serve`` subprocess (own interpreter and GIL),
all started up front and idle (no CPU) while another is measured, with
``OMP_NUM_THREADS`` = the in-process torch threads: half the logical CPUs by
default, since the clients share the machine (see ``default_threads``). The
clients are separate processes (multiprocessing, spawn), 1 torch thread each,
glibc malloc keeping large blocks (``tune_for_large_requests``, as a user may),
started once and reused; each window warms up, starts all clients at one
instant and counts the samples answered inside it (a request's samples credited by
the share of its time inside the window). The server's Prometheus histogram gives
the mean forward size inside the window.

``peer="triton"`` (``--peer triton``) runs the same loads against Triton Inference
Server through PyTriton (Python backend; ``TritonProcess``, in the interpreter
``$KD_TRITON_PYTHON`` or this one), its windows interleaved with kd's, and reports
the same ratios under ``"triton"``.
"""

from __future__ import annotations

import copy
import json
import math
import multiprocessing as mp
import os
import platform
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from kd.bench import report_console
from kd.core.files import write_text_atomically
from kd.core.signals import StopSignals

console = Console(stderr=True, soft_wrap=True)  # each line whole in a log, as kd.cli's

TEACHER_NAME = "bench"
DEFAULT_TEACHER = "kd.models:bench_teacher"
FREE_TEACHER = "kd.bench.serve:free_teacher"
FREE_IMAGE_TEACHER = "kd.bench.serve:free_image_teacher"
OK, QUEUE_FULL = "OK", "RESOURCE_EXHAUSTED"
ECHO_METHOD = "/kd.v1.TeacherService/Echo"  # only the floor server has it


class _Free(torch.nn.Module):
    """A near-free teacher: the mean over all but the first input dim, then a fixed 1 -> C
    map. It reads every input value once, so the measures price serving, not the model."""

    def __init__(self, input_shape: tuple[int, ...], classes: int = 10) -> None:
        super().__init__()
        self.input_shape = input_shape
        self.register_buffer("w", torch.linspace(-1.0, 1.0, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(len(x), -1).mean(dim=1, keepdim=True) * self.w


def free_teacher() -> torch.nn.Module:
    """Near-free teacher on 64 values per sample (``floor_share_b1`` / ``_b64``)."""
    return _Free((64,))


FREE_SHAPE, FREE_IMAGE_SHAPE, FREE_CLASSES = (64,), (3, 224, 224), 10


def free_image_teacher() -> torch.nn.Module:
    """Near-free teacher on 3x224x224 images (``large_input_share_f32`` / ``_u8``)."""
    return _Free((3, 224, 224))


@dataclass(frozen=True)
class BenchSettings:
    seconds: float = 3.0  # measured window per phase
    warmup: float = 0.5  # per phase, before the window (not counted)
    clients: int = 16  # client processes for saturation, batching and overload
    served_clients: int = 3  # clients sending batch `served_batch` for served_over_inprocess
    served_depth: int = 0  # 0: sequential unary requests; >0: one InferStream per client, this deep
    served_batch: int = 64
    small_batch: int = 4  # batching_gain and latency phases
    merged_max_batch: int = 256  # batcher on
    queue_delay_us: int = 2000  # batcher on
    overload_queue: int = 64  # max_queue_size (samples) of the overload phase
    overload_max_batch: int = 16  # its max_batch_size
    device: str = "cpu"
    threads: int = 0  # torch threads of the server and the in-process loop; 0 = default_threads()
    teacher: str = DEFAULT_TEACHER
    rounds: int = 3  # alternated windows behind each ratio (in-process/served, batcher on/off, kd/floor)
    large_batch: int = 32  # 3x224x224 images per request of the large-input phases
    peer: str = ""  # "triton": the same loads against Triton (PyTriton), interleaved with kd's windows

    @property
    def overload_batch(self) -> int:
        """Request size of the overload phase: the clients together keep twice what the server
        can hold in flight (three batches in its pipeline, being formed, waiting, running, plus
        the queue), so the queue stays full and some requests are refused."""
        held = 3 * self.overload_max_batch + self.overload_queue
        return min(self.overload_queue, max(self.overload_max_batch, math.ceil(2 * held / self.clients)))


def default_threads() -> int:
    """Half the logical CPUs, at least 1: the model's share of a machine it shares with its clients.

    Clients normally run elsewhere; here they and the RPC layer need CPU too. Given every core,
    the server's OpenMP team would fight its own clients for them (a thread preempted in a
    parallel region stalls the team at the barrier while the others spin), and the ratio would
    measure that contention rather than the cost of serving. ``--threads`` overrides it; the
    in-process side always uses the same number."""
    return max(1, _cpus() // 2)


def _cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask, e.g. under taskset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# -- client processes -----------------------------------------------------------------


@dataclass(frozen=True)
class ClientPlan:
    address: str
    teacher: str
    input_shape: tuple[int, ...]
    batch: int
    depth: int  # 0: sequential unary requests; >0: InferStream with this many in flight
    warmup: float
    seconds: float
    seed: int
    dtype: str = "float32"  # of the inputs sent: float32 or uint8
    echo: bool = False  # raw grpcio: send the same request bytes to the floor's Echo, get them back
    system: str = "kd"  # kd, or triton (the peer: tritonclient's gRPC client, ``teacher`` is the model name)


@dataclass
class ClientReport:
    requests: int = 0  # completed inside the window, whatever the outcome
    samples: float = 0.0  # answered samples, each request credited for the share of it inside the window
    codes: dict[str, int] = field(default_factory=dict)  # inside the window, by gRPC code name
    latencies: list[float] = field(default_factory=list)  # seconds, answered requests inside the window
    stray_errors: dict[str, int] = field(default_factory=dict)  # non-OK, non-queue-full outside the window

    def add(self, code: str, latency: float | None, batch: int, inside: bool, share: float | None = None) -> None:
        """``share``: the fraction of the request's time [t0, t1] inside the window (None: all of
        it when ``inside``). Crediting an answer's samples by that share, not whole at its end,
        keeps slow requests (a 19 MB one takes ~0.1-1 s) from quantising a 3 s window."""
        if share is None:
            share = 1.0 if inside else 0.0
        if code == OK:
            self.samples += batch * share
        if inside:
            self.requests += 1
            self.codes[code] = self.codes.get(code, 0) + 1
            if code == OK and latency is not None:
                self.latencies.append(latency)
        elif code not in (OK, QUEUE_FULL):
            self.stray_errors[code] = self.stray_errors.get(code, 0) + 1


def _share(t0: float, t1: float, begin: float, end: float) -> float:
    """The fraction of [t0, t1] inside [begin, end]."""
    if t1 <= t0:
        return 1.0 if begin <= t1 <= end else 0.0
    return max(0.0, min(t1, end) - max(t0, begin)) / (t1 - t0)


def _sleep_until(t: float) -> None:
    while (left := t - time.monotonic()) > 0:
        time.sleep(min(left, 0.05))


def _client_worker(index: int, inbox: Any, outbox: Any) -> None:
    """A client process: runs one plan per message until it gets None."""
    try:
        torch.set_num_threads(1)
        from kd.teacher_server.client import tune_for_large_requests  # import cost paid before any phase

        tune_for_large_requests()  # large bodies reuse heap pages: kd, echo and Triton clients alike

        outbox.put(("up", index, None))
        while (plan := inbox.get()) is not None:
            outbox.put(("done", index, _run_client(plan, index, inbox, outbox)))
    except BaseException:  # noqa: BLE001 - the parent must hear of it, not wait forever
        outbox.put(("failed", index, traceback.format_exc()))


def _run_client(plan: ClientPlan, index: int, inbox: Any, outbox: Any) -> ClientReport:
    from kd.teacher_server.client import TeacherClient, TeacherRequestError

    g = torch.Generator().manual_seed(plan.seed)
    shape = (plan.batch, *plan.input_shape)
    if plan.dtype == "uint8":
        x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    else:
        x = torch.randn(shape, generator=g)
    report = ClientReport()
    if plan.echo:
        return _run_echo(plan, x, index, inbox, outbox, report)
    if plan.system == "triton":
        return _run_triton(plan, x, index, inbox, outbox, report)
    with TeacherClient(plan.address, timeout=60.0) as client:
        client.wait_ready(60.0)
        try:  # connection set-up and first-call costs stay out of the window
            client.infer(plan.teacher, x)
        except TeacherRequestError as e:
            report.add(e.code.name, None, plan.batch, inside=False)
        outbox.put(("ready", index, None))
        start = inbox.get()
        begin = start + plan.warmup
        end = begin + plan.seconds
        _sleep_until(start)
        if plan.depth == 0:
            while (t0 := time.monotonic()) < end:
                try:
                    client.infer(plan.teacher, x)
                    code = OK
                except TeacherRequestError as e:
                    code = e.code.name
                t1 = time.monotonic()
                report.add(code, t1 - t0, plan.batch, begin <= t1 <= end, _share(t0, t1, begin, end))
        else:

            def batches():
                while (t := time.monotonic()) < end:
                    yield t, x

            while time.monotonic() < end:
                try:
                    for t0, _outputs in client.infer_stream(plan.teacher, batches(), depth=plan.depth):
                        t1 = time.monotonic()
                        report.add(OK, t1 - t0, plan.batch, begin <= t1 <= end, _share(t0, t1, begin, end))
                except TeacherRequestError as e:  # the stream ends; open another
                    t1 = time.monotonic()
                    report.add(e.code.name, None, plan.batch, begin <= t1 <= end)
    return report


def _run_echo(plan: ClientPlan, x: torch.Tensor, index: int, inbox: Any, outbox: Any,
              report: ClientReport) -> ClientReport:  # fmt: skip
    """The raw grpcio floor of a large request: the same bytes a kd client sends (built and
    serialised per call, as ``TeacherClient.infer`` does), echoed back unparsed."""
    import grpc

    from kd.teacher_server.client import make_request, spec_of
    from kd.teacher_server.server import DEFAULT_MAX_MESSAGE_BYTES, channel_options

    with grpc.insecure_channel(plan.address, options=channel_options(DEFAULT_MAX_MESSAGE_BYTES)) as channel:
        echo = channel.unary_unary(ECHO_METHOD)
        spec = spec_of()

        def call() -> None:
            body = make_request(plan.teacher, x, None, spec).SerializeToString()
            if len(echo(body, timeout=60.0, wait_for_ready=True)) != len(body):
                raise RuntimeError("the echo floor answered a different size")

        call()
        outbox.put(("ready", index, None))
        start = inbox.get()
        begin = start + plan.warmup
        end = begin + plan.seconds
        _sleep_until(start)
        while (t0 := time.monotonic()) < end:
            try:
                call()
                code = OK
            except grpc.RpcError as e:
                code = e.code().name
            t1 = time.monotonic()
            report.add(code, t1 - t0, plan.batch, begin <= t1 <= end, _share(t0, t1, begin, end))
    return report


def _run_triton(plan: ClientPlan, x: torch.Tensor, index: int, inbox: Any, outbox: Any,
                report: ClientReport) -> ClientReport:  # fmt: skip
    """The Triton peer through its own gRPC client (``tritonclient.grpc``), one sequential
    request at a time, the request built per call as kd's client builds its own."""
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    xn = x.numpy()
    dt = "UINT8" if plan.dtype == "uint8" else "FP32"
    client = tg.InferenceServerClient(plan.address)
    asked = [tg.InferRequestedOutput("logits")]

    def call() -> None:
        inp = tg.InferInput("x", list(xn.shape), dt)
        inp.set_data_from_numpy(xn)
        out = client.infer(plan.teacher, [inp], outputs=asked, client_timeout=60.0).as_numpy("logits")
        if out.shape[0] != plan.batch:
            raise RuntimeError(f"triton answered {out.shape[0]} rows for {plan.batch}")

    def code_of(e: InferenceServerException) -> str:
        status = str(e.status() or "UNKNOWN")  # "StatusCode.UNAVAILABLE"
        return status.rpartition(".")[2]

    try:
        deadline = time.monotonic() + 120
        while True:  # the model may still be loading
            try:
                call()
                break
            except InferenceServerException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        outbox.put(("ready", index, None))
        start = inbox.get()
        begin = start + plan.warmup
        end = begin + plan.seconds
        _sleep_until(start)
        while (t0 := time.monotonic()) < end:
            try:
                call()
                code = OK
            except InferenceServerException as e:
                code = code_of(e)
            t1 = time.monotonic()
            report.add(code, t1 - t0, plan.batch, begin <= t1 <= end, _share(t0, t1, begin, end))
    finally:
        client.close()
    return report


class ClientPool:
    """``n`` client processes, started once (spawn) and reused by every phase."""

    def __init__(self, n: int) -> None:
        ctx = mp.get_context("spawn")
        self.outbox = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(n)]
        self.procs = [
            ctx.Process(target=_client_worker, args=(i, self.inboxes[i], self.outbox), daemon=True, name=f"client-{i}")
            for i in range(n)
        ]
        for p in self.procs:
            p.start()

    def wait_up(self, timeout: float = 600.0) -> None:
        self._collect("up", len(self.procs), timeout)

    def _collect(self, kind: str, n: int, timeout: float) -> dict[int, Any]:
        got: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(got) < n:
            try:
                what, index, payload = self.outbox.get(timeout=1.0)
            except queue.Empty:
                dead = [p.name for p in self.procs if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"client process(es) {', '.join(dead)} died") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"clients did not report {kind!r} within {timeout:.0f} s") from None
                continue
            if what == "failed":
                raise RuntimeError(f"client {index} failed:\n{payload}")
            if what != kind:
                raise RuntimeError(f"client {index} sent {what!r}, expected {kind!r}")
            got[index] = payload
        return got

    def run(self, plans: list[ClientPlan], on_window=None) -> list[ClientReport]:
        """Run ``plans`` on the first len(plans) clients, all starting at one instant.

        ``on_window(begin, end)``, if given, runs here while the clients work (it sleeps
        until the instants it needs)."""
        if len(plans) > len(self.procs):
            raise ValueError(f"{len(plans)} plans for {len(self.procs)} client processes")
        for inbox, plan in zip(self.inboxes, plans):
            inbox.put(plan)
        self._collect("ready", len(plans), 180.0)
        start = time.monotonic() + 0.05
        for inbox in self.inboxes[: len(plans)]:
            inbox.put(start)
        if on_window is not None:
            begin = start + plans[0].warmup
            on_window(begin, begin + plans[0].seconds)
        done = self._collect("done", len(plans), plans[0].warmup + plans[0].seconds + 180.0)
        return [done[i] for i in range(len(plans))]

    def close(self) -> None:
        for inbox in self.inboxes:
            inbox.put(None)
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)

    def __enter__(self) -> ClientPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the server subprocess ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerConfig:
    label: str
    max_batch_size: int
    max_queue_delay_us: int = 0
    max_queue_size: int = 0
    teacher: str = ""  # module:factory; "" = the bench's teacher (settings.teacher)
    extra_args: tuple[str, ...] = ()  # more `kd serve` options

    def describe(self) -> str:
        text = f"max {self.max_batch_size}"
        if self.teacher:
            text = f"{self.teacher.rpartition(':')[2]}, " + text
        if self.max_queue_delay_us:
            text += f", {self.max_queue_delay_us / 1000:g} ms"
        if self.max_queue_size:
            text += f", queue {self.max_queue_size}"
        return text


class ServerProcess:
    """``kd serve`` as a subprocess on a free loopback port, with Prometheus metrics."""

    _signalled = False  # SIGTERM sent (signal_stop): a second one would not be a drain's

    def __init__(self, config: ServerConfig, settings: BenchSettings, threads: int, workdir: Path) -> None:
        self.config = config
        self.log_path = workdir / f"server-{config.label}.log"
        port_file = workdir / f"server-{config.label}.port"
        self.metrics_port = _free_port()
        cmd = [
            sys.executable, "-m", "kd", "serve",
            "--teacher", f"{TEACHER_NAME}={config.teacher or settings.teacher}",
            "--port", "0", "--port-file", str(port_file),
            "--device", settings.device,
            "--threads", str(threads),
            "--max-batch-size", str(config.max_batch_size),
            "--max-queue-delay-us", str(config.max_queue_delay_us),
            "--max-queue-size", str(config.max_queue_size),
            "--metrics-port", str(self.metrics_port),
            *config.extra_args,
        ]  # fmt: skip
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
        }
        self._log = open(self.log_path, "w")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self._port_file = port_file
        self.address = ""

    def wait_started(self, timeout: float = 300.0) -> None:
        port_file = self._port_file
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if self.proc.poll() is not None:
                self._log.close()
                raise RuntimeError(f"kd serve exited with {self.proc.returncode}:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"kd serve did not start within {timeout:.0f} s:\n{self._log_tail()}")
            time.sleep(0.05)
        self._started(port_file.read_text())

    def _started(self, port_text: str) -> None:
        self.address = f"127.0.0.1:{int(port_text)}"

    def _log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def metrics(self) -> dict[str, float]:
        """The server's counters for the bench teacher: samples, forwards, errors by code."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.labels.get("teacher") != TEACHER_NAME:
                    continue
                if s.name in ("kd_batch_size_sum", "kd_batch_size_count"):  # samples and forwards, as run
                    out[s.name] = s.value
                elif s.name == "kd_errors_total":
                    out[f"error/{s.labels['code']}"] = s.value
        return out

    def signal_stop(self) -> None:
        """Send the SIGTERM that starts the drain, once, without waiting for it (``stop`` waits)."""
        if self.proc.poll() is None and not self._signalled:
            self.proc.send_signal(signal.SIGTERM)
            self._signalled = True

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.signal_stop()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return int(self.proc.returncode)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class FloorProcess(ServerProcess):
    """The raw grpcio floor: a servicer that does no work, on the same kind of gRPC server as
    ``kd serve`` (sync, thread pool, the same message limits), in its own interpreter. Its
    ``Infer`` returns a valid reply of the size kd's reply would have (logits [N, C] float32,
    N from the request's size, without parsing it); ``Echo`` returns the request's bytes.

    ``batched`` (a ``BatchedFloor``): the floor of a batched load instead, the least a Python
    gRPC server does to batch one model: ``Infer`` parses the request, runs the model through
    the plainest batching there is (``_GreedyBatcher``) and answers its logits; no validation,
    metrics, accounting or limits."""

    def __init__(self, workdir: Path, sample_bytes: int, classes: int, batched: BatchedFloor | None = None) -> None:
        label = "floor_batched" if batched else "floor"
        self.config = ServerConfig(label, batched.max_batch_size if batched else 0)
        self.log_path = workdir / f"server-{label}.log"
        self._port_file = workdir / f"server-{label}.port"
        cmd = [sys.executable, "-m", "kd.bench.serve", "floor", str(self._port_file), str(sample_bytes), str(classes)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if batched is not None:
            cmd += [batched.teacher, str(batched.max_batch_size), str(batched.threads), batched.device]
            env |= {"OMP_NUM_THREADS": str(batched.threads), "MKL_NUM_THREADS": str(batched.threads)}  # as kd serve's
        self._log = open(self.log_path, "w")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.address = ""
        self.batched = batched is not None

    def metrics(self) -> dict[str, float]:
        """The batched floor's forwards and samples, named as ``kd serve``'s metrics name them."""
        if not self.batched:
            return {}
        import grpc

        with grpc.insecure_channel(self.address) as channel:
            stats = json.loads(channel.unary_unary(FLOOR_STATS_METHOD)(b"", timeout=10.0))
        return {"kd_batch_size_count": float(stats["forwards"]), "kd_batch_size_sum": float(stats["samples"]),
                "max_rows": float(stats["max_rows"])}  # fmt: skip


FLOOR_STATS_METHOD = "/kd.v1.TeacherService/FloorStats"  # only the batched floor has it


@dataclass(frozen=True)
class BatchedFloor:
    teacher: str  # module:factory, as kd serve loads it
    max_batch_size: int
    threads: int
    device: str = "cpu"  # the model's, as kd serve's --device


class _GreedyBatcher:
    """The plainest dynamic batching: callers queue their inputs; one model thread takes what
    is queued (whole requests of one sample shape, up to ``max_batch_size`` rows), runs one
    forward and hands each caller its rows. No queue delay: a batch forms whenever the model
    is free. Whatever fails is the callers' error, never the model thread's."""

    def __init__(self, model: torch.nn.Module, max_batch_size: int, threads: int, device: str = "cpu") -> None:
        self.model, self.max_batch_size, self.threads, self.device = model, max_batch_size, threads, device
        self.forwards = self.samples = self.max_rows = 0
        self._cv = threading.Condition()
        self._queue: list[tuple[torch.Tensor, list, threading.Event]] = []
        threading.Thread(target=self._loop, name="floor-model", daemon=True).start()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or len(x) == 0:
            raise ValueError(f"inputs of shape {list(x.shape)}: the floor takes a batch [N >= 1, ...]")
        box: list = [None]
        done = threading.Event()
        with self._cv:
            self._queue.append((x, box, done))
            self._cv.notify()
        done.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def _take(self) -> tuple[list, int]:
        with self._cv:
            while not self._queue:
                self._cv.wait()
            first = self._queue[0][0]
            take, rows = 1, len(first)
            while take < len(self._queue):
                x = self._queue[take][0]
                if x.shape[1:] != first.shape[1:] or rows + len(x) > self.max_batch_size:
                    break
                rows += len(x)
                take += 1
            batch, self._queue = self._queue[:take], self._queue[take:]
            return batch, rows

    def _loop(self) -> None:
        from kd.core.factory import logits_of

        torch.set_num_threads(self.threads)
        while True:
            batch, rows = self._take()
            try:
                x = torch.cat([x for x, _, _ in batch]) if len(batch) > 1 else batch[0][0]
                with torch.inference_mode():
                    y = logits_of(self.model(x.to(self.device))).float().cpu()
                parts: list = list(torch.split(y, [len(x) for x, _, _ in batch]))
            except BaseException as e:  # noqa: BLE001 - each caller gets it
                parts = [e] * len(batch)
            self.forwards += 1
            self.samples += rows
            self.max_rows = max(self.max_rows, rows)
            for (_, box, done), part in zip(batch, parts):
                box[0] = part
                done.set()


def _floor_main(port_file: str, sample_bytes: int, classes: int, batched: BatchedFloor | None = None) -> None:
    from concurrent import futures

    import grpc

    from kd.core.wire import from_proto, to_proto
    from kd.teacher_server.server import DEFAULT_MAX_MESSAGE_BYTES, SERVICE_NAME, channel_options
    from kd.v1 import teacher_pb2 as pb

    replies: dict[int, bytes] = {}

    def infer(body: bytes, _context) -> bytes:
        n = max(1, round(len(body) / sample_bytes))
        if n not in replies:  # a dict lookup per call after the first
            logits = to_proto(torch.zeros(n, classes))
            replies[n] = pb.InferResponse(teacher=TEACHER_NAME, outputs={"logits": logits}).SerializeToString()
        return replies[n]

    def infer_batched(body: bytes, _context) -> bytes:
        reply = pb.InferResponse(teacher=TEACHER_NAME)
        reply.outputs["logits"].CopyFrom(to_proto(batcher(from_proto(pb.InferRequest.FromString(body).inputs))))
        return reply.SerializeToString()

    def stats(_body: bytes, _context) -> bytes:
        return json.dumps({"forwards": batcher.forwards, "samples": batcher.samples,
                           "max_rows": batcher.max_rows}).encode()  # fmt: skip

    def echo(body: bytes, _context) -> bytes:
        return body

    handlers = {"Infer": grpc.unary_unary_rpc_method_handler(infer), "Echo": grpc.unary_unary_rpc_method_handler(echo)}
    if batched is not None:
        from kd.teacher_server.loading import load_teacher

        model = load_teacher(TEACHER_NAME, batched.teacher, device=batched.device).model.eval()
        batcher = _GreedyBatcher(model, batched.max_batch_size, batched.threads, batched.device)
        handlers["Infer"] = grpc.unary_unary_rpc_method_handler(infer_batched)
        handlers[FLOOR_STATS_METHOD.rpartition("/")[2]] = grpc.unary_unary_rpc_method_handler(stats)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), options=channel_options(DEFAULT_MAX_MESSAGE_BYTES))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stop = StopSignals((signal.SIGTERM,), force=None)  # before the port file: the bench may stop us right after
    write_text_atomically(port_file, str(port))
    stop.wait()
    server.stop(1).wait()


# -- the Triton peer ------------------------------------------------------------------

TRITON_PYTHON_ENV = "KD_TRITON_PYTHON"  # the interpreter that runs PyTriton (default: this one)


# Run by the interpreter that is to serve the Triton peer. PyTriton 0.7 needs numpy < 2 (the
# README's set-up); the version is checked first so that the refusal names it.
_TRITON_PROBE = (
    "import numpy\n"
    "if int(numpy.__version__.split('.')[0]) >= 2:\n"
    "    raise SystemExit(f'numpy {numpy.__version__}: PyTriton 0.7 needs numpy < 2')\n"
    "import pytriton, torch, kd\n"
)


def triton_peer_problem() -> str | None:
    """Why ``--peer triton`` cannot run here (None: it can): the clients need ``tritonclient``
    in this interpreter, the server PyTriton in ``$KD_TRITON_PYTHON`` (default: this one)."""
    import importlib.util

    missing = []
    if importlib.util.find_spec("tritonclient") is None:
        missing.append("tritonclient[grpc] in this interpreter")
    python = os.environ.get(TRITON_PYTHON_ENV)
    if python:
        try:
            probe = subprocess.run([python, "-c", _TRITON_PROBE], capture_output=True, text=True, timeout=120)
            problem = (probe.stderr.strip().splitlines() or ["(no output)"])[-1] if probe.returncode else ""
        except (OSError, subprocess.TimeoutExpired) as e:
            problem = str(e)
        if problem:
            missing.append(f"pytriton, torch and kd with numpy < 2 in {TRITON_PYTHON_ENV}={python} ({problem})")
    elif importlib.util.find_spec("pytriton") is None:
        missing.append(f"PyTriton in this interpreter (or in another one named by {TRITON_PYTHON_ENV})")
    elif int(np.__version__.split(".")[0]) >= 2:
        missing.append(f"numpy < 2 for PyTriton 0.7 (this interpreter has numpy {np.__version__}; name another "
                       f"one by {TRITON_PYTHON_ENV})")  # fmt: skip
    if not missing:
        return None
    return ("--peer triton needs " + " and ".join(missing) + "; nothing was measured. Install the extra "
            "(pip install nvidia-pytriton, or pip install -e '.[triton]' in kd's repository); PyTriton 0.7 "
            "needs numpy < 2, so its server may run in another "
            f"interpreter with torch and kd ({TRITON_PYTHON_ENV}=PATH), whose lib directory the bench puts first "
            "on LD_LIBRARY_PATH for PyTriton's stub.")  # fmt: skip


@dataclass(frozen=True)
class TritonModel:
    """One model of the Triton peer: its name on the server and its batching."""

    name: str
    teacher: str  # module:factory
    max_batch_size: int
    max_queue_delay_us: int = 0
    uint8: bool = False  # takes uint8 pixels and divides them by 255, as kd does with uint8 inputs


class TritonProcess(ServerProcess):
    """Triton Inference Server through PyTriton (Python backend) in its own interpreter, every
    model bound at start-up; ``address`` is its gRPC port. The interpreter is
    ``$KD_TRITON_PYTHON`` or this one (PyTriton 0.7 needs numpy < 2, so it may be another
    environment's; it must import torch and kd too)."""

    def __init__(self, models: list[TritonModel], threads: int, workdir: Path) -> None:
        self.config = ServerConfig("triton", 0)
        self.log_path = workdir / "server-triton.log"
        self._port_file = workdir / "server-triton.port"
        spec = workdir / "triton-models.json"
        spec.write_text(json.dumps([asdict(m) for m in models]))
        python = os.environ.get(TRITON_PYTHON_ENV) or sys.executable
        cmd = [python, "-m", "kd.bench.serve", "triton", str(self._port_file), str(spec)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self._log = open(self.log_path, "w")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.address = ""
        self.metrics_port = 0
        self.model = ""  # the model whose counters ``metrics`` reads (set per phase)

    def wait_started(self, timeout: float = 600.0) -> None:
        super().wait_started(timeout)

    def _started(self, port_text: str) -> None:
        grpc_port, self.metrics_port = (int(v) for v in port_text.split())
        self.address = f"127.0.0.1:{grpc_port}"

    def for_model(self, model: str) -> TritonProcess:
        """This server, with ``metrics`` reading ``model``'s counters (a shallow copy)."""
        other = copy.copy(self)
        other.model = model
        return other

    def metrics(self) -> dict[str, float]:
        """Triton's counters of ``model`` as kd's names: inferences (samples) and executions (forwards)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        # Read by hand: prometheus_client's parser drops counters whose names do not end in _total.
        names = {"nv_inference_count": "kd_batch_size_sum", "nv_inference_exec_count": "kd_batch_size_count"}
        out: dict[str, float] = {}
        for line in text.splitlines():
            name, _, rest = line.partition("{")
            if name in names and f'model="{self.model}"' in rest.partition("}")[0]:
                out[names[name]] = float(rest.rpartition(" ")[2])
        return out

    def stop(self) -> int:
        code = super().stop()
        return 0 if code in (0, -signal.SIGTERM) else code


def _triton_main(port_file: str, spec_file: str) -> None:
    """Serve the models of ``spec_file`` with PyTriton until SIGTERM; write "GRPC METRICS" ports."""
    import sysconfig
    from importlib import metadata

    # PyTriton's Python-backend stub links libpython: it must load this interpreter's, not a
    # system one of another patch level (its stdlib would not match), so its lib dir goes first.
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    import pytriton

    libs = Path(pytriton.__file__).resolve().parent.parent / "nvidia_pytriton.libs"
    extra = [d for d in (libdir, str(libs) if libs.is_dir() else "") if d]
    os.environ["LD_LIBRARY_PATH"] = ":".join([*extra, *filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(":"))])
    try:
        from packaging.requirements import Requirement

        for req in map(Requirement, metadata.requires("nvidia-pytriton") or []):
            if req.name == "numpy" and not req.specifier.contains(np.__version__, prereleases=True):
                sys.exit(f"PyTriton {metadata.version('nvidia-pytriton')} needs numpy {req.specifier} (this "
                         f"interpreter has {np.__version__}; its outputs come back empty otherwise): set "
                         f"{TRITON_PYTHON_ENV} to an interpreter with numpy {req.specifier}, torch and kd")  # fmt: skip
    except ImportError:
        pass
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    from kd.core.factory import logits_of
    from kd.teacher_server.loading import load_teacher

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    models = [TritonModel(**m) for m in json.loads(Path(spec_file).read_text())]
    grpc_port, http_port, metrics_port = _free_port(), _free_port(), _free_port()
    config = TritonConfig(grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port,
                          grpc_address="127.0.0.1", http_address="127.0.0.1", log_verbose=0)  # fmt: skip
    loaded: dict[str, Any] = {}

    def callable_for(m: TritonModel):
        teacher = loaded.setdefault(m.teacher, load_teacher(TEACHER_NAME, m.teacher))
        model = teacher.model

        @batch
        def infer(x: np.ndarray) -> dict[str, np.ndarray]:
            t = torch.from_numpy(np.asarray(x))
            if m.uint8:
                t = t.to(torch.float32).div_(255.0)
            with torch.inference_mode():
                out = logits_of(model(t))
            return {"logits": out.float().numpy()}

        return infer, teacher

    with Triton(config=config) as triton:
        for m in models:
            infer, teacher = callable_for(m)
            shape = tuple(int(d) for d in teacher.input_shape)
            triton.bind(
                model_name=m.name,
                infer_func=infer,
                inputs=[Tensor(name="x", dtype=np.uint8 if m.uint8 else np.float32, shape=shape)],
                outputs=[Tensor(name="logits", dtype=np.float32, shape=(int(teacher.num_classes),))],
                config=ModelConfig(max_batch_size=m.max_batch_size,
                                   batcher=DynamicBatcher(max_queue_delay_microseconds=m.max_queue_delay_us)),
                strict=False,
            )  # fmt: skip
        triton.run()
        stop = StopSignals((signal.SIGTERM,), force=None)  # before the port file, as the floor's
        write_text_atomically(port_file, f"{grpc_port} {metrics_port}")
        stop.wait()


# -- phases ---------------------------------------------------------------------------


@dataclass
class Window:
    """One measured window of one phase."""

    samples_per_s: float
    requests: int = 0
    codes: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # seconds
    forwards: float = 0.0  # server forwards inside the window
    forwarded: float = 0.0  # samples in those forwards
    other_errors: int = 0  # neither OK nor RESOURCE_EXHAUSTED, inside the window or not
    server_errors: Counter = field(default_factory=Counter)


@dataclass
class PhaseResult:
    name: str
    server: str  # the server configuration, or "in-process"
    clients: int
    batch: int
    mode: str
    samples_per_s: float  # mean over the windows
    windows_samples_per_s: list[float]
    requests: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    p50_ms: float | None = None
    p99_ms: float | None = None
    mean_forward: float | None = None
    other_errors: int = 0
    server_errors: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, name: str, server: str, clients: int, batch: int, mode: str, windows: list[Window]) -> PhaseResult:
        codes: Counter[str] = Counter()
        server_errors: Counter[str] = Counter()
        latencies: list[float] = []
        for w in windows:
            codes.update(w.codes)
            server_errors.update(w.server_errors)
            latencies.extend(w.latencies)
        p50 = p99 = None
        if latencies:
            p50, p99 = (float(v) * 1e3 for v in np.percentile(latencies, [50, 99]))
        forwards = sum(w.forwards for w in windows)
        rates = [w.samples_per_s for w in windows]
        return cls(
            name=name,
            server=server,
            clients=clients,
            batch=batch,
            mode=mode,
            samples_per_s=sum(rates) / len(rates),
            windows_samples_per_s=rates,
            requests=sum(w.requests for w in windows),
            codes=dict(codes),
            p50_ms=p50,
            p99_ms=p99,
            mean_forward=sum(w.forwarded for w in windows) / forwards if forwards else None,
            other_errors=sum(w.other_errors for w in windows),
            server_errors={k: v for k, v in server_errors.items() if v},
        )


def _inprocess(model: torch.nn.Module, input_shape: tuple[int, ...], batch: int, device: torch.device,
               warmup: float, seconds: float) -> Window:  # fmt: skip
    """The forward in a loop, counted like the clients count: completions inside the window.

    On CUDA each iteration copies the batch in and the logits out, as serving does."""
    x = torch.randn((batch, *input_shape), generator=torch.Generator().manual_seed(0))
    cuda = device.type == "cuda"
    forwards = 0
    with torch.inference_mode():
        for _ in range(3):
            model(x.to(device))
        if cuda:
            torch.cuda.synchronize(device)
        begin = time.monotonic() + warmup
        end = begin + seconds
        while True:
            out = model(x.to(device) if cuda else x)
            if cuda:
                out.to("cpu")
            t = time.monotonic()
            if t > end:
                break
            if t >= begin:
                forwards += 1
    return Window(forwards * batch / seconds, forwards, forwards=forwards, forwarded=forwards * batch)


def _served(pool: ClientPool, server: ServerProcess, input_shape: tuple[int, ...], *, clients: int, batch: int,
            depth: int, warmup: float, seconds: float, dtype: str = "float32",
            echo: bool = False) -> Window:  # fmt: skip
    triton = isinstance(server, TritonProcess)
    model = server.model if triton else TEACHER_NAME
    plans = [
        ClientPlan(server.address, model, input_shape, batch, depth, warmup, seconds, seed, dtype, echo,
                   "triton" if triton else "kd")
        for seed in range(clients)
    ]  # fmt: skip
    metrics: dict[str, dict[str, float]] = {}

    def on_window(begin: float, end: float) -> None:
        _sleep_until(begin)
        metrics["begin"] = server.metrics()
        _sleep_until(end)
        metrics["end"] = server.metrics()

    reports = pool.run(plans, on_window)
    w = Window(sum(r.samples for r in reports) / seconds, sum(r.requests for r in reports))
    for r in reports:
        w.codes.update(r.codes)
        w.latencies.extend(r.latencies)
        w.other_errors += sum(r.stray_errors.values())
    w.other_errors += sum(n for code, n in w.codes.items() if code not in (OK, QUEUE_FULL))
    m0, m1 = metrics["begin"], metrics["end"]
    w.forwards = m1.get("kd_batch_size_count", 0.0) - m0.get("kd_batch_size_count", 0.0)
    w.forwarded = m1.get("kd_batch_size_sum", 0.0) - m0.get("kd_batch_size_sum", 0.0)
    for key in m1:
        if key.startswith("error/"):
            w.server_errors[key[len("error/") :]] = int(m1[key] - m0.get(key, 0.0))
    return w


def _alternate(*sides, rounds: int) -> tuple[list[Window], ...]:
    """``rounds`` windows of each side, in ABBA order (ABC CBA ... for more sides; None sides
    are skipped and get no windows), so a slow drift of the machine's load (other tenants)
    weighs on every side alike."""
    windows: list[list[Window]] = [[] for _ in sides]
    order = [i for i, side in enumerate(sides) if side is not None]
    for r in range(rounds):
        for i in order if r % 2 == 0 else reversed(order):
            windows[i].append(sides[i]())
    return tuple(windows)


def _median_ratio(num: list[Window], den: list[Window]) -> tuple[float, list[float]]:
    ratios = [n.samples_per_s / d.samples_per_s if d.samples_per_s else math.inf for n, d in zip(num, den)]
    return float(np.median(ratios)), ratios


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({_cpus()} logical CPUs)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({_cpus()} logical CPUs)"


def run_bench(settings: BenchSettings) -> dict[str, Any]:
    """Run every phase; returns the results (what ``--json`` writes)."""
    from kd.teacher_server.client import TeacherClient
    from kd.teacher_server.loading import load_teacher

    t_start = time.perf_counter()
    s = settings
    threads = s.threads or default_threads()
    torch.set_num_threads(threads)
    teacher = load_teacher(TEACHER_NAME, s.teacher, device=s.device)
    shape = teacher.input_shape
    params = sum(p.numel() for p in teacher.model.parameters())
    console.print(
        f"teacher {s.teacher}: {params / 1e6:.1f}M parameters, input {list(shape)}, {teacher.num_classes} classes, "
        f"on {teacher.device}; torch threads {threads}; {s.seconds:g} s windows after {s.warmup:g} s warm-up, "
        f"{s.rounds} round(s) per ratio",
        highlight=False,
    )
    n_procs = max(s.clients, s.served_clients)
    configs = {
        "served": ServerConfig("served", s.served_batch),
        "batcher_on": ServerConfig("batcher_on", s.merged_max_batch, s.queue_delay_us),
        "batcher_off": ServerConfig("batcher_off", s.small_batch),
        "overload": ServerConfig("overload", s.overload_max_batch, s.queue_delay_us, s.overload_queue),
        "free": ServerConfig("free", s.served_batch, teacher=FREE_TEACHER),
        "free_image": ServerConfig("free_image", s.large_batch, teacher=FREE_IMAGE_TEACHER),
    }
    if s.peer not in ("", "triton"):
        raise ValueError(f"peer {s.peer!r}: the only peer is triton")
    # The Triton peer: the same configurations as models of one Triton server (as PyTriton binds them).
    triton_models = [
        TritonModel("served", s.teacher, s.served_batch),
        TritonModel("batcher_on", s.teacher, s.merged_max_batch, s.queue_delay_us),
        TritonModel("batcher_off", s.teacher, s.small_batch),
        TritonModel("free", FREE_TEACHER, s.served_batch),
        TritonModel("free_image", FREE_IMAGE_TEACHER, s.large_batch),
        TritonModel("free_image_u8", FREE_IMAGE_TEACHER, s.large_batch, uint8=True),
    ] if s.peer == "triton" else []  # fmt: skip
    console.print(
        f"starting {n_procs} client processes and {len(configs)} servers: "
        + "; ".join(f"{k} ({c.describe()})" for k, c in configs.items()),
        highlight=False,
    )
    phases: dict[str, PhaseResult] = {}

    def note(p: PhaseResult) -> None:
        phases[p.name] = p
        lat = f", p50 {p.p50_ms:.2f} ms, p99 {p.p99_ms:.2f} ms" if p.p50_ms is not None else ""
        console.print(f"  {p.name}: {p.samples_per_s:,.0f} samples/s{lat}", highlight=False)

    def inprocess() -> Window:
        return _inprocess(teacher.model, shape, s.served_batch, teacher.device, s.warmup, s.seconds)

    def served(key: str, clients: int, batch: int, depth: int = 0, input_shape: tuple[int, ...] = shape,
               dtype: str = "float32", echo: bool = False):  # fmt: skip
        return lambda: _served(pool, servers[key], input_shape, clients=clients, batch=batch, depth=depth,
                               warmup=s.warmup, seconds=s.seconds, dtype=dtype, echo=echo)  # fmt: skip

    def peer(model: str, clients: int, batch: int, input_shape: tuple[int, ...] = shape, dtype: str = "float32"):
        """The same load against the Triton peer's ``model`` (None without a peer: no windows)."""
        if not triton_models:
            return None
        return lambda: _served(pool, servers["triton"].for_model(model), input_shape, clients=clients, batch=batch,
                               depth=0, warmup=s.warmup, seconds=s.seconds, dtype=dtype)  # fmt: skip

    peers: dict[str, list[Window]] = {}

    def mode(depth: int) -> str:
        return f"InferStream depth {depth}" if depth else "unary"

    with tempfile.TemporaryDirectory(prefix="kd-bench-") as tmp, ClientPool(n_procs) as pool, ExitStack() as stack:
        servers = {k: stack.enter_context(ServerProcess(c, s, threads, Path(tmp))) for k, c in configs.items()}
        servers["floor"] = stack.enter_context(FloorProcess(Path(tmp), 4 * math.prod(FREE_SHAPE), FREE_CLASSES))
        batched_floor = BatchedFloor(s.teacher, s.merged_max_batch, threads, s.device)
        servers["floor_batched"] = stack.enter_context(
            FloorProcess(Path(tmp), 4 * math.prod(shape), teacher.num_classes, batched_floor)
        )
        if triton_models:
            servers["triton"] = stack.enter_context(TritonProcess(triton_models, threads, Path(tmp)))
        pool.wait_up()
        for server in servers.values():
            server.wait_started()
        with TeacherClient(servers["served"].address) as c:
            if c.describe(TEACHER_NAME).fingerprint != teacher.fingerprint:
                raise RuntimeError("the served teacher's fingerprint differs from the in-process one")
        # Every server but the one measured sits idle (no CPU) during a window.
        console.print("measuring ...", highlight=False)
        w_in, w_served, peers["served"] = _alternate(
            inprocess, served("served", s.served_clients, s.served_batch, s.served_depth),
            peer("served", s.served_clients, s.served_batch), rounds=s.rounds)  # fmt: skip
        served_ratio, served_ratios = _median_ratio(w_served, w_in)
        note(PhaseResult.of("inprocess", "in-process", 0, s.served_batch, "forward loop", w_in))
        note(PhaseResult.of("served", configs["served"].describe(), s.served_clients, s.served_batch,
                            mode(s.served_depth), w_served))  # fmt: skip
        note(PhaseResult.of("merged", configs["batcher_on"].describe(), s.served_clients, s.served_batch,
                            mode(s.served_depth),
                            [served("batcher_on", s.served_clients, s.served_batch, s.served_depth)()]))  # fmt: skip
        note(PhaseResult.of("low_load", configs["batcher_on"].describe(), 1, s.small_batch, mode(0),
                            [served("batcher_on", 1, s.small_batch)()]))  # fmt: skip
        # The batched floor: what a bare grpcio server with the plainest batching gets from the same load.
        w_on, w_off, peers["batcher_on"], peers["batcher_off"], w_floor_batched = _alternate(
            served("batcher_on", s.clients, s.small_batch), served("batcher_off", s.clients, s.small_batch),
            peer("batcher_on", s.clients, s.small_batch), peer("batcher_off", s.clients, s.small_batch),
            served("floor_batched", s.clients, s.small_batch), rounds=s.rounds)  # fmt: skip
        gain, gains = _median_ratio(w_on, w_off)
        batched, batched_rounds = _median_ratio(w_on, w_in)  # round r of each: the same stretch of the run
        batched_floor_share = _median_ratio(w_on, w_floor_batched)
        floor_batched_over_inprocess = _median_ratio(w_floor_batched, w_in)
        note(PhaseResult.of("saturation", configs["batcher_on"].describe(), s.clients, s.small_batch, mode(0), w_on))
        note(PhaseResult.of("batcher_off", configs["batcher_off"].describe(), s.clients, s.small_batch, mode(0),
                            w_off))  # fmt: skip
        note(PhaseResult.of("floor_batched", "raw grpcio, greedy batching", s.clients, s.small_batch, mode(0),
                            w_floor_batched))  # fmt: skip
        note(PhaseResult.of("overload", configs["overload"].describe(), s.clients, s.overload_batch, mode(0),
                            [served("overload", s.clients, s.overload_batch)()]))  # fmt: skip
        # Against the raw grpcio floor (a servicer doing no work), near-free teachers.
        shares: dict[str, tuple[float, list[float]]] = {}
        n = s.served_clients
        for batch in (1, s.served_batch):
            key = f"b{batch}"
            w_kd, w_floor, peers[f"free_{key}"] = _alternate(
                served("free", n, batch, input_shape=FREE_SHAPE), served("floor", n, batch, input_shape=FREE_SHAPE),
                peer("free", n, batch, FREE_SHAPE), rounds=s.rounds)  # fmt: skip
            peers[f"floor_{key}"] = w_floor
            shares[key] = _median_ratio(w_kd, w_floor)
            note(PhaseResult.of(f"free_{key}", configs["free"].describe(), n, batch, mode(0), w_kd))
            note(PhaseResult.of(f"floor_{key}", "raw grpcio, same-size reply", n, batch, mode(0), w_floor))
        for dtype, key in (("float32", "f32"), ("uint8", "u8")):
            w_kd, w_echo, peers[f"large_{key}"] = _alternate(
                served("free_image", n, s.large_batch, input_shape=FREE_IMAGE_SHAPE, dtype=dtype),
                served("floor", n, s.large_batch, input_shape=FREE_IMAGE_SHAPE, dtype=dtype, echo=True),
                peer("free_image_u8" if dtype == "uint8" else "free_image", n, s.large_batch, FREE_IMAGE_SHAPE, dtype),
                rounds=s.rounds,
            )
            peers[f"echo_{key}"] = w_echo
            shares[key] = _median_ratio(w_kd, w_echo)
            note(PhaseResult.of(f"large_{key}", configs["free_image"].describe(), n, s.large_batch,
                                f"unary, {dtype}", w_kd))  # fmt: skip
            note(PhaseResult.of(f"echo_{key}", "raw grpcio echo", n, s.large_batch, f"raw bytes, {dtype}", w_echo))
        # Every server drains at once: one after the other, their shutdowns (seconds each on a
        # busy machine) added up to a good part of a --quick run.
        for server in servers.values():
            server.signal_stop()
        exit_codes = {k: server.stop() for k, server in servers.items()}
    bad_exits = {k: rc for k, rc in exit_codes.items() if rc != 0}
    if bad_exits:
        raise RuntimeError(f"kd serve exited with {bad_exits} after SIGTERM (expected 0: drained)")

    p = phases
    over = p["overload"]
    image_mb = {"f32": 4 * math.prod(FREE_IMAGE_SHAPE) / 1e6, "u8": math.prod(FREE_IMAGE_SHAPE) / 1e6}
    return {
        "served_over_inprocess": served_ratio,
        "served_over_inprocess_rounds": served_ratios,
        "batched_over_inprocess": batched,
        "batched_over_inprocess_rounds": batched_rounds,
        "merged_over_inprocess": p["merged"].samples_per_s / p["inprocess"].samples_per_s,
        "batching_gain": gain,
        "batching_gain_rounds": gains,
        "mean_batch_16x4": p["saturation"].mean_forward,
        "batched_floor_share": batched_floor_share[0],
        "batched_floor_share_rounds": batched_floor_share[1],
        "floor_batched_over_inprocess": floor_batched_over_inprocess[0],
        "floor_batched_over_inprocess_rounds": floor_batched_over_inprocess[1],
        "mean_batch_16x4_floor": p["floor_batched"].mean_forward,
        "floor_share_b1": shares["b1"][0],
        "floor_share_b1_rounds": shares["b1"][1],
        "floor_share_b64": shares[f"b{s.served_batch}"][0],
        "floor_share_b64_rounds": shares[f"b{s.served_batch}"][1],
        "large_input_share_f32": shares["f32"][0],
        "large_input_share_f32_rounds": shares["f32"][1],
        "large_input_share_u8": shares["u8"][0],
        "large_input_share_u8_rounds": shares["u8"][1],
        "large_input_mb_per_s": {
            f"{side}_{key}": p[f"{side}_{key}"].samples_per_s * mb
            for key, mb in image_mb.items()
            for side in ("large", "echo")
        },
        "latency_ms": {
            "low_load": {"p50": p["low_load"].p50_ms, "p99": p["low_load"].p99_ms},
            "saturation": {"p50": p["saturation"].p50_ms, "p99": p["saturation"].p99_ms},
        },
        "overload": {
            "requests": over.requests,
            "ok": over.codes.get(OK, 0),
            "resource_exhausted": over.codes.get(QUEUE_FULL, 0),
            "other_errors": over.other_errors,
            "ok_samples_per_s": over.samples_per_s,
            "clients": over.clients,
            "batch": over.batch,
            "max_queue_size": s.overload_queue,
        },
        "other_errors_all_phases": sum(ph.other_errors for ph in p.values()),
        "samples_per_s": {
            "inprocess": p["inprocess"].samples_per_s,
            "served": p["served"].samples_per_s,
            "merged": p["merged"].samples_per_s,
            "batcher_on": p["saturation"].samples_per_s,
            "batcher_off": p["batcher_off"].samples_per_s,
            "floor_batched": p["floor_batched"].samples_per_s,
            "low_load": p["low_load"].samples_per_s,
            "overload_ok": over.samples_per_s,
        },
        "phases": {name: asdict(ph) for name, ph in p.items()},
        "settings": {**asdict(s), "threads": threads, "overload_batch": s.overload_batch},
        "torch_threads": threads,
        "device": str(teacher.device),
        "device_name": _device_name(teacher.device),
        "teacher": {"spec": s.teacher, "parameters": params, "fingerprint": teacher.fingerprint},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "seconds": round(time.perf_counter() - t_start, 1),
        **({"triton": _peer_results(peers, w_in, s)} if triton_models else {}),
    }


PEER_KEYS = ("served_over_inprocess", "batched_over_inprocess", "mean_batch_16x4", "batching_gain", "floor_share_b1",
             "floor_share_b64", "large_input_share_f32", "large_input_share_u8")  # fmt: skip


def _peer_results(peers: dict[str, list[Window]], w_in: list[Window], s: BenchSettings) -> dict[str, Any]:
    """The Triton peer's figures, each the same ratio as kd's over the same round's windows."""
    out: dict[str, Any] = {}
    for key, num, den in (
        ("served_over_inprocess", "served", None),
        ("batched_over_inprocess", "batcher_on", None),
        ("batching_gain", "batcher_on", "batcher_off"),
        ("floor_share_b1", "free_b1", "floor_b1"),
        ("floor_share_b64", f"free_b{s.served_batch}", f"floor_b{s.served_batch}"),
        ("large_input_share_f32", "large_f32", "echo_f32"),
        ("large_input_share_u8", "large_u8", "echo_u8"),
    ):
        out[key], out[f"{key}_rounds"] = _median_ratio(peers[num], w_in if den is None else peers[den])
    on = peers["batcher_on"]
    forwards = sum(w.forwards for w in on)
    out["mean_batch_16x4"] = sum(w.forwarded for w in on) / forwards if forwards else None
    out["samples_per_s"] = {k: sum(w.samples_per_s for w in v) / len(v) for k, v in peers.items() if v}
    out["other_errors"] = sum(w.other_errors for v in peers.values() for w in v)
    return out


def print_report(results: dict[str, Any], out: Console | None = None) -> None:
    """The phases as a table, then the ratios."""
    out = report_console(out, width=150)
    s = results["settings"]
    table = Table(
        title=f"kd bench serve: {results['teacher']['spec']} on {results['device']} ({results['device_name']}), "
        f"torch threads {results['torch_threads']}, {s['seconds']:g} s windows"
    )
    for col in ("phase", "server", "clients x batch", "client", "samples/s", "p50 ms", "p99 ms", "mean fwd",
                "OK / full / other"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("phase", "server", "client") else "right")

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    for name, p in results["phases"].items():
        codes = p["codes"]
        outcome = f"{codes.get(OK, 0)} / {codes.get(QUEUE_FULL, 0)} / {p['other_errors']}" if p["clients"] else "-"
        windows = len(p["windows_samples_per_s"])
        table.add_row(
            name + (f" (x{windows})" if windows > 1 else ""),
            p["server"],
            f"{p['clients'] or '-'} x {p['batch']}",
            p["mode"],
            f"{p['samples_per_s']:,.0f}",
            ms(p["p50_ms"]),
            ms(p["p99_ms"]),
            "-" if p["mean_forward"] is None else f"{p['mean_forward']:.1f}",
            outcome,
        )
    out.print(table)
    sps, lat, o = results["samples_per_s"], results["latency_ms"], results["overload"]
    served = results["phases"]["served"]

    def rounds(key: str) -> str:
        values = results[f"{key}_rounds"]
        return f"median of {len(values)}: " + ", ".join(f"{v:.3f}" for v in values) if len(values) > 1 else ""

    summary = Table(title="ratios and latencies, measured in this run", show_header=False)
    for justify in ("left", "right", "left"):
        summary.add_column(justify=justify)  # type: ignore[arg-type]
    summary.add_row(
        "served_over_inprocess",
        f"{results['served_over_inprocess']:.3f}",
        f"served {sps['served']:,.0f} / in-process {sps['inprocess']:,.0f} samples/s at batch {s['served_batch']} "
        f"({served['clients']} clients, {served['mode']}; forwards of {s['served_batch']}) "
        + rounds("served_over_inprocess"),
    )
    summary.add_row(
        "merged_over_inprocess",
        f"{results['merged_over_inprocess']:.3f}",
        f"the same clients, the batcher merging up to {s['merged_max_batch']} (mean forward "
        f"{results['phases']['merged']['mean_forward'] or 0:.0f})",
    )
    summary.add_row(
        "batching_gain",
        f"{results['batching_gain']:.2f}",
        f"{s['clients']} clients x batch {s['small_batch']}: batcher on {sps['batcher_on']:,.0f} / off "
        f"{sps['batcher_off']:,.0f} samples/s {rounds('batching_gain')}",
    )
    for key in ("low_load", "saturation"):
        clients = 1 if key == "low_load" else s["clients"]
        summary.add_row(
            f"latency {key}",
            f"{lat[key]['p50']:.2f} / {lat[key]['p99']:.2f}",
            f"p50 / p99 ms, {clients} client(s) x batch {s['small_batch']}, unary",
        )
    floor = results["phases"]
    for key, what in (("floor_share_b1", "b1"), ("floor_share_b64", f"b{s['served_batch']}")):
        summary.add_row(
            key,
            f"{results[key]:.3f}",
            f"kd {floor['free_' + what]['samples_per_s']:,.0f} / raw grpcio "
            f"{floor['floor_' + what]['samples_per_s']:,.0f} samples/s, near-free teacher, "
            f"{s['served_clients']} clients x {what[1:]} " + rounds(key),
        )
    mb = results["large_input_mb_per_s"]
    for key in ("f32", "u8"):
        summary.add_row(
            f"large_input_share_{key}",
            f"{results['large_input_share_' + key]:.3f}",
            f"kd {mb['large_' + key]:,.0f} / raw echo {mb['echo_' + key]:,.0f} MB/s of requests, "
            f"{s['served_clients']} clients x {s['large_batch']} x 3x224x224 " + rounds(f"large_input_share_{key}"),
        )
    summary.add_row(
        "batched_floor_share",
        f"{results['batched_floor_share']:.3f}",
        f"{s['clients']} clients x batch {s['small_batch']}: kd, batcher on {sps['batcher_on']:,.0f} / raw grpcio with "
        f"greedy batching {sps['floor_batched']:,.0f} samples/s ({results['floor_batched_over_inprocess']:.3f} of "
        f"in-process) " + rounds("batched_floor_share"),
    )
    summary.add_row(
        "mean_batch_16x4",
        "-" if results["mean_batch_16x4"] is None else f"{results['mean_batch_16x4']:.1f}",
        f"mean forward with the batcher on, {s['clients']} clients x batch {s['small_batch']} (the batched floor's: "
        + ("-" if results["mean_batch_16x4_floor"] is None else f"{results['mean_batch_16x4_floor']:.1f}")
        + ")",
    )
    summary.add_row(
        "overload",
        f"{o['resource_exhausted']} refused",
        f"{o['requests']} requests: {o['ok']} OK, {o['resource_exhausted']} RESOURCE_EXHAUSTED, {o['other_errors']} "
        f"other errors ({o['clients']} clients x batch {o['batch']}, max_queue_size {o['max_queue_size']})",
    )
    out.print(summary)
    if "triton" in results:
        peer = Table(title="kd and Triton (PyTriton, Python backend), the same loads, windows interleaved")
        for col in ("measure", "kd", "Triton"):
            peer.add_column(col, justify="left" if col == "measure" else "right")
        t = results["triton"]
        for key in PEER_KEYS:
            kd_v, t_v = results.get(key), t.get(key)
            peer.add_row(key, "-" if kd_v is None else f"{kd_v:.3f}", "-" if t_v is None else f"{t_v:.3f}")
        out.print(peer)


if __name__ == "__main__":  # the floor and Triton servers of the bench
    if len(sys.argv) in (5, 9) and sys.argv[1] == "floor":
        more = (
            BatchedFloor(sys.argv[5], int(sys.argv[6]), int(sys.argv[7]), sys.argv[8]) if len(sys.argv) == 9 else None
        )
        _floor_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), more)
    elif len(sys.argv) == 4 and sys.argv[1] == "triton":
        _triton_main(sys.argv[2], sys.argv[3])
    else:
        sys.exit(
            "usage: python -m kd.bench.serve floor PORT_FILE SAMPLE_BYTES CLASSES [TEACHER MAX_BATCH THREADS DEVICE] | "
            "triton PORT_FILE MODELS_JSON"
        )
