"""Every command's --help renders (help texts with [brackets] once broke rich markup)."""

from __future__ import annotations

import re

import click
import pytest
import typer
import typer.main
from typer.testing import CliRunner

from kd.cli import app


def _commands(group: typer.Typer, prefix: list[str]) -> list[list[str]]:
    out = [prefix + [c.name or c.callback.__name__.replace("_", "-")] for c in group.registered_commands]
    for sub in group.registered_groups:
        out += _commands(sub.typer_instance, prefix + [sub.name])
    return out


@pytest.mark.parametrize("command", _commands(app, []), ids=" ".join)
def test_help_renders(command: list[str]) -> None:
    res = CliRunner().invoke(app, [*command, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output


def _click_commands() -> list[tuple[str, click.Command]]:
    root = typer.main.get_command(app)
    out: list[tuple[str, click.Command]] = []

    def walk(cmd: click.Command, path: list[str]) -> None:
        if hasattr(cmd, "list_commands"):  # a group (typer has its own click classes)
            ctx = click.Context(cmd)
            for name in cmd.list_commands(ctx):
                walk(cmd.get_command(ctx, name), path + [name])
        else:
            out.append((" ".join(path), cmd))

    walk(root, [])
    return out


def test_every_option_and_argument_says_what_it_does() -> None:
    # `--batch-size [default: 256]` alone left a user guessing (per forward? per step? global?).
    silent = [f"kd {path} {p.opts[0]}" for path, cmd in _click_commands() for p in cmd.params if not p.help]
    assert not silent, silent


def test_command_summaries_are_whole_sentences() -> None:
    # click ends a summary at the first word ending in "." unless a command gives short_help:
    # `kd --help` listed "records  Compute Lopes et al." and "qkd  QKD (Kim et al.".
    for group in ([], *([g.name] for g in app.registered_groups)):
        listing = CliRunner().invoke(app, [*group, "--help"]).output.split("Commands:", 1)[1]
        summaries = re.findall(r"^  (\S+) +(.+(?:\n {4,}\S.*)*)", listing, re.M)
        assert len(summaries) >= 4, listing
        for name, summary in summaries:
            summary = " ".join(summary.split())
            if summary.endswith("..."):  # click's cut at its width limit, marked as such
                continue
            assert not summary.endswith(" al.") and summary.count("(") == summary.count(")"), (name, summary)
