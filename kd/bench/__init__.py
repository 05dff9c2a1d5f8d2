"""Benchmarks behind ``kd bench``."""

from __future__ import annotations

from rich.console import Console


def report_console(out: Console | None, width: int) -> Console:
    """``out``, or a console for a report ``width`` columns wide when stdout is a pipe or a
    file (rich would wrap the tables at 80 columns there)."""
    if out is not None:
        return out
    out = Console()
    return out if out.is_terminal else Console(width=width)
