"""Wire teachers, batchers and the servicer into a ``grpc.Server``.

The server also speaks the standard gRPC health protocol (grpc.health.v1)
and server reflection, so grpcurl or any language's client can discover it;
optionally TLS / mutual TLS, a bearer token and Prometheus metrics.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kd.core.samples import SampleSource
from kd.core.signals import StopSignals
from kd.core.signature import target_fingerprint, target_options
from kd.teacher_server import weights
from kd.teacher_server.access import Accounting, parse_access
from kd.teacher_server.auth import TLSConfig, TokenInterceptor
from kd.teacher_server.batcher import DynamicBatcher
from kd.teacher_server.loading import Teacher
from kd.teacher_server.metrics import ServerMetrics
from kd.teacher_server.records import load_records
from kd.teacher_server.runner import ModelRunner
from kd.teacher_server.service import Endpoint, TeacherServicer, add_to_server
from kd.v1 import teacher_pb2 as pb

log = logging.getLogger("kd.serve")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TeacherService"].full_name
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


@dataclass
class TeacherOptions:
    """How one teacher is served (``kd serve`` flags or a ``[[teacher]]`` table of the config)."""

    max_batch_size: int = 256
    preferred_batch_sizes: list[int] = field(default_factory=list)
    # A partial batch waits at most this long for company, and only where company comes (the
    # batcher's Company rule: recent batches of several requests, or overlapping ones), so a lone
    # client with one request at a time never waits. 0 (Triton's default) never waits: with a
    # fixed cost per forward (a GPU) closed-loop clients then split into a batch of one and the
    # rest (x0.4-0.6 measured).
    max_queue_delay_us: int = 2000
    # Samples queued per teacher before RESOURCE_EXHAUSTED (bounded by default; 0 = unbounded).
    max_queue_size: int = 4096
    # amp, compile and mean/std change the targets, so the fingerprint the server reports
    # covers them (kd.core.signature.target_fingerprint); channels_last does not.
    amp: str = "fp32"
    compile: bool = False
    channels_last: bool = False
    warmup: bool = True
    # torch intra-op threads of the model thread (0 = torch's default, e.g. OMP_NUM_THREADS).
    threads: int = 0
    # Model instances (Triton's instance groups): copies of the teacher, each with its own
    # threads, spread round-robin over `devices` (default: the teacher's device); the batcher
    # feeds whichever is free. The fingerprint is the teacher's whatever the count.
    instances: int = 1
    devices: list[str] | None = None
    # uint8 inputs: x / 255, then (x - mean[c]) / std[c] over the first per-sample dim.
    mean: list[float] | None = None
    std: list[float] | None = None
    # What clients may see: white, features, scores or labels (teacher_server.access).
    access: str = "white"
    # Activation records file (``kd records``) served to data-free clients.
    records: str | None = None
    # The class map: a name per output index (reported by ListTeachers).
    class_names: list[str] | None = None
    # Gradient paths: samples per BatchNormLoss / InputGradient call, iterations per Synthesize,
    # and jobs waiting per job queue (BatchNormLoss and Synthesize run on a thread of their own).
    max_gradient_batch: int = 1024
    max_synthesis_iterations: int = 10_000
    max_jobs_queued: int = 8
    # Token teachers (kd.teacher_server.lm): positions per forward, padding included
    # (rows x longest row); a longer row is refused with INVALID_ARGUMENT.
    max_batch_tokens: int = 8192
    # Live weight updates (PublishWeights, kd.teacher_server.weights): off unless the operator says.
    accept_weights: bool = False
    # An upload that sends no chunk for this many seconds is dropped (DEADLINE_EXCEEDED), so a
    # stalled publisher cannot keep the teacher's one upload slot from the others.
    upload_idle_timeout_s: float = weights.UPLOAD_IDLE_TIMEOUT_S


# The first version's name, kept for callers that only set batching fields.
BatchingOptions = TeacherOptions


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    endpoints: dict[str, Endpoint]
    health: health.HealthServicer
    metrics: ServerMetrics
    metrics_port: int | None = None
    servicer: TeacherServicer | None = None
    _stopped: threading.Event = field(default_factory=threading.Event)

    def stop(self, grace: float | None = 5.0) -> None:
        """Drain: report NOT_SERVING, refuse new work with UNAVAILABLE (answered, not reset),
        finish accepted work, then stop gRPC and the batchers."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        if self.servicer is not None:
            # While gRPC still listens, new calls get an in-app UNAVAILABLE at once; only the
            # few that reach gRPC's core in the instant of server.stop can still be reset.
            self.servicer.draining.set()
            deadline = time.monotonic() + (grace if grace is not None else 30.0)
            while time.monotonic() < deadline and any(ep.busy() for ep in self.endpoints.values()):
                time.sleep(0.005)
        self.server.stop(grace).wait()
        for ep in self.endpoints.values():
            ep.close(timeout=grace)

    def accepted(self) -> tuple[int, int]:
        """(requests the batchers accepted since start, of those not answered yet): after a
        drain the second is 0, and the first is what the clients must have been answered."""
        batchers = [b for ep in self.endpoints.values() for b in (ep.batcher, *ep.all_vjp_batchers())]
        retired = sum(ep.vjp_retired_requests for ep in self.endpoints.values())
        return retired + sum(b.stats.requests for b in batchers), sum(b.unresolved for b in batchers)

    def wait(self) -> None:
        self.server.wait_for_termination()


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def model_instances(t: Teacher, instances: int = 1, devices: list[str] | None = None) -> list[Teacher]:
    """``instances`` copies of teacher ``t`` (the first is ``t`` itself where it is already on
    its device), placed round-robin on ``devices`` (default: ``t``'s device). Each copy has its
    own parameters on its device, so instances never share a module between threads."""
    if instances < 1:
        raise ValueError(f"teacher {t.name!r}: instances must be >= 1, got {instances}")
    try:
        places = [torch.device(d) for d in (devices or [str(t.device)])]
    except RuntimeError as e:
        raise ValueError(f"teacher {t.name!r}: bad device in {devices}: {e}") from None
    for d in places:
        if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
            raise ValueError(f"teacher {t.name!r}: device {d} is not available here")
    out = []
    for i in range(instances):
        place = places[i % len(places)]
        if i == 0 and place == t.device:
            out.append(t)
            continue
        out.append(dataclasses.replace(t, model=copy.deepcopy(t.model).to(place), device=place))
    return out


