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
10 classes here. A method that raises is recorded with its error as failed (the
bench goes on with the others, lists every failure in ``failed`` and ``kd bench
methods`` exits 1), not retried with other options.

``tfkd-self`` (Teacher-free KD, self-training) needs a pretrained copy of the
student as its teacher: for each seed that is the CE baseline student of the
same seed (trained with CE on the same subset, same budget), run in-process
through a ``LocalSource``.

Feature methods (``kind == "feature"``) need maps to match, so they run in a second
section on a CNN pair: ``digits_cnn`` (DigitsCNN width 32, BatchNorm) as the teacher and
``digits_cnn_student`` (width 8) on the same labelled subsets, next to CE and KD on that
pair. Their teacher features come from one cache too: precomputed once with every
feature any method asks for, stored as each method asks for it (``layer2@at`` is 64
values per sample, not the 64x8x8 map), and the table reports the bytes per sample of
each method's feature targets. ``FEATURE_MATCHES`` gives each method's layer matches;
methods whose statistic relates the samples of a batch (``sp``, ``cckd``) cannot be
cached per sample, so they read the full map and reduce it in the trainer.

Online methods (``kd.student_trainer.online``: the teachers train together with the
students; ``hes`` and ``dist-plus`` also take the pretrained ``digits_cnn`` teacher, a
fresh copy per seed) run in a third section on the same CNN pair: each method
with ``branches=3, width=8`` (one branch path of width 8 is exactly ``digits_cnn_student``),
on the same labelled subsets and seeds, next to CE and KD (from the same ``digits_cnn``
teacher, in process) trained for the same ``online_epochs``. Each method reports the head it
deploys (``ONLINE_HEADS``: a single network, comparable with the CE and KD students), the best
single head (picked on the test set: optimistic) and its ensemble.

