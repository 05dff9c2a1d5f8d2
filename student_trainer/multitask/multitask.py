"""Knowledge distillation for multi-task learning (Li & Bilen 2020, "Knowledge Distillation for
Multi-task Learning", ECCV workshops, arXiv 2007.06889).

One single-task teacher per task is trained first and frozen. The multi-task student (one shared
encoder, one head per task) then minimises its task losses plus, per task, the distance between
its shared feature passed through a small task-specific *adaptor* and that task's teacher feature:

    loss = sum_t w_t * L_t(student_t(x), y_t)
         + sum_t lambda_t * mean_{b,h,w} || n(A_t(f_s)) - n(f_t) ||^2_channels,
    n(f) = f / sqrt(sum_c f_c^2 + 1e-6)     (L2 over the channels at every position)

Checked against the authors' released code (its NYU-v2 SegNet training script, read through kd's
code search, which did not name the repository; a later variant of the script by the same authors
does the same with ``F.normalize``): the adaptor is a 1x1
convolution without bias, Xavier-normal initialised; both features are L2-normalised over the
channel dimension with ``+1e-6`` inside the square root; the distance is the squared difference
summed over channels and averaged over batch and positions; the teacher feature is detached;
task weights are uniform (1) and the distillation weights ``lambda = [1, 1, 2]`` for
(segmentation, depth, normals); the student trains with Adam (1e-4 there) and the adaptors with
their own Adam (lr 0.1, weight decay 5e-4). Differences here: the tasks are kd's digits tasks
below; the code aligns two SegNet layers per task, kd aligns the one shared encoder map; kd's
default ``lambda`` is 1 for every task and the rates are tuned for the tiny CNN (``lr`` 3e-3,
``adaptor_lr`` 1e-2; the code's 0.1 is an option), both on one cosine schedule (the code halves
the student's rate every 100 of 200 epochs and keeps the adaptors' constant).

Multi-teacher sources, each teacher answering a different task: a teacher is any callable
``x -> feature map`` -- the frozen in-process module, or ``ServedTeacher``, which asks a kd teacher
server (``kd serve`` of ``kd.student_trainer.multitask.nets:<task>_teacher@WEIGHTS``) for the
teacher's ``encoder`` feature over gRPC; ``run(served=True)`` serves the trained teachers from a
real in-process server on loopback, one teacher per task, and trains the KD-MTL student from it.

Tasks kd makes from the digits (no download): ``digit`` (10-way, CE), ``large`` (digit >= 5,
2-way, CE) and ``ink`` (the image's mean intensity, standardised with the train split's
statistics, MSE).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kd.core.data import load_dataset
from kd.student_trainer import optim
from kd.student_trainer.multitask.nets import MultiHead
from kd.teacher_server.client import TeacherClient
from kd.teacher_server.loading import load_teacher, save_weights
from kd.teacher_server.server import start_server

# task -> (outputs, kind): "class" tasks train with CE and report accuracy, "regress" with MSE / RMSE
TASKS: dict[str, tuple[int, str]] = {"digit": (10, "class"), "large": (2, "class"), "ink": (1, "regress")}
EPS = 1e-6  # inside the square root of the channel norm, as the authors' code

Teacher = Callable[[torch.Tensor], torch.Tensor]  # x -> the teacher's feature map [B, C, 8, 8]


class ServedTeacher:
    """A task's teacher behind a kd teacher server: its ``layer`` output, asked for by name
    (features only, no logits), on the device of the inputs."""

    def __init__(self, client: TeacherClient, name: str, layer: str = "encoder") -> None:
        self.client, self.name, self.layer = client, name, layer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.client.infer(self.name, x.detach().cpu().float(), logits=False, features=[self.layer])
        return out[f"feature/{self.layer}"].to(x.device, x.dtype)


@contextmanager
def serve_teachers(teachers: dict[str, MultiHead], directory: Path) -> Iterator[dict[str, ServedTeacher]]:
    """Save every task's teacher as safetensors, load each as ``kd serve`` would (its
    ``nets:<task>_teacher`` factory and the weights), serve them all from one real gRPC server
    on 127.0.0.1 and yield a ``ServedTeacher`` per task; the server stops on exit."""
    loaded = []
    for t, m in teachers.items():
        if m.encoder.out_channels != 32:
            raise ValueError("served teachers use the factories' width 16 (teacher_width=16)")
        path = save_weights(m, directory / f"teacher-{t}.safetensors")
        loaded.append(load_teacher(t, f"kd.student_trainer.multitask.nets:{t}_teacher@{path}"))
    running = start_server(loaded, port=0)
    client = TeacherClient(f"127.0.0.1:{running.port}")
    try:
        yield {t: ServedTeacher(client, t) for t in teachers}
    finally:
        client.close()
        running.stop(grace=1)


@dataclass(frozen=True)
class InkStats:
    """Mean and standard deviation of the train split's mean intensity (the ``ink`` target's scale)."""

    mean: float
    std: float

    @staticmethod
    def of(x: torch.Tensor) -> InkStats:
        ink = x.reshape(x.shape[0], -1).mean(1)
        return InkStats(float(ink.mean()), float(ink.std()))


def task_targets(x: torch.Tensor, y: torch.Tensor, stats: InkStats) -> dict[str, torch.Tensor]:
    """Every task's target for images ``x`` with digit labels ``y``."""
    ink = (x.reshape(x.shape[0], -1).mean(1) - stats.mean) / stats.std
    return {"digit": y, "large": (y >= 5).long(), "ink": ink}


