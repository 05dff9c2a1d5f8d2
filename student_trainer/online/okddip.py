"""OKDDip, Online Knowledge Distillation with Diverse Peers: Defang Chen, Jian-Ping Mei, Can
Wang, Yan Feng, Chun Chen 2020, AAAI 2020, arXiv:1912.00350.

Two-level distillation in one multi-branch model (shared low layers): ``m`` auxiliary peers
and a group leader (one more branch, the model deployed). First level: each peer ``i`` gets
its own target, an attention-weighted aggregate of the peers' logits, so peers stay diverse::

    q_i = L h_i,  k_j = E h_j                 (h: a peer's pooled feature; L, E: linear, no bias)
    a_ij = softmax_j(q_i . k_j)               (over all peers j, i included)
    t_i = sum_j a_ij z_j

Second level: the leader learns from the peers' mean logits::

    L = sum_i CE(z_i, y) + CE(z_l, y)
        + alpha * w(epoch) * [ sum_i T^2 KL(softmax(t_i/T) || softmax(z_i/T))
                               + T^2 KL(softmax(mean_j z_j / T) || softmax(z_l/T)) ]

``w``: the sigmoid consistency ramp-up (``common.sigmoid_rampup``).

Defaults (the official ``train_GL.py``): T = 3, alpha = 1, 3 peers + 1 leader
(``num_branches`` 4), ramp-up length 80 of 300 epochs (here that fraction of the run:
``rampup``), projection width = feature width // 8. Checked against DefangChen/OKDDip
(``train_GL.py``, ``utils.py`` ``KL_Loss``, ``models/model_cifar/resnet_GL.py``):

* same: one query and one key projection (``nn.Linear(C, C // 8, bias=False)``) shared by the
  peers and applied to each peer's pooled feature (per-peer queries and keys, shared weights);
  attention over all peers including itself; the aggregate is of *logits*; the leader's target
  is the peers' mean logits; CE with unit weights on every peer and the leader.
* the official KL does **not** detach its targets (``KL_Loss`` feeds ``softmax(t/T)`` with its
  graph to ``KLDivLoss``): the targets' gradients are the only ones that reach the attention
  projections, and the peers also receive gradients through the targets. That is the default
  here too (``detach_targets=False``); ``detach_targets=True`` makes the targets constants (the
  projections then get no gradient and stay at their initialisation).
* the official adds 1e-7 to the target softmax; here the KL is exact.
* architecture: the official branches a CIFAR ResNet after ``layer2`` (64-channel features,
  8-wide projections); here the zoo's small CNN (``zoo.MultiBranchCNN``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kd.student_trainer.online.common import Pick, Setup, ce_sum, check_temperature, kl_t, sigmoid_rampup
from kd.student_trainer.train import StepContext, TrainConfig
from kd.student_trainer.zoo import MultiBranchCNN

PAPER = "Chen, Mei, Wang, Feng, Chen 2020, Online Knowledge Distillation with Diverse Peers (arXiv:1912.00350)"
OPTIONS: dict[str, object] = {"temperature": 3.0, "alpha": 1.0, "rampup": 80 / 300, "detach_targets": False,
                              "factor": 8}  # fmt: skip


def peer_targets(peer_logits: Sequence[torch.Tensor], query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``t[:, i] = sum_j softmax_j(q_i . k_j) z_j``: ``query``/``key`` ``[B, m, d]``, logits
    ``[B, K]`` each; returns ``[B, m, K]``."""
    z = torch.stack(list(peer_logits), dim=1)  # [B, m, K]
    if query.shape != key.shape or query.shape[:2] != z.shape[:2]:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} must both be [B, m, d] for "
                         f"{len(peer_logits)} peers of batch {z.shape[0]}")  # fmt: skip
    attention = F.softmax(torch.bmm(query, key.transpose(1, 2)), dim=-1)  # [B, m, m]: a_ij
    return torch.bmm(attention, z)


def okddip_loss(
    peer_logits: Sequence[torch.Tensor],
    leader_logits: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 3.0,
    alpha: float = 1.0,
    consistency_weight: float = 1.0,
    detach_targets: bool = False,
) -> torch.Tensor:
    """OKDDip's objective (module docstring): peers' logits ``[B, K]`` each, the leader's,
    the peers' query and key projections ``[B, m, d]``."""
    check_temperature(temperature)
    if len(peer_logits) < 1:
        raise ValueError("OKDDip needs at least one peer")
    targets = peer_targets(peer_logits, query, key)
    group = torch.stack(list(peer_logits)).mean(0)
    if detach_targets:
        targets, group = targets.detach(), group.detach()
    kl = torch.stack([kl_t(z, targets[:, i], temperature) for i, z in enumerate(peer_logits)]).sum()
    kl = kl + kl_t(leader_logits, group, temperature)
    return ce_sum([*peer_logits, leader_logits], labels) + alpha * consistency_weight * kl


class OKDDipNet(nn.Module):
    """Peers and a leader (the last branch) on shared low layers, with the shared query/key
    projections; ``forward`` gives the leader's logits."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 8, peers: int = 3,
                 factor: int = 8) -> None:  # fmt: skip
        super().__init__()
        self.net = MultiBranchCNN(input_shape, num_classes, width, peers + 1)
        self.input_shape = self.net.input_shape
        feat = 2 * width
        dim = max(1, feat // factor)
        self.query = nn.Linear(feat, dim, bias=False)
        self.key = nn.Linear(feat, dim, bias=False)

    def forward_all(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """(peers' logits, leader's logits, queries [B, m, d], keys [B, m, d])."""
        _, logits, feats = self.net.forward_all(x)
        h = torch.stack(feats[:-1], dim=1)  # [B, m, C]
        return logits[:-1], logits[-1], self.query(h), self.key(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, logits, _ = self.net.forward_all(x)
        return logits[-1]


def setup(input_shape: tuple[int, ...], num_classes: int, *, width: int, branches: int,
          options: dict[str, object], config: TrainConfig) -> Setup:  # fmt: skip
    """``branches``: the number of peers (the leader comes on top)."""
    if branches < 2:
        raise ValueError(f"OKDDip needs >= 2 peers, got {branches}")
    factor = int(options["factor"])
    if factor < 1:
        raise ValueError(f"OKDDip option factor must be >= 1, got {factor}")
    model = OKDDipNet(input_shape, num_classes, width, branches, factor)
    temperature, alpha, rampup = float(options["temperature"]), float(options["alpha"]), float(options["rampup"])
    detach = bool(options["detach_targets"])

    def loss(ctx: StepContext) -> torch.Tensor:
        peers, leader, q, k = model.forward_all(ctx.inputs)
        w = sigmoid_rampup(ctx.epoch, rampup * ctx.config.epochs)
        return okddip_loss(peers, leader, q, k, ctx.labels, temperature=temperature, alpha=alpha,
                           consistency_weight=w, detach_targets=detach)  # fmt: skip

    outputs: dict[str, nn.Module] = {
        f"peer{i}": Pick(model, lambda m, x, i=i: m.net.forward_all(x)[1][i]) for i in range(branches)
    }
    outputs["leader"] = model
    outputs["ensemble"] = Pick(model, lambda m, x: torch.stack(m.net.forward_all(x)[1][:-1]).mean(0))
    return Setup(student=model, loss=loss, outputs=outputs)
