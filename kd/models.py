"""Bundled model factories for the digits data (8x8 images flattened to 64).

They are ``module:factory`` targets for ``kd serve --teacher`` and ``kd train``
(e.g. ``kd.models:digits_teacher``). A factory returns an ``nn.Module`` whose
``input_shape`` attribute gives the shape of one sample.
"""

from __future__ import annotations

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
