"""Several model instances per teacher (``kd serve --instances N``, Triton's instance groups).

One batcher feeds N runners, each a copy of the teacher with its own threads;
whichever is free takes the next batch. The targets and the fingerprint are the
teacher's whatever N; /metrics counts forwards per instance."""

from __future__ import annotations

import re
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from kd.teacher_server.batcher import DynamicBatcher
from kd.teacher_server.client import TeacherClient
from kd.teacher_server.loading import Teacher
from kd.teacher_server.runner import ModelRunner
from kd.teacher_server.server import TeacherOptions, model_instances, start_server


def _hold_first_forwards(runners: list, parties: int) -> threading.Barrier:
    """Each runner's first forward waits until every runner is inside one: passes only if
    the instances run batches at the same time (a lane that never gets work breaks it)."""
    barrier = threading.Barrier(parties, timeout=20)
    for r in runners:
        forward, first = r.forward, [True]

        def held(prepared, layers, forward=forward, first=first):
            if first[0]:
                first[0] = False
                barrier.wait()
            return forward(prepared, layers)

        r.forward = held
    return barrier


def test_two_instances_serve_concurrent_clients_with_the_teachers_targets(teacher: Teacher) -> None:
    options = TeacherOptions(max_batch_size=8, max_queue_delay_us=500, instances=2, warmup=False)
    running = start_server([teacher], port=0, batching=options, metrics_port=0)
    try:
        batcher = running.endpoints["digits"].batcher
        r0, r1 = batcher.runners
        assert r0.teacher.model is teacher.model and r1.teacher.model is not teacher.model  # a copy of its own
        assert all(torch.equal(a, b) for a, b in zip(r0.teacher.model.parameters(), r1.teacher.model.parameters()))
        _hold_first_forwards([r0, r1], 2)
        gen = torch.Generator().manual_seed(0)
        inputs = [torch.randn(6, 64, generator=gen) for _ in range(24)]
        reference = ModelRunner(teacher)

        def ask(x: torch.Tensor) -> torch.Tensor:
            with TeacherClient(f"127.0.0.1:{running.port}") as c:
                return c.infer("digits", x)["logits"]

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, inputs))
        for x, got in zip(inputs, answers):
            torch.testing.assert_close(got, reference(x), rtol=1e-5, atol=1e-5)
        with TeacherClient(f"127.0.0.1:{running.port}") as c:
            assert c.describe("digits").fingerprint == teacher.fingerprint  # N instances, one teacher
        per = batcher.stats.instance_forwards
        assert per[0] >= 1 and per[1] >= 1 and sum(per) == batcher.stats.forwards
        text = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10).read().decode()
        counted = {
            m.group(1): float(m.group(2))
            for m in re.finditer(r'kd_instance_forwards_total\{instance="(\d)",teacher="digits"\} (\S+)', text)
        }
        assert counted == {"0": per[0], "1": per[1]}
    finally:
        running.stop(grace=1)


@pytest.mark.parametrize("overlaps_copy", [False, True], ids=["serial", "pipelined"])
def test_every_lane_has_its_own_threads_and_takes_batches(overlaps_copy: bool) -> None:
    class Runner:
        def __init__(self, add: float) -> None:
            self.add, self.overlaps_copy, self.threads = add, overlaps_copy, set()

        def prepare(self, x: torch.Tensor) -> torch.Tensor:
            return x

        def forward(self, x: torch.Tensor, layers: frozenset[str]) -> torch.Tensor:
            self.threads.add(threading.current_thread().name)
            return x * 2  # the same function on every instance

        def to_host(self, out: torch.Tensor) -> torch.Tensor:
            return out

    runners = [Runner(0), Runner(1), Runner(2)]
    _hold_first_forwards(runners, 3)
    b = DynamicBatcher(runners, max_batch_size=4, max_queue_delay_s=0.0, name="m")
    xs = [torch.full((4, 2), float(i)) for i in range(12)]
    futures = [b.submit(x) for x in xs]
    assert all(torch.equal(f.result(timeout=30), x * 2) for f, x in zip(futures, xs))
    big = torch.arange(40.0).reshape(20, 2)  # split over forwards, maybe over lanes, reassembled in order
    assert torch.equal(b.submit(big).result(timeout=30), big * 2)
    b.close()
    assert [r.threads for r in runners] == [{"model-m"}, {"model-m-1"}, {"model-m-2"}]
    assert all(n >= 1 for n in b.stats.instance_forwards) and sum(b.stats.instance_forwards) == b.stats.forwards


def test_instances_are_checked(teacher: Teacher) -> None:
    with pytest.raises(ValueError, match="instances must be >= 1"):
        model_instances(teacher, 0)
    with pytest.raises(ValueError, match="not available"):
        model_instances(teacher, 2, ["cpu", "cuda:7"] if torch.cuda.device_count() < 8 else ["cuda:99"])
    copies = model_instances(teacher, 3, ["cpu"])
    assert copies[0] is teacher and len({id(c.model) for c in copies}) == 3
    assert {c.fingerprint for c in copies} == {teacher.fingerprint}
