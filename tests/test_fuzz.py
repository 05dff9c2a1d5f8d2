"""A seeded fuzz of the teacher server over real loopback gRPC (issue 14): raw-byte bodies
(random, truncated, bit-flipped, of another message type) and mutated requests (extreme
numbers, odd names, reductions with odd arguments, broken tensors) on every RPC, and
streams mixing them with good requests. The server must never answer UNKNOWN or INTERNAL,
never answer OK with a non-finite number, answer every stream message in-band, and still
answer correctly afterwards. Bounded in count and time (a few seconds on 2 cores)."""

from __future__ import annotations

import collections
import math
import random
import time

import grpc
import pytest
import torch

from kd.core.data import load_dataset
from kd.core.wire import from_proto, to_proto
from kd.teacher_server.loading import Teacher, load_teacher
from kd.teacher_server.server import RunningServer, TeacherOptions, start_server
from kd.v1 import teacher_pb2 as pb

SEED = 14_2026
UNARY_CALLS = 1000
STREAMS = 20
BUDGET_S = 25.0  # the fuzz stops drawing new cases after this long
T = 10.0
SERVER_FAULTS = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
SERVICE = "/kd.v1.TeacherService/"

NUMBERS = [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1e-40, -1e-40, 1e-3, 1e30, -1e30, 1e308, math.nan, math.inf, -math.inf,
           3.4e38, 2**31 - 1, -(2**31), 2**63 - 1, 200, 17]  # fmt: skip
INTS = [0, 1, -1, 2, 3, 7, 10, 11, 64, 1025, 5000, 2**31 - 1, -(2**31)]
REDUCTIONS = ["pool", "at", "adain", "nst", "fsp", "sp", "cc", "nope", ""]
ARGS = ["", "2", "0.4", "nan", "inf", "-1", "1e308", "200", "0.4:200", "0.4:2", "2.5", "layer1", "0", "x:y:z"]


