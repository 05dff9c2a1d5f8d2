"""The training loop: a student, a method (loss), an optional source of soft targets.

Seeded and reproducible: the seed fixes the student's initialisation and the
order of every epoch, so two runs with the same seed and the same targets give
the same student, whatever source the targets came from.

With a run directory the loop writes ``config.json`` (the effective config),
``metrics.csv`` (per epoch: loss, test accuracy, samples/s, and the seconds the
step waited for its source, which shows when the teacher is the bottleneck)
and ``checkpoint.pt`` at the end of every epoch (model, optimiser, the batch
order's and torch's RNG states, history). ``resume=True`` continues from it
and ends with exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

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


METRICS = ("epoch", "train_loss", "test_acc", "seconds", "samples_per_s", "source_wait_s")


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a kill mid-save leaves the previous checkpoint


def _write_metrics(run_dir: Path, history: list[dict]) -> None:
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRICS)
        w.writeheader()
        w.writerows(history)


def train_student(
    student: nn.Module,
    train: Dataset,
    test: Dataset,
    config: TrainConfig,
    *,
    source: SoftTargetSource | None = None,
    subset: torch.Tensor | None = None,
    on_epoch: Callable[[int, float, float], None] | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
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
    history: list[dict] = []
    start = 0
    ckpt_path = None
    if run_dir is not None:
        run = Path(run_dir)
        run.mkdir(parents=True, exist_ok=True)
        ckpt_path = run / "checkpoint.pt"
        effective = {
            **asdict(config),
            "dataset": train.dataset_id,
            "train_samples": len(subset),
            "source": None if source is None else source.name,
            "teacher_fingerprint": None if source is None else source.fingerprint,
        }
        if resume and ckpt_path.exists():
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            saved = json.loads((run / "config.json").read_text())
            if saved != json.loads(json.dumps(effective)):
                diff = sorted(k for k in effective if saved.get(k) != json.loads(json.dumps(effective)).get(k))
                raise ValueError(f"cannot resume {str(run)!r}: its config differs in {diff}")
            student.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            gen.set_state(ckpt["batch_rng"])
            torch.set_rng_state(ckpt["torch_rng"])
            history = list(ckpt["history"])
            start = int(ckpt["epoch"]) + 1
        else:
            (run / "config.json").write_text(json.dumps(effective, indent=2))
    bar = _progress(progress, config.epochs, start)
    t0 = time.perf_counter()
    for epoch in range(start, config.epochs):
        student.train()
        batches = _batches(train, subset, config, gen)
        pairs = (
            source.iter_targets(batches)
            if (source is not None and method.needs_teacher)
            else ((b, None) for b in batches)
        )
        total, n, wait = 0.0, 0, 0.0
        t_epoch = time.perf_counter()
        it = iter(pairs)
        while True:
            t_wait = time.perf_counter()
            try:
                (idx, x, y, _), teacher_logits = next(it)
            except StopIteration:
                break
            wait += time.perf_counter() - t_wait
            x, y = x.to(dev), y.to(dev)
            if teacher_logits is not None:
                teacher_logits = teacher_logits.to(dev)
            loss = method(student(x), teacher_logits, y, epoch=epoch, epochs=config.epochs, **config.method_options)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            n += len(idx)
        seconds = time.perf_counter() - t_epoch
        acc = accuracy(student, test, device=config.device)
        history.append(
            {"epoch": epoch, "train_loss": total / max(n, 1), "test_acc": acc, "seconds": round(seconds, 4),
             "samples_per_s": round(n / max(seconds, 1e-9), 1), "source_wait_s": round(wait, 4)}
        )  # fmt: skip
        if ckpt_path is not None:
            _save_checkpoint(ckpt_path, {
                "epoch": epoch, "model": student.state_dict(), "optimizer": opt.state_dict(),
                "batch_rng": gen.get_state(), "torch_rng": torch.get_rng_state(), "history": history,
            })  # fmt: skip
            _write_metrics(ckpt_path.parent, history)
        if bar is not None:
            bar.update(epoch, history[-1])
        if on_epoch is not None:
            on_epoch(epoch, history[-1]["train_loss"], acc)
    if bar is not None:
        bar.close()
    accs = [h["test_acc"] for h in history]
    return TrainResult(accs[-1], accs, [h["train_loss"] for h in history], time.perf_counter() - t0)


class _Bar:
    """A rich progress bar per epoch with samples/s and the seconds spent waiting for targets."""

    def __init__(self, epochs: int, start: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
        )  # fmt: skip
        self.progress.start()
        self.task = self.progress.add_task("epochs", total=epochs, completed=start, info="")

    def update(self, epoch: int, row: dict) -> None:
        info = (f"loss {row['train_loss']:.4f} acc {row['test_acc']:.4f} "
                f"{row['samples_per_s']:,.0f} samples/s, waited {row['source_wait_s']:.2f}s for targets")  # fmt: skip
        self.progress.update(self.task, completed=epoch + 1, info=info)

    def close(self) -> None:
        self.progress.stop()


def _progress(enabled: bool, epochs: int, start: int) -> _Bar | None:
    return _Bar(epochs, start) if enabled else None
