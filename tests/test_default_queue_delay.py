"""`kd serve` and the library share one default queue delay (README: why it is 2 ms, not 0)."""

from __future__ import annotations

import inspect

from kd.teacher_server.server import TeacherOptions


def test_kd_serve_has_the_same_default_queue_delay_as_the_library() -> None:
    from kd.cli import serve

    cli_default = inspect.signature(serve).parameters["max_queue_delay_us"].default.default
    assert cli_default == TeacherOptions().max_queue_delay_us == 2000
