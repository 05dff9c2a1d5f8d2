"""Session 17's CLI leftovers: each a refusal before any work where a run used to fail late or take a
value it then ignored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kd.cli import app
from tests.cli_checks import refused


def _npz(path: Path, n: int, features: int, classes: int = 10) -> str:
    """An npz dataset of ``n`` samples of ``features`` values in ``classes`` classes."""
    g = np.random.default_rng(0)
    np.savez(path, x=g.normal(size=(n, features)).astype(np.float32), y=np.arange(n) % classes)
    return f"npz:{path}"


def test_train_refuses_a_val_dataset_of_another_sample_shape_before_training(tmp_path: Path) -> None:
    """The student is evaluated on --val-dataset after each epoch: a split of 12 features for the
    64-feature digits student trained epoch 1 (its checkpoint written) and then failed with torch's
    shape error. Refused up front now, naming both shapes, with nothing written."""
    train, val = _npz(tmp_path / "train.npz", 40, 64), _npz(tmp_path / "val.npz", 20, 12)
    run = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "--method", "ce", "--dataset", train, "--val-dataset", val, "--epochs", "1",
                                 "--run-dir", str(run)])  # fmt: skip
    refused(r, "--student 'kd.models:digits_student' cannot take the samples of --val-dataset", "shaped [12]",
            "while --dataset", "are shaped [64]")  # fmt: skip
    assert not run.exists()
    # before any source is opened: a --read-through cache is not created for a run that cannot go on
    cache = tmp_path / "c"
    r = CliRunner().invoke(app, ["train", "--dataset", train, "--val-dataset", val, "--epochs", "1", "--source",
                                 f"cache:{cache}", "--read-through", "local:kd.models:digits_teacher"])  # fmt: skip
    refused(r, "cannot take the samples of --val-dataset")
    assert not cache.exists()
    # the same student and splits of one shape train (the check refuses only what would fail)
    r = CliRunner().invoke(app, ["train", "--method", "ce", "--dataset", train, "--val-dataset", train, "--epochs",
                                 "1"])  # fmt: skip
    assert r.exit_code == 0, r.output


def test_records_refuses_a_rank_above_every_recorded_layers_width(tmp_path: Path) -> None:
    """--rank 100000 was taken and cut to the logits' 10 values per sample without a word; a rank the
    user gives above every recorded layer's width is refused now, naming the widths, before any file."""
    out = tmp_path / "records.safetensors"
    args = ["records", "--teacher", "kd.models:digits_teacher", "--out", str(out), "--dataset", "digits:test"]
    refused(CliRunner().invoke(app, [*args, "--rank", "100000"]), "--rank 100000", "{'logits': 10}", "at most 10")
    assert not out.exists()
    r = CliRunner().invoke(app, [*args, "--rank", "10"])  # the widest layer's width is a rank
    assert r.exit_code == 0, r.output
    assert out.is_file()


def test_the_studies_refuse_zero_epochs(tmp_path: Path) -> None:
    """kd multitask and kd taskdistill ran --epochs 0 (and multitask --teacher-epochs 0) to the end and
    reported untrained models as their results, exit 0; refused as kd train refuses it, no --json written."""
    js = tmp_path / "r.json"
    cases = [(["multitask", "--tasks", "digit", "--seeds", "1", "--epochs", "0", "--teacher-epochs", "1"],
              "--epochs and --teacher-epochs must be >= 1, got 0 and 1"),
             (["multitask", "--tasks", "digit", "--seeds", "1", "--epochs", "1", "--teacher-epochs", "0"],
              "--epochs and --teacher-epochs must be >= 1, got 1 and 0"),
             (["taskdistill", "--seeds", "1", "--epochs", "0"], "--epochs must be >= 1, got 0")]  # fmt: skip
    for args, needle in cases:
        refused(CliRunner().invoke(app, [*args, "--json", str(js)]), needle)
        assert not js.exists()


