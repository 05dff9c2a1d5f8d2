"""tests/ports.py: a port a test names before its server binds it lies outside the ephemeral range."""

from __future__ import annotations

import socket

import pytest
from ports import _ephemeral_low, unused_port

from kd.teacher_server.loading import Teacher
from kd.teacher_server.server import start_server


def test_unused_port_is_below_the_ephemeral_range_and_free() -> None:
    low = _ephemeral_low()
    ports = {unused_port() for _ in range(20)}
    assert all(1024 <= p < low for p in ports), ports  # bind-0-and-close would hand out ports >= low
    assert len(ports) > 1  # drawn at random: two workers do not walk the same sequence
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))  # free when handed out (nothing here holds it)


def test_a_port_another_server_listens_on_is_refused_not_shared(teacher: Teacher) -> None:
    # gRPC's default SO_REUSEPORT let this second bind succeed, and the kernel then split new connections
    # between the two servers (test_stream_slots' pool once streamed to another test's server).
    first = start_server([teacher], port=0)
    try:
        with pytest.raises(OSError, match=f"cannot bind 127.0.0.1:{first.port}: in use"):
            start_server([teacher], port=first.port)
    finally:
        first.stop(grace=0)
