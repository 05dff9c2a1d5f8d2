"""kd.core.wire: tensors as dtype + shape + raw little-endian row-major bytes."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from kd.core import wire
from kd.v1 import teacher_pb2 as pb

# Encoding and decoding must be warning-free (torch warns, once per process,
# when a tensor is built over a read-only buffer).
pytestmark = pytest.mark.filterwarnings("error")

# Every wire dtype, its torch dtype, and the little-endian numpy dtype string of
# the same bit width (bf16 has no numpy dtype: its bits travel as '<u2').
DTYPES = [
    (pb.FLOAT32, torch.float32, "<f4"),
    (pb.FLOAT16, torch.float16, "<f2"),
    (pb.BFLOAT16, torch.bfloat16, "<u2"),
    (pb.FLOAT64, torch.float64, "<f8"),
    (pb.UINT8, torch.uint8, "|u1"),
    (pb.INT8, torch.int8, "|i1"),
    (pb.INT16, torch.int16, "<i2"),
    (pb.INT32, torch.int32, "<i4"),
    (pb.INT64, torch.int64, "<i8"),
    (pb.BOOL, torch.bool, "|b1"),
    (pb.UINT16, torch.uint16, "<u2"),
    (pb.UINT32, torch.uint32, "<u4"),
]
DTYPE_IDS = [pb.DType.Name(p) for p, _, _ in DTYPES]
SHAPES = [(), (0, 5), (5, 0), (0,), (3,), (1,), (2, 3, 4), (2, 1, 3, 1, 2)]

_BITS_OF = {  # same-width integer type used to compare bit patterns (NaN payloads included)
    1: torch.uint8,
    2: torch.int16,
    4: torch.int32,
    8: torch.int64,
}


def test_every_enum_value_is_covered() -> None:
    covered = {p for p, _, _ in DTYPES}
    assert covered == set(pb.DType.values()) - {pb.DTYPE_UNSPECIFIED}


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random bit patterns of the given dtype (for floats: includes NaNs, infs, subnormals, -0)."""
    rng = np.random.default_rng(seed)
    n = math.prod(shape)
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    if dtype is torch.bool:
        return torch.from_numpy(rng.integers(0, 2, n).astype(np.bool_)).reshape(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = rng.integers(0, 256, n * itemsize, dtype=np.uint8)
    if dtype.is_floating_point:
        # make sure some "interesting" values are present
        special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1.0], dtype=dtype)
        sb = special.view(torch.uint8).numpy()
        k = min(len(sb), len(raw)) // itemsize * itemsize
        raw[:k] = sb[:k]
    return torch.from_numpy(raw).view(dtype).reshape(shape).clone()


def bits(t: torch.Tensor) -> np.ndarray:
    """Independent bit-level view for comparison: same-width ints via numpy."""
    t = t.contiguous()
    if t.dtype is torch.bool:
        return t.numpy().astype(np.uint8)
    return t.view(_BITS_OF[t.element_size()]).numpy().copy()


