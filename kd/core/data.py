"""kd's data layer: sample sources opened by URI, their identity, seeded views, and a loader.

Open any dataset by URI (options in the query; ``&`` between options)::

    src = open_source("imagefolder:/data/train?size=64&views=rrc:size=56;flip")
    src = open_source("npz:f.npz?x=images&y=labels")        # memory-mapped (stored, not compressed, npz)
    src = open_source("npy:x.npy?y=y.npy")                  # y relative to x's folder
    src = open_source("hf:dir?image=img&label=label&split=train")   # datasets.save_to_disk, Arrow mmap
    src = open_source("cifar:dir?split=test")                # official *binary* CIFAR-10/100
    src = open_source("webdataset:shards/{000..009}.tar")    # or a directory / glob of .tar shards
    src = open_source("module:pkg.mod:factory?arg=1")        # any map-style torch Dataset of (x, y)
    src = open_source("digits:test?shape=1x8x8")             # bundled (``kd.core.data.Dataset``)

Every source is a ``kd.core.samples.SampleSource``: ``len``, ``labels`` (int64,
no image decoded), ``num_classes``, ``class_names``, ``dataset_id``
(``name/split@hash16`` from a per-file manifest, cached in a sidecar keyed by
path+size+mtime; Arrow's fingerprint for ``hf:``), ``augmentation`` (the view
policy's name), ``manifest()`` (a JSON-able dict for cache metadata),
``get(indices, views)`` and ``read(i, seed) -> (input, view params | None)``;
``read_batch(indices, seeds)`` is ``read`` of a whole batch (arrays, CIFAR and Arrow
columns gathered and converted once per batch), what the loader's workers call.
Sources are picklable and open files lazily per process.

Common options: ``size=N|HxW`` (resize shorter side + centre crop; default: the
images must all share the first one's size), ``dtype=float32|uint8`` (float32:
CHW in [0, 1]), ``views=POLICY`` (``kd.core.views``, e.g. ``crop:pad=4;flip``),
``mode=RGB|L``, ``shape=1x8x8`` (reshape each sample), ``name=``, ``split=``,
``classes=N``. Sizes are bounded where parsed (kd.core.samples: a side of at most 8192
pixels, at most 2**28 values per sample), so a typo is refused instead of allocated.

Streaming: ``loader(src, indices, batch_size, num_views=V, fresh_views=True,
workers=4, pin_memory=True, shuffle_seed=0)`` is a ``torch.utils.data.DataLoader``
yielding ``ViewBatch(indices, inputs, labels, views, params)``; decoding and
views run in the workers; ``loader.set_epoch(e)`` draws the next epoch.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import importlib
import importlib.util
import io
import json
import math
import os
import re
import stat
import struct
import tarfile
import time
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from kd.core.samples import (  # noqa: F401 - VIEW_STRIDE, SampleSource, view_seeds: re-exported
    MAX_IMAGE_SIDE,
    VIEW_STRIDE,
    SampleSource,
    sample_size_problem,
    view_seeds,
)
from kd.core.views import IDENTITY_PARAMS, ViewPolicy, resize_center

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 1 / 3
DIGITS_POLICY = ViewPolicy.parse("shift1")  # pixel-identical to ``augment("digits", ...)``


@dataclass(frozen=True)
class Dataset:
    """An in-memory dataset: inputs [N, ...] float32, labels [N] int64."""

    name: str
    split: str
    inputs: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    @cached_property
    def dataset_id(self) -> str:
        """``name/split@hash``: the hash covers the samples and labels, so a
        cache built on other data (or another split) is refused."""
        h = hashlib.sha256()
        h.update(self.inputs.numpy().tobytes())
        h.update(self.labels.numpy().tobytes())
        return f"{self.name}/{self.split}@{h.hexdigest()[:16]}"

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def augmentation(self) -> str:
        """Name (and version) of the seeded augmentation ``views`` applies ("none": no views)."""
        return AUGMENTATIONS.get(self.name, "none")

    def get(self, indices: torch.Tensor, views: torch.Tensor | None = None) -> torch.Tensor:
        """``kd.core.samples.SampleSource.get``: the samples, or their seeded views."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        if views is None:
            return self.inputs[idx]
        return self.views(idx, idx * VIEW_STRIDE + torch.as_tensor(views, dtype=torch.long))

    format = "digits"

    @property
    def policy(self) -> ViewPolicy:
        """The view policy of ``views`` (``augment`` as a ``kd.core.views`` policy)."""
        return DIGITS_POLICY

    @property
    def class_names(self) -> list[str]:
        return [str(c) for c in range(self.num_classes)]

    def manifest(self) -> dict[str, Any]:
        """What a cache stores to name this data (``FileSource.manifest`` for files)."""
        return {
            "format": self.format,
            "uri": self.name if self.split == "train" else f"{self.name}:{self.split}",
            "dataset_id": self.dataset_id,
            "num_samples": len(self),
            "num_classes": self.num_classes,
            "sample_shape": list(self.inputs.shape[1:]),
            "augmentation": self.augmentation,
        }

    def read(self, index: int, seed: int | None = None, policy: Any = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One sample (``seed`` None) or its seeded view, with the view's params."""
        x = self.inputs[int(index)]
        if seed is None:
            return x, None
        pol = DIGITS_POLICY if policy is None else ViewPolicy.parse(policy)
        img = x.reshape(1, 8, 8) if x.numel() == 64 else x
        params = pol.draw(int(seed), img.shape[-2], img.shape[-1])
        return pol.apply(img, params).reshape(x.shape), params

    def views(self, indices: torch.Tensor | list[int], seeds: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """The samples at ``indices``; with ``seeds``, each sample's augmented view.

        A view is a deterministic function of (sample, seed), so a server, a
        cache and a trainer that agree on the seed see exactly the same pixels.
        """
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.inputs[idx]
        if seeds is None:
            return x
        seeds = torch.as_tensor(seeds, dtype=torch.long)
        if seeds.shape != idx.shape:
            raise ValueError(f"{len(seeds)} view seeds for {len(idx)} indices")
        return torch.stack([augment(self.name, row, int(s)) for row, s in zip(x, seeds)]) if len(idx) else x


def digits_csv_path() -> Path | None:
    """Where the installed scikit-learn keeps ``digits.csv.gz``, found without importing sklearn.

    ``find_spec`` of a top-level package only locates it (its ``__init__`` does not run);
    importing ``sklearn.datasets`` costs ~1.3 s (it pulls in scipy), every kd process
    that loads digits paid it. None where the file is not there (another sklearn layout).
    """
    spec = importlib.util.find_spec("sklearn")
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(loc) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def load_digits_arrays(csv: str | os.PathLike[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The digits data (float64 [1797, 64], 0..16) and targets (int [1797]), byte-for-byte
    ``sklearn.datasets.load_digits(return_X_y=True)``, read from sklearn's bundled file.

    ``csv``: the ``digits.csv.gz`` to read (default: the installed sklearn's); where it
    is absent, sklearn's own loader is used (slow import, same arrays).
    """
    path = Path(csv) if csv is not None else digits_csv_path()
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits

        return load_digits(return_X_y=True)
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",", ndmin=2)  # as sklearn parses it (~25 ms)
    return data[:, :-1], data[:, -1].astype(int, copy=False)  # the last column is the target


# The digits split, pinned as data: the (train, test) indices that sklearn's
# ``train_test_split(test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED,
# stratify=y)`` gives (tests/test_digits_fast.py checks them against it). Read from here,
# the split needs no ``sklearn.model_selection`` (and scipy) import, and it cannot change
# with a future sklearn: every cache's ``dataset_id`` depends on it.
DIGITS_SPLIT_FILE = Path(__file__).with_name("digits_split.npz")


@cache
def _digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = load_digits_arrays()
    x = (x / 16.0).astype(np.float32)  # pixel intensities 0..16 -> 0..1
    y = y.astype(np.int64)
    with np.load(DIGITS_SPLIT_FILE) as split:
        train, test = split["train"].astype(np.int64), split["test"].astype(np.int64)
    return x[train], x[test], y[train], y[test]


def load_dataset(name: str = "digits", split: str = "train") -> Dataset:
    """Load a bundled dataset split (``digits`` with ``train`` or ``test``)."""
    if name != "digits":
        raise ValueError(f"unknown dataset {name!r}; bundled datasets: digits")
    x_tr, x_te, y_tr, y_te = _digits_split()
    if split == "train":
        x, y = x_tr, y_tr
    elif split == "test":
        x, y = x_te, y_te
    else:
        raise ValueError(f"unknown split {split!r} of dataset digits; splits: train, test")
    return Dataset(name, split, torch.from_numpy(x.copy()), torch.from_numpy(y.copy()), 10)


AUGMENTATIONS = {"digits": "digits-shift1-v1"}


def augment(name: str, sample: torch.Tensor, seed: int) -> torch.Tensor:
    """The seeded augmentation of one sample of dataset ``name``.

    digits: a random translation of the 8x8 image by -1, 0 or +1 pixels on
    each axis (zero fill), as in small-image KD training.
    """
    if name != "digits":
        raise ValueError(f"no augmentation defined for dataset {name!r}")
    g = torch.Generator().manual_seed(seed)
    dy, dx = (torch.randint(-1, 2, (2,), generator=g)).tolist()
    img = sample.reshape(8, 8)
    out = torch.zeros_like(img)
    ys, yd = (slice(0, 8 - dy), slice(dy, 8)) if dy >= 0 else (slice(-dy, 8), slice(0, 8 + dy))
    xs, xd = (slice(0, 8 - dx), slice(dx, 8)) if dx >= 0 else (slice(-dx, 8), slice(0, 8 + dx))
    out[yd, xd] = img[ys, xs]
    return out.reshape(sample.shape)


def parse_dataset(ref: str) -> Dataset:
    """``digits`` or ``digits:test`` -> Dataset (split defaults to train)."""
    name, _, split = ref.partition(":")
    return load_dataset(name, split or "train")


# =============================================================================
# Sample sources from files, opened by URI
# =============================================================================

FORMATS = ("digits", "imagefolder", "npz", "npy", "hf", "cifar", "webdataset", "module")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SPLIT_NAMES = ("train", "val", "valid", "validation", "test", "eval")
_COMMON_OPTIONS = ("size", "dtype", "views", "mode", "shape", "name", "split", "classes")


class DatasetError(ValueError):
    """A dataset that cannot be opened or read, with the file or option at fault named."""


LABEL_MAX = 2**31 - 1  # the largest class label kd accepts (a class count must fit an int32)


def _pick(given: str | None, candidates: Sequence[str], available: list[str], what: str, *,
          fmt: str, noun: str, ref: str) -> str:  # fmt: skip
    """The array/column for ``what``: the one named by ``?what=`` (which must exist), else the
    first of ``candidates`` present; the error lists what there is."""
    if given is not None:
        if given not in available:
            raise DatasetError(f"{fmt}: no {noun} {given!r} ({what}=); {noun}s: {', '.join(available)}")
        return given
    for c in candidates:
        if c in available:
            return c
    raise DatasetError(f"{fmt}: no {what} {noun} among {', '.join(available)}; name it with ?{what}={ref}")


def load_hf_split(root: Path, split: str = "train") -> Any:
    """One split of a Hugging Face dataset saved with ``save_to_disk`` (Arrow, memory-mapped)."""
    try:
        import datasets
    except ImportError:
        # kd installs from its repository, not from PyPI ('kd[hf]' names no package of ours): name the package.
        raise DatasetError(
            "hf: needs the 'datasets' package: pip install datasets (or, in kd's repository, pip install -e '.[hf]')"
        ) from None
    try:
        ds = datasets.load_from_disk(str(root))
    except FileNotFoundError as e:
        raise DatasetError(f"hf: {root} is not a dataset saved with save_to_disk ({e})") from None
    except Exception as e:  # the library's own failure on a broken or empty (0-row) dataset: IndexError, ...
        raise DatasetError(
            f"hf: datasets.load_from_disk cannot load {root} ({type(e).__name__}: {e}); is it a complete "
            "dataset saved with save_to_disk, with at least one row?"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DatasetError(f"hf: no split {split!r} in {root}; splits: {', '.join(ds)}")
        ds = ds[split]
    return ds


def _parse_size(text: str, what: str = "size") -> tuple[int, ...]:
    try:
        dims = tuple(int(v) for v in re.split(r"[x,]", text))
    except ValueError:
        raise DatasetError(f"{what}={text!r}: expected N or HxW (e.g. 64 or 48x64)") from None
    if not dims or any(d <= 0 for d in dims):
        raise DatasetError(f"{what}={text!r}: sizes must be positive")
    if what == "size" and max(dims) > MAX_IMAGE_SIDE:
        raise DatasetError(f"{what}={text!r}: images are resized to at most {MAX_IMAGE_SIDE} pixels a side")
    problem = sample_size_problem(dims)
    if problem:
        raise DatasetError(f"{what}={text!r}: {problem}")
    return dims


def split_uri(uri: str) -> tuple[str, str, dict[str, str]]:
    """``"fmt:target?k=v&k2=v2"`` -> (fmt, target, options). Values may hold ``=``, ``;``, ``,``."""
    base, _, query = uri.partition("?")
    fmt, _, target = base.partition(":")
    opts: dict[str, str] = {}
    for part in filter(None, query.split("&")):
        k, eq, v = part.partition("=")
        if not eq:
            raise DatasetError(f"{uri!r}: option {part!r} is not key=value")
        opts[k.strip()] = v.strip()
    return fmt.strip().lower(), target, opts


def open_source(uri: str) -> SampleSource:
    """Open a dataset named by URI (see the module docstring for formats and options)."""
    if not isinstance(uri, str) or not uri:
        raise DatasetError("empty dataset URI")
    fmt, target, opts = split_uri(uri)
    if fmt == "digits":
        return _open_digits(target, opts)
    if fmt in ("text", "jsonl", "tokens") or (fmt == "hf" and {"text", "prompt", "completion"} & set(opts)):
        from kd.core.tokens import open_token_source  # token corpora (language-model teachers)

        if not target:
            raise DatasetError(f"{uri!r}: {fmt} needs a path after '{fmt}:'")
        return open_token_source(uri, fmt, target, opts)
    cls = _SOURCES.get(fmt)
    if cls is None:
        hint = " (prefix a path with its format, e.g. imagefolder:DIR)" if ("/" in uri or fmt == "") else ""
        known = ", ".join((*FORMATS, "text", "jsonl", "tokens"))
        raise DatasetError(f"unknown dataset format {fmt!r} in {uri!r}{hint}; known formats: {known}")
    if not target:
        raise DatasetError(f"{uri!r}: {fmt} needs a path after '{fmt}:'")
    return cls(uri, target, opts)


def _open_digits(split: str, opts: dict[str, str]) -> Dataset:
    unknown = set(opts) - {"shape", "split"}
    if unknown:
        raise DatasetError(f"digits: unknown option(s) {sorted(unknown)}; digits takes: shape, split")
    data = load_dataset("digits", opts.get("split") or split or "train")
    if "shape" in opts:
        shape = _parse_size(opts["shape"], "shape")
        if math.prod(shape) != data.inputs[0].numel():
            raise DatasetError(f"digits: shape={opts['shape']} does not hold {data.inputs[0].numel()} values")
        data = Dataset(data.name, data.split, data.inputs.reshape(len(data), *shape), data.labels, data.num_classes)
    return data


# -- manifests -------------------------------------------------------------------
# v2: entries keyed by inode and ctime too. v1 trusted a hash on (size, mtime) alone, so a file replaced by
# one of the same size with its mtime carried over (cp -p, rsync -t, touch -r, an extracted archive) kept the
# old content's hash: the dataset_id did not change and a resumed precompute kept the old file's targets.
MANIFEST_VERSION = 2
_RACY_NS = 2_000_000_000  # files modified this close to a hash are hashed again next time


def _stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
    """(size, mtime_ns, inode, ctime_ns): what a file's kept hash (or index) is trusted on. Nobody can set a
    ctime (every write, rename over or utime sets it to now), so a same-size edit with its mtime put back, or
    another file renamed over this one, is seen even where the mtime is not."""
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns


def cache_dir() -> Path:
    """Where kd keeps per-user metadata (manifests): ``$KD_CACHE_DIR`` or ``~/.cache/kd``."""
    env = os.environ.get("KD_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kd"


def _hash_file(path: str | Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _hash_one(path: str) -> str:
    try:
        return _hash_file(path)
    except OSError as e:  # removed or unreadable since it was listed
        raise DatasetError(f"cannot read {path}: {e.strerror}") from None


HASH_THREADS = min(32, (os.cpu_count() or 1) + 4)  # files hashed at once on a first open (I/O waits overlap)


def _hash_files(paths: list[str]) -> list[str]:
    """``_hash_file`` of each path, in order, on up to HASH_THREADS threads: opening and reading a
    file releases the GIL, and so does blake2b on buffers over 2 KiB, so the threads overlap."""
    threads = min(HASH_THREADS, len(paths) // 16)  # a handful of files: not worth the threads
    if threads < 2:
        return [_hash_one(p) for p in paths]
    step = -(-len(paths) // (threads * 8))  # slices, not a future per file: small files are many

    def some(lo: int) -> list[str]:
        return [_hash_one(p) for p in paths[lo : lo + step]]

    with ThreadPoolExecutor(threads, thread_name_prefix="kd-hash") as pool:
        return [h for part in pool.map(some, range(0, len(paths), step)) for h in part]


def _read_sidecar(side: Path) -> tuple[int, list[str], list[tuple[tuple[int, ...], str]]]:
    """(written_ns, relative paths, (``_stat_key``, hash) of each) of a manifest sidecar; empty if unreadable."""
    try:
        # surrogateescape: file names are bytes on POSIX; one that is not UTF-8 (a Latin-1 name copied
        # from an old system) is a str with surrogates, which plain UTF-8 refuses to write or read
        with open(side, encoding="utf-8", errors="surrogateescape") as f:
            head = f.readline().split()
            if not (len(head) == 3 and head[1] == f"v{MANIFEST_VERSION}"):
                return 0, [], []
            rels, entries = [], []
            for line in f:
                h, size, mtime, ino, ctime, rel = line.rstrip("\n").split("\t", 5)
                rels.append(rel)
                entries.append(((int(size), int(mtime), int(ino), int(ctime)), h))
            return int(head[2]), rels, entries
    except (OSError, ValueError):
        return 0, [], []


def file_manifest(root: Path, rels: Sequence[str]) -> list[tuple[str, int, int, str]]:
    """(relative path, size, mtime_ns, content hash) of each file under ``root``.

    A file's hash is computed once and kept in a sidecar (``cache_dir()/manifests``)
    keyed by path, size, mtime, inode and ctime (``_stat_key``), so re-opening a large folder only stats it.
    A file modified within 2 s of its hashing is hashed again (as git's racy index).
    Files are stat'ed relative to an open descriptor of ``root`` (no path object per file),
    the files to hash are hashed on several threads (``_hash_files``).
    """
    root = Path(root).resolve()
    base = str(root)
    side = cache_dir() / "manifests" / (hashlib.sha256(os.fsencode(base)).hexdigest()[:32] + ".tsv")
    written_ns, known_rels, known = _read_sidecar(side)
    rels = list(rels)
    # Re-opening an unchanged folder lists the same files in the same order as the sidecar: matched by
    # position, without a dict of every path; any other listing is matched by name.
    where = None if known_rels == rels else {rel: k for k, rel in enumerate(known_rels)}
    del known_rels
    use_fd = os.stat in os.supports_dir_fd
    fd = os.open(base, os.O_RDONLY) if use_fd else None
    out: list[tuple[str, int, int, str]] = []
    keys: list[tuple[int, int, int, int]] = []  # _stat_key of each file, for the sidecar
    stale: list[int] = []  # positions in out whose hash is not known
    try:
        for i, rel in enumerate(rels):
            try:
                st = os.stat(rel, dir_fd=fd) if use_fd else os.stat(os.path.join(base, rel))
            except OSError as e:
                raise DatasetError(f"cannot read {os.path.join(base, rel)}: {e.strerror}") from None
            if not stat.S_ISREG(st.st_mode):
                # a named pipe (mkfifo) hung the hashing (and any decode) for ever, waiting for a writer
                mode = st.st_mode
                kind = "named pipe" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device"
                raise DatasetError(
                    f"{os.path.join(base, rel)} is a {kind}, not a regular file: reading it could wait for ever; "
                    "remove it from the dataset"
                )
            key = _stat_key(st)
            size, mtime = key[0], key[1]
            keys.append(key)
            k = i if where is None else where.get(rel, -1)
            hit = known[k] if k >= 0 else None
            # the racy window is the mtime's alone: a file whose mtime was set back (utime, cp -p) has a ctime of
            # when that was done, and a ctime in the window would re-hash it on every open for 2 s
            if hit and hit[0] == key and mtime < written_ns - _RACY_NS:
                out.append((rel, size, mtime, hit[1]))
            else:
                out.append((rel, size, mtime, ""))
                stale.append(i)
    finally:
        if fd is not None:
            os.close(fd)
    if stale:
        for i, h in zip(stale, _hash_files([os.path.join(base, out[i][0]) for i in stale])):
            out[i] = (*out[i][:3], h)
    if stale or len(known) != len(out):
        try:
            side.parent.mkdir(parents=True, exist_ok=True)
            tmp = side.with_suffix(f".{os.getpid()}.tmp")
            with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
                f.write(f"kd-manifest v{MANIFEST_VERSION} {time.time_ns()}\n")
                f.writelines(
                    f"{h}\t{size}\t{mtime}\t{ino}\t{ctime}\t{rel}\n"
                    for (rel, _, _, h), (size, mtime, ino, ctime) in zip(out, keys)
                )
            os.replace(tmp, side)
        except OSError:
            pass  # a read-only cache dir only costs re-hashing next time
    return out


def _digest(*parts: object) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def _name_split(path: Path, opts: dict[str, str], default_split: str = "train") -> tuple[str, str]:
    p = Path(str(path).rstrip("/"))
    stem = p.stem if p.suffix in (".npz", ".npy", ".tar") else p.name
    if "split" not in opts and stem.lower() in SPLIT_NAMES:
        name, split = p.parent.name or stem, stem.lower()
    else:
        name, split = stem, opts.get("split", default_split)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", opts.get("name", name)) or "data"
    return name, split


def _to_8bit(im: Any, what: str) -> Any:
    """``im`` with 8-bit channels. Pillow's ``convert`` clips a 16-bit grayscale image
    (mode ``I;16*``, or ``I`` from a PNG) to 255, so 30000 and 300 would both be white:
    its values are scaled to 8 bits here (the high byte, as Pillow does for 16-bit RGB).
    32-bit integer and float images have no known range: refused."""
    from PIL import Image

    if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG"):  # a PNG holds at most 16 bits
        a = np.asarray(im).astype(np.uint32)
        if a.size and int(a.max()) > 0xFFFF:
            raise DatasetError(f"image {what} has values up to {int(a.max())} in a 16-bit image")
        return Image.fromarray((a >> 8).astype(np.uint8), "L")
    if im.mode in ("I", "F") or im.mode.startswith(("I;32", "F;")):
        kind = "floating-point" if im.mode.startswith("F") else "integer"
        raise DatasetError(
            f"image {what} has 32-bit {kind} pixels (Pillow mode {im.mode}), whose range kd cannot know; "
            "convert it to an 8- or 16-bit image"
        )
    return im


def _decode_image(src: str | Path | bytes, mode: str, what: str) -> torch.Tensor:
    """Decode one image file (or its bytes) with Pillow to uint8 CHW (16-bit images scaled to 8 bits)."""
    from PIL import Image, UnidentifiedImageError

    stream = io.BytesIO(src) if isinstance(src, bytes) else src
    try:
        with Image.open(stream) as im:
            arr = np.asarray(_to_8bit(im, what).convert(mode))
    except DatasetError:
        raise
    except FileNotFoundError:
        raise DatasetError(f"image {what} is missing (was the dataset changed after opening?)") from None
    except Image.DecompressionBombError as e:
        raise DatasetError(f"image {what} is too large to decode safely: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        # Pillow names what it was given: for bytes (hf, webdataset) that is "<_io.BytesIO object at
        # 0x...>", which tells nothing; ``what`` already names the sample.
        why = (
            str(e).replace(f" {stream!r}", "").replace(repr(stream), "the bytes") if isinstance(src, bytes) else str(e)
        )
        raise DatasetError(f"cannot decode image {what}: {why}") from None
    t = torch.from_numpy(arr.copy())
    return t[None] if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


_KIND_NAMES = {"U": "text", "S": "bytes", "O": "Python objects", "M": "dates", "m": "time spans",
               "V": "structured records", "c": "complex numbers"}  # fmt: skip


def _array_to_chw(a: np.ndarray, layout: str) -> torch.Tensor:
    """One sample of an array: integers are pixel values 0..255 (kept uint8), floats stay floats."""
    a = np.asarray(a)
    if a.dtype.kind not in "iubf":
        raise DatasetError(
            f"samples are {a.dtype} ({_KIND_NAMES.get(a.dtype.kind, 'not numbers')}); kd reads integer, float "
            "or bool arrays"
        )
    if not a.dtype.isnative:  # a big-endian array (numpy records the byte order): torch takes native only
        a = a.astype(a.dtype.newbyteorder("="))
    if a.dtype.kind in "iub" and a.dtype != np.uint8:
        if a.size and (a.min() < 0 or a.max() > 255):
            raise DatasetError(f"integer samples are read as pixel values 0..255; found {a.min()}..{a.max()}")
        a = a.astype(np.uint8)
    t = torch.from_numpy(np.array(a, copy=True))
    if t.dtype not in (torch.uint8, torch.float32):
        t = t.float()
    if layout == "nhwc" and t.dim() == 3:
        t = t.permute(2, 0, 1).contiguous()
    elif t.dim() == 2 and layout != "flat":
        t = t[None]
    return t


def _batch_to_chw(a: np.ndarray, layout: str, fresh: bool = False) -> torch.Tensor:
    """Samples ``a`` [B, ...] as ``_array_to_chw`` gives each one, stacked, in one vectorised pass.

    Every step is elementwise (a byte-order swap, a cast of integers 0..255 to uint8, a
    widening to float32) or a layout move, so row k is bit-identical to ``_array_to_chw(a[k])``.
    ``fresh``: ``a`` is a private copy (a gather's result) that the tensor may own; otherwise
    (a slice of a memory map or of an in-memory array) it is copied, as ``_array_to_chw`` does.
    A DatasetError here is for the batch; the caller re-reads sample by sample to name the one at fault.
    """
    if a.dtype.kind not in "iubf":
        raise DatasetError(f"samples are {a.dtype}")
    if not a.dtype.isnative:
        a, fresh = a.astype(a.dtype.newbyteorder("=")), True
    if a.dtype.kind in "iub" and a.dtype != np.uint8:
        if a.size and (a.min() < 0 or a.max() > 255):
            raise DatasetError("integer samples outside 0..255")
        a, fresh = a.astype(np.uint8), True
    if not (fresh and a.flags.writeable and a.flags.c_contiguous):
        a = np.array(a, order="C")
    t = torch.from_numpy(a)
    if t.dtype not in (torch.uint8, torch.float32):
        t = t.float()
    if layout == "nhwc" and t.dim() == 4:
        t = t.permute(0, 3, 1, 2).contiguous()
    elif t.dim() == 3 and layout != "flat":
        t = t[:, None]
    return t


class FileSource:
    """A sample source over files: common options, views, identity, lazy per-process handles.

    Subclasses set ``format`` and ``OPTIONS`` and implement ``__len__``,
    ``_read_labels``, ``_raw(i)`` (the decoded sample, uint8 or float), ``_what(i)``
    (the file a sample comes from, for messages) and ``_identity()``.
    """

    format = "?"
    OPTIONS: tuple[str, ...] = ()

    def __init__(self, uri: str, target: str, opts: dict[str, str]) -> None:
        unknown = set(opts) - set(_COMMON_OPTIONS) - set(self.OPTIONS)
        if unknown:
            valid = ", ".join(sorted({*_COMMON_OPTIONS, *self.OPTIONS}))
            raise DatasetError(f"{self.format}: unknown option(s) {sorted(unknown)}; valid: {valid}")
        self.uri, self.target, self.options = uri, target, dict(opts)
        self.size: tuple[int, int] | None = None
        if "size" in opts:
            dims = _parse_size(opts["size"])
            if len(dims) > 2:
                raise DatasetError(f"size={opts['size']!r}: expected N or HxW")
            self.size = (dims[0], dims[-1])
        self.out_dtype = opts.get("dtype", "float32")
        if self.out_dtype not in ("float32", "uint8"):
            raise DatasetError(f"dtype={self.out_dtype!r}: expected float32 or uint8")
        self.mode = opts.get("mode", "RGB")
        if self.mode not in ("RGB", "L"):
            raise DatasetError(f"mode={self.mode!r}: expected RGB or L")
        self.shape = _parse_size(opts["shape"], "shape") if "shape" in opts else None
        self.classes_option: int | None = None
        if "classes" in opts:
            try:
                self.classes_option = int(opts["classes"])
            except ValueError:
                raise DatasetError(f"classes={opts['classes']!r}: expected a whole number of classes") from None
            if not 1 <= self.classes_option <= LABEL_MAX + 1:
                raise DatasetError(f"classes={opts['classes']!r}: the number of classes must be >= 1")
        try:
            self.policy = ViewPolicy.parse(opts.get("views"))
        except ValueError as e:
            raise DatasetError(f"views={opts.get('views')!r}: {e}") from None
        self._h: dict[str, Any] = {}
        self._pid = os.getpid()

    # -- per-process handles ---------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_h"] = {}  # file handles and memory maps are reopened in each process
        return state

    def _handles(self) -> dict[str, Any]:
        if self._pid != os.getpid():  # forked: never share a descriptor's offset with the parent
            self._h, self._pid = {}, os.getpid()
        return self._h

    # -- the SampleSource protocol ---------------------------------------------------
    def __len__(self) -> int:
        raise NotImplementedError

    def _read_labels(self) -> np.ndarray:
        raise NotImplementedError

    def _raw(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def _what(self, i: int) -> str:
        return f"sample {i} of {self.uri}"

    def _identity(self) -> dict[str, Any]:
        raise NotImplementedError

    def _class_names(self) -> list[str] | None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r}, {len(self)} samples)"

    def _label_what(self, i: int) -> str:
        """Where label ``i`` is stored, for messages (subclasses name their array, column or member)."""
        return f"the label of {self._what(i)}"

    @cached_property
    def labels(self) -> torch.Tensor:
        """int64 ``[N]``, read without decoding any sample; each one checked to be a class 0..num_classes-1."""
        return torch.from_numpy(self._checked_labels(np.asarray(self._read_labels())))

    def _checked_labels(self, a: np.ndarray) -> np.ndarray:
        """``a`` as int64 after refusing any label that is not a whole number in range, naming the first."""

        def bad(mask: np.ndarray, problem: str) -> None:
            if mask.any():
                i = int(np.flatnonzero(mask)[0])
                raise DatasetError(
                    f"{self.format}: {self._label_what(i)} is {a[i].item()!r}: {problem} "
                    f"({int(mask.sum())} such label(s) in {self.uri})"
                )

        if a.ndim != 1:
            raise DatasetError(
                f"{self.format}: labels of {self.uri} must be one integer per sample, got shape {list(a.shape)}"
            )
        if a.dtype.kind == "b":
            a = a.astype(np.int64)
        elif a.dtype.kind == "f":
            bad(np.isnan(a), "a missing label (null or NaN)")
            bad(~np.isfinite(a) | (a != np.floor(a)), "not a whole number (class labels are integers)")
        elif a.dtype.kind not in "iu":  # objects (Python numbers, None, lists) or strings
            vals = a.tolist()
            for i, v in enumerate(vals):
                if not isinstance(v, (int, float)) or isinstance(v, bool):
                    raise DatasetError(
                        f"{self.format}: {self._label_what(i)} is {v!r}: class labels must be integers "
                        f"(the labels of {self.uri} are {a.dtype})"
                    )
            return self._checked_labels(np.asarray(vals, dtype=np.float64))  # exact below 2**53: the range holds
        limit, known = self.classes_option, self._class_names()
        why = f"outside the {limit} classes of ?classes={limit}" if limit else ""
        if limit is None and known:
            limit, why = len(known), f"outside the {len(known)} classes of {self.uri}"
        if a.dtype.kind in "if":
            bad(a < 0, "negative (class labels are 0, 1, ...)")
        bad(a > (LABEL_MAX if limit is None else limit - 1), why or f"larger than the largest class label {LABEL_MAX}")
        return np.array(a, dtype=np.int64, copy=True)

    @cached_property
    def num_classes(self) -> int:
        labels = self.labels  # checked: every label is one of the classes counted here
        if self.classes_option is not None:
            return self.classes_option
        names = self._class_names()
        if names:
            return len(names)
        return int(labels.max()) + 1 if len(labels) else 0

    @cached_property
    def class_names(self) -> list[str]:
        return self._class_names() or [str(c) for c in range(self.num_classes)]

    @property
    def augmentation(self) -> str:
        return self.policy.name

    @cached_property
    def name_split(self) -> tuple[str, str]:
        return _name_split(Path(self.target), self.options)

    @property
    def name(self) -> str:
        return self.name_split[0]

    @property
    def split(self) -> str:
        return self.name_split[1]

    def _ident(self) -> dict[str, Any]:
        ident = self._identity()
        ident["decode"] = {k: self.options[k] for k in ("size", "mode", "shape", "dtype") if k in self.options}
        return ident

    def _id_of(self, ident: dict[str, Any]) -> str:
        content = {k: v for k, v in ident.items() if k != "files"}
        files = [(rel, size, h) for rel, size, _mtime, h in ident.get("files", [])]
        return f"{self.name}/{self.split}@{_digest(self.format, content, files)[:16]}"

    @cached_property
    def _walked(self) -> tuple[str, dict[str, Any]]:
        """``(dataset_id, identity without its per-file list)`` from one pass over the files.

        Only these are kept (not the per-file list), so a source stays small in every
        DataLoader worker however many files it has; ``dataset_id`` and ``manifest(files=False)``
        both come from this one pass, taken once for the source's lifetime (a new
        ``open_source`` walks the files again, so it sees any change)."""
        ident = self._ident()
        return self._id_of(ident), {k: v for k, v in ident.items() if k != "files"}

    @property
    def dataset_id(self) -> str:
        """``name/split@hash16``: any changed, added or removed file (or decode option) changes it."""
        return self._walked[0]

    def manifest(self, files: bool = True) -> dict[str, Any]:
        """JSON-able identity for cache metadata: URI, id, counts, classes, per-file entries.

        ``files=False`` (what a cache stores) is the pass ``dataset_id`` was taken from, so
        it describes exactly the data that id names. ``files=True`` re-reads the per-file
        manifest (stat only: hashes come from the sidecar) and refuses if the data changed
        since ``dataset_id`` was taken.
        """
        if files:
            ident = self._ident()
            if self._id_of(ident) != self.dataset_id:
                raise DatasetError(f"{self.uri} changed since it was opened (was {self.dataset_id}); open it again")
        else:
            ident = self._walked[1]
        out = {
            "format": self.format,
            "uri": self.uri,
            "dataset_id": self.dataset_id,
            "num_samples": len(self),
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "sample_shape": list(self.sample_shape),
            "augmentation": self.augmentation,
        }
        for k, v in ident.items():
            if k == "files":
                if files:
                    out["files"] = [list(e) for e in v]
            else:
                out[k] = v
        return out

    @cached_property
    def native_size(self) -> tuple[int, int] | None:
        """The size every sample must have when no ``size`` option is given (that of sample 0)."""
        if self.size is not None or not len(self):
            return self.size
        x = self._shaped(0)
        return (int(x.shape[-2]), int(x.shape[-1])) if x.dim() == 3 else None

    @cached_property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of a plain sample (a view with rrc:size=S is S x S instead)."""
        if not len(self):
            return ()
        return tuple(self.read(0)[0].shape)

    def _raw_batch(self, idx: np.ndarray) -> torch.Tensor | list[torch.Tensor] | None:
        """The raw samples at ``idx`` read together: one tensor [B, ...] (every row exactly
        ``_raw(i)``), a list of ``_raw(i)`` (one decode per file, without per-sample reads), or
        None (read them one by one). Sources that can read many samples at once override it."""
        return None

    def _shaped(self, i: int) -> torch.Tensor:
        return self._reshape(i, self._raw(i))

    def _reshape(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.shape is not None:
            if x.numel() != math.prod(self.shape):
                raise DatasetError(
                    f"{self._what(i)} has {x.numel()} values; shape={self.options['shape']} needs "
                    f"{math.prod(self.shape)}"
                )
            x = x.reshape(self.shape)
        return x

    @cached_property
    def native_shape(self) -> tuple[int, ...] | None:
        """The shape every sample that is not an image [C, H, W] must have (that of sample 0)."""
        return tuple(self._shaped(0).shape) if len(self) else None

    def _refuse_other_shape(self, i: int, shape: tuple[int, ...]) -> None:
        # Samples of other lengths (a ragged Hugging Face column, a module's vectors) were stacked by torch:
        # "stack expects each tensor to be equal size" (a RuntimeError naming no sample), or, a batch at a
        # time, handed to the teacher at another width
        want = self.native_shape
        if want is not None and shape != want:
            raise DatasetError(
                f"{self._what(i)} has shape {list(shape)} but this source's samples have {list(want)} (that of "
                "sample 0); every sample must have the same shape"
            )

    def _fit(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            self._refuse_other_shape(i, tuple(x.shape))
            return x
        if self.size is not None:
            return resize_center(x, self.size)
        want = self.native_size
        if want is not None and tuple(x.shape[-2:]) != want:
            raise DatasetError(
                f"{self._what(i)} is {x.shape[-1]}x{x.shape[-2]} (WxH) but this source's images are "
                f"{want[1]}x{want[0]}; give ?size=N to resize every image"
            )
        return x

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        if self.out_dtype == "uint8":
            return x if x.dtype == torch.uint8 else (x * 255).round().clamp(0, 255).to(torch.uint8)
        return x.float() / 255 if x.dtype == torch.uint8 else x.float()

    def read(self, index: int, seed: int | None = None, policy: Any = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sample ``index`` (``seed`` None) or its view ``seed``, and the view's params.

        Decoding happens here, so it runs in DataLoader workers. The params
        replay the view through ``kd.core.views.apply_params``.
        """
        i = int(index)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {self.uri} of {len(self)} samples")
        pol = None if seed is None else self.policy if policy is None else ViewPolicy.parse(policy)
        x = self._shaped(i)
        self._refuse_non_finite([i], x[None])
        return self._finish(i, x, seed, pol)

    def _refuse_non_finite(self, il: list[int], x: torch.Tensor) -> None:
        """Refuse float samples ``x`` [B, ...] (samples ``il``) holding NaN or Inf, naming the first.

        Read as they are, they reach the teacher and the student: a local teacher's NaN logits were
        blamed on the cache ("logits contain NaN"), a NaN loss on the learning rate ("the run
        diverged"), and ``?dtype=uint8`` turned them into pixels of 0 without a word."""
        if not x.is_floating_point() or x.numel() == 0:
            return
        # A sum carries any NaN or Inf through: one vectorised pass (2.4x faster than aminmax here), no
        # mask. A finite batch whose sum overflows is told apart by the exact check below.
        if math.isfinite(x.sum().item()):
            return
        bad = ~torch.isfinite(x.reshape(len(x), -1))
        if not bad.any():
            return
        k = int(bad.any(dim=1).nonzero()[0])
        raise DatasetError(
            f"{self._what(il[k])} holds NaN or Inf ({int(bad[k].sum())} of its {x[k].numel()} values): "
            "inputs must be finite numbers; fix or drop that sample"
        )

    def _finish(
        self, i: int, x: torch.Tensor, seed: int | None, pol: ViewPolicy | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``read``'s work on sample ``i`` once it is decoded and shaped (``x``): fit, view, output dtype."""
        if seed is None or pol is None:
            return self._out(self._fit(i, x)), None
        if pol.is_identity:
            return self._out(self._fit(i, x)), IDENTITY_PARAMS.clone()
        if x.dim() != 3:
            raise DatasetError(
                f"views need images [C, H, W]; {self.uri} has samples of shape {list(x.shape)} (give ?shape=CxHxW)"
            )
        if pol.needs_raw:
            params = pol.draw(int(seed), x.shape[-2], x.shape[-1])
            return self._out(pol.apply(x, params, size=self.size or self.native_size)), params
        x = self._fit(i, x)
        params = pol.draw(int(seed), x.shape[-2], x.shape[-1])
        return self._out(pol.apply(x, params)), params

    def views(
        self, indices: torch.Tensor | Sequence[int], seeds: torch.Tensor | Sequence[int] | None = None
    ) -> torch.Tensor:
        """The samples at ``indices``; with ``seeds`` (one per index), their seeded views."""
        return self.read_batch(indices, seeds)[0]

    def read_batch(
        self,
        indices: torch.Tensor | Sequence[int],
        seeds: torch.Tensor | Sequence[int] | None = None,
        policy: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``read`` of many samples at once: (inputs [B, ...], params [B, PARAM_WIDTH] or None),
        row k exactly ``read(indices[k], seeds[k], policy)``.

        Sources that can (arrays, CIFAR, Arrow) read the whole batch with one gather and
        convert it in one vectorised pass; views stay per sample (each has its own seed).
        """
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1).numpy()
        sd = None if seeds is None else torch.as_tensor(seeds, dtype=torch.long).reshape(-1).tolist()
        if sd is not None and len(sd) != len(idx):
            raise ValueError(f"{len(sd)} view seeds for {len(idx)} indices")
        if not len(idx):
            return torch.empty(0, *self.sample_shape), None if sd is None else torch.empty(0, len(IDENTITY_PARAMS))
        bad = (idx < 0) | (idx >= len(self))
        if bad.any():
            i = int(idx[np.flatnonzero(bad)[0]])
            raise IndexError(f"index {i} out of range for {self.uri} of {len(self)} samples")
        pol = None if sd is None else self.policy if policy is None else ViewPolicy.parse(policy)
        il = idx.tolist()
        raw = self._raw_batch(idx)
        if isinstance(raw, torch.Tensor):
            x = self._reshape_batch(il, raw)
            self._refuse_non_finite(il, x)
            if pol is None or pol.is_identity:  # plain samples: fit and output dtype for the whole batch
                x = self._out(self._fit_batch(il, x))
                return x, None if pol is None else IDENTITY_PARAMS.repeat(len(il), 1)
            rows_in = list(x)
        elif raw is None:
            rows_in = [self._shaped(i) for i in il]
        else:
            rows_in = [self._reshape(i, r) for i, r in zip(il, raw)]
        if not isinstance(raw, torch.Tensor):
            for i, r in zip(il, rows_in):
                self._refuse_non_finite([i], r[None])
        rows = [self._finish(i, r, None if sd is None else sd[k], pol) for k, (i, r) in enumerate(zip(il, rows_in))]
        x = torch.stack([r[0] for r in rows])
        return x, None if sd is None else torch.stack([r[1] for r in rows])  # type: ignore[misc]

    def _reshape_batch(self, il: list[int], x: torch.Tensor) -> torch.Tensor:
        """``_reshape`` of every row of a uniform batch (one check: the rows share a shape)."""
        if self.shape is None:
            return x
        self._reshape(il[0], x[0])  # refuses as a per-sample read would, naming the first sample
        return x.reshape(len(x), *self.shape)

    def _fit_batch(self, il: list[int], x: torch.Tensor) -> torch.Tensor:
        """``_fit`` of every row of a uniform batch."""
        if x.dim() != 4:
            self._refuse_other_shape(il[0], tuple(x.shape[1:]))  # the rows share a shape
            return x
        if self.size is not None:
            if tuple(x.shape[-2:]) == self.size:
                return x  # resize_center returns such an image as it is
            return torch.stack([resize_center(r, self.size) for r in x])  # per image: bit-identical to read
        self._fit(il[0], x[0])  # the rows share a size: refused here exactly when every read would be
        return x

    def get(self, indices: torch.Tensor, views: torch.Tensor | None = None) -> torch.Tensor:
        """``SampleSource.get``: the samples, or views ``views`` of them (seed = index*65536 + view)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        if views is None:
            return self.views(idx)
        return self.views(idx, idx * VIEW_STRIDE + torch.as_tensor(views, dtype=torch.long))


def _existing_dir(fmt: str, target: str) -> Path:
    root = Path(target).expanduser()
    if not root.exists():
        raise DatasetError(f"{fmt}: {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"{fmt}: {root} is not a directory")
    return root


def _existing_file(fmt: str, target: str) -> Path:
    path = Path(target).expanduser()
    if not path.exists():
        raise DatasetError(f"{fmt}: {path} does not exist")
    if not path.is_file():
        raise DatasetError(f"{fmt}: {path} is not a file")
    return path


# -- imagefolder -----------------------------------------------------------------------
def _refuse_link_loops(dirpath: str, dirnames: list[str]) -> None:
    """Refuse a folder under ``dirpath`` that is (a link to) ``dirpath`` itself or a folder above it.

    Links are followed (a class folder may link to images kept elsewhere), and ``os.walk`` does not
    notice a loop: it went round until the path grew too long for the OS, so a link ``cls/up -> ..``
    read every image of the folder some 40 times over, as that many extra samples, without a word."""
    here = os.path.realpath(dirpath)
    for d in dirnames:
        link = os.path.join(dirpath, d)
        there = os.path.realpath(link)
        if here == there or here.startswith(there.rstrip(os.sep) + os.sep):
            raise DatasetError(
                f"imagefolder: {link} links to {there}, a folder it is in: reading it would loop over the same "
                "images again and again; remove the link (or make it point outside its own folder)"
            )


class ImageFolderSource(FileSource):
    """``imagefolder:DIR``: ``DIR/<class>/**/<image>``, classes sorted by name (torchvision's layout)."""

    format = "imagefolder"

    def __init__(self, uri: str, target: str, opts: dict[str, str]) -> None:
        super().__init__(uri, target, opts)
        self.root = _existing_dir(self.format, target)
        classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise DatasetError(f"imagefolder: no class folders in {self.root} (expected {self.root}/<class>/<image>)")
        files: list[str] = []
        labels: list[int] = []
        for c, cls in enumerate(classes):
            found = []
            for dirpath, dirnames, names in os.walk(self.root / cls, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                _refuse_link_loops(dirpath, dirnames)
                rel = os.path.relpath(dirpath, self.root)
                # "._NAME" files are macOS's AppleDouble metadata beside each file copied from a Mac
                # to another file system, never an image (each refused the whole folder before).
                found += [os.path.join(rel, n) for n in sorted(names)
                          if n.lower().endswith(IMAGE_EXTS) and not n.startswith("._")]  # fmt: skip
            if not found:
                raise DatasetError(
                    f"imagefolder: class folder {self.root / cls} has no images ({', '.join(IMAGE_EXTS)})"
                )
            files += found
            labels += [c] * len(found)
        self.classes, self.files = classes, files
        self._labels = np.asarray(labels, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.files)

    def _read_labels(self) -> np.ndarray:
        return self._labels

    def _class_names(self) -> list[str]:
        return self.classes

    def _what(self, i: int) -> str:
        return str(self.root / self.files[i])

    def _raw(self, i: int) -> torch.Tensor:
        return _decode_image(self.root / self.files[i], self.mode, self._what(i))

    def _identity(self) -> dict[str, Any]:
        return {"classes": self.classes, "files": file_manifest(self.root, self.files)}


# -- npz / npy --------------------------------------------------------------------------
def _npz_memmap(path: Path, key: str) -> np.ndarray | None:
    """Member ``key`` of an npz as a read-only memory map (None when stored compressed).

    A member shorter than its header's shape says (a damaged or partly copied file) is refused:
    the map would otherwise run into the next member's bytes, or past the end of the file."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(key + ".npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        f.seek(start)
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                return None
        except ValueError as e:  # numpy's own words on the header; the file and member are ours to name
            raise DatasetError(f"npz: member {key!r} of {path} is not a readable .npy array ({e})") from None
        offset = f.tell()
    if dtype.hasobject:
        raise DatasetError(f"{path}: member {key!r} holds Python objects; kd never unpickles dataset files")
    need, have = math.prod(shape) * dtype.itemsize, info.file_size - (offset - start)
    if have < need:
        raise DatasetError(
            f"npz: member {key!r} of {path} is truncated: its header declares {dtype} {list(shape)} ({need} bytes "
            f"of data) but it holds {max(have, 0)} (a damaged or partly copied file; write it again)"
        )
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def _npz_read(path: Path, key: str) -> np.ndarray:
    """Member ``key`` of a compressed npz, read into memory; a damaged member is named, not numpy's EOF."""
    try:
        with np.load(path, allow_pickle=False) as z:
            a = z[key]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DatasetError(f"npz: member {key!r} of {path} is truncated or corrupt ({e}); write it again") from None
    if not isinstance(a, np.ndarray):  # numpy hands back a member without the .npy magic as its raw bytes
        raise DatasetError(f"npz: member {key!r} of {path} is not a readable .npy array (no .npy header)")
    return a


def _load_npy(path: Path) -> np.ndarray:
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        # numpy's words name the cause; only a pickled (object) array is refused by kd's own rule
        pickled = "pickle" in str(e) or "Python objects" in str(e)
        why = " (kd never unpickles dataset files)" if pickled else ""
        if "mmap length" in str(e):
            why = " (the file is shorter than its header declares: a damaged or partly copied file)"
        raise DatasetError(f"npy: {path} is not a readable .npy array: {e}{why}") from None
    if not isinstance(a, np.ndarray):  # np.load of a zip gives an NpzFile: the npz: format reads those
        raise DatasetError(f"npy: {path} is an npz archive, not a .npy array: read it with npz:{path}")
    return a


class ArraySource(FileSource):
    """``npz:FILE?x=KEY&y=KEY`` or ``npy:X.npy?y=Y.npy``: arrays, memory-mapped.

    Samples ``[N, C, H, W]`` / ``[N, H, W, C]`` (``layout=nchw|nhwc``, guessed by
    default) / ``[N, H, W]`` are images (uint8 read as value/255); ``[N, D]`` are
    vectors. A compressed npz cannot be memory-mapped and is read into memory.
    """

    OPTIONS = ("x", "y", "layout")
    X_KEYS = ("x", "images", "image", "inputs", "data", "X")
    Y_KEYS = ("y", "labels", "label", "targets", "Y")

    def __init__(self, uri: str, target: str, opts: dict[str, str], fmt: str) -> None:
        self.format = fmt
        super().__init__(uri, target, opts)
        self.path = _existing_file(fmt, target)
        self.layout = opts.get("layout", "auto")
        if self.layout not in ("auto", "nchw", "nhwc", "flat"):
            raise DatasetError(f"layout={self.layout!r}: expected nchw, nhwc or flat")
        if fmt == "npz":
            try:
                with zipfile.ZipFile(self.path) as z:
                    keys = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
            except zipfile.BadZipFile:
                raise DatasetError(f"npz: {self.path} is not an npz (zip) file") from None
            self.x_key = _pick(opts.get("x"), self.X_KEYS, keys, "x", fmt="npz", noun="array", ref="KEY")
            self.y_key = _pick(opts.get("y"), self.Y_KEYS, keys, "y", fmt="npz", noun="array", ref="KEY")
            self.y_path = self.path
        else:
            if "y" not in opts:
                raise DatasetError("npy: give the labels file as ?y=LABELS.npy (relative to the inputs' folder)")
            self.y_path = _existing_file(fmt, str(self.path.parent / opts["y"]))
        x, y = self._arrays()
        if x.ndim == 0:  # len() of a 0-d array is a TypeError: a traceback, not a message
            what = f"array {self.x_key!r} of {self.path}" if fmt == "npz" else str(self.path)
            raise DatasetError(
                f"{fmt}: the inputs ({what}) are one value ({x.dtype} {x.item()!r}), not one sample per row"
            )
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise DatasetError(f"{fmt}: labels must be a 1-d integer array, got {y.dtype} {list(y.shape)}")
        if len(x) != len(y):
            raise DatasetError(f"{fmt}: {len(x)} inputs but {len(y)} labels in {self.path}")
        if x.dtype.kind not in "iubf":
            what = f"array {self.x_key!r} of {self.path}" if fmt == "npz" else str(self.path)
            raise DatasetError(
                f"{fmt}: the inputs ({what}) are {x.dtype} ({_KIND_NAMES.get(x.dtype.kind, 'not numbers')}); "
                "kd reads integer, float or bool arrays"
            )
        self.n = len(x)
        if not self.n:  # as every other format refuses an empty one (was "the dataset's samples are []")
            raise DatasetError(f"{fmt}: {self.path} holds no samples (inputs {x.dtype} {list(x.shape)})")
        self.sample_dims = tuple(x.shape[1:])
        if self.layout == "auto":
            nd = len(self.sample_dims)
            self.layout = (
                "nhwc"
                if nd == 3 and self.sample_dims[-1] in (1, 3, 4) and self.sample_dims[0] not in (1, 3, 4)
                else "nchw"
                if nd in (2, 3)
                else "flat"
            )

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        h = self._handles()
        if "x" not in h:
            if self.format == "npz":
                x = _npz_memmap(self.path, self.x_key)
                y = _npz_memmap(self.path, self.y_key)
                if x is None or y is None:  # compressed: no memory map possible
                    x = _npz_read(self.path, self.x_key) if x is None else x
                    y = _npz_read(self.path, self.y_key) if y is None else y
            else:
                x, y = _load_npy(self.path), _load_npy(self.y_path)
            h["x"], h["y"] = x, y
        return h["x"], h["y"]

    def __len__(self) -> int:
        return self.n

    def _read_labels(self) -> np.ndarray:
        return np.asarray(self._arrays()[1])

    def _what(self, i: int) -> str:
        return f"sample {i} of {self.path}"

    def _label_what(self, i: int) -> str:
        return (
            f"label {i} (array {self.y_key!r}) of {self.y_path}"
            if self.format == "npz"
            else f"label {i} of {self.y_path}"
        )

    def _raw(self, i: int) -> torch.Tensor:
        try:
            return _array_to_chw(self._arrays()[0][i], self.layout)
        except DatasetError as e:
            raise DatasetError(f"{self._what(i)}: {e}") from None

    def _raw_batch(self, idx: np.ndarray) -> torch.Tensor | None:
        x = self._arrays()[0]
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        # An ascending run (an unshuffled loader) is one slice of the map; else one gather.
        run = hi - lo == len(idx) and (len(idx) == 1 or bool((np.diff(idx) == 1).all()))
        try:
            return _batch_to_chw(x[lo:hi], self.layout) if run else _batch_to_chw(x[idx], self.layout, fresh=True)
        except DatasetError:
            return None  # read one by one: the sample at fault is named

    def _identity(self) -> dict[str, Any]:
        paths = [self.path] if self.y_path == self.path else [self.path, self.y_path]
        root = self.path.parent
        rels = [os.path.relpath(p, root) for p in paths]
        keys = {"x": self.x_key, "y": self.y_key} if self.format == "npz" else {}
        return {"arrays": keys, "layout": self.layout, "files": file_manifest(root, rels)}


# -- CIFAR (binary version only) ---------------------------------------------------------
CIFAR10_FILES = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
CIFAR100_FILES = {"train": ["train.bin"], "test": ["test.bin"]}
_CIFAR_PICKLED = ("data_batch_1", "test_batch", "batches.meta", "train", "test", "meta")


class CifarSource(FileSource):
    """``cifar:DIR?split=train|test``: the official *binary* CIFAR-10/100, memory-mapped.

    CIFAR-10 records: 1 label byte + 3072 pixel bytes (R, G, B planes of 32x32);
    CIFAR-100: coarse + fine label bytes + 3072 (``label=fine|coarse``). The
    python version (pickled dicts) is refused: kd never unpickles dataset files.
    """

    format = "cifar"
    OPTIONS = ("label",)

    def __init__(self, uri: str, target: str, opts: dict[str, str]) -> None:
        super().__init__(uri, target, opts)
        root = _existing_dir(self.format, target)
        split = opts.get("split", "train")
        if split not in ("train", "test"):
            raise DatasetError(f"cifar: split={split!r}; expected train or test")
        self.label_kind = opts.get("label", "fine")
        if self.label_kind not in ("fine", "coarse"):
            raise DatasetError(f"cifar: label={self.label_kind!r}; expected fine or coarse")
        for d in (root, root / "cifar-10-batches-bin", root / "cifar-100-binary"):
            if all((d / f).is_file() for f in CIFAR10_FILES[split]):
                self.root, self.variant, names = d, 10, CIFAR10_FILES[split]
                break
            if all((d / f).is_file() for f in CIFAR100_FILES[split]):
                self.root, self.variant, names = d, 100, CIFAR100_FILES[split]
                break
        else:
            pickled = [
                str(d / f)
                for d in (root, root / "cifar-10-batches-py", root / "cifar-100-python")
                for f in _CIFAR_PICKLED
                if (d / f).is_file()
            ]
            if pickled:
                raise DatasetError(
                    f"cifar: {pickled[0]} is the python (pickled) version of CIFAR; kd never unpickles dataset "
                    "files (unpickling can run code). Use the binary version (cifar-10-binary.tar.gz / "
                    "cifar-100-binary.tar.gz)"
                )
            want = ", ".join(CIFAR10_FILES[split]) + " (CIFAR-10) or " + ", ".join(CIFAR100_FILES[split])
            raise DatasetError(f"cifar: no {split} files in {root}: expected {want} (CIFAR-100)")
        self.label_bytes = 1 if self.variant == 10 else 2
        self.record = self.label_bytes + 3072
        self.files, counts = names, []
        for f in names:
            size = (self.root / f).stat().st_size
            if size == 0 or size % self.record:  # 0 bytes: an official file is never empty (a failed copy)
                raise DatasetError(
                    f"cifar: {self.root / f} is {size} bytes, not a whole number of {self.record}-byte "
                    f"CIFAR-{self.variant} records" + (" (an empty file)" if size == 0 else "")
                )
            counts.append(size // self.record)
        self.starts = np.cumsum([0, *counts])
        self._split = split

    @cached_property
    def name_split(self) -> tuple[str, str]:
        return self.options.get("name", f"cifar{self.variant}"), self._split

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _maps(self) -> list[np.ndarray]:
        h = self._handles()
        if "maps" not in h:
            h["maps"] = [
                np.memmap(self.root / f, dtype=np.uint8, mode="r").reshape(-1, self.record) for f in self.files
            ]
        return h["maps"]

    def _locate(self, i: int) -> tuple[int, int]:
        f = int(np.searchsorted(self.starts, i, side="right")) - 1
        return f, i - int(self.starts[f])

    def _read_labels(self) -> np.ndarray:
        col = 1 if self.variant == 100 and self.label_kind == "fine" else 0
        out = []
        for f in self.files:  # streamed in chunks: memory flat in the file size
            with open(self.root / f, "rb") as fh:
                while chunk := fh.read(self.record * 4096):
                    out.append(np.frombuffer(chunk, dtype=np.uint8).reshape(-1, self.record)[:, col].copy())
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def _class_names(self) -> list[str] | None:
        meta = {10: "batches.meta.txt", 100: f"{self.label_kind}_label_names.txt"}[self.variant]
        path = self.root / meta
        if path.is_file():
            names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
            if names:
                return names
        return [str(c) for c in range({10: 10, 100: 100 if self.label_kind == "fine" else 20}[self.variant])]

    def _what(self, i: int) -> str:
        f, r = self._locate(i)
        return f"record {r} of {self.root / self.files[f]}"

    def _label_what(self, i: int) -> str:
        kind = {10: "label byte", 100: f"{self.label_kind} label byte"}[self.variant]
        return f"the {kind} of {self._what(i)}"

    def _raw(self, i: int) -> torch.Tensor:
        f, r = self._locate(i)
        rec = self._maps()[f][r]
        return torch.from_numpy(np.array(rec[self.label_bytes :], copy=True).reshape(3, 32, 32))

    def _raw_batch(self, idx: np.ndarray) -> torch.Tensor:
        f = np.searchsorted(self.starts, idx, side="right") - 1
        r = idx - self.starts[f]
        out = np.empty((len(idx), 3072), dtype=np.uint8)
        maps = self._maps()
        for k in np.unique(f).tolist():  # one gather per file the batch touches
            m = f == k
            out[m] = maps[k][r[m], self.label_bytes :]
        return torch.from_numpy(out).reshape(len(idx), 3, 32, 32)

    def _identity(self) -> dict[str, Any]:
        return {"variant": self.variant, "label": self.label_kind, "files": file_manifest(self.root, self.files)}


# -- Hugging Face datasets (save_to_disk) ------------------------------------------------
class HFSource(FileSource):
    """``hf:DIR?image=COL&label=COL&split=train``: a ``datasets`` dataset saved with ``save_to_disk``.

    Arrow files are memory-mapped; images stored as ``Image`` features are read
    as bytes and decoded here (in the workers); array columns are read as is.
    Identity: Arrow's fingerprint of the chosen split.
    """

    format = "hf"
    OPTIONS = ("image", "label")
    IMAGE_KEYS = ("image", "img", "pixel_values", "x", "inputs")
    LABEL_KEYS = ("label", "labels", "fine_label", "y", "target")

    def __init__(self, uri: str, target: str, opts: dict[str, str]) -> None:
        super().__init__(uri, target, opts)
        self.root = _existing_dir(self.format, target)
        ds = self._dataset()
        cols = list(ds.column_names)
        self.image_col = _pick(opts.get("image"), self.IMAGE_KEYS, cols, "image", fmt="hf", noun="column", ref="COLUMN")
        self.label_col = _pick(opts.get("label"), self.LABEL_KEYS, cols, "label", fmt="hf", noun="column", ref="COLUMN")
        self.n = len(ds)
        if not self.n:
            raise DatasetError(f"hf: {self.root} (split {self.options.get('split', 'train')!r}) has no rows")
        self.fingerprint = str(ds._fingerprint)

    def _dataset(self) -> Any:
        h = self._handles()
        if "ds" not in h:
            h["ds"] = load_hf_split(self.root, self.options.get("split", "train"))
            h["raw"] = None
        return h["ds"]

    def _rows(self) -> Any:
        """The dataset with images as undecoded bytes (``Image(decode=False)``) or numpy arrays."""
        h = self._handles()
        ds = self._dataset()
        if h.get("raw") is None:
            import datasets

            feat = ds.features[self.image_col]
            if isinstance(feat, datasets.Image):
                h["raw"] = ds.cast_column(self.image_col, datasets.Image(decode=False)).select_columns([self.image_col])
            else:
                h["raw"] = ds.select_columns([self.image_col]).with_format("numpy")
        return h["raw"]

    @cached_property
    def name_split(self) -> tuple[str, str]:
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", self.options.get("name", self.root.resolve().name)) or "data"
        return name, self.options.get("split", "train")

    def __len__(self) -> int:
        return self.n

    def _read_labels(self) -> np.ndarray:
        col = self._dataset().data.column(self.label_col)
        if col.null_count:  # to_numpy would give NaN (an int64 cast of it: INT64_MIN), or None
            missing = np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))
            raise DatasetError(
                f"hf: {self._label_what(int(missing[0]))} is null: a missing label "
                f"({len(missing)} such row(s) in {self.uri})"
            )
        import pyarrow as pa

        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            # Names, not ids: the usual shape of a dataset before its labels are encoded; say how to encode them.
            raise DatasetError(
                f"hf: {self._label_what(0)} is {col[0].as_py()!r}: class labels must be integer class ids "
                f"0, 1, ..., and column {self.label_col!r} holds strings ({col.type}); map them to ids with "
                f"datasets' `ds = ds.class_encode_column({self.label_col!r})` (a ClassLabel feature: its names "
                "become kd's class names) and save_to_disk again"
            )
        return np.asarray(col.to_numpy(zero_copy_only=False))

    def _class_names(self) -> list[str] | None:
        feat = self._dataset().features[self.label_col]
        names = getattr(feat, "names", None)
        return list(names) if names else None

    def _what(self, i: int) -> str:
        return f"row {i} of {self.root}"

    def _label_what(self, i: int) -> str:
        return f"label column {self.label_col!r} at row {i} of {self.root}"

    def _raw(self, i: int) -> torch.Tensor:
        return self._value(i, self._rows()[int(i)][self.image_col])

    def _arrow_fixed(self) -> tuple[Any, list[int]] | None:
        """The dataset as Arrow tables and the sample shape, where the image column is a
        (nested) fixed-size list of numbers: then a batch is one gather and one flat copy."""
        h = self._handles()
        if "arrow" not in h:
            import pyarrow as pa

            ds = self._dataset()
            t, dims = ds.data.schema.field(self.image_col).type, []
            while pa.types.is_fixed_size_list(t):
                dims.append(t.list_size)
                t = t.value_type
            numeric = pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
            if not (dims and numeric):
                h["arrow"] = None
            elif getattr(ds, "_indices", None) is None and hasattr(ds.data, "table"):
                # The memory-mapped column itself: Arrow's take is one C++ gather, where datasets'
                # row selection by a list of indices slices the table once per row in Python.
                h["arrow"] = (ds.data.table.column(self.image_col), dims)
            else:  # a dataset with an indices mapping (select/shuffle): datasets maps the rows
                h["arrow"] = (ds.select_columns([self.image_col]).with_format("arrow"), dims)
        return h["arrow"]

    def _raw_batch(self, idx: np.ndarray) -> torch.Tensor | list[torch.Tensor] | None:
        import pyarrow as pa

        il = idx.tolist()
        fixed = self._arrow_fixed()
        if fixed is not None:
            col, lo, n = fixed[0], int(idx[0]), len(il)
            run = int(idx[-1]) - lo == n - 1 and (n == 1 or bool((np.diff(idx) == 1).all()))
            if isinstance(col, pa.ChunkedArray):
                a = col.slice(lo, n) if run else col.take(pa.array(idx))
            else:
                a = (col[lo : lo + n] if run else col[il]).column(0)
            a = a.combine_chunks()
            for _ in fixed[1]:
                if a.null_count:
                    return None  # a null row: read one by one, which names it
                a = a.flatten()
            if a.null_count:
                return None
            rows = a.to_numpy(zero_copy_only=False).reshape(len(il), *fixed[1])
        else:
            vals = self._rows()[il][self.image_col]
            if isinstance(vals, list):  # an Image feature, undecoded: one batched read, one decode per image
                return [self._value(i, v) for i, v in zip(il, vals)]
            if not (isinstance(vals, np.ndarray) and vals.ndim >= 2 and vals.dtype.kind in "iubf"):
                return None  # ragged or null rows: read one by one
            rows = vals
        s = rows.shape[1:]
        layout = "nhwc" if len(s) == 3 and s[-1] in (1, 3, 4) and s[0] not in (1, 3, 4) else "nchw"
        try:
            return _batch_to_chw(rows, layout)
        except DatasetError:
            return None

    def _value(self, i: int, v: Any) -> torch.Tensor:
        """Sample ``i`` from its column value ``v`` (undecoded image dict or array)."""
        if v is None:
            raise DatasetError(f"hf: {self._what(i)} has no image (null in column {self.image_col!r})")
        if isinstance(v, dict):  # an Image feature, undecoded
            if v.get("bytes"):
                return _decode_image(v["bytes"], self.mode, self._what(i))
            if v.get("path"):
                return _decode_image(v["path"], self.mode, f"{v['path']} ({self._what(i)})")
            raise DatasetError(f"hf: {self._what(i)} has no image bytes or path")
        a = np.asarray(v)
        layout = "nhwc" if a.ndim == 3 and a.shape[-1] in (1, 3, 4) and a.shape[0] not in (1, 3, 4) else "nchw"
        try:
            return _array_to_chw(a, layout)
        except DatasetError as e:
            raise DatasetError(f"{self._what(i)}: {e}") from None

    def _identity(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "columns": {"image": self.image_col, "label": self.label_col}}


# -- WebDataset tar shards ---------------------------------------------------------------
def _expand_braces(pattern: str) -> list[str]:
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
    out = []
    for k in range(int(lo), int(hi) + 1):
        out += _expand_braces(pattern[: m.start()] + str(k).zfill(width) + pattern[m.end() :])
    return out


class WebDatasetSource(FileSource):
    """``webdataset:SHARDS``: POSIX tar shards, one sample = the members sharing a basename.

    SHARDS: ``dir/`` (every ``*.tar``), a glob, or ``shard-{000..009}.tar``.
    ``image=png,jpg,...`` picks the image member, ``label=cls`` the label member
    (an integer as text). An index of (shard, offset, size) per sample is built
    from the tar headers at open; reads then seek straight to a member, so the
    shards are random-access (uncompressed ``.tar`` only).
    """

    format = "webdataset"
    OPTIONS = ("image", "label")

    def __init__(self, uri: str, target: str, opts: dict[str, str]) -> None:
        super().__init__(uri, target, opts)
        path = Path(target).expanduser()
        if path.is_dir():
            shards = sorted(str(p) for p in path.glob("*.tar"))
        elif any(c in target for c in "*?[") and "{" not in target:
            shards = sorted(glob.glob(str(path)))
        else:
            shards = _expand_braces(str(path))
        if not shards:
            raise DatasetError(f"webdataset: no .tar shards match {target!r}")
        missing = [s for s in shards if not Path(s).is_file()]
        if missing:
            raise DatasetError(
                f"webdataset: shard {missing[0]} does not exist ({len(missing)} of {len(shards)} missing)"
            )
        self.shards = [Path(s).resolve() for s in shards]
        self.root = Path(os.path.commonpath([str(p.parent) for p in self.shards]))
        self.image_exts = tuple(
            "." + e.strip().lower().lstrip(".") for e in opts.get("image", "png,jpg,jpeg,webp").split(",")
        )
        self.label_ext = "." + opts.get("label", "cls").lower().lstrip(".")
        parts = [self._shard_index(shard) for shard in self.shards]
        if not sum(len(p["labels"]) for p in parts):
            raise DatasetError(f"webdataset: no samples in {target!r}")
        self.shard_of = np.concatenate([np.full(len(p["labels"]), s, np.int32) for s, p in enumerate(parts)])
        self.offsets = np.concatenate([p["offsets"] for p in parts])
        self.sizes = np.concatenate([p["sizes"] for p in parts])
        self._labels = np.concatenate([p["labels"] for p in parts])
        self.keys = np.concatenate([p["keys"] for p in parts])

    def _shard_index(self, shard: Path) -> dict[str, np.ndarray]:
        """One shard's index, from a sidecar keyed by path, ``_stat_key`` and options (else from its headers)."""
        st = shard.stat()
        tag = f"{shard}|{'|'.join(map(str, _stat_key(st)))}|{self.image_exts}|{self.label_ext}"
        side = cache_dir() / "wds-index" / (hashlib.sha256(os.fsencode(tag)).hexdigest()[:32] + ".npz")
        try:
            with np.load(side, allow_pickle=False) as z:
                return {k: z[k] for k in ("offsets", "sizes", "labels", "keys")}
        except (OSError, ValueError, KeyError):
            pass
        rows = list(self._scan(shard))
        index = {
            "offsets": np.asarray([r[1][0] for r in rows], dtype=np.int64),
            "sizes": np.asarray([r[1][1] for r in rows], dtype=np.int64),
            "labels": np.asarray([r[2] for r in rows], dtype=np.int64),
            "keys": np.asarray([r[0] for r in rows], dtype=np.str_),
        }
        if time.time_ns() - st.st_mtime_ns > _RACY_NS:  # a shard still being written is not cached
            try:
                side.parent.mkdir(parents=True, exist_ok=True)
                tmp = side.with_name(f"{side.stem}.{os.getpid()}.tmp.npz")
                np.savez(tmp, **index)
                os.replace(tmp, side)
            except OSError:
                pass
        return index

    @cached_property
    def name_split(self) -> tuple[str, str]:
        return _name_split(self.root, self.options)

    def _scan(self, shard: Path) -> Iterator[tuple[str, tuple[int, int], int]]:
        """(key, (offset, size) of the image member, label) per sample of one shard, in order."""
        try:
            tf = tarfile.open(shard, "r:")
        except tarfile.TarError as e:
            raise DatasetError(f"webdataset: {shard} is not an uncompressed tar file ({e})") from None
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        regular: dict[str, tarfile.TarInfo] = {}
        used = (*self.image_exts, self.label_ext)
        with tf:
            try:
                for m in tf:  # reads every header: a truncated or corrupt shard fails here
                    d, base = os.path.split(m.name)
                    stem, dot, ext = base.partition(".")
                    if m.isfile():
                        regular[m.name] = m
                    elif m.islnk() and dot and "." + ext.lower() in used:
                        # GNU tar stores a second name of one file (a hard link: duplicate images,
                        # deduplicated trees) as a link to the member stored first: its bytes are that one's
                        target = regular.get(m.linkname)
                        if target is None:
                            raise DatasetError(
                                f"webdataset: member {m.name} in {shard} is a hard link to {m.linkname}, which is "
                                "not a file stored before it in the shard"
                            )
                        m = target
                    elif m.issym() and dot and "." + ext.lower() in used:
                        raise DatasetError(
                            f"webdataset: member {m.name} in {shard} is a symbolic link (to {m.linkname}): a shard's "
                            "samples are its files; write the shard with the files themselves (tar --dereference)"
                        )
                    else:
                        continue
                    if not dot:
                        continue
                    groups.setdefault(os.path.join(d, stem), {})["." + ext.lower()] = m
            except (tarfile.TarError, OSError) as e:
                raise DatasetError(f"webdataset: {shard} is truncated or corrupt ({e})") from None
            # tarfile ends quietly at a header cut short: a POSIX tar ends with zero blocks instead
            tf.fileobj.seek(tf.offset)
            if tf.fileobj.read(512) != bytes(512):
                raise DatasetError(
                    f"webdataset: {shard} is truncated or corrupt: no end-of-archive marker after byte {tf.offset} "
                    "(a shard cut short, e.g. by an interrupted copy)"
                )
            for key, members in groups.items():
                img = next((members[e] for e in self.image_exts if e in members), None)
                lab = members.get(self.label_ext)
                if img is None or lab is None:
                    what = "image (" + ", ".join(self.image_exts) + ")" if img is None else self.label_ext
                    raise DatasetError(f"webdataset: sample {key!r} in {shard} has no {what} member")
                try:
                    text = tf.extractfile(lab).read().decode("utf-8", "replace").strip()  # type: ignore[union-attr]
                except (tarfile.TarError, OSError) as e:
                    raise DatasetError(f"webdataset: cannot read {lab.name} in {shard} ({e})") from None
                try:
                    label = int(text)
                except ValueError:
                    raise DatasetError(
                        f"webdataset: label {key}{self.label_ext} in {shard} is {text!r}, not an integer"
                    ) from None
                if not 0 <= label <= LABEL_MAX:
                    raise DatasetError(
                        f"webdataset: label {key}{self.label_ext} in {shard} is {text!r}: class labels are "
                        f"0..{LABEL_MAX}"
                    )
                yield key, (img.offset_data, img.size), label

    def __len__(self) -> int:
        return len(self._labels)

    def _read_labels(self) -> np.ndarray:
        return self._labels

    def _what(self, i: int) -> str:
        return f"sample {str(self.keys[i])!r} in {self.shards[self.shard_of[i]]}"

    def _label_what(self, i: int) -> str:
        return f"label {str(self.keys[i])}{self.label_ext} in {self.shards[self.shard_of[i]]}"

    def _raw(self, i: int) -> torch.Tensor:
        h = self._handles()
        s = int(self.shard_of[i])
        fd = h.get(s)
        if fd is None:
            fd = h[s] = os.open(self.shards[s], os.O_RDONLY)
        data = os.pread(fd, int(self.sizes[i]), int(self.offsets[i]))  # no shared file offset: safe in threads
        return _decode_image(data, self.mode, self._what(i))

    def _identity(self) -> dict[str, Any]:
        rels = [os.path.relpath(p, self.root) for p in self.shards]
        return {"image": list(self.image_exts), "label": self.label_ext, "files": file_manifest(self.root, rels)}

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd in getattr(self, "_h", {}).values():
                try:
                    os.close(fd)
                except OSError:
                    pass


# -- module:factory -----------------------------------------------------------------------
class ModuleSource(FileSource):
    """``module:pkg.mod:factory?k=v``: ``factory(**options)`` returns a map-style torch Dataset.

    Items are ``(input, label)`` (or dicts with image/label keys); inputs may be
    tensors, arrays or PIL images. Labels come from the dataset's ``targets`` or
    ``labels`` attribute when it has one (else every item is read once).
    Identity: the dataset's ``dataset_id``/``fingerprint`` attribute, else a hash
    of every sample streamed once (cached for the process).
    """

    format = "module"

    def __init__(self, uri: str, target: str, opts: dict[str, str]) -> None:
        common = {k: v for k, v in opts.items() if k in _COMMON_OPTIONS}
        super().__init__(uri, target, common)
        self.kwargs = {k: v for k, v in opts.items() if k not in _COMMON_OPTIONS}
        mod, sep, fn = target.partition(":")
        if not sep or not mod or not fn:
            raise DatasetError(f"module: expected module:PACKAGE.MODULE:FACTORY, got {uri!r}")
        self.module_name, self.factory_name = mod, fn
        self.n = len(self._dataset())

    def _dataset(self) -> Any:
        h = self._handles()
        if "ds" not in h:
            try:
                factory = getattr(importlib.import_module(self.module_name), self.factory_name)
            except (ImportError, AttributeError) as e:
                raise DatasetError(f"module: cannot load {self.module_name}:{self.factory_name}: {e}") from None
            h["ds"] = factory(**self.kwargs)
            if not hasattr(h["ds"], "__getitem__") or not hasattr(h["ds"], "__len__"):
                raise DatasetError(f"module: {self.module_name}:{self.factory_name} did not return a map-style dataset")
        return h["ds"]

    @cached_property
    def name_split(self) -> tuple[str, str]:
        return self.options.get("name", self.factory_name), self.options.get("split", "train")

    def __len__(self) -> int:
        return self.n

    def _item(self, i: int) -> tuple[Any, Any]:
        item = self._dataset()[i]
        if isinstance(item, dict):
            x = next((item[k] for k in ("image", "img", "input", "x") if k in item), None)
            y = next((item[k] for k in ("label", "labels", "target", "y") if k in item), None)
            return x, y
        return item[0], item[1]

    def _read_labels(self) -> np.ndarray:
        ds = self._dataset()
        for attr in ("targets", "labels"):
            v = getattr(ds, attr, None)
            if v is not None and len(v) == self.n:
                return torch.as_tensor(v).numpy()
        items = [self._item(i)[1] for i in range(self.n)]
        return np.asarray([v.item() if hasattr(v, "item") else v for v in items], dtype=object)

    def _class_names(self) -> list[str] | None:
        names = getattr(self._dataset(), "classes", None)
        return [str(c) for c in names] if names else None

    def _raw(self, i: int) -> torch.Tensor:
        x = self._item(i)[0]
        if isinstance(x, torch.Tensor):
            return x if x.dtype in (torch.uint8, torch.float32) else x.float()
        if hasattr(x, "convert") and hasattr(x, "size"):  # a PIL image
            arr = np.asarray(_to_8bit(x, self._what(i)).convert(self.mode))
            t = torch.from_numpy(arr.copy())
            return t[None] if t.dim() == 2 else t.permute(2, 0, 1).contiguous()
        a = np.asarray(x)
        return _array_to_chw(a, "nhwc" if a.ndim == 3 and a.shape[-1] in (1, 3, 4) else "nchw")

    @cached_property
    def _fingerprint(self) -> str:
        ds = self._dataset()
        fp = getattr(ds, "dataset_id", None) or getattr(ds, "fingerprint", None)
        if fp is not None:
            return str(fp)
        h = hashlib.sha256()  # no declared identity: hash every sample once, streaming
        for i in range(self.n):
            h.update(self._raw(i).numpy().tobytes())
        h.update(self.labels.numpy().tobytes())  # int64, checked: the same bytes in every process
        return "content:" + h.hexdigest()

    def _identity(self) -> dict[str, Any]:
        factory = f"{self.module_name}:{self.factory_name}"
        return {"factory": factory, "kwargs": self.kwargs, "fingerprint": self._fingerprint}


# =============================================================================
# Streaming: a DataLoader over (sample, view) keys
# =============================================================================


class ViewBatch(NamedTuple):
    """One loader batch. ``views``/``params`` are None for plain samples."""

    indices: torch.Tensor  # int64 [B]
    inputs: torch.Tensor  # [B, *sample_shape]
    labels: torch.Tensor  # int64 [B]
    views: torch.Tensor | None  # int64 [B]: view ids (seed = index * 65536 + view)
    params: torch.Tensor | None  # float32 [B, PARAM_WIDTH]: the views, replayable


def _epoch_generator(seed: int | None, epoch: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed or 0) * 1_000_003 + epoch) * 8 + salt)


_KEY_CHUNK = 1 << 16  # keys made into Python ints at a time: ~2 MiB of them, whatever the dataset size


def compact_indices(indices: torch.Tensor | np.ndarray | Sequence[int]) -> torch.Tensor:
    """``indices`` as a flat int32 tensor when every one fits (else int64), without a copy when it already is.

    Sample indices are held for a whole run (a sampler's, a precompute's to-do list): int32 is 4 bytes a
    sample instead of 8, and a dataset of 2**31 samples or more keeps int64."""
    t = torch.as_tensor(indices).reshape(-1)
    if t.dtype == torch.int32:
        return t
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        t = t.long()  # as torch.as_tensor(indices, dtype=torch.long) always took them
    if len(t) == 0 or (int(t.min()) >= -(2**31) and int(t.max()) < 2**31):
        return t.to(torch.int32)
    return t.to(torch.long)


def _perm_dtype(n: int) -> torch.dtype:
    return torch.int32 if n < 2**31 else torch.long


class KeySampler(torch.utils.data.Sampler[int]):
    """Yields keys ``index * 65536 + view``, lazily.

    ``num_views <= 1``: plain samples (view 0). ``fresh_views``: one view per
    sample per epoch, drawn from an epoch-seeded generator. Otherwise every
    view of every sample, sample-major (the cache's key order).

    Memory: the indices (int32: 4 bytes a sample), and while an epoch is iterated
    its permutation (4 bytes a sample, when shuffled) and its drawn views (2 bytes a
    sample, with ``fresh_views``); keys become Python ints ``_KEY_CHUNK`` at a time.
    The order is the one of ``torch.randperm`` / ``torch.randint`` in int64: those
    draw the same numbers whatever the output dtype.
    """

    def __init__(
        self,
        indices: torch.Tensor,
        num_views: int = 1,
        fresh_views: bool = False,
        shuffle_seed: int | None = None,
        epoch: int = 0,
    ) -> None:
        if num_views > VIEW_STRIDE:
            raise ValueError(f"at most {VIEW_STRIDE} views per sample")
        self.indices = compact_indices(indices)
        self.num_views, self.fresh_views, self.shuffle_seed, self.epoch = num_views, fresh_views, shuffle_seed, epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def plain(self) -> bool:
        return self.num_views <= 1

    def __len__(self) -> int:
        n = len(self.indices)
        return n if self.plain or self.fresh_views else n * self.num_views

    def __iter__(self) -> Iterator[int]:
        n = len(self.indices)
        pos = None
        if self.shuffle_seed is not None:
            pos = torch.randperm(n, generator=_epoch_generator(self.shuffle_seed, self.epoch, 1), dtype=_perm_dtype(n))
        drawn = None
        if not self.plain and self.fresh_views:
            dtype = torch.int16 if self.num_views <= 2**15 else torch.int32
            drawn = torch.randint(
                0, self.num_views, (n,), generator=_epoch_generator(self.shuffle_seed, self.epoch, 2), dtype=dtype
            )
        # Every view of a sample is a key: fewer samples a chunk, so a chunk stays _KEY_CHUNK keys.
        step = _KEY_CHUNK if self.plain or self.fresh_views else max(1, _KEY_CHUNK // self.num_views)
        for lo in range(0, n, step):
            at = slice(lo, lo + step) if pos is None else pos[lo : lo + step]
            keys = self.indices[at].long() * VIEW_STRIDE
            if drawn is not None:
                keys += drawn[at]
            elif not self.plain:
                keys = (keys[:, None] + torch.arange(self.num_views)).reshape(-1)
            yield from keys.tolist()


class _Keyed(torch.utils.data.Dataset):
    """Maps a key to (index, input, label, view, params); runs in the DataLoader workers."""

    def __init__(self, source: Any, policy: ViewPolicy | None, plain: bool, labels: torch.Tensor) -> None:
        self.source, self.policy, self.plain, self.labels = source, policy, plain, labels

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int) -> tuple[int, torch.Tensor, int, int, torch.Tensor | None]:
        i, v = divmod(int(key), VIEW_STRIDE)
        seed = None if self.plain else int(key)
        if hasattr(self.source, "read"):
            x, params = self.source.read(i, seed, self.policy)
        else:  # any other SampleSource: its own views, no params
            x, params = self.source.get(torch.tensor([i]), None if seed is None else torch.tensor([v]))[0], None
        return i, x, int(self.labels[i]), v, params

    def __getitems__(self, keys: list[int]) -> ViewBatch:
        """A whole batch of keys at once (torch's DataLoader calls this, not ``__getitem__``, when
        it exists): the source reads them together (``read_batch``), so an array is gathered and
        converted once per batch, not once per sample. Rows and params equal ``__getitem__``'s."""
        k = torch.as_tensor(keys, dtype=torch.long).reshape(-1)
        idx, v = k // VIEW_STRIDE, k % VIEW_STRIDE
        labels = torch.as_tensor(self.labels)[idx].long()
        seeds = None if self.plain else k
        params: torch.Tensor | None = None
        if hasattr(self.source, "read_batch"):
            x, params = self.source.read_batch(idx, seeds, self.policy)
        elif hasattr(self.source, "read"):  # a source that reads one sample at a time
            rows = [
                self.source.read(i, None if seeds is None else s, self.policy) for i, s in zip(idx.tolist(), k.tolist())
            ]
            x = torch.stack([r[0] for r in rows])
            got = [r[1] for r in rows]
            params = torch.stack(got) if all(p is not None for p in got) else None  # type: ignore[misc]
        else:  # any other SampleSource: its own views, no params
            x = self.source.get(idx, None if seeds is None else v)
        return ViewBatch(idx, x, labels, None if seeds is None else v, params)


def _collate(items: list[tuple[int, torch.Tensor, int, int, torch.Tensor | None]] | ViewBatch) -> ViewBatch:
    if isinstance(items, ViewBatch):  # read whole by _Keyed.__getitems__
        return items._replace(views=None, params=None)
    idx = torch.tensor([it[0] for it in items], dtype=torch.long)
    x = torch.stack([it[1] for it in items])
    y = torch.tensor([it[2] for it in items], dtype=torch.long)
    return ViewBatch(idx, x, y, None, None)


def _collate_views(items: list[tuple[int, torch.Tensor, int, int, torch.Tensor | None]] | ViewBatch) -> ViewBatch:
    if isinstance(items, ViewBatch):
        return items
    b = _collate(items)
    views = torch.tensor([it[3] for it in items], dtype=torch.long)
    params = [it[4] for it in items]
    return b._replace(views=views, params=torch.stack(params) if all(p is not None for p in params) else None)


def worker_error_message(e: BaseException) -> str:
    """The message of ``e`` as it was raised, also when a DataLoader worker raised it.

    torch re-raises a worker's exception in the main process with "Caught X in DataLoader
    worker process N. Original Traceback ..." as its message; the original message is the
    end of that traceback, after ``module.X: ``."""
    text = str(e)
    if not text.startswith("Caught ") or "Original Traceback" not in text:
        return text
    t = type(e)
    for name in (f"{t.__module__}.{t.__qualname__}", t.__qualname__):
        k = text.rfind(f"\n{name}: ")
        if k >= 0:
            return text[k + len(name) + 3 :].strip()
    return text.strip().rsplit("\n", 1)[-1]  # re-raised as another type (torch's RuntimeError fallback)


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # workers decode in parallel; no intra-op threads fighting them


class Loader(torch.utils.data.DataLoader):
    """A DataLoader of ``ViewBatch`` over a sample source; ``set_epoch`` draws the next epoch."""

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)  # type: ignore[attr-defined]


def loader(
    source: SampleSource,
    indices: torch.Tensor | Sequence[int] | None = None,
    batch_size: int = 256,
    *,
    views: ViewPolicy | str | None = None,
    num_views: int = 1,
    fresh_views: bool = False,
    epoch: int = 0,
    shuffle_seed: int | None = None,
    workers: int = 0,
    pin_memory: bool = False,
    drop_last: bool = False,
    persistent_workers: bool = False,
    prefetch_factor: int | None = None,
) -> Loader:
    """Stream ``source`` in batches: decoding and views in ``workers`` processes.

    ``views``: the view policy (default: the source's own, ``?views=``);
    ``num_views``: views per sample (<= 1: plain samples, ``views`` None in the
    batches); ``fresh_views``: one view per sample per epoch drawn from
    ``range(num_views)`` (training), else every view of every sample
    (precompute); ``shuffle_seed``: shuffle per epoch (None: index order).
    What grows with the dataset: the source's labels, and the sampler's ~4-10 bytes
    a sample (``KeySampler``); never a Python object per sample.
    """
    idx = compact_indices(torch.arange(len(source), dtype=_perm_dtype(len(source))) if indices is None else indices)
    if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(source)):
        raise IndexError(f"indices out of range for a source of {len(source)} samples")
    policy = None if views is None else ViewPolicy.parse(views)
    sampler = KeySampler(idx, num_views, fresh_views, shuffle_seed, epoch)
    keyed = _Keyed(source, policy, sampler.plain, source.labels)
    extra: dict[str, Any] = {}
    # A worker per batch at most: more only start processes that get nothing (--workers 1000 on
    # 24 samples started 1000 of them, 4 minutes). Batches are keyed, so no output changes.
    workers = min(workers, max(1, -(-len(sampler) // batch_size)))
    if workers > 0:
        extra = {"worker_init_fn": _worker_init, "persistent_workers": persistent_workers}
        if prefetch_factor is not None:
            extra["prefetch_factor"] = prefetch_factor
    return Loader(
        keyed,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=_collate if sampler.plain else _collate_views,
        pin_memory=pin_memory and torch.cuda.is_available(),
        drop_last=drop_last,
        **extra,
    )


_SOURCES: dict[str, Any] = {
    "imagefolder": ImageFolderSource,
    "npz": lambda uri, target, opts: ArraySource(uri, target, opts, "npz"),
    "npy": lambda uri, target, opts: ArraySource(uri, target, opts, "npy"),
    "hf": HFSource,
    "cifar": CifarSource,
    "webdataset": WebDatasetSource,
    "module": ModuleSource,
}