def test_serve_refuses_teacher_names_that_cannot_be_named_again(tmp_path: Path) -> None:
    """A teacher named a/b was served, and no server:HOST:PORT/NAME reference could name it (its "/"
    splits the address from the name). Refused with the allowed pattern, from --teacher and --config.
    (--dataset is unreadable so that the old code, which took the name, fails instead of serving.)"""
    bad = ["--dataset", f"d=npz:{tmp_path / 'missing.npz'}", "--port", "0"]
    for name in ("a/b", "-t", "t t"):
        r = CliRunner().invoke(app, ["serve", "--teacher", f"{name}=kd.models:digits_teacher", *bad])
        refused(r, f"--teacher: teacher name {name!r} must match [A-Za-z0-9][A-Za-z0-9_.-]")
    config = tmp_path / "c.toml"
    config.write_text('[[teacher]]\nname = "x=y"\nspec = "kd.models:digits_teacher"\n')
    refused(CliRunner().invoke(app, ["serve", "--config", str(config), *bad]),
            f"--config {str(config)!r}: teacher name 'x=y' must match")  # fmt: skip


def test_serve_refuses_a_teacher_factory_that_fails_in_one_line() -> None:
    """A teacher factory raising anything but TypeError (torch's RuntimeError for a negative size here)
    printed a traceback from kd serve; it is one line naming the factory and its arguments, exit 2."""
    r = CliRunner().invoke(app, ["serve", "--teacher", "t=kd.models:MLP?sizes=[64,-3]", "--port", "0"])
    refused(r, "the teacher factory 'kd.models:MLP' failed with the arguments {'sizes': [64, -3]}: RuntimeError:",
            "negative dimension -3")  # fmt: skip


def test_a_chain_opens_its_splits_once(tmp_path: Path, monkeypatch) -> None:
    """kd chain opened --dataset and --val-dataset three times before training (the CLI's check_chain,
    run_chain's own, then open_splits): three directory scans of an image folder. The CLI opens them once
    and hands them on, and run_chain called alone opens them once too (kd's own open_source, counted)."""
    import kd.chain

    opened: list[str] = []
    real = kd.chain.open_source

    def counting(uri: str, *args, **kwargs):
        opened.append(uri)
        return real(uri, *args, **kwargs)

    monkeypatch.setattr(kd.chain, "open_source", counting)
    quick = {"mode": "born-again", "models": ["kd.models:digits_student"], "epochs": 1, "teacher_epochs": 1,
             "labeled": 20}  # fmt: skip
    r = CliRunner().invoke(app, ["chain", "--mode", "born-again", "-m", quick["models"][0], "--epochs", "1",
                                 "--teacher-epochs", "1", "--labeled", "20", "--no-serve",
                                 "--out", str(tmp_path / "cli")])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert sorted(opened) == ["digits:test", "digits:train"]
    opened.clear()
    kd.chain.run_chain(tmp_path / "lib", serve=False, **quick)
    assert sorted(opened) == ["digits:test", "digits:train"]


# The five commands that take the training-recipe flags (kd.cli.RECIPE_FLAGS, declared once), each with
# what it needs to get as far as its recipe check (nothing is read or reached before it).
RECIPE_COMMANDS = {
    "train": ["train", "--epochs", "1"],
    "chain": ["chain", "--out", "{tmp}/chain"],
    "datafree": ["datafree", "dafl", "--server", "127.0.0.1:1"],
    "onpolicy": ["onpolicy", "--server", "127.0.0.1:1", "--teacher", "t", "--dataset", "text:{tmp}/none",
                 "--student", "kd.models:digits_student"],
    "train-lm": ["train-lm", "--source", "cache:{tmp}/c", "--dataset", "text:{tmp}/none", "--val-dataset",
                 "text:{tmp}/none", "--student", "kd.models:digits_student"],
}  # fmt: skip
BAD_RECIPES = [
    (["--optimizer", "sgd", "--momentum", "1.5"], "momentum must be < 1, got 1.5"),
    (["--schedule", "multistep", "--milestones", "3,x"], "--milestones must be comma-separated epochs"),
    (["--warmup-epochs", "-1"], "warmup_epochs must be a finite number >= 0, got -1.0"),
    (["--optimizer", "sgd", "--nesterov", "--momentum", "0"], "nesterov needs --optimizer sgd with momentum > 0"),
]


