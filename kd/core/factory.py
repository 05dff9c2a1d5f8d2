"""Models from factories with arguments: ``module:attr[@WEIGHTS][?key=value&...]``.

Students and teachers are built by calling installed code the operator trusts,
``attr(**kwargs)`` of an importable module, e.g.
``timm:create_model?model_name=resnet18&num_classes=100``. Values are parsed as
JSON where they parse (numbers, ``true``, lists), else kept as strings. The key
``input_shape`` (``3x32x32``) is no argument: it tells a teacher's input shape
when the model has no ``input_shape`` attribute. ``@WEIGHTS`` (teachers) names
the weights file that ``kd.teacher_server.loading`` fills the model with.

Error messages name the role ("teacher" or "student"), so a student that cannot
be built is never called a teacher factory.

``logits_of`` unwraps what models return to their logits: a tensor as is, an
object with ``.logits`` (Hugging Face ``ModelOutput``), a dict with ``"logits"``,
or the first element of a tuple or list.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kd.core.samples import sample_size_problem

_SPEC_RE = re.compile(
    r"^(?P<module>[A-Za-z_][\w.]*):(?P<attr>[A-Za-z_][\w.]*)(?:@(?P<weights>[^?]+))?(?:\?(?P<opts>.*))?$"
)


class FactoryError(ValueError):
    """A factory spec that cannot be parsed, imported or called; the message says why."""


@dataclass(frozen=True)
class FactorySpec:
    """A parsed ``module:attr[@WEIGHTS][?key=value&...]``."""

    factory: str  # "module:attr"
    weights: str | None
    kwargs: tuple[tuple[str, Any], ...]  # the factory's keyword arguments, in the spec's order
    input_shape: tuple[int, ...] | None

    @property
    def arguments(self) -> dict[str, Any]:
        return dict(self.kwargs)


def parse_options(opts: str | None, spec: str, role: str = "teacher") -> tuple[dict[str, Any], tuple[int, ...] | None]:
    """``key=value&...`` -> (factory kwargs, input_shape). JSON values where they parse, else strings."""
    kwargs: dict[str, Any] = {}
    shape = None
    for item in filter(None, (opts or "").split("&")):
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise FactoryError(f"option {item!r} in {role} spec {spec!r} must look like name=value")
        if key == "input_shape":
            if shape is not None:  # the later one won without a word, as no other option does
                raise FactoryError(f"option 'input_shape' given twice in {role} spec {spec!r}")
            try:
                shape = tuple(int(d) for d in value.lower().split("x"))
            except ValueError:
                raise FactoryError(f"input_shape must look like 3x32x32, got {value!r} in {spec!r}") from None
            if any(d == 0 or d < -1 for d in shape):  # -1: a variable dim (a token teacher's positions)
                raise FactoryError(
                    f"input_shape {value!r} in {spec!r}: every size must be >= 1 (or -1, a variable length)"
                )
            problem = sample_size_problem(shape)
            if problem:
                raise FactoryError(f"input_shape {value!r} in {spec!r}: {problem}")
            continue
        if key in kwargs:
            raise FactoryError(f"option {key!r} given twice in {role} spec {spec!r}")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return kwargs, shape


def parse_factory(spec: str, role: str = "teacher") -> FactorySpec:
    """Parse ``module:attr[@WEIGHTS][?key=value&...]``; FactoryError when it does not look so."""
    m = _SPEC_RE.match(spec)
    if m is None:
        raise FactoryError(f"{role} spec {spec!r} must look like module:factory[@WEIGHTS][?key=value&...]")
    kwargs, shape = parse_options(m["opts"], spec, role)
    return FactorySpec(f"{m['module']}:{m['attr']}", m["weights"] or None, tuple(kwargs.items()), shape)


def import_factory(path: str, role: str = "teacher") -> Callable[..., Any]:
    """The callable ``attr`` of ``module`` named by ``module:attr``."""
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise FactoryError(
            f"cannot import module {module_name!r} of the {role} factory {path!r}: {e}. "
            f"The module must be importable by this Python (installed, or on PYTHONPATH)"
        ) from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise FactoryError(f"module {module_name!r} has no attribute {attr!r} (the {role} factory {path!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise FactoryError(f"the {role} factory {path!r} is not callable")
    return obj


def call_factory(factory: str, kwargs: dict[str, Any] | None = None, role: str = "teacher") -> nn.Module:
    """``factory(**kwargs)``, checked to be an ``nn.Module``."""
    fn = import_factory(factory, role)
    try:
        model = fn(**(kwargs or {}))
    except TypeError as e:
        raise FactoryError(f"the {role} factory {factory!r} refused the arguments {kwargs or {}}: {e}") from e
    except Exception as e:  # noqa: BLE001 - the user's factory failed (a negative size, ...): one line naming it
        raise FactoryError(f"the {role} factory {factory!r} failed with the arguments {kwargs or {}}: "
                           f"{type(e).__name__}: {e}") from e  # fmt: skip
    if not isinstance(model, nn.Module):
        raise FactoryError(f"the {role} factory {factory!r} returned {type(model).__name__}, not an nn.Module")
    return model


def build(spec: str | FactorySpec, role: str = "student") -> nn.Module:
    """Build a model from its spec (its factory's own initialisation; weights are the loader's)."""
    parsed = parse_factory(spec, role) if isinstance(spec, str) else spec
    if parsed.weights is not None:
        raise FactoryError(f"{role} spec {spec!r}: @WEIGHTS is for teachers (kd.teacher_server.loading)")
    model = call_factory(parsed.factory, parsed.arguments, role)
    if parsed.input_shape is not None and not hasattr(model, "input_shape"):
        model.input_shape = parsed.input_shape
    return model


def logits_of(out: Any) -> torch.Tensor:
    """A model's logits from whatever it returns (tensor, ``.logits``, ``{"logits"}``, tuple)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        if "logits" not in out:
            raise TypeError(f"the model returned a dict without 'logits' (keys {sorted(out)})")
        return out["logits"]
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find logits in a model output of type {type(out).__name__}")
