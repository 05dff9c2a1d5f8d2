"""Live weight updates (PublishWeights) and cross-process deep mutual learning (`kd peer`).

Real `kd serve --accept-weights` and `kd peer` processes on 127.0.0.1, port 0: a client
hammering a teacher while its weights are swapped gets only OK answers, each equal to one of the
two models' outputs (the one its version names); bad updates are refused with precise statuses
and the old weights keep serving; two peer processes train, publish, and serve what they trained.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from kd.models import digits_cnn_student
from kd.student_trainer.online.peer_process import build_model, dml_loss
from kd.teacher_server.client import TeacherClient, TeacherRequestError
from kd.teacher_server.loading import fingerprint
from kd.teacher_server.weights import encode_state
from kd.v1 import teacher_pb2 as pb

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
SPEC = "kd.models:digits_cnn_student"


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return digits_cnn_student().eval()


def _wait_port(proc: subprocess.Popen, port_file: Path, log: Path, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while not (port_file.is_file() and port_file.read_text().strip()):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no port file {port_file}"
        time.sleep(0.05)
    return f"127.0.0.1:{port_file.read_text().strip()}"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory):
    """`kd serve --accept-weights` of model A (seed 1) in batches of at most 8, so a request of
    20 rows is split over three forwards and a swap can fall between them."""
    tmp = tmp_path_factory.mktemp("live")
    a = _model(1)
    save_file({k: v.contiguous() for k, v in a.state_dict().items()}, str(tmp / "a.safetensors"))
    log = tmp / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kd", "serve", "--teacher", f"p={SPEC}@{tmp / 'a.safetensors'}", "--accept-weights",
             "--port", "0", "--port-file", str(tmp / "port"), "--max-batch-size", "8", "--max-queue-delay-us", "200",
             "--no-warmup"],
            stdout=out, stderr=subprocess.STDOUT, env=ENV,
        )  # fmt: skip
    address = _wait_port(proc, tmp / "port", log)
    client = TeacherClient(address)
    yield client, a, address
    client.close()
    proc.kill()
    proc.wait()


def test_swaps_under_load_answer_from_one_version(live) -> None:
    client, a, _ = live
    b = _model(2)
    x = torch.randn(20, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert (ya - yb).abs().max() > 0.1
    start = client.describe("p")
    assert start.accepts_weights and start.weights_version == 0 and start.fingerprint == fingerprint(a)
    fps = {0: fingerprint(a), 1: fingerprint(b)}  # even versions serve A, odd ones B
    answers: list[tuple[torch.Tensor, str, int]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def hammer() -> None:
        with TeacherClient(client.target) as c:
            while not stop.is_set():
                try:
                    y = c.infer("p", x)["logits"]
                except BaseException as e:  # noqa: BLE001 - collected, asserted below
                    errors.append(e)
                    return
                answers.append((y, *c.served_by))

    streamed: list[torch.Tensor] = []

    def stream() -> None:  # InferStream's replies go through the same one-version rule
        def batches():
            i = 0
            while not stop.is_set():
                yield i, x
                i += 1

        with TeacherClient(client.target) as c:
            try:
                streamed.extend(y["logits"] for _, y in c.infer_stream("p", batches(), depth=4))
            except BaseException as e:  # noqa: BLE001 - collected, asserted below
                errors.append(e)

    threads = [threading.Thread(target=hammer) for _ in range(3)] + [threading.Thread(target=stream)]
    for t in threads:
        t.start()
    versions = []
    deadline = time.monotonic() + 120
    for i in range(6):
        while len(answers) < 3 * (i + 1) and not errors:  # some answers between two swaps
            assert time.monotonic() < deadline, "the hammering clients got no answers"
            time.sleep(0.005)
        versions.append(client.publish_weights("p", b if i % 2 == 0 else a, chunk_bytes=1500))
    time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert versions == [1, 2, 3, 4, 5, 6]
    seen = set()
    for y, fp, version in answers:
        want = ya if version % 2 == 0 else yb
        torch.testing.assert_close(y, want, rtol=0, atol=1e-5)  # all rows from the version it names
        assert fp == fps[version % 2]
        seen.add(version)
    assert len(seen) >= 4, seen  # answers came from versions all along the swaps
    assert streamed
    for y in streamed:
        assert (y - ya).abs().max() <= 1e-5 or (y - yb).abs().max() <= 1e-5
    end = client.describe("p")
    assert end.weights_version == 6 and end.fingerprint == end.weights_fingerprint == fingerprint(a)
    torch.testing.assert_close(client.infer("p", x)["logits"], ya, rtol=0, atol=1e-5)
    assert client.served_by == (fingerprint(a), 6)


def _upload(client: TeacherClient, chunks: list[pb.WeightsChunk]) -> TeacherRequestError:
    with pytest.raises(TeacherRequestError) as e:
        client._call(client.stub.PublishWeights, iter(chunks))
    return e.value


def test_bad_updates_are_refused_and_the_old_weights_keep_serving(live, tmp_path: Path) -> None:
    client, _, _ = live
    before = client.describe("p")
    x = torch.randn(4, 1, 8, 8)
    y = client.infer("p", x)["logits"]
    good = _model(3).state_dict()

    def refused(state, code: grpc.StatusCode, *words: str) -> None:
        with pytest.raises(TeacherRequestError) as e:
            client.publish_weights("p", state)
        assert e.value.code == code, e.value
        for w in words:
            assert w in e.value.message, e.value.message

    refused({**good, "head.weight": torch.zeros(10, 15)}, grpc.StatusCode.INVALID_ARGUMENT, "'head.weight'", "[10, 15]")
    refused({k: v for k, v in good.items() if k != "layer2.1.running_var"}, grpc.StatusCode.INVALID_ARGUMENT,
            "lacks key 'layer2.1.running_var'")  # fmt: skip
    refused({**good, "extra.weight": torch.zeros(2)}, grpc.StatusCode.INVALID_ARGUMENT, "'extra.weight'")
    nan = good["layer1.0.weight"].clone()
    nan[0, 0, 1, 1] = float("nan")
    refused({**good, "layer1.0.weight": nan}, grpc.StatusCode.INVALID_ARGUMENT, "'layer1.0.weight'", "NaN")
    refused({**good, "head.bias": good["head.bias"].double()}, grpc.StatusCode.INVALID_ARGUMENT, "'head.bias'",
            "float64")  # fmt: skip
    # Not safetensors: a pickled state_dict (never unpickled) and garbage.
    torch.save(good, tmp_path / "state.pt")
    for data in ((tmp_path / "state.pt").read_bytes(), b"\x00" * 64):
        e = _upload(client, [pb.WeightsChunk(teacher="p", data=data)])
        assert e.code == grpc.StatusCode.INVALID_ARGUMENT and "not a safetensors file" in e.message, e
    data = encode_state(good)
    e = _upload(client, [pb.WeightsChunk(teacher="p", data=data[:100], total_bytes=len(data))])
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and "incomplete" in e.message, e
    e = _upload(client, [pb.WeightsChunk(teacher="p", data=data + bytes(200_000))])
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and "at most" in e.message, e
    raw = client.channel.stream_unary("/kd.v1.TeacherService/PublishWeights", request_serializer=None,
                                      response_deserializer=None)  # fmt: skip
    with pytest.raises(grpc.RpcError) as rpc_error:
        raw(iter([b"\xff\xff\xff\xff"]), timeout=60)
    assert rpc_error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "PublishWeights: the request body (chunk #0)" in rpc_error.value.details()
    e = _upload(client, [pb.WeightsChunk(teacher="nope", data=data)])
    assert e.code == grpc.StatusCode.NOT_FOUND, e
    e = _upload(client, [pb.WeightsChunk(teacher="p", data=data, expected_version=before.weights_version + 5)])
    assert e.code == grpc.StatusCode.ABORTED and f"serves version {before.weights_version}" in e.message, e
    after = client.describe("p")
    assert (after.weights_version, after.fingerprint) == (before.weights_version, before.fingerprint)
    torch.testing.assert_close(client.infer("p", x)["logits"], y, rtol=0, atol=0)


def test_an_update_with_a_dtype_torch_cannot_read_is_invalid_argument(live) -> None:
    """A well-formed safetensors file whose dtype the format's parser knows but torch does not
    (F8_E8M0, F4) is refused by name, not an INTERNAL KeyError, and the old weights stay."""
    client, _, _ = live
    before = client.describe("p")
    for dtype in ("F8_E8M0", "F4"):
        header = json.dumps({"head.bias": {"dtype": dtype, "shape": [2], "data_offsets": [0, 2]}}).encode()
        header += b" " * (-len(header) % 8)
        data = len(header).to_bytes(8, "little") + header + b"\0\0"
        e = _upload(client, [pb.WeightsChunk(teacher="p", data=data)])
        assert e.code == grpc.StatusCode.INVALID_ARGUMENT, e
        assert "'head.bias'" in e.message and f"dtype '{dtype}'" in e.message and "F32" in e.message, e.message
    assert client.describe("p").weights_version == before.weights_version


def _errors(running) -> dict[str, float]:
    from prometheus_client import generate_latest

    text = generate_latest(running.metrics.registry).decode()
    return {m[1]: float(m[2]) for m in re.finditer(r'kd_errors_total\{code="(\w+)",teacher="[^"]*"\} (\S+)', text)}


@pytest.fixture()
def publishable():
    """An in-process server whose teacher (its own model) takes updates and drops an upload idle
    for 1.5 s -> (running server, raw stub, client)."""
    from kd.teacher_server.loading import load_teacher
    from kd.teacher_server.server import TeacherOptions, start_server
    from kd.v1 import teacher_pb2_grpc as pb_grpc

    torch.manual_seed(0)
    opts = TeacherOptions(warmup=False, accept_weights=True, upload_idle_timeout_s=1.5)
    running = start_server([load_teacher("p", SPEC)], port=0, options={"p": opts})
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    client = TeacherClient(f"127.0.0.1:{running.port}")
    yield running, pb_grpc.TeacherServiceStub(channel), client
    client.close()
    channel.close()
    running.stop(grace=1)


def _stalled_upload(running, stub, data: bytes, release: threading.Event) -> grpc.Future:
    """An upload that sends its first chunk, then nothing until ``release`` (a stalled publisher);
    returned once the server holds the teacher's upload slot for it."""

    def chunks():
        yield pb.WeightsChunk(teacher="p", data=data[:10], total_bytes=len(data))
        release.wait(120)

    future = stub.PublishWeights.future(chunks(), timeout=120)
    deadline = time.monotonic() + 30
    while not running.endpoints["p"].weights._receiving.locked():
        assert time.monotonic() < deadline and not future.done(), future
        time.sleep(0.01)
    return future


