"""``kd bench cache``: what each cache codec costs and what it gives, in one run.

Absolute times depend on the machine and its neighbours, so every speed is
reported as a ratio of two things measured in the same run, interleaved.

* **Bytes per sample** of every codec at 1000 and 32000 classes
  (``cache.codecs.bytes_per_sample``: payload + 8 bytes of header and crc),
  and the ratio to fp32.
* **KL error** against the exact fp32 targets: teacher-like logits at
  C = 1000 (seeded; N(0, 1) * 2 plus a few large entries, so the top class
  holds most of the mass) go through each codec's encode/decode, and
  KL(p_t || p_s) for random student logits is computed from the decoded
  targets (``soft_kl`` on dense logits, ``kd.core.targets.sparse_kl`` on
  ``SparseTargets``, never densified) at T = 1 and T = 4. Reported: the mean
  over rows of |KL_codec - KL_exact| / KL_exact. ``sample:K`` is sampled at
  the temperature it is evaluated at; its relative bias (the mean of the
  batch KL over many independent draws against the exact value, with the
  standard error of that mean) shows it is unbiased, and its per-draw spread
  shows the variance it pays instead.
* **Student accuracy** on the bundled digits data: a teacher (``digits_teacher``,
  CE) is trained, a cache is precomputed per codec (``kd.precompute`` with a
  ``LocalSource``), and ``digits_student`` is trained with method ``kd`` (T = 4)
  from each cache on a small labelled subset over several seeds, next to
  fp32 KD and CE only (the demo's setting). Digits has 10 classes, so top-k
  and sample codecs need K < 10 to differ from full logits: the accuracy part
  uses ``topk:3``, ``sample:4`` and ``sample:8`` (sampled at T = 4), while the
  byte and KL tables use K = 10/20 and K = 12/32 at C = 1000 and 32000.
* **Views**: the digits augmentation (a seeded shift by up to one pixel) with
  V = 4 precomputed views per sample against V = 1 (plain samples), plus the
  augmented student fed the plain sample's targets (what a V = 1 cache gives
  a trainer that augments) and CE with and without augmentation.
* **Read rate**: random reads of fp16 records at 1000 classes (2008 bytes)
  through ``CacheReader.get`` (checksum + decode to float32) and
  ``read_raw`` (checksum only), batches of 256, against ``txn.get`` of the
  same keys in a raw LMDB environment holding values of the same size.
* **Precompute efficiency**: samples/s of ``kd.precompute.precompute`` with a
  ``LocalSource`` / samples/s of the same teacher's bare forward loop at the
  same batch size over the same (generated) inputs, same torch threads.
* **Step time**: median time of a student training step (forward, backward,
  Adam) reading its targets from the cache / with no teacher (CE) / with the
  teacher run in-process, in interleaved blocks; at 1000 classes (the bench
  teacher and a 5x smaller student) and on digits (the tiny digits student).
* **The CRD/CIFAR-100 pair**: precompute efficiency and step time again with
  the canonical pair of ``kd.student_trainer.zoo`` (teacher ``resnet32x4``,
  student ``resnet8x4``, 100 classes) on generated 3x32x32 inputs, where the
  forward passes are convolutions that cost far more than writing or reading
  100-class targets (the MLP pair above is the opposite regime).
"""

from __future__ import annotations

import copy
import importlib
import math
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from kd.bench import report_console
from kd.cache import CacheMeta, CacheReader, CacheWriter
from kd.cache.codecs import LowRankBasis, SampleCodec, bytes_per_sample, get_codec
from kd.cache.store import record_key
from kd.core.data import Dataset, load_dataset
from kd.core.targets import SparseTargets, sparse_kl
from kd.demo import train_digits_teacher
from kd.models import MLP, digits_student
from kd.precompute import precompute
from kd.student_trainer.losses import get_method
from kd.student_trainer.sources import Batch, CacheSource, LocalSource, SoftTargetSource
from kd.student_trainer.train import TrainConfig, seed_everything, train_student
from kd.teacher_server.loading import Teacher, fingerprint, load_teacher

console = Console(stderr=True, soft_wrap=True)  # each line whole in a log, as kd.cli's

# Byte and KL tables (C = 1000 and 32000).
CODECS = ("fp32", "fp16", "bf16", "int8", "q8", "q4", "topk:3", "topk:10", "topk:20", "sample:4", "sample:8",
          "sample:12", "sample:32", "rand:74b3", "rand:128")  # fmt: skip
# Student accuracy on digits (10 classes: K < 10).
ACC_CODECS = ("fp32", "fp16", "bf16", "int8", "topk:3", "sample:4", "sample:8")
BYTES_GOAL = 1 / 50


@dataclass(frozen=True)
class CacheBenchSettings:
    quick: bool = False
    seeds: int = 3
    epochs: int = 300  # student epochs on the labelled subset
    labeled: int = 100
    teacher_epochs: int = 40
    temperature: float = 4.0  # KD temperature; sample:K caches are drawn at it
    views: int = 4
    kl_classes: int = 1000
    kl_rows: int = 256
    kl_draws: int = 200  # independent sample:K encodings for the bias check
    read_records: int = 20000  # records in each environment
    read_reads: int = 100_000  # records read per side and round
    read_batch: int = 256
    read_rounds: int = 5
    precompute_samples: int = 4096
    precompute_batch: int = 256
    precompute_rounds: int = 5
    precompute_codec: str = "fp16"
    step_batch: int = 128
    step_block: int = 8  # steps per mode per block (the first of each block is not counted)
    step_rounds: int = 5
    digits_step_block: int = 50
    digits_step_rounds: int = 5
    threads: int = 0  # 0: torch's default
    teacher: str = "kd.models:bench_teacher"
    # The canonical CRD/CIFAR-100 pair on generated 3x32x32 inputs (untrained weights: speed only).
    crd_teacher: str = "kd.student_trainer.zoo:resnet32x4"
    crd_student: str = "kd.student_trainer.zoo:resnet8x4"
    crd_samples: int = 384
    crd_precompute_batch: int = 64
    crd_precompute_rounds: int = 3
    crd_step_batch: int = 32
    crd_step_block: int = 4
    crd_step_rounds: int = 3
    # The many-class task (generated): where a <= 1/50 codec has to prove itself.
    many_classes: int = 1000
    many_train_per_class: int = 10
    many_test_per_class: int = 5
    many_labeled_per_class: int = 3
    many_teacher_epochs: int = 15
    many_epochs: int = 40

    @classmethod
    def make(cls, quick: bool = False, **overrides: Any) -> CacheBenchSettings:
        base = cls()
        if quick:
            base = replace(
                base,
                quick=True,
                seeds=1,
                epochs=15,
                teacher_epochs=3,
                kl_rows=32,
                kl_draws=10,
                read_records=1024,
                read_reads=2048,
                read_rounds=1,
                precompute_samples=256,
                precompute_batch=128,
                precompute_rounds=1,
                step_batch=64,
                step_block=3,
                step_rounds=1,
                digits_step_block=10,
                digits_step_rounds=1,
                many_classes=100,
                many_teacher_epochs=3,
                many_epochs=3,
                crd_samples=8,  # the resnet32x4 teacher's forwards were most of a --quick run's CPU time
                crd_precompute_batch=8,
                crd_precompute_rounds=1,
                crd_step_batch=2,
                crd_step_block=2,
                crd_step_rounds=1,
            )
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else math.nan


