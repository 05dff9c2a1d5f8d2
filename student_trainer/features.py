"""Feature distillation plumbing: which student layers meet which teacher layers.

A *match* pairs student module paths with teacher module paths
(``"layer2=layer2"``; methods that relate two layers per side, like FSP, take
``"layer1,layer2=layer1,layer2"``). The trainer captures the student's maps
with forward hooks (``Taps``), passes each through the method's *connector*
(a trainable module: a 1x1 conv + BN, a linear map, or the method's own, built
from the shapes of both sides, trained with the student and saved with it),
and reduces it with the method's statistic (``kd.core.reductions``). The teacher's
side is asked from the source under the reduced name (``layer2@at``), so the
server computes the statistic and only it travels; ``teacher_reduce="trainer"``
asks for the full map and reduces it here (a test checks the two agree).

The layer name ``logits`` stands for the model's output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kd.core import reductions

LOGITS = "logits"
ConnectorFactory = Callable[[tuple[int, ...], tuple[int, ...]], nn.Module]


@dataclass(frozen=True)
class Match:
    student: tuple[str, ...]
    teacher: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Match:
        s, sep, t = text.partition("=")
        sl = tuple(x.strip() for x in s.split(",") if x.strip())
        tl = tuple(x.strip() for x in t.split(",") if x.strip())
        if not sep or not sl or not tl:
            raise ValueError(f"match {text!r}: expected STUDENT_LAYER=TEACHER_LAYER (comma lists for several layers)")
        if len(sl) != len(tl):
            raise ValueError(f"match {text!r}: {len(sl)} student layer(s) but {len(tl)} teacher layer(s)")
        return cls(sl, tl)

    @property
    def text(self) -> str:
        return f"{','.join(self.student)}={','.join(self.teacher)}"


def feature_name(layers: Sequence[str], reduce: str | None, options: dict | None = None) -> str:
    """The feature name for a match side: ``layer``, or ``layer@REDUCE`` with ``{1}``... the
    side's other layers and ``{name}`` the method's options (e.g. ``cc:{gamma}:{order}``)."""
    if reduce is None:
        return layers[0]
    return f"{layers[0]}{reductions.SEP}{reduce.format(*layers, **(options or {}))}"


class Taps:
    """Forward hooks that keep the outputs of named modules of ``model`` during a forward."""

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        modules = dict(model.named_modules())
        unknown = [name for name in layers if name != LOGITS and name not in modules]
        if unknown:
            shown = [n for n in modules if n][:40]
            raise ValueError(f"student has no module(s) {unknown}; its modules: {shown}")
        self.maps: dict[str, torch.Tensor] = {}
        self._handles = [
            modules[name].register_forward_hook(self._hook(name)) for name in dict.fromkeys(layers) if name != LOGITS
        ]

    def _hook(self, name: str):
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            # A clone: a later in-place op (ReLU(inplace=True)) must not change what we keep.
            self.maps[name] = out.clone()

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class ConvBN(nn.Module):
    """1x1 conv (no bias) + BN, kd's default regressor; a student map of another spatial size is
    resized to the teacher's first (average pooling down, bilinear up). Not quite CRD's and
    mdistiller's FitNets regressor (``ConvReg``: a conv with bias whose kernel/stride depends on
    the two sizes, + BN + ReLU): that one is the ``convreg`` connector below."""

    def __init__(self, cin: int, cout: int, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = size
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != self.size:
            if x.shape[2] >= self.size[0]:
                x = F.adaptive_avg_pool2d(x, self.size)
            else:
                x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return self.bn(self.conv(x))


def conv1x1bn(s: tuple[int, ...], t: tuple[int, ...]) -> nn.Module:
    if len(s) != 3 or len(t) != 3:
        raise ValueError(f"connector conv1x1bn joins [C, H, W] maps, got student {list(s)} and teacher {list(t)}")
    return ConvBN(s[0], t[0], (t[1], t[2]))


def linear(s: tuple[int, ...], t: tuple[int, ...]) -> nn.Module:
    if len(s) != 1 or len(t) != 1:
        raise ValueError(f"connector linear joins vectors, got student {list(s)} and teacher {list(t)}")
    return nn.Linear(s[0], t[0])


def auto(s: tuple[int, ...], t: tuple[int, ...]) -> nn.Module:
    """Identity where the shapes already agree, else conv1x1bn for maps and linear for vectors."""
    if tuple(s) == tuple(t):
        return nn.Identity()
    return conv1x1bn(s, t) if len(s) == 3 else linear(s, t)


class ConvReg(nn.Module):
    """FitNets regressor as CRD (RepDistiller ``models/util.py``) and mdistiller (``_common.py``)
    build it: a conv with bias -- 3x3 stride 2 when the student map is twice the teacher's size,
    a 4x4 stride-2 transposed conv when it is half, else a (1 + Hs - Ht) x (1 + Ws - Wt) kernel
    (1x1 at equal sizes) -- then BN and ReLU (theirs ``use_relu=True`` by default). The ReLU
    suits teacher hints that are non-negative (post-ReLU maps); a pre-activation hint cannot be
    reached below 0."""

    def __init__(self, s: tuple[int, ...], t: tuple[int, ...]) -> None:
        super().__init__()
        (cs, hs, ws), (ct, ht, wt) = s, t
        if hs == 2 * ht:
            self.conv: nn.Module = nn.Conv2d(cs, ct, kernel_size=3, stride=2, padding=1)
        elif hs * 2 == ht:
            self.conv = nn.ConvTranspose2d(cs, ct, kernel_size=4, stride=2, padding=1)
        elif hs >= ht and ws >= wt:
            self.conv = nn.Conv2d(cs, ct, kernel_size=(1 + hs - ht, 1 + ws - wt))
        else:
            raise ValueError(f"connector convreg: student map {list(s)} is smaller than teacher map {list(t)}")
        self.bn = nn.BatchNorm2d(ct)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def convreg(s: tuple[int, ...], t: tuple[int, ...]) -> nn.Module:
    if len(s) != 3 or len(t) != 3:
        raise ValueError(f"connector convreg joins [C, H, W] maps, got student {list(s)} and teacher {list(t)}")
    return ConvReg(tuple(s), tuple(t))


CONNECTORS: dict[str, ConnectorFactory] = {"conv1x1bn": conv1x1bn, "linear": linear, "auto": auto}
CONNECTORS["convreg"] = convreg


def make_connector(kind: str | ConnectorFactory | None, s: tuple[int, ...], t: tuple[int, ...]) -> nn.Module:
    if kind is None:
        return nn.Identity()
    if isinstance(kind, str):
        try:
            kind = CONNECTORS[kind]
        except KeyError:
            raise ValueError(f"unknown connector {kind!r}; known: {sorted(CONNECTORS)}") from None
    return kind(tuple(s), tuple(t))


class PerLayer(nn.Module):
    """The connectors of a match that names several student layers (FSP): one per layer."""

    def __init__(self, connectors: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(connectors)


class Distilled(nn.Module):
    """The student plus the connectors of a feature method, as one module: ``forward(x)``
    returns the student's logits and its captured maps (after each match's connector;
    a ``PerLayer`` connector maps each of the match's layers, in ``maps``; a connector with
    ``takes_layers = True`` gets the list of all the match's student maps at once).

    One module so that DistributedDataParallel, the optimiser and checkpoints see the
    connectors as part of what is trained.
    """

    def __init__(self, student: nn.Module, matches: Sequence[Match], connectors: Sequence[nn.Module]) -> None:
        super().__init__()
        self.student = student
        self.matches = list(matches)
        self.connectors = nn.ModuleList(connectors)
        self.takes_teacher = [bool(getattr(c, "takes_teacher", False)) for c in connectors]
        self._taps = Taps(student, [layer for m in matches for layer in m.student])

    def forward(
        self, x: torch.Tensor, teacher_maps: Sequence[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[object], dict[str, torch.Tensor]]:
        """(logits, per-match connected student feature, raw student maps by layer)."""
        self._taps.maps = {}
        logits = self.student(x)
        maps = {**self._taps.maps, LOGITS: logits}
        feats: list[object] = []
        for k, (m, conn) in enumerate(zip(self.matches, self.connectors)):
            s = maps[m.student[0]]
            if isinstance(conn, PerLayer):
                for layer, c in zip(m.student, conn.layers):
                    maps[layer] = c(maps[layer])
                feats.append(maps[m.student[0]])
            elif getattr(conn, "takes_layers", False):  # one module over all the match's layers (ReviewKD)
                feats.append(conn([maps[layer] for layer in m.student]))
            elif self.takes_teacher[k]:
                feats.append(conn(s, None if teacher_maps is None else teacher_maps[k]))
            else:
                feats.append(conn(s))
        return logits, feats, maps


def probe_student_shapes(student: nn.Module, x: torch.Tensor, layers: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Per-sample output shapes of the named student modules, from one eval-mode forward."""
    taps = Taps(student, layers)
    was_training = student.training
    try:
        student.eval()
        with torch.no_grad():
            logits = student(x)
    finally:
        taps.remove()
        student.train(was_training)
    maps = {**taps.maps, LOGITS: logits}
    return {name: tuple(maps[name].shape[1:]) for name in layers}
