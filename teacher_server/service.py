"""The RPC layer: validates requests, hands tensors to batchers, encodes replies.

Handler threads never run a model: they decode, submit to the teacher's
batcher, wait on a future and encode the outputs (top-k, probabilities,
dtype casts happen here, off the model's thread).
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass

import grpc
import torch

from kd.v1 import teacher_pb2 as pb
from kd.v1 import teacher_pb2_grpc as pb_grpc
from kd.wire import WireError, dtype_name, from_proto, proto_dtype, to_proto
from teacher_server.batcher import BatcherClosedError, DynamicBatcher, QueueFullError
from teacher_server.loading import Teacher

_LOGIT_DTYPES = {pb.FLOAT32: torch.float32, pb.FLOAT16: torch.float16, pb.BFLOAT16: torch.bfloat16}


class RequestError(Exception):
    """A request the server refuses: a gRPC status code and a precise message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Endpoint:
    """One served teacher and its batcher."""

    teacher: Teacher
    batcher: DynamicBatcher

    def info(self) -> pb.TeacherInfo:
        t = self.teacher
        return pb.TeacherInfo(
            name=t.name,
            fingerprint=t.fingerprint,
            input_shape=list(t.input_shape),
            input_dtype=proto_dtype(t.input_dtype),
            num_classes=t.num_classes,
            max_batch_size=self.batcher.max_batch_size,
            device=str(t.device),
        )


@dataclass
class _Prepared:
    endpoint: Endpoint
    inputs: torch.Tensor
    spec: pb.OutputSpec


class TeacherServicer(pb_grpc.TeacherServiceServicer):
    def __init__(self, endpoints: dict[str, Endpoint]) -> None:
        self.endpoints = endpoints

    # -- validation and encoding -------------------------------------------------
    def _prepare(self, request: pb.InferRequest) -> _Prepared:
        ep = self.endpoints.get(request.teacher)
        if ep is None:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"unknown teacher {request.teacher!r}; this server has: {', '.join(sorted(self.endpoints))}",
            )
        t = ep.teacher
        if not request.HasField("inputs"):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "request has no inputs tensor")
        want = proto_dtype(t.input_dtype)
        if request.inputs.dtype != want:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"inputs have dtype {dtype_name(request.inputs.dtype)} but teacher {t.name!r} takes {dtype_name(want)}",
            )
        shape = tuple(request.inputs.shape)
        if len(shape) != 1 + len(t.input_shape) or shape[1:] != t.input_shape:
            want_shape = ", ".join(map(str, t.input_shape))
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"inputs have shape {list(shape)} but teacher {t.name!r} takes [N, {want_shape}]",
            )
        if shape[0] == 0:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "empty batch: inputs have 0 samples")
        try:
            x = from_proto(request.inputs)
        except WireError as e:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"inputs: {e}") from None
        if x.is_floating_point():
            bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
            if bad.any():
                first = int(bad.nonzero()[0])
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"inputs contain NaN or Inf in {int(bad.sum())} sample(s), first at index {first}",
                )
        spec = request.outputs
        if spec.logits_dtype not in (pb.DTYPE_UNSPECIFIED, *_LOGIT_DTYPES):
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"logits_dtype {dtype_name(spec.logits_dtype)} not offered; use FLOAT32, FLOAT16 or BFLOAT16",
            )
        if not 0 <= spec.top_k <= t.num_classes:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"top_k={spec.top_k} out of range: teacher {t.name!r} has {t.num_classes} classes",
            )
        if not (spec.probs_temperature >= 0 and math.isfinite(spec.probs_temperature)):
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"probs_temperature must be a finite number > 0 (or 0 for none), got {spec.probs_temperature}",
            )
        return _Prepared(ep, x, spec)

    @staticmethod
    def _submit(p: _Prepared) -> Future:
        try:
            return p.endpoint.batcher.submit(p.inputs)
        except QueueFullError as e:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"teacher {p.endpoint.teacher.name!r}: {e}"
            ) from None
        except BatcherClosedError as e:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(e)) from None

    @staticmethod
    def _encode(request: pb.InferRequest, p: _Prepared, logits: torch.Tensor) -> pb.InferResponse:
        spec = p.spec
        dt = _LOGIT_DTYPES.get(spec.logits_dtype, torch.float32)
        outs: dict[str, pb.Tensor] = {}
        nothing_asked = not spec.logits and spec.top_k == 0 and spec.probs_temperature == 0
        if spec.logits or nothing_asked:
            outs["logits"] = to_proto(logits.to(dt))
        if spec.top_k:
            values, indices = logits.topk(spec.top_k, dim=1)
            outs["topk_values"] = to_proto(values.to(dt))
            outs["topk_indices"] = to_proto(indices.to(torch.int32))
            outs["logsumexp"] = to_proto(torch.logsumexp(logits, dim=1))
        if spec.probs_temperature > 0:
            outs["probs"] = to_proto(torch.softmax(logits / spec.probs_temperature, dim=1).to(dt))
        t = p.endpoint.teacher
        return pb.InferResponse(request_id=request.request_id, teacher=t.name, fingerprint=t.fingerprint, outputs=outs)

    @staticmethod
    def _failed(future: Future) -> RequestError:
        e = future.exception()
        return RequestError(grpc.StatusCode.INTERNAL, f"teacher forward failed: {type(e).__name__}: {e}")

    # -- RPCs ----------------------------------------------------------------------
    def ListTeachers(self, request: pb.ListTeachersRequest, context: grpc.ServicerContext) -> pb.ListTeachersResponse:
        return pb.ListTeachersResponse(teachers=[ep.info() for _, ep in sorted(self.endpoints.items())])

    def Infer(self, request: pb.InferRequest, context: grpc.ServicerContext) -> pb.InferResponse:
        try:
            p = self._prepare(request)
            future = self._submit(p)
            # A client that goes away cancels its queued work instead of leaving it to run.
            context.add_callback(future.cancel)
            try:
                logits = future.result()
            except Exception:  # noqa: BLE001
                raise self._failed(future) from None
            return self._encode(request, p, logits)
        except RequestError as e:
            context.abort(e.code, e.message)

    def InferStream(self, request_iterator: Iterator[pb.InferRequest], context: grpc.ServicerContext):
        # A reader thread submits requests as they arrive, so many batches are in
        # flight at once; this handler thread encodes replies as they complete.
        done: queue.Queue = queue.Queue()
        futures: list[Future] = []
        total: list[int] = []  # set by the reader when the client half-closes

        def read() -> None:
            n = 0
            try:
                for request in request_iterator:
                    n += 1
                    try:
                        p = self._prepare(request)
                        future = self._submit(p)
                    except RequestError as e:
                        done.put((request, None, e))
                        continue
                    futures.append(future)
                    # Fires on completion, failure or cancellation: one item per request.
                    future.add_done_callback(lambda f, r=request, p=p: done.put((r, p, f)))
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
        answered = 0
        while not total or answered < total[0]:
            item = done.get()
            if item is None:
                continue
            answered += 1
            request, p, result = item
            if isinstance(result, RequestError):
                yield _error_response(request, result)
            elif result.cancelled():
                continue
            elif result.exception() is not None:
                yield _error_response(request, self._failed(result))
            else:
                yield self._encode(request, p, result.result())


def _error_response(request: pb.InferRequest, e: RequestError) -> pb.InferResponse:
    return pb.InferResponse(
        request_id=request.request_id,
        teacher=request.teacher,
        error=pb.Error(code=e.code.value[0], message=e.message),
    )