def test_a_cancelled_upload_is_counted_cancelled_without_a_traceback(publishable, caplog) -> None:
    running, stub, client = publishable
    release = threading.Event()
    try:
        with caplog.at_level(logging.INFO):
            stalled = _stalled_upload(running, stub, encode_state(_model(3)), release)
            stalled.cancel()
            deadline = time.monotonic() + 30
            while "CANCELLED" not in _errors(running):
                assert time.monotonic() < deadline, _errors(running)
                time.sleep(0.02)
        assert _errors(running) == {"CANCELLED": 1.0}
        assert "Traceback" not in caplog.text and "failed" not in caplog.text, caplog.text
        assert client.publish_weights("p", _model(3).state_dict()) == 1  # the slot is free
    finally:
        release.set()


@pytest.mark.serial  # the cancel must reach the server within its grace (2 s) of the requests' end
def test_a_cancel_that_follows_the_end_of_a_short_upload_is_counted_cancelled(publishable) -> None:
    # The client's requests end (half-close) short of the announced bytes and its cancel arrives a
    # moment later, as a cancelled upload's end and cancel may reach the server: the old server had
    # already answered INVALID_ARGUMENT 'the upload is incomplete' (the flake of session 17's CI).
    running, stub, client = publishable
    data = encode_state(_model(3))
    sent = threading.Event()

    def chunks():
        try:
            yield pb.WeightsChunk(teacher="p", data=data[:10], total_bytes=len(data))
        finally:
            sent.set()  # gRPC asked for the next request: the requests end here

    call = stub.PublishWeights.future(chunks(), timeout=120)
    assert sent.wait(30)
    time.sleep(0.2)  # the end reaches the server first
    call.cancel()
    deadline = time.monotonic() + 30
    while not _errors(running):
        assert time.monotonic() < deadline, "no error counted"
        time.sleep(0.02)
    assert _errors(running) == {"CANCELLED": 1.0}
    assert client.publish_weights("p", _model(3).state_dict()) == 1  # the slot is free


