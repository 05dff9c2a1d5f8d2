"""The soft-label cache: an LMDB store of teacher outputs.

One record per (teacher fingerprint, dataset id, sample index, view id);
``codecs`` turns a row of logits into compact bytes and back; ``store`` holds
the writer (batched transactions, growing map, resumable) and the reader
(read-only, safe across DataLoader worker processes).
"""

from kd.cache.codecs import CODECS, Codec, get_codec
from kd.cache.store import (
    CacheError,
    CacheMeta,
    CacheReader,
    CacheWriter,
    CorruptRecordError,
    MissingRecordError,
    StaleCacheError,
)

__all__ = [
    "CODECS",
    "Codec",
    "get_codec",
    "CacheError",
    "CacheMeta",
    "CacheReader",
    "CacheWriter",
    "CorruptRecordError",
    "MissingRecordError",
    "StaleCacheError",
]
