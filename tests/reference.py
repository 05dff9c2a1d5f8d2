"""Independent references for loss tests: numpy float64 with explicit exp / sum / log
(never torch.nn.functional), and seeded random batches."""

from __future__ import annotations

import numpy as np
import torch


def ref_log_softmax(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    shifted = a - a.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def ref_softmax(a: np.ndarray) -> np.ndarray:
    return np.exp(ref_log_softmax(a))


def ref_ce(zs: np.ndarray, labels: np.ndarray) -> float:
    log_p = ref_log_softmax(zs)
    return float(-log_p[np.arange(len(labels)), labels].mean())


def make_batch(
    batch: int, classes: int, scale: float, seed: int, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    zs = (torch.randn(batch, classes, generator=g, dtype=torch.float64) * scale).to(dtype)
    zt = (torch.randn(batch, classes, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, classes, (batch,), generator=g)
    return zs, zt, y


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()
