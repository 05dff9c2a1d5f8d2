"""Live weight updates: a served teacher takes new weights while it serves (``PublishWeights``).

Why: in cross-process peer distillation (``kd peer``) each peer trains in its own process and
serves its current predictions to the others; every N steps it publishes its weights to its own
server, which must swap them without dropping or failing a request in flight.

Off by default: a teacher takes updates only when its operator says so (``kd serve
--accept-weights``, ``accept_weights = true`` in its ``[[teacher]]`` table); otherwise the RPC is
FAILED_PRECONDITION. Anyone who may call such a server may replace its weights: serve it with a
token (``--token-file``) or on a private network.

An update is one safetensors file (never pickle) of the teacher's full ``state_dict``, streamed
in ``WeightsChunk`` slices. Nothing changes before the whole file is in and validated: it parses
as safetensors, has exactly the served model's keys, each with its shape and dtype, and every
float value is finite; the first bad key is named (INVALID_ARGUMENT). Then, under each model
instance's lock (held by its forward, so between two batches), the values are copied in place
(staged on the device first, so the lock is held for a device-side copy only) and the version
counter goes up by one. The fingerprints follow the weights: ``weights_fingerprint`` is
``loading.fingerprint`` of the new weights, the target fingerprint covers the serving options
as at start, and ``TeacherInfo.weights_version`` / ``InferResponse.weights_version`` carry the
counter.

Which weights answered: each forward tags its rows with the version that computed them
(``VersionedRunner``); the batcher splits a request over forwards (and instances) freely, so a
request whose rows came from two versions is computed again (``WeightSlot.settle``: a swap is
rare next to a forward) and every answer comes from exactly one version, which its
fingerprint and version name. The gradient paths (InputGradient, BatchNormLoss, Synthesize)
are refused (FAILED_PRECONDITION) for a teacher that takes updates: a swap copies into the
parameters in place, which a backward running across it would see half done.

An upload to a server where no teacher takes updates is refused before its first chunk is
read; an upload takes a stream slot (``--max-streams``) while it is received, and a teacher
buffers one upload at a time (a second is ABORTED), so uploads cannot hold every handler
thread or buffer many copies of a model. An upload that sends no chunk for
``upload_idle_timeout_s`` (60 s; ``kd serve --upload-idle-timeout``) is dropped with
DEADLINE_EXCEEDED, so a stalled publisher cannot keep the others out while it stays connected; one
its client cancels is counted CANCELLED.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grpc
import torch
from torch import nn

from kd.core.reductions import shorten
from kd.core.signature import target_fingerprint
from kd.teacher_server.loading import fingerprint_of
from kd.teacher_server.service import Endpoint, RequestError
from kd.v1 import teacher_pb2 as pb

VERSION_KEY = "__weights_version"  # per-row version tag of a forward's outputs (never sent)
CHUNK_BYTES = 4 << 20  # the client's default slice of an upload
_HEADER_ALLOWANCE = 1 << 16  # safetensors header beyond ~200 bytes per tensor
_KEPT_VERSIONS = 64  # fingerprints remembered for replies still being encoded
_MAX_RECOMPUTES = 4
# An upload that sends no chunk for this long is dropped (DEADLINE_EXCEEDED), so a stalled or
# malicious publisher cannot hold a teacher's one upload slot while it stays connected
# (kd serve --upload-idle-timeout; upload_idle_timeout_s in a [[teacher]] table).
UPLOAD_IDLE_TIMEOUT_S = 60.0


# The safetensors dtype names safetensors.torch reads, where this torch has the dtype. A file may
# name others that the format's parser accepts but torch cannot hold (F8_E8M0, F4, ...): those are
# refused by name before the file is parsed.
_TORCH_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32",
                "U64": "uint64", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E4M3FNUZ": "float8_e4m3fnuz",
                "F8_E5M2": "float8_e5m2", "F8_E5M2FNUZ": "float8_e5m2fnuz", "C64": "complex64"}  # fmt: skip
SAFETENSORS_DTYPES = {name: getattr(torch, attr) for name, attr in _TORCH_NAMES.items() if hasattr(torch, attr)}


def _header_dtypes(data: bytes) -> dict[str, str]:
    """key -> dtype name of a safetensors file's header; {} where the header does not parse
    (the parser then says why)."""
    import json

    if len(data) < 8:
        return {}
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        return {}
    try:
        header = json.loads(bytes(data[8 : 8 + size]))
    except (ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(header, dict):
        return {}
    return {k: v["dtype"] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and isinstance(v.get("dtype"), str)}  # fmt: skip


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def encode_state(weights: nn.Module | Mapping[str, torch.Tensor]) -> bytes:
    """A module's (or a state_dict's) tensors as one safetensors file in memory (copies on the
    host, so tied or shared tensors are saved as separate entries, as a state_dict lists them)."""
    from safetensors.torch import save

    state = weights.state_dict() if isinstance(weights, nn.Module) else dict(weights)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"state_dict entries that are not tensors: {bad[:4]}")
    return save({k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()})


def chunks_of(teacher: str, data: bytes, *, chunk_bytes: int = CHUNK_BYTES,
              expected_version: int = 0) -> Iterator[pb.WeightsChunk]:  # fmt: skip
    """The ``WeightsChunk`` messages of one upload (the first names the teacher and the size)."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    view = memoryview(data)
    yield pb.WeightsChunk(teacher=teacher, data=bytes(view[:chunk_bytes]), total_bytes=len(data),
                          expected_version=expected_version)  # fmt: skip
    for start in range(chunk_bytes, len(data), chunk_bytes):
        yield pb.WeightsChunk(data=bytes(view[start : start + chunk_bytes]))


