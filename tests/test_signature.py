"""Teacher signatures, target fingerprints, and datasets read by reference.

The signature (kd.core.signature) travels in ListTeachers; the fingerprint a
server reports covers the options that change its targets, so a cache filled by
a bf16 server is refused by a reader that wants the fp32 teacher; `kd serve
--dataset` reads samples through the SampleSource protocol and shapes them as
the teacher takes them (flat digits for a [1, 8, 8] CNN).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from kd.cache import StaleCacheError
from kd.core.data import Dataset, load_dataset, open_source
from kd.core.samples import SampleSource, view_seeds
from kd.core.signature import (
    SignatureError,
    TeacherSignature,
    TensorSpec,
    target_fingerprint,
    target_options,
)
from kd.core.wire import from_proto, to_proto
from kd.models import digits_cnn
from kd.precompute import precompute
from kd.student_trainer.sources import CacheSource, LocalSource, ServerSource
from kd.teacher_server.client import DatasetRef, TeacherClient, TeacherRequestError
from kd.teacher_server.loading import Teacher, fingerprint, load_teacher, save_weights
from kd.teacher_server.server import TeacherOptions, start_server
from kd.v1 import teacher_pb2 as pb
from kd.v1 import teacher_pb2_grpc as pb_grpc

TOKENS = TeacherSignature(
    (TensorSpec("tokens", torch.int64, (-1,)),),
    (TensorSpec("logits", torch.float32, (-1, 50)),),
    extra={"tokenizer": "toy-50"},
)


# -- the signature --------------------------------------------------------------------------


def test_tensor_spec_checks_dtype_and_shape_with_a_variable_positions_axis() -> None:
    image = TensorSpec("input", torch.float32, (1, 8, 8))
    image.check(torch.zeros(3, 1, 8, 8))
    with pytest.raises(SignatureError, match=r"shape \[3, 64\] but 'input' takes \[N, 1, 8, 8\]"):
        image.check(torch.zeros(3, 64))
    with pytest.raises(SignatureError, match="has dtype float16; expected input: float32"):
        image.check(torch.zeros(3, 1, 8, 8, dtype=torch.float16))
    with pytest.raises(SignatureError, match="empty batch"):
        image.check(torch.zeros(0, 1, 8, 8))
    # Token teachers: any sequence length S, the same for every sample of a batch.
    TOKENS.check(torch.zeros(2, 7, dtype=torch.int64))
    TOKENS.check(torch.zeros(4, 130, dtype=torch.int64))
    with pytest.raises(SignatureError, match=r"takes \[N, S\]"):
        TOKENS.check(torch.zeros(2, 7, 3, dtype=torch.int64))
    assert TOKENS.positional and not TeacherSignature.classifier((64,), 10).positional
    assert TOKENS.num_classes == 50
    assert str(TOKENS) == "(tokens: int64 [S]) -> (logits: float32 [S, 50])"
    with pytest.raises(SignatureError, match="below -1"):
        TensorSpec("x", torch.float32, (-2, 4))


def test_conform_reshapes_a_matching_element_count_and_names_both_shapes_otherwise() -> None:
    sig = TeacherSignature.classifier((1, 8, 8), 10)
    flat = torch.arange(2 * 64, dtype=torch.float32).reshape(2, 64)
    shaped = sig.conform(flat)
    assert shaped.shape == (2, 1, 8, 8) and torch.equal(shaped.reshape(2, 64), flat)
    same = torch.zeros(2, 1, 8, 8)
    assert sig.conform(same) is same
    with pytest.raises(SignatureError, match=r"shape \[63\] \(63 elements\).*shape \[1, 8, 8\] \(64 elements\)"):
        sig.conform(torch.zeros(2, 63))
    # A variable axis is never guessed by reshaping.
    with pytest.raises(SignatureError, match=r"\[S\] \(a variable size\)"):
        TOKENS.conform(torch.zeros(2, 3, 4, dtype=torch.int64))


def test_signature_validates_itself_and_round_trips() -> None:
    sig = TeacherSignature.classifier((3, 4, 4), 3, class_names=["a", "b", "c"], mean=[0.5] * 3, std=[0.25] * 3)
    info = sig.fill_info(pb.TeacherInfo(name="t", num_classes=3))
    assert [tuple(s.shape) for s in info.inputs] == [(3, 4, 4)] and info.outputs[0].name == "logits"
    back = TeacherSignature.from_info(pb.TeacherInfo.FromString(info.SerializeToString()))
    assert back == sig
    assert TeacherSignature.from_dict(sig.to_dict()) == sig
    tok_info = TOKENS.fill_info(pb.TeacherInfo())
    assert TeacherSignature.from_info(tok_info) == TOKENS and list(tok_info.outputs[0].shape) == [-1, 50]
    # A server from before TensorSpec: the older fields give the same signature.
    old = pb.TeacherInfo(input_shape=[3, 4, 4], input_dtype=pb.FLOAT32, num_classes=3, class_names=["a", "b", "c"],
                         normalization=pb.Normalization(mean=[0.5] * 3, std=[0.25] * 3))  # fmt: skip
    assert TeacherSignature.from_info(old) == sig
    with pytest.raises(SignatureError, match="2 class names for 3 classes"):
        TeacherSignature.classifier((4,), 3, class_names=["a", "b"])
    with pytest.raises(SignatureError, match="both mean and std"):
        TeacherSignature.classifier((4,), 3, mean=[0.5])


# -- the target fingerprint ---------------------------------------------------------------


def test_target_fingerprint_covers_amp_compile_and_normalisation_only() -> None:
    base = "a" * 64
    # The reference configuration keeps the weights fingerprint (older caches stay valid).
    assert target_fingerprint(base) == base and target_options() == {}
    variants = {
        "bf16": target_fingerprint(base, amp="bf16"),
        "fp16": target_fingerprint(base, amp="fp16"),
        "compile": target_fingerprint(base, compile=True),
        "norm": target_fingerprint(base, mean=[0.5], std=[0.25]),
        "norm2": target_fingerprint(base, mean=[0.5], std=[0.5]),
        "bf16+compile": target_fingerprint(base, amp="bf16", compile=True),
        "other weights bf16": target_fingerprint("b" * 64, amp="bf16"),
    }
    assert len({base, *variants.values()}) == len(variants) + 1
    assert target_fingerprint(base, amp="bf16") == variants["bf16"]  # deterministic
    # Normalisation is applied in float32: values equal in float32 name the same targets.
    assert target_fingerprint(base, mean=[0.1], std=[0.2]) == target_fingerprint(base, mean=[0.1000000001], std=[0.2])
    assert target_options(amp="bf16", compile=True) == {"amp": "bf16", "compile": "inductor"}
    with pytest.raises(ValueError, match="unknown amp dtype 'int8'"):
        target_fingerprint(base, amp="int8")


def test_list_teachers_and_infer_report_the_target_fingerprint_and_signature(teacher: Teacher) -> None:
    bf16 = dataclasses.replace(teacher, name="digits-bf16")
    names = [str(i) for i in range(10)]
    running = start_server(
        [teacher, bf16],
        port=0,
        options={
            "digits": TeacherOptions(class_names=names, warmup=False),
            "digits-bf16": TeacherOptions(amp="bf16", warmup=False),
        },
    )
    try:
        with TeacherClient(f"127.0.0.1:{running.port}") as c:
            fp32_desc, bf16_desc = c.describe("digits"), c.describe("digits-bf16")
        assert fp32_desc.fingerprint == teacher.fingerprint == fingerprint(teacher.model)
        assert bf16_desc.fingerprint == target_fingerprint(teacher.fingerprint, amp="bf16") != teacher.fingerprint
        assert bf16_desc.weights_fingerprint == fp32_desc.weights_fingerprint == teacher.fingerprint
        assert bf16_desc.target_options == {"amp": "bf16"} and fp32_desc.target_options == {}
        assert fp32_desc.signature == TeacherSignature.classifier((64,), 10, class_names=names)
        assert str(bf16_desc.signature) == "(input: float32 [64]) -> (logits: float32 [10])"
        # Every Infer reply names the targets it carries.
        stub = pb_grpc.TeacherServiceStub(grpc.insecure_channel(f"127.0.0.1:{running.port}"))
        x = torch.rand(3, 64)
        replies = {
            name: stub.Infer(pb.InferRequest(teacher=name, inputs=to_proto(x)), timeout=30)
            for name in ("digits", "digits-bf16")
        }
        assert replies["digits"].fingerprint == fp32_desc.fingerprint
        assert replies["digits-bf16"].fingerprint == bf16_desc.fingerprint
        # Why they must differ: bf16 autocast moves the logits.
        diff = from_proto(replies["digits"].outputs["logits"]) - from_proto(replies["digits-bf16"].outputs["logits"])
        assert float(diff.abs().max()) > 1e-4
    finally:
        running.stop(grace=1)


def test_a_bf16_servers_cache_is_refused_by_an_fp32_reader(teacher: Teacher, tmp_path: Path) -> None:
    data = load_dataset("digits", "test")
    bf16 = dataclasses.replace(teacher, name="digits-bf16")
    running = start_server(
        [teacher, bf16],
        port=0,
        options={"digits": TeacherOptions(warmup=False), "digits-bf16": TeacherOptions(amp="bf16", warmup=False)},
    )
    try:
        address = f"127.0.0.1:{running.port}"
        caches = {}
        for name in ("digits", "digits-bf16"):
            source = ServerSource(address, name)
            try:
                caches[name] = precompute(data, source, tmp_path / name, progress=False).path
            finally:
                source.close()
    finally:
        running.stop(grace=1)
    fp32_fp = LocalSource(teacher).fingerprint  # what an in-process fp32 teacher expects
    # The fp32 server's cache is the local fp32 teacher's; the bf16 server's is not.
    CacheSource(str(caches["digits"]), teacher_fingerprint=fp32_fp, dataset_id=data.dataset_id)
    with pytest.raises(StaleCacheError, match="teacher_fingerprint"):
        CacheSource(str(caches["digits-bf16"]), teacher_fingerprint=fp32_fp, dataset_id=data.dataset_id)
    bf16_fp = target_fingerprint(teacher.fingerprint, amp="bf16")
    cached = CacheSource(str(caches["digits-bf16"]), teacher_fingerprint=bf16_fp, dataset_id=data.dataset_id)
    assert cached.fingerprint == bf16_fp


# -- datasets by reference ----------------------------------------------------------------


class ByIndexSource:
    """A SampleSource with nothing but the protocol (no ``inputs`` tensor, no ``views``):
    the server must read it by index and view id."""

    def __init__(self, base: Dataset) -> None:
        self._base = base
        self.reads: list[int] = []

    @property
    def dataset_id(self) -> str:
        return self._base.dataset_id

    @property
    def num_classes(self) -> int:
        return self._base.num_classes

    @property
    def augmentation(self) -> str:
        return self._base.augmentation

    @property
    def labels(self) -> torch.Tensor:
        return self._base.labels

    def __len__(self) -> int:
        return len(self._base)

    def get(self, indices: torch.Tensor, views: torch.Tensor | None = None) -> torch.Tensor:
        self.reads.append(len(indices))
        return self._base.get(indices, views)


@pytest.fixture(scope="module")
def cnn_spec(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The digits CNN (input [1, 8, 8]) with seeded weights: training it would only cost
    time here, what is checked is where the samples go and how they are shaped."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = digits_cnn()
    return f"kd.models:digits_cnn@{save_weights(model, tmp_path_factory.mktemp('cnn') / 'cnn.safetensors')}"


@pytest.fixture(scope="module")
def cnn(cnn_spec: str) -> Teacher:
    return load_teacher("cnn", cnn_spec)


def test_cnn_teacher_takes_flat_digits_by_reference_through_the_protocol(cnn: Teacher) -> None:
    train = load_dataset("digits", "train")
    source = ByIndexSource(train)
    assert isinstance(source, SampleSource)
    n = 6
    raw = torch.randint(0, 256, (n, 64), dtype=torch.uint8)
    u8 = Dataset("u8", "train", raw, torch.zeros(n, dtype=torch.long), 10)
    bad = Dataset("bad", "train", torch.rand(n, 63), torch.zeros(n, dtype=torch.long), 10)
    running = start_server(
        [cnn],
        port=0,
        datasets={"digits": source, "u8": u8, "bad": bad},
        options={"cnn": TeacherOptions(mean=[0.5], std=[0.25], warmup=False)},
    )
    try:
        idx = [5, 17, 300, 5]
        views = torch.tensor([1, 2, 3, 0])
        seeds = view_seeds(torch.tensor(idx), views, 4).tolist()
        with TeacherClient(f"127.0.0.1:{running.port}") as c:
            plain = c.infer("cnn", ref=DatasetRef("digits", idx))["logits"]
            viewed = c.infer("cnn", ref=DatasetRef("digits", idx, seeds))["logits"]
            sent = c.infer("cnn", train.inputs[idx].reshape(-1, 1, 8, 8))["logits"]
            sent_views = c.infer("cnn", train.views(idx, seeds).reshape(-1, 1, 8, 8))["logits"]
            u8_ref = c.infer("cnn", ref=DatasetRef("u8", [0, 3, 4]))["logits"]
            u8_sent = c.infer("cnn", raw[[0, 3, 4]].reshape(-1, 1, 8, 8))["logits"]
            with pytest.raises(TeacherRequestError, match="view seed 7 of index 5 is not index") as err:
                c.infer("cnn", ref=DatasetRef("digits", [5], [7]))
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(TeacherRequestError) as err:
                c.infer("cnn", ref=DatasetRef("bad", [0, 1]))
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "shape [63] (63 elements)" in err.value.message and "[1, 8, 8] (64 elements)" in err.value.message
            assert "dataset 'bad'" in err.value.message and "teacher 'cnn'" in err.value.message
            again = c.infer("cnn", ref=DatasetRef("digits", idx))["logits"]  # still serving
        assert torch.equal(plain, sent) and torch.equal(viewed, sent_views) and torch.equal(again, plain)
        assert not torch.equal(plain, viewed)
        assert torch.equal(u8_ref, u8_sent)  # uint8 samples normalised like uint8 inputs
        with torch.inference_mode():
            ref = cnn.model((raw[[0, 3, 4]].float() / 255 - 0.5) / 0.25)
        torch.testing.assert_close(u8_ref, ref, rtol=1e-5, atol=1e-5)
        assert source.reads == [4, 4, 4]  # read by index per request: 4 samples each time
    finally:
        running.stop(grace=1)


def _png_folder(root: Path) -> Path:
    """Two classes of 8x8 PNGs, grey and RGB: a file dataset `open_source` reads lazily."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), mode="RGB").save(root / cls / f"{i}.png")
    return root


