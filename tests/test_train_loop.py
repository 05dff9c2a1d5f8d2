"""The training loop's run directory: effective config, metrics, checkpoints, exact resume.

`kd train` runs as a real process in test_train_options_from_a_config_file and under torchrun,
`kd plot` in test_cli_run_dir_resume_and_plot; the other commands run in this process (typer's
CliRunner on ``kd.cli.app``, what ``python -m kd`` calls), sparing a new interpreter and torch
import per call."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import Result
from typer.testing import CliRunner

from kd.cli import app
from kd.core.data import load_dataset
from kd.student_trainer.sources import LocalSource
from kd.student_trainer.train import TrainConfig, seed_everything, train_student
from kd.teacher_server.loading import Teacher


class Interrupt(Exception):
    pass


def cli(*args: str) -> Result:
    """``kd ARGS`` in this process: exit_code, stdout and stderr as a process would give them."""
    return CliRunner().invoke(app, list(args))


def ok(r: Result) -> Result:
    """``r`` after asserting it exited 0 (else its output and any exception in the message)."""
    assert r.exit_code == 0, (r.output, r.exception)
    return r


def test_resume_after_an_interruption_equals_an_uninterrupted_run(tmp_path: Path, teacher: Teacher) -> None:
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    source = LocalSource(teacher)
    subset = torch.arange(150)
    # Dropout in the student makes the global RNG part of the state to restore.
    cfg = TrainConfig(method="kd", epochs=4, seed=5, views=1)

    def student() -> torch.nn.Module:
        seed_everything(5)
        return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                   torch.nn.Linear(32, 10))  # fmt: skip

    straight = student()
    full = train_student(straight, train, test, cfg, source=source, subset=subset, run_dir=tmp_path / "a")

    def stop_after_two(epoch: int, loss: float, acc: float) -> None:
        if epoch == 1:
            raise Interrupt

    interrupted = student()
    with pytest.raises(Interrupt):
        train_student(interrupted, train, test, cfg, source=source, subset=subset, run_dir=tmp_path / "b",
                      on_epoch=stop_after_two)  # fmt: skip
    resumed = student()  # a fresh process would start from scratch weights too
    result = train_student(resumed, train, test, cfg, source=source, subset=subset, run_dir=tmp_path / "b",
                           resume=True)  # fmt: skip
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert result.acc_per_epoch == full.acc_per_epoch and len(result.acc_per_epoch) == 4
    rows = list(csv.DictReader(open(tmp_path / "b" / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]
    assert all(float(r["samples_per_s"]) > 0 and float(r["source_wait_s"]) >= 0 for r in rows)
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["method"] == "kd" and config["teacher_fingerprint"] == teacher.fingerprint
    assert config["train_samples"] == 150
    with pytest.raises(ValueError, match=r"config differs in \['epochs'\]"):
        train_student(student(), train, test, TrainConfig(method="kd", epochs=6, seed=5), source=source,
                      subset=subset, run_dir=tmp_path / "b", resume=True)  # fmt: skip
    # A run dir written before a config field existed (here the final-transform fields) resumes when the
    # field's default is what the run asks for; a missing key whose value is not the default is a difference.
    # Such a run's checkpoint does not carry its config either: config.json is what resume compares.
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    del ckpt["config"]
    torch.save(ckpt, tmp_path / "b" / "checkpoint.pt")
    for key in ("input_size", "input_mean", "input_std"):
        del config[key]
    (tmp_path / "b" / "config.json").write_text(json.dumps(config))
    again = train_student(student(), train, test, cfg, source=source, subset=subset, run_dir=tmp_path / "b",
                          resume=True)  # fmt: skip
    assert again.acc_per_epoch == full.acc_per_epoch
    del config["epochs"]  # 4 here, 60 by default
    (tmp_path / "b" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config differs in \['epochs'\]"):
        train_student(student(), train, test, cfg, source=source, subset=subset, run_dir=tmp_path / "b",
                      resume=True)  # fmt: skip


def test_cli_run_dir_resume_and_plot(tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = ok(cli("train", "--method", "ce", "--epochs", "3", "--run-dir", str(run)))
    ckpt, metrics = run / "checkpoint.pt", (run / "metrics.csv").read_bytes()
    before = (ckpt.stat().st_ino, ckpt.stat().st_mtime_ns, ckpt.read_bytes())
    again = ok(cli("train", "--method", "ce", "--epochs", "3", "--run-dir", str(run), "--resume"))
    # --resume skipped all three finished epochs: a fresh run would have rewritten the checkpoint
    # (a new file renamed over it) and metrics.csv (new timings), and seeded training would give the
    # same accuracy either way, so the accuracy alone cannot tell.
    assert (ckpt.stat().st_ino, ckpt.stat().st_mtime_ns, ckpt.read_bytes()) == before
    assert (run / "metrics.csv").read_bytes() == metrics
    assert (
        json.loads(again.stdout.strip().splitlines()[-1])["test_acc"]
        == json.loads(r.stdout.strip().splitlines()[-1])["test_acc"]
        == float(list(csv.DictReader(io.StringIO(metrics.decode())))[-1]["test_acc"])
    )
    empty = cli("train", "--method", "ce", "--epochs", "3", "--run-dir", str(tmp_path / "none"), "--resume")
    assert empty.exit_code == 2 and "has no checkpoint.pt" in " ".join(empty.stderr.split()), empty.stderr
    p = subprocess.run([sys.executable, "-m", "kd", "plot", str(run)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert (run / "curves.png").stat().st_size > 5_000


def test_cli_trains_from_two_teachers_with_a_combiner(tmp_path: Path, teacher_spec: str) -> None:
    cmd = ["train", "--epochs", "2", "--subset", "100"]
    two = ["--source", f"local:{teacher_spec}", "--source", "local:kd.models:digits_teacher"]
    from safetensors.torch import load_file

    from kd.models import digits_student

    test = load_dataset("digits", "test")
    weights = {}
    for combiner in ("mean", "mean-logits", "confidence"):
        out = tmp_path / f"{combiner}.safetensors"
        r = ok(cli(*cmd, *two, "--combiner", combiner, "--out", str(out)))
        weights[combiner] = load_file(out)
        student = digits_student()
        student.load_state_dict(weights[combiner])
        with torch.no_grad():
            acc = int((student(test.inputs).argmax(1) == test.labels).sum()) / len(test)
        # the printed accuracy is the saved student's
        assert json.loads(r.stdout.strip().splitlines()[-1])["test_acc"] == acc
    # each combiner reached the trainer: different targets, different students
    names = list(weights)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert any(not torch.equal(weights[a][k], weights[b][k]) for k in weights[a]), (a, b)
    bad = cli(*cmd, *two, "--combiner", "weighted", "--combiner-opt", "weights=[1,2,3]")
    assert bad.exit_code != 0 and "3 weight(s) for 2 source(s)" in bad.stderr


def test_cli_views_reach_the_trainer(tmp_path: Path, teacher_spec: str) -> None:
    cache = tmp_path / "v"
    args = ["precompute", "--source", f"local:{teacher_spec}", "--out", str(cache), "--views", "2"]
    ok(cli(*args))
    base = ["train", "--source", f"cache:{cache}", "--epochs", "1", "--subset", "50"]
    ok(cli(*base, "--views", "2"))
    wrong = cli(*base)
    assert wrong.exit_code != 0 and "2 view(s) per sample but training asks for 1" in wrong.stderr


def test_train_options_from_a_config_file(tmp_path: Path, teacher_spec: str) -> None:
    cfg = tmp_path / "train.toml"
    cfg.write_text(
        f'method = "kd"\nsource = ["local:{teacher_spec}"]\nepochs = 2\nbatch-size = 64\nsubset = 100\n'
        "[opt]\ntemperature = 3\n"
    )
    run = tmp_path / "run"
    # a real `kd train` process (the other real ones run under torchrun)
    cmd = [sys.executable, "-m", "kd", "train", "--config", str(cfg), "--run-dir", str(run)]
    r = subprocess.run([*cmd, "--epochs", "3"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    effective = json.loads((run / "config.json").read_text())
    assert effective["epochs"] == 3  # the command line wins
    assert effective["batch_size"] == 64 and effective["method_options"] == {"temperature": 3}
    assert effective["train_samples"] == 100 and effective["source"] == "local"
    yaml_cfg = tmp_path / "train.yaml"
    yaml_cfg.write_text("method: ce\nepochs: 1\nbatchsize: 8\n")
    bad = cli("train", "--config", str(yaml_cfg))
    assert bad.exit_code != 0 and "unknown option(s) ['batchsize']" in bad.stderr


@pytest.mark.serial
def test_torchrun_two_ranks_equal_one_process_with_the_ae_kd_combiner(tmp_path: Path) -> None:
    # ae-kd finds one weight vector per global batch from batch statistics: each rank used to take
    # them from its own slice, so the ranks mixed the teachers differently (weights 1.5e-2 apart).
    from safetensors.torch import load_file

    caches = []
    for seed in (0, 1):  # two trained teachers (one epoch of ce, ~90% top-1): untrained ones' logits are
        # ~0.07 apart, so the weights sit at a corner of the simplex, whatever the batch
        teacher = tmp_path / f"t{seed}.safetensors"
        ok(cli("train", "--method", "ce", "--epochs", "1", "--batch-size", "64", "--seed", str(seed),
               "--student", "kd.models:digits_teacher", "--out", str(teacher)))  # fmt: skip
        cache = tmp_path / f"c{seed}"
        ok(cli("precompute", "--source", f"local:kd.models:digits_teacher@{teacher}", "--out", str(cache)))
        caches += ["--source", f"cache:{cache}"]
    # tolerance=1: the plain min-norm point, not clipped to [0.4, 0.6], so every batch's weights
    # depend on its statistics. 101 samples in batches of 32: the last batch splits 3 + 2.
    args = ["train", *caches, "--combiner", "ae-kd", "--combiner-opt", "tolerance=1", "--method", "kd",
            "--epochs", "2", "--batch-size", "32", "--subset", "101"]  # fmt: skip
    ok(cli(*args, "--out", str(tmp_path / "one.safetensors")))
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "kd", *args,
         "--out", str(tmp_path / "two.safetensors")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    # The tolerance of the plain-kd test above: the weights are float64 sums (rounding ~1e-16), so
    # what is left is DDP's float32 gradient averaging, ~1e-7 relative per step.
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)


def _sigterm_when_progressed(cmd: list[str], run: Path, after_s: float = 0.5) -> subprocess.CompletedProcess:
    """``cmd`` as a process, sent SIGTERM ``after_s`` after its first epoch's checkpoint appeared."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoint.pt").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no epoch finished"
            time.sleep(0.02)
        time.sleep(after_s)  # inside the next epoch: the stop is at a step boundary, not an epoch's
        assert proc.poll() is None, "training finished before it could be stopped"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.serial  # the stop is sent a fixed 0.5 s into the next epoch: it must land inside it
