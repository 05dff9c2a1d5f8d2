"""ONE, On-the-fly Native Ensemble: Xu Lan, Xiatian Zhu, Shaogang Gong 2018, "Knowledge
Distillation by On-the-Fly Native Ensemble", NeurIPS 2018, arXiv:1806.04606.

One multi-branch student: shared low layers, ``m`` branches (the high layers and a classifier
each), and a gate on the shared features giving per-sample branch weights ``g`` (softmax).
The gated ensemble of the branches' logits is the teacher, built on the fly::

    z_e = sum_i g_i * z_i
    L   = sum_i CE(z_i, y) + CE(z_e, y)
          + w(epoch) * sum_i T^2 * KL(softmax(z_e / T) || softmax(z_i / T))

The ensemble is a constant in the KL terms (detached: the branches learn from it, it learns
from the labels through its own CE term, which alone trains the gate). ``w`` is the sigmoid
consistency ramp-up ``exp(-5 (1 - epoch / R)^2)`` (``common.sigmoid_rampup``). Deployed: one
branch (the smallest model) or the gated ensemble; ``kd online one`` reports both.

Defaults: T = 3, three branches, R = 80/300 of the epochs. What was checked against the
official code (Lan1991Xu/ONE_NeurIPS2018: ``cifar_one.py``, ``loss/kl_loss.py``,
``models/cifar/resnet.py``), and where this differs:

* same: T = 3 (hard-coded in ``KLLoss``), T^2 scaling, batch-mean KL summed over the branches
  with unit weights, the detached ensemble target, CE on every branch and on the ensemble;
  the gate is global average pooling of the shared features -> Linear(C, m) -> BatchNorm1d ->
  ReLU -> softmax, and the ensemble weighs the branches' *logits*.
* the official ramp-up is ``sigmoid_rampup(epoch, 80)`` over 300 epochs (its ``utils/ramps.py``
  is not in the stored copy; the form here is mean teacher's, which its comment cites); here the
  length is the same fraction of the run (``rampup``, 80/300 of ``epochs``).
* the official target adds 1e-7 to the softmax before its log (a slightly unnormalised
  target); here the KL is exact.
* architecture: the official splits a CIFAR ResNet after ``layer2``; here the zoo's small CNN
  (``zoo.MultiBranchCNN``: one conv stage shared, one conv stage + classifier per branch).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kd.student_trainer.online.common import Pick, Setup, ce_sum, check_temperature, kl_t, sigmoid_rampup
from kd.student_trainer.train import StepContext, TrainConfig
from kd.student_trainer.zoo import MultiBranchCNN

PAPER = "Lan, Zhu, Gong 2018, Knowledge Distillation by On-the-Fly Native Ensemble (arXiv:1806.04606)"
OPTIONS: dict[str, object] = {"temperature": 3.0, "rampup": 80 / 300}


def gated_ensemble(branch_logits: Sequence[torch.Tensor], gate: torch.Tensor) -> torch.Tensor:
    """``sum_i gate[:, i] * z_i``: the gate's per-sample weights over the branches' logits."""
    z = torch.stack(list(branch_logits), dim=1)  # [B, m, K]
    if gate.shape != z.shape[:2]:
        raise ValueError(f"the gate gives {tuple(gate.shape)} weights for {len(branch_logits)} branches of "
                         f"batch {z.shape[0]}; expected {tuple(z.shape[:2])}")  # fmt: skip
    return (gate.unsqueeze(-1) * z).sum(1)


def one_loss(
    branch_logits: Sequence[torch.Tensor],
    gate: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 3.0,
    consistency_weight: float = 1.0,
) -> torch.Tensor:
    """ONE's objective (see the module docstring) for the branches' logits ``[B, K]`` each and
    the gate's weights ``[B, m]`` (rows summing to 1)."""
    check_temperature(temperature)
    if len(branch_logits) < 1:
        raise ValueError("ONE needs at least one branch")
    ensemble = gated_ensemble(branch_logits, gate)
    target = ensemble.detach()
    kl = torch.stack([kl_t(z, target, temperature) for z in branch_logits]).sum()
    return ce_sum([*branch_logits, ensemble], labels) + consistency_weight * kl


class ONENet(nn.Module):
    """The multi-branch student with ONE's gate; ``forward`` gives the gated ensemble."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 8, branches: int = 3) -> None:
        super().__init__()
        self.net = MultiBranchCNN(input_shape, num_classes, width, branches)
        self.input_shape = self.net.input_shape
        self.gate = nn.Sequential(nn.Linear(width, branches), nn.BatchNorm1d(branches), nn.ReLU())

    def forward_all(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        low, logits, _ = self.net.forward_all(x)
        gate = F.softmax(self.gate(F.adaptive_avg_pool2d(low, 1).flatten(1)), dim=1)
        return logits, gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gated_ensemble(*self.forward_all(x))


def setup(input_shape: tuple[int, ...], num_classes: int, *, width: int, branches: int,
          options: dict[str, object], config: TrainConfig) -> Setup:  # fmt: skip
    if branches < 2:
        raise ValueError(f"ONE needs >= 2 branches, got {branches}")
    model = ONENet(input_shape, num_classes, width, branches)
    temperature, rampup = float(options["temperature"]), float(options["rampup"])

    def loss(ctx: StepContext) -> torch.Tensor:
        logits, gate = model.forward_all(ctx.inputs)
        w = sigmoid_rampup(ctx.epoch, rampup * ctx.config.epochs)
        return one_loss(logits, gate, ctx.labels, temperature=temperature, consistency_weight=w)

    outputs: dict[str, nn.Module] = {
        f"branch{i}": Pick(model, lambda m, x, i=i: m.forward_all(x)[0][i]) for i in range(branches)
    }
    outputs["ensemble"] = model
    return Setup(student=model, loss=loss, outputs=outputs)
