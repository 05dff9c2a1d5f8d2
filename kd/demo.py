"""``kd demo``: the whole path on the bundled digits data, end to end.

1. train a teacher (wide MLP) on the full training split and save it (safetensors);
2. start ``kd serve`` as a real subprocess on a free loopback port;
3. precompute the teacher's soft targets for the training split into an LMDB
   cache *through the server*;
4. train the same small student three ways -- cross-entropy only, KD from the
   cache, KD from the live server -- over several seeds, on a small labelled
   subset (KD helps most when the student is small and labels are few);
5. stop the server (SIGTERM, drained), print a table, write ``results.json``
   and ``curves.png``; exit 1 unless the checks hold: ``max |cache - server| = 0`` (fp32 targets
   through the cache are bit-identical to the server's) and the cache and server students
   are the same (same accuracy per seed and epoch).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from kd.cache.codecs import bytes_per_sample
from kd.core.data import load_dataset
from kd.models import digits_student, digits_teacher
from kd.precompute import precompute
from kd.student_trainer.sources import CacheSource, ServerSource
from kd.student_trainer.train import TrainConfig, seed_everything, train_student
from kd.teacher_server.loading import Teacher, load_teacher, save_weights

console = Console(stderr=True, soft_wrap=True)  # each line whole in a log, as kd.cli's
MODES = ("ce", "kd_cache", "kd_server")
LABELS = {
    "ce": "student, cross-entropy only",
    "kd_cache": "student, KD from the cache",
    "kd_server": "student, KD from the live server",
}


def train_digits_teacher(train, test, path: Path, *, epochs: int = 40,
                         stop: Callable[[], int | None] | None = None) -> tuple[Teacher, float]:  # fmt: skip
    """The demo's teacher: kd.models:digits_teacher trained with cross-entropy on the whole
    split (seed 0, Adam 1e-3, batch 64), saved to ``path`` and loaded back as a served
    teacher would be. -> (teacher, test accuracy). ``stop``: as ``train_student``'s; a stopped
    run raises ``kd.core.signals.Stopped`` and saves nothing."""
    seed_everything(0)
    model = digits_teacher()
    res = train_student(model, train, test, TrainConfig(method="ce", epochs=epochs, lr=1e-3, batch_size=64),
                        stop=stop)  # fmt: skip
    res.raise_if_stopped("while training the teacher, ")
    save_weights(model, path)
    return load_teacher("digits", f"kd.models:digits_teacher@{path}"), res.test_acc


def start_server_process(spec: str, out: Path, *, name: str = "digits", log_name: str = "server.log",
                         extra: list[str] | None = None):  # fmt: skip
    """``kd serve --teacher NAME=SPEC [extra flags]`` as a subprocess on a free loopback port -> (process, port)."""
    port_file = out / f"{log_name}.port"
    port_file.unlink(missing_ok=True)
    log = open(out / log_name, "w")  # noqa: SIM115 - lives as long as the server
    cmd = [sys.executable, "-m", "kd", "serve", "--teacher", f"{name}={spec}", "--port", "0",
           "--port-file", str(port_file), "--max-queue-delay-us", "500", *(extra or [])]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    try:
        while not port_file.exists():  # written atomically by kd serve once it listens
            if proc.poll() is not None:
                raise RuntimeError(f"kd serve exited with {proc.returncode}; see {out / log_name}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"kd serve did not start within 120 s; see {out / log_name}")
            time.sleep(0.05)
        return proc, int(port_file.read_text())
    except BaseException:  # a failed start, or a stop signal of the caller's: no server left without its parent
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise


def stop_server_process(proc: subprocess.Popen) -> int:
    """SIGTERM (the server drains), then the exit code."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def _plot(curves: dict[str, list[list[float]]], teacher_acc: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for mode, runs in curves.items():
        t = torch.tensor(runs)
        mean, lo, hi = t.mean(0), t.min(0).values, t.max(0).values
        x = range(1, t.shape[1] + 1)
        # The server line is dashed: with identical targets it lies on the cache line.
        style = {"ce": "-", "kd_cache": "-", "kd_server": "--"}[mode]
        width = {"ce": 1.5, "kd_cache": 3.0, "kd_server": 1.5}[mode]
        ax.plot(x, mean, ls=style, lw=width, label=f"{LABELS[mode]} (mean of {len(runs)})")
        ax.fill_between(x, lo, hi, alpha=0.2)
    ax.axhline(teacher_acc, color="k", ls="--", lw=1, label="teacher")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.4, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_demo(out: Path, *, seeds: int = 3, epochs: int = 300, labeled: int = 100, teacher_epochs: int = 40) -> dict:

    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    console.rule("kd demo: digits (sklearn), teacher as a service")
    console.print(
        f"data: {train.dataset_id} ({len(train)} train), {len(test)} test; student sees {labeled} training samples",
        highlight=False,
    )

    # 1. the teacher
    weights = out / "teacher.safetensors"
    served, teacher_acc = train_digits_teacher(train, test, weights, epochs=teacher_epochs)
    teacher, fingerprint = served.model, served.fingerprint
    console.print(f"teacher: test acc {teacher_acc:.4f}, fingerprint {fingerprint[:16]}", highlight=False)

    # 2. the server, as its own process
    proc, port = start_server_process(f"kd.models:digits_teacher@{weights}", out)
    try:  # from here on, whatever ends the demo (a stop signal too) stops the server below
        address = f"127.0.0.1:{port}"
        console.print(f"kd serve running (pid {proc.pid}) on {address}", highlight=False)
        cache_dir = out / "cache"
        server = ServerSource(address, "digits")
        if server.fingerprint != fingerprint:
            raise RuntimeError("the served teacher's fingerprint differs from the trained one")

        # 3. precompute through the server
        report = precompute(train, server, cache_dir, codec="fp32", progress=True)
        cache = CacheSource(str(cache_dir), teacher_fingerprint=fingerprint, dataset_id=train.dataset_id)
        all_idx = torch.arange(len(train))
        diff = float((cache.targets(all_idx, train.inputs) - server.targets(all_idx, train.inputs)).abs().max())
        console.print(
            f"cache: {len(train)} records, {report.bytes_per_sample} B/sample; "
            f"max |cache - server| logits = {diff:.2e}",
            highlight=False,
        )

        # 4. students
        curves: dict[str, list[list[float]]] = {m: [] for m in MODES}
        finals: dict[str, list[float]] = {m: [] for m in MODES}
        seconds: dict[str, float] = {m: 0.0 for m in MODES}
        for seed in range(seeds):
            subset = torch.randperm(len(train), generator=torch.Generator().manual_seed(1000 + seed))[:labeled]
            for mode in MODES:
                seed_everything(seed)
                student = digits_student()
                method, source = ("ce", None) if mode == "ce" else ("kd", cache if mode == "kd_cache" else server)
                r = train_student(
                    student,
                    train,
                    test,
                    TrainConfig(method=method, epochs=epochs, seed=seed),
                    source=source,
                    subset=subset,
                )
                curves[mode].append(r.acc_per_epoch)
                finals[mode].append(r.test_acc)
                seconds[mode] += r.seconds
                console.print(f"  seed {seed} {mode:9s} acc {r.test_acc:.4f} ({r.seconds:.1f}s)", highlight=False)
        server_stats = server.client.list_teachers()[0]
        server.close()
    finally:
        rc = stop_server_process(proc)
    if rc != 0:
        raise RuntimeError(f"kd serve exited with {rc} after SIGTERM; see {out / 'server.log'}")

    # 5. report
    def mean(xs: list[float]) -> float:
        return statistics.fmean(xs)

    def std(xs: list[float]) -> float:
        return statistics.stdev(xs) if len(xs) > 1 else 0.0

    results = {
        "teacher_acc": teacher_acc,
        "student_ce_acc": mean(finals["ce"]),
        "student_kd_cache_acc": mean(finals["kd_cache"]),
        "student_kd_server_acc": mean(finals["kd_server"]),
        "student_acc_std": {m: std(finals[m]) for m in MODES},
        "student_acc_per_seed": finals,
        "train_seconds": seconds,
        "seeds": list(range(seeds)),
        "epochs": epochs,
        "labeled_samples": labeled,
        "teacher_fingerprint": fingerprint,
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student_params": sum(p.numel() for p in digits_student().parameters()),
        "served_on": server_stats.device,
        "cache_codec": "fp32",
        "cache_records": len(train),
        "cache_bytes": report.bytes_per_sample * len(train),
        "cache_file_bytes": (cache_dir / "data.mdb").stat().st_size,
        "cache_bytes_per_sample": bytes_per_sample("fp32", train.num_classes),
        "max_abs_diff_cache_vs_server": diff,
        "server_exit_code": rc,
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    # What the README says the demo checks: the cache holds exactly the server's targets (fp32),
    # so the students trained from either, seeded alike, are the same.
    results["checks"] = {
        "max_abs_diff_cache_vs_server_is_0": diff == 0.0,
        "cache_and_server_students_equal": finals["kd_cache"] == finals["kd_server"]
        and curves["kd_cache"] == curves["kd_server"],
    }
    results["problems"] = [name for name, ok in results["checks"].items() if not ok]
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _plot(curves, teacher_acc, out / "curves.png")

    table = Table(
        title=f"digits: student ({results['student_params']} params) on {labeled} samples, "
        f"{epochs} epoch{'s' * (epochs != 1)}, {seeds} seed{'s' * (seeds != 1)}"
    )
    table.add_column("model")
    table.add_column("test acc (mean ± std)", justify="right")
    table.add_row(f"teacher ({results['teacher_params']} params, all {len(train)} samples)", f"{teacher_acc:.4f}")
    for mode in MODES:
        table.add_row(LABELS[mode], f"{mean(finals[mode]):.4f} ± {std(finals[mode]):.4f}")
    Console().print(table)
    console.print(
        f"results: {out / 'results.json'}, curves: {out / 'curves.png'}, {results['seconds']:.1f}s total",
        highlight=False,
    )
    if results["problems"]:
        raise RuntimeError(
            f"demo check(s) failed: {', '.join(results['problems'])} (max |cache - server| = {diff:.3g}); "
            f"see {out / 'results.json'}"
        )
    return results
