"""Accuracy of a model over a sample source, streamed in batches.

``evaluate(model, source)`` reads the plain samples (no views) through
``kd.core.data.loader`` (decoding in ``workers`` processes), shapes them for
the model (uint8 pixels as value/255, ``conform`` to ``input_shape``, then the model's ``final`` transform:
resolution and normalisation), and counts top-1 and top-5 hits. Outputs that are
not a tensor (Hugging Face ``.logits``, dicts, tuples) are unwrapped with
``kd.core.factory.logits_of``. Memory is flat
in the dataset size: one batch at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kd.core.data import loader
from kd.core.factory import logits_of
from kd.core.samples import SampleSource
from kd.core.views import model_input


@dataclass(frozen=True)
class Accuracy:
    """Top-k accuracy (fractions in [0, 1]) over ``n`` samples."""

    top1: float
    top5: float
    n: int
    correct1: int
    correct5: int


def _batches(
    source: SampleSource, indices: torch.Tensor | Sequence[int] | None, batch_size: int, workers: int, pin: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, labels) per batch: one batched ``get`` per batch in this process
    (in-memory sources read a whole batch at once), or DataLoader workers decoding samples."""
    if workers > 0:
        for b in loader(source, indices, batch_size, workers=workers, pin_memory=pin):
            yield b.inputs, b.labels
        return
    order = torch.arange(len(source)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
    labels = source.labels
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        yield source.get(idx), labels[idx]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    source: SampleSource,
    *,
    indices: torch.Tensor | Sequence[int] | None = None,
    batch_size: int = 256,
    workers: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    input_shape: Sequence[int] | None = None,
    final: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Accuracy:
    """Top-1 and top-5 accuracy of ``model`` on ``source`` (or its ``indices``).

    With fewer than 5 classes, top-5 counts every class (so it is 1.0). The
    model is put in eval mode and restored to its previous mode afterwards.
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    pin = device.type == "cuda"
    correct1 = correct5 = n = 0
    try:
        for inputs, labels in _batches(source, indices, batch_size, workers, pin):
            x = model_input(inputs.to(device, non_blocking=pin), final, input_shape)
            logits = logits_of(model(x.to(dtype)))
            y = labels.to(device)
            # top-1 by argmax (ties to the lowest index, as everywhere in kd); topk may order ties otherwise
            correct1 += int((logits.argmax(1) == y).sum())
            k = min(5, logits.shape[1])
            correct5 += int((logits.topk(k, dim=1).indices == y[:, None]).any(dim=1).sum())
            n += len(y)
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("evaluate: no samples to evaluate")
    return Accuracy(correct1 / n, correct5 / n, n, correct1, correct5)


@torch.no_grad()
def _first(source: SampleSource, view: bool) -> torch.Tensor:
    """The first sample as a batch of one: its view 0 (``view``), as the trainer reads views, or as stored."""
    idx = torch.arange(1)
    return source.get(idx, torch.zeros(1, dtype=torch.long)) if view else source.get(idx)


def output_width(
    model: nn.Module,
    source: SampleSource,
    *,
    final: Callable[[torch.Tensor], torch.Tensor] | None = None,
    input_shape: Sequence[int] | None = None,
    view: bool = False,
) -> int | None:
    """Outputs per sample of ``model`` on ``source``'s first sample, shaped as ``evaluate`` shapes
    it (None when the source is empty or the output is not [B, K]). One forward in eval mode (no
    dropout; the mode is restored), on the model's device, that leaves every buffer as it was."""
    if len(source) == 0:
        return None
    param = next(model.parameters(), None)
    x = _first(source, view)
    if param is not None:
        x = x.to(param.device)
    was_training = model.training
    # Each module's buffers, put back after the forward: a QAT observer records in eval mode too (train_student
    # runs this before every qkd phase, whose observers then started from this one sample's ranges).
    buffers = [(m, dict(m._buffers)) for m in model.modules()]
    for m, saved in buffers:
        m._buffers.update({k: b.clone() for k, b in saved.items() if b is not None})
    model.eval()
    try:
        with torch.no_grad():
            logits = logits_of(model(model_input(x, final, input_shape).to(torch.float32)))
    finally:
        model.train(was_training)
        for m, saved in buffers:
            m._buffers.update(saved)
    return int(logits.shape[1]) if logits.ndim == 2 else None


def check_output_width(
    model: nn.Module,
    source: SampleSource,
    what: str,
    *,
    final: Callable[[torch.Tensor], torch.Tensor] | None = None,
    input_shape: Sequence[int] | None = None,
    view: bool = False,
) -> None:
    """A ValueError naming both numbers when ``model`` (``what``) gives another number of outputs
    than ``source`` has classes: fewer, and labels fall outside its outputs (a wrong accuracy, or
    an IndexError at the first step); more, and it trains or is scored over classes the data has not.
    ``view``: the model trains on the source's views (``--views``), so it is probed on the first one,
    as the trainer's batches give it, not on the stored sample (another size under a crop policy)."""
    try:
        width = output_width(model, source, final=final, input_shape=input_shape, view=view)
    except RuntimeError as e:  # samples the model cannot take: say so, not only torch's shape error
        shape = list(_first(source, view).shape[1:])
        raise ValueError(
            f"{what} cannot take the samples of {source.dataset_id}, shaped {shape} ({e}); give the dataset "
            "?shape= (or ?size=/mode=) to match the model's input"
        ) from None
    classes = source.num_classes
    if width is None or width == classes:
        return
    hint = (f"; if the data lacks its last classes, give ?classes={width} to its URI" if width > classes
            else "; build the model with as many outputs as classes")  # fmt: skip
    raise ValueError(f"{what} gives {width} outputs per sample but {source.dataset_id} has {classes} classes{hint}")
