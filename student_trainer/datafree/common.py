"""What every data-free method shares: the served teacher as a (differentiable) function,
a generator, the KD step on synthetic inputs, evaluation and the result record.

The student is trained by the shared trainer (``kd.student_trainer.train.train_student``):
``Run.train`` hands it a method's batch source (``Hooks.batches``: one "round" of the method --
a generator step, a synthesised batch -- and the student batches it yields), the method's loss
on them (``Hooks.loss``) and its generator as an extra module, so the recipe (optimiser,
schedule, AMP, clipping), the run directory and the evaluation are the trainer's. One trainer
epoch is ``eval_every`` rounds (all ``steps`` when 0); a method's own recipe defaults (SGD,
cosine, clipping, a step schedule at fractions of the run) fill the fields the config leaves at
their defaults.

``ServedTeacher(client, name)(x)`` returns the teacher's logits for ``x`` and is
differentiable with respect to ``x``: the backward pass asks the server for the input
gradient (``InputGradient``, WHITE tier) with the upstream gradient autograd computed on
the client. So a generator-based method is written as ordinary PyTorch -- the teacher
just lives on another machine. ``bn_loss(x)`` is DeepInversion's BatchNorm regulariser
computed server-side, differentiable the same way.
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from kd.core.samples import SampleSource
from kd.student_trainer import optim
from kd.student_trainer.evaluate import evaluate as evaluate_source
from kd.student_trainer.train import Hooks, TrainConfig, train_student
from kd.teacher_server.client import TeacherClient, Usage


@dataclass
class DataFreeConfig:
    """Shared knobs; each method documents what its ``steps`` are and adds its own options."""

    steps: int = 200  # outer iterations (generator/student rounds, or synthesis batches)
    batch_size: int = 64
    lr: float = 1e-3  # the student's base learning rate
    generator_lr: float = 1e-3
    temperature: float = 4.0  # KD temperature on synthetic inputs
    seed: int = 0
    device: str = "cpu"
    eval_every: int = 0  # evaluate on the test set every N steps (0: only at the end); one trainer epoch
    # The student's recipe (``student_trainer.optim.Recipe``, the shared trainer's fields); a method's
    # own defaults (e.g. dafl's student_optimizer="sgd", zskt's cosine) fill those left at these values.
    optimizer: str = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    schedule: str = "constant"
    milestones: list[int] = field(default_factory=list)  # multistep: epochs of eval_every steps
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    amp: str = "fp32"
    channels_last: bool = False
    clip_grad_norm: float = 0.0
    run_dir: str | None = None  # the trainer's config.json, metrics.csv (one row per epoch), checkpoint.pt
    # Continue run_dir's run from its last whole epoch (``Run.keep``: the method's own state comes back too).
    resume: bool = False
    # Asked before every student step (``train_student``'s ``stop``: a SIGTERM handler's record); once it
    # answers a signal number the run raises ``kd.core.signals.Stopped`` there; run_dir keeps the last
    # whole epoch's checkpoint, which ``resume`` continues from.
    stop: Callable[[], int | None] | None = field(default=None, repr=False, compare=False)

    def validate(self, method: str) -> None:
        """The shared knobs, before the teacher is asked anything (a method checks its own options)."""
        if self.steps < 1:
            raise ValueError(f"{method}: steps must be >= 1, got {self.steps}")
        if self.batch_size < 1 or self.eval_every < 0:  # eval_every -1 ran and evaluated only at the end
            raise ValueError(f"{method}: batch_size must be >= 1 and eval_every >= 0, got {self.batch_size} and "
                             f"{self.eval_every}")  # fmt: skip
        # generator_lr inf and temperature -1 trained to a NaN student that exited 0
        if not (math.isfinite(self.generator_lr) and self.generator_lr >= 0):
            raise ValueError(f"{method}: generator_lr must be a finite number >= 0, got {self.generator_lr}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"{method}: temperature must be a finite number > 0, got {self.temperature}")


@dataclass
class DataFreeResult:
    method: str
    test_acc: float
    # Teacher queries this run spent, as the server counted them.
    samples: int
    gradient_samples: int
    seconds: float
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, test accuracy)
    synthetic: torch.Tensor | None = None  # a few synthesised inputs, for inspection

    def as_dict(self) -> dict:
        return {"method": self.method, "test_acc": self.test_acc, "samples": self.samples,
                "gradient_samples": self.gradient_samples, "queries": self.samples + self.gradient_samples,
                "seconds": round(self.seconds, 2), "history": self.history}  # fmt: skip


class ServedTeacher:
    """A teacher behind ``kd serve``, as the data-free methods use it."""

    def __init__(self, client: TeacherClient, name: str | None = None) -> None:
        desc = client.describe(name)
        # Every later forward (Infer) must come from these weights: gRPC reconnects silently to a server
        # restarted at the address, which may hold other ones (TeacherChangedError then; gradient, BN-loss
        # and synthesis replies carry no fingerprint). Not for a teacher taking live weight updates, whose
        # fingerprint changes by design (as ServerSource).
        if not desc.accepts_weights:
            client.expect_fingerprint(desc.name, desc.fingerprint)
        self.client = client
        self.name = desc.name
        self.num_classes = desc.num_classes
        self.input_shape = tuple(desc.input_shape)
        self.access = desc.access
        self.layers = dict(desc.layers)
        self.batch_norms = tuple(desc.batch_norms)
        self.has_activation_records = desc.has_activation_records
        self.fingerprint = desc.fingerprint  # a resumed run must query the same weights
        # Forward-only queries go in slices of the server's batch size: a method may ask about
        # thousands of inputs at once (zsdb3kd's boundary search), more than a server queues.
        self.chunk = max(1, int(desc.max_batch_size or 256))
        self._start = client.usage

    # -- shapes ------------------------------------------------------------------------
    def to_wire(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the teacher's declared per-sample shape (a view), on the CPU, detached."""
        x = x.detach().to("cpu", torch.float32)
        if tuple(x.shape[1:]) != self.input_shape:
            if x[0].numel() != math.prod(self.input_shape):
                raise ValueError(f"inputs of shape {list(x.shape)} do not fit teacher input {list(self.input_shape)}")
            x = x.reshape(len(x), *self.input_shape)
        return x.contiguous()

    # -- queries -----------------------------------------------------------------------
    def _sliced(self, x: torch.Tensor, key: str, **asked: object) -> torch.Tensor:
        w = self.to_wire(x)
        starts = range(0, len(w), self.chunk) if len(w) else [0]  # an empty batch: the server's own refusal
        parts = [self.client.infer(self.name, w[i : i + self.chunk], **asked)[key] for i in starts]
        return torch.cat(parts).to(x.device)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (SCORES tier), on ``x``'s device; no gradient."""
        return self._sliced(x, "logits")

    @torch.no_grad()
    def labels(self, x: torch.Tensor) -> torch.Tensor:
        """The argmax class only (LABELS tier)."""
        return self._sliced(x, "labels", logits=False, labels=True)

    def __call__(self, x: torch.Tensor, features: tuple[str, ...] = ()):
        """Logits (and named features), differentiable w.r.t. ``x`` through the server's VJP."""
        reduced = [f for f in features if "@" in f]
        if reduced and torch.is_grad_enabled() and x.requires_grad:
            raise ValueError(
                f"features {reduced} are statistics the server computes without a gradient path; ask for the "
                "layer itself (and reduce it here) when the loss must flow back to the inputs"
            )
        outs = _TeacherFunction.apply(self, tuple(features), x)
        return outs[0] if not features else (outs[0], dict(zip(features, outs[1:])))

    def bn_loss(self, x: torch.Tensor, *, state_id: str = "", momentum: float = 0.0, ttl: float = 600.0):
        """DeepInversion's BN-statistics loss of the batch, computed server-side; differentiable."""
        return _BNLossFunction.apply(self, state_id, momentum, ttl, x)

    def records(self) -> dict[str, torch.Tensor]:
        return self.client.activation_records(self.name)[0]

    def bn_stats(self) -> dict[str, torch.Tensor]:
        return self.client.batchnorm_stats(self.name)

    # -- accounting --------------------------------------------------------------------
    @property
    def usage(self) -> Usage:
        """Queries since this object was made (the server's counters, per client)."""
        now = self.client.usage
        return Usage(now.client, now.samples - self._start.samples,
                     now.gradient_samples - self._start.gradient_samples, now.budget)  # fmt: skip