def test_sigterm_stops_kd_train_at_a_step_and_resume_ends_as_an_uninterrupted_run(
    tmp_path: Path, teacher_spec: str
) -> None:
    # SIGTERM (a scheduler's, kill's) used to kill kd train outright (status -15), losing the epoch.
    # 599 steps an epoch (~1 s here): the stop lands inside a later epoch (4 of them, so a machine a
    # few times faster still stops mid-run), and the resumed run must redo neither a step nor skip
    # one (optimiser, batch order, step) for the weights to be equal.
    args = ["train", "--source", f"local:{teacher_spec}", "--epochs", "4", "--batch-size", "2"]
    run = tmp_path / "run"
    r = _sigterm_when_progressed([sys.executable, "-m", "kd", *args, "--run-dir", str(run)], run)
    assert r.returncode == 128 + signal.SIGTERM, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    line = [x for x in r.stderr.splitlines() if x.startswith("stopped by SIGTERM")]
    assert len(line) == 1 and f"checkpoint in {run}" in line[0] and "--resume" in line[0], r.stderr
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert (
        0 <= ckpt["epoch"] < 3
        and 0 < ckpt["partial"]["steps"] < 599
        and f"after {ckpt['partial']['steps']} step(s)" in line[0]
    )
    ok(cli(*args, "--run-dir", str(run), "--resume", "--out", str(tmp_path / "resumed.safetensors")))
    ok(cli(*args, "--run-dir", str(tmp_path / "straight"), "--out", str(tmp_path / "straight.safetensors")))
    from safetensors.torch import load_file

    resumed, straight = (
        load_file(str(tmp_path / "resumed.safetensors")),
        load_file(str(tmp_path / "straight.safetensors")),
    )
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    acc = [[row["test_acc"] for row in csv.DictReader(open(d / "metrics.csv"))] for d in (run, tmp_path / "straight")]
    assert acc[0] == acc[1] and len(acc[0]) == 4