@pytest.mark.serial
def test_a_stalled_upload_is_dropped_after_the_idle_timeout_so_others_can_publish(publishable) -> None:
    running, stub, client = publishable
    release = threading.Event()
    try:
        start = time.monotonic()
        stalled = _stalled_upload(running, stub, encode_state(_model(3)), release)
        with pytest.raises(TeacherRequestError) as e:  # meanwhile the slot is taken
            client.publish_weights("p", _model(4).state_dict())
        assert e.value.code == grpc.StatusCode.ABORTED and "1.5 s" in e.value.message, e.value
        with pytest.raises(grpc.RpcError) as dropped:  # the stalled client still holds its call open
            stalled.result(timeout=30)
        assert dropped.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, dropped.value
        assert "no chunk of this upload for 1.5 s" in dropped.value.details()
        assert 1.5 <= time.monotonic() - start < 20
        assert not release.is_set()
        assert client.publish_weights("p", _model(3).state_dict()) == 1
        assert _errors(running) == {"ABORTED": 1.0, "DEADLINE_EXCEEDED": 1.0}
        deadline = time.monotonic() + 10  # the upload's reader ended with its call
        while any(t.name == "upload-p" for t in threading.enumerate()):
            assert time.monotonic() < deadline, "the stalled upload's reader thread outlived its call"
            time.sleep(0.02)
    finally:
        release.set()