class _TeacherFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, teacher: ServedTeacher, features: tuple[str, ...], x: torch.Tensor):
        wire = teacher.to_wire(x)
        out = teacher.client.infer(teacher.name, wire, features=list(features))
        ctx.teacher, ctx.features, ctx.x_shape, ctx.device = teacher, features, x.shape, x.device
        ctx.save_for_backward(x.detach())
        return tuple(t.to(x.device) for t in (out["logits"], *(out[f"feature/{f}"] for f in features)))

    @staticmethod
    def backward(ctx, g_logits: torch.Tensor, *g_feats: torch.Tensor):
        (x,) = ctx.saved_tensors
        teacher: ServedTeacher = ctx.teacher
        upstream = {"logits": g_logits.detach().cpu()}
        for name, g in zip(ctx.features, g_feats):
            upstream[f"feature/{name}"] = g.detach().cpu()
        grad, _ = teacher.client.input_gradient(teacher.name, teacher.to_wire(x), upstream)
        return None, None, grad.reshape(ctx.x_shape).to(ctx.device)


class _BNLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, teacher: ServedTeacher, state_id: str, momentum: float, ttl: float, x: torch.Tensor):
        res = teacher.client.batchnorm_loss(teacher.name, teacher.to_wire(x), state_id=state_id, momentum=momentum,
                                            ttl_seconds=ttl)  # fmt: skip
        ctx.save_for_backward(res.input_grad.reshape(x.shape).to(x.device))
        return x.new_tensor(res.loss)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return None, None, None, None, g * grad


