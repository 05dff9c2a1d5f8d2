"""Train a GCN teacher, then a thinner GCN student with CE alone and with CE + LSP; compare.

The student's loss follows the official code: ``CE(labels) + lsp_weight * LSP(student hidden
layer, teacher hidden layer)`` on the teacher's graph (the input graph: static graphs, as PPI).
One graph per step, the recipe's optimiser (Adam at 5e-3 as the official code by default).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kd.student_trainer import optim
from kd.student_trainer.graph.graphs import Graph, GraphSpec, make_graphs
from kd.student_trainer.graph.lsp import lsp_loss
from kd.student_trainer.graph.models import GCN, normalised_adjacency


@dataclass
class GraphDistillConfig:
    spec: GraphSpec = field(default_factory=GraphSpec)
    train_graphs: int = 20
    test_graphs: int = 10
    teacher_hidden: int = 128
    teacher_layers: int = 3
    student_hidden: int = 8
    student_layers: int = 3
    teacher_layer: int = 1  # which hidden layer's features the LSP compares (0-based)
    student_layer: int = 1
    epochs: int = 60
    teacher_epochs: int = 60
    lr: float = 5e-3
    lsp_weight: float = 1.0
    scale: float = 100.0
    seeds: int = 1
    seed: int = 0
    device: str = "cpu"

    def validate(self) -> None:
        self.spec.validate()
        if self.train_graphs < 1 or self.test_graphs < 1 or self.seeds < 1:
            raise ValueError("train_graphs, test_graphs and seeds must be >= 1")
        if not 0 <= self.teacher_layer < self.teacher_layers - 1:
            raise ValueError(f"teacher_layer must name a hidden layer in [0, {self.teacher_layers - 2}]")
        if not 0 <= self.student_layer < self.student_layers - 1:
            raise ValueError(f"student_layer must name a hidden layer in [0, {self.student_layers - 2}]")
        for name in ("teacher_hidden", "student_hidden", "teacher_layers", "student_layers", "epochs",
                     "teacher_epochs"):  # fmt: skip
            if getattr(self, name) < 1:  # epochs -3 trained nothing and reported the untrained models
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        finite = all(math.isfinite(v) for v in (self.lsp_weight, self.scale, self.lr))
        if not (finite and self.lsp_weight >= 0 and self.scale > 0 and self.lr >= 0):
            raise ValueError(f"lsp_weight and lr must be finite numbers >= 0 and scale > 0, got lsp_weight="
                             f"{self.lsp_weight}, scale={self.scale}, lr={self.lr}")  # fmt: skip


def _prepared(graphs: list[Graph], device: torch.device) -> list[tuple[Graph, torch.Tensor]]:
    return [(g.to(device), normalised_adjacency(g.edges.to(device), g.num_nodes)) for g in graphs]


@torch.no_grad()
def node_accuracy(model: nn.Module, graphs: list[tuple[Graph, torch.Tensor]]) -> float:
    model.eval()
    right = total = 0
    for g, adj in graphs:
        right += int((model(g.x, adj).argmax(1) == g.y).sum())
        total += g.num_nodes
    return right / total


def train_gcn(model: GCN, train: list[tuple[Graph, torch.Tensor]], epochs: int, lr: float, *, seed: int,
              teacher: GCN | None = None, teacher_layer: int = 1, student_layer: int = 1,
              lsp_weight: float = 0.0, scale: float = 100.0) -> list[float]:  # fmt: skip
    """Train ``model`` in place (CE, plus LSP against ``teacher`` when given); the loss per epoch."""
    opt = optim.make_optimizer(model.parameters(), optim.Recipe(lr=lr))
    gen = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(epochs):
        model.train()
        total = 0.0
        for i in torch.randperm(len(train), generator=gen).tolist():
            g, adj = train[i]
            logits, feats = model(g.x, adj, middle=True)
            loss = F.cross_entropy(logits, g.y)
            if teacher is not None and lsp_weight > 0:
                with torch.no_grad():
                    _, t_feats = teacher(g.x, adj, middle=True)
                loss = loss + lsp_weight * lsp_loss(feats[student_layer], t_feats[teacher_layer], g.edges, scale=scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        history.append(total / len(train))
    return history


def run(config: GraphDistillConfig) -> dict:
    """Teacher, then per seed a CE student and an LSP student from the same initialisation."""
    config.validate()
    t0 = time.perf_counter()
    dev = torch.device(config.device)
    spec = config.spec
    train = _prepared(make_graphs(config.train_graphs, spec, seed=config.seed), dev)
    test = _prepared(make_graphs(config.test_graphs, spec, seed=config.seed, first=100_000), dev)
    torch.manual_seed(config.seed)
    teacher = GCN(spec.features, config.teacher_hidden, config.teacher_layers, spec.classes).to(dev)
    train_gcn(teacher, train, config.teacher_epochs, config.lr, seed=config.seed)
    teacher.eval()
    out: dict = {"config": {**asdict(config), "spec": asdict(spec)}, "teacher_acc": node_accuracy(teacher, test),
                 "teacher_params": sum(p.numel() for p in teacher.parameters())}  # fmt: skip
    for name, weight in (("ce", 0.0), ("lsp", config.lsp_weight)):
        accs = []
        for s in range(config.seeds):
            torch.manual_seed(10_000 + s)  # the same student initialisation for CE and LSP
            student = GCN(spec.features, config.student_hidden, config.student_layers, spec.classes).to(dev)
            train_gcn(student, train, config.epochs, config.lr, seed=s, teacher=teacher if weight else None,
                      teacher_layer=config.teacher_layer, student_layer=config.student_layer,
                      lsp_weight=weight, scale=config.scale)  # fmt: skip
            accs.append(node_accuracy(student, test))
        out[name] = {"acc_per_seed": accs, "acc_mean": sum(accs) / len(accs)}
        out["student_params"] = sum(p.numel() for p in student.parameters())
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out
