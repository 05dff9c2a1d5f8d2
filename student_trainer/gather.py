"""A loss that relates the samples of a batch, computed on the whole global batch under torchrun.

Each rank holds a contiguous slice of every global batch. A per-sample loss is a mean over the
slice, and the trainer weights each rank's mean by its share so DDP's average is the global mean.
A loss that relates the samples (``couples=True`` in the registry: DIST's correlation over the
batch, SP's similarity matrix, RKD's distances, a count or a median over the batch...) cannot be
split that way, so every rank gathers the per-sample tensors the loss reads (student outputs with
their autograd graph, teacher outputs, labels, indices) from all ranks, in rank order (the global
batch's order), and computes the loss once on the whole batch, as one process would.

Gradients: every rank computes the same loss from the same gathered tensors, so the gradient each
rank's copy sends to the gathered batch is the same everywhere, and its rows of a rank's slice are
that slice's whole gradient. The gather's backward (``_Gather``) therefore keeps its own rows of
the local gradient and communicates nothing; each rank's loss is multiplied by ``world_size``, and
DDP's average of the ranks' parameter gradients (a division by ``world_size``) gives exactly the
one-process gradient. (``torch.distributed.nn.functional.all_gather`` would sum the ranks' equal
gradients instead, with one more collective per tensor in the backward, and is deprecated.)
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from kd.core.targets import SparseTargets


def rank_sizes(rows: int, device: torch.device) -> list[int]:
    """Every rank's number of rows (the last slices of a global batch may be smaller, or empty)."""
    import torch.distributed as dist

    mine = torch.tensor([rows], dtype=torch.int64, device=device)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [int(t.item()) for t in every]


class _Gather(torch.autograd.Function):
    """All ranks' (padded) rows; the backward returns this rank's rows of the local gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:  # type: ignore[override]
        import torch.distributed as dist

        ctx.rank, ctx.rows = dist.get_rank(), len(x)
        most = max(sizes)
        if len(x) < most:  # all_gather takes one shape from every rank: pad, then drop the padding
            x = torch.cat([x, x.new_zeros((most - len(x), *x.shape[1:]))])
        parts = [torch.empty_like(x) for _ in sizes]
        dist.all_gather(parts, x.contiguous())
        ctx.start = sum(sizes[: ctx.rank])
        return torch.cat([p[:k] for p, k in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad[ctx.start : ctx.start + ctx.rows], None


def gather_rows(value: object, sizes: list[int]) -> object:
    """``value`` with every tensor's rows gathered from all ranks (``sizes[r]`` rows from rank r).

    Tensors, and tensors inside lists, tuples (named ones keep their type) and dicts, are per-sample
    (first dimension: the rank's rows) and are gathered; modules and plain values (a connector's
    memory bank, None, a number) are the same on every rank and pass as they are. Every rank calls
    this with values of one structure (the same code on the same kind of batch)."""
    if isinstance(value, torch.Tensor):
        return _Gather.apply(value, sizes)
    if isinstance(value, SparseTargets):  # a top-k / sampled cache's or --server-topk's targets: per row
        return dataclasses.replace(value, indices=_Gather.apply(value.indices, sizes),
                                   logits=_Gather.apply(value.logits, sizes),
                                   logsumexp=_Gather.apply(value.logsumexp, sizes))  # fmt: skip
    if isinstance(value, dict):
        return {k: gather_rows(v, sizes) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a connector's named output
        return type(value)(*(gather_rows(v, sizes) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(gather_rows(v, sizes) for v in value)
    if value is None or isinstance(value, (nn.Module, str, int, float, bool)):
        return value
    raise ValueError(
        f"cannot gather a {type(value).__name__} across torchrun ranks to compute a batch-coupled loss on the "
        "global batch"
    )
