"""Checks of the ``kd`` command line's refusals, shared by the test files that drive it."""

from __future__ import annotations

from click.testing import Result


def refused(r: Result, *needles: str) -> str:
    """The message of a CLI refusal: exit code 2, exactly one ``error:`` line (a refusal inside a
    command's own ``except (..., RuntimeError)`` was once printed twice, "error: 2"), no traceback,
    and every needle in it (whitespace collapsed)."""
    assert r.exit_code == 2, (r.output, r.exception)
    assert r.output.count("error:") == 1 and "Traceback" not in r.output, r.output
    text = " ".join(r.output.split())
    for needle in needles:
        assert needle in text, text
    return text