@pytest.mark.serial
def test_sigterm_to_torchrun_ends_its_ranks_cleanly_with_a_checkpoint(tmp_path: Path, teacher_spec: str) -> None:
    # torchrun forwards the SIGTERM to its ranks, which used to die mid-collective; now they agree on
    # the step to stop at, rank 0 writes the checkpoint, and every rank exits 143 (torchrun's own
    # SignalException traceback is torchrun's, not a rank's).
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "kd",
        "train",
        "--source",
        f"local:{teacher_spec}",
        "--epochs",
        "4",
        "--batch-size",
        "2",
        "--run-dir",
        str(run),
    ]
    r = _sigterm_when_progressed(cmd, run, after_s=0.3)
    assert r.returncode != 0
    assert r.stderr.count("stopped by SIGTERM") == 1, r.stderr[-3000:]  # rank 0's line
    assert r.stderr.count("Traceback") <= 1 and "ProcessGroup" not in r.stderr, r.stderr[-3000:]
    assert "Unable to shutdown process" not in r.stderr  # no rank had to be killed
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert "partial" in ckpt


@pytest.mark.parametrize("suffix", ["toml", "yaml"])
def test_a_repeatable_option_written_once_as_a_string_in_a_config_file(tmp_path: Path, teacher_spec: str,
                                                                       suffix: str) -> None:  # fmt: skip
    # `source = "cache:X"` is one source, as `--source cache:X` is (it was "Value must be an iterable").
    cache = tmp_path / "c"
    ok(cli("precompute", "--source", f"local:{teacher_spec}", "--out", str(cache)))
    cfg = tmp_path / f"train.{suffix}"
    sep = " =" if suffix == "toml" else ":"
    cfg.write_text(f'source{sep} "cache:{cache}"\nepochs{sep} 1\nsubset{sep} 40\n')
    r = ok(cli("train", "--config", str(cfg), "--method", "kd"))
    assert json.loads(r.stdout.strip().splitlines()[-1])["source"] == [f"cache:{cache}"]


