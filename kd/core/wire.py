"""Tensors on the wire: dtype + shape + raw little-endian bytes.

``to_proto`` and ``from_proto`` are the only places that touch the byte layout,
so the server, the clients and the cache agree by construction.
"""

from __future__ import annotations

import functools
import math
import sys
import warnings

import numpy as np
import torch

from kd.v1 import teacher_pb2 as pb

# proto enum <-> torch dtype. bf16 has no numpy dtype, so torch is the pivot.
_TORCH_OF = {
    pb.FLOAT32: torch.float32,
    pb.FLOAT16: torch.float16,
    pb.BFLOAT16: torch.bfloat16,
    pb.FLOAT64: torch.float64,
    pb.UINT8: torch.uint8,
    pb.INT8: torch.int8,
    pb.INT16: torch.int16,
    pb.INT32: torch.int32,
    pb.INT64: torch.int64,
    pb.BOOL: torch.bool,
    pb.UINT16: torch.uint16,
    pb.UINT32: torch.uint32,
}
_PROTO_OF = {v: k for k, v in _TORCH_OF.items()}

if sys.byteorder != "little":  # pragma: no cover - no big-endian hosts in sight
    raise ImportError("kd.core.wire assumes a little-endian host")


class WireError(ValueError):
    """A tensor message that cannot be decoded (bad dtype, shape or byte count)."""


def dtype_name(dtype: int) -> str:
    return pb.DType.Name(dtype) if dtype in pb.DType.values() else f"<unknown dtype {dtype}>"


def torch_dtype(dtype: int) -> torch.dtype:
    try:
        return _TORCH_OF[dtype]
    except KeyError:
        raise WireError(f"unsupported tensor dtype {dtype_name(dtype)}") from None


def proto_dtype(dtype: torch.dtype) -> int:
    try:
        return _PROTO_OF[dtype]
    except KeyError:
        raise WireError(f"torch dtype {dtype} has no wire encoding") from None


def _cpu_contiguous(t: torch.Tensor | np.ndarray) -> torch.Tensor:
    if type(t) is torch.Tensor and not t.requires_grad and t.device.type == "cpu" and t.is_contiguous():
        return t  # the common case (a reply's outputs): as is, without three no-op calls
    if isinstance(t, np.ndarray):
        if t.dtype.byteorder == ">":
            t = t.astype(t.dtype.newbyteorder("<"))
        # Writable and contiguous: torch warns on read-only buffers (np.frombuffer).
        t = torch.from_numpy(np.require(t, requirements=["C", "W"]))
    return t.detach().to("cpu").contiguous()


def to_proto(t: torch.Tensor | np.ndarray) -> pb.Tensor:
    """Encode a tensor (any device) as a ``kd.v1.Tensor``."""
    msg = pb.Tensor()
    fill_proto(msg, t)
    return msg


def fill_proto(msg: pb.Tensor, t: torch.Tensor | np.ndarray) -> None:
    """Encode ``t`` into ``msg`` in place (e.g. ``request.inputs``): building a tensor
    message and then assigning it to a field would copy the payload once more."""
    t = _cpu_contiguous(t)
    msg.dtype = proto_dtype(t.dtype)
    msg.shape[:] = list(t.shape)
    msg.data = _payload(t)


# dtypes numpy has: their bytes straight from ``t.numpy()`` (a third of the cost of a uint8 view).
_NUMPY_DTYPES = frozenset(_TORCH_OF.values()) - {torch.bfloat16}


def _payload(t: torch.Tensor) -> bytes:
    """The raw bytes of a CPU contiguous tensor: one memcpy, whatever the element type."""
    if not t.numel():
        return b""
    if t.dtype in _NUMPY_DTYPES and not t.is_conj() and not t.is_neg():
        return t.numpy().tobytes()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


_DATA_FIELD = pb.Tensor.DESCRIPTOR.fields_by_name["data"].number


def tensor_field(field_number: int, t: torch.Tensor | np.ndarray) -> list:
    """``t`` encoded as the ``kd.v1.Tensor`` field ``field_number`` of an enclosing message,
    as parts to join: appended to that message's serialisation, ``b"".join(parts)`` sets
    the field (protobuf parses concatenated fields). The payload part is a view of ``t``'s
    memory, so the join is its only copy (a message built with ``to_proto`` and
    serialised copies it three times)."""
    t = _cpu_contiguous(t)
    size = t.numel() * t.element_size()
    data = t.reshape(-1).view(torch.uint8).numpy() if size else b""
    return [_field_prefix(field_number, proto_dtype(t.dtype), tuple(t.shape), size), data]


