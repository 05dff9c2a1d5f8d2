"""The batcher's inline path: a unary caller that finds the model idle and nothing queued runs
its forward on its own thread (no hand-off), and forwards still never overlap."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from kd.teacher_server.batcher import LONE_AFTER, DynamicBatcher


class Recorder:
    """x * 2, recording which thread ran each forward and how many ran at once."""

    def __init__(self, delay: float = 0.0) -> None:
        self.threads: list[str] = []
        self.running = 0
        self.most = 0
        self.delay = delay
        self._lock = threading.Lock()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.threads.append(threading.current_thread().name)
        time.sleep(self.delay)
        with self._lock:
            self.running -= 1
        return x * 2


def closed_loop(b: DynamicBatcher, callers: int, rounds: int) -> None:
    """``callers`` threads started together, each sending ``rounds`` one-row requests in turn
    (waiting for each answer), every answer checked here (a thread's assert would be lost)."""
    barrier = threading.Barrier(callers)
    wrong: list[tuple[int, int]] = []

    def caller(i: int) -> None:
        barrier.wait()
        for j in range(rounds):
            x = torch.full((1, 3), float(i * 100 + j))
            if not torch.equal(b.submit(x, waits=True).result(timeout=30), x * 2):
                wrong.append((i, j))

    threads = [threading.Thread(target=caller, args=(i,), name=f"caller-{i}") for i in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not wrong and not any(t.is_alive() for t in threads), wrong


def test_a_waiting_caller_on_an_idle_model_runs_its_forward_itself() -> None:
    rec = Recorder()
    b = DynamicBatcher(rec, max_batch_size=8, max_queue_delay_s=0.0, name="i")
    assert b.inline
    f = b.submit(torch.ones(3, 2), waits=True)
    assert f.done() and torch.equal(f.result(), torch.full((3, 2), 2.0))
    assert rec.threads == [threading.current_thread().name]
    queued = b.submit(torch.ones(2, 2))  # a caller that does not wait: the model thread, as before
    assert torch.equal(queued.result(timeout=10), torch.full((2, 2), 2.0))
    too_big = b.submit(torch.ones(20, 2), waits=True)  # over max_batch_size: split by the model thread
    assert torch.equal(too_big.result(timeout=10), torch.full((20, 2), 2.0))
    b.close()
    assert rec.threads[1:] == ["model-i"] * 4 and b.stats.forwards == 5 and b.stats.requests == 3


@pytest.mark.serial
def test_a_lone_caller_never_waits_the_queue_delay() -> None:
    # A 0.5 s delay, and a caller alone: no company is coming, so nothing waits for it. Its
    # waiting requests run inline; one that does not wait goes to the model thread at once.
    rec = Recorder()
    b = DynamicBatcher(rec, max_batch_size=8, max_queue_delay_s=0.5, name="d")
    t0 = time.monotonic()
    for i in range(10):
        f = b.submit(torch.full((2, 2), float(i)), waits=True)
        assert f.done() and torch.equal(f.result(), torch.full((2, 2), 2.0 * i))
    assert rec.threads == [threading.current_thread().name] * 10
    for _ in range(3):
        assert torch.equal(b.submit(torch.ones(1, 2)).result(timeout=10), torch.full((1, 2), 2.0))
    assert time.monotonic() - t0 < 0.5 * 3, "a lone caller waited the queue delay"
    b.close()
    assert rec.threads[10:] == ["model-d"] * 3


def test_closed_loop_callers_of_a_fixed_cost_forward_still_wait_for_each_other() -> None:
    # Four callers, one row each, a forward of fixed cost that releases the GIL (as a GPU's):
    # when a batch is answered the first caller back finds the queue empty. It must wait (the
    # last batch had company) for the other three instead of running alone, which would split
    # every cycle into a forward of one and one of three.
    rec = Recorder(delay=0.02)
    b = DynamicBatcher(rec, max_batch_size=4, max_queue_delay_s=0.2, name="c")
    closed_loop(b, callers=4, rounds=8)
    sizes = list(b.stats.batch_sizes)
    assert sum(sizes) == 32 and rec.most == 1
    # The first forward may run alone (nothing overlapped yet); then full batches of 4, not a
    # forward of one and one of three per cycle (16 forwards, none of 4).
    assert len(sizes) <= 10 and sizes.count(4) >= 6, sizes
    # The company has gone: a lone caller's requests wait the delay (on the model thread) until
    # LONE_AFTER batches in a row held only it, then run inline at once.
    for _ in range(LONE_AFTER + 3):
        b.submit(torch.ones(1, 3), waits=True).result(timeout=10)
    b.close()
    me = threading.current_thread().name
    assert rec.threads[-(LONE_AFTER + 3) :] == ["model-c"] * (LONE_AFTER + 1) + [me] * 2, rec.threads


def test_inline_and_queued_forwards_never_overlap_and_every_caller_gets_its_rows() -> None:
    rec = Recorder(delay=0.002)
    b = DynamicBatcher(rec, max_batch_size=64, max_queue_delay_s=0.0, name="m")
    results: dict[int, bool] = {}

    def caller(i: int) -> None:
        for j in range(15):
            x = torch.full((1 + (i + j) % 4, 3), float(i * 100 + j))
            results[i * 100 + j] = torch.equal(b.submit(x, waits=True).result(timeout=30), x * 2)

    threads = [threading.Thread(target=caller, args=(i,), name=f"caller-{i}") for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    b.close()
    assert len(results) == 90 and all(results.values())
    assert rec.most == 1, "two forwards ran at once"
    assert b.stats.samples == sum(1 + (i + j) % 4 for i in range(6) for j in range(15))
    assert any(name.startswith("caller-") for name in rec.threads)


def test_an_inline_answer_is_accounted_and_observed_like_a_batch_of_one() -> None:
    """Requests, forwards, samples, batch sizes, the observer's report, and the unresolved count a
    drain waits on: the same as the model thread keeps, for answers, errors and expired deadlines."""
    from kd.teacher_server.batcher import BatchObservation, DeadlineExpiredError, QueueFullError

    seen: list[BatchObservation] = []

    def model(x: torch.Tensor) -> torch.Tensor:
        if x[0, 0] < 0:
            raise ArithmeticError("negative input")
        return x * 2

    b = DynamicBatcher(model, max_batch_size=8, max_queue_delay_s=0.0, max_queue_size=6, name="a",
                       observer=seen.append)  # fmt: skip
    f = b.submit(torch.ones(3, 2), waits=True)
    assert f.done() and not f.cancelled() and f.exception() is None and not f.cancel()
    assert torch.equal(f.result(), torch.full((3, 2), 2.0))
    called: list[object] = []
    f.add_done_callback(called.append)  # done already: called at once, as a Future does
    assert called == [f]
    assert (b.stats.requests, b.stats.forwards, b.stats.samples, list(b.stats.batch_sizes)) == (1, 1, 3, [3])
    assert b.stats.instance_forwards == [1] and b.unresolved == 0
    assert len(seen) == 1 and seen[0].size == 3 and seen[0].instance == 0
    assert len(seen[0].queue_waits) == 1 and 0 <= seen[0].queue_waits[0] < 1 and seen[0].compute_seconds >= 0

    bad = b.submit(-torch.ones(2, 2), waits=True)  # the forward's error is this request's, then the path is free
    assert bad.done() and isinstance(bad.exception(), ArithmeticError)
    with pytest.raises(ArithmeticError, match="negative input"):
        bad.result()
    assert b.unresolved == 0 and b.stats.forwards == 1

    late = b.submit(torch.ones(1, 2), waits=True, deadline=time.monotonic() - 1)
    assert isinstance(late.exception(), DeadlineExpiredError) and b.stats.expired == 1 and b.unresolved == 0

    with pytest.raises(QueueFullError):  # admission is checked before the inline path, as for a queued request
        b.submit(torch.ones(7, 2), waits=True)
    assert b.unresolved == 0 and b.stats.rejected == 1

    g = b.submit(torch.full((2, 2), 3.0), waits=True)  # still inline: nothing was left busy
    assert torch.equal(g.result(), torch.full((2, 2), 6.0))
    assert (b.stats.requests, b.stats.forwards, b.stats.samples) == (4, 2, 5) and len(seen) == 2
    b.close(timeout=10)
    assert b.unresolved == 0


def test_an_observer_that_fails_fails_the_request_not_the_batcher() -> None:
    def observer(_obs: object) -> None:
        raise RuntimeError("metrics down")

    b = DynamicBatcher(lambda x: x + 1, max_batch_size=8, max_queue_delay_s=0.0, name="o", observer=observer)
    f = b.submit(torch.zeros(2, 2), waits=True)
    assert isinstance(f.exception(), RuntimeError) and b.unresolved == 0
    queued = b.submit(torch.zeros(1, 2))  # the model thread's path answers the same way
    assert isinstance(queued.exception(timeout=10), RuntimeError)
    b.close(timeout=10)


def test_a_post_processing_error_inline_still_counts_and_observes_the_forward() -> None:
    """As on the model thread: the forward ran (and cost compute), so it is counted and observed;
    the error is this request's (e.g. NaN outputs refused as OUT_OF_RANGE by the service)."""
    seen: list[object] = []

    def refuse(_out: torch.Tensor) -> torch.Tensor:
        raise OverflowError("outputs out of range")

    for waits in (True, False):  # inline, then the model thread: the same accounting
        b = DynamicBatcher(lambda x: x * 2, max_batch_size=8, max_queue_delay_s=0.0, name=f"p{waits}",
                           observer=seen.append)  # fmt: skip
        f = b.submit(torch.ones(3, 2), waits=waits, post=refuse)
        assert isinstance(f.exception(timeout=10), OverflowError)
        b.close(timeout=10)
        assert (b.stats.forwards, b.stats.samples, list(b.stats.batch_sizes)) == (1, 3, [3]), waits
        assert b.unresolved == 0
    assert [o.size for o in seen] == [3, 3]


def test_a_bad_layers_argument_leaves_nothing_admitted_or_busy() -> None:
    b = DynamicBatcher(lambda x: x * 2, max_batch_size=8, max_queue_delay_s=0.0, name="l")
    with pytest.raises(TypeError):
        b.submit(torch.ones(1, 2), waits=True, layers=[["not", "hashable"]])
    assert b.unresolved == 0 and b.stats.requests == 0
    assert torch.equal(b.submit(torch.ones(1, 2)).result(timeout=10), torch.full((1, 2), 2.0))  # the model thread
    f = b.submit(torch.ones(1, 2), waits=True)
    assert f.done() and torch.equal(f.result(), torch.full((1, 2), 2.0))  # and inline again
    b.close(timeout=10)


def test_a_failing_done_callback_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    b = DynamicBatcher(lambda x: x, max_batch_size=8, max_queue_delay_s=0.0, name="c")
    f = b.submit(torch.ones(1, 2), waits=True)

    def bad(_f: object) -> None:
        raise ValueError("callback bug")

    f.add_done_callback(bad)  # as a done Future: called at once, its error logged
    assert "callback bug" in caplog.text
    b.close(timeout=10)


def test_a_request_that_overlaps_a_lone_callers_forward_waits_for_company() -> None:
    # A lone caller in its steady state (inline, no waiting). A second caller submits while the
    # first one's inline forward runs: that overlap means company, so the second request waits
    # the delay (from the end of the forward) and joins the first caller's next request.
    gate, entered = threading.Event(), threading.Event()
    rec = Recorder()
    hold = {"on": False}

    def forward(x: torch.Tensor) -> torch.Tensor:
        if hold["on"]:
            hold["on"] = False
            entered.set()
            gate.wait(10)
        return rec(x)

    b = DynamicBatcher(forward, max_batch_size=2, max_queue_delay_s=5.0, name="o")
    for _ in range(LONE_AFTER + 1):  # lone: inline on this thread
        b.submit(torch.ones(1, 2), waits=True)
    me = threading.current_thread().name
    assert rec.threads == [me] * (LONE_AFTER + 1)
    hold["on"] = True
    other: list = []
    first = threading.Thread(target=lambda: other.append(b.submit(torch.ones(1, 2), waits=True)), name="first")
    first.start()
    assert entered.wait(10)  # the first caller's inline forward is running
    second = b.submit(torch.full((1, 2), 3.0))  # overlaps it
    gate.set()
    first.join(10)
    assert not second.done()  # waiting for company (5 s), not run alone at once
    nxt = b.submit(torch.full((1, 2), 4.0), waits=True)  # the first caller's next request joins it
    assert torch.equal(nxt.result(timeout=10), torch.full((1, 2), 8.0))
    assert torch.equal(second.result(timeout=10), torch.full((1, 2), 6.0))
    b.close()
    assert b.stats.batch_sizes[-1] == 2 and rec.threads[-1] == "model-o"


def test_two_closed_loop_callers_started_together_batch_together() -> None:
    # The first request of an idle batcher runs inline; the second queues behind it. Were the
    # delay counted from its arrival, it would have expired by the end of that forward and the
    # two callers would alternate in batches of one for good; counted from the end of the
    # forward, the first caller is back in time and they merge.
    rec = Recorder(delay=0.03)  # a forward longer than the delay, as a GPU's under a 2 ms delay
    b = DynamicBatcher(rec, max_batch_size=2, max_queue_delay_s=0.01, name="p")
    closed_loop(b, callers=2, rounds=10)
    b.close()
    sizes = list(b.stats.batch_sizes)
    assert sum(sizes) == 20 and sizes.count(2) >= 6, sizes  # alternating: 20 batches of one
