"""Damaged LMDB pages on real caches in tmp_path: liblmdb trusts every page it reads, so a flipped
node header or page flag made `kd cache verify`, `kd cache info`, readers and a resuming writer die
with SIGBUS (a value or key read past the end of the file), abort on an assert, or raise raw lmdb
errors. They must be a CacheError naming the file and the page instead; those runs are subprocesses,
since the old code kills the interpreter with a signal."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kd.cache import CacheError, CacheMeta, CacheReader, CacheWriter

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
PSIZE = 4096


def meta(**overrides: object) -> CacheMeta:
    fields: dict[str, object] = dict(teacher_fingerprint="fp-A", dataset_id="ds", dataset_size=400, codec="fp32",
                                     num_classes=10)  # fmt: skip
    fields.update(overrides)
    return CacheMeta(**fields)  # type: ignore[arg-type]


def build(path: Path, m: CacheMeta) -> torch.Tensor:
    logits = torch.randn(m.dataset_size, m.num_classes, generator=torch.Generator().manual_seed(0)) * 3
    with CacheWriter(path, m, commit_every=128) as w:
        w.put(range(m.dataset_size), logits)
    return logits


def tree_pages(data: bytes) -> tuple[list[int], list[int]]:
    """(branch pages, leaf pages) of the main B-tree of the newest snapshot (LMDB's 64-bit layout)."""
    metas = [struct.unpack_from("=II8x8x48s48sQQ", data, m * PSIZE + 16) for m in range(2)]
    main = max(metas, key=lambda m: m[5])[3]
    _, _, depth, _, _, _, _, root = struct.unpack("=IHHQQQQQ", main)
    branches, level = [], [root]
    for _ in range(depth - 1):
        branches += level
        nxt = []
        for p in level:
            lower = struct.unpack_from("=H", data, p * PSIZE + 12)[0]
            for j in range((lower - 16) // 2):
                at = struct.unpack_from("=H", data, p * PSIZE + 16 + 2 * j)[0]
                lo, hi, flags = struct.unpack_from("=HHH", data, p * PSIZE + at)
                nxt.append(lo | hi << 16 | flags << 32)
        level = nxt
    return branches, level


def node_at(data: bytes, page: int, j: int) -> int:
    """File offset of node ``j`` of ``page``."""
    return page * PSIZE + struct.unpack_from("=H", data, page * PSIZE + 16 + 2 * j)[0]


def damaged_copy(src: Path, dst: Path, edit) -> Path:
    data = bytearray((src / "data.mdb").read_bytes())
    edit(data)
    dst.mkdir()
    (dst / "data.mdb").write_bytes(bytes(data))
    return dst


_OPEN_ALL = textwrap.dedent(
    """
    import json, sys
    from kd.cache import CacheError, CacheMeta, CacheReader, CacheWriter
    meta = CacheMeta.from_json(open(sys.argv[1], "rb").read())
    out = {}
    for path in sys.argv[2:]:
        got = []
        for what in ("verify", "read", "len", "write"):
            try:
                if what == "verify":
                    CacheReader(path).verify()
                elif what == "read":
                    CacheReader(path).get(range(meta.dataset_size))
                elif what == "len":
                    len(CacheReader(path))
                else:
                    with CacheWriter(path, meta) as w:  # what a resuming `kd precompute` does
                        w.present()
                got.append("ok")
            except CacheError as e:
                got.append(str(e))
        out[path] = got
    print(json.dumps(out))
    """
)


def test_damaged_nodes_and_pages_are_cache_errors_not_signals(tmp_path: Path) -> None:
    m = meta()
    build(tmp_path / "good", m)
    data = (tmp_path / "good" / "data.mdb").read_bytes()
    branches, leaves = tree_pages(data)
    assert branches and len(leaves) > 3
    leaf = leaves[-1]
    size = len(data)
    assert node_at(data, leaf, 0) + 8 + 0xFFFF > size  # a key of 64 KiB there would run past the file

    def big_key(b: bytearray) -> None:  # key size 64 KiB and "value in overflow pages": read past EOF
        at = node_at(data, leaf, 0)
        struct.pack_into("=HH", b, at + 4, 0x0001, 0xFFFF)

    def big_value(b: bytearray) -> None:  # a 16 MiB value in the page: read past EOF
        at = node_at(data, leaf, 1)
        struct.pack_into("=HH", b, at, 0xFFFF, 0x00FF)

    def node_offset(b: bytearray) -> None:  # the node table points into the middle of a node
        struct.pack_into("=H", b, leaf * PSIZE + 16 + 2 * 2, struct.unpack_from("=H", b, leaf * PSIZE + 20)[0] + 8)

    def page_type(b: bytearray) -> None:  # a leaf page flagged as a branch page (the page-flags byte)
        b[leaves[1] * PSIZE + 10] ^= 1

    cases = {"big_key": big_key, "big_value": big_value, "node_offset": node_offset, "page_type": page_type}
    paths = [damaged_copy(tmp_path / "good", tmp_path / name, fn) for name, fn in cases.items()]
    (tmp_path / "meta.json").write_bytes(m.to_json())
    proc = subprocess.run([sys.executable, "-c", _OPEN_ALL, str(tmp_path / "meta.json"), *map(str, paths)],
                          capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, (proc.returncode, -signal.SIGBUS, proc.stderr[-2000:])
    out = json.loads(proc.stdout)
    for name in cases:
        page = leaves[1] if name == "page_type" else leaf
        for msg in out[str(tmp_path / name)]:
            assert str(tmp_path / name / "data.mdb") in msg and f"is corrupted: page {page} " in msg, (name, msg)
    # the intact cache is untouched by the checks
    assert CacheReader(tmp_path / "good").verify().ok


@pytest.mark.parametrize("command", ["verify", "info"])
def test_kd_cache_commands_name_a_damaged_page(tmp_path: Path, command: str) -> None:
    """The attack's case: one flipped bit in a leaf page's node table of a cache (SIGBUS before)."""
    m = meta()
    build(tmp_path / "good", m)
    data = (tmp_path / "good" / "data.mdb").read_bytes()
    leaf = tree_pages(data)[1][-1]

    def flip(b: bytearray) -> None:
        struct.pack_into("=HH", b, node_at(data, leaf, 0) + 4, 0x0001, 0xFFFF)

    path = damaged_copy(tmp_path / "good", tmp_path / "bad", flip)
    r = subprocess.run([sys.executable, "-m", "kd", "cache", command, str(path)], capture_output=True, text=True,
                       timeout=120, env=ENV, cwd=ROOT)  # fmt: skip
    err = " ".join(r.stderr.split())
    assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
    assert f"{path / 'data.mdb'}" in err and f"is corrupted: page {leaf} " in err, err
    assert "Traceback" not in r.stderr


def test_verify_finds_records_readers_cannot_look_up(tmp_path: Path) -> None:
    """A damaged separator key in a branch page: the cursor walk still sees every record (verify said
    "0 problems"), but lookups by key, which readers use, are routed to the wrong leaf."""
    m = meta()
    build(tmp_path / "good", m)
    data = (tmp_path / "good" / "data.mdb").read_bytes()
    root = tree_pages(data)[0][0]
    last = (struct.unpack_from("=H", data, root * PSIZE + 12)[0] - 16) // 2 - 1
    assert last >= 2

    def lower_separator(b: bytearray) -> None:  # the last separator's index and view bytes -> 0
        at = node_at(data, root, last)
        ksize = struct.unpack_from("=H", data, at + 6)[0]
        b[at + 8 + ksize - 12 : at + 8 + ksize] = bytes(12)

    path = damaged_copy(tmp_path / "good", tmp_path / "bad", lower_separator)
    r = CacheReader(path)
    refused = []
    for i in range(m.dataset_size):
        try:
            r.get([i])
        except CacheError:
            refused.append(i)
    assert refused  # readers cannot find these records
    report = r.verify()
    assert not report.ok
    for i in refused:
        assert any(f"(index={i}, view=0)" in p and "a lookup by its key finds nothing" in p for p in report.problems)
    assert report.present == m.dataset_size - len(refused)
    assert report.corrupt == len(refused) and report.missing == []  # stored, so counted once: not missing
    assert CacheReader(tmp_path / "good").verify().ok
