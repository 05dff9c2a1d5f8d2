"""Fill a cache with a teacher's outputs for a whole dataset split.

The data is any ``kd.core.samples.SampleSource`` (the bundled digits, or a
file format opened by URI): it is read through a ``torch.utils.data.DataLoader``
whose worker processes decode the samples (and make the seeded views), with
pinned memory when the teacher is on CUDA, so decoding overlaps the teacher
and neither the reader nor the writer holds more than a few batches: memory
does not grow with the dataset. The teacher is any soft-target source that
computes (a ``LocalSource`` or a ``ServerSource`` over one or several servers;
a pool gets one stream per server).

Work is keyed by (sample, view): re-running skips every record already
committed, so a killed run resumes where it stopped. ``shard=(I, N)`` computes
only samples i with i % N == I into ``OUT/shard-IIIII-of-NNNNN`` (one shard per
machine or per ``torchrun`` rank); a rank's workers decode only its samples.
Readers open the directory of shards as one cache.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import inspect
import itertools
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from kd.cache import CacheMeta, CacheReader, CacheWriter
from kd.cache.codecs import LowRankBasis, bytes_per_sample, codec_uses_temperature, get_codec
from kd.cache.sharded import check_layout, open_cache, shard_dir
from kd.cache.store import VIEW_PARAMS_DIR, stored_basis
from kd.core import reductions
from kd.core.data import loader as data_loader
from kd.core.lmchecks import (
    facts_max_length,
    longest_sequence,
    model_max_length,
    refuse_masked_lm,
    refuse_other_tokenizer,
    refuse_too_long,
)
from kd.core.samples import SampleSource
from kd.core.sparse import topk_parts
from kd.core.targets import SparseTargets
from kd.core.tokens import refuse_no_samples
from kd.core.views import PARAM_WIDTH
from kd.student_trainer.sources import (
    Batch,
    SampleDraws,
    SoftTargetSource,
    prefetched,
    refuse_live_weights,
    split_server_address,
)

# What each path takes as its teacher, named when a bare model or function is given instead.
IMAGE_TEACHERS = ("a soft-target source: kd.student_trainer.sources.LocalSource(teacher) for a model in this "
                  "process (a kd.teacher_server.loading.Teacher or a SPEC), or a ServerSource")  # fmt: skip
TOKEN_TEACHERS = ("a token teacher: kd.precompute.LocalTokenTeacher(model) (or .from_spec(SPEC)) for a model in "
                  "this process, or a ServerTokenTeacher")  # fmt: skip


@dataclass
class PrecomputeReport:
    written: int
    skipped: int
    seconds: float
    bytes_per_sample: int
    path: Path
    stopped: int | None = None  # the signal number when ``stop`` ended the run before its end


def torchrun_shard() -> tuple[int, int] | None:
    """(rank, world size) when running under torchrun / torch.distributed launchers."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def default_workers() -> int:
    """DataLoader worker processes when none are asked for: up to 4, never more than the CPUs."""
    return min(4, os.cpu_count() or 1)


def present_codes(path: str | Path, views: int) -> np.ndarray:
    """``index * views + view`` of every committed record, int64 (8 bytes a record, not a Python set)."""
    return np.fromiter((i * views + v for i, v in CacheReader(path).keys()), dtype=np.int64)


_PLAN_CHUNK = 1 << 20  # to-do positions found at a time: no int64 temporary the size of the dataset