def _std(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _slug(codec: str) -> str:
    return codec.replace(":", "-")


# ---------------------------------------------------------------- bytes and KL


def codec_bytes(codecs: tuple[str, ...] = CODECS) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in codecs:
        row: dict[str, Any] = {}
        for c in (10, 1000, 32000):
            try:
                row[f"bytes_{c}"] = bytes_per_sample(name, c)
            except ValueError:  # topk:K with K > C
                row[f"bytes_{c}"] = None
        for c in (1000, 32000):
            row[f"ratio_to_fp32_{c}"] = row[f"bytes_{c}"] / bytes_per_sample("fp32", c)
        out[name] = row
    return out


def teacher_like_logits(rows: int, classes: int, gen: torch.Generator) -> torch.Tensor:
    """Peaked, like a trained classifier's: N(0, 1) * 2, one class +8..14 and four +4..10."""
    z = torch.randn(rows, classes, generator=gen) * 2.0
    for lo, hi, n in ((8.0, 14.0, 1), (4.0, 10.0, 4)):
        cls = torch.randint(0, classes, (rows, n), generator=gen)
        z.scatter_add_(1, cls, lo + (hi - lo) * torch.rand(rows, n, generator=gen))
    return z


def _kl_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(p_t || p_s) per row, float64."""
    log_q = F.log_softmax(student.double() / temperature, dim=1)
    log_p = F.log_softmax(teacher.double() / temperature, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def _codec(name: str, temperature: float, seed: int = 0):
    codec = get_codec(name, temperature)
    if isinstance(codec, SampleCodec):
        codec = replace(codec, seed=seed)
    return codec


def _decoded(name: str, z: torch.Tensor, temperature: float, seed: int = 0) -> torch.Tensor | SparseTargets:
    codec = _codec(name, temperature, seed)
    keys = np.stack([np.arange(len(z)), np.zeros(len(z), dtype=np.int64)], axis=1)  # (index, view) of each row
    return codec.decode_targets(codec.encode(z, keys), z.shape[1], keys)


def _codec_kl_rows(targets: torch.Tensor | SparseTargets, student: torch.Tensor, temperature: float) -> torch.Tensor:
    if isinstance(targets, SparseTargets):
        return torch.stack(
            [sparse_kl(student[i : i + 1], targets[i : i + 1], temperature) for i in range(len(targets))]
        )
    return _kl_rows(student, targets, temperature)


def kl_errors(s: CacheBenchSettings, codecs: tuple[str, ...] = CODECS) -> dict[str, dict[str, float]]:
    gen = torch.Generator().manual_seed(0)
    zt = teacher_like_logits(s.kl_rows, s.kl_classes, gen)
    # A student part-way through training: correlated with the teacher, far from equal.
    zs = (0.5 * zt + 2.0 * torch.randn(zt.shape, generator=gen)).double()
    out: dict[str, dict[str, float]] = {name: {} for name in codecs}
    for t in (1.0, 4.0):
        tag = f"T{t:g}"
        exact = _kl_rows(zs, zt, t)
        for name in codecs:
            est = _codec_kl_rows(_decoded(name, zt, t), zs, t)
            out[name][f"kl_rel_error_{tag}"] = float(((est - exact).abs() / exact).mean())
            # What a batch-mean loss sees: the error of the mean over the rows.
            out[name][f"kl_batch_rel_error_{tag}"] = float((est.mean() - exact.mean()).abs() / exact.mean())
            if name.startswith("sample:"):
                # Independent draws: the batch-mean estimate over many draws against the exact batch KL.
                draws = torch.stack(
                    [sparse_kl(zs, _decoded(name, zt, t, seed=d), t) for d in range(1, s.kl_draws + 1)]
                ).double()
                ex = float(exact.mean())
                out[name][f"sample_bias_rel_{tag}"] = (float(draws.mean()) - ex) / ex
                out[name][f"sample_bias_stderr_rel_{tag}"] = float(draws.std()) / math.sqrt(len(draws)) / ex
                out[name][f"sample_batch_rel_std_{tag}"] = float(draws.std()) / ex
    return out


# ---------------------------------------------------------------- read rate


def read_rate(s: CacheBenchSettings, root: Path) -> dict[str, Any]:
    n, classes, codec = s.read_records, 1000, "fp16"
    meta = CacheMeta(teacher_fingerprint="bench-read", dataset_id="bench-read", dataset_size=n, codec=codec,
                     num_classes=classes)  # fmt: skip
    cache_path, raw_path = root / "read-cache", root / "read-raw"
    gen = torch.Generator().manual_seed(1)
    with CacheWriter(cache_path, meta) as w:
        for start in range(0, n, 4096):
            idx = list(range(start, min(n, start + 4096)))
            w.put(idx, torch.randn(len(idx), classes, generator=gen) * 3)
    reader = CacheReader(cache_path)
    value_bytes = bytes_per_sample(codec, classes)
    keys = [record_key(meta.record_prefix, i, 0) for i in range(n)]
    rng = np.random.default_rng(2)
    env = lmdb.open(str(raw_path), map_size=max(64 << 20, 2 * n * (value_bytes + 128)), subdir=True,
                    readahead=False)  # fmt: skip
    with env.begin(write=True) as txn:
        for k in keys:
            txn.put(k, rng.bytes(value_bytes))
    env.close()
    # The same flags CacheReader opens with.
    env = lmdb.open(str(raw_path), readonly=True, lock=True, readahead=False, max_readers=1024, subdir=True)

    batches = [rng.integers(0, n, s.read_batch).tolist() for _ in range(max(1, s.read_reads // s.read_batch))]
    total = len(batches) * s.read_batch

    def cache_get() -> None:
        for b in batches:
            reader.get(b)

    def cache_raw() -> None:
        for b in batches:
            reader.read_raw(b)

    def raw() -> None:
        for b in batches:
            with env.begin(buffers=False) as txn:
                for i in b:
                    txn.get(keys[i])

    sides: dict[str, Callable[[], None]] = {"cache_get": cache_get, "cache_read_raw": cache_raw, "raw_lmdb": raw}
    for fn in sides.values():  # warm the page cache and the code paths
        fn()
    rates: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(s.read_rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for name in order:
            t0 = time.perf_counter()
            sides[name]()
            rates[name].append(total / (time.perf_counter() - t0))
    env.close()
    ratios = [c / w for c, w in zip(rates["cache_get"], rates["raw_lmdb"])]
    ratios_raw = [c / w for c, w in zip(rates["cache_read_raw"], rates["raw_lmdb"])]
    return {
        "cache_records_per_s": float(np.median(rates["cache_get"])),
        "cache_read_raw_records_per_s": float(np.median(rates["cache_read_raw"])),
        "raw_lmdb_records_per_s": float(np.median(rates["raw_lmdb"])),
        "ratio": float(np.median(ratios)),
        "ratio_read_raw": float(np.median(ratios_raw)),
        "ratio_rounds": ratios,
        "records": n,
        "record_bytes": value_bytes,
        "codec": codec,
        "num_classes": classes,
        "batch": s.read_batch,
        "reads_per_round": total,
    }


# ---------------------------------------------------------------- precompute efficiency and step time


def _generated_dataset(n: int, dim: int, classes: int) -> Dataset:
    gen = torch.Generator().manual_seed(3)
    return Dataset("bench", "train", torch.randn(n, dim, generator=gen), torch.randint(0, classes, (n,), generator=gen),
                   classes)  # fmt: skip


def precompute_efficiency(
    s: CacheBenchSettings,
    root: Path,
    teacher: Teacher,
    data: Dataset,
    *,
    batch: int | None = None,
    rounds: int | None = None,
) -> dict[str, Any]:
    """``batch`` and ``rounds`` default to ``s.precompute_batch`` and ``s.precompute_rounds``."""
    source = LocalSource(teacher)
    b = s.precompute_batch if batch is None else batch
    n_rounds = s.precompute_rounds if rounds is None else rounds
    model, n = teacher.model, len(data)

    def bare() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for start in range(0, n, b):
                model(data.inputs[start : start + b])
        return n / (time.perf_counter() - t0)

    def pre(r: int) -> float:
        out = root / f"precompute-{r}"
        t0 = time.perf_counter()
        report = precompute(data, source, out, codec=s.precompute_codec, batch_size=b, progress=False)
        sps = n / (time.perf_counter() - t0)
        assert report.written == n
        return sps

    with torch.inference_mode():  # warm-up
        for start in range(0, min(n, 2 * b), b):
            model(data.inputs[start : start + b])
    bare_sps: list[float] = []
    pre_sps: list[float] = []
    for r in range(n_rounds):
        if r % 2 == 0:
            bare_sps.append(bare())
            pre_sps.append(pre(r))
        else:
            pre_sps.append(pre(r))
            bare_sps.append(bare())
        if r < n_rounds - 1:
            shutil.rmtree(root / f"precompute-{r}")
    last = root / f"precompute-{n_rounds - 1}"
    ratios = [p / q for p, q in zip(pre_sps, bare_sps)]
    return {
        "precompute_samples_per_s": float(np.median(pre_sps)),
        "bare_forward_samples_per_s": float(np.median(bare_sps)),
        "ratio": float(np.median(ratios)),
        "ratio_rounds": ratios,
        "samples": n,
        "batch": b,
        "codec": s.precompute_codec,
        "cache": str(last),
    }


class _MemoryTargets(SoftTargetSource):
    """Every target already decoded in RAM: the KD step without reading a cache."""

    name = "memory"

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table
        self.num_classes = int(table.shape[1])

    def targets(self, indices, inputs, views=None):
        return self.table[indices]


def step_times(
    student: torch.nn.Module,
    data: Dataset,
    cache: CacheSource,
    local: SoftTargetSource,
    *,
    batch: int,
    block: int,
    rounds: int,
    temperature: float,
) -> dict[str, Any]:
    """Median seconds of one training step per mode, modes run in interleaved blocks.

    ``memory_targets`` (the cache's targets preloaded in RAM) splits the cache's cost into
    the KD loss's own cost (memory / no teacher) and the reads (cache / memory). Steps run
    as in the trainer: targets through ``iter_targets`` (the cache reads ahead)."""
    kd, ce = get_method("kd"), get_method("ce")
    memory = _MemoryTargets(cache.reader.get(range(len(data))))
    modes: dict[str, tuple[SoftTargetSource | None, Any]] = {
        "no_teacher": (None, ce),
        "memory_targets": (memory, kd),
        "cache": (cache, kd),
        "inprocess_teacher": (local, kd),
    }
    students = {m: copy.deepcopy(student) for m in modes}
    opts = {m: torch.optim.Adam(students[m].parameters(), lr=1e-3) for m in modes}
    gen = torch.Generator().manual_seed(4)
    times: dict[str, list[float]] = {m: [] for m in modes}

    def block_times(mode: str, n: int) -> list[float]:
        """``n`` steps as the trainer runs them: targets come through ``source.iter_targets``
        (the cache source reads ahead in a background thread while the student steps)."""
        source, method = modes[mode]
        model, opt = students[mode], opts[mode]
        batches = [torch.randint(0, len(data), (batch,), generator=gen) for _ in range(n)]
        plain = (Batch(idx, data.inputs[idx], data.labels[idx]) for idx in batches)
        pairs = source.iter_targets(plain) if source is not None else ((b, None) for b in plain)
        out = []
        t0 = time.perf_counter()
        for b, targets in pairs:
            loss = method(model(b.inputs), targets, b.labels, **({"temperature": temperature} if source else {}))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            t1 = time.perf_counter()
            out.append(t1 - t0)
            t0 = t1
        return out

    names = list(modes)
    for m in names:  # warm-up
        block_times(m, 2)
    for r in range(rounds):
        for m in names[r % len(names) :] + names[: r % len(names)]:
            t = block_times(m, block)
            times[m].extend(t[1:] if block > 1 else t)
    med = {m: float(np.median(v)) for m, v in times.items()}
    return {
        "cache_over_no_teacher": med["cache"] / med["no_teacher"],
        "cache_over_inprocess_teacher": med["cache"] / med["inprocess_teacher"],
        "inprocess_over_cache": med["inprocess_teacher"] / med["cache"],
        "memory_targets_over_no_teacher": med["memory_targets"] / med["no_teacher"],
        "cache_over_memory_targets": med["cache"] / med["memory_targets"],
        "median_step_ms": {m: v * 1e3 for m, v in med.items()},
        "steps_per_mode": len(times["cache"]),
        "batch": batch,
    }


def crd_part(s: CacheBenchSettings, root: Path) -> dict[str, Any]:
    """Precompute efficiency and step times with the CRD/CIFAR-100 pair (resnet32x4 -> resnet8x4)
    on generated 3x32x32 inputs: the same measurements as for the MLP pair, convolutional models."""
    teacher = load_teacher("crd", s.crd_teacher)
    data = _generated_dataset(s.crd_samples, int(np.prod(teacher.input_shape)), teacher.num_classes)
    data = replace(data, inputs=data.inputs.reshape(len(data), *teacher.input_shape))
    pre = precompute_efficiency(s, root / "crd", teacher, data, batch=s.crd_precompute_batch,
                                rounds=s.crd_precompute_rounds)  # fmt: skip
    torch.manual_seed(6)
    module, _, attr = s.crd_student.partition(":")
    student = getattr(importlib.import_module(module), attr)(num_classes=teacher.num_classes)  # trainable
    step = step_times(
        student,
        data,
        CacheSource(pre.pop("cache"), dataset_id=data.dataset_id),
        LocalSource(teacher),
        batch=s.crd_step_batch,
        block=s.crd_step_block,
        rounds=s.crd_step_rounds,
        temperature=s.temperature,
    )
    step["student_parameters"] = sum(p.numel() for p in student.parameters())
    step["teacher_parameters"] = sum(p.numel() for p in teacher.model.parameters())
    step["student"] = s.crd_student
    step["codec"] = s.precompute_codec
    step["num_classes"] = teacher.num_classes
    return {
        "teacher": s.crd_teacher,
        "student": s.crd_student,
        "input_shape": list(teacher.input_shape),
        "num_classes": teacher.num_classes,
        "precompute": pre,
        "step": step,
    }


# ---------------------------------------------------------------- digits: students per codec, views


class _PlainSampleTargets(SoftTargetSource):
    """Augmented steps fed the plain sample's targets: what a V = 1 cache gives a trainer that augments."""

    name = "cache-unmatched"

    def __init__(self, inner: CacheSource, views: int) -> None:
        self.inner = inner
        self.views = views
        self.fingerprint = inner.fingerprint
        self.num_classes = inner.num_classes
        self.teacher_name = inner.teacher_name

    def targets(self, indices, inputs, views=None):
        return self.inner.targets(indices, inputs, None)

    def logit_offsets_lost(self) -> str | None:
        return self.inner.logit_offsets_lost()

    def sparse_targets(self) -> str | None:
        return self.inner.sparse_targets()


def _students(
    s: CacheBenchSettings, train: Dataset, test: Dataset, method: str, source: SoftTargetSource | None, views: int = 1
) -> list[float]:
    accs = []
    for seed in range(s.seeds):
        subset = torch.randperm(len(train), generator=torch.Generator().manual_seed(1000 + seed))[: s.labeled]
        seed_everything(seed)
        config = TrainConfig(
            method=method,
            epochs=s.epochs,
            seed=seed,
            views=views,
            method_options={"temperature": s.temperature} if method == "kd" else {},
        )
        accs.append(train_student(digits_student(), train, test, config, source=source, subset=subset).test_acc)
    return accs


def _acc(accs: list[float], ref: list[float] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"acc_mean": _mean(accs), "acc_std": _std(accs), "acc_per_seed": accs}
    if ref is not None:
        deltas = [a - b for a, b in zip(accs, ref)]
        out["delta_vs_fp32_mean"] = _mean(deltas)
        out["delta_vs_fp32_std"] = _std(deltas)
        # Within noise: the mean change is no larger than the seed-to-seed spread of either.
        out["within_noise"] = abs(_mean(deltas)) <= max(_std(accs), _std(ref), 1e-9)
    return out


def digits_part(s: CacheBenchSettings, root: Path) -> dict[str, Any]:

    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    teacher, teacher_acc = train_digits_teacher(train, test, root / "digits-teacher.safetensors",
                                                epochs=s.teacher_epochs)  # fmt: skip
    local = LocalSource(teacher)
    console.print(f"  digits teacher: test acc {teacher_acc:.4f}", highlight=False)

    caches: dict[str, Path] = {}
    precompute_s: dict[str, float] = {}
    for codec in ACC_CODECS:
        caches[codec] = root / "digits" / _slug(codec)
        rep = precompute(train, local, caches[codec], codec=codec, progress=False,
                         temperature=s.temperature if codec.startswith(("sample:", "topk:")) else None)  # fmt: skip
        precompute_s[codec] = rep.seconds
    v_path = root / "digits" / f"fp32-v{s.views}"
    rep_v = precompute(train, local, v_path, codec="fp32", views=s.views, progress=False)

    ce = _students(s, train, test, "ce", None)
    console.print(f"  ce only: {_mean(ce):.4f} ± {_std(ce):.4f}", highlight=False)
    per_codec: dict[str, list[float]] = {}
    for codec in ACC_CODECS:
        per_codec[codec] = _students(s, train, test, "kd", CacheSource(str(caches[codec]), dataset_id=train.dataset_id))
        console.print(f"  kd from {codec}: {_mean(per_codec[codec]):.4f} ± {_std(per_codec[codec]):.4f}",
                      highlight=False)  # fmt: skip
    fp32 = per_codec["fp32"]

    ce_aug = _students(s, train, test, "ce", None, views=s.views)
    v_consistent = _students(s, train, test, "kd", CacheSource(str(v_path), dataset_id=train.dataset_id), s.views)
    unmatched = _PlainSampleTargets(CacheSource(str(caches["fp32"]), dataset_id=train.dataset_id), s.views)
    v_unmatched = _students(s, train, test, "kd", unmatched, s.views)
    console.print(f"  views: V=1 {_mean(fp32):.4f}, V={s.views} {_mean(v_consistent):.4f}, "
                  f"augmented + plain targets {_mean(v_unmatched):.4f}", highlight=False)  # fmt: skip
    fp32_b = bytes_per_sample("fp32", train.num_classes)
    v = s.views
    views = {
        "views": v,
        "v1_acc": _mean(fp32),
        "v1_acc_std": _std(fp32),
        f"v{v}_acc": _mean(v_consistent),
        f"v{v}_acc_std": _std(v_consistent),
        "vn_acc": _mean(v_consistent),
        "vn_acc_std": _std(v_consistent),
        "augmented_plain_targets_acc": _mean(v_unmatched),
        "augmented_plain_targets_acc_std": _std(v_unmatched),
        "ce_v1_acc": _mean(ce),
        "ce_v1_acc_std": _std(ce),
        "ce_augmented_acc": _mean(ce_aug),
        "ce_augmented_acc_std": _std(ce_aug),
        "per_seed": {
            "v1": fp32,
            f"v{v}": v_consistent,
            "augmented_plain_targets": v_unmatched,
            "ce_v1": ce,
            "ce_augmented": ce_aug,
        },  # fmt: skip
        "v1_bytes_per_sample": fp32_b,
        f"v{v}_bytes_per_sample": fp32_b * v,
        "storage_ratio": v,
        "v1_precompute_seconds": precompute_s["fp32"],
        f"v{v}_precompute_seconds": rep_v.seconds,
        "precompute_seconds_ratio": rep_v.seconds / precompute_s["fp32"],
        "augmentation": train.augmentation,
    }
    steps = step_times(
        digits_student(),
        train,
        CacheSource(str(caches["fp32"]), dataset_id=train.dataset_id),
        local,
        batch=32,
        block=s.digits_step_block,
        rounds=s.digits_step_rounds,
        temperature=s.temperature,
    )
    return {
        "teacher_acc": teacher_acc,
        "ce": _acc(ce),
        "codecs": {c: _acc(a, None if c == "fp32" else fp32) for c, a in per_codec.items()},
        "views": views,
        "step": steps,
        "precompute_seconds": precompute_s,
    }


# ---------------------------------------------------------------- many classes

MANY_CODECS = ("fp32", "int8", "q4", "topk:10", "sample:12", "rand:74b3", "rand:128")
# pca:K needs its basis, fitted on the first records; the cache store does not hold one yet, so
# these are encoded and decoded in memory here (same records, bytes and students as a cache).
MANY_BASIS_CODECS = ("pca:64b4", "pca:64b3")
BASIS_RECORDS = 1024  # the first records the basis is fitted on
# sample:K is drawn and trained at T = 1 (Anshumann et al. 2025); the other codecs at the KD temperature.
SAMPLE_T = 1.0


def _cluster_split(classes: int, per_class: int, means: torch.Tensor, gen: torch.Generator, split: str) -> Dataset:
    labels = torch.arange(classes).repeat_interleave(per_class)
    # Wide clusters that overlap: the teacher's soft targets carry real class similarity.
    inputs = means[labels] + 1.2 * torch.randn(len(labels), means.shape[1], generator=gen)
    return Dataset("clusters", split, inputs.float(), labels, classes)


def _fraction(acc: float, ce: float, fp32: float) -> float:
    """How far from CE (0) to fp32 KD (1) an accuracy goes; NaN when the two are equal."""
    return (acc - ce) / (fp32 - ce) if fp32 != ce else math.nan


def many_class_part(s: CacheBenchSettings, root: Path) -> dict[str, Any]:
    """Student accuracy per codec on a generated C-class task (Gaussian clusters in 64-d),
    where K = 10-12 is ~1/100 of the classes, as it would be at C = 1000."""
    c = s.many_classes
    gen = torch.Generator().manual_seed(11)
    means = torch.randn(c, 64, generator=gen)
    train = _cluster_split(c, s.many_train_per_class, means, gen, "train")
    test = _cluster_split(c, s.many_test_per_class, means, gen, "test")
    seed_everything(0)
    teacher_model = MLP([64, 1024, c])
    teacher_cfg = TrainConfig(method="ce", epochs=s.many_teacher_epochs, lr=1e-3, batch_size=128)
    teacher_acc = train_student(teacher_model, train, test, teacher_cfg).test_acc
    teacher = Teacher("clusters", teacher_model.eval(), fingerprint(teacher_model), (64,), torch.float32, c,
                      torch.device("cpu"), "bench")  # fmt: skip
    local = LocalSource(teacher)
    labeled = s.many_labeled_per_class * c

    def students(method: str, source: SoftTargetSource | None, temperature: float = s.temperature) -> list[float]:
        accs = []
        for seed in range(s.seeds):
            subset = torch.randperm(len(train), generator=torch.Generator().manual_seed(2000 + seed))[:labeled]
            seed_everything(seed)
            cfg = TrainConfig(method=method, epochs=s.many_epochs, seed=seed, batch_size=64,
                              method_options={"temperature": temperature} if method == "kd" else {})  # fmt: skip
            accs.append(train_student(MLP([64, 128, c]), train, test, cfg, source=source, subset=subset).test_acc)
        return accs

    ce = students("ce", None)
    per_codec: dict[str, list[float]] = {}
    for codec in MANY_CODECS:
        try:
            get_codec(codec).record_bytes(c)
        except ValueError:  # rand:128 at --quick's 100 classes
            continue
        path = root / "clusters" / _slug(codec)
        t = SAMPLE_T if codec.startswith("sample:") else s.temperature
        precompute(train, local, path, codec=codec, progress=False, temperature=t if codec != "fp32" else None)
        per_codec[codec] = students("kd", CacheSource(str(path), dataset_id=train.dataset_id), t)
        console.print(f"  {c} classes, kd from {codec}: {_mean(per_codec[codec]):.4f} ± {_std(per_codec[codec]):.4f}",
                      highlight=False)  # fmt: skip
    with torch.no_grad():
        z = teacher_model(train.inputs).float()
    basis_bytes: dict[str, int] = {}
    for codec_name in MANY_BASIS_CODECS:
        codec = get_codec(codec_name)
        if codec.k > min(c, BASIS_RECORDS, len(train)):
            continue
        basis = LowRankBasis.fit(z[:BASIS_RECORDS], codec.k)
        codec = codec.with_basis(basis)
        basis_bytes[codec_name] = len(basis.to_bytes())
        decoded = _MemoryTargets(codec.decode(codec.encode(z), c))
        per_codec[codec_name] = students("kd", decoded)
        console.print(f"  {c} classes, kd from {codec_name} (in memory, basis fitted on the first {BASIS_RECORDS} "
                      f"records): {_mean(per_codec[codec_name]):.4f} ± {_std(per_codec[codec_name]):.4f}",
                      highlight=False)  # fmt: skip
    fp32 = per_codec["fp32"]
    return {
        "classes": c,
        "train_samples": len(train),
        # pca:K: the basis (stored once per cache) in bytes; per record it adds basis / records.
        "basis_bytes": basis_bytes,
        "labeled_samples": labeled,
        "test_samples": len(test),
        "teacher_acc": teacher_acc,
        "ce": _acc(ce),
        "codecs": {
            codec: {
                **_acc(a, None if codec == "fp32" else fp32),
                # The share of the way from CE to fp32 KD this codec's students go (1 = fp32 KD, 0 = CE).
                "fraction_ce_to_fp32": _fraction(_mean(a), _mean(ce), _mean(fp32)),
                "ratio_to_fp16": bytes_per_sample(codec, c) / bytes_per_sample("fp16", c),
                "bytes": bytes_per_sample(codec, c),
                "ratio_to_fp32": bytes_per_sample(codec, c) / bytes_per_sample("fp32", c),
            }
            for codec, a in per_codec.items()
        },
    }


# ---------------------------------------------------------------- the whole bench


def run_bench(s: CacheBenchSettings) -> dict[str, Any]:
    t_start = time.perf_counter()
    if s.threads:
        torch.set_num_threads(s.threads)
    threads = torch.get_num_threads()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kd-bench-cache-") as tmp:
        root = Path(tmp)
        console.print("bytes per sample and KL error at C = 1000 ...", highlight=False)
        codecs = codec_bytes()
        for name, errs in kl_errors(s).items():
            codecs[name].update(errs)
        console.print("read rate: cache vs raw LMDB ...", highlight=False)
        results["read"] = read_rate(s, root)

        console.print(f"precompute efficiency with {s.teacher} ...", highlight=False)
        teacher = load_teacher("bench", s.teacher)
        dim = int(np.prod(teacher.input_shape))
        data = _generated_dataset(s.precompute_samples, dim, teacher.num_classes)
        if tuple(teacher.input_shape) != (dim,):
            data = replace(data, inputs=data.inputs.reshape(len(data), *teacher.input_shape))
        pre = precompute_efficiency(s, root, teacher, data)
        results["precompute"] = pre

        console.print("student step time: cache vs no teacher vs in-process teacher ...", highlight=False)
        torch.manual_seed(5)
        hidden = 1024
        student = MLP([dim, hidden, teacher.num_classes])
        student.input_shape = tuple(teacher.input_shape)
        if tuple(teacher.input_shape) != (dim,):
            student = torch.nn.Sequential(torch.nn.Flatten(), student)
        step = step_times(
            student,
            data,
            CacheSource(pre.pop("cache"), dataset_id=data.dataset_id),
            LocalSource(teacher),
            batch=s.step_batch,
            block=s.step_block,
            rounds=s.step_rounds,
            temperature=s.temperature,
        )
        step["student_parameters"] = sum(p.numel() for p in student.parameters())
        step["teacher_parameters"] = sum(p.numel() for p in teacher.model.parameters())
        step["student"] = f"MLP {[dim, hidden, teacher.num_classes]}"
        step["codec"] = s.precompute_codec
        step["num_classes"] = teacher.num_classes

        console.print(f"CRD pair: precompute efficiency and step time, {s.crd_teacher} -> {s.crd_student} ...",
                      highlight=False)  # fmt: skip
        crd = crd_part(s, root)

        console.print(
            f"digits: teacher, {len(ACC_CODECS)} caches, students over {s.seeds} seed(s) x {s.epochs} epochs ...",
            highlight=False,
        )
        digits = digits_part(s, root)
        console.print(f"{s.many_classes}-class generated task: teacher, caches, students ...", highlight=False)
        many = many_class_part(s, root)

    for name, acc in digits["codecs"].items():
        codecs[name].update(
            student_acc_mean=acc["acc_mean"],
            student_acc_std=acc["acc_std"],
            student_acc_per_seed=acc["acc_per_seed"],
            student_acc_delta_vs_fp32=acc.get("delta_vs_fp32_mean", 0.0),
            student_acc_delta_vs_fp32_std=acc.get("delta_vs_fp32_std", 0.0),
            student_within_noise=acc.get("within_noise", True),
        )
    for row in codecs.values():
        row.setdefault("student_acc_mean", None)
        row.setdefault("student_acc_std", None)
    step["digits"] = digits["step"]
    small = [c for c, r in codecs.items() if r["ratio_to_fp32_1000"] <= BYTES_GOAL]
    results.update(
        codecs=codecs,
        student={
            "teacher_acc": digits["teacher_acc"],
            "ce_acc_mean": digits["ce"]["acc_mean"],
            "ce_acc_std": digits["ce"]["acc_std"],
            "ce_acc_per_seed": digits["ce"]["acc_per_seed"],
            "codecs": list(ACC_CODECS),
            "digits_precompute_seconds": digits["precompute_seconds"],
        },  # fmt: skip
        views=digits["views"],
        step=step,
        crd=crd,
        many_classes=many,
        goals={
            "codecs_at_most_1_50_of_fp32_bytes_at_1000": small,
            "many_class_codecs_at_most_1_50_within_noise_of_fp32": [
                name
                for name, row in many["codecs"].items()
                if name != "fp32" and row["ratio_to_fp32"] <= BYTES_GOAL and row["within_noise"]
            ],
            "precompute_ratio_at_least_0_9": pre["ratio"] >= 0.9,
            "step_cache_over_no_teacher_at_most_1_05": step["cache_over_no_teacher"] <= 1.05,
            "crd_precompute_ratio_at_least_0_9": crd["precompute"]["ratio"] >= 0.9,
            "crd_step_cache_over_no_teacher_at_most_1_05": crd["step"]["cache_over_no_teacher"] <= 1.05,
        },
        settings={**asdict(s), "torch_threads": threads},
        torch_threads=threads,
        versions={"python": platform.python_version(), "torch": torch.__version__, "lmdb": lmdb.__version__},
        seconds=round(time.perf_counter() - t_start, 1),
    )
    results["notes"] = notes(results)
    return results


def notes(r: dict[str, Any]) -> list[str]:
    v, c = r["views"], r["codecs"]
    n = v["views"]
    small = ", ".join(r["goals"]["codecs_at_most_1_50_of_fp32_bytes_at_1000"])
    sparse_acc = ", ".join(
        f"{name} {row['student_acc_delta_vs_fp32']:+.3f}"
        for name, row in c.items()
        if row["student_acc_mean"] is not None and ":" in name
    )

    def topk_err(tag: str) -> str:
        return f"{c['topk:10'][f'kl_rel_error_{tag}']:.1%}" if "topk:10" in c else "-"

    return [
        f"At C = 1000 the codecs at <= 1/50 of the fp32 bytes are {small}. On digits (10 classes) top-k and "
        f"sample codecs need K < 10 (topk:3, sample:4, sample:8: K/C of 0.3-0.8); there they change the accuracy "
        f"of fp32 KD by {sparse_acc}. The {r['many_classes']['classes']}-class generated task trains students "
        "from q4, topk:10, sample:12, rand:74b3 and rand:128 caches (K/C ~ 1/100, the regime of C = 1000) next "
        "to fp32 KD, and from pca:64b4 / pca:64b3 (K coefficients in a low-rank basis fitted on the first 1024 "
        "records; encoded in memory here; a cache stores the basis once, about "
        "2 K C bytes); its 'of the way' column is (acc - CE) / (fp32 KD - CE).",
        "Sparse caches are precomputed at the training temperature: topk:K and rand:M then keep the exact "
        "probabilities of their stored classes and the rest mass at T, and the loss compares the stored classes "
        f"plus one rest bucket (topk:10 mean KL error per row against the full KL: T=1 {topk_err('T1')}, T=4 "
        f"{topk_err('T4')}: the KL of the buckets is a lower bound of the full KL, minimised by the teacher). "
        "sample:K stores unique ids with counts, drawn at T = 1 and trained at T = 1 (Anshumann et al. 2025): its "
        "gradient is unbiased; the KL value of the empirical distribution is not (the bias column).",
        f"Views: a V = {n} cache stores {n}x the bytes of a V = 1 cache and costs {n}x its teacher forwards "
        f"(plus the seeded per-sample augmentation, a Python loop: on digits, where the teacher is tiny, it "
        f"dominates the {v['precompute_seconds_ratio']:.1f}x precompute time); training must replay exactly "
        "those views (TrainConfig(views=V)), so augmentation is limited to V fixed variants per sample. In "
        "exchange every augmented input is paired with the teacher's targets for that very input. A V = 1 "
        "cache allows no augmentation, or pairs shifted inputs with the plain sample's targets (the "
        "'KD, augmented' row with the V = 1 cache).",
        "Speeds are ratios of phases measured in the same run, interleaved, on the same torch threads; single "
        "rounds on a shared machine vary, the JSON keeps every round.",
    ]


# ---------------------------------------------------------------- report


def _f(v: float | None, fmt: str = ".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def print_report(r: dict[str, Any], out: Console | None = None) -> None:
    out = report_console(out, width=160)
    s = r["settings"]
    t = Table(
        title=f"kd bench cache: codecs (bytes incl. 8 B header+crc; KL error vs fp32 at C = {s['kl_classes']}, "
        f"{s['kl_rows']} rows; digits students: {s['seeds']} seed(s), {s['labeled']} labelled, {s['epochs']} epochs, "
        f"T = {s['temperature']:g})"
    )
    for col in ("codec", "B @1000", "x fp32", "B @32000", "x fp32", "KL err T=1 row/batch", "KL err T=4 row/batch",
                "digits student acc", "delta vs fp32 KD"):  # fmt: skip
        t.add_column(col, justify="left" if col == "codec" else "right")
    for name, c in r["codecs"].items():
        acc = "-" if c["student_acc_mean"] is None else f"{c['student_acc_mean']:.4f} ± {c['student_acc_std']:.4f}"
        delta = "-"
        if c["student_acc_mean"] is not None and name != "fp32":
            delta = f"{c['student_acc_delta_vs_fp32']:+.4f} ± {c['student_acc_delta_vs_fp32_std']:.4f}"
        t.add_row(
            name,
            str(c["bytes_1000"]),
            f"{c['ratio_to_fp32_1000']:.4f}",
            str(c["bytes_32000"]),
            f"{c['ratio_to_fp32_32000']:.5f}",
            f"{_f(c.get('kl_rel_error_T1'), '.1e')} / {_f(c.get('kl_batch_rel_error_T1'), '.1e')}",
            f"{_f(c.get('kl_rel_error_T4'), '.1e')} / {_f(c.get('kl_batch_rel_error_T4'), '.1e')}",
            acc,
            delta,
        )
    st = r["student"]
    t.add_row("CE only (no teacher)", "", "", "", "", "", "", f"{st['ce_acc_mean']:.4f} ± {st['ce_acc_std']:.4f}", "")
    t.add_row("teacher", "", "", "", "", "", "", f"{st['teacher_acc']:.4f}", "")
    out.print(t)

    m = r["many_classes"]
    mt = Table(
        title=f"{m['classes']}-class generated task (Gaussian clusters): students on {m['labeled_samples']} "
        f"labelled samples, {s['seeds']} seed(s), {s['many_epochs']} epochs, T = {s['temperature']:g}"
    )
    for col in ("source of targets", "bytes/sample", "x fp32", "student acc", "delta vs fp32 KD", "of the way"):
        mt.add_column(col, justify="left" if col == "source of targets" else "right")
    for name, row in m["codecs"].items():
        delta = "-" if name == "fp32" else f"{row['delta_vs_fp32_mean']:+.4f} ± {row['delta_vs_fp32_std']:.4f}"
        label = f"KD, {name} (in memory, + basis once)" if name in MANY_BASIS_CODECS else f"KD, {name} cache"
        mt.add_row(label, str(row["bytes"]), f"{row['ratio_to_fp32']:.4f}",
                   f"{row['acc_mean']:.4f} ± {row['acc_std']:.4f}", delta,
                   f"{row.get('fraction_ce_to_fp32', math.nan):.2f}")  # fmt: skip
    mt.add_row("CE only", "", "", f"{m['ce']['acc_mean']:.4f} ± {m['ce']['acc_std']:.4f}", "")
    mt.add_row("teacher", "", "", f"{m['teacher_acc']:.4f}", "")
    out.print(mt)

    samp = Table(title="sample:K: the KL of the empirical distribution over independent draws vs exact")
    for col in ("codec", "T", "relative bias", "std err of bias", "rel std of one draw (batch)"):
        samp.add_column(col, justify="left" if col == "codec" else "right")
    for name, c in r["codecs"].items():
        if name.startswith("sample:"):
            for tag in ("T1", "T4"):
                samp.add_row(
                    name,
                    tag[1:],
                    f"{c[f'sample_bias_rel_{tag}']:+.2e}",
                    f"{c[f'sample_bias_stderr_rel_{tag}']:.2e}",
                    f"{c[f'sample_batch_rel_std_{tag}']:.2e}",
                )
    out.print(samp)

    v = r["views"]
    n = v["views"]
    vt = Table(title=f"views on digits ({v['augmentation']}): V = 1 vs V = {n}")
    for col in ("student", "targets", "storage B/sample", "precompute s", "test acc"):
        vt.add_column(col, justify="left" if col in ("student", "targets") else "right")

    def acc(key: str) -> str:
        return f"{v[key]:.4f} ± {v[key + '_std']:.4f}"

    vt.add_row("CE, plain samples", "-", "-", "-", acc("ce_v1_acc"))
    vt.add_row("CE, augmented", "-", "-", "-", acc("ce_augmented_acc"))
    vt.add_row("KD, plain samples (V = 1)", "V = 1 cache", str(v["v1_bytes_per_sample"]),
               f"{v['v1_precompute_seconds']:.2f}", acc("v1_acc"))  # fmt: skip
    vt.add_row("KD, augmented", "V = 1 cache (plain sample's)", str(v["v1_bytes_per_sample"]),
               f"{v['v1_precompute_seconds']:.2f}", acc("augmented_plain_targets_acc"))  # fmt: skip
    vt.add_row(f"KD, augmented (V = {n})", f"V = {n} cache (that view's)", str(v[f"v{n}_bytes_per_sample"]),
               f"{v[f'v{n}_precompute_seconds']:.2f}", acc(f"v{n}_acc"))  # fmt: skip
    out.print(vt)

    rd, pre, sp = r["read"], r["precompute"], r["step"]
    ms = sp["median_step_ms"]
    dg = sp["digits"]
    dms = dg["median_step_ms"]
    speed = Table(title=f"speed ratios, measured in this run (torch threads {r['torch_threads']})", show_header=False)
    for justify in ("left", "right", "left"):
        speed.add_column(justify=justify)  # type: ignore[arg-type]
    speed.add_row(
        "read: cache / raw LMDB",
        f"{rd['ratio']:.3f}",
        f"CacheReader.get {rd['cache_records_per_s']:,.0f} / txn.get {rd['raw_lmdb_records_per_s']:,.0f} records/s "
        f"({rd['codec']} @ {rd['num_classes']} classes, {rd['record_bytes']} B, random batches of {rd['batch']}, "
        f"{rd['records']} records); read_raw (crc, no decode) {rd['cache_read_raw_records_per_s']:,.0f} "
        f"= {rd['ratio_read_raw']:.3f}",
    )
    speed.add_row(
        "precompute / bare forward",
        f"{pre['ratio']:.3f}",
        f"{pre['precompute_samples_per_s']:,.0f} / {pre['bare_forward_samples_per_s']:,.0f} samples/s "
        f"({s['teacher']}, batch {pre['batch']}, {pre['samples']} samples, codec {pre['codec']}; goal >= 0.9)",
    )
    speed.add_row(
        "step: cache / no teacher",
        f"{sp['cache_over_no_teacher']:.3f}",
        f"median {ms['cache']:.2f} / {ms['no_teacher']:.2f} ms (student {sp['student_parameters']:,} params, "
        f"batch {sp['batch']}, {sp['num_classes']} classes, {sp['codec']} cache; goal <= 1.05)",
    )
    speed.add_row(
        "  of which: KD loss / CE",
        f"{sp['memory_targets_over_no_teacher']:.3f}",
        f"median {ms['memory_targets']:.2f} ms with the same targets preloaded in RAM (no cache read)",
    )
    speed.add_row(
        "  and: cache / RAM targets",
        f"{sp['cache_over_memory_targets']:.3f}",
        "the cache read (LMDB get, crc, decode) on the step's critical path",
    )
    speed.add_row(
        "step: cache / in-process teacher",
        f"{sp['cache_over_inprocess_teacher']:.3f}",
        f"median {ms['cache']:.2f} / {ms['inprocess_teacher']:.2f} ms (teacher {sp['teacher_parameters']:,} params): "
        f"offline KD is {sp['inprocess_over_cache']:.2f}x faster per step",
    )
    speed.add_row(
        "digits step: cache / no teacher",
        f"{dg['cache_over_no_teacher']:.3f}",
        f"median {dms['cache']:.3f} / {dms['no_teacher']:.3f} ms (digits_student, batch {dg['batch']}, fp32 cache): "
        "a tiny student, where reading the cache is a visible share of the step",
    )
    speed.add_row(
        "  of which: KD loss / CE",
        f"{dg['memory_targets_over_no_teacher']:.3f}",
        f"median {dms['memory_targets']:.3f} ms with the targets in RAM; cache / RAM targets "
        f"{dg['cache_over_memory_targets']:.3f}",
    )
    speed.add_row(
        "digits step: cache / in-process",
        f"{dg['cache_over_inprocess_teacher']:.3f}",
        f"median {dms['cache']:.3f} / {dms['inprocess_teacher']:.3f} ms (digits_teacher in-process)",
    )
    crd = r.get("crd")
    if crd is not None:
        cp, cs = crd["precompute"], crd["step"]
        cms = cs["median_step_ms"]
        shape = "x".join(str(d) for d in crd["input_shape"])
        speed.add_row(
            "CRD precompute / bare forward",
            f"{cp['ratio']:.3f}",
            f"{cp['precompute_samples_per_s']:,.1f} / {cp['bare_forward_samples_per_s']:,.1f} samples/s "
            f"({crd['teacher']}, {crd['num_classes']} classes, generated {shape} inputs, batch {cp['batch']}, "
            f"{cp['samples']} samples, codec {cp['codec']}; goal >= 0.9)",
        )
        speed.add_row(
            "CRD step: cache / no teacher",
            f"{cs['cache_over_no_teacher']:.3f}",
            f"median {cms['cache']:.1f} / {cms['no_teacher']:.1f} ms ({crd['student']}, "
            f"{cs['student_parameters']:,} params, batch {cs['batch']}; goal <= 1.05); KD loss / CE "
            f"{cs['memory_targets_over_no_teacher']:.3f}, cache / RAM targets {cs['cache_over_memory_targets']:.3f}",
        )
        speed.add_row(
            "CRD step: cache / in-process",
            f"{cs['cache_over_inprocess_teacher']:.3f}",
            f"median {cms['cache']:.1f} / {cms['inprocess_teacher']:.1f} ms (teacher {cs['teacher_parameters']:,} "
            f"params in-process): offline KD is {cs['inprocess_over_cache']:.2f}x faster per step",
        )
    out.print(speed)
    for line in r["notes"]:
        out.print(f"- {line}", highlight=False)
    out.print(f"{r['seconds']:.1f}s total", highlight=False)