def assert_bit_identical(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype
    assert tuple(a.shape) == tuple(b.shape)
    np.testing.assert_array_equal(bits(a), bits(b))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(("wire_dtype", "torch_dtype", "np_le"), DTYPES, ids=DTYPE_IDS)
def test_round_trip_bit_exact(wire_dtype: int, torch_dtype: torch.dtype, np_le: str, shape: tuple[int, ...]) -> None:
    t = random_tensor(torch_dtype, shape, seed=len(shape) * 100 + wire_dtype)
    msg = wire.to_proto(t)
    assert msg.dtype == wire_dtype
    assert list(msg.shape) == list(shape)
    itemsize = np.dtype(np_le).itemsize
    assert len(msg.data) == math.prod(shape) * itemsize
    # survives real serialization too
    msg2 = pb.Tensor.FromString(msg.SerializeToString())
    back = wire.from_proto(msg2)
    assert back.device.type == "cpu"
    assert back.is_contiguous()
    assert_bit_identical(back, t)


@pytest.mark.parametrize(("wire_dtype", "torch_dtype", "np_le"), DTYPES, ids=DTYPE_IDS)
def test_bytes_are_little_endian_row_major(wire_dtype: int, torch_dtype: torch.dtype, np_le: str) -> None:
    t = random_tensor(torch_dtype, (2, 3, 4), seed=7)
    msg = wire.to_proto(t)
    if torch_dtype is torch.bfloat16:
        expected = t.view(torch.int16).numpy().astype("<i2").tobytes(order="C")
    else:
        expected = t.numpy().astype(np_le).tobytes(order="C")
    assert msg.data == expected


def test_float32_bytes_match_numpy_explicitly() -> None:
    a = np.array([[1.0, -2.5, 3.25], [0.0, 1e-3, -7.0]], dtype=np.float32)
    msg = wire.to_proto(torch.from_numpy(a))
    assert msg.data == a.astype("<f4").tobytes()
    # first element, by hand: 1.0f == 0x3F800000, little-endian
    assert msg.data[:4] == b"\x00\x00\x80\x3f"
    # row-major: the second element is -2.5 (0xC0200000), not 0.0 (column-major)
    assert msg.data[4:8] == b"\x00\x00\x20\xc0"


def test_int64_and_bool_bytes_by_hand() -> None:
    msg = wire.to_proto(torch.tensor([1, -1, 256], dtype=torch.int64))
    assert msg.data == (1).to_bytes(8, "little") + (-1).to_bytes(8, "little", signed=True) + (256).to_bytes(8, "little")
    msg = wire.to_proto(torch.tensor([True, False, True]))
    assert msg.dtype == pb.BOOL
    assert msg.data == b"\x01\x00\x01"


NONCONTIG = {
    "transpose": lambda x: x.t(),
    "step_slice": lambda x: x[:, ::2],
    "negative_like_flip": lambda x: x.flip(0),
    "storage_offset": lambda x: x[1:],
    "expand_stride0": lambda x: x[:1].expand(4, -1),
    "permute3d": lambda x: x.reshape(2, 3, 4).permute(2, 0, 1),
}


@pytest.mark.parametrize("view", list(NONCONTIG), ids=list(NONCONTIG))
@pytest.mark.parametrize("torch_dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.uint16])
def test_non_contiguous_input(view: str, torch_dtype: torch.dtype) -> None:
    base = random_tensor(torch_dtype, (4, 6), seed=3)
    if view == "permute3d":
        base = random_tensor(torch_dtype, (24,), seed=3)
    t = NONCONTIG[view](base)
    msg = wire.to_proto(t)
    assert list(msg.shape) == list(t.shape)
    # bytes are those of the logical (row-major) tensor, not the underlying storage
    assert msg.data == bits(t.contiguous()).tobytes()
    assert_bit_identical(wire.from_proto(msg), t.contiguous())


def test_requires_grad_input() -> None:
    t = torch.randn(3, 4, requires_grad=True) * 2  # non-leaf with grad_fn
    back = wire.from_proto(wire.to_proto(t))
    assert not back.requires_grad
    assert torch.equal(back, t.detach())


@pytest.mark.parametrize(
    "np_dtype",
    [
        np.float32,
        np.float16,
        np.float64,
        np.uint8,
        np.int8,
        np.int16,
        np.int32,
        np.int64,
        np.bool_,
        np.uint16,
        np.uint32,
    ],
)
def test_numpy_input(np_dtype: type) -> None:
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, 2 * 3 * 4 * np.dtype(np_dtype).itemsize, dtype=np.uint8)
    a = raw.view(np_dtype).reshape(2, 3, 4) if np_dtype is not np.bool_ else (raw % 2).astype(np.bool_).reshape(2, 3, 4)
    for arr in (a, a.transpose(2, 0, 1), a[:, ::-1, ::2]):  # contiguous and not
        msg = wire.to_proto(arr)
        assert list(msg.shape) == list(arr.shape)
        assert msg.data == np.ascontiguousarray(arr).astype(np.dtype(np_dtype).newbyteorder("<")).tobytes()
        back = wire.from_proto(msg)
        np.testing.assert_array_equal(
            back.numpy().view(np.uint8), np.ascontiguousarray(arr).view(np.uint8)
        )  # bitwise, NaN-safe
        assert back.numpy().dtype == np.dtype(np_dtype)


def test_numpy_and_torch_encode_identically() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    assert wire.to_proto(a) == wire.to_proto(torch.from_numpy(a))


@pytest.mark.parametrize("bad", [torch.complex64, torch.uint64, torch.float8_e4m3fn])
def test_unsupported_torch_dtype_raises(bad: torch.dtype) -> None:
    with pytest.raises(wire.WireError, match=re.escape(str(bad))):
        wire.to_proto(torch.zeros(2, dtype=bad))


# ---------------------------------------------------------------------------
# Malformed messages
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "shape", "nbytes", "expected"),
    [
        (pb.FLOAT32, [2, 3], 20, 24),  # too short
        (pb.FLOAT32, [2, 3], 28, 24),  # too long
        (pb.FLOAT64, [5], 39, 40),
        (pb.INT16, [3, 3], 17, 18),
        (pb.BFLOAT16, [4], 9, 8),
        (pb.FLOAT32, [0, 5], 4, 0),  # empty tensor with a payload
        (pb.FLOAT32, [], 0, 4),  # scalar without a payload
        (pb.BOOL, [7], 8, 7),
    ],
)
def test_byte_count_mismatch_raises(dtype: int, shape: list[int], nbytes: int, expected: int) -> None:
    msg = pb.Tensor(dtype=dtype, shape=shape, data=b"\x01" * nbytes)
    with pytest.raises(wire.WireError) as exc:
        wire.from_proto(msg)
    text = str(exc.value)
    without_shape = re.sub(r"\[[^\]]*\]", "", text)  # drop the shape list so its numbers cannot match
    assert re.search(rf"\b{expected}\b", without_shape), text
    assert re.search(rf"\b{nbytes}\b", without_shape), text
    assert isinstance(exc.value, ValueError)  # WireError is a ValueError


