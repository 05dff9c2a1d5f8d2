"""OEMC, Online Ensemble Model Compression: Devesh Walawalkar, Zhiqiang Shen, Marios Savvides
2020, "Online Ensemble Model Compression using Knowledge Distillation", ECCV 2020,
arXiv:2011.07449 (code: Devwalkar/BOC-KD).

One model: a common base (the first layers) and ``n`` student branches whose channels are
compressed to (n - j)/n of the full width (student 0 is the uncompressed one). The ensemble of
the students -- the mean of their logits -- is the teacher, learnt together with them. Three
terms::

    z_e = 1/n sum_j z_j
    L = a * sum_j CE(z_j, y)
        + b * sum_{j >= 1} MSE(A_j(f_j), f_0)              (f: a student's feature map; f_0 constant)
        + c * sum_j T^2 KL(softmax(z_e/T) || softmax(z_j/T))  (z_e constant)

``A_j``: a 1x1 convolution from student j's channels to student 0's (adaptation layers,
trained with their own optimiser at half the learning rate). Deployed: any one student (the
compressed ones are the point); ``kd online oemc`` reports each student and the ensemble.

Defaults (the official ``configs/config_template.py``): a, b, c = 0.7, 0.15, 0.15, T = 3, four
students. Checked against the official ``utils/Losses.py`` (``Combined_Loss``, ``KL_Loss``,
``Intermmediate_loss``), ``models/ResNet_cifar.py`` (``BIO_ResNet``, ``depth_channel_computer``)
and ``tools/train.py``:

* same: CE on the students only (the ensemble's CE is logged, not trained), the ensemble as the
  students' mean logits (the official's ensemble weights, 1/n, are not in its optimiser), the
  detached ensemble target with an exact KL times T^2 summed over all students (student 0
  included), MSE (mean) between each compressed student's adapted map and student 0's detached
  map, adaptation layers at half the learning rate, the common base trained by every student.
* the official creates the adaptation layers at the first forward and adds them to the
  optimiser only after the first epoch (random, fixed 1x1 projections until then); here they
  train from the first step.
* the official compares maps after each of three residual stages; here one stage per student
  (the zoo-style small CNN: a shared conv stage, then a conv stage + classifier per student),
  widths int((n - j)/n * 2 * width) (floored as ``depth_channel_computer`` does).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kd.student_trainer import optim
from kd.student_trainer.online.common import Pick, Setup, ce_sum, check_temperature, kl_t
from kd.student_trainer.train import StepContext, TrainConfig
from kd.student_trainer.zoo import CNNBranch, image_shape

PAPER = "Walawalkar, Shen, Savvides 2020, Online Ensemble Model Compression using KD (arXiv:2011.07449)"
OPTIONS: dict[str, object] = {"temperature": 3.0, "ce_weight": 0.7, "feature_weight": 0.15, "kl_weight": 0.15}


def oemc_loss(
    student_logits: Sequence[torch.Tensor],
    adapted: Sequence[torch.Tensor],
    reference_map: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 3.0,
    ce_weight: float = 0.7,
    feature_weight: float = 0.15,
    kl_weight: float = 0.15,
) -> torch.Tensor:
    """OEMC's objective (module docstring): every student's logits ``[B, K]`` (student 0 first),
    the compressed students' adapted maps ``A_j(f_j)`` (j >= 1) and student 0's map ``f_0``."""
    check_temperature(temperature)
    if len(student_logits) < 1 or len(adapted) != len(student_logits) - 1:
        raise ValueError(f"OEMC needs one adapted map per compressed student: {len(student_logits)} students, "
                         f"{len(adapted)} maps")  # fmt: skip
    ensemble = torch.stack(list(student_logits)).mean(0).detach()
    kl = torch.stack([kl_t(z, ensemble, temperature) for z in student_logits]).sum()
    target = reference_map.detach()
    feat = sum((F.mse_loss(a, target) for a in adapted), torch.zeros((), device=target.device, dtype=target.dtype))
    return ce_weight * ce_sum(list(student_logits), labels) + feature_weight * feat + kl_weight * kl


class OEMCNet(nn.Module):
    """A common base (conv -> BN -> ReLU) and ``n`` student branches of decreasing width;
    ``forward`` gives student 0's logits (the uncompressed one)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 8, students: int = 4) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.image_shape = image_shape(self.input_shape)
        self.layer1 = nn.Sequential(nn.Conv2d(self.image_shape[0], width, 3, padding=1), nn.BatchNorm2d(width),
                                    nn.ReLU(inplace=True))  # fmt: skip
        self.widths = [max(1, int(2 * width * (students - j) / students)) for j in range(students)]
        self.students = nn.ModuleList(CNNBranch(width, w, num_classes) for w in self.widths)

    def forward_all(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(each student's logits, each student's feature map before pooling)."""
        low = self.layer1(x.reshape(x.shape[0], *self.image_shape))
        maps = [s.layer2(low) for s in self.students]
        return [s.head(F.adaptive_avg_pool2d(m, 1).flatten(1)) for s, m in zip(self.students, maps)], maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.students[0](self.layer1(x.reshape(x.shape[0], *self.image_shape)))[0]


def setup(input_shape: tuple[int, ...], num_classes: int, *, width: int, branches: int,
          options: dict[str, object], config: TrainConfig) -> Setup:  # fmt: skip
    """``branches``: the number of students (the official uses 4)."""
    if branches < 2:
        raise ValueError(f"OEMC needs >= 2 students, got {branches}")
    model = OEMCNet(input_shape, num_classes, width, branches)
    adapters = nn.ModuleList(nn.Conv2d(w, model.widths[0], 1) for w in model.widths[1:])
    recipe = optim.recipe_of(config)
    opt = optim.make_optimizer(adapters.parameters(), recipe)
    for group in opt.param_groups:  # the official: half the learning rate
        group["lr"] = 0.5 * config.lr
    weights = {k: float(options[k]) for k in ("temperature", "ce_weight", "feature_weight", "kl_weight")}

    def loss(ctx: StepContext) -> torch.Tensor:
        logits, maps = model.forward_all(ctx.inputs)
        adapted = [a(m) for a, m in zip(adapters, maps[1:])]
        return oemc_loss(logits, adapted, maps[0], ctx.labels, **weights)

    def student(j: int):
        return lambda m, x: m.forward_all(x)[0][j]

    outputs: dict[str, nn.Module] = {f"student{j}": Pick(model, student(j)) for j in range(branches)}
    outputs["ensemble"] = Pick(model, lambda m, x: torch.stack(m.forward_all(x)[0]).mean(0))
    return Setup(student=model, loss=loss, outputs=outputs, extra=[(adapters, opt)], others={"adapters": adapters})
