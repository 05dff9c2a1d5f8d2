"""What kd holds per sample: a few bytes, never a Python object.

Each measurement runs in a process of its own at two dataset sizes, and the test divides the
difference of their peak resident sets (``ru_maxrss``) by the difference of the sizes: what
every process holds whatever the size (torch, the allocator's arenas) cancels out. Before the
fix, a ``KeySampler`` epoch made every key a Python int at once (56 bytes a sample) and
precompute planned with ``[N, 2]`` int64 keys, ``np.unique`` of them and an int64 copy of the
sample list (112 bytes a sample before its first batch).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kd.core.data import VIEW_STRIDE, KeySampler

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}  # fmt: skip
LIMIT = 16  # bytes a sample; the old code took 56 (sampler) and 112 (precompute)


def _gen(seed: int | None, epoch: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed or 0) * 1_000_003 + epoch) * 8 + salt)


def old_keys(indices: torch.Tensor, num_views: int, fresh_views: bool, seed: int | None, epoch: int) -> Iterator[int]:
    """KeySampler.__iter__ as it was (int64 throughout, every key a Python int at once): the order to keep."""
    indices = torch.as_tensor(indices, dtype=torch.long)
    n = len(indices)
    pos = torch.arange(n)
    if seed is not None:
        pos = torch.randperm(n, generator=_gen(seed, epoch, 1))
    if num_views <= 1:
        keys = indices[pos] * VIEW_STRIDE
    elif fresh_views:
        v = torch.randint(0, num_views, (n,), generator=_gen(seed, epoch, 2))
        keys = indices[pos] * VIEW_STRIDE + v[pos]
    else:
        for i in indices[pos].tolist():
            yield from range(i * VIEW_STRIDE, i * VIEW_STRIDE + num_views)
        return
    yield from keys.tolist()


@pytest.mark.parametrize(
    "num_views,fresh", [(1, False), (1, True), (3, True), (3, False), (40000, True), (40000, False)]
)
def test_key_sampler_order_is_the_old_int64_order(num_views: int, fresh: bool) -> None:
    # 70,001 samples cross the 65,536-key chunks; uneven indices (a shard) and int64 indices past 2**31 too.
    cases = [torch.arange(0), torch.arange(1), torch.arange(5, 3 * 70_001, 3), torch.tensor([2**31 + 7, 3, 2**33])]
    if num_views > 3 and not fresh:
        cases = [cases[0], torch.tensor([3, 9])]  # every view of every sample: a chunk is one sample
    for idx in cases:
        for seed, epoch in ((None, 0), (0, 0), (0, 1), (12345, 7)):
            sampler = KeySampler(idx, num_views, fresh, seed, epoch)
            got = list(sampler)
            assert got == list(old_keys(idx, num_views, fresh, seed, epoch)), (len(idx), seed, epoch)
            assert len(got) == len(sampler)
    sampler = KeySampler(torch.arange(100), num_views, fresh, 3)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) == list(old_keys(torch.arange(100), num_views, fresh, 3, 1)) != first


SAMPLER = r"""
import json, resource, sys, torch
from kd.core.data import KeySampler
n, views, fresh, seed = map(int, sys.argv[1:])
idx = torch.arange(1, 2 * n, 2, dtype=torch.int32)  # the caller's indices: held before the epoch, not measured
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
count = 0
for key in KeySampler(idx, views, fresh == 1, None if seed < 0 else seed):
    count += 1
print(json.dumps({"kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, "count": count}))
"""


def _start(script: str, *args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def _result(p: subprocess.Popen) -> dict:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_a_key_sampler_epoch_holds_a_few_bytes_a_sample() -> None:
    # (views, fresh, seed): shuffled; a fresh view each, shuffled; every view, in order (seed -1). Each
    # epoch in a process of its own (its peak its own), all at once.
    configs, sizes = [(1, 0, 0), (4, 1, 0), (2, 0, -1)], (200_000, 2_200_000)
    runs = {(c, n): _start(SAMPLER, n, *c) for c in configs for n in sizes}
    per_sample = {}
    for c in configs:
        small, large = (_result(runs[c, n]) for n in sizes)
        for out, n in ((small, sizes[0]), (large, sizes[1])):
            assert out["count"] == n * (c[0] if c[0] > 1 and not c[1] else 1)  # the whole epoch ran
        per_sample[c] = (large["kib"] - small["kib"]) * 1024 / (sizes[1] - sizes[0])
    # measured: 5-8 (shuffled: the int32 permutation), 9-11 (and int16 views), 2-3 (in order); the old code 56-87
    assert max(per_sample.values()) < LIMIT, per_sample


PRECOMPUTE = r"""
import json, resource, sys, torch
torch.set_num_threads(1)
from kd.core.data import open_source
from kd.precompute import precompute
from kd.student_trainer.sources import LocalSource
from kd.teacher_server.loading import load_teacher
src = open_source(f"npz:{sys.argv[1]}")
_ = src.labels, src.dataset_id, src.sample_shape  # the source's own (labels: 8 bytes a sample), not measured
teacher = LocalSource(load_teacher("pair", "test_per_sample_memory:pair_model"))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
report = precompute(src, teacher, sys.argv[2], batch_size=64, workers=0, progress=False, stop=lambda: 15)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"kib": after - before, "written": report.written, "skipped": report.skipped}))
"""


def pair_model() -> nn.Module:
    """The teacher of 2-value samples: one linear layer, 3 classes."""
    model = nn.Linear(2, 3)
    model.input_shape = (2,)
    return model


def test_precompute_plans_with_a_few_bytes_a_sample(tmp_path: Path) -> None:
    sizes, growth = (200_000, 1_000_000), []
    rng = np.random.default_rng(0)
    for n in sizes:
        data = tmp_path / f"d{n}.npz"
        np.savez(data, x=rng.integers(0, 256, (n, 2), dtype=np.uint8), y=rng.integers(0, 3, n))
        out = _result(_start(PRECOMPUTE, data, tmp_path / f"c{n}"))
        assert out["written"] == 64 and out["skipped"] == 0  # stopped after its first batch
        growth.append(out["kib"] * 1024)
    per_sample = (growth[1] - growth[0]) / (sizes[1] - sizes[0])
    assert per_sample < LIMIT, (per_sample, growth)  # measured 4-5 (the int32 plan); the old code 112