def test_a_server_without_accept_weights_refuses(address: str) -> None:
    with TeacherClient(address) as c:
        assert not c.describe("digits").accepts_weights
        with pytest.raises(TeacherRequestError) as e:
            c.publish_weights("digits", {"w": torch.zeros(1)})
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "--accept-weights" in e.value.message


def test_a_live_teacher_fills_no_cache_serves_no_gradients_and_a_peer_binds_loopback(live, tmp_path: Path) -> None:
    """Its answers may come from several weight versions and a swap copies into the parameters in
    place: a cache keyed by one fingerprint, and a backward across a swap, are refused; a peer's own
    server (no token) never binds a public address."""
    from kd.core.data import load_dataset
    from kd.peers import PeerRun, run_peer
    from kd.precompute import precompute
    from kd.student_trainer.sources import ServerSource

    client, _, address = live
    source = ServerSource(address, "p")
    with pytest.raises(ValueError, match=r"'p' takes live weight updates .* cannot fill a cache"):
        precompute(load_dataset("digits", "train"), source, tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()
    with pytest.raises(TeacherRequestError) as e:
        client.input_gradient("p", torch.zeros(2, 1, 8, 8), {"logits": torch.ones(2, 10)})
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "live weight updates" in e.value.message
    with pytest.raises(ValueError, match="binds loopback only"):
        run_peer(PeerRun(name="a", peers=["127.0.0.1:1/b"], host="0.0.0.0"))


def test_dml_loss_matches_the_formula_in_float64() -> None:
    g = torch.Generator().manual_seed(0)
    z, p1, p2 = (torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    y = torch.tensor([0, 1, 2, 3, 0])
    T = 2.0

    def kl(teacher, student):  # sum_c p_t (log p_t - log p_s), batch mean, times T^2
        pt, ps = (teacher / T).softmax(1), (student / T).softmax(1)
        return (pt * (pt.log() - ps.log())).sum(1).mean() * T * T

    ce = -z.log_softmax(1)[torch.arange(5), y].mean()
    want = ce + (kl(p1, z) + kl(p2, z)) / 2
    torch.testing.assert_close(dml_loss(z, [p1, p2], y, temperature=T), want, rtol=1e-12, atol=1e-12)


def test_two_peer_processes_train_publish_and_serve_what_they_trained(live, tmp_path: Path) -> None:
    """Peer "p" publishes to the `kd serve --accept-weights` process above (--server), peer "b"
    serves itself (--serve-port); each trains against the other's server."""
    client, _, _ = live
    before = client.describe("p").weights_version
    ports = {"p": client.target.rpartition(":")[2], "b": f"@{tmp_path / 'b.port'}"}
    own = {"p": ["--server", client.target], "b": ["--serve-port", "0", "--port-file", str(tmp_path / "b.port")]}
    procs = {}
    for me, other, init in (("p", "b", 0), ("b", "p", 1)):
        log = tmp_path / f"{me}.log"
        procs[me] = (subprocess.Popen(
            [sys.executable, "-m", "kd", "peer", "--name", me, "--init-seed", str(init), *own[me],
             "--peer", f"127.0.0.1:{ports[other]}/{other}", "--publish-every", "2", "--max-lag", "2",
             "--epochs", "2", "--labeled", "64",
             "--linger", "60", "--json", str(tmp_path / f"{me}.json"), "--save", str(tmp_path / f"{me}.safetensors")],
            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=ENV,
        ), log)  # fmt: skip
    try:
        x = torch.randn(6, 1, 8, 8)
        for me, (proc, log) in procs.items():
            deadline = time.monotonic() + 240
            while not (tmp_path / f"{me}.json").is_file():
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
            res = json.loads((tmp_path / f"{me}.json").read_text())
            # 64 samples, batch 32, 2 epochs: 4 steps; published at start, after steps 2 and 4.
            first = before if me == "p" else 0
            assert (res["steps"], res["publishes"], res["published_version"]) == (4, 3, first + 3), res
            assert res["mean_peer_age"] == res["mean_peer_age"]  # not NaN: the other peer answered each step
            if me == "p":  # bounded staleness (b's versions count from 0; p's from `before` on the shared server)
                assert res["max_peer_age"] <= 2, res
            trained = digits_cnn_student().eval()
            trained.load_state_dict(load_file(str(tmp_path / f"{me}.safetensors")))
            initial = build_model(SPEC, 0 if me == "p" else 1)
            moved = [k for k, v in initial.state_dict().items() if not torch.equal(v, trained.state_dict()[k])]
            assert "head.weight" in moved and "layer1.0.weight" in moved
            address = client.target if me == "p" else f"127.0.0.1:{(tmp_path / 'b.port').read_text()}"
            with TeacherClient(address) as c:
                d = c.describe(me)
                assert d.weights_version == first + 3 and d.fingerprint == fingerprint(trained)
                with torch.no_grad():
                    torch.testing.assert_close(c.infer(me, x)["logits"], trained(x), rtol=0, atol=1e-5)
    finally:
        for proc, _ in procs.values():
            proc.kill()
            proc.wait()


def test_accept_weights_is_a_config_key(tmp_path: Path) -> None:
    from kd.teacher_server.config import load_config

    path = tmp_path / "serve.toml"
    path.write_text(f'[[teacher]]\nname = "p"\nspec = "{SPEC}"\naccept_weights = true\n\n'
                    f'[[teacher]]\nname = "q"\nspec = "{SPEC}"\n')  # fmt: skip
    cfg = load_config(path)
    assert [t.options.accept_weights for t in cfg.teachers] == [True, False]


def test_peer_age_counts_steps_behind_and_a_peer_ahead_as_zero() -> None:
    """Age = this peer's step minus the step of the snapshot a peer answered with. Peer "b" serves
    version 5 (the weights of its step 4) from the start, ahead of "a" for a's first 4 steps: it was
    counted -4, -3, -2, -1 steps old (a mean below 0 in the README's staleness table); now 0. Peer
    "c" stays at version 1 (its step 0): 0, 1, 2, 3 steps old at a's steps 0..3."""
    from kd.core.data import open_source
    from kd.student_trainer.online.peer_process import PeerAddress, train_peer
    from kd.student_trainer.train import TrainConfig
    from kd.teacher_server.loading import load_teacher
    from kd.teacher_server.server import TeacherOptions, start_server

    options = TeacherOptions(accept_weights=True, warmup=False, max_queue_delay_us=0, max_batch_size=1024)
    running = start_server([load_teacher(n, SPEC) for n in ("a", "b", "c")], batching=options)
    try:
        address = f"127.0.0.1:{running.port}"
        with TeacherClient(address) as c:
            for _ in range(5):
                c.publish_weights("b", _model(2))
            c.publish_weights("c", _model(3))
            assert (c.describe("b").weights_version, c.describe("c").weights_version) == (5, 1)
        config = TrainConfig(epochs=1, batch_size=32, lr=3e-3, seed=0)
        res = train_peer(build_model(SPEC, 0), open_source("digits"), open_source("digits:test"), config, name="a",
                         publish_to=address, peers=[PeerAddress.parse(f"{address}/{p}") for p in ("b", "c")],
                         subset=torch.arange(128))  # fmt: skip
    finally:
        running.stop(grace=1.0)
    assert res.steps == 4
    assert res.mean_peer_age == (0 + 0 + 0 + 0 + 0 + 1 + 2 + 3) / 8 and res.max_peer_age == 3, res
