"""The batcher's inline path: a unary caller that finds the model idle and nothing queued runs
its forward on its own thread (no hand-off), and forwards still never overlap."""

from __future__ import annotations

import threading
import time

import torch

from kd.teacher_server.batcher import DynamicBatcher


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


def test_with_a_queue_delay_nothing_runs_inline() -> None:
    rec = Recorder()
    b = DynamicBatcher(rec, max_batch_size=8, max_queue_delay_s=0.001, name="d")
    assert not b.inline
    assert torch.equal(b.submit(torch.ones(1, 2), waits=True).result(timeout=10), torch.full((1, 2), 2.0))
    b.close()
    assert rec.threads == ["model-d"]


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
