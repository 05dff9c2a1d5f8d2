"""Online and peer distillation: students that teach each other while they train, no
pretrained teacher. One file per method, each a plain loss function of tensors (documented
with its paper, formula, defaults and what differs from the official code) and a ``setup``
that builds its models and plugs them into the shared trainer (``train_student`` + ``Hooks``):

* ``one``    -- ONE (Lan et al. 2018, arXiv:1806.04606): multi-branch student, gated ensemble teacher.
* ``okddip`` -- OKDDip (Chen et al. 2020, arXiv:1912.00350): peers with attention-based
  aggregated targets, and a group leader taught by the peers.
* ``pcl``    -- PCL (Wu, Gong 2021, arXiv:2006.04147): peer ensemble teacher and temporal mean
  (EMA) peer teachers.
* ``dcm``    -- DCM (Yao, Sun 2020, arXiv:2008.07816): two networks with auxiliary classifiers,
  dense bidirectional cross-layer KL.
* ``od-cheap`` -- Xie et al. 2019 (arXiv:1909.13063): cheap-convolution students and a teacher
  built online from their concatenated feature maps.
* ``oemc``   -- OEMC (Walawalkar et al. 2020, arXiv:2011.07449): students of decreasing width on a
  common base, taught by their ensemble and by the uncompressed student's feature maps.
* ``hes``    -- Highlight Every Step / CTKD (Zhao et al. 2019, arXiv:1907.09643): a scratch teacher
  trained alongside the student, and a pretrained expert (``teacher=``) guiding its attention.
* ``frskd``  -- FRSKD (Ji et al. 2021, arXiv:2103.08273): a BiFPN self-teacher refining the
  classifier's own maps; feature and soft-label self-distillation.
* ``dist-plus`` -- DIST+ (Huang et al. 2025, TPAMI): DIST with teacher acclimation, the
  pretrained teacher (``teacher=``) adapted towards the student while it keeps learning the task.

``train_online(name, train, test, config)`` trains one of them and evaluates every head
(each branch, the ensemble, ...) on ``test``; ``kd online NAME`` is its command line.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from kd.core.samples import SampleSource
from kd.student_trainer.losses import check_option_values
from kd.student_trainer.online import dcm, dist_plus, frskd, hes, od_cheap, oemc, okddip, one, pcl
from kd.student_trainer.train import TrainConfig, accuracy, seed_everything, train_student, world

METHODS: dict[str, ModuleType] = {
    "one": one, "okddip": okddip, "pcl": pcl, "dcm": dcm, "od-cheap": od_cheap, "oemc": oemc, "hes": hes,
    "frskd": frskd, "dist-plus": dist_plus,
}  # fmt: skip


def method_options(name: str, options: dict[str, object] | None = None) -> dict[str, object]:
    """The method's options: its defaults updated by ``options``; unknown names and values of
    the wrong type or out of range are refused with the method's name."""
    if name not in METHODS:
        raise ValueError(f"unknown online method {name!r}; choose from {', '.join(METHODS)}")
    defaults = METHODS[name].OPTIONS
    options = dict(options or {})
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"online method {name!r} has no option(s) {unknown}; options: {defaults}")
    check_option_values(name, defaults, options)
    merged = {**defaults, **options}
    if "rampup" in merged and float(merged["rampup"]) < 0:  # type: ignore[arg-type]
        raise ValueError(f"online method {name!r}: option rampup={merged['rampup']!r} must be >= 0")
    return merged


@dataclass
class OnlineResult:
    method: str
    accuracies: dict[str, float]  # test top-1 of every head (branches, ensemble, leader, ...)
    best_branch: str  # the single head (not an ensemble) with the best test top-1
    best_branch_acc: float
    ensemble_acc: float | None
    acc_per_epoch: list[float]  # the deployed head's test top-1 after each epoch (see the method)
    loss_per_epoch: list[float]
    seconds: float
    options: dict[str, object]
    student: nn.Module = field(repr=False)
    others: dict[str, nn.Module] = field(default_factory=dict, repr=False)

    def summary(self) -> dict[str, object]:
        """The JSON-serialisable numbers (no models)."""
        keep = ("method", "accuracies", "best_branch", "best_branch_acc", "ensemble_acc", "acc_per_epoch",
                "loss_per_epoch", "seconds", "options")  # fmt: skip
        return {k: getattr(self, k) for k in keep}


