"""``kd demo-datafree``: every data-free method against a teacher behind ``kd serve``.

1. train the teacher (``digits_cnn``: a small CNN with BatchNorm) on the real digits
   training split, and -- as the data owner would -- compute its activation records
   (Lopes et al.) on that data; both stay with the server;
2. start ``kd serve`` as a real subprocess serving the same weights under one name per
   access tier (``white``, ``features``, ``scores``, ``labels``), with the records, so each
   method runs against exactly the access it needs;
3. train a real-data KD student as the reference (the same student, KD from the server on
   the real training inputs);
4. train the student with every registered data-free method (each module's ``DEMO``
   settings): the student never sees a real training image; the test split is used only
   for evaluation. Each method runs with its own client id, so the server's query
   accounting reports the samples and gradient samples it spent; its student trains through
   the shared trainer, whose run directory is ``DIR/runs/METHOD`` (config.json, metrics.csv);
5. print a table and write ``DIR/results.json``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import fields, replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kd.core.data import load_dataset
from kd.demo import start_server_process, stop_server_process
from kd.models import digits_cnn, digits_cnn_student
from kd.student_trainer.datafree import DATAFREE, DataFreeConfig, ServedTeacher, get
from kd.student_trainer.sources import ServerSource
from kd.student_trainer.train import TrainConfig, seed_everything, train_student
from kd.teacher_server.access import TIERS
from kd.teacher_server.client import TeacherClient
from kd.teacher_server.loading import load_teacher, save_weights
from kd.teacher_server.records import compute_records, save_records

console = Console(stderr=True, soft_wrap=True)  # each line whole in a log, as kd.cli's
RECORDED_LAYERS = ["logits", "pool", "layer2", "layer1"]
# --quick (tests, smoke runs): a couple of steps with the inner loops cut to the bone.
QUICK: dict[str, dict] = {
    "adv-samples": {"config": {"steps": 2, "batch_size": 8},
                    "options": {"base_batches": 1, "base_iterations": 2, "attack_size": 4, "attack_steps": 1}},
    "dafl": {"config": {"steps": 2, "batch_size": 8}},
    "dfad": {"config": {"steps": 2, "batch_size": 8}, "options": {"k": 1}},
    "zskt": {"config": {"steps": 2, "batch_size": 8}, "options": {"ns": 1}},
    "deepinversion": {"config": {"steps": 1, "batch_size": 8}, "options": {"iterations": 2, "kd_steps": 2}},
    "fast-dfkd": {"config": {"steps": 2, "batch_size": 8}, "options": {"g_steps": 1, "kd_steps": 2, "warmup": 0}},
    "dfme": {"config": {"steps": 2, "batch_size": 8}},
    "zsdb3kd": {"config": {"steps": 2, "batch_size": 8}, "options": {"samples_per_class": 1, "optimize_iters": 0}},
    "lopes": {"config": {"steps": 1, "batch_size": 8}, "options": {"iterations": 2, "kd_steps": 2}},
}  # fmt: skip


def _demo_settings(name: str, quick: bool) -> tuple[DataFreeConfig, dict]:
    import importlib

    module = importlib.import_module(get(name).run.__module__)
    demo = getattr(module, "DEMO", {"config": {}, "options": {}})
    known = {f.name for f in fields(DataFreeConfig)}
    config = DataFreeConfig(**{k: v for k, v in demo.get("config", {}).items() if k in known})
    options = dict(demo.get("options", {}))
    if quick:
        quick_demo = QUICK.get(name, {"config": {"steps": 1, "batch_size": 8}})
        config = replace(config, **quick_demo.get("config", {}))
        options.update(quick_demo.get("options", {}))
    return config, options


def run_demo_datafree(out: Path, *, methods: list[str] | None = None, quick: bool = False,
                      teacher_epochs: int = 40, seed: int = 0) -> dict:  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    names = methods or sorted(DATAFREE)
    for n in names:
        get(n)  # ValueError for an unknown name
    t0 = time.perf_counter()
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")

    # 1. The teacher and its records, on the real data (the data owner's side).
    seed_everything(seed)
    model = digits_cnn()
    t = train_student(model, train, test, TrainConfig(method="ce", epochs=3 if quick else teacher_epochs, lr=1e-3,
                                                      batch_size=64))  # fmt: skip
    weights = save_weights(model, out / "teacher.safetensors")
    spec = f"kd.models:digits_cnn@{weights}"
    teacher = load_teacher("teacher", spec)
    records = save_records(out / "records.safetensors", compute_records(teacher, train, RECORDED_LAYERS), teacher,
                           train.dataset_id)  # fmt: skip
    console.print(f"teacher digits_cnn: test acc {t.test_acc:.4f}; activation records of {RECORDED_LAYERS}",
                  highlight=False)  # fmt: skip

    # 2. One server, the same weights under one name per access tier.
    extra: list[str] = []
    for tier in TIERS:
        if tier != "white":
            extra += ["--teacher", f"{tier}={spec}"]
        extra += ["--access", f"{tier}={tier}", "--records", f"{tier}={records}"]
    proc, port = start_server_process(spec, out, name="white", extra=extra)
    try:  # from here on, whatever ends the demo (a stop signal too) stops the server below
        address = f"127.0.0.1:{port}"
        rows: dict[str, dict] = {}
        # 3. The reference: the same student, KD on the real training inputs.
        seed_everything(seed)
        student = digits_cnn_student()
        with ServerSource(address, "scores") as src:
            kd_epochs = 3 if quick else 60
            ref = train_student(student, train, test, TrainConfig(method="kd", epochs=kd_epochs, seed=seed), source=src)
        console.print(f"real-data KD student: test acc {ref.test_acc:.4f}", highlight=False)

        # 4. Every data-free method; the student sees synthetic inputs only.
        for name in names:
            method = get(name)
            config, options = _demo_settings(name, quick)
            # each student trains through the shared trainer: its metrics.csv and config.json go here
            config = replace(config, seed=seed, run_dir=str(out / "runs" / name))
            seed_everything(seed)
            student = digits_cnn_student()
            row = {"paper": method.paper, "tier": method.tier, "config": config.__dict__, "options": options}
            try:
                with TeacherClient(address, client_id=name, timeout=600) as client:
                    served = ServedTeacher(client, method.tier)
                    res = method.run(served, student, config, test=test, **options)
                    usage = client.usage
                row.update(res.as_dict())
                row.update(server_samples=usage.samples, server_gradient_samples=usage.gradient_samples)
                console.print(f"  {name:14s} acc {res.test_acc:.4f}  queries {res.samples:,} samples + "
                              f"{res.gradient_samples:,} gradients  {res.seconds:.1f}s", highlight=False)  # fmt: skip
            except Exception as e:  # noqa: BLE001 - recorded; the other methods still run
                row.update(test_acc=None, error=f"{type(e).__name__}: {e}")
                console.print(f"  {name:14s} failed: {row['error']}", highlight=False)
            rows[name] = row
    finally:
        code = stop_server_process(proc)
    result = {
        "teacher_acc": t.test_acc,
        "real_data_kd_acc": ref.test_acc,
        "chance": 1 / train.num_classes,
        "methods": rows,
        "student": "kd.models:digits_cnn_student",
        "student_params": sum(p.numel() for p in digits_cnn_student().parameters()),
        "teacher": "kd.models:digits_cnn",
        "teacher_params": sum(p.numel() for p in model.parameters()),
        "quick": quick,
        "server_exit_code": code,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    result["problems"] = problems(result)
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def problems(result: dict) -> list[str]:
    """What the demo checks: every method ran to a finite accuracy, the queries each one reports
    are what the server counted for its client id, black-box methods asked for no gradients,
    and the server drained and exited 0 on SIGTERM. ``kd demo-datafree`` exits 1 on any."""
    out = []
    if result["server_exit_code"] != 0:
        out.append(f"kd serve exited with {result['server_exit_code']} after SIGTERM")
    for name, m in result["methods"].items():
        if m.get("error") is not None:
            out.append(f"{name} failed: {m['error']}")
            continue
        if not isinstance(m.get("test_acc"), float) or not math.isfinite(m["test_acc"]):
            out.append(f"{name}: test accuracy {m.get('test_acc')!r} is not a finite number")
        if (m["samples"], m["gradient_samples"]) != (m["server_samples"], m["server_gradient_samples"]):
            out.append(f"{name} reports {m['samples']} + {m['gradient_samples']} queries, the server counted "
                       f"{m['server_samples']} + {m['server_gradient_samples']}")  # fmt: skip
        if m["tier"] in ("scores", "labels") and m["gradient_samples"]:
            out.append(f"{name} ({m['tier']} tier) asked for {m['gradient_samples']} gradient samples")
    return out


def print_report(r: dict) -> None:
    table = Table(title=f"kd demo-datafree: digits_cnn_student ({r['student_params']} params) from a served "
                        f"digits_cnn ({r['teacher_params']} params) without real training images")  # fmt: skip
    for col in ("model / method", "tier", "test acc", "teacher queries (samples + gradient samples)", "s"):
        table.add_column(col, justify="left" if col in ("model / method", "tier") else "right")
    table.add_row("teacher (trained on the real data)", "", f"{r['teacher_acc']:.4f}", "", "", style="bold")
    table.add_row("student, KD on the real training inputs", "scores", f"{r['real_data_kd_acc']:.4f}", "", "",
                  style="bold cyan")  # fmt: skip
    done = sorted(((n, m) for n, m in r["methods"].items() if m.get("test_acc") is not None),
                  key=lambda nm: -nm[1]["test_acc"])  # fmt: skip
    for name, m in done:
        q = f"{m['samples']:,} + {m['gradient_samples']:,}"
        table.add_row(name, m["tier"], f"{m['test_acc']:.4f}", q, f"{m['seconds']:.1f}")
    for name, m in r["methods"].items():
        if m.get("test_acc") is None:
            table.add_row(name, m["tier"], "failed", m["error"], "", style="red")
    table.add_row("chance", "", f"{r['chance']:.4f}", "", "", style="dim")
    Console().print(table)
    Console().print(f"{r['seconds']:.1f}s total", highlight=False)
