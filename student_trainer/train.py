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

Under ``torchrun`` (an initialised torch.distributed group) the student is
wrapped in DistributedDataParallel and every global batch is split across the
ranks; each rank asks its source only for its own samples (its part of the
cache, or its own stream to the server pool), and each rank's loss is weighted
by its share of the batch, so the update equals a single process's with the
same global batch. Only rank 0 writes the run directory.
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

from kd.core import reductions
from kd.core.data import Dataset, view_seeds
from kd.student_trainer.features import (
    LOGITS,
    Distilled,
    Match,
    PerLayer,
    feature_name,
    make_connector,
    probe_student_shapes,
)
from kd.student_trainer.losses import FeatureMethod, get_method
from kd.student_trainer.sources import Batch, SoftTargetSource


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
    # (kd.core.data.Dataset.views); a cache must hold the same views.
    views: int = 1
    # Feature methods: student layer(s) = teacher layer(s), e.g. "layer2=layer2"
    # (student_trainer.features.Match); empty: the method's default matches.
    matches: list[str] = field(default_factory=list)


@dataclass
class TrainResult:
    test_acc: float
    acc_per_epoch: list[float]
    loss_per_epoch: list[float]
    seconds: float
    # Feature methods: the trained connectors (one per match), saved beside the student.
    connectors: nn.Module | None = None


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


def world() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _my_part(batch: Batch, rank: int, size: int) -> Batch:
    """This rank's contiguous slice of a global batch (the last slices may be smaller)."""
    n = len(batch.indices)
    per = -(-n // size)
    sl = slice(min(rank * per, n), min((rank + 1) * per, n))
    views = None if batch.views is None else batch.views[sl]
    return Batch(batch.indices[sl], batch.inputs[sl], batch.labels[sl], views, n)


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a kill mid-save leaves the previous checkpoint


def _write_metrics(run_dir: Path, history: list[dict]) -> None:
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRICS)
        w.writeheader()
        w.writerows(history)


def same_class_partners(indices: torch.Tensor, labels: torch.Tensor, subset: torch.Tensor,
                        gen: torch.Generator) -> torch.Tensor:  # fmt: skip
    """For each sample, another sample of the same class from ``subset`` (itself only when
    its class has a single member), drawn with ``gen`` (CS-KD's pair sampler)."""
    subset_labels = labels[subset]
    out = torch.empty_like(indices)
    for k, i in enumerate(indices.tolist()):
        same = subset[subset_labels == labels[i]]
        others = same[same != i]
        pool = others if len(others) else same
        out[k] = pool[int(torch.randint(len(pool), (1,), generator=gen))]
    return out


