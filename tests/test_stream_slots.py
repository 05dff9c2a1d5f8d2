"""Stream limits that neither lock out active clients nor honest processes of one host, over
real loopback gRPC: idle streams of one client give way to another client's new stream, the
server closes a stream idle past ``stream_idle_timeout_s`` and kd's client reopens it without
losing or repeating a request, and the per-client limit counts each kd client apart while the
query accounting still counts the host (and a token stays one client)."""

from __future__ import annotations

import math
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from tiny_lm import VOCAB, BigramLM

from kd.student_trainer.sources import Batch, ServerSource
from kd.teacher_server.client import TeacherClient, TeacherRequestError, encode_request, spec_of
from kd.teacher_server.loading import Teacher, load_teacher
from kd.teacher_server.server import TeacherOptions, start_server
from kd.teacher_server.service import RequestError, StreamSlots
from kd.v1 import teacher_pb2 as pb

T = 10.0
# A consumer that pauses waits until the server has closed its idle stream (stream_idle_timeout_s=0.3),
# however long that takes: a fixed 1 s pause assumed that answering what was in flight and 0.3 s of
# idleness fit in a second, which a loaded CI machine need not give. This only bounds a hang.
IDLE_CLOSE_WAIT = 120.0


def reference(teacher: Teacher, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return teacher.model(x)


def _settles(predicate, seconds: float = T) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_idle_streams_of_one_client_do_not_lock_out_another(teacher: Teacher) -> None:
    # The attack: every stream the server allows (64), held idle under 4 made-up client ids.
    r = start_server([teacher], port=0, batching=TeacherOptions(max_batch_size=64, max_queue_delay_us=0))
    ch = grpc.insecure_channel(f"127.0.0.1:{r.port}")
    block = threading.Event()

    def idle():
        block.wait(60)
        return
        yield  # a generator that sends nothing until the test ends

    stream = ch.stream_stream("/kd.v1.TeacherService/InferStream", request_serializer=None,
                              response_deserializer=None)  # fmt: skip
    calls = [stream(idle(), timeout=60, metadata=[("kd-client-id", f"mallory-{i // 16}")]) for i in range(64)]
    try:
        assert _settles(lambda: r.servicer.streams.open == 64)
        time.sleep(1.2)  # idle for longer than STREAM_RECLAIM_IDLE_S (1 s)
        x = torch.rand(5, 64)
        with TeacherClient(f"127.0.0.1:{r.port}", client_id="alice", timeout=T) as alice:
            got = [out["logits"] for _, out in alice.infer_stream("digits", [(0, x[:2]), (1, x[2:])], depth=2)]
        torch.testing.assert_close(torch.cat(got), reference(teacher, x), rtol=1e-5, atol=1e-5)
        # Alice's stream took the place of exactly one idle stream, which was told why.
        closed = [c for c in calls if c.done()]
        assert len(closed) == 1 and r.servicer.streams.reclaimed == 1
        assert closed[0].code() == grpc.StatusCode.UNAVAILABLE
        assert "idle while its stream limit was reached" in closed[0].details()
        assert dict(closed[0].trailing_metadata())["kd-stream-closed"] == "reclaimed"
        assert _settles(lambda: r.servicer.streams.open == 63)  # Alice's ended, 63 of Mallory's remain
    finally:
        block.set()
        for c in calls:
            c.cancel()
        ch.close()
        r.stop(grace=1)


def test_a_kd_client_goes_on_after_the_server_closes_its_idle_stream(teacher: Teacher) -> None:
    r = start_server([teacher], port=0, batching=TeacherOptions(max_batch_size=64, max_queue_delay_us=0),
                     stream_idle_timeout_s=0.3)  # fmt: skip
    batcher = r.endpoints["digits"].batcher
    torch.manual_seed(0)
    xs = [torch.rand(3, 64) for _ in range(6)]
    try:
        with TeacherClient(f"127.0.0.1:{r.port}", timeout=T) as client:
            got = []
            for key, out in client.infer_stream("digits", list(enumerate(xs)), depth=2):
                got.append((key, out["logits"]))
                if key in (1, 3):  # a slow consumer: the stream has nothing in flight until the server closes it
                    assert _settles(lambda: r.servicer.streams.open == 0, IDLE_CLOSE_WAIT), "no idle close"
        # Every answer once, in order, each the teacher's logits of its own batch.
        assert [k for k, _ in got] == list(range(6))
        for (_, logits), x in zip(got, xs, strict=True):
            torch.testing.assert_close(logits, reference(teacher, x), rtol=1e-5, atol=1e-5)
        # The server did close the stream (twice) and no request was forwarded twice.
        # (at least twice: a loaded machine may pause the client 0.3 s elsewhere too)
        assert r.servicer.streams.closed_idle >= 2, r.servicer.streams.closed_idle
        assert batcher.stats.requests == 6 and batcher.stats.samples == 18, batcher.stats
        assert _settles(lambda: r.servicer.streams.open == 0)
    finally:
        r.stop(grace=1)


def test_seventeen_kd_clients_of_one_host_stream_at_once(teacher: Teacher) -> None:
    # 20 kd clients as 20 processes of one host run them: no client id, one address (127.0.0.1).
    r = start_server([teacher], port=0, batching=TeacherOptions(max_batch_size=64, max_queue_delay_us=0))
    assert (r.servicer.streams.max_streams, r.servicer.streams.per_client) == (64, 16)
    clients = [TeacherClient(f"127.0.0.1:{r.port}", timeout=T) for _ in range(20)]
    streams = []
    x = torch.rand(2, 64)
    try:
        for c in clients:
            s = c.infer_stream("digits", [(0, x), (1, x)], depth=1)
            _, out = next(s)  # the stream is open, held by this suspended generator
            torch.testing.assert_close(out["logits"], reference(teacher, x), rtol=1e-5, atol=1e-5)
            streams.append(s)
        assert r.servicer.streams.open == 20
        # Query accounting still counts the host as one client: quotas keep their meaning.
        assert r.servicer.accounting.clients == 1
        assert r.servicer.accounting.usage("ipv4:127.0.0.1").samples == 20 * 2
    finally:
        for s in streams:
            s.close()
        for c in clients:
            c.close()
        r.stop(grace=1)


def test_a_token_is_one_client_for_the_stream_limit(teacher: Teacher) -> None:
    # Guard of the policy's other half: an authenticated identity is not split by instance.
    r = start_server([teacher], port=0, token="s3cret", max_streams_per_client=2)
    r.servicer.streams.reclaim_idle_s = math.inf  # refused, not reclaimed, however slowly the streams start
    clients = [TeacherClient(f"127.0.0.1:{r.port}", token="s3cret", timeout=T) for _ in range(3)]
    streams = []
    x = torch.rand(2, 64)
    try:
        for c in clients[:2]:
            streams.append(c.infer_stream("digits", [(0, x), (1, x)], depth=1))
            next(streams[-1])
        with pytest.raises(TeacherRequestError) as e:
            next(clients[2].infer_stream("digits", [(0, x)], depth=1))
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_streams_per_client=2" in str(e.value)
    finally:
        for s in streams:
            s.close()
        for c in clients:
            c.close()
        r.stop(grace=1)


def test_a_pool_and_a_token_stream_go_on_after_their_idle_streams_are_closed(teacher: Teacher) -> None:
    # ServerSource over a pool of two servers (a stream per member) and lm_client's token stream:
    # both ride on the same reopening stream, each checked against answers of its own teacher.
    opts = TeacherOptions(max_batch_size=64, max_queue_delay_us=0)
    servers = [start_server([teacher], port=0, batching=opts, stream_idle_timeout_s=0.3) for _ in range(2)]
    lm = start_server([load_teacher("lm", f"{__name__}:bigram?input_shape=-1")], port=0, stream_idle_timeout_s=0.3)
    torch.manual_seed(0)
    batches = [Batch(torch.arange(3 * i, 3 * i + 3), torch.rand(3, 64), torch.zeros(3, dtype=torch.long))
               for i in range(16)]  # fmt: skip
    g = torch.Generator().manual_seed(1)
    seqs = [(i, [torch.randint(0, VOCAB, (n,), generator=g) for n in (5, 9)], None, None) for i in range(4)]
    try:
        source = ServerSource([f"127.0.0.1:{s.port}" for s in servers], "digits", depth=1, timeout=T)
        got = []
        for batch, logits, _ in source.iter_outputs(batches, []):
            got.append((batch, logits))
            if len(got) in (2, 8):  # the pool keeps (depth + 1) x 2 batches unanswered: 4 of 16
                # Both members' streams have nothing in flight until their servers close them.
                closed = _settles(lambda: all(s.servicer.streams.open == 0 for s in servers), IDLE_CLOSE_WAIT)
                assert closed, "no idle close"
        source.close()
        assert [int(b.indices[0]) for b, _ in got] == list(range(0, 48, 3))
        for b, logits in got:
            torch.testing.assert_close(logits, reference(teacher, b.inputs), rtol=1e-5, atol=1e-5)
        stats = [(s.servicer.streams.closed_idle, s.servicer.streams.reclaimed,
                  s.endpoints["digits"].batcher.stats.requests) for s in servers]  # fmt: skip
        assert sum(closed for closed, _, _ in stats) >= 2, stats  # (closed idle, reclaimed, requests) per member
        assert sum(s.endpoints["digits"].batcher.stats.requests for s in servers) == 16  # none sent twice
        with TeacherClient(f"127.0.0.1:{lm.port}", timeout=T) as client:
            streamed = []
            for key, out in client.infer_tokens_stream("lm", seqs, depth=2, logits=True):
                streamed.append((key, out["logits"]))
                if key == 1:
                    assert _settles(lambda: lm.servicer.streams.open == 0, IDLE_CLOSE_WAIT), "no idle close"
            assert lm.servicer.streams.closed_idle >= 1
            assert [k for k, _ in streamed] == [0, 1, 2, 3]
            for (_, s, _, _), (_, logits) in zip(seqs, streamed, strict=True):
                torch.testing.assert_close(logits, client.infer_tokens("lm", s, logits=True)["logits"], rtol=0, atol=0)
    finally:
        for s in (*servers, lm):
            s.stop(grace=1)


def bigram() -> torch.nn.Module:
    torch.manual_seed(3)
    return BigramLM()


def test_only_streams_with_nothing_in_flight_are_closed_the_longest_idle_first() -> None:
    # The slot bookkeeping itself (teacher_server.service.StreamSlots), without waiting on clocks:
    # reclaim_idle_s=0, so "idle" is "nothing in flight".
    slots = StreamSlots(max_streams=3, per_client=2, reclaim_idle_s=0.0)
    told: list[str] = []
    a1 = slots.acquire("a", on_reclaim=lambda: told.append("a1"))
    a2 = slots.acquire("a", on_reclaim=lambda: told.append("a2"))
    assert a1.begin()  # a1 has a request in flight: never taken
    a3 = slots.acquire("a", on_reclaim=lambda: told.append("a3"))  # a's limit: a2, its idle one, gives way
    assert told == ["a2"] and a2.closed == "reclaimed" and not a2.begin()  # a request read now is dropped
    b1 = slots.acquire("b", on_reclaim=lambda: told.append("b1"))  # a free place: nothing taken
    assert told == ["a2"] and slots.open == 3
    synth = slots.acquire("c")  # the overall limit: a3 gives way (idle longer than b1); synth is never taken
    assert told == ["a2", "a3"] and slots.open == 3
    assert b1.begin()
    with pytest.raises(RequestError) as e:  # a1 and b1 busy, synth never taken: nothing to take
        slots.acquire("d")
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "none of them idle" in e.value.message
    a1.end()  # a1's reply sent: idle again, and past a timeout of 0 s it is closed
    assert a1.close_if_idle(0.0) and not a1.begin() and slots.closed_idle == 1
    assert not b1.close_if_idle(0.0)  # b1 still has its request in flight
    for s in (a1, a2, a3, b1, synth):
        s()  # releasing twice (or a closed slot) frees nothing more
    assert slots.open == 0 and slots.reclaimed == 2


def test_a_request_read_as_its_idle_stream_is_reclaimed_ends_the_stream_unavailable(teacher: Teacher) -> None:
    # StreamSlots frees the victim's place under its lock and tells its handler (on_reclaim) only
    # after: a request the victim's reader takes in between is dropped (begin() is False), so the
    # stream must still end UNAVAILABLE with the trailer, which makes a kd client resend it. The
    # test widens that window: the victim's notice waits until its call has ended (or 5 s).
    r = start_server([teacher], port=0, batching=TeacherOptions(max_batch_size=64, max_queue_delay_us=0),
                     max_streams=1)  # fmt: skip
    r.servicer.streams.reclaim_idle_s = 0.0  # "idle" is "nothing in flight": no clock in the test
    ch = grpc.insecure_channel(f"127.0.0.1:{r.port}")
    stream = ch.stream_stream("/kd.v1.TeacherService/InferStream", request_serializer=None,
                              response_deserializer=pb.InferResponse.FromString)  # fmt: skip
    outbox: queue.Queue = queue.Queue()
    a = stream(iter(outbox.get, None), timeout=T)
    x = torch.rand(3, 64)
    try:
        outbox.put(encode_request("digits", x, None, spec_of(), "0"))
        assert next(a).request_id == "0"  # answered: A's stream has nothing in flight
        assert _settles(lambda: len(r.servicer.streams._live) == 1)
        [slot] = r.servicer.streams._live
        # the handler counts the reply sent once gRPC has taken it, which may be after the client read it
        assert _settles(lambda: slot.pending == 0)
        told = slot._on_reclaim

        def late_notice() -> None:
            outbox.put(encode_request("digits", x, None, spec_of(), "1"))  # read after the place is gone
            _settles(a.done, 5.0)
            told()

        slot._on_reclaim = late_notice
        with TeacherClient(f"127.0.0.1:{r.port}", timeout=T) as b:  # takes A's place
            [(_, out)] = list(b.infer_stream("digits", [(0, x)], depth=1))
        torch.testing.assert_close(out["logits"], reference(teacher, x), rtol=1e-5, atol=1e-5)
        # The old code ended A's call OK with request 1 unanswered (a kd client: RuntimeError).
        with pytest.raises(grpc.RpcError) as e:
            next(a)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, (e.value.code(), e.value.details())
        assert dict(e.value.trailing_metadata())["kd-stream-closed"] == "reclaimed"
        assert r.servicer.streams.reclaimed == 1
        assert r.endpoints["digits"].batcher.stats.requests == 2  # request 1 was not forwarded
        assert _settles(lambda: r.servicer.streams.open == 0)
    finally:
        outbox.put(None)
        a.cancel()
        ch.close()
        r.stop(grace=1)


def test_a_stream_ended_ok_with_requests_unanswered_is_a_clear_error() -> None:
    # A server (not kd's: a stand-in on loopback) that answers one request of a stream and then ends
    # it OK: the old client's next(call) raised StopIteration inside its generator, a RuntimeError.
    def infer_stream(requests, _context):
        first = pb.InferRequest.FromString(next(requests))
        yield pb.InferResponse(request_id=first.request_id, teacher=first.teacher).SerializeToString()

    handler = grpc.method_handlers_generic_handler("kd.v1.TeacherService", {
        "InferStream": grpc.stream_stream_rpc_method_handler(infer_stream)})  # fmt: skip
    server = grpc.server(ThreadPoolExecutor(max_workers=2), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    x = torch.rand(2, 64)
    try:
        with TeacherClient(f"127.0.0.1:{port}", timeout=T) as client:
            got = client.infer_stream("digits", [(0, x), (1, x), (2, x)], depth=3)
            assert next(got)[0] == 0
            with pytest.raises(TeacherRequestError) as e:
                next(got)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        assert "ended the stream with 2 request(s) unanswered" in str(e.value)
    finally:
        server.stop(grace=None)
