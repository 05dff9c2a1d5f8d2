"""FRSKD, Feature Refinement via Self-Knowledge Distillation: Mingi Ji, Seungjae Shin, Seunghyun
Hwang, Gibeom Park, Il-Chul Moon 2021, "Refine Myself by Teaching Myself: Feature Refinement via
Self-Knowledge Distillation", CVPR 2021, arXiv:2103.08273 (code: MingiJi/FRSKD).

No pretrained teacher: an auxiliary **self-teacher** network reads the classifier's own
multi-stage maps ``F_1 .. F_n`` and aggregates them top-down and bottom-up (a BiFPN, Tan et al.
2020) into refined maps ``T_1 .. T_n`` and its own logits ``z_t`` (a linear layer on the pooled
last refined map). The classifier learns from both; the self-teacher from the labels::

    L = CE(z_s, y) + CE(z_t, y)
        + alpha * T^2 * KL(softmax(sg(z_t)/T) || softmax(z_s/T))          (soft labels)
        + beta  * sum_i mean_{b,p} (a(F_i) - a(sg(T_i)))^2                 (refined features)
    a(F) = normalize_L2( mean_c F_c^2 )   flattened over positions, per sample

``sg``: no gradient (the self-teacher's logits and maps are targets). The self-teacher reads the
classifier's maps *with* their graph, so its CE also trains the classifier's stages (not its
head). Deployed: the classifier alone; ``kd online frskd`` also reports the self-teacher.

The self-teacher (``SelfTeacher``), for stage channels ``c_i`` and a width factor ``m``:
lateral 1x1 blocks ``L_i`` (c_i -> m c_i; conv, BN, ReLU) and ``L'_i`` for the bottom-up path;
top-down ``P_n = L_n(F_n)``, ``P_i = conv_i(w_1 relu(L_i(F_i)) + w_2 up_i(relu(P_{i+1})))``;
bottom-up ``T_1 = P_1``, ``T_i = conv'_i(w_1 relu(L'_i(F_i)) + w_2 relu(P_i) + w_3
down_i(relu(T_{i-1})))`` (the last level without the ``P`` input); fusion weights
``relu(w) / (sum relu(w) + 1e-6)``, learnt, starting at 1; ``conv``: ``depth`` depthwise 3x3 +
pointwise 1x1 + BN units with a ReLU between; ``up``: nearest resize, then a 1x1 block;
``down``: 3x3 max pool ("same" padding), then a 1x1 block. Outputs ``relu(T_i)``.

Defaults: ``alpha = 2``, ``beta = 100`` (the official README's CIFAR-100 command), ``T = 4`` (the
official default), width factor 2 and block depth 2 (the official defaults). Checked against the
official ``main.py``, ``classification/utils.py`` (``train``), ``distill_loss/KD.py``,
``classification/distill_loss/AT.py`` and ``models/bifpnc.py``, ``models/utils.py``:

* same: the four terms with unit CE weights; the KL summed over classes and divided by the
  batch, times T^2, its target detached; the attention map ``normalize(mean_c F^2)`` and the
  per-map ``mean`` of the squared difference, summed over stages, the refined maps detached;
  the self-teacher fed the classifier's maps undetached; the BiFPN wiring, fusion weights,
  blocks and ``relu`` placements above; one repeat of the BiFPN layer (the default).
* the official down-sampling pools with stride 2 and up-sampling doubles the size (CIFAR ResNet
  stages halve); here the stride is the ratio of the two levels' sizes and the up-sampling
  resizes to the finer level, so stages of equal size (the digits CNN's) work too.
* the official trains everything with one SGD optimiser; here the self-teacher has its own
  (same recipe): the same update for SGD and Adam (per-parameter state).
* architecture: the classifier is ``StageCNN`` (at depth 2, width 8 exactly
  ``kd.models.digits_cnn_student``) instead of a CIFAR ResNet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kd.student_trainer import optim
from kd.student_trainer.online.common import Setup, check_temperature, kl_t
from kd.student_trainer.online.hes import StageCNN, attention_distance
from kd.student_trainer.train import StepContext, TrainConfig

PAPER = "Ji, Shin, Hwang, Park, Moon 2021, Refine Myself by Teaching Myself: FRSKD (arXiv:2103.08273)"
OPTIONS: dict[str, object] = {"alpha": 2.0, "beta": 100.0, "temperature": 4.0, "depth": 2, "teacher_width": 2,
                              "block_depth": 2}  # fmt: skip


def frskd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_maps: Sequence[torch.Tensor],
    refined_maps: Sequence[torch.Tensor],
    labels: torch.Tensor,
    *,
    alpha: float = 2.0,
    beta: float = 100.0,
    temperature: float = 4.0,
) -> torch.Tensor:
    """FRSKD's objective (module docstring): the classifier's and the self-teacher's logits, the
    classifier's stage maps and the self-teacher's refined maps (one per stage)."""
    check_temperature(temperature)
    if alpha < 0 or beta < 0:
        raise ValueError(f"FRSKD weights must be >= 0, got alpha={alpha}, beta={beta}")
    dt = torch.promote_types(student_logits.dtype, torch.float32)
    z_s, z_t = student_logits.to(dt), teacher_logits.to(dt)
    ce = F.cross_entropy(z_s, labels) + F.cross_entropy(z_t, labels)
    return ce + alpha * kl_t(z_s, z_t.detach(), temperature) + beta * attention_distance(student_maps, refined_maps)


def _block1x1(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def _separable(cin: int, cout: int, depth: int) -> nn.Sequential:
    """``depth`` units of depthwise 3x3 + pointwise 1x1 + BN, a ReLU before every unit but the first."""
    units: list[nn.Module] = []
    for k in range(depth):
        c = cin if k == 0 else cout
        units += [nn.ReLU()] if k else []
        units += [nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.Conv2d(c, cout, 1, bias=False),
                  nn.BatchNorm2d(cout)]  # fmt: skip
    return nn.Sequential(*units)


def _fuse(w: torch.Tensor, inputs: list[torch.Tensor]) -> torch.Tensor:
    w = F.relu(w)
    w = w / (w.sum() + 1e-6)
    return sum((w[k] * x for k, x in enumerate(inputs)), torch.zeros_like(inputs[0]))


def _pool_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """3x3 max pool with "same" padding and the stride that maps ``x``'s size onto ``size``."""
    h, w = x.shape[2:]
    sh, sw = math.ceil(h / size[0]), math.ceil(w / size[1])
    if (math.ceil(h / sh), math.ceil(w / sw)) != tuple(size):
        raise ValueError(f"cannot pool a {h}x{w} map to {size[0]}x{size[1]} with an integer stride")
    ph = max((size[0] - 1) * sh + 3 - h, 0)
    pw = max((size[1] - 1) * sw + 3 - w, 0)
    x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
    return F.max_pool2d(x, 3, stride=(sh, sw))


