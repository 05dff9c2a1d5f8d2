"""Prometheus metrics of the teacher server (prometheus-client, own registry).

Mirrors Triton's: requests and samples accepted, forwards (their ratio is the
mean batch size), a batch-size histogram, queue depth, queue wait and compute
time, errors by gRPC code.
"""

from __future__ import annotations

import bisect
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from kd.teacher_server.batcher import BatchObservation

_TIME_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class _ThreadEnd:
    """Lives in one thread's locals; its finalizer runs when the thread ends."""

    __slots__ = ("__weakref__",)


class Tally(Collector):
    """The request path's counters and histograms (``kd_requests``, ``kd_samples``,
    ``kd_reply_bytes``, ``kd_forwards``, ``kd_instance_forwards``, ``kd_batch_size``,
    ``kd_queue_wait_seconds``, ``kd_compute_seconds``), exposed as prometheus-client's own
    would be, but added to without a lock.

    A prometheus-client update takes a lock and a few Python calls (~2.5 us); a batch-1 request
    made 12, ~13% of its server CPU. Here each thread adds to a dict of its own (one writer per
    dict, so no update is lost) and a scrape sums every thread's dicts, each copied in one C
    call (``dict.copy`` under the GIL: never seen half-updated)."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._dicts: dict[int, dict] = {}  # the live threads' dicts, by id
        self._retired: dict = {}  # the totals of threads that have ended (stream readers come and go)
        self._lock = threading.Lock()
        # name -> (help, label names, bucket bounds or None for a counter)
        self._kinds: dict[str, tuple[str, tuple[str, ...], tuple[float, ...] | None]] = {}
        self._series: dict[str, dict[tuple[str, ...], float]] = {}  # name -> labels -> created

    def counter(self, name: str, documentation: str, labels: tuple[str, ...]) -> None:
        self._kinds[name] = (documentation, labels, None)
        self._series[name] = {}

    def histogram(self, name: str, documentation: str, labels: tuple[str, ...], buckets: tuple[float, ...]) -> None:
        self._kinds[name] = (documentation, labels, tuple(float(b) for b in buckets))
        self._series[name] = {}

    def series(self, name: str, *labels: str) -> None:
        """Expose ``name{labels}`` from now on (at 0 until added to), as ``labels()`` does."""
        with self._lock:
            self._series[name].setdefault(labels, time.time())

    def mine(self) -> dict:
        """This thread's dict of totals: key -> amount (add to it; never read another's)."""
        d = self._local.__dict__.get("d")
        if d is None:
            d = self._local.d = {}
            # Dropped with the thread's locals when the thread ends: its totals are kept then.
            self._local.end = _ThreadEnd()
            weakref.finalize(self._local.end, self._retire, d)
            with self._lock:
                self._dicts[id(d)] = d
        return d

    def _retire(self, d: dict) -> None:
        with self._lock:
            self._dicts.pop(id(d), None)
            for key, v in d.items():  # its thread has ended: nobody writes to it any more
                self._retired[key] = self._retired.get(key, 0) + v

    def add(self, key: tuple, amount: float = 1.0) -> None:
        """Counter ``key`` = (name, *label values) += amount."""
        d = self.mine()
        d[key] = d.get(key, 0.0) + amount

    def value(self, name: str, *labels: str) -> float:
        """A counter's total now (what a scrape would show)."""
        return self._totals().get((name, *labels), 0.0)

    def _totals(self) -> dict:
        # Under the lock, so a thread retiring meanwhile is counted once, not twice or never.
        with self._lock:
            totals = dict(self._retired)
            for d in self._dicts.values():
                for key, v in d.copy().items():
                    totals[key] = totals.get(key, 0) + v
        return totals

    def collect(self) -> Iterator[Metric]:
        totals = self._totals()
        with self._lock:
            series = {name: dict(s) for name, s in self._series.items()}
        seen: dict[str, set] = {name: set() for name in self._kinds}
        for key in totals:  # series added to without series(): exposed as well
            name = key[0]
            if name in seen:
                seen[name].add(key[1] if isinstance(key[1], tuple) else key[1:])
        now = time.time()
        for name, (doc, label_names, bounds) in self._kinds.items():
            all_labels = sorted(set(series[name]) | seen[name])
            if bounds is None:
                fam = CounterMetricFamily(name, doc, labels=label_names)
                for labels in all_labels:
                    fam.add_metric(labels, totals.get((name, *labels), 0.0), created=series[name].get(labels, now))
            else:
                fam = HistogramMetricFamily(name, doc, labels=label_names)
                for labels in all_labels:
                    cumulative, buckets = 0, []
                    for i, bound in enumerate((*bounds, float("inf"))):
                        cumulative += totals.get((name, labels, i), 0)
                        buckets.append((floatToGoString(bound), cumulative))
                    fam.add_metric(labels, buckets, totals.get((name, labels, "sum"), 0.0))
            yield fam


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # The request path's metrics, one or more updates per request: a Tally (lock-free).
        self.tally = t = Tally()
        t.counter("kd_requests", "Inference requests accepted into a queue", ("teacher",))
        t.counter("kd_samples", "Samples accepted into a queue", ("teacher",))
        t.counter("kd_forwards", "Batched forwards run", ("teacher",))
        t.counter("kd_instance_forwards", "Batched forwards run per model instance (kd serve --instances)",
                  ("teacher", "instance"))  # fmt: skip
        t.counter("kd_reply_bytes", "Output tensor bytes sent in Infer replies (top-k instead of logits: fewer)",
                  ("teacher",))  # fmt: skip
        t.histogram("kd_batch_size", "Samples per forward", ("teacher",), _SIZE_BUCKETS)
        t.histogram("kd_queue_wait_seconds", "Time a request waited before its forward", ("teacher",), _TIME_BUCKETS)
        t.histogram("kd_compute_seconds", "Forward plus copy-back time per batch", ("teacher",), _TIME_BUCKETS)
        r.register(t)
        self._size_bounds = tuple(float(b) for b in _SIZE_BUCKETS)
        self._time_bounds = tuple(float(b) for b in _TIME_BUCKETS)
        self.queue_depth = Gauge("kd_queue_depth", "Samples waiting in the queue", ["teacher"], registry=r)
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
        self.tally.add(("kd_requests", teacher))
        self.tally.add(("kd_samples", teacher), samples)

    def replied(self, teacher: str, nbytes: int) -> None:
        self.tally.add(("kd_reply_bytes", teacher), nbytes)

    def reply_bytes(self, teacher: str) -> float:
        """``kd_reply_bytes_total`` of ``teacher`` now."""
        return self.tally.value("kd_reply_bytes", teacher)

    def error(self, teacher: str, code: str) -> None:
        self._child(self.errors, teacher, code).inc()

    def batch_observer(self, teacher: str):
        t, labels = self.tally, (teacher,)
        for name in ("kd_requests", "kd_samples", "kd_forwards", "kd_reply_bytes", "kd_batch_size",
                     "kd_queue_wait_seconds", "kd_compute_seconds"):  # fmt: skip
            t.series(name, teacher)
        forwards, sizes, times = ("kd_forwards", teacher), self._size_bounds, self._time_bounds
        instances: dict[int, tuple] = {}

        size_keys = [("kd_batch_size", labels, i) for i in range(len(sizes) + 1)]
        compute_keys = [("kd_compute_seconds", labels, i) for i in range(len(times) + 1)]
        wait_keys = [("kd_queue_wait_seconds", labels, i) for i in range(len(times) + 1)]
        size_sum, compute_sum, wait_sum = (("kd_batch_size", labels, "sum"), ("kd_compute_seconds", labels, "sum"),
                                           ("kd_queue_wait_seconds", labels, "sum"))  # fmt: skip
        find = bisect.bisect_left  # le: the first bound >= the value

        def observe(obs: BatchObservation) -> None:
            per = instances.get(obs.instance)
            if per is None:
                per = instances[obs.instance] = ("kd_instance_forwards", teacher, str(obs.instance))
                t.series(*per)
            d = t.mine()  # this thread's: the histograms' updates inline (~5 us a batch otherwise)
            d[forwards] = d.get(forwards, 0.0) + 1
            d[per] = d.get(per, 0.0) + 1
            key = size_keys[find(sizes, obs.size)]
            d[key] = d.get(key, 0) + 1
            d[size_sum] = d.get(size_sum, 0.0) + obs.size
            key = compute_keys[find(times, obs.compute_seconds)]
            d[key] = d.get(key, 0) + 1
            d[compute_sum] = d.get(compute_sum, 0.0) + obs.compute_seconds
            for w in obs.queue_waits:
                key = wait_keys[find(times, w)]
                d[key] = d.get(key, 0) + 1
                d[wait_sum] = d.get(wait_sum, 0.0) + w

        return observe

    def depth_setter(self, teacher: str):
        return self.queue_depth.labels(teacher).set

    def serve_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Expose /metrics over HTTP; returns the bound port (0 picks one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port
