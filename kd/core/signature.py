"""What a teacher takes and gives, and the fingerprint of the targets it produces.

A **signature** lists a teacher's named inputs and outputs, each a dtype and a
*per-sample* shape (the batch dimension is implied, never written). A
dimension of ``-1`` (``VARIABLE``) may take any size: token teachers take
``tokens: int64 [-1]`` and give ``logits: float32 [-1, V]``, the first
per-sample axis being the positions axis ``S``. Every sample of one batch has
the same ``S`` (the client pads); an output's ``-1`` takes the size of the
input's ``-1`` at the same position in the order they appear. Image and
vector teachers have static shapes (``input: float32 [1, 8, 8]``,
``logits: float32 [10]``). The signature also carries the class names (one per
logit index) and the normalisation the server applies to uint8 inputs.

The **target fingerprint** names the soft targets a served teacher computes:
two servers (or a server and a cache) with equal target fingerprints give the
same targets up to float rounding of the same computation. It is a sha256 over
the weights fingerprint (architecture + every parameter and buffer,
``kd.teacher_server.loading.fingerprint``) and every serving option that
changes the computed function:

* ``amp``: YES. An autocast dtype (bf16, fp16) changes every matmul's precision
  (bf16 vs fp32: max |diff| 8.8e-4 on the digits teacher's logits).
* ``compile``: YES. ``torch.compile`` replaces the eager kernels by generated,
  fused ones (other reduction orders, possibly other approximations); kd cannot
  bound the difference, so it names a different target.
* ``mean``/``std`` (uint8 input normalisation): YES. They define what a uint8
  input (sent by value or read from a dataset by reference) means to the model.
  Canonicalised to float32, the precision the server applies them in.
* ``channels_last``: NO. It is the memory layout of the same fp32 computation;
  it moves results only at float rounding level, like the choice of kernel for
  a batch size. (Measured on CPU, digits CNN, 512 samples: max |diff| of the
  logits 1.9e-8 for channels_last, 7.4e-4 for bf16 autocast.)
* the device: NO. A teacher on CPU and on CUDA computes the same function, but
  the results agree only to float tolerance, not bit for bit (another kernel,
  another summation order; on Ampere+ GPUs PyTorch runs fp32 *convolutions* in
  TF32 by default, ``torch.backends.cudnn.allow_tf32``, which moves logits by
  ~1e-3 relative). A cache precomputed on one device is accepted on the other:
  the fingerprint promises the same function, not the same bits.

* a token teacher's signature facts (``facts``): YES. Its task (causal or masked
  LM), vocabulary size, maximum length and the hash of its tokenizer files say what
  the ids mean and which positions exist; the same weights behind another tokenizer
  name other targets (kd.teacher_server.lm).

The reference configuration (fp32, eager, no normalisation) has the weights
fingerprint itself as its target fingerprint, so caches, local teachers and
activation records made before options were fingerprinted keep their identity.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from kd.core.wire import proto_dtype, torch_dtype
from kd.v1 import teacher_pb2 as pb

VARIABLE = -1  # a per-sample dimension of any size (e.g. the positions axis S)
FINGERPRINT_VERSION = 1
AMP_CHOICES = ("fp32", "bf16", "fp16")


class SignatureError(ValueError):
    """A tensor (or a signature) that does not fit; the message names both shapes."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise SignatureError(f"unknown dtype {name!r}")
    return dtype


