"""Every command's --help renders (help texts with [brackets] once broke rich markup)."""

from __future__ import annotations

import pytest
import typer
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