class SelfTeacher(nn.Module):
    """The BiFPN self-teacher (module docstring) over stage maps with channels ``channels``
    (finest first); ``forward(maps) -> (refined maps, logits)``."""

    def __init__(self, channels: Sequence[int], num_classes: int, width: int = 2, depth: int = 2) -> None:
        super().__init__()
        n = len(channels)
        if n < 2 or width < 1 or depth < 1:
            raise ValueError(f"the self-teacher needs >= 2 stages, width >= 1, depth >= 1; got {n}, {width}, {depth}")
        c = [width * ch for ch in channels]
        self.lat = nn.ModuleList(_block1x1(ci, co) for ci, co in zip(channels, c))
        self.lat2 = nn.ModuleList(_block1x1(channels[i], c[i]) for i in range(1, n))
        self.up = nn.ModuleList(_block1x1(c[i + 1], c[i]) for i in range(n - 1))
        self.up_conv = nn.ModuleList(_separable(c[i], c[i], depth) for i in range(n - 1))
        self.up_w = nn.ParameterList(nn.Parameter(torch.ones(2)) for _ in range(n - 1))
        self.down = nn.ModuleList(_block1x1(c[i - 1], c[i]) for i in range(1, n))
        self.down_conv = nn.ModuleList(_separable(c[i], c[i], depth) for i in range(1, n))
        self.down_w = nn.ParameterList(nn.Parameter(torch.ones(3 if i < n - 1 else 2)) for i in range(1, n))
        self.fc = nn.Linear(c[-1], num_classes)

    def forward(self, maps: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        n = len(self.lat)
        if len(maps) != n:
            raise ValueError(f"the self-teacher takes {n} stage maps, got {len(maps)}")
        lat = [m(F.relu(f)) for m, f in zip(self.lat, maps)]
        lat2 = [m(F.relu(f)) for m, f in zip(self.lat2, maps[1:])]
        top = [lat[-1]]  # top-down, coarsest first while building
        for i in range(n - 2, -1, -1):
            size = lat[i].shape[2:]
            up = self.up[i](F.interpolate(F.relu(top[0]), size=size, mode="nearest"))
            top.insert(0, self.up_conv[i](_fuse(self.up_w[i], [F.relu(lat[i]), up])))
        out = [top[0]]
        for i in range(1, n):
            size = lat[i].shape[2:]
            down = self.down[i - 1](_pool_to(F.relu(out[-1]), (int(size[0]), int(size[1]))))
            parts = [F.relu(lat2[i - 1])] + ([F.relu(top[i])] if i < n - 1 else []) + [down]
            out.append(self.down_conv[i - 1](_fuse(self.down_w[i - 1], parts)))
        refined = [F.relu(t) for t in out]
        return refined, self.fc(F.adaptive_avg_pool2d(refined[-1], 1).flatten(1))


class _TeacherHead(nn.Module):
    """The self-teacher's logits on the classifier's maps, as a model (for evaluation)."""

    def __init__(self, student: StageCNN, teacher: SelfTeacher) -> None:
        super().__init__()
        self.student, self.teacher = student, teacher
        self.input_shape = student.input_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(self.student.forward_all(x)[0])[1]


def setup(input_shape: tuple[int, ...], num_classes: int, *, width: int, branches: int,
          options: dict[str, object], config: TrainConfig) -> Setup:  # fmt: skip
    """``branches`` is not used; options ``depth``: the classifier's stages, ``teacher_width``:
    the self-teacher's channel factor, ``block_depth``: its separable units per fusion."""
    depth, t_width, b_depth = int(options["depth"]), int(options["teacher_width"]), int(options["block_depth"])
    if depth < 2:
        raise ValueError(f"FRSKD needs a classifier of >= 2 stages (option depth), got {depth}")
    student = StageCNN(input_shape, num_classes, width, depth)
    teacher = SelfTeacher(student.channels, num_classes, t_width, b_depth)
    opt_t = optim.make_optimizer(teacher.parameters(), optim.recipe_of(config))
    weights = {k: float(options[k]) for k in ("alpha", "beta", "temperature")}

    def loss(ctx: StepContext) -> torch.Tensor:
        maps, z_s = student.forward_all(ctx.inputs)
        refined, z_t = teacher(maps)
        return frskd_loss(z_s, z_t, maps, refined, ctx.labels, **weights)

    outputs: dict[str, nn.Module] = {"student": student, "self_teacher": _TeacherHead(student, teacher)}
    return Setup(student=student, loss=loss, outputs=outputs, ensemble=None, extra=[(teacher, opt_t)],
                 others={"self_teacher": teacher})  # fmt: skip
