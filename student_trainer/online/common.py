"""What the online methods share: the consistency ramp-up, the temperature-scaled KL, how a
method plugs into ``train_student`` (``Setup``, including what its checkpoints hold) and a module
view of one of a model's outputs."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kd.student_trainer.train import Hooks, StepContext


def sigmoid_rampup(epoch: float, length: float) -> float:
    """The consistency ramp-up of Laine & Aila / mean teacher (arXiv 1610.02242), which ONE,
    OKDDip and PCL weigh their distillation terms with: ``exp(-5 (1 - t)^2)``, ``t = clip(epoch /
    length, 0, 1)``; 1 throughout when ``length`` is 0."""
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(epoch, 0.0), length) / length
    return float(math.exp(-5.0 * phase * phase))


def kl_t(student_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(target/T) || softmax(student/T))``, summed over classes, averaged over
    the batch (float32 or wider). Gradients reach the target too unless the caller detaches it."""
    dt = torch.promote_types(student_logits.dtype, torch.float32)
    log_s = F.log_softmax(student_logits.to(dt) / temperature, dim=1)
    log_t = F.log_softmax(target_logits.to(dt) / temperature, dim=1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature**2


def ce_sum(logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Sum over the heads of each head's mean cross-entropy (computed in float32 or wider)."""
    return torch.stack([F.cross_entropy(z.to(torch.promote_types(z.dtype, torch.float32)), labels)
                        for z in logits]).sum()  # fmt: skip


def check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


class Pick(nn.Module):
    """One output of a multi-output model, as a model of its own (for evaluation):
    ``pick(model, x) -> logits``."""

    def __init__(self, model: nn.Module, pick: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.pick = pick
        if hasattr(model, "input_shape"):
            self.input_shape = model.input_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pick(self.model, x)


class MeanOf(nn.Module):
    """The mean of several models' logits (an ensemble of separate networks, for evaluation)."""

    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)
        if hasattr(models[0], "input_shape"):
            self.input_shape = models[0].input_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.models]).mean(0)


@dataclass
class Setup:
    """A method ready for ``train_student``: the student its optimiser trains (its ``forward``
    gives the deployed logits, evaluated every epoch), the loss hook and any extra modules or
    callbacks, and ``outputs``: every head to evaluate at the end, by name (``branch<i>``,
    ``ensemble``, ...). ``ensemble`` names the ensemble among them (None: there is none)."""

    student: nn.Module
    loss: Callable[[StepContext], torch.Tensor | dict[str, torch.Tensor]]
    outputs: dict[str, nn.Module]
    ensemble: str | None = "ensemble"
    extra: list[tuple[nn.Module, torch.optim.Optimizer]] = field(default_factory=list)
    on_step: Callable[[int, int, float, float], None] | None = None
    evaluate: Callable | None = None
    # modules worth saving beside the student (e.g. PCL's temporal mean, DCM's second network)
    others: dict[str, nn.Module] = field(default_factory=dict)
    # the method's own state beyond its modules (PCL's step counter), for checkpoints: plain values
    state: Callable[[], dict] | None = None
    load_state: Callable[[dict], None] | None = None

    def hooks(self, identity: dict[str, object] | None = None) -> Hooks:
        """The trainer's hooks. Checkpoints (``train_student(run_dir=...)``) hold, besides the
        student and the ``extra`` modules with their optimisers (saved by the loop), every other
        module in ``others`` (an EMA teacher has no optimiser, so only this saves it), the method's own
        ``state()`` and ``identity`` (the method, its options, ...); ``resume`` restores them all,
        after refusing a checkpoint whose identity differs, so an interrupted run continues exactly."""

        # A module in ``others`` that is also an ``extra`` one (DCM's second network) is saved by the
        # loop with its optimiser; saving it here as well doubled its share of every checkpoint.
        trained = {id(m) for m, _ in self.extra}
        own_modules = {k: m for k, m in self.others.items() if id(m) not in trained}

        def state() -> dict:
            return {"identity": identity, "others": {k: m.state_dict() for k, m in own_modules.items()},
                    "own": None if self.state is None else self.state()}  # fmt: skip

        def load_state(saved: dict) -> None:
            if saved.get("identity") != identity:
                raise ValueError(f"cannot resume: the checkpoint is of {saved.get('identity')}, this run is {identity}")
            missing = sorted(set(own_modules) - set(saved.get("others", {})))
            if missing:
                raise ValueError(f"cannot resume: the checkpoint lacks the module(s) {missing}")
            for k, m in own_modules.items():
                m.load_state_dict(saved["others"][k])
            if self.load_state is not None:
                self.load_state(saved["own"])

        return Hooks(extra=self.extra, loss=self.loss, on_step=self.on_step, evaluate=self.evaluate, state=state,
                     load_state=load_state)  # fmt: skip
