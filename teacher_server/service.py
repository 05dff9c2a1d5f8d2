"""The RPC layer: validates requests, hands tensors to batchers, encodes replies.

Handler threads never run a model: they decode (or load samples by
reference), submit to the teacher's batcher, wait on a future and encode the
outputs (top-k, probabilities, pooling and dtype casts happen here, off the
model's thread). Every refusal is a ``RequestError`` with a precise status.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import grpc
import torch

from kd.core import reductions
from kd.core.data import Dataset
from kd.core.reductions import pool
from kd.core.wire import WireError, dtype_name, from_proto, proto_dtype, to_proto
from kd.teacher_server import access as tiers
from kd.teacher_server.access import Accounting, BudgetExceeded, client_identity
from kd.teacher_server.batcher import BatcherClosedError, DeadlineExpiredError, DynamicBatcher, QueueFullError
from kd.teacher_server.gradients import (
    BNStates,
    PackLayout,
    SynthesisParams,
    VJPRunner,
    batchnorm_layers,
    batchnorm_loss,
    synthesize,
)
from kd.teacher_server.loading import Teacher
from kd.teacher_server.metrics import ServerMetrics
from kd.v1 import teacher_pb2 as pb
from kd.v1 import teacher_pb2_grpc as pb_grpc

_FLOAT_OUT = {pb.FLOAT32: torch.float32, pb.FLOAT16: torch.float16, pb.BFLOAT16: torch.bfloat16}
_MAX_LISTED = 40


class RequestError(Exception):
    """A request the server refuses: a gRPC status code and a precise message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _MAX_LISTED else "")


