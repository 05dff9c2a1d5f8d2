"""QKD: Jangho Kim, Yash Bhalgat, Jinwon Lee, Chirag Patel, Nojun Kwak 2019, "QKD:
Quantization-aware Knowledge Distillation", arXiv:1911.12491.

Quantization and KD combined naively can hurt: KD's regularisation further narrows an
already reduced (low-precision) representation. QKD coordinates them in three phases,
the student being quantization-aware (fake-quantized weights and activations) throughout:

1. **Self-studying (SS)**: the quantized student alone, cross-entropy only, to reach a good
   low-precision initialisation before any distillation::

       L_S = CE(z_s, y)

2. **Co-studying (CS)**: teacher and student learn from each other. The teacher (full
   precision) is *trained* with cross-entropy plus KD from the quantized student, which makes
   it "quantization-friendly" (its soft targets move towards what a low-precision student
   can represent) while the labels keep it accurate; the student learns with CE + KD from
   the teacher. Each side treats the other's logits as constants (detached)::

       L_S = alpha   * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) + (1 - alpha)   * CE(z_s, y)
       L_T = alpha_t * T^2 * KL(softmax(z_s/T) || softmax(z_t/T)) + (1 - alpha_t) * CE(z_t, y)

3. **Tutoring (TU)**: the teacher is frozen; the student learns with Hinton KD::

       L_S = alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) + (1 - alpha) * CE(z_s, y)

Every KD term above is ``student_trainer.losses.get_method("kd")`` (Hinton et al. 2015; the
teacher's CS loss is the same function with the roles of the two logit sets swapped), so
this module holds no loss formula of its own.

Then the fake-quant student is converted to a real int8 model
(``torch.ao.quantization.convert``: ``QuantizedLinear``/``QuantizedLinearReLU`` with qint8
weights, quint8 activations) and both are evaluated on the test split.

What is implemented here versus the paper
-----------------------------------------
* Quantizer: PyTorch eager-mode QAT (``torch.ao.quantization.prepare_qat``), int8 only,
  per-channel symmetric weights and per-tensor affine activations with moving-average
  min/max observers, for the CPU backends (``fbgemm``/``x86``, ``qnnpack``). The paper uses
  a trainable, QIL-style interval quantizer and targets lower bit widths (its abstract:
  +1.3% on MobileNetV2 at W4A4; full-precision accuracy recovered at W3A3 on ResNet and
  W6A6 on MobileNetV2); other bit widths are out of scope here because the result must
  ``convert`` to a runnable int8 model. Linear+ReLU (and Conv+BN+ReLU)
  pairs are fused first (``fuse_modules_qat``), so the int8 model runs them as one kernel.
* The paper starts self-studying from a pretrained full-precision student; here the
  student passed in is used as is (pass a pretrained one for the paper's setting).
* Defaults, scaled to the 1.2k-parameter digits student on 1198 samples: phase lengths
  keep the 30/100/70 (SS/CS/TU) proportion that re-implementations give for the paper's
  CIFAR-10 runs, divided by five (6/20/14 epochs); T = 2 and alpha = 0.5 (equal CE and KD
  weights, as in those re-implementations). Adam, constant learning rates; the teacher's
  CS learning rate is smaller (1e-4 vs 3e-3) because it starts trained. Assumptions, not
  checked against the paper's text (only its abstract and third-party summaries and
  re-implementations could be read): the exact loss weights (whether CE and KD are summed
  with weight 1 each, and whether KD carries T^2), T, the phase lengths, the optimiser and
  schedules (the paper trains with SGD).
* A teacher that cannot be trained here -- a soft-target source (``cache:`` or ``server:``,
  ``student_trainer.sources.SoftTargetSource``) or a module without parameters -- serves
  the tutoring phase only: co-studying refuses it with a ``ValueError`` unless
  ``QKDConfig.untrainable_teacher == "skip"``, which skips co-studying (and records it).
* The teacher is copied before co-studying: the caller's module is never modified; the
  co-studied teacher is ``QKDResult.teacher``.
* Everything runs on the CPU (quantized kernels are CPU kernels).
* Each phase is one call of the shared trainer (``student_trainer.train.train_student``)
  continuing one Adam optimiser and one batch-order generator: co-studying adds the teacher
  as a hook's extra module with its own optimiser (one backward over both detached terms),
  tutoring a loss hook, and the fake-quant evaluation an evaluate hook (observers frozen).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd.core.samples import SampleSource
from kd.core.views import model_input
from kd.student_trainer.losses import get_method
from kd.student_trainer.sources import SoftTargetSource
from kd.student_trainer.train import Hooks, StepContext, TrainConfig, accuracy, seed_everything, train_student

PHASES = ("self_studying", "co_studying", "tutoring")
BACKENDS = ("fbgemm", "x86", "qnnpack")

# Fusable runs of consecutive children of an nn.Sequential, longest first.
_FUSE_PATTERNS: tuple[tuple[type[nn.Module], ...], ...] = (
    (nn.Conv2d, nn.BatchNorm2d, nn.ReLU),
    (nn.Conv2d, nn.BatchNorm2d),
    (nn.Conv2d, nn.ReLU),
    (nn.Linear, nn.BatchNorm1d),
    (nn.Linear, nn.ReLU),
)


@dataclass
class QKDConfig:
    """Options of ``train_qkd``. Epochs of a phase may be 0 (the phase is skipped)."""

    epochs_self: int = 6
    epochs_co: int = 20
    epochs_tutor: int = 14
    lr: float = 3e-3  # student (Adam), all phases
    teacher_lr: float = 1e-4  # teacher (Adam), co-studying
    temperature: float = 2.0
    alpha: float = 0.5  # KD weight of the student's loss (CS and TU)
    teacher_alpha: float = 0.5  # KD weight of the teacher's loss (CS)
    batch_size: int = 32
    seed: int = 0
    # > 0: read (decode) training batches in this many DataLoader worker processes; results equal 0's.
    workers: int = 0
    backend: str = "auto"  # fbgemm, x86, qnnpack, or auto (the first of them this torch supports)
    # "error": co-studying with a teacher that cannot be trained here raises; "skip": it is skipped.
    untrainable_teacher: str = "error"

    def validate(self) -> None:
        for name in ("epochs_self", "epochs_co", "epochs_tutor", "batch_size", "workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0 or (name == "batch_size" and value < 1):
                raise ValueError(f"QKDConfig.{name} must be an integer >= {int(name == 'batch_size')}, got {value!r}")
        if self.epochs_self + self.epochs_co + self.epochs_tutor == 0:
            raise ValueError("QKDConfig: every phase has 0 epochs; nothing to train")
        if not (math.isfinite(self.temperature) and self.temperature > 0):  # nan passed `<= 0`
            raise ValueError(f"QKDConfig.temperature must be a finite number > 0, got {self.temperature}")
        for name in ("alpha", "teacher_alpha"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"QKDConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if not all(math.isfinite(v) and v > 0 for v in (self.lr, self.teacher_lr)):
            raise ValueError(f"QKDConfig learning rates must be > 0, got lr={self.lr}, teacher_lr={self.teacher_lr}")
        if not 0 <= self.seed < 2**32:  # numpy's range; refused by seed_everything only after --out was made
            raise ValueError(f"QKDConfig.seed must be >= 0 and < 2**32, got {self.seed}")
        if self.untrainable_teacher not in ("error", "skip"):
            raise ValueError(
                f"QKDConfig.untrainable_teacher must be 'error' or 'skip', got {self.untrainable_teacher!r}"
            )
        resolve_backend(self.backend)


@dataclass
class QKDResult:
    float_acc: float  # test accuracy of the fake-quant (QAT) student, float arithmetic
    int8_acc: float  # test accuracy of the converted int8 model
    agreement: float  # fraction of test samples on which both predict the same class
    acc_per_epoch: dict[str, list[float]]  # phase -> fake-quant student's test accuracy after each epoch
    loss_per_epoch: dict[str, list[float]]  # phase -> student's mean training loss per epoch
    teacher_acc_per_epoch: list[float]  # co-studying: the teacher's test accuracy after each epoch
    teacher_acc_before: float | None  # None: the teacher is a source, not a module
    teacher_acc_after: float | None
    skipped: list[str]  # phases that had epochs but did not run (co-studying with an untrainable teacher)
    int8_model: nn.Module
    qat_model: nn.Module  # the fake-quant student (eval mode, observers frozen)
    teacher: nn.Module | None  # the teacher after QKD (a copy; co-studied when that phase ran)
    int8_state_bytes: int  # torch.save size of the int8 model's state_dict
    float_state_bytes: int  # torch.save size of the student's float weights (what ships without quantization)
    int8_weight_bytes: int  # bytes of the tensors themselves (no container overhead)
    float_weight_bytes: int
    backend: str
    seconds: float
    config: QKDConfig = field(default_factory=QKDConfig)

    def summary(self) -> dict[str, Any]:
        """The JSON-serialisable numbers (no models)."""
        keep = ("float_acc", "int8_acc", "agreement", "acc_per_epoch", "loss_per_epoch", "teacher_acc_per_epoch",
                "teacher_acc_before", "teacher_acc_after", "skipped", "int8_state_bytes", "float_state_bytes",
                "int8_weight_bytes", "float_weight_bytes", "backend", "seconds")  # fmt: skip
        return {**{k: getattr(self, k) for k in keep}, "config": asdict(self.config)}


def resolve_backend(backend: str) -> str:
    """``auto`` -> the first of fbgemm, x86, qnnpack this torch build supports; others are checked."""
    supported = torch.backends.quantized.supported_engines
    if backend == "auto":
        for name in BACKENDS:
            if name in supported:
                return name
        raise RuntimeError(f"this torch build has no int8 CPU backend (supported engines: {supported})")
    if backend not in BACKENDS:
        raise ValueError(f"unknown quantization backend {backend!r}; use auto or one of {', '.join(BACKENDS)}")
    if backend not in supported:
        raise ValueError(f"quantization backend {backend!r} is not in this torch build (it has {supported})")
    return backend


_DEPRECATION_NOISE = (
    r".*torch\.ao\.quantization is deprecated.*",
    r".*reduce_range will be deprecated.*",
    r".*quantized tensor creation functions.*",
    r".*`torch\.jit\.\w+` is deprecated.*",
)


@contextlib.contextmanager
def quiet_quantization_warnings() -> Iterator[None]:
    """torch >= 2.10 warns on every torch.ao.quantization entry point, quantized tensor
    creation and TorchScript call (the APIs move to torchao / torch.export); the eager-mode
    API used here still works."""
    with warnings.catch_warnings():
        for pattern in _DEPRECATION_NOISE:
            warnings.filterwarnings("ignore", message=pattern)
        yield


class QATStudent(nn.Module):
    """A float student between a QuantStub and a DeQuantStub: eager-mode quantization
    quantizes the input once, runs every layer in int8 and dequantizes the logits."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        from torch.ao.quantization import DeQuantStub, QuantStub

        self.quant = QuantStub()
        self.body = body
        self.dequant = DeQuantStub()
        if hasattr(body, "input_shape"):
            self.input_shape = tuple(body.input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.body(self.quant(x)))


