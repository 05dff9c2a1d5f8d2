"""The client students use to reach one teacher server or a pool of them.

Several addresses (or a DNS name resolving to several) are balanced by gRPC's
own ``round_robin`` policy; UNAVAILABLE is retried by gRPC's retry policy.
"""

from __future__ import annotations

import ipaddress
import json
import queue
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from kd.core.malloc import keep_large_blocks
from kd.core.signature import TeacherSignature
from kd.core.wire import fill_proto, from_proto, proto_dtype, tensor_field, to_proto, torch_dtype
from kd.teacher_server import access as access_names
from kd.teacher_server.lm_client import TokenClientMixin
from kd.teacher_server.server import DEFAULT_MAX_MESSAGE_BYTES, SERVICE_NAME, channel_options
from kd.v1 import teacher_pb2 as pb
from kd.v1 import teacher_pb2_grpc as pb_grpc


class TeacherRequestError(RuntimeError):
    """The server refused or failed one request; ``code`` is its grpc.StatusCode."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class TeacherChangedError(TeacherRequestError):
    """A reply came from other weights than the ones this client was told to expect
    (``TeacherClient.expect_fingerprint``): a server restarted on the same address with
    another teacher. gRPC reconnects to it silently, so only the reply's fingerprint tells."""

    def __init__(self, address: str, teacher: str, expected: str, got: str) -> None:
        super().__init__(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"server {address} answered for teacher {teacher!r} with fingerprint {got or '(none)'}, but this run "
            f"started with fingerprint {expected}: the server was restarted or replaced with other weights, and "
            "mixing two teachers' targets would corrupt the run; serve the original weights at that address "
            "again, or start the run anew against the new teacher",
        )
        self.address, self.teacher, self.expected, self.got = address, teacher, expected, got


@dataclass(frozen=True)
class ServedDataset:
    """A dataset registered on a server for inputs by reference, as the server reports it."""

    name: str
    dataset_id: str  # kd.core.data's name/split@hash ("": a server too old to report it)
    num_samples: int = 0
    augmentation: str = ""


@dataclass(frozen=True)
class TeacherDescription:
    name: str
    fingerprint: str
    input_shape: tuple[int, ...]
    input_dtype: torch.dtype
    num_classes: int
    max_batch_size: int
    device: str
    access: str = "white"
    layers: dict[str, tuple[int, ...]] = field(default_factory=dict)
    batch_norms: tuple[str, ...] = ()
    has_activation_records: bool = False
    class_names: tuple[str, ...] = ()
    # kd.core.signature: inputs/outputs with per-sample shapes, class names, normalisation.
    signature: TeacherSignature | None = None
    # ``fingerprint`` is the target fingerprint: weights_fingerprint + target_options.
    weights_fingerprint: str = ""
    target_options: dict[str, str] = field(default_factory=dict)
    # Live weight updates (kd.teacher_server.weights): updates taken so far, and whether it takes them.
    weights_version: int = 0
    accepts_weights: bool = False
    # The datasets registered on the server (inputs by reference), by name.
    datasets: dict[str, ServedDataset] = field(default_factory=dict)


def _served_datasets(info: pb.TeacherInfo) -> dict[str, ServedDataset]:
    out = {name: ServedDataset(name, "") for name in info.datasets}
    for d in info.dataset_infos:
        out[d.name] = ServedDataset(d.name, d.dataset_id, int(d.num_samples), d.augmentation)
    return out


@dataclass(frozen=True)
class Usage:
    """This client's query accounting as the server reported it on the last reply."""

    client: str = ""
    samples: int = 0
    gradient_samples: int = 0
    budget: int = 0

    @classmethod
    def of(cls, msg: pb.Usage) -> Usage:
        return cls(msg.client, int(msg.samples), int(msg.gradient_samples), int(msg.budget))


@dataclass
class BNLoss:
    loss: float
    per_layer: dict[str, float]
    input_grad: torch.Tensor
    logits: torch.Tensor


