"""Prometheus metrics of the teacher server (prometheus-client, own registry).

Mirrors Triton's: requests and samples accepted, forwards (their ratio is the
mean batch size), a batch-size histogram, queue depth, queue wait and compute
time, errors by gRPC code.
"""

from __future__ import annotations

import threading
from typing import Any

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
        self.instance_forwards = Counter(
            "kd_instance_forwards", "Batched forwards run per model instance (kd serve --instances)",
            ["teacher", "instance"], registry=r,
        )  # fmt: skip
        self.reply_bytes = Counter(
            "kd_reply_bytes", "Output tensor bytes sent in Infer replies (top-k instead of logits: fewer)",
            ["teacher"], registry=r,
        )  # fmt: skip
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

        # Token teachers (kd.teacher_server.lm): positions computed in forwards, padding included,
        # and those that were padding; kd_padding_share = padded / computed so far.
        self.token_positions = Counter(
            "kd_token_positions", "Positions computed by token forwards, padding included", ["teacher"], registry=r
        )
        self.padding_positions = Counter(
            "kd_padding_positions", "Padded positions computed by token forwards", ["teacher"], registry=r
        )
        self.padding_share = Gauge(
            "kd_padding_share", "Share of padded positions in the token forwards so far", ["teacher"], registry=r
        )
        # Labelled children by label values: ``labels()`` costs a few microseconds a call (a lock,
        # a tuple, a dict), several times per request on the unary path.
        # Made and forgotten under a lock, so a forgotten client's removed series is never cached.
        self._children: dict[tuple, Any] = {}
        self._children_lock = threading.Lock()

    def _child(self, metric, *values: str):
        key = (id(metric), *values)
        child = self._children.get(key)
        if child is None:
            with self._children_lock:
                child = self._children[key] = metric.labels(*values)
        return child

    def token_observer(self, teacher: str):
        """``on_tokens(real, computed)`` of a token batcher: the padding counters and share."""
        total, padded, share = (m.labels(teacher) for m in (self.token_positions, self.padding_positions,
                                                            self.padding_share))  # fmt: skip
        sums = [0, 0]

        def observe(real: int, computed: int) -> None:
            total.inc(computed)
            padded.inc(computed - real)
            sums[0] += real
            sums[1] += computed
            share.set(1.0 - sums[0] / sums[1] if sums[1] else 0.0)

        return observe

    def charged(self, client: str, kind: str, n: int) -> None:
        self._child(self.client_queries, client, kind).inc(n)

    def forget_client(self, client: str) -> None:
        """Drop a client's series (accounting forgot it): /metrics stays bounded."""
        with self._children_lock:
            for kind in ("samples", "gradient_samples"):
                self._children.pop((id(self.client_queries), client, kind), None)
                try:
                    self.client_queries.remove(client, kind)
                except KeyError:
                    pass

    def accepted(self, teacher: str, samples: int) -> None:
        self._child(self.requests, teacher).inc()
        self._child(self.samples, teacher).inc(samples)

    def replied(self, teacher: str, nbytes: int) -> None:
        self._child(self.reply_bytes, teacher).inc(nbytes)

    def error(self, teacher: str, code: str) -> None:
        self._child(self.errors, teacher, code).inc()

    def batch_observer(self, teacher: str):
        forwards, size = self.forwards.labels(teacher), self.batch_size.labels(teacher)
        wait, compute = self.queue_wait.labels(teacher), self.compute.labels(teacher)

        instances: dict[int, Counter] = {}

        def observe(obs: BatchObservation) -> None:
            forwards.inc()
            per = instances.get(obs.instance)
            if per is None:
                per = instances[obs.instance] = self.instance_forwards.labels(teacher, str(obs.instance))
            per.inc()
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
