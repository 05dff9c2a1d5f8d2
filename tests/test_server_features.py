"""Server capabilities beyond plain logits: features, input dtypes, inputs by
reference, deadlines, preferred batches, config files, metrics."""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client import generate_latest

from kd.core.data import load_dataset
from kd.core.wire import to_proto
from kd.teacher_server.client import DatasetRef, TeacherClient, TeacherRequestError
from kd.teacher_server.config import ConfigError, load_config
from kd.teacher_server.loading import Teacher
from kd.teacher_server.server import TeacherOptions, start_server
from kd.teacher_server.service import pool
from kd.v1 import teacher_pb2 as pb
from kd.v1 import teacher_pb2_grpc as pb_grpc


def hooked(teacher: Teacher, x: torch.Tensor, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: the layer's output captured independently with a hook."""
    seen = {}
    module = dict(teacher.model.named_modules())[layer]
    handle = module.register_forward_hook(lambda m, i, o: seen.setdefault("out", o.clone()))
    with torch.inference_mode():
        logits = teacher.model(x)
    handle.remove()
    return logits, seen["out"]


def test_features_by_layer_name_plain_pooled_and_fp16(address: str, teacher: Teacher) -> None:
    x = torch.rand(6, 64)
    logits, hidden = hooked(teacher, x, "1")
    with TeacherClient(address) as c:
        out = c.infer("digits", x, features=["1", "4"])
        half = c.infer("digits", x, logits=False, features=["1"], features_dtype=torch.float16)
    torch.testing.assert_close(out["logits"], logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["feature/1"], hidden, rtol=1e-5, atol=1e-5)
    assert out["feature/4"].shape == (6, 512)
    assert set(half) == {"feature/1"} and half["feature/1"].dtype == torch.float16
    torch.testing.assert_close(half["feature/1"].float(), hidden, rtol=1e-3, atol=1e-3)


def test_pool_is_a_global_average() -> None:
    f = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(pool(f), f.sum(dim=(2, 3)) / 20)
    tokens = torch.randn(2, 7, 3, dtype=torch.float64)
    torch.testing.assert_close(pool(tokens), tokens.sum(dim=1) / 7)
    flat = torch.randn(2, 3)
    assert pool(flat) is flat


def test_unknown_layer_lists_the_valid_ones(address: str) -> None:
    with TeacherClient(address) as c, pytest.raises(TeacherRequestError) as err:
        c.infer("digits", torch.rand(2, 64), features=["layer9"])
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown layer(s) ['layer9']" in err.value.message and "valid: 0, 1, 2" in err.value.message


def test_describe_reports_layers_dtypes_and_datasets(teacher: Teacher) -> None:
    running = start_server([teacher], port=0, datasets={"digits-train": load_dataset("digits", "train")})
    try:
        stub = pb_grpc.TeacherServiceStub(grpc.insecure_channel(f"127.0.0.1:{running.port}"))
        (info,) = stub.ListTeachers(pb.ListTeachersRequest(), timeout=10).teachers
        assert {layer.name: tuple(layer.shape) for layer in info.layers} == teacher.layers
        assert dict((layer.name, tuple(layer.shape)) for layer in info.layers)["6"] == (10,)
        assert set(info.accepted_input_dtypes) == {pb.FLOAT16, pb.UINT8}
        assert list(info.datasets) == ["digits-train"]
    finally:
        running.stop(grace=1)


def test_uint8_inputs_are_normalised_and_fp16_inputs_upcast(teacher: Teacher) -> None:
    mean, std = 0.25, 0.5
    # The digits teacher's first input dim is 64 features: one "channel" per feature.
    opts = TeacherOptions(mean=[mean] * 64, std=[std] * 64)
    running = start_server([teacher], port=0, options={"digits": opts})
    try:
        u8 = torch.randint(0, 256, (5, 64), dtype=torch.uint8)
        expected_input = (u8.double() / 255 - mean) / std
        with torch.inference_mode():
            ref = teacher.model(expected_input.float())
        with TeacherClient(f"127.0.0.1:{running.port}") as c:
            got = c.infer("digits", u8)["logits"]
            x16 = torch.rand(5, 64).half()
            got16 = c.infer("digits", x16)["logits"]
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        with torch.inference_mode():
            torch.testing.assert_close(got16, teacher.model(x16.float()), rtol=1e-5, atol=1e-5)
    finally:
        running.stop(grace=1)
    with pytest.raises(ValueError, match="mean/std need 64 values"):
        start_server([teacher], port=0, options={"digits": TeacherOptions(mean=[0.5], std=[0.5])})


def test_inputs_by_reference_replay_the_seeded_views(teacher: Teacher) -> None:
    train = load_dataset("digits", "train")
    running = start_server([teacher], port=0, datasets={"digits": train})
    try:
        idx, seeds = [5, 17, 300, 5], [11, 12, 13, 99]
        with TeacherClient(f"127.0.0.1:{running.port}") as c:
            plain = c.infer("digits", ref=DatasetRef("digits", idx))["logits"]
            viewed = c.infer("digits", ref=DatasetRef("digits", idx, seeds))["logits"]
            streamed = [o["logits"] for _, o in c.infer_stream("digits", [(0, DatasetRef("digits", idx, seeds))])]
            with pytest.raises(TeacherRequestError, match="out of range"):
                c.infer("digits", ref=DatasetRef("digits", [len(train)]))
            with pytest.raises(TeacherRequestError, match="unknown dataset 'cifar'"):
                c.infer("digits", ref=DatasetRef("cifar", [0]))
        with torch.inference_mode():
            torch.testing.assert_close(plain, teacher.model(train.inputs[idx]), rtol=1e-5, atol=1e-5)
            ref_views = teacher.model(train.views(idx, seeds))
        torch.testing.assert_close(viewed, ref_views, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(streamed[0], viewed)
        assert not torch.allclose(viewed[0], viewed[3]), "different seeds must give different views"
    finally:
        running.stop(grace=1)


def test_expired_client_deadline_is_not_computed(teacher: Teacher) -> None:
    running = start_server([teacher], port=0, batching=TeacherOptions(max_batch_size=4, max_queue_delay_us=0))
    batcher = running.endpoints["digits"].batcher
    forward = batcher.runner.forward

    def slow(x, layers):
        time.sleep(0.3)
        return forward(x, layers)

    batcher.runner.forward = slow
    try:
        stub = pb_grpc.TeacherServiceStub(grpc.insecure_channel(f"127.0.0.1:{running.port}"))
        busy = [stub.Infer.future(pb.InferRequest(teacher="digits", inputs=to_proto(torch.rand(4, 64))))
                for _ in range(4)]  # fmt: skip
        time.sleep(0.1)
        with pytest.raises(grpc.RpcError) as err:
            stub.Infer(pb.InferRequest(teacher="digits", inputs=to_proto(torch.rand(3, 64))), timeout=0.2)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for f in busy:
            f.result(timeout=10)
        time.sleep(0.1)
        assert 3 not in batcher.stats.batch_sizes
        # Dropped by the batcher (expired or cancelled in its queue) or, where it still waited
        # for the service's small-work lock, refused before it reached the batcher.
        text = generate_latest(running.metrics.registry).decode()
        refused = re.search(r'kd_errors_total\{code="CANCELLED",teacher="digits"\} (\S+)', text)
        assert batcher.stats.expired + batcher.stats.cancelled + (float(refused[1]) if refused else 0) >= 1, text
    finally:
        running.stop(grace=1)


def test_metrics_endpoint_counts_requests_batches_and_errors(teacher: Teacher) -> None:
    running = start_server([teacher], port=0, metrics_port=0)
    try:
        with TeacherClient(f"127.0.0.1:{running.port}") as c:
            for n in (3, 5):
                c.infer("digits", torch.rand(n, 64))
            with pytest.raises(TeacherRequestError):
                c.infer("digits", torch.rand(2, 63))
        text = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10).read().decode()
    finally:
        running.stop(grace=1)
    lines = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and line[0] != "#"}
    assert lines['kd_requests_total{teacher="digits"}'] == 2
    assert lines['kd_samples_total{teacher="digits"}'] == 8
    assert lines['kd_batch_size_sum{teacher="digits"}'] == 8
    assert lines['kd_errors_total{code="INVALID_ARGUMENT",teacher="digits"}'] == 1
    assert lines['kd_queue_depth{teacher="digits"}'] == 0
    assert lines['kd_compute_seconds_count{teacher="digits"}'] == lines['kd_forwards_total{teacher="digits"}'] >= 1


