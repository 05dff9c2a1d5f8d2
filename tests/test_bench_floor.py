"""The batched floor of `kd bench serve` (raw grpcio + the plainest greedy batching): a real
server process on loopback, answered by kd's own client. A floor that mixed up rows or
skipped the model would make every ratio against it meaningless."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from kd.bench.serve import FREE_CLASSES, FREE_SHAPE, BatchedFloor, FloorProcess, free_teacher
from kd.teacher_server.client import TeacherClient


def test_batched_floor_answers_each_caller_its_own_rows_from_merged_forwards(tmp_path: Path) -> None:
    floor = FloorProcess(tmp_path, 4 * FREE_SHAPE[0], FREE_CLASSES, BatchedFloor("kd.bench.serve:free_teacher", 16, 1))
    model = free_teacher()
    with floor:
        floor.wait_started(120.0)
        assert floor.metrics() == {"kd_batch_size_count": 0.0, "kd_batch_size_sum": 0.0}
        errors: list[str] = []
        sizes = [1, 3, 4, 7, 9]  # 9 + 7 > 16: some merges must stop at max_batch_size
        rounds = 25

        def client(i: int) -> None:
            g = torch.Generator().manual_seed(i)
            with TeacherClient(floor.address) as c:
                for _ in range(rounds):
                    x = torch.randn(sizes[i], *FREE_SHAPE, generator=g)
                    got = c.infer("bench", x)["logits"]
                    if not torch.allclose(got, model(x), rtol=0, atol=1e-6):
                        errors.append(f"client {i}: rows not its own")

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(sizes))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120.0)
        assert not errors, errors[:3]
        m = floor.metrics()
        assert m["kd_batch_size_sum"] == rounds * sum(sizes)  # every row ran once
        assert m["kd_batch_size_count"] <= rounds * len(sizes)  # never more forwards than requests
    assert floor.proc.returncode == 0
