"""``dist-plus``: DIST with teacher acclimation, after Huang, You, Wang, Qian, Xu 2025, "DIST+:
Knowledge Distillation From a Stronger Adaptive Teacher" (IEEE TPAMI 47(7), 5571-5585,
doi:10.1109/TPAMI.2025.3554235), the journal extension of DIST (NeurIPS 2022, arXiv 2205.10536).

DIST+ keeps DIST's relation loss for the student and adds *teacher acclimation*: the teacher is
no longer fixed but is adapted during distillation "to reduce the discrepancy between teacher
and student", while it keeps learning the task so it stays accurate. With Y = softmax(z / tau),
``inter``/``intra`` DIST's Pearson relation distances (``kd.student_trainer.losses.dist``) and
``sg`` no gradient, one step minimises, over the student's and the teacher's weights together::

    L_student = ce_weight * CE(z_s, y) + tau^2 * (beta * inter(Y_s, sg Y_t) + gamma * intra(Y_s, sg Y_t))
    L_teacher = teacher_ce_weight * CE(z_t, y)
                + acclimation_weight * tau^2 * (beta * inter(Y_t, sg Y_s) + gamma * intra(Y_t, sg Y_s))

Each model therefore moves only through its own terms: the student through DIST (the
teacher's predictions are constants), the teacher through the acclimation terms (the student's
predictions are constants: the teacher comes towards the student, not the other way round) and
its own cross-entropy (which keeps it accurate). Pearson correlation is symmetric, so the
acclimation distance is the same number as the student's DIST term; only the gradient's
destination differs. The teacher has its own optimiser (the run's recipe, at
``teacher_lr_scale`` times the student's rate: a pretrained model is fine-tuned gently), runs
in train mode (its BatchNorm statistics follow the batches it now trains on), and is updated
in the same step as the student (one backward over both objectives).

What could and could not be checked: the paper's abstract states the strategy (a teacher
adapted to reduce its discrepancy with the student, the feature-level extension being kd's
``dist-feat``), but neither the paper's body nor code for the acclimation is public in a form
that could be read here (the authors' repository, hunto/DIST_KD, holds DIST only). So the
objective above is kd's reading of that statement with DIST's own distance, not a transcription
of the paper's equations, and the defaults are kd's: ``beta = gamma = tau = 1`` and CE weight 1
(DIST's ImageNet setting), ``acclimation_weight = 1``, ``teacher_ce_weight = 1``,
``teacher_lr_scale = 0.1``. Set ``acclimation_weight=0, teacher_ce_weight=0`` for plain DIST
with a frozen teacher.

The teacher must be a model in this process that the run may update (``kd online dist-plus
--teacher module:factory@WEIGHTS`` or ``local:SPEC``): a cache holds fixed outputs and a
server's weights cannot be trained from here, so those are refused. ``train_online`` trains the
module it is given in place (every parameter, made trainable); pass a copy to keep the original. The student is
``StageCNN(width)`` (width 8: ``kd.models.digits_cnn_student``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.core.factory import logits_of
from kd.student_trainer import optim
from kd.student_trainer.losses.dist import inter_class_relation, intra_class_relation
from kd.student_trainer.online.common import Setup
from kd.student_trainer.online.hes import StageCNN
from kd.student_trainer.train import StepContext, TrainConfig

PAPER = "Huang, You, Wang, Qian, Xu 2025, DIST+: Knowledge Distillation From a Stronger Adaptive Teacher (TPAMI)"
OPTIONS: dict[str, object] = {
    "beta": 1.0, "gamma": 1.0, "temperature": 1.0, "ce_weight": 1.0, "acclimation_weight": 1.0,
    "teacher_ce_weight": 1.0, "teacher_lr_scale": 0.1,
}  # fmt: skip
NEEDS_TEACHER = True  # the teacher it acclimates: ``train_online(..., teacher=model)``


def _relation(y_a: torch.Tensor, y_b: torch.Tensor, beta: float, gamma: float, tau: float) -> torch.Tensor:
    return tau**2 * (beta * inter_class_relation(y_a, y_b) + gamma * intra_class_relation(y_a, y_b))


def dist_plus_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    ce_weight: float = 1.0,
    acclimation_weight: float = 1.0,
    teacher_ce_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """``{"loss": L_student, "acclimation": L_teacher}`` (module docstring), each with the other
    model's predictions detached, so one backward of their sum trains each model on its own
    objective only. Computed in float32 or wider."""
    tau = float(temperature)
    if not tau > 0:
        raise ValueError(f"dist-plus: temperature must be > 0, got {temperature!r}")
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise ValueError(f"dist-plus: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must both be [B, C]")  # fmt: skip
    dt = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    z_s, z_t = student_logits.to(dt), teacher_logits.to(dt)
    y_s, y_t = F.softmax(z_s / tau, dim=1), F.softmax(z_t / tau, dim=1)
    student = ce_weight * F.cross_entropy(z_s, labels) + _relation(y_s, y_t.detach(), beta, gamma, tau)
    teacher = teacher_ce_weight * F.cross_entropy(z_t, labels) + acclimation_weight * _relation(
        y_t, y_s.detach(), beta, gamma, tau
    )
    return {"loss": student, "acclimation": teacher}


def check_teacher(teacher: object) -> nn.Module:
    """The teacher as a trainable module; anything else (a cache, a server, a target source) is
    refused with the reason."""
    if isinstance(teacher, nn.Module):
        if not any(True for _ in teacher.parameters()):
            raise ValueError("dist-plus adapts the teacher's weights, but the teacher module has no parameters")
        return teacher
    kind = getattr(teacher, "name", type(teacher).__name__)
    raise ValueError(
        f"dist-plus adapts the teacher's weights during distillation (teacher acclimation), so it needs the "
        f"teacher model in this process (--teacher module:factory@WEIGHTS or local:SPEC); got {kind!r}: a cache "
        "holds fixed outputs and a server's weights cannot be trained from here"
    )


def setup(input_shape: tuple[int, ...], num_classes: int, *, width: int, branches: int,
          options: dict[str, object], config: TrainConfig, teacher: nn.Module) -> Setup:  # fmt: skip
    """``branches`` is not used (one student, one teacher); ``teacher`` is trained in place."""
    teacher = check_teacher(teacher)
    scale = float(options["teacher_lr_scale"])
    if not scale >= 0:
        raise ValueError(f"dist-plus option teacher_lr_scale must be >= 0, got {options['teacher_lr_scale']!r}")
    weights = {k: float(options[k]) for k in OPTIONS if k != "teacher_lr_scale"}  # type: ignore[arg-type]
    student = StageCNN(input_shape, num_classes, width)
    teacher.to(config.device).requires_grad_(True)  # a loaded (served) teacher comes frozen: here it trains
    opt = optim.make_optimizer(teacher.parameters(), optim.recipe_of(config))
    for group in opt.param_groups:
        group["lr"] = scale * config.lr

    def loss(ctx: StepContext) -> dict[str, torch.Tensor]:
        z_t = logits_of(teacher(ctx.inputs))
        if z_t.shape != (len(ctx.inputs), num_classes):
            raise ValueError(f"dist-plus: the teacher gives logits {tuple(z_t.shape)}, expected "
                             f"{(len(ctx.inputs), num_classes)}")  # fmt: skip
        return dist_plus_loss(ctx.model(ctx.inputs), z_t, ctx.labels, **weights)

    outputs: dict[str, nn.Module] = {"student": student, "teacher": teacher}
    return Setup(student=student, loss=loss, outputs=outputs, ensemble=None, extra=[(teacher, opt)],
                 others={"teacher": teacher})  # fmt: skip
