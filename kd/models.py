"""Bundled model factories for the digits data (8x8 images flattened to 64).

They are ``module:factory`` targets for ``kd serve --teacher`` and ``kd train``
(e.g. ``kd.models:digits_teacher``). A factory returns an ``nn.Module`` whose
``input_shape`` attribute gives the shape of one sample.
"""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Sequential):
    def __init__(self, sizes: list[int], dropout: float = 0.0) -> None:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
                if dropout:
                    layers.append(nn.Dropout(dropout))
        super().__init__(*layers)
        self.input_shape = (sizes[0],)


def digits_teacher() -> nn.Module:
    """A wide MLP teacher, 64-512-512-10 (~0.3M parameters)."""
    return MLP([64, 512, 512, 10], dropout=0.2)


def digits_student() -> nn.Module:
    """A small MLP student, 64-16-10 (~1.2k parameters)."""
    return MLP([64, 16, 10])


class DigitsCNN(nn.Module):
    """A small CNN on 1x8x8 digits: named stages (``layer1``, ``layer2``) give
    4-D feature maps for feature distillation and channels-last serving."""

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.input_shape = (1, 8, 8)
        self.layer1 = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.layer2 = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = x.reshape(x.shape[0], *self.input_shape)
        return self.head(self.pool(self.layer2(self.layer1(x))).flatten(1))


def digits_cnn() -> nn.Module:
    return DigitsCNN()


def digits_cnn_student() -> nn.Module:
    """The feature-distillation student: DigitsCNN at width 8 (layer1 [8, 8, 8], layer2 [16, 8, 8])."""
    return DigitsCNN(width=8)


def bench_teacher() -> nn.Module:
    """A large MLP for ``kd bench serve``, 512-2048-2048-1000 (~7.3M parameters): one forward
    of a batch of 64 takes several ms on a CPU. Seeded, so every process builds the same weights
    (the served and the in-process model have the same fingerprint); the global RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return MLP([512, 2048, 2048, 1000])