def test_config_file_toml_and_yaml(tmp_path: Path, teacher_spec: str) -> None:
    toml = tmp_path / "serve.toml"
    toml.write_text(
        f"""
[server]
port = 0
metrics_port = 9100

[[teacher]]
name = "a"
spec = "{teacher_spec}"
max_batch_size = 32
preferred_batch_sizes = [8, 16]
max_queue_size = 128
amp = "bf16"

[[dataset]]
name = "train"
ref = "digits:train"
"""
    )
    cfg = load_config(toml)
    assert cfg.port == 0 and cfg.metrics_port == 9100 and cfg.datasets == {"train": "digits:train"}
    (entry,) = cfg.teachers
    assert entry.name == "a" and entry.options.preferred_batch_sizes == [8, 16]
    assert entry.options.max_queue_size == 128 and entry.options.amp == "bf16"
    yaml_file = tmp_path / "serve.yaml"
    yaml_file.write_text(f"teacher:\n  - name: b\n    spec: {teacher_spec}\n    max_batch_size: 7\n")
    assert load_config(yaml_file).teachers[0].options.max_batch_size == 7
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[[teacher]]\nname = "a"\nspec = "{teacher_spec}"\nmax_batchsize = 3\n')
    with pytest.raises(ConfigError, match="unknown key.*max_batchsize"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.toml")


def test_several_teachers_each_with_its_own_batcher(teacher: Teacher, teacher_spec: str) -> None:
    from kd.teacher_server.loading import load_teacher

    other = load_teacher("other", "kd.models:digits_student")
    running = start_server(
        [teacher, other], port=0, options={"other": TeacherOptions(max_batch_size=5, preferred_batch_sizes=[2])}
    )
    try:
        x = torch.rand(4, 64)
        with TeacherClient(f"127.0.0.1:{running.port}") as c:
            assert [t.name for t in c.list_teachers()] == ["digits", "other"]
            a = c.infer("digits", x)["logits"]
            b = c.infer("other", x)["logits"]
        with torch.inference_mode():
            torch.testing.assert_close(a, teacher.model(x))
            torch.testing.assert_close(b, other.model(x))
        assert running.endpoints["other"].batcher.max_batch_size == 5
        assert running.endpoints["digits"].batcher.max_batch_size == 256
    finally:
        running.stop(grace=1)


def test_client_balances_over_a_pool_and_skips_a_dead_address(teacher: Teacher) -> None:
    import socket

    servers = [start_server([teacher], port=0) for _ in range(2)]
    with socket.socket() as s:  # a port with nothing behind it
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    try:
        addresses = [f"127.0.0.1:{r.port}" for r in servers] + [f"127.0.0.1:{dead}"]
        x = torch.rand(2, 64)
        with TeacherClient(addresses, timeout=10) as c:
            outs = [c.infer("digits", x)["logits"] for _ in range(30)]
        with torch.inference_mode():
            ref = teacher.model(x)
        for o in outs:
            torch.testing.assert_close(o, ref)
        counts = [r.endpoints["digits"].batcher.stats.requests for r in servers]
        assert sum(counts) == 30 and min(counts) >= 5, counts
    finally:
        for r in servers:
            r.stop(grace=1)


def test_cnn_features_survive_inplace_relu_and_channels_last() -> None:
    from kd.teacher_server.loading import load_teacher

    torch.manual_seed(0)
    cnn = load_teacher("cnn", "kd.models:digits_cnn")
    running = start_server([cnn], port=0, options={"cnn": TeacherOptions(channels_last=True)})
    try:
        x = torch.rand(5, 1, 8, 8)
        with TeacherClient(f"127.0.0.1:{running.port}") as c:
            out = c.infer("cnn", x, features=["layer1.1", "layer2"])
            pooled = c.infer("cnn", x, features=["layer2"], pool_features=True)
        m = cnn.model
        with torch.inference_mode():
            bn = m.layer1[1](m.layer1[0](x))  # before the in-place ReLU that follows it
            l2 = m.layer2(m.layer1(x))
            torch.testing.assert_close(out["logits"], m(x), rtol=1e-5, atol=1e-5)
        assert (bn < 0).any(), "the reference must have negatives for this test to mean anything"
        torch.testing.assert_close(out["feature/layer1.1"], bn, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["feature/layer2"], l2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pooled["feature/layer2"], l2.mean(dim=(2, 3)), rtol=1e-5, atol=1e-5)
    finally:
        running.stop(grace=1)


def test_torch_compile_teacher_serves_the_same_logits() -> None:
    from kd.teacher_server.loading import load_teacher

    small = load_teacher("small", "kd.models:digits_student")
    # Warm-up compiles before the port opens, so the first request is not slow.
    running = start_server([small], port=0, options={"small": TeacherOptions(compile=True, max_batch_size=16)})
    try:
        x = torch.rand(5, 64)
        with TeacherClient(f"127.0.0.1:{running.port}") as c:
            out = c.infer("small", x)["logits"]
        with torch.inference_mode():
            torch.testing.assert_close(out, small.model(x), rtol=1e-5, atol=1e-5)
        assert running.endpoints["small"].batcher.runner._model is not small.model  # the compiled wrapper ran
    finally:
        running.stop(grace=1)
