"""glibc malloc settings for processes that move large tensors (serving, large requests).

glibc serves a block over its mmap threshold with a fresh ``mmap``: zeroed pages, each
faulted in on first touch, and unmapped on free. Its dynamic threshold tops out at
32 MiB but only rises after such a block is *freed*, and the heap top above 128 KiB is
trimmed back to the kernel on free. A server decoding a 4.8 MB uint8 batch and
normalising it into a 19 MB float32 one, or a client encoding a 4.8 MB request and
decoding its answer, then pays a page fault per 4 KiB page per request
(``clear_page``/``exc_page_fault`` in perf): measured ~8.5 ms of the client's CPU per
32x3x224x224 uint8 request on a 2-core box (2,320 faults), ~3.3 ms once large blocks
stay in the heap (0 faults).

``keep_large_blocks`` keeps them: a fixed mmap threshold of 32 MiB (the most glibc's
dynamic threshold would reach anyway) and a trim threshold of 256 MiB, so freed large
blocks are reused, already faulted in. The cost is RSS: up to ~256 MiB of freed memory
may stay mapped per arena top, bounded, instead of being returned at once. It is the
opposite of ``kd.precompute.bound_malloc_retention`` (a long batch job whose RSS must
stay flat); call at most one of the two in a process.
"""

from __future__ import annotations

import os
import platform

MMAP_THRESHOLD = 32 << 20  # bytes; glibc's own dynamic ceiling (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 256 << 20  # bytes of free heap top kept before giving it back
_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3  # <malloc.h>

_applied: dict[str, bool] | None = None


def _user_set(env_name: str, tunable: str) -> bool:
    return env_name in os.environ or tunable in os.environ.get("GLIBC_TUNABLES", "")


def keep_large_blocks() -> dict[str, bool]:
    """Keep freed large blocks in glibc's heap for reuse, once per process.

    Sets ``M_MMAP_THRESHOLD`` to ``MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` to
    ``TRIM_THRESHOLD`` with ``mallopt``, each unless the user set it
    (``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` or ``glibc.malloc.*`` in
    ``GLIBC_TUNABLES``): their choice wins. Returns which of ``"mmap_threshold"`` and
    ``"trim_threshold"`` this process set (both False off Linux/glibc). Idempotent: a
    second call changes nothing and returns the first call's answer."""
    global _applied
    if _applied is not None:
        return dict(_applied)
    applied = {"mmap_threshold": False, "trim_threshold": False}
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        import ctypes

        try:
            mallopt = ctypes.CDLL("libc.so.6").mallopt
        except (OSError, AttributeError):
            mallopt = None
        if mallopt is not None:
            if not _user_set("MALLOC_MMAP_THRESHOLD_", "mmap_threshold"):
                applied["mmap_threshold"] = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
            if not _user_set("MALLOC_TRIM_THRESHOLD_", "trim_threshold"):
                applied["trim_threshold"] = bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    _applied = applied
    return dict(applied)