def _with_partners(batch: Batch, train: Dataset, subset: torch.Tensor, gen: torch.Generator) -> Batch:
    if batch.views is not None:
        raise ValueError("pairs of samples (cskd) do not combine with augmented views yet")
    partners = same_class_partners(batch.indices, train.labels, subset, gen)
    idx = torch.cat([batch.indices, partners])
    return Batch(idx, train.inputs[idx], train.labels[idx])


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
    subset = torch.arange(len(train)) if subset is None else subset
    plan = None
    if isinstance(method, FeatureMethod):
        plan = _FeaturePlan(method, config, student, train, subset, source)
    elif config.matches:
        raise ValueError(f"method {config.method!r} works on logits; --match is for feature methods")
    trained: nn.Module = student if plan is None else plan.distilled
    trained.to(dev)
    rank, size = world()
    model: nn.Module = trained
    if size > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(trained, device_ids=[dev.index or 0] if dev.type == "cuda" else None)
    opt = torch.optim.Adam(trained.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    history: list[dict] = []
    start = 0
    ckpt_path = None
    if run_dir is not None and rank != 0:
        run_dir = None if not resume else run_dir  # only rank 0 writes; every rank may resume
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
            if plan is not None:
                plan.distilled.connectors.load_state_dict(ckpt["connectors"])
            opt.load_state_dict(ckpt["optimizer"])
            gen.set_state(ckpt["batch_rng"])
            torch.set_rng_state(ckpt["torch_rng"])
            history = list(ckpt["history"])
            start = int(ckpt["epoch"]) + 1
        elif rank == 0:
            (run / "config.json").write_text(json.dumps(effective, indent=2))
    if rank != 0:
        ckpt_path = None
    bar = _progress(progress and rank == 0, config.epochs, start)
    board = _tensorboard(ckpt_path.parent if ckpt_path is not None else None)
    t0 = time.perf_counter()
    for epoch in range(start, config.epochs):
        trained.train()
        batches = _batches(train, subset, config, gen)
        if method.pairs:
            # A list: all of the epoch's draws from ``gen`` happen in a fixed order.
            batches = iter([_with_partners(b, train, subset, gen) for b in batches])
        if size > 1:
            batches = (_my_part(b, rank, size) for b in batches)
        if plan is not None:
            pairs = source.iter_outputs(batches, plan.teacher_names)
        elif source is not None and method.needs_teacher:
            pairs = source.iter_targets(batches)
        else:
            pairs = ((b, None) for b in batches)
        total, n, wait = 0.0, 0, 0.0
        t_epoch = time.perf_counter()
        it = iter(pairs)
        while True:
            t_wait = time.perf_counter()
            try:
                batch, teacher_logits, *teacher_feats = next(it)
            except StopIteration:
                break
            idx, x, y = batch.indices, batch.inputs, batch.labels
            wait += time.perf_counter() - t_wait
            x, y = x.to(dev), y.to(dev)
            if teacher_logits is not None:
                teacher_logits = teacher_logits.to(dev)
            if not len(idx):
                loss = torch.zeros((), device=dev)
            elif plan is not None:
                loss = plan.loss(model, x, y, teacher_logits, teacher_feats[0], dev, epoch, config)
            else:
                loss = method(model(x), teacher_logits, y, epoch=epoch, epochs=config.epochs, **config.method_options)
            opt.zero_grad(set_to_none=True)
            # DDP averages gradients over ranks: weight this rank's mean by its share of the
            # global batch, so the update is the global batch's mean whatever the split.
            if size == 1:
                loss.backward()
            elif len(idx):
                (loss * (len(idx) * size / batch.global_size)).backward()
            else:  # a rank with no samples in a short last batch still joins the all-reduce
                out = model(x)
                (out[0] if isinstance(out, tuple) else out).sum().mul(0.0).backward()
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
                **({} if plan is None else {"connectors": plan.distilled.connectors.state_dict()}),
            })  # fmt: skip
            _write_metrics(ckpt_path.parent, history)
        if bar is not None:
            bar.update(epoch, history[-1])
        if board is not None:
            for key in METRICS[1:]:
                board.add_scalar(key, history[-1][key], epoch)
            board.flush()
        if on_epoch is not None:
            on_epoch(epoch, history[-1]["train_loss"], acc)
    if bar is not None:
        bar.close()
    if board is not None:
        board.close()
    accs = [h["test_acc"] for h in history]
    connectors = None if plan is None else plan.distilled.connectors
    return TrainResult(accs[-1], accs, [h["train_loss"] for h in history], time.perf_counter() - t0, connectors)