def _endpoint(t: Teacher, o: TeacherOptions, metrics: ServerMetrics) -> Endpoint:
    from kd.teacher_server import lm

    if lm.is_token_teacher(t):
        if o.accept_weights:
            raise ValueError(f"teacher {t.name!r}: live weight updates (accept_weights) serve classifier teachers only")
        return lm.token_endpoint(t, o, metrics)
    runners = [ModelRunner(inst, amp=o.amp, compile=o.compile, channels_last=o.channels_last, threads=o.threads)
               for inst in model_instances(t, o.instances, o.devices)]  # fmt: skip
    if o.accept_weights:  # forwards hold a lock and tag their rows with the weights' version
        runners = [weights.VersionedRunner(r) for r in runners]
    if o.warmup:
        for runner in runners:
            runner.warmup([1, *o.preferred_batch_sizes, o.max_batch_size])
    mean = std = None
    if (o.mean is None) != (o.std is None):
        raise ValueError(f"teacher {t.name!r}: give both mean and std for uint8 inputs, or neither")
    if o.mean is not None:
        mean, std = torch.tensor(o.mean, dtype=torch.float32), torch.tensor(o.std, dtype=torch.float32)
        channels = t.input_shape[0] if t.input_shape else 1
        if mean.numel() != channels or std.numel() != channels or bool((std <= 0).any()):
            raise ValueError(
                f"teacher {t.name!r}: mean/std need {channels} values (first input dim) and std > 0, "
                f"got mean={o.mean} std={o.std}"
            )
    batcher = DynamicBatcher(
        runners,
        max_batch_size=o.max_batch_size,
        preferred_batch_sizes=o.preferred_batch_sizes,
        max_queue_delay_s=o.max_queue_delay_us / 1e6,
        max_queue_size=o.max_queue_size,
        name=t.name,
        observer=metrics.batch_observer(t.name),
        on_queue_depth=metrics.depth_setter(t.name),
    )
    if o.class_names is not None and len(o.class_names) != t.num_classes:
        raise ValueError(f"teacher {t.name!r}: {len(o.class_names)} class_names for {t.num_classes} classes")
    records, records_dataset = None, ""
    if o.records:
        records, records_dataset = load_records(o.records, t)
    # The fingerprint clients and caches see covers every option that changes the targets.
    fp_options = dict(amp=o.amp, compile=o.compile, mean=o.mean, std=o.std)
    ep = Endpoint(t, batcher, mean, std, access=parse_access(o.access), records=records,
                  records_dataset=records_dataset, class_names=list(o.class_names or []),
                  fingerprint=target_fingerprint(t.weights_fingerprint, **fp_options),
                  target_options=target_options(**fp_options))  # fmt: skip
    return weights.enable(ep, runners, fp_options, o.upload_idle_timeout_s) if o.accept_weights else ep


