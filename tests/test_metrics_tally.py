"""The request path's metrics (``kd.teacher_server.metrics.Tally``): lock-free per-thread
totals exposed exactly as prometheus-client's own Counter and Histogram expose the same
updates, exact under concurrent writers and scrapes, and kept when a thread ends."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from kd.teacher_server.batcher import BatchObservation
from kd.teacher_server.metrics import _SIZE_BUCKETS, _TIME_BUCKETS, ServerMetrics


def _lines(registry: CollectorRegistry, names: tuple[str, ...]) -> list[str]:
    text = generate_latest(registry).decode()
    keep = [line for line in text.splitlines() if any(n in line for n in names) and "_created" not in line]
    return sorted(keep)


def test_exposition_is_prometheus_clients_own_for_the_same_updates() -> None:
    m = ServerMetrics()
    observe = m.batch_observer("t")
    ref = CollectorRegistry()
    requests = Counter("kd_requests", "Inference requests accepted into a queue", ["teacher"], registry=ref)
    samples = Counter("kd_samples", "Samples accepted into a queue", ["teacher"], registry=ref)
    forwards = Counter("kd_forwards", "Batched forwards run", ["teacher"], registry=ref)
    per = Counter("kd_instance_forwards", "Batched forwards run per model instance (kd serve --instances)",
                  ["teacher", "instance"], registry=ref)  # fmt: skip
    reply = Counter("kd_reply_bytes", "Output tensor bytes sent in Infer replies (top-k instead of logits: fewer)",
                    ["teacher"], registry=ref)  # fmt: skip
    size = Histogram("kd_batch_size", "Samples per forward", ["teacher"], buckets=_SIZE_BUCKETS, registry=ref)
    wait = Histogram("kd_queue_wait_seconds", "Time a request waited before its forward", ["teacher"],
                     buckets=_TIME_BUCKETS, registry=ref)  # fmt: skip
    compute = Histogram("kd_compute_seconds", "Forward plus copy-back time per batch", ["teacher"],
                        buckets=_TIME_BUCKETS, registry=ref)  # fmt: skip
    for metric in (requests, samples, forwards, reply, size, wait, compute):
        metric.labels("t")  # the series exist at 0 before any update, as batch_observer makes them
    # Values on bucket bounds (le is <=), between them, past the last one.
    batches = [(1, [0.0001, 0.002], 0.0005, 0), (4, [0.00011], 0.01, 1), (64, [5.0, 7.5], 0.3, 0),
               (5000, [0.0], 6.0, 1), (2, [], 0.002, 0)]  # fmt: skip
    for n, waits, seconds, instance in batches:
        m.accepted("t", n)
        requests.labels("t").inc()
        samples.labels("t").inc(n)
        m.replied("t", 40 * n)
        reply.labels("t").inc(40 * n)
        observe(BatchObservation(n, waits, seconds, instance))
        forwards.labels("t").inc()
        per.labels("t", str(instance)).inc()
        size.labels("t").observe(n)
        compute.labels("t").observe(seconds)
        for w in waits:
            wait.labels("t").observe(w)
    names = ("kd_requests", "kd_samples", "kd_forwards", "kd_instance_forwards", "kd_reply_bytes", "kd_batch_size",
             "kd_queue_wait_seconds", "kd_compute_seconds")  # fmt: skip
    got, want = _lines(m.registry, names), _lines(ref, names)
    assert got == want
    assert 'kd_batch_size_bucket{le="64.0",teacher="t"} 4.0' in got  # the check reads real buckets
    assert m.reply_bytes("t") == 40 * sum(b[0] for b in batches)


def test_totals_are_exact_under_concurrent_writers_scrapes_and_ending_threads() -> None:
    m = ServerMetrics()
    observe = m.batch_observer("t")
    writers, per_writer = 6, 3000
    seen: list[float] = []
    stop = threading.Event()

    def scrape() -> None:
        while not stop.is_set():
            seen.append(m.tally.value("kd_requests", "t"))

    def write() -> None:
        for _ in range(per_writer):
            m.accepted("t", 2)
            observe(BatchObservation(2, [0.001], 0.001, 0))

    def short_lived() -> None:  # a stream reader: a thread that ends after a few requests
        for _ in range(10):
            m.accepted("t", 1)

    reader = threading.Thread(target=scrape)
    reader.start()
    threads = [threading.Thread(target=write) for _ in range(writers)]
    threads += [threading.Thread(target=short_lived) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    reader.join()
    del threads, t
    requests = writers * per_writer + 200 * 10
    assert m.tally.value("kd_requests", "t") == requests
    assert m.tally.value("kd_samples", "t") == 2 * writers * per_writer + 200 * 10
    assert m.tally.value("kd_forwards", "t") == writers * per_writer
    assert all(a <= b for a, b in zip(seen, seen[1:])), "a counter went down between scrapes"
    # The ended threads' totals were kept and their dicts let go (only this thread's may remain).
    assert len(m.tally._dicts) <= 1
    text = generate_latest(m.registry).decode()
    assert f'kd_batch_size_count{{teacher="t"}} {float(writers * per_writer)}' in text
    assert f'kd_queue_wait_seconds_bucket{{le="0.001",teacher="t"}} {float(writers * per_writer)}' in text
