"""Memory of `kd precompute` and of a training epoch does not grow with the dataset.

A ``module:`` dataset generates 3 x 32 x 32 float32 images on the fly: N = 24,000 samples
are 295 MB of data. In a process of its own (so its RSS is its own), precompute runs the
whole set through a tiny teacher into an LMDB cache, then one training epoch reads it back
from the cache; the resident set size (VmRSS) is sampled after ~2k samples and at the end
of each. Everything any stage would keep per sample (the inputs: 12 KiB each) would show
as hundreds of MB of growth; the test allows 40 MB (allocator slack, LMDB pages of the
~2 MB cache). A version of precompute that keeps its batches (one ``kept.append(x)`` in
the loop) fails it with ~260 MB of growth.

glibc's malloc has a creep of its own on long runs (its dynamic mmap threshold: freed holes
of MiB-sized blocks are kept; measured over 10k JPEGs with the resnet8x4 teacher: main
process +204 MiB, its DataLoader worker +107 MiB, both flat with the threshold fixed).
Precompute fixes it in code (``kd.precompute.bound_malloc_retention``); the tests check
that it did, in the precompute process and through a probe of glibc's behaviour.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
N, SHAPE, CLASSES = 24_000, (3, 32, 32), 10
DATA_MB = N * 3 * 32 * 32 * 4 / 2**20
ALLOWED_GROWTH_MB = 40


class Synthetic(torch.utils.data.Dataset):
    """Seeded noise images made when read (nothing held): item i is a pure function of i."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.targets = torch.arange(n) % CLASSES  # labels without generating any image
        self.fingerprint = f"synthetic-noise-v1-{n}"  # identity without hashing every sample

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.rand(SHAPE, generator=torch.Generator().manual_seed(i)), int(self.targets[i])


def synthetic(n: str = "1000") -> Synthetic:
    return Synthetic(int(n))


def tiny_model() -> nn.Module:
    """Teacher and student: a strided conv, pooled, then a linear head (cheap on 32 x 32)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 4, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, CLASSES))  # fmt: skip
    model.input_shape = SHAPE
    return model


PROBE = r"""
import ctypes, platform


class MallInfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


def mmapped_after_growth():
    # Free an 8 MiB block (mmap'd), then count the mmap'd blocks a 4 MiB malloc adds: 0 when glibc's
    # dynamic threshold rose to 8 MiB (the block comes from the heap, whose holes are kept), 1 when
    # the threshold is fixed (the block is returned to the system when freed); None off glibc.
    if platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.free(libc.malloc(8 << 20))
    before = libc.mallinfo2().hblks
    block = libc.malloc(4 << 20)
    added = libc.mallinfo2().hblks - before
    libc.free(block)
    return added
"""

SCRIPT = (
    PROBE
    + r"""
import json, sys
import torch
torch.set_num_threads(1)
from kd.core.data import open_source
from kd.precompute import precompute
from kd.student_trainer.sources import LocalSource, parse_source
from kd.student_trainer.train import Hooks, TrainConfig, train_student
from kd.teacher_server.loading import load_teacher
import test_memory_flat as here

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

n, out = int(sys.argv[1]), sys.argv[2]
marks = {}
def mark(stage, done):
    if done >= 2048 and stage + "_2k" not in marks:
        marks[stage + "_2k"] = rss_mb()
    marks[stage + "_end"] = rss_mb()

src = open_source(f"module:test_memory_flat:synthetic?n={n}")
torch.manual_seed(0)
teacher = LocalSource(load_teacher("tiny", "test_memory_flat:tiny_model"))
report = precompute(src, teacher, out, batch_size=256, workers=0, progress=False,
                    on_batch=lambda done: mark("precompute", done))
mmapped = mmapped_after_growth()  # 1: precompute fixed the threshold
val = open_source("module:test_memory_flat:synthetic?n=256&name=val")
cache = parse_source(f"cache:{out}", dataset_id=src.dataset_id)
config = TrainConfig(method="kd", epochs=1, batch_size=256, workers=0)
hooks = Hooks(on_step=lambda epoch, step, loss, lr: mark("train", (step + 1) * 256))
train_student(here.tiny_model(), src, val, config, source=cache, hooks=hooks)
print(json.dumps({**marks, "written": report.written, "mmapped": mmapped}))
"""
)


def test_precompute_and_training_memory_is_flat_in_the_dataset_size(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
           "KD_CACHE_DIR": str(tmp_path / "kd-cache"), "OMP_NUM_THREADS": "1"}  # fmt: skip
    for name in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES"):  # flat without the user tuning glibc
        env.pop(name, None)
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(N), str(tmp_path / "cache")], env=env,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    marks = json.loads(r.stdout.strip().splitlines()[-1])
    assert marks["written"] == N  # the whole set went through
    # precompute fixed glibc's mmap threshold (kd.precompute.bound_malloc_retention): with the dynamic
    # one, a long run's RSS creeps (measured: main +204 MiB, a worker +107 MiB over 10k JPEGs, resnet8x4)
    assert marks["mmapped"] == (1 if platform.libc_ver()[0] == "glibc" else None)
    assert DATA_MB > 7 * ALLOWED_GROWTH_MB  # holding the data would fail by far
    for stage in ("precompute", "train"):
        growth = marks[f"{stage}_end"] - marks[f"{stage}_2k"]
        assert growth < ALLOWED_GROWTH_MB, (stage, marks)


MALLOC_SCRIPT = (
    PROBE
    + r"""
import sys
if sys.argv[1] == "bounded":
    from kd.precompute import bound_malloc_retention
    print(bound_malloc_retention(), bound_malloc_retention())
print(mmapped_after_growth())
"""
)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the malloc bound is for glibc")
def test_precompute_bounds_glibc_malloc_retention_without_an_environment_variable() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")}
    lines = {}
    for mode in ("default", "bounded"):
        r = subprocess.run([sys.executable, "-c", MALLOC_SCRIPT, mode], env=env, capture_output=True, text=True,
                           timeout=120)  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        lines[mode] = r.stdout.split()
    assert lines["default"] == ["0"]  # glibc's default: the threshold grew, the block came from the heap
    assert lines["bounded"] == ["True", "True", "1"]
    # a user's own threshold is theirs
    r = subprocess.run([sys.executable, "-c", MALLOC_SCRIPT, "bounded"], env={**env, "MALLOC_MMAP_THRESHOLD_": "65536"},
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0 and r.stdout.split() == ["False", "False", "1"], r.stderr[-2000:]
