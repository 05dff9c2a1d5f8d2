"""Tensors on the wire: dtype + shape + raw little-endian bytes.

``to_proto`` and ``from_proto`` are the only places that touch the byte layout,
so the server, the clients and the cache agree by construction.
"""

from __future__ import annotations

import math
import sys

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


def to_proto(t: torch.Tensor | np.ndarray) -> pb.Tensor:
    """Encode a tensor (any device) as a ``kd.v1.Tensor``."""
    if isinstance(t, np.ndarray):
        if t.dtype.byteorder == ">":
            t = t.astype(t.dtype.newbyteorder("<"))
        # Writable and contiguous: torch warns on read-only buffers (np.frombuffer).
        t = torch.from_numpy(np.require(t, requirements=["C", "W"]))
    t = t.detach().to("cpu").contiguous()
    # bytes() of a uint8 view is one memcpy, whatever the element type.
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return pb.Tensor(dtype=proto_dtype(t.dtype), shape=list(t.shape), data=data)


def from_proto(msg: pb.Tensor) -> torch.Tensor:
    """Decode a ``kd.v1.Tensor`` into a CPU tensor, checking dtype, shape and size.

    The result shares no memory with the message and is writable.
    """
    dtype = torch_dtype(msg.dtype)
    shape = tuple(int(d) for d in msg.shape)
    if any(d < 0 for d in shape):
        raise WireError(f"tensor shape {list(shape)} has a negative dimension")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if len(msg.data) != expected:
        raise WireError(
            f"tensor of dtype {dtype_name(msg.dtype)} and shape {list(shape)} needs "
            f"{expected} bytes, got {len(msg.data)}"
        )
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(bytearray(msg.data), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)
