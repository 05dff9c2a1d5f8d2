"""Small CNNs on 1x8x8 digits: a shared convolutional encoder and one linear head per task.

The encoder's output is a feature map ``[B, C, 8, 8]`` (what the multi-task distillation
aligns, as the official KD-MTL code aligns SegNet's feature maps); each head average-pools it
to 2x2 (a global pool would throw away where the strokes are) and maps it to the task's outputs.
A single-task model is the same network with one head.
"""

from __future__ import annotations

import torch
from torch import nn


class Encoder(nn.Module):
    def __init__(self, width: int = 16, in_channels: int = 1) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.in_channels = in_channels
        self.out_channels = 2 * width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.reshape(x.shape[0], self.in_channels, 8, 8))


class MultiHead(nn.Module):
    """``forward(x) -> {task: outputs}``; ``features=True`` also returns the encoder's map."""

    def __init__(self, heads: dict[str, int], width: int = 16, in_channels: int = 1) -> None:
        super().__init__()
        if not heads:
            raise ValueError("a model needs at least one task head")
        self.encoder = Encoder(width, in_channels)
        self.heads = nn.ModuleDict({t: nn.Linear(4 * self.encoder.out_channels, n) for t, n in heads.items()})

    def forward(self, x: torch.Tensor, features: bool = False):
        f = self.encoder(x)
        pooled = nn.functional.adaptive_avg_pool2d(f, 2).flatten(1)
        out = {t: head(pooled) for t, head in self.heads.items()}
        return (out, f) if features else out


class ServableTask(MultiHead):
    """A single-task model that answers with its head's tensor ``[B, outputs]``, as ``kd serve``
    needs; its state dict is a one-head ``MultiHead``'s, so a trained teacher's weights load."""

    def __init__(self, task: str, outputs: int, width: int = 16) -> None:
        super().__init__({task: outputs}, width)
        self.task = task
        self.input_shape = (64,)

    def forward(self, x: torch.Tensor, features: bool = False):
        if features:
            return super().forward(x, features=True)
        return super().forward(x)[self.task]


# ``module:factory`` targets for ``kd serve`` (the multi-task teachers at the default width 16)
def digit_teacher() -> nn.Module:
    return ServableTask("digit", 10)


def large_teacher() -> nn.Module:
    return ServableTask("large", 2)


def ink_teacher() -> nn.Module:
    return ServableTask("ink", 1)
