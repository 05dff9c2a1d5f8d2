"""Load teachers from local files only, refusing anything that could run code.

A SPEC is either

* ``module:factory@WEIGHTS[?input_shape=1x8x8]``: ``factory()`` (installed code
  the operator trusts) builds the architecture and WEIGHTS fills it. WEIGHTS is
  a ``.safetensors`` file or a state_dict read with ``torch.load(...,
  weights_only=True)``; anything that unpickles to more than tensors is refused.
* ``module:factory`` alone: the factory's own initialisation (tests, demos).
* ``hf:DIR[?task=causal-lm|masked-lm]``: a Hugging Face language model from a
  local directory (config + safetensors), a token teacher (kd.teacher_server.lm).
* ``PATH`` of a TorchScript or ``torch.export`` archive. Those are executable
  code (PyTorch's SECURITY.md), so they load only with ``trust_archive=True``
  (``kd serve --trust-archive``).
"""

from __future__ import annotations

import hashlib
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kd.core import factory
from kd.core.signature import TeacherSignature

_FACTORY_RE = re.compile(
    r"^(?P<module>[A-Za-z_][\w.]*):(?P<attr>[A-Za-z_][\w.]*)(?:@(?P<weights>[^?]+))?(?:\?(?P<opts>.*))?$"
)


class TeacherLoadError(RuntimeError):
    """A teacher that cannot be loaded; the message says which file and why."""


@dataclass(frozen=True)
class TeacherSpec:
    factory: str | None  # "module:attr"
    weights: Path | None
    archive: Path | None
    input_shape: tuple[int, ...] | None
    kwargs: tuple[tuple[str, object], ...] = ()  # the factory's arguments (kd.core.factory)

    @classmethod
    def parse(cls, spec: str) -> TeacherSpec:
        m = _FACTORY_RE.match(spec)
        if m is not None:
            try:
                f = factory.parse_factory(spec, "teacher")
            except factory.FactoryError as e:
                raise TeacherLoadError(str(e)) from None
            return cls(f.factory, Path(f.weights) if f.weights else None, None, f.input_shape, f.kwargs)
        if "?" in spec:
            path, _, opts = spec.partition("?")
            return cls(None, None, Path(path), _parse_opts(opts, spec))
        return cls(None, None, Path(spec), None)


def _parse_opts(opts: str | None, spec: str) -> tuple[int, ...] | None:
    """An archive's options: only input_shape (factory arguments are for module:factory specs)."""
    try:
        kwargs, shape = factory.parse_options(opts, spec, "teacher")
    except factory.FactoryError as e:
        raise TeacherLoadError(str(e)) from None
    if kwargs:
        raise TeacherLoadError(f"unknown option(s) {sorted(kwargs)} in archive spec {spec!r}; known: input_shape")
    return shape


@dataclass
class Teacher:
    """A loaded teacher: model in eval mode on its device, plus what clients need to know."""

    name: str
    model: nn.Module
    fingerprint: str
    input_shape: tuple[int, ...]
    input_dtype: torch.dtype
    num_classes: int
    device: torch.device
    spec: str
    # Module path -> per-sample output shape, for every module whose output is a tensor.
    layers: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # What it takes and gives (kd.core.signature); built from input_shape/num_classes when None.
    signature: TeacherSignature | None = None
    # ``fingerprint(model)``: architecture + weights. ``fingerprint`` above is the target
    # fingerprint of this teacher run as loaded (fp32, eager), which equals it; a server
    # with other options reports kd.core.signature.target_fingerprint(weights_fingerprint, ...).
    weights_fingerprint: str = ""

    def __post_init__(self) -> None:
        if self.signature is None:
            self.signature = TeacherSignature.classifier(self.input_shape, self.num_classes,
                                                         input_dtype=self.input_dtype)  # fmt: skip
        if not self.weights_fingerprint:
            self.weights_fingerprint = self.fingerprint


def _import_factory(path: str):
    """kd.core.factory.import_factory, failing with TeacherLoadError."""
    try:
        return factory.import_factory(path, "teacher")
    except factory.FactoryError as e:
        raise TeacherLoadError(str(e)) from e