def fusable_groups(model: nn.Module) -> list[list[str]]:
    """Names of each run of consecutive nn.Sequential children that fuse (Linear+ReLU,
    Conv+BN[+ReLU], ...), for ``torch.ao.quantization.fuse_modules_qat``."""
    groups: list[list[str]] = []
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        i = 0
        while i < len(names):
            for pattern in _FUSE_PATTERNS:
                run = names[i : i + len(pattern)]
                if len(run) == len(pattern) and all(type(module._modules[n]) is t for n, t in zip(run, pattern)):
                    groups.append([f"{prefix}.{n}" if prefix else n for n in run])
                    i += len(pattern)
                    break
            else:
                i += 1
    return groups


def prepare_qat_student(student: nn.Module, backend: str = "auto") -> QATStudent:
    """A copy of ``student``, wrapped (QATStudent), fused and prepared for quantization-aware
    training on ``backend``: fake-quantized weights and activations from now on."""
    from torch.ao.quantization import fuse_modules_qat, get_default_qat_qconfig, prepare_qat

    backend = resolve_backend(backend)
    model = QATStudent(copy.deepcopy(student)).train()
    with quiet_quantization_warnings():
        groups = fusable_groups(model)
        if groups:
            model = fuse_modules_qat(model, groups)
        model.qconfig = get_default_qat_qconfig(backend)
        prepare_qat(model, inplace=True)
    return model


