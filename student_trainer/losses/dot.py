"""``--optimizer dot``: Zhao, Cui, Song, Liang 2023, "DOT: A Distillation-Oriented Trainer" (ICCV 2023;
arXiv 2307.08436; official code: mdistiller ``mdistiller/engine/dot.py`` and ``trainer.py``'s
``DOT`` trainer).

DOT is not a loss but an optimiser: SGD that keeps *two* momentum buffers, one for the
gradient of the task loss (CE on the labels) and one for the gradient of the distillation
loss, with a larger momentum for the distillation part, so that it dominates the direction
of the update (the paper's finding: the two terms conflict, and the task loss otherwise wins).
With g_task, g_kd the two gradients of a parameter, m the recipe's momentum and
delta = 0.075 (mdistiller ``SOLVER.DOT.DELTA``):

    m_task = m - delta,   m_kd = m + delta
    b_task <- m_task * b_task + (g_task + wd * theta)          (first step: b_task = g_task + wd * theta)
    theta  <- theta - lr * b_task
    b_kd   <- m_kd * b_kd + g_kd                               (first step: b_kd = g_kd)
    theta  <- theta - lr * b_kd

A parameter that gets only one of the two gradients (a connector that only the distillation
term reaches) uses the mean momentum (m_task + m_kd) / 2 = m for it, and the weight decay is
added to its distillation gradient -- all as mdistiller's ``dot`` function (no dampening,
no Nesterov).

In kd: ``--optimizer dot --momentum 0.9`` (mdistiller's SGD momentum) on a method whose loss
is ``w * CE(z_s, y) + distillation``: logit methods with a ``ce_weight`` option (w =
ce_weight), ``kd`` (w = 1 - alpha), and every feature method (w = its ``ce_weight``; the rest,
connectors' terms included, is the distillation part, as mdistiller's ``CRDDOT`` splits CRD).
The trainer back-propagates the loss minus w * CE first (the distillation gradient, kept by
``DOT.capture_kd``), then w * CE, and steps once, as mdistiller's ``DOT.train_iter`` does
with ``loss_kd`` and ``loss_ce``.

Not supported (each refused with a message): fp16 AMP and gradient clipping (mdistiller
refuses AMP too; a clip would see only the task gradient), torchrun, loss hooks and hooks'
extra modules, pair methods. delta is fixed at 0.075.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from kd.student_trainer.losses import METHOD_OPTION_RANGES, FeatureMethod, Method

DELTA = 0.075


class DOT(torch.optim.Optimizer):
    """SGD with separate momentum buffers for the task and the distillation gradients."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.9, delta: float = DELTA,
                 weight_decay: float = 0.0) -> None:  # fmt: skip
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"dot: lr and weight_decay must be >= 0, got {lr} and {weight_decay}")
        if momentum - delta < 0 or momentum + delta > 1:
            raise ValueError(f"dot: momentum - delta and momentum + delta must lie in [0, 1], got {momentum}, {delta}")
        defaults = {"lr": lr, "momentum": momentum - delta, "momentum_kd": momentum + delta,
                    "weight_decay": weight_decay}  # fmt: skip
        super().__init__(params, defaults)
        self._kd_grads: dict[torch.Tensor, torch.Tensor] = {}

    @torch.no_grad()
    def capture_kd(self) -> None:
        """Keep the gradients now in ``.grad`` as the distillation gradients, and clear ``.grad``."""
        self._kd_grads = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._kd_grads[p] = p.grad
                    p.grad = None

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 (torch's signature)
        """One update from the task gradients now in ``.grad`` and the captured distillation ones."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        kd = self._kd_grads
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            m_task, m_kd = group["momentum"], group["momentum_kd"]
            mean = (m_task + m_kd) / 2.0
            task_params = [p for p in group["params"] if p.grad is not None]
            task_set = set(task_params)
            for p in task_params:
                d = p.grad.add(p, alpha=wd) if wd else p.grad
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = d.clone().detach()
                else:
                    buf.mul_(m_task if p in kd else mean).add_(d)
                p.add_(buf, alpha=-lr)
            for p in group["params"]:
                if p not in kd:
                    continue
                d = kd[p]
                state = self.state[p]
                buf = state.get("momentum_kd_buffer")
                if buf is None:
                    buf = state["momentum_kd_buffer"] = d.clone().detach()
                elif p in task_set:
                    buf.mul_(m_kd).add_(d)
                else:
                    buf.mul_(mean).add_(d.add(p, alpha=wd) if wd else d)
                p.add_(buf, alpha=-lr)
        self._kd_grads = {}
        return loss


def task_weight(method: Method | FeatureMethod, options: dict[str, object]) -> float:
    """w of the method's ``w * CE(z_s, y)`` term: its ``ce_weight``, or 1 - alpha for ``kd``."""
    if method.pairs:
        raise ValueError(f"--optimizer dot does not split pair methods ({method.name!r}) yet")
    opts = {**method.defaults, **options}
    if "ce_weight" in opts:
        return float(opts["ce_weight"])
    if method.name == "kd" and (method.name, "alpha") not in METHOD_OPTION_RANGES:
        return 1.0 - float(opts["alpha"])
    raise ValueError(
        f"--optimizer dot splits the loss into w * CE and a distillation term; method {method.name!r} has no CE "
        "weight option (methods with a ce_weight option and kd are supported)"
    )


def task_loss(method: Method | FeatureMethod, options: dict[str, object], logits: torch.Tensor,
              labels: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The task term ``w * CE(z_s, y)`` of the method's loss (what DOT's task momentum gets)."""
    w = task_weight(method, options)
    if isinstance(method, FeatureMethod) and method.rotations:  # CE on the unrotated rows (SSKD)
        logits, labels = logits[::4], labels[::4]
    return w * F.cross_entropy(logits, labels) if w else logits.sum() * 0.0