class _FeaturePlan:
    """What a feature method needs in the loop: the matches, the teacher feature names to
    ask the source for, and the student wrapped with its connectors (``Distilled``)."""

    def __init__(self, method: FeatureMethod, config: TrainConfig, student: nn.Module, train: Dataset,
                 subset: torch.Tensor, source: SoftTargetSource | None) -> None:  # fmt: skip
        if source is None:
            raise ValueError(f"feature method {method.name!r} needs a teacher source (server:, cache: or local:)")
        method.check_options(config.method_options)
        texts = config.matches or list(method.default_matches)
        if not texts:
            raise ValueError(f"method {method.name!r} matches student layers to teacher layers: give --match S=T")
        self.method = method
        self.options = dict(config.method_options)
        self.matches = [Match.parse(t) for t in texts]
        for m in self.matches:
            if len(m.student) != method.layers:
                raise ValueError(f"method {method.name!r} takes {method.layers} layer(s) per side, match {m.text!r}")
        self.at_source = config.method_options.get("teacher_reduce", "source") == "source"
        # The teacher layer "logits" is the teacher's output: it comes with every reply, and
        # any statistic of it is computed here.
        names = []
        for m in self.matches:
            if LOGITS in m.teacher:
                continue
            if self.at_source:
                names.append(self._name(m.teacher))
            else:
                names.extend(m.teacher)
        self.teacher_names = list(dict.fromkeys(names))
        connectors: list[nn.Module] = [nn.Identity() for _ in self.matches]
        if method.connector is not None:
            # Shapes of both sides from one small probe: a connector maps the student's full
            # map to the teacher's full map (the statistic, if any, is taken after it).
            idx = subset[:2]
            views = torch.zeros(len(idx), dtype=torch.long) if config.views > 1 else None
            x = train.inputs[idx] if views is None else train.views(idx, view_seeds(idx, views, config.views))
            s_shapes = probe_student_shapes(student, x, [layer for m in self.matches for layer in m.student])
            t_shapes = self._teacher_shapes(source, Batch(idx, x, train.labels[idx], views), s_shapes)
            connectors = []
            for i, m in enumerate(self.matches):
                made = [make_connector(method.connector, s_shapes[s], t_shapes[i, k]) for k, s in enumerate(m.student)]
                connectors.append(made[0] if len(made) == 1 else PerLayer(made))
        self.distilled = Distilled(student, self.matches, connectors)

    def _name(self, layers) -> str:
        return feature_name(layers, self.method.reduce, {**self.method.own_defaults, **self.options})

    def _teacher_shapes(self, source: SoftTargetSource, probe: Batch,
                        s_shapes: dict[str, tuple[int, ...]]) -> dict[tuple[int, int], tuple[int, ...]]:  # fmt: skip
        """Per-sample shape of each teacher layer of each match, (match, layer) -> shape: the full
        map where the source can give it (server, local teacher, a cache storing it), else what
        the feature the method asks for tells (an FSP matrix [C1, C2] tells both widths)."""
        full = [layer for m in self.matches for layer in m.teacher if layer != LOGITS]
        try:
            _, logits, feats = next(iter(source.iter_outputs([probe], list(dict.fromkeys(full)))))
        except ValueError:
            _, logits, feats = next(iter(source.iter_outputs([probe], self.teacher_names)))
            asked = self._teacher_side(feats, logits)
            shapes = {}
            for i, m in enumerate(self.matches):
                got = tuple(asked[i].shape[1:])
                for k, s in enumerate(m.student):
                    fsp = self.method.reduce is not None and self.method.reduce.startswith("fsp")
                    # a teacher map of this width at the student's spatial size
                    shapes[i, k] = (got[k], *s_shapes[s][1:]) if fsp else got
            return shapes
        feats = {**feats, LOGITS: logits}
        return {(i, k): tuple(feats[layer].shape[1:]) for i, m in enumerate(self.matches)
                for k, layer in enumerate(m.teacher)}  # fmt: skip

    def _teacher_side(self, feats: dict[str, torch.Tensor], logits) -> list[torch.Tensor]:
        out = []
        for m in self.matches:
            name = self._name(m.teacher)
            if LOGITS in m.teacher:
                if not isinstance(logits, torch.Tensor):
                    raise ValueError(f"match {m.text!r} needs the teacher's dense logits; the source gave sparse ones")
                out.append(reductions.reduce(name, {**feats, LOGITS: logits}))
            elif self.at_source:
                out.append(feats[name])
            else:
                out.append(reductions.reduce(name, feats))
        return out

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, teacher_logits, teacher_feats: dict,
             dev: torch.device, epoch: int, config: TrainConfig) -> torch.Tensor:  # fmt: skip
        if isinstance(teacher_logits, torch.Tensor) and teacher_logits.is_inference():
            teacher_logits = teacher_logits.clone()  # an in-process teacher's: usable in autograd
        t_list = [t.to(dev) for t in self._teacher_side(teacher_feats, teacher_logits)]
        t_list = [t.clone() if t.is_inference() else t for t in t_list]
        logits, connected, maps = model(x, t_list)
        s_list = []
        for m, f in zip(self.matches, connected):
            if self.method.reduce is not None:
                f = reductions.reduce(self._name(m.student), {**maps, m.student[0]: f})
            s_list.append(f)
        return self.method.objective(logits, teacher_logits, y, s_list, t_list, epoch=epoch, epochs=config.epochs,
                                     **config.method_options)  # fmt: skip


def _tensorboard(run_dir: Path | None):
    """A SummaryWriter on RUN_DIR/tensorboard when a run directory is set and tensorboard is installed."""
    if run_dir is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional: metrics.csv has the same numbers
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


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
