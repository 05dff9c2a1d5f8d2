"""kd train's flags and --config files (trainer report F2, F3, F8-F12): flags that would be ignored
are refused, a recipe's method options apply only to their method, on/off flags can be turned off
from the command line, --subset and --views are checked, --resume accepts a changed --workers but
not another validation split, and option ranges and refusals follow the one-error-line rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kd.cli import app
from kd.core.data import load_dataset, open_source
from kd.models import digits_student
from kd.student_trainer.losses import get_method
from kd.student_trainer.losses.mgd import mgd_loss
from kd.student_trainer.losses.noisy import perturb_teacher
from kd.student_trainer.train import TrainConfig, load_checkpoint, train_student
from tests.cli_checks import refused

ROOT = Path(__file__).resolve().parents[1]
CIFAR = str(ROOT / "configs" / "cifar100_mdistiller.yaml")
SUB = ["--epochs", "1", "--subset", "32", "--batch-size", "16"]


def _train(*args: str):
    return CliRunner().invoke(app, ["train", *args])


def _config(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


# --- F2: recipe flags that the optimiser or schedule would ignore ---------------------------------


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--milestones", "1,2", "--gamma", "0.1"], ["--milestones applies only with --schedule multistep"]),
        (["--gamma", "0.5"], ["--gamma applies only with --schedule multistep (the schedule is constant)"]),
        (["--schedule", "cosine", "--milestones", "1"], ["--milestones", "(the schedule is cosine)"]),
        (["--optimizer", "adamw", "--momentum", "0.5"], ["--momentum applies only with --optimizer sgd or dot",
                                                          "(adamw has no momentum)"]),
        (["--momentum", "0.9"], ["--momentum", "(adam has no momentum)"]),  # the default optimiser, default value
    ],
)  # fmt: skip
def test_flags_the_recipe_would_ignore_are_refused(args: list[str], needles: list[str]) -> None:
    refused(_train("--method", "ce", *SUB, *args), *needles)


def test_the_same_flags_where_they_apply_train(tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = _train("--method", "ce", *SUB, "--optimizer", "sgd", "--momentum", "0.5", "--schedule", "multistep",
               "--milestones", "0", "--gamma", "0.5", "--run-dir", str(run))  # fmt: skip
    assert r.exit_code == 0, r.output
    config = _config(run)
    assert (config["momentum"], config["milestones"], config["gamma"]) == (0.5, [0], 0.5)


def test_a_config_value_whose_setting_the_command_line_replaced_is_left_out(tmp_path: Path) -> None:
    """The shipped recipe's momentum with --optimizer adamw, its milestones with --schedule cosine:
    left out with a note (a file's value cannot be unset from the command line)."""
    run = tmp_path / "run"
    r = _train("--config", CIFAR, "--method", "ce", *SUB, "--optimizer", "adamw", "--schedule", "cosine",
               "--run-dir", str(run))  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "note: --momentum from --config" in r.output and "note: --milestones from --config" in r.output
    config = _config(run)
    assert (config["optimizer"], config["schedule"], config["milestones"]) == ("adamw", "cosine", [])
    assert config["lr"] == 0.05  # the rest of the file still applies


def test_a_config_that_contradicts_itself_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optimizer: adam\nmomentum: 0.5\nmethod: ce\n")
    refused(_train("--config", str(cfg), *SUB), f"--momentum (set in --config {str(cfg)!r}) applies only with")


# --- F3: a recipe's method options belong to its method -------------------------------------------


def test_the_shipped_recipe_trains_other_methods_with_their_own_options(tmp_path: Path, teacher_spec: str) -> None:
    """Its options are keyed by method: --method dkd got kd's alpha 0.9 as DKD's TCKD weight, and
    --method dist was refused ("no option alpha")."""
    for method in ("dkd", "dist", "kd"):
        run = tmp_path / method
        r = _train("--config", CIFAR, "--method", method, "--source", f"local:{teacher_spec}", *SUB,
                   "--milestones", "1", "--run-dir", str(run))  # fmt: skip
        assert r.exit_code == 0, (method, r.output)
        expected = {"temperature": 4, "alpha": 0.9} if method == "kd" else {}
        assert _config(run)["method_options"] == expected, method
    run = tmp_path / "dkd-opt"  # the command line's --opt still applies
    r = _train("--config", CIFAR, "--method", "dkd", "--opt", "beta=2", "--source", f"local:{teacher_spec}", *SUB,
               "--milestones", "1", "--run-dir", str(run))  # fmt: skip
    assert r.exit_code == 0, r.output
    assert _config(run)["method_options"] == {"beta": 2}


def test_a_plain_opt_table_under_another_method_is_refused_naming_it(tmp_path: Path, teacher_spec: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: kd\nopt:\n  temperature: 4\n  alpha: 0.9\n")
    refused(_train("--config", str(cfg), "--method", "dkd", "--source", f"local:{teacher_spec}", *SUB),
            f"--config {str(cfg)!r} sets method options ['alpha', 'temperature'] for its method 'kd', "
            "not for --method 'dkd'")  # fmt: skip
    run = tmp_path / "run"  # its own method: the file's options, the command line's --opt winning key by key
    r = _train("--config", str(cfg), "--opt", "alpha=0.5", "--source", f"local:{teacher_spec}", *SUB,
               "--run-dir", str(run))  # fmt: skip
    assert r.exit_code == 0, r.output
    assert _config(run)["method_options"] == {"temperature": 4, "alpha": 0.5}
    # A file without `method:` trains kd (the default): its plain table is kd's, refused under dkd too
    implicit = tmp_path / "implicit.yaml"
    implicit.write_text("opt:\n  temperature: 4\n  alpha: 0.9\n")
    refused(_train("--config", str(implicit), "--method", "dkd", "--source", f"local:{teacher_spec}", *SUB),
            "sets method options ['alpha', 'temperature'] for its method 'kd', not for --method 'dkd'")  # fmt: skip
    bad = tmp_path / "bad.yaml"
    bad.write_text("opt:\n  kd: {alpha: 0.5}\n  no_such_method: {x: 1}\n")
    refused(_train("--config", str(bad), *SUB), "not such: ['no_such_method']")


# --- F8: --subset, and --resume with another --workers ----------------------------------------------


def test_a_subset_larger_than_the_split_is_refused() -> None:
    n = len(load_dataset("digits", "train"))
    refused(_train("--method", "ce", "--epochs", "1", "--subset", str(n + 1)),
            f"--subset {n + 1} is larger than --dataset digits/train@", f"({n} samples)")  # fmt: skip


def _stop_at(call: int):
    calls = [0]

    def stop() -> int | None:
        calls[0] += 1
        return 15 if calls[0] == call else None

    return stop


def test_resume_with_other_workers_gives_the_uninterrupted_weights(tmp_path: Path) -> None:
    """Workers read the batches that the main process plans: a run stopped in epoch 1 and resumed
    with workers=2 ends with the weights of an uninterrupted workers=0 run, bit for bit."""
    train, test = open_source("digits"), open_source("digits:test")
    sub = torch.arange(96)
    cfg = TrainConfig(method="ce", epochs=2, batch_size=32, optimizer="sgd", lr=0.1)
    torch.manual_seed(0)
    whole = digits_student()
    train_student(whole, train, test, cfg, subset=sub)
    torch.manual_seed(0)
    part = digits_student()
    r = train_student(part, train, test, cfg, subset=sub, run_dir=tmp_path, stop=_stop_at(6))
    assert r.stopped_at == (1, 1)
    torch.manual_seed(0)
    resumed = digits_student()
    train_student(resumed, train, test, TrainConfig(**{**cfg.__dict__, "workers": 2}), subset=sub,
                  run_dir=tmp_path, resume=True)  # fmt: skip
    for k, v in whole.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


# --- F9: on/off flags from a config can be turned off -----------------------------------------------


def test_on_off_flags_from_a_config_can_be_turned_off(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optimizer: sgd\nnesterov: true\nchannels-last: true\nprogress: true\nmethod: ce\n")
    on, off = tmp_path / "on", tmp_path / "off"
    assert _train("--config", str(cfg), *SUB, "--run-dir", str(on)).exit_code == 0
    r = _train("--config", str(cfg), *SUB, "--no-nesterov", "--no-channels-last", "--no-progress",
               "--run-dir", str(off))  # fmt: skip
    assert r.exit_code == 0, r.output
    assert (_config(on)["nesterov"], _config(on)["channels_last"]) == (True, True)
    assert (_config(off)["nesterov"], _config(off)["channels_last"]) == (False, False)


def test_resume_in_a_config_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: ce\nresume: true\n")
    refused(_train("--config", str(cfg), *SUB, "--run-dir", str(tmp_path / "run")),
            "resume is not a recipe setting", "give --resume on the command line")  # fmt: skip


# --- F10: the validation split is part of a run -------------------------------------------------------


def test_resume_with_another_validation_split_is_refused(tmp_path: Path) -> None:
    import numpy as np

    digits = load_dataset("digits", "test")
    other = tmp_path / "other_val.npz"
    np.savez(other, x=digits.inputs[::2].numpy(), y=digits.labels[::2].numpy())
    train, test, test2 = open_source("digits"), open_source("digits:test"), open_source(f"npz:{other}")
    cfg = TrainConfig(method="ce", epochs=2, batch_size=32)
    run = tmp_path / "run"
    torch.manual_seed(0)
    train_student(digits_student(), train, test, cfg, subset=torch.arange(64), run_dir=run, stop=_stop_at(3))
    assert _config(run)["val_dataset"] == test.dataset_id
    with pytest.raises(ValueError, match=r"differs in \['val_dataset'\] \(val_dataset: checkpoint 'digits/test@"):
        train_student(digits_student(), train, test2, cfg, subset=torch.arange(64), run_dir=run, resume=True)
    # A checkpoint written before the split was recorded: resumed on the split given (nothing to check).
    ckpt = load_checkpoint(run / "checkpoint.pt")
    del ckpt["config"]["val_dataset"]
    torch.save(ckpt, run / "checkpoint.pt")
    r = train_student(digits_student(), train, test2, cfg, subset=torch.arange(64), run_dir=run, resume=True)
    assert len(r.acc_per_epoch) == 2


# --- F11: option ranges, --views -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "options", "why"),
    [
        ("mgd", {"stage_decay": -2}, "option stage_decay=-2 must be > 0"),
        ("mgd", {"stage_decay": 0}, "option stage_decay=0 must be > 0"),
        ("ofd", {"stage_decay": -2.0}, "option stage_decay=-2.0 must be > 0"),
        ("eskd", {"stop_epoch": -4}, "option stop_epoch=-4 must be >= 0"),
        ("eskd", {"stop_epoch": 1.5}, "option stop_epoch=1.5 must be an integer"),
        ("noisy", {"seed": 1.5}, "option seed=1.5 must be an integer"),
        # torch's manual_seed took -1 as 2**64 - 1 (another seed's noise under another name) and refused
        # 2**64 only at the first step
        ("noisy", {"seed": -1}, "option seed=-1 must be >= 0 and <= 18446744073709551615"),
        ("noisy", {"seed": 2**64}, "option seed=18446744073709551616 must be >= 0 and <= 18446744073709551615"),
        ("mimic", {"lsh_seed": -3}, "option lsh_seed=-3 must be >= 0 and <= 18446744073709551615"),
    ],
)
def test_option_ranges(method: str, options: dict, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        get_method(method).check_options(options)


def test_valid_values_of_those_options_pass() -> None:
    get_method("mgd").check_options({"stage_decay": 0.5})
    get_method("eskd").check_options({"stop_epoch": 0})
    get_method("noisy").check_options({"seed": 3})
    # the loss itself refuses what the option check would (as ofd's does), for library callers:
    # two stages at stage_decay 0 gave an inf loss
    maps = [torch.ones(2, 3, 2, 2), torch.ones(2, 3, 2, 2)]
    with pytest.raises(ValueError, match="mgd: stage_decay must be > 0, got 0"):
        mgd_loss(maps, [torch.zeros(2, 3, 2, 2)] * 2, stage_decay=0)


def test_a_whole_float_seed_draws_the_integer_seeds_noise() -> None:
    """--opt seed=2.0 parses to a float; torch's manual_seed takes only an int."""
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    loss = get_method("noisy")
    s = torch.randn(8, 10, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 10
    assert torch.equal(loss(s, logits, y, seed=2.0), loss(s, logits, y, seed=2))
    g = torch.Generator().manual_seed(2)
    assert not torch.equal(perturb_teacher(logits, 0.5, 0.1, g), logits)


def test_the_noisy_seed_on_the_command_line(teacher_spec: str) -> None:
    refused(_train("--method", "noisy", "--opt", "seed=1.5", "--source", f"local:{teacher_spec}", *SUB),
            "method 'noisy': option seed=1.5 must be an integer")  # fmt: skip
    refused(_train("--method", "noisy", "--opt", "seed=-1", "--source", f"local:{teacher_spec}", *SUB),
            "method 'noisy': option seed=-1 must be >= 0")  # fmt: skip


@pytest.mark.parametrize("views", ["0", "-2"])
def test_views_below_one_are_refused(views: str, tmp_path: Path, teacher_spec: str) -> None:
    message = f"--views must be >= 1 (1: the plain samples), got {views}"
    refused(_train("--method", "ce", *SUB, "--views", views), message)
    refused(CliRunner().invoke(app, ["precompute", "--source", f"local:{teacher_spec}", "--views", views,
                                     "--out", str(tmp_path / "cache")]), message)  # fmt: skip
    assert not (tmp_path / "cache").exists()
    with pytest.raises(ValueError, match=rf"views must be >= 1 \(1: the plain samples\), got {views}"):
        train_student(digits_student(), open_source("digits"), open_source("digits:test"),
                      TrainConfig(method="ce", epochs=1, views=int(views)), subset=torch.arange(8))  # fmt: skip


# --- F12: refusals of --config and kd chain --teacher ------------------------------------------------------


def test_an_unknown_config_key_is_one_error_line(tmp_path: Path) -> None:
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("optimizer: sgd\nwieght-decay: 0.1\n")
    text = refused(_train("--config", str(cfg), *SUB), f"--config {str(cfg)!r}: unknown option(s) ['wieght_decay']")
    assert "Usage:" not in text
    refused(_train("--config", str(tmp_path / "missing.yaml"), *SUB), "missing.yaml", "does not exist")


def test_chain_refuses_a_missing_teacher_weights_file_before_stage_0(tmp_path: Path) -> None:
    missing = tmp_path / "missing.safetensors"
    r = CliRunner().invoke(app, ["chain", "--teacher", f"kd.models:digits_teacher@{missing}", "--epochs", "1",
                                 "--out", str(tmp_path / "out")])  # fmt: skip
    refused(r, f"teacher: weights file {str(missing)!r} does not exist")
    assert not (tmp_path / "out").exists()
