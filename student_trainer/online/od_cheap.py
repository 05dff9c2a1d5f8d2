"""Online distillation with cheap convolutions: Xu Xie, Yuan Zhou (Chang), et al. 2019,
"Training convolutional neural networks with cheap convolutions and online distillation",
arXiv:1909.13063 (code: EthanZhangYC/OD-cheap-convolution).

``n`` student networks built with cheap convolutions (grouped, depthwise, bottleneck: the
zoo's ``cheap_conv``, Moonshine's substitutes) train side by side; the teacher is built
online from them, without pre-training: their last feature maps are concatenated and go
through BN -> ReLU -> global average pooling -> a linear classifier. Every student learns
from the labels and from the teacher; the teacher from the labels (and from the students,
through the KL terms, since its output is not detached in the official code)::

    L = CE(z_t, y) + sum_j [ CE(z_j, y) + T^2 KL(softmax(z_t/T) || softmax(z_j/T)) ]

Deployed: one student (the smallest model); ``kd online od-cheap`` reports every student and
the teacher. Defaults (the official ``utils/options.py`` and ``main_teacher.py``): T = 4, four
students, teacher output not detached, ``reduction="mean"``. Checked against the official
``main_teacher.py``, ``utils/common.py`` (``KL``) and ``model/cifar10/shiftresnet.py``
(``ResNetEnsemble_concat_4``):

* same: the teacher head (concatenated last maps -> BatchNorm2d -> ReLU -> pool -> Linear),
  independent students (no shared layers), CE on the teacher and every student with unit
  weights, T^2 on each KL term, the teacher's logits not detached.
* the official KL is ``F.kl_div(log_softmax(z_j/T), softmax(z_t/T))`` with PyTorch's default
  reduction ``"mean"``: the sum over classes *and* samples divided by B * K, i.e. the batch-mean
  KL divided by the number of classes. That is the default here (``reduction="mean"``);
  ``reduction="batchmean"`` gives the true KL (K times larger).
* students: the zoo's ``CheapCNN`` (a standard conv stage, then a ``cheap_conv`` stage,
  ``conv="G4"``: grouped 3x3 with 4 groups + pointwise) instead of ResNet-56 with shift,
  depthwise or grouped blocks (the official default, the shift kernel, is CUDA-only code).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kd.student_trainer.online.common import Pick, Setup, ce_sum, check_temperature, kl_t
from kd.student_trainer.train import StepContext, TrainConfig
from kd.student_trainer.zoo import CheapCNN

PAPER = "Xie et al. 2019, Training CNNs with cheap convolutions and online distillation (arXiv:1909.13063)"
OPTIONS: dict[str, object] = {"temperature": 4.0, "reduction": "mean", "detach_teacher": False, "conv": "G4"}


def od_cheap_loss(
    student_logits: Sequence[torch.Tensor],
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 4.0,
    reduction: str = "mean",
    detach_teacher: bool = False,
) -> torch.Tensor:
    """The objective above: the students' logits ``[B, K]`` each and the online teacher's.
    ``reduction``: ``"mean"`` (the official: over samples and classes) or ``"batchmean"``."""
    check_temperature(temperature)
    if reduction not in ("mean", "batchmean"):
        raise ValueError(f"reduction must be 'mean' (the official code's) or 'batchmean', got {reduction!r}")
    if len(student_logits) < 1:
        raise ValueError("online distillation with cheap convolutions needs at least one student")
    target = teacher_logits.detach() if detach_teacher else teacher_logits
    # batch-mean KL (times T^2); "mean" also divides by the classes, as F.kl_div's "mean" does
    scale = 1.0 / target.shape[1] if reduction == "mean" else 1.0
    kl = torch.stack([kl_t(z, target, temperature) for z in student_logits]).sum() * scale
    return ce_sum([teacher_logits, *student_logits], labels) + kl


class ODCheapNet(nn.Module):
    """``n`` cheap-convolution students and the online teacher head; ``forward`` gives the
    first student's logits (a deployed student)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 8, students: int = 4,
                 conv: str = "G4") -> None:  # fmt: skip
        super().__init__()
        self.students = nn.ModuleList(CheapCNN(input_shape, num_classes, width, conv) for _ in range(students))
        self.input_shape = self.students[0].input_shape
        channels = 2 * width * students
        self.teacher = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                     nn.Linear(channels, num_classes))  # fmt: skip

    def forward_all(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        outs = [s.forward_all(x) for s in self.students]
        return [o[0] for o in outs], self.teacher(torch.cat([o[1] for o in outs], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.students[0](x)


def setup(input_shape: tuple[int, ...], num_classes: int, *, width: int, branches: int,
          options: dict[str, object], config: TrainConfig) -> Setup:  # fmt: skip
    """``branches``: the number of students (the official uses 4)."""
    if branches < 1:
        raise ValueError(f"od-cheap needs >= 1 student, got {branches}")
    model = ODCheapNet(input_shape, num_classes, width, branches, str(options["conv"]))
    temperature, reduction = float(options["temperature"]), str(options["reduction"])
    detach = bool(options["detach_teacher"])
    if reduction not in ("mean", "batchmean"):
        raise ValueError(f"od-cheap option reduction must be 'mean' or 'batchmean', got {reduction!r}")

    def loss(ctx: StepContext) -> torch.Tensor:
        students, teacher = model.forward_all(ctx.inputs)
        return od_cheap_loss(students, teacher, ctx.labels, temperature=temperature, reduction=reduction,
                             detach_teacher=detach)  # fmt: skip

    outputs: dict[str, nn.Module] = {f"student{i}": model.students[i] for i in range(branches)}
    outputs["teacher_ensemble"] = Pick(model, lambda m, x: m.forward_all(x)[1])
    return Setup(student=model, loss=loss, outputs=outputs, ensemble="teacher_ensemble")