def _service_config() -> str:
    return json.dumps(
        {
            "loadBalancingConfig": [{"round_robin": {}}],
            "methodConfig": [
                {
                    "name": [{"service": SERVICE_NAME}],
                    "retryPolicy": {
                        "maxAttempts": 5,
                        "initialBackoff": "0.1s",
                        "maxBackoff": "2s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ],
        }
    )


def _split_host_port(address: str) -> tuple[str, str]:
    """``host:port`` or ``[v6]:port`` -> (host without brackets, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"pool member {address!r}: expected HOST:PORT (an IPv6 address in brackets: [::1]:PORT)")
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host, port


def _member_ips(address: str) -> tuple[list[str], list[str], str]:
    """A pool member -> (its IPv4 ``ip:port`` targets, its IPv6 ``[ip]:port`` targets, its port)."""
    host, port = _split_host_port(address)
    try:
        ips = [ipaddress.ip_address(host)]
    except ValueError:  # a host name: resolved here (see target_of)
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except OSError as e:
            raise ValueError(f"pool member {address!r}: cannot resolve host {host!r} ({e})") from None
        ips = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    v4 = list(dict.fromkeys(f"{ip}:{port}" for ip in ips if ip.version == 4))
    v6 = list(dict.fromkeys(f"[{ip}]:{port}" for ip in ips if ip.version == 6))
    return v4, v6, port


def target_of(addresses: str | list[str]) -> str:
    """``host:port``, a list of them, or ``dns:///name:port`` -> a gRPC target.

    One address is given to gRPC as it is (its own resolver takes host names and
    ``[v6]:port``). A list becomes one ``ipv4:`` (or ``ipv6:``) target for gRPC's round_robin:
    those schemes take address literals only and a gRPC target names one resolver, so host
    names are resolved here, once, to the addresses of the family every member has (IPv4
    first: ``localhost`` resolves to both, and a server bound to one family refuses the other).
    """
    if isinstance(addresses, str):
        addresses = [a for a in addresses.split(",") if a]
    if len(addresses) == 1:
        return addresses[0]
    if any("://" in a for a in addresses):
        raise ValueError("give either one resolver URI (dns:///...) or a list of host:port")
    members = [_member_ips(a) for a in addresses]
    if all(v4 for v4, _, _ in members):
        return "ipv4:" + ",".join(t for v4, _, _ in members for t in v4)
    if all(v6 for _, v6, _ in members):
        return "ipv6:" + ",".join(t for _, v6, _ in members for t in v6)
    raise ValueError(f"pool {','.join(addresses)}: its members have no address family in common (some only IPv4, "
                     "some only IPv6); name them all by addresses of one family")  # fmt: skip


def spec_of(
    logits: bool = True,
    top_k: int = 0,
    temperature: float = 0.0,
    dtype: torch.dtype = torch.float32,
    features: Iterable[str] = (),
    pool_features: bool = False,
    features_dtype: torch.dtype = torch.float32,
    labels: bool = False,
    sparse_temperature: float = 0.0,
    samples: int = 0,
    sample_rounds: int = 0,
    sample_uniforms: torch.Tensor | None = None,
    sample_seed: int = 0,
) -> pb.OutputSpec:
    """What to ask for. ``top_k`` with ``sparse_temperature`` T: the sparse targets a
    ``topk:K`` cache at T stores (K logits and classes, the log-sum-exp of z / T).
    ``samples`` K (x ``sample_rounds``) draws at T, as a ``sample:K`` cache stores them
    ("sample_indices", "sample_counts" [N, R, K]), from ``sample_uniforms`` [N, R * K] float64
    when given (a cache's keyed draws), else from ``sample_seed``."""
    return pb.OutputSpec(
        class_samples=samples,
        class_sample_rounds=sample_rounds,
        class_sample_seed=sample_seed,
        **({} if sample_uniforms is None else {"sample_uniforms": to_proto(sample_uniforms.to(torch.float64))}),
        labels=labels,
        sparse_temperature=sparse_temperature,
        logits=logits,
        logits_dtype=proto_dtype(dtype),
        top_k=top_k,
        probs_temperature=temperature,
        features=list(features),
        pool_features=pool_features,
        features_dtype=proto_dtype(features_dtype),
    )


@dataclass(frozen=True)
class DatasetRef:
    """Inputs by reference: samples of a dataset registered on the server."""

    dataset: str
    indices: list[int]
    view_seeds: list[int] | None = None
    # Ask for the params of each view as the server drew them: outputs["view_params"] [N, 10].
    view_params: bool = False


def make_request(
    teacher: str, inputs: torch.Tensor | None, ref: DatasetRef | None, spec: pb.OutputSpec, request_id: str = ""
) -> pb.InferRequest:
    if (inputs is None) == (ref is None):
        raise ValueError("give exactly one of inputs (a tensor) or ref (a DatasetRef)")
    if ref is not None:
        msg = pb.DatasetRef(dataset=ref.dataset, indices=list(ref.indices), view_seeds=list(ref.view_seeds or []),
                            return_view_params=ref.view_params)  # fmt: skip
        return pb.InferRequest(request_id=request_id, teacher=teacher, ref=msg, outputs=spec)
    req = pb.InferRequest(request_id=request_id, teacher=teacher, outputs=spec)
    fill_proto(req.inputs, inputs)  # in place: a Tensor message assigned to the field would be copied again
    return req


_INPUTS_FIELD = pb.InferRequest.DESCRIPTOR.fields_by_name["inputs"].number


def encode_request(
    teacher: str, inputs: torch.Tensor | None, ref: DatasetRef | None, spec: pb.OutputSpec, request_id: str = ""
) -> bytes:
    """The serialised ``make_request(...)``, with the input payload copied once (into the
    body) instead of into a tensor message, the request and the serialisation."""
    if inputs is None or ref is not None:
        return make_request(teacher, inputs, ref, spec, request_id).SerializeToString()
    return b"".join([request_head(teacher, spec, request_id), *tensor_field(_INPUTS_FIELD, inputs)])


def request_head(teacher: str, spec: pb.OutputSpec, request_id: str = "") -> bytes:
    """An ``InferRequest`` without its inputs, serialised: ``encode_request`` appends them."""
    return pb.InferRequest(request_id=request_id, teacher=teacher, outputs=spec).SerializeToString()


_MAX_HEADS = 256  # request heads one TeacherClient remembers (forgotten all at once past it)
_PLAIN_TYPES = frozenset({str, bool, int, float, tuple, torch.dtype})


def _plain(values: tuple) -> bool:
    """Whether every value is a plain immutable Python value (a torch.dtype counts as one)."""
    return all(type(v) in _PLAIN_TYPES for v in values)


def tune_for_large_requests() -> dict[str, bool]:
    """Opt in: keep freed large blocks in this process's glibc heap (``kd.core.malloc.keep_large_blocks``).

    Each request body and each decoded answer over 128 KiB is otherwise a fresh ``mmap``
    whose every 4 KiB page faults on first touch: ~8 ms of client CPU per 4.8 MB
    (32x3x224x224 uint8) request on a 2-core box, ~3-4 ms with this (``kd bench serve``'s
    clients call it). It changes malloc for the whole process, so ``TeacherClient`` never
    calls it itself; RSS may keep up to ~256 MiB of freed heap. A user's own
    ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` / ``GLIBC_TUNABLES`` win; no-op
    off glibc. Returns which settings it applied."""
    return keep_large_blocks()


# Seconds to wait for a server before the first request: a listening server connects in
# milliseconds, and kd serve started at the same moment (the README's `kd serve ... &` then
# `kd precompute`) answers once its teachers are loaded; 60 s, the unary deadline the first
# request had before this bound (a big teacher may take tens of seconds to load). A wrong or
# dead address then fails naming itself.
DEFAULT_CONNECT_TIMEOUT = 60.0
# Seconds a stream waits for its next reply before it gives up: the unary ``timeout``'s 60 s.
# Any of the up-to-``depth`` requests in flight may answer, so the wait is about one forward
# (a big model on a busy or CPU-only server: seconds to tens of seconds) plus other clients'
# queued work, as for one unary request; a stalled server is named within a minute.
DEFAULT_STREAM_TIMEOUT = 60.0


class TeacherClient(TokenClientMixin):
    """One client for one server or a pool (round_robin over addresses or a DNS name).

    Token teachers (language models): ``infer_tokens``, ``token_logits``, ``token_topk``,
    ``token_samples``, ``token_logprobs``, ``token_hidden``, ``infer_tokens_stream``
    (kd.teacher_server.lm_client).

    ``token`` is sent as ``authorization: Bearer <token>``; ``root_certificates``
    (PEM bytes) turns on TLS, ``client_cert``/``client_key`` add mutual TLS.

    Time limits (seconds; None: none): ``timeout`` bounds each unary request;
    ``connect_timeout`` bounds the wait for the server before the first request (``describe``
    or ``list_teachers``), so a wrong or dead address fails naming it instead of waiting out a
    request's deadline; ``stream_timeout`` bounds how long a stream (``infer_stream``) waits
    for its next answer, so a server that stops answering (stalled, hung, paused) fails the
    stream instead of blocking it forever.
    """

    def __init__(
        self,
        addresses: str | list[str],
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        timeout: float | None = 60.0,
        token: str | None = None,
        root_certificates: bytes | None = None,
        client_cert: bytes | None = None,
        client_key: bytes | None = None,
        server_name: str | None = None,
        client_id: str | None = None,
        connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
        stream_timeout: float | None = DEFAULT_STREAM_TIMEOUT,
    ) -> None:
        options: list[tuple[str, Any]] = channel_options(max_message_bytes)
        options += [("grpc.service_config", _service_config()), ("grpc.enable_retries", 1)]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        self.target = target_of(addresses)
        if root_certificates is not None or client_cert is not None:
            creds = grpc.ssl_channel_credentials(root_certificates, client_key, client_cert)
            self.channel = grpc.secure_channel(self.target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(self.target, options=options)
        self.stub = pb_grpc.TeacherServiceStub(self.channel)
        # Infer and InferStream take requests already serialised (encode_request).
        self._infer = self.channel.unary_unary(
            f"/{SERVICE_NAME}/Infer", request_serializer=None, response_deserializer=pb.InferResponse.FromString
        )
        self._infer_stream = self.channel.stream_stream(
            f"/{SERVICE_NAME}/InferStream", request_serializer=None, response_deserializer=pb.InferResponse.FromString
        )
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.stream_timeout = stream_timeout
        self._reached = False  # whether the server answered once (connect_timeout applies before that)
        # teacher name -> the fingerprint every reply for it must carry (expect_fingerprint).
        self._expected: dict[str, str] = {}
        metadata = [("authorization", f"Bearer {token}")] if token else []
        if client_id:  # how the server names this client in its query accounting (without a token)
            metadata.append(("kd-client-id", client_id))
        # Which client this is among those of one address (access.stream_key): the server's
        # per-client stream limit counts it apart from other processes of the host, while its
        # query accounting keeps to the token, certificate, client id or address.
        self.instance = uuid.uuid4().hex[:16]
        metadata.append((access_names.INSTANCE_KEY, self.instance))
        self.metadata = metadata
        self.usage = Usage()
        # (fingerprint, weights_version) of the weights that answered the last ``infer``.
        self.served_by: tuple[str, int] = ("", 0)
        # ``infer``'s serialised request heads by (teacher, what it asks for): a training loop
        # asks the same question each step, and building the spec and head is ~15% of the
        # client's CPU per small request.
        self._heads: dict[tuple, bytes] = {}

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def expect_fingerprint(self, teacher: str, fingerprint: str) -> None:
        """Every later reply for ``teacher`` must carry ``fingerprint`` (what ``describe`` said
        when the run started), or fail with ``TeacherChangedError``: gRPC reconnects on its own to
        a server restarted at the same address, which may hold other weights. Not for a teacher
        that takes live weight updates (``accepts_weights``): its fingerprint changes by design."""
        self._expected[teacher] = fingerprint

    def _check_reply(self, resp: pb.InferResponse) -> None:
        """Refuse a reply computed by other weights than the ones expected of its teacher."""
        want = self._expected.get(resp.teacher)
        if want is not None and resp.fingerprint != want:
            raise TeacherChangedError(self.target, resp.teacher, want, resp.fingerprint)

    def list_teachers(self) -> list[TeacherDescription]:
        resp = self._first_contact(self.stub.ListTeachers, pb.ListTeachersRequest())
        self.usage = Usage.of(resp.usage)
        return [
            TeacherDescription(
                t.name,
                t.fingerprint,
                tuple(t.input_shape),
                torch_dtype(t.input_dtype),
                int(t.num_classes),
                int(t.max_batch_size),
                t.device,
                access_names.FROM_PROTO.get(t.access, "white"),
                {layer.name: tuple(layer.shape) for layer in t.layers},
                tuple(b.name for b in t.batch_norms),
                bool(t.has_activation_records),
                tuple(t.class_names),
                TeacherSignature.from_info(t),
                t.weights_fingerprint or t.fingerprint,
                dict(t.target_options),
                int(t.weights_version),
                bool(t.accepts_weights),
                _served_datasets(t),
            )
            for t in resp.teachers
        ]

    def describe(self, teacher: str | None = None) -> TeacherDescription:
        """The named teacher, or the only one when the server has exactly one."""
        teachers = self.list_teachers()
        if teacher is None:
            if len(teachers) != 1:
                names = ", ".join(t.name for t in teachers)
                raise ValueError(f"server {self.target} has {len(teachers)} teachers ({names}); name one")
            return teachers[0]
        for t in teachers:
            if t.name == teacher:
                return t
        raise TeacherRequestError(
            grpc.StatusCode.NOT_FOUND,
            f"unknown teacher {teacher!r}; server {self.target} has: {', '.join(t.name for t in teachers)}",
        )

    def _first_contact(self, method, request):
        """``_call`` bounded by ``connect_timeout`` until the server has answered once: an address
        nothing answers at fails here, named, instead of as a request's bare DEADLINE_EXCEEDED.
        (A deadline, not grpc.channel_ready_future: that one leaves a gRPC polling thread behind,
        and a DataLoader that forks its workers next to it loses them.)"""
        if self._reached or self.connect_timeout is None:
            return self._call(method, request)
        try:
            resp = self._call(method, request, timeout=self.connect_timeout)
        except TeacherRequestError as e:
            if e.code != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
            raise TeacherRequestError(
                grpc.StatusCode.UNAVAILABLE,
                f"could not reach a teacher server at {self.target} within {self.connect_timeout:g} s "
                "(connect_timeout): no connection could be made, or nothing answered on it (nothing listening "
                "there, a firewall, a failed TLS handshake); check the address and that kd serve is running and "
                "reachable from here",
            ) from None
        self._reached = True
        return resp

    def _call(self, method, request, timeout: float | None | object = ...):
        timeout = self.timeout if timeout is ... else timeout
        try:
            return method(request, timeout=timeout, wait_for_ready=True, metadata=self.metadata)
        except grpc.RpcError as e:
            details = e.details()
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:  # gRPC's own text names neither
                details = f"{details}: server {self.target} did not answer within {timeout} s (timeout)"
            raise TeacherRequestError(e.code(), details) from None

    def infer(
        self,
        teacher: str,
        inputs: torch.Tensor | None = None,
        *,
        ref: DatasetRef | None = None,
        logits: bool = True,
        top_k: int = 0,
        temperature: float = 0.0,
        dtype: torch.dtype = torch.float32,
        features: Iterable[str] = (),
        pool_features: bool = False,
        features_dtype: torch.dtype = torch.float32,
        labels: bool = False,
        sparse_temperature: float = 0.0,
        samples: int = 0,
        sample_rounds: int = 0,
        sample_uniforms: torch.Tensor | None = None,
        sample_seed: int = 0,
    ) -> dict[str, torch.Tensor]:
        """One unary request, with inputs by value or by ``ref``; returns the named outputs."""
        features = tuple(features)
        asked = (teacher, logits, top_k, temperature, dtype, features, pool_features, features_dtype, labels,
                 sparse_temperature, samples, sample_rounds, sample_seed)  # fmt: skip
        # Only a request by value without uniforms reuses a head (one by DatasetRef, or with uniforms,
        # is encoded whole each time), so only it works out the key. Remembered only for plain values,
        # keyed with their types: a tensor or numpy scalar may change in place (or not hash), and 2 and
        # 2.0 are equal keys but not equal asks.
        key = None
        by_value = inputs is not None and ref is None and sample_uniforms is None
        if by_value and _plain(asked) and all(type(f) is str for f in features):
            key = (asked, tuple(map(type, asked)))
        if key is not None:
            if (head := self._heads.get(key)) is None:
                if len(self._heads) >= _MAX_HEADS:
                    self._heads.clear()
                head = self._heads[key] = request_head(teacher, spec_of(*asked[1:-1], None, sample_seed))
            body = b"".join([head, *tensor_field(_INPUTS_FIELD, inputs)])
        else:
            spec = spec_of(*asked[1:-1], sample_uniforms, sample_seed)
            body = encode_request(teacher, inputs, ref, spec)
        resp = self._call(self._infer, body)
        self._check_reply(resp)
        self.usage = Usage.of(resp.usage)
        self.served_by = (resp.fingerprint, int(resp.weights_version))
        return _outputs(resp)

    def publish_weights(
        self, teacher: str, weights: torch.nn.Module | dict[str, torch.Tensor], *, expected_version: int = 0,
        chunk_bytes: int = 4 << 20,
    ) -> int:  # fmt: skip
        """Replace a teacher's weights on a server started with ``--accept-weights`` (a module
        or its state_dict, sent as safetensors in ``chunk_bytes`` slices) -> the version now
        served. ``expected_version`` > 0: refused (ABORTED) unless that is the next version."""
        from kd.teacher_server.weights import chunks_of, encode_state

        data = encode_state(weights)
        chunks = chunks_of(teacher, data, chunk_bytes=chunk_bytes, expected_version=expected_version)
        return int(self._call(self.stub.PublishWeights, chunks).weights_version)

    # -- data-free distillation (a teacher served at the WHITE tier) ------------------------
    def input_gradient(
        self, teacher: str, inputs: torch.Tensor, upstream: dict[str, torch.Tensor], *, return_outputs: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """d/d inputs of sum_o <upstream[o], output_o(inputs)> through the frozen teacher;
        keys "logits" and "feature/<layer>". -> (input gradient, outputs if asked)."""
        req = pb.GradientRequest(teacher=teacher, inputs=to_proto(inputs.detach().float()),
                                 upstream={k: to_proto(v.detach().float()) for k, v in upstream.items()},
                                 return_outputs=return_outputs)  # fmt: skip
        resp = self._call(self.stub.InputGradient, req)
        self.usage = Usage.of(resp.usage)
        return from_proto(resp.input_grad), {k: from_proto(v) for k, v in resp.outputs.items()}

    def batchnorm_stats(self, teacher: str) -> dict[str, torch.Tensor]:
        """ "<layer>/running_mean" and "<layer>/running_var" of every BN layer."""
        resp = self._call(self.stub.GetBatchNormStats, pb.BatchNormStatsRequest(teacher=teacher))
        return {k: from_proto(v) for k, v in resp.stats.items()}

    def batchnorm_loss(
        self, teacher: str, inputs: torch.Tensor, *, state_id: str = "", momentum: float = 0.0,
        ttl_seconds: float = 600.0, upstream_logits: torch.Tensor | None = None,
        layer_weights: Iterable[float] = (),
    ) -> BNLoss:  # fmt: skip
        """DeepInversion's BN-statistics loss of this batch and its input gradient (server-side)."""
        req = pb.BatchNormLossRequest(teacher=teacher, inputs=to_proto(inputs.detach().float()), state_id=state_id,
                                      momentum=momentum, ttl_seconds=ttl_seconds if state_id else 0.0,
                                      layer_weights=list(layer_weights))  # fmt: skip
        if upstream_logits is not None:
            req.upstream_logits.CopyFrom(to_proto(upstream_logits.detach().float()))
        resp = self._call(self.stub.BatchNormLoss, req)
        self.usage = Usage.of(resp.usage)
        return BNLoss(resp.loss, dict(resp.per_layer), from_proto(resp.input_grad), from_proto(resp.logits))

    def activation_records(self, teacher: str) -> tuple[dict[str, torch.Tensor], str]:
        """Lopes et al. activation records -> (records by "<layer>/<stat>", dataset id)."""
        resp = self._call(self.stub.GetActivationRecords, pb.ActivationRecordsRequest(teacher=teacher))
        # A protobuf map has no order: sorted, so consumers iterate the same way every time.
        return {k: from_proto(resp.records[k]) for k in sorted(resp.records)}, resp.dataset

    def synthesize(
        self, teacher: str, batch_size: int, *, targets: Iterable[int] = (), iterations: int = 200,
        lr: float = 0.05, bn_weight: float = 1.0, tv_weight: float = 1e-4, l2_weight: float = 1e-5,
        seed: int = 0, report_every: int = 0,
    ) -> Iterator[dict]:  # fmt: skip
        """Server-side DeepInversion: yields progress dicts, the last with "inputs" and "targets"."""
        req = pb.SynthesisRequest(teacher=teacher, batch_size=batch_size, targets=list(targets),
                                  iterations=iterations, lr=lr, bn_weight=bn_weight, tv_weight=tv_weight,
                                  l2_weight=l2_weight, seed=seed, report_every=report_every)  # fmt: skip
        try:
            for msg in self.stub.Synthesize(req, timeout=None, wait_for_ready=True, metadata=self.metadata):
                self.usage = Usage.of(msg.usage)
                update = {"iteration": msg.iteration, "loss": msg.loss, "terms": dict(msg.terms), "done": msg.done}
                if msg.done:
                    update["inputs"], update["targets"] = from_proto(msg.inputs), from_proto(msg.targets)
                yield update
        except grpc.RpcError as e:
            raise TeacherRequestError(e.code(), e.details()) from None

    def infer_stream(
        self,
        teacher: str,
        batches: Iterable[tuple[Any, torch.Tensor | DatasetRef]],
        *,
        depth: int = 8,
        logits: bool = True,
        top_k: int = 0,
        temperature: float = 0.0,
        dtype: torch.dtype = torch.float32,
        features: Iterable[str] = (),
        pool_features: bool = False,
        features_dtype: torch.dtype = torch.float32,
        sparse_temperature: float = 0.0,
        samples: int = 0,
        sample_rounds: int = 0,
    ) -> Iterator[tuple[Any, dict[str, torch.Tensor]]]:
        """Pipelined inference over one InferStream.

        ``batches`` yields ``(key, inputs or DatasetRef)``, or ``(key, inputs or DatasetRef,
        uniforms)`` with ``samples``: that batch's draws (``spec_of``); up to ``depth`` are in
        flight ahead of the consumer. Yields ``(key, outputs)`` in input order.
        """
        spec_base = spec_of(logits, top_k, temperature, dtype, features, pool_features, features_dtype,
                            sparse_temperature=sparse_temperature, samples=samples,
                            sample_rounds=sample_rounds)  # fmt: skip

        def encode(item: tuple, request_id: str) -> tuple[Any, bytes]:
            key, x, *uniforms = item
            spec = spec_base
            if uniforms and uniforms[0] is not None:
                spec = pb.OutputSpec()
                spec.CopyFrom(spec_base)
                spec.sample_uniforms.CopyFrom(to_proto(uniforms[0].to(torch.float64)))
            if isinstance(x, DatasetRef):
                return key, encode_request(teacher, None, x, spec, request_id)
            return key, encode_request(teacher, x, None, spec, request_id)

        yield from self._ordered_stream(batches, encode, lambda key, resp: (key, _outputs(resp)), depth, _name_row)

    def _ordered_stream(
        self,
        items: Iterable[Any],
        encode: Callable[[Any, str], tuple[Any, bytes]],
        decode: Callable[[Any, pb.InferResponse], Any],
        depth: int,
        explain: Callable[[Any, str], str] | None = None,
    ) -> Iterator[Any]:
        """The ordered window of one InferStream (``infer_stream``, ``infer_tokens_stream``):
        ``encode(item, request_id) -> (state, body)`` per item, up to ``depth`` requests in
        flight; replies (in any order) are matched by request id and yielded in input order as
        ``decode(state, reply)``; an error reply (its message through ``explain(state, message)``
        when given) or a broken stream raises TeacherRequestError, and
        so does a wait of over ``stream_timeout`` for the next reply (the call is cancelled)."""
        source = iter(items)
        states: dict[int, Any] = {}
        bodies: dict[int, bytes] = {}  # sent and not yet answered: resent on a reopened stream
        ready: dict[int, pb.InferResponse] = {}
        sent = 0
        call, outbox, watchdog = self._open_ordered_stream()

        def send_next() -> bool:
            nonlocal sent
            try:
                item = next(source)
            except StopIteration:
                return False
            states[sent], body = encode(item, str(sent))
            bodies[sent] = body
            outbox.put(body)
            sent += 1
            return True

        reopened = 0  # reopens in a row without an answer between them
        try:
            while len(states) < depth and send_next():
                pass
            want = 0
            while want < sent:
                while want not in ready:
                    try:
                        with watchdog:  # only the time spent waiting counts, not the consumer's
                            resp = next(call)
                    except StopIteration:  # ended OK with requests unanswered: no kd server does that
                        raise TeacherRequestError(
                            grpc.StatusCode.UNAVAILABLE,
                            f"server {self.target} ended the stream with {sent - want - len(ready)} request(s) "
                            "unanswered",
                        ) from None
                    except grpc.RpcError as e:
                        if watchdog.fired:
                            raise TeacherRequestError(
                                grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"server {self.target} sent no answer for {self.stream_timeout} s (stream_timeout) "
                                f"with {sent - want - len(ready)} request(s) outstanding; the stream was cancelled: "
                                "the server is stalled, overloaded or unreachable",
                            ) from None
                        if _closed_idle(e) and reopened < _MAX_REOPENS:
                            # The server closed the stream with nothing of it in flight (idle too long,
                            # or its place given to another client): a new one, and every request not
                            # answered yet sent again, in order. Each is answered once: a request read
                            # by a closing stream is dropped there unanswered.
                            reopened += 1
                            watchdog.close()
                            outbox.put(None)
                            call.cancel()
                            call, outbox, watchdog = self._open_ordered_stream()
                            for seq in sorted(bodies):
                                outbox.put(bodies[seq])
                            continue
                        raise TeacherRequestError(e.code(), e.details()) from None
                    if resp.HasField("error"):
                        message = resp.error.message
                        if explain is not None and resp.request_id.isdigit() and int(resp.request_id) in states:
                            message = explain(states[int(resp.request_id)], message)
                        raise TeacherRequestError(status_code(resp.error.code), message)
                    self._check_reply(resp)
                    self.usage = Usage.of(resp.usage)
                    seq = int(resp.request_id)
                    if seq in bodies:
                        ready[seq] = resp
                        del bodies[seq]
                        reopened = 0
                yield decode(states.pop(want), ready.pop(want))
                want += 1
                send_next()
        finally:
            watchdog.close()
            outbox.put(None)
            call.cancel()

    def _open_ordered_stream(self) -> tuple[Any, queue.Queue, _Watchdog]:
        """A new InferStream call fed from a queue of request bodies (None ends it), and its watchdog."""
        outbox: queue.Queue = queue.Queue()

        def requests() -> Iterator[bytes]:
            while (req := outbox.get()) is not None:
                yield req

        # No deadline on the call (a stream lives as long as its epoch) and wait_for_ready (a server
        # restarting is waited for, up to stream_timeout): the watchdog bounds each wait instead.
        call = self._infer_stream(requests(), timeout=None, wait_for_ready=True, metadata=self.metadata)
        return call, outbox, _Watchdog(call, self.stream_timeout)


_BAD_ROW = re.compile(r"first in row ([0-9]+) of the inputs")


def _name_row(key: Any, message: str) -> str:
    """A refusal that names a row of a batch (non-finite inputs), with the dataset sample that row
    holds when the batch's key knows it (``ServerSource``'s ``Batch``: ``indices``, ``views``)."""
    m = _BAD_ROW.search(message)
    indices = getattr(key, "indices", None)
    if m is None or indices is None or int(m.group(1)) >= len(indices):
        return message
    row = int(m.group(1))
    views = getattr(key, "views", None)
    view = f", view {int(views[row])}" if views is not None and row < len(views) else ""
    return f"{message}: dataset sample {int(indices[row])}{view}"


# Reopens of a stream the server closed as idle before one of its requests is answered: the
# server closes only streams with nothing in flight, so a fresh stream with requests is not
# closed again unless something is wrong; then the error is raised rather than looping.
_MAX_REOPENS = 3


def _closed_idle(e: grpc.RpcError) -> bool:
    """Whether the server ended a stream as idle (UNAVAILABLE with the kd-stream-closed trailer)."""
    if not isinstance(e, grpc.Call) or e.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    return any(k == access_names.STREAM_CLOSED_KEY for k, _ in e.trailing_metadata() or ())


class _Watchdog:
    """Cancels a streaming ``call`` when one wait for its next reply (``with watchdog:``)
    lasts over ``timeout`` seconds: a blocked ``next(call)`` takes no timeout of its own, and
    a server that stops answering (SIGSTOP, a hung forward, a dead link that TCP has not
    noticed) would block it forever. One thread per stream, idle between waits."""

    def __init__(self, call: grpc.Future, timeout: float | None) -> None:
        self.call, self.timeout = call, timeout
        self.fired = False
        self._since: float | None = None  # when the current wait began (None: not waiting)
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        if timeout is not None:
            self._thread = threading.Thread(target=self._watch, name="kd-stream-watchdog", daemon=True)
            self._thread.start()

    def __enter__(self) -> _Watchdog:
        with self._cond:
            self._since = time.monotonic()
            self._cond.notify()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._since = None

    def _watch(self) -> None:
        assert self.timeout is not None
        with self._cond:
            while not self._closed:
                if self._since is None:
                    self._cond.wait()
                    continue
                left = self._since + self.timeout - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                self.fired = True
                self.call.cancel()  # the blocked next(call) raises CANCELLED
                return

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()


def _outputs(resp: pb.InferResponse) -> dict[str, torch.Tensor]:
    """A reply's named outputs, plus "view_params" when the server sent the views' params."""
    out = {k: from_proto(v) for k, v in resp.outputs.items()}
    if resp.HasField("view_params"):
        out["view_params"] = from_proto(resp.view_params)
    return out


def status_code(value: int) -> grpc.StatusCode:
    """The grpc.StatusCode whose number is ``value`` (UNKNOWN if none)."""
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN
