"""kd.core.files: a file written through it appears whole or not at all, and a write that fails
leaves the previous file and no temporary beside it."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from kd.core.files import replace_atomically, write_text_atomically


def test_a_reader_never_sees_a_partly_written_file(tmp_path: Path) -> None:
    path = tmp_path / "port"
    size = 1 << 20
    write_text_atomically(path, "a" * size)
    seen: set[tuple[str, int]] = set()
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            text = path.read_text()
            seen.add((text[:1], len(text)) if text.strip(text[:1]) == "" else ("mixed", len(text)))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(60):
            write_text_atomically(path, ("b" if i % 2 else "a") * size)
    finally:
        done.set()
        reader.join(30)
    assert seen <= {("a", size), ("b", size)}, seen  # a plain write_text shows ("", 0) or a short one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["port"]


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "state.bin"
    replace_atomically(path, lambda f: f.write(b"old"), binary=True)

    def fails(f) -> None:
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_atomically(path, fails, binary=True)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"]
    write_text_atomically(str(path), "new\n", durable=True)  # a str path too
    assert path.read_text() == "new\n"
