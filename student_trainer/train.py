"""The training loop: a student, a method (loss), an optional source of soft targets.

Seeded and reproducible: the seed fixes the student's initialisation and the
order of every epoch, so two runs with the same seed and the same targets give
the same student, whatever source the targets came from.

The recipe -- optimiser (adam, adamw, sgd), learning-rate schedule (constant,
cosine, multistep, linear warm-up), AMP (bf16, fp16 with a grad scaler),
channels-last, gradient clipping -- is part of ``TrainConfig`` and lives in
``student_trainer.optim``; the defaults (Adam, constant rate, fp32) are this
loop's original behaviour, bit for bit. ``Hooks`` let a method bring extra
modules with their own optimisers, its own loss and per-step/per-epoch
callbacks (QKD and ``kd chain``'s tolerant teacher train through it), and its own
batches (the data-free methods' synthetic inputs, ``Hooks.batches``). Data is
read through the SampleSource protocol (``source.get(indices, views)``), so the
bundled digits and file datasets train alike.

With a run directory the loop writes ``config.json`` (the effective config,
recipe included), ``metrics.csv`` (per epoch: loss, top-1 and top-5 test
accuracy, the learning rate at the epoch's first step, samples/s, and the
seconds the step waited for its source, which shows when the teacher is the bottleneck)
and ``checkpoint.pt`` at the end of every epoch (model, optimiser, the fp16 grad scaler, the batch
order's and torch's RNG states, history, a method's ``Hooks.extra`` modules with their
optimisers and its ``Hooks.state()``, and the effective config it was written under: the source's
identity and the student's architecture included). ``resume=True`` continues from it, refuses a
checkpoint whose config differs, and ends with exactly the weights of an uninterrupted run; a new
run in the directory removes an older run's checkpoint. A non-finite loss or weights stop the run
(FloatingPointError): a diverged student is never reported as trained.

Under ``torchrun`` (an initialised torch.distributed group) the student is
wrapped in DistributedDataParallel and every global batch is split across the
ranks; each rank asks its source only for its own samples (its part of the
cache, or its own stream to the server pool), and each rank's loss is weighted
by its share of the batch, so the update equals a single process's with the
same global batch. A loss that relates the samples of a batch (``couples`` in the
registry) or pairs them (CS-KD) is computed on the global batch instead: each rank
gathers what it reads from all ranks (``student_trainer.gather``). Only rank 0 writes
the run directory.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from kd.core import reductions
from kd.core.factory import logits_of
from kd.core.files import replace_atomically
from kd.core.lmchecks import (
    facts_max_length,
    longest_sequence,
    model_max_length,
    real_vocabulary,
    refuse_masked_lm,
    refuse_narrow_student,
    refuse_other_tokenizer,
    refuse_too_long,
)
from kd.core.samples import SampleSource
from kd.core.signals import Stopped
from kd.core.targets import sample_temperature_refusal
from kd.core.views import Final, model_input
from kd.student_trainer import optim
from kd.student_trainer.evaluate import check_output_width
from kd.student_trainer.evaluate import evaluate as evaluate_source
from kd.student_trainer.features import (
    LOGITS,
    Distilled,
    Match,
    PerLayer,
    feature_name,
    make_connector,
    probe_student_shapes,
)
from kd.student_trainer.gather import gather_rows, rank_sizes
from kd.student_trainer.hidden import HiddenStates
from kd.student_trainer.losses import FeatureMethod, get_method, logit_offsets_refusal, sparse_refusal
from kd.student_trainer.losses.dot import DOT, task_loss, task_weight
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
    # The recipe (student_trainer.optim.Recipe): optimiser, schedule, precision, clipping.
    optimizer: str = "adam"
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    schedule: str = "constant"
    milestones: list[int] = field(default_factory=list)  # multistep: epochs at which lr *= gamma
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    amp: str = "fp32"  # fp32, bf16, fp16 (autocast; fp16 with a grad scaler)
    channels_last: bool = False
    clip_grad_norm: float = 0.0  # 0: off
    # > 0: read batches (source.get) in this many DataLoader worker processes, pinned for CUDA;
    # the batch order and views are still drawn here, so results equal workers=0's.
    workers: int = 0
    # The student's own final transform (kd.core.views.Final), applied on the device to each batch
    # of views (and to the evaluation samples): the view is shared with the teacher, resolution and
    # normalisation are per model. 0 / empty: the views' own size / no normalisation.
    input_size: int = 0
    input_mean: list[float] = field(default_factory=list)
    input_std: list[float] = field(default_factory=list)


# TrainConfig fields that do not change the trained weights or the metrics (workers: the batch
# order and views are drawn in the main process, see TrainConfig.workers), so a resume may change them.
RESULT_NEUTRAL = ("workers",)


def student_final(config: TrainConfig) -> Final | None:
    """The student's ``Final`` from ``config`` (None when it changes nothing)."""
    if bool(config.input_mean) != bool(config.input_std):
        raise ValueError("give both input_mean and input_std, or neither")
    if config.input_size < 0:
        raise ValueError(f"input_size must be >= 0, got {config.input_size}")
    bad_std = [v for v in config.input_std if not math.isfinite(v) or v <= 0]
    if bad_std:  # dividing by 0 (or a negative/NaN std) makes every input inf/NaN
        raise ValueError(f"input_std must be finite numbers > 0, got {config.input_std}")
    if [v for v in config.input_mean if not math.isfinite(v)]:
        raise ValueError(f"input_mean must be finite numbers, got {config.input_mean}")
    if not config.input_size and not config.input_mean:
        return None
    return Final(size=config.input_size or None, mean=tuple(config.input_mean) or None,
                 std=tuple(config.input_std) or None)  # fmt: skip


@dataclass
class TrainResult:
    test_acc: float
    acc_per_epoch: list[float]
    loss_per_epoch: list[float]
    seconds: float
    # Feature methods: the trained connectors (one per match), saved beside the student.
    connectors: nn.Module | None = None
    # The signal number when ``stop`` ended the run early (at a step boundary), else None; a
    # run directory then holds a checkpoint that ``resume`` continues from that step.
    stopped: int | None = None
    stopped_at: tuple[int, int] | None = None  # (epoch, steps of it done) when stopped

    def raise_if_stopped(self, what: str = "") -> None:
        """``kd.core.signals.Stopped`` if ``stop`` ended this run early: for a caller with more to do
        after the run (later phases, an evaluation, a conversion) that must not do it on a student
        stopped mid-run. ``what`` prefixes where, e.g. "in phase tutoring, "."""
        if self.stopped is not None:
            epoch, step = self.stopped_at or (0, 0)
            raise Stopped(self.stopped, f"{what}in epoch {epoch} after {step} step(s)")


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def evaluate(model: nn.Module, data: SampleSource, *, device: str = "cpu", batch_size: int = 1024,
             topk: tuple[int, ...] = (1, 5), final: Final | None = None) -> dict[int, float]:  # fmt: skip
    """Top-k accuracies ``{k: fraction}`` of ``model`` on ``data``: top-1 always, top-5 when
    ``5 in topk`` and the data has more than 5 classes (``kd.student_trainer.evaluate``)."""
    acc = evaluate_source(model, data, batch_size=batch_size, device=device, final=final)
    return {1: acc.top1, **({5: acc.top5} if 5 in topk and 5 < data.num_classes else {})}


def accuracy(model: nn.Module, data: SampleSource, *, device: str = "cpu", batch_size: int = 1024) -> float:
    """Top-1 accuracy of ``model`` on ``data`` (any SampleSource; the bundled digits too)."""
    return evaluate_source(model, data, batch_size=batch_size, device=device).top1


