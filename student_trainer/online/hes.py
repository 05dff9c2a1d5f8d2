"""Highlight Every Step (CTKD, collaborative teaching): Haoran Zhao, Xin Sun, Junyu Dong, Changrui
Chen, Zihe Dong 2019, "Highlight Every Step: Knowledge Distillation via Collaborative Teaching",
arXiv:1907.09643 (IEEE Trans. Cybernetics 2020).

Two teachers. A **scratch teacher**, a larger network trained from scratch together with the
student, shows the student its current logits at every step (the student follows the teacher's
path, not only its end point, as in Rocket Launching, arXiv:1708.04106, on which the authors'
code is built). An **expert teacher**, pretrained and fixed, shows the student where to look:
attention transfer (Zagoruyko & Komodakis 2017) from the expert's intermediate maps::

    L = CE(z_s, y) + CE(z_t, y)
        + lam  * 1/B sum_b ||sg(z_t) - z_s||^2                       (scratch teacher -> student)
        + beta * sum_j mean_{b,p} (a(F_s^j) - a(F_e^j))^2             (expert -> student)
    a(F) = normalize_L2( mean_c F_c^2 )   flattened over positions, per sample

``z_s``, ``z_t``: the student's and the scratch teacher's logits; ``sg``: no gradient (the
"gradient block": the logit term trains the student only, the scratch teacher learns from the
labels alone); ``F_s^j``, ``F_e^j``: the student's and the expert's maps after stage ``j`` (the
expert is frozen, in eval mode). One backward of L trains the student (its optimiser) and the
scratch teacher (an extra module with its own optimiser, same recipe). Deployed: the student;
``kd online hes`` also reports the scratch teacher.

The paper's text was not available here; what was checked is the first author's released code
(HaoranZhao1988/CTKD, ``train.py`` with ``--teacher_id`` and ``--gamma``, ``utils.py``), which
names the paper:

* same: CE on the student and on the scratch teacher with unit weights; the logit term as the
  squared difference summed over classes and averaged over the batch, the scratch teacher's
  logits detached; the attention map ``normalize(mean_c F^2)`` and the per-pair ``mean`` of the
  squared difference summed over the stages, with weight ``beta``; no KD term from the expert's
  logits (the script computes one but only logs it).
* which network the expert teaches: the released script pairs the expert's three groups with
  the *first* three maps its two-network model returns, which are the scratch teacher's (the
  student's come after and are dropped by ``zip``): the expert's attention reaches the student
  only through the one convolution the two share. The paper (and its abstract) has the expert
  guide the student; that is the default here (``attention_on="student"``), and
  ``attention_on="scratch"`` is the released script's pairing.
* sharing: the script's two networks share their first convolution (``conv0``, as Rocket
  Launching shares low layers); here they share nothing, so the deployed student is exactly
  ``kd.models.digits_cnn_student`` at width 8 (``StageCNN``) and the scratch teacher the same
  design at ``teacher_width`` (32: ``digits_cnn``'s architecture).
* weights: the script's command-line defaults are 0 for both (they must be given) and the paper's
  values could not be read; defaults here: ``beta = 1000`` (attention transfer's, with the same
  per-element mean) and ``lam = 1`` (unit weight, as the two CE terms). Both are options
  (``logit_weight``, ``at_weight``); on digits neither term lifts the student above CE (README).
  The expert's maps are taken from its modules named in ``expert_layers`` (digits_cnn:
  ``layer1,layer2``), matched in order to the attention network's stages; their spatial sizes
  must agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kd.core.reductions import attention
from kd.student_trainer import optim
from kd.student_trainer.features import Taps
from kd.student_trainer.online.common import Setup
from kd.student_trainer.train import StepContext, TrainConfig
from kd.student_trainer.zoo import image_shape

PAPER = "Zhao, Sun, Dong, Chen, Dong 2019, Highlight Every Step: KD via Collaborative Teaching (arXiv:1907.09643)"
OPTIONS: dict[str, object] = {
    "logit_weight": 1.0, "at_weight": 1000.0, "teacher_width": 32, "attention_on": "student",
    "expert_layers": "layer1,layer2",
}  # fmt: skip
NEEDS_TEACHER = True  # the expert: ``train_online(..., teacher=model)``, ``kd online hes --teacher SPEC``


def attention_distance(maps: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_j mean_{b,p} (a(F^j) - a(G^j))^2`` with ``a(F) = normalize(mean_c F^2)``; the targets
    ``G^j`` are constants (detached). Spatial sizes must agree pair by pair."""
    if len(maps) != len(targets) or not maps:
        raise ValueError(f"attention transfer needs one target map per map: {len(maps)} maps, {len(targets)} targets")
    total = []
    for j, (f, g) in enumerate(zip(maps, targets)):
        if f.dim() != 4 or g.dim() != 4 or f.shape[0] != g.shape[0] or f.shape[2:] != g.shape[2:]:
            raise ValueError(f"attention pair {j}: maps {tuple(f.shape)} and {tuple(g.shape)} need the same batch "
                             "and spatial size (N x C x H x W)")  # fmt: skip
        dt = torch.promote_types(f.dtype, torch.float32)
        total.append((attention(f.to(dt)) - attention(g.detach().to(dt))).pow(2).mean())
    return torch.stack(total).sum()


