"""``kd bench data``: precompute and training data flow at dataset scale, in one run.

The bench writes an ImageFolder of ``samples`` JPEG files (``size`` x ``size``,
100 class folders, smooth seeded patterns plus noise, so they compress like
photographs rather than like noise) and opens it with
``kd.core.data.open_source("imagefolder:DIR?size=R")``: every sample is read
from its file, JPEG-decoded and resized to the teacher's resolution R in the
DataLoader workers. Then, on this machine:

* ``rounds`` interleaved rounds (the order of the three rotates) over
  ``window`` samples each of

  - **decode**: samples/s of the loader alone (``kd.core.data.loader``, the one
    precompute reads through, same workers and batch): the data side's ceiling;
  - **forward**: samples/s of the teacher's bare forward loop (inference mode,
    same batch, same torch threads) on tensors decoded beforehand: the
    teacher's ceiling;
  - **precompute**: ``kd.precompute.precompute`` end to end over the window
    (decode in workers, teacher, fp16 encode, LMDB commits) into a fresh cache;

  ``precompute_over_min`` is the median over rounds of
  ``precompute / min(decode, forward)`` (each from the same round, so a
  neighbour's load hits all three alike), goal >= 0.9: precompute is as fast as
  its slower half.
* **full pass**: ``kd.precompute.precompute`` over all the samples, with the
  resident memory (VmRSS) of this process read after every batch:
  ``rss_mb_10k`` and ``rss_mb_50k`` are its medians over the batches of the
  second and of the last tenth of the samples (10k and 50k at the default
  50,000; the keys keep their names at other sizes), since one reading swings
  by a batch's transient activations; ``rss_trace`` has median and max per
  tenth, ``rss_checkpoints`` single readings with the workers' memory, and
  ``rss_workers_mb_10k`` / ``rss_workers_mb_50k`` the same medians of the
  DataLoader workers' memory (all of them together), so a growth is placed in
  the process that has it. Goal: flat. ``kd.precompute`` fixes glibc's mmap
  threshold (``bound_malloc_retention``; ``malloc_bounded`` says whether it
  did): with glibc's dynamic threshold, this process's RSS crept from ~690 to
  ~1100 MiB over 40k samples (the teacher's activations of a batch), flat only
  under ``MALLOC_MMAP_THRESHOLD_=131072``.
* **step**: a student's training step (forward, backward, SGD) fed by a
  DataLoader with workers: from the cache (``SoftTargetDataset``: decoded
  inputs + cached targets, KD loss) against the same loader without targets
  (CE), in interleaved blocks: ``step_over_no_teacher`` (median step times),
  goal <= 1.05: reading targets costs the step nothing.

Absolute rates depend on the machine and its neighbours (``load_average`` is
recorded at start and end); the ratios compare phases of the same run.
"""

from __future__ import annotations

import copy
import importlib
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from kd.cache.sharded import open_cache
from kd.core.data import loader as data_loader
from kd.core.data import open_source
from kd.precompute import default_workers, precompute
from kd.student_trainer.soft_dataset import SoftTargetDataset
from kd.student_trainer.sources import LocalSource
from kd.teacher_server.loading import load_teacher

console = Console(stderr=True, soft_wrap=True)  # each line whole in a log, as kd.cli's
CLASSES = 100


@dataclass(frozen=True)
class DataBenchSettings:
    samples: int = 50_000
    size: int = 64  # JPEG side in pixels
    resolution: int = 32  # decoded and resized to this for the teacher and student
    teacher: str = "kd.student_trainer.zoo:resnet8x4"
    student: str = "kd.student_trainer.zoo:wrn_16_2"
    workers: int = 0  # 0: kd.precompute.default_workers()
    batch: int = 256
    codec: str = "fp16"
    window: int = 1024  # samples per decode, forward and precompute measurement of a round
    rounds: int = 3  # interleaved rounds of the three (their order rotates)
    step_batch: int = 64
    step_block: int = 4  # steps per mode per block (the first of each block is not counted)
    step_rounds: int = 3
    threads: int = 0  # torch threads of the teacher and student [0 = torch's default]
    root: str = ""  # where to write the ImageFolder and the cache [a temporary directory]


