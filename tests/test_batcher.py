"""The dynamic batcher on its own: merging, splitting, queue bound, errors, drain."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from kd.teacher_server.batcher import BatcherClosedError, DeadlineExpiredError, DynamicBatcher, QueueFullError


class RecordingForward:
    """A real computation (a fixed linear map) that records each batch size it ran."""

    def __init__(self, delay: float = 0.0) -> None:
        torch.manual_seed(0)
        self.w = torch.randn(8, 5)
        self.sizes: list[int] = []
        self.threads: set[str] = set()
        self.delay = delay

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(int(x.shape[0]))
        self.threads.add(threading.current_thread().name)
        if self.delay:
            time.sleep(self.delay)
        return x @ self.w


def test_concurrent_requests_are_merged_and_split_back_exactly() -> None:
    fwd = RecordingForward(delay=0.1)  # the first request runs at once (no company yet): the rest queue behind it
    b = DynamicBatcher(fwd, max_batch_size=64, max_queue_delay_s=0.05, name="t")
    inputs = [torch.randn(n, 8) for n in (3, 5, 1, 7, 2, 4, 6, 8)]
    barrier = threading.Barrier(len(inputs))
    futures: list = [None] * len(inputs)

    def client(i: int) -> None:
        barrier.wait()
        futures[i] = b.submit(inputs[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for x, f in zip(inputs, futures):
        torch.testing.assert_close(f.result(timeout=5), x @ fwd.w)
    b.close()
    assert sum(fwd.sizes) == sum(len(x) for x in inputs)
    assert len(fwd.sizes) < len(inputs), f"nothing was merged: {fwd.sizes}"
    assert fwd.threads == {"model-t"}, "only the model thread may run the model"


def test_request_larger_than_max_batch_is_split_and_reassembled() -> None:
    fwd = RecordingForward()
    b = DynamicBatcher(fwd, max_batch_size=16, max_queue_delay_s=0.0)
    x = torch.randn(50, 8)
    out = b.submit(x).result(timeout=5)
    b.close()
    torch.testing.assert_close(out, x @ fwd.w)
    assert max(fwd.sizes) <= 16 and sum(fwd.sizes) == 50 and len(fwd.sizes) == 4


@pytest.mark.serial
def test_partial_batch_waits_at_most_the_queue_delay() -> None:
    """A partial batch leaves ``delay`` after its OLDEST request: a second request arriving half-way
    joins it without restarting the clock. The bounds are wide (0.8 s of slack each side on a 2 s
    delay, so scheduling on a loaded machine does not matter) but each catches a wrong batcher:
    one that does not hold the batch (lower), one that waits from the newest request (3 s) or
    never sends a partial batch (upper)."""
    delay = 2.0
    fwd = RecordingForward()
    gate = threading.Event()

    def forward(x: torch.Tensor) -> torch.Tensor:
        gate.wait(10)
        return fwd(x)

    b = DynamicBatcher(forward, max_batch_size=1000, max_queue_delay_s=delay)
    # The delay is waited where company comes (a lone caller never waits it): first a batch of
    # two requests, formed at once because it is full, while a forward held the model.
    warm = [b.submit(torch.randn(1, 8))]
    deadline = time.monotonic() + 10
    while not fwd.sizes and not b._model_busy and time.monotonic() < deadline:
        time.sleep(0.001)
    warm += [b.submit(torch.randn(500, 8)), b.submit(torch.randn(500, 8))]
    gate.set()
    for f in warm:
        f.result(timeout=10)
    assert fwd.sizes == [1, 1000], fwd.sizes
    fwd.sizes.clear()
    t0 = time.monotonic()
    first = b.submit(torch.randn(2, 8))
    time.sleep(delay / 2)
    second = b.submit(torch.randn(3, 8))
    first.result(timeout=10)
    waited = time.monotonic() - t0
    second.result(timeout=10)
    b.close()
    assert fwd.sizes == [5], fwd.sizes  # one batch: both requests were held together
    assert delay - 0.8 <= waited < delay + 0.8, waited


def test_full_batch_runs_without_waiting_for_the_delay() -> None:
    fwd = RecordingForward()
    b = DynamicBatcher(fwd, max_batch_size=4, max_queue_delay_s=30.0)
    out = b.submit(torch.randn(4, 8)).result(timeout=10)  # would time out if it waited 30 s
    b.close()
    assert out.shape == (4, 5)


def fill_pipeline(b: DynamicBatcher, rows: int) -> list:
    """Submit ``rows``-row requests until some wait in the queue (every stage busy)."""
    futures = []
    deadline = time.monotonic() + 5
    while b.queued_samples == 0:
        assert time.monotonic() < deadline
        futures.append(b.submit(torch.randn(rows, 8)))
        time.sleep(0.02)
    return futures


def test_bounded_queue_rejects_at_once() -> None:
    fwd = RecordingForward(delay=0.2)
    b = DynamicBatcher(fwd, max_batch_size=4, max_queue_delay_s=0.0, max_queue_size=8)
    accepted = fill_pipeline(b, 4)
    with pytest.raises(QueueFullError, match="max_queue_size=8"):
        for _ in range(3):
            accepted.append(b.submit(torch.randn(4, 8)))
    assert b.queued_samples <= 8 and b.stats.rejected == 1
    assert all(f.result(timeout=10).shape == (4, 5) for f in accepted)
    b.close()
    assert b.stats.max_queued_samples <= 8


def test_forward_error_reaches_every_caller_and_batcher_keeps_running() -> None:
    calls = {"n": 0}

    def flaky(x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("CUDA out of memory (simulated by this forward)")
        return x * 2

    b = DynamicBatcher(flaky, max_batch_size=8, max_queue_delay_s=0.0)
    with pytest.raises(RuntimeError, match="out of memory"):
        b.submit(torch.ones(2, 3)).result(timeout=5)
    torch.testing.assert_close(b.submit(torch.ones(2, 3)).result(timeout=5), torch.full((2, 3), 2.0))
    b.close()


def test_cancelled_request_is_not_computed() -> None:
    fwd = RecordingForward(delay=0.2)
    b = DynamicBatcher(fwd, max_batch_size=4, max_queue_delay_s=0.0)
    busy = fill_pipeline(b, 4)
    gone = b.submit(torch.randn(3, 8))
    assert gone.cancel()
    assert all(f.result(timeout=10).shape == (4, 5) for f in busy)
    after = b.submit(torch.randn(2, 8)).result(timeout=5)
    b.close()
    assert after.shape == (2, 5)
    assert 3 not in fwd.sizes and sum(fwd.sizes) == 4 * len(busy) + 2


def test_close_drains_queued_work_then_refuses() -> None:
    fwd = RecordingForward(delay=0.05)
    b = DynamicBatcher(fwd, max_batch_size=2, max_queue_delay_s=0.0)
    futures = [b.submit(torch.randn(2, 8)) for _ in range(5)]
    b.close()
    assert all(f.result(timeout=0).shape == (2, 5) for f in futures)
    with pytest.raises(BatcherClosedError):
        b.submit(torch.randn(1, 8))


def test_empty_batch_is_refused() -> None:
    b = DynamicBatcher(RecordingForward(), max_batch_size=2)
    with pytest.raises(ValueError, match="empty"):
        b.submit(torch.randn(0, 8))
    b.close()


def test_preferred_batch_size_runs_without_waiting_for_the_delay() -> None:
    fwd = RecordingForward()
    b = DynamicBatcher(fwd, max_batch_size=64, preferred_batch_sizes=[8], max_queue_delay_s=30.0)
    out = b.submit(torch.randn(8, 8)).result(timeout=10)  # would wait 30 s without the preferred size
    b.close()
    assert out.shape == (8, 5) and fwd.sizes == [8]
    with pytest.raises(ValueError, match="preferred_batch_sizes"):
        DynamicBatcher(fwd, max_batch_size=4, preferred_batch_sizes=[8])


def test_expired_deadline_is_dropped_before_the_forward() -> None:
    fwd = RecordingForward(delay=0.2)
    b = DynamicBatcher(fwd, max_batch_size=4, max_queue_delay_s=0.0)
    busy = fill_pipeline(b, 4)
    late = b.submit(torch.randn(3, 8), deadline=time.monotonic() + 0.05)
    with pytest.raises(DeadlineExpiredError):
        late.result(timeout=5)
    assert all(f.result(timeout=10).shape == (4, 5) for f in busy)
    b.close()
    assert 3 not in fwd.sizes and b.stats.expired == 1


def test_dict_outputs_and_layers_reach_the_runner() -> None:
    seen: list[frozenset[str]] = []

    class Runner:
        def prepare(self, x: torch.Tensor) -> torch.Tensor:
            return x

        def forward(self, x: torch.Tensor, layers: frozenset[str]) -> dict[str, torch.Tensor]:
            seen.append(layers)
            return {"logits": x * 2, **{f"feature/{name}": x + 1 for name in layers}}

        def to_host(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return out

    b = DynamicBatcher(Runner(), max_batch_size=5, max_queue_delay_s=0.2)
    x1, x2 = torch.randn(3, 2), torch.randn(4, 2)
    f1 = b.submit(x1, layers=["a"])
    f2 = b.submit(x2, layers=["b"])
    o1, o2 = f1.result(timeout=5), f2.result(timeout=5)
    b.close()
    torch.testing.assert_close(o1["logits"], x1 * 2)
    torch.testing.assert_close(o2["logits"], x2 * 2)  # split 2 + 2 across forwards, reassembled
    torch.testing.assert_close(o2["feature/b"], x2 + 1)
    assert seen[0] == {"a", "b"}


@pytest.mark.parametrize("waits", [False, True], ids=["model-thread", "inline"])
def test_error_outside_the_forward_fails_the_batch_not_the_thread(waits: bool) -> None:
    """An observer that raises (a metrics bug, say) is the batch's callers' error; the model
    thread survives and serves the next request (a dead thread would leave it queued forever)."""
    seen: list[int] = []

    def observer(obs) -> None:
        seen.append(obs.size)
        if len(seen) == 1:
            raise RuntimeError("observer broke")

    b = DynamicBatcher(lambda x: x * 2, max_batch_size=8, max_queue_delay_s=0.0, observer=observer)
    try:
        first = b.submit(torch.ones(2, 3), waits=waits)  # inline: the error is the future's, not submit's
        with pytest.raises(RuntimeError, match="observer broke"):
            first.result(timeout=5)
        # Not inline: the model thread answers this one, so it must still be alive.
        torch.testing.assert_close(b.submit(torch.ones(3, 3)).result(timeout=5), torch.full((3, 3), 2.0))
        assert seen == [2, 3]
    finally:
        b.close(timeout=5)


def test_a_failing_queue_depth_observer_never_stops_the_batcher() -> None:
    """The queue-depth gauge is called in the model thread too (as batches form): an error
    there is logged, and requests are still answered (it used to kill the model thread)."""
    fwd = RecordingForward()

    def depth(_: int) -> None:
        raise RuntimeError("gauge broke")

    b = DynamicBatcher(fwd, max_batch_size=8, max_queue_delay_s=0.0, name="t", on_queue_depth=depth)
    try:
        for n in (3, 5, 2):
            x = torch.randn(n, 8)
            torch.testing.assert_close(b.submit(x).result(timeout=10), x @ fwd.w)
        assert b.unresolved == 0
    finally:
        b.close(timeout=5)
