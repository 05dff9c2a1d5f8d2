"""Graph convolutional networks (Kipf & Welling 2017) on a dense normalised adjacency.

``GCN(in, hidden, layers, classes)`` returns the logits and, with ``middle=True``, the hidden
features after every hidden layer, which the LSP loss compares. Dense matrices: kd's generated
graphs have a few hundred nodes, and a sparse library would be a dependency for nothing.
"""

from __future__ import annotations

import torch
from torch import nn


def normalised_adjacency(edges: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """``D^-1/2 (A + I) D^-1/2`` as a dense ``[N, N]`` matrix (the renormalisation trick)."""
    a = torch.zeros(num_nodes, num_nodes, device=edges.device)
    a[edges[1], edges[0]] = 1.0
    a = a + torch.eye(num_nodes, device=edges.device)
    d = a.sum(1).rsqrt()
    return d[:, None] * a * d[None, :]


class GCN(nn.Module):
    def __init__(self, in_features: int, hidden: int, layers: int, classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        if layers < 2:
            raise ValueError(f"a GCN here has >= 2 layers (hidden ones + the output), got {layers}")
        dims = [in_features] + [hidden] * (layers - 1)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(dims[-1], classes)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, adj: torch.Tensor, middle: bool = False):
        feats = []
        for layer in self.hidden:
            x = torch.relu(adj @ layer(self.dropout(x)))
            feats.append(x)
        logits = adj @ self.out(x)
        return (logits, feats) if middle else logits
