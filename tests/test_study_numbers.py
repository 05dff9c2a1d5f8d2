"""Numbers the study commands took without a word: NaN and inf passed their `> 0` checks, some
sizes were never checked, and kd peer checked its numbers only once every peer had answered.
Each is now refused before any work with one `error:` line naming the value."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from kd.cli import app
from kd.models import digits_student
from kd.teacher_server.loading import save_weights
from tests.cli_checks import refused

PEER = ["peer", "--name", "a", "--peer", "127.0.0.1:1/b"]  # no such peer: a refusal must come first
DATAFREE = ["datafree", "dafl", "--server", "127.0.0.1:1/t", "--val-dataset", "none"]  # likewise no server
EXPLAIN = ["explain", "--model", "s=kd.models:digits_student@student.safetensors", "--images", "1", "--steps", "1"]

# What the old code did is in the comment after each case.
CASES = [
    (["graph", "--epochs", "-3"], "epochs must be >= 1, got -3"),  # trained nothing, reported the models
    (["graph", "--student-hidden", "0"], "student_hidden must be >= 1, got 0"),  # a width-0 GCN trained
    (["graph", "--scale", "inf"], "scale=inf"),  # the LSP kernel of every pair was 1: no signal
    (["multitask", "--lr", "inf"], "lr and adaptor_lr must be finite numbers > 0"),  # NaN losses, exit 0
    (["multitask", "--dist-weight", "inf"], "digit=inf names no task of this run or is not a finite number"),
    (["taskdistill", "--lr", "inf"], "lr and temperature must be finite numbers > 0, got inf"),
    (["taskdistill", "--temperature", "inf"], "got 0.003 and inf"),
    ([*EXPLAIN, "--lam", "inf"], "lam must be a finite number > 0, got inf"),  # made explain-out, then ran
    ([*EXPLAIN, "--b", "nan"], "b must be a finite number >= 0, got nan"),
    (["qkd", "--lr", "nan"], "QKDConfig learning rates must be > 0, got lr=nan"),  # torch's message, qkd-out made
    (["qkd", "--teacher-lr", "inf"], "teacher_lr=inf"),  # a self-studying phase, then a traceback
    (["qkd", "-T", "inf"], "QKDConfig.temperature must be a finite number > 0, got inf"),  # after a phase
    (["qkd", "--seed", "-1"], "QKDConfig.seed must be >= 0 and < 2**32, got -1"),  # numpy's message, qkd-out made
    ([*DATAFREE, "--seed", "-1"], "--seed must be >= 0 and < 2**32, got -1"),  # numpy's traceback
    ([*DATAFREE, "--eval-every", "-1"], "eval_every >= 0, got 64 and -1"),  # ran, exit 0
    ([*DATAFREE, "--generator-lr", "inf"], "dafl: generator_lr must be a finite number >= 0, got inf"),  # NaN, exit 0
    ([*DATAFREE, "--temperature", "-1"], "dafl: temperature must be a finite number > 0, got -1.0"),  # ran, exit 0
    ([*PEER, "--labeled", "-1"], "--labeled must be >= 1, got 150, 32, -1"),  # waited for the peer first
    ([*PEER, "--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    ([*PEER, "--serve-port", "-1"], "--serve-port must be in 0..65535, got -1"),
    ([*PEER, "--init-seed", "-1"], "--init-seed must be >= 0 and < 2**32, got -1"),
    ([*PEER, "--linger", "inf"], "--linger must be a finite number of seconds >= 0, got inf"),
]


@pytest.mark.parametrize(("args", "needle"), CASES, ids=[f"{c[0][0]} {c[0][-2]} {c[0][-1]}" for c in CASES])
def test_study_commands_refuse_numbers_they_cannot_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       args: list[str], needle: str) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    save_weights(digits_student(), tmp_path / "student.safetensors")
    r = CliRunner().invoke(app, args)
    refused(r, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.safetensors"]  # no output folder made
