"""KD methods by name (as torchdistill does): ``kd train --method NAME`` and a
config file name the same registry entry.

Every loss is a pure function of tensors -- student logits, teacher logits,
labels, hyper-parameters -- with no model inside, so the same function works
whether targets come from a server, a cache or a local teacher.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kd.targets import SparseTargets

LossFn = Callable[..., torch.Tensor]
# Passed by the training loop to losses that declare them (0-based epoch, total epochs).
SCHEDULE_ARGS = ("epoch", "epochs")


@dataclass(frozen=True)
class Method:
    name: str
    loss: LossFn
    paper: str
    needs_teacher: bool = True
    # Works on kd.targets.SparseTargets (topk/sample caches) without densifying.
    accepts_sparse: bool = False
    # The loop doubles each batch with a same-class partner per sample (CS-KD):
    # the loss gets the student's logits for [x; x'] and labels for both halves.
    pairs: bool = False

    @property
    def defaults(self) -> dict[str, object]:
        sig = inspect.signature(self.loss)
        return {
            n: p.default
            for n, p in sig.parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
            and p.default is not inspect.Parameter.empty
            and n not in SCHEDULE_ARGS
        }

    @property
    def schedule_args(self) -> set[str]:
        """Which of ``epoch`` / ``epochs`` the loss takes (warm-ups, decays, early stops)."""
        return set(inspect.signature(self.loss).parameters) & set(SCHEDULE_ARGS)

    def __call__(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | SparseTargets | None,
        labels: torch.Tensor,
        *,
        epoch: int | None = None,
        epochs: int | None = None,
        **hparams: object,
    ) -> torch.Tensor:
        unknown = set(hparams) - set(self.defaults)
        if unknown:
            raise TypeError(f"method {self.name!r} has no option(s) {sorted(unknown)}; options: {self.defaults}")
        if self.needs_teacher and teacher_logits is None:
            raise ValueError(f"method {self.name!r} needs teacher targets; give it a --source")
        if isinstance(teacher_logits, SparseTargets) and not self.accepts_sparse:
            raise ValueError(
                f"method {self.name!r} needs dense teacher logits, but the targets are sparse "
                f"({teacher_logits.kind}); use a dense cache codec (fp32, fp16, bf16, int8) or a server/local source"
            )
        schedule = {"epoch": epoch, "epochs": epochs}
        for name in self.schedule_args:
            if schedule[name] is None:
                raise ValueError(f"method {self.name!r} needs the {name} (the training loop passes it)")
            hparams[name] = schedule[name]
        return self.loss(student_logits, teacher_logits, labels, **hparams)


METHODS: dict[str, Method] = {}


def register(
    name: str, paper: str, *, needs_teacher: bool = True, accepts_sparse: bool = False, pairs: bool = False
) -> Callable[[LossFn], LossFn]:
    def deco(fn: LossFn) -> LossFn:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        METHODS[name] = Method(name, fn, paper, needs_teacher, accepts_sparse, pairs)
        return fn

    return deco


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}") from None


def _register_all() -> None:
    """Import every module of this package: each registers its method(s)."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


_register_all()
