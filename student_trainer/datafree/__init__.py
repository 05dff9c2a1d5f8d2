"""Data-free distillation against a served teacher: the student never sees real training data.

Each method is one module here and registers a ``DataFreeMethod`` by name: a function
``run(teacher: ServedTeacher, student: nn.Module, config: DataFreeConfig, **options) ->
DataFreeResult`` that synthesises inputs (a generator, an optimisation loop, records,
boundary search) and distils the student on them through the teacher service, with the
shared trainer (``common.Run.train`` -> ``kd.student_trainer.train.train_student``: the recipe,
run directory and evaluation of ``kd train``; no method steps the student itself). What a
method needs from the teacher decides the access tier it requires (``tier``); the
server refuses anything beyond the tier it grants.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

from kd.student_trainer.datafree.common import DataFreeConfig, DataFreeResult, ServedTeacher

__all__ = ["DATAFREE", "DataFreeConfig", "DataFreeMethod", "DataFreeResult", "ServedTeacher", "get", "register"]


@dataclass(frozen=True)
class DataFreeMethod:
    name: str
    run: Callable[..., DataFreeResult]
    paper: str
    tier: str  # the least access tier the method works with: white, features, scores or labels


DATAFREE: dict[str, DataFreeMethod] = {}


def register(name: str, paper: str, *, tier: str) -> Callable:
    def deco(fn: Callable[..., DataFreeResult]) -> Callable[..., DataFreeResult]:
        if name in DATAFREE:
            raise ValueError(f"data-free method {name!r} registered twice")
        DATAFREE[name] = DataFreeMethod(name, fn, paper, tier)
        return fn

    return deco


def get(name: str) -> DataFreeMethod:
    try:
        return DATAFREE[name]
    except KeyError:
        raise ValueError(f"unknown data-free method {name!r}; available: {', '.join(sorted(DATAFREE))}") from None


def _register_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "common":
            importlib.import_module(f"{__name__}.{info.name}")


_register_all()