class Generator(nn.Module):
    """DAFL's image generator (Chen et al. 2019, after DCGAN): z -> linear -> 2x upsampling
    conv blocks -> tanh -> BatchNorm without affine (outputs standardised per channel),
    sized for ``shape`` = (C, H, W) with H, W multiples of 4."""

    def __init__(self, shape: tuple[int, ...], nz: int = 100, width: int = 64) -> None:
        super().__init__()
        if len(shape) != 3 or shape[1] % 4 or shape[2] % 4:
            raise ValueError(f"the generator makes [C, H, W] images with H, W multiples of 4, got {list(shape)}")
        self.shape, self.nz = tuple(shape), nz
        c, h, w = shape
        self.init = (h // 4, w // 4)
        self.l1 = nn.Linear(nz, 2 * width * self.init[0] * self.init[1])
        self.width = width
        self.blocks = nn.Sequential(
            nn.BatchNorm2d(2 * width),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, c, 3, padding=1),
            nn.Tanh(),
            nn.BatchNorm2d(c, affine=False),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.l1(z).view(len(z), 2 * self.width, *self.init)
        return self.blocks(x)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD, T^2 * KL(softmax(t/T) || softmax(s/T)), batch mean."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, 1), F.log_softmax(teacher_logits / t, 1), reduction="batchmean",
                    log_target=True) * t * t  # fmt: skip


@torch.no_grad()
def evaluate(student: nn.Module, test: SampleSource | None, device: str = "cpu") -> float:
    """Top-1 accuracy on ``test`` (NaN without one), by ``kd.student_trainer.evaluate``."""
    if test is None:
        return float("nan")
    return evaluate_source(student, test, batch_size=1024, device=device).top1