@pytest.mark.parametrize("value", [pb.DTYPE_UNSPECIFIED, 13, 99, 12345])
def test_unknown_dtype_raises(value: int) -> None:
    msg = pb.Tensor(dtype=value, shape=[2], data=b"\x00" * 8)
    msg = pb.Tensor.FromString(msg.SerializeToString())  # open enum: unknown values survive the wire
    assert msg.dtype == value
    with pytest.raises(wire.WireError, match="dtype"):
        wire.from_proto(msg)


def test_unknown_dtype_message_names_value() -> None:
    with pytest.raises(wire.WireError, match="99"):
        wire.from_proto(pb.Tensor(dtype=99, shape=[1], data=b"\x00"))
    with pytest.raises(wire.WireError, match="DTYPE_UNSPECIFIED"):
        wire.from_proto(pb.Tensor(shape=[1], data=b"\x00"))


@pytest.mark.parametrize(
    ("shape", "nbytes"),
    [
        ([-1, 4], 16),
        ([2, -3], 0),
        ([-2, -3], 24),  # the product is positive and matches the bytes; still invalid
        ([-1], 0),
    ],
)
def test_negative_dimension_raises(shape: list[int], nbytes: int) -> None:
    msg = pb.Tensor(dtype=pb.FLOAT32, shape=shape, data=b"\x00" * nbytes)
    with pytest.raises(wire.WireError, match="negative"):
        wire.from_proto(msg)


# ---------------------------------------------------------------------------
# Ownership
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("torch_dtype", [torch.float32, torch.bfloat16, torch.uint8, torch.int64])
def test_decoded_tensor_is_writable_and_does_not_alias_message(torch_dtype: torch.dtype) -> None:
    t = random_tensor(torch_dtype, (3, 4), seed=5)
    msg = wire.to_proto(t)
    original = bytes(msg.data)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "non-writable buffer" warning
        a = wire.from_proto(msg)
        b = wire.from_proto(msg)
        assert a.data_ptr() != b.data_ptr()
        a.view(torch.uint8).fill_(0xAB)
    assert msg.data == original
    assert_bit_identical(b, t)
    assert_bit_identical(wire.from_proto(msg), t)
    if torch_dtype is not torch.bfloat16:
        assert a.numpy().flags.writeable

    # and the encoder copies too: changing the source after encoding changes nothing
    t.view(torch.uint8).fill_(0)
    assert msg.data == original


def test_decoded_empty_and_scalar_are_writable() -> None:
    e = wire.from_proto(wire.to_proto(torch.empty(0, 5)))
    assert e.shape == (0, 5)
    assert e.dtype == torch.float32
    s = wire.from_proto(wire.to_proto(torch.tensor(2.5)))
    assert s.shape == ()
    s += 1
    assert s.item() == 3.5


def test_decode_is_warning_free_in_a_fresh_process() -> None:
    # torch warns only once per process about tensors over non-writable buffers,
    # so check in a fresh interpreter where nothing has been decoded yet.
    code = (
        "import torch, warnings\n"
        "warnings.simplefilter('error')\n"
        "from kd.core import wire\n"
        "t = wire.from_proto(wire.to_proto(torch.arange(6, dtype=torch.float32)))\n"
        "t += 1\n"
        "assert t.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], t\n"
        "print('ok')\n"
    )
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
