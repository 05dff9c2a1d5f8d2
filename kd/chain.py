"""``kd chain``: distillation chains as one command, each trained model served in turn.

* ``takd`` -- Mirzadeh et al. 2020, "Improved Knowledge Distillation via Teacher
  Assistant": teacher -> assistant -> ... -> student. ``models`` lists the
  successive architectures (e.g. ``[kd.chain:digits_assistant, kd.models:digits_student]``).
  With ``direct=True`` the last model is also trained straight from the teacher,
  the baseline TAKD is measured against.
* ``born-again`` -- Furlanello et al. 2018, "Born-Again Neural Networks": N
  generations of the same architecture, each distilled from the previous one;
  at the end the ensemble of the generations 1..N (mean of their softmax) is
  evaluated as well. ``models`` holds N copies of the student's factory.

Every stage: ``kd serve`` is started as a subprocess on a free loopback port
serving the previous stage's saved weights (safetensors), the next model is
trained with method ``kd`` from a ``ServerSource`` on the labelled subset, its
weights are saved to ``out/stage-<i>.safetensors``, the server is stopped with
SIGTERM (exit code checked) and the model is evaluated on the test split. The
served fingerprint is checked against the fingerprint of the saved weights.

Tolerant teacher (Yang, Xie, Qiao, Yuille 2018, "Knowledge Distillation in
Generations: More Tolerant Teachers Educate Better Students"): the first
teacher ("patriarch") is trained with an extra loss term that lets a few
secondary classes keep some confidence, giving a milder (less peaked)
supervision signal. What is implemented here, when the teacher is trained by
this command (no ``teacher`` spec) and ``tolerant_gamma > 0``::

    L = CE(z, y) + gamma * ( z_(1) - 1/(K-1) * sum_{k=2..K} z_(k) )

with z_(k) the k-th largest logit of a sample (K = ``tolerant_k``, default 5):
the gap between the top-1 logit and the mean of the next K-1.

STILL UNVERIFIED against the paper's equation. What was checked: the abstracts
of arXiv 1805.05551 v1 ("adding an extra loss term to a patriarch network so
that it preserves confidence scores on a primary class (the ground-truth) and
several visually-similar secondary classes") and v2 / AAAI 2019 ("merely an
extra loss term added to the teacher network, facilitating a few secondary
classes to emerge and complement to the primary class"). Not found: the paper's
body (the term itself; whether its "confidence scores" are logits or
probabilities; its K and gamma), nor any official code (the first author's
publication page, Chenglin-Yang/starter-hugo-academic, has an empty code link).
So the logit form and K = 5 are this project's reading. Note that v1 names the
primary class as the ground truth, while z_(1) here is the teacher's own top-1:
the two coincide on every sample the teacher classifies correctly, and differ
(this term then lowers the wrong top-1) on the others.

The first stage's teacher, when not given, is trained like ``kd demo``'s: the
``teacher_factory`` (default ``kd.models:digits_teacher``) on the whole
training split with cross-entropy, seed 0, and shared by every seed.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from kd.core.data import open_source
from kd.core.factory import build
from kd.core.samples import SampleSource
from kd.core.signals import Stopped
from kd.demo import start_server_process, stop_server_process
from kd.models import MLP
from kd.student_trainer.evaluate import check_output_width, output_width
from kd.student_trainer.losses import get_method
from kd.student_trainer.sources import LocalSource, ServerSource, SoftTargetSource
from kd.student_trainer.train import Hooks, StepContext, TrainConfig, accuracy, seed_everything, train_student
from kd.teacher_server.loading import TeacherLoadError, load_teacher, save_weights

console = Console(stderr=True, soft_wrap=True)  # each line whole in a log, as kd.cli's
MODES = ("takd", "born-again")


def digits_assistant() -> nn.Module:
    """A teacher assistant for the digits chain, 64-64-10 (~4.8k parameters)."""
    return MLP([64, 64, 10])


def with_weights(factory: str, weights: Path) -> str:
    """``module:attr[?args]`` + weights -> ``module:attr@WEIGHTS[?args]`` (the spec grammar's order)."""
    head, sep, args = factory.partition("?")
    return f"{head}@{weights}{sep}{args}"


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tolerant_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float, k: int = 5) -> torch.Tensor:
    """CE + gamma * (top-1 logit - mean of the next K-1 logits), averaged over the batch."""
    loss = F.cross_entropy(logits, labels)
    if gamma <= 0:
        return loss
    top = logits.topk(min(k, logits.shape[1]), dim=1).values
    return loss + gamma * (top[:, 0] - top[:, 1:].mean(1)).mean()