def start_server(
    teachers: list[Teacher],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    batching: TeacherOptions | None = None,
    options: dict[str, TeacherOptions] | None = None,
    datasets: dict[str, SampleSource] | None = None,
    max_workers: int = 32,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    tls: TLSConfig | None = None,
    token: str | None = None,
    metrics_port: int | None = None,
    query_budget: int = 0,
    max_streams: int = 64,
    max_streams_per_client: int = 16,
    stream_window: int = 32,
    max_clients: int = 10_000,
    stream_idle_timeout_s: float = 300.0,
) -> RunningServer:
    """Start serving ``teachers`` on ``host:port`` (0 = any free port).

    ``options`` gives per-teacher options by name; ``batching`` the default for
    the others. ``datasets`` are registered for inputs by reference.

    Threads: ``max_workers`` handle unary calls and health checks; long-lived calls
    (InferStream, Synthesize) run on ``max_streams`` threads of their own, at most
    ``max_streams_per_client`` per client, so idle streams never take the unary
    calls' threads. Each stream has at most ``stream_window`` requests between read
    and answered. A stream with nothing in flight for ``stream_idle_timeout_s`` is closed, and
    at a limit an idle stream gives its place to a new one (``service.StreamSlots``); kd's
    clients reopen such a stream and resend. Query accounting keeps at most ``max_clients`` clients.
    """
    default = batching or TeacherOptions()
    options = options or {}
    names = [t.name for t in teachers]
    if len(set(names)) != len(names):
        raise ValueError(f"teacher names must be unique, got {names}")
    unknown = set(options) - set(names)
    if unknown:
        raise ValueError(f"options given for unknown teacher(s) {sorted(unknown)}")
    credentials = tls.server_credentials() if tls else None  # fail on bad files before any thread starts
    metrics = ServerMetrics()
    endpoints = {t.name: _endpoint(t, options.get(t.name, default), metrics) for t in teachers}
    for t in teachers:
        o, ep = options.get(t.name, default), endpoints[t.name]
        ep.max_gradient_batch, ep.max_jobs_queued = o.max_gradient_batch, o.max_jobs_queued
        ep.max_synthesis_iterations = o.max_synthesis_iterations
    server = grpc.server(
        # A thread per open stream beyond the unary workers; calls beyond the threads wait in a
        # bounded backlog (maximum_concurrent_rpcs) instead of an unbounded one.
        futures.ThreadPoolExecutor(max_workers=max_workers + max_streams, thread_name_prefix="grpc"),
        # grpc.so_reuseport off: gRPC sets SO_REUSEPORT by default, so a second server (another `kd serve`,
        # a test's restart on a port another process took meanwhile) bound a port already served without an
        # error, and the kernel split new connections between the two: clients were answered by a teacher
        # they never named. Now that bind fails ("cannot bind ...: in use").
        options=[*channel_options(max_message_bytes), ("grpc.so_reuseport", 0)],
        interceptors=[TokenInterceptor(token, on_deny=lambda: metrics.error("", "UNAUTHENTICATED"))] if token else [],
        maximum_concurrent_rpcs=4 * max_workers + max_streams,
    )
    accounting = Accounting(query_budget, on_charge=metrics.charged, max_clients=max_clients,
                            on_forget=metrics.forget_client)  # fmt: skip
    servicer = TeacherServicer(endpoints, datasets, metrics, accounting, max_message_bytes=max_message_bytes,
                               max_streams=max_streams, max_streams_per_client=max_streams_per_client,
                               stream_window=stream_window, stream_idle_timeout_s=stream_idle_timeout_s)  # fmt: skip
    add_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    # An IPv6 host in brackets ([::1]:PORT): gRPC read "::1:0" as host "::0.1.0.0", port 443, and refused it.
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:  # grpc >= 1.60 raises where older ones returned 0
        bound = 0
    if bound == 0:
        for ep in endpoints.values():
            ep.close(timeout=1)
        why = (
            "in use, not an address of this host, or the TLS certificate and key do not match"
            if tls
            else "in use, or not an address of this host"
        )
        raise OSError(f"cannot bind {address}: {why}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    bound_metrics = metrics.serve_http(metrics_port, host) if metrics_port is not None else None
    return RunningServer(server, bound, endpoints, health_servicer, metrics, bound_metrics, servicer)


def serve_until_signalled(running: RunningServer, grace: float = 30.0, signals: StopSignals | None = None) -> None:
    """Block until SIGTERM/SIGINT, then drain and return (the process exits 0). ``signals``:
    caught since before the server said it was ready (``StopSignals``; made here if None).
    During the drain a further SIGTERM is ignored and a further Ctrl-C exits at once."""
    signals = signals or StopSignals()
    try:
        signum = signals.wait()
    finally:
        signals.close()
    log.info("signal %s: draining (Ctrl-C again to exit at once)", signal.Signals(signum).name)
    running.stop(grace)
