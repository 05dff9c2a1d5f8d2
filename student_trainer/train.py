"""The training loop: a student, a method (loss), an optional source of soft targets.

Seeded and reproducible: the seed fixes the student's initialisation and the
order of every epoch, so two runs with the same seed and the same targets give
the same student, whatever source the targets came from.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from kd.data import Dataset, view_seeds
from student_trainer.losses import get_method
from student_trainer.sources import Batch, SoftTargetSource


@dataclass
class TrainConfig:
    method: str = "kd"
    method_options: dict[str, object] = field(default_factory=dict)
    epochs: int = 60
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "cpu"
    # > 1: each step replays, per sample, one of `views` seeded augmented views
    # (kd.data.Dataset.views); a cache must hold the same views.
    views: int = 1


@dataclass
class TrainResult:
    test_acc: float
    acc_per_epoch: list[float]
    loss_per_epoch: list[float]
    seconds: float


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset, *, device: str = "cpu", batch_size: int = 1024) -> float:
    model.eval()
    correct = 0
    for s in range(0, len(data), batch_size):
        x = data.inputs[s : s + batch_size].to(device)
        correct += int((model(x).argmax(1).cpu() == data.labels[s : s + batch_size]).sum())
    return correct / len(data)


def _batches(train: Dataset, subset: torch.Tensor, config: TrainConfig, gen: torch.Generator) -> Iterator[Batch]:
    order = subset[torch.randperm(len(subset), generator=gen)]
    for s in range(0, len(order), config.batch_size):
        idx = order[s : s + config.batch_size]
        if config.views > 1:
            views = torch.randint(0, config.views, (len(idx),), generator=gen)
            yield Batch(idx, train.views(idx, view_seeds(idx, views, config.views)), train.labels[idx], views)
        else:
            yield Batch(idx, train.inputs[idx], train.labels[idx])


def train_student(
    student: nn.Module,
    train: Dataset,
    test: Dataset,
    config: TrainConfig,
    *,
    source: SoftTargetSource | None = None,
    subset: torch.Tensor | None = None,
    on_epoch: Callable[[int, float, float], None] | None = None,
) -> TrainResult:
    """Train ``student`` in place on ``train[subset]``; evaluate on ``test`` every epoch.

    ``subset`` holds indices into ``train`` (all by default): targets are read
    by these indices, so a cache built on the whole split serves any subset.
    """
    method = get_method(config.method)
    if method.needs_teacher and source is None:
        raise ValueError(f"method {config.method!r} needs a soft-target source (--source)")
    if source is not None and getattr(source, "views", config.views) != config.views:
        raise ValueError(f"the cache holds {source.views} view(s) per sample but training asks for {config.views}")
    if source is not None and source.num_classes != train.num_classes:
        raise ValueError(f"source has {source.num_classes} classes, dataset {train.dataset_id} has {train.num_classes}")
    dev = torch.device(config.device)
    student.to(dev)
    opt = torch.optim.Adam(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    subset = torch.arange(len(train)) if subset is None else subset
    t0 = time.perf_counter()
    accs: list[float] = []
    losses: list[float] = []
    for epoch in range(config.epochs):
        student.train()
        batches = _batches(train, subset, config, gen)
        pairs = (
            source.iter_targets(batches)
            if (source is not None and method.needs_teacher)
            else ((b, None) for b in batches)
        )
        total, n = 0.0, 0
        for (idx, x, y, _), teacher_logits in pairs:
            x, y = x.to(dev), y.to(dev)
            if teacher_logits is not None:
                teacher_logits = teacher_logits.to(dev)
            loss = method(student(x), teacher_logits, y, epoch=epoch, epochs=config.epochs, **config.method_options)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            n += len(idx)
        accs.append(accuracy(student, test, device=config.device))
        losses.append(total / max(n, 1))
        if on_epoch is not None:
            on_epoch(epoch, losses[-1], accs[-1])
    return TrainResult(accs[-1], accs, losses, time.perf_counter() - t0)
