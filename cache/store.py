"""LMDB storage of teacher outputs.

Layout of one environment (a directory with ``data.mdb``):

* ``b"\\x00meta"`` -> JSON metadata (``CacheMeta``).
* ``b"\\x00basis"`` -> a ``pca:K`` cache's ``LowRankBasis`` bytes (CRC inside; its sha256 is
  ``CacheMeta.basis_sha256``), committed in the metadata's transaction, before any record.
* record keys ``b"r" + fp[8] + ds[8] + index u64 BE + view u32 BE``, where
  ``fp``/``ds`` are the first bytes of sha256 of the teacher fingerprint and of
  the dataset id. Big-endian integers make a cursor walk one teacher/dataset
  in index order.
* record values ``b"KD" + version u8 + 0 + payload + crc32 u32 LE``; the crc
  covers the key too, so a value under the wrong key is caught as well.

Writes are batched into large transactions; an acknowledged record is one
whose transaction committed (LMDB commits are durable and atomic, so a killed
writer loses at most the uncommitted batch). Readers open read-only, lazily in
each process, so a reader object can be handed to DataLoader workers.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import struct
import threading
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import lmdb
import numpy as np
import torch

from kd.cache.codecs import CODEC_VERSION, codec_uses_temperature, get_codec
from kd.core.targets import SparseTargets, Targets
from kd.core.tokens import TokenTargets

FORMAT_VERSION = 1
META_KEY = b"\x00meta"
# A cache precomputed with views keeps each record's view params in an environment of their own in this
# folder of the cache environment (kd.precompute writes them, committed before the targets they belong to)
VIEW_PARAMS_DIR = "view-params"
BASIS_KEY = b"\x00basis"  # a pca:K cache's LowRankBasis: written with the metadata, before any record
_META_CRC_TAG = b"\ncrc32="
_HEADER = b"KD" + bytes([FORMAT_VERSION, 0])
_KEY = struct.Struct(">QI")
_CRC = struct.Struct("<I")
_INITIAL_MAP = 64 << 20


class CacheError(RuntimeError):
    """A cache that cannot be opened, read or written; the message says which and why."""


class StaleCacheError(CacheError):
    """The cache was built for another teacher, dataset or codec."""


class CorruptRecordError(CacheError):
    """A record whose checksum or layout is wrong."""


class MissingRecordError(CacheError, KeyError):
    """A (sample, view) the cache does not hold."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def _kd_version() -> str:
    from kd import __version__

    return f"kd {__version__}"


@dataclass(frozen=True)
class CacheMeta:
    teacher_fingerprint: str
    dataset_id: str
    dataset_size: int
    codec: str
    num_classes: int
    teacher: str = ""
    views: int = 1
    # Name of the seeded augmentation that made views (kd.core.data.augment); "" when views == 1.
    augmentation: str = ""
    temperature: float | None = None
    # This environment holds the indices i with i % shard_count == shard_index.
    shard_index: int = 0
    shard_count: int = 1
    # Teacher features stored beside the targets: layer -> per-sample shape (fp16, after pooling).
    features: dict[str, list[int]] = field(default_factory=dict)
    features_pooled: bool = False
    # The data's manifest without its per-file list (``SampleSource.manifest(files=False)``: format, uri to
    # reopen it with ``kd.core.data.open_source``, sizes, class names). Not identity: dataset_id is.
    dataset_manifest: dict = field(default_factory=dict)
    # Views' params (``kd.core.views``, float32 [view_params]) are stored per record in OUT/view-params: 0 = none.
    view_params: int = 0
    # The codec's layout version (kd.cache.codecs.CODEC_VERSION when written; caches from before
    # the field read as 1). A version-1 sample:K cache is refused with a message to rebuild it.
    codec_version: int | None = None
    # One record per sequence: a u32 position count S, then S rows of the codec (token teachers).
    per_token: bool = False
    # sha256 (hex) of the stored low-rank basis (BASIS_KEY) of a pca:K cache; "" for other codecs.
    # Not identity: a resumed cache keeps the basis it was started with.
    basis_sha256: str = ""
    format_version: int = FORMAT_VERSION
    created_by: str = field(default_factory=_kd_version)

    # Fields that must agree between a cache and the one who opens it.
    IDENTITY = (
        "format_version",
        "per_token",
        "teacher_fingerprint",
        "dataset_id",
        "dataset_size",
        "codec",
        "num_classes",
        "views",
        "augmentation",
        "temperature",
        "shard_index",
        "shard_count",
        "features",
        "features_pooled",
    )

    @property
    def feature_bytes(self) -> dict[str, int]:
        """Bytes of each stored feature (fp16) in a record, in record order."""
        return {name: 2 * math.prod(shape) for name, shape in sorted(self.features.items())}

    @classmethod
    def for_dataset(
        cls,
        *,
        teacher_fingerprint: str,
        teacher: str,
        num_classes: int,
        dataset,  # kd.core.data.Dataset: dataset_id, len(), augmentation
        codec: str,
        views: int = 1,
        temperature: float | None = None,
        **extra: object,
    ) -> CacheMeta:
        """The metadata of a cache of ``dataset``'s targets: views record the dataset's
        augmentation; the temperature is kept for the sparse codecs that depend on it."""
        return cls(
            teacher_fingerprint=teacher_fingerprint,
            dataset_id=dataset.dataset_id,
            dataset_size=len(dataset),
            codec=codec,
            num_classes=num_classes,
            teacher=teacher,
            views=views,
            augmentation=dataset.augmentation if views > 1 else "",
            # Sparse codecs are exact at this temperature (topk) or only valid at it (sample).
            temperature=temperature if codec_uses_temperature(codec) else None,
            **extra,
        )

    def owns(self, index: int) -> bool:
        return index % self.shard_count == self.shard_index

    def expected_keys(self) -> list[tuple[int, int]]:
        """Every (index, view) this environment should hold when complete."""
        return [(i, v) for i in range(self.shard_index, self.dataset_size, self.shard_count) for v in range(self.views)]

    def __post_init__(self) -> None:
        if self.codec_version is None:  # a new cache: the codecs' current layout
            object.__setattr__(self, "codec_version", CODEC_VERSION)
        # A temperature divides logits: 0, negative, NaN or Inf would give NaN targets or
        # an invalid distribution to draw from, so no cache is written or read with one.
        if self.temperature is not None:
            t = self.temperature
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
                raise ValueError(f"cache temperature must be a finite number > 0, got {t!r}")
        for name in ("dataset_size", "num_classes", "views", "shard_count", "format_version"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"cache {name} must be a positive integer, got {value!r}")
        # A metadata record without its checksum (as before it had one) may have been edited by hand: a
        # value of another type crashed far from here (AttributeError in record_prefix, TypeError in
        # feature_bytes: a traceback from `kd cache info`) or was taken as it was (shard 5 of 2, "yes").
        for name in ("teacher_fingerprint", "dataset_id", "codec", "teacher", "augmentation", "basis_sha256",
                     "created_by"):  # fmt: skip
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"cache {name} must be a string, got {getattr(self, name)!r}")
        for name in ("features_pooled", "per_token"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"cache {name} must be true or false, got {getattr(self, name)!r}")
        index = self.shard_index
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.shard_count:
            raise ValueError(f"cache shard_index must be an integer 0..{self.shard_count - 1}, got {index!r}")
        vp = self.view_params
        if isinstance(vp, bool) or not isinstance(vp, int) or vp < 0:
            raise ValueError(f"cache view_params must be an integer >= 0, got {vp!r}")
        feats = self.features
        if not isinstance(feats, dict) or not all(
            isinstance(name, str)
            and isinstance(shape, (list, tuple))
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)
            for name, shape in feats.items()
        ):
            raise ValueError(f"cache features must map each layer name to its shape (positive integers), got {feats!r}")
        if not isinstance(self.dataset_manifest, dict):
            raise ValueError(f"cache dataset_manifest must be a JSON object, got {self.dataset_manifest!r}")
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"the cache was written in format {self.format_version}, newer than this kd reads "
                f"({FORMAT_VERSION}); upgrade kd"
            )

    def to_json(self) -> bytes:
        """The metadata record: sorted JSON, then a line ``crc32=XXXXXXXX`` over those bytes
        (a same-length edit such as fp16 -> bf16 would otherwise decode every record wrongly)."""
        body = json.dumps(asdict(self), sort_keys=True).encode()
        return body + _META_CRC_TAG + b"%08x" % zlib.crc32(body)

    @classmethod
    def from_json(cls, raw: bytes, path: str | Path = "?") -> CacheMeta:
        """Parse and check a metadata record; CacheError naming ``path`` when it is damaged.

        Records written before the checksum (plain JSON) are still read."""
        body = raw
        tail = len(_META_CRC_TAG) + 8
        if len(raw) > tail and raw[-tail:-8] == _META_CRC_TAG:
            body = raw[:-tail]
            try:
                stored = int(raw[-8:], 16)
            except ValueError:
                stored = -1
            if zlib.crc32(body) != stored:
                raise CorruptRecordError(
                    f"the metadata record of cache {str(path)!r} fails its checksum: it was changed or corrupted "
                    "after it was written, so its codec, temperature or sizes cannot be trusted; rebuild the "
                    "cache with `kd precompute`"
                )
        try:
            data = json.loads(body)
            if not isinstance(data, dict):
                raise ValueError(f"expected a JSON object, got {type(data).__name__} {body[:60]!r}")
            data.setdefault("codec_version", 1)  # written before the field: the first layouts
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in known})
        except (ValueError, TypeError, UnicodeDecodeError) as e:
            raise CorruptRecordError(f"the metadata record of cache {str(path)!r} is unreadable: {e}") from e

    def check(self, path: str | Path, **expected: object) -> None:
        """Raise StaleCacheError naming the first field that differs from ``expected``."""
        for name, want in expected.items():
            if want is None:
                continue
            have = getattr(self, name)
            if have != want:
                raise StaleCacheError(
                    f"cache {str(path)!r} was built with {name}={have!r}, but {want!r} was requested; "
                    "rebuild it with `kd precompute` or open the cache that matches"
                )

    @property
    def record_prefix(self) -> bytes:
        fp = hashlib.sha256(self.teacher_fingerprint.encode()).digest()[:8]
        ds = hashlib.sha256(self.dataset_id.encode()).digest()[:8]
        return b"r" + fp + ds