def format_shape(shape: Iterable[int], batch: bool = False) -> str:
    """``[1, 8, 8]``, ``[S, 50257]`` for variable dims, ``[N, ...]`` with ``batch``."""
    dims = ["S" if d == VARIABLE else str(d) for d in shape]
    return "[" + ", ".join((["N"] if batch else []) + dims) + "]"


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of a teacher: dtype and per-sample shape (-1: any size)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        shape = tuple(int(d) for d in self.shape)
        if any(d < VARIABLE for d in shape):
            raise SignatureError(f"tensor {self.name!r}: shape {list(shape)} has a dimension below -1")
        object.__setattr__(self, "shape", shape)

    @property
    def static(self) -> bool:
        """Whether every dimension has a fixed size."""
        return VARIABLE not in self.shape

    def __str__(self) -> str:
        return f"{self.name}: {_dtype_name(self.dtype)} {format_shape(self.shape)}"

    def matches(self, sample_shape: Sequence[int]) -> bool:
        """Whether one sample of ``sample_shape`` fits (variable dims take any size)."""
        return len(sample_shape) == len(self.shape) and all(
            w == VARIABLE or w == int(g) for w, g in zip(self.shape, sample_shape)
        )

    def check(self, tensor: torch.Tensor, what: str | None = None) -> None:
        """Refuse a batch ``[N, *shape]`` of another dtype or shape, or an empty one."""
        what = what or self.name
        if tensor.dtype != self.dtype:
            raise SignatureError(f"{what} has dtype {_dtype_name(tensor.dtype)}; expected {self}")
        self.check_shape(tuple(tensor.shape), what)

    def check_shape(self, shape: Sequence[int], what: str | None = None) -> None:
        what = what or self.name
        if len(shape) == 0 or not self.matches(shape[1:]):
            raise SignatureError(
                f"{what} has shape {list(shape)} but {self.name!r} takes {format_shape(self.shape, batch=True)}"
            )
        if shape[0] == 0:
            raise SignatureError(f"empty batch: {what} has 0 samples")

    def conform(self, x: torch.Tensor, what: str | None = None) -> torch.Tensor:
        """The batch in this spec's per-sample shape: as it is when it fits, reshaped when
        the spec is static and each sample has as many elements (flat [64] digits for a
        [1, 8, 8] CNN), refused otherwise with a message naming both shapes."""
        what = what or self.name
        sample = tuple(x.shape[1:])
        if x.ndim >= 1 and self.matches(sample):
            return x
        if x.ndim >= 1 and self.static and math.prod(sample) == math.prod(self.shape):
            return x.reshape(x.shape[0], *self.shape)
        n = math.prod(sample) if x.ndim >= 1 else 0
        want = f"{math.prod(self.shape)} elements" if self.static else "a variable size"
        raise SignatureError(
            f"{what}: samples of shape {format_shape(sample)} ({n} elements) do not fit {self.name!r} "
            f"of shape {format_shape(self.shape)} ({want})"
        )

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": _dtype_name(self.dtype), "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping) -> TensorSpec:
        return cls(str(d["name"]), _dtype_of(str(d["dtype"])), tuple(d["shape"]))

    def to_proto(self) -> pb.TensorSpec:
        return pb.TensorSpec(name=self.name, dtype=proto_dtype(self.dtype), shape=list(self.shape))

    @classmethod
    def from_proto(cls, msg: pb.TensorSpec) -> TensorSpec:
        return cls(msg.name, torch_dtype(msg.dtype), tuple(msg.shape))


