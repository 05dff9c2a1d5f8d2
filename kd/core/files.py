"""Files that appear whole: written beside their path, then renamed over it (``os.replace`` is
atomic on POSIX), so a reader polling for a port file or a checkpoint never sees a partly
written one, and a kill at any moment leaves the previous file or the new one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def replace_atomically(path: str | Path, write: Callable[[IO[Any]], object], *, binary: bool = False,
                       durable: bool = True) -> None:  # fmt: skip
    """Write through ``write(file)`` into a temporary file beside ``path``, then rename it over
    ``path``. ``durable``: flush it to disk first, so that after a power cut the file is not
    empty either (checkpoints); a port file for a process on the same machine does not need it."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # one writer per process: no clash
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"newline": "", "encoding": "utf-8"})) as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomically(path: str | Path, text: str, *, durable: bool = False) -> None:
    """``text`` into ``path``, appearing whole (``replace_atomically``)."""
    replace_atomically(path, lambda f: f.write(text), durable=durable)