def task_loss(task: str, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if TASKS[task][1] == "class":
        return F.cross_entropy(out, target)
    return F.mse_loss(out.squeeze(1), target.to(out.dtype))


def normalise(f: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``f / sqrt(sum_c f^2 + eps)`` over the channel dimension (dim 1) at every position."""
    return f / (f.pow(2).sum(1, keepdim=True) + eps).sqrt()


def feature_distance(adapted: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Squared distance of the normalised maps, summed over channels, mean over batch and positions."""
    if adapted.shape != teacher.shape:
        raise ValueError(f"adapted student feature {tuple(adapted.shape)} != teacher feature {tuple(teacher.shape)}")
    return (normalise(adapted) - normalise(teacher.detach())).pow(2).sum(1).mean()


def make_adaptor(student_channels: int, teacher_channels: int) -> nn.Conv2d:
    """A 1x1 convolution without bias, Xavier-normal initialised (the authors' ``transformer``)."""
    conv = nn.Conv2d(student_channels, teacher_channels, 1, bias=False)
    nn.init.xavier_normal_(conv.weight)
    return conv


def kdmtl_loss(outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], student_feature: torch.Tensor,
               teacher_features: dict[str, torch.Tensor], adaptors: nn.ModuleDict,
               task_weights: dict[str, float], dist_weights: dict[str, float]) -> dict[str, torch.Tensor]:  # fmt: skip
    """``{"loss": total, "task/<t>": L_t, "dist/<t>": D_t}`` (the terms unweighted, the total weighted).

    Tasks without a teacher feature contribute their task loss only (plain multi-task learning
    when ``teacher_features`` is empty)."""
    parts: dict[str, torch.Tensor] = {}
    total = student_feature.new_zeros(())
    for t, out in outputs.items():
        parts[f"task/{t}"] = task_loss(t, out, targets[t])
        total = total + task_weights.get(t, 1.0) * parts[f"task/{t}"]
    for t, ft in teacher_features.items():
        parts[f"dist/{t}"] = feature_distance(adaptors[t](student_feature), ft)
        total = total + dist_weights.get(t, 1.0) * parts[f"dist/{t}"]
    return {"loss": total, **parts}


@dataclass
class MultiTaskConfig:
    tasks: list[str] = field(default_factory=lambda: ["digit", "large", "ink"])
    teacher_width: int = 16
    student_width: int = 16
    teacher_epochs: int = 30
    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    adaptor_lr: float = 1e-2
    adaptor_weight_decay: float = 5e-4  # the authors' code
    schedule: str = "cosine"  # or "constant"; the adaptors' rate follows the same factor
    task_weights: dict[str, float] = field(default_factory=dict)  # default 1 per task
    dist_weights: dict[str, float] = field(default_factory=dict)  # lambda_t, default 1 per task
    seeds: int = 1
    seed: int = 0
    device: str = "cpu"
    served: bool = False  # KD-MTL asks a real loopback teacher server for the teachers' features

    def validate(self) -> None:
        if self.served and self.teacher_width != 16:
            raise ValueError("served teachers are built by the width-16 factories: teacher_width must be 16")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or len(self.tasks) < 2 or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be >= 2 distinct of {sorted(TASKS)}, got {self.tasks}")
        for name in ("teacher_width", "student_width", "batch_size", "seeds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs < 0 or self.teacher_epochs < 0:
            raise ValueError("epochs and teacher_epochs must be >= 0")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be cosine or constant, got {self.schedule!r}")
        rates = (self.lr, self.adaptor_lr, self.adaptor_weight_decay)
        if not (all(math.isfinite(v) for v in rates) and self.lr > 0 and self.adaptor_lr > 0
                and self.adaptor_weight_decay >= 0):  # fmt: skip
            raise ValueError(f"lr and adaptor_lr must be finite numbers > 0, adaptor_weight_decay >= 0, got {rates}")
        for name in ("task_weights", "dist_weights"):
            for t, w in getattr(self, name).items():
                if t not in self.tasks or not (math.isfinite(w) and w >= 0):
                    raise ValueError(f"{name}: {t}={w} names no task of this run or is not a finite number >= 0")


@torch.no_grad()
def evaluate(model: MultiHead, x: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per task: accuracy (class tasks) or RMSE (regression), for the tasks ``model`` has heads for."""
    model.eval()
    outs = model(x)
    res = {}
    for t, out in outs.items():
        if TASKS[t][1] == "class":
            res[t] = float((out.argmax(1) == targets[t]).float().mean())
        else:
            res[t] = float((out.squeeze(1) - targets[t]).pow(2).mean().sqrt())
    return res


def relative_gain(metrics: dict[str, float], reference: dict[str, float]) -> float:
    """The paper's Delta_MTL in %: mean over tasks of the relative gain over the single-task models
    (accuracy: higher is better; RMSE: lower is better)."""
    gains = []
    for t, m in metrics.items():
        sign = 1.0 if TASKS[t][1] == "class" else -1.0
        gains.append(sign * (m - reference[t]) / reference[t])
    return 100.0 * sum(gains) / len(gains)


def train_multitask(model: MultiHead, x: torch.Tensor, targets: dict[str, torch.Tensor], config: MultiTaskConfig,
                    *, epochs: int, seed: int, teachers: dict[str, Teacher] | None = None,
                    adaptors: nn.ModuleDict | None = None) -> list[float]:  # fmt: skip
    """Train ``model`` (its heads' tasks) in place; with ``teachers`` and ``adaptors`` also the
    feature distillation term, the adaptors trained by their own optimiser. Loss per epoch."""
    teachers = teachers or {}
    if teachers and (adaptors is None or set(teachers) - set(adaptors)):
        raise ValueError("every teacher needs an adaptor")
    recipe = optim.Recipe(lr=config.lr, schedule=config.schedule)
    opt = optim.make_optimizer(model.parameters(), recipe)
    steps = -(-len(x) // config.batch_size)
    a_opt = None
    if teachers:
        a_opt = torch.optim.Adam(adaptors.parameters(), lr=config.adaptor_lr, weight_decay=config.adaptor_weight_decay)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(epochs):
        model.train()
        total = 0.0
        order = torch.randperm(len(x), generator=gen)
        for step, s in enumerate(range(0, len(x), config.batch_size)):
            factor = optim.lr_factor(recipe, epoch, step, steps, epochs)
            optim.set_lr(opt, config.lr * factor)
            if a_opt is not None:
                optim.set_lr(a_opt, config.adaptor_lr * factor)
            idx = order[s : s + config.batch_size].to(x.device)
            xb = x[idx]
            outs, fs = model(xb, features=True)
            with torch.no_grad():
                tfeats = {t: teacher(xb) for t, teacher in teachers.items()}
            loss = kdmtl_loss(outs, {t: v[idx] for t, v in targets.items()}, fs, tfeats, adaptors or nn.ModuleDict(),
                              config.task_weights, config.dist_weights)["loss"]  # fmt: skip
            opt.zero_grad(set_to_none=True)
            if a_opt is not None:
                a_opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if a_opt is not None:
                a_opt.step()
            total += float(loss.detach()) * len(idx)
        history.append(total / len(x))
    return history


def _data(device: torch.device) -> tuple[torch.Tensor, dict, torch.Tensor, dict]:
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    stats = InkStats.of(train.inputs)
    xs = train.inputs.to(device), test.inputs.to(device)
    return (xs[0], task_targets(xs[0], train.labels.to(device), stats),
            xs[1], task_targets(xs[1], test.labels.to(device), stats))  # fmt: skip


def train_teachers(config: MultiTaskConfig, x: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, MultiHead]:
    """One single-task model per task, trained and frozen."""
    dev = x.device
    teachers = {}
    for i, t in enumerate(config.tasks):
        torch.manual_seed(config.seed * 100 + i)
        m = MultiHead({t: TASKS[t][0]}, config.teacher_width).to(dev)
        train_multitask(m, x, targets, config, epochs=config.teacher_epochs, seed=config.seed * 100 + i)
        teachers[t] = m.eval().requires_grad_(False)
    return teachers


def run(config: MultiTaskConfig) -> dict:
    """Single-task teachers, then per seed a plain multi-task student and a KD-MTL student from the
    same initialisation and batch order; per-task test metrics and Delta_MTL against the teachers."""
    config.validate()
    t0 = time.perf_counter()
    dev = torch.device(config.device)
    x, targets, xt, targets_t = _data(dev)
    teachers = train_teachers(config, x, targets)
    single = {t: evaluate(m, xt, targets_t)[t] for t, m in teachers.items()}
    out: dict = {"config": asdict(config), "single_task": single,
                 "metrics": {t: "accuracy" if TASKS[t][1] == "class" else "rmse" for t in config.tasks}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        if config.served:
            with serve_teachers(teachers, Path(tmp)) as served:
                _students(config, x, targets, xt, targets_t, teachers, served, single, out)
        else:
            _students(config, x, targets, xt, targets_t, teachers, None, single, out)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def _students(config: MultiTaskConfig, x: torch.Tensor, targets: dict, xt: torch.Tensor, targets_t: dict,
              teachers: dict[str, MultiHead], served: dict[str, ServedTeacher] | None, single: dict,
              out: dict) -> None:  # fmt: skip
    dev = x.device
    heads = {t: TASKS[t][0] for t in config.tasks}
    for name in ("mtl", "kdmtl"):
        per_seed = []
        for s in range(config.seeds):
            torch.manual_seed(10_000 + s)  # the same student initialisation for both
            student = MultiHead(heads, config.student_width).to(dev)
            adaptors = nn.ModuleDict({t: make_adaptor(student.encoder.out_channels, m.encoder.out_channels)
                                      for t, m in teachers.items()}).to(dev)  # fmt: skip
            feats = (served or {t: m.encoder for t, m in teachers.items()}) if name == "kdmtl" else None
            train_multitask(student, x, targets, config, epochs=config.epochs, seed=s, teachers=feats,
                            adaptors=adaptors)  # fmt: skip
            per_seed.append(evaluate(student, xt, targets_t))
        mean = {t: sum(m[t] for m in per_seed) / len(per_seed) for t in config.tasks}
        out[name] = {"per_seed": per_seed, "mean": mean, "delta_mtl": relative_gain(mean, single),
                     "delta_mtl_per_seed": [relative_gain(m, single) for m in per_seed]}  # fmt: skip
    out["params"] = {"student": sum(p.numel() for p in student.parameters()),
                     "teachers": sum(p.numel() for m in teachers.values() for p in m.parameters()),
                     "adaptors": sum(p.numel() for p in adaptors.parameters())}  # fmt: skip
