"""kd's soft targets as a plain ``torch.utils.data.Dataset``, for your own training loop.

``SoftTargetDataset(data, cache)`` pairs a sample source (the bundled digits, or
any ``kd.core.samples.SampleSource``) with the teacher targets a ``kd precompute``
stored for it, and returns ``(inputs, label, targets)`` per sample, so a plain
PyTorch loop, Lightning or the Hugging Face Trainer (through a collate that
builds a dict) gets distillation targets without kd's trainer::

    data = SoftTargetDataset(load_dataset("digits"), "digits-cache")
    for x, y, t in DataLoader(data, batch_size=64, shuffle=True, num_workers=2):
        loss = kd_loss(student(x), t, y)

The cache is opened lazily in each process (LMDB handles must not cross a
fork), so DataLoader workers each read their own batches; a batch is read in
one LMDB transaction (``__getitems__``). When the cache holds several views per
sample, each epoch draws one stored view per sample (``set_epoch``), and the
inputs are that view's pixels, replayed from the data source by its seed: the
student sees exactly what the teacher saw.

Inputs come out as every kd path feeds a student (``kd.core.views.model_input``): uint8
pixels (image folders, CIFAR, ``dtype=uint8`` sources) as float32 value/255, other samples
as the source gives them. The student's own resolution and normalisation (``kd train
--input-size/--input-mean/--input-std``) are left to your loop.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from kd.cache import StaleCacheError
from kd.cache.sharded import open_cache
from kd.core.samples import SampleSource
from kd.core.targets import SparseTargets
from kd.core.views import model_input
from kd.student_trainer.sources import CacheSource, SoftTargetSource

Item = tuple[torch.Tensor, torch.Tensor, Any]


def _mix(k: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """A splitmix64-style hash of (k, seed, epoch) -> non-negative int64 (wrapping int64 arithmetic)."""
    salt = ((seed * 1_000_003 + epoch) * 0xBF58476D1CE4E5B9) % (1 << 64)
    salt = salt - (1 << 64) if salt >= 1 << 63 else salt  # as a signed int64
    x = k * -7046029254386353131 + salt  # odd 64-bit constant; torch int64 arithmetic wraps
    x = x ^ ((x >> 31) & ((1 << 33) - 1))
    x = x * -4658895280553007687
    x = x ^ ((x >> 29) & ((1 << 35) - 1))
    return x & ((1 << 62) - 1)


class SoftTargetDataset(torch.utils.data.Dataset):
    """Map-style dataset of ``(inputs, label, targets)``.

    ``targets``: a cache directory (``kd precompute --out``), a ``CacheSource`` or
    any other ``SoftTargetSource`` (a local or server teacher: computed per batch,
    in the main process only, ``num_workers=0``).

    ``views``: with a cache of V > 1 views, ``"epoch"`` (default) gives one item per
    sample, its view drawn per epoch from ``seed`` and ``set_epoch``; ``"all"`` gives
    one item per (sample, view), ``len = N * V``.

    ``sparse``: False gives dense float32 logits ``[C]`` per item; True gives one-row
    ``SparseTargets`` that ``collate`` (pass ``collate_fn=SoftTargetDataset.collate``)
    stacks into the sparse batch kd's losses take as they are (needed for
    ``sample:K`` and ``rand:M`` caches, which have no dense form).

    A ``topk:K`` cache (or a server source asked for its top-k) read with ``sparse=False`` is
    densified (``SparseTargets.dense()``): the K stored classes get ``T_c * log p`` (the
    teacher's logits up to a constant per row, T_c the cache's temperature) and every other
    class the same made-up logit, so that at T_c the rest mass is spread evenly over them.
    Its softmax at T_c is the stored probabilities and that even tail; the absolute logits
    and the tail's shape are not the teacher's. Fit for a loss that reads softmax at T_c
    (Hinton KD); not for one that reads the logits themselves (a regression onto them, DKD's
    or DIST's per-class terms), and not what ``kd train`` trains on: its KD loss compares the
    K classes plus one rest bucket (``sparse=True`` gives those targets). Dense codecs give the
    teacher's logits as computed (fp32, fp16, bf16, int8) or up to a constant per row (q8, q4, pca).
    """

    def __init__(
        self,
        data: SampleSource,
        targets: str | Path | SoftTargetSource,
        *,
        views: str = "epoch",
        sparse: bool = False,
        seed: int = 0,
    ) -> None:
        if views not in ("epoch", "all"):
            raise ValueError(f"views must be 'epoch' or 'all', got {views!r}")
        self.data = data
        self.labels = torch.as_tensor(data.labels, dtype=torch.long)  # read once, no decoding
        self.sparse = sparse
        self.seed = seed
        self.epoch = 0
        self.mode = views
        self._source: SoftTargetSource | None = None
        self._reader = None
        self._pid = -1
        if isinstance(targets, (str, Path)):
            self.path: str | None = str(targets)
            meta = open_cache(self.path).meta
        elif isinstance(targets, CacheSource):
            self.path = str(targets.reader.path)
            meta = targets.reader.meta
        else:
            self.path, meta = None, None
            self._source = targets
        self.num_views = meta.views if meta is not None else 1
        if meta is not None:
            if meta.dataset_id != data.dataset_id:
                raise StaleCacheError(
                    f"cache {self.path!r} was built on dataset {meta.dataset_id!r}, not on {data.dataset_id!r}; "
                    "precompute a cache for this data"
                )
            if meta.codec.startswith("sample:") and not sparse:
                raise ValueError(
                    f"cache {self.path!r} holds sampled targets ({meta.codec}), which have no dense form: "
                    "use sparse=True and collate_fn=SoftTargetDataset.collate"
                )

    def __len__(self) -> int:
        n = len(self.labels)
        return n * self.num_views if self.mode == "all" else n

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's view per sample (call before iterating; DataLoader workers are
        forked per epoch unless ``persistent_workers=True``)."""
        self.epoch = epoch

    def keys(self, items: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(sample indices, view ids or None) of dataset items."""
        k = torch.as_tensor(items, dtype=torch.long)
        if self.num_views == 1:
            return k, None
        if self.mode == "all":
            return k // self.num_views, k % self.num_views
        # A hash of (seed, epoch, sample): the same view whichever worker reads the sample, and
        # O(batch) work and memory (no per-epoch table of N draws).
        return k, _mix(k, self.seed, self.epoch) % self.num_views

    def _targets(self, idx: torch.Tensor, inputs: torch.Tensor, views: torch.Tensor | None) -> Any:
        if self.path is None:
            assert self._source is not None
            out = self._source.targets(idx, inputs, views)
        else:
            if self._reader is None or self._pid != os.getpid():  # opened per process: fork-safe
                self._reader, self._pid = open_cache(self.path), os.getpid()
            out = self._reader.targets(idx, views)
        if isinstance(out, SparseTargets) and not self.sparse:
            return out.dense()
        return out

    def __getitems__(self, items: list[int]) -> list[Item]:
        """A whole batch at once: one decode call and one cache transaction."""
        idx, views = self.keys(items)
        inputs = self.data.get(idx, views)
        targets = self._targets(idx, inputs, views)  # a source reads the samples as stored (its own conversion)
        # uint8 pixels as value/255, through the function kd's trainer uses (it handed out the raw bytes)
        inputs = model_input(inputs)
        labels = self.labels[idx]
        return [(inputs[r], labels[r], targets[r : r + 1] if self.sparse else targets[r]) for r in range(len(idx))]

    def __getitem__(self, item: int) -> Item:
        return self.__getitems__([int(item)])[0]

    @staticmethod
    def collate(batch: list[Item]) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Stack items; sparse targets become one ``SparseTargets`` batch."""
        inputs = torch.stack([b[0] for b in batch])
        labels = torch.stack([b[1] for b in batch])
        first = batch[0][2]
        if not isinstance(first, SparseTargets):
            return inputs, labels, torch.stack([b[2] for b in batch])
        parts = [b[2] for b in batch]
        return (
            inputs,
            labels,
            SparseTargets(
                first.kind,
                torch.cat([p.indices for p in parts]),
                torch.cat([p.logits for p in parts]),
                torch.cat([p.logsumexp for p in parts]),
                first.num_classes,
                first.temperature,
            ),
        )
