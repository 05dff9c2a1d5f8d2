"""``kd cache export``: every record of a cache as one ``.npz``, written a chunk of records at a time.

The file is what ``np.savez(out, meta=..., index=..., view=..., <targets>...)`` writes for the whole
cache at once (the same members in the same order, each ``.npy`` byte for byte, ZIP_STORED with zip64
records), but memory holds one chunk: the records are read in key order, each array's rows are
appended to a raw temporary file, and each member is then streamed into the zip behind a ``.npy``
header written with the final row count. The zip is built under a temporary name beside ``out`` and
renamed over it only when complete, so an error part-way leaves no partial export behind.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from kd.cache.sharded import keys_in_order
from kd.core.targets import SparseTargets

EXPORT_CHUNK = 16384  # records read, decoded and appended at once
_COPY_BYTES = 1 << 20


def _arrays(targets, index: list[int], view: list[int]) -> dict[str, np.ndarray]:
    """The exported arrays of a chunk, in the file's member order (after ``meta``)."""
    out = {"index": np.asarray(index, dtype=np.int64), "view": np.asarray(view, dtype=np.int64)}
    if isinstance(targets, SparseTargets) and targets.kind == "sample":  # unique ids with their draw counts
        out.update(class_index=targets.indices.numpy(), counts=targets.counts.numpy())
    elif isinstance(targets, SparseTargets):
        out.update(class_index=targets.indices.numpy(), logits=targets.logits.numpy(),
                   logsumexp=targets.logsumexp.numpy())  # fmt: skip
    else:
        out["logits"] = targets.numpy()
    return {name: np.ascontiguousarray(a) for name, a in out.items()}


def export_npz(reader, out: str | Path, *, chunk: int = EXPORT_CHUNK) -> int:
    """Write every record of ``reader`` (a ``CacheReader`` or ``ShardedCacheReader``) to the npz file
    ``out`` (its name as given: the caller adds ``.npz``); -> the number of records.

    Arrays ``index``, ``view`` and the targets (``logits`` for dense codecs; ``class_index``,
    ``logits``, ``logsumexp`` for topk/rand; ``class_index``, ``counts`` for sample), rows in
    (index, view) order, plus ``meta``: the metadata as JSON. A cache's errors (CacheError,
    ValueError) and OSError propagate; ``out`` is then left as it was."""
    out = Path(out)
    template = _arrays(reader.targets([], []), [], [])  # dtypes and row shapes; refuses what cannot be exported
    meta = np.asarray(json.dumps(dict(vars(reader.meta))))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        parts = {name: open(os.path.join(tmp, name), "wb") for name in template}  # noqa: SIM115 (closed below)
        rows = 0
        try:
            keys = keys_in_order(reader)
            while batch := list(itertools.islice(keys, chunk)):
                index, view = [i for i, _ in batch], [v for _, v in batch]
                arrays = _arrays(reader.targets(index, view), index, view)
                for name, a in arrays.items():
                    want = template[name]
                    if a.dtype != want.dtype or a.shape[1:] != want.shape[1:]:  # one codec: never, but never silently
                        raise ValueError(f"export: {name} rows of {a.dtype} {list(a.shape[1:])} after "
                                         f"{want.dtype} {list(want.shape[1:])}")  # fmt: skip
                    parts[name].write(a.data)
                rows += len(batch)
        finally:
            for f in parts.values():
                f.close()
        partial = os.path.join(tmp, "export.npz")
        # what np.savez does: ZipFile(allowZip64=True, ZIP_STORED), each member opened with force_zip64
        with zipfile.ZipFile(partial, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("meta.npy", "w", force_zip64=True) as fid:
                np.lib.format.write_array(fid, meta)
            for name, want in template.items():
                header = {"descr": np.lib.format.dtype_to_descr(want.dtype), "fortran_order": False,
                          "shape": (rows, *want.shape[1:])}  # fmt: skip
                with zf.open(f"{name}.npy", "w", force_zip64=True) as fid, open(os.path.join(tmp, name), "rb") as f:
                    np.lib.format.write_array_header_1_0(fid, header)  # the version write_array picks here
                    shutil.copyfileobj(f, fid, _COPY_BYTES)
        os.replace(partial, out)
    return rows