@functools.lru_cache(maxsize=1024)
def _field_prefix(field_number: int, dtype: int, shape: tuple[int, ...], size: int) -> bytes:
    """Everything of a tensor field but its payload: the field's key and length, the dtype
    and shape, the payload's key and length. Remembered: a client sends one shape over and
    over, and building it is ~40% of encoding a small request."""
    head = pb.Tensor(dtype=dtype, shape=list(shape)).SerializeToString()
    data_key = _varint(_DATA_FIELD << 3 | 2) + _varint(size)
    return _varint(field_number << 3 | 2) + _varint(len(head) + len(data_key) + size) + head + data_key


def from_proto(msg: pb.Tensor, *, copy: bool = True, data: bytes | memoryview | None = None) -> torch.Tensor:
    """Decode a ``kd.v1.Tensor`` into a CPU tensor, checking dtype, shape and size.

    ``copy=True``: the result shares no memory with the message and is writable.
    ``copy=False`` (large inputs on the server): the payload is read once from the
    message and the tensor is a view of that private ``bytes`` object, so a 19 MB batch
    costs one copy instead of three; it must be treated as read-only (convert or clone
    before writing). Payloads under ``_SHARE_MIN_BYTES`` are copied anyway: small
    ``bytes`` objects can be shared interpreter-wide, and copying them costs nothing.
    ``data``: the payload read apart from the message (``split_payload``), instead of ``msg.data``.
    """
    dtype = torch_dtype(msg.dtype)
    shape = tuple(msg.shape)  # Python ints (int64 fields)
    if shape and min(shape) < 0:
        raise WireError(f"tensor shape {list(shape)} has a negative dimension")
    itemsize = _ITEMSIZE.get(dtype) or torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if data is None:
        data = msg.data  # each access copies the payload out of the message: read it once
    if len(data) != expected:
        raise WireError(
            f"tensor of dtype {dtype_name(msg.dtype)} and shape {list(shape)} needs {expected} bytes, got {len(data)}"
        )
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    buffer = data if not copy and expected >= _SHARE_MIN_BYTES else bytearray(data)
    return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


class _Irregular(Exception):
    pass


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Irregular
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes, start: int, end: int):
    """(field number, key start, value start, value end) of each field in buf[start:end]; only
    length-delimited values are delimited (others: value end = value start). Raises _Irregular."""
    pos = start
    while pos < end:
        key_at = pos
        key, pos = _read_varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, value_end = _read_varint(buf, pos, end)
            yield number, key_at, pos, pos
            pos = value_end
            continue
        if wire == 2:
            size, pos = _read_varint(buf, pos, end)
            value_end = pos + size
        elif wire == 1 or wire == 5:
            value_end = pos + (8 if wire == 1 else 4)
        else:  # groups (deprecated) or garbage
            raise _Irregular
        if value_end > end:
            raise _Irregular
        yield number, key_at, pos, value_end if wire == 2 else pos
        pos = value_end
    if pos != end:
        raise _Irregular


def split_payload(body: bytes, field_number: int) -> tuple[bytes, memoryview] | None:
    """``body``, a serialised message, with the ``data`` of its ``kd.v1.Tensor`` field
    ``field_number`` cut out, and that data as a view of ``body``.

    Parsing the rest and decoding with ``from_proto(msg, data=view)`` gives the same tensor
    without the two copies of the payload that parsing it (protobuf copies bytes fields)
    and reading ``msg.data`` make: 4.8 MB twice for 32 images of 3x224x224 uint8, 19 MB
    twice in float32. None unless the body has that field once with one ``data`` in it and
    is well formed (then parse it whole: the same message, the same errors)."""
    try:
        found = [f for f in _fields(body, 0, len(body)) if f[0] == field_number]
        if len(found) != 1 or found[0][2] == found[0][3]:
            return None
        _, key_at, start, end = found[0]
        data = [f for f in _fields(body, start, end) if f[0] == _DATA_FIELD]
        if len(data) != 1 or data[0][2] == data[0][3]:
            return None
    except _Irregular:
        return None
    _, data_key_at, data_start, data_end = data[0]
    rest = body[start:data_key_at] + body[data_end:end]  # the tensor without its data: dtype, shape
    head = body[:key_at] + _varint(field_number << 3 | 2) + _varint(len(rest))
    return head + rest + body[end:], memoryview(body)[data_start:data_end]


_ITEMSIZE = {dt: torch.empty((), dtype=dt).element_size() for dt in _TORCH_OF.values()}
_SHARE_MIN_BYTES = 1 << 16
# torch warns (once) that a tensor on an immutable ``bytes`` buffer is not writable: the
# ``copy=False`` contract above says so already.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning,
                        module=r"kd\.core\.wire")  # fmt: skip