def convert_int8(qat_model: nn.Module, backend: str = "auto") -> nn.Module:
    """The real int8 model of a fake-quant student (a copy; ``qat_model`` is unchanged)."""
    from torch.ao.quantization import convert

    backend = resolve_backend(backend)
    torch.backends.quantized.engine = backend
    with quiet_quantization_warnings():
        return convert(copy.deepcopy(qat_model).eval(), inplace=False)


def _observers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "observer_enabled") and hasattr(m, "fake_quant_enabled")]


@torch.no_grad()
def qat_accuracy(model: nn.Module, data: SampleSource) -> float:
    """Test accuracy of a fake-quant model without letting the test data move its observers."""
    obs = _observers(model)
    saved = [o.observer_enabled.clone() for o in obs]
    for o in obs:
        o.observer_enabled.fill_(0)
    was_training = model.training
    try:
        return accuracy(model, data)
    finally:
        for o, s in zip(obs, saved):
            o.observer_enabled.copy_(s)
        model.train(was_training)


@torch.no_grad()
def _agreement(a: nn.Module, b: nn.Module, data: SampleSource, batch_size: int = 1024) -> float:
    """Fraction of ``data`` on which ``a`` and ``b`` predict the same class, read batch by batch."""
    same = 0
    for s in range(0, len(data), batch_size):
        x = data.get(torch.arange(s, min(s + batch_size, len(data))))
        same += int((a(x).argmax(1) == b(x).argmax(1)).sum())
    return same / len(data)


