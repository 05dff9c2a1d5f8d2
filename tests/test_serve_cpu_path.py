"""The unary path's cheaper parsing: a large request's input payload read as a view of the
body (``kd.core.wire.split_payload``: the same message and tensor as parsing it whole, or
the plain parse where the body is irregular), for image, uint8 and token inputs. Real
servers on loopback, real models."""

from __future__ import annotations

import random
import re
import threading
import time

import pytest
import torch
from gates import HeldForward
from prometheus_client import generate_latest
from torch import nn

from kd.bench.serve import free_image_teacher
from kd.core.wire import from_proto, split_payload
from kd.teacher_server.client import TeacherClient, encode_request, make_request, spec_of
from kd.teacher_server.loading import load_teacher
from kd.teacher_server.server import TeacherOptions, start_server
from kd.v1 import teacher_pb2 as pb

INPUTS = pb.InferRequest.DESCRIPTOR.fields_by_name["inputs"].number


def _parsed(body: bytes) -> pb.InferRequest | str:
    try:
        return pb.InferRequest.FromString(body)
    except Exception as e:  # noqa: BLE001 - compared, not swallowed
        return type(e).__name__


def _via_split(body: bytes) -> pb.InferRequest | str | None:
    parts = split_payload(body, INPUTS)
    if parts is None:
        return None
    msg = _parsed(parts[0])
    if isinstance(msg, pb.InferRequest) and msg.WhichOneof("input") == "inputs":
        msg.inputs.data = bytes(parts[1])
    return msg


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.bfloat16], ids=str)
def test_split_payload_gives_the_parsed_message_and_tensor(dtype: torch.dtype) -> None:
    x = (torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(1)) * 255).to(dtype)
    spec = spec_of(top_k=3, temperature=2.0)
    for body in (encode_request("t", x, None, spec, "id-7"), make_request("t", x, None, spec, "r").SerializeToString()):
        rest, view = split_payload(body, INPUTS)
        assert len(rest) < 200 and view.nbytes == x.numel() * x.element_size()
        assert _via_split(body) == pb.InferRequest.FromString(body)
        assert torch.equal(from_proto(pb.InferRequest.FromString(rest).inputs, copy=False, data=view), x)


def test_split_payload_declines_irregular_bodies_and_never_changes_a_parse() -> None:
    body = encode_request("t", torch.arange(3000, dtype=torch.uint8).view(30, 100), None, spec_of())
    assert split_payload(body[:-1], INPUTS) is None  # truncated
    assert split_payload(body + body[body.index(b"\x1a") :], INPUTS) is None  # the inputs field twice
    assert split_payload(make_request("t", None, _ref(), spec_of()).SerializeToString(), INPUTS) is None
    assert split_payload(b"\x1b\x1c" + body, INPUTS) is None  # a group
    assert split_payload(b"\x18\x05" + body[2:], INPUTS) is None  # inputs as a varint
    rng = random.Random(0)
    split = 0
    for _ in range(400):  # corrupted bodies: the split path parses exactly what the parser does
        b = bytearray(body)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(60) if rng.random() < 0.8 else rng.randrange(len(b))] = rng.randrange(256)
        got = _via_split(bytes(b))
        if got is not None:
            split += 1
            assert got == _parsed(bytes(b))
    assert split > 100


def _ref():
    from kd.teacher_server.client import DatasetRef

    return DatasetRef("d", [1, 2])


