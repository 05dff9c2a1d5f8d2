"""Fill a cache with a teacher's outputs for a whole dataset split.

The teacher is any soft-target source that computes (a ``LocalSource`` or a
``ServerSource`` over one or several servers). Work is keyed by (sample,
view): re-running skips every record already committed, so a killed run
resumes where it stopped. ``shard=(I, N)`` computes only samples i with
i % N == I into ``OUT/shard-IIIII-of-NNNNN`` (one shard per machine or per
``torchrun`` rank); readers open the directory of shards as one cache.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from kd.cache import CacheMeta, CacheWriter
from kd.cache.codecs import bytes_per_sample
from kd.cache.sharded import shard_dir
from kd.core import reductions
from kd.core.data import Dataset, view_seeds
from kd.student_trainer.sources import Batch, SoftTargetSource, prefetched


@dataclass
class PrecomputeReport:
    written: int
    skipped: int
    seconds: float
    bytes_per_sample: int
    path: Path


def torchrun_shard() -> tuple[int, int] | None:
    """(rank, world size) when running under torchrun / torch.distributed launchers."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def precompute(
    dataset: Dataset,
    teacher: SoftTargetSource,
    out: str | Path,
    *,
    codec: str = "fp32",
    batch_size: int = 256,
    views: int = 1,
    temperature: float | None = None,
    shard: tuple[int, int] | None = None,
    features: list[str] | None = None,
    pool_features: bool = False,
    commit_every: int = 4096,
    progress: bool = True,
) -> PrecomputeReport:
    """``features`` (teacher layer names) are stored beside the targets, fp16, optionally pooled."""
    t0 = time.perf_counter()
    features = sorted(features or [])
    batchwise = [name for name in features if not reductions.parse(name).per_sample]
    if batchwise:
        raise ValueError(
            f"feature(s) {batchwise} relate the samples of a batch to each other and cannot be cached per sample; "
            "cache the full (or pooled) map and let the trainer compute them"
        )
    shapes: dict[str, list[int]] = {}
    if features:  # one probe sample tells the stored shape of every requested layer
        probe = Batch(torch.tensor([0]), dataset.inputs[:1], dataset.labels[:1])
        _, _, feats = next(iter(teacher.iter_outputs([probe], features, pool_features)))
        shapes = {name: list(f.shape[1:]) for name, f in feats.items()}
    shard_index, shard_count = shard or (0, 1)
    path = shard_dir(out, shard_index, shard_count) if shard_count > 1 else Path(out)
    if codec.startswith("sample:") and not temperature:
        raise ValueError("codec sample:K draws from softmax(z / T): give the training temperature (--temperature)")
    meta = CacheMeta.for_dataset(
        teacher_fingerprint=teacher.fingerprint,
        teacher=teacher.teacher_name,
        num_classes=teacher.num_classes,
        dataset=dataset,
        codec=codec,
        views=views,
        temperature=temperature,
        shard_index=shard_index,
        shard_count=shard_count,
        features=shapes,
        features_pooled=pool_features and bool(features),
    )
    with CacheWriter(path, meta, commit_every=commit_every) as writer:
        present = writer.present()
        todo = [key for key in meta.expected_keys() if key not in present]
        keys = torch.tensor(todo, dtype=torch.long).reshape(-1, 2)

        def batches():
            for chunk in torch.split(keys, batch_size):
                if not len(chunk):
                    continue
                idx, vw = chunk[:, 0], chunk[:, 1]
                seeds = view_seeds(idx, vw, views)
                yield Batch(idx, dataset.views(idx, seeds), dataset.labels[idx], vw if views > 1 else None)

        total = len(meta.expected_keys())
        with Progress(
            TextColumn("precompute {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            disable=not progress,
        ) as bar:
            task = bar.add_task(f"{dataset.dataset_id} -> {path}", total=total, completed=total - len(todo))
            # The teacher runs in a background thread while this one encodes and commits.
            for batch, logits, feats in prefetched(teacher.iter_outputs(batches(), features, pool_features), 2):
                views_list = None if batch.views is None else batch.views.tolist()
                writer.put(batch.indices.tolist(), logits, views_list, feats or None)
                bar.advance(task, len(batch.indices))
    return PrecomputeReport(
        written=len(todo),
        skipped=total - len(todo),
        seconds=time.perf_counter() - t0,
        bytes_per_sample=bytes_per_sample(codec, teacher.num_classes) + sum(meta.feature_bytes.values()),
        path=path,
    )
