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


@dataclass(frozen=True)
class Method:
    name: str
    loss: LossFn
    paper: str
    needs_teacher: bool = True
    # Works on kd.targets.SparseTargets (topk/sample caches) without densifying.
    accepts_sparse: bool = False

    @property
    def defaults(self) -> dict[str, object]:
        sig = inspect.signature(self.loss)
        return {
            n: p.default
            for n, p in sig.parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
        }

    def __call__(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | SparseTargets | None,
        labels: torch.Tensor,
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
        return self.loss(student_logits, teacher_logits, labels, **hparams)


METHODS: dict[str, Method] = {}


def register(
    name: str, paper: str, *, needs_teacher: bool = True, accepts_sparse: bool = False
) -> Callable[[LossFn], LossFn]:
    def deco(fn: LossFn) -> LossFn:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        METHODS[name] = Method(name, fn, paper, needs_teacher, accepts_sparse)
        return fn

    return deco


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}") from None


# Importing the method modules registers them.
from student_trainer.losses import ce, kd  # noqa: E402,F401