def _train_teacher(
    model: nn.Module,
    train: SampleSource,
    test: SampleSource,
    *,
    epochs: int,
    gamma: float,
    k: int,
    stop: Callable[[], int | None] | None = None,
) -> tuple[float, float]:
    """Cross-entropy (plus the tolerant term when gamma > 0) on the whole split, as the demo:
    the shared trainer, its loss replaced by ``tolerant_loss`` through a hook."""
    hooks = None
    if gamma > 0:

        def loss(ctx: StepContext) -> torch.Tensor:
            return tolerant_loss(ctx.model(ctx.inputs), ctx.labels, gamma, k)

        hooks = Hooks(loss=loss)
    res = train_student(model, train, test, TrainConfig(method="ce", epochs=epochs, lr=1e-3, batch_size=64),
                        hooks=hooks, stop=stop)  # fmt: skip
    res.raise_if_stopped("training the teacher (stage 0), ")
    return res.test_acc, res.seconds


class _MeanSoftmax(nn.Module):
    """The born-again ensemble: the mean of its members' softmax (its argmax is the ensemble's class)."""

    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x).softmax(1) for m in self.members]).mean(0)


def _ensemble_acc(models: list[nn.Module], test: SampleSource) -> float:
    return accuracy(_MeanSoftmax(models), test)


DIGITS_LABELED = 100  # the default subset on the bundled digits: the TAKD experiment's low-data setting


Splits = tuple[SampleSource, SampleSource, int]  # open_splits': (train, test, labelled samples per stage)


def open_splits(dataset: str, val_dataset: str, labeled: int | None) -> Splits:
    """(train, test, labelled samples per stage): ``labeled`` None is 100 of the bundled digits'
    training split and every sample of any other dataset; more than the dataset holds is refused
    (the subset was cut to what there is without a word)."""
    train, test = open_source(dataset), open_source(val_dataset)
    if labeled is None:
        labeled = DIGITS_LABELED if train.dataset_id.split("@")[0] == "digits/train" else len(train)
    if labeled < 1:
        raise ValueError(f"labeled must be >= 1, got {labeled}")
    if labeled > len(train):
        raise ValueError(f"labeled must be <= {len(train)} (the samples of {dataset}), got {labeled}")
    return train, test, labeled


class _Served:
    """The previous stage's weights behind a ``kd serve`` subprocess (or in process)."""

    def __init__(self, spec: str, out: Path, log_name: str, serve: bool) -> None:
        self.expected = load_teacher("chain", spec).fingerprint
        self.proc = None
        self.exit_code: int | None = None
        self.source: SoftTargetSource | None = None
        if serve:
            self.proc, port = start_server_process(spec, out, name="chain", log_name=log_name)
            try:  # an object never returned is never closed: its server is stopped here
                self.source = ServerSource(f"127.0.0.1:{port}", "chain")
            except BaseException:
                self.close()
                raise
        else:
            self.source = LocalSource(spec)
        self.fingerprint = self.source.fingerprint
        if self.fingerprint != self.expected:
            self.close()
            raise RuntimeError(f"served fingerprint {self.fingerprint[:16]} != saved weights' {self.expected[:16]}")

    def close(self) -> int | None:
        if self.source is not None:
            self.source.close()
        if self.proc is not None and self.exit_code is None:
            self.exit_code = stop_server_process(self.proc)
        return self.exit_code


def default_models(mode: str) -> list[str]:
    """The chain's models when none are given: TAKD's assistant then student, or two born-again generations."""
    return (
        ["kd.chain:digits_assistant", "kd.models:digits_student"]
        if mode == "takd"
        else ["kd.models:digits_student"] * 2
    )


