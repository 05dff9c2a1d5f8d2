"""Reliability of the teacher server under hostile or heavy traffic, over real
loopback gRPC with the real digits teacher:

* a seeded fuzz of malformed requests (unary and on a stream) must get precise
  refusals, never UNKNOWN/INTERNAL, and leave the server serving;
* overload of a small bounded queue must give correct answers or
  RESOURCE_EXHAUSTED, and keep the queue (memory) bounded;
* SIGTERM to a loaded ``kd serve`` must answer every accepted request correctly,
  refuse the rest (UNAVAILABLE, or gRPC's reset of a call it never handed to
  the servicer), and exit 0;
* a deadline that passes while a request is queued ends the call without an
  exception in the handler.

Every blocking call carries a timeout, so a hang fails a test instead of the run.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import signal
import string
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from kd.core.data import load_dataset
from kd.core.wire import from_proto, to_proto
from kd.teacher_server.client import TeacherClient, TeacherRequestError
from kd.teacher_server.loading import Teacher
from kd.teacher_server.server import RunningServer, TeacherOptions, start_server
from kd.v1 import teacher_pb2 as pb
from kd.v1 import teacher_pb2_grpc as pb_grpc

FUZZ_SEED = 20_240_611
FUZZ_REQUESTS = 300
RPC_TIMEOUT = 10.0
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}

# Codes that say "the server failed" rather than "your request is wrong".
SERVER_FAULTS = {grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
SERVER_FAULT_VALUES = {c.value[0] for c in SERVER_FAULTS}


def reference(teacher: Teacher, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return teacher.model(x)


def _raw_stub(address: str) -> tuple[grpc.Channel, pb_grpc.TeacherServiceStub]:
    channel = grpc.insecure_channel(
        address,
        options=[("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)],
    )
    return channel, pb_grpc.TeacherServiceStub(channel)


# -- 1. fuzz of malformed requests ----------------------------------------------------------------


@dataclass
class Bad:
    kind: str
    request: pb.InferRequest
    code: grpc.StatusCode  # what a precise server answers
    family: str = ""  # the generator that made it


_ITEMSIZE = {pb.FLOAT32: 4, pb.FLOAT16: 2, pb.UINT8: 1}
_REFUSED_INPUT_DTYPES = {
    pb.DTYPE_UNSPECIFIED: 4,
    pb.BFLOAT16: 2,
    pb.FLOAT64: 8,
    pb.INT8: 1,
    pb.INT16: 2,
    pb.INT32: 4,
    pb.INT64: 8,
    pb.BOOL: 1,
    pb.UINT16: 2,
    pb.UINT32: 4,
}
_OUTPUT_DTYPES = (pb.DTYPE_UNSPECIFIED, pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16)


class BadRequests:
    """Seeded generator of requests with exactly one defect each (so the right code is known)."""

    KINDS = (
        "unknown_dtype",
        "refused_dtype",
        "byte_count",
        "truncated",
        "negative_dim",
        "huge_dim",
        "bad_shape",
        "non_finite",
        "unknown_teacher",
        "unknown_layer",
        "bad_output_dtype",
        "bad_top_k",
        "bad_temperature",
        "unknown_dataset",
        "bad_index",
        "seed_count",
        "empty_ref",
        "no_input",
    )

    def __init__(self, seed: int, teacher: Teacher, dataset_len: int) -> None:
        self.rng = random.Random(seed)
        self.teacher = teacher
        self.dataset_len = dataset_len
        self.layers = sorted(teacher.layers)
        self.classes = teacher.num_classes

    # valid parts
    def _rows(self) -> int:
        return self.rng.randint(1, 9)

    def _floats(self, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.rng.randrange(2**31))
        return torch.rand(n, 64, generator=g)

    def _valid_tensor(self, dtype: int, n: int) -> pb.Tensor:
        x = self._floats(n)
        if dtype == pb.UINT8:
            return to_proto((x * 255).to(torch.uint8))
        return to_proto(x.half() if dtype == pb.FLOAT16 else x)

    def _valid_spec(self) -> pb.OutputSpec:
        r = self.rng
        return pb.OutputSpec(
            logits=r.random() < 0.7,
            logits_dtype=r.choice(_OUTPUT_DTYPES),
            top_k=r.choice([0, 0, r.randint(1, self.classes)]),
            probs_temperature=r.choice([0.0, r.uniform(0.1, 10.0)]),
            features=r.sample(self.layers, r.randint(0, min(2, len(self.layers)))),
            pool_features=r.random() < 0.5,
            features_dtype=r.choice(_OUTPUT_DTYPES),
        )

    def _request(self, **fields) -> pb.InferRequest:
        fields.setdefault("teacher", "digits")
        fields.setdefault("outputs", self._valid_spec())
        if "inputs" not in fields and "ref" not in fields and not fields.pop("no_input", False):
            fields["inputs"] = self._valid_tensor(self.rng.choice(list(_ITEMSIZE)), self._rows())
        return pb.InferRequest(**fields)

    def _junk_name(self, avoid: set[str]) -> str:
        r = self.rng
        while True:
            name = r.choice(
                [
                    "",
                    "nope",
                    "DIGITS",
                    "digits ",
                    " digits",
                    "digits\x00",
                    "dígits",
                    "../digits",
                    "x" * r.randint(1, 300),
                    "".join(r.choice(string.printable) for _ in range(r.randint(1, 24))),
                ]
            )
            if name not in avoid:
                return name

    # one generator per defect
    def unknown_dtype(self) -> Bad:
        n = self._rows()
        dtype = self.rng.choice([self.rng.randint(13, 1000), self.rng.randint(13, 2**31 - 1), -self.rng.randint(1, 99)])
        t = pb.Tensor(dtype=dtype, shape=[n, 64], data=bytes(n * 64 * 4))
        return Bad("unknown dtype", self._request(inputs=t), grpc.StatusCode.INVALID_ARGUMENT)

    def refused_dtype(self) -> Bad:
        n = self._rows()
        dtype, size = self.rng.choice(sorted(_REFUSED_INPUT_DTYPES.items()))
        t = pb.Tensor(dtype=dtype, shape=[n, 64], data=bytes(n * 64 * size))
        return Bad("refused dtype", self._request(inputs=t), grpc.StatusCode.INVALID_ARGUMENT)

    def byte_count(self) -> Bad:
        dtype = self.rng.choice(list(_ITEMSIZE))
        n = self._rows()
        good = self._valid_tensor(dtype, n).data
        extra = self.rng.choice([1, _ITEMSIZE[dtype], 64 * _ITEMSIZE[dtype], self.rng.randint(1, 5000)])
        t = pb.Tensor(dtype=dtype, shape=[n, 64], data=good + bytes(extra))
        return Bad(f"byte count {pb.DType.Name(dtype)}", self._request(inputs=t), grpc.StatusCode.INVALID_ARGUMENT)

    def truncated(self) -> Bad:
        dtype = self.rng.choice(list(_ITEMSIZE))
        good = self._valid_tensor(dtype, self._rows())
        t = pb.Tensor(dtype=dtype, shape=good.shape, data=good.data[: self.rng.randrange(len(good.data))])
        return Bad(f"truncated {pb.DType.Name(dtype)}", self._request(inputs=t), grpc.StatusCode.INVALID_ARGUMENT)

    def negative_dim(self) -> Bad:
        dtype = self.rng.choice(list(_ITEMSIZE))
        n = self._rows()
        shape = self.rng.choice([[-n, 64], [n, -64], [-n, -64], [n, 64, -1], [-1], [-(2**63), 64]])
        t = pb.Tensor(dtype=dtype, shape=shape, data=self._valid_tensor(dtype, n).data)
        return Bad("negative dim", self._request(inputs=t), grpc.StatusCode.INVALID_ARGUMENT)

    def huge_dim(self) -> Bad:
        dtype = self.rng.choice(list(_ITEMSIZE))
        n = self._rows()
        shape = self.rng.choice([[2**40, 64], [n, 2**40], [2**40, 2**40], [2**62, 64], [2**40], [2**63 - 1, 64]])
        t = pb.Tensor(dtype=dtype, shape=shape, data=self._valid_tensor(dtype, n).data)
        return Bad("huge dim", self._request(inputs=t), grpc.StatusCode.INVALID_ARGUMENT)

    def bad_shape(self) -> Bad:
        dtype = self.rng.choice(list(_ITEMSIZE))
        n = self._rows()
        shape = self.rng.choice([[], [0], [0, 64], [n * 64], [n, 63], [n, 65], [n, 8, 8], [1, n, 64], [64, n]])
        if shape == [64, n] and n == 64:
            shape = [64, 1]
        numel = math.prod(shape) if shape else 1
        t = pb.Tensor(dtype=dtype, shape=shape, data=bytes(numel * _ITEMSIZE[dtype]))
        return Bad(f"shape {shape}", self._request(inputs=t), grpc.StatusCode.INVALID_ARGUMENT)

    def non_finite(self) -> Bad:
        n = self._rows()
        x = self._floats(n)
        for _ in range(self.rng.randint(1, 5)):
            x[self.rng.randrange(n), self.rng.randrange(64)] = self.rng.choice([math.nan, math.inf, -math.inf])
        half = self.rng.random() < 0.5
        t = to_proto(x.half() if half else x)
        kind = f"non-finite {'fp16' if half else 'fp32'}"
        return Bad(kind, self._request(inputs=t), grpc.StatusCode.INVALID_ARGUMENT)

    def unknown_teacher(self) -> Bad:
        return Bad("unknown teacher", self._request(teacher=self._junk_name({"digits"})), grpc.StatusCode.NOT_FOUND)

    def unknown_layer(self) -> Bad:
        spec = self._valid_spec()
        junk = self.rng.choice(["", "7", "-1", "layer3", "blocks.11", "0.weight", "fc", " 0", "0 ", "0.", "é"])
        junk = junk if junk not in self.teacher.layers else "no-such-layer"
        spec.features.insert(self.rng.randint(0, len(spec.features)), junk)
        return Bad("unknown layer", self._request(outputs=spec), grpc.StatusCode.INVALID_ARGUMENT)

    def bad_output_dtype(self) -> Bad:
        spec = self._valid_spec()
        value = self.rng.choice([*range(4, 13), self.rng.randint(13, 1000), -self.rng.randint(1, 99)])
        field = self.rng.choice(["logits_dtype", "features_dtype"])
        setattr(spec, field, value)
        return Bad(f"bad {field}", self._request(outputs=spec), grpc.StatusCode.INVALID_ARGUMENT)

    def bad_top_k(self) -> Bad:
        spec = self._valid_spec()
        r = self.rng
        spec.top_k = r.choice([-1, -r.randint(1, 2**31), self.classes + 1, r.randint(self.classes + 1, 2**31 - 1)])
        return Bad("bad top_k", self._request(outputs=spec), grpc.StatusCode.INVALID_ARGUMENT)

    def bad_temperature(self) -> Bad:
        spec = self._valid_spec()
        spec.probs_temperature = self.rng.choice([-1.0, -1e-30, -self.rng.uniform(0.01, 1e30), math.nan, math.inf])
        if self.rng.random() < 0.2:
            spec.probs_temperature = -math.inf
        return Bad("bad probs_temperature", self._request(outputs=spec), grpc.StatusCode.INVALID_ARGUMENT)

    def _indices(self) -> list[int]:
        return [self.rng.randrange(self.dataset_len) for _ in range(self._rows())]

    def unknown_dataset(self) -> Bad:
        ref = pb.DatasetRef(dataset=self._junk_name({"digits"}), indices=self._indices())
        return Bad("unknown dataset", self._request(ref=ref), grpc.StatusCode.NOT_FOUND)

    def bad_index(self) -> Bad:
        indices = self._indices()
        r = self.rng
        bad = r.choice([-1, -r.randint(1, 10_000), -(2**63), self.dataset_len, r.randint(self.dataset_len, 2**63 - 1)])
        indices.insert(r.randint(0, len(indices)), bad)
        seeds = [r.randrange(2**31) for _ in indices] if r.random() < 0.5 else []
        ref = pb.DatasetRef(dataset="digits", indices=indices, view_seeds=seeds)
        return Bad("index out of range", self._request(ref=ref), grpc.StatusCode.INVALID_ARGUMENT)

    def seed_count(self) -> Bad:
        indices = self._indices()
        k = self.rng.choice([n for n in range(1, len(indices) + 4) if n != len(indices)])
        ref = pb.DatasetRef(dataset="digits", indices=indices, view_seeds=[self.rng.randrange(2**31) for _ in range(k)])
        return Bad("view_seeds count", self._request(ref=ref), grpc.StatusCode.INVALID_ARGUMENT)

    def empty_ref(self) -> Bad:
        ref = pb.DatasetRef(dataset="digits", indices=[], view_seeds=[])
        return Bad("empty ref", self._request(ref=ref), grpc.StatusCode.INVALID_ARGUMENT)

    def no_input(self) -> Bad:
        return Bad("no inputs", self._request(no_input=True), grpc.StatusCode.INVALID_ARGUMENT)

    def draw(self) -> Bad:
        name = self.rng.choice(self.KINDS)
        bad = getattr(self, name)()
        bad.family = name
        return bad


@pytest.fixture()
def ref_server(teacher: Teacher):
    running: RunningServer = start_server(
        [teacher],
        port=0,
        batching=TeacherOptions(max_batch_size=64, max_queue_delay_us=500),
        datasets={"digits": load_dataset("digits", "train")},
    )
    yield running
    running.stop(grace=1)


def _bad_requests(teacher: Teacher) -> list[Bad]:
    gen = BadRequests(FUZZ_SEED, teacher, len(load_dataset("digits", "train")))
    return [gen.draw() for _ in range(FUZZ_REQUESTS)]


def test_fuzzed_malformed_requests_get_precise_refusals_and_server_keeps_serving(
    ref_server: RunningServer, teacher: Teacher
) -> None:
    bads = _bad_requests(teacher)
    assert {b.family for b in bads} == set(BadRequests.KINDS), "the fuzz does not cover every defect kind"
    channel, stub = _raw_stub(f"127.0.0.1:{ref_server.port}")
    try:
        wrong = []
        for i, bad in enumerate(bads):
            try:
                stub.Infer(bad.request, timeout=RPC_TIMEOUT)
            except grpc.RpcError as e:
                code, details = e.code(), e.details()
            else:
                code, details = grpc.StatusCode.OK, ""
            if code != bad.code or code in SERVER_FAULTS or not details:
                wrong.append(f"#{i} {bad.kind}: {code.name} {details!r} (want {bad.code.name})")
        assert not wrong, f"seed {FUZZ_SEED}: {len(wrong)} imprecise answers:\n" + "\n".join(wrong[:20])

        # Still serving, and serving the right answers (by value and by reference).
        x = torch.rand(13, 64)
        resp = stub.Infer(pb.InferRequest(teacher="digits", inputs=to_proto(x)), timeout=RPC_TIMEOUT)
        torch.testing.assert_close(from_proto(resp.outputs["logits"]), reference(teacher, x), rtol=1e-5, atol=1e-5)
        data = load_dataset("digits", "train")
        ref = pb.DatasetRef(dataset="digits", indices=[0, 5, 7], view_seeds=[1, 2, 3])
        resp = stub.Infer(pb.InferRequest(teacher="digits", ref=ref), timeout=RPC_TIMEOUT)
        want = reference(teacher, data.views([0, 5, 7], [1, 2, 3]))
        torch.testing.assert_close(from_proto(resp.outputs["logits"]), want, rtol=1e-5, atol=1e-5)
        # Nothing malformed reached the model.
        assert ref_server.endpoints["digits"].batcher.stats.requests == 2
    finally:
        channel.close()


def test_fuzzed_malformed_requests_on_a_stream_are_answered_in_band(
    ref_server: RunningServer, teacher: Teacher
) -> None:
    bads = _bad_requests(teacher)[::3]
    goods = {f"good-{i}": torch.rand(1 + i % 7, 64) for i in range(20)}
    reqs: list[pb.InferRequest] = []
    for i, bad in enumerate(bads):
        req = pb.InferRequest()
        req.CopyFrom(bad.request)
        req.request_id = f"bad-{i}"
        reqs.append(req)
        if i % 5 == 0 and len(goods) > i // 5:
            rid = f"good-{i // 5}"
            reqs.append(pb.InferRequest(request_id=rid, teacher="digits", inputs=to_proto(goods[rid])))
    sent = {r.request_id for r in reqs}
    assert {k for k in sent if k.startswith("good")} == set(goods)

    channel, stub = _raw_stub(f"127.0.0.1:{ref_server.port}")
    try:
        replies: dict[str, pb.InferResponse] = {}
        for resp in stub.InferStream(iter(reqs), timeout=30):
            assert resp.request_id not in replies, f"two replies for {resp.request_id}"
            replies[resp.request_id] = resp
    finally:
        channel.close()
    assert set(replies) == sent
    wrong = []
    for i, bad in enumerate(bads):
        r = replies[f"bad-{i}"]
        code = r.error.code
        if not r.HasField("error") or code != bad.code.value[0] or code in SERVER_FAULT_VALUES or not r.error.message:
            wrong.append(f"bad-{i} {bad.kind}: error={r.error.code} {r.error.message!r} outputs={list(r.outputs)}")
        if r.outputs:
            wrong.append(f"bad-{i} {bad.kind}: outputs {list(r.outputs)} alongside an error")
    assert not wrong, f"seed {FUZZ_SEED}:\n" + "\n".join(wrong[:20])
    for rid, x in goods.items():
        assert not replies[rid].HasField("error"), replies[rid].error
        torch.testing.assert_close(
            from_proto(replies[rid].outputs["logits"]), reference(teacher, x), rtol=1e-5, atol=1e-5
        )


# -- 2. overload of a bounded queue --------------------------------------------------------------


def test_overload_gets_correct_answers_or_resource_exhausted_with_bounded_queue(teacher: Teacher) -> None:
    queue_size, clients, per_client, rows = 16, 24, 10, 8
    running = start_server(
        [teacher],
        port=0,
        batching=TeacherOptions(max_batch_size=8, max_queue_size=queue_size, max_queue_delay_us=0),
    )
    batcher = running.endpoints["digits"].batcher
    forward = batcher.runner.forward

    def slow(x, layers):
        time.sleep(0.005)
        return forward(x, layers)

    batcher.runner.forward = slow
    address = f"127.0.0.1:{running.port}"
    results: list[list[tuple[torch.Tensor, object]]] = [[] for _ in range(clients)]
    barrier = threading.Barrier(clients)

    def one(i: int) -> None:
        g = torch.Generator().manual_seed(i)
        with TeacherClient(address, timeout=RPC_TIMEOUT) as c:
            c.wait_ready(timeout=RPC_TIMEOUT)
            barrier.wait(timeout=RPC_TIMEOUT)
            for _ in range(per_client):
                x = torch.rand(rows, 64, generator=g)
                try:
                    results[i].append((x, c.infer("digits", x)["logits"]))
                except TeacherRequestError as e:
                    results[i].append((x, e))

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(clients)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "clients hung"
    finally:
        running.stop(grace=1)

    assert [len(r) for r in results] == [per_client] * clients, "a client thread failed before finishing"
    ok = exhausted = 0
    for x, out in (item for r in results for item in r):
        if isinstance(out, TeacherRequestError):
            assert out.code == grpc.StatusCode.RESOURCE_EXHAUSTED, out
            assert "queue full" in out.message
            exhausted += 1
        else:
            torch.testing.assert_close(out, reference(teacher, x), rtol=1e-5, atol=1e-5)
            ok += 1
    assert ok >= 1 and exhausted >= 1, f"ok={ok} exhausted={exhausted}"
    stats = batcher.stats
    assert stats.max_queued_samples <= queue_size, stats
    assert stats.rejected == exhausted and stats.requests == ok, (stats, ok, exhausted)
    assert stats.samples == ok * rows


# -- 3. SIGTERM under load ------------------------------------------------------------------------


@dataclass
class Outcome:
    x: torch.Tensor
    code: grpc.StatusCode
    logits: torch.Tensor | None
    details: str
    sent: float
    done: float


def _not_accepted(o: Outcome, signalled: float) -> bool:
    """Whether a failed call is one the draining server never accepted.

    What gRPC (core 1.85, Python server) reports, checked against a servicer
    instrumented to record every request it saw:

    * ``server.stop(grace)`` stops listening and sends GOAWAY; the client retries a
      call on a new connection, which is refused: UNAVAILABLE "failed to connect to
      all addresses ... Connection refused" (likewise once the process is gone).
    * A call whose stream reached the server core in the instant shutdown began,
      but that had not been handed to the application yet, is killed as a "zombie"
      (src/core/server/server.cc: Server::CallData::KillZombie from StartNewRpc /
      PublishNewRpc when ShutdownCalled(), or KillPendingWorkLocked ->
      ZombifyPending): its stream is reset and the client sees CANCELLED with the
      bare details "CANCELLED". Such calls never reached TeacherServicer.Infer.

    An *accepted* call lost by the drain looks different: UNAVAILABLE "Cancelling
    all calls" (grace ran out: cancel_all_calls), UNAVAILABLE "Stream removed
    (Socket closed)" (the process died mid-call), or UNKNOWN/INTERNAL/CANCELLED
    with other details from the handler; all of those fail the test.
    """
    if o.code == grpc.StatusCode.UNAVAILABLE:
        # Refused by the draining server itself (it answers new calls while gRPC still listens),
        # or by the closed port.
        return o.details.startswith(("failed to connect to all addresses", "the server is draining"))
    if o.code == grpc.StatusCode.CANCELLED:
        return o.details == "CANCELLED" and o.done >= signalled
    if o.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        # The client's own deadline (bare details) on a call made after the signal: seen once in
        # ~30 clean-clone CI runs, a new call held by gRPC while the server shut down. That the
        # server never accepted it is proved by the test, not assumed: the server's own count of
        # accepted requests must equal the calls answered OK.
        return o.details == "Deadline Exceeded" and o.sent >= signalled
    return False


@pytest.mark.serial
def test_sigterm_under_load_answers_every_accepted_request(tmp_path: Path, teacher: Teacher, teacher_spec: str):
    port_file = tmp_path / "port"
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kd", "serve", "--teacher", f"digits={teacher_spec}", "--port", "0",
             "--port-file", str(port_file), "--max-batch-size", "8", "--max-queue-delay-us", "0"],
            stdout=log, stderr=subprocess.STDOUT, env=ENV,
        )  # fmt: skip
    stop = threading.Event()
    clients = 6
    outcomes: list[list[Outcome]] = [[] for _ in range(clients)]
    threads: list[threading.Thread] = []
    try:
        deadline = time.monotonic() + 45
        while not port_file.exists():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "kd serve did not start"
            time.sleep(0.05)
        address = f"127.0.0.1:{port_file.read_text()}"
        channel, stub = _raw_stub(address)
        with channel:
            stub.ListTeachers(pb.ListTeachersRequest(), timeout=RPC_TIMEOUT, wait_for_ready=True)

        def load(i: int) -> None:
            # No wait_for_ready and no retry policy: once the server stops listening,
            # a call fails at once with UNAVAILABLE instead of waiting or being retried.
            ch, st = _raw_stub(address)
            g = torch.Generator().manual_seed(i)
            rng = random.Random(i)
            try:
                while not stop.is_set():
                    x = torch.rand(rng.randint(1, 200), 64, generator=g)
                    sent = time.monotonic()
                    try:
                        resp = st.Infer(pb.InferRequest(teacher="digits", inputs=to_proto(x)), timeout=RPC_TIMEOUT)
                    except grpc.RpcError as e:
                        outcomes[i].append(Outcome(x, e.code(), None, e.details() or "", sent, time.monotonic()))
                        time.sleep(0.01)
                    else:
                        logits = from_proto(resp.outputs["logits"])
                        outcomes[i].append(Outcome(x, grpc.StatusCode.OK, logits, "", sent, time.monotonic()))
            finally:
                ch.close()

        threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(clients)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # And a second one during the drain, as a shell's EXIT trap sends after `kill $SERVER`: it
        # is caught and ignored, so the drain is neither cut short nor hung (kd.core.signals).
        time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        time.sleep(0.2)  # a few calls against the closed port
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=RPC_TIMEOUT + 5)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert rc == 0, log_path.read_text()
    drained = re.search(r"drained: (\d+) requests? accepted, (\d+) unanswered", log_path.read_text())
    assert drained, log_path.read_text()
    accepted, unanswered = int(drained[1]), int(drained[2])
    assert unanswered == 0

    flat = [o for per in outcomes for o in per]
    codes: dict[str, int] = {}
    for o in flat:
        codes[o.code.name] = codes.get(o.code.name, 0) + 1
    unexpected = [o for o in flat if o.code != grpc.StatusCode.OK and not _not_accepted(o, signalled)]
    assert not unexpected, (
        codes,
        [(o.code.name, o.details, round(o.sent - signalled, 4), round(o.done - signalled, 4)) for o in unexpected[:10]],
    )
    oks = [o for o in flat if o.code == grpc.StatusCode.OK]
    assert len(oks) >= clients, codes
    # Every request the server accepted was answered OK (none lost, none failed by the drain).
    assert accepted == len(oks), (accepted, codes)
    for o in oks:
        torch.testing.assert_close(o.logits, reference(teacher, o.x), rtol=1e-5, atol=1e-5)
    # The calls made after the process was gone were refused.
    assert any(o.code == grpc.StatusCode.UNAVAILABLE for o in flat), codes


# -- 4. a deadline that passes while the request is queued ---------------------------------------


@pytest.mark.serial
def test_deadline_passing_while_queued_ends_the_call_without_a_handler_exception(
    teacher: Teacher, caplog: pytest.LogCaptureFixture
) -> None:
    running = start_server([teacher], port=0, batching=TeacherOptions(max_batch_size=8, max_queue_delay_us=0))
    batcher = running.endpoints["digits"].batcher
    forward = batcher.runner.forward

    def slow(x, layers):
        time.sleep(0.3)
        return forward(x, layers)

    batcher.runner.forward = slow
    channel, stub = _raw_stub(f"127.0.0.1:{running.port}")
    codes = []
    try:
        stub.ListTeachers(pb.ListTeachersRequest(), timeout=RPC_TIMEOUT, wait_for_ready=True)
        with caplog.at_level(logging.ERROR, logger="grpc._server"):
            # 8 forwards of 0.3 s queued at once: the last ones are still queued when the 0.5 s deadline passes.
            req = pb.InferRequest(teacher="digits", inputs=to_proto(torch.rand(8, 64)))
            futures = [stub.Infer.future(req, timeout=0.5) for _ in range(8)]
            for f in futures:
                try:
                    f.result(timeout=RPC_TIMEOUT)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as e:
                    codes.append(e.code())
            deadline = time.monotonic() + RPC_TIMEOUT
            while (batcher.stats.cancelled < 1 or batcher.queued_samples) and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.3)  # the handlers of the expired calls have long returned (or raised) by now
    finally:
        running.stop(grace=2)
        channel.close()
    # Preconditions (pytest.fail, not assert: these must not count as the expected failure).
    if grpc.StatusCode.DEADLINE_EXCEEDED not in codes or batcher.stats.cancelled < 1:
        pytest.fail(f"no request was cancelled in the queue by its deadline: {codes}, {batcher.stats}")
    raised = [r for r in caplog.records if "Exception calling application" in r.getMessage()]
    assert not raised, f"{len(raised)} handler(s) raised: {raised[0].exc_text or raised[0].getMessage()}"