def test_kd_serve_dataset_flag_answers_by_reference_like_pixels(cnn: Teacher, cnn_spec: str, tmp_path) -> None:
    pngs = _png_folder(tmp_path / "pngs")
    grey_uri, rgb_uri = f"imagefolder:{pngs}?mode=L&dtype=uint8", f"imagefolder:{pngs}"
    port_file = tmp_path / "port"
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kd", "serve", "--teacher", f"cnn={cnn_spec}", "--dataset",
             "digits=digits", "--dataset", "test=digits:test", "--dataset", f"grey={grey_uri}", "--dataset",
             f"rgb={rgb_uri}", "--port", "0", "--port-file", str(port_file),
             "--no-warmup"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 90
            while not port_file.exists():
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "kd serve did not start"
                time.sleep(0.05)
            train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
            idx = list(range(0, 64, 3))
            with TeacherClient(f"127.0.0.1:{port_file.read_text()}") as c:
                desc = c.describe("cnn")
                by_ref = c.infer("cnn", ref=DatasetRef("digits", idx))["logits"]
                by_value = c.infer("cnn", train.inputs[idx].reshape(-1, 1, 8, 8))["logits"]
                test_ref = c.infer("cnn", ref=DatasetRef("test", [0, 1, 2]))["logits"]
                test_value = c.infer("cnn", test.inputs[:3].reshape(-1, 1, 8, 8))["logits"]
                # A file dataset through open_source: uint8 grey images, read per request.
                grey = open_source(grey_uri).get(torch.tensor([0, 5, 2]))
                assert grey.dtype == torch.uint8 and grey.shape == (3, 1, 8, 8)
                grey_ref = c.infer("cnn", ref=DatasetRef("grey", [0, 5, 2]))["logits"]
                grey_value = c.infer("cnn", grey)["logits"]
                with pytest.raises(TeacherRequestError) as err:
                    c.infer("cnn", ref=DatasetRef("rgb", [0]))
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "shape [3, 8, 8] (192 elements)" in err.value.message and "[1, 8, 8] (64" in err.value.message
            assert torch.equal(grey_ref, grey_value)
            assert desc.fingerprint == cnn.fingerprint
            assert desc.signature == TeacherSignature.classifier((1, 8, 8), 10)
            assert torch.equal(by_ref, by_value) and torch.equal(test_ref, test_value)
            with torch.inference_mode():
                torch.testing.assert_close(by_ref, cnn.model(train.inputs[idx].reshape(-1, 1, 8, 8)))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    out = log_path.read_text()
    assert f"dataset digits {train.dataset_id}, {len(train)} samples" in out
    assert f"dataset test {test.dataset_id}, {len(test)} samples" in out


