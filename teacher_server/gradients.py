"""Gradients through a frozen teacher, for data-free distillation (WHITE tier).

* ``VJPRunner``: the input gradient of sum_o <upstream_o, output_o(x)>, a batcher runner
  (``kd.teacher_server.batcher``), so requests from many clients share one forward and
  backward like Infer requests do. Correct to batch: the teacher is in eval mode, so
  sample i's outputs depend only on sample i. Rows travel packed as
  [inputs | upstream logits | upstream features ...] so the batcher's row slicing applies.
* ``batchnorm_loss``: DeepInversion's feature-statistics regulariser for *one* client's
  batch (it couples the batch's samples, so it is never merged with other requests),
  optionally with Fast-DFKD's momentum state kept under a client-chosen id (``BNStates``).
* ``synthesize``: a DeepInversion loop next to the model, yielding progress.
* ``JobQueue``: one worker thread per teacher and kind that runs those whole jobs
  (a BatchNorm loss couples its batch, a synthesis is a loop), behind a bounded queue,
  so gRPC handler threads never run the model and a burst of jobs is refused at once.

Forward hooks capture only on the thread that registered them: Infer's runner and these
paths may run the same module at the same time.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kd.core.factory import logits_of
from kd.teacher_server.batcher import BatcherClosedError, QueueFullError
from kd.teacher_server.loading import Teacher

LOGITS = "logits"


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class _ThreadHooks:
    """Forward hooks on named modules that record only this thread's calls."""

    def __init__(self, modules: dict[str, nn.Module], names: Sequence[str], *, inputs: bool = False) -> None:
        self.owner = threading.get_ident()
        self.seen: dict[str, torch.Tensor] = {}
        self.handles = []
        for name in names:

            def hook(_m, args, output, name=name) -> None:
                if threading.get_ident() != self.owner:
                    return
                if inputs:
                    # Not cloned: the BatchNorm layers whose inputs these are save them for their
                    # backward, so autograd refuses any later in-place change of them.
                    self.seen[name] = args[0]
                    return
                v = output[0] if isinstance(output, (tuple, list)) else output
                # A clone, which autograd tracks (the gradient still flows through it into the
                # input): a later in-place op (ReLU(inplace=True)) must not change the output
                # served or the one the upstream gradient is paired with.
                self.seen[name] = v.clone()

            self.handles.append(modules[name].register_forward_hook(hook))

    def __enter__(self) -> _ThreadHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