class _Planned(torch.utils.data.Dataset):
    """The epoch's batches, planned (indices, views) in the main process, read in workers."""

    def __init__(self, source: SampleSource, plan: list[tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        self.source, self.plan = source, plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.source.get(*self.plan[i])


def _own_batches(items: Iterable[tuple]) -> Iterator[tuple[Batch, torch.Tensor | None]]:
    """A method's own ``(inputs, labels or None[, teacher_logits])`` as the loop's (Batch, logits)."""
    for inputs, labels, *logits in items:
        yield Batch(torch.arange(len(inputs)), inputs, labels), (logits[0] if logits else None)


def _batches(train: SampleSource, subset: torch.Tensor, config: TrainConfig, gen: torch.Generator) -> Iterator[Batch]:
    order = subset[torch.randperm(len(subset), generator=gen)]
    labels = train.labels
    if config.workers > 0:
        plan = []
        for s in range(0, len(order), config.batch_size):
            idx = order[s : s + config.batch_size]
            views = torch.randint(0, config.views, (len(idx),), generator=gen) if config.views > 1 else None
            plan.append((idx, views))
        # its own generator: the loader's worker seeds must not be drawn from torch's global RNG
        loader = torch.utils.data.DataLoader(
            _Planned(train, plan), batch_size=None, num_workers=min(config.workers, max(1, len(plan))),
            pin_memory=config.device.startswith("cuda"), generator=torch.Generator().manual_seed(config.seed),
        )  # fmt: skip
        for (idx, views), x in zip(plan, loader):
            yield Batch(idx, x, labels[idx], views)
        return
    for s in range(0, len(order), config.batch_size):
        idx = order[s : s + config.batch_size]
        if config.views > 1:
            views = torch.randint(0, config.views, (len(idx),), generator=gen)
            yield Batch(idx, train.get(idx, views), labels[idx], views)
        else:
            yield Batch(idx, train.get(idx), labels[idx])


# test_top5: empty for datasets of 5 classes or fewer; lr: the learning rate at the epoch's first step.
METRICS = ("epoch", "train_loss", "test_acc", "seconds", "samples_per_s", "source_wait_s", "test_top5", "lr")


@dataclass
class StepContext:
    """What a ``Hooks.loss`` sees of one training step (tensors on the training device)."""

    model: nn.Module  # the student as trained (DistributedDataParallel-wrapped under torchrun)
    inputs: torch.Tensor
    labels: torch.Tensor | None  # None: a ``Hooks.batches`` batch without labels
    teacher_logits: torch.Tensor | None
    indices: torch.Tensor
    epoch: int
    step: int
    config: TrainConfig


@dataclass
class Hooks:
    """Ways in for methods that need more than a loss over the student's logits, so they reuse
    this loop (recipe, AMP, clipping, run directory, evaluation) instead of carrying their own.

    * ``extra``: modules trained beside the student, each with its own optimiser (moved to the
      device, put in train mode every epoch, zeroed, clipped and stepped with the student's; the
      schedule's factor applies to their base rates too). Their losses come from ``loss``.
    * ``loss(ctx) -> loss``: replaces the method's loss (logit methods only; the method then
      needs no source). It may return ``{"loss": student_loss, "name": term, ...}``: every term
      is back-propagated (one backward over their sum), ``"loss"`` alone is reported. The extra
      modules' terms come this way (detach what one side must not train).
    * ``on_step(epoch, step, loss, lr)`` after each optimiser step; ``on_epoch(epoch, row)``
      after each epoch's evaluation (``row``: the metrics.csv row).
    * ``evaluate(model, data) -> top-1``: replaces the evaluation (e.g. QAT models whose
      observers must not see the test data).
    * ``batches(epoch)``: the epoch's batches when a method makes its own inputs (the data-free
      methods: a generator, a synthesis loop, a transfer set) instead of reading ``train``; each
      item is ``(inputs, labels or None[, teacher_logits])`` and reaches ``loss`` as a
      ``StepContext``. The iterator runs between student steps, so a method's own updates (its
      generator's step, an input optimisation) live in it. Needs ``loss`` and
      ``steps_per_epoch`` (the student steps of a full epoch, for the schedule); ``train`` may be
      None. An ``extra`` optimiser whose parameters got no gradient in a step is not stepped: a
      module that the iterator updates itself still gets the schedule's rate and train mode.
    * ``state() -> dict`` / ``load_state(dict)``: a method's own state beyond its ``extra`` modules
      (an EMA model, a step counter), saved in ``checkpoint.pt`` every epoch and given back on
      ``resume`` (tensors and plain containers only: the checkpoint is read with weights_only).
      The ``extra`` modules and their optimisers are saved and restored by the loop itself.
    * ``resumable``: False for a caller that never resumes a run (the data-free methods, whose
      ``batches`` iterator's state no checkpoint holds): a ``stop`` then writes no checkpoint of
      the half-done epoch, and the run directory keeps the last whole epoch's.
    """

    extra: list[tuple[nn.Module, torch.optim.Optimizer]] = field(default_factory=list)
    loss: Callable[[StepContext], torch.Tensor | dict[str, torch.Tensor]] | None = None
    on_step: Callable[[int, int, float, float], None] | None = None
    on_epoch: Callable[[int, dict], None] | None = None
    evaluate: Callable[[nn.Module, SampleSource], float] | None = None
    batches: Callable[[int], Iterable[tuple]] | None = None
    steps_per_epoch: int = 0
    state: Callable[[], dict] | None = None
    load_state: Callable[[dict], None] | None = None
    resumable: bool = True


def world() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _my_part(batch: Batch, rank: int, size: int) -> Batch:
    """This rank's contiguous slice of a global batch (the last slices may be smaller)."""
    n = len(batch.indices)
    sl = _rank_slice(n, rank, size)
    views = None if batch.views is None else batch.views[sl]
    return Batch(batch.indices[sl], batch.inputs[sl], batch.labels[sl], views, n)


def check_logit_offsets(
    method: str, options: dict[str, object], source: SoftTargetSource | None, matches: list[str] | None = None
) -> None:
    """Refuse a method whose loss reads the teacher's absolute logits (not shift-invariant with these
    options, or a feature method fed them by a ``S=logits`` match) on a source whose targets lost them
    (a top-k, q8/q4 or pca cache, a server's top-k, a mixture of teachers): it would train without an
    error on other targets. Reads only the source's description (a cache's metadata), never a target,
    so it runs before any teacher or cache work."""
    if source is None:
        return
    lost = getattr(source, "logit_offsets_lost", lambda: None)()
    message = None if lost is None else logit_offsets_refusal(method, options, lost, matches or ())
    if message is not None:
        raise ValueError(message)


def check_sparse_targets(
    method: str, options: dict[str, object], source: SoftTargetSource | None, matches: list[str] | None = None
) -> None:
    """Refuse a method whose loss needs dense teacher logits (``accepts_sparse``, or a feature method's
    ``S=logits`` match) on a source whose targets are sparse (a topk/sample/rand cache, a server asked
    for its top-k): it failed only at its first step, after the run had set up and read a batch. Reads
    only the source's description (a cache's metadata), so it runs before any teacher or cache work."""
    sparse = None if source is None else getattr(source, "sparse_targets", lambda: None)()
    message = None if sparse is None else sparse_refusal(method, options, sparse, matches or ())
    if message is not None:
        raise ValueError(message)


def check_sample_temperature(method: str, options: dict[str, object], source: SoftTargetSource | None) -> None:
    """Refuse a method whose KL on the teacher's targets runs at another temperature than the one a
    source's sampled targets were drawn at (a sample:K cache, or its draws asked of a server): its
    loss refused them only at the first step, after the run had set up. Reads only the source's
    description (a cache's metadata), so it runs before any target is read."""
    drawn = None if source is None else getattr(source, "sampled_at", lambda: None)()
    if drawn is None:
        return
    m = get_method(method)
    if not m.needs_teacher:
        return
    opts = {**m.defaults, **options}
    if isinstance(m, FeatureMethod):  # only the common KD term reads the logits (a logits match is refused)
        temperature = opts["kd_temperature"] if opts["kd_weight"] else None
    else:  # a logit method that takes sparse targets trains its KL at its temperature
        temperature = opts.get("temperature") if m.takes_sparse(options) else None
    refusal = None if temperature is None else sample_temperature_refusal(drawn, float(temperature))  # type: ignore[arg-type]
    if refusal is not None:
        raise ValueError(f"method {method!r} on these targets ({source.sparse_targets()}): {refusal}")


def source_identity(source: SoftTargetSource | None) -> dict | list | None:
    """What identifies a source's targets beyond its teacher's fingerprint (recorded in config.json
    and the checkpoint, compared on resume): a cache's path and codec, a server's top-k, a pool's
    members and combiner."""
    if source is None:
        return None
    if hasattr(source, "sources"):  # several teachers merged (multi.MultiTeacherSource)
        return {"kind": source.name, "combiner": getattr(source, "combiner_name", None),
                "options": {k: v for k, v in sorted(getattr(source, "options", {}).items())},
                "members": [source_identity(s) for s in source.sources]}  # fmt: skip
    out: dict = {"kind": source.name, "fingerprint": source.fingerprint}
    reader = getattr(source, "reader", None)
    meta = getattr(reader, "meta", None)
    if meta is not None:
        path = getattr(source, "path", None) or getattr(reader, "path", None)
        out.update({"path": None if path is None else str(Path(path).resolve()), "codec": meta.codec,
                    "temperature": meta.temperature})  # fmt: skip
    if source.name == "server":
        out.update({"teacher": source.teacher_name, "topk": getattr(source, "topk", 0)})
    return out


def student_identity(student: nn.Module) -> dict:
    """The student's class and a digest of its parameters' names and shapes (its architecture)."""
    import hashlib

    shapes = [[k, list(v.shape)] for k, v in student.named_parameters()]  # buffers: observers change shape
    digest = hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]
    return {"class": f"{type(student).__module__}.{type(student).__qualname__}", "shapes": digest}


def _rank_slice(n: int, rank: int, size: int) -> slice:
    """This rank's contiguous slice of ``n`` rows (a global batch's, or a token step's micro-batch):
    ceil(n / size) each, so the last slices may be smaller or empty."""
    per = -(-n // size)
    return slice(min(rank * per, n), min((rank + 1) * per, n))


def _broadcast_weights(model: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (what DistributedDataParallel does at its start)."""
    import torch.distributed as dist

    with torch.no_grad():
        for t in itertools.chain(model.parameters(), model.buffers()):
            dist.broadcast(t.data, 0)


def _sum_step(params: list[nn.Parameter], step_loss: float, diverged: float | None) -> tuple[float, float | None]:
    """Sum the ranks' gradients of one step into every rank's ``.grad`` (each rank weighted its own
    slices by their share of the step's tokens, so the sum is the one process's gradient), with their
    losses and whether any diverged: -> (the step's loss, a non-finite loss of some rank or None). A
    parameter no rank gave a gradient keeps ``grad=None``, as in one process (the optimizer skips it)."""
    import torch.distributed as dist

    dev = params[0].device if params else torch.device("cpu")
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads]) if grads else torch.zeros(0, device=dev)
    # float64 scalars: the step's loss, whether a rank diverged (and its loss), which parameters had a gradient
    facts = torch.tensor([step_loss, float(diverged is not None), diverged if diverged is not None else 0.0,
                          *(float(p.grad is not None) for p in params)], dtype=torch.float64, device=dev)  # fmt: skip
    dist.all_reduce(flat)
    dist.all_reduce(facts)
    offset = 0
    for p, had in zip(params, facts[3:].tolist()):
        k = p.numel()
        p.grad = flat[offset : offset + k].view_as(p).to(p.dtype) if had else None
        offset += k
    if not facts[1].item():
        return float(facts[0]), None
    bad = facts[2].item()  # the sum of the ranks' non-finite losses is not finite either
    return float(facts[0]), bad if not math.isfinite(bad) else math.nan


def _targets_ahead(plans: Iterator[tuple[int, int, list]], fetch: Callable[..., object],
                   ahead: int) -> Iterator[tuple[tuple[int, int, tuple, bool, bool], object]]:  # fmt: skip
    """Each micro-batch of ``plans`` (``train_tokens``' steps) in order as ((step number, counted,
    item, first of its step, last of its step), its targets or None where it counts no token), the
    targets from ``fetch(idx, tokens, real, labels)``. ``ahead`` > 0: the next ``ahead`` micro-batches' are
    asked on one thread while this one is used (across step boundaries too); closing the generator
    cancels what was not started and waits for the request under way."""
    flat = ((step_no, counted, item, i == 0, i == len(micro) - 1)
            for step_no, counted, micro in plans for i, item in enumerate(micro))  # fmt: skip
    if ahead <= 0:
        for entry in flat:
            item = entry[2]
            yield entry, (fetch(*item[:4]) if item[4] else None)
        return
    from concurrent.futures import ThreadPoolExecutor

    window: deque = deque()
    with ThreadPoolExecutor(1, thread_name_prefix="kd-token-targets") as pool:
        try:
            for entry in flat:
                item = entry[2]
                window.append((entry, pool.submit(fetch, *item[:4]) if item[4] else None))
                if len(window) > ahead:
                    entry, future = window.popleft()
                    yield entry, (future.result() if future is not None else None)
            while window:
                entry, future = window.popleft()
                yield entry, (future.result() if future is not None else None)
        finally:
            for _, future in window:
                if future is not None:
                    future.cancel()


def _targets_kind(source: SoftTargetSource) -> str:
    """What a token source's targets are, for a refusal: a cache's codec, a server's top-k, or logits."""
    reader = getattr(source, "reader", None)
    if reader is not None:
        return f"cache {getattr(source, 'path', '')}, codec {reader.meta.codec}"
    if getattr(source, "topk", 0):
        return f"server top-{source.topk} at temperature {source.topk_temperature}"
    return f"{source.name} logits"


def _agreed_stop(signum: int | None, size: int, dev: torch.device) -> int | None:
    """A stop signal any rank got (torchrun forwards a SIGTERM to every rank, each sees it at another
    moment): every rank stops before the same step instead of one leaving the others in an all-reduce."""
    if size == 1:
        return signum
    import torch.distributed as dist

    flag = torch.tensor([signum or 0], dtype=torch.int64, device=dev)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None


def _check_finite(model: nn.Module, epoch: int) -> None:
    """Refuse weights that became NaN/inf (a diverged last step, whose loss was still finite)."""
    for name, p in model.named_parameters():  # not buffers: a QAT observer's min/max start at inf
        if not bool(torch.isfinite(p.detach()).all()):
            raise FloatingPointError(f"epoch {epoch}: the student's {name} holds NaN/inf values "
                                     "(the run diverged: lower --lr, or set --clip-grad-norm)")  # fmt: skip


def _save_checkpoint(path: Path, state: dict) -> None:
    replace_atomically(path, lambda f: torch.save(state, f), binary=True)


def _cuda_rng(dev: torch.device) -> dict[str, list[torch.Tensor]]:
    """On CUDA, the checkpoint's ``cuda_rng``: every CUDA generator's state. torch.get_rng_state is the
    CPU generator only, while dropout and on-device draws (noisy, CRD's negatives) use the device's,
    so a resumed CUDA run would draw other numbers than an uninterrupted one. Nothing on the CPU."""
    return {"cuda_rng": torch.cuda.get_rng_state_all()} if dev.type == "cuda" else {}


def _set_cuda_rng(ckpt: dict, dev: torch.device, run: Path) -> None:
    """Restore what ``_cuda_rng`` saved. A checkpoint without it (a CPU run's, or one written before it
    was saved) leaves the CUDA generators as seeded, as resuming always did."""
    states = ckpt.get("cuda_rng")
    if states is None or dev.type != "cuda":
        return
    if len(states) != torch.cuda.device_count():
        raise ValueError(f"cannot resume {str(run)!r} exactly: its checkpoint holds {len(states)} CUDA generator "
                         f"state(s), this process sees {torch.cuda.device_count()} device(s)")  # fmt: skip
    torch.cuda.set_rng_state_all(states)


def _write_metrics(run_dir: Path, history: list[dict]) -> None:
    def write(f) -> None:
        w = csv.DictWriter(f, fieldnames=METRICS)
        w.writeheader()
        w.writerows(history)

    replace_atomically(run_dir / "metrics.csv", write, binary=False)


def load_checkpoint(path: Path) -> dict:
    """A run's checkpoint, read with ``weights_only=True``; errors name the file and what to do.

    A file that holds anything but tensors and plain containers is refused: unpickling it
    could run code, so the message says not to load it with ``weights_only=False``."""
    ckpt = _read_checkpoint(path)
    keys = set(ckpt) if isinstance(ckpt, dict) else set()
    missing = {"epoch", "model", "optimizer", "batch_rng", "torch_rng", "history"} - keys
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} is not a kd training checkpoint (missing {sorted(missing)})")
    return ckpt


def _read_checkpoint(path: Path) -> object:
    """``torch.load(path, weights_only=True)`` with errors that name the file and what to do."""
    import pickle

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"checkpoint {str(path)!r} holds objects other than tensors and plain containers and was refused "
            f"({first}). Do not re-run with weights_only=False or load it with pickle: unpickling a file "
            "can run arbitrary code. Resume only from checkpoints this trainer wrote"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise ValueError(
            f"checkpoint {str(path)!r} is unreadable (truncated or corrupted: {type(e).__name__}: {e}); "
            "restore it, or start the run again without --resume"
        ) from e
    return ckpt


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


def _with_partners(batch: Batch, train: SampleSource, subset: torch.Tensor, gen: torch.Generator) -> Batch:
    if batch.views is not None:
        raise ValueError("pairs of samples (cskd) do not combine with augmented views yet")
    labels = train.labels
    partners = same_class_partners(batch.indices, labels, subset, gen)
    idx = torch.cat([batch.indices, partners])
    return Batch(idx, train.get(idx), labels[idx])


def rotation_shape(student: nn.Module, train: SampleSource, source: SoftTargetSource | None) -> tuple[int, ...]:
    """The per-sample image shape [..., H, W] (H = W) in which the loop rotates a batch (SSKD), and a
    check that the source computes the teacher on the pixels it is given (not a cache, which reads
    stored outputs by index, nor a server that reads the dataset itself)."""
    if source is None or source.name not in ("local", "server") or getattr(source, "dataset", None) is not None:
        name = None if source is None else source.name
        raise ValueError(f"rotated inputs need a teacher that runs on them (local: or server: sending pixels), "
                         f"not {name!r}")  # fmt: skip
    shape = tuple(train.get(torch.arange(1)).shape[1:])
    if len(shape) < 3:
        shape = tuple(getattr(student, "input_shape", ()) or ())
    if len(shape) < 2 or shape[-1] != shape[-2]:
        raise ValueError(f"rotations need square images [.., H, W]; samples have shape {list(shape)} "
                         "(a flat sample needs the student's input_shape)")  # fmt: skip
    return shape


def _with_rotations(batch: Batch, shape: tuple[int, ...]) -> Batch:
    """Each sample followed by its rotations by 90, 180 and 270 degrees (rows 4i..4i+3)."""
    x = batch.inputs
    img = x.reshape(len(x), *shape)
    rotated = torch.stack([torch.rot90(img, k, dims=(-2, -1)) for k in range(4)], dim=1)

    def four(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.repeat_interleave(4, dim=0)

    return Batch(four(batch.indices), rotated.reshape(4 * len(x), *x.shape[1:]), four(batch.labels),
                 four(batch.views), None if batch.global_size is None else 4 * batch.global_size)  # fmt: skip


def train_student(
    student: nn.Module,
    train: SampleSource | None,
    test: SampleSource,
    config: TrainConfig,
    *,
    source: SoftTargetSource | None = None,
    subset: torch.Tensor | None = None,
    on_epoch: Callable[[int, float, float], None] | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
    hooks: Hooks | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
    stop: Callable[[], int | None] | None = None,
) -> TrainResult:
    """Train ``student`` in place on ``train[subset]``; evaluate on ``test`` every epoch.

    ``train`` and ``test`` are sample sources (``kd.core.samples.SampleSource``: the bundled
    digits, or file datasets), read by index through ``get``. ``subset`` holds indices into
    ``train`` (all by default): targets are read by these indices, so a cache built on the
    whole split serves any subset. The recipe (optimiser, schedule, AMP, clipping) comes from
    ``config`` (``student_trainer.optim``); ``hooks`` lets a method add modules, its own loss
    and callbacks. ``optimizer`` and ``generator`` (the batch order's RNG), when given, are
    used instead of fresh ones, so a multi-phase method (QKD) continues both across calls.

    ``stop() -> signal number or None`` is asked before every step (a SIGTERM handler's record):
    when it answers, the run ends at that step boundary, with a checkpoint of the steps done so
    far in ``run_dir`` (``resume`` skips them and ends with the weights of an uninterrupted run),
    and the result's ``stopped`` set. Under torchrun the ranks agree on it (an all-reduce per
    step), so they stop at the same step and none waits in a collective for the others.
    """
    hooks = hooks or Hooks()
    recipe = optim.recipe_of(config)
    recipe.validate()
    # Checked here, not only by the CLI: with no epoch there is no result to return (it failed
    # later with an IndexError), and a batch size of 0 divided by zero once training had set up.
    if config.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {config.epochs}")
    if config.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {config.batch_size}")
    if config.workers < 0:
        raise ValueError(f"workers must be >= 0, got {config.workers}")
    if config.views < 1:
        raise ValueError(f"views must be >= 1 (1: the plain samples), got {config.views}")
    if resume and run_dir is None:  # else a resume would silently train from the start
        raise ValueError("resume continues the run in run_dir: give run_dir")
    method = get_method(config.method)
    if hooks.loss is None:  # a loss hook replaces the method's loss (and reads the targets its own way)
        check_logit_offsets(config.method, config.method_options, source, config.matches)
        check_sparse_targets(config.method, config.method_options, source, config.matches)
        check_sample_temperature(config.method, config.method_options, source)
    if hooks.batches is not None:
        # A resume inside an epoch would skip its first steps by drawing them from the iterator, which runs
        # the method's own updates: own batches resume from whole epochs only (resumable=False).
        if (hooks.loss is None or hooks.steps_per_epoch < 1 or source is not None or method.pairs
                or (resume and hooks.resumable)):  # fmt: skip
            raise ValueError("Hooks.batches needs Hooks.loss and steps_per_epoch >= 1, and takes no source, "
                             "pair method or resume within an epoch (resumable=True)")  # fmt: skip
    elif train is None:
        raise ValueError("train_student needs a training set (or Hooks.batches)")
    if method.needs_teacher and source is None and hooks.loss is None:
        raise ValueError(f"method {config.method!r} needs a soft-target source (--source)")
    if source is not None and getattr(source, "views", config.views) != config.views:
        raise ValueError(f"the cache holds {source.views} view(s) per sample but training asks for {config.views}")
    made_with = getattr(source, "augmentation", None)
    if config.views > 1 and made_with is not None and train is not None and made_with != train.augmentation:
        raise ValueError(f"the cache's views were made with {made_with!r} but the training data's views are "
                         f"{train.augmentation!r}: its targets are for other pixels")  # fmt: skip
    final = student_final(config)
    if source is not None and source.num_classes != train.num_classes:
        raise ValueError(f"source has {source.num_classes} classes, dataset {train.dataset_id} has {train.num_classes}")
    # Here, where every trainer path passes (kd train, chain, explain, the demos, online, datafree, qkd), not
    # only in kd train: a student with fewer outputs than the data's classes failed at its first step (or
    # trained on the labels it has), one with more trained and was scored over classes the data has not.
    data = train if train is not None else test
    if data is not None:  # on what the loop feeds: a training view under --views
        check_output_width(student, data, "the student", final=final, view=config.views > 1 and data is train)
    dev = torch.device(config.device)
    subset = torch.arange(0 if train is None else len(train)) if subset is None else subset
    rank, size = world()
    # Under torchrun a loss that relates the samples of a batch (or, CS-KD, pairs each sample with a
    # partner the split may put on another rank) is computed on the gathered global batch, as one
    # process computes it; an undeclared method (couples=None) is treated so, which is always exact.
    whole_batch = size > 1 and hooks.loss is None and (method.couples is not False or method.pairs)
    plan = None
    if isinstance(method, FeatureMethod):
        plan = _FeaturePlan(method, config, student, train, subset, source, whole_batch=whole_batch)
    elif config.matches:
        raise ValueError(f"method {config.method!r} works on logits; --match is for feature methods")
    if hooks.loss is not None and plan is not None:
        raise ValueError(f"a loss hook replaces a logit method's loss; {config.method!r} is a feature method")
    rot_shape = rotation_shape(student, train, source) if getattr(method, "rotations", False) else None
    trained: nn.Module = student if plan is None else plan.distilled
    trained.to(dev)
    if recipe.channels_last:
        trained.to(memory_format=torch.channels_last)
    for module, _ in hooks.extra:
        module.to(dev)
    if size > 1 and (hooks.extra or hooks.batches is not None):
        raise ValueError("a hook's extra modules and batches are not shared across torchrun ranks yet; "
                         "train on one process")  # fmt: skip
    model: nn.Module = trained
    if size > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(trained, device_ids=[dev.index or 0] if dev.type == "cuda" else None)
    opt = optimizer if optimizer is not None else optim.make_optimizer(trained.parameters(), recipe)
    optimizers = [opt, *(o for _, o in hooks.extra)]
    dot = opt if isinstance(opt, DOT) else None  # DOT: the task and distillation gradients apart
    if dot is not None:
        if hooks.loss is not None or hooks.extra or size > 1:
            raise ValueError("--optimizer dot works on one process, without loss hooks or extra modules")
        task_weight(method, config.method_options)  # refuses a method it cannot split
    for o in optimizers:  # the schedule scales every group's own base rate
        for group in o.param_groups:
            group.setdefault("initial_lr", group["lr"])
    scheduled = recipe.schedule != "constant" or recipe.warmup_epochs > 0
    steps_per_epoch = -(-len(subset) // config.batch_size) if hooks.batches is None else hooks.steps_per_epoch
    scaler = optim.grad_scaler(recipe, dev)
    gen = generator if generator is not None else torch.Generator().manual_seed(config.seed)
    history: list[dict] = []
    start = 0
    partial: dict = {}  # a stopped run's progress in its last epoch (steps, loss sums, seconds)
    ckpt_path = None
    if run_dir is not None and rank != 0:
        run_dir = None if not resume else run_dir  # only rank 0 writes; every rank may resume
    if run_dir is not None:
        run = Path(run_dir)
        run.mkdir(parents=True, exist_ok=True)
        ckpt_path = run / "checkpoint.pt"
        effective = {
            **asdict(config),
            "dataset": None if train is None else train.dataset_id,
            # the split every epoch's test_acc is measured on: another one mixes two splits in metrics.csv
            "val_dataset": getattr(test, "dataset_id", None),
            "train_samples": len(subset),
            "source": None if source is None else source.name,
            "teacher_fingerprint": None if source is None else source.fingerprint,
            # what else makes the targets and the student: another cache (codec) of the same teacher,
            # or another architecture, is another run
            "source_identity": source_identity(source),
            "student": student_identity(student),
        }
        if resume and not ckpt_path.exists():
            raise ValueError(f"cannot resume {str(run)!r}: it has no checkpoint.pt (no epoch finished there); "
                             "run without --resume to start it")  # fmt: skip
        if resume and ckpt_path.exists():
            ckpt = load_checkpoint(ckpt_path)
            if hooks.load_state is not None:  # first: a method's own check names a run of another
                # method (its student differs too)
                if "hooks" not in ckpt:
                    raise ValueError(f"cannot resume {str(run)!r}: its checkpoint holds no state of this method")
                hooks.load_state(ckpt["hooks"])
            # The checkpoint carries the config it was written under: config.json may be a newer run's
            # (one started in this directory without --resume and killed before its first epoch ended).
            saved = ckpt.get("config")
            if not isinstance(saved, dict):  # a checkpoint from before it carried its config
                try:
                    saved = json.loads((run / "config.json").read_text())
                except (OSError, ValueError) as e:
                    raise ValueError(f"cannot resume {str(run)!r}: its config.json is unreadable ({e})") from e
            # A run dir written before a TrainConfig field existed lacks that key; it ran with what is now
            # the field's default, so a missing key equal to its default is no difference. One written
            # before the source's identity and the student were recorded is checked on the rest.
            defaults = json.loads(json.dumps(asdict(TrainConfig())))
            saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
            now = json.loads(json.dumps(effective))
            # val_dataset: a checkpoint written before it was recorded is resumed on the split given now
            # (nothing to compare it with).
            for key in ("source_identity", "student", "val_dataset"):
                if key not in saved:
                    now.pop(key)
            for key in RESULT_NEUTRAL:  # how batches are read, not what is trained: may change on resume
                saved.pop(key, None)
                now.pop(key, None)
            if saved != now:
                diff = sorted(k for k in set(now) | set(saved) if saved.get(k) != now.get(k))
                details = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in diff)
                raise ValueError(f"cannot resume {str(run)!r}: its checkpoint's config differs in {diff} ({details})")
            if scaler is not None:
                if "scaler" not in ckpt:
                    raise ValueError(f"cannot resume {str(run)!r}: its checkpoint holds no fp16 grad-scaler state "
                                     "(written before it was saved): the resumed run would not be exact")  # fmt: skip
                scaler.load_state_dict(ckpt["scaler"])
            saved_extra = ckpt.get("extra", [])
            if len(saved_extra) != len(hooks.extra):
                raise ValueError(f"cannot resume {str(run)!r}: its checkpoint holds {len(saved_extra)} extra "
                                 f"module(s), this run trains {len(hooks.extra)}")  # fmt: skip
            for (module, extra_opt), saved_state in zip(hooks.extra, saved_extra):
                module.load_state_dict(saved_state["module"])
                extra_opt.load_state_dict(saved_state["optimizer"])
            student.load_state_dict(ckpt["model"])
            if plan is not None:
                plan.distilled.connectors.load_state_dict(ckpt["connectors"])
            opt.load_state_dict(ckpt["optimizer"])
            gen.set_state(ckpt["batch_rng"])
            torch.set_rng_state(ckpt["torch_rng"])
            _set_cuda_rng(ckpt, dev, run)
            history = list(ckpt["history"])
            start = int(ckpt["epoch"]) + 1
            # Stopped inside epoch ``start``: batch_rng is that epoch's start state, so its
            # batches are drawn again and the first ``steps`` of them skipped (not trained).
            partial = dict(ckpt.get("partial") or {})
        elif rank == 0:
            # A new run here: an older run's checkpoint must not be resumed as this one's.
            ckpt_path.unlink(missing_ok=True)
            replace_atomically(run / "config.json", lambda f: f.write(json.dumps(effective, indent=2)), binary=False)
    if rank != 0:
        ckpt_path = None
    bar = _progress(progress and rank == 0, config.epochs, start)
    board = _tensorboard(ckpt_path.parent if ckpt_path is not None else None)
    t0 = time.perf_counter()
    stopped: int | None = None
    stop_flag = torch.zeros(1, dtype=torch.int64, device=dev if dev.type == "cuda" else "cpu")
    for epoch in range(start, config.epochs):
        epoch_rng = gen.get_state()  # what a checkpoint written inside this epoch resumes from
        skip = int(partial.get("steps", 0)) if epoch == start else 0
        trained.train()
        for module, _ in hooks.extra:
            module.train()
        epoch_lr = config.lr * optim.lr_factor(recipe, epoch, 0, steps_per_epoch, config.epochs)
        if hooks.batches is not None:
            batches = _own_batches(hooks.batches(epoch))
        else:
            batches = _batches(train, subset, config, gen)
        if method.pairs:
            # A list: all of the epoch's draws from ``gen`` happen in a fixed order.
            batches = iter([_with_partners(b, train, subset, gen) for b in batches])
        if skip:  # drawn (same gen draws) and dropped: the steps a stopped run had done
            batches = itertools.islice(batches, skip, None)
        if size > 1:
            batches = (_my_part(b, rank, size) for b in batches)
        if rot_shape is not None:
            batches = (_with_rotations(b, rot_shape) for b in batches)
        if hooks.batches is not None:
            pairs = batches
        elif plan is not None:
            pairs = source.iter_outputs(batches, plan.teacher_names)
        elif source is not None and method.needs_teacher:
            pairs = source.iter_targets(batches)
        else:
            pairs = ((b, None) for b in batches)
        total, n, wait, step = 0.0, 0, 0.0, skip - 1
        if skip:
            total, n, wait = float(partial["total"]), int(partial["n"]), float(partial["wait"])
        t_epoch = time.perf_counter() - (float(partial.get("seconds", 0.0)) if skip else 0.0)
        it = iter(pairs)
        while True:
            step += 1
            if stop is not None:
                signum = stop() or 0
                if size > 1:  # every rank stops at the same step: the highest signal any rank got
                    stop_flag.fill_(signum)
                    torch.distributed.all_reduce(stop_flag, op=torch.distributed.ReduceOp.MAX)
                    signum = int(stop_flag.item())
                if signum:
                    stopped = signum
                    break
            t_wait = time.perf_counter()
            try:
                batch, teacher_logits, *teacher_feats = next(it)
            except StopIteration:
                break
            idx, x, y = batch.indices, batch.inputs, batch.labels
            wait += time.perf_counter() - t_wait
            # uint8 pixels as value/255, then the student's resolution and normalisation, on the device
            x = model_input(x.to(dev, non_blocking=True), final)
            x, y = optim.to_memory_format(x, recipe), None if y is None else y.to(dev)
            if teacher_logits is not None:
                teacher_logits = teacher_logits.to(dev)
            lr = config.lr
            if scheduled:
                factor = optim.lr_factor(recipe, epoch, step, steps_per_epoch, config.epochs)
                lr *= factor
                for o in optimizers:
                    for group in o.param_groups:
                        group["lr"] = group["initial_lr"] * factor
            extra_terms: list[torch.Tensor] = []
            task = None
            # whole_batch: every rank's rows (a rank may have none: it still joins the gathers)
            sizes = rank_sizes(len(idx), dev) if whole_batch else None
            with optim.autocast(recipe, dev):
                if not len(idx) and sizes is None:
                    loss = torch.zeros((), device=dev)
                elif plan is not None:
                    loss = plan.loss(model, x, y, teacher_logits, teacher_feats[0], dev, epoch, config,
                                     indices=idx.to(dev), sizes=sizes)  # fmt: skip
                    if dot is not None:
                        task = task_loss(method, config.method_options, plan.last_logits, y)
                elif hooks.loss is not None:
                    loss = hooks.loss(StepContext(model, x, y, teacher_logits, idx, epoch, step, config))
                    if isinstance(loss, dict):  # {"loss": the student's (reported), other terms...}
                        extra_terms = [v for k, v in loss.items() if k != "loss"]
                        loss = loss["loss"]
                else:
                    logits = logits_of(model(x))
                    if sizes is not None:  # the global batch's logits, targets and labels, in rank order
                        logits, teacher_logits, y = gather_rows((logits, teacher_logits, y), sizes)
                    loss = method(logits, teacher_logits, y, epoch=epoch, epochs=config.epochs,
                                  **config.method_options)  # fmt: skip
                    if dot is not None:
                        task = task_loss(method, config.method_options, logits, y)
            for o in optimizers:
                o.zero_grad(set_to_none=True)
            # DDP averages gradients over ranks: weight this rank's mean by its share of the
            # global batch, so the update is the global batch's mean whatever the split.
            objective = loss
            for term in extra_terms:  # one backward: each term reaches only its own module's weights
                objective = objective + term
            if size == 1:
                backward = objective
            elif sizes is not None:
                # the global batch's loss, the same on every rank: each rank's slice gets its whole
                # gradient, and DDP's average divides by world_size (student_trainer/gather.py)
                backward = objective * size
            elif len(idx):
                backward = objective * (len(idx) * size / batch.global_size)
            else:  # a rank with no samples in a short last batch still joins the all-reduce
                with optim.autocast(recipe, dev):
                    backward = logits_of(model(x)).sum().mul(0.0)
            if task is not None:  # DOT: the distillation gradient first, kept apart, then the task's
                (backward - task).backward(retain_graph=True)
                dot.capture_kd()
                backward = task
            (backward if scaler is None else scaler.scale(backward)).backward()
            for i, o in enumerate(optimizers):
                if i == 0 or any(p.grad is not None for p in optim.params_of(o)):
                    optim.optimizer_step(o, recipe, scaler)
            if scaler is not None:
                scaler.update()
            value = float(loss.detach())
            if not math.isfinite(value):  # diverged: its weights are garbage, not a result to save
                raise FloatingPointError(f"epoch {epoch} step {step}: the training loss is {value} "
                                         "(the run diverged: lower --lr, or set --clip-grad-norm)")  # fmt: skip
            total += value * len(idx)
            n += len(idx)
            if hooks.on_step is not None:
                hooks.on_step(epoch, step, value, lr)
        if stopped is not None:
            close = getattr(it, "close", None)
            if close is not None:  # a source's threads and streams working ahead end here
                close()
            if ckpt_path is not None and hooks.resumable:
                _check_finite(student, epoch)
                _save_checkpoint(ckpt_path, {
                    "epoch": epoch - 1, "model": student.state_dict(), "optimizer": opt.state_dict(),
                    "batch_rng": epoch_rng, "torch_rng": torch.get_rng_state(), **_cuda_rng(dev), "history": history,
                    "partial": {"steps": step, "total": total, "n": n, "wait": wait,
                                "seconds": time.perf_counter() - t_epoch},
                    **({} if plan is None else {"connectors": plan.distilled.connectors.state_dict()}),
                    "extra": [{"module": m.state_dict(), "optimizer": o.state_dict()} for m, o in hooks.extra],
                    **({} if hooks.state is None else {"hooks": hooks.state()}),
                    **({} if scaler is None else {"scaler": scaler.state_dict()}),
                    "config": json.loads(json.dumps(effective)),
                })  # fmt: skip
            break
        seconds = time.perf_counter() - t_epoch
        _check_finite(student, epoch)
        if hooks.evaluate is not None:
            acc, top5 = hooks.evaluate(student, test), None
        else:
            accs = evaluate(student, test, device=config.device, final=final)
            acc, top5 = accs[1], accs.get(5)
        history.append(
            {"epoch": epoch, "train_loss": total / max(n, 1), "test_acc": acc, "seconds": round(seconds, 4),
             "samples_per_s": round(n / max(seconds, 1e-9), 1), "source_wait_s": round(wait, 4),
             "test_top5": top5, "lr": epoch_lr}
        )  # fmt: skip
        if ckpt_path is not None:
            _save_checkpoint(ckpt_path, {
                "epoch": epoch, "model": student.state_dict(), "optimizer": opt.state_dict(),
                "batch_rng": gen.get_state(), "torch_rng": torch.get_rng_state(), **_cuda_rng(dev), "history": history,
                **({} if plan is None else {"connectors": plan.distilled.connectors.state_dict()}),
                "extra": [{"module": m.state_dict(), "optimizer": o.state_dict()} for m, o in hooks.extra],
                **({} if hooks.state is None else {"hooks": hooks.state()}),
                **({} if scaler is None else {"scaler": scaler.state_dict()}),
                "config": json.loads(json.dumps(effective)),
            })  # fmt: skip
            _write_metrics(ckpt_path.parent, history)
        if bar is not None:
            bar.update(epoch, history[-1])
        if board is not None:
            for key in METRICS[1:]:
                if history[-1].get(key) is not None:
                    board.add_scalar(key, history[-1][key], epoch)
            board.flush()
        if hooks.on_epoch is not None:
            hooks.on_epoch(epoch, history[-1])
        if on_epoch is not None:
            on_epoch(epoch, history[-1]["train_loss"], acc)
    if bar is not None:
        bar.close()
    if board is not None:
        board.close()
    accs = [h["test_acc"] for h in history]
    connectors = None if plan is None else plan.distilled.connectors
    return TrainResult(accs[-1] if accs else math.nan, accs, [h["train_loss"] for h in history],
                       time.perf_counter() - t0, connectors, stopped,
                       None if stopped is None else (epoch, step))  # fmt: skip


class _FeaturePlan:
    """What a feature method needs in the loop: the matches, the teacher feature names to
    ask the source for, and the student wrapped with its connectors (``Distilled``)."""

    def __init__(self, method: FeatureMethod, config: TrainConfig, student: nn.Module, train: SampleSource,
                 subset: torch.Tensor, source: SoftTargetSource | None, *,
                 whole_batch: bool = False) -> None:  # fmt: skip
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
            if method.layers and len(m.student) != method.layers:  # 0: any number (ReviewKD)
                raise ValueError(f"method {method.name!r} takes {method.layers} layer(s) per side, match {m.text!r}")
        self.at_source = config.method_options.get("teacher_reduce", "source") == "source"
        if whole_batch and method.reduce is not None:
            # A batch statistic (sp, cc) a source computes over a rank's slice only: on the global
            # batch it is taken here, from the teacher's per-sample maps gathered from every rank.
            batch_stats = [not reductions.parse(self._name(m.teacher)).per_sample for m in self.matches]
            self.at_source = self.at_source and not any(batch_stats)
        # The teacher layer "logits" is the teacher's output: it comes with every reply, and
        # any statistic of it is computed here.
        names = []
        for m in self.matches:
            if LOGITS in m.teacher:
                continue
            if self.at_source and method.reduce is not None:
                names.append(self._name(m.teacher))
            else:  # full maps: every layer of the match (a method without a statistic takes them all)
                names.extend(m.teacher)
        self.teacher_names = list(dict.fromkeys(names))
        connectors: list[nn.Module] = [nn.Identity() for _ in self.matches]
        if method.connector is not None:
            # Shapes of both sides from one small probe: a connector maps the student's full
            # map to the teacher's full map (the statistic, if any, is taken after it).
            idx = subset[:2]
            views = torch.zeros(len(idx), dtype=torch.long) if config.views > 1 else None
            x = train.get(idx, views)
            final = student_final(config)  # the student sees its own resolution
            s_in = model_input(x, final)
            s_shapes = probe_student_shapes(student, s_in, [layer for m in self.matches for layer in m.student])
            t_shapes = self._teacher_shapes(source, Batch(idx, x, train.labels[idx], views), s_shapes)
            connectors = []
            for i, m in enumerate(self.matches):
                if getattr(method.connector, "takes_layers", False):  # one module over all the match's layers
                    connectors.append(method.connector([s_shapes[s] for s in m.student],
                                                       [t_shapes[i, k] for k in range(len(m.teacher))]))  # fmt: skip
                    continue
                made = [make_connector(method.connector, s_shapes[s], t_shapes[i, k]) for k, s in enumerate(m.student)]
                connectors.append(made[0] if len(made) == 1 else PerLayer(made))
        # A connector with state sized by the training set (CRD's memory bank) or taken from the
        # teacher (SRD's classifier) declares ``bind(labels=, subset=, source=, options=)``: called once, before a
        # resumed checkpoint restores its buffers.
        for conn in connectors:
            for module in conn.modules():
                if callable(getattr(module, "bind", None)):
                    module.bind(labels=train.labels, subset=subset, source=source, options=self.options)
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
            if self.method.reduce is None and len(m.teacher) > 1:  # every layer's map (ReviewKD)
                out.append([logits if layer == LOGITS else feats[layer] for layer in m.teacher])
            elif LOGITS in m.teacher:
                if not isinstance(logits, torch.Tensor):
                    raise ValueError(f"match {m.text!r} needs the teacher's dense logits; the source gave sparse ones")
                out.append(reductions.reduce(name, {**feats, LOGITS: logits}))
            elif self.at_source:
                out.append(feats[name])
            else:
                out.append(reductions.reduce(name, feats))
        return out

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, teacher_logits, teacher_feats: dict,
             dev: torch.device, epoch: int, config: TrainConfig, indices: torch.Tensor | None = None,
             sizes: list[int] | None = None) -> torch.Tensor:  # fmt: skip
        """The method's objective on this batch; with ``sizes`` (every torchrun rank's rows) on the
        global batch: what the loss reads is gathered from all ranks first (``student_trainer.gather``)."""
        if isinstance(teacher_logits, torch.Tensor) and teacher_logits.is_inference():
            teacher_logits = teacher_logits.clone()  # an in-process teacher's: usable in autograd

        def ready(t):  # on the device, and usable in autograd
            if isinstance(t, list):
                return [ready(v) for v in t]
            t = t.to(dev)
            return t.clone() if t.is_inference() else t

        t_list = [ready(t) for t in self._teacher_side(teacher_feats, teacher_logits)]
        logits, connected, maps = model(x, t_list)
        self.last_logits = logits  # the student's logits of this step (DOT's task term)
        if sizes is not None:
            # the student's maps a reduction reads besides the connected one (FSP's second layer)
            others = {layer: maps[layer] for m in self.matches if self.method.reduce is not None
                      for layer in m.student[1:]}  # fmt: skip
            teacher_feats = {k: ready(v) for k, v in teacher_feats.items()}  # on the device: NCCL gathers there
            logits, connected, others, y, indices, teacher_logits, teacher_feats = gather_rows(
                (logits, connected, others, y, indices, teacher_logits, teacher_feats), sizes)  # fmt: skip
            maps = {**maps, **others}
            t_list = [ready(t) for t in self._teacher_side(teacher_feats, teacher_logits)]
        s_list = []
        for m, f in zip(self.matches, connected):
            if self.method.reduce is not None:
                f = reductions.reduce(self._name(m.student), {**maps, m.student[0]: f})
            s_list.append(f)
        return self.method.objective(logits, teacher_logits, y, s_list, t_list, epoch=epoch, epochs=config.epochs,
                                     indices=indices,
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


TOKEN_OPTIMIZERS = ("adam", "adamw", "sgd")
TOKEN_AMP = ("fp32", "bf16")


RUN_CHECKPOINT = "checkpoint.pt"  # in the run_dir of train_tokens and train_onpolicy
_TOKEN_CKPT_KEYS = {"epoch", "step", "epoch_rng", "total", "tokens_seen", "losses", "model", "optimizer", "torch_rng"}


def _rank_rng_states(size: int, dev: torch.device) -> dict[str, list[torch.Tensor]]:
    """Every rank's generator states (the CPU's; on CUDA its device's too), in rank order: each rank's
    dropout draws on its own slices, so each resumes from its own. A collective under torchrun."""
    states = {"torch_rng": torch.get_rng_state()}
    if dev.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(dev)
    if size == 1:
        return {k: [v] for k, v in states.items()}
    import torch.distributed as dist

    out = {}
    for key, state in states.items():  # on the group's device (NCCL gathers CUDA tensors only)
        mine = state.to(dev)
        parts = [torch.empty_like(mine) for _ in range(size)]
        dist.all_gather(parts, mine)
        out[key] = [p.cpu() for p in parts]
    return out


def read_run_checkpoint(run_dir: Path, kind: str, identity: dict, keys: set[str], written: str) -> dict:
    """The ``kind`` checkpoint (``write_run_checkpoint``) in ``run_dir``, read with ``weights_only``,
    refused (naming the file and what differs) where it is missing, damaged, of another kind or
    without ``keys``, or of another run than ``identity`` (plain values) describes. ``written``: when
    such a run writes one, for the message of a missing one."""
    path = Path(run_dir) / RUN_CHECKPOINT
    if not path.is_file():
        raise ValueError(f"--resume: no checkpoint {str(path)!r} to continue from (a run with this --run-dir "
                         f"writes one {written})")  # fmt: skip
    ckpt = _read_checkpoint(path)
    missing = (keys | {"kind", "identity"}) - (set(ckpt) if isinstance(ckpt, dict) else set())
    if missing or ckpt.get("kind") != kind:
        raise ValueError(f"checkpoint {str(path)!r} is not a kd {kind} checkpoint (missing {sorted(missing)})")
    differ = _differences(json.loads(ckpt["identity"]), json.loads(json.dumps(identity)))
    if differ:
        raise ValueError(f"checkpoint {str(path)!r} is of another run ({'; '.join(differ)}): resume it with "
                         "the options it was started with, or give another --run-dir")  # fmt: skip
    return ckpt


def _differences(theirs: dict, ours: dict, prefix: str = "") -> list[str]:
    """``key: theirs there, ours here`` for each value that differs, nested keys named by their path
    (``targets.fingerprint``): a whole source's description would hide the one field that differs."""
    out = []
    for k in sorted(set(theirs) | set(ours)):
        a, b = theirs.get(k), ours.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} there, {b!r} here")
    return out


def load_run_state(run_dir: Path, ckpt: dict, student: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The student's and the optimizer's state from a ``read_run_checkpoint`` answer; one of another
    architecture (or optimizer) is refused naming the file."""
    try:
        student.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise ValueError(f"checkpoint {str(Path(run_dir) / RUN_CHECKPOINT)!r} is not this student's "
                         f"({type(e).__name__}: {str(e).splitlines()[0]})") from None  # fmt: skip


def write_run_checkpoint(run_dir: Path, kind: str, identity: dict, state: dict) -> None:
    """``state`` (tensors, plain containers) with ``kind`` and ``identity`` as ``run_dir``'s checkpoint:
    written aside and renamed over the old one, so a kill never leaves half of one."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    _save_checkpoint(Path(run_dir) / RUN_CHECKPOINT,
                     {"kind": kind, "identity": json.dumps(identity, sort_keys=True), **state})  # fmt: skip


def source_facts(source: SoftTargetSource) -> dict[str, str]:
    """The signature facts of a live token teacher behind ``source`` (a ``local:`` teacher or a
    ``server:`` one); empty for a cache, whose records say nothing of the teacher's task."""
    teacher = getattr(source, "teacher", None)
    sig = getattr(teacher, "signature", None) or getattr(source, "signature", None)
    return dict(getattr(sig, "extra", None) or {})


def train_tokens(
    student: nn.Module,
    train: SampleSource,
    source: SoftTargetSource,
    *,
    method: str = "token-fkl",
    epochs: int = 1,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    method_options: dict | None = None,
    device: str = "cpu",
    accumulate: int = 1,
    amp: str = "fp32",
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    on_epoch: Callable[[int, float], None] | None = None,
    stop: Callable[[], int | None] | None = None,
    run_dir: Path | None = None,
    resume: bool = False,
    checkpoint_every: int = 0,
    hidden: HiddenStates | Sequence[str] | None = None,
    momentum: float = 0.9,
    nesterov: bool = False,
    schedule: str = "constant",
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    warmup_epochs: float = 0.0,
    clip_grad_norm: float = 0.0,
) -> list[float]:
    """Distil a causal LM ``student`` (tokens [B, S] -> logits [B, S, V]) on a token source
    (``kd.core.tokens.TokenSource``) from ``source``'s per-token targets (a token cache read as
    ``TokenTargets`` or dense logits, a live teacher...) with a per-token loss (``token-*``):
    next-token labels mask padding and prompt positions. Shuffled batches; -> the mean loss of
    each epoch (per token). ``on_epoch(epoch, loss)`` is called after each epoch (a validation).

    ``accumulate``: one optimizer step per ``accumulate`` micro-batches of ``batch_size``. The
    token losses are means over a micro-batch's counted tokens, so each micro-batch's loss is
    weighted by its share of the step's tokens (n_j / sum n): the step's gradient is that of one
    batch of ``batch_size * accumulate`` sequences, whatever their lengths (a plain mean of the
    micro-batch losses would over-weight short ones). A step none of whose micro-batches holds a
    counted token (every label ignored: padding, prompts, documents cut before their completion) is
    skipped whole: its teacher targets are not asked for and the optimizer does not step, since a
    step on zero gradients still moves the weights (AdamW's decoupled weight decay, Adam's moments
    from earlier steps). The learning rate's schedule is a function of the step's number and the
    epoch's loss is per counted token, so the skipped step changes neither. ``amp="bf16"``: the
    student's forward in bfloat16 autocast (CUDA or CPU); the losses are computed in float32 or wider.

    The recipe is ``kd train``'s (``student_trainer.optim``): ``optimizer`` adam, adamw or sgd (with
    ``momentum``, ``nesterov``) at ``lr`` with ``weight_decay``; ``schedule`` constant, cosine or linear (per
    optimizer step, to 0 at the last step of ``epochs``) or multistep (x ``gamma`` at each epoch of
    ``milestones``); a linear warm-up over ``warmup_epochs`` epochs of optimizer steps (fractions
    allowed: LLM recipes warm up over a few hundred steps); ``clip_grad_norm``: the total gradient
    norm of each optimizer step (the summed gradient under torchrun, so every rank clips the same).

    Under ``torchrun`` (an initialised torch.distributed group) every rank reads the ids of the whole
    step (cheap: it counts the step's tokens without a collective) and trains on its contiguous slice
    of each micro-batch: it asks ``source`` only for those rows and weights its loss by its share of
    the step's counted tokens, and the ranks' gradients are summed (one all-reduce a step) before
    each identical optimizer step, so the update is the one process's with the same step. Rank 0's
    starting weights are broadcast. A rank whose slice is empty or holds no target still joins every
    all-reduce (no DistributedDataParallel: its fixed backward count per step would hang the ranks
    on an uneven step), and a diverged loss on any rank stops every rank at the same step.

    ``stop() -> signal number or None`` is asked before every optimizer step (a SIGTERM handler's
    record): once it answers, ``kd.core.signals.Stopped`` is raised there, the student left as the
    last whole step made it; under torchrun the ranks agree on it (one all-reduce before each step),
    so they all stop before the same step.

    ``run_dir``: rank 0 writes ``run_dir/checkpoint.pt`` (aside, then renamed over the old one) after
    each epoch and when stopped: the student, the optimizer, where the run is (epoch, next step, the
    epoch's batch order as its generator state, the epoch's loss so far) and each rank's generators.
    ``checkpoint_every=N``: also after every N-th step of an epoch (a crash, not only a stop, then
    loses fewer steps: one epoch over a large corpus is a whole run). ``resume``: continue from
    the checkpoint, to the losses and weights of an uninterrupted run (more ``epochs`` than the run
    was started with train on, fewer than the checkpoint has begun are refused; every other setting,
    the dataset, the targets (``source_identity``: the teacher's fingerprint, a cache's resolved path)
    and the number of ranks must be the same, else it is refused naming what differs).

    ``hidden``: hidden-state matches (``student_trainer.hidden``: DistilBERT's cosine, TinyBERT's
    MSE through a learned connector), as ``STUDENT=TEACHER[:LOSS[:WEIGHT]]`` strings or a built
    ``HiddenStates`` (whose trained connectors the caller then keeps). Each micro-batch's loss is
    the token loss plus the weighted hidden-state losses, all means over its counted tokens; the
    teacher's states come with its targets, at the counted positions only. The connectors train
    with the student (same optimizer), are checkpointed, and the pairs are part of the resume
    identity. A source without hidden states (a token cache) is refused before any step."""
    from kd.core.tokens import next_token_labels, refuse_no_samples
    from kd.student_trainer.losses.token_kd import token_mask

    loss_fn = get_method(method)
    refuse_no_samples(train)  # a file shorter than one block, named (not "no token is a prediction target")
    facts, name = source_facts(source), str(getattr(source, "teacher_name", "") or "")
    refuse_masked_lm(facts, name)
    refuse_other_tokenizer(facts, name, train)
    # Sequences past a model's positions fail deep inside its embedding: refused before any step.
    longest = longest_sequence(train)
    refuse_too_long(longest, model_max_length(student), "the student", "lower the dataset's ?block=")
    refuse_too_long(longest, facts_max_length(facts), f"teacher {name!r}", "lower the dataset's ?block=")
    if source.num_classes != train.num_classes:
        raise ValueError(f"source has vocabulary {source.num_classes}, the token source {train.num_classes}")
    # A padded student (vocab_size past its tokenizer's ids) trains on its first V logits; a narrower
    # one cannot score every token: refused before any step.
    vocab = int(train.num_classes)
    refuse_narrow_student(student, vocab)
    if accumulate < 1 or batch_size < 1 or epochs < 0:
        raise ValueError(f"accumulate and batch_size must be >= 1 and epochs >= 0; got {accumulate}, {batch_size}, "
                         f"{epochs}")  # fmt: skip
    if checkpoint_every < 0 or (checkpoint_every and run_dir is None):
        raise ValueError(f"checkpoint_every={checkpoint_every}: a number of steps >= 0, with a run_dir to write to")
    if amp not in TOKEN_AMP:
        raise ValueError(f"amp={amp!r}: token training takes {' or '.join(TOKEN_AMP)} (bf16 needs no grad scaler)")
    if optimizer not in TOKEN_OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r}: choose {', '.join(TOKEN_OPTIMIZERS)}")
    recipe = optim.Recipe(optimizer=optimizer, lr=lr, weight_decay=weight_decay, momentum=momentum,
                          nesterov=nesterov, schedule=schedule, milestones=[int(m) for m in milestones], gamma=gamma,
                          warmup_epochs=warmup_epochs, amp=amp, clip_grad_norm=clip_grad_norm)  # fmt: skip
    recipe.validate()
    # Every epoch is a pass over all of ``train``: if no position of it is a target (documents no
    # longer than their prompt, or cut by the block before the completion), no epoch has a token to
    # learn from or to average the loss over. Refused before the student is touched; the scan stops
    # at the first batch that holds a target (normally the first).
    for lo in range(0, len(train), batch_size):
        idx = torch.arange(lo, min(lo + batch_size, len(train)))
        b = train.batch(idx)
        labels = next_token_labels(b.tokens, b.loss_mask)
        holds = token_mask(labels).any(dim=1)
        if bool(holds.any()):
            break
    else:
        raise ValueError(f"{train.dataset_id}: no token is a prediction target (every position is padding or a "
                         "prompt, or the block cuts each document before its targets), so there is nothing to "
                         "distil")  # fmt: skip
    # The loss once on the source's targets of one sequence that holds a target (the first of the batch
    # just read; against uniform student logits), before the student trains: what the targets cannot
    # serve is refused now, not at the first step (a divergence that sampled counts do not estimate,
    # another temperature than the one a sparse cache or a server's top-k was made at).
    first = int(holds.nonzero()[0])
    row = slice(first, first + 1)
    probe_targets = source.token_targets(idx[row], b.tokens[row], b.attention_mask[row])
    try:
        loss_fn(torch.zeros(*b.tokens[row].shape, source.num_classes), probe_targets, labels[row],
                **(method_options or {}))  # fmt: skip
    except ValueError as e:
        raise ValueError(f"{method} on these targets ({_targets_kind(source)}): {e}") from None
    if hidden is not None and not isinstance(hidden, HiddenStates):  # pairs as text; none: no hidden states
        hidden = HiddenStates.build(list(hidden), student, source, b.tokens[row]) if list(hidden) else None
    dev = torch.device(device)
    student.to(dev).train()
    rank, size = world()
    if size > 1:
        _broadcast_weights(student)
    params = [p for p in student.parameters() if p.requires_grad]
    if hidden is not None:  # the connectors: trained by the same optimizer, after the student's parameters
        hidden.to(dev).train()
        if size > 1:
            _broadcast_weights(hidden)
        params += [p for p in hidden.parameters() if p.requires_grad]
    opt = optim.make_optimizer(params, recipe)
    gen = torch.Generator().manual_seed(seed)
    options = method_options or {}
    step_size = batch_size * accumulate
    steps_per_epoch = -(-len(train) // step_size)  # the schedule's steps, those without a target included
    losses = []
    start_epoch, start_step, partial = 0, 0, (0.0, 0)
    # The options as the loss takes them (its defaults filled in): --opt temperature=1 is the default run.
    effective = {**getattr(loss_fn, "defaults", {}), **options}
    identity = {"method": method, "options": json.loads(json.dumps(effective, sort_keys=True)), "lr": lr,
                "batch_size": batch_size, "accumulate": accumulate, "optimizer": optimizer,
                "weight_decay": weight_decay, "seed": seed, "amp": amp, "dataset": train.dataset_id,
                "targets": source_identity(source), "world_size": size}  # fmt: skip
    if hidden is not None:  # only with --feature: a run without one resumes an older checkpoint as before
        identity["features"] = hidden.identity()
    # The recipe's other fields where they make a difference (a run with the old constant-rate recipe
    # resumes its older checkpoint as before). A cosine reaches 0 at the last epoch's last step, so its
    # epochs are part of it: more epochs would change the rates of the steps already trained.
    shaped = {k: v for k, v in (("schedule", schedule), ("warmup_epochs", warmup_epochs),
                                ("clip_grad_norm", clip_grad_norm)) if v not in ("constant", 0.0)}  # fmt: skip
    if schedule == "multistep":
        shaped.update(milestones=recipe.milestones, gamma=gamma)
    if schedule in ("cosine", "linear"):
        shaped["epochs"] = epochs
    if optimizer == "sgd":  # train-lm's sgd had no momentum before these fields: such a checkpoint differs
        shaped.update(momentum=momentum, nesterov=nesterov)
    if shaped:
        identity["recipe"] = shaped
    if resume:
        if run_dir is None:
            raise ValueError("resume continues the run in run_dir: give run_dir")
        ckpt = read_run_checkpoint(run_dir, "train-lm", identity, _TOKEN_CKPT_KEYS,
                                   "after each epoch and when it is stopped")  # fmt: skip
        # Fewer epochs than the checkpoint has begun would return a student trained past them (and
        # the losses of the epochs asked for): refused before the student is touched.
        done, into = int(ckpt["epoch"]), int(ckpt["step"])
        if epochs < done + (1 if into else 0):
            where = f"in epoch {done + 1} after {into} of its steps" if into else f"after epoch {done}"
            raise ValueError(f"checkpoint {str(Path(run_dir) / RUN_CHECKPOINT)!r} is {where}: a run of {epochs} "
                             f"epoch(s) ends before it; resume with epochs (--epochs) >= "
                             f"{done + (1 if into else 0)}")  # fmt: skip
        if hidden is not None:  # the identity says the checkpoint was written with these pairs
            hidden.load_state_dict(ckpt["connectors"])
        load_run_state(run_dir, ckpt, student, opt)
        gen.set_state(ckpt["epoch_rng"])
        losses = [float(v) for v in ckpt["losses"]]
        start_epoch, start_step = int(ckpt["epoch"]), int(ckpt["step"])
        partial = (float(ckpt["total"]), int(ckpt["tokens_seen"]))
        torch.set_rng_state(ckpt["torch_rng"][rank])
        if dev.type == "cuda" and "cuda_rng" in ckpt:
            torch.cuda.set_rng_state(ckpt["cuda_rng"][rank], dev)

    def save(epoch: int, step: int, epoch_rng: torch.Tensor, total: float, seen: int) -> None:
        rngs = _rank_rng_states(size, dev)  # every rank: a collective
        if run_dir is None or rank != 0:
            return
        write_run_checkpoint(run_dir, "train-lm", identity, {
            "epoch": epoch, "step": step, "epoch_rng": epoch_rng, "total": total, "tokens_seen": seen,
            "losses": list(losses), "model": student.state_dict(), "optimizer": opt.state_dict(), **rngs,
            **({"connectors": hidden.state_dict()} if hidden is not None else {})})  # fmt: skip

    # A live server's targets of the next micro-batch are asked on a thread while the student trains
    # on this one (the request waits on the network and the teacher, not on this process's cores).
    ahead = int(getattr(source, "token_targets_ahead", 0))
    if hidden is None:

        def fetch(idx: torch.Tensor, tokens: torch.Tensor, real: torch.Tensor, labels: torch.Tensor) -> object:
            return source.token_targets(idx, tokens, real)
    else:
        layers = hidden.teacher_layers

        def fetch(idx: torch.Tensor, tokens: torch.Tensor, real: torch.Tensor, labels: torch.Tensor) -> object:
            # the teacher's states only where the loss counts a token (the logits' counted positions)
            return source.token_targets_hidden(idx, tokens, real, token_mask(labels), layers)

        hidden.attach(student)

    def plan(order: torch.Tensor, first_step: int) -> Iterator[tuple[int, int, list]]:
        """The steps of an epoch holding a counted token, from ``first_step`` on: (step number, the
        step's counted tokens, this rank's micro-batches (idx, tokens, real, labels, counted tokens))."""
        for lo in range(first_step * step_size, len(order), step_size):
            step, micro = order[lo : lo + step_size], []
            for m in range(0, len(step), batch_size):
                idx = step[m : m + batch_size]
                b = train.batch(idx)
                labels = next_token_labels(b.tokens, b.loss_mask)
                micro.append((idx, b.tokens, b.attention_mask, labels, int(token_mask(labels).sum())))
            counted = sum(n for *_, n in micro)
            if not counted:
                # No target in the whole step: no teacher targets asked and no optimizer step, which on
                # zero gradients would still move the weights (AdamW's decay, Adam's moments).
                continue
            if size > 1:  # this rank's slice of each micro-batch; its weight is its share of the step
                sliced = []
                for idx, tokens, real, labels, _ in micro:
                    sl = _rank_slice(len(idx), rank, size)
                    sliced.append((idx[sl], tokens[sl], real[sl], labels[sl], int(token_mask(labels[sl]).sum())))
                micro = sliced
            yield lo // step_size, counted, micro

    try:
        for epoch in range(start_epoch, epochs):
            epoch_rng = gen.get_state()  # the epoch's batch order, for a checkpoint within it
            order = torch.randperm(len(train), generator=gen)
            first_step = start_step if epoch == start_epoch else 0
            total, tokens_seen = partial if epoch == start_epoch else (0.0, 0)
            # With the real positions: a live server computes and sends only those (its answer is packed).
            with contextlib.closing(_targets_ahead(plan(order, first_step), fetch, ahead)) as stream:
                for (step_no, counted, item, first, last), targets in stream:
                    if first:
                        if stop is not None and (signum := _agreed_stop(stop(), size, dev)):
                            if run_dir is not None:
                                save(epoch, step_no, epoch_rng, total, tokens_seen)
                            raise Stopped(signum, f"in epoch {epoch + 1} after {step_no} of its steps")
                        opt.zero_grad(set_to_none=True)
                        step_loss, diverged = 0.0, None
                    idx, tokens, real, labels, n = item
                    # no counted token: its loss is 0 and its weight 0; after a diverged micro-batch one
                    # process stops at this step's end (the ranks learn of it at its all-reduce)
                    if n and (diverged is None or size > 1):
                        if hidden is not None:
                            targets, states = targets
                        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
                            logits = real_vocabulary(logits_of(student(tokens.to(dev))), vocab)
                        loss = loss_fn(logits, targets.to(dev), labels.to(dev), **options)
                        if hidden is not None:
                            loss = loss + hidden.loss(token_mask(labels).to(dev), states)
                        weight = n / counted
                        value = float(loss.detach())
                        if not math.isfinite(value):
                            diverged = value
                        else:
                            (loss * weight).backward()
                            step_loss += value * weight
                    if not last:
                        continue
                    if size > 1:
                        step_loss, diverged = _sum_step(params, step_loss, diverged)
                    if diverged is not None:
                        raise FloatingPointError(f"epoch {epoch}: the training loss is {diverged} "
                                                 "(the run diverged: lower --lr, or set --clip-grad-norm)")  # fmt: skip
                    optim.set_lr(opt, lr * optim.lr_factor(recipe, epoch, step_no, steps_per_epoch, epochs))
                    optim.optimizer_step(opt, recipe, None)  # clips the (summed) gradient first
                    total += step_loss * counted
                    tokens_seen += counted
                    if checkpoint_every and (step_no + 1) % checkpoint_every == 0:
                        save(epoch, step_no + 1, epoch_rng, total, tokens_seen)
            losses.append(total / tokens_seen)  # > 0 tokens: train holds a target (checked above)
            _check_finite(student, epoch)
            if run_dir is not None:  # before the validation: a kill during it loses no step
                save(epoch + 1, 0, gen.get_state(), 0.0, 0)
            if on_epoch is not None:
                on_epoch(epoch, losses[-1])
    finally:  # the student is the user's: no hook of this run stays on it
        if hidden is not None:
            hidden.detach()
    return losses
