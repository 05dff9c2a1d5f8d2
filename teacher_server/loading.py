"""Load teachers from local files only, refusing anything that could run code.

A SPEC is either

* ``module:factory@WEIGHTS[?input_shape=1x8x8]``: ``factory()`` (installed code
  the operator trusts) builds the architecture and WEIGHTS fills it. WEIGHTS is
  a ``.safetensors`` file or a state_dict read with ``torch.load(...,
  weights_only=True)``; anything that unpickles to more than tensors is refused.
* ``module:factory`` alone: the factory's own initialisation (tests, demos).
* ``PATH`` of a TorchScript or ``torch.export`` archive. Those are executable
  code (PyTorch's SECURITY.md), so they load only with ``trust_archive=True``
  (``kd serve --trust-archive``).
"""

from __future__ import annotations

import hashlib
import importlib
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

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

    @classmethod
    def parse(cls, spec: str) -> TeacherSpec:
        m = _FACTORY_RE.match(spec)
        if m is None:
            if "?" in spec:
                path, _, opts = spec.partition("?")
                return cls(None, None, Path(path), _parse_opts(opts, spec))
            return cls(None, None, Path(spec), None)
        weights = Path(m["weights"]) if m["weights"] else None
        return cls(f"{m['module']}:{m['attr']}", weights, None, _parse_opts(m["opts"], spec))


def _parse_opts(opts: str | None, spec: str) -> tuple[int, ...] | None:
    shape = None
    for item in filter(None, (opts or "").split("&")):
        key, _, value = item.partition("=")
        if key != "input_shape":
            raise TeacherLoadError(f"unknown option {key!r} in teacher spec {spec!r}; known: input_shape")
        try:
            shape = tuple(int(d) for d in value.lower().split("x"))
        except ValueError:
            raise TeacherLoadError(f"input_shape must look like 3x32x32, got {value!r} in {spec!r}") from None
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


def _import_factory(path: str):
    module_name, _, attr = path.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise TeacherLoadError(f"cannot import module {module_name!r} for teacher factory {path!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise TeacherLoadError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TeacherLoadError(f"{path!r} is not callable")
    return obj


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read plain weights from a safetensors file or a weights-only torch file."""
    if not path.is_file():
        raise TeacherLoadError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise TeacherLoadError(f"weights file {str(path)!r} is not a valid safetensors file: {e}") from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise TeacherLoadError(
            f"weights file {str(path)!r} holds pickled objects that are not plain weights; "
            f"refused (loaded with weights_only=True). Save model.state_dict() or use safetensors. ({e})"
        ) from e
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise TeacherLoadError(f"cannot read weights file {str(path)!r}: {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TeacherLoadError(f"weights file {str(path)!r} does not hold a state_dict of tensors")
    return obj


def save_weights(model: nn.Module, path: str | Path) -> Path:
    """Write a model's state_dict as safetensors (what ``read_state_dict`` and SPECs load)."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def fingerprint(model: nn.Module) -> str:
    """sha256 over the architecture (module repr) and every parameter and buffer."""
    h = hashlib.sha256()
    h.update(repr(model).encode())
    for name, t in sorted(model.state_dict().items()):
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
    model = _import_factory(spec.factory)()
    if not isinstance(model, nn.Module):
        raise TeacherLoadError(f"factory {spec.factory!r} returned {type(model).__name__}, not an nn.Module")
    if spec.weights is not None:
        state = read_state_dict(spec.weights)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise TeacherLoadError(
                f"checkpoint {str(spec.weights)!r} does not fit the architecture of {spec.factory!r}: {e}"
            ) from e
    return model


def load_teacher(
    name: str,
    spec: str,
    *,
    device: str = "cpu",
    trust_archive: bool = False,
) -> Teacher:
    """Build, fill, fingerprint and probe a teacher; ready to serve in eval mode."""
    parsed = TeacherSpec.parse(spec)
    model = build_model(parsed, trust_archive=trust_archive)
    input_shape = parsed.input_shape or getattr(model, "input_shape", None)
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
    finally:
        for h in handles:
            h.remove()
    logits = probe[0] if isinstance(probe, (tuple, list)) else probe
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
    )