def _rss_mb(pid: int | str = "self") -> float:
    """Resident memory of a process in MiB (``VmRSS``; 0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _children_rss_mb() -> float:
    """Resident memory of this process's children (the DataLoader workers), in MiB."""
    me, total = os.getpid(), 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == me:
            total += _rss_mb(entry.name)
    return total


def _malloc_bounded() -> bool:
    import kd.precompute

    return bool(getattr(kd.precompute, "_MALLOC_BOUNDED", False))


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def make_imagefolder(root: Path, samples: int, size: int, classes: int = CLASSES, seed: int = 0) -> Path:
    """``samples`` JPEG files in ``classes`` folders under ``root`` (kept if already complete)."""
    from PIL import Image

    done = root / f".complete-{samples}-{size}"
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(0, 1, (classes, 3, 3)).astype(np.float32)  # per class: a colour gradient per channel
    for c in range(classes):
        (root / f"class{c:03d}").mkdir(parents=True, exist_ok=True)
    for i in range(samples):
        c = i % classes
        a, b, k = base[c, :, 0], base[c, :, 1], base[c, :, 2]
        phase = rng.uniform(0, 6.28)
        img = a[:, None, None] * xx + b[:, None, None] * yy + 0.3 * k[:, None, None] * np.sin(8 * xx + phase)
        img = img + rng.normal(0, 0.05, img.shape).astype(np.float32)
        pixels = (np.clip(img, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
        Image.fromarray(pixels).save(root / f"class{c:03d}" / f"{i:07d}.jpg", quality=90)
    done.touch()
    return root


def _factory(spec: str):
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


class _Window:
    """Samples ``start .. start + n`` of a sample source, as a sample source of its own
    (precompute of one measurement window into a fresh cache)."""

    def __init__(self, src, start: int, n: int) -> None:
        self.src, self.start, self.n = src, start, n

    @property
    def dataset_id(self) -> str:
        return f"{self.src.dataset_id}[{self.start}:{self.start + self.n}]"

    @property
    def num_classes(self) -> int:
        return self.src.num_classes

    @property
    def augmentation(self) -> str:
        return self.src.augmentation

    @property
    def labels(self) -> torch.Tensor:
        return self.src.labels[self.start : self.start + self.n]

    def __len__(self) -> int:
        return self.n

    def get(self, indices: torch.Tensor, views: torch.Tensor | None = None) -> torch.Tensor:
        return self.src.get(torch.as_tensor(indices) + self.start, views)

    def read(self, index: int, seed: int | None = None, policy: Any = None):
        return self.src.read(int(index) + self.start, seed, policy)

    def read_batch(self, indices: Any, seeds: Any = None, policy: Any = None):
        """Whole batches as the source reads them (kd.core.data's loader asks for this)."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1) + self.start
        if hasattr(self.src, "read_batch"):
            return self.src.read_batch(idx, seeds, policy)
        sd = [None] * len(idx) if seeds is None else torch.as_tensor(seeds).reshape(-1).tolist()
        rows = [self.src.read(i, s, policy) for i, s in zip(idx.tolist(), sd)]
        return torch.stack([r[0] for r in rows]), None if seeds is None else torch.stack([r[1] for r in rows])


def decode_rate(src, s: DataBenchSettings, workers: int, start: int) -> float:
    """Samples/s of the loader alone over ``window`` samples from ``start`` (worker start included,
    as in precompute)."""
    n = min(s.window, len(src))
    idx = (torch.arange(n) + start) % len(src)
    loader = data_loader(src, idx, s.batch, workers=workers)
    t0 = time.perf_counter()
    seen = sum(len(b.indices) for b in loader)
    return seen / (time.perf_counter() - t0)


def forward_rate(model: torch.nn.Module, inputs: torch.Tensor, s: DataBenchSettings) -> float:
    """Samples/s of the bare forward loop over ``window`` samples (decoded beforehand)."""
    n = min(s.window, len(inputs) * 8)
    done = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        while done < n:
            at = done % len(inputs)
            x = inputs[at : at + s.batch]
            model(x)
            done += len(x)
    return done / (time.perf_counter() - t0)


def precompute_rate(src, teacher, out: Path, s: DataBenchSettings, workers: int, start: int) -> float:
    """Samples/s of ``kd.precompute`` end to end over ``window`` samples from ``start``, fresh cache."""
    n = min(s.window, len(src) - start)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    report = precompute(_Window(src, start, n), LocalSource(teacher), out, codec=s.codec, batch_size=s.batch,
                        workers=workers, progress=False)  # fmt: skip
    sps = n / (time.perf_counter() - t0)
    if report.written != n:
        raise RuntimeError(f"precompute wrote {report.written} of {n} records")
    shutil.rmtree(out, ignore_errors=True)
    return sps


class _PlainDataset(torch.utils.data.Dataset):
    """(inputs, label) through the same batched decode as SoftTargetDataset, without targets."""

    def __init__(self, src) -> None:
        self.src = src
        self.labels = torch.as_tensor(src.labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, items: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        idx = torch.as_tensor(items, dtype=torch.long)
        x = self.src.get(idx)
        return [(x[r], self.labels[i]) for r, i in enumerate(idx.tolist())]

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([item])[0]


def step_times(src, cache: Path, s: DataBenchSettings, workers: int, temperature: float = 4.0) -> dict[str, Any]:
    """Median step time from the cache (KD) and with no teacher (CE), interleaved blocks."""
    torch.manual_seed(7)
    student = _factory(s.student)(num_classes=CLASSES)
    datasets = {"cache": SoftTargetDataset(src, cache), "no_teacher": _PlainDataset(src)}
    loaders = {
        m: iter(
            torch.utils.data.DataLoader(
                d,
                batch_size=s.step_batch,
                shuffle=True,
                num_workers=workers,
                drop_last=True,
                persistent_workers=workers > 0,
                generator=torch.Generator().manual_seed(8),
            )  # fmt: skip
        )
        for m, d in datasets.items()
    }
    models = {m: copy.deepcopy(student) for m in datasets}
    opts = {m: torch.optim.SGD(models[m].parameters(), lr=0.05, momentum=0.9) for m in datasets}
    times: dict[str, list[float]] = {m: [] for m in datasets}

    def block(mode: str, n: int) -> list[float]:
        model, opt, it = models[mode], opts[mode], loaders[mode]
        out = []
        t0 = time.perf_counter()
        for _ in range(n):
            batch = next(it)
            logits = model(batch[0])
            if mode == "cache":
                t = batch[2]
                kl = F.kl_div(F.log_softmax(logits / temperature, 1), F.log_softmax(t / temperature, 1),
                              log_target=True, reduction="batchmean")  # fmt: skip
                loss = 0.9 * temperature**2 * kl + 0.1 * F.cross_entropy(logits, batch[1])
            else:
                loss = F.cross_entropy(logits, batch[1])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            t1 = time.perf_counter()
            out.append(t1 - t0)
            t0 = t1
        return out

    names = list(datasets)
    for m in names:  # warm-up: starts the workers
        block(m, 1)
    for r in range(s.step_rounds):
        for m in names[r % 2 :] + names[: r % 2]:
            t = block(m, s.step_block)
            times[m].extend(t[1:] if len(t) > 1 else t)
    med = {m: statistics.median(v) for m, v in times.items()}
    return {
        "step_over_no_teacher": med["cache"] / med["no_teacher"],
        "median_step_ms": {m: v * 1e3 for m, v in med.items()},
        "steps_per_mode": len(times["cache"]),
        "batch": s.step_batch,
        "student": s.student,
    }


def run_bench(s: DataBenchSettings) -> dict[str, Any]:
    t_start = time.perf_counter()
    if s.samples < 10:
        raise ValueError(f"--samples must be >= 10, got {s.samples}")
    if s.threads:
        torch.set_num_threads(s.threads)
    workers = s.workers or default_workers()
    load_start = _load()
    with tempfile.TemporaryDirectory(prefix="kd-bench-data-") as tmp:
        root = Path(s.root) if s.root else Path(tmp)
        old_cache_dir = os.environ.get("KD_CACHE_DIR")
        os.environ["KD_CACHE_DIR"] = str(root / "kd-cache")  # the manifests of the generated files go here
        try:
            console.print(f"writing {s.samples} JPEG files of {s.size}x{s.size} ...", highlight=False)
            t0 = time.perf_counter()
            folder = make_imagefolder(root / "images", s.samples, s.size)
            write_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            src = open_source(f"imagefolder:{folder}?size={s.resolution}")
            open_s = time.perf_counter() - t0
            torch.manual_seed(0)
            teacher = load_teacher("teacher", s.teacher)
            model = teacher.model
            decoded = src.get(torch.arange(min(len(src), 2 * s.batch)))
            with torch.inference_mode():  # warm-up
                model(decoded[: s.batch])
            rates: dict[str, list[float]] = {"decode": [], "forward": [], "precompute": []}
            console.print(f"{s.rounds} rounds of decode, forward and precompute over {s.window} samples "
                          f"({workers} workers, batch {s.batch}) ...", highlight=False)  # fmt: skip
            phases = list(rates)
            for r in range(s.rounds):
                start = (r * s.window) % max(1, len(src) - min(s.window, len(src)) + 1)
                for phase in phases[r % 3 :] + phases[: r % 3]:
                    if phase == "decode":
                        rates[phase].append(decode_rate(src, s, workers, start))
                    elif phase == "forward":
                        rates[phase].append(forward_rate(model, decoded, s))
                    else:
                        rates[phase].append(precompute_rate(src, teacher, root / "window", s, workers, start))
            ratios = [p / min(d, f) for d, f, p in zip(rates["decode"], rates["forward"], rates["precompute"])]
            decode = statistics.median(rates["decode"])
            forward = statistics.median(rates["forward"])
            shutil.rmtree(root / "cache", ignore_errors=True)
            pre = _precompute(src, teacher, root / "cache", s, workers)
            console.print("student step: cache vs no teacher ...", highlight=False)
            t0 = time.perf_counter()
            step = step_times(src, Path(pre["path"]), s, workers)
            step["seconds"] = round(time.perf_counter() - t0, 1)
        finally:
            if old_cache_dir is None:
                os.environ.pop("KD_CACHE_DIR", None)
            else:
                os.environ["KD_CACHE_DIR"] = old_cache_dir
    rss = pre["rss"]
    over_min = statistics.median(ratios)
    return {
        "precompute_over_min": over_min,
        "rss_mb_10k": pre["median_10k"],
        "rss_mb_50k": pre["median_50k"],
        "rss_growth_mb": pre["median_50k"] - pre["median_10k"],
        "rss_workers_mb_10k": pre["workers_10k"],
        "rss_workers_mb_50k": pre["workers_50k"],
        "malloc_bounded": _malloc_bounded(),
        "step_over_no_teacher": step["step_over_no_teacher"],
        "decode_samples_per_s": decode,
        "forward_samples_per_s": forward,
        "precompute_samples_per_s": statistics.median(rates["precompute"]),
        "decode_rounds": rates["decode"],
        "forward_rounds": rates["forward"],
        "precompute_rounds": rates["precompute"],
        "ratio_rounds": ratios,
        "full_pass_samples_per_s": pre["samples_per_s"],
        "full_pass_over_min": pre["samples_per_s"] / min(decode, forward),
        "rss_checkpoints": rss,
        "rss_trace": pre["trace"],  # (samples, median MiB, max MiB) per tenth of the samples
        "records": pre["records"],
        "bytes_per_sample": pre["bytes_per_sample"],
        "step": step,
        "goals": {
            "precompute_over_min_at_least_0_9": over_min >= 0.9,
            "step_over_no_teacher_at_most_1_05": step["step_over_no_teacher"] <= 1.05,
        },
        "workers": workers,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average": {"start": load_start, "end": _load()},
        "precompute_seconds": pre["seconds"],
        "write_seconds": round(write_s, 1),
        "open_seconds": round(open_s, 1),
        "settings": asdict(s),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "seconds": round(time.perf_counter() - t_start, 1),
    }


def _precompute(src, teacher, out: Path, s: DataBenchSettings, workers: int) -> dict[str, Any]:
    n = len(src)
    # At 1/5 of the samples, near the end (the workers still running) and at the end.
    marks = sorted({max(1, n // 5), max(1, int(n * 0.95)), n})
    rss: list[dict[str, Any]] = []
    every: list[tuple[int, float]] = []  # (samples done, main MiB) after every batch
    workers_every: list[tuple[int, float]] = []  # (samples done, workers' MiB) while they run

    def on_batch(done: int) -> None:
        every.append((done, _rss_mb()))
        children = _children_rss_mb()
        if children > 0:  # 0: the workers have exited after the last batch
            workers_every.append((done, children))
        while len(rss) < len(marks) and done >= marks[len(rss)]:
            rss.append({"samples": done, "main_mb": every[-1][1], "workers_mb": children})

    console.print(f"precompute: {n} samples, {s.teacher}, {workers} workers ...", highlight=False)
    t0 = time.perf_counter()
    report = precompute(src, LocalSource(teacher), out, codec=s.codec, batch_size=s.batch, workers=workers,
                        progress=False, on_batch=on_batch)  # fmt: skip
    seconds = time.perf_counter() - t0
    if report.written != n:
        raise RuntimeError(f"precompute wrote {report.written} of {n} records")

    # RSS swings by the teacher's transient activations (a forward of one batch): so the
    # median over the batches of a tenth of the samples, from the second tenth and the last.
    def tenth(k: int, readings: list[tuple[int, float]] = every) -> list[float]:
        inside = [mb for done, mb in readings if (k - 1) * n / 10 < done <= k * n / 10]
        later = [mb for done, mb in readings if done > (k - 1) * n / 10]  # a batch spans the tenth
        return inside or later[:1] or [readings[-1][1] if readings else 0.0]

    trace = [(k * n // 10, round(statistics.median(tenth(k)), 1), round(max(tenth(k)), 1)) for k in range(1, 11)]
    return {
        "samples_per_s": n / seconds,
        "seconds": round(seconds, 1),
        "rss": rss,
        "trace": trace,
        "median_10k": statistics.median(tenth(2)),
        "median_50k": statistics.median(tenth(10)),
        "workers_10k": statistics.median(tenth(2, workers_every)),
        "workers_50k": statistics.median(tenth(10, workers_every)),
        "records": len(open_cache(out)),
        "bytes_per_sample": report.bytes_per_sample,
        "path": str(report.path),
    }


def print_report(r: dict[str, Any], out: Console | None = None) -> None:
    out = out or Console()
    t = Table(title=f"kd bench data: {r['settings']['samples']} JPEGs, {r['workers']} workers, "
                    f"{r['torch_threads']} torch threads, {r['cpus']} CPUs")  # fmt: skip
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_column("goal", justify="right")
    t.add_row("decode samples/s (loader only)", f"{r['decode_samples_per_s']:.0f}", "")
    t.add_row("teacher forward samples/s", f"{r['forward_samples_per_s']:.0f}", "")
    t.add_row("precompute samples/s (end to end)", f"{r['precompute_samples_per_s']:.0f}", "")
    t.add_row("precompute / min(decode, forward), median of rounds", f"{r['precompute_over_min']:.3f}", ">= 0.9")
    t.add_row(f"full pass over {r['records']} samples, samples/s", f"{r['full_pass_samples_per_s']:.0f}", "")
    t.add_row("RSS MiB, median over the 2nd / last tenth of the samples",
              f"{r['rss_mb_10k']:.0f} / {r['rss_mb_50k']:.0f}", "flat")  # fmt: skip
    if "rss_workers_mb_10k" in r:
        t.add_row("workers' RSS MiB (all), the same medians",
                  f"{r['rss_workers_mb_10k']:.0f} / {r['rss_workers_mb_50k']:.0f}", "flat")  # fmt: skip
    for c in r["rss_checkpoints"]:
        t.add_row(f"RSS at {c['samples']} samples (main / workers MiB)", f"{c['main_mb']:.0f} / {c['workers_mb']:.0f}",
                  "flat")  # fmt: skip
    t.add_row("student step from cache / no teacher", f"{r['step_over_no_teacher']:.3f}", "<= 1.05")
    out.print(t)
    out.print(f"load average {r['load_average']['start']} -> {r['load_average']['end']}; {r['seconds']} s")