class Fuzzer:
    def __init__(self, seed: int, mlp: Teacher, cnn: Teacher) -> None:
        self.r = random.Random(seed)
        self.teachers = {"digits": mlp, "cnn": cnn}

    # -- pieces ---------------------------------------------------------------------------
    def name(self, valid: list[str]) -> str:
        r = self.r
        return r.choice([*valid, *valid, "", "nope", "é" * 3, "x" * r.choice([1, 300, 20_000]), "\x00", "a@b"])

    def feature(self, layers: list[str]) -> str:
        r = self.r
        layer = r.choice([*layers, *layers, "", "ghost"])
        if r.random() < 0.3:
            return layer
        arg = r.choice(ARGS)
        return f"{layer}@{r.choice(REDUCTIONS)}" + (f":{arg}" if arg else "")

    def tensor(self, shape: list[int], *, valid: float = 0.7) -> pb.Tensor:
        r = self.r
        g = torch.Generator().manual_seed(r.randrange(2**31))
        x = torch.randn(*shape, generator=g) * r.choice([1.0, 1.0, 1e3, 1e30])
        if r.random() < 0.15:
            x.view(-1)[r.randrange(x.numel())] = r.choice([math.nan, math.inf])
        msg = to_proto(x if r.random() < 0.8 else x.half())
        if r.random() > valid:
            choice = r.randrange(4)
            if choice == 0:
                msg.dtype = r.choice([0, 3, 4, 5, 6, 9, 12, 13, 999, -1])
            elif choice == 1:
                msg.shape[:] = [r.choice(INTS) for _ in range(r.randint(0, 4))]
            elif choice == 2:
                msg.data = msg.data[: r.randrange(len(msg.data) + 1)]
            else:
                msg.shape[0] = r.choice([0, -1, 2**40, 2**62])
        return msg

    def inputs(self, teacher: str, n: int | None = None) -> pb.Tensor:
        n = n or self.r.randint(1, 6)
        return self.tensor([n, *self.teachers.get(teacher, self.teachers["digits"]).input_shape])

    # -- one valid-ish request per RPC, then mutated ---------------------------------------
    def infer(self) -> pb.InferRequest:
        r = self.r
        teacher = self.name(list(self.teachers))
        layers = list(self.teachers.get(teacher, self.teachers["digits"]).layers)
        spec = pb.OutputSpec(
            logits=r.random() < 0.6,
            logits_dtype=r.choice([0, 1, 2, 3, 5, 77]),
            top_k=r.choice(INTS[:8]),
            probs_temperature=r.choice([0.0, 0.0, 2.0, *NUMBERS]),
            features=[self.feature(layers) for _ in range(r.randint(0, 3))],
            pool_features=r.random() < 0.3,
            features_dtype=r.choice([0, 1, 2, 3, 9]),
            labels=r.random() < 0.2,
        )
        req = pb.InferRequest(request_id=str(r.randrange(1000)), teacher=teacher, outputs=spec)
        if r.random() < 0.2:
            req.ref.dataset = r.choice(["digits", "digits", "nope", "x" * 5000])
            req.ref.indices[:] = [r.choice([0, 1, 5, 1196, 1197, -1, 2**62]) for _ in range(r.randint(0, 4))]
            if r.random() < 0.5:
                req.ref.view_seeds[:] = [r.choice([0, 1, 2**40, -5]) for _ in range(r.randint(0, 4))]
        else:
            req.inputs.CopyFrom(self.inputs(teacher, r.choice([None, None, 1, 300, 5000])))
        return req

    def gradient(self) -> pb.GradientRequest:
        r = self.r
        teacher = r.choice(["cnn", "digits", "ghost"])
        t = self.teachers.get(teacher, self.teachers["cnn"])
        n = r.randint(1, 4)
        req = pb.GradientRequest(teacher=teacher, inputs=self.inputs(teacher, n), return_outputs=r.random() < 0.5)
        for _ in range(r.randint(0, 2)):
            key = r.choice(["logits", "logits", *(f"feature/{k}" for k in list(t.layers)[:3]), "feature/ghost", ""])
            shape = [n, t.num_classes] if key == "logits" else [n, *t.layers.get(key[8:], (3,))]
            req.upstream[key].CopyFrom(self.tensor(shape, valid=0.8))
        return req

    def bn_loss(self) -> pb.BatchNormLossRequest:
        r = self.r
        teacher = r.choice(["cnn", "cnn", "digits"])
        req = pb.BatchNormLossRequest(teacher=teacher, inputs=self.inputs(teacher, r.choice([1, 2, 4, 2000])))
        if r.random() < 0.5:
            req.momentum = r.choice(NUMBERS)
        if r.random() < 0.4:
            req.state_id = self.name(["s1", "s2"])
            req.ttl_seconds = r.choice([*NUMBERS, 60.0])
        if r.random() < 0.5:
            req.layer_weights[:] = [r.choice([*NUMBERS, 1.0, 1.0]) for _ in range(r.randint(0, 8))]
        if r.random() < 0.3:
            req.upstream_logits.CopyFrom(self.tensor([r.choice([1, 2, 4]), 10], valid=0.8))
        return req

    def synthesis(self) -> pb.SynthesisRequest:
        r = self.r
        return pb.SynthesisRequest(
            teacher=r.choice(["cnn", "digits", "ghost"]),
            batch_size=r.choice([0, 1, 2, 3, -1, 1025, 2**31 - 1]),
            targets=[r.choice([0, 1, 9, 10, -1, 2**40]) for _ in range(r.choice([0, 0, 1, 2, 3]))],
            iterations=r.choice([0, 1, 2, 3, -1, 6, 2**31 - 1]),
            lr=r.choice([0.05, 0.05, *NUMBERS]),
            bn_weight=r.choice([1.0, *NUMBERS]),
            tv_weight=r.choice([1e-4, *NUMBERS]),
            l2_weight=r.choice([1e-5, *NUMBERS]),
            seed=r.choice([0, 1, 2**64 - 1]),
            report_every=r.choice([0, 1, -1, 2**31 - 1]),
        )

    def small(self, rpc: str):
        cls = {"ListTeachers": pb.ListTeachersRequest, "GetBatchNormStats": pb.BatchNormStatsRequest,
               "GetActivationRecords": pb.ActivationRecordsRequest}[rpc]  # fmt: skip
        return cls() if rpc == "ListTeachers" else cls(teacher=self.name(list(self.teachers)))

    def message(self, rpc: str):
        return {"Infer": self.infer, "InputGradient": self.gradient, "BatchNormLoss": self.bn_loss,
                "Synthesize": self.synthesis}.get(rpc, lambda: self.small(rpc))()  # fmt: skip

    def body(self, rpc: str) -> bytes:
        """Raw bytes: a (mutated) message, or one broken at the byte level."""
        r = self.r
        data = self.message(rpc).SerializeToString()
        kind = r.randrange(6)
        if kind == 0:
            return bytes(r.randrange(256) for _ in range(r.randint(0, 64)))
        if kind == 1 and data:
            return data[: r.randrange(len(data))]
        if kind == 2 and data:
            b = bytearray(data)
            for _ in range(r.randint(1, 4)):
                b[r.randrange(len(b))] ^= 1 << r.randrange(8)
            return bytes(b)
        if kind == 3:
            other = r.choice(["Infer", "InputGradient", "BatchNormLoss", "Synthesize"])
            return self.message(other).SerializeToString()
        return data