RECIPE_FIELDS = ("optimizer", "weight_decay", "momentum", "nesterov", "schedule", "milestones", "gamma",
                 "warmup_epochs", "amp", "channels_last", "clip_grad_norm")  # fmt: skip


def recipe_fields(config: DataFreeConfig, asks: dict[str, object] | None = None) -> dict[str, object]:
    """The student's recipe: ``config``'s fields, where a field still has DataFreeConfig's default
    value replaced by the method's ask (``asks``: e.g. ``{"optimizer": "sgd", "schedule": "cosine"}``)."""
    defaults = {f.name: (f.default_factory() if callable(f.default_factory) else f.default)
                for f in fields(DataFreeConfig)}  # fmt: skip
    out = {k: getattr(config, k) for k in RECIPE_FIELDS}
    for k, v in (asks or {}).items():
        if k not in out:
            raise KeyError(f"{k!r} is not a recipe field")
        if v is not None and out[k] == defaults[k]:
            out[k] = v
    return out


def epoch_plan(config: DataFreeConfig, recipe: dict, fractions: Iterable[float] = ()) -> tuple[int, list[int]]:
    """(rounds per trainer epoch, multistep milestones in epochs). An epoch is ``eval_every`` rounds
    (all when 0); a method's step schedule at ``fractions`` of the run (multistep without milestones)
    shortens the epoch to a common divisor so each milestone starts an epoch."""
    steps = config.steps
    per = config.eval_every if 0 < config.eval_every < steps else steps
    milestones = list(recipe["milestones"])
    if recipe["schedule"] == "multistep" and not milestones:
        rounds = sorted({math.ceil(f * steps) for f in fractions if 0 < math.ceil(f * steps) < steps})
        for r in rounds:
            per = math.gcd(per, r)
        milestones = [r // per for r in rounds]
        if not milestones:  # no milestone inside the run: a constant rate
            recipe["schedule"] = "constant"
    return per, milestones


# Values in one synthetic batch (2**31: 8 GiB as float32, a batch of 699,050 CIFAR images): the
# batch, its generator's activations and its gradients are allocated at once, so a mistyped
# --batch-size was tried as one allocation of terabytes at the first step.
MAX_BATCH_VALUES = 1 << 31


class Run:
    """One method run: seeding, timing, the student's training by the shared trainer, the result."""

    def __init__(self, method: str, teacher: ServedTeacher, student: nn.Module, config: DataFreeConfig,
                 test: SampleSource | None) -> None:  # fmt: skip
        config.validate(method)
        values = config.batch_size * math.prod(max(d, 1) for d in teacher.input_shape)
        if not 1 <= config.batch_size or values > MAX_BATCH_VALUES:
            raise ValueError(f"{method}: batch_size {config.batch_size} of inputs {list(teacher.input_shape)} must be "
                             f">= 1 and hold at most {MAX_BATCH_VALUES:,} values (2**31), got {values:,}")  # fmt: skip
        if config.resume and config.run_dir is None:  # before any query; else it silently starts over
            raise ValueError(f"{method}: resume continues the run in run_dir: give run_dir")
        self.method, self.teacher, self.student, self.config, self.test = method, teacher, student, config, test
        self.t0 = time.perf_counter()
        self.history: list[tuple[int, float]] = []
        self.last_loss = float("nan")  # the student's last step loss
        self.options: dict[str, object] = {}
        self.kept: dict[str, object] = {}
        # Teacher queries of the epochs a resumed run's checkpoint holds, and the client's count when
        # it was loaded: the result counts the run's queries as an uninterrupted run's.
        self.queries_before = (0, 0)
        self.usage_at_resume: Usage | None = None
        torch.manual_seed(config.seed)

    def keep(self, options: dict[str, object], **state: object) -> None:
        """What a resumed run needs beyond the student, its optimiser, the ``extra`` modules and
        torch's generator (which the trainer's checkpoint holds): ``options``, the method's options
        (a resume with others is refused), and ``state``, the method's own objects that live across
        epochs (``torch.Generator``s, lists of tensors such as a transfer set, dicts of tensors and
        numbers, objects with ``state_dict``/``load_state_dict``: a bank, a meta-optimiser). They
        are saved with every epoch's checkpoint and given back in place on ``config.resume``."""
        self.options = dict(options)
        self.kept = dict(state)

    def train(
        self,
        batches: Callable[[int, int], Iterable[tuple]],
        loss: Callable,
        *,
        steps_per_round: int | Callable[[int], int] = 1,
        extra: Iterable[tuple[nn.Module, torch.optim.Optimizer]] = (),
        asks: dict[str, object] | None = None,
        fractions: Iterable[float] = (),
    ) -> None:
        """Train the student with ``train_student`` on ``batches(first_round, end_round)`` (the
        student batches of those rounds, ``(inputs, labels or None[, teacher_logits])``; the
        iterator runs the method's own updates between them) with ``loss(ctx)``. ``extra``: the
        generator(s) with their optimisers (the schedule scales them too); ``asks``: the method's
        recipe defaults (``recipe_fields``); ``fractions``: where a method's step schedule falls."""
        c = self.config
        recipe = recipe_fields(c, asks)
        per, milestones = epoch_plan(c, recipe, fractions)
        recipe["milestones"] = milestones
        epochs = -(-c.steps // per)
        count = steps_per_round if callable(steps_per_round) else (lambda _r, n=steps_per_round: n)
        spe = max(sum(count(r) for r in range(e * per, min((e + 1) * per, c.steps))) for e in range(epochs))

        def checked(ctx):
            out = loss(ctx)
            value = float((out["loss"] if isinstance(out, dict) else out).detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"{self.method}: non-finite student loss {value} in epoch {ctx.epoch}")
            return out

        def on_step(_epoch: int, _step: int, value: float, _lr: float) -> None:
            self.last_loss = value

        config = TrainConfig(method="kd", method_options={"datafree": self.method}, epochs=epochs,
                             batch_size=c.batch_size, lr=c.lr, seed=c.seed, device=c.device, **recipe)  # fmt: skip
        extra = list(extra)
        schedule = optim.recipe_of(config)
        scheduled = schedule.schedule != "constant" or schedule.warmup_epochs > 0

        def feed(epoch: int):
            """The epoch's batches; before each is made, the extra optimisers get the rate of the
            student step it feeds (the trainer sets the same one before that step), so a generator
            step made in the iterator between student steps s-1 and s follows step s's rate."""
            items = iter(batches(epoch * per, min((epoch + 1) * per, c.steps)))
            for step in itertools.count():
                if scheduled:
                    factor = optim.lr_factor(schedule, epoch, step, max(spe, 1), epochs)
                    for _, o in extra:
                        for group in o.param_groups:
                            group["lr"] = group["initial_lr"] * factor
                item = next(items, None)
                if item is None:
                    return
                yield item

        no_test = None if self.test is not None else (lambda _m, _d: float("nan"))
        # resumable=False: a round's iterator state (mid-epoch) is in no checkpoint, so a stop leaves
        # the run directory's last whole epoch, which ``resume`` continues from (state: ``keep``).
        hooks = Hooks(extra=extra, loss=checked, on_step=on_step, steps_per_epoch=max(spe, 1),
                      batches=feed, evaluate=no_test, state=self._state, load_state=self._load_state,
                      resumable=False)  # fmt: skip
        res = train_student(self.student, None, self.test, config, hooks=hooks, run_dir=c.run_dir, stop=c.stop,
                            resume=c.resume)  # fmt: skip
        res.raise_if_stopped()
        # Every epoch's evaluation (a resumed run's earlier ones from its checkpoint) at the rounds it ends.
        for epoch, acc in enumerate(res.acc_per_epoch):
            done = min((epoch + 1) * per, c.steps)
            if done == c.steps or (c.eval_every and done % c.eval_every == 0):
                self.history.append((done, acc))

    # -- resume ------------------------------------------------------------------------
    def _identity(self) -> dict[str, object]:
        c = self.config
        return {"method": self.method, "options": {k: _identity_value(v) for k, v in sorted(self.options.items())},
                "steps": c.steps, "batch_size": c.batch_size, "generator_lr": c.generator_lr,
                "temperature": c.temperature, "eval_every": c.eval_every,
                "teacher": self.teacher.name, "teacher_fingerprint": self.teacher.fingerprint}  # fmt: skip

    def _queries(self) -> tuple[int, int]:
        u, base = self.teacher.usage, self.usage_at_resume
        if base is None:
            return u.samples, u.gradient_samples
        return (self.queries_before[0] + u.samples - base.samples,
                self.queries_before[1] + u.gradient_samples - base.gradient_samples)  # fmt: skip

    def _state(self) -> dict:
        return {"identity": self._identity(), "last_loss": self.last_loss, "queries": list(self._queries()),
                "kept": {k: _dump(v) for k, v in self.kept.items()}}  # fmt: skip

    def _load_state(self, saved: dict) -> None:
        ident, now = saved.get("identity", {}), self._identity()
        if ident != now:
            diff = sorted(k for k in set(ident) | set(now) if ident.get(k) != now.get(k))
            raise ValueError(
                "cannot resume: the checkpoint is of another data-free run ("
                + "; ".join(f"{k}: checkpoint {ident.get(k)!r}, now {now.get(k)!r}" for k in diff)
                + ")"
            )
        missing = sorted(set(self.kept) - set(saved.get("kept", {})))
        if missing:
            raise ValueError(f"cannot resume: the checkpoint holds no {', '.join(missing)} of {self.method}")
        for name, obj in self.kept.items():
            _restore(obj, saved["kept"][name], self.config.device)
        self.last_loss = float(saved["last_loss"])
        self.queries_before = (int(saved["queries"][0]), int(saved["queries"][1]))
        self.usage_at_resume = self.teacher.usage

    def result(self, synthetic: torch.Tensor | None = None) -> DataFreeResult:
        acc = self.history[-1][1] if self.history else evaluate(self.student, self.test, self.config.device)
        samples, gradient_samples = self._queries()
        keep = None if synthetic is None else synthetic[:16].detach().cpu()
        return DataFreeResult(self.method, acc, samples, gradient_samples, time.perf_counter() - self.t0,
                              self.history, keep)  # fmt: skip


def given_options(fn: Callable, scope: dict[str, object]) -> dict[str, object]:
    """A method's keyword-only options as its ``run`` got them (``scope``: its ``locals()``)."""
    return {k: scope[k] for k, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY
            and k != "test"}  # fmt: skip


def _identity_value(value: object) -> object:
    """An option as a resume compares it: a module or callable given in Python (a generator to
    continue, a log callback) is compared as given or not: its weights are part of the state."""
    if isinstance(value, nn.Module) or callable(value):
        return "<object>"
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return repr(value)


def _dump(obj: object) -> dict:
    """``obj`` (see ``Run.keep``) as tensors and plain containers (checkpoints are read weights_only)."""
    if isinstance(obj, torch.Generator):
        return {"rng": obj.get_state()}
    if isinstance(obj, list):
        return {"list": [t.detach().cpu() if isinstance(t, torch.Tensor) else t for t in obj]}
    if isinstance(obj, dict):
        return {"dict": {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in obj.items()}}
    if hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict"):
        return {"state": obj.state_dict()}
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}")


def _restore(obj: object, saved: dict, device: str) -> None:
    """Put ``_dump``'s ``saved`` back into ``obj`` in place (lists' tensors on ``device``, as made)."""
    if isinstance(obj, torch.Generator):
        obj.set_state(saved["rng"])
    elif isinstance(obj, list):
        obj[:] = [t.to(device) if isinstance(t, torch.Tensor) else t for t in saved["list"]]
    elif isinstance(obj, dict):
        obj.clear()
        obj.update(saved["dict"])
    else:
        obj.load_state_dict(saved["state"])
