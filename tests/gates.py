"""A forward that can be held: requests sent while it is held arrive together for sure, which
simultaneous client threads in one process (the GIL, a loaded machine) do not guarantee."""

from __future__ import annotations

import threading

import torch
from torch import nn


class HeldForward(nn.Module):
    """``inner``, whose first forward after ``hold`` waits for ``gate``: blocked, not computing,
    so it is still a cheap forward (the server runs one inline under its small-work lock)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.armed, self.inside, self.gate = threading.Event(), threading.Event(), threading.Event()

    def hold(self) -> None:
        self.armed.set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.armed.is_set() and not self.inside.is_set():
            self.inside.set()
            assert self.gate.wait(60), "the test never opened the gate"
        return self.inner(x)