def _finite_outputs(rpc: str, data: bytes) -> list[str]:
    """Non-finite numbers in an OK answer (must be none)."""
    bad = []
    if rpc in ("Infer", "InputGradient"):
        msg = (pb.InferResponse if rpc == "Infer" else pb.GradientResponse).FromString(data)
        tensors = dict(msg.outputs)
        if rpc == "InputGradient":
            tensors["input_grad"] = msg.input_grad
        for k, v in tensors.items():
            t = from_proto(v)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad.append(k)
    elif rpc == "BatchNormLoss":
        msg = pb.BatchNormLossResponse.FromString(data)
        if not math.isfinite(msg.loss) or not bool(torch.isfinite(from_proto(msg.input_grad)).all()):
            bad.append("loss")
    elif rpc == "Synthesize":
        msg = pb.SynthesisUpdate.FromString(data)
        if not math.isfinite(msg.loss) or (msg.done and not bool(torch.isfinite(from_proto(msg.inputs)).all())):
            bad.append(f"iteration {msg.iteration}")
    return bad


@pytest.fixture(scope="module")
def fuzz_server(teacher: Teacher):
    torch.manual_seed(0)
    cnn = load_teacher("cnn", "kd.models:digits_cnn")
    opts = TeacherOptions(max_batch_size=64, max_queue_delay_us=200, max_synthesis_iterations=6, max_gradient_batch=64)
    running = start_server(
        [teacher, cnn],
        port=0,
        batching=opts,
        datasets={"digits": load_dataset("digits", "train")},
        max_message_bytes=8 << 20,
    )
    yield running, Fuzzer(SEED, teacher, cnn)
    running.stop(grace=1)


RPCS = ["Infer", "Infer", "Infer", "InputGradient", "BatchNormLoss", "Synthesize", "ListTeachers",
        "GetBatchNormStats", "GetActivationRecords"]  # fmt: skip


