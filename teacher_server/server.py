"""Wire teachers, batchers and the servicer into a ``grpc.Server``.

The server also speaks the standard gRPC health protocol (grpc.health.v1)
and server reflection, so grpcurl or any language's client can discover it.
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kd.v1 import teacher_pb2 as pb
from kd.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.batcher import DynamicBatcher
from teacher_server.loading import Teacher
from teacher_server.runner import ModelRunner
from teacher_server.service import Endpoint, TeacherServicer

log = logging.getLogger("kd.serve")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TeacherService"].full_name
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


@dataclass
class BatchingOptions:
    max_batch_size: int = 256
    max_queue_delay_us: int = 2000
    max_queue_size: int = 0  # samples; 0 = unbounded
    amp: str = "fp32"


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    endpoints: dict[str, Endpoint]
    health: health.HealthServicer
    _stopped: threading.Event = field(default_factory=threading.Event)

    def stop(self, grace: float | None = 5.0) -> None:
        """Drain: report NOT_SERVING, refuse new RPCs, finish queued work, stop batchers."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        for ep in self.endpoints.values():
            ep.batcher.close(timeout=grace)

    def wait(self) -> None:
        self.server.wait_for_termination()


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def start_server(
    teachers: list[Teacher],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    batching: BatchingOptions | None = None,
    max_workers: int = 32,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> RunningServer:
    """Start serving ``teachers`` on ``host:port`` (0 = any free port)."""
    batching = batching or BatchingOptions()
    names = [t.name for t in teachers]
    if len(set(names)) != len(names):
        raise ValueError(f"teacher names must be unique, got {names}")
    endpoints = {
        t.name: Endpoint(
            t,
            DynamicBatcher(
                ModelRunner(t, amp=batching.amp),
                max_batch_size=batching.max_batch_size,
                max_queue_delay_s=batching.max_queue_delay_us / 1e6,
                max_queue_size=batching.max_queue_size,
                name=t.name,
            ),
        )
        for t in teachers
    }
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        options=channel_options(max_message_bytes),
    )
    pb_grpc.add_TeacherServiceServicer_to_server(TeacherServicer(endpoints), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, bound, endpoints, health_servicer)


def serve_until_signalled(running: RunningServer, grace: float = 30.0) -> None:
    """Block until SIGTERM/SIGINT, then drain and return (the process exits 0)."""
    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        log.info("signal %s: draining", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop.wait()
    running.stop(grace)
