"""A loopback port for a test that must name it before a server binds it (a restart on the same
address, a dead address, a README step that takes ``$PORT``).

The obvious way, bind port 0 and close, hands back a port of the kernel's ephemeral range: until the
server binds it (seconds later under load: a `kd train` step, an interpreter importing torch), the
other pytest-xdist worker's servers on port 0 and every client connection it opens draw their ports
from that same range and can take it. A port below the range is never handed out that way, so only
another explicit bind could take it."""

from __future__ import annotations

import random
import socket
from pathlib import Path


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default low end (and where /proc is absent, a guess)


def unused_port(host: str = "127.0.0.1", family: int = socket.AF_INET) -> int:
    """A port nothing is bound to now on ``host``, from the 12000 below the ephemeral range."""
    low = _ephemeral_low()
    rng = random.Random()  # seeded from os.urandom: two workers (or a test that seeded `random`) pick apart
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket(family) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no unused port on {host} below {low} after 200 tries")
