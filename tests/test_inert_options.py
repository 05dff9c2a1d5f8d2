"""Options that the other options make unused are refused, not ignored: each of these trained or
precomputed exactly as if it had not been given (the same weights; config.json recorded it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kd.cli import app
from tests.cli_checks import refused

LOCAL = "local:kd.models:digits_teacher"
CASES = [
    (["train", "--source", "cache:c", "--codec", "topk:3"], "--codec topk:3 is the codec of the cache --read-through"),
    (["train", "--source", "cache:c", "--combiner", "weighted"], "with 1 source they would be ignored"),
    (["train", "--source", "cache:c", "--combiner-opt", "weights=[1,2]"], "merge several --source teachers"),
    (["train", "--source", LOCAL, "--prefetch", "2"], "--prefetch 2 reads a cache: source ahead"),
    (["train", "--source", "cache:c", "--server-timeout", "5"], "--server-timeout applies only with a server: teacher"),
    (["precompute", "--source", "server:127.0.0.1:1/t", "--out", "c", "--device", "cuda"], "--device cuda is a local:"),
    (["precompute", "--source", LOCAL, "--out", "c", "--server-timeout", "5"], f"got {LOCAL}: it would be ignored"),
    (["precompute", "--source", LOCAL, "--out", "c", "--pool-features"], "--pool-features pools the maps of --feature"),
    # the given teacher was distilled from as it was: no teacher trained, --teacher-epochs unused
    (["qkd", "--teacher", LOCAL, "--teacher-epochs", "3"], "--teacher-epochs 3 applies only to a teacher trained here"),
]


IDS = [f"{c[0][0]} {[a for a in c[0] if a.startswith('--')][-1]}" for c in CASES]


@pytest.mark.parametrize(("args", "needle"), CASES, ids=IDS)
def test_unused_options_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str],
                                    needle: str) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, [*args, "--epochs", "1"] if args[0] == "train" else args)
    refused(r, needle)
    assert list(tmp_path.iterdir()) == []  # before any work: no cache, no run


def test_the_options_still_apply_where_they_are_used(tmp_path: Path) -> None:
    # a read-through cache takes --codec; two sources take --combiner (refused here only for what follows)
    r = CliRunner().invoke(app, ["train", "--source", f"cache:{tmp_path / 'c'}", "--read-through", LOCAL, "--codec",
                                 "topk:3", "--epochs", "1", "--subset", "32", "--method", "kd"])  # fmt: skip
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["train", "--source", f"cache:{tmp_path / 'c'}", "--source", LOCAL, "--combiner",
                                 "mean-logits", "--prefetch", "2", "--epochs", "1", "--subset", "32"])  # fmt: skip
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--source", "cache:c", "--opt", "temperature=4", "--opt", "temperature=2"],
        [
            "train",
            "--source",
            "cache:c",
            "--source",
            "cache:d",
            "--combiner",
            "weighted",
            "--combiner-opt",
            "weights=[1,2]",
            "--combiner-opt",
            "weights=[2,1]",
        ],
        ["online", "one", "--opt", "temperature=3", "--opt", "temperature=2"],
    ],
    ids=["train --opt", "train --combiner-opt", "online --opt"],
)
def test_a_method_option_given_twice_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                args: list[str]) -> None:  # fmt: skip
    # the last one won without a word, as kd serve's --dataset a=X --dataset a=Y once did
    monkeypatch.chdir(tmp_path)
    refused(CliRunner().invoke(app, [*args, "--epochs", "1"]), "is given twice", "give it once")
    assert list(tmp_path.iterdir()) == []


def test_the_command_line_still_wins_over_the_config_file_key_by_key(tmp_path: Path) -> None:
    config = tmp_path / "recipe.toml"
    config.write_text("method = 'kd'\nepochs = 1\nsubset = 32\n[opt]\ntemperature = 4\nalpha = 0.5\n")
    r = CliRunner().invoke(app, ["train", "--config", str(config), "--source", LOCAL, "--opt", "temperature=2",
                                 "--run-dir", str(tmp_path / "run")])  # fmt: skip
    assert r.exit_code == 0, r.output
    options = json.loads((tmp_path / "run" / "config.json").read_text())
    assert {k: options["method_options"][k] for k in ("temperature", "alpha")} == {"temperature": 2, "alpha": 0.5}