def _looks_like_safetensors(path: Path) -> bool:
    """Whether ``path`` starts as a safetensors file does: an 8-byte little-endian header length that
    fits in the file, then the header's JSON object (``{``). A torch file starts with a zip's "PK" or
    a pickle's protocol byte, neither of which passes."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        size = path.stat().st_size
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size


def _unpickling_reason(e: Exception) -> str:
    """What torch's weights-only unpickler refused, on one line. Its message wraps that in ~7
    lines of advice (that ``weights_only=False`` "will likely succeed", or how to allowlist the
    global: the code execution kd refuses), with terminal escapes: only the cause is kept (the
    whole message on one line where torch words it otherwise)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    text = text.partition("WeightsUnpickler error:")[2] or text
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]
    cause = " ".join(p for p in paragraphs if not p.startswith(("Weights only load failed", "Check the documentation")))
    return cause.split(" Please use `torch.serialization")[0] or " ".join(text.split())


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read plain weights from a safetensors file or a weights-only torch file."""
    if not path.is_file():
        raise TeacherLoadError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                state = {name: f.get_tensor(name) for name in f.keys()}
                metadata = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as e:
            raise TeacherLoadError(f"weights file {str(path)!r} is not a valid safetensors file: {e}") from e
        # Tied weights (an embedding shared with the output head) are stored once; the metadata maps each
        # dropped name to the kept one (save_weights, and safetensors.torch.save_model, write it so). Only
        # names that are absent and point at a stored tensor are restored: metadata never replaces a tensor.
        for dropped, kept in metadata.items():
            if dropped not in state and kept in state:
                state[dropped] = state[kept]
        return state
    if _looks_like_safetensors(path):
        # torch.load would call it "pickled objects that are not plain weights", which sends the user
        # looking for a pickle; the file is fine, only its name is not what the loaders go by
        raise TeacherLoadError(
            f"weights file {str(path)!r} is a safetensors file under the suffix {path.suffix!r}: kd reads "
            f"safetensors by the suffix; rename it to {path.with_suffix('.safetensors').name!r}"
        )
    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol: not the user's to act on
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise TeacherLoadError(
            f"weights file {str(path)!r} holds pickled objects that are not plain weights; "
            f"refused (loaded with weights_only=True). Save model.state_dict() or use safetensors. "
            f"({_unpickling_reason(e)})"
        ) from e
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise TeacherLoadError(f"cannot read weights file {str(path)!r}: {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TeacherLoadError(f"weights file {str(path)!r} does not hold a state_dict of tensors")
    return obj


def weights_to_save(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``model``'s state_dict as safetensors can store it: (tensors, metadata).

    safetensors refuses tensors that share memory, which tied weights do (a GPT-2 style LM's input
    embedding is its output head: two state_dict names, one tensor). A name that is exactly the same
    tensor as an earlier one is dropped and recorded in the metadata as ``dropped -> kept``, the format
    of ``safetensors.torch.save_model``, from which ``read_state_dict`` restores it. Distinct tensors
    that merely overlap in one storage (views of one buffer) are copied apart, since no alias can stand
    for them. Raises ValueError for a tensor safetensors cannot hold (sparse, meta)."""
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    same: dict[tuple, str] = {}  # identity of a view -> the first name it was stored under
    storages: dict[tuple, list[str]] = {}  # storage -> the kept names that live in it
    for name, t in model.state_dict().items():
        t = t.detach()
        if t.layout != torch.strided or t.is_meta:
            raise ValueError(f"cannot save {name!r}: a {t.layout} tensor on {t.device} (safetensors holds dense ones)")
        if t.numel() == 0:  # empty tensors own no memory: nothing to share
            tensors[name] = t
            continue
        storage = (t.device, t.untyped_storage().data_ptr())
        view = (*storage, t.storage_offset(), t.dtype, tuple(t.shape), t.stride())
        if view in same:
            metadata[name] = same[view]
            continue
        same[view] = name
        storages.setdefault(storage, []).append(name)
        tensors[name] = t
    for names in storages.values():
        if len(names) > 1:
            for name in names:
                tensors[name] = tensors[name].clone()
    return {k: v.cpu().contiguous() for k, v in tensors.items()}, metadata


def check_saveable(model: nn.Module) -> None:
    """Raise ValueError (or safetensors' error) now if ``save_weights(model, ...)`` would fail for the
    model's tensors: run before training, so a run is not lost at its end. Cheap: it serialises only
    each tensor's name and dtype (empty tensors), never the weights themselves."""
    from safetensors.torch import save

    tensors, metadata = weights_to_save(model)
    save({k: torch.empty(0, dtype=v.dtype) for k, v in tensors.items()}, metadata=metadata or None)