def record_key(prefix: bytes, index: int, view: int = 0) -> bytes:
    return prefix + _KEY.pack(index, view)


def _seal_rows(keys: list[bytes], payloads: np.ndarray) -> list[tuple[bytes, bytes]]:
    """(key, value) per payload row: value = header + payload + crc32(key, header + payload), little-endian.

    Built for the whole batch in one array; only the C-level crc32 runs per record."""
    n, width = payloads.shape
    rows = np.empty((n, len(_HEADER) + width + _CRC.size), dtype=np.uint8)
    rows[:, : len(_HEADER)] = np.frombuffer(_HEADER, dtype=np.uint8)
    rows[:, len(_HEADER) : -_CRC.size] = payloads
    view = memoryview(rows).cast("B")
    stride = rows.shape[1]
    crcs = rows[:, -_CRC.size :].view("<u4")
    for r, key in enumerate(keys):
        crcs[r, 0] = zlib.crc32(view[r * stride : (r + 1) * stride - _CRC.size], zlib.crc32(key))
    return [(key, rows[r].tobytes()) for r, key in enumerate(keys)]


def _check_rows(path: str, keys: list[bytes], joined: bytes, n: int, payload_bytes: int) -> np.ndarray:
    """Check ``n`` records laid end to end in ``joined``; -> payloads uint8 [n, payload_bytes].

    One join and one frombuffer for the batch; per record only a C-level crc32
    (error messages are built only when something is wrong).
    """
    width = len(_HEADER) + payload_bytes + _CRC.size
    rows = np.frombuffer(joined, dtype=np.uint8).reshape(n, width)
    view = memoryview(joined)
    crcs = rows[:, -_CRC.size :].copy().view("<u4")[:, 0]
    for r, key in enumerate(keys):
        if zlib.crc32(view[r * width : (r + 1) * width - _CRC.size], zlib.crc32(key)) != crcs[r]:
            raise CorruptRecordError(f"{_where(path, key)} fails its checksum: the stored targets are corrupted")
    bad = (rows[:, : len(_HEADER) - 1] != np.frombuffer(_HEADER[:3], dtype=np.uint8)).any(axis=1)
    if bad.any():
        r = int(bad.nonzero()[0][0])
        raise CorruptRecordError(f"{_where(path, keys[r])} has an unknown header {bytes(rows[r, :4])!r}")
    return rows[:, len(_HEADER) : -_CRC.size]


def _keys(idx: list[int], vw: list[int] | None) -> np.ndarray:
    """Record keys int64 [B, 2] (index, view): what key-derived codecs (rand:M, sample:K) hash."""
    views = np.asarray(vw if vw is not None else [0] * len(idx), dtype=np.int64)
    return np.stack([np.asarray(idx, dtype=np.int64), views], axis=1).reshape(len(idx), 2)


def _as_lists(indices, views) -> tuple[list[int], list[int] | None]:
    idx = indices.tolist() if isinstance(indices, torch.Tensor) else [int(i) for i in indices]
    vw = None if views is None else (views.tolist() if isinstance(views, torch.Tensor) else [int(v) for v in views])
    return idx, vw


def _where(path: str, key: bytes) -> str:
    index, view = _KEY.unpack(key[-_KEY.size :])
    return f"record (index={index}, view={view}) of cache {path!r}"


# LMDB's meta pages (pages 0 and 1; mdb.c, MDB_meta after the 16-byte page header, 64-bit build):
# magic u32, version u32, address, mapsize, two MDB_db of 48 bytes (the first one's md_pad is the page
# size), last used page number, txnid.
_LMDB_MAGIC = 0xBEEFC0DE
_META_FIELDS = struct.Struct("=II8x8xI44x48xQQ")
_META_OFFSET = 16


def check_data_file(path: str | Path, *, allow_empty: bool = False) -> None:
    """Refuse an LMDB file shorter than its own header says, before it is mapped.

    Reading a page of a mapping past the end of a truncated file kills the process with
    SIGBUS, so the file is checked first: the newer of the two meta pages holds the last
    used page number and the page size, and the file must hold every page up to it.
    ``allow_empty``: a writer may open an empty file (LMDB initialises it).
    """
    data = Path(path) / "data.mdb"
    try:
        size = data.stat().st_size
    except (FileNotFoundError, NotADirectoryError):  # no cache yet (or ``path`` is a file: the writer says so)
        return
    if size == 0:
        if allow_empty:
            return
        raise CacheError(f"cache file {str(data)!r} is empty (0 bytes); rebuild the cache with `kd precompute`")
    metas = []
    with open(data, "rb") as f:
        head = f.read(_META_OFFSET + _META_FIELDS.size)
        if len(head) == _META_OFFSET + _META_FIELDS.size:
            metas.append(_META_FIELDS.unpack_from(head, _META_OFFSET))
        psize = metas[0][2] if metas and metas[0][0] == _LMDB_MAGIC else 0
        if psize >= _META_OFFSET + _META_FIELDS.size:
            f.seek(psize)
            second = f.read(_META_OFFSET + _META_FIELDS.size)
            if len(second) == _META_OFFSET + _META_FIELDS.size:
                metas.append(_META_FIELDS.unpack_from(second, _META_OFFSET))
    valid = [m for m in metas if m[0] == _LMDB_MAGIC]
    if not valid:
        raise CacheError(f"cache file {str(data)!r} ({size} bytes) is not an LMDB file: no valid meta page")
    pages = max(2, max(valid, key=lambda m: m[4])[3] + 1)  # last used page of the newer transaction, + 1
    if psize == 0 or size < pages * psize:
        raise CacheError(
            f"cache file {str(data)!r} is truncated: {size} bytes, but its LMDB header says it holds "
            f"{pages * psize} ({pages} pages of {psize} bytes); it was cut short (an interrupted copy, "
            "a full disk?). Restore it or rebuild the cache with `kd precompute`"
        )


# The B-trees of an LMDB file (mdb.c, 64-bit build), checked in Python before LMDB walks them:
# liblmdb trusts every page it reads, so a damaged node (a flipped offset, key size or flag) makes it
# read past its page and past the end of the file (SIGBUS), hit an assert (abort), or follow a page
# number anywhere. Page header: pgno u64, pad u16, flags u16, lower u16, upper u16 (an overflow page
# has its page count u32 there); then the u16 offsets of its nodes. Node: lo u16, hi u16, flags u16,
# key size u16, key, then the value (leaf; its size is lo | hi << 16) or nothing (branch: the child page
# is lo | hi << 16 | flags << 32). A value in overflow pages (F_BIGDATA) stores their first page number.
_PAGE_HDR = struct.Struct("=QHHHH")
_PAGE_HDR_SIZE = 16
_NODE_HDR = 8
_P_BRANCH, _P_LEAF, _P_OVERFLOW = 0x01, 0x02, 0x04
_F_BIGDATA = 0x01
_MDB_INTEGERKEY = 0x08  # the free-page database's flags
_DB = struct.Struct("=IHHQQQQQ")  # pad, flags, depth, branch/leaf/overflow pages, entries, root
_META_DBS = struct.Struct("=II8x8x48s48sQQ")  # magic, version, free db, main db, last page, txnid
_NO_PAGE = 2**64 - 1