def test_large_uint8_batches_are_answered_from_their_own_payloads() -> None:
    teacher = load_teacher("img", "kd.bench.serve:free_image_teacher")
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    opts = TeacherOptions(max_batch_size=4, max_queue_delay_us=0, warmup=False, mean=mean, std=std)
    running = start_server([teacher], options={"img": opts})
    model = free_image_teacher()
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def want(u8: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model((u8.float() / 255.0 - m) / s)

    g = torch.Generator().manual_seed(5)
    low = torch.randint(0, 100, (2, 3, 224, 224), dtype=torch.uint8, generator=g)  # 2 x 602 KB as float32
    high = torch.randint(150, 256, (2, 3, 224, 224), dtype=torch.uint8, generator=g)
    split = torch.randint(0, 256, (6, 3, 224, 224), dtype=torch.uint8, generator=g)  # over max_batch_size
    try:
        with TeacherClient(f"127.0.0.1:{running.port}", timeout=60) as client:
            for u8 in (low, high, low, split, high):
                got = client.infer("img", u8)["logits"]
                torch.testing.assert_close(got, want(u8), rtol=1e-5, atol=1e-6)
            x = torch.rand(2, 3, 224, 224, generator=g)
            torch.testing.assert_close(client.infer("img", x)["logits"], model(x), rtol=1e-5, atol=1e-6)
            streamed = dict(client.infer_stream("img", [("high", high), ("low", low)], depth=2))
            for key, u8 in (("high", high), ("low", low)):  # InferStream splits large bodies too
                torch.testing.assert_close(streamed[key]["logits"], want(u8), rtol=1e-5, atol=1e-6)
    finally:
        running.stop(grace=1)


class _TinyLM(nn.Module):
    tokenizer_hash = "byte-test"

    def __init__(self, vocab: int, max_length: int) -> None:
        super().__init__()
        self.max_length = max_length
        self.embed = nn.Embedding(vocab, 16)
        self.head = nn.Linear(16, vocab)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens).cumsum(1)))


def tiny_lm(vocab: int = 50, max_length: int = 16) -> _TinyLM:
    torch.manual_seed(2)
    return _TinyLM(vocab, max_length)


def test_a_large_token_request_is_decoded_from_the_split_payload() -> None:
    teacher = load_teacher("lm", f"{__name__}:tiny_lm?vocab=50&input_shape=-1")
    running = start_server([teacher], batching=TeacherOptions(max_batch_size=1024, max_batch_tokens=16384,
                                                              warmup=False))  # fmt: skip
    ids = torch.randint(0, 50, (600, 16), generator=torch.Generator().manual_seed(4))  # 76.8 KB of int64
    assert split_payload(encode_request("lm", ids, None, spec_of()), INPUTS) is not None
    try:
        with TeacherClient(f"127.0.0.1:{running.port}", timeout=60) as client:
            out = client.infer_tokens("lm", ids, labels=True)
        with torch.inference_mode():
            want = teacher.model(ids).argmax(-1)  # every position's label
        assert torch.equal(out.dense("labels").long(), want)
    finally:
        running.stop(grace=1)


def test_a_remembered_output_spec_is_still_checked_per_teacher_and_per_size() -> None:
    """Output specs that passed are remembered by their bytes (``_checked_spec``); a later
    request with the same spec must still be refused where its answer would be too large,
    and the same bytes sent to a LABELS-tier teacher must still be refused logits; a
    refused spec is refused every time."""
    import grpc

    from kd.teacher_server.client import TeacherRequestError
    from kd.teacher_server.loading import Teacher, fingerprint

    torch.manual_seed(0)
    model = nn.Linear(1, 1000).eval()  # 4 B in, 4,000 B of logits out per sample
    cpu = torch.device("cpu")
    white, labels = (Teacher(name, model, fingerprint(model), (1,), torch.float32, 1000, cpu, "test", {})
                     for name in ("white", "labels"))  # fmt: skip
    opts = TeacherOptions(max_batch_size=64, max_queue_delay_us=0, warmup=False)
    running = start_server(
        [white, labels],
        options={
            "white": opts,
            "labels": TeacherOptions(max_batch_size=64, max_queue_delay_us=0, warmup=False, access="labels"),
        },  # fmt: skip
        max_message_bytes=64 << 10,  # room for 15 samples' logits
    )
    try:
        with TeacherClient(f"127.0.0.1:{running.port}", timeout=30) as client:
            small, large = torch.rand(8, 1), torch.rand(32, 1)
            with torch.inference_mode():
                want = model(small)
            for _ in range(2):  # the second time from the remembered spec
                torch.testing.assert_close(client.infer("white", small, logits=True)["logits"], want)
                with pytest.raises(TeacherRequestError) as err:
                    client.infer("white", large, logits=True)
                assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "over the server's message limit" in str(err.value)
                with pytest.raises(TeacherRequestError) as err:
                    client.infer("labels", small, logits=True)
                assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
                with pytest.raises(TeacherRequestError) as err:
                    client.infer("white", small, top_k=1001)
                assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
                assert "top_k=1001" in str(err.value)
            ep = running.endpoints["white"]
            assert len(ep.spec_cache) == 1 and not running.endpoints["labels"].spec_cache
            # A spec with the request's own uniforms is not remembered: its bytes are the request's
            # data (up to the message limit), and each new set pinned one more payload for good.
            for i in range(3):
                u = torch.rand(8, 16, dtype=torch.float64)
                got = client.infer("white", small, logits=False, samples=16, sample_uniforms=u)
                assert bool((got["sample_counts"].sum(dim=-1) == 16).all()), i
            assert len(ep.spec_cache) == 1
    finally:
        running.stop(grace=1)


