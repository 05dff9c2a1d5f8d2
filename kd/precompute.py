"""Fill a cache with a teacher's outputs for a whole dataset split.

The teacher is any soft-target source that computes (a ``LocalSource`` or a
``ServerSource``); re-running skips every record already committed, so a
killed run resumes where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from cache import CacheMeta, CacheWriter
from cache.codecs import bytes_per_sample
from kd.data import Dataset
from student_trainer.sources import SoftTargetSource


@dataclass
class PrecomputeReport:
    written: int
    skipped: int
    seconds: float
    bytes_per_sample: int


def precompute(
    dataset: Dataset,
    teacher: SoftTargetSource,
    out: str | Path,
    *,
    codec: str = "fp32",
    batch_size: int = 256,
    commit_every: int = 4096,
    progress: bool = True,
) -> PrecomputeReport:
    t0 = time.perf_counter()
    meta = CacheMeta(
        teacher_fingerprint=teacher.fingerprint,
        dataset_id=dataset.dataset_id,
        dataset_size=len(dataset),
        codec=codec,
        num_classes=teacher.num_classes,
        teacher=teacher.teacher_name,
    )
    with CacheWriter(out, meta, commit_every=commit_every) as writer:
        present = writer.present()
        todo = torch.tensor([i for i in range(len(dataset)) if (i, 0) not in present], dtype=torch.long)
        batches = ((idx, dataset.inputs[idx], dataset.labels[idx]) for idx in torch.split(todo, batch_size) if len(idx))
        with Progress(
            TextColumn("precompute {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            disable=not progress,
            transient=False,
        ) as bar:
            task = bar.add_task(dataset.dataset_id, total=len(dataset), completed=len(dataset) - len(todo))
            for (idx, _, _), logits in teacher.iter_targets(batches):
                writer.put(idx.tolist(), logits)
                bar.advance(task, len(idx))
    return PrecomputeReport(
        written=len(todo),
        skipped=len(dataset) - len(todo),
        seconds=time.perf_counter() - t0,
        bytes_per_sample=bytes_per_sample(codec, teacher.num_classes),
    )
