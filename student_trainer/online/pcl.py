"""PCL, Peer Collaborative Learning: Guile Wu, Shaogang Gong 2021, "Peer Collaborative
Learning for Online Knowledge Distillation", AAAI 2021, arXiv:2006.04147.

A multi-branch student (shared low layers, ``m`` peer branches) with two kinds of teacher:

* the **peer ensemble teacher**: a linear classifier on the concatenated features of all
  branches, ``z_e = W [h_1; ...; h_m]``, trained with CE and distilled into every branch;
* the **peer mean teachers**: a temporal mean (EMA) of the whole model's weights,
  ``theta' <- a theta' + (1 - a) theta`` after every step; branch ``i`` learns from the other
  branches' temporal means (each peer is taught by its peers, not by itself)::

    L = CE(z_e, y) + sum_i [ CE(z_i, y)
          + w(epoch) * T^2 KL(softmax(z_e/T) || softmax(z_i/T))
          + w(epoch) * 1/(m-1) sum_{j != i} T^2 KL(softmax(z'_j/T) || softmax(z_i/T)) ]

``z_e`` is a constant in the KL terms (detached), ``z'_j`` come from the temporal mean (no
gradient). ``w``: the sigmoid consistency ramp-up (``common.sigmoid_rampup``). Deployed: the
temporal mean model (one of its branches); ``kd online pcl`` reports each branch of both the
trained and the temporal-mean model, and their ensembles.

Defaults: T = 3, three branches, EMA decay a = 0.999 with mean teacher's warm-up
``a_t = min(1 - 1/(t+1), a)`` (the true average over the first steps), ramp-up over 80/300 of
the epochs. With the warm-up, the temporal mean of a run of a few hundred steps is close to the
plain average of all its weights since the start, which lags far behind: short runs want a
smaller decay (``ema_decay=0.99`` on digits: see ``kd online pcl --opt ema_decay=0.99``).
The authors' code is not public (the paper gives none); what was checked is the
re-implementation shaoeric/Peer-Collaborative-Learning-for-Online-Knowledge-Distillation
(``src/losses/loss_wrapper.py``, ``kd_loss.py``, ``src/models/resnet.py``, ``src/utils/ema.py``):

* same: the ensemble head is one Linear on the concatenated pooled branch features; CE on the
  ensemble and on each branch, the detached ensemble target, each branch's mean-teacher term
  averaged over the other branches' temporal means; the EMA averages the parameters (not the
  BatchNorm statistics: the temporal mean runs in train mode during training and keeps its
  own running statistics) with the warm-up above.
* that re-implementation computes its ramp-up as ``exp(-5 (1 - epoch / 1)^2)`` for epochs up to
  80 (it divides by the weight, 1, instead of the length); here ``t = epoch / length`` as in
  mean teacher.
* the paper feeds each branch a differently augmented copy of the batch; here every branch
  sees the same batch (the loop draws one view per sample).
* architecture: the zoo's small CNN (``zoo.MultiBranchCNN``) instead of a CIFAR ResNet.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from kd.student_trainer.online.common import Pick, Setup, ce_sum, check_temperature, kl_t, sigmoid_rampup
from kd.student_trainer.train import StepContext, TrainConfig, accuracy
from kd.student_trainer.zoo import MultiBranchCNN

PAPER = "Wu, Gong 2021, Peer Collaborative Learning for Online Knowledge Distillation (arXiv:2006.04147)"
OPTIONS: dict[str, object] = {"temperature": 3.0, "rampup": 80 / 300, "ema_decay": 0.999}


def pcl_loss(
    branch_logits: Sequence[torch.Tensor],
    ensemble_logits: torch.Tensor,
    mean_logits: Sequence[torch.Tensor],
    labels: torch.Tensor,
    *,
    temperature: float = 3.0,
    consistency_weight: float = 1.0,
) -> torch.Tensor:
    """PCL's objective (module docstring): the branches' logits, the peer ensemble's, and the
    temporal-mean model's branch logits (``mean_logits[j]``: branch j's peer mean teacher)."""
    check_temperature(temperature)
    m = len(branch_logits)
    if m < 2 or len(mean_logits) != m:
        raise ValueError(f"PCL needs >= 2 branches and one temporal mean per branch, got {m} and {len(mean_logits)}")
    target = ensemble_logits.detach()
    means = [z.detach() for z in mean_logits]
    pe = torch.stack([kl_t(z, target, temperature) for z in branch_logits]).sum()
    pm = torch.stack([
        torch.stack([kl_t(z, means[j], temperature) for j in range(m) if j != i]).mean()
        for i, z in enumerate(branch_logits)
    ]).sum()  # fmt: skip
    return ce_sum([ensemble_logits, *branch_logits], labels) + consistency_weight * (pe + pm)


class PCLNet(nn.Module):
    """Peer branches on shared low layers and the peer ensemble head; ``forward`` gives the
    ensemble's logits."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 8, branches: int = 3) -> None:
        super().__init__()
        self.net = MultiBranchCNN(input_shape, num_classes, width, branches)
        self.input_shape = self.net.input_shape
        self.ensemble = nn.Linear(2 * width * branches, num_classes)

    def forward_all(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        _, logits, feats = self.net.forward_all(x)
        return logits, self.ensemble(torch.cat(feats, dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x)[1]


@torch.no_grad()
def ema_update(mean: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """``theta' <- a theta' + (1 - a) theta`` over the parameters, ``a = min(1 - 1/(step+1), decay)``."""
    a = min(1.0 - 1.0 / (step + 1), decay)
    for p_mean, p in zip(mean.parameters(), model.parameters()):
        p_mean.mul_(a).add_(p.detach(), alpha=1.0 - a)


def setup(input_shape: tuple[int, ...], num_classes: int, *, width: int, branches: int,
          options: dict[str, object], config: TrainConfig) -> Setup:  # fmt: skip
    if branches < 2:
        raise ValueError(f"PCL needs >= 2 branches, got {branches}")
    decay = float(options["ema_decay"])
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"PCL option ema_decay must be in [0, 1), got {decay}")
    model = PCLNet(input_shape, num_classes, width, branches)
    mean = copy.deepcopy(model).to(config.device)
    for p in mean.parameters():
        p.requires_grad_(False)
    temperature, rampup = float(options["temperature"]), float(options["rampup"])
    steps = [0]

    def loss(ctx: StepContext) -> torch.Tensor:
        logits, ensemble = model.forward_all(ctx.inputs)
        mean.train()  # its own BatchNorm statistics, from the batches it sees
        with torch.no_grad():
            mean_logits, _ = mean.forward_all(ctx.inputs)
        w = sigmoid_rampup(ctx.epoch, rampup * ctx.config.epochs)
        return pcl_loss(logits, ensemble, mean_logits, ctx.labels, temperature=temperature, consistency_weight=w)

    def on_step(epoch: int, step: int, value: float, lr: float) -> None:
        ema_update(mean, model, decay, steps[0])
        steps[0] += 1

    def branch(i: int):
        return lambda m, x: m.forward_all(x)[0][i]

    outputs: dict[str, nn.Module] = {}
    for i in range(branches):
        outputs[f"mean_branch{i}"] = Pick(mean, branch(i))
    outputs["mean_ensemble"] = mean
    for i in range(branches):
        outputs[f"branch{i}"] = Pick(model, branch(i))
    outputs["ensemble"] = model

    def evaluate(student: nn.Module, data) -> float:  # the deployed model: the temporal mean's first branch
        return accuracy(outputs["mean_branch0"], data, device=config.device)

    return Setup(student=model, loss=loss, outputs=outputs, ensemble="mean_ensemble", on_step=on_step,
                 evaluate=evaluate, others={"temporal_mean": mean}, state=lambda: {"ema_steps": steps[0]},
                 load_state=lambda saved: steps.__setitem__(0, int(saved["ema_steps"])))  # fmt: skip