class VersionedRunner:
    """A ``ModelRunner`` whose forwards hold a lock (so a swap waits for the forward in
    progress and the next one waits for the swap) and tag their rows with the version of the
    weights that computed them (``VERSION_KEY``). Everything else is the wrapped runner's."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.lock = threading.Lock()
        self.version = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def model(self) -> nn.Module:
        return self.inner.teacher.model

    def forward(self, prepared: Any, layers: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
        with self.lock:
            out = dict(self.inner.forward(prepared, layers))
            version = self.version
        logits = out["logits"]
        out[VERSION_KEY] = torch.full((logits.shape[0],), version, dtype=torch.int64, device=logits.device)
        return out


class WeightSlot:
    """The live weights of one endpoint: validation, the swap, and the version bookkeeping."""

    def __init__(self, endpoint: Endpoint, runners: list[VersionedRunner], fp_options: dict[str, Any],
                 idle_timeout_s: float = UPLOAD_IDLE_TIMEOUT_S) -> None:  # fmt: skip
        if not 0 < idle_timeout_s < float("inf"):
            raise ValueError(
                f"teacher {endpoint.teacher.name!r}: upload idle timeout must be > 0 s, got {idle_timeout_s}"
            )
        self.idle_timeout_s = idle_timeout_s
        self.endpoint = endpoint
        self.runners = runners
        self.fp_options = fp_options
        model = runners[0].model
        self.architecture = repr(model)
        self.expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
        tensor_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
        self.max_bytes = tensor_bytes + _HEADER_ALLOWANCE + 256 * len(self.expected)
        self.version = 0
        self._fingerprints = {0: (endpoint.fingerprint, endpoint.teacher.weights_fingerprint)}
        self._publish_lock = threading.Lock()  # one update at a time
        self._receiving = threading.Lock()  # one upload buffered at a time
        self._state_lock = threading.Lock()  # version and fingerprints read together

    @property
    def name(self) -> str:
        return self.endpoint.teacher.name

    # -- serving ---------------------------------------------------------------------
    def tag(self, post: Callable[[dict], dict]) -> Callable[[dict], dict]:
        """``post`` (the request's post-processing) keeping the rows' version tags."""

        def tagged(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            version = out[VERSION_KEY]
            result = dict(post({k: v for k, v in out.items() if k != VERSION_KEY}))
            result[VERSION_KEY] = version
            return result

        return tagged

    def settle(self, out: dict[str, torch.Tensor], recompute: Callable[[], dict[str, torch.Tensor]]):
        """-> (outputs, target fingerprint, version) of one version: rows from two versions
        (a swap between the forwards of a split request) are computed again. Swaps that keep
        outpacing a request cannot starve it: its last try holds the next swap off (the swap waits
        for those forwards, as it waits for a forward in progress), so it always settles."""
        for attempt in range(_MAX_RECOMPUTES + 1):
            versions = out.pop(VERSION_KEY, None)
            if versions is None:  # not tagged (cannot happen through the batcher): the current one
                with self._state_lock:
                    return out, self._fingerprints[self.version][0], self.version
            lo, hi = int(versions.min()), int(versions.max())
            with self._state_lock:
                known = self._fingerprints.get(lo)
            if lo == hi and known is not None:
                return out, known[0], lo
            if attempt < _MAX_RECOMPUTES - 1:
                out = recompute()
            elif attempt == _MAX_RECOMPUTES - 1:
                # publish() swaps under this lock (after its upload is read and staged), and this
                # try's forwards do not need it, so holding it here cannot deadlock a swap
                with self._publish_lock:
                    out = recompute()
        raise RequestError(grpc.StatusCode.UNAVAILABLE,  # not seen: the held-off try is of one version
                           f"teacher {self.name!r}: its weights changed during each of {_MAX_RECOMPUTES + 1} tries "
                           "of this request; retry")  # fmt: skip

    def describe(self, info: pb.TeacherInfo) -> None:
        """The live version and its fingerprints into ``info`` (read together)."""
        with self._state_lock:
            fp, wfp = self._fingerprints[self.version]
            info.fingerprint, info.weights_fingerprint = fp, wfp
            info.weights_version, info.accepts_weights = self.version, True

    # -- updates -----------------------------------------------------------------------
    def receive(self, first: pb.WeightsChunk, rest: Iterator[pb.WeightsChunk]) -> pb.PublishWeightsResponse:
        """Read one upload (``first`` and the chunks after it), validate it, swap it in."""
        limit = self.max_bytes
        too_big = (f"teacher {self.name!r}: an update of its state_dict is at most {limit} bytes "
                   f"(its {len(self.expected)} tensors and the safetensors header)")  # fmt: skip
        if first.total_bytes > limit:
            raise _invalid(f"{too_big}; {first.total_bytes} bytes announced")
        # One upload per teacher at a time: parallel uploads would each buffer a whole model.
        if not self._receiving.acquire(blocking=False):
            raise RequestError(grpc.StatusCode.ABORTED,
                               f"teacher {self.name!r}: another weight update is being received; retry after it "
                               f"(one idle for {self.idle_timeout_s:g} s between chunks is dropped)")  # fmt: skip
        paced = self._paced(rest)
        try:
            parts: list[bytes] = []
            size = 0
            for i, chunk in enumerate(itertools.chain([first], paced)):
                if chunk.teacher and chunk.teacher != first.teacher:
                    raise _invalid(f"chunk #{i} names teacher {shorten(chunk.teacher)}, the upload's first chunk "
                                   f"{self.name!r}; one upload updates one teacher")  # fmt: skip
                parts.append(chunk.data)
                size += len(chunk.data)
                if size > limit:
                    raise _invalid(f"{too_big}; more than that received")
            if first.total_bytes and size != first.total_bytes:
                raise _invalid(f"received {size} bytes of the {first.total_bytes} announced: the upload is incomplete")
            data = b"".join(parts)  # one copy; the chunks are dropped before parsing
            del parts
            state = self.parse(data)
            del data
        finally:
            paced.close()  # its reader ends with the call
            self._receiving.release()
        version, fp, wfp = self.publish(state, expected_version=first.expected_version)
        return pb.PublishWeightsResponse(teacher=self.name, weights_version=version, fingerprint=fp,
                                         weights_fingerprint=wfp)  # fmt: skip

    def _paced(self, chunks: Iterator[pb.WeightsChunk]) -> Iterator[pb.WeightsChunk]:
        """``chunks``, each due within ``idle_timeout_s`` of the one before, else DEADLINE_EXCEEDED.
        gRPC's request iterator has no timeout, so a thread of the upload's own reads it; once the
        call ends (the refusal answered, or the client gone) that read ends and the thread with it."""
        box: queue.Queue = queue.Queue(maxsize=1)  # one chunk read ahead at most
        done = threading.Event()

        def hand(item: tuple) -> bool:
            while not done.is_set():
                try:
                    box.put(item, timeout=0.5)
                    return True
                except queue.Full:
                    continue
            return False

        def read() -> None:
            try:
                for chunk in chunks:
                    if not hand((chunk, None)):
                        return
                hand((None, None))
            except Exception as e:  # noqa: BLE001 - a bad chunk or a cancelled call: raised by the reader
                hand((None, e))

        threading.Thread(target=read, name=f"upload-{self.name}", daemon=True).start()
        try:
            while True:
                try:
                    chunk, error = box.get(timeout=self.idle_timeout_s)
                except queue.Empty:
                    raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                       f"teacher {self.name!r}: no chunk of this upload for {self.idle_timeout_s:g} s "
                                       "(the server's upload idle timeout); it is dropped so others can publish, "
                                       "the weights are unchanged") from None  # fmt: skip
                if error is not None:
                    raise error
                if chunk is None:
                    return
                yield chunk
        finally:
            done.set()

    def parse(self, data: bytes) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load

        if not data:
            raise _invalid("the update is empty: send the state_dict as a safetensors file")
        for key, dtype in _header_dtypes(data).items():
            if dtype not in SAFETENSORS_DTYPES:
                raise _invalid(f"key {shorten(key)} has safetensors dtype {shorten(dtype)}, which torch cannot read "
                               f"here; supported: {', '.join(SAFETENSORS_DTYPES)}")  # fmt: skip
        try:
            return load(data)
        except (SafetensorError, ValueError, RuntimeError, OSError, TypeError, KeyError) as e:
            raise _invalid(f"the update ({len(data)} bytes) is not a safetensors file: {shorten(str(e))}") from None

    def validate(self, state: Mapping[str, torch.Tensor]) -> None:
        """INVALID_ARGUMENT naming the first key (in sorted order) that does not fit."""
        name = self.name
        missing = sorted(set(self.expected) - set(state))
        if missing:
            raise _invalid(f"the update lacks key {missing[0]!r} of teacher {name!r} ({len(missing)} missing)")
        unexpected = sorted(set(state) - set(self.expected))
        if unexpected:
            raise _invalid(f"the update has key {shorten(unexpected[0])}, which teacher {name!r} does not have "
                           f"({len(unexpected)} unknown)")  # fmt: skip
        for key in sorted(self.expected):
            shape, dtype = self.expected[key]
            t = state[key]
            if tuple(t.shape) != shape:
                raise _invalid(f"key {key!r} has shape {list(t.shape)}, teacher {name!r} has {list(shape)}")
            if t.dtype != dtype:
                raise _invalid(f"key {key!r} has dtype {str(t.dtype).removeprefix('torch.')}, teacher {name!r} "
                               f"has {str(dtype).removeprefix('torch.')}")  # fmt: skip
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
                raise _invalid(f"key {key!r} has NaN or Inf values; teacher {name!r} keeps its weights")

    def publish(self, state: Mapping[str, torch.Tensor], *, expected_version: int = 0) -> tuple[int, str, str]:
        """Validate ``state`` and swap it into every instance -> (version, fingerprint, weights fingerprint)."""
        self.validate(state)
        wfp = fingerprint_of(self.architecture, state)
        fp = target_fingerprint(wfp, **self.fp_options)
        with self._publish_lock:
            if expected_version and expected_version != self.version + 1:
                raise RequestError(grpc.StatusCode.ABORTED,
                                   f"teacher {self.name!r} serves version {self.version}; this update expected to "
                                   f"make version {expected_version} (another publisher came first)")  # fmt: skip
            version = self.version + 1
            # Staged on every instance's device before any swaps: a failure here (out of device
            # memory) leaves every instance on the old weights and the version unchanged.
            try:
                staged_all = []
                for runner in self.runners:
                    targets = runner.model.state_dict()
                    staged_all.append({k: v.to(targets[k].device, non_blocking=False) for k, v in state.items()})
            except (RuntimeError, MemoryError) as e:
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"teacher {self.name!r}: the update could not be staged on its devices "
                                   f"({shorten(str(e))}); it keeps version {self.version}") from None  # fmt: skip
            with self._state_lock:
                self._fingerprints[version] = (fp, wfp)
                for old in [v for v in self._fingerprints if v < version - _KEPT_VERSIONS]:
                    del self._fingerprints[old]
            for runner, staged in zip(self.runners, staged_all):
                targets = runner.model.state_dict()
                with runner.lock, torch.no_grad():  # between two forwards of this instance
                    for k, dst in targets.items():
                        dst.copy_(staged[k])
                    runner.version = version
            with self._state_lock:
                self.version = version
                t = self.endpoint.teacher
                self.endpoint.fingerprint, t.weights_fingerprint, t.fingerprint = fp, wfp, wfp
        return version, fp, wfp


def publish_rpc(endpoints: dict[str, Endpoint], chunks: Iterator[pb.WeightsChunk], lookup) -> pb.PublishWeightsResponse:
    """The ``PublishWeights`` RPC: ``chunks`` parsed, ``lookup(name)`` the servicer's endpoint
    lookup (NOT_FOUND for an unknown teacher)."""
    first = next(chunks, None)
    if first is None:
        raise _invalid("PublishWeights: no chunks; send the safetensors file in one or more WeightsChunk messages")
    ep = lookup(first.teacher)
    slot = getattr(ep, "weights", None)
    if slot is None:
        raise RequestError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"teacher {ep.teacher.name!r} does not accept weight updates; its operator allows them "
            "with `kd serve --accept-weights` (or accept_weights = true in its [[teacher]] table)",
        )
    return slot.receive(first, chunks)


def enable(endpoint: Endpoint, runners: list[VersionedRunner], fp_options: dict[str, Any],
           idle_timeout_s: float = UPLOAD_IDLE_TIMEOUT_S) -> Endpoint:  # fmt: skip
    """Give ``endpoint`` live weights (its batcher runs ``runners``); an upload idle for
    ``idle_timeout_s`` between chunks is dropped."""
    endpoint.weights = WeightSlot(endpoint, runners, fp_options, idle_timeout_s)
    return endpoint