def hes_loss(
    student_logits: torch.Tensor,
    scratch_logits: torch.Tensor,
    attention_maps: Sequence[torch.Tensor],
    expert_maps: Sequence[torch.Tensor],
    labels: torch.Tensor,
    *,
    logit_weight: float = 1.0,
    at_weight: float = 1000.0,
) -> torch.Tensor:
    """The collaborative-teaching objective (module docstring). ``attention_maps``: the maps of
    the network the expert teaches (the student's by default), one per expert map."""
    if logit_weight < 0 or at_weight < 0:
        raise ValueError(f"weights must be >= 0, got logit_weight={logit_weight}, at_weight={at_weight}")
    dt = torch.promote_types(student_logits.dtype, torch.float32)
    z_s, z_t = student_logits.to(dt), scratch_logits.to(dt)
    if z_s.shape != z_t.shape:
        raise ValueError(f"student logits {tuple(z_s.shape)} and scratch teacher logits {tuple(z_t.shape)} differ")
    course = (z_t.detach() - z_s).pow(2).sum(1).mean()
    ce = F.cross_entropy(z_s, labels) + F.cross_entropy(z_t, labels)
    return ce + logit_weight * course + at_weight * attention_distance(attention_maps, expert_maps)


class StageCNN(nn.Module):
    """``depth`` conv -> BN -> ReLU stages (width, then 2 x width) and a linear classifier on the
    pooled last map: at ``depth=2`` layer for layer ``kd.models.DigitsCNN(width)`` (width 8:
    ``digits_cnn_student``; 32: ``digits_cnn``). ``forward_all`` gives (every stage's map, logits)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 8, depth: int = 2) -> None:
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"StageCNN needs depth >= 1 and width >= 1, got depth={depth}, width={width}")
        self.input_shape = tuple(input_shape)
        self.image_shape = image_shape(self.input_shape)
        widths = [width] + [2 * width] * (depth - 1)
        ins = [self.image_shape[0], *widths[:-1]]
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()) for i, o in zip(ins, widths)
        )
        self.channels = widths
        self.head = nn.Linear(widths[-1], num_classes)

    def forward_all(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        x = x.reshape(x.shape[0], *self.image_shape)
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps, self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x)[1]


def setup(input_shape: tuple[int, ...], num_classes: int, *, width: int, branches: int,
          options: dict[str, object], config: TrainConfig, teacher: nn.Module) -> Setup:  # fmt: skip
    """``branches`` is not used (one student, one scratch teacher); ``teacher``: the expert, frozen in
    place (eval mode, ``requires_grad`` off) with forward hooks on its ``expert_layers`` (pass a
    copy to keep the original untouched)."""
    where = str(options["attention_on"])
    if where not in ("student", "scratch"):
        raise ValueError(f"hes option attention_on must be 'student' or 'scratch', got {where!r}")
    layers = [s.strip() for s in str(options["expert_layers"]).split(",") if s.strip()]
    t_width = int(options["teacher_width"])
    if t_width < 1:
        raise ValueError(f"hes option teacher_width must be >= 1, got {t_width}")
    student = StageCNN(input_shape, num_classes, width, depth=max(2, len(layers)))
    scratch = StageCNN(input_shape, num_classes, t_width, depth=max(2, len(layers)))
    if len(layers) != len(student.stages):
        raise ValueError(f"hes option expert_layers names {len(layers)} layer(s); give one per stage (2 or more)")
    expert = teacher.to(config.device).eval()
    for p in expert.parameters():
        p.requires_grad_(False)
    taps = Taps(expert, layers)  # raises on a layer the expert does not have
    opt_t = optim.make_optimizer(scratch.parameters(), optim.recipe_of(config))
    weights = {"logit_weight": float(options["logit_weight"]), "at_weight": float(options["at_weight"])}

    def loss(ctx: StepContext) -> torch.Tensor:
        maps_s, z_s = student.forward_all(ctx.inputs)
        maps_t, z_t = scratch.forward_all(ctx.inputs)
        expert.eval()
        with torch.no_grad():
            expert(ctx.inputs)
        expert_maps = [taps.maps[name] for name in layers]
        return hes_loss(z_s, z_t, maps_s if where == "student" else maps_t, expert_maps, ctx.labels, **weights)

    return Setup(student=student, loss=loss, outputs={"student": student, "scratch_teacher": scratch}, ensemble=None,
                 extra=[(scratch, opt_t)], others={"scratch_teacher": scratch})  # fmt: skip