class _Costly(nn.Module):
    """~3 ms of CPU a forward whatever the batch (a 300 x 300 matmul, twice), then a linear map."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 4)
        self.register_buffer("a", torch.rand(300, 300, generator=torch.Generator().manual_seed(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        burn = (self.a @ self.a @ self.a).mean() * 0.0
        return self.head(x) + burn


def _served(model: nn.Module, name: str):
    from kd.teacher_server.loading import Teacher, fingerprint

    teacher = Teacher(name, model.eval(), fingerprint(model), (8,), torch.float32, 4, torch.device("cpu"), "test", {})
    opts = TeacherOptions(max_batch_size=64, max_queue_delay_us=0, warmup=True)  # inline path on
    return start_server([teacher], options={name: opts})


def _hammer(port: int, name: str, clients: int, per_client: int, bad_every: int = 0) -> dict:
    """``clients`` threads, each ``per_client`` batch-1 requests of its own inputs (every
    ``bad_every``-th of a wrong shape) -> {(client, i): logits or the error code}."""

    from kd.teacher_server.client import TeacherRequestError

    out: dict = {}

    def run(c: int) -> None:
        with TeacherClient(f"127.0.0.1:{port}", timeout=10) as client:
            for i in range(per_client):
                if bad_every and i % bad_every == bad_every - 1:
                    try:
                        client.infer(name, torch.zeros(1, 7))
                        out[(c, i)] = "OK"
                    except TeacherRequestError as e:
                        out[(c, i)] = e.code.name
                    continue
                x = torch.full((1, 8), float(c * 1000 + i))
                out[(c, i)] = client.infer(name, x)["logits"]

    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a client hung: the small-work lock was not let go"
    assert len(out) == clients * per_client, f"{clients * per_client - len(out)} requests failed (see the warnings)"
    return out


def test_concurrent_small_requests_each_get_their_own_answer_and_errors_let_the_lock_go() -> None:
    """Small requests are decoded, run (a cheap forward) and encoded one handler at a time
    (``TeacherServicer._small_work``): each still gets the answer to its own inputs, and a
    refused request (decoded under the lock) does not keep the others waiting."""
    torch.manual_seed(3)
    model = nn.Linear(8, 4)
    running = _served(model, "cheap")
    try:
        got = _hammer(running.port, "cheap", clients=5, per_client=24, bad_every=6)
        with torch.inference_mode():
            for (c, i), v in got.items():
                if i % 6 == 5:
                    assert v == "INVALID_ARGUMENT"
                else:
                    torch.testing.assert_close(v, model(torch.full((1, 8), float(c * 1000 + i))))
        assert running.endpoints["cheap"].batcher.forward_cpu_s < 0.0005  # the cheap path was taken
    finally:
        running.stop(grace=1)


def test_requests_arriving_during_a_costly_inline_forward_merge_into_one_forward() -> None:
    """The lock is not held across a costly forward (``forward_cpu_s`` over 0.5 ms): requests
    arriving meanwhile queue and merge, so there are fewer forwards than requests."""
    model = _Costly()
    running = _served(model, "costly")
    try:
        got = _hammer(running.port, "costly", clients=6, per_client=10)
        with torch.inference_mode():
            for (c, i), v in got.items():
                torch.testing.assert_close(v, model(torch.full((1, 8), float(c * 1000 + i))))
        batcher = running.endpoints["costly"].batcher
        assert batcher.forward_cpu_s > 0.0005
        assert batcher.stats.requests >= 60
        assert batcher.stats.forwards < 0.8 * batcher.stats.requests, batcher.stats
    finally:
        running.stop(grace=1)


def _two_cheap_teachers(delay_us: int, b_delay_us: int | None = None):
    from kd.teacher_server.loading import Teacher, fingerprint

    torch.manual_seed(5)
    models = {"a": HeldForward(nn.Linear(8, 4)).eval(), "b": nn.Linear(8, 4).eval()}
    teachers = [Teacher(n, m, fingerprint(m), (8,), torch.float32, 4, torch.device("cpu"), "test", {})
                for n, m in models.items()]  # fmt: skip
    delays = {"a": delay_us, "b": delay_us if b_delay_us is None else b_delay_us}
    opts = {n: TeacherOptions(max_batch_size=64, max_queue_delay_us=d, warmup=True) for n, d in delays.items()}
    return models, start_server(teachers, options=opts)


def test_callers_held_back_behind_a_cheap_inline_forward_merge_with_a_queue_delay() -> None:
    """A cheap forward runs inline under the small-work lock, so the callers it holds back
    are invisible to the batcher until the holder is answered: each would then find nothing
    unanswered and run alone (the CI failure: 12 simultaneous callers, 12 forwards of one
    request, with a 50 ms queue delay asked for). A caller that waited behind one for the
    same teacher tells the batcher, which waits the delay for the rest."""
    models, running = _two_cheap_teachers(delay_us=200_000)
    model = models["a"]
    try:
        batcher = running.endpoints["a"].batcher
        with TeacherClient(f"127.0.0.1:{running.port}") as c:
            for _ in range(3):  # warm: the forward is cheap, so the lock is held across it
                c.infer("a", torch.rand(1, 8))
            assert batcher.forward_cpu_s < 0.0005
            n = 12
            xs = [torch.rand(1, 8) for _ in range(n)]
            got: list = [None] * n

            def one(i: int) -> None:
                with TeacherClient(f"127.0.0.1:{running.port}", timeout=30) as client:
                    got[i] = client.infer("a", xs[i])["logits"]

            before = batcher.stats.forwards
            model.crowd(one, n)  # the first inline, holding the lock: the others queue on it
        with torch.inference_mode():
            for x, y in zip(xs, got):
                torch.testing.assert_close(y, model.inner(x))
        forwards = batcher.stats.forwards - before
        sizes = list(batcher.stats.batch_sizes)
        assert forwards <= 3, f"{forwards} forwards for {n} calls, {n - 1} held back together: {sizes}"
    finally:
        running.stop(grace=1)


def test_callers_that_arrive_together_before_any_reaches_the_batcher_merge() -> None:
    """Three calls arrive while other work holds the small-work lock, so none has reached the
    batcher: the first to get the lock runs inline, alone; the others were overlapped by it
    (it was submitted after they arrived, and is answered before they get the lock) and
    merge into one forward after the queue delay, instead of running inline one by one."""
    models, running = _two_cheap_teachers(delay_us=200_000)
    try:
        batcher = running.endpoints["a"].batcher
        with TeacherClient(f"127.0.0.1:{running.port}") as c:
            for _ in range(3):  # warm, and a lone client's inline path
                c.infer("a", torch.rand(1, 8))
        before = batcher.stats.forwards
        xs = [torch.full((1, 8), float(i)) for i in range(3)]
        got: list = [None] * 3

        def one(i: int) -> None:
            with TeacherClient(f"127.0.0.1:{running.port}", timeout=30) as client:
                got[i] = client.infer("a", xs[i])["logits"]

        threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
        with running.servicer._small_work:
            for t in threads:
                t.start()
            time.sleep(0.3)  # all three arrive
        for t in threads:
            t.join(30)
        with torch.inference_mode():
            for x, y in zip(xs, got):
                torch.testing.assert_close(y, models["a"].inner(x))
        assert batcher.stats.forwards - before == 2, list(batcher.stats.batch_sizes)
    finally:
        running.stop(grace=1)


def _refused(client: TeacherClient, teacher: str, x: torch.Tensor, codes: list[str]) -> None:
    from kd.teacher_server.client import TeacherRequestError

    try:
        client.infer(teacher, x)
        codes.append("OK")
    except TeacherRequestError as e:
        codes.append(e.code.name)


def test_a_lone_client_of_one_teacher_does_not_wait_for_another_teachers_callers() -> None:
    """The small-work lock is shared by every teacher of a server and by streams: a lone
    client of "a" that waits for it behind "b"'s unary calls, their encodes or a stream's
    decoding is not in company, so it keeps its inline path and never waits "a"'s 300 ms
    delay. (Deciding by which teacher last took the lock went wrong here: "a"'s own stale
    name, left by its previous call, made it wait the delay for 5 calls in a row.)"""
    models, running = _two_cheap_teachers(delay_us=300_000, b_delay_us=0)
    stop = threading.Event()

    def unary() -> None:
        with TeacherClient(f"127.0.0.1:{running.port}", timeout=10) as client:
            while not stop.is_set():
                client.infer("b", torch.rand(1, 8))

    def streamed() -> None:
        def batches():
            i = 0
            while not stop.is_set():
                yield i, torch.rand(2, 8)
                i += 1

        with TeacherClient(f"127.0.0.1:{running.port}", timeout=10) as client:
            for _ in client.infer_stream("b", batches(), depth=2):
                pass

    others = [threading.Thread(target=f) for f in (unary, unary, streamed)]
    try:
        for t in others:
            t.start()
        b = running.endpoints["b"].batcher.stats
        until = time.monotonic() + 20
        while b.requests < 50 and time.monotonic() < until:  # "b"'s traffic is flowing
            time.sleep(0.01)
        assert b.requests >= 50
        with TeacherClient(f"127.0.0.1:{running.port}") as client:
            for i in range(40):
                x = torch.full((1, 8), float(i))
                with torch.inference_mode():
                    torch.testing.assert_close(client.infer("a", x)["logits"], models["a"](x))
            stop.set()
            for t in others:
                t.join(30)
            # And for sure: other work (as a stream's decoding) holds the lock as "a"'s call comes.
            for _ in range(3):
                with running.servicer._small_work:
                    call = threading.Thread(target=client.infer, args=("a", torch.rand(1, 8)))
                    call.start()
                    time.sleep(0.05)
                call.join(30)
                client.infer("a", torch.rand(1, 8))
            # A refused call of "a" (here a wrong shape) that arrived first never reaches the
            # batcher, so it is not company either (counting every arriving call made it so).
            codes: list[str] = []
            for _ in range(3):
                with running.servicer._small_work:
                    bad = threading.Thread(target=_refused, args=(client, "a", torch.rand(1, 9), codes))
                    bad.start()
                    time.sleep(0.05)
                    call = threading.Thread(target=client.infer, args=("a", torch.rand(1, 8)))
                    call.start()
                    time.sleep(0.05)
                bad.join(30), call.join(30)
                client.infer("a", torch.rand(1, 8))
            assert codes[:3] == ["INVALID_ARGUMENT"] * 3
            # A call its client gave up on while it waited (deadline passed) is not submitted:
            # it would make the client's retry, and the next 4 calls, wait the delay.
            with TeacherClient(f"127.0.0.1:{running.port}", timeout=0.1) as impatient:
                with running.servicer._small_work:
                    gave_up = threading.Thread(target=_refused, args=(impatient, "a", torch.rand(1, 8), codes))
                    gave_up.start()
                    gave_up.join(30)  # DEADLINE_EXCEEDED at the client, still waiting at the server
                    retry = threading.Thread(target=client.infer, args=("a", torch.rand(1, 8)))
                    retry.start()
                    time.sleep(0.05)
                retry.join(30)
            for _ in range(5):
                client.infer("a", torch.rand(1, 8))
            assert codes[3:] == ["DEADLINE_EXCEEDED"]
        # Waiting out the 300 ms delay even once would show here; preemption costs milliseconds.
        text = generate_latest(running.metrics.registry).decode()
        count = float(re.search(r'kd_queue_wait_seconds_count\{teacher="a"\} (\S+)', text)[1])
        under = float(re.search(r'kd_queue_wait_seconds_bucket\{le="0.1",teacher="a"\} (\S+)', text)[1])
        assert count == 58 and under == count, text
    finally:
        stop.set()
        for t in others:
            t.join(30)
        running.stop(grace=1)