def save_weights(model: nn.Module, path: str | Path) -> Path:
    """Write a model's state_dict as safetensors (what ``read_state_dict`` and SPECs load); tied
    weights are stored once (``weights_to_save``) and restored by ``read_state_dict``."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors, metadata = weights_to_save(model)
    save_file(tensors, str(path), metadata=metadata or None)
    return path


def fingerprint(model: nn.Module) -> str:
    """sha256 over the architecture (module repr) and every parameter and buffer."""
    return fingerprint_of(repr(model), model.state_dict())


def fingerprint_of(architecture: str, state: Mapping[str, torch.Tensor]) -> str:
    """``fingerprint`` of a model whose repr is ``architecture`` and whose state_dict is
    ``state``: what a published set of weights will be fingerprinted as, before it is swapped in."""
    h = hashlib.sha256()
    h.update(architecture.encode())
    for name, t in sorted(state.items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def build_model(spec: TeacherSpec, *, trust_archive: bool = False) -> nn.Module:
    if spec.archive is not None:
        path = spec.archive
        if not trust_archive:
            raise TeacherLoadError(
                f"{str(path)!r} is a TorchScript/torch.export archive, which is executable code; "
                "load it only if you trust its origin, with --trust-archive"
            )
        if not path.is_file():
            raise TeacherLoadError(f"archive {str(path)!r} does not exist")
        if path.suffix == ".pt2":
            return torch.export.load(str(path)).module()
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except Exception as e:  # noqa: BLE001
            raise TeacherLoadError(f"cannot load TorchScript archive {str(path)!r}: {e}") from e
    assert spec.factory is not None
    try:
        model = factory.call_factory(spec.factory, dict(spec.kwargs), "teacher")
    except factory.FactoryError as e:
        raise TeacherLoadError(str(e)) from e
    if spec.weights is not None:
        state = read_state_dict(spec.weights)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise TeacherLoadError(
                f"checkpoint {str(spec.weights)!r} does not fit the architecture of {spec.factory!r}: {e}"
            ) from e
    return model


def device_problem(device: str) -> str | None:
    """Why ``device`` (cpu, cuda, cuda:N, mps) cannot hold a model here, or None where it can."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        return f"{device!r} is not a device; use cpu, cuda or cuda:N"
    if dev.type == "cpu":
        return None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return f"{device!r}: CUDA is not available here (torch {torch.__version__} sees no GPU)"
        if (dev.index or 0) >= torch.cuda.device_count():
            return f"{device!r}: only {torch.cuda.device_count()} CUDA device(s) here"
        return None
    if dev.type == "mps" and torch.backends.mps.is_available():
        return None
    return f"{device!r} is not available here; use cpu, cuda or cuda:N"


def load_teacher(
    name: str,
    spec: str,
    *,
    device: str = "cpu",
    trust_archive: bool = False,
) -> Teacher:
    """Build, fill, fingerprint and probe a teacher; ready to serve in eval mode.

    ``hf:DIR`` specs and models whose input shape is ``(-1,)`` are token teachers
    (kd.teacher_server.lm): probed with int64 token ids, never float zeros."""
    problem = device_problem(device)
    if problem is not None:
        raise TeacherLoadError(f"teacher {name!r}: device {problem}")
    if spec.startswith("hf:"):
        from kd.teacher_server.lm import load_token_teacher

        return load_token_teacher(name, spec, device=device)
    parsed = TeacherSpec.parse(spec)
    model = build_model(parsed, trust_archive=trust_archive)
    input_shape = parsed.input_shape or getattr(model, "input_shape", None)
    if input_shape is not None and tuple(input_shape) == (-1,):
        from kd.teacher_server.lm import load_token_teacher

        return load_token_teacher(name, spec, device=device, model=model)
    if input_shape is None:
        raise TeacherLoadError(
            f"cannot tell the input shape of teacher {name!r}: give the model an `input_shape` "
            "attribute or append ?input_shape=CxHxW to its spec"
        )
    try:
        model.eval()
    except NotImplementedError:
        pass  # torch.export modules are frozen in the mode they were exported in
    for p in model.parameters():
        p.requires_grad_(False)
    fp = fingerprint(model)
    dev = torch.device(device)
    model.to(dev)
    layers: dict[str, tuple[int, ...]] = {}
    handles = []
    for mod_name, module in model.named_modules():
        if not mod_name:
            continue

        def hook(_m, _i, output, mod_name=mod_name) -> None:
            out = output[0] if isinstance(output, (tuple, list)) and output else output
            if isinstance(out, torch.Tensor) and out.ndim >= 1:
                layers[mod_name] = tuple(int(d) for d in out.shape[1:])

        try:
            handles.append(module.register_forward_hook(hook))
        except (RuntimeError, AttributeError, NotImplementedError):
            pass  # scripted/exported modules may not take hooks: no features then
    try:
        with torch.inference_mode():
            probe = model(torch.zeros((2, *input_shape), device=dev))
    except (RuntimeError, ValueError, TypeError, IndexError) as e:  # its own input does not fit: the spec's mistake
        why = " ".join(str(e).split())
        raise TeacherLoadError(f"teacher {name!r} cannot take inputs of its input shape {list(input_shape)}: "
                               f"{type(e).__name__}: {why}; give the spec its ?input_shape=...") from e  # fmt: skip
    finally:
        for h in handles:
            h.remove()
    logits = factory.logits_of(probe)
    if logits.ndim != 2:
        raise TeacherLoadError(f"teacher {name!r} returned shape {tuple(logits.shape)}; expected [batch, classes]")
    return Teacher(
        name=name,
        model=model,
        fingerprint=fp,
        input_shape=tuple(int(d) for d in input_shape),
        input_dtype=torch.float32,
        num_classes=int(logits.shape[1]),
        device=dev,
        spec=spec,
        layers=layers,
        weights_fingerprint=fp,
    )