@dataclass
class Endpoint:
    """One served teacher, its batcher, and how it takes uint8 inputs."""

    teacher: Teacher
    batcher: DynamicBatcher
    mean: torch.Tensor | None = None  # per channel, for uint8 inputs
    std: torch.Tensor | None = None
    accepted: tuple[int, ...] = field(default=(pb.FLOAT16, pb.UINT8))
    access: str = "white"
    # Lopes et al. activation records (teacher_server.records), computed by the operator.
    records: dict[str, torch.Tensor] | None = None
    records_dataset: str = ""
    class_names: list[str] = field(default_factory=list)
    # Input-gradient batchers, one per set of feature layers with an upstream gradient.
    vjp_batchers: dict[frozenset[str], DynamicBatcher] = field(default_factory=dict)
    vjp_lock: threading.Lock = field(default_factory=threading.Lock)
    bn_states: BNStates = field(default_factory=BNStates)

    MAX_VJP_BATCHERS = 16

    def vjp_batcher(self, layers: frozenset[str]) -> tuple[DynamicBatcher, PackLayout]:
        t = self.teacher
        layout = PackLayout(t.input_shape, t.num_classes, tuple((n, tuple(t.layers[n])) for n in sorted(layers)))
        with self.vjp_lock:
            b = self.vjp_batchers.get(layers)
            if b is None:
                if len(self.vjp_batchers) >= self.MAX_VJP_BATCHERS:
                    raise RequestError(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"teacher {t.name!r}: at most {self.MAX_VJP_BATCHERS} distinct sets of feature layers "
                        "with upstream gradients are served at once",
                    )
                b = DynamicBatcher(
                    VJPRunner(t, layout),
                    max_batch_size=self.batcher.max_batch_size,
                    max_queue_delay_s=self.batcher.max_queue_delay_s,
                    max_queue_size=self.batcher.max_queue_size,
                    name=f"{t.name}-vjp",
                )
                self.vjp_batchers[layers] = b
        return b, layout

    def close(self, timeout: float | None) -> None:
        self.batcher.close(timeout=timeout)
        for b in list(self.vjp_batchers.values()):
            b.close(timeout=timeout)

    def info(self, datasets: list[str]) -> pb.TeacherInfo:
        t = self.teacher
        norm = pb.Normalization(
            mean=[] if self.mean is None else self.mean.tolist(), std=[] if self.std is None else self.std.tolist()
        )
        return pb.TeacherInfo(
            name=t.name,
            fingerprint=t.fingerprint,
            input_shape=list(t.input_shape),
            input_dtype=proto_dtype(t.input_dtype),
            num_classes=t.num_classes,
            max_batch_size=self.batcher.max_batch_size,
            device=str(t.device),
            accepted_input_dtypes=list(self.accepted),
            normalization=norm,
            layers=[pb.LayerInfo(name=n, shape=list(s)) for n, s in t.layers.items()],
            datasets=datasets,
            access=tiers.PROTO[self.access],
            batch_norms=[
                pb.BatchNormInfo(name=n, num_features=m.num_features, eps=m.eps) for n, m in batchnorm_layers(t.model)
            ],
            has_activation_records=self.records is not None,
            class_names=self.class_names,
        )

    def from_uint8(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(torch.float32) / 255.0
        if self.mean is None:
            return y
        shape = (1, -1) + (1,) * (y.ndim - 2)
        return (y - self.mean.view(shape)) / self.std.view(shape)


@dataclass
class _Prepared:
    endpoint: Endpoint
    inputs: torch.Tensor
    spec: pb.OutputSpec
    usage: pb.Usage | None = None


class TeacherServicer(pb_grpc.TeacherServiceServicer):
    def __init__(
        self,
        endpoints: dict[str, Endpoint],
        datasets: dict[str, Dataset] | None = None,
        metrics: ServerMetrics | None = None,
        accounting: Accounting | None = None,
    ) -> None:
        self.endpoints = endpoints
        self.datasets = datasets or {}
        self.metrics = metrics
        self.accounting = accounting or Accounting()

    # -- validation ---------------------------------------------------------------
    def _endpoint(self, name: str, needed: str | None = None, what: str = "") -> Endpoint:
        ep = self.endpoints.get(name)
        if ep is None:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"unknown teacher {name!r}; this server has: {', '.join(sorted(self.endpoints))}",
            )
        if needed is not None and not tiers.allows(ep.access, needed):
            denied = tiers.AccessDenied(name, ep.access, needed, what)
            raise RequestError(grpc.StatusCode.PERMISSION_DENIED, str(denied))
        return ep

    def _charge(self, context, *, samples: int = 0, gradient_samples: int = 0) -> pb.Usage:
        try:
            return self.accounting.charge(client_identity(context), samples=samples, gradient_samples=gradient_samples)
        except BudgetExceeded as e:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None

    def _prepare(self, request: pb.InferRequest, context: grpc.ServicerContext | None = None) -> _Prepared:
        ep = self._endpoint(request.teacher)
        kind = request.WhichOneof("input")
        if kind == "inputs":
            x = self._decode_inputs(ep, request.inputs)
        elif kind == "ref":
            x = self._load_ref(ep, request.ref)
        else:
            raise _invalid("request has no inputs: set `inputs` (a tensor) or `ref` (dataset samples)")
        self._check_spec(ep.teacher, request.outputs)
        self._check_tier(ep, request.outputs)
        usage = self._charge(context, samples=int(x.shape[0]))
        return _Prepared(ep, x, request.outputs, usage)

    @staticmethod
    def _check_tier(ep: Endpoint, spec: pb.OutputSpec) -> None:
        name, tier = ep.teacher.name, ep.access
        if spec.features and not tiers.allows(tier, "features"):
            raise RequestError(grpc.StatusCode.PERMISSION_DENIED,
                               str(tiers.AccessDenied(name, tier, "features", "features")))  # fmt: skip
        scores = spec.logits or spec.top_k or spec.probs_temperature > 0
        if scores and not tiers.allows(tier, "scores"):
            raise RequestError(
                grpc.StatusCode.PERMISSION_DENIED,
                str(tiers.AccessDenied(name, tier, "scores", "logits, probabilities and top-k")) + "; ask for labels",
            )

    def _decode_inputs(self, ep: Endpoint, msg: pb.Tensor) -> torch.Tensor:
        t = ep.teacher
        want = proto_dtype(t.input_dtype)
        if msg.dtype != want and msg.dtype not in ep.accepted:
            takes = ", ".join(dtype_name(d) for d in (want, *ep.accepted))
            raise _invalid(f"inputs have dtype {dtype_name(msg.dtype)} but teacher {t.name!r} takes {takes}")
        shape = tuple(msg.shape)
        self._check_shape(t, shape)
        try:
            x = from_proto(msg)
        except WireError as e:
            raise _invalid(f"inputs: {e}") from None
        if msg.dtype == pb.UINT8:
            return ep.from_uint8(x)
        x = x.to(t.input_dtype)
        self._check_finite(x)
        return x

    @staticmethod
    def _check_shape(t: Teacher, shape: tuple[int, ...]) -> None:
        if len(shape) != 1 + len(t.input_shape) or tuple(shape[1:]) != t.input_shape:
            want_shape = ", ".join(map(str, t.input_shape))
            raise _invalid(f"inputs have shape {list(shape)} but teacher {t.name!r} takes [N, {want_shape}]")
        if shape[0] == 0:
            raise _invalid("empty batch: inputs have 0 samples")

    @staticmethod
    def _check_finite(x: torch.Tensor) -> None:
        # One reduction on the common path; the per-sample search only for the error message.
        if bool(torch.isfinite(x).all()):
            return
        bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
        if bad.any():
            first = int(bad.nonzero()[0])
            raise _invalid(f"inputs contain NaN or Inf in {int(bad.sum())} sample(s), first at index {first}")

    def _load_ref(self, ep: Endpoint, ref: pb.DatasetRef) -> torch.Tensor:
        data = self.datasets.get(ref.dataset)
        if data is None:
            have = ", ".join(sorted(self.datasets)) or "none"
            raise RequestError(
                grpc.StatusCode.NOT_FOUND, f"unknown dataset {ref.dataset!r}; this server has registered: {have}"
            )
        if not ref.indices:
            raise _invalid("empty batch: ref has no indices")
        idx = torch.tensor(list(ref.indices), dtype=torch.long)
        bad = (idx < 0) | (idx >= len(data))
        if bad.any():
            raise _invalid(f"index {int(idx[bad][0])} out of range for dataset {ref.dataset!r} of {len(data)} samples")
        if ref.view_seeds and len(ref.view_seeds) != len(ref.indices):
            raise _invalid(f"ref has {len(ref.view_seeds)} view_seeds for {len(ref.indices)} indices")
        seeds = list(ref.view_seeds) if ref.view_seeds else None
        x = data.views(idx, seeds)
        self._check_shape(ep.teacher, tuple(x.shape))
        return x.to(ep.teacher.input_dtype)

    @staticmethod
    def _check_spec(t: Teacher, spec: pb.OutputSpec) -> None:
        for what, dt in (("logits_dtype", spec.logits_dtype), ("features_dtype", spec.features_dtype)):
            if dt not in (pb.DTYPE_UNSPECIFIED, *_FLOAT_OUT):
                raise _invalid(f"{what} {dtype_name(dt)} not offered; use FLOAT32, FLOAT16 or BFLOAT16")
        if not 0 <= spec.top_k <= t.num_classes:
            raise _invalid(f"top_k={spec.top_k} out of range: teacher {t.name!r} has {t.num_classes} classes")
        if not (spec.probs_temperature >= 0 and math.isfinite(spec.probs_temperature)):
            raise _invalid(
                f"probs_temperature must be a finite number > 0 (or 0 for none), got {spec.probs_temperature}"
            )
        try:
            layers = reductions.layers_needed(spec.features)
        except ValueError as e:
            raise _invalid(str(e)) from None
        unknown = [name for name in layers if name not in t.layers]
        if unknown:
            raise _invalid(f"unknown layer(s) {unknown} of teacher {t.name!r}; valid: {_listing(list(t.layers))}")

    # -- batching -----------------------------------------------------------------
    def _submit(self, p: _Prepared, context: grpc.ServicerContext | None) -> Future:
        remaining = context.time_remaining() if context is not None else None
        deadline = time.monotonic() + remaining if remaining is not None else None
        try:
            layers = reductions.layers_needed(p.spec.features)
            future = p.endpoint.batcher.submit(p.inputs, layers=layers, deadline=deadline)
        except QueueFullError as e:
            name = p.endpoint.teacher.name
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"teacher {name!r}: {e}") from None
        except BatcherClosedError as e:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(e)) from None
        if self.metrics is not None:
            self.metrics.accepted(p.endpoint.teacher.name, int(p.inputs.shape[0]))
        return future

    @staticmethod
    def _failed(future: Future) -> RequestError:
        if future.cancelled():  # the client went away or its deadline passed while queued
            return RequestError(grpc.StatusCode.CANCELLED, "cancelled while queued: the caller went away")
        e = future.exception()
        if isinstance(e, DeadlineExpiredError):
            return RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, f"not computed: {e}")
        return RequestError(grpc.StatusCode.INTERNAL, f"teacher forward failed: {type(e).__name__}: {e}")

    # -- encoding -----------------------------------------------------------------
    @staticmethod
    def _encode(request: pb.InferRequest, p: _Prepared, out: dict[str, torch.Tensor]) -> pb.InferResponse:
        spec = p.spec
        logits = out["logits"]
        dt = _FLOAT_OUT.get(spec.logits_dtype, torch.float32)
        outs: dict[str, pb.Tensor] = {}
        nothing_asked = (
            not spec.logits and spec.top_k == 0 and spec.probs_temperature == 0 and not spec.features
            and not spec.labels
        )  # fmt: skip
        labels_only = not tiers.allows(p.endpoint.access, "scores")
        if spec.logits or (nothing_asked and not labels_only):
            outs["logits"] = to_proto(logits.to(dt))
        if spec.labels or (nothing_asked and labels_only):
            outs["labels"] = to_proto(logits.argmax(dim=1).to(torch.int64))
        if spec.top_k:
            values, indices = logits.topk(spec.top_k, dim=1)
            outs["topk_values"] = to_proto(values.to(dt))
            outs["topk_indices"] = to_proto(indices.to(torch.int32))
            outs["logsumexp"] = to_proto(torch.logsumexp(logits, dim=1))
        if spec.probs_temperature > 0:
            outs["probs"] = to_proto(torch.softmax(logits / spec.probs_temperature, dim=1).to(dt))
        fdt = _FLOAT_OUT.get(spec.features_dtype, torch.float32)
        maps = {k.removeprefix("feature/"): v for k, v in out.items() if k.startswith("feature/")}
        for name in spec.features:
            # Reductions run on this request's samples only (batch ones relate them to each other).
            feat = reductions.reduce(name, maps)
            if spec.pool_features and reductions.parse(name).reduction is None:
                feat = pool(feat)
            outs[f"feature/{name}"] = to_proto(feat.to(fdt))
        t = p.endpoint.teacher
        return pb.InferResponse(
            request_id=request.request_id, teacher=t.name, fingerprint=t.fingerprint, outputs=outs, usage=p.usage
        )

    def _count_error(self, teacher: str, code: grpc.StatusCode) -> None:
        if self.metrics is not None:
            self.metrics.error(teacher if teacher in self.endpoints else "", code.name)

    # -- RPCs ---------------------------------------------------------------------
    def ListTeachers(self, request: pb.ListTeachersRequest, context: grpc.ServicerContext) -> pb.ListTeachersResponse:
        datasets = sorted(self.datasets)
        return pb.ListTeachersResponse(
            teachers=[ep.info(datasets) for _, ep in sorted(self.endpoints.items())],
            usage=self.accounting.usage(client_identity(context)),
        )

    def Infer(self, request: pb.InferRequest, context: grpc.ServicerContext) -> pb.InferResponse:
        try:
            p = self._prepare(request, context)
            future = self._submit(p, context)
            # A client that goes away cancels its queued work instead of leaving it to run.
            context.add_callback(future.cancel)
            try:
                out = future.result()
            except Exception:  # noqa: BLE001
                raise self._failed(future) from None
            return self._encode(request, p, out)
        except RequestError as e:
            self._count_error(request.teacher, e.code)
            context.abort(e.code, e.message)

    def InferStream(self, request_iterator: Iterator[pb.InferRequest], context: grpc.ServicerContext):
        # A reader thread submits requests as they arrive, so many batches are in
        # flight at once; this handler thread encodes replies and sends them in
        # request order (a reply that completes early waits for those before it).
        done: queue.Queue = queue.Queue()
        futures: list[Future] = []
        total: list[int] = []  # set by the reader when the client half-closes

        def read() -> None:
            n = 0
            try:
                for request in request_iterator:
                    seq, n = n, n + 1
                    try:
                        p = self._prepare(request, context)
                        future = self._submit(p, context)
                    except RequestError as e:
                        done.put((seq, request, None, e))
                        continue
                    futures.append(future)
                    # Fires on completion, failure or cancellation: one item per request.
                    future.add_done_callback(lambda f, s=seq, r=request, p=p: done.put((s, r, p, f)))
            except Exception:  # noqa: BLE001 - stream broken by the client; nothing to answer
                pass
            finally:
                total.append(n)
                done.put(None)

        def cancel_all() -> None:
            for f in list(futures):
                f.cancel()

        context.add_callback(cancel_all)
        threading.Thread(target=read, name="infer-stream-reader", daemon=True).start()
        ready: dict[int, tuple] = {}
        next_seq = 0
        while not total or next_seq < total[0]:
            item = done.get()
            if item is None:
                continue
            ready[item[0]] = item[1:]
            while next_seq in ready:
                request, p, result = ready.pop(next_seq)
                next_seq += 1
                reply = self._reply(request, p, result)
                if reply is not None:
                    yield reply

    # -- data-free distillation (WHITE tier) ----------------------------------------
    def _float_inputs(self, ep: Endpoint, msg: pb.Tensor) -> torch.Tensor:
        if msg.dtype not in (pb.FLOAT32, pb.FLOAT16):
            raise _invalid(f"inputs have dtype {dtype_name(msg.dtype)}; gradients need FLOAT32 (or FLOAT16) inputs")
        return self._decode_inputs(ep, msg).float()

    @staticmethod
    def _tensor(msg: pb.Tensor, what: str, shape: tuple[int, ...]) -> torch.Tensor:
        try:
            t = from_proto(msg)
        except WireError as e:
            raise _invalid(f"{what}: {e}") from None
        if tuple(t.shape) != shape:
            raise _invalid(f"{what} has shape {list(t.shape)}, expected {list(shape)}")
        if not t.is_floating_point():
            raise _invalid(f"{what} must be a float tensor, got {dtype_name(msg.dtype)}")
        t = t.float()
        if not bool(torch.isfinite(t).all()):
            raise _invalid(f"{what} contains NaN or Inf")
        return t

    def InputGradient(self, request: pb.GradientRequest, context: grpc.ServicerContext) -> pb.GradientResponse:
        try:
            ep = self._endpoint(request.teacher, "white", "input gradients")
            t = ep.teacher
            x = self._float_inputs(ep, request.inputs)
            n = int(x.shape[0])
            if not request.upstream:
                raise _invalid("upstream is empty: give your loss's gradient for 'logits' and/or 'feature/<layer>'")
            upstream: dict[str, torch.Tensor] = {}
            layers = set()
            for key, msg in request.upstream.items():
                if key == "logits":
                    upstream[key] = self._tensor(msg, "upstream 'logits'", (n, t.num_classes))
                elif key.startswith("feature/") and key[len("feature/") :] in t.layers:
                    name = key[len("feature/") :]
                    upstream[key] = self._tensor(msg, f"upstream {key!r}", (n, *t.layers[name]))
                    layers.add(name)
                else:
                    raise _invalid(
                        f"upstream key {key!r}: use 'logits' or 'feature/<layer>' with a layer of teacher {t.name!r}: "
                        f"{_listing(list(t.layers))}"
                    )
            usage = self._charge(context, gradient_samples=n)
            batcher, layout = ep.vjp_batcher(frozenset(layers))
            remaining = context.time_remaining()
            deadline = time.monotonic() + remaining if remaining is not None else None
            try:
                future = batcher.submit(layout.pack(x, upstream), deadline=deadline)
            except QueueFullError as e:
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"teacher {t.name!r}: {e}") from None
            except BatcherClosedError as e:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, str(e)) from None
            context.add_callback(future.cancel)
            try:
                out = future.result()
            except Exception:  # noqa: BLE001
                raise self._failed(future) from None
            outputs = {}
            if request.return_outputs:
                outputs = {key: to_proto(out[key]) for key in upstream}
            return pb.GradientResponse(request_id=request.request_id, input_grad=to_proto(out["input_grad"]),
                                       outputs=outputs, usage=usage)  # fmt: skip
        except RequestError as e:
            self._count_error(request.teacher, e.code)
            context.abort(e.code, e.message)

    def GetBatchNormStats(self, request: pb.BatchNormStatsRequest, context) -> pb.BatchNormStatsResponse:
        try:
            ep = self._endpoint(request.teacher, "white", "BatchNorm statistics")
            stats, infos = {}, []
            for name, m in batchnorm_layers(ep.teacher.model):
                stats[f"{name}/running_mean"] = to_proto(m.running_mean.detach().float().cpu())
                stats[f"{name}/running_var"] = to_proto(m.running_var.detach().float().cpu())
                infos.append(pb.BatchNormInfo(name=name, num_features=m.num_features, eps=m.eps))
            return pb.BatchNormStatsResponse(stats=stats, layers=infos)
        except RequestError as e:
            self._count_error(request.teacher, e.code)
            context.abort(e.code, e.message)

    def BatchNormLoss(self, request: pb.BatchNormLossRequest, context) -> pb.BatchNormLossResponse:
        try:
            ep = self._endpoint(request.teacher, "white", "the BatchNorm loss")
            x = self._float_inputs(ep, request.inputs)
            n = int(x.shape[0])
            upstream = None
            if request.HasField("upstream_logits"):
                upstream = self._tensor(request.upstream_logits, "upstream_logits", (n, ep.teacher.num_classes))
            if request.state_id and not request.ttl_seconds > 0:
                raise _invalid("a state_id needs ttl_seconds > 0 (how long the server keeps the momentum state)")
            usage = self._charge(context, gradient_samples=n)
            try:
                res = batchnorm_loss(ep.teacher, x, states=ep.bn_states, state_id=request.state_id,
                                     momentum=request.momentum, ttl=request.ttl_seconds,
                                     upstream_logits=upstream, layer_weights=list(request.layer_weights))  # fmt: skip
            except ValueError as e:
                raise _invalid(str(e)) from None
            return pb.BatchNormLossResponse(request_id=request.request_id, loss=res.loss, per_layer=res.per_layer,
                                            input_grad=to_proto(res.input_grad), logits=to_proto(res.logits),
                                            usage=usage)  # fmt: skip
        except RequestError as e:
            self._count_error(request.teacher, e.code)
            context.abort(e.code, e.message)

    def GetActivationRecords(self, request: pb.ActivationRecordsRequest, context) -> pb.ActivationRecordsResponse:
        try:
            ep = self._endpoint(request.teacher, "white", "activation records")
            if ep.records is None:
                raise RequestError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"teacher {ep.teacher.name!r} has no activation records; the operator computes them with "
                    "`kd records` and serves them with `kd serve --records NAME=FILE`",
                )
            layers = sorted({k.rsplit("/", 1)[0] for k in ep.records})
            return pb.ActivationRecordsResponse(records={k: to_proto(v) for k, v in ep.records.items()},
                                                dataset=ep.records_dataset, layers=layers)  # fmt: skip
        except RequestError as e:
            self._count_error(request.teacher, e.code)
            context.abort(e.code, e.message)

    MAX_SYNTHESIS_BATCH = 1024

    def Synthesize(self, request: pb.SynthesisRequest, context):
        try:
            ep = self._endpoint(request.teacher, "white", "server-side synthesis")
            t = ep.teacher
            b = request.batch_size
            if not 1 <= b <= self.MAX_SYNTHESIS_BATCH:
                raise _invalid(f"batch_size must be in 1..{self.MAX_SYNTHESIS_BATCH}, got {b}")
            if request.iterations < 1:
                raise _invalid(f"iterations must be >= 1, got {request.iterations}")
            if not (request.lr > 0 and math.isfinite(request.lr)):
                raise _invalid(f"lr must be a finite number > 0, got {request.lr}")
            targets = list(request.targets) or [i % t.num_classes for i in range(b)]
            if len(targets) != b or any(not 0 <= y < t.num_classes for y in targets):
                raise _invalid(f"targets: {b} classes in 0..{t.num_classes - 1} expected, got {targets[:8]}...")
            usage = self._charge(context, gradient_samples=b * request.iterations)
            params = SynthesisParams(
                batch_size=b, targets=targets, iterations=request.iterations, lr=request.lr,
                bn_weight=request.bn_weight, tv_weight=request.tv_weight, l2_weight=request.l2_weight,
                seed=request.seed, report_every=request.report_every,
            )  # fmt: skip
        except RequestError as e:
            self._count_error(request.teacher, e.code)
            context.abort(e.code, e.message)
        for update in synthesize(t, params, should_stop=lambda: not context.is_active()):
            msg = pb.SynthesisUpdate(request_id=request.request_id, iteration=update["iteration"],
                                     loss=update["loss"], terms=update["terms"], usage=usage)  # fmt: skip
            if update.get("done"):
                msg.done = True
                msg.inputs.CopyFrom(to_proto(update["inputs"]))
                msg.targets.CopyFrom(to_proto(update["targets"]))
            yield msg

    def _reply(self, request: pb.InferRequest, p: _Prepared | None, result) -> pb.InferResponse | None:
        if isinstance(result, RequestError):
            self._count_error(request.teacher, result.code)
            return _error_response(request, result)
        if result.cancelled():
            return None  # the stream is going away
        if result.exception() is not None:
            err = self._failed(result)
            self._count_error(request.teacher, err.code)
            return _error_response(request, err)
        return self._encode(request, p, result.result())


def _error_response(request: pb.InferRequest, e: RequestError) -> pb.InferResponse:
    return pb.InferResponse(
        request_id=request.request_id,
        teacher=request.teacher,
        error=pb.Error(code=e.code.value[0], message=e.message),
    )
