"""tests/ports.py: a port a test names before its server binds it lies outside the ephemeral range."""

from __future__ import annotations

import socket

from ports import _ephemeral_low, unused_port


def test_unused_port_is_below_the_ephemeral_range_and_free() -> None:
    low = _ephemeral_low()
    ports = {unused_port() for _ in range(20)}
    assert all(1024 <= p < low for p in ports), ports  # bind-0-and-close would hand out ports >= low
    assert len(ports) > 1  # drawn at random: two workers do not walk the same sequence
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))  # free when handed out (nothing here holds it)