def _state_bytes(state: dict[str, Any]) -> int:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getbuffer().nbytes


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def int8_payload_bytes(int8_model: nn.Module) -> int:
    """Bytes of the int8 model's tensors themselves: int8 weights, their per-channel scales
    and zero points, the (float) biases, each layer's output scale and zero point."""
    from torch.ao.nn.quantized.modules.linear import LinearPackedParams

    total = 0
    with quiet_quantization_warnings():
        for m in int8_model.modules():
            weight_bias = getattr(m, "_weight_bias", None)
            if callable(weight_bias) and not isinstance(m, LinearPackedParams):  # counted with its Linear
                w, b = weight_bias()
                total += _tensor_bytes(w) + _tensor_bytes(b)
                if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                    total += _tensor_bytes(w.q_per_channel_scales()) + _tensor_bytes(w.q_per_channel_zero_points())
                else:
                    total += 16  # one float64 scale, one int64 zero point
            if isinstance(getattr(m, "scale", None), (float, torch.Tensor)):
                total += 16
    return total


def _teacher_module(teacher: nn.Module | SoftTargetSource | Any) -> nn.Module | SoftTargetSource:
    """A module or a source; a ``teacher_server.loading.Teacher`` gives its model."""
    if isinstance(teacher, (nn.Module, SoftTargetSource)):
        return teacher
    model = getattr(teacher, "model", None)
    if isinstance(model, nn.Module):
        return model
    raise TypeError(
        f"teacher must be an nn.Module, a loaded Teacher or a SoftTargetSource, not {type(teacher).__name__}"
    )


def _untrainable_reason(teacher: nn.Module | SoftTargetSource) -> str | None:
    if isinstance(teacher, SoftTargetSource):
        return (
            f"the teacher is a {teacher.name!r} source (precomputed or remote soft targets), "
            "which cannot be trained here"
        )
    if not any(True for _ in teacher.parameters()):
        return f"the teacher ({type(teacher).__name__}) has no parameters to train"
    return None


def _check_logits(who: str, out: torch.Tensor, num_classes: int) -> None:
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] != num_classes:
        shape = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the {who} returns {shape} per sample; expected logits of shape ({num_classes},)")


