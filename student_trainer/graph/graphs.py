"""Inductive node-classification graphs that kd generates: a stochastic block model with noisy features.

Each graph has ``nodes`` nodes in ``classes`` blocks; an edge joins two nodes of one block with
probability ``p_in`` and of two blocks with ``p_out``. A node's features are its block's mean
vector times ``signal`` plus unit Gaussian noise, so one node alone is hard to classify and its
neighbourhood (mostly its own block) tells more: a GCN's aggregation matters, as on the PPI
graphs of the LSP paper. Train and test graphs are disjoint draws from the same model (an
inductive split); the block means are shared by all graphs of one ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Graph:
    x: torch.Tensor  # float32 [N, F] node features
    edges: torch.Tensor  # int64 [2, E] (source, destination), both directions, no self loops
    y: torch.Tensor  # int64 [N] node labels

    @property
    def num_nodes(self) -> int:
        return int(self.x.shape[0])

    def to(self, device: torch.device | str) -> Graph:
        return Graph(self.x.to(device), self.edges.to(device), self.y.to(device))


@dataclass(frozen=True)
class GraphSpec:
    nodes: int = 200
    classes: int = 4
    features: int = 16
    p_in: float = 0.08
    p_out: float = 0.01
    signal: float = 0.6

    def validate(self) -> None:
        if self.nodes < 2 or self.classes < 2 or self.features < 1:
            raise ValueError(f"graphs need >= 2 nodes, >= 2 classes and >= 1 feature, got {self}")
        for name in ("p_in", "p_out"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        if not self.signal >= 0.0:
            raise ValueError(f"signal must be >= 0, got {self.signal}")


def make_graphs(count: int, spec: GraphSpec = GraphSpec(), *, seed: int = 0, first: int = 0) -> list[Graph]:
    """Graphs ``first .. first + count - 1`` of the family ``seed`` (each graph seeded on its own,
    so the train split ``first=0`` and a test split ``first=1000`` never share a graph)."""
    spec.validate()
    means = torch.randn(spec.classes, spec.features, generator=torch.Generator().manual_seed(seed))
    out = []
    for g in range(first, first + count):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 17 + g)
        y = torch.randint(0, spec.classes, (spec.nodes,), generator=gen)
        same = y[:, None] == y[None, :]
        p = torch.where(same, spec.p_in, spec.p_out)
        upper = torch.triu(torch.rand(spec.nodes, spec.nodes, generator=gen) < p, diagonal=1)
        src, dst = upper.nonzero(as_tuple=True)
        edges = torch.stack([torch.cat([src, dst]), torch.cat([dst, src])])
        x = means[y] * spec.signal + torch.randn(spec.nodes, spec.features, generator=gen)
        out.append(Graph(x.float(), edges.long(), y.long()))
    return out
