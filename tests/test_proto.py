"""The committed stubs in kd/v1 are what proto/kd/v1/teacher.proto compiles to."""

from __future__ import annotations

import difflib
import re
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool

from kd import protogen
from kd.v1 import teacher_pb2, teacher_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
PROTO_NAME = "kd/v1/teacher.proto"
FDP = descriptor_pb2.FieldDescriptorProto


def default_json_name(field_name: str) -> str:
    """protoc's default json_name: drop underscores, upper-case the letter after each."""
    out, upper = [], False
    for ch in field_name:
        if ch == "_":
            upper = True
        else:
            out.append(ch.upper() if upper else ch)
            upper = False
    return "".join(out)


def strip_default_json_names(msg: descriptor_pb2.DescriptorProto) -> None:
    # --descriptor_set_out fills json_name for every field; the python generator
    # embeds only explicitly set ones. Drop the derived defaults to compare.
    for f in msg.field:
        if f.json_name == default_json_name(f.name):
            f.ClearField("json_name")
    for nested in msg.nested_type:
        strip_default_json_names(nested)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorProto:
    out = tmp_path_factory.mktemp("protoc") / "teacher.pb"
    protogen.protoc([f"--descriptor_set_out={out}"])
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    files = {f.name: f for f in fds.file}
    assert PROTO_NAME in files, sorted(files)
    fdp = files[PROTO_NAME]
    for m in fdp.message_type:
        strip_default_json_names(m)
    return fdp


def committed_fdp() -> descriptor_pb2.FileDescriptorProto:
    return descriptor_pb2.FileDescriptorProto.FromString(teacher_pb2.DESCRIPTOR.serialized_pb)


def test_default_json_name_helper() -> None:
    assert default_json_name("input_shape") == "inputShape"
    assert default_json_name("max_batch_size") == "maxBatchSize"
    assert default_json_name("data") == "data"


def test_committed_descriptor_matches_proto_source(compiled: descriptor_pb2.FileDescriptorProto) -> None:
    committed = committed_fdp()
    if committed != compiled:
        diff = "\n".join(
            difflib.unified_diff(
                str(committed).splitlines(), str(compiled).splitlines(), "kd/v1/teacher_pb2.py", PROTO_NAME, lineterm=""
            )
        )
        pytest.fail(f"kd/v1/teacher_pb2.py is stale; run `python -m kd.protogen`:\n{diff}")
    # the live descriptor (what the runtime actually uses) agrees as well
    live = descriptor_pb2.FileDescriptorProto()
    teacher_pb2.DESCRIPTOR.CopyToProto(live)
    assert live == compiled


def test_descriptor_comparison_detects_a_change(compiled: descriptor_pb2.FileDescriptorProto) -> None:
    # The comparison above is sensitive to a one-field edit of the .proto.
    edited = descriptor_pb2.FileDescriptorProto()
    edited.CopyFrom(compiled)
    tensor = next(m for m in edited.message_type if m.name == "Tensor")
    tensor.field.add(name="strides", number=4, label=FDP.LABEL_REPEATED, type=FDP.TYPE_INT64)
    assert edited != committed_fdp()


def _version_free(text: str) -> list[str]:
    return [line for line in text.splitlines() if not re.search(r"VERSION|\d+\.\d+\.\d+", line)]


_CLIENT = re.compile(r"self\.(\w+) = channel\.(\w+)\(\s*'([^']+)',\s*request_serializer=([\w.]+),"
                     r"\s*response_deserializer=([\w.]+)")  # fmt: skip
_SERVER = re.compile(r"'(\w+)': grpc\.(\w+)_rpc_method_handler\(\s*servicer\.(\w+),\s*request_deserializer=([\w.]+),"
                     r"\s*response_serializer=([\w.]+)")  # fmt: skip


def _stub_contract(text: str) -> tuple[set, set]:
    """What a gRPC stub module does, independent of the generator's version and template: per RPC
    the client's call kind, path and (de)serializers, and the server's handler kind and servicer method."""
    return set(_CLIENT.findall(text)), set(_SERVER.findall(text))


