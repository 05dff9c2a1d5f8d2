"""A forward that can be held: requests sent while it is held arrive together for sure, which
simultaneous client threads in one process (the GIL, a loaded machine) do not guarantee."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

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

    def crowd(self, call: Callable[[int], object], n: int, settle: float = 1.0) -> None:
        """``call(0)`` runs into the held forward; ``call(1)`` .. ``call(n - 1)`` start
        meanwhile, each on its thread; ``settle`` seconds later the forward goes on."""
        self.hold()
        threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
        try:
            threads[0].start()
            assert self.inside.wait(30), "the first call never reached the model"
            for t in threads[1:]:
                t.start()
            time.sleep(settle)  # they arrive while the first forward is held
        finally:
            self.gate.set()
            for t in threads:
                if t.ident is not None:  # started
                    t.join(30)
        assert not any(t.is_alive() for t in threads), "a call hung"
