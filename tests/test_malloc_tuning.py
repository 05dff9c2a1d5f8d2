"""``kd.core.malloc.keep_large_blocks``: read back through glibc's own accounting
(``mallinfo2``) in fresh interpreters, since the settings are process-wide."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

_LIBC, _VERSION = platform.libc_ver()
pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or _LIBC != "glibc" or tuple(map(int, _VERSION.split(".")[:2])) < (2, 33),
    reason="glibc malloc settings, read back with mallinfo2 (glibc >= 2.33)",
)

BLOCK = 8 << 20  # over glibc's default 128 KiB mmap threshold, under keep_large_blocks' 32 MiB

PROBE = f"""
import ctypes, json, sys
from kd.core.malloc import keep_large_blocks

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
applied = keep_large_blocks() if sys.argv[1] == "call" else None
again = keep_large_blocks() if sys.argv[1] == "call" else None
before = libc.mallinfo2().hblkhd
p = libc.malloc({BLOCK})
mmapped = libc.mallinfo2().hblkhd - before  # bytes of the block that came from its own mmap
libc.free(p)
free_kept = libc.mallinfo2().fordblks  # free bytes left in the main arena (heap top not trimmed)
print(json.dumps(dict(applied=applied, again=again, mmapped=mmapped, free_kept=free_kept)))
"""


def _probe(call: bool, **env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, "call" if call else "skip"],
        env={**base, **env}, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return json.loads(out.stdout)


def test_large_blocks_come_from_the_heap_and_stay_after_free():
    control = _probe(call=False)
    assert control["mmapped"] >= BLOCK  # glibc's default: a fresh mmap per large block
    r = _probe(call=True)
    assert r["applied"] == {"mmap_threshold": True, "trim_threshold": True}
    assert r["again"] == r["applied"]  # idempotent
    assert r["mmapped"] == 0
    assert r["free_kept"] >= BLOCK  # freed, not trimmed: the next large block reuses faulted-in pages


def test_user_settings_win():
    r = _probe(call=True, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    assert r["applied"] == {"mmap_threshold": False, "trim_threshold": False}
    assert r["mmapped"] >= BLOCK
    r = _probe(call=True, GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072")
    assert r["applied"] == {"mmap_threshold": True, "trim_threshold": False}
    assert r["mmapped"] == 0  # ours: from the heap
    assert r["free_kept"] < BLOCK  # theirs: the freed top is trimmed back