@dataclass(frozen=True)
class TeacherSignature:
    """A teacher's inputs and outputs, class names and uint8 normalisation.

    ``extra`` holds string facts a later kind of teacher needs (a tokenizer's
    name, a vocabulary hash) without changing this type.
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    class_names: tuple[str, ...] = ()
    mean: tuple[float, ...] | None = None  # uint8 inputs: (x / 255 - mean[c]) / std[c]
    std: tuple[float, ...] | None = None
    extra: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "class_names", tuple(self.class_names))
        if not self.inputs or not self.outputs:
            raise SignatureError("a signature needs at least one input and one output")
        for kind, specs in (("input", self.inputs), ("output", self.outputs)):
            names = [s.name for s in specs]
            if len(set(names)) != len(names):
                raise SignatureError(f"{kind} names must be unique, got {names}")
        if (self.mean is None) != (self.std is None):
            raise SignatureError("give both mean and std, or neither")
        if self.mean is not None:
            mean, std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std or ())
            if len(mean) != len(std) or not mean or any(not s > 0 for s in std):
                raise SignatureError(f"mean/std need as many values, std > 0; got mean={mean} std={std}")
            object.__setattr__(self, "mean", mean)
            object.__setattr__(self, "std", std)
        if self.class_names and "logits" in self.output_names:
            classes = self.num_classes
            if classes != VARIABLE and len(self.class_names) != classes:
                raise SignatureError(f"{len(self.class_names)} class names for {classes} classes")

    @classmethod
    def classifier(
        cls,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        input_dtype: torch.dtype = torch.float32,
        class_names: Sequence[str] = (),
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> TeacherSignature:
        """The signature of a classifier: ``input [*input_shape]`` -> ``logits float32 [C]``."""
        return cls(
            (TensorSpec("input", input_dtype, tuple(input_shape)),),
            (TensorSpec("logits", torch.float32, (int(num_classes),)),),
            tuple(class_names),
            None if mean is None else tuple(mean),
            None if std is None else tuple(std),
        )

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    @property
    def input(self) -> TensorSpec:
        """The only input (most teachers have one)."""
        if len(self.inputs) != 1:
            raise SignatureError(f"the teacher takes {len(self.inputs)} inputs: {', '.join(map(str, self.inputs))}")
        return self.inputs[0]

    def output(self, name: str) -> TensorSpec:
        for s in self.outputs:
            if s.name == name:
                return s
        raise SignatureError(f"no output {name!r}; outputs: {', '.join(map(str, self.outputs))}")

    @property
    def num_classes(self) -> int:
        """The last dim of ``logits`` (classes, or the vocabulary of a token teacher)."""
        return self.output("logits").shape[-1]

    @property
    def positional(self) -> bool:
        """Whether inputs have a variable (positions) axis: one target per position."""
        return any(not s.static for s in self.inputs)

    def check(self, tensor: torch.Tensor, name: str | None = None) -> None:
        """Validate a batch for the input ``name`` (the only input when None)."""
        spec = self.input if name is None else self._input(name)
        spec.check(tensor)

    def conform(self, tensor: torch.Tensor, name: str | None = None, what: str | None = None) -> torch.Tensor:
        """``TensorSpec.conform`` for the input ``name`` (the only input when None)."""
        spec = self.input if name is None else self._input(name)
        return spec.conform(tensor, what)

    def _input(self, name: str) -> TensorSpec:
        for s in self.inputs:
            if s.name == name:
                return s
        raise SignatureError(f"no input {name!r}; inputs: {', '.join(map(str, self.inputs))}")

    def __str__(self) -> str:
        ins = ", ".join(map(str, self.inputs))
        outs = ", ".join(map(str, self.outputs))
        return f"({ins}) -> ({outs})"

    def to_dict(self) -> dict:
        return {
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "class_names": list(self.class_names),
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> TeacherSignature:
        return cls(
            tuple(TensorSpec.from_dict(s) for s in d["inputs"]),
            tuple(TensorSpec.from_dict(s) for s in d["outputs"]),
            tuple(d.get("class_names", ())),
            None if d.get("mean") is None else tuple(d["mean"]),
            None if d.get("std") is None else tuple(d["std"]),
            dict(d.get("extra", {})),
        )

    def fill_info(self, info: pb.TeacherInfo) -> pb.TeacherInfo:
        """Write the signature into a ``TeacherInfo`` (its ``inputs``/``outputs``/
        ``signature_extra`` and the older ``class_names``/``normalization`` fields)."""
        info.inputs.extend(s.to_proto() for s in self.inputs)
        info.outputs.extend(s.to_proto() for s in self.outputs)
        if not info.class_names:
            info.class_names.extend(self.class_names)
        if self.mean is not None and not info.normalization.mean:
            info.normalization.mean.extend(self.mean)
            info.normalization.std.extend(self.std or ())
        info.signature_extra.update(dict(self.extra))
        return info

    @classmethod
    def from_info(cls, info: pb.TeacherInfo) -> TeacherSignature:
        """The signature a server reports; from the older fields for a server that
        predates ``TensorSpec`` (one input, ``logits [num_classes]``)."""
        if info.inputs:
            inputs = tuple(TensorSpec.from_proto(s) for s in info.inputs)
        else:
            inputs = (TensorSpec("input", torch_dtype(info.input_dtype or pb.FLOAT32), tuple(info.input_shape)),)
        if info.outputs:
            outputs = tuple(TensorSpec.from_proto(s) for s in info.outputs)
        else:
            outputs = (TensorSpec("logits", torch.float32, (int(info.num_classes),)),)
        norm = info.normalization
        return cls(
            inputs,
            outputs,
            tuple(info.class_names),
            tuple(norm.mean) if norm.mean else None,
            tuple(norm.std) if norm.std else None,
            dict(info.signature_extra),
        )


def _float32_values(values: Sequence[float]) -> list[float]:
    # The values as the server applies them (float32), so 0.1 and 0.1000000001 name the same targets.
    return torch.tensor([float(v) for v in values], dtype=torch.float32).tolist()


def target_options(
    *,
    amp: str = "fp32",
    compile: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    facts: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The serving options that change the targets, those away from the reference
    configuration only (fp32, eager, no normalisation): what the target fingerprint covers.
    ``facts``: signature facts that name the targets too (a token teacher's ``task``,
    ``vocab_size``, ``max_length`` and ``tokenizer`` hash, kd.teacher_server.lm)."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"unknown amp dtype {amp!r}; choose from {', '.join(AMP_CHOICES)}")
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    options: dict[str, str] = {}
    if amp != "fp32":
        options["amp"] = amp
    if compile:
        options["compile"] = "inductor"
    if mean is not None and std is not None:
        options["mean"] = ",".join(repr(v) for v in _float32_values(mean))
        options["std"] = ",".join(repr(v) for v in _float32_values(std))
    for key, value in (facts or {}).items():
        if key in options:
            raise ValueError(f"signature fact {key!r} clashes with a serving option")
        options[key] = str(value)
    return options


def target_fingerprint(
    weights_fingerprint: str,
    *,
    amp: str = "fp32",
    compile: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    facts: Mapping[str, str] | None = None,
) -> str:
    """The fingerprint of the soft targets of a teacher served with these options.

    sha256 over the weights fingerprint and ``target_options``; the reference
    configuration returns ``weights_fingerprint`` unchanged (see the module
    docstring for which options count and why channels_last and the device do not).
    """
    options = target_options(amp=amp, compile=compile, mean=mean, std=std, facts=facts)
    if not options:
        return weights_fingerprint
    payload = {"version": FINGERPRINT_VERSION, "weights": weights_fingerprint, "options": options}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