@dataclass(frozen=True)
class PackLayout:
    """Per-sample widths of [inputs | upstream logits | upstream features] in a packed row."""

    input_shape: tuple[int, ...]
    num_classes: int
    layers: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def widths(self) -> list[int]:
        return [math.prod(self.input_shape), self.num_classes, *(math.prod(s) for _, s in self.layers)]

    def pack(self, x: torch.Tensor, upstream: dict[str, torch.Tensor]) -> torch.Tensor:
        n = x.shape[0]
        g_logits = upstream.get(LOGITS)
        parts = [x.reshape(n, -1).float(), (g_logits if g_logits is not None else x.new_zeros(n, self.num_classes))]
        parts += [upstream[f"feature/{name}"].reshape(n, -1).float() for name, _ in self.layers]
        return torch.cat([p.float() for p in parts], dim=1)

    def unpack(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        parts = rows.split(self.widths, dim=1)
        n = rows.shape[0]
        x = parts[0].reshape(n, *self.input_shape)
        feats = {name: p.reshape(n, *shape) for (name, shape), p in zip(self.layers, parts[2:])}
        return x, parts[1], feats


class VJPRunner:
    """``BatchRunner`` computing input gradients for packed rows of one ``PackLayout``."""

    def __init__(self, teacher: Teacher, layout: PackLayout) -> None:
        self.teacher = teacher
        self.layout = layout
        self.modules = dict(teacher.model.named_modules())

    def prepare(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.to(self.teacher.device)

    def forward(self, rows: torch.Tensor, layers: frozenset[str]) -> dict[str, torch.Tensor]:
        x, g_logits, g_feats = self.layout.unpack(rows)
        x = x.to(self.teacher.input_dtype).detach().requires_grad_(True)
        names = [name for name, _ in self.layout.layers]
        with torch.enable_grad(), _ThreadHooks(self.modules, names) as hooks:
            out = self.teacher.model(x)
            logits = logits_of(out)
            total = (logits.float() * g_logits).sum()
            for name in names:
                total = total + (hooks.seen[name].float() * g_feats[name]).sum()
            (grad,) = torch.autograd.grad(total, x)
        result = {"input_grad": grad.float().detach(), LOGITS: logits.detach().float()}
        for name in names:
            result[f"feature/{name}"] = hooks.seen[name].detach().float()
        return result

    def to_host(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to("cpu") for k, v in outputs.items()}


class BNStates:
    """Fast-DFKD momentum state per client-chosen id, each kept for its time-to-live;
    at most ``capacity`` ids (the least recently used go first)."""

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, tuple[float, list[tuple[torch.Tensor, torch.Tensor]]]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        now = time.monotonic()
        with self._lock:
            item = self._items.get(key)
            if item is None or item[0] < now:
                self._items.pop(key, None)
                return None
            self._items.move_to_end(key)
            return item[1]

    def put(self, key: str, value: list[tuple[torch.Tensor, torch.Tensor]], ttl: float) -> None:
        with self._lock:
            self._items[key] = (time.monotonic() + ttl, value)
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class BNLossResult:
    loss: float
    per_layer: dict[str, float]
    input_grad: torch.Tensor
    logits: torch.Tensor


def _bn_terms(
    hooks: _ThreadHooks,
    bns: list[tuple[str, nn.modules.batchnorm._BatchNorm]],
    previous: list[tuple[torch.Tensor, torch.Tensor]] | None,
    momentum: float,
) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    terms, blends = [], []
    for k, (name, bn) in enumerate(bns):
        f = hooks.seen[name].float()
        dims = [d for d in range(f.ndim) if d != 1]
        mean = f.mean(dim=dims)
        var = f.var(dim=dims, unbiased=False)
        if previous is not None:
            mean = momentum * previous[k][0] + (1 - momentum) * mean
            var = momentum * previous[k][1] + (1 - momentum) * var
        blends.append((mean.detach(), var.detach()))
        terms.append(torch.linalg.vector_norm(mean - bn.running_mean) + torch.linalg.vector_norm(var - bn.running_var))
    return terms, blends


def batchnorm_loss(
    teacher: Teacher,
    x: torch.Tensor,
    *,
    states: BNStates | None = None,
    state_id: str = "",
    momentum: float = 0.0,
    ttl: float = 600.0,
    upstream_logits: torch.Tensor | None = None,
    layer_weights: Sequence[float] = (),
) -> BNLossResult:
    """R_bn of DeepInversion for the batch ``x`` and its input gradient (plus <upstream, logits>)."""
    model = teacher.model
    bns = batchnorm_layers(model)
    if not bns:
        raise ValueError(f"teacher {teacher.name!r} has no BatchNorm layers")
    weights = list(layer_weights) or [1.0] * len(bns)
    if len(weights) != len(bns):
        raise ValueError(f"layer_weights has {len(weights)} values, teacher {teacher.name!r} has {len(bns)} BN layers")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if x.shape[0] < 2:
        raise ValueError("BatchNorm statistics need a batch of at least 2 samples")
    previous = states.get(state_id) if (states is not None and state_id) else None
    x = x.to(teacher.device, teacher.input_dtype).detach().requires_grad_(True)
    modules = dict(model.named_modules())
    with torch.enable_grad(), _ThreadHooks(modules, [n for n, _ in bns], inputs=True) as hooks:
        out = model(x)
        logits = logits_of(out).float()
        terms, blends = _bn_terms(hooks, bns, previous, momentum)
        loss = sum(w * t for w, t in zip(weights, terms))
        total = loss if upstream_logits is None else loss + (logits * upstream_logits.to(logits.device)).sum()
        (grad,) = torch.autograd.grad(total, x)
    if not (bool(torch.isfinite(loss.detach())) and bool(torch.isfinite(grad).all())):
        raise ValueError(
            "the BatchNorm loss or its input gradient is not finite for these inputs (NaN or Inf): "
            "inputs or layer_weights too large for float32"
        )
    if states is not None and state_id:
        states.put(state_id, blends, ttl)
    return BNLossResult(
        float(loss.detach()),
        {name: float(t.detach()) for (name, _), t in zip(bns, terms)},
        grad.detach().float().cpu(),
        logits.detach().cpu(),
    )


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """DeepInversion's L2 image prior: norms of differences of neighbouring pixels
    (rows, columns, both diagonals) for [N, C, H, W]; 0 for inputs that are not images."""
    if x.ndim != 4:
        return x.new_zeros(())
    d1 = x[:, :, :, :-1] - x[:, :, :, 1:]
    d2 = x[:, :, :-1, :] - x[:, :, 1:, :]
    d3 = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
    d4 = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
    return sum(torch.linalg.vector_norm(d) for d in (d1, d2, d3, d4))


class SynthesisDiverged(ValueError):
    """The synthesis loss became NaN or Inf: the request's settings make it diverge."""


@dataclass
class SynthesisParams:
    batch_size: int
    targets: list[int]
    iterations: int = 200
    lr: float = 0.05
    bn_weight: float = 1.0
    tv_weight: float = 1e-4
    l2_weight: float = 1e-5
    seed: int = 0
    report_every: int = 0


def synthesize(teacher: Teacher, p: SynthesisParams, *, should_stop=lambda: False) -> Iterator[dict]:
    """DeepInversion (Yin et al. 2020) next to the model: optimise seeded noise so the
    teacher classifies it as ``targets`` while its BN input statistics match the running
    ones. Yields {"iteration", "loss", "terms"} every ``report_every`` steps and last
    {"done": True, "inputs", "targets", ...}."""
    bns = batchnorm_layers(teacher.model)
    g = torch.Generator().manual_seed(p.seed)
    x = torch.randn(p.batch_size, *teacher.input_shape, generator=g).to(teacher.device).requires_grad_(True)
    y = torch.tensor(p.targets, dtype=torch.long, device=teacher.device)
    opt = torch.optim.Adam([x], lr=p.lr, betas=(0.5, 0.9))
    modules = dict(teacher.model.named_modules())
    terms: dict[str, float] = {}
    loss_value = float("nan")
    for it in range(1, p.iterations + 1):
        if should_stop():
            return
        with torch.enable_grad(), _ThreadHooks(modules, [n for n, _ in bns], inputs=True) as hooks:
            out = teacher.model(x)
            logits = logits_of(out).float()
            ce = F.cross_entropy(logits, y)
            bn = sum(_bn_terms(hooks, bns, None, 0.0)[0]) if bns else logits.new_zeros(())
            tv = total_variation(x)
            l2 = torch.linalg.vector_norm(x.reshape(len(x), -1), dim=1).mean()
            loss = ce + p.bn_weight * bn + p.tv_weight * tv + p.l2_weight * l2
            opt.zero_grad(set_to_none=True)
            loss.backward()
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise SynthesisDiverged(
                f"synthesis diverged at iteration {it}: the loss is {loss_value}; lower lr or the weights"
            )
        opt.step()
        terms = {"ce": float(ce), "bn": float(bn), "tv": float(tv), "l2": float(l2),
                 "accuracy": float((logits.argmax(1) == y).float().mean())}  # fmt: skip
        if p.report_every and it % p.report_every == 0 and it < p.iterations:
            yield {"iteration": it, "loss": loss_value, "terms": terms}
    yield {"iteration": p.iterations, "loss": loss_value, "terms": terms, "done": True,
           "inputs": x.detach().float().cpu(), "targets": y.cpu()}  # fmt: skip


class JobQueue:
    """Runs whole jobs (callables) one at a time on its own thread, next to the model.

    At most ``max_queued`` jobs wait; ``submit`` beyond that raises QueueFullError at
    once (the caller answers RESOURCE_EXHAUSTED), after ``close`` BatcherClosedError.
    A job whose future was cancelled while queued (its caller went away) never runs.
    """

    def __init__(self, name: str, max_queued: int = 8) -> None:
        if max_queued < 1:
            raise ValueError(f"max_queued must be >= 1, got {max_queued}")
        self.name = name
        self.max_queued = max_queued
        self._queue: queue.Queue = queue.Queue(maxsize=max_queued)
        self._closed = False
        self._running = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=f"jobs-{name}", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        """Whether a job is queued or running."""
        return self._running or not self._queue.empty()

    def submit(self, fn: Callable[[], object]) -> Future:
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise BatcherClosedError("the teacher is shutting down and takes no new requests")
            try:
                self._queue.put_nowait((fn, future))
            except queue.Full:
                raise QueueFullError(
                    f"{self.name}: {self.max_queued} jobs already queued (max_jobs_queued={self.max_queued})"
                ) from None
        return future

    def close(self, timeout: float | None = None) -> None:
        """Take no new jobs, finish the queued ones, stop the thread."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, future = item
            if not future.set_running_or_notify_cancel():
                continue
            self._running = True
            try:
                future.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - belongs to the caller
                future.set_exception(e)
            finally:
                self._running = False