def test_fuzzed_bodies_and_streams_get_no_unknown_no_internal_no_nan(fuzz_server, teacher: Teacher) -> None:
    running: RunningServer
    running, fz = fuzz_server
    channel = grpc.insecure_channel(
        f"127.0.0.1:{running.port}",
        options=[("grpc.max_send_message_length", 16 << 20), ("grpc.max_receive_message_length", 16 << 20)],
    )
    codes: collections.Counter = collections.Counter()
    faults: list[str] = []
    started = time.monotonic()
    try:
        for i in range(UNARY_CALLS):
            if time.monotonic() - started > BUDGET_S:
                break
            rpc = fz.r.choice(RPCS)
            body = fz.body(rpc)
            try:
                if rpc == "Synthesize":
                    call = channel.unary_stream(SERVICE + rpc, request_serializer=None, response_deserializer=None)
                    answers = list(call(body, timeout=T))
                else:
                    call = channel.unary_unary(SERVICE + rpc, request_serializer=None, response_deserializer=None)
                    answers = [call(body, timeout=T)]
            except grpc.RpcError as e:
                code, details = e.code(), e.details() or ""
                if code in SERVER_FAULTS or not details:
                    faults.append(f"#{i} {rpc}: {code.name} {details[:300]!r}")
            else:
                code = grpc.StatusCode.OK
                for a in answers:
                    bad = _finite_outputs(rpc, a)
                    if bad:
                        faults.append(f"#{i} {rpc}: OK with NaN/Inf in {bad}")
            codes[code.name] += 1

        # Streams: good requests, mutated ones and raw garbage mixed; every message answered in-band.
        stream = channel.stream_stream(SERVICE + "InferStream", request_serializer=None,
                                       response_deserializer=pb.InferResponse.FromString)  # fmt: skip
        good_x = torch.rand(3, 64)
        good = pb.InferRequest(request_id="good", teacher="digits", inputs=to_proto(good_x)).SerializeToString()
        want = torch.inference_mode()(teacher.model)(good_x)
        for s in range(STREAMS):
            bodies = [good if fz.r.random() < 0.3 else fz.body("Infer") for _ in range(fz.r.randint(5, 20))]
            try:
                replies = list(stream(iter(bodies), timeout=T))
            except grpc.RpcError as e:
                faults.append(f"stream {s}: ended {e.code().name} {(e.details() or '')[:300]!r}")
                continue
            if len(replies) != len(bodies):
                faults.append(f"stream {s}: {len(replies)} replies for {len(bodies)} messages")
            for body, reply in zip(bodies, replies):
                if reply.HasField("error"):
                    codes[f"stream {grpc.StatusCode(_status(reply.error.code)).name}"] += 1
                    if reply.error.code in (2, 13) or not reply.error.message:
                        faults.append(f"stream {s}: in-band {reply.error.code} {reply.error.message[:300]!r}")
                else:
                    codes["stream OK"] += 1
                    bad = _finite_outputs("Infer", reply.SerializeToString())
                    if bad:
                        faults.append(f"stream {s}: OK with NaN/Inf in {bad}")
                    if body is good:
                        torch.testing.assert_close(from_proto(reply.outputs["logits"]), want, rtol=1e-5, atol=1e-5)
        elapsed = time.monotonic() - started
        print(f"fuzz: {dict(codes)} in {elapsed:.1f}s")
        assert not faults, f"seed {SEED}: {len(faults)} faults in {dict(codes)}:\n" + "\n".join(faults[:20])
        assert codes["OK"] >= 10 and codes["INVALID_ARGUMENT"] >= 100 and codes["stream OK"] >= 10, dict(codes)
        assert elapsed < 60, elapsed

        # Still serving, and serving the right answers.
        x = torch.rand(13, 64)
        call = channel.unary_unary(SERVICE + "Infer", request_serializer=pb.InferRequest.SerializeToString,
                                   response_deserializer=pb.InferResponse.FromString)  # fmt: skip
        resp = call(pb.InferRequest(teacher="digits", inputs=to_proto(x)), timeout=T)
        torch.testing.assert_close(from_proto(resp.outputs["logits"]), torch.inference_mode()(teacher.model)(x),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
        assert running.servicer.streams.open == 0 or _settled(running)
    finally:
        channel.close()


def _status(value: int) -> tuple:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code.value
    return grpc.StatusCode.UNKNOWN.value


def _settled(running: RunningServer) -> bool:
    deadline = time.monotonic() + T
    while running.servicer.streams.open and time.monotonic() < deadline:
        time.sleep(0.02)
    return running.servicer.streams.open == 0