@pytest.mark.serial
def test_torchrun_two_ranks_equal_one_process_with_the_same_global_batch(tmp_path: Path, teacher_spec: str) -> None:
    cache = tmp_path / "c"
    ok(cli("precompute", "--source", f"local:{teacher_spec}", "--out", str(cache)))
    # 101 samples in batches of 32: the last global batch (5) splits 3 + 2 across the ranks.
    args = ["train", "--source", f"cache:{cache}", "--method", "kd", "--epochs", "3", "--batch-size", "32",
            "--subset", "101"]  # fmt: skip
    single = ok(cli(*args, "--out", str(tmp_path / "one.safetensors")))
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "kd", *args,
         "--out", str(tmp_path / "two.safetensors")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert json.loads(ddp.stdout.strip().splitlines()[-1])["world_size"] == 2
    assert json.loads(single.stdout.strip().splitlines()[-1])["world_size"] == 1
    from safetensors.torch import load_file

    one, two = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)
    # The updates did move the weights: the comparison is not between two initialisations.
    from kd.models import digits_student

    seed_everything(0)
    init = digits_student().state_dict()
    assert any(not torch.allclose(init[k], one[k]) for k in one)


def test_train_and_precompute_run_from_a_thread_other_than_the_main_one(tmp_path: Path, teacher_spec: str) -> None:
    # The SIGTERM handling installs signal handlers, which Python allows from the main thread only:
    # run from another thread (a job runner, a notebook's worker), both commands failed with
    # "StopSignals must be created in the main thread"; they run there without it.
    import threading

    results: dict[str, Result] = {}
    before = signal.getsignal(signal.SIGTERM)

    def run() -> None:
        results["train"] = cli("train", "--method", "ce", "--epochs", "1", "--subset", "50", "--run-dir",
                               str(tmp_path / "run"))  # fmt: skip
        results["precompute"] = cli("precompute", "--source", f"local:{teacher_spec}", "--out", str(tmp_path / "c"),
                                    "--workers", "0")  # fmt: skip

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(timeout=300)
    assert not worker.is_alive()
    for name in ("train", "precompute"):
        ok(results[name])
    assert signal.getsignal(signal.SIGTERM) == before  # nothing was installed from the thread


