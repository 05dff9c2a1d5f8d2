"""The serving fast path: one-copy decoding, the cheap finiteness check, uint8
normalisation in place, requests built without extra copies, and ``threads``
reaching the model thread. Real servers on loopback, real models."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch

from kd.core.wire import WireError, fill_proto, from_proto, to_proto
from kd.teacher_server.batcher import DynamicBatcher
from kd.teacher_server.client import (
    DatasetRef,
    TeacherClient,
    TeacherRequestError,
    encode_request,
    make_request,
    spec_of,
)
from kd.teacher_server.loading import Teacher, load_teacher
from kd.teacher_server.runner import ModelRunner
from kd.teacher_server.server import TeacherOptions, start_server
from kd.teacher_server.service import _all_finite
from kd.v1 import teacher_pb2 as pb

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int8, torch.int16,
          torch.int32, torch.int64, torch.bool, torch.uint16, torch.uint32]  # fmt: skip


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 50).to(dtype)
    hi = {torch.int8: 127, torch.uint8: 255}.get(dtype, 30_000)
    return torch.randint(0, hi, shape, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", [(3, 5), (40, 3, 32, 32)], ids=["small", "over-share-threshold"])
def test_decode_of_a_received_buffer_equals_the_original(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = _sample(dtype, shape)
    received = pb.Tensor.FromString(to_proto(x).SerializeToString())  # as the server gets it
    for copy in (True, False):
        y = from_proto(received, copy=copy)
        assert y.dtype == dtype and tuple(y.shape) == shape
        assert torch.equal(y, x)


def test_default_decode_is_a_private_writable_copy() -> None:
    x = torch.randn(40, 3, 32, 32)
    msg = to_proto(x)
    y = from_proto(msg)
    y.zero_()  # must touch neither the message nor a later decode
    assert torch.equal(from_proto(msg), x)
    assert torch.equal(from_proto(msg, copy=False), x)


def test_decode_still_refuses_a_wrong_byte_count() -> None:
    msg = to_proto(torch.randn(100, 200))
    msg.shape[:] = [100, 201]
    with pytest.raises(WireError, match="needs 80400 bytes, got 80000"):
        from_proto(msg, copy=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8, torch.bfloat16, torch.bool, torch.int64],
                         ids=lambda d: str(d).removeprefix("torch."))  # fmt: skip
@pytest.mark.parametrize("shape", [(3, 5), (0, 4), (2, 3, 40, 40)], ids=["small", "empty", "image"])
def test_encoded_request_parses_to_the_request_message(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = _sample(dtype, shape)
    spec = spec_of(top_k=2, features=["fc"])
    got = pb.InferRequest.FromString(encode_request("t", x, None, spec, "41"))
    assert got == make_request("t", x, None, spec, "41")
    assert torch.equal(from_proto(got.inputs), x)


def test_encoded_request_of_a_non_contiguous_tensor_and_of_a_ref() -> None:
    x = torch.randn(5, 7).t()  # a transposed view: row-major bytes of the values, not of the storage
    got = pb.InferRequest.FromString(encode_request("t", x, None, spec_of()))
    assert torch.equal(from_proto(got.inputs), x)
    ref = DatasetRef("digits", [3, 1], [30, 10])
    assert pb.InferRequest.FromString(encode_request("t", None, ref, spec_of())) == make_request(
        "t", None, ref, spec_of()
    )


def test_request_built_in_place_equals_the_message_built_by_copies() -> None:
    x = torch.randn(8, 3, 16, 16)
    spec = spec_of(top_k=3)
    ref = pb.InferRequest(request_id="r", teacher="t", inputs=to_proto(x), outputs=spec)
    assert make_request("t", x, None, spec, "r").SerializeToString() == ref.SerializeToString()
    msg = pb.Tensor()
    fill_proto(msg, x.numpy())
    assert msg.SerializeToString() == to_proto(x).SerializeToString()


@pytest.mark.parametrize("shape", [(4, 300), (5, 4096)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_all_finite_sees_nan_and_both_infinities(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    x = torch.randn(shape, dtype=torch.float32).to(dtype)
    assert _all_finite(x)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[2, 123] = bad
        assert not _all_finite(y), bad
    both = x.clone()
    both[0, 0], both[1, 1] = float("inf"), float("-inf")
    assert not _all_finite(both)
    top = torch.full(shape, torch.finfo(dtype).max, dtype=dtype)  # finite, and their sum must not overflow
    assert _all_finite(top) and _all_finite(-top)
    assert _all_finite(x.t())  # a non-contiguous view
    assert _all_finite(torch.arange(5))  # integers are finite by construction


def test_nan_and_inf_inputs_are_refused_large_and_small(teacher: Teacher) -> None:
    running = start_server([teacher], port=0)
    try:
        with TeacherClient(f"127.0.0.1:{running.port}", timeout=30) as client:
            for n in (2, 400):  # under and over the size decoded without a copy
                for bad in (float("nan"), float("inf"), float("-inf")):
                    x = torch.randn(n, 64)
                    x[n - 1, 5] = bad
                    with pytest.raises(TeacherRequestError) as e:
                        client.infer("digits", x)
                    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
                    want = f"NaN or Inf in 1 of the request's {n} sample(s), first in row {n - 1} of the inputs"
                    assert want in e.value.message
            x = torch.randn(400, 64)  # and still serves, rows in order (split over two forwards)
            with torch.inference_mode():
                want = teacher.model(x)
            assert torch.allclose(client.infer("digits", x)["logits"], want, atol=1e-5, rtol=1e-5)
    finally:
        running.stop(grace=1)


def test_uint8_normalisation_equals_the_reference(teacher: Teacher) -> None:
    mean = [0.1 + 0.01 * c for c in range(64)]
    std = [0.2 + 0.005 * c for c in range(64)]
    running = start_server([teacher], port=0, options={"digits": TeacherOptions(mean=mean, std=std)})
    try:
        ep = running.endpoints["digits"]
        u8 = torch.randint(0, 256, (300, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
        m, s = torch.tensor(mean), torch.tensor(std)
        reference = (u8.float() / 255.0 - m.view(1, -1)) / s.view(1, -1)
        assert torch.equal(ep.from_uint8(u8), reference)  # bit for bit: same operations, in place
        assert torch.equal(u8, torch.randint(0, 256, (300, 64), dtype=torch.uint8,
                                             generator=torch.Generator().manual_seed(3)))  # fmt: skip
        with TeacherClient(f"127.0.0.1:{running.port}", timeout=30) as client:
            got = client.infer("digits", u8)["logits"]
        with torch.inference_mode():
            want = teacher.model(reference)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    finally:
        running.stop(grace=1)


@pytest.mark.parametrize("threads", [1, 3])
def test_threads_option_reaches_the_model_thread(threads: int) -> None:
    t = load_teacher("t", "kd.models:digits_student")
    seen: list[int] = []
    t.model.register_forward_pre_hook(lambda _m, _x: seen.append(torch.get_num_threads()))
    main_threads = torch.get_num_threads()
    running = start_server([t], port=0, options={"t": TeacherOptions(threads=threads, warmup=False)})
    try:
        with TeacherClient(f"127.0.0.1:{running.port}", timeout=30) as client:
            client.infer("t", torch.randn(2, 64))
    finally:
        running.stop(grace=1)
    assert seen == [threads]
    assert torch.get_num_threads() == main_threads  # the caller's thread is left alone


def test_negative_threads_is_refused(teacher: Teacher) -> None:
    with pytest.raises(ValueError, match="threads must be >= 0"):
        ModelRunner(teacher, threads=-1)


class GatedRunner:
    """A real computation whose first forward waits for ``gate``: while it runs, the test
    sees what the batcher forms ahead of it. ``overlaps_copy`` as a CUDA ModelRunner says."""

    def __init__(self, overlaps_copy: bool) -> None:
        self.overlaps_copy = overlaps_copy
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.sizes: list[int] = []

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor, layers: frozenset[str]) -> torch.Tensor:
        self.sizes.append(int(x.shape[0]))
        self.entered.set()
        assert self.gate.wait(20)
        return x * 2

    def to_host(self, out: torch.Tensor) -> torch.Tensor:
        return out


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_batches_form_when_the_model_is_free_so_waiting_requests_merge() -> None:
    runner = GatedRunner(overlaps_copy=False)
    b = DynamicBatcher(runner, max_batch_size=64, max_queue_delay_s=0.0)
    first = b.submit(torch.ones(4, 3))
    assert runner.entered.wait(10)
    rest = [b.submit(torch.full((4, 3), float(i))) for i in range(6)]
    time.sleep(0.2)  # a batcher forming ahead would have taken some of them by now
    assert b.queued_samples == 24, "a batch was formed while the model was busy"
    runner.gate.set()
    assert torch.equal(first.result(timeout=10), torch.full((4, 3), 2.0))
    for i, f in enumerate(rest):
        assert torch.equal(f.result(timeout=10), torch.full((4, 3), 2.0 * i))
    b.close()
    assert runner.sizes == [4, 24]


def test_a_runner_that_overlaps_its_copy_gets_exactly_one_batch_ahead() -> None:
    runner = GatedRunner(overlaps_copy=True)
    b = DynamicBatcher(runner, max_batch_size=64, max_queue_delay_s=0.0)
    futures = [b.submit(torch.ones(4, 3))]
    assert runner.entered.wait(10)
    futures.append(b.submit(torch.ones(4, 3)))
    _wait_for(lambda: b.queued_samples == 0)  # formed and prepared while the forward runs
    futures += [b.submit(torch.ones(4, 3)) for _ in range(5)]
    time.sleep(0.2)
    assert b.queued_samples == 20, "more than one batch was formed ahead"
    runner.gate.set()
    assert all(torch.equal(f.result(timeout=10), torch.full((4, 3), 2.0)) for f in futures)
    b.close()
    assert runner.sizes == [4, 4, 20]


def test_model_runner_overlaps_its_copy_only_on_cuda(teacher: Teacher) -> None:
    assert ModelRunner(teacher).overlaps_copy is (teacher.device.type == "cuda")


@pytest.mark.parametrize("overlaps_copy", [False, True], ids=["serial", "pipelined"])
def test_a_failing_forward_or_prepare_frees_the_model_for_the_next_batch(overlaps_copy: bool) -> None:
    class Flaky:
        def __init__(self) -> None:
            self.calls = 0
            self.overlaps_copy = overlaps_copy

        def prepare(self, x: torch.Tensor) -> torch.Tensor:
            if float(x[0, 0]) < 0:
                raise ValueError("bad batch (prepare)")
            return x

        def forward(self, x: torch.Tensor, layers: frozenset[str]) -> torch.Tensor:
            self.calls += 1
            if float(x[0, 0]) == 0:
                raise RuntimeError("bad batch (forward)")
            return x + 1

        def to_host(self, out: torch.Tensor) -> torch.Tensor:
            return out

    b = DynamicBatcher(Flaky(), max_batch_size=8, max_queue_delay_s=0.0)
    for _ in range(3):  # with one batch in flight, a slot leaked by a failure would hang here
        with pytest.raises(RuntimeError, match="forward"):
            b.submit(torch.zeros(2, 3)).result(timeout=10)
        with pytest.raises(ValueError, match="prepare"):
            b.submit(-torch.ones(2, 3)).result(timeout=10)
    assert torch.equal(b.submit(torch.ones(2, 3)).result(timeout=10), torch.full((2, 3), 2.0))
    b.close()


@pytest.mark.parametrize("overlaps_copy", [False, True], ids=["serial", "pipelined"])
def test_without_overlap_one_thread_forms_runs_and_answers(overlaps_copy: bool) -> None:
    seen: dict[str, set[str]] = {"prepare": set(), "forward": set(), "to_host": set()}

    class Runner:
        def __init__(self) -> None:
            self.overlaps_copy = overlaps_copy

        def prepare(self, x: torch.Tensor) -> torch.Tensor:
            seen["prepare"].add(threading.current_thread().name)
            return x

        def forward(self, x: torch.Tensor, layers: frozenset[str]) -> torch.Tensor:
            seen["forward"].add(threading.current_thread().name)
            return x - 1

        def to_host(self, out: torch.Tensor) -> torch.Tensor:
            seen["to_host"].add(threading.current_thread().name)
            return out

    b = DynamicBatcher(Runner(), max_batch_size=4, max_queue_delay_s=0.0, name="one")
    x = torch.arange(30.0).reshape(10, 3)  # split over three forwards and reassembled
    assert torch.equal(b.submit(x).result(timeout=10), x - 1)
    b.close()
    if overlaps_copy:
        assert seen == {"prepare": {"batcher-one"}, "forward": {"model-one"}, "to_host": {"completion-one"}}
    else:
        assert seen == {"prepare": {"model-one"}, "forward": {"model-one"}, "to_host": {"model-one"}}
    assert b.stats.forwards == 3 and list(b.stats.batch_sizes) == [4, 4, 2]