def todo_samples(meta: CacheMeta, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(samples, skip)``: the samples of this environment with a view still to compute, in index
    order, and the ``index * views + view`` codes of the views already committed among them (the
    samples a killed run left with some of their views: those are not redone).

    ``present``: ``present_codes`` of the environment. ``samples`` is int32 when the dataset fits
    (4 bytes a sample, the whole plan: the (index, view) keys are made a batch at a time from it)."""
    views, first, step = meta.views, meta.shard_index, meta.shard_count
    dtype = np.int32 if meta.dataset_size <= 2**31 else np.int64
    m = len(range(first, meta.dataset_size, step))
    if not len(present):
        return np.arange(first, meta.dataset_size, step, dtype=dtype), present[:0]
    sample = present // views
    ours = (sample >= first) & (sample < meta.dataset_size) & ((sample - first) % step == 0)
    present, slot = present[ours], (sample[ours] - first) // step  # this environment's records, by position
    del sample, ours
    slots, counts = np.unique(slot, return_counts=True)
    todo = np.ones(m, dtype=bool)
    todo[slots[counts >= views]] = False
    partial = slots[counts < views]
    parts = [np.flatnonzero(todo[lo : lo + _PLAN_CHUNK]).astype(dtype) + dtype(lo) for lo in range(0, m, _PLAN_CHUNK)]
    samples = np.concatenate(parts) if parts else np.empty(0, dtype=dtype)
    samples *= dtype(step)
    samples += dtype(first)
    skip = present[np.isin(slot, partial)] if len(partial) else present[:0]
    return samples, skip


class KeyBatches(torch.utils.data.Dataset):
    """Item k = the k-th batch of keys: (indices, views, inputs, labels), made in a DataLoader worker.

    ``keys``: (index, view) pairs ``[M, 2]``, or sample indices ``[S]`` standing for every view of
    each (``S * views`` keys, sample-major, made a batch at a time). ``decode=False`` (the server
    holds the data: inputs by reference) skips the samples and yields an empty input tensor."""

    def __init__(self, source: SampleSource, keys: np.ndarray, batch_size: int, views: int, decode: bool = True):
        self.source = source
        self.keys = keys
        self.batch_size = batch_size
        self.views = views
        self.decode = decode
        self.labels = torch.as_tensor(source.labels, dtype=torch.long)  # read once, not per batch

    def _rows(self) -> int:
        return len(self.keys) if self.keys.ndim == 2 else len(self.keys) * self.views

    def __len__(self) -> int:
        return math.ceil(self._rows() / self.batch_size)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        lo, hi = k * self.batch_size, min((k + 1) * self.batch_size, self._rows())
        if self.keys.ndim == 2:
            chunk = torch.from_numpy(self.keys[lo:hi].astype(np.int64))
            idx, vw = chunk[:, 0].contiguous(), chunk[:, 1].contiguous()
        else:
            at = torch.arange(lo, hi)
            idx, vw = torch.from_numpy(self.keys[(at // self.views).numpy()].astype(np.int64)), at % self.views
        if self.decode:
            inputs = self.source.get(idx, vw if self.views > 1 else None)
        else:
            inputs = torch.empty(len(idx), 0)
        return idx, vw, inputs, self.labels[idx]


def view_params_path(cache: str | Path) -> Path:
    """Where the view params of the cache environment ``cache`` live (an LMDB beside its records)."""
    return Path(cache) / VIEW_PARAMS_DIR


def _params_meta(meta: CacheMeta) -> CacheMeta:
    """The params store is a cache of its own: PARAM_WIDTH exact fp32 values per (sample, view),
    keyed, checksummed and resumed like the targets."""
    return CacheMeta(
        teacher_fingerprint=f"view-params:{meta.augmentation}",
        dataset_id=meta.dataset_id,
        dataset_size=meta.dataset_size,
        codec="fp32",
        num_classes=PARAM_WIDTH,
        teacher="view-params",
        views=meta.views,
        augmentation=meta.augmentation,
        shard_index=meta.shard_index,
        shard_count=meta.shard_count,
    )


def read_view_params(
    cache: str | Path, indices: torch.Tensor | list[int], views: torch.Tensor | list[int]
) -> torch.Tensor:
    """float32 ``[B, PARAM_WIDTH]``: the stored params of these (sample, view) records of a cache
    (one environment or a directory of shards); replay with ``kd.core.views.apply_params``."""
    meta = open_cache(cache).meta
    if not meta.view_params:
        raise ValueError(f"cache {str(cache)!r} stores no view params "
                         "(precomputed with views=1, or by reference through a source that reports none)")  # fmt: skip
    idx = torch.as_tensor(indices, dtype=torch.long)
    vw = torch.as_tensor(views, dtype=torch.long)
    root = Path(cache)
    if (root / "data.mdb").is_file():
        return CacheReader(view_params_path(root)).get(idx, vw)
    count = open_cache(cache).shards[0].meta.shard_count  # type: ignore[union-attr]
    out = torch.empty(len(idx), PARAM_WIDTH)
    for s in range(count):
        rows = (idx % count == s).nonzero().flatten()
        if len(rows):
            out[rows] = CacheReader(view_params_path(shard_dir(root, s, count))).get(idx[rows], vw[rows])
    return out


def manifest_of(dataset: SampleSource) -> dict[str, Any]:
    """The data's manifest for the cache metadata, without a per-file list (that grows with the data)."""
    fn = getattr(dataset, "manifest", None)
    if fn is None:
        return {"dataset_id": dataset.dataset_id, "num_samples": len(dataset)}
    return fn(files=False) if "files" in inspect.signature(fn).parameters else fn()


def refuse_unkeyed_teacher(teacher: object, wrap: str) -> None:
    """Refuse a teacher that states no fingerprint (a bare function or ``nn.Module``), before any work.

    A cache is keyed by its teacher's fingerprint, so that a student or a resumed run never mixes two
    teachers' targets: a bare callable has none, and hashing its weights here would guess at what a
    server of the same model would call it (amp, normalisation). ``wrap`` names the wrapper that
    states it for this path (the image and token paths refuse alike)."""
    fp = getattr(teacher, "fingerprint", None)
    if not (isinstance(fp, str) and fp):
        raise TypeError(f"the teacher ({type(teacher).__name__}) states no fingerprint, which keys the cache: "
                        f"give {wrap}")  # fmt: skip


def check_served_dataset(dataset: SampleSource, teacher: SoftTargetSource, views: int) -> None:
    """Refuse to fill a cache by reference unless the server's dataset ``teacher.dataset`` is ``dataset``.

    The cache is labelled with the local dataset's identity but holds the targets of the
    samples the server reads: the two must be the same data (the same content hash,
    sample count and, with views, view policy; the ``name/`` part of the id may differ)."""
    name = teacher.dataset  # type: ignore[attr-defined]
    served = getattr(teacher, "served_datasets", None) or {}
    if name not in served:
        have = ", ".join(sorted(served)) or "none"
        raise ValueError(f"--by-reference {name!r}: the server has no such dataset; it has registered: {have}")
    info, local_id = served[name], str(dataset.dataset_id)
    if not info.dataset_id:
        raise ValueError(
            f"--by-reference {name!r}: the server does not report its dataset's identity (an older kd serve), "
            f"so it cannot be checked against --dataset {local_id}; fill the cache by value instead"
        )
    local_aug = str(getattr(dataset, "augmentation", "none"))
    problems = []
    if info.dataset_id.partition("@")[2] != local_id.partition("@")[2]:
        problems.append(f"it is {info.dataset_id}, --dataset is {local_id}")
    if info.num_samples != len(dataset):
        problems.append(f"it has {info.num_samples} samples, --dataset {len(dataset)}")
    if views > 1 and info.augmentation != local_aug:
        problems.append(f"its views are {info.augmentation!r}, --dataset's {local_aug!r}")
    if problems:
        raise ValueError(
            f"--by-reference {name!r}: the server's dataset is not --dataset ({'; '.join(problems)}): the cache "
            "would be labelled with one dataset and hold the targets of the other. Give --dataset the URI (and "
            "options) the server registered"
        )


def check_sample_shape(dataset: SampleSource, teacher: SoftTargetSource) -> None:
    """Refuse, before any work, samples the teacher cannot take, naming both shapes (else the first
    batch fails inside the model: "mat1 and mat2 shapes cannot be multiplied", no shape named).

    A teacher takes samples of its input shape, images of its channels at any size (resized:
    ``kd.core.views.pixels_to_input``), or samples of as many values, put in its layout
    (``LocalSource._input``, ``ServerSource._payload``). By reference the server reads its own data:
    not checked here."""
    inner = getattr(teacher, "teacher", None)  # a LocalSource's Teacher (a ServerSource's is a name)
    if hasattr(inner, "input_dtype"):
        shape, floating, name = inner.input_shape, inner.input_dtype.is_floating_point, inner.name
    elif getattr(teacher, "dataset", None) is None and getattr(teacher, "input_shape", None) is not None:
        shape, floating, name = teacher.input_shape, bool(getattr(teacher, "floating", True)), teacher.teacher_name
    else:
        return
    sample = getattr(dataset, "sample_shape", None)
    if sample is None or not floating or not shape or min(int(s) for s in shape) <= 0:  # token teachers: theirs
        return
    sample, shape = tuple(int(s) for s in sample), tuple(int(s) for s in shape)
    if sample == shape or (len(sample) == len(shape) == 3 and sample[0] == shape[0]):
        return
    if math.prod(sample) == math.prod(shape):
        return
    raise ValueError(
        f"the dataset's samples are {list(sample)} but teacher {name!r} takes input {list(shape)}: "
        "give the dataset ?shape= (or ?size=/mode=) to match, or another teacher"
    )


def _skipping(rows, skip: np.ndarray, views: int):
    """Drop the (sample, view) rows already committed (``skip``: their codes; samples a killed
    run left half done)."""
    for idx, x, y, vw, params in rows:
        keep = torch.from_numpy(~np.isin((idx * views + vw).numpy(), skip))
        if keep.all():
            yield idx, x, y, vw, params
        elif keep.any():
            yield idx[keep], x[keep], y[keep], vw[keep], None if params is None else params[keep]


def _on_cuda(teacher: SoftTargetSource) -> bool:
    inner = getattr(teacher, "teacher", None)
    device = getattr(inner, "device", None)
    return device is not None and torch.device(device).type == "cuda"


def batch_loader(
    source: SampleSource,
    keys: np.ndarray,
    *,
    batch_size: int,
    views: int,
    workers: int,
    pin_memory: bool = False,
    decode: bool = True,
) -> torch.utils.data.DataLoader:
    """The batches of ``keys`` read through a DataLoader (``workers`` processes, one per batch at
    most; 0 = in this one)."""
    batches = KeyBatches(source, keys, batch_size, views, decode)
    workers = min(workers, max(1, len(batches)))
    return torch.utils.data.DataLoader(
        batches,
        batch_size=None,  # every item already is a batch
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=2 if workers else None,
    )


BASIS_FIT_ROWS = 1024  # a pca:K basis is fitted on max(K, this) rows spread over the data (or all there are)


def basis_fit_rows(k: int, available: int) -> int:
    """Rows a rank-``k`` basis is fitted on: max(k, BASIS_FIT_ROWS), or all ``available`` if fewer."""
    return min(max(k, BASIS_FIT_ROWS), available)


def basis_fit_sample(k: int, available: int) -> np.ndarray:
    """int64 positions (sorted, distinct, the first one 0) of the ``basis_fit_rows`` rows out of
    ``available`` that a rank-``k`` basis is fitted on: evenly spaced over all of them. Not the
    first rows: a dataset sorted by class (an image folder) would give a basis of its first
    classes only, decoding the others badly. Deterministic, so a rerun fits the same basis."""
    m = basis_fit_rows(k, available)
    return (np.arange(m, dtype=np.int64) * available) // max(m, 1)


def spread_order(n: int) -> Iterator[int]:
    """0..n-1, each once, in bit-reversed order (0, n/2, n/4, 3n/4, ...): every prefix is spread
    over the whole range, so a fit that stops once it has enough rows still sees all of it."""
    bits = max(n - 1, 0).bit_length()
    for i in range(1 << bits):
        j = int(format(i, f"0{bits}b")[::-1], 2) if bits else 0
        if j < n:
            yield j


class BasisError(ValueError):
    """A given low-rank basis (``--basis FILE``) that cannot serve this run: the file's fault, not
    the cache's, so the command line names the file (a ValueError, as before, for other callers)."""


def cache_basis(
    path: Path,
    codec: str,
    basis: bytes | None,
    fit: Callable[[], torch.Tensor],
    num_classes: int | None = None,
) -> bytes | None:
    """The low-rank basis a ``pca:K`` cache at ``path`` is written with: the one it already
    stores (a resumed run: its records were encoded with it), else ``basis`` (``--basis FILE``,
    so shards share one), else the codec's ``fit_basis`` on ``fit()``'s teacher logits [N, C].
    A given ``basis`` that differs from the stored one is refused: it was asked for explicitly
    (shards meant to share it would silently not); so is one (``BasisError``) that is not a basis,
    has too low a rank, or has other than ``num_classes`` (the teacher's outputs per row) classes.
    None for codecs without a basis."""
    codec_obj = get_codec(codec, 1.0)
    if not codec_obj.needs_basis:
        if basis is not None:
            raise ValueError(f"a basis is only used by pca:K codecs, not {codec}")
        return None
    stored = stored_basis(path)
    if stored is not None:
        if basis is not None and bytes(basis) != stored:
            raise ValueError(
                f"cache {str(path)!r} was started with another low-rank basis than the one given; resume it "
                "without --basis (it keeps its own) or write to a new path"
            )
        return stored
    if basis is not None:
        try:  # a bad --basis file is the file's fault, not the cache's: say so before any work
            given = LowRankBasis.from_bytes(bytes(basis))
            codec_obj.with_basis(given)
        except ValueError as e:
            raise BasisError(f"the given low-rank basis is unusable for {codec}: {e}") from None
        if num_classes is not None and given.num_classes != num_classes:  # else blamed on the cache when opened
            raise BasisError(
                f"the given low-rank basis has {given.num_classes} classes but the teacher's outputs have "
                f"{num_classes}: it was fitted on another teacher's outputs (take the basis of a cache of this "
                "teacher with `kd cache basis`, or leave --basis out to fit one)"
            )
        return bytes(basis)
    return codec_obj.fit_basis(fit()).to_bytes()  # pca:K@N fits a probability-weighted basis


_MALLOC_BOUNDED = False


def bound_malloc_retention() -> bool:
    """Fix glibc malloc's mmap threshold at its default 128 KiB, once per process (True if set).

    glibc raises the threshold whenever a large mmap'd block is freed (up to 32 MiB): after
    the first batches, the teacher's activations (MiBs each, sizes varying by layer) come
    from the heap instead, and the freed holes are kept, so a long CPU precompute's RSS
    crept from ~690 to ~1100 MiB over 40k samples (`kd bench data`). A fixed threshold
    (what ``MALLOC_MMAP_THRESHOLD_=131072`` does) returns each large block when it is freed:
    flat. DataLoader workers forked later inherit it. A user's own setting of the
    threshold (environment or tunable) is left alone; other C libraries are left alone."""
    global _MALLOC_BOUNDED
    if _MALLOC_BOUNDED:
        return True
    import ctypes
    import platform

    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3  # <malloc.h> M_MMAP_THRESHOLD
    _MALLOC_BOUNDED = bool(mallopt(m_mmap_threshold, 128 * 1024))
    return _MALLOC_BOUNDED


def precompute(
    dataset: SampleSource,
    teacher: SoftTargetSource,
    out: str | Path,
    *,
    codec: str = "fp32",
    batch_size: int = 256,
    views: int = 1,
    temperature: float | None = None,
    shard: tuple[int, int] | None = None,
    features: list[str] | None = None,
    pool_features: bool = False,
    commit_every: int = 4096,
    progress: bool = True,
    workers: int | None = None,
    on_batch: Callable[[int], Any] | None = None,
    basis: bytes | None = None,
    stop: Callable[[], int | None] | None = None,
) -> PrecomputeReport:
    """Run ``dataset`` (any SampleSource) through ``teacher`` into the cache at ``out``.

    ``pca:K``: the basis is the cache's stored one when resuming, else ``basis``
    (``LowRankBasis.to_bytes``; one for all shards), else fitted on the teacher's logits
    of ``basis_fit_rows`` of this environment's (index, view) keys evenly spaced over them (computed
    twice: once to fit, once as records).

    ``features`` (teacher layer names) are stored beside the targets, fp16,
    optionally pooled. ``workers`` DataLoader processes decode the samples
    (default ``default_workers()``; 0 decodes in this process). The data's
    manifest (format, URI, sizes; ``dataset_id`` names it exactly) goes into the
    metadata; with views, each record's view params (``kd.core.views``) go into
    ``OUT/view-params``, committed before the targets, so a reader can replay the
    exact view (``read_view_params``); by reference, the params the server drew.
    The cache keeps the data's identity and view policy, never the teacher's final
    transform (its resolution and normalisation are in the teacher's fingerprint): one
    cache serves students at any resolution (``TrainConfig.input_size``). ``on_batch(records_done)`` is called after
    each batch (the data benchmark samples memory with it). ``stop() -> signal number or None`` is
    asked after each batch (a SIGTERM handler's record): when it answers, the batches done so far are
    committed, the teacher's thread is stopped, and the report's ``stopped`` says so (a rerun resumes).
    """
    t0 = time.perf_counter()
    refuse_unkeyed_teacher(teacher, IMAGE_TEACHERS)
    bound_malloc_retention()  # memory flat in the dataset size on glibc, without MALLOC_MMAP_THRESHOLD_
    features = sorted(features or [])
    workers = default_workers() if workers is None else workers
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if batch_size < 1 or commit_every < 1:
        raise ValueError(f"batch_size and commit_every must be >= 1, got {batch_size} and {commit_every}")
    batchwise = [name for name in features if not reductions.parse(name).per_sample]
    if batchwise:
        raise ValueError(
            f"feature(s) {batchwise} relate the samples of a batch to each other and cannot be cached per sample; "
            "cache the full (or pooled) map and let the trainer compute them"
        )
    # A view policy's name carries its version ("none@v1"): the policy is what is compared.
    if views > 1 and str(getattr(dataset, "augmentation", "none")).partition("@")[0] in ("", "none"):
        raise ValueError(f"dataset {dataset.dataset_id!r} has no augmentation: --views {views} would be {views} "
                         "copies of the same sample")  # fmt: skip
    if getattr(teacher, "dataset", None) is not None:  # by reference: the server reads its own copy of the data
        check_served_dataset(dataset, teacher, views)
    check_sample_shape(dataset, teacher)
    shapes: dict[str, list[int]] = {}
    if features:  # one probe sample tells the stored shape of every requested layer
        first = torch.tensor([0])
        probe = Batch(first, dataset.get(first), torch.as_tensor(dataset.labels[:1]))
        _, _, feats = next(iter(teacher.iter_outputs([probe], features, pool_features)))
        shapes = {name: list(f.shape[1:]) for name, f in feats.items()}
    refuse_live_weights(teacher)
    shard_index, shard_count = shard or (0, 1)
    path = shard_dir(out, shard_index, shard_count) if shard_count > 1 else Path(out)
    check_layout(out, shard_count)  # never a root environment beside shards, nor the other way round
    # sample:K draws at T = 1 unless a temperature is given (Anshumann et al. 2025: draw and train at T = 1).
    meta = CacheMeta.for_dataset(
        teacher_fingerprint=teacher.fingerprint,
        teacher=teacher.teacher_name,
        num_classes=teacher.num_classes,
        dataset=dataset,
        codec=codec,
        views=views,
        temperature=temperature,
        shard_index=shard_index,
        shard_count=shard_count,
        features=shapes,
        features_pooled=pool_features and bool(features),
        dataset_manifest=manifest_of(dataset),
    )
    by_reference = getattr(teacher, "dataset", None) is not None  # the server holds the data
    topk = codec.startswith("topk:") and callable(getattr(teacher, "keeping_topk", None))
    if topk:  # a server sends only what the cache keeps, with its log-sum-exp at the cache's T
        teacher = teacher.keeping_topk(int(codec.partition(":")[2]), meta.temperature)
    elif codec.startswith("sample:") and callable(getattr(teacher, "keeping_samples", None)):
        # A server draws next to the model, with the codec's keyed uniforms: the same records.
        teacher = teacher.keeping_samples(get_codec(meta.codec, meta.temperature, meta.codec_version))
    # By reference the server decodes the views, and it returns the params it drew with the
    # targets (DatasetRef.return_view_params). Recomputing them here was the other way; it is
    # not taken: a random-resized crop's params depend on the decoded image's size, so this
    # process would decode every image (what inputs by reference exist to avoid), and the
    # result would be a claim about what the server did rather than its record of it.
    reports_params = callable(getattr(teacher, "iter_outputs_and_params", None))
    store_params = views > 1 and (reports_params if by_reference else hasattr(dataset, "read"))
    if store_params:
        meta = dataclasses.replace(meta, view_params=PARAM_WIDTH)
    flush_at = commit_every
    never = 1 << 62  # the writers commit when this loop says: view params first, then the targets

    def fit_logits() -> torch.Tensor:
        # The fit's rows of the environment's keys, sample-major (index, view), without listing them all.
        at = basis_fit_sample(get_codec(codec, 1.0).k, len(range(shard_index, meta.dataset_size, shard_count)) * views)
        keys = np.stack([shard_index + (at // views) * shard_count, at % views], axis=1)
        loader = batch_loader(dataset, keys, batch_size=batch_size, views=views, workers=0, decode=not by_reference)
        fit_batches = (Batch(idx, x, y, vw if views > 1 else None) for idx, vw, x, y in loader)
        return torch.cat([z.float().cpu() for _, z, _ in teacher.iter_outputs(fit_batches, [], False)])

    cache_b = cache_basis(path, codec, basis, fit_logits, num_classes=meta.num_classes)
    with (
        CacheWriter(path, meta, commit_every=never, basis=cache_b) as writer,
        CacheWriter(view_params_path(path), _params_meta(meta), commit_every=never)
        if store_params
        else contextlib.nullcontext() as params_writer,
    ):
        # The plan is 4 bytes a sample to do (samples int32) and the codes of a killed run's half-done samples.
        samples, skip = todo_samples(meta, present_codes(path, views))
        todo = len(samples) * views - len(skip)
        total = len(range(shard_index, meta.dataset_size, shard_count)) * views
        pin = _on_cuda(teacher)
        if by_reference:
            loader = batch_loader(dataset, samples, batch_size=batch_size, views=views, workers=workers,
                                  pin_memory=pin, decode=False)  # fmt: skip
            rows = ((idx, x, y, vw if views > 1 else None, None) for idx, vw, x, y in loader)
        else:
            stream = data_loader(dataset, torch.from_numpy(samples), batch_size, num_views=views, workers=workers,
                                 pin_memory=pin)  # fmt: skip
            rows = ((b.indices, b.inputs, b.labels, b.views, b.params) for b in stream)
        if len(skip):  # the committed views of a killed run's half-done samples are not redone
            rows = _skipping(rows, skip, views)
        params_fifo: collections.deque = collections.deque()

        def batches():
            for idx, x, y, vw, params in rows:
                params_fifo.append(params)
                yield Batch(idx, x, y, vw)

        done = total - todo
        pending = 0
        stopped: int | None = None
        with Progress(
            TextColumn("precompute {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            disable=not progress,
        ) as bar:
            task = bar.add_task(f"{dataset.dataset_id} -> {path}", total=total, completed=done)
            # Workers decode ahead; the teacher runs in a background thread while this one encodes and commits.
            # closing(): an error here (a full disk) stops and joins the teacher's thread before the
            # exception leaves, so the process never exits with that thread inside native code.
            if by_reference and store_params:
                answers = teacher.iter_outputs_and_params(batches(), features, pool_features, view_params=True)
            else:
                answers = ((*out, None) for out in teacher.iter_outputs(batches(), features, pool_features))
            outputs = contextlib.closing(prefetched(answers, 2))
            with outputs as results:
                for batch, logits, feats, served_params in results:
                    views_list = None if batch.views is None else batch.views.tolist()
                    params = params_fifo.popleft()  # the teacher's sources answer in input order
                    if served_params is not None:  # by reference: the params the server drew
                        params = served_params
                    if params_writer is not None:
                        params_writer.put(batch.indices.tolist(), params, views_list)
                    if isinstance(logits, SparseTargets):  # a top-k reply: the same records as from logits
                        writer.put_topk(batch.indices.tolist(), logits, views_list, feats or None)
                    elif isinstance(logits, SampleDraws):  # a server's draws: the same records as from logits
                        writer.put_samples(batch.indices.tolist(), logits.ids, logits.counts, views_list, feats or None)
                    else:
                        writer.put(batch.indices.tolist(), logits, views_list, feats or None)
                    pending += len(batch.indices)
                    if pending >= flush_at:
                        if params_writer is not None:
                            params_writer.flush()  # a committed record always has its view's params
                        writer.flush()
                        pending = 0
                    bar.advance(task, len(batch.indices))
                    done += len(batch.indices)
                    if on_batch is not None:
                        on_batch(done)
                    # A signal after the last batch stops nothing: the run is complete. Leaving the
                    # with-blocks closes the teacher's thread, then the writers commit what is
                    # pending (view params before the targets).
                    if done < total and stop is not None and (stopped := stop()):
                        break
    return PrecomputeReport(
        written=done - (total - todo) if stopped else todo,
        skipped=total - todo,
        seconds=time.perf_counter() - t0,
        bytes_per_sample=bytes_per_sample(codec, teacher.num_classes) + sum(meta.feature_bytes.values()),
        path=path,
        stopped=stopped or None,
    )


# -- token teachers: one record per sequence ---------------------------------------------------
@dataclass(frozen=True)
class TokenAsk:
    """What a token cache keeps, hence what to ask a served teacher for (``token_ask``).

    * ``logits``: full logits in ``dtype`` (fp32, or the fp16 / bf16 a cache of that codec
      stores anyway: half the bytes on the wire, the same records). Dense and quantised
      codecs, and ``rand:M``, whose ids derive from the record key (index, position) and
      cannot be sent in a request: the client picks them from full logits.
    * ``topk``: the K largest logits and the row's log-sum-exp of z / T (``top_k`` with
      ``sparse_temperature``).
    * ``sample``: K draws at T per round, as unique ids with counts (``token_samples``),
      one request per sequence and round with the seed ``sample_seed(index, round)``.
    """

    kind: str
    k: int = 0
    rounds: int = 1
    temperature: float = 1.0
    dtype: torch.dtype = torch.float32


def token_ask(codec: Any) -> TokenAsk:
    """The ``TokenAsk`` of a codec object (``kd.cache.codecs.get_codec``)."""
    from kd.cache.codecs import FullCodec, SampleCodec, TopKCodec

    if isinstance(codec, TopKCodec):
        return TokenAsk("topk", k=codec.k, temperature=codec.temperature)
    if isinstance(codec, SampleCodec):
        return TokenAsk("sample", k=codec.k, rounds=codec.rounds, temperature=codec.temperature)
    if isinstance(codec, FullCodec) and codec.torch_dtype in (torch.float16, torch.bfloat16):
        return TokenAsk("logits", dtype=codec.torch_dtype)
    return TokenAsk("logits")


def sample_seed(index: int, round_: int) -> int:
    """The draw seed of sequence ``index``, round ``round_`` (a request's ``token_sample_seed``):
    a function of the record alone, so a resumed or re-run precompute draws the same ids,
    in process or through a server."""
    import hashlib

    digest = hashlib.sha256(f"kd-token-cache:{int(index)}:{int(round_)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def draw_counts(z: torch.Tensor, draws: int, temperature: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A served teacher's draws for one sequence's logits ``z`` [L, V] asked with ``seed``:
    the server's own function (``kd.teacher_server.lm.sample_counts``, row 0 of a request),
    so the in-process path writes the records the server's answer writes."""
    from kd.teacher_server.lm import _row_seed, sample_counts

    g = torch.Generator(device=z.device).manual_seed(_row_seed(seed, 0))
    return sample_counts(z, draws, temperature, g)


def sample_rows(codec: Any, ids: list[torch.Tensor], counts: list[torch.Tensor], vocab: int) -> np.ndarray:
    """``sample:K[xR]`` codec rows uint8 [L, record_bytes] from R rounds of unique ids [L, k <= K]
    (-1 unused) and counts: per round the ids ascending, unused slots id 0 with count 0 (the
    layout ``SampleCodec`` writes and ``decode_rounds`` reads)."""
    from kd.cache.codecs import index_bytes

    idx_dt = np.dtype({1: np.uint8, 2: np.uint16, 4: np.uint32}[index_bytes(vocab)]).newbyteorder("<")
    parts = []
    for i, c in zip(ids, counts):
        i, c = i.to("cpu", torch.int64), c.to("cpu", torch.int64)
        if i.shape[1] > codec.k:
            raise ValueError(f"{i.shape[1]} sampled ids per position for a {codec.name} cache")
        if bool((c.sum(dim=1) != codec.k).any()):
            raise ValueError(f"sampled counts do not sum to {codec.k} draws per position ({codec.name})")
        order = torch.where(i >= 0, i, vocab).sort(dim=1)
        sid = torch.where(order.values < vocab, order.values, 0)
        sc = torch.where(order.values < vocab, c.gather(1, order.indices), 0)
        pad = codec.k - sid.shape[1]
        sid, sc = torch.nn.functional.pad(sid, (0, pad)), torch.nn.functional.pad(sc, (0, pad))
        parts += [sid.numpy().astype(idx_dt).view(np.uint8), sc.numpy().astype(np.uint8)]
    return np.ascontiguousarray(np.concatenate(parts, axis=1))


def topk_rows(codec: Any, values: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor, vocab: int) -> np.ndarray:
    """``topk:K`` codec rows from the parts (values [L, K], ids [L, K], lse [L]); refuses what
    the codec would: NaN/Inf, or (version 2 caches) values beyond its fp16 range."""
    values, lse = values.to("cpu", torch.float32), lse.to("cpu", torch.float32)
    peak = float(values.abs().max()) if values.numel() else 0.0
    if not (math.isfinite(peak) and bool(torch.isfinite(lse).all())):
        raise ValueError("top-k values or log-sum-exp contain NaN or Inf; refusing to cache them")
    if codec.max_abs is not None and peak > codec.max_abs:  # version 2 kept fp16 logits
        raise ValueError(f"|logits| up to {peak:.4g} exceed the {codec.name} range ({codec.max_abs:.4g})")
    return codec._pack(values, ids.to("cpu", torch.int64), lse, vocab)


def parts_rows(codec: Any, ask: TokenAsk, index: int, z: torch.Tensor, vocab: int) -> np.ndarray:
    """Codec rows of one sequence from its logits [L, V], computed as a server computes its
    answer (top-k and lse of z / T; draws by ``draw_counts`` with ``sample_seed``)."""
    z = z.float()
    if ask.kind == "topk":
        values, ids, lse = topk_parts(z, ask.k, ask.temperature)
        return topk_rows(codec, values, ids, lse, vocab)
    drawn = [draw_counts(z, ask.k, ask.temperature, sample_seed(index, r)) for r in range(ask.rounds)]
    return sample_rows(codec, [d[0] for d in drawn], [d[1] for d in drawn], vocab)


class LocalTokenTeacher:
    """An in-process token teacher: ``model(tokens [B, S] int64) -> logits [B, S, V]`` (or an
    output with ``.logits``). Padding is on the right, so a causal model's real positions never
    see it; the fingerprint is the weights' (``kd.teacher_server.loading.fingerprint``).

    ``from_spec`` loads what ``kd serve --teacher`` loads (``hf:DIR`` or a module factory),
    calls it as the server does (with the attention mask) and takes the fingerprint the
    server would give it at fp32, so its caches equal those precomputed through a server."""

    def __init__(self, model: torch.nn.Module, name: str = "module", device: str | torch.device = "cpu") -> None:
        from kd.teacher_server.loading import fingerprint

        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.teacher_name = name
        self.fingerprint = fingerprint(model)
        self.hf: bool | None = None  # None: called as model(tokens); else as the server calls it
        self.vocab_size: int | None = None  # known when loaded from a spec (the logits' last dimension)
        # What the teacher says of itself (a token teacher's signature facts: task, max_length,
        # tokenizer...), checked against the dataset before any work; a bare module states its
        # task as kd serve would read it (the ``task`` attribute, default causal-lm).
        self.facts: dict[str, str] = {"task": str(getattr(model, "task", "causal-lm"))}
        if getattr(model, "tokenizer_hash", None):
            self.facts["tokenizer"] = str(model.tokenizer_hash)

    @classmethod
    def from_spec(cls, spec: str, name: str = "teacher", device: str | torch.device = "cpu") -> LocalTokenTeacher:
        from kd.teacher_server.lm import is_token_teacher, token_target_options
        from kd.teacher_server.loading import load_teacher

        teacher = load_teacher(name, spec, device=str(device))
        if not is_token_teacher(teacher):
            raise ValueError(f"teacher {spec!r} is not a token teacher (tokens [B, S] -> logits [B, S, V]); "
                             "give a module with input_shape (-1,) (or ?input_shape=-1) or hf:DIR")  # fmt: skip
        self = cls(teacher.model, name, device)
        self.fingerprint = token_target_options(teacher, "fp32", False)[0]
        self.hf = teacher.signature is not None and teacher.signature.extra.get("source") == "hf"
        self.vocab_size = int(teacher.num_classes)
        self.facts = dict(teacher.signature.extra) if teacher.signature is not None else {}
        return self

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.forward(tokens, lengths)[0]

    @torch.no_grad()
    def forward(
        self, tokens: torch.Tensor, lengths: torch.Tensor, layers: Sequence[str] = ()
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
        """Logits ``[B, S, V]`` and the outputs of the named modules (hidden states ``[B, S, D]``,
        the first element of a tuple output, as a server's hooks take them), float32 on the host."""
        modules = dict(self.model.named_modules())
        unknown = [name for name in layers if not name or name not in modules]
        if unknown:
            raise ValueError(f"token teacher {self.teacher_name!r} has no module(s) {unknown}")
        captured: dict[str, torch.Tensor] = {}

        def hook(name: str):
            def keep(_m, _i, output) -> None:
                out = output[0] if isinstance(output, (tuple, list)) and output else output
                captured[name] = out.float().cpu() if isinstance(out, torch.Tensor) else out

            return keep

        handles = [modules[name].register_forward_hook(hook(name)) for name in layers]
        tokens = tokens.to(self.device)
        try:
            if self.hf is None:
                out = self.model(tokens)
                logits = getattr(out, "logits", out).float().cpu()
            else:
                from kd.teacher_server.lm import call_model

                mask = torch.arange(tokens.shape[1], device=self.device)[None, :] < lengths.to(self.device)[:, None]
                with torch.inference_mode():
                    logits = call_model(self.model, tokens, mask, self.hf).float().cpu()
        finally:
            for h in handles:
                h.remove()
        for name in layers:
            h = captured.get(name)
            if not isinstance(h, torch.Tensor) or h.ndim != 3 or h.shape[:2] != tokens.shape:
                got = list(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
                raise ValueError(f"module {name!r} of token teacher {self.teacher_name!r} gave {got} for tokens "
                                 f"{list(tokens.shape)}, not hidden states [B, S, D]")  # fmt: skip
        return logits, {name: captured[name] for name in layers}

    def hidden_widths(self, layers: Sequence[str], tokens: torch.Tensor) -> dict[str, int]:
        """The width D of each named module's hidden states, from one forward of ``tokens`` [1, S]."""
        _, hidden = self.forward(tokens, torch.tensor([tokens.shape[1]]), layers)
        return {name: int(h.shape[-1]) for name, h in hidden.items()}


def _named(e: Any, indices: list[int], rows: list[int]) -> Any:
    """``e`` (a ``TeacherRequestError``), its message naming the dataset sequences of ``rows`` where
    the server refused their answer as out of range (it names no sequence); any other refusal as it is."""
    import grpc

    from kd.teacher_server.client import TeacherRequestError

    if e.code != grpc.StatusCode.OUT_OF_RANGE:
        return e
    which = ", ".join(str(indices[r]) for r in rows)
    return TeacherRequestError(e.code, f"sequence{'s' if len(rows) > 1 else ''} {which}: {e.message}")


ANSWER_SLACK = 4096  # bytes the server adds to an answer's tensors when it sizes it (kd.teacher_server.lm)


class ServerTokenTeacher:
    """A served token teacher (``kd serve --teacher lm=...``), asked only for what the cache
    keeps (``TokenAsk``): top-k + lse for ``topk:K``, sampled ids with counts for ``sample:K``
    (drawn next to the model), full logits (fp16/bf16 for those codecs) otherwise."""

    def __init__(self, address: str, teacher: str | None = None, *, depth: int = 8, **client_options: Any) -> None:
        from kd.teacher_server.client import TeacherClient
        from kd.teacher_server.server import DEFAULT_MAX_MESSAGE_BYTES

        self.client = TeacherClient(address, **client_options)
        desc = self.client.describe(teacher)
        self.teacher_name = desc.name
        self.fingerprint = desc.fingerprint
        if not desc.accepts_weights:  # every answer must come from the weights the cache is keyed by
            self.client.expect_fingerprint(desc.name, desc.fingerprint)
        self.vocab_size = int(desc.num_classes)  # a token teacher's num_classes is its vocabulary
        # The served teacher's signature facts (task, max_length, tokenizer...), checked up front.
        self.facts: dict[str, str] = dict(desc.signature.extra) if desc.signature is not None else {}
        self.layers = dict(desc.layers)  # name -> per-position shape: (-1, D) for hidden states
        self.depth = depth
        # The largest answer asked for in one request: this channel's own limit at first, lowered to
        # the server's when it refuses an answer as too large (its limit is not in its description).
        # A batch is asked in as many requests as fit: a user of kd precompute cannot pick positions.
        self.answer_limit = int(client_options.get("max_message_bytes") or DEFAULT_MAX_MESSAGE_BYTES)

    def __call__(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Full fp32 logits ``[B, S, V]`` (0 at padding)."""
        return self.client.token_logits(self.teacher_name, tokens, lengths=lengths.tolist()).float()

    def hidden_widths(self, layers: Sequence[str], tokens: torch.Tensor | None = None) -> dict[str, int]:
        """The width D of each named layer's hidden states, as the server describes its teacher."""
        widths = {name: int(shape[-1]) for name, shape in self.layers.items() if len(shape) == 2}
        unknown = [name for name in layers if name not in widths]
        if unknown:
            raise ValueError(f"token teacher {self.teacher_name!r} has no hidden-state layer(s) {unknown}; its layers "
                             f"giving [B, S, D]: {', '.join(list(widths)[:40]) or 'none'}")  # fmt: skip
        return {name: widths[name] for name in layers}

    def sequences(
        self, indices: list[int], tokens: torch.Tensor, lengths: torch.Tensor, ask: TokenAsk,
        layers: Sequence[str] = (),
    ) -> tuple[list[Any], list[dict[str, torch.Tensor]]]:  # fmt: skip
        """Per sequence: logits [L, V] (``logits``), (values, ids, lse) (``topk``) or a list of
        (ids, counts) per round (``sample``), each over the sequence's L real positions; and per
        sequence the hidden states of ``layers`` there, layer -> fp16 [L, D] (what a cache keeps:
        asked in fp16, rounded next to the model as a cache rounds them)."""
        import grpc

        from kd.teacher_server.client import TeacherRequestError

        lens = [int(n) for n in lengths]
        name = self.teacher_name
        hidden = {"hidden": list(layers), "hidden_dtype": torch.float16} if layers else {}

        def states(out: Any, part_lens: list[int]) -> list[dict[str, torch.Tensor]]:
            split = {n: torch.split(out[f"feature/{n}"], part_lens) for n in layers}
            return [{n: split[n][r] for n in layers} for r in range(len(part_lens))]

        if ask.kind == "sample":
            from concurrent.futures import ThreadPoolExecutor

            def one(job: tuple[int, int]) -> tuple[tuple[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]:
                r, rnd = job
                try:
                    out = self.client.infer_tokens(name, tokens[r : r + 1, : lens[r]], samples=ask.k,
                                                   seed=sample_seed(indices[r], rnd),
                                                   sparse_temperature=ask.temperature,
                                                   **(hidden if rnd == 0 else {}))  # fmt: skip
                except TeacherRequestError as e:
                    raise _named(e, indices, [r]) from None
                return (out["sample_indices"], out["sample_counts"]), (states(out, [lens[r]])[0] if rnd == 0 else {})

            jobs = [(r, rnd) for r in range(len(indices)) for rnd in range(ask.rounds)]
            with ThreadPoolExecutor(max_workers=self.depth) as pool:  # the server batches them
                answers = list(pool.map(one, jobs))
            rounds = [[a for a, _ in answers[r * ask.rounds : (r + 1) * ask.rounds]] for r in range(len(indices))]
            return rounds, [answers[r * ask.rounds][1] for r in range(len(indices))]

        def call(rows: list[int]) -> list[Any]:
            part, part_lens = tokens[rows, : max(lens[r] for r in rows)], [lens[r] for r in rows]
            if ask.kind == "topk":
                out = self.client.infer_tokens(name, part, lengths=part_lens, top_k=ask.k,
                                               sparse_temperature=ask.temperature, **hidden)  # fmt: skip
                parts = [torch.split(out[key], part_lens) for key in ("topk_values", "topk_indices", "logsumexp")]
                return list(zip(zip(*parts), states(out, part_lens)))
            out = self.client.infer_tokens(name, part, lengths=part_lens, logits=True, dtype=ask.dtype, **hidden)
            return list(zip((z.float() for z in torch.split(out["logits"], part_lens)), states(out, part_lens)))

        def named(rows: list[int]) -> list[Any]:
            """``call(rows)``; an answer the server refuses as out of range (NaN/Inf, or hidden
            states past fp16's range, as they are asked) names the sequence it comes from: the server
            names no row, so the rows of a refused run are asked alone until one is refused."""
            try:
                return call(rows)
            except TeacherRequestError as e:
                if len(rows) > 1 and e.code == grpc.StatusCode.OUT_OF_RANGE:
                    for r in rows:
                        try:
                            call([r])
                        except TeacherRequestError as alone:
                            raise _named(alone, indices, [r]) from None
                raise _named(e, indices, rows) from None

        pairs = self._fitting(list(range(len(lens))), lens, ask, named, layers)
        return [a for a, _ in pairs], [h for _, h in pairs]

    def answer_bytes(self, positions: int, ask: TokenAsk, layers: Sequence[str] = ()) -> int:
        """The size the server reckons for an answer over ``positions`` positions
        (``kd.teacher_server.lm.prepare``), which it refuses over its message limit."""
        if ask.kind == "topk":
            per = ask.k * (4 + 4) + 4  # fp32 values and int32 ids, the fp32 log-sum-exp
        else:
            per = self.vocab_size * torch.empty((), dtype=ask.dtype).element_size()
        per += sum(2 * int(self.layers[n][-1]) for n in layers)  # fp16 hidden states
        return positions * per + ANSWER_SLACK

    def _plan(self, rows: list[int], lens: list[int], ask: TokenAsk, layers: Sequence[str] = ()) -> list[list[int]]:
        """``rows`` in order, cut into runs whose answers fit ``answer_limit`` (a row too large on
        its own is a run of its own: the server refuses it, naming the sizes)."""
        runs: list[list[int]] = []
        run: list[int] = []
        positions = 0
        for r in rows:
            if run and self.answer_bytes(positions + lens[r], ask, layers) > self.answer_limit:
                runs.append(run)
                run, positions = [], 0
            run.append(r)
            positions += lens[r]
        return [*runs, run] if run else runs

    def _fitting(
        self, rows: list[int], lens: list[int], ask: TokenAsk, call: Callable[[list[int]], list[Any]],
        layers: Sequence[str] = (),
    ) -> list[Any]:  # fmt: skip
        """``call(run)`` (per-row answers) over ``rows`` in runs that fit; a run the server refuses
        as too large teaches its limit and is asked again in smaller runs (same answers: each row's
        outputs depend on that row alone)."""
        import grpc

        from kd.teacher_server.client import TeacherRequestError

        out: list[Any] = []
        for run in self._plan(rows, lens, ask, layers):
            try:
                out += call(run)
            except TeacherRequestError as e:
                if e.code != grpc.StatusCode.RESOURCE_EXHAUSTED or "message limit" not in e.message or len(run) == 1:
                    raise
                need = self.answer_bytes(sum(lens[r] for r in run), ask, layers)
                stated = re.search(r"message limit of ([0-9.]+) MiB", e.message)
                # The limit as the server states it (to 0.1 MiB), else half of what was refused;
                # below ``need`` in any case, so the run is cut and this ends.
                learned = int((float(stated.group(1)) - 0.05) * 2**20) if stated else need // 2
                self.answer_limit = max(1, min(self.answer_limit, learned, need - 1))
                out += self._fitting(run, lens, ask, call, layers)
        return out

    def close(self) -> None:
        self.client.close()


def token_teacher(ref: str, device: str = "cpu", **client_options: Any) -> LocalTokenTeacher | ServerTokenTeacher:
    """``server:HOST:PORT[/TEACHER]`` or ``local:SPEC`` (``hf:DIR``, ``module:factory[@WEIGHTS]?...``)
    as a token teacher for ``precompute_tokens`` (``kd precompute`` with a token dataset);
    ``client_options``: a server's ``TeacherClient`` options (timeouts), unused for a local one."""
    kind, sep, rest = ref.partition(":")
    if kind == "server" and sep and rest:
        address, name = split_server_address(rest)
        if "," in address:
            raise ValueError(f"source {ref!r}: token precompute talks to one server; give one HOST:PORT")
        return ServerTokenTeacher(address, name or None, **client_options)
    if kind == "local" and sep and rest:
        return LocalTokenTeacher.from_spec(rest, device=device)
    raise ValueError(f"source {ref!r}: a token teacher is server:HOST:PORT[/TEACHER] or local:SPEC "
                     "(local:hf:DIR, local:module:factory@WEIGHTS?input_shape=-1)")  # fmt: skip


def precompute_tokens(
    source: Any,
    teacher: LocalTokenTeacher | ServerTokenTeacher,
    out: str | Path,
    *,
    codec: str = "fp16",
    batch_size: int = 8,
    temperature: float | None = None,
    commit_every: int = 256,
    progress: bool = False,
    basis: bytes | None = None,
    shard: tuple[int, int] | None = None,
    stop: Callable[[], int | None] | None = None,
    features: Sequence[str] = (),
) -> PrecomputeReport:
    """One record per sequence of a token source (``kd.core.tokens.TokenSource``): the teacher's
    targets at each real position, through ``codec`` (``fp16``, ``topk:K`` + rest, ``sample:K``
    counts, ...; ids in 1, 2 or 4 bytes by vocabulary). Resumes: sequences already committed are
    skipped. ``temperature``: the T the sparse codecs are exact at (topk, rand) or draw at (sample,
    default 1). Read back with ``CacheReader.token_targets`` or ``CacheSource`` (``TokenTargets``).

    A ``ServerTokenTeacher`` is asked only for what the codec keeps (``token_ask``); an
    in-process teacher's logits go through the same arithmetic (``parts_rows``), so both
    paths write the same records for the same logits (sampled ids included: the draws are
    the server's function of ``sample_seed(index, round)``). ``pca:K``: as ``precompute``,
    the basis fitted on ``basis_fit_rows`` positions evenly spaced over those of sequences spread
    over the source (``spread_order``), taken until there are enough.

    ``shard=(I, N)`` (``kd precompute --shard``, or a ``torchrun`` rank): only sequences i with
    i % N == I, into ``OUT/shard-IIIII-of-NNNNN``, as ``precompute`` splits samples; readers open
    the directory of shards as one cache (``kd.cache.sharded.open_cache``).

    ``stop() -> signal number or None`` is asked after every batch, as by ``precompute``: once it
    answers, the writer commits every record put so far and the report's ``stopped`` says so (a
    rerun resumes after them).

    ``features``: teacher modules whose outputs are hidden states ``[B, S, D]`` (``kd serve``'s
    layers of a token teacher), stored beside each position's targets in fp16 (2 D bytes a position
    and layer), for ``kd train-lm --feature`` from the cache; a server sends them in fp16 already."""
    from kd.cache.codecs import get_codec

    t0 = time.perf_counter()
    refuse_unkeyed_teacher(teacher, TOKEN_TEACHERS)
    refuse_no_samples(source)  # a file shorter than one block: named, not the cache's "dataset_size ... 0"
    n = len(source)
    vocab = int(source.vocab_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # A masked LM's targets describe each position's own token: refused before any work (the
    # server refuses token_logprobs of one for the same reason).
    facts, name = getattr(teacher, "facts", None) or {}, getattr(teacher, "teacher_name", "")
    refuse_masked_lm(facts, name)
    # Same vocabulary size is not the same tokenizer: where both say which, they must agree.
    refuse_other_tokenizer(facts, name, source)
    # A sequence past the teacher's positions fails deep inside its embedding (in process) or is
    # refused by the server mid-run: refused here, before work, as the server words it.
    limit = facts_max_length(facts) or model_max_length(getattr(teacher, "model", None))
    refuse_too_long(longest_sequence(source), limit, f"teacher {name!r}",
                    "lower the dataset's ?block= (documents are cut to it)")  # fmt: skip
    teacher_vocab = getattr(teacher, "vocab_size", None)
    if teacher_vocab is not None and int(teacher_vocab) != vocab:
        raise ValueError(
            f"the token teacher {getattr(teacher, 'teacher_name', '')!r} has a vocabulary of {teacher_vocab} but the "
            f"dataset's tokenizer has {vocab} token ids: the teacher must be the tokenizer's model (give the "
            "dataset ?tokenizer= of the teacher)"
        )
    codec_obj = get_codec(codec, temperature if codec_uses_temperature(codec) else None)
    ask = token_ask(codec_obj)
    served = isinstance(teacher, ServerTokenTeacher)
    shard_index, shard_count = shard or (0, 1)
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard {shard_index}/{shard_count}: need 0 <= I < N")
    path = shard_dir(out, shard_index, shard_count) if shard_count > 1 else Path(out)
    check_layout(out, shard_count)  # never a root environment beside shards, nor the other way round
    mine = range(shard_index, n, shard_count)  # this shard's sequences
    layers = sorted(dict.fromkeys(features))
    if layers and not hasattr(teacher, "hidden_widths"):
        raise ValueError(f"features {layers}: hidden states come from a LocalTokenTeacher or a ServerTokenTeacher, "
                         f"not from {type(teacher).__name__}")  # fmt: skip
    widths = teacher.hidden_widths(layers, source.batch([0]).tokens[:, :2]) if layers else {}
    meta = CacheMeta(
        teacher_fingerprint=teacher.fingerprint,
        dataset_id=source.dataset_id,
        dataset_size=n,
        codec=codec,
        num_classes=vocab,
        teacher=getattr(teacher, "teacher_name", ""),
        temperature=temperature if codec_uses_temperature(codec) else None,
        per_token=True,
        dataset_manifest=manifest_of(source),
        shard_index=shard_index,
        shard_count=shard_count,
        features={name: [widths[name]] for name in layers},
    )

    def answers_of(idx: list[int], layers: list[str]) -> tuple[list[Any], list[dict[str, torch.Tensor]]]:
        """Per sequence the teacher's answer over its real positions and its hidden states there."""
        b = source.batch(idx)
        lengths = b.attention_mask.sum(dim=1)
        if served:
            return teacher.sequences(idx, b.tokens, lengths, ask, layers)
        logits, hidden = teacher.forward(b.tokens, lengths, layers) if layers else (teacher(b.tokens, lengths), {})
        if logits.ndim != 3 or logits.shape[:2] != b.tokens.shape or logits.shape[2] != vocab:
            raise ValueError(
                f"the token teacher gave logits {list(logits.shape)} for tokens {list(b.tokens.shape)}; "
                f"expected [B, S, {vocab}] (the source's vocabulary)"
            )
        real = [int(n) for n in lengths]
        return ([logits[r, : real[r]] for r in range(len(idx))],
                [{k: h[r, : real[r]] for k, h in hidden.items()} for r in range(len(idx))])  # fmt: skip

    def logits_of(idx: list[int]) -> list[torch.Tensor]:
        return answers_of(idx, [])[0]

    def fit_positions() -> torch.Tensor:
        # Sequences spread over the corpus (a sorted corpus's first ones are one file), in batches until
        # there are enough positions, then positions evenly spaced over those: the cost stays bounded.
        # A shard fits on its own sequences, as an image shard fits on its own keys.
        if not len(mine):  # more shards than sequences: this one has nothing to fit on
            raise ValueError(
                f"shard {shard_index}/{shard_count} holds none of the {n} sequences: a {codec} basis cannot be fitted "
                "on it; fit one on all of them (kd cache basis of a finished shard) and give it with --basis, or "
                "use fewer shards"
            )
        taken: dict[int, torch.Tensor] = {}
        order, count = (mine[j] for j in spread_order(len(mine))), 0
        while count < max(codec_obj.k, BASIS_FIT_ROWS):
            idx = sorted(itertools.islice(order, batch_size))
            if not idx:
                break
            for i, z in zip(idx, logits_of(idx)):
                taken[i] = z.float().cpu()
                count += len(z)
        rows = torch.cat([taken[i] for i in sorted(taken)])
        return rows[torch.from_numpy(basis_fit_sample(codec_obj.k, len(rows)))]

    cache_b = cache_basis(path, codec, basis, fit_positions, num_classes=vocab)
    with (
        CacheWriter(path, meta, commit_every=commit_every, basis=cache_b) as writer,
        Progress(TextColumn("precompute {task.description}"), BarColumn(), MofNCompleteColumn(),
                 TimeRemainingColumn(), disable=not progress) as bar,
    ):  # fmt: skip
        # A resumed cache keeps the record layout it was written with (its codec_version: topk:K
        # of version 2 holds fp16 logits, of version 3 log-probabilities): rows are made by its codec.
        codec_obj = writer.codec
        done = {i for i, _ in writer.present()}
        todo = [i for i in mine if i not in done]
        task = bar.add_task(f"{source.dataset_id} -> {path}", total=len(mine), completed=len(mine) - len(todo))
        written, stopped = 0, None
        for lo in range(0, len(todo), batch_size):
            idx = todo[lo : lo + batch_size]
            answers, hidden = answers_of(idx, layers)
            kept = hidden if layers else None
            if ask.kind == "logits":
                writer.put_sequences(idx, answers, kept)
            elif not served:
                rows = [parts_rows(codec_obj, ask, i, z, vocab) for i, z in zip(idx, answers)]
                writer.put_sequence_rows(idx, rows, kept)
            elif ask.kind == "topk":
                writer.put_sequence_rows(idx, [topk_rows(codec_obj, *a, vocab) for a in answers], kept)
            else:
                rows = [sample_rows(codec_obj, [p[0] for p in a], [p[1] for p in a], vocab) for a in answers]
                writer.put_sequence_rows(idx, rows, kept)
            bar.advance(task, len(idx))
            written += len(idx)
            if lo + batch_size < len(todo) and stop is not None and (stopped := stop()):  # none after the last
                break  # leaving the with-block commits the records put since the last commit
    stats = CacheReader(path).token_stats()
    return PrecomputeReport(
        written=written,
        skipped=len(mine) - len(todo),
        seconds=time.perf_counter() - t0,
        bytes_per_sample=round(stats["bytes"] / max(stats["sequences"], 1)),
        path=path,
        stopped=stopped,
    )
