"""DCM, Dense Cross-layer Mutual-distillation: Anbang Yao, Dawei Sun 2020, "Knowledge
Transfer via Dense Cross-Layer Mutual-Distillation", ECCV 2020, arXiv:2008.07816.

Two networks trained together, each with auxiliary classifiers at several depths besides its
own final classifier. Every classifier of one network learns from every classifier of the
other (dense, cross-layer, both ways), and every classifier from the labels::

    L = sum_{c in A u B} CE(z_c, y)
        + weight * sum_{a in A, b in B} [ T^2 KL(softmax(z_b/T) || softmax(z_a/T))
                                          + T^2 KL(softmax(z_a/T) || softmax(z_b/T)) ]

The teacher side of each KL is a constant (detached): in the first term ``z_b`` teaches
``z_a``, in the second ``z_a`` teaches ``z_b``. Deployed: either network's final classifier
(the auxiliary ones are dropped); ``kd online dcm`` reports every classifier of both.

Here network A is the student (``train_student``'s optimiser) and network B an extra module
with its own optimiser (``Hooks.extra``); one backward of L trains both. Defaults: T = 1,
weight 1, ``depth`` = 2 conv stages per network (``zoo.AuxCNN``: the main path is
``kd.models.digits_cnn_student``'s architecture, one auxiliary branch off the first stage;
``depth=3`` gives two auxiliary branches, as the official WRN has).
Checked against sundw2014/DCM (``wrn/main.py``, ``wrn/KL_divergence.py``, ``wrn/resnet.py``):

* same: CE with unit weight on every classifier; the connection map pairs every classifier of
  one network with every classifier of the other (3 x 3 there, both directions, none within a
  network) with unit weights; the teacher side detached; no temperature (T = 1).
* the official smooths both distributions (``(p + 1e-8) / (1 + K 1e-8)``) before the KL; here
  the KL is exact. ``temperature`` and ``weight`` are options here (the official has neither).
* the official trains both networks with one SGD optimiser; here each has its own (same
  recipe), which is the same update for SGD and Adam (per-parameter state).
* architecture: the official uses WRNs whose auxiliary branches are extra residual groups
  (``ep1``, ``ep2``) off the early stages; here a linear classifier after each conv stage.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kd.student_trainer import optim
from kd.student_trainer.online.common import MeanOf, Pick, Setup, ce_sum, check_temperature, kl_t
from kd.student_trainer.train import StepContext, TrainConfig
from kd.student_trainer.zoo import AuxCNN

PAPER = "Yao, Sun 2020, Knowledge Transfer via Dense Cross-Layer Mutual-Distillation (arXiv:2008.07816)"
OPTIONS: dict[str, object] = {"temperature": 1.0, "weight": 1.0, "depth": 2}


def dcm_loss(
    logits_a: Sequence[torch.Tensor],
    logits_b: Sequence[torch.Tensor],
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    weight: float = 1.0,
) -> torch.Tensor:
    """DCM's objective (module docstring): every classifier's logits of network A and of B."""
    check_temperature(temperature)
    if not logits_a or not logits_b:
        raise ValueError("DCM needs at least one classifier in each network")
    kl = []
    for za in logits_a:
        for zb in logits_b:
            kl.append(kl_t(za, zb.detach(), temperature))
            kl.append(kl_t(zb, za.detach(), temperature))
    return ce_sum([*logits_a, *logits_b], labels) + weight * torch.stack(kl).sum()


def setup(input_shape: tuple[int, ...], num_classes: int, *, width: int, branches: int,
          options: dict[str, object], config: TrainConfig) -> Setup:  # fmt: skip
    """``branches`` is not used: DCM has two networks; option ``depth``: conv stages of each."""
    depth = int(options["depth"])
    net_a = AuxCNN(input_shape, num_classes, width, depth)
    net_b = AuxCNN(input_shape, num_classes, width, depth)
    opt_b = optim.make_optimizer(net_b.parameters(), optim.recipe_of(config))
    temperature, weight = float(options["temperature"]), float(options["weight"])

    def loss(ctx: StepContext) -> torch.Tensor:
        return dcm_loss(net_a.forward_all(ctx.inputs), net_b.forward_all(ctx.inputs), ctx.labels,
                        temperature=temperature, weight=weight)  # fmt: skip

    outputs: dict[str, nn.Module] = {}
    for name, net in (("a", net_a), ("b", net_b)):
        for i in range(len(net.aux)):
            outputs[f"{name}_aux{i}"] = Pick(net, lambda m, x, i=i: m.forward_all(x)[i])
        outputs[f"{name}_main"] = net
    outputs["ensemble"] = MeanOf([net_a, net_b])  # the two main classifiers
    return Setup(student=net_a, loss=loss, outputs=outputs, extra=[(net_b, opt_b)], others={"peer": net_b})