@pytest.mark.parametrize("command", list(RECIPE_COMMANDS))
def test_the_recipe_flags_are_refused_alike_by_every_command(tmp_path: Path, command: str) -> None:
    """The recipe flags are declared once (kd.cli.RECIPE_FLAGS) and checked by one helper (_recipe): each
    of the five commands refuses the same bad recipe with the same message, before any work. (A mutant
    of _recipe that skips its validation fails this for datafree and train-lm; train and chain check the
    recipe again later, onpolicy in its config.)"""
    args = [a.replace("{tmp}", str(tmp_path)) for a in RECIPE_COMMANDS[command]]
    for bad, needle in BAD_RECIPES:
        refused(CliRunner().invoke(app, [*args, *bad]), needle)
    assert list(tmp_path.iterdir()) == []


def test_the_recipe_flags_are_the_same_options_in_every_command() -> None:
    """Every recipe flag of the five commands is the option RECIPE_FLAGS declares: its type, and its
    default where the command does not state its own (kd train and chain: lr 3e-3, the stages' before)."""
    import typer

    from kd.cli import RECIPE_FLAGS

    commands = typer.main.get_command(app).commands
    for name in RECIPE_COMMANDS:
        params = {p.name: p for p in commands[name].params}
        missing = sorted(set(RECIPE_FLAGS) - set(params) - ({"channels_last"} if name in ("onpolicy", "train-lm")
                                                           else set()))  # fmt: skip
        assert not missing, (name, missing)
        for flag, (kind, default, _decls, _help) in RECIPE_FLAGS.items():
            if flag not in params:
                continue
            assert params[flag].type_descriptor.annotation is kind, (name, flag)
            own = {("train", "lr"): 3e-3, ("chain", "lr"): 3e-3}.get((name, flag), default)
            assert params[flag].default == own, (name, flag, params[flag].default)


def test_chain_refuses_the_recipe_flags_its_recipe_would_ignore(tmp_path: Path) -> None:
    """kd chain took --momentum with Adam and --gamma without the multistep schedule and trained every
    stage as if they had not been given; refused now as kd train, onpolicy and train-lm refuse them
    (_recipe with the context). An unreadable --val-dataset makes the old code fail instead of training."""
    args = ["chain", "--out", str(tmp_path / "out"), "--val-dataset", f"npz:{tmp_path / 'none.npz'}"]
    refused(CliRunner().invoke(app, [*args, "--momentum", "0.5"]), "--momentum applies only with --optimizer sgd")
    refused(CliRunner().invoke(app, [*args, "--gamma", "0.5"]), "--gamma applies only with --schedule multistep")
    assert list(tmp_path.iterdir()) == []


def test_serve_refuses_a_teacher_that_cannot_take_its_own_input_shape_in_one_line() -> None:
    """load_teacher's probe forward (zeros of the teacher's input shape) raised torch's RuntimeError,
    which kd serve printed as a traceback; it is a TeacherLoadError naming the teacher and the shape."""
    r = CliRunner().invoke(app, ["serve", "--teacher", "t=kd.models:MLP?sizes=[64,10]&input_shape=3x32x32",
                                 "--port", "0"])  # fmt: skip
    refused(r, "teacher 't' cannot take inputs of its input shape [3, 32, 32]: RuntimeError: mat1 and mat2 shapes")


def test_a_server_binds_an_ipv6_host() -> None:
    """kd serve --host ::1 was refused ("cannot bind ::1:0": gRPC read the unbracketed address as
    ::0.1.0.0 port 443); the host is bracketed now and a client reaches the server at [::1]:PORT.
    Skipped where this machine has no IPv6 loopback (not counted as a pass)."""
    import socket

    import torch

    from kd.teacher_server.client import TeacherClient
    from kd.teacher_server.loading import load_teacher
    from kd.teacher_server.server import start_server

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    teacher = load_teacher("t", "kd.models:digits_teacher")
    running = start_server([teacher], host="::1", port=0)
    try:
        with TeacherClient(f"[::1]:{running.port}") as client:
            out = client.infer("t", torch.zeros(2, 64))
        assert tuple(out["logits"].shape) == (2, 10)
    finally:
        running.stop(0)
