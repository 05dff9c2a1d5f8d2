"""``kd bench methods``: every registered KD method on the demo's setting, side by side.

The setting is ``kd demo``'s: a ``digits_teacher`` trained with CE on the whole
digits training split (Adam, lr 1e-3, batch 64), and the small ``digits_student``
trained on a seeded subset of 100 labelled training samples for 300 epochs, over
3 seeds. The teacher's targets are precomputed once into an fp32 cache
(``kd.precompute.precompute`` with a ``LocalSource``), so every method that
needs a teacher reads the very same logits; methods without a teacher get no
source. Per seed, every method uses the same subset, the same initialisation
and the same batch order (``seed_everything(seed)``, ``TrainConfig(seed=seed)``).

Methods are taken from ``student_trainer.losses.METHODS`` (a newly registered
method is benchmarked automatically), each with its registered defaults
(``Method.defaults``; ``OVERRIDES`` is empty). Many defaults come from CIFAR or
ImageNet schedules; ``NOTES`` says, per method, what they mean on 300 epochs of
10 classes here. A method that raises is recorded with its error and skipped,
not retried with other options.

``tfkd-self`` (Teacher-free KD, self-training) needs a pretrained copy of the
student as its teacher: for each seed that is the CE baseline student of the
same seed (trained with CE on the same subset, same budget), run in-process
through a ``LocalSource``.

The accuracies are what they are on this small task; a method below plain KD is
not wrong if its loss matches its formula (``tests/test_losses*.py`` check that).
"""

from __future__ import annotations

import math
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from kd.data import Dataset, load_dataset
from kd.demo import train_digits_teacher
from kd.models import digits_student
from kd.precompute import precompute
from student_trainer.losses import METHODS, get_method
from student_trainer.sources import CacheSource, LocalSource, SoftTargetSource
from student_trainer.train import TrainConfig, seed_everything, train_student
from teacher_server.loading import load_teacher, save_weights

console = Console(stderr=True)

# The references every other method is compared with (always run).
BASELINES = ("ce", "kd")
# Options passed instead of a method's registered defaults (none: the defaults are benchmarked).
OVERRIDES: dict[str, dict[str, object]] = {}
# What the registered defaults mean here (300 epochs, 10 classes, 100 labelled samples).
NOTES: dict[str, str] = {
    "ce": "no teacher; the baseline",
    "kd": "Hinton KD, T = 4, alpha = 0.9 (the reference)",
    "dkd": "warmup = 20 epochs (mdistiller's CIFAR-100, 240 epochs): full KD weight from epoch 20 on",
    "eskd": "stop_fraction = 0.5 of the run's epochs: KD for the first half, then CE only",
    "gkd": "EDT decay 0.9 every round(0.3 * epochs) epochs (a fraction of the run); T = 1, kd_weight = 1 "
    "(ImageNet config; its CIFAR config uses kd_weight = 0.1)",
    "tfkd-self": "teacher = the CE baseline student of the same seed; m = 50 is tuned for C = 100 "
    "(KL 'mean' over classes): at C = 10 the soft term is 10x its CIFAR-100 strength (m = 5 would match it)",
    "tfkd-reg": "no teacher (a designed distribution); m = 100 is tuned for C = 100: at C = 10 the soft "
    "term is 10x its CIFAR-100 strength (m = 10 would match it); T = 20",
    "dist": "schedule-free; beta = gamma = T = 1 (the paper's)",
    "ka-dtd": "schedule-free; flsw, beta = gamma = 1",
    "noisy": "schedule-free; noise from torch's global RNG (seeded per run)",
    "spherical": "schedule-free; T = 4, m = 2 (ImageNet command line)",
}


@dataclass
class MethodsBenchSettings:
    quick: bool = False
    seeds: int = 3
    epochs: int = 300  # student epochs on the labelled subset
    labeled: int = 100
    teacher_epochs: int = 40
    threads: int = 2  # torch threads (the demo's min(2, default)); 0: torch's default
    methods: tuple[str, ...] = ()  # empty: every registered method

    @classmethod
    def make(cls, quick: bool = False, **overrides: Any) -> MethodsBenchSettings:
        base = cls()
        if quick:
            base = replace(base, quick=True, seeds=1, epochs=10, teacher_epochs=3)
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def selected_methods(names: tuple[str, ...] | list[str]) -> list[str]:
    """The baselines first, then the chosen methods (all registered ones if none) in registry order."""
    for name in names:
        get_method(name)  # ValueError for an unknown name
    chosen = set(names) if names else set(METHODS)
    return list(BASELINES) + [m for m in METHODS if m in chosen and m not in BASELINES]


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs)


