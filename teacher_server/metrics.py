"""Prometheus metrics of the teacher server (prometheus-client, own registry).

Mirrors Triton's: requests and samples accepted, forwards (their ratio is the
mean batch size), a batch-size histogram, queue depth, queue wait and compute
time, errors by gRPC code.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from kd.teacher_server.batcher import BatchObservation

_TIME_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("kd_requests", "Inference requests accepted into a queue", ["teacher"], registry=r)
        self.samples = Counter("kd_samples", "Samples accepted into a queue", ["teacher"], registry=r)
        self.forwards = Counter("kd_forwards", "Batched forwards run", ["teacher"], registry=r)
        self.batch_size = Histogram(
            "kd_batch_size", "Samples per forward", ["teacher"], buckets=_SIZE_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("kd_queue_depth", "Samples waiting in the queue", ["teacher"], registry=r)
        self.queue_wait = Histogram(
            "kd_queue_wait_seconds", "Time a request waited before its forward", ["teacher"],
            buckets=_TIME_BUCKETS, registry=r,
        )  # fmt: skip
        self.compute = Histogram(
            "kd_compute_seconds", "Forward plus copy-back time per batch", ["teacher"],
            buckets=_TIME_BUCKETS, registry=r,
        )  # fmt: skip
        self.errors = Counter("kd_errors", "Refused or failed requests by gRPC code", ["teacher", "code"], registry=r)
        self.streams_open = Gauge("kd_streams_open", "Open InferStream and Synthesize calls", registry=r)
        self.client_queries = Counter(
            "kd_client_queries", "Samples (kind=samples) and gradient samples answered per client",
            ["client", "kind"], registry=r,
        )  # fmt: skip

    def charged(self, client: str, kind: str, n: int) -> None:
        self.client_queries.labels(client, kind).inc(n)

    def forget_client(self, client: str) -> None:
        """Drop a client's series (accounting forgot it): /metrics stays bounded."""
        for kind in ("samples", "gradient_samples"):
            try:
                self.client_queries.remove(client, kind)
            except KeyError:
                pass

    def accepted(self, teacher: str, samples: int) -> None:
        self.requests.labels(teacher).inc()
        self.samples.labels(teacher).inc(samples)

    def error(self, teacher: str, code: str) -> None:
        self.errors.labels(teacher, code).inc()

    def batch_observer(self, teacher: str):
        forwards, size = self.forwards.labels(teacher), self.batch_size.labels(teacher)
        wait, compute = self.queue_wait.labels(teacher), self.compute.labels(teacher)

        def observe(obs: BatchObservation) -> None:
            forwards.inc()
            size.observe(obs.size)
            compute.observe(obs.compute_seconds)
            for w in obs.queue_waits:
                wait.observe(w)

        return observe

    def depth_setter(self, teacher: str):
        return self.queue_depth.labels(teacher).set

    def serve_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Expose /metrics over HTTP; returns the bound port (0 picks one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port