The accuracies are what they are on this small task; a method below plain KD is
not wrong if its loss matches its formula (``tests/test_losses*.py`` and
``tests/test_feature_losses_*.py`` check that).
"""

from __future__ import annotations

import copy
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

from kd.bench import report_console
from kd.core import reductions
from kd.core.data import Dataset, load_dataset
from kd.demo import train_digits_teacher
from kd.models import digits_cnn, digits_cnn_student, digits_student
from kd.precompute import precompute
from kd.student_trainer.features import LOGITS, Match, feature_name
from kd.student_trainer.losses import METHODS, FeatureMethod, get_method
from kd.student_trainer.online import METHODS as ONLINE_METHODS
from kd.student_trainer.online import method_options, train_online
from kd.student_trainer.sources import CacheSource, LocalSource, SoftTargetSource
from kd.student_trainer.train import TrainConfig, seed_everything, train_student
from kd.teacher_server.loading import load_teacher, save_weights

console = Console(stderr=True, soft_wrap=True)  # each line whole in a log, as kd.cli's

# The references every other method is compared with (always run).
BASELINES = ("ce", "kd")
# Options passed instead of a method's registered defaults (none: the defaults are benchmarked).
OVERRIDES: dict[str, dict[str, object]] = {"crd": {"nce_k": 1024}}
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


# Layer matches of each feature method on the CNN pair (DigitsCNN: layer1 [C, 8, 8], layer2 [2C, 8, 8],
# pool [2C, 1, 1], head = logits).
FEATURE_MATCHES: dict[str, tuple[str, ...]] = {
    "at": ("layer1=layer1", "layer2=layer2"),
    "fitnet": ("layer2=layer2",),
    "fsp": ("layer1,layer2=layer1,layer2",),
    "nst": ("layer2=layer2",),
    "sp": ("layer2=layer2",),
    "cckd": ("pool=pool",),
    "adain": ("layer2=layer2",),
    "rkd": ("pool=pool",),
    "pkt": ("pool=pool",),
    "cd": ("layer1=layer1", "layer2=layer2"),
    "mimic": ("pool=pool",),
    "mgd": ("layer2=layer2",),
    "kp": ("layer2=layer2",),
    "kr": ("layer2=layer2",),
    "tat": ("layer2=layer2",),
    "dfa": ("layer2=layer2.0", "layer2=layer2.1", "layer2=layer2"),
    "recurrent": ("layer2=layer2",),
    "pad-feat": ("layer2=layer2",),
    "pad": ("pool=logits",),
    "adversarial": ("logits=logits",),
    "fitnet-convreg": ("layer2=layer2",),
    "vid": ("layer1=layer1", "layer2=layer2"),
    "ofd": ("layer2.1=layer2.1",),
    "ab": ("layer1.1=layer1.1", "layer2.1=layer2.1"),
    "ft": ("layer2=layer2",),
    "kdsvd": ("layer1=layer1", "layer2=layer2"),
    "crd": ("pool=pool",),
    "srd": ("layer2=layer2",),
    "reviewkd": ("layer1,layer2,pool=layer1,layer2,pool",),
    "sskd": ("pool=pool",),
    "dist-feat": ("layer2=layer2",),
}
# Online section: the head each method deploys (a single network; an unknown method: the head its
# trainer evaluates every epoch), options instead of the registered defaults, and notes.
ONLINE_HEADS: dict[str, str] = {"one": "branch0", "okddip": "leader", "pcl": "mean_branch0", "dcm": "a_main",
                                "od-cheap": "student0", "oemc": "student0", "hes": "student", "frskd": "student",
                                "dist-plus": "student"}  # fmt: skip
ONLINE_OVERRIDES: dict[str, dict[str, object]] = {"pcl": {"ema_decay": 0.99}}
ONLINE_NOTES: dict[str, str] = {
    "one": "deployed: branch 0 (its trainer evaluates the gated ensemble every epoch)",
    "okddip": "deployed: the group leader",
    "pcl": "deployed: the temporal mean's branch 0; ema_decay 0.99 (the paper's 0.999 lags in a run of a few "
    "hundred steps: see its docstring)",
    "dcm": "deployed: network A's main classifier (digits_cnn_student's architecture)",
    "od-cheap": "deployed: cheap-convolution student 0 (fewer parameters than digits_cnn_student)",
    "oemc": "deployed: the uncompressed student 0",
    "hes": "expert: a copy of the digits_cnn teacher; scratch teacher width 32 (among the single heads)",
    "frskd": "deployed: the classifier (its self-teacher is dropped)",
    "dist-plus": "teacher: a copy of the digits_cnn teacher, acclimated (trained) during the run (among the "
    "single heads)",
}
ONLINE_BRANCHES, ONLINE_WIDTH = 3, 8
# --quick runs two online methods (one without and one with a pretrained teacher), to stay cheap in tests;
# every online method is trained by tests/test_online_methods.py.
QUICK_ONLINE = ("okddip", "dist-plus")

FEATURE_NOTES: dict[str, str] = {
    "at": "beta = 1000 is set for 32x32 maps; the mean over H*W makes it ~16x stronger on 8x8 maps",
    "sp": "batch statistic: full map cached, reduced in the trainer",
    "cckd": "batch statistic: full map cached, reduced in the trainer",
    "recurrent": "AT loss on a plain (not recurrent) student here",
    "dfa": "candidates: layer2 conv, BN and ReLU outputs",
    "crd": "K = 1024 negatives (16384 for N = 50000 in the paper), drawn with replacement among ~90",
    "srd": "teacher head fitted to the cached teacher outputs (head=fit: a cache holds no weights)",
    "sskd": "in-process teacher (it answers for the rotated inputs, which a cache does not hold)",
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
    feature_epochs: int = 150  # CNN student epochs (feature section)
    online_epochs: int = 150  # epochs of the online section (its CE and KD students too)
    online_methods: tuple[str, ...] | None = None  # None: every registered online method; (): no online section

    @classmethod
    def make(cls, quick: bool = False, **overrides: Any) -> MethodsBenchSettings:
        base = cls()
        if quick:
            base = replace(base, quick=True, seeds=1, epochs=10, teacher_epochs=3, feature_epochs=2, online_epochs=1,
                           online_methods=QUICK_ONLINE)  # fmt: skip
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def selected_methods(names: tuple[str, ...] | list[str]) -> list[str]:
    """The baselines first, then the chosen methods (all registered ones if none) in registry order."""
    for name in names:
        get_method(name)  # ValueError for an unknown name
    chosen = set(names) if names else set(METHODS)
    return list(BASELINES) + [m for m in METHODS if m in chosen and m not in BASELINES]


def selected_online(names: tuple[str, ...] | None) -> list[str]:
    """The online methods to run, in registry order (None: all of them); an unknown name is refused."""
    unknown = [n for n in names or () if n not in ONLINE_METHODS]
    if unknown:
        raise ValueError(f"unknown online method(s) {unknown}; choose from {', '.join(ONLINE_METHODS)}")
    return [n for n in ONLINE_METHODS if names is None or n in names]


def is_feature(name: str) -> bool:
    return isinstance(METHODS[name], FeatureMethod)


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
    everything = selected_methods(s.methods)
    names = [n for n in everything if not is_feature(n)]
    feature_names = [n for n in everything if is_feature(n)]
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
                           failed=f"{type(e).__name__}: {e}")  # fmt: skip
                console.print(f"  {name:10s} FAILED: {row['failed']}", highlight=False)
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

        cnn_teacher: dict[str, Any] = {}  # trained once, for the feature and the online sections
        if feature_names:
            results["feature_methods"], results["cnn"] = _feature_section(s, feature_names, train, test, root,
                                                                          cnn_teacher)  # fmt: skip
        online = selected_online(s.online_methods)
        if online:
            results["online_methods"], results["online"] = _online_section(s, online, train, test, root,
                                                                           cnn_teacher)  # fmt: skip

    _ce_vs_kd(results["methods"])
    ms = results["methods"]
    results.update(
        ce={k: ms["ce"][k] for k in ("acc_mean", "acc_std", "acc_per_seed", "seconds")},
        kd={k: ms["kd"][k] for k in ("acc_mean", "acc_std", "acc_per_seed", "seconds", "options")},
        teacher_acc=teacher_acc,
        # every method that raised, logit or feature: `kd bench methods` exits 1 when any did
        failed=sorted(
            n
            for part in ("methods", "feature_methods", "online_methods")
            for n, m in results.get(part, {}).items()
            if m.get("failed")
        ),  # fmt: skip
        settings={
            **asdict(s),
            "methods": everything,
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


def _ce_vs_kd(rows: dict[str, Any]) -> None:
    """CE runs before KD exists: its paired difference to KD is filled in once both ran."""
    ce, kd = rows.get("ce"), rows.get("kd")
    if ce and kd and ce.get("acc_mean") is not None and kd.get("acc_mean") is not None:
        deltas = [a - b for a, b in zip(ce["acc_per_seed"], kd["acc_per_seed"])]
        ce["delta_vs_kd_mean"], ce["delta_vs_kd_std"] = _mean(deltas), _std(deltas)


def _feature_options(name: str) -> dict[str, object]:
    method = get_method(name)
    opts = {**method.own_defaults, **OVERRIDES.get(name, {})}
    if method.reduce is not None and not reductions.parse(f"x@{method.reduce.format('x', 'x', **opts)}").per_sample:
        opts["teacher_reduce"] = "trainer"  # a batch statistic: cache the map, reduce it here
    return opts


def _teacher_names(name: str, opts: dict[str, object]) -> list[str]:
    """The teacher features a feature method reads (what the cache must store for it)."""
    method = get_method(name)
    out: list[str] = []
    for text in FEATURE_MATCHES[name]:
        m = Match.parse(text)
        if LOGITS in m.teacher:
            continue
        if opts.get("teacher_reduce") == "trainer" or method.reduce is None:  # full maps, every layer
            out += list(m.teacher)
        else:
            out.append(feature_name(m.teacher, method.reduce, {**method.own_defaults, **opts}))
    return list(dict.fromkeys(out))


def _cnn_teacher(s: MethodsBenchSettings, train: Dataset, test: Dataset, root: Path, memo: dict[str, Any]):
    """The ``digits_cnn`` teacher (CE on the whole split, seed 0), trained once per run: -> (teacher, test acc)."""
    if "teacher" not in memo:
        seed_everything(0)
        model = digits_cnn()
        r = train_student(model, train, test, TrainConfig(method="ce", epochs=s.teacher_epochs, lr=1e-3,
                                                          batch_size=64))  # fmt: skip
        path = save_weights(model, root / "digits-cnn.safetensors")
        memo["teacher"] = load_teacher("digits-cnn", f"kd.models:digits_cnn@{path}")
        memo["acc"] = r.test_acc
        console.print(f"digits CNN teacher: test acc {r.test_acc:.4f} ({s.teacher_epochs} epochs)", highlight=False)
    return memo["teacher"], memo["acc"]


def _feature_section(s: MethodsBenchSettings, names: list[str], train: Dataset, test: Dataset,
                     root: Path, memo: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """CE, KD and every feature method on the CNN pair, features from one cache."""
    teacher, teacher_acc = _cnn_teacher(s, train, test, root, memo)
    missing = [n for n in names if n not in FEATURE_MATCHES]
    if missing:
        raise ValueError(f"no layer matches for feature method(s) {missing} in kd.bench.methods.FEATURE_MATCHES")
    wanted = {n: _teacher_names(n, _feature_options(n)) for n in names}
    stored = sorted({f for fs in wanted.values() for f in fs})
    rep = precompute(train, LocalSource(teacher), root / "cache-cnn", codec="fp32", features=stored, progress=False)
    cache = CacheSource(str(rep.path), teacher_fingerprint=teacher.fingerprint, dataset_id=train.dataset_id)
    feature_bytes = cache.reader.meta.feature_bytes
    rows: dict[str, Any] = {}
    for name in ["ce", "kd", *names]:
        feature = name not in BASELINES
        opts = _feature_options(name) if feature else dict(get_method(name).defaults)
        row: dict[str, Any] = {
            "paper": get_method(name).paper,
            "options": opts,
            "matches": list(FEATURE_MATCHES.get(name, ())),
            "teacher_features": wanted.get(name, []),
            "feature_bytes_per_sample": sum(feature_bytes[f] for f in wanted.get(name, [])),
            "note": FEATURE_NOTES.get(name, ""),
            "acc_per_seed": [],
            "seconds_per_seed": [],
        }
        try:
            for seed in range(s.seeds):
                seed_everything(seed)
                student = digits_cnn_student()
                config = TrainConfig(method=name, method_options=dict(opts), epochs=s.feature_epochs, seed=seed,
                                     matches=list(FEATURE_MATCHES.get(name, ())))  # fmt: skip
                src = LocalSource(teacher) if getattr(get_method(name), "rotations", False) else cache
                res = train_student(student, train, test, config, source=None if name == "ce" else src,
                                    subset=_subset(train, s, seed))  # fmt: skip
                if not math.isfinite(res.test_acc):
                    raise RuntimeError(f"non-finite accuracy {res.test_acc}")
                row["acc_per_seed"].append(res.test_acc)
                row["seconds_per_seed"].append(round(res.seconds, 3))
        except Exception as e:  # noqa: BLE001 - recorded: the bench goes on with the other methods
            if not feature:
                raise
            row.update(acc_mean=None, acc_std=None, seconds=round(sum(row["seconds_per_seed"]), 2),
                       failed=f"{type(e).__name__}: {e}")  # fmt: skip
            console.print(f"  {name:10s} FAILED: {row['failed']}", highlight=False)
            rows[name] = row
            continue
        accs = row["acc_per_seed"]
        row.update(acc_mean=_mean(accs), acc_std=_std(accs), seconds=round(sum(row["seconds_per_seed"]), 2))
        for ref in BASELINES:
            deltas = [a - b for a, b in zip(accs, rows.get(ref, row)["acc_per_seed"])]
            row[f"delta_vs_{ref}_mean"], row[f"delta_vs_{ref}_std"] = _mean(deltas), _std(deltas)
        rows[name] = row
        console.print(f"  {name:10s} acc {row['acc_mean']:.4f} ± {row['acc_std']:.4f} ({row['seconds']:.1f}s, "
                      f"{row['feature_bytes_per_sample']} B/sample features)", highlight=False)  # fmt: skip
    _ce_vs_kd(rows)
    cnn = {
        "teacher_acc": teacher_acc,
        "teacher": "kd.models:digits_cnn",
        "student": "kd.models:digits_cnn_student",
        "teacher_params": sum(p.numel() for p in teacher.model.parameters()),
        "student_params": sum(p.numel() for p in digits_cnn_student().parameters()),
        "epochs": s.feature_epochs,
        "cache_features": dict(feature_bytes),
        "logit_bytes_per_sample": cache.reader.logit_bytes,
    }
    return rows, cnn


def _online_section(s: MethodsBenchSettings, names: list[str], train: Dataset, test: Dataset, root: Path,
                    memo: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """CE and KD on the CNN pair, then every online method, ``online_epochs`` each, same subsets and seeds."""
    teacher, teacher_acc = _cnn_teacher(s, train, test, root, memo)
    rows: dict[str, Any] = {}
    for name in BASELINES:
        method = get_method(name)
        row: dict[str, Any] = {"paper": method.paper, "options": dict(method.defaults), "head": "student",
                               "note": "digits_cnn_student" + ("" if name == "ce" else ", teacher in process"),
                               "acc_per_seed": [], "seconds_per_seed": []}  # fmt: skip
        for seed in range(s.seeds):
            seed_everything(seed)
            student = digits_cnn_student()
            config = TrainConfig(method=name, method_options=dict(method.defaults), epochs=s.online_epochs, seed=seed)
            res = train_student(student, train, test, config, source=None if name == "ce" else LocalSource(teacher),
                                subset=_subset(train, s, seed))  # fmt: skip
            row["acc_per_seed"].append(res.test_acc)
            row["seconds_per_seed"].append(round(res.seconds, 3))
        rows[name] = row
    for name in names:
        module = ONLINE_METHODS[name]
        row = {"paper": module.PAPER, "options": method_options(name, ONLINE_OVERRIDES.get(name)),
               "head": ONLINE_HEADS.get(name, "deployed"), "note": ONLINE_NOTES.get(name, ""), "acc_per_seed": [],
               "best_single_per_seed": [], "best_single_head_per_seed": [], "ensemble_per_seed": [],
               "accuracies_per_seed": [], "seconds_per_seed": []}  # fmt: skip
        try:
            for seed in range(s.seeds):
                config = TrainConfig(epochs=s.online_epochs, seed=seed)
                # a method with a pretrained teacher gets a fresh copy (dist-plus trains it)
                given = copy.deepcopy(teacher.model) if getattr(module, "NEEDS_TEACHER", False) else None
                res = train_online(name, train, test, config, branches=ONLINE_BRANCHES, width=ONLINE_WIDTH,
                                   options=ONLINE_OVERRIDES.get(name), subset=_subset(train, s, seed),
                                   teacher=given)  # fmt: skip
                acc = res.accuracies[ONLINE_HEADS[name]] if name in ONLINE_HEADS else res.acc_per_epoch[-1]
                if not all(math.isfinite(a) for a in res.accuracies.values()):
                    raise RuntimeError(f"non-finite accuracy in {res.accuracies}")
                row["acc_per_seed"].append(acc)
                row["best_single_per_seed"].append(res.best_branch_acc)
                row["best_single_head_per_seed"].append(res.best_branch)
                row["ensemble_per_seed"].append(res.ensemble_acc)
                row["accuracies_per_seed"].append(res.accuracies)
                row["seconds_per_seed"].append(round(res.seconds, 3))
        except Exception as e:  # noqa: BLE001 - recorded: the bench goes on with the other methods
            row.update(acc_mean=None, acc_std=None, seconds=round(sum(row["seconds_per_seed"]), 2),
                       failed=f"{type(e).__name__}: {e}")  # fmt: skip
            console.print(f"  {name:10s} FAILED: {row['failed']}", highlight=False)
            rows[name] = row
            continue
        rows[name] = row
    for name, row in rows.items():
        if row.get("failed"):
            continue
        accs = row["acc_per_seed"]
        row.update(acc_mean=_mean(accs), acc_std=_std(accs), seconds=round(sum(row["seconds_per_seed"]), 2))
        for key in ("best_single", "ensemble"):
            vals = row.get(f"{key}_per_seed")
            if vals and None not in vals:
                row[f"{key}_mean"], row[f"{key}_std"] = _mean(vals), _std(vals)
        for ref in BASELINES:
            deltas = [a - b for a, b in zip(accs, rows[ref]["acc_per_seed"])]
            row[f"delta_vs_{ref}_mean"], row[f"delta_vs_{ref}_std"] = _mean(deltas), _std(deltas)
        if name not in BASELINES:
            console.print(f"  {name:10s} acc {row['acc_mean']:.4f} ± {row['acc_std']:.4f} ({row['seconds']:.1f}s)",
                          highlight=False)  # fmt: skip
    info = {
        "teacher_acc": teacher_acc,
        "teacher": "kd.models:digits_cnn",
        "student": "kd.models:digits_cnn_student",
        "student_params": sum(p.numel() for p in digits_cnn_student().parameters()),
        "epochs": s.online_epochs,
        "branches": ONLINE_BRANCHES,
        "width": ONLINE_WIDTH,
        "methods": names,
        "overrides": {n: o for n, o in ONLINE_OVERRIDES.items() if n in names},
    }
    return rows, info


def print_report(r: dict[str, Any], out: Console | None = None) -> None:
    out = report_console(out, width=200)
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
            t.add_row("-", name, "FAILED", "", "", "", f"{m['seconds']:.1f}", "", m["failed"], style="red")
    out.print(t)
    out.print(
        "vs KD / vs CE: mean ± std over seeds of the paired difference (same seed, subset, init and batch order). "
        "The accuracies are what they are on this small task; a method below KD is not wrong if its loss "
        "matches its formula.",
        highlight=False,
    )
    if r.get("feature_methods"):
        _print_feature_table(r, out)
    if r.get("online_methods"):
        _print_online_table(r, out)
    out.print(f"{r['seconds']:.1f}s total", highlight=False)


def _print_feature_table(r: dict[str, Any], out: Console) -> None:
    c, s = r["cnn"], r["settings"]
    t = Table(
        title=f"feature methods: digits_cnn_student ({c['student_params']} params) from digits_cnn "
        f"({c['teacher_params']} params, test acc {c['teacher_acc']:.4f}), {s['labeled']} labelled samples, "
        f"{c['epochs']} epochs, {s['seeds']} seed(s); teacher features from the cache"
    )
    for col in ("#", "method", "test acc (mean ± std)", "vs KD", "vs CE", "feature B/sample", "matches", "s", "note"):
        t.add_column(col, justify="left" if col in ("method", "matches", "note") else "right")
    rows = r["feature_methods"]
    done = sorted(((n, m) for n, m in rows.items() if m["acc_mean"] is not None), key=lambda nm: -nm[1]["acc_mean"])
    for rank, (name, m) in enumerate(done, 1):

        def delta(ref: str, m: dict[str, Any] = m, name: str = name) -> str:
            return "-" if name == ref else f"{m[f'delta_vs_{ref}_mean']:+.4f} ± {m[f'delta_vs_{ref}_std']:.4f}"

        t.add_row(str(rank), name, f"{m['acc_mean']:.4f} ± {m['acc_std']:.4f}", delta("kd"), delta("ce"),
                  str(m["feature_bytes_per_sample"]), " ".join(m["matches"]), f"{m['seconds']:.1f}", m["note"],
                  style={"ce": "bold yellow", "kd": "bold cyan"}.get(name))  # fmt: skip
    for name, m in rows.items():
        if m["acc_mean"] is None:
            t.add_row("-", name, "FAILED", "", "", "", " ".join(m["matches"]), f"{m['seconds']:.1f}", m["failed"],
                      style="red")  # fmt: skip
    out.print(t)
    out.print(f"feature B/sample: fp16 bytes per sample of the teacher features the method reads from the cache "
              f"(logits: {c['logit_bytes_per_sample']} B/sample more).", highlight=False)  # fmt: skip


def _print_online_table(r: dict[str, Any], out: Console) -> None:
    o, s = r["online"], r["settings"]
    t = Table(
        title=f"online methods: {o['branches']} branches of width {o['width']} (a branch path = digits_cnn_student, "
        f"{o['student_params']} params), {s['labeled']} labelled samples, {o['epochs']} epochs, {s['seeds']} seed(s); "
        f"CE and KD (from digits_cnn, test acc {o['teacher_acc']:.4f}): digits_cnn_student"
    )
    for col in ("#", "method", "deployed head", "test acc (mean ± std)", "vs KD", "vs CE", "best single head",
                "ensemble", "s", "note"):  # fmt: skip
        t.add_column(col, justify="left" if col in ("method", "deployed head", "note") else "right")
    rows = r["online_methods"]
    done = sorted(((n, m) for n, m in rows.items() if m["acc_mean"] is not None), key=lambda nm: -nm[1]["acc_mean"])

    def pm(m: dict[str, Any], key: str) -> str:
        return "" if m.get(f"{key}_mean") is None else f"{m[f'{key}_mean']:.4f} ± {m[f'{key}_std']:.4f}"

    for rank, (name, m) in enumerate(done, 1):

        def delta(ref: str, m: dict[str, Any] = m, name: str = name) -> str:
            return "-" if name == ref else f"{m[f'delta_vs_{ref}_mean']:+.4f} ± {m[f'delta_vs_{ref}_std']:.4f}"

        t.add_row(str(rank), name, m["head"], pm(m, "acc"), delta("kd"), delta("ce"), pm(m, "best_single"),
                  pm(m, "ensemble"), f"{m['seconds']:.1f}", m["note"],
                  style={"ce": "bold yellow", "kd": "bold cyan"}.get(name))  # fmt: skip
    for name, m in rows.items():
        if m["acc_mean"] is None:
            t.add_row("-", name, m["head"], "FAILED", "", "", "", "", f"{m['seconds']:.1f}", m["failed"], style="red")
    out.print(t)
    out.print("best single head: the best of the method's single networks on the test set (optimistic: picked on "
              "test); vs KD / vs CE compare the deployed head.", highlight=False)  # fmt: skip
