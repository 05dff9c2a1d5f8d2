"""The gRPC teacher server, over real loopback connections."""

from __future__ import annotations

import dataclasses
import time

import grpc
import pytest
import torch
from gates import HeldForward
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kd.core.wire import from_proto, to_proto
from kd.teacher_server.client import TeacherClient, TeacherRequestError
from kd.teacher_server.loading import Teacher
from kd.teacher_server.server import BatchingOptions, start_server
from kd.v1 import teacher_pb2 as pb
from kd.v1 import teacher_pb2_grpc as pb_grpc


def reference(teacher: Teacher, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return teacher.model(x)


def test_list_teachers_describes_the_teacher(address: str, teacher: Teacher) -> None:
    with TeacherClient(address) as c:
        (desc,) = c.list_teachers()
    assert desc.name == "digits"
    assert desc.fingerprint == teacher.fingerprint and len(desc.fingerprint) == 64
    assert desc.input_shape == (64,) and desc.input_dtype == torch.float32
    assert desc.num_classes == 10 and desc.max_batch_size == 64


def test_infer_returns_the_teachers_logits_topk_and_probs(address: str, teacher: Teacher) -> None:
    x = torch.rand(7, 64)
    ref = reference(teacher, x)
    with TeacherClient(address) as c:
        out = c.infer("digits", x, top_k=3, temperature=2.5)
        half = c.infer("digits", x, dtype=torch.float16)
        only_topk = c.infer("digits", x, logits=False, top_k=2)
    torch.testing.assert_close(out["logits"], ref, rtol=1e-5, atol=1e-5)
    values, indices = ref.topk(3, dim=1)
    torch.testing.assert_close(out["topk_values"], values, rtol=1e-5, atol=1e-5)
    assert torch.equal(out["topk_indices"], indices.int())
    torch.testing.assert_close(out["logsumexp"], torch.logsumexp(ref, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["probs"], torch.softmax(ref / 2.5, 1), rtol=1e-5, atol=1e-6)
    assert half["logits"].dtype == torch.float16
    torch.testing.assert_close(half["logits"], ref.half(), rtol=1e-3, atol=1e-3)
    assert set(only_topk) == {"topk_values", "topk_indices", "logsumexp"}


def test_concurrent_clients_are_batched_together(teacher: Teacher) -> None:
    """Twelve clients whose requests arrive while the model is busy: one forward answers
    them, each with its own rows. The forward is held (``HeldForward``) so that they arrive
    together for sure: client threads released at once in this process did not always (CI
    once got 12 forwards of 4, their requests hidden behind the service's small-work lock)."""
    held = HeldForward(teacher.model)
    running = start_server([dataclasses.replace(teacher, model=held)], port=0,
                           batching=BatchingOptions(max_batch_size=256, max_queue_delay_us=50_000))  # fmt: skip
    try:
        batcher = running.endpoints["digits"].batcher
        xs = [torch.rand(4, 64) for _ in range(13)]
        results: list = [None] * len(xs)

        def one(i: int) -> None:
            with TeacherClient(f"127.0.0.1:{running.port}", timeout=30) as c:
                results[i] = c.infer("digits", xs[i])["logits"]

        before = batcher.stats.forwards
        held.crowd(one, len(xs))
        for x, r in zip(xs, results):
            torch.testing.assert_close(r, reference(teacher, x), rtol=1e-5, atol=1e-5)
        stats = batcher.stats
        assert stats.requests == len(xs) and stats.samples == 4 * len(xs)
        forwards = stats.forwards - before
        assert forwards <= 3, f"requests were not merged: {list(stats.batch_sizes)}"
    finally:
        running.stop(grace=1)


def test_stream_keeps_many_in_flight_and_matches_ids(address: str, teacher: Teacher, server) -> None:
    batches = [(i, torch.rand(int(n), 64)) for i, n in enumerate(torch.randint(1, 40, (30,)))]
    with TeacherClient(address) as c:
        got = list(c.infer_stream("digits", batches, depth=8))
    assert [k for k, _ in got] == list(range(30))
    for (_, x), (_, out) in zip(batches, got):
        torch.testing.assert_close(out["logits"], reference(teacher, x), rtol=1e-5, atol=1e-5)


def _raw_stub(address: str, max_bytes: int = 64 << 20) -> pb_grpc.TeacherServiceStub:
    channel = grpc.insecure_channel(
        address,
        options=[("grpc.max_send_message_length", max_bytes), ("grpc.max_receive_message_length", max_bytes)],
    )
    return pb_grpc.TeacherServiceStub(channel)


BAD_REQUESTS = [
    (
        "unknown teacher",
        dict(teacher="nope", inputs=to_proto(torch.rand(2, 64))),
        "NOT_FOUND",
        "unknown teacher 'nope'",
    ),
    ("no inputs", dict(teacher="digits"), "INVALID_ARGUMENT", "no inputs"),
    ("wrong dtype", dict(teacher="digits", inputs=to_proto(torch.rand(2, 64).double())), "INVALID_ARGUMENT", "FLOAT64"),
    ("wrong shape", dict(teacher="digits", inputs=to_proto(torch.rand(2, 8, 8))), "INVALID_ARGUMENT", "[2, 8, 8]"),
    ("empty batch", dict(teacher="digits", inputs=to_proto(torch.rand(0, 64))), "INVALID_ARGUMENT", "empty batch"),
    (
        "byte count",
        dict(teacher="digits", inputs=pb.Tensor(dtype=pb.FLOAT32, shape=[2, 64], data=b"\0" * 100)),
        "INVALID_ARGUMENT",
        "needs 512 bytes, got 100",
    ),
    (
        "nan",
        dict(teacher="digits", inputs=to_proto(torch.tensor([[0.0] * 64, [float("nan")] * 64]))),
        "INVALID_ARGUMENT",
        "first in row 1 of the inputs",
    ),
    (
        "top_k too large",
        dict(teacher="digits", inputs=to_proto(torch.rand(2, 64)), outputs=pb.OutputSpec(top_k=11)),
        "INVALID_ARGUMENT",
        "top_k=11",
    ),
    (
        "bad logits dtype",
        dict(teacher="digits", inputs=to_proto(torch.rand(2, 64)), outputs=pb.OutputSpec(logits_dtype=pb.INT8)),
        "INVALID_ARGUMENT",
        "INT8",
    ),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_precise_status_and_server_keeps_serving(address: str, case) -> None:
    _, fields, code, fragment = case
    stub = _raw_stub(address)
    with pytest.raises(grpc.RpcError) as err:
        stub.Infer(pb.InferRequest(**fields), timeout=10)
    assert err.value.code().name == code
    assert fragment in err.value.details()
    ok = stub.Infer(pb.InferRequest(teacher="digits", inputs=to_proto(torch.rand(3, 64))), timeout=10)
    assert from_proto(ok.outputs["logits"]).shape == (3, 10)


def test_oversized_message_is_resource_exhausted(teacher: Teacher) -> None:
    running = start_server([teacher], port=0, max_message_bytes=64 << 10)
    try:
        stub = _raw_stub(f"127.0.0.1:{running.port}")
        big = pb.InferRequest(teacher="digits", inputs=to_proto(torch.rand(1000, 64)))  # 256 KB
        with pytest.raises(grpc.RpcError) as err:
            stub.Infer(big, timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in err.value.details()
        small = stub.Infer(pb.InferRequest(teacher="digits", inputs=to_proto(torch.rand(4, 64))), timeout=10)
        assert from_proto(small.outputs["logits"]).shape == (4, 10)
    finally:
        running.stop(grace=1)


def test_bad_request_on_a_stream_is_answered_in_band(address: str, teacher: Teacher) -> None:
    stub = _raw_stub(address)
    good = torch.rand(5, 64)
    reqs = [
        pb.InferRequest(request_id="a", teacher="digits", inputs=to_proto(good)),
        pb.InferRequest(request_id="b", teacher="digits", inputs=to_proto(torch.rand(5, 63))),
        pb.InferRequest(request_id="c", teacher="ghost", inputs=to_proto(good)),
        pb.InferRequest(request_id="d", teacher="digits", inputs=to_proto(good)),
    ]
    replies = {r.request_id: r for r in stub.InferStream(iter(reqs), timeout=10)}
    assert set(replies) == {"a", "b", "c", "d"}
    assert replies["b"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "[5, 63]" in replies["b"].error.message
    assert replies["c"].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    for rid in "ad":
        assert not replies[rid].HasField("error")
        torch.testing.assert_close(from_proto(replies[rid].outputs["logits"]), reference(teacher, good))
    with TeacherClient(address) as c, pytest.raises(TeacherRequestError, match="INVALID_ARGUMENT"):
        list(c.infer_stream("digits", [(0, torch.rand(2, 64)), (1, torch.rand(2, 3))]))


def test_health_and_reflection(address: str) -> None:
    channel = grpc.insecure_channel(address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "kd.v1.TeacherService"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    db = ProtoReflectionDescriptorDatabase(channel)
    assert "kd.v1.TeacherService" in set(db.get_services())
    service = db.FindFileContainingSymbol("kd.v1.TeacherService").service[0]
    assert {m.name for m in service.method} == {
        "ListTeachers", "Infer", "InferStream", "InputGradient", "GetBatchNormStats", "BatchNormLoss",
        "GetActivationRecords", "Synthesize", "PublishWeights",
    }  # fmt: skip


def test_stop_finishes_accepted_work_then_refuses(teacher: Teacher) -> None:
    # A slow forward keeps requests queued while the server is told to stop.
    running = start_server([teacher], port=0, batching=BatchingOptions(max_batch_size=8, max_queue_delay_us=0))
    batcher = running.endpoints["digits"].batcher
    forward = batcher.runner.forward

    def slow(x, layers):
        time.sleep(0.02)
        return forward(x, layers)

    batcher.runner.forward = slow
    client = TeacherClient(f"127.0.0.1:{running.port}")
    client.wait_ready()
    futures = [
        client.stub.Infer.future(pb.InferRequest(teacher="digits", inputs=to_proto(torch.rand(8, 64))))
        for _ in range(20)
    ]
    deadline = time.monotonic() + 10
    while batcher.stats.requests < 20 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert batcher.stats.requests == 20
    assert batcher.stats.forwards < 20, "nothing was still queued when stop began"
    running.stop(grace=10)
    assert [list(f.result().outputs["logits"].shape) for f in futures] == [[8, 10]] * 20
    with pytest.raises(TeacherRequestError):
        TeacherClient(f"127.0.0.1:{running.port}", timeout=2).infer("digits", torch.rand(1, 64))
    client.close()


def test_stream_replies_keep_request_order_across_teachers(teacher: Teacher) -> None:
    from kd.teacher_server.loading import load_teacher

    slow_teacher = load_teacher("slow", "kd.models:digits_student")
    running = start_server([teacher, slow_teacher], port=0, batching=BatchingOptions(max_queue_delay_us=0))
    slow = running.endpoints["slow"].batcher
    forward = slow.runner.forward

    def slower(x, layers):
        time.sleep(0.1)
        return forward(x, layers)

    slow.runner.forward = slower
    try:
        stub = _raw_stub(f"127.0.0.1:{running.port}")
        names = ["slow", "digits", "digits", "slow", "digits"]
        reqs = [
            pb.InferRequest(request_id=str(i), teacher=name, inputs=to_proto(torch.rand(2, 64)))
            for i, name in enumerate(names)
        ]
        replies = list(stub.InferStream(iter(reqs), timeout=20))
        # The fast teacher's replies finish first, but go out after the slow ones before them.
        assert [r.request_id for r in replies] == ["0", "1", "2", "3", "4"]
        assert [r.teacher for r in replies] == names
    finally:
        running.stop(grace=1)
