"""Soft-target sources: where a training step gets the teacher's logits.

All three give the same targets for the same sample (a test compares them):

* ``CacheSource``: reads precomputed targets from an LMDB cache by sample index.
* ``ServerSource``: asks a running ``kd serve`` over one bidirectional stream,
  keeping ``depth`` batches in flight ahead of the training step, so the
  student rarely waits for the network or the teacher.
* ``LocalSource``: runs a teacher in this process (the classic way).

A source yields dense float32 logits [B, C]; losses never see where they came from.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from cache import CacheReader
from teacher_server.client import TeacherClient
from teacher_server.loading import Teacher, load_teacher
from teacher_server.runner import ModelRunner

# A batch as the trainer builds it: (sample indices [B], inputs [B, ...], labels [B]).
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class SoftTargetSource:
    name: str = "source"
    teacher_name: str = ""
    fingerprint: str
    num_classes: int

    def targets(self, indices: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Teacher logits [B, C] (float32) for these samples."""
        raise NotImplementedError

    def iter_targets(self, batches: Iterable[Batch]) -> Iterator[tuple[Batch, torch.Tensor]]:
        """Pair each batch with its targets; sources that can work ahead override this."""
        for batch in batches:
            yield batch, self.targets(batch[0], batch[1])

    def close(self) -> None:
        pass

    def __enter__(self) -> SoftTargetSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CacheSource(SoftTargetSource):
    name = "cache"

    def __init__(self, path: str, *, teacher_fingerprint: str | None = None, dataset_id: str | None = None) -> None:
        self.reader = CacheReader(path, teacher_fingerprint=teacher_fingerprint, dataset_id=dataset_id)
        self.fingerprint = self.reader.meta.teacher_fingerprint
        self.num_classes = self.reader.meta.num_classes
        self.dataset_id = self.reader.meta.dataset_id
        self.teacher_name = self.reader.meta.teacher

    def targets(self, indices: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        return self.reader.get(indices)


class ServerSource(SoftTargetSource):
    name = "server"

    def __init__(self, address: str | list[str], teacher: str | None = None, *, depth: int = 8) -> None:
        self.client = TeacherClient(address)
        desc = self.client.describe(teacher)
        self.teacher = self.teacher_name = desc.name
        self.fingerprint = desc.fingerprint
        self.num_classes = desc.num_classes
        self.depth = depth

    def targets(self, indices: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        return self.client.infer(self.teacher, inputs)["logits"]

    def iter_targets(self, batches: Iterable[Batch]) -> Iterator[tuple[Batch, torch.Tensor]]:
        keyed = ((b, b[1]) for b in batches)
        for batch, outputs in self.client.infer_stream(self.teacher, keyed, depth=self.depth):
            yield batch, outputs["logits"]

    def close(self) -> None:
        self.client.close()


class LocalSource(SoftTargetSource):
    name = "local"

    def __init__(self, teacher: Teacher | str, *, device: str = "cpu", amp: str = "fp32") -> None:
        if isinstance(teacher, str):
            teacher = load_teacher("local", teacher, device=device)
        self.teacher = teacher
        self.teacher_name = teacher.name
        self.runner = ModelRunner(teacher, amp=amp)
        self.fingerprint = teacher.fingerprint
        self.num_classes = teacher.num_classes

    def targets(self, indices: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        return self.runner(inputs)


def parse_source(ref: str, **kwargs: Any) -> SoftTargetSource:
    """``cache:PATH``, ``server:HOST:PORT[,HOST:PORT...][/TEACHER]`` or ``local:SPEC``."""
    kind, sep, rest = ref.partition(":")
    if not sep or not rest:
        raise ValueError(f"source {ref!r}: expected cache:PATH, server:HOST:PORT[/TEACHER] or local:SPEC")
    if kind == "cache":
        return CacheSource(rest, **kwargs)
    if kind == "server":
        address, _, teacher = rest.partition("/")
        return ServerSource(address, teacher or None)
    if kind == "local":
        return LocalSource(rest, **kwargs)
    raise ValueError(f"unknown source kind {kind!r} in {ref!r}; use cache:, server: or local:")