def _teacher_identity(teacher: nn.Module | SoftTargetSource) -> str:
    """A source's fingerprint, or a hash of a module's weights (a resume must have the same teacher)."""
    if isinstance(teacher, SoftTargetSource):
        return str(teacher.fingerprint)
    h = hashlib.sha256()
    for name, t in teacher.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def train_qkd(
    student: nn.Module,
    teacher: nn.Module | SoftTargetSource | Any,
    train: SampleSource,
    test: SampleSource,
    config: QKDConfig | None = None,
    *,
    on_phase_end: Callable[[str, nn.Module, nn.Module | None], None] | None = None,
    on_epoch: Callable[[str, int, float, float], None] | None = None,
    stop: Callable[[], int | None] | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
) -> QKDResult:
    """Train a quantization-aware copy of ``student`` with QKD's three phases, then convert it to int8.

    ``teacher``: an ``nn.Module`` (trained in co-studying -- a copy of it), a loaded
    ``teacher_server.loading.Teacher``, or a ``SoftTargetSource`` (tutoring only; see
    ``QKDConfig.untrainable_teacher``). ``student`` is not modified. ``on_phase_end(phase,
    qat_student, teacher)`` runs after each phase that ran; ``on_epoch(phase, epoch, loss,
    test_acc)`` after each epoch. ``stop``: as ``train_student``'s, asked before every step of every
    phase; a stopped run raises ``kd.core.signals.Stopped`` there (no later phase, no conversion).

    ``run_dir``: each phase is a ``train_student`` run in ``run_dir/<phase>`` (config.json,
    metrics.csv, checkpoint.pt after every epoch and at a stop: the QAT student with its observers,
    the shared optimiser and batch order, co-studying's teacher and its optimiser). ``resume``:
    the phases that finished are loaded from their last checkpoint, the one that was stopped
    continues from its step, the rest run: the result is the uninterrupted run's. A run without
    ``resume`` removes an older run's checkpoints first (one of its later phases must not be taken
    for this run's)."""
    config = config or QKDConfig()
    config.validate()
    backend = resolve_backend(config.backend)
    teacher = _teacher_module(teacher)
    kd = get_method("kd")
    if len(train) == 0 or len(test) == 0:
        raise ValueError("train_qkd needs non-empty train and test datasets")
    if train.num_classes != test.num_classes:
        raise ValueError(f"train has {train.num_classes} classes but test has {test.num_classes}")
    reason = _untrainable_reason(teacher)
    skipped: list[str] = []
    epochs = {"self_studying": config.epochs_self, "co_studying": config.epochs_co, "tutoring": config.epochs_tutor}
    if reason is not None and config.epochs_co > 0:
        if config.untrainable_teacher == "error":
            raise ValueError(
                f"QKD co-studying trains the teacher, but {reason}. Give a local teacher module "
                "(e.g. kd qkd --teacher module:factory@WEIGHTS), or skip the phase "
                "(epochs_co=0, or untrainable_teacher='skip' / --skip-co-studying)"
            )
        skipped.append("co_studying")
        epochs["co_studying"] = 0
    if isinstance(teacher, SoftTargetSource) and teacher.num_classes != train.num_classes:
        raise ValueError(f"the teacher source has {teacher.num_classes} classes, the dataset {train.num_classes}")

    t0 = time.perf_counter()
    seed_everything(config.seed)
    torch.backends.quantized.engine = backend
    probe = train.get(torch.arange(min(2, len(train))))  # two samples, not the dataset
    with torch.no_grad():
        _check_logits("student", copy.deepcopy(student).eval()(model_input(probe)), train.num_classes)
    qat = prepare_qat_student(student, backend)

    local_teacher: nn.Module | None = None
    teacher_acc_before = None
    if isinstance(teacher, nn.Module):
        local_teacher = copy.deepcopy(teacher)
        for p in local_teacher.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            _check_logits("teacher", local_teacher.eval()(probe), train.num_classes)
        teacher_acc_before = accuracy(local_teacher, test)

    # One optimiser and one batch-order generator across the phases, continued by each call of
    # the shared trainer (student_trainer.train.train_student); each phase is a loss hook.
    opt = torch.optim.Adam(qat.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    if resume and run_dir is None:
        raise ValueError("resume continues the run in run_dir: give run_dir")
    phase_dirs = {p: None if run_dir is None else Path(run_dir) / p for p in PHASES}
    if run_dir is not None and not resume:
        for d in phase_dirs.values():
            (d / "checkpoint.pt").unlink(missing_ok=True)
    # What a phase's checkpoint must have been written under besides the trainer's own config: the
    # QKD options (workers read batches, they change nothing) and the teacher's weights.
    identity = {k: v for k, v in asdict(config).items() if k != "workers"}
    # (hashing a large teacher's weights takes time: only a run that writes checkpoints needs it)
    identity["teacher"] = _teacher_identity(teacher) if run_dir is not None else ""

    def restore(state: dict) -> None:
        """A phase's checkpoint's own state: checked to be of this run, and the teacher's accuracies."""
        saved = state.get("qkd", {})
        if saved != identity:
            diff = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
            raise ValueError(f"cannot resume {str(run_dir)!r}: its checkpoints are of another QKD run ("
                             + "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {identity.get(k)!r}" for k in diff)
                             + ")")  # fmt: skip
        teacher_acc_per_epoch[:] = [float(a) for a in state["teacher_acc"]]

    opts = {"temperature": config.temperature, "alpha": config.alpha}
    t_opts = {"temperature": config.temperature, "alpha": config.teacher_alpha}
    acc_per_epoch: dict[str, list[float]] = {p: [] for p in PHASES}
    loss_per_epoch: dict[str, list[float]] = {p: [] for p in PHASES}
    teacher_acc_per_epoch: list[float] = []

    def co_studying(ctx: StepContext) -> dict[str, torch.Tensor]:
        assert local_teacher is not None
        z_s = ctx.model(ctx.inputs)
        z_t = local_teacher(ctx.inputs)
        # each side learns from the other's detached logits: one backward over both terms
        return {
            "loss": kd(z_s, z_t.detach(), ctx.labels, **opts),
            "teacher": kd(z_t, z_s.detach(), ctx.labels, **t_opts),
        }

    def tutoring(ctx: StepContext) -> torch.Tensor:
        targets = ctx.teacher_logits
        if targets is None:  # a local module: the frozen teacher's logits
            assert local_teacher is not None
            local_teacher.eval()
            with torch.no_grad():
                targets = local_teacher(ctx.inputs)
        return kd(ctx.model(ctx.inputs), targets, ctx.labels, **opts)

    for phase in PHASES:
        if epochs[phase] == 0:
            continue
        hooks = Hooks(evaluate=lambda model, data: qat_accuracy(model, data))
        source = None
        method = "ce"
        if phase == "co_studying":
            assert local_teacher is not None
            for p in local_teacher.parameters():
                p.requires_grad_(True)
            hooks.extra = [(local_teacher, torch.optim.Adam(local_teacher.parameters(), lr=config.teacher_lr))]
            hooks.loss = co_studying

            def both_accuracies(model: nn.Module, data: SampleSource) -> float:
                # the teacher's with the student's evaluation, before the epoch's checkpoint holds both
                teacher_acc_per_epoch.append(accuracy(local_teacher, test))
                return qat_accuracy(model, data)

            hooks.evaluate = both_accuracies
        elif phase == "tutoring":
            if local_teacher is not None:
                for p in local_teacher.parameters():
                    p.requires_grad_(False)
            method, hooks.loss = "kd", tutoring
            source = teacher if isinstance(teacher, SoftTargetSource) else None

        def report(epoch: int, loss: float, acc: float, phase: str = phase) -> None:
            if on_epoch is not None:
                on_epoch(phase, epoch, loss, acc)

        hooks.state = lambda: {"qkd": identity, "teacher_acc": list(teacher_acc_per_epoch)}
        hooks.load_state = restore
        cfg = TrainConfig(method=method, epochs=epochs[phase], batch_size=config.batch_size, lr=config.lr,
                          seed=config.seed, workers=config.workers)  # fmt: skip
        here = phase_dirs[phase]
        res = train_student(qat, train, test, cfg, source=source, hooks=hooks, optimizer=opt, generator=gen,
                            on_epoch=report, stop=stop, run_dir=here,
                            resume=resume and here is not None and (here / "checkpoint.pt").exists())  # fmt: skip
        res.raise_if_stopped(f"in phase {phase}, ")
        acc_per_epoch[phase] = list(res.acc_per_epoch)
        loss_per_epoch[phase] = list(res.loss_per_epoch)
        if local_teacher is not None:
            for p in local_teacher.parameters():
                p.requires_grad_(False)
            local_teacher.eval()
        if on_phase_end is not None:
            on_phase_end(phase, qat, local_teacher)

    # Freeze the observers: the fake-quant model evaluated and the int8 model use the same qparams.
    for o in _observers(qat):
        o.observer_enabled.fill_(0)
    qat.eval()
    int8 = convert_int8(qat, backend)
    float_acc = qat_accuracy(qat, test)
    int8_acc = accuracy(int8, test)
    agreement = _agreement(qat, int8, test)
    float_weights = {k: p.detach().clone() for k, p in qat.named_parameters()}
    int8_state = int8.state_dict()
    return QKDResult(
        float_acc=float_acc,
        int8_acc=int8_acc,
        agreement=agreement,
        acc_per_epoch=acc_per_epoch,
        loss_per_epoch=loss_per_epoch,
        teacher_acc_per_epoch=teacher_acc_per_epoch,
        teacher_acc_before=teacher_acc_before,
        teacher_acc_after=None if local_teacher is None else accuracy(local_teacher, test),
        skipped=skipped,
        int8_model=int8,
        qat_model=qat,
        teacher=local_teacher,
        int8_state_bytes=_state_bytes(int8_state),
        float_state_bytes=_state_bytes(float_weights),
        int8_weight_bytes=int8_payload_bytes(int8),
        float_weight_bytes=_tensor_bytes(float_weights),
        backend=backend,
        seconds=time.perf_counter() - t0,
        config=config,
    )
