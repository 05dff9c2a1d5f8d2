"""The batched floor of `kd bench serve` (raw grpcio + the plainest greedy batching): a real
server process on loopback, answered by kd's own client. A floor that mixed up rows, skipped
the model, merged past its cap or never merged would make every ratio against it meaningless."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest
import torch

from kd.bench.serve import BatchedFloor, FloorProcess
from kd.models import bench_teacher
from kd.teacher_server.client import TeacherClient, encode_request, spec_of

CAP = 16


def test_batched_floor_merges_up_to_its_cap_and_answers_each_caller_its_own_rows(tmp_path: Path) -> None:
    # The 7.3M MLP: a forward takes milliseconds, so requests of the 5 clients queue behind it and merge.
    floor = FloorProcess(tmp_path, 4 * 512, 1000, BatchedFloor("kd.models:bench_teacher", CAP, 1))
    model = bench_teacher().eval()
    with floor:
        floor.wait_started(120.0)
        assert floor.metrics() == {"kd_batch_size_count": 0.0, "kd_batch_size_sum": 0.0, "max_rows": 0.0}
        errors: list[str] = []
        sizes = [1, 3, 4, 7, 9]  # 9 + 7 > 16: some merges must stop at the cap
        rounds = 20

        def client(i: int) -> None:
            g = torch.Generator().manual_seed(i)
            with TeacherClient(floor.address) as c:
                for _ in range(rounds):
                    x = torch.randn(sizes[i], 512, generator=g)
                    got = c.infer("bench", x)["logits"]
                    with torch.inference_mode():
                        want = model(x)
                    # merged rows may be summed in another order than alone: 1e-5, not bit-equal
                    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
                        errors.append(f"client {i}: rows not its own")

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(sizes))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120.0)
        assert not errors, errors[:3]
        m = floor.metrics()
        assert m["kd_batch_size_sum"] == rounds * sum(sizes)  # every row ran once
        assert m["kd_batch_size_count"] < rounds * len(sizes)  # requests were merged
        assert max(sizes) <= m["max_rows"] <= CAP

        # A request the floor cannot batch (a 0-d tensor) is refused; the floor keeps serving.
        with grpc.insecure_channel(floor.address) as channel:
            infer = channel.unary_unary("/kd.v1.TeacherService/Infer")
            with pytest.raises(grpc.RpcError):
                infer(encode_request("bench", torch.tensor(1.0), None, spec_of()), timeout=30.0)
        with TeacherClient(floor.address) as c:
            assert c.infer("bench", torch.randn(2, 512))["logits"].shape == (2, 1000)
    assert floor.proc.returncode == 0