def _state_hash(model: nn.Module) -> str:
    """sha256/16 of a module's state_dict (names, dtypes, shapes and values, in name order)."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{list(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def train_online(
    name: str,
    train: SampleSource,
    test: SampleSource,
    config: TrainConfig | None = None,
    *,
    branches: int = 3,
    width: int = 8,
    options: dict[str, object] | None = None,
    subset: torch.Tensor | None = None,
    teacher: nn.Module | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
    on_epoch: Callable[[int, float, float], None] | None = None,
    stop: Callable[[], int | None] | None = None,
) -> OnlineResult:
    """Train online method ``name`` on ``train[subset]`` with the shared trainer's recipe
    (``config``: epochs, batch size, optimiser, ...; its ``method`` is ignored), then evaluate
    every head on ``test``. Seeded by ``config.seed`` (the models' initialisation and the batch
    order). ``branches``: peers/branches of a multi-branch method; ``width``: the CNN's width
    (8: each branch path is ``kd.models.digits_cnn_student``'s architecture). With ``run_dir``,
    every epoch's checkpoint holds all the method's modules, optimisers and state, and
    ``resume=True`` continues an interrupted run of the same method and options to the weights of
    an uninterrupted one (``on_epoch(epoch, loss, acc)``: as ``train_student``'s). ``stop``: as
    ``train_student``'s; a stopped run raises ``kd.core.signals.Stopped`` after the trainer wrote its
    checkpoint (with ``run_dir``), before any head is evaluated or online.json written."""
    opts = method_options(name, options)
    needs_teacher = getattr(METHODS[name], "NEEDS_TEACHER", False)
    if needs_teacher and teacher is None:
        raise ValueError(f"online method {name!r} needs a pretrained teacher (kd online {name} --teacher SPEC)")
    if teacher is not None and not needs_teacher:
        raise ValueError(f"online method {name!r} takes no pretrained teacher; leave out --teacher")
    config = replace(config or TrainConfig(), method="ce", method_options={})
    if world()[1] > 1:
        raise ValueError("online methods train in one process (their extra modules are not synchronised)")
    if len(train) == 0 or len(test) == 0:
        raise ValueError("train_online needs non-empty train and test data")
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    if test.num_classes > train.num_classes:
        raise ValueError(f"the test data has {test.num_classes} classes, the training data {train.num_classes}")
    # The pretrained teacher as given (before a method freezes or trains it) is part of what a
    # resume must match: a checkpoint of a run with another teacher is refused, not continued.
    teacher_hash = _state_hash(teacher) if isinstance(teacher, nn.Module) else None
    seed_everything(config.seed)
    shape = tuple(train.get(torch.zeros(1, dtype=torch.long)).shape[1:])
    setup = METHODS[name].setup(shape, train.num_classes, width=width, branches=branches, options=opts,
                                config=config, **({"teacher": teacher} if needs_teacher else {}))  # fmt: skip
    t0 = time.perf_counter()
    identity = {"method": name, "options": opts, "branches": branches, "width": width,
                **({} if teacher_hash is None else {"teacher": teacher_hash})}  # fmt: skip
    res = train_student(setup.student, train, test, config, hooks=setup.hooks(identity), subset=subset,
                        run_dir=run_dir, resume=resume, progress=progress, on_epoch=on_epoch, stop=stop)  # fmt: skip
    res.raise_if_stopped()
    accs = {head: accuracy(model, test, device=config.device) for head, model in setup.outputs.items()}
    singles = {k: v for k, v in accs.items() if "ensemble" not in k}
    best = max(singles, key=lambda k: singles[k])
    result = OnlineResult(
        method=name, accuracies=accs, best_branch=best, best_branch_acc=singles[best],
        ensemble_acc=None if setup.ensemble is None else accs[setup.ensemble],
        acc_per_epoch=res.acc_per_epoch, loss_per_epoch=res.loss_per_epoch, seconds=time.perf_counter() - t0,
        options=opts, student=setup.student, others=setup.others,
    )  # fmt: skip
    if run_dir is not None:
        summary = {**result.summary(), "config": asdict(config), "branches": branches, "width": width}
        (Path(run_dir) / "online.json").write_text(json.dumps(summary, indent=2))
    return result