class _TreeCheck:
    """Walk the main (and, for a writer, the free-page) B-tree of one snapshot of ``data.mdb`` level by
    level, a batch of pages at a time with numpy, and raise CacheError at the first page or node that
    liblmdb could not read safely (about 1 GB/s from the page cache; once per process and file version)."""

    BATCH = 4096  # pages gathered at once

    def __init__(self, data: Path, psize: int, size: int, last_pg: int) -> None:
        self.data, self.psize, self.last_pg = data, psize, last_pg
        self.pages = min(size // psize, last_pg + 1)  # check_data_file: the file holds every used page
        self.mm = np.memmap(data, dtype=np.uint8, mode="r", shape=(self.pages, psize))

    def fail(self, pgno: int, why: str) -> None:
        raise CacheError(
            f"cache file {str(self.data)!r} is corrupted: page {pgno} {why}; it cannot be read safely. "
            "Restore it from a copy or rebuild the cache with `kd precompute`"
        )

    def in_file(self, pgnos: np.ndarray, what: str) -> None:
        bad = (pgnos < 2) | (pgnos >= self.pages)
        if bad.any():
            self.fail(int(pgnos[bad][0]), f"({what}) is outside the file's {self.pages} pages")

    def tree(self, db: bytes, name: str, want_flags: int, values: bool = False) -> None:
        _, flags, depth, _, _, _, entries, root = _DB.unpack(db)
        if root == _NO_PAGE:
            if entries:
                self.fail(0, f"(the {name} database's header) says {entries} entries but no root page")
            return
        if flags != want_flags or not 1 <= depth <= 32:  # LMDB's cursor stack holds 32 levels
            self.fail(0, f"(the {name} database's header) has flags {flags:#x} and depth {depth}")
        found = 0
        level = np.asarray([root], dtype=np.uint64)
        for d in range(1, depth + 1):
            nxt = []
            for s in range(0, len(level), self.BATCH):
                out = self.level(level[s : s + self.BATCH], d, depth, name, values)
                if d < depth:
                    nxt.append(out)
                else:
                    found += out
            level = np.concatenate(nxt) if d < depth else level
        if found != entries:
            self.fail(root, f"(root of the {name} tree) leads to {found} entries, its header says {entries}")

    def level(self, pgnos: np.ndarray, d: int, depth: int, name: str, values: bool):
        """Check a batch of pages at level ``d``; -> their children (branch) or entry count (leaf)."""
        leaf = d == depth
        what = f"{name} tree, level {d} of {depth}"
        self.in_file(pgnos, what)
        p = pgnos.astype(np.int64)
        block = self.mm[p]  # [n, psize] copy
        hdr = block[:, :_PAGE_HDR_SIZE].copy()
        own = hdr[:, :8].view("<u8")[:, 0]
        flags, lower, upper = (hdr[:, 10:16].view("<u2").astype(np.int64)[:, j] for j in range(3))
        first = lambda bad: int(p[np.nonzero(bad)[0][0]])  # noqa: E731
        if (bad := own != pgnos).any():
            self.fail(first(bad), f"({what}) holds the header of another page")
        if (bad := flags != (_P_LEAF if leaf else _P_BRANCH)).any():  # a committed page carries its type only
            self.fail(first(bad), f"({what}) has page flags {int(flags[bad][0]):#x}, expected a "
                      f"{'leaf' if leaf else 'branch'} page")  # fmt: skip
        if (bad := ((lower & 1) == 1) | (lower < _PAGE_HDR_SIZE + 2) | (lower > upper) | (upper > self.psize)).any():
            lo_, up_ = int(lower[bad][0]), int(upper[bad][0])
            self.fail(first(bad), f"({what}) has a bad node table (lower={lo_}, upper={up_})")
        n = (lower - _PAGE_HDR_SIZE) // 2
        # node offsets, [pages, max nodes] with a mask of the real ones
        width = int(n.max())
        cols = np.arange(width)
        used = cols[None, :] < n[:, None]
        raw_at = block[:, _PAGE_HDR_SIZE : _PAGE_HDR_SIZE + 2 * width].copy().view("<u2").astype(np.int64)
        rows = np.broadcast_to(np.arange(len(p))[:, None], used.shape)[used]
        at = raw_at[used]
        if (bad := ((at & 1) == 1) | (at < upper[rows]) | (at + _NODE_HDR > self.psize)).any():
            self.fail(int(p[rows[bad][0]]), f"({what}) has a node offset outside its node area")

        # every node's header (lo, hi, flags, key size: u16 each, in its page, checked above) in one gather
        node = block.reshape(-1)[(rows * self.psize + at)[:, None] + np.arange(_NODE_HDR)]
        lo, hi, nflags, ksize = node.view("<u2").astype(np.int64).T
        if not leaf:
            if (bad := at + _NODE_HDR + ksize > self.psize).any():
                self.fail(int(p[rows[bad][0]]), f"({what}) has a branch node whose key runs past the page")
            return (lo | (hi << 16) | (nflags << 32)).astype(np.uint64)
        if (bad := (nflags & ~_F_BIGDATA) != 0).any():
            self.fail(int(p[rows[bad][0]]), f"({what}) has a leaf node with flags {int(nflags[bad][0]):#x}")
        big = (nflags & _F_BIGDATA) != 0
        dsize = lo | (hi << 16)
        if (bad := at + _NODE_HDR + ksize + np.where(big, 8, dsize) > self.psize).any():
            self.fail(int(p[rows[bad][0]]), f"({what}) has a leaf node whose key or value runs past the page")
        if big.any():
            start = at[big] + _NODE_HDR + ksize[big]
            ov = np.zeros(int(big.sum()), dtype=np.uint64)
            for k in range(8):
                ov |= block[rows[big], start + k].astype(np.uint64) << np.uint64(8 * k)
            self.overflow(p[rows[big]], ov, dsize[big])
        if values:  # the free-page tree: its records are read by a writer
            for r, a, k, s, b in zip(rows.tolist(), at.tolist(), ksize.tolist(), dsize.tolist(), big.tolist()):
                self.free_list(int(p[r]), block[r], a + _NODE_HDR + k, s, b)
        return len(at)

    def overflow(self, parents: np.ndarray, first: np.ndarray, dsize: np.ndarray) -> None:
        count = (_PAGE_HDR_SIZE - 1 + dsize) // self.psize + 1
        if (bad := (first < 2) | (first + count.astype(np.uint64) > self.pages)).any():
            self.fail(int(parents[bad][0]), f"has a value of {int(dsize[bad][0])} bytes in pages outside the file")
        hdr = self.mm[first.astype(np.int64), :_PAGE_HDR_SIZE].copy()
        own, flags = hdr[:, :8].view("<u8")[:, 0], hdr[:, 10:12].view("<u2")[:, 0]
        pages = hdr[:, 12:16].view("<u4")[:, 0]
        if (bad := (own != first) | (flags != _P_OVERFLOW) | (pages != count)).any():
            self.fail(int(first[bad][0]), f"is not the {int(count[bad][0])}-page overflow value page "
                      f"{int(parents[bad][0])} points to")  # fmt: skip

    def free_list(self, pgno: int, page: np.ndarray, at: int, dsize: int, big: bool) -> None:
        """A free-page record (a writer reads it): u64 count, then that many page numbers."""
        if big:
            first = int(page[at : at + 8].copy().view("<u8")[0])
            value = self.mm.reshape(-1)[first * self.psize + _PAGE_HDR_SIZE :][:dsize].copy()
        else:
            value = page[at : at + dsize].copy()
        if len(value) < 8 or len(value) % 8:
            self.fail(pgno, f"has a free-page record of {len(value)} bytes")
        ids = value.view("<u8")
        if int(ids[0]) != len(ids) - 1 or ((ids[1:] < 2) | (ids[1:] > self.last_pg)).any():
            self.fail(pgno, "has a free-page record that lists pages outside the file")


def _check_trees(path: Path, txnid: int | None) -> bool:
    """Check the B-trees of the snapshot ``txnid`` (a reader's; its pages cannot be reused while its
    transaction is open) or, with None, of the newest snapshot and its free-page tree (a writer, holding
    the write lock). False for a reader when that snapshot's meta page was overwritten meanwhile."""
    data = path / "data.mdb"
    size = data.stat().st_size
    with open(data, "rb") as f:
        head = f.read(_PAGE_HDR_SIZE + _META_DBS.size)
        if len(head) < _PAGE_HDR_SIZE + _META_DBS.size:
            return txnid is None  # a new, empty file (check_data_file refused it for a reader)
        psize = _META_FIELDS.unpack_from(head, _META_OFFSET)[2]
        metas = []
        for m in range(2):
            f.seek(m * psize)
            raw = f.read(_PAGE_HDR_SIZE + _META_DBS.size)
            if len(raw) == _PAGE_HDR_SIZE + _META_DBS.size:
                values = _META_DBS.unpack_from(raw, _META_OFFSET)
                if values[0] == _LMDB_MAGIC:
                    metas.append(values)
    if txnid is None:
        chosen = max(metas, key=lambda m: m[5], default=None)
    else:
        chosen = next((m for m in metas if m[5] == txnid), None)
    if chosen is None:
        return txnid is None
    _, _, free_db, main_db, last_pg, _ = chosen
    if size < 2 * psize:
        return txnid is None
    check = _TreeCheck(data, psize, size, last_pg)
    check.tree(main_db, "main", 0)  # the caches' one unnamed database: plain byte keys
    if txnid is None:
        check.tree(free_db, "free-page", _MDB_INTEGERKEY, values=True)
    return True


_ENVS: dict[str, tuple[int, lmdb.Environment, bool]] = {}
_ENVS_LOCK = threading.Lock()


def _environment(path: Path, *, write: bool) -> lmdb.Environment:
    """The process's one handle on ``path``.

    LMDB allows one open environment per file per process, and handles must
    not cross fork(): so readers and writers share a handle per (path, pid),
    and a child process opens its own.
    """
    key = os.path.realpath(path)
    with _ENVS_LOCK:
        entry = _ENVS.get(key)
        if entry is not None and entry[0] == os.getpid() and (entry[2] or not write):
            return entry[1]
        if entry is not None and entry[0] == os.getpid():
            entry[1].close()  # read-only handle; reopen writable
        elif entry is not None:
            # Inherited across fork() (a DataLoader worker): py-lmdb still counts the
            # parent's handle as open in this process and refuses a new one, so close
            # this process's copy first (that frees only the child's mapping and fds;
            # the parent's handle and reader slots are untouched).
            del _ENVS[key]
            try:
                entry[1].close()
            except lmdb.Error:
                pass
        check_data_file(path, allow_empty=write)
        try:
            if write:
                path.mkdir(parents=True, exist_ok=True)
                env = lmdb.open(str(path), map_size=_INITIAL_MAP, subdir=True, readahead=False, max_readers=1024)
            else:
                env = lmdb.open(str(path), readonly=True, lock=True, readahead=False, max_readers=1024, subdir=True)
        except lmdb.Error as e:
            raise CacheError(f"cannot open cache {str(path)!r}: {e}") from e
        try:
            _check_environment(path, env, write=write)
        except BaseException:
            env.close()
            raise
        _ENVS[key] = (os.getpid(), env, write)
        return env


# (device, inode, size, mtime) of the data files whose trees this process (or the parent it was forked
# from: a DataLoader worker) checked, and whether the free-page tree was checked too.
_CHECKED: dict[str, tuple[tuple[int, int, int, int], bool]] = {}


def _check_environment(path: Path, env: lmdb.Environment, *, write: bool) -> None:
    """Check the file's B-trees before LMDB reads them (``_TreeCheck``): a reader the snapshot it
    reads, inside a read transaction (so no writer can reuse its pages meanwhile); a writer, under
    the write lock, also the free-page tree that it allocates pages from. Once per file version."""
    key = os.path.realpath(path)
    try:
        st = (path / "data.mdb").stat()
    except OSError as e:
        raise CacheError(f"cannot open cache {str(path)!r}: {e}") from e
    sig = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    done = _CHECKED.get(key)
    if done is not None and done[0] == sig and (done[1] or not write):
        return
    try:
        if write:
            with env.begin(write=True):
                _check_trees(path, None)
        else:
            for _ in range(100):  # a writer committing twice meanwhile overwrote that snapshot's meta page
                try:
                    txn = env.begin(buffers=False)
                except lmdb.MapResizedError:
                    env.set_mapsize(0)
                    continue
                with txn:
                    if _check_trees(path, txn.id()):
                        break
    except lmdb.Error as e:
        raise CacheError(f"cannot read cache {str(path)!r}: {type(e).__name__}: {e}") from e
    _CHECKED[key] = (sig, write)


@contextmanager
def _lmdb_errors(path: Path) -> Iterator[None]:
    """Turn an LMDB error (MDB_CORRUPTED, MDB_PAGE_NOTFOUND, ... from a damaged file) into a CacheError."""
    try:
        yield
    except lmdb.Error as e:
        raise CacheError(
            f"cannot read cache {str(path)!r}: LMDB reports {type(e).__name__}: {e}; its file is damaged. "
            "Restore it from a copy or rebuild the cache with `kd precompute`"
        ) from e


def _release(path: Path) -> None:
    key = os.path.realpath(path)
    with _ENVS_LOCK:
        entry = _ENVS.pop(key, None)
        if entry is not None and entry[0] == os.getpid():
            entry[1].close()


def _cache_codec(path: Path, meta: CacheMeta, basis: bytes | None):
    """The codec of a cache; for ``pca:K`` built from its stored basis, checked against the
    metadata's sha256, its own CRC, its rank and class count. A missing or damaged basis is a
    CorruptRecordError naming the cache: never a crash in the decoder or a wrong decode."""
    try:
        codec = get_codec(meta.codec, meta.temperature, meta.codec_version)
    except ValueError as e:
        raise StaleCacheError(f"cache {str(path)!r}: {e}") from None
    if not codec.needs_basis:
        return codec
    rebuild = "its records cannot be decoded; rebuild it with `kd precompute`"
    if basis is None:
        raise CorruptRecordError(f"cache {str(path)!r} ({meta.codec}) has no low-rank basis record; {rebuild}")
    if hashlib.sha256(basis).hexdigest() != meta.basis_sha256:
        raise CorruptRecordError(
            f"the low-rank basis of cache {str(path)!r} does not match the sha256 in its metadata "
            f"({meta.basis_sha256[:16] or 'none'}...): it was changed or corrupted; {rebuild}"
        )
    try:
        codec = get_codec(meta.codec, meta.temperature, meta.codec_version, basis=basis)
        if codec.basis.num_classes != meta.num_classes:
            raise ValueError(f"it has {codec.basis.num_classes} classes, the cache {meta.num_classes}")
    except ValueError as e:
        raise CorruptRecordError(f"the low-rank basis of cache {str(path)!r} is unusable: {e}; {rebuild}") from None
    return codec


def stored_basis(path: str | Path) -> bytes | None:
    """The checked low-rank basis bytes a cache environment at ``path`` was started with;
    None when there is no cache there yet or its codec has no basis. A resumed precompute
    uses it instead of fitting another (its records were encoded with it)."""
    path = Path(path)
    if not (path / "data.mdb").is_file():
        return None
    with _lmdb_errors(path), _environment(path, write=False).begin(buffers=False) as txn:
        raw, basis = txn.get(META_KEY), txn.get(BASIS_KEY)
    if raw is None:
        return None
    codec = _cache_codec(path, CacheMeta.from_json(raw, path), basis)
    return basis if codec.needs_basis else None


class CacheWriter:
    """Fills one cache; re-opening an existing cache with the same metadata resumes it.

    ``basis``: the ``LowRankBasis.to_bytes()`` of a ``pca:K`` cache (required for a new one),
    committed under ``BASIS_KEY`` in the metadata's transaction, so no record exists without
    it; the metadata gets its sha256. Resuming, the stored basis is used and a different
    ``basis`` is ignored (``basis_ignored``): the committed records were encoded with the
    stored one, and one cache must decode with one basis."""

    def __init__(
        self, path: str | Path, meta: CacheMeta, *, commit_every: int = 4096, basis: bytes | None = None
    ) -> None:
        self.path = Path(path)
        codec = get_codec(meta.codec, meta.temperature, meta.codec_version)
        self.basis: bytes | None = None
        self.basis_ignored = False
        if not codec.needs_basis and basis is not None:
            raise ValueError(f"codec {meta.codec} takes no low-rank basis (only pca:K does)")
        if codec.needs_basis and basis is not None:
            basis = bytes(basis)
            meta = replace(meta, basis_sha256=hashlib.sha256(basis).hexdigest())
            codec = _cache_codec(self.path, meta, basis)  # a new basis: refuse a bad one before any write
        self.meta = meta
        self.codec = codec
        self.logit_bytes = self.codec.record_bytes(meta.num_classes)
        self.record_bytes = self.logit_bytes + sum(meta.feature_bytes.values())
        self.commit_every = commit_every
        self._prefix = meta.record_prefix
        self._pending: list[tuple[bytes, bytes]] = []
        self.committed = 0
        self.env = _environment(self.path, write=True)
        try:
            raw, stored = self._claim(basis if codec.needs_basis else None)
        except BaseException:
            _release(self.path)
            raise
        if raw is not None:
            try:
                existing = CacheMeta.from_json(raw, self.path)
                existing.check(self.path, **{k: getattr(meta, k) for k in CacheMeta.IDENTITY})
                # resuming a cache of an older codec version: only where its layout is still read;
                # a pca:K cache: with the basis its records were encoded with
                self.codec = _cache_codec(self.path, existing, stored)
            except CacheError:
                _release(self.path)
                raise
            if self.codec.needs_basis:
                self.basis_ignored = basis is not None and basis != stored
                self.basis = stored
                self.meta = replace(meta, basis_sha256=existing.basis_sha256)
        elif codec.needs_basis:
            self.basis = basis

    def _claim(self, basis: bytes | None) -> tuple[bytes | None, bytes | None]:
        """The stored metadata and basis; for a new cache, write ours (and a pca:K cache's basis) in
        the same write transaction that found none. LMDB runs one write transaction at a time, so
        of two writers creating one cache at once the second finds the first's metadata and is
        checked against it (a mismatch is refused) instead of overwriting it."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    raw, stored = txn.get(META_KEY), txn.get(BASIS_KEY)
                    if raw is None:
                        if self.codec.needs_basis:
                            if basis is None:
                                raise ValueError(
                                    f"a {self.meta.codec} cache needs its low-rank basis before the first record: "
                                    "pass basis=LowRankBasis.fit(first logits, K).to_bytes() (kd precompute fits one)"
                                )
                            txn.put(BASIS_KEY, basis)
                        txn.put(META_KEY, self.meta.to_json())
                return raw, stored
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
            except lmdb.Error as e:
                raise CacheError(self._write_error(e, 0)) from e

    def present(self) -> set[tuple[int, int]]:
        """(index, view) of every committed record."""
        out: set[tuple[int, int]] = set()
        width = len(self._prefix) + _KEY.size
        with _lmdb_errors(self.path), self.env.begin() as txn:
            cur = txn.cursor()
            if cur.set_range(self._prefix):
                for key in cur.iternext(keys=True, values=False):
                    if not key.startswith(self._prefix):
                        break
                    if len(key) == width:  # another length: no record of this cache (verify lists it)
                        out.add(_KEY.unpack(key[len(self._prefix) :]))
        return out

    def put(
        self,
        indices: Iterable[int],
        logits: torch.Tensor,
        views: Iterable[int] | None = None,
        features: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Buffer a batch of rows; committed every ``commit_every`` records and on ``flush``.

        ``features`` (layer -> [B, *shape]) is required exactly when the cache stores features."""
        idx = [int(i) for i in indices]
        vw = [0] * len(idx) if views is None else [int(v) for v in views]
        if logits.ndim != 2 or logits.shape[0] != len(idx) or len(vw) != len(idx):
            raise ValueError(f"put: {len(idx)} indices, {len(vw)} views but logits of shape {tuple(logits.shape)}")
        if logits.shape[1] != self.meta.num_classes:
            raise ValueError(f"put: logits have {logits.shape[1]} classes, cache has {self.meta.num_classes}")
        # One pass (NaN propagates through min/max): finiteness and the codec's range.
        peak = max(-float((mm := torch.aminmax(logits.detach())).min), float(mm.max)) if logits.numel() else 0.0
        if not math.isfinite(peak):
            raise ValueError("put: logits contain NaN or Inf; refusing to cache them")
        limit = self.codec.max_abs
        if limit is not None and peak > limit:
            raise ValueError(
                f"put: |logits| up to {peak:.4g} exceed the {self.meta.codec} range "
                f"({limit:.4g}); use a codec with a wider range (fp32, bf16)"
            )
        if idx:
            ii, vv = torch.tensor(idx), torch.tensor(vw)
            out_of_range = (ii < 0) | (ii >= self.meta.dataset_size) | (vv < 0) | (vv >= self.meta.views)
            if out_of_range.any():
                r = int(out_of_range.nonzero()[0][0])
                raise ValueError(
                    f"put: (index={idx[r]}, view={vw[r]}) outside dataset_size={self.meta.dataset_size}, "
                    f"views={self.meta.views}"
                )
            foreign = (ii % self.meta.shard_count) != self.meta.shard_index
            if foreign.any():
                r = int(foreign.nonzero()[0][0])
                raise ValueError(
                    f"put: index {idx[r]} belongs to another shard than {self.meta.shard_index}/{self.meta.shard_count}"
                )
        if self.meta.per_token:
            raise ValueError("put: this cache holds one record per sequence; use put_sequences")
        encoded = self.codec.encode(logits, _keys(idx, vw))
        if self.meta.features or features:
            encoded = np.concatenate([encoded, *self._encode_features(features or {}, len(idx))], axis=1)
        self._pending.extend(_seal_rows([record_key(self._prefix, i, v) for i, v in zip(idx, vw)], encoded))
        if len(self._pending) >= self.commit_every:
            self.flush()

    def put_topk(
        self,
        indices: Iterable[int],
        targets: SparseTargets,
        views: Iterable[int] | None = None,
        features: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Like ``put`` for a ``topk:K`` cache, from the top-k parts instead of full logits (a
        server's top-k reply, ``kd.core.sparse.topk_parts``): the same records ``put`` writes
        from the full logits, when the parts' log-sum-exp is at this cache's temperature."""
        codec = self.codec
        if not (hasattr(codec, "_pack") and self.meta.codec.startswith("topk:")) or targets.kind != "topk":
            raise ValueError(f"put_topk: {targets.kind} targets for a {self.meta.codec} cache; use put with logits")
        k = int(targets.indices.shape[1]) if targets.indices.ndim == 2 else -1
        if k != codec.k or targets.num_classes != self.meta.num_classes:
            raise ValueError(f"put_topk: {k} of {targets.num_classes} classes given, the cache keeps "
                             f"{self.meta.codec} of {self.meta.num_classes}")  # fmt: skip
        t_cache, t_given = codec.temperature, targets.temperature or 1.0
        if not math.isclose(t_cache, t_given, rel_tol=1e-6):
            raise ValueError(f"put_topk: log-sum-exp at temperature {t_given}, the cache stores it at {t_cache}")
        idx = [int(i) for i in indices]
        vw = [0] * len(idx) if views is None else [int(v) for v in views]
        values, classes = targets.logits.float().cpu(), targets.indices.long().cpu()
        lse = targets.logsumexp.float().cpu()
        if values.shape[0] != len(idx) or len(vw) != len(idx) or lse.shape != (len(idx),):
            raise ValueError(f"put_topk: {len(idx)} indices, {len(vw)} views, targets of {values.shape[0]} rows")
        if len(idx) and (int(classes.min()) < 0 or int(classes.max()) >= self.meta.num_classes):
            raise ValueError(f"put_topk: class ids outside 0..{self.meta.num_classes - 1}")
        peak = float(values.abs().max()) if values.numel() else 0.0
        if not (math.isfinite(peak) and bool(torch.isfinite(lse).all())):
            raise ValueError("put_topk: values or log-sum-exp contain NaN or Inf; refusing to cache them")
        if codec.max_abs is not None and peak > codec.max_abs:  # version 2 kept fp16 logits
            raise ValueError(f"put_topk: |logits| up to {peak:.4g} exceed the {self.meta.codec} range "
                             f"({codec.max_abs:.4g})")  # fmt: skip
        ii, vv = torch.tensor(idx, dtype=torch.long), torch.tensor(vw, dtype=torch.long)
        bad = (ii < 0) | (ii >= self.meta.dataset_size) | (vv < 0) | (vv >= self.meta.views)
        bad |= (ii % self.meta.shard_count) != self.meta.shard_index
        if bad.any():
            r = int(bad.nonzero()[0][0])
            raise ValueError(f"put_topk: (index={idx[r]}, view={vw[r]}) is not a record of this cache (shard "
                             f"{self.meta.shard_index}/{self.meta.shard_count}, {self.meta.dataset_size} samples, "
                             f"{self.meta.views} views)")  # fmt: skip
        encoded = codec._pack(values, classes, lse, self.meta.num_classes)
        if self.meta.features or features:
            encoded = np.concatenate([encoded, *self._encode_features(features or {}, len(idx))], axis=1)
        self._pending.extend(_seal_rows([record_key(self._prefix, i, v) for i, v in zip(idx, vw)], encoded))
        if len(self._pending) >= self.commit_every:
            self.flush()

    def put_samples(
        self,
        indices: Iterable[int],
        ids: torch.Tensor,
        counts: torch.Tensor,
        views: Iterable[int] | None = None,
        features: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Like ``put`` for a ``sample:K[xR]`` cache, from draws made elsewhere (a server's
        "sample_indices" / "sample_counts" [B, R, K], unique ids with counts per round, drawn
        with this codec's keyed uniforms at its temperature): the records ``put`` writes from
        the full logits."""
        from kd.cache.codecs import SampleCodec, _index_dtype

        codec = self.codec
        if not isinstance(codec, SampleCodec):
            raise ValueError(f"put_samples: a {self.meta.codec} cache stores no draws; use put with logits")
        idx = [int(i) for i in indices]
        vw = [0] * len(idx) if views is None else [int(v) for v in views]
        want = (len(idx), codec.rounds, codec.k)
        if tuple(ids.shape) != want or tuple(counts.shape) != want or len(vw) != len(idx):
            raise ValueError(f"put_samples: ids {tuple(ids.shape)}, counts {tuple(counts.shape)} for {len(idx)} "
                             f"indices, {len(vw)} views; the cache keeps {self.meta.codec}: {want}")  # fmt: skip
        ids, counts = ids.detach().to("cpu", torch.int64), counts.detach().to("cpu", torch.int64)
        c = self.meta.num_classes
        if len(idx) and (int(ids.min()) < 0 or int(ids.max()) >= c or int(counts.min()) < 0):
            raise ValueError(f"put_samples: class ids outside 0..{c - 1} or negative counts")
        if bool((counts.sum(dim=2) != codec.k).any()):
            raise ValueError(f"put_samples: every round must count {codec.k} draws")
        ii, vv = torch.tensor(idx, dtype=torch.long), torch.tensor(vw, dtype=torch.long)
        bad = (ii < 0) | (ii >= self.meta.dataset_size) | (vv < 0) | (vv >= self.meta.views)
        bad |= (ii % self.meta.shard_count) != self.meta.shard_index
        if bad.any():
            r = int(bad.nonzero()[0][0])
            raise ValueError(f"put_samples: (index={idx[r]}, view={vw[r]}) is not a record of this cache")
        idx_dt = _index_dtype(c)
        parts = []
        for r in range(codec.rounds):
            parts += [ids[:, r].numpy().astype(idx_dt).view(np.uint8), counts[:, r].numpy().astype(np.uint8)]
        encoded = np.concatenate(parts, axis=1) if parts else np.zeros((len(idx), 0), np.uint8)
        if self.meta.features or features:
            encoded = np.concatenate([encoded, *self._encode_features(features or {}, len(idx))], axis=1)
        self._pending.extend(_seal_rows([record_key(self._prefix, i, v) for i, v in zip(idx, vw)], encoded))
        if len(self._pending) >= self.commit_every:
            self.flush()

    def _encode_features(self, features: dict[str, torch.Tensor], n: int) -> list[np.ndarray]:
        want = self.meta.features
        if set(features) != set(want):
            raise ValueError(f"put: features {sorted(features)} given, the cache stores {sorted(want)}")
        out = []
        for name in sorted(want):
            f = features[name].detach().to("cpu", torch.float32)
            if tuple(f.shape) != (n, *want[name]):
                raise ValueError(f"put: feature {name!r} has shape {tuple(f.shape)}, expected {(n, *want[name])}")
            peak = float(f.abs().max()) if f.numel() else 0.0
            if not math.isfinite(peak) or peak > 65504.0:
                raise ValueError(f"put: feature {name!r} has NaN/Inf or values beyond the fp16 range ({peak:.4g})")
            out.append(f.to(torch.float16).reshape(n, -1).numpy().view(np.uint8))
        return out

    def put_sequences(self, indices: Iterable[int], sequences: list[torch.Tensor],
                      features: list[dict[str, torch.Tensor]] | None = None) -> None:  # fmt: skip
        """Buffer one record per sequence (``per_token`` caches): ``sequences[i]`` is the
        teacher's logits ``[L_i, V]`` at the sequence's L_i real positions (L_i >= 1).
        Position p of sequence i is encoded with the key (i, p) (key-derived codecs).
        ``features[i]`` (required exactly when the cache stores features): layer -> hidden states
        ``[L_i, D]`` at the same positions, stored fp16 after each position's codec row."""
        if not self.meta.per_token:
            raise ValueError("put_sequences: this cache holds one record per sample; use put")
        idx = [int(i) for i in indices]
        if len(idx) != len(sequences):
            raise ValueError(f"put_sequences: {len(idx)} indices for {len(sequences)} sequences")
        self._check_sequence_features(features, len(idx), "put_sequences")
        limit = self.codec.max_abs
        items: list[tuple[bytes, bytes]] = []
        for i, z, feats in zip(idx, sequences, features or [None] * len(idx)):
            if z.ndim != 2 or z.shape[0] < 1 or z.shape[1] != self.meta.num_classes:
                raise ValueError(f"put_sequences: sequence {i} has logits {list(z.shape)}, expected "
                                 f"[positions >= 1, {self.meta.num_classes}]")  # fmt: skip
            if not 0 <= i < self.meta.dataset_size or not self.meta.owns(i):
                raise ValueError(
                    f"put_sequences: index {i} outside dataset_size={self.meta.dataset_size} or this shard"
                )
            peak = float(z.detach().abs().max())
            if not math.isfinite(peak):
                raise ValueError(f"put_sequences: sequence {i} has NaN or Inf logits; refusing to cache them")
            if limit is not None and peak > limit:
                raise ValueError(f"put_sequences: |logits| up to {peak:.4g} exceed the {self.meta.codec} range "
                                 f"({limit:.4g}); use a codec with a wider range (fp32, bf16)")  # fmt: skip
            n = z.shape[0]
            rows = self.codec.encode(z, np.stack([np.full(n, i), np.arange(n)], axis=1))
            items.extend(self._sequence_record(i, rows, feats))
        self._pending.extend(items)
        if len(self._pending) >= self.commit_every:
            self.flush()

    def put_sequence_rows(self, indices: Iterable[int], rows: list[np.ndarray],
                          features: list[dict[str, torch.Tensor]] | None = None) -> None:  # fmt: skip
        """Like ``put_sequences`` from rows already in the codec's layout, uint8 ``[L_i,
        record_bytes]`` each: what a server's top-k or sampled reply encodes to without the
        full logits (``kd.precompute.precompute_tokens``); ``features`` as ``put_sequences``."""
        if not self.meta.per_token:
            raise ValueError("put_sequence_rows: this cache holds one record per sample; use put")
        idx = [int(i) for i in indices]
        if len(idx) != len(rows):
            raise ValueError(f"put_sequence_rows: {len(idx)} indices for {len(rows)} sequences")
        self._check_sequence_features(features, len(idx), "put_sequence_rows")
        width = self.codec.record_bytes(self.meta.num_classes)
        items: list[tuple[bytes, bytes]] = []
        for i, r, feats in zip(idx, rows, features or [None] * len(idx)):
            if r.dtype != np.uint8 or r.ndim != 2 or r.shape[0] < 1 or r.shape[1] != width:
                raise ValueError(f"put_sequence_rows: sequence {i} has rows {r.dtype} {list(r.shape)}, expected "
                                 f"uint8 [positions >= 1, {width}] ({self.meta.codec})")  # fmt: skip
            if not 0 <= i < self.meta.dataset_size or not self.meta.owns(i):
                raise ValueError(
                    f"put_sequence_rows: index {i} outside dataset_size={self.meta.dataset_size} or this shard"
                )
            items.extend(self._sequence_record(i, r, feats))
        self._pending.extend(items)
        if len(self._pending) >= self.commit_every:
            self.flush()

    def _check_sequence_features(self, features: list | None, n: int, what: str) -> None:
        if features is None:
            if self.meta.features:
                raise ValueError(f"{what}: the cache stores hidden states {sorted(self.meta.features)}; give them")
        elif len(features) != n:
            raise ValueError(f"{what}: {len(features)} feature sets for {n} sequences")

    def _sequence_record(self, i: int, rows: np.ndarray, feats: dict | None) -> list[tuple[bytes, bytes]]:
        """One sealed sequence record: its position count, then per position the codec row and
        (where the cache stores them) the fp16 hidden states of ``feats``."""
        n = rows.shape[0]
        if feats is not None:
            try:
                rows = np.concatenate([rows, *self._encode_features(feats, n)], axis=1)
            except ValueError as e:
                raise ValueError(f"sequence {i}: {e}") from None
        payload = np.concatenate([np.frombuffer(struct.pack("<I", n), dtype=np.uint8), rows.reshape(-1)])
        return _seal_rows([record_key(self._prefix, i, 0)], payload[None])

    def flush(self) -> None:
        if self._pending:
            self._commit(self._pending)
            self.committed += len(self._pending)
            self._pending = []

    def _commit(self, items: list[tuple[bytes, bytes]]) -> None:
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    txn.cursor().putmulti(items)  # one C call for the whole batch
                return
            except lmdb.MapFullError:
                # Grow the map and redo the whole (aborted) transaction.
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
            except lmdb.Error as e:
                # The transaction was aborted: drop the batch (close() must not retry it) and the
                # handle, so a later writer in this process starts from what is on disk.
                self._pending = []
                _release(self.path)
                raise CacheError(self._write_error(e, len(items))) from e

    def _write_error(self, e: lmdb.Error, n: int) -> str:
        """Why a commit failed, naming the cache and, when it is full, the disk. LMDB reports
        a short write (ENOSPC, EFBIG) as EIO, so the free space decides."""
        code = getattr(e, "errno", None) or next(
            (c for c in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO) if os.strerror(c) in str(e)), None
        )
        try:
            usage = shutil.disk_usage(self.path)
        except OSError:
            usage = None
        kept = f"the last batch ({n} records) was not committed; every record committed before it is intact"
        if code in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO):
            mount = Path(os.path.realpath(self.path))
            while not os.path.ismount(mount) and mount != mount.parent:
                mount = mount.parent
            where = (
                f" (mounted at {str(mount)!r}"
                + ("" if usage is None else f", {usage.free:,} of {usage.total:,} bytes free")
                + ")"
            )
            return (
                f"cannot write cache {str(self.path)!r}: the disk holding it{where} is full, or the file reached "
                f"a size or quota limit ({e}); {kept}. Free space and re-run the same command to resume"
            )
        return f"cannot write cache {str(self.path)!r}: {e}; {kept}"

    def close(self) -> None:
        try:
            self.flush()
        finally:
            _release(self.path)

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CacheReader:
    """Read-only view of a cache; safe to pickle into DataLoader worker processes.

    ``expect`` fields (teacher_fingerprint, dataset_id, codec, ...) are checked
    against the metadata at open: a mismatch raises StaleCacheError naming the field.
    """

    def __init__(self, path: str | Path, **expect: object) -> None:
        self.path = Path(path)
        if not (self.path / "data.mdb").is_file():
            raise CacheError(f"no cache at {str(self.path)!r} (no data.mdb); create one with `kd precompute`")
        raw = self._get_raw(META_KEY)
        if raw is None:
            raise CacheError(f"cache {str(self.path)!r} has no metadata record")
        self.meta = CacheMeta.from_json(raw, self.path)
        unknown = set(expect) - set(CacheMeta.IDENTITY) - {"teacher"}
        if unknown:
            raise TypeError(f"unknown cache fields {sorted(unknown)}")
        self.meta.check(self.path, **expect)
        # pca:K: the codec holds the stored basis (checked); other codecs read no basis key
        basis = self._get_raw(BASIS_KEY) if self.meta.codec.startswith("pca:") else None
        self.codec = _cache_codec(self.path, self.meta, basis)
        self.basis_bytes = 0 if basis is None else len(basis)  # stored once, beside the records
        self.logit_bytes = self.codec.record_bytes(self.meta.num_classes)
        self.record_bytes = self.logit_bytes + sum(self.meta.feature_bytes.values())
        self._prefix = self.meta.record_prefix

    def _environment(self) -> lmdb.Environment:
        return _environment(self.path, write=False)

    def _get_raw(self, key: bytes) -> bytes | None:
        with self._txn() as txn:
            return txn.get(key)

    @contextmanager
    def _txn(self) -> Iterator[lmdb.Transaction]:
        """A read transaction; an LMDB error in it (a damaged page) is a CacheError naming the cache."""
        env = self._environment()
        with _lmdb_errors(self.path):
            try:
                txn = env.begin(buffers=False)
            except lmdb.MapResizedError:
                env.set_mapsize(0)  # a writer grew the map: adopt its size
                txn = env.begin(buffers=False)
            with txn:
                yield txn

    def read_raw(self, indices: Iterable[int], views: Iterable[int] | None = None) -> np.ndarray:
        """Checked payloads, uint8 [B, record_bytes]."""
        idx = [int(i) for i in indices]
        vw = [0] * len(idx) if views is None else [int(v) for v in views]
        path = str(self.path)
        width = len(_HEADER) + self.record_bytes + _CRC.size
        keys = [record_key(self._prefix, i, v) for i, v in zip(idx, vw)]
        with self._txn() as txn:
            values = [txn.get(k) for k in keys]
        for k, value in zip(keys, values):
            if value is None:
                i, v = _KEY.unpack(k[-_KEY.size :])
                raise MissingRecordError(f"cache {path!r} has no record for (index={i}, view={v})")
            if len(value) != width:
                raise CorruptRecordError(f"{_where(path, k)} has {len(value)} bytes, expected {width}")
        if not keys:
            return np.empty((0, self.record_bytes), dtype=np.uint8)
        return _check_rows(path, keys, b"".join(values), len(keys), self.record_bytes)

    def get(
        self, indices: Iterable[int] | torch.Tensor, views: Iterable[int] | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Dense float32 logits [B, C] for the given samples (and views)."""
        idx, vw = _as_lists(indices, views)
        self._not_per_token()
        out = self.codec.decode(self.read_raw(idx, vw)[:, : self.logit_bytes], self.meta.num_classes, _keys(idx, vw))
        self._check_finite([out], idx, vw)
        return out

    def targets(
        self, indices: Iterable[int] | torch.Tensor, views: Iterable[int] | torch.Tensor | None = None
    ) -> Targets:
        """What a loss consumes: dense logits, or ``SparseTargets`` for topk/sample codecs."""
        idx, vw = _as_lists(indices, views)
        self._not_per_token()
        raw = self.read_raw(idx, vw)[:, : self.logit_bytes]
        out = self.codec.decode_targets(raw, self.meta.num_classes, _keys(idx, vw))
        self._check_finite([out.logits, out.logsumexp] if isinstance(out, SparseTargets) else [out], idx, vw)
        return out

    def _not_per_token(self) -> None:
        if self.meta.per_token:
            raise CacheError(f"cache {str(self.path)!r} holds one record per sequence (a token teacher's); "
                             "read it with token_targets / a token source")  # fmt: skip

    def _sequence_rows(self, path: str, key: bytes, value: bytes) -> np.ndarray:
        """Check one sequence record; -> its rows uint8 [L, record_bytes]: each position's codec
        row (``logit_bytes``), then its stored hidden states (fp16, ``meta.feature_bytes``)."""
        if len(value) < len(_HEADER) + 4 + _CRC.size:
            raise CorruptRecordError(f"{_where(path, key)} has {len(value)} bytes, too few for a sequence record")
        payload = _check_rows(path, [key], value, 1, len(value) - len(_HEADER) - _CRC.size)[0]
        (n,) = struct.unpack("<I", payload[:4].tobytes())
        if n < 1 or len(payload) != 4 + n * self.record_bytes:
            raise CorruptRecordError(
                f"{_where(path, key)} says {n} positions of {self.record_bytes} bytes but holds {len(payload) - 4}"
            )
        return payload[4:].reshape(n, self.record_bytes)

    def read_sequences(self, indices: Iterable[int] | torch.Tensor) -> list[np.ndarray]:
        """Checked rows of each sequence, uint8 [L_i, record_bytes] (``per_token`` caches)."""
        if not self.meta.per_token:
            raise CacheError(f"cache {str(self.path)!r} holds one record per sample, not per sequence")
        idx, _ = _as_lists(indices, None)
        keys = [record_key(self._prefix, i, 0) for i in idx]
        path = str(self.path)
        with self._txn() as txn:
            values = [txn.get(k) for k in keys]
        out = []
        for i, k, value in zip(idx, keys, values):
            if value is None:
                raise MissingRecordError(f"cache {path!r} has no record for sequence {i}")
            out.append(self._sequence_rows(path, k, value))
        return out

    def token_targets(self, indices: Iterable[int] | torch.Tensor, width: int | None = None) -> Targets | TokenTargets:
        """A token teacher's targets for these sequences, positions right-padded to ``width``
        (default: the longest): dense logits float32 ``[B, W, V]`` (full and quantised codecs;
        zeros at padding) or ``TokenTargets`` ``[B, W, K]`` (topk / rand: logits + lse, the rest
        bucket; sample: unique ids with counts), unused slots and padding with id -1."""
        idx, _ = _as_lists(indices, None)
        return self._token_targets(idx, *self._positions(self.read_sequences(idx), width))

    def token_targets_hidden(
        self, indices: Iterable[int] | torch.Tensor, width: int | None = None
    ) -> tuple[Targets | TokenTargets, dict[str, torch.Tensor]]:  # fmt: skip
        """``token_targets`` and the stored hidden states, layer -> float32 ``[B, W, D]`` (zeros at
        padding), from one read of the records."""
        idx, _ = _as_lists(indices, None)
        rows, where, owners = self._positions(self.read_sequences(idx), width)
        flat = self._split_features(rows)
        self._check_finite(list(flat.values()), [idx[r] for r in owners], None)
        hidden = {}
        for name, values in flat.items():
            hidden[name] = torch.zeros(*where.shape, *values.shape[1:])
            hidden[name][where] = values
        return self._token_targets(idx, rows, where, owners), hidden

    def _positions(self, rows: list[np.ndarray], width: int | None) -> tuple[np.ndarray, torch.Tensor, list[int]]:
        """The sequences' rows as one array [P, record_bytes]; bool ``[B, W]``, where they sit right-padded
        to ``width`` (default: the longest); and each position's sequence number (for errors)."""
        lengths = [len(r) for r in rows]
        w = max(lengths, default=0) if width is None else int(width)
        if lengths and max(lengths) > w:
            raise ValueError(f"sequence records hold up to {max(lengths)} positions, more than the width {w} asked for")
        where = torch.arange(w)[None, :] < torch.tensor(lengths, dtype=torch.int64)[:, None]
        flat = np.concatenate(rows) if rows else np.empty((0, self.record_bytes), np.uint8)
        return flat, where, [r for r, n in enumerate(lengths) for _ in range(n)]

    def _token_targets(self, idx: list[int], rows: np.ndarray, where: torch.Tensor,
                       owners: list[int]) -> Targets | TokenTargets:  # fmt: skip
        b, w = where.shape
        v = self.meta.num_classes
        keys = np.stack([np.asarray(idx, dtype=np.int64)[owners], where.nonzero()[:, 1].numpy()], axis=1) if owners \
            else np.empty((0, 2), dtype=np.int64)  # fmt: skip
        flat = self.codec.decode_targets(np.ascontiguousarray(rows[:, : self.logit_bytes]), v, keys)
        seqs = [idx[r] for r in owners]  # each position's sequence index, for errors
        if not isinstance(flat, SparseTargets):
            self._check_finite([flat], seqs, None)
            out = torch.zeros(b, w, v)
            out[where] = flat
            return out
        self._check_finite([flat.logits, flat.logsumexp], seqs, None)
        k = flat.indices.shape[1]
        ids = torch.full((b, w, k), -1, dtype=torch.int64)
        vals = torch.zeros(b, w, k)
        if flat.kind == "sample":
            used = flat.counts > 0
            ids[where] = torch.where(used, flat.indices, -1)
            vals[where] = flat.counts
            return TokenTargets(ids, v, None, None, vals, float(flat.temperature))
        ids[where] = flat.indices
        vals[where] = flat.logits
        lse = torch.zeros(b, w)
        lse[where] = flat.logsumexp
        return TokenTargets(ids, v, vals, lse, None, float(flat.temperature or 1.0))

    def token_stats(self) -> dict[str, float]:
        """Sequences, positions and bytes (values incl. header and crc) of a ``per_token`` cache."""
        seqs = positions = nbytes = 0
        with self._txn() as txn:
            cur = txn.cursor()
            if cur.set_range(self._prefix):
                for key, value in cur:
                    if not key.startswith(self._prefix):
                        break
                    seqs += 1
                    nbytes += len(value)
                    positions += struct.unpack("<I", value[len(_HEADER) : len(_HEADER) + 4])[0]
        return {"sequences": seqs, "positions": positions, "bytes": nbytes,
                "bytes_per_token": nbytes / positions if positions else math.nan}  # fmt: skip

    def features(
        self, indices: Iterable[int] | torch.Tensor, views: Iterable[int] | torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The stored teacher features, layer -> float32 [B, *shape]."""
        idx, vw = _as_lists(indices, views)
        out = self._split_features(self.read_raw(idx, vw))
        self._check_finite(list(out.values()), idx, vw)
        return out

    def _check_finite(self, parts: list[torch.Tensor], idx: list[int], vw: list[int] | None) -> None:
        """A record can pass its checksum and still hold NaN/Inf (written by other code, or
        before put() refused them): training on it would give a NaN loss, so it is refused,
        naming the record. One reduction per tensor; the search runs only on failure."""
        for t in parts:
            if t.numel() and not bool(torch.isfinite(t).all()):
                row = int((~torch.isfinite(t.reshape(t.shape[0], -1))).any(1).nonzero()[0][0])
                view = 0 if vw is None else vw[row]
                raise CorruptRecordError(
                    f"record (index={idx[row]}, view={view}) of cache {str(self.path)!r} holds NaN or Inf "
                    "targets; rebuild it with `kd precompute` (`kd cache verify` lists every such record)"
                )

    def _split_features(self, raw: np.ndarray) -> dict[str, torch.Tensor]:
        out, at = {}, self.logit_bytes
        for name, nbytes in self.meta.feature_bytes.items():
            part = np.ascontiguousarray(raw[:, at : at + nbytes]).view("<f2").astype(np.float32)
            out[name] = torch.from_numpy(part).reshape(raw.shape[0], *self.meta.features[name])
            at += nbytes
        return out

    def present(self, indices: Iterable[int], views: Iterable[int] | None = None) -> list[bool]:
        """Whether each (index, view) has a record (no decoding, no checksum)."""
        idx = [int(i) for i in indices]
        vw = [0] * len(idx) if views is None else [int(v) for v in views]
        with self._txn() as txn:
            return [txn.get(record_key(self._prefix, i, v)) is not None for i, v in zip(idx, vw)]

    def keys(self) -> Iterator[tuple[int, int]]:
        width = len(self._prefix) + _KEY.size
        with self._txn() as txn:
            cur = txn.cursor()
            if cur.set_range(self._prefix):
                for key in cur.iternext(keys=True, values=False):
                    if not key.startswith(self._prefix):
                        break
                    if len(key) == width:  # another length: no record of this cache (verify lists it)
                        yield _KEY.unpack(key[len(self._prefix) :])

    def __len__(self) -> int:
        """The records of this cache, without walking them: LMDB's entry count (the B-tree header, which
        the check at open matched against the leaves) less the keys outside this cache's key range,
        counted by short cursor walks at both ends (the metadata and a pca:K basis sort before it; a
        foreign key is counted wherever it sorts). A key of another length inside the range (damage,
        which verify lists) would count as a record; walking every key took 1.4 s at 10^6 records."""
        end = (int.from_bytes(self._prefix, "big") + 1).to_bytes(len(self._prefix), "big")  # first key after
        with self._txn() as txn:
            entries = txn.stat(self._environment().open_db(txn=txn))["entries"]
            cur = txn.cursor()
            outside = 0
            if cur.first():
                for key in cur.iternext(keys=True, values=False):
                    if key >= self._prefix:
                        break
                    outside += 1
            if cur.set_range(end):
                outside += sum(1 for _ in cur.iternext(keys=True, values=False))
        return entries - outside

    def verify(self) -> VerifyReport:
        """Check every record's checksum and decode, that a lookup by its key (what readers do) finds
        it, and which (index, view) are missing.

        One cursor walk in key order; records are checked ``_VERIFY_BATCH`` at a time (one join, one
        decode and one finiteness reduction per batch; per record only the C-level crc32 and lookup),
        and the missing keys come from comparing the walk with the expected range, so memory stays
        bounded by a batch (plus the missing list) however many records the cache holds."""
        meta = self.meta
        owned = len(range(meta.shard_index, meta.dataset_size, meta.shard_count))
        report = VerifyReport(expected=owned * meta.views)
        walk = _MissingWalk(owned * meta.views)
        batch: list[tuple[bytes, bytes]] = []
        with self._txn() as txn:
            for key, value in txn.cursor():
                if key in (META_KEY, BASIS_KEY):  # the basis was checked when this reader opened
                    continue
                batch.append((key, value))
                if len(batch) == _VERIFY_BATCH:
                    report.corrupt += self._verify_batch(txn, batch, report.problems, walk)
                    batch = []
            if batch:
                report.corrupt += self._verify_batch(txn, batch, report.problems, walk)
        # a corrupt record is stored, so the walk took it out of the missing ones: counted once
        stored, missing = walk.finish()
        report.corrupt += self._verify_view_params(report.problems)
        report.present = stored - report.corrupt
        # position p -> (index, view): p = (index - shard_index) // shard_count * views + view
        index = meta.shard_index + (missing // meta.views) * meta.shard_count
        report.missing = list(zip(index.tolist(), (missing % meta.views).tolist()))
        return report

    def _verify_view_params(self, problems: list[str]) -> int:
        """The records stored without their view params (``meta.view_params``: a cache precomputed with
        views): each is a problem, and the count is returned (they are corrupt: their view cannot be
        replayed). A cache copied without its VIEW_PARAMS_DIR folder (``cp cache/*.mdb``), or one whose
        folder was removed and then resumed (a resume redoes no target it holds, so no params either),
        passed verify before, and only ``read_view_params`` failed, later."""
        if not self.meta.view_params:
            return 0
        where = self.path / VIEW_PARAMS_DIR
        try:
            params: CacheReader | None = CacheReader(where)
        except CacheError as e:  # the folder is gone (or not a cache): no record has its params
            params, why = None, f" ({e})"
        else:
            why = ""
        have = iter(()) if params is None else params.keys()
        nxt = next(have, None)
        bad = 0
        for key in self.keys():  # both walks are in (index, view) order: one merge, no set of keys
            while nxt is not None and nxt < key:
                nxt = next(have, None)
            if nxt != key:  # one problem per record, as for any corrupt one (kd cache verify counts them)
                bad += 1
                problems.append(
                    f"record (index={key[0]}, view={key[1]}) has no view params in {str(where)!r}{why}; rebuild the "
                    "cache with `kd precompute` into an empty --out"
                )
        if params is not None:
            params.close()
        return bad

    def _verify_batch(
        self, txn: lmdb.Transaction, items: list[tuple[bytes, bytes]], problems: list[str], walk: _MissingWalk
    ) -> int:
        """Check a batch of walked (key, value) records; append their problems to ``problems`` in walk
        order (at most one per record, the first check it fails), give ``walk`` the expected-range
        positions (int64, walk order) of every record stored there, good or corrupt, and return how
        many of those are corrupt."""
        meta, path, plen = self.meta, str(self.path), len(self._prefix)
        found: dict[int, str] = {}  # batch row -> its problem
        rows: list[int] = []  # rows with a key of this cache: an (index, view), whatever their value
        for r, (key, value) in enumerate(items):
            if not key.startswith(self._prefix) or len(key) != plen + _KEY.size:
                found[r] = f"foreign key {key[:40]!r}"
                continue
            rows.append(r)
            looked_up = txn.get(key)  # what a reader does: the walk does not use the index pages
            if looked_up != value:
                found[r] = (
                    f"{_where(path, key)} is stored but a lookup by its key "
                    f"{'finds nothing' if looked_up is None else 'finds other bytes'}: an index page of the file is "
                    "damaged, so readers report it missing or read other bytes; rebuild it with `kd precompute`"
                )
        if not rows:
            problems.extend(found[r] for r in sorted(found))
            return 0
        keys = np.frombuffer(b"".join(items[r][0][plen:] for r in rows), dtype=_KEY_DTYPE)
        ids = np.stack([keys["index"].astype(np.int64), keys["view"].astype(np.int64)], axis=1)
        todo = [j for j, r in enumerate(rows) if r not in found]  # the lookups that found the record
        if todo:
            check = self._verify_sequences if meta.per_token else self._verify_records
            bad = check(path, [items[rows[j]] for j in todo], ids[todo])
            for j, why in bad.items():
                found[rows[todo[j]]] = why
        index, view = ids[:, 0], ids[:, 1]
        outside = (index >= meta.dataset_size) | (view >= meta.views) | (index % meta.shard_count != meta.shard_index)
        for j in np.flatnonzero(outside).tolist():
            found.setdefault(rows[j], f"record (index={int(index[j])}, view={int(view[j])}) is outside the dataset")
        problems.extend(found[r] for r in sorted(found))
        inside = np.flatnonzero(~outside)
        walk.add((index[inside] - meta.shard_index) // meta.shard_count * meta.views + view[inside])
        return sum(1 for j in inside.tolist() if rows[j] in found)

    def _verify_records(self, path: str, items: list[tuple[bytes, bytes]], ids: np.ndarray) -> dict[int, str]:
        """Per-sample records of one batch: size, checksum, header, then one decode and one finiteness
        check for all that pass; -> {row: problem} (what ``read_raw`` and ``_check_finite`` refuse)."""
        width = len(_HEADER) + self.record_bytes + _CRC.size
        bad: dict[int, str] = {}
        sized = []
        for r, (key, value) in enumerate(items):
            if len(value) != width:
                bad[r] = f"{_where(path, key)} has {len(value)} bytes, expected {width}"
            else:
                sized.append(r)
        if not sized:
            return bad
        joined = b"".join(items[r][1] for r in sized)
        table = np.frombuffer(joined, dtype=np.uint8).reshape(len(sized), width)
        view = memoryview(joined)
        stored = table[:, -_CRC.size :].copy().view("<u4")[:, 0]
        crcs = np.fromiter(
            (
                zlib.crc32(view[j * width : (j + 1) * width - _CRC.size], zlib.crc32(items[r][0]))
                for j, r in enumerate(sized)
            ),
            dtype=np.uint32,
            count=len(sized),
        )
        header = (table[:, : len(_HEADER) - 1] == np.frombuffer(_HEADER[:3], dtype=np.uint8)).all(axis=1)
        for j in np.flatnonzero(crcs != stored).tolist():
            bad[sized[j]] = f"{_where(path, items[sized[j]][0])} fails its checksum: the stored targets are corrupted"
        for j in np.flatnonzero((crcs == stored) & ~header).tolist():
            bad[sized[j]] = f"{_where(path, items[sized[j]][0])} has an unknown header {bytes(table[j, :4])!r}"
        keep = np.flatnonzero((crcs == stored) & header)
        if len(keep):
            at = [sized[j] for j in keep.tolist()]
            payload = table[keep, len(_HEADER) : -_CRC.size]
            for j in self._nonfinite_rows(payload, ids[at]):
                r = at[j]
                bad[r] = f"record (index={int(ids[r, 0])}, view={int(ids[r, 1])}) decodes to NaN/Inf"
        return bad

    def _nonfinite_rows(self, payload: np.ndarray, ids: np.ndarray) -> list[int]:
        """Rows of ``payload`` (checked records, uint8 [n, record_bytes]) that decode to NaN/Inf in their
        targets (a sparse record's log-sum-exp too: what readers refuse) or stored features."""
        # a copy: numpy calls a one-row slice contiguous, but torch.from_numpy keeps its row stride
        decoded = self.codec.decode_targets(payload[:, : self.logit_bytes].copy(), self.meta.num_classes, ids)
        parts = [decoded.logits, decoded.logsumexp] if isinstance(decoded, SparseTargets) else [decoded]
        parts += self._split_features(payload).values()
        return np.flatnonzero(~_finite_rows(parts, len(payload))).tolist()

    def _verify_sequences(self, path: str, items: list[tuple[bytes, bytes]], ids: np.ndarray) -> dict[int, str]:
        """Per-sequence records of one batch (``per_token``): each checked as readers do
        (``_sequence_rows``), then all their positions decoded at once; -> {row: problem}."""
        bad: dict[int, str] = {}
        seqs: list[int] = []
        parts: list[np.ndarray] = []
        for r, (key, value) in enumerate(items):
            try:
                parts.append(self._sequence_rows(path, key, value))
                seqs.append(r)
            except CorruptRecordError as e:
                bad[r] = str(e)
        if not seqs:
            return bad
        lengths = np.asarray([len(p) for p in parts], dtype=np.int64)
        owner = np.repeat(np.arange(len(seqs)), lengths)
        starts = np.cumsum(lengths) - lengths
        position = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(starts, lengths)
        keys = np.stack([ids[seqs, 0][owner], position], axis=1)  # position p of sequence i: key (i, p)
        rows = np.concatenate(parts)
        decoded = self.codec.decode_targets(np.ascontiguousarray(rows[:, : self.logit_bytes]), self.meta.num_classes,
                                            keys)  # fmt: skip
        tensors = [decoded.logits, decoded.logsumexp] if isinstance(decoded, SparseTargets) else [decoded]
        tensors += self._split_features(rows).values()  # stored hidden states
        for j in np.unique(owner[~_finite_rows(tensors, len(rows))]).tolist():
            r = seqs[j]
            bad[r] = f"record (index={int(ids[r, 0])}, view={int(ids[r, 1])}) decodes to NaN/Inf"
        return bad

    def close(self) -> None:
        """Nothing to do: the handle is shared per process and closed at exit."""


def _finite_rows(parts: list[torch.Tensor], n: int) -> np.ndarray:
    """bool [n]: whether row r of every part (CPU tensors [n, ...]) is all finite. numpy's isfinite:
    torch's parallel kernel took 90 ms per 4096 x 10 batch on a loaded 2-core machine (40x)."""
    ok = np.ones(n, dtype=bool)
    for t in parts:
        if t.numel():
            ok &= np.isfinite(t.numpy().reshape(n, -1)).all(axis=1)
    return ok


_VERIFY_BATCH = 4096  # records checked at once by CacheReader.verify: one join, decode and reduction each
_KEY_DTYPE = np.dtype([("index", ">u8"), ("view", ">u4")])  # a record key after its prefix (_KEY)


class _MissingWalk:
    """The expected positions 0..expected-1 (index-major: (index, view) of the environment's shard)
    that a cursor walk did not yield as good records. A walk in key order yields them increasing, so
    the gaps between consecutive ones are the missing keys: no set of all keys, memory bounded by a
    batch plus the answer. A position that comes out of order (the nodes of a damaged page) is set
    aside and taken out of the gaps at the end, so the answer is exact whatever the order."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.next = 0  # every position below this one was yielded or is in a gap
        self.gaps: list[np.ndarray] = []
        self.late: list[np.ndarray] = []
        self.in_order = 0

    def add(self, pos: np.ndarray) -> None:
        """The positions of a batch's good records, in walk order."""
        if not len(pos):
            return
        before = np.maximum.accumulate(np.concatenate([np.asarray([self.next - 1], dtype=np.int64), pos]))[:-1]
        fresh = pos > before
        if not fresh.all():
            self.late.append(pos[~fresh])
        seen = pos[fresh]
        if len(seen):
            last = int(seen[-1])
            gap = np.ones(last + 1 - self.next, dtype=bool)
            gap[seen - self.next] = False
            self.gaps.append(np.flatnonzero(gap) + self.next)
            self.next = last + 1
            self.in_order += len(seen)

    def finish(self) -> tuple[int, np.ndarray]:
        """-> (how many distinct positions were yielded, the missing positions in increasing order)."""
        gaps = np.concatenate([*self.gaps, np.arange(self.next, self.expected, dtype=np.int64)])
        if not self.late:
            return self.in_order, gaps
        found = np.isin(gaps, np.concatenate(self.late))  # yielded late: not missing after all
        return self.in_order + int(found.sum()), gaps[~found]


@dataclass
class VerifyReport:
    expected: int
    present: int = 0
    missing: list[tuple[int, int]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # expected-range records that are stored but fail a check: each is one of ``problems``, and
    # present + corrupt + len(missing) == expected (the other problems are foreign or stray keys)
    corrupt: int = 0

    @property
    def ok(self) -> bool:
        return not self.missing and not self.problems
