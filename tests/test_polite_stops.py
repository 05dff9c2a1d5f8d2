"""SIGTERM / Ctrl-C stop the long-running commands at a step or batch boundary, as they do
``kd train`` and ``kd precompute`` (tests/test_train_loop.py, tests/test_precompute_cli.py):
one ``stopped by SIG...`` line, exit 128 + the signal, and what was done kept (a token cache's
records committed, kd online's checkpoint) or, for a command that cannot resume, nothing
half-done written. Each command runs as a real process and gets a real signal once it has
provably entered its loop (a line it prints, a file it writes, a forward of the served teacher);
servers run in this process on 127.0.0.1 port 0."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import Result
from tiny_lm import BigramLM
from typer.testing import CliRunner

from kd.cache import CacheReader
from kd.cli import app
from kd.teacher_server.loading import load_teacher, save_weights
from kd.teacher_server.server import TeacherOptions, start_server

HERE = Path(__file__).resolve().parent
# This file's models (module:factory) load in the kd processes too.
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}  # fmt: skip
VOCAB = 259  # the byte tokenizer's


def teacher_lm() -> BigramLM:
    torch.manual_seed(21)
    return BigramLM(16, 3.0, max_length=64)


def student_lm() -> BigramLM:
    torch.manual_seed(22)
    return BigramLM(8, 1.0, max_length=64)


TEACHER, STUDENT = f"{__name__}:teacher_lm", f"{__name__}:student_lm"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("stops")
    words = ["kd", "serve", "teacher", "student", "token", "on", "policy", "cache", "stop", "signal"]
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (2 + k % 5,), generator=g))
             for k in range(240)]  # fmt: skip
    (d / "train.txt").write_text("\n".join(lines) + "\n")
    (d / "small.txt").write_text("\n".join(lines[:24]) + "\n")
    return {
        "big": f"text:{d / 'train.txt'}?doc=line&pack=0&block=24",  # 240 sequences, one per line
        "small": f"text:{d / 'small.txt'}?doc=line&pack=0&block=24",  # 24
    }


def cli(*args: str) -> Result:
    """``kd ARGS`` in this process (typer's runner on ``kd.cli.app``)."""
    return CliRunner().invoke(app, list(args))


def ok(r: Result) -> Result:
    assert r.exit_code == 0, (r.output, r.exception)
    return r


def stop_when(args: list[str], ready: Callable[[str], bool], sig: int = signal.SIGTERM,
              within_s: float = 120) -> subprocess.CompletedProcess:  # fmt: skip
    """``kd ARGS`` as a process, sent ``sig`` once ``ready(its stderr so far)`` holds (polled),
    failing if it ends first; -> its status, stdout and stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "kd", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)  # fmt: skip
    out: list[str] = []
    err: list[str] = []
    readers = [threading.Thread(target=lambda f=f, into=into: into.extend(iter(f.readline, "")), daemon=True)
               for f, into in ((proc.stdout, out), (proc.stderr, err))]  # fmt: skip
    for t in readers:
        t.start()
    try:
        deadline = time.monotonic() + within_s
        while not ready("".join(err)):
            assert proc.poll() is None, f"ended (status {proc.returncode}) before it could be stopped: {''.join(err)}"
            assert time.monotonic() < deadline, f"never got ready: {''.join(err)[-2000:]}"
            time.sleep(0.01)
        assert proc.poll() is None, "ended before it could be stopped"
        proc.send_signal(sig)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for t in readers:
            t.join(timeout=10)
    return subprocess.CompletedProcess(args, proc.returncode, "".join(out), "".join(err))


def stop_line(r: subprocess.CompletedProcess, sig: int = signal.SIGTERM) -> str:
    """The one ``stopped by SIG...`` line of a process that exited 128 + ``sig`` without a traceback."""
    name = signal.Signals(sig).name
    assert r.returncode == 128 + sig, f"status {r.returncode}: {r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr and "error:" not in r.stderr, r.stderr[-3000:]
    lines = [x for x in r.stderr.splitlines() if x.startswith("stopped by")]
    assert len(lines) == 1 and lines[0].startswith(f"stopped by {name}: "), r.stderr[-3000:]
    return lines[0]


def cache_open(path: Path) -> bool:
    """The cache's metadata is committed: its writer opened (after the command set its handlers)."""
    try:
        CacheReader(path)
    except Exception:  # noqa: BLE001 - no data.mdb, or no metadata yet
        return False
    return True


def test_sigterm_stops_token_precompute_with_every_finished_record_committed(tmp_path: Path, corpus) -> None:
    # Killed outright before (status -15), its uncommitted sequences lost. --commit-every above the
    # corpus: every sequence done when the signal is seen is pending then, so all that the cache
    # holds afterwards was committed by the stop.
    out = tmp_path / "c"
    args = ["precompute", "--source", f"local:{TEACHER}", "--dataset", corpus["big"], "--out", str(out),
            "--batch-size", "2", "--commit-every", "100000"]  # fmt: skip
    line = stop_line(stop_when(args, lambda _: cache_open(out)))
    report = CacheReader(out).verify()
    assert report.problems == [] and 2 <= report.present < 240 and report.present % 2 == 0, report
    assert line == (f"stopped by SIGTERM: {report.present} more sequences committed to {out} (0 were already "
                    "there); run the same command again to resume")  # fmt: skip
    resumed = ok(cli(*args))
    assert f"wrote {240 - report.present}, skipped {report.present} already cached" in resumed.stderr
    straight = tmp_path / "straight"
    ok(cli(*args[:5], "--out", str(straight), *args[7:]))
    a, b = CacheReader(out), CacheReader(straight)
    assert a.verify().ok and len(a) == len(b) == 240
    for x, y in zip(a.read_sequences(range(240)), b.read_sequences(range(240))):
        assert x.tobytes() == y.tobytes()


def test_ctrl_c_stops_train_lm_between_steps_and_saves_no_half_trained_student(tmp_path: Path, corpus) -> None:
    # Ctrl-C used to end it in a KeyboardInterrupt (130, no word of where it was); SIGTERM killed
    # it. Without --run-dir it cannot resume: the line says so, and --out is not written.
    cache = tmp_path / "c"
    ok(cli("precompute", "--source", f"local:{TEACHER}", "--dataset", corpus["small"], "--out", str(cache)))
    out = tmp_path / "student.safetensors"
    args = ["train-lm", "--source", f"cache:{cache}", "--dataset", corpus["small"], "--val-dataset", corpus["small"],
            "--student", STUDENT, "--epochs", "100000", "--batch-size", "4", "--out", str(out)]  # fmt: skip
    r = stop_when(args, lambda err: "epoch 1: loss" in err, signal.SIGINT)
    line = stop_line(r, signal.SIGINT)
    m = re.fullmatch(r"stopped by SIGINT: in epoch (\d+) after (\d+) of its steps; the student is not saved: "
                     r"no --run-dir to resume from \(run it again from the start; with --run-dir a stop leaves a "
                     r"checkpoint\)", line)  # fmt: skip
    assert m and int(m[1]) >= 2 and 0 <= int(m[2]) < 6, line  # 24 sequences: 6 steps of 4 an epoch
    assert f"epoch {m[1]}: loss" not in r.stderr  # that epoch did not end
    assert not out.exists() and r.stdout == ""  # no weights, no result line


def test_sigterm_stops_train_lm_with_a_checkpoint_and_resume_ends_as_an_uninterrupted_run(tmp_path: Path,
                                                                                          corpus) -> None:  # fmt: skip
    # With --run-dir the stop leaves a checkpoint, and --resume (here with the epoch it stopped in as
    # the last) ends with the losses, perplexity and weights of a run never stopped.
    from kd.teacher_server.loading import read_state_dict

    cache = tmp_path / "c"
    ok(cli("precompute", "--source", f"local:{TEACHER}", "--dataset", corpus["small"], "--out", str(cache)))
    base = ["train-lm", "--source", f"cache:{cache}", "--dataset", corpus["small"], "--val-dataset", corpus["small"],
            "--student", STUDENT, "--batch-size", "4"]  # fmt: skip
    run = tmp_path / "run"
    r = stop_when([*base, "--run-dir", str(run), "--epochs", "100000"], lambda err: "epoch 1: loss" in err)
    m = re.fullmatch(r"stopped by SIGTERM: in epoch (\d+) after (\d+) of its steps; checkpoint in (.+): run the same "
                     r"command with --resume to continue", stop_line(r))  # fmt: skip
    assert m and m[3] == str(run) and int(m[1]) >= 2 and 0 <= int(m[2]) < 6, r.stderr[-2000:]
    epochs = ["--epochs", m[1], "--out"]
    resumed = ok(cli(*base, "--run-dir", str(run), "--resume", *epochs, str(tmp_path / "a.safetensors")))
    straight = ok(cli(*base, *epochs, str(tmp_path / "b.safetensors")))
    # It ran only the epoch it was stopped in (a resume that started over would validate epoch 1 again).
    assert f"epoch {m[1]}: loss" in resumed.stderr and "epoch 1: loss" not in resumed.stderr, resumed.stderr
    a, b = (json.loads(x.stdout.strip().splitlines()[-1]) for x in (resumed, straight))
    # Bit for bit: the same single-threaded CPU arithmetic in both processes.
    assert len(a["losses"]) == int(m[1]) and a["losses"] == b["losses"] and a["val_ppl"] == b["val_ppl"]
    wa, wb = read_state_dict(tmp_path / "a.safetensors"), read_state_dict(tmp_path / "b.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wb)


def test_sigterm_stops_onpolicy_between_steps(tmp_path: Path, corpus) -> None:
    teacher = load_teacher("bigram", f"{TEACHER}?input_shape=-1")
    scored = threading.Event()  # the served teacher's first forward: a step of the loop asked it
    teacher.model.register_forward_hook(lambda *_: scored.set())
    running = start_server([teacher], batching=TeacherOptions(max_batch_size=16, max_queue_delay_us=200,
                                                              warmup=False))  # fmt: skip
    try:
        out = tmp_path / "student.safetensors"
        args = ["onpolicy", "--server", f"127.0.0.1:{running.port}", "--teacher", "bigram", "--dataset",
                corpus["small"], "--student", STUDENT, "--steps", "100000", "--batch-size", "4", "--prompt-tokens",
                "4", "--max-new-tokens", "6", "--eval-prompts", "0", "--out", str(out)]  # fmt: skip
        r = stop_when(args, lambda _: scored.is_set())
    finally:
        running.stop(grace=1)
    line = stop_line(r)
    m = re.fullmatch(r"stopped by SIGTERM: after (\d+) of 100000 steps; the student is not saved: no --run-dir to "
                     r"resume from \(run it again from the start; with --run-dir a stop leaves a checkpoint\)",
                     line)  # fmt: skip
    assert m and 1 <= int(m[1]) < 100000, line  # the teacher scored step 0 before the signal
    assert not out.exists() and r.stdout == ""


def test_sigterm_stops_datafree_between_rounds_and_resume_continues_from_its_last_epoch(tmp_path: Path) -> None:
    """A stop keeps the run directory's whole epochs (no half-done checkpoint) and says how to go on;
    ``--resume`` continues there: the second process's epochs follow the first's, which stay as they
    were. (Exactness of the resumed training, method by method: test_datafree_trainer.)"""
    from kd.models import digits_cnn

    torch.manual_seed(0)
    weights = save_weights(digits_cnn(), tmp_path / "cnn.safetensors")  # untrained: only the stop is tested
    teacher = load_teacher("cnn", f"kd.models:digits_cnn@{weights}")
    running = start_server([teacher], options={"cnn": TeacherOptions(access="white")})
    run, out = tmp_path / "run", tmp_path / "student.safetensors"

    def epochs() -> list[str]:
        return (run / "metrics.csv").read_text().splitlines()[1:] if (run / "metrics.csv").exists() else []

    try:
        args = ["datafree", "dafl", "--server", f"127.0.0.1:{running.port}/cnn", "--steps", "100000",
                "--eval-every", "2", "--batch-size", "8", "--opt", "nz=16", "--opt", "generator_width=8",
                "--val-dataset", "none", "--run-dir", str(run), "--out", str(out)]  # fmt: skip
        r = stop_when(args, lambda _: len(epochs()) >= 1)  # an epoch (2 rounds) ended
        line = stop_line(r)
        m = re.fullmatch(r"stopped by SIGTERM: in epoch (\d+) after (\d+) step\(s\); (.+) holds the checkpoint of "
                         r"the last --eval-every rounds done: run the same command with --resume to continue from "
                         r"there", line)  # fmt: skip
        assert m and int(m[1]) >= 1 and int(m[2]) in (0, 1) and m[3] == str(run), line
        assert not out.exists() and r.stdout == ""
        # The run directory holds exactly the epochs that ended, each whole: no half-done checkpoint.
        first = epochs()
        assert len(first) == int(m[1]), first
        ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
        assert ckpt["epoch"] == int(m[1]) - 1 and "partial" not in ckpt

        r = stop_when([*args, "--resume"], lambda _: len(epochs()) >= len(first) + 1)
        stop_line(r)
    finally:
        running.stop(grace=1)
    later = epochs()
    assert later[: len(first)] == first  # the first process's epochs, untouched
    assert [int(x.split(",")[0]) for x in later] == list(range(len(later)))  # numbered on, not from 0 again
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == len(later) - 1


def test_a_datafree_stop_before_its_first_checkpoint_does_not_offer_a_resume(tmp_path: Path) -> None:
    """--eval-every left at 0: the run is one trainer epoch, checkpointed only at its end. A stop in
    it leaves no checkpoint.pt, so the stop line must not tell the user to --resume (it did, and
    --resume then failed: 'it has no checkpoint.pt')."""
    from kd.models import digits_cnn

    torch.manual_seed(0)
    weights = save_weights(digits_cnn(), tmp_path / "t.safetensors")
    teacher = load_teacher("cnn", f"kd.models:digits_cnn@{weights}")
    running = start_server([teacher], options={"cnn": TeacherOptions(access="white")})
    run = tmp_path / "run"
    try:
        args = ["datafree", "dafl", "--server", f"127.0.0.1:{running.port}/cnn", "--steps", "100000",
                "--batch-size", "8", "--opt", "nz=16", "--opt", "generator_width=8", "--val-dataset", "none",
                "--run-dir", str(run)]  # fmt: skip
        r = stop_when(args, lambda _: (run / "config.json").exists())  # the trainer started its only epoch
    finally:
        running.stop(grace=1)
    line = stop_line(r)
    assert not (run / "checkpoint.pt").exists()
    assert "--resume" not in line and f"{run} holds no checkpoint to resume from" in " ".join(line.split()), line


def test_sigterm_stops_online_at_a_step_and_resume_ends_as_an_uninterrupted_run(tmp_path: Path) -> None:
    # Killed outright before (status -15), the epoch lost. Stopped in epoch 1 or later (the signal
    # follows epoch 0's checkpoint), the resumed run must redo no step and skip none.
    args = ["online", "one", "--labeled", "120", "--batch-size", "4", "--epochs", "3", "--branches", "2",
            "--width", "4"]  # fmt: skip
    run = tmp_path / "run"
    r = stop_when([*args, "--run-dir", str(run)], lambda _: (run / "checkpoint.pt").exists())
    line = stop_line(r)
    m = re.fullmatch(rf"stopped by SIGTERM: in epoch (\d+) after (\d+) step\(s\); checkpoint in {re.escape(str(run))}:"
                     r" run the same command with --resume to continue", line)  # fmt: skip
    assert m and 1 <= int(m[1]) < 3 and 0 <= int(m[2]) < 30, line  # 30 steps of 4 an epoch
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == int(m[1]) - 1 and ckpt["partial"]["steps"] == int(m[2])
    assert not (run / "online.json").exists()
    ok(cli(*args, "--run-dir", str(run), "--resume"))
    ok(cli(*args, "--run-dir", str(tmp_path / "straight")))
    resumed, straight = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (run, tmp_path / "straight"))
    assert resumed["epoch"] == straight["epoch"] == 2
    for key in ("model", "optimizer", "extra", "hooks"):  # every module's weights, optimiser's and method's state
        a, b = leaves(resumed.get(key)), leaves(straight.get(key))
        assert len(a) == len(b), key
        for x, y in zip(a, b):
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, key
    assert len(leaves(resumed["model"])) > 0
    summaries = [json.loads((d / "online.json").read_text()) for d in (run, tmp_path / "straight")]
    for s in summaries:
        s.pop("seconds")
    assert summaries[0] == summaries[1]


def leaves(tree: object) -> list[object]:
    """The tensors, numbers and strings of nested dicts and lists (a state_dict), in order."""
    if isinstance(tree, dict):
        return [x for k in sorted(tree, key=str) for x in leaves(tree[k])]
    if isinstance(tree, list | tuple):
        return [x for v in tree for x in leaves(v)]
    return [tree]


def test_sigterm_stops_qkd_inside_a_phase_with_its_checkpoints(tmp_path: Path, teacher_spec: str) -> None:
    # Killed outright before (status -15). No later phase, no int8 conversion, nothing in --out; with
    # --run-dir each phase's checkpoint (the stopped one's at its step) for --resume (whose result is
    # the uninterrupted run's: test_qkd).
    out, run = tmp_path / "q", tmp_path / "run"
    args = ["qkd", "--teacher", f"local:{teacher_spec}", "--epochs-self", "1", "--epochs-co", "100000",
            "--epochs-tutor", "1", "--out", str(out), "--run-dir", str(run)]  # fmt: skip
    r = stop_when(args, lambda err: "qkd self_studying epoch 1/1: loss" in err)
    line = stop_line(r)
    m = re.fullmatch(r"stopped by SIGTERM: in phase co_studying, in epoch (\d+) after (\d+) step\(s\); checkpoint "
                     rf"in {re.escape(str(run))}: run the same command with --resume.*", line)  # fmt: skip
    assert m and 0 <= int(m[2]) < 38, line  # 1198 samples: 38 steps of 32 an epoch
    assert list(out.iterdir()) == [] and r.stdout == ""
    assert torch.load(run / "self_studying" / "checkpoint.pt", weights_only=True)["epoch"] == 0  # finished
    assert torch.load(run / "co_studying" / "checkpoint.pt", weights_only=True)["partial"]["steps"] == int(m[2])
    assert not (run / "tutoring").exists()