# Methods whose loss relates the samples of a batch (couples=True; cskd pairs each sample with a
# partner the split may put on the other rank), each with the student-teacher match it needs on the
# digits MLPs (student layer 1: the 16-wide hidden ReLU; teacher layer 4: its second 512-wide one)
# and the samples it trains on, in batches of 16: 45 leave a last global batch of 13 (7 + 6 across
# the ranks), 33 one of 1 (rank 1 has none and still joins the gathers).
COUPLED_RUNS = {
    "dist": ([], 33),
    "gkd": ([], 45),
    "cskd": ([], 45),
    "sp": (["1=4"], 45),
    "rkd": (["1=4"], 33),
    "cckd": (["1=4"], 45),
}
# Trains the digits student on each run of argv[2] (JSON) from the in-process teacher SPEC argv[1] and saves
# its weights to OUT-METHOD.safetensors (argv[3]); under torchrun with the group kd train makes.
_COUPLED_SCRIPT = """
import json, os, sys
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from kd.core.data import load_dataset
from kd.models import digits_student
from kd.student_trainer.sources import LocalSource
from kd.student_trainer.train import TrainConfig, seed_everything, train_student

if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    dist.init_process_group("gloo")
train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
source = LocalSource(sys.argv[1])
for method, (matches, n) in json.loads(sys.argv[2]).items():
    seed_everything(0)
    student = digits_student()
    config = TrainConfig(method=method, matches=matches, epochs=2, batch_size=16, optimizer="sgd", lr=0.1)
    train_student(student, train, test, config, source=source, subset=torch.arange(n))
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in student.state_dict().items()}, f"{sys.argv[3]}-{method}.safetensors")
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
"""


@pytest.mark.serial
def test_torchrun_two_ranks_equal_one_process_with_batch_coupled_losses(tmp_path: Path, teacher_spec: str) -> None:
    # Each rank used to compute these losses on its own slice of the global batch (DIST's correlation
    # over the batch, SP's similarity matrix, RKD's distances, CCKD's kernel matrix, GKD's count of
    # right rows; CS-KD's pairs split apart), so 2 ranks trained another student than one process, or
    # failed (cskd). Now the loop gathers what the loss reads from every rank and computes it on the
    # global batch. SGD, not Adam: Adam's update hardly changes when every gradient is scaled, so
    # it would hide a wrong weighting of the ranks' gradients (without the world_size factor the
    # weights differ by 0.08 to 6.5 here; with Adam by 7e-6). Both sides run the script (one
    # process, and 2 CPU ranks under torchrun with gloo, as kd train makes them), so that the ranks
    # start once for every method.
    from safetensors.torch import load_file

    script = tmp_path / "coupled.py"
    script.write_text(_COUPLED_SCRIPT)
    args = [str(script), teacher_spec, json.dumps(COUPLED_RUNS)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *args, str(tmp_path / "one")], capture_output=True, text=True, timeout=300,
                         env=env)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args,
         str(tmp_path / "two")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    for m in COUPLED_RUNS:
        one, two = load_file(str(tmp_path / f"one-{m}.safetensors")), load_file(str(tmp_path / f"two-{m}.safetensors"))
        assert one.keys() == two.keys()
        for k in one:  # the tolerance of the plain-kd test above (DDP's float32 gradient averaging)
            torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=lambda e, m=m, k=k: f"{m} {k}: {e}")