class TinyTokenLM(torch.nn.Module):
    """Per position: embedding -> vocabulary logits, [N, S] int64 -> [N, S, V]."""

    def __init__(self, vocab: int = 50) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 8)
        self.head = torch.nn.Linear(8, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens))


def test_the_positions_axis_takes_any_sequence_length_by_value() -> None:
    torch.manual_seed(0)
    model = TinyTokenLM().eval()
    lm = Teacher("lm", model, fingerprint(model), (-1,), torch.int64, 50, torch.device("cpu"), "test", {},
                 signature=TOKENS)  # fmt: skip
    running = start_server([lm], port=0, options={"lm": TeacherOptions(warmup=False)})
    try:
        with TeacherClient(f"127.0.0.1:{running.port}") as c:
            desc = c.describe("lm")
            outs = {s: c.infer("lm", torch.randint(0, 50, (2, s)))["logits"] for s in (3, 11)}
            with pytest.raises(TeacherRequestError, match=r"shape \[2, 3, 4\] but teacher 'lm' takes \[N, S\]"):
                c.infer("lm", torch.zeros(2, 3, 4, dtype=torch.int64))
        assert desc.signature == TOKENS and desc.signature.extra == {"tokenizer": "toy-50"}
        assert outs[3].shape == (2, 3, 50) and outs[11].shape == (2, 11, 50)
    finally:
        running.stop(grace=1)