def _std(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _subset(train: Dataset, s: MethodsBenchSettings, seed: int) -> torch.Tensor:
    # The demo's subsets: seed 1000 + seed, the first `labeled` of a permutation.
    return torch.randperm(len(train), generator=torch.Generator().manual_seed(1000 + seed))[: s.labeled]


def run_bench(s: MethodsBenchSettings) -> dict[str, Any]:

    t_start = time.perf_counter()
    if s.threads:
        torch.set_num_threads(s.threads)
    names = selected_methods(s.methods)
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    results: dict[str, Any] = {"methods": {}}
    with tempfile.TemporaryDirectory(prefix="kd-bench-methods-") as tmp:
        root = Path(tmp)
        teacher, teacher_acc = train_digits_teacher(train, test, root / "digits-teacher.safetensors",
                                                    epochs=s.teacher_epochs)  # fmt: skip
        console.print(f"digits teacher: test acc {teacher_acc:.4f} ({s.teacher_epochs} epochs)",
                      highlight=False)  # fmt: skip
        rep = precompute(train, LocalSource(teacher), root / "cache-fp32", codec="fp32", progress=False)
        cache = CacheSource(str(rep.path), teacher_fingerprint=teacher.fingerprint, dataset_id=train.dataset_id)

        ce_students: dict[int, Path] = {}  # seed -> CE student weights (tfkd-self's teachers)
        self_teacher_acc: list[float] = []
        for name in names:
            method = get_method(name)
            options = {**method.defaults, **OVERRIDES.get(name, {})}
            row: dict[str, Any] = {
                "paper": method.paper,
                "needs_teacher": method.needs_teacher,
                "options": options,
                "schedule_args": sorted(method.schedule_args),
                "note": NOTES.get(
                    name,
                    "takes " + ", ".join(sorted(method.schedule_args)) if method.schedule_args else "schedule-free",
                ),  # fmt: skip
                "source": None,
                "acc_per_seed": [],
                "seconds_per_seed": [],
            }
            if name == "tfkd-self":
                row["source"] = "local: the CE baseline student of the same seed"
            elif method.needs_teacher:
                row["source"] = "cache: fp32, digits_teacher"
            try:
                for seed in range(s.seeds):
                    source: SoftTargetSource | None = None
                    if name == "tfkd-self":
                        own = load_teacher(f"self-{seed}", f"kd.models:digits_student@{ce_students[seed]}")
                        source = LocalSource(own)
                    elif method.needs_teacher:
                        source = cache
                    seed_everything(seed)
                    student = digits_student()
                    config = TrainConfig(method=name, method_options=dict(options), epochs=s.epochs, seed=seed)
                    r = train_student(student, train, test, config, source=source, subset=_subset(train, s, seed))
                    if not math.isfinite(r.test_acc):
                        raise RuntimeError(f"non-finite accuracy {r.test_acc}")
                    row["acc_per_seed"].append(r.test_acc)
                    row["seconds_per_seed"].append(round(r.seconds, 3))
                    if name == "ce":
                        ce_students[seed] = root / f"ce-student-{seed}.safetensors"
                        save_weights(student, ce_students[seed])
                        self_teacher_acc.append(r.test_acc)
            except Exception as e:  # noqa: BLE001 - recorded: the bench goes on with the other methods
                if name in BASELINES:
                    raise
                row.update(acc_mean=None, acc_std=None, seconds=round(sum(row["seconds_per_seed"]), 2),
                           skipped=f"{type(e).__name__}: {e}")  # fmt: skip
                console.print(f"  {name:10s} skipped: {row['skipped']}", highlight=False)
                results["methods"][name] = row
                continue
            accs = row["acc_per_seed"]
            row.update(acc_mean=_mean(accs), acc_std=_std(accs), seconds=round(sum(row["seconds_per_seed"]), 2))
            for ref in BASELINES:
                ref_accs = results["methods"].get(ref, row)["acc_per_seed"]
                deltas = [a - b for a, b in zip(accs, ref_accs)]
                row[f"delta_vs_{ref}_mean"] = _mean(deltas)
                row[f"delta_vs_{ref}_std"] = _std(deltas)
            if name == "tfkd-self":
                row["self_teacher_acc_per_seed"] = list(self_teacher_acc)
            results["methods"][name] = row
            console.print(f"  {name:10s} acc {row['acc_mean']:.4f} ± {row['acc_std']:.4f} "
                          f"({row['seconds']:.1f}s)", highlight=False)  # fmt: skip

    ms = results["methods"]
    results.update(
        ce={k: ms["ce"][k] for k in ("acc_mean", "acc_std", "acc_per_seed", "seconds")},
        kd={k: ms["kd"][k] for k in ("acc_mean", "acc_std", "acc_per_seed", "seconds", "options")},
        teacher_acc=teacher_acc,
        settings={
            **asdict(s),
            "methods": names,
            "torch_threads": torch.get_num_threads(),
            "student": "kd.models:digits_student",
            "teacher": "kd.models:digits_teacher",
            "student_params": sum(p.numel() for p in digits_student().parameters()),
            "teacher_params": sum(p.numel() for p in teacher.model.parameters()),
            "student_lr": TrainConfig.lr,
            "student_batch_size": TrainConfig.batch_size,
            "cache_codec": "fp32",
            "subset_seeds": [1000 + seed for seed in range(s.seeds)],
            "overrides": OVERRIDES,
        },
        versions={"python": platform.python_version(), "torch": torch.__version__},
        seconds=round(time.perf_counter() - t_start, 1),
    )
    return results


def print_report(r: dict[str, Any], out: Console | None = None) -> None:
    if out is None:
        out = Console()
        if not out.is_terminal:
            out = Console(width=200)
    s = r["settings"]
    t = Table(
        title=f"kd bench methods: digits_student ({s['student_params']} params) on {s['labeled']} labelled samples, "
        f"{s['epochs']} epochs, {s['seeds']} seed(s); teacher {r['teacher_acc']:.4f} "
        f"({s['teacher_params']} params, fp32 cache); registered defaults"
    )
    for col in ("#", "method", "test acc (mean ± std)", "per seed", "vs KD", "vs CE", "s", "options", "note"):
        t.add_column(col, justify="left" if col in ("method", "options", "note", "per seed") else "right")
    done = sorted(((n, m) for n, m in r["methods"].items() if m["acc_mean"] is not None),
                  key=lambda nm: -nm[1]["acc_mean"])  # fmt: skip
    for rank, (name, m) in enumerate(done, 1):
        style = {"ce": "bold yellow", "kd": "bold cyan"}.get(name)

        def delta(ref: str, m: dict[str, Any] = m, name: str = name) -> str:
            if name == ref:
                return "-"
            return f"{m[f'delta_vs_{ref}_mean']:+.4f} ± {m[f'delta_vs_{ref}_std']:.4f}"

        opts = ", ".join(f"{k}={v}" for k, v in m["options"].items()) or "-"
        t.add_row(
            str(rank),
            name,
            f"{m['acc_mean']:.4f} ± {m['acc_std']:.4f}",
            " ".join(f"{a:.3f}" for a in m["acc_per_seed"]),
            delta("kd"),
            delta("ce"),
            f"{m['seconds']:.1f}",
            opts,
            m["note"],
            style=style,
        )
    for name, m in r["methods"].items():
        if m["acc_mean"] is None:
            t.add_row("-", name, "skipped", "", "", "", f"{m['seconds']:.1f}", "", m["skipped"], style="dim")
    out.print(t)
    out.print(
        "vs KD / vs CE: mean ± std over seeds of the paired difference (same seed, subset, init and batch order). "
        "The accuracies are what they are on this small task; a method below KD is not wrong if its loss "
        "matches its formula.",
        highlight=False,
    )
    out.print(f"{r['seconds']:.1f}s total", highlight=False)