def test_committed_grpc_and_pyi_stubs_are_what_the_proto_compiles_to(tmp_path: Path) -> None:
    """Never skipped: whatever grpcio-tools is installed, the committed stub must define exactly the
    RPCs (paths, call kinds, message types) that the .proto compiles to. When the generator is of the
    same minor version as the one that made the stubs, the whole text must match too (less the
    version stamp)."""
    from grpc_tools import grpc_version

    committed_grpc = (ROOT / "kd/v1/teacher_pb2_grpc.py").read_text()
    m = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", committed_grpc)
    assert m, "committed grpc stub has no GRPC_GENERATED_VERSION"

    protogen.protoc([f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}"])
    fresh_grpc = (tmp_path / "kd/v1/teacher_pb2_grpc.py").read_text()
    client, server = _stub_contract(fresh_grpc)
    assert len(client) == len(server) == len(EXPECTED_METHODS)  # the patterns still read this template
    assert _stub_contract(committed_grpc) == (client, server), "kd/v1/teacher_pb2_grpc.py is stale: run `make protos`"
    assert (tmp_path / "kd/v1/teacher_pb2.pyi").read_text() == (ROOT / "kd/v1/teacher_pb2.pyi").read_text()
    if m.group(1).split(".")[:2] == grpc_version.VERSION.split(".")[:2]:
        assert _version_free(fresh_grpc) == _version_free(committed_grpc)
        # the filter drops only a handful of lines; the rest is compared
        assert len(_version_free(fresh_grpc)) > 0.9 * len(fresh_grpc.splitlines())


def test_stub_contract_detects_a_changed_rpc() -> None:
    committed = (ROOT / "kd/v1/teacher_pb2_grpc.py").read_text()
    edits = [
        ("InferResponse.FromString", "InferRequest.FromString"),
        ("'/kd.v1.TeacherService/Infer'", "'/kd.v1.TeacherService/Infer2'"),
    ]
    for old, new in edits:
        assert old in committed
        assert _stub_contract(committed.replace(old, new, 1)) != _stub_contract(committed)


EXPECTED_METHODS = {
    # name: (request, response, client_streaming, server_streaming)
    "ListTeachers": ("kd.v1.ListTeachersRequest", "kd.v1.ListTeachersResponse", False, False),
    "Infer": ("kd.v1.InferRequest", "kd.v1.InferResponse", False, False),
    "InferStream": ("kd.v1.InferRequest", "kd.v1.InferResponse", True, True),
    "InputGradient": ("kd.v1.GradientRequest", "kd.v1.GradientResponse", False, False),
    "GetBatchNormStats": ("kd.v1.BatchNormStatsRequest", "kd.v1.BatchNormStatsResponse", False, False),
    "BatchNormLoss": ("kd.v1.BatchNormLossRequest", "kd.v1.BatchNormLossResponse", False, False),
    "GetActivationRecords": ("kd.v1.ActivationRecordsRequest", "kd.v1.ActivationRecordsResponse", False, False),
    "Synthesize": ("kd.v1.SynthesisRequest", "kd.v1.SynthesisUpdate", False, True),
    "PublishWeights": ("kd.v1.WeightsChunk", "kd.v1.PublishWeightsResponse", True, False),
}


def test_service_methods_match_descriptor(compiled: descriptor_pb2.FileDescriptorProto) -> None:
    service = teacher_pb2.DESCRIPTOR.services_by_name["TeacherService"]
    assert service.full_name == "kd.v1.TeacherService"
    got = {
        m.name: (m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming)
        for m in service.methods
    }
    assert got == EXPECTED_METHODS
    # and the .proto source says the same
    (src_service,) = compiled.service
    from_source = {
        m.name: (m.input_type.lstrip("."), m.output_type.lstrip("."), m.client_streaming, m.server_streaming)
        for m in src_service.method
    }
    assert from_source == EXPECTED_METHODS

    # the grpc stub exposes exactly these methods, with matching call shapes
    servicer_methods = {n for n in vars(teacher_pb2_grpc.TeacherServiceServicer) if not n.startswith("_")}
    assert servicer_methods == set(EXPECTED_METHODS)
    channel = grpc.insecure_channel("127.0.0.1:1")  # never connected: building a stub does no I/O
    try:
        stub = teacher_pb2_grpc.TeacherServiceStub(channel)
        kinds = {
            (False, False): grpc.UnaryUnaryMultiCallable,
            (True, True): grpc.StreamStreamMultiCallable,
            (False, True): grpc.UnaryStreamMultiCallable,
            (True, False): grpc.StreamUnaryMultiCallable,
        }
        for name, (_, _, cs, ss) in EXPECTED_METHODS.items():
            assert isinstance(getattr(stub, name), kinds[(cs, ss)]), name
    finally:
        channel.close()


class _EchoServicer(teacher_pb2_grpc.TeacherServiceServicer):
    def ListTeachers(self, request, context):
        return teacher_pb2.ListTeachersResponse(teachers=[teacher_pb2.TeacherInfo(name="t", num_classes=3)])

    def Infer(self, request, context):
        return teacher_pb2.InferResponse(request_id=request.request_id, teacher=request.teacher)

    def InferStream(self, request_iterator, context):
        for r in request_iterator:
            yield teacher_pb2.InferResponse(request_id=r.request_id, teacher=r.teacher)


def test_generated_stubs_work_over_a_real_channel() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    teacher_pb2_grpc.add_TeacherServiceServicer_to_server(_EchoServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = teacher_pb2_grpc.TeacherServiceStub(channel)
            listed = stub.ListTeachers(teacher_pb2.ListTeachersRequest(), timeout=10)
            assert [(t.name, t.num_classes) for t in listed.teachers] == [("t", 3)]
            one = stub.Infer(teacher_pb2.InferRequest(request_id="a", teacher="t"), timeout=10)
            assert (one.request_id, one.teacher) == ("a", "t")
            reqs = [teacher_pb2.InferRequest(request_id=str(i), teacher="t") for i in range(3)]
            assert [r.request_id for r in stub.InferStream(iter(reqs), timeout=10)] == ["0", "1", "2"]
    finally:
        server.stop(grace=None)


def test_package_and_module_names() -> None:
    assert teacher_pb2.DESCRIPTOR.package == "kd.v1"
    assert teacher_pb2.DESCRIPTOR.name == PROTO_NAME
    assert teacher_pb2.__name__ == "kd.v1.teacher_pb2"
    assert teacher_pb2_grpc.__name__ == "kd.v1.teacher_pb2_grpc"
    assert teacher_pb2.Tensor.DESCRIPTOR.full_name == "kd.v1.Tensor"
    assert teacher_pb2.Tensor.__module__ == "kd.v1.teacher_pb2"
    # the grpc stub uses the package's own pb2 module, not a second copy
    assert teacher_pb2_grpc.kd_dot_v1_dot_teacher__pb2 is teacher_pb2
    assert descriptor_pool.Default().FindFileByName(PROTO_NAME) is teacher_pb2.DESCRIPTOR
    for name in teacher_pb2.DESCRIPTOR.message_types_by_name:
        assert teacher_pb2.DESCRIPTOR.message_types_by_name[name].full_name == f"kd.v1.{name}"


def test_importing_stubs_creates_no_top_level_proto_module() -> None:
    # In a fresh interpreter (this one may have imported anything by now).
    code = (
        "import sys\n"
        "import kd.v1.teacher_pb2, kd.v1.teacher_pb2_grpc, kd.core.wire\n"
        "bad = sorted(m for m in sys.modules if m == 'proto' or m.startswith('proto.') or m == 'teacher_pb2')\n"
        "assert not bad, bad\n"
        "assert kd.v1.teacher_pb2.__name__ == 'kd.v1.teacher_pb2'\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
    # and the generated sources do not refer to such a module
    for path in ("kd/v1/teacher_pb2.py", "kd/v1/teacher_pb2_grpc.py"):
        text = (ROOT / path).read_text()
        assert not re.search(r"^\s*(from|import)\s+proto\b", text, re.M), path


def float_lists(fdp: descriptor_pb2.FileDescriptorProto) -> list[str]:
    found = []

    def walk(msg: descriptor_pb2.DescriptorProto, prefix: str) -> None:
        for f in msg.field:
            if f.label == FDP.LABEL_REPEATED and f.type in (FDP.TYPE_FLOAT, FDP.TYPE_DOUBLE):
                found.append(f"{prefix}{msg.name}.{f.name}")
        for nested in msg.nested_type:
            walk(nested, f"{prefix}{msg.name}.")

    for m in fdp.message_type:
        walk(m, "")
    return found


def test_float_list_finder_finds_nested_fields() -> None:
    fdp = descriptor_pb2.FileDescriptorProto(name="x.proto")
    outer = fdp.message_type.add(name="Outer")
    outer.nested_type.add(name="Inner").field.add(name="v", number=1, label=FDP.LABEL_REPEATED, type=FDP.TYPE_DOUBLE)
    outer.field.add(name="w", number=1, label=FDP.LABEL_REPEATED, type=FDP.TYPE_FLOAT)
    outer.field.add(name="ok", number=2, label=FDP.LABEL_OPTIONAL, type=FDP.TYPE_FLOAT)
    assert float_lists(fdp) == ["Outer.w", "Outer.Inner.v"]


# Deliberate exceptions: a few per-channel constants describing a teacher's
# input preprocessing (TeacherInfo.normalization), not tensor payloads. Any other
# repeated float/double field is a tensor sneaking around the bytes encoding.
# A handful of per-channel / per-layer constants, not tensors.
SMALL_CONSTANT_FLOAT_LISTS = {"Normalization.mean", "Normalization.std", "BatchNormLossRequest.layer_weights"}


def test_tensors_travel_as_bytes(compiled: descriptor_pb2.FileDescriptorProto) -> None:
    for fdp in (compiled, committed_fdp()):
        unexpected = set(float_lists(fdp)) - SMALL_CONSTANT_FLOAT_LISTS
        assert not unexpected, f"repeated float/double fields (send tensors as kd.v1.Tensor bytes): {unexpected}"
    # every tensor-valued field uses the Tensor message
    messages = {m.name: m for m in compiled.message_type}
    inputs = next(f for f in messages["InferRequest"].field if f.name == "inputs")
    assert inputs.type_name == ".kd.v1.Tensor"
    entry = next(n for n in messages["InferResponse"].nested_type if n.name == "OutputsEntry")
    assert next(f for f in entry.field if f.name == "value").type_name == ".kd.v1.Tensor"
    tensor = {f.name: f for f in next(m for m in compiled.message_type if m.name == "Tensor").field}
    assert tensor["data"].type == FDP.TYPE_BYTES
    assert tensor["data"].label == FDP.LABEL_OPTIONAL
    assert (tensor["shape"].type, tensor["shape"].label) == (FDP.TYPE_INT64, FDP.LABEL_REPEATED)
    assert (tensor["dtype"].type, tensor["dtype"].type_name) == (FDP.TYPE_ENUM, ".kd.v1.DType")
