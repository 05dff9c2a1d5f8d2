"""Training recipes: optimisers, learning-rate schedules, mixed precision, gradient clipping.

What the literature's recipes need (mdistiller's CIFAR-100 and ImageNet setups, torchdistill's):

* optimisers ``adam`` (L2 weight decay, this project's default), ``adamw`` (decoupled weight
  decay, Loshchilov & Hutter), ``sgd`` (momentum, optionally Nesterov) and ``dot`` (DOT's SGD with
  separate task and distillation momenta, ``student_trainer.losses.dot``);
* schedules as a pure function of the position in training, ``lr_factor``, so a resumed run
  recomputes the rate and no scheduler state has to be saved:

  - ``constant``: 1;
  - ``multistep``: ``gamma ** (number of milestones <= epoch)``, epochs counted from 0 -- the
    same rate as mdistiller's ``adjust_learning_rate`` (epochs counted from 1, decayed when
    ``epoch > stage``) and torch's ``MultiStepLR`` stepped once per epoch;
  - ``cosine``: ``0.5 * (1 + cos(pi * t))`` with ``t`` the fraction of the post-warm-up steps
    done, updated every step (SGDR without restarts, as timm's and torchvision's recipes);

  a linear warm-up over the first ``warmup_epochs`` epochs multiplies the rate by
  ``(step + 1) / warmup_steps`` (Goyal et al. 2017), step counted from 0 over all epochs;
* AMP: ``bf16`` (autocast, no scaler) and ``fp16`` (autocast with a ``GradScaler``), and
  channels-last memory format for 4-D inputs -- both meant for CUDA; bf16 also runs on CPU.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

OPTIMIZERS = ("adam", "adamw", "sgd", "dot")
SCHEDULES = ("constant", "cosine", "linear", "multistep")
AMP_MODES = ("fp32", "bf16", "fp16")


@dataclass
class Recipe:
    """The optimiser, schedule and precision of a training run (fields of ``TrainConfig``)."""

    optimizer: str = "adam"
    lr: float = 3e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    schedule: str = "constant"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    amp: str = "fp32"
    channels_last: bool = False
    clip_grad_norm: float = 0.0  # 0: no clipping

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"unknown amp mode {self.amp!r}; choose from {', '.join(AMP_MODES)}")
        # lr = 0 is allowed: a run that must leave the weights where they start (tests, probes).
        for name in ("lr", "weight_decay", "momentum", "warmup_epochs", "clip_grad_norm"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.momentum >= 1:  # a momentum of 1 or more never forgets a gradient: the updates grow without bound
            raise ValueError(f"momentum must be < 1, got {self.momentum!r}")
        if not math.isfinite(self.gamma) or self.gamma <= 0:
            raise ValueError(f"gamma must be a finite number > 0, got {self.gamma!r}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum <= 0):
            raise ValueError("nesterov needs --optimizer sgd with momentum > 0")
        if self.optimizer == "dot" and (self.amp == "fp16" or self.clip_grad_norm > 0):
            raise ValueError("--optimizer dot does not combine with fp16 AMP or gradient clipping")
        if self.schedule == "multistep" and not self.milestones:
            raise ValueError("the multistep schedule needs milestones (epochs at which lr is multiplied by gamma)")
        if list(self.milestones) != sorted(self.milestones) or any(int(m) < 0 for m in self.milestones):
            raise ValueError(f"milestones must be increasing epochs >= 0, got {self.milestones}")


def recipe_of(config: object) -> Recipe:
    """The Recipe fields of any config object that has them (e.g. ``TrainConfig``)."""
    return Recipe(**{k: getattr(config, k) for k in Recipe.__dataclass_fields__ if hasattr(config, k)})


def make_optimizer(params: Iterable[nn.Parameter], recipe: Recipe) -> torch.optim.Optimizer:
    """The recipe's optimiser over ``params`` at the base learning rate."""
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay,
                               nesterov=recipe.nesterov)  # fmt: skip
    if recipe.optimizer == "dot":
        from kd.student_trainer.losses.dot import DOT

        return DOT(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")


def lr_factor(recipe: Recipe, epoch: int, step: int, steps_per_epoch: int, epochs: int) -> float:
    """The multiplier of the base rate at ``step`` (0-based, within) ``epoch`` (0-based) of ``epochs``."""
    steps_per_epoch = max(int(steps_per_epoch), 1)
    g = epoch * steps_per_epoch + step  # global step
    warm = int(round(recipe.warmup_epochs * steps_per_epoch))
    factor = 1.0
    if recipe.schedule == "multistep":
        factor = recipe.gamma ** sum(1 for m in recipe.milestones if epoch >= int(m))
    elif recipe.schedule in ("cosine", "linear"):
        total = max(epochs * steps_per_epoch - warm, 1)
        t = min(max(g - warm, 0) / total, 1.0)
        # linear: transformers' get_linear_schedule_with_warmup after its warm-up (BERT, DistilBERT, the
        # HF Trainer's default): 1 at the warm-up's end, 0 at the last step's end
        factor = 0.5 * (1.0 + math.cos(math.pi * t)) if recipe.schedule == "cosine" else 1.0 - t
    if g < warm:
        factor *= (g + 1) / warm
    return factor


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def autocast(recipe: Recipe, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to the recipe's half precision on ``device``; a no-op context for fp32."""
    if recipe.amp == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if recipe.amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(recipe: Recipe, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 needs its loss scaled (its small gradients underflow); bf16 and fp32 do not."""
    if recipe.amp != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def to_memory_format(x: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """Channels-last for 4-D image batches when the recipe asks for it."""
    if recipe.channels_last and x.ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def params_of(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for group in optimizer.param_groups:
        yield from group["params"]


def clip_gradients(optimizer: torch.optim.Optimizer, recipe: Recipe, scaler: torch.amp.GradScaler | None) -> None:
    """Clip the total gradient norm of ``optimizer``'s parameters to ``recipe.clip_grad_norm``
    (after unscaling fp16 gradients, so the threshold is in true gradient units)."""
    if recipe.clip_grad_norm <= 0:
        return
    if scaler is not None:
        scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(list(params_of(optimizer)), recipe.clip_grad_norm)


def optimizer_step(optimizer: torch.optim.Optimizer, recipe: Recipe, scaler: torch.amp.GradScaler | None) -> None:
    """Clip, then step (through the scaler for fp16: a step with inf/NaN gradients is skipped)."""
    clip_gradients(optimizer, recipe, scaler)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