def check_chain(
    *,
    mode: str = "takd",
    teacher: str | None = None,
    models: list[str] | None = None,
    epochs: int = 300,
    seeds: int = 1,
    labeled: int | None = None,
    temperature: float = 4.0,
    alpha: float = 0.9,
    teacher_factory: str = "kd.models:digits_teacher",
    teacher_epochs: int = 40,
    tolerant_gamma: float = 0.0,
    tolerant_k: int = 5,
    dataset: str = "digits:train",
    val_dataset: str = "digits:test",
    recipe: dict[str, object] | None = None,
    batch_size: int = 32,
    splits: Splits | None = None,
) -> list[str]:
    """Refuse (ValueError, naming the argument) a chain that could not run to its end, before any stage
    trains: a bad option or model found only after the teacher had trained lost that work. -> the
    models of the chain (``models`` or the mode's defaults). ``splits``: ``open_splits``' result for
    ``dataset``, ``val_dataset`` and ``labeled``, when the caller opened them already (then they are
    not opened again: an image folder of millions of files is one directory scan, not one per check)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    models = default_models(mode) if models is None else list(models)
    if not models:
        raise ValueError("a chain needs at least one model")
    for name, value, least in (("epochs", epochs, 1), ("seeds", seeds, 1), ("teacher_epochs", teacher_epochs, 1),
                               ("tolerant_k", tolerant_k, 2), ("batch_size", batch_size, 1)):  # fmt: skip
        if value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    train, test, _ = splits if splits is not None else open_splits(dataset, val_dataset, labeled)
    stage_config(epochs, 0, batch_size, recipe, {"temperature": temperature, "alpha": alpha})  # the recipe's own check
    # tolerant_loss treats any gamma <= 0 (and NaN, which compares false) as "off": a negative or NaN
    # weight would silently train a plain teacher, so only a finite gamma >= 0 is taken.
    if not (math.isfinite(tolerant_gamma) and tolerant_gamma >= 0):
        raise ValueError(f"tolerant_gamma must be a finite number >= 0 (0: off), got {tolerant_gamma}")
    if teacher is not None and tolerant_gamma > 0:
        raise ValueError("tolerant_gamma applies to a teacher trained here: leave out the teacher spec")
    # every stage trains with method kd and these options: the method's own check, as train_student's
    get_method("kd").check_options({"temperature": temperature, "alpha": alpha})
    # Every model is built once (its own RNG untouched), so a spec that does not import, takes
    # other arguments or carries @WEIGHTS is refused now rather than after the stages before it.
    with torch.random.fork_rng(devices=[]):
        if teacher is None:
            built = build(teacher_factory, "teacher")
            check_val_takes(built, test, f"teacher factory {teacher_factory!r}", train=train)
        else:  # a missing or mismatched weights file: exit 2 naming it, not exit 1 from run_chain's stage 0
            try:
                check_val_takes(load_teacher("chain", teacher).model, test, f"teacher {teacher!r}", train=train)
            except TeacherLoadError as e:
                raise ValueError(f"teacher: {e}") from e
        for spec in dict.fromkeys(models):
            # train_student refuses a model of another width too, but only once the stages before it trained
            model = build(spec, "student")
            check_output_width(model, train, f"model {spec!r}")
            check_val_takes(model, test, f"model {spec!r}", train=train)
    return models


def check_val_takes(model: nn.Module, test: SampleSource, what: str, *, train: SampleSource | None = None,
                    test_name: str = "val_dataset", train_name: str = "dataset",
                    final: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:  # fmt: skip
    """Refuse a model that cannot take ``test``'s samples: a model is evaluated on the val split after
    each epoch, where another sample shape failed with torch's shape error (after the first epoch of
    training: kd chain's teacher, kd train's student). Its classes may be fewer than the model's
    outputs (as kd train's --val-dataset), so only the shape is checked here. ``train``: the split the
    model trains on, whose sample shape the message names too; ``final``: the student's own input
    transform (kd train's --input-size/--input-mean), as the evaluation applies it."""
    try:
        output_width(model, test, final=final)
    except RuntimeError as e:
        shape = list(test.get(torch.arange(1)).shape[1:])
        trained = ""
        if train is not None and len(train):
            trained_shape = list(train.get(torch.arange(1)).shape[1:])
            trained = f", while {train_name} {train.dataset_id}'s are shaped {trained_shape}"
        raise ValueError(
            f"{what} cannot take the samples of {test_name} {test.dataset_id}, shaped {shape}{trained} ({e})"
        ) from None


def stage_config(epochs: int, seed: int, batch_size: int, recipe: dict[str, object] | None,
                 opts: dict[str, float]) -> TrainConfig:  # fmt: skip
    """The TrainConfig of a stage (method kd with ``opts``; ``recipe``: TrainConfig's optimiser,
    schedule, AMP and clipping fields, as ``kd train``'s flags), validated."""
    from kd.student_trainer.optim import recipe_of

    cfg = TrainConfig(method="kd", method_options=opts, epochs=epochs, seed=seed, batch_size=batch_size,
                      **(recipe or {}))  # fmt: skip
    recipe_of(cfg).validate()
    return cfg


def run_chain(
    out: Path,
    *,
    mode: str = "takd",
    teacher: str | None = None,
    models: list[str] | None = None,
    epochs: int = 300,
    seeds: int = 1,
    labeled: int | None = None,
    temperature: float = 4.0,
    alpha: float = 0.9,
    teacher_factory: str = "kd.models:digits_teacher",
    teacher_epochs: int = 40,
    tolerant_gamma: float = 0.0,
    tolerant_k: int = 5,
    direct: bool = True,
    serve: bool = True,
    dataset: str = "digits:train",
    val_dataset: str = "digits:test",
    recipe: dict[str, object] | None = None,
    batch_size: int = 32,
    stop: Callable[[], int | None] | None = None,
    splits: Splits | None = None,
) -> dict:
    """The chain on ``dataset`` (any dataset URI; a seeded subset of ``labeled`` samples per seed),
    each model evaluated on ``val_dataset``; the stages train with method kd, ``batch_size`` and
    ``recipe`` (TrainConfig's recipe fields; default Adam at 3e-3, TrainConfig's). ``stop``: as
    ``train_student``'s; a stopped chain raises ``kd.core.signals.Stopped`` (the stages saved
    before stay, the server of the stage in training is stopped). ``splits``: as ``check_chain``'s (the
    CLI opens them once for its own check and this run); left out, they are opened here, once."""
    splits = splits if splits is not None else open_splits(dataset, val_dataset, labeled)
    models = check_chain(mode=mode, teacher=teacher, models=models, epochs=epochs, seeds=seeds, labeled=labeled,
                         temperature=temperature, alpha=alpha, teacher_factory=teacher_factory,
                         teacher_epochs=teacher_epochs, tolerant_gamma=tolerant_gamma, tolerant_k=tolerant_k,
                         dataset=dataset, val_dataset=val_dataset, recipe=recipe, batch_size=batch_size,
                         splits=splits)  # fmt: skip
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    train, test, labeled = splits
    opts = {"temperature": temperature, "alpha": alpha}
    console.rule(f"kd chain ({mode}): {len(models)} stage(s) after the teacher, {seeds} seed(s)")

    # stage 0: the teacher
    if teacher is None:
        seed_everything(0)
        model0 = build(teacher_factory, "teacher")
        acc0, secs0 = _train_teacher(model0, train, test, epochs=teacher_epochs, gamma=tolerant_gamma, k=tolerant_k,
                                     stop=stop)  # fmt: skip
        weights0 = out / "stage-0.safetensors"
        save_weights(model0, weights0)
        teacher = with_weights(teacher_factory, weights0)
    else:
        t0 = time.perf_counter()
        model0 = load_teacher("chain", teacher).model
        acc0, secs0 = accuracy(model0, test), time.perf_counter() - t0
    t0info = load_teacher("chain", teacher)
    stage0 = {"stage": 0, "model": teacher.split("@")[0].split("?")[0], "spec": teacher, "test_acc": acc0,
              "params": _params(t0info.model), "seconds": round(secs0, 2), "fingerprint": t0info.fingerprint,
              "tolerant_gamma": tolerant_gamma if tolerant_gamma > 0 else None}  # fmt: skip
    console.print(f"stage 0 (teacher): acc {acc0:.4f}, fingerprint {t0info.fingerprint[:16]}", highlight=False)

    def train_from(served: _Served, factory: str, seed: int, subset: torch.Tensor) -> tuple[nn.Module, float, float]:
        seed_everything(seed)
        student = build(factory, "student")
        cfg = stage_config(epochs, seed, batch_size, recipe, opts)
        r = train_student(student, train, test, cfg, source=served.source, subset=subset, stop=stop)
        r.raise_if_stopped(f"training {factory} (seed {seed}), ")
        return student, r.test_acc, r.seconds

    runs = []
    for seed in range(seeds):
        subset = torch.randperm(len(train), generator=torch.Generator().manual_seed(1000 + seed))[:labeled]
        prefix = "" if seeds == 1 else f"seed-{seed}-"
        prev_spec, stages, trained, direct_res = teacher, [], [], None
        for i, factory in enumerate(models, start=1):
            try:
                served = _Served(prev_spec, out, f"{prefix}server-stage-{i}.log", serve)
            except RuntimeError:
                # Ctrl-C (or a job scheduler) signals the whole process group: the kd serve child still
                # starting dies of it, and the stop, not its exit code, is what the user must be told.
                if stop is not None and (signum := stop()):
                    raise Stopped(signum, f"starting the server of stage {i} (seed {seed})") from None
                raise
            try:
                student, acc, secs = train_from(served, factory, seed, subset)
                # saved now: a stop in the direct baseline below must not lose a finished stage
                weights = out / f"{prefix}stage-{i}.safetensors"
                save_weights(student, weights)
                if mode == "takd" and direct and i == 1 and len(models) > 1:
                    _, dacc, dsecs = train_from(served, models[-1], seed, subset)
                    direct_res = {"model": models[-1], "test_acc": dacc, "seconds": round(dsecs, 2),
                                  "teacher_fingerprint": served.fingerprint}  # fmt: skip
            finally:
                rc = served.close()
            if serve and rc != 0:
                raise RuntimeError(f"kd serve exited with {rc} after SIGTERM (stage {i}, seed {seed})")
            prev_spec = with_weights(factory, weights)
            trained.append(student)
            stages.append({"stage": i, "model": factory, "spec": prev_spec, "test_acc": accuracy(student, test),
                           "params": _params(student), "seconds": round(secs, 2),
                           "served_fingerprint": served.fingerprint, "expected_fingerprint": served.expected,
                           "fingerprint": load_teacher("chain", prev_spec).fingerprint,
                           "server_exit_code": rc})  # fmt: skip
            console.print(f"  seed {seed} stage {i} {factory}: acc {acc:.4f} ({secs:.1f}s)", highlight=False)
        run: dict = {"seed": seed, "stages": stages}
        if direct_res is not None:
            run["direct"] = direct_res
            console.print(f"  seed {seed} direct {models[-1]}: acc {direct_res['test_acc']:.4f}", highlight=False)
        if mode == "born-again" and len(trained) > 1:
            run["ensemble_acc"] = _ensemble_acc(trained, test)
            console.print(f"  seed {seed} ensemble of {len(trained)}: acc {run['ensemble_acc']:.4f}", highlight=False)
        runs.append(run)

    def mean(xs: list[float]) -> float:
        return statistics.fmean(xs)

    def std(xs: list[float]) -> float:
        return statistics.stdev(xs) if len(xs) > 1 else 0.0

    summary = {
        f"stage-{i}": {"mean": mean(a), "std": std(a)}
        for i in range(1, len(models) + 1)
        for a in [[r["stages"][i - 1]["test_acc"] for r in runs]]
    }
    if any("direct" in r for r in runs):
        a = [r["direct"]["test_acc"] for r in runs]
        summary["direct"] = {"mean": mean(a), "std": std(a)}
    if any("ensemble_acc" in r for r in runs):
        a = [r["ensemble_acc"] for r in runs]
        summary["ensemble"] = {"mean": mean(a), "std": std(a)}
    results = {
        "mode": mode, "dataset": train.dataset_id, "val_dataset": test.dataset_id, "epochs": epochs,
        "batch_size": batch_size, "recipe": recipe or {}, "labeled_samples": labeled, "seeds": list(range(seeds)),
        "method": "kd", "method_options": opts, "served": serve, "teacher": stage0, "runs": runs,
        "summary": summary, "seconds": round(time.perf_counter() - t_start, 2),
    }  # fmt: skip
    (out / "chain.json").write_text(json.dumps(results, indent=2))

    table = Table(title=f"kd chain ({mode}) on {dataset}: {labeled} labelled samples, {epochs} epochs, {seeds} seed(s)")
    table.add_column("stage")
    table.add_column("model")
    table.add_column("params", justify="right")
    table.add_column("test acc (mean ± std)", justify="right")
    table.add_row("0 (teacher)", stage0["model"], str(stage0["params"]), f"{acc0:.4f}")
    for i, factory in enumerate(models, start=1):
        s = summary[f"stage-{i}"]
        table.add_row(str(i), factory, str(runs[0]["stages"][i - 1]["params"]), f"{s['mean']:.4f} ± {s['std']:.4f}")
    if "direct" in summary:
        s = summary["direct"]
        table.add_row("direct", f"{models[-1]} from the teacher", "", f"{s['mean']:.4f} ± {s['std']:.4f}")
    if "ensemble" in summary:
        s = summary["ensemble"]
        table.add_row("ensemble", f"mean softmax of stages 1..{len(models)}", "", f"{s['mean']:.4f} ± {s['std']:.4f}")
    Console().print(table)
    console.print(f"results: {out / 'chain.json'}, {results['seconds']:.1f}s total", highlight=False)
    return results
