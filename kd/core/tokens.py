"""Token datasets for language-model teachers: tokenizers, sample sources, sparse targets.

A **token source** is a ``kd.core.samples.SampleSource`` over a text corpus, opened
by URI like every other dataset (``kd.core.data.open_source``)::

    open_source("text:corpus/?block=128&tokenizer=byte")        # *.txt files, one document each
    open_source("text:wiki.txt?doc=line&block=256")             # one document per non-empty line
    open_source("jsonl:chat.jsonl?prompt=question&completion=answer&pack=0&block=512")
    open_source("jsonl:web.jsonl?text=body&tokenizer=tok/tokenizer.json")
    open_source("hf:saved_dir?text=content&split=train")         # datasets.save_to_disk
    open_source("tokens:ids.npy?block=1024&tokenizer=tok.json")  # pre-tokenised: 1-D uint16/uint32 ids

``get(indices)`` returns int64 token ids ``[B, S]``; ``batch(indices)`` returns them
with the loss mask (which tokens are prediction targets) and the attention mask
(which are real, not padding). Two layouts:

* ``pack=1`` (default): every document becomes ``[bos] tokens [eos]``, the documents
  are concatenated in order and cut into blocks of ``block`` tokens (the remainder
  is dropped). Attention is not masked across document boundaries (standard packing).
* ``pack=0``: one sample per document, truncated to ``block`` tokens when given,
  right-padded with the pad id to the longest sample *of the batch*.

``tokens:FILE.npy`` is a corpus tokenised elsewhere: one stream of ids (``numpy.save`` of a 1-D
uint16/uint32 array, the documents' bos/eos already in it), memory-mapped, cut into blocks of
``block`` tokens, every token but the tokenizer's bos a target; ``tokenizer=`` names the
tokenizer the ids are of (its vocabulary bounds them; its hash is in the dataset id).

The loss mask marks the tokens a model is trained to predict: every document token
and its eos, never bos or padding, and for instruction data (``prompt=`` /
``completion=``) only the completion and its eos. ``next_token_labels`` shifts it
onto the logits' positions (position s predicts token s + 1; ``IGNORE_INDEX``
elsewhere), the form the per-token losses and metrics take.

``dataset_id`` is ``name/split@hash16`` over the file manifest (content hashes) or
Arrow's fingerprint, the tokenizer's hash and every option that changes a token,
so a cache precomputed on other tokens is refused. There are no views: a token
sample has one plain form, and its class label is 0 (the targets are per token).

``TokenTargets`` is the sparse per-position form of a token teacher's output: the
stored ids with either their logits and the row's log-sum-exp (top-k or sampled
ids; the rest of the mass is known exactly) or their draw counts (Anshumann et al.
2025, "Sparse Logit Sampling": unique ids drawn from the teacher at T = 1).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch

IGNORE_INDEX = -100  # labels at positions without a next-token target (PyTorch's / HF's convention)
BYTE_TOKENIZER_VERSION = 1
TOKEN_SIDECAR_VERSION = 1  # the layout of cache_dir()/tokens/KEY (tokens.npy, mask.npy, offsets.npy)


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding ids 0..vocab_size - 1 (uint16, else uint32): 2 bytes a token
    for vocabularies up to 65536, not int64's 8."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded, named with the file or package at fault."""


class Tokenizer(Protocol):
    """What a token source needs from a tokenizer."""

    name: str
    vocab_size: int
    pad_id: int
    bos_id: int | None
    eos_id: int | None

    @property
    def hash(self) -> str: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then pad = 256, bos = 257, eos = 258 (vocabulary 259).

    The zero-dependency default: every string round-trips exactly, any model can
    use it without a vocabulary file.
    """

    name = "byte"
    vocab_size = 259
    pad_id, bos_id, eos_id = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        """``encode`` of each text as a uint8 array: its UTF-8 bytes, without a Python int per byte."""
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of the byte ids; special ids are dropped, broken UTF-8 replaced."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    @property
    def hash(self) -> str:
        spec = {"kind": "byte", "version": BYTE_TOKENIZER_VERSION, "pad": 256, "bos": 257, "eos": 258}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")
_BOS_NAMES = ("<s>", "<bos>", "[BOS]", "<|begin_of_text|>", "<|startoftext|>", "[CLS]")
_EOS_NAMES = ("</s>", "<eos>", "[EOS]", "<|endoftext|>", "<|end_of_text|>", "[SEP]")


def vocab_hash(vocab: dict[str, int]) -> str:
    """sha256/16 of a tokenizer's token -> id map (added tokens included), in id order: what ids
    mean, whatever the file's formatting, key order or the ``tokenizers`` version that wrote it.
    Two tokenizers with equal vocab hashes give every id the same token (the distillation check:
    ``kd.core.lmchecks``); the file hash (``JsonTokenizer.hash``) stays the dataset's identity."""
    items = sorted((int(i), str(t)) for t, i in vocab.items())
    return hashlib.sha256(json.dumps(items, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()[:16]


class JsonTokenizer:
    """A local ``tokenizer.json`` read by the ``tokenizers`` package (optional: ``pip install tokenizers``).

    Special ids are found by their usual names (``<pad>``/``[PAD]``, ``<s>``/``<bos>``,
    ``</s>``/``<|endoftext|>``...); without a pad token padding uses eos (or 0): padded
    positions are masked anyway. The hash is that of the file's bytes. ``vocab_size`` is the
    largest id + 1 (added tokens included), what a model's embedding and logits are indexed by:
    a vocabulary with gaps in its ids has fewer tokens than that.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        if self.path.is_dir():  # a Hugging Face model's directory holds its tokenizer.json
            if not (self.path / "tokenizer.json").is_file():
                raise TokenizerError(f"tokenizer {self.path} is a directory without a tokenizer.json")
            self.path = self.path / "tokenizer.json"
        if not self.path.is_file():
            raise TokenizerError(f"tokenizer file {self.path} does not exist")
        try:
            import tokenizers
        except ImportError:
            raise TokenizerError(
                f"tokenizer={self.path}: reading a tokenizer.json needs the 'tokenizers' package "
                "(pip install tokenizers), or use tokenizer=byte"
            ) from None
        raw = self.path.read_bytes()
        try:
            self._tok = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # the Rust side raises a plain Exception on a malformed file
            raise TokenizerError(f"{self.path} is not a valid tokenizer.json: {e}") from None
        self._hash = hashlib.sha256(raw).hexdigest()[:16]
        self.name = f"json:{self.path.name}"
        # What models index by: the largest id + 1. get_vocab_size counts the tokens, which is
        # smaller when the ids have gaps ({"a": 2, "b": 40}: 4 tokens, id 40), and an id past it
        # would reach an embedding or a cache as an index out of range.
        ids = self._tok.get_vocab(with_added_tokens=True).values()
        self.vocab_size = max(int(self._tok.get_vocab_size(with_added_tokens=True)), max(ids, default=-1) + 1)
        self.bos_id = self._special(_BOS_NAMES)
        self.eos_id = self._special(_EOS_NAMES)
        pad = self._special(_PAD_NAMES)
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    def _special(self, names: Sequence[str]) -> int | None:
        for n in names:
            i = self._tok.token_to_id(n)
            if i is not None:
                return int(i)
        return None

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        """``encode`` of each text as a uint32 array, the batch encoded in one call (the Rust side's threads)."""
        return [
            np.asarray(e.ids, dtype=np.uint32) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)
        ]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def hash(self) -> str:
        return self._hash

    @property
    def vocab_hash(self) -> str:
        """``vocab_hash`` of this tokenizer's vocabulary (which token each id is)."""
        return vocab_hash(self._tok.get_vocab(with_added_tokens=True))

    def __getstate__(self) -> dict[str, Any]:  # the Rust tokenizer is rebuilt from the file's text
        state = self.__dict__.copy()
        state["_tok"] = self._tok.to_str()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        import tokenizers

        state = dict(state)
        state["_tok"] = tokenizers.Tokenizer.from_str(state["_tok"])
        self.__dict__.update(state)


def load_tokenizer(spec: str | None) -> ByteTokenizer | JsonTokenizer:
    """``byte`` (or empty) -> ``ByteTokenizer``; a path to a ``tokenizer.json`` -> ``JsonTokenizer``."""
    if not spec or spec == "byte":
        return ByteTokenizer()
    return JsonTokenizer(spec)


class TokenBatch(NamedTuple):
    tokens: torch.Tensor  # int64 [B, S]
    loss_mask: torch.Tensor  # bool [B, S]: the token is a prediction target
    attention_mask: torch.Tensor  # bool [B, S]: the token is real (not padding)


def next_token_labels(tokens: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Labels on the logits' positions: ``labels[:, s] = tokens[:, s + 1]`` where that token is a
    target, ``IGNORE_INDEX`` elsewhere (and at the last position, which predicts nothing here)."""
    labels = torch.full_like(tokens, IGNORE_INDEX)
    labels[:, :-1] = torch.where(loss_mask[:, 1:], tokens[:, 1:], torch.full_like(tokens[:, 1:], IGNORE_INDEX))
    return labels


# -- corpora --------------------------------------------------------------------------------------
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _flag(opts: dict[str, str], key: str, default: bool, fmt: str) -> bool:
    v = opts.get(key)
    if v is None:
        return default
    if v.lower() in _TRUE:
        return True
    if v.lower() in _FALSE:
        return False
    raise _error(f"{fmt}: {key}={v!r}: expected 0 or 1")


# A JSON escape of a UTF-16 surrogate ("\\ud800"): json.loads takes a lone one, which no tokenizer can encode
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _error(msg: str) -> ValueError:
    from kd.core.data import DatasetError

    return DatasetError(msg)


class TokenSource:
    """A tokenised text corpus as a sample source (see the module docstring for URIs and layouts).

    Tokenisation runs on first use (``len``, ``get``...), so opening is cheap, and once per
    corpus: the arrays are kept in a sidecar (``_arrays``) that later processes and DataLoader
    workers memory-map.
    """

    COMMON = ("block", "tokenizer", "pack", "bos", "eos", "name", "split")
    OPTIONS = {
        "text": ("doc", "glob", "encoding"),
        "jsonl": ("text", "prompt", "completion"),
        "hf": ("text", "prompt", "completion"),
        "tokens": (),  # a pre-tokenised .npy of ids: block, tokenizer, name, split only
    }

    def __init__(self, uri: str, fmt: str, target: str, opts: dict[str, str]) -> None:
        from kd.core.data import _existing_dir, _existing_file

        if fmt not in self.OPTIONS:
            raise _error(f"{fmt}: not a token format; token formats: text, jsonl, hf (with text=), tokens")
        fixed = sorted({"pack", "bos", "eos"} & set(opts)) if fmt == "tokens" else []
        if fixed:  # the ids are the stream as stored: cut into blocks, nothing added
            raise _error(f"tokens: {', '.join(fixed)}= do not apply to pre-tokenised ids (the stream as stored, cut "
                         "into blocks of ?block= tokens)")  # fmt: skip
        unknown = set(opts) - set(self.COMMON) - set(self.OPTIONS[fmt])
        if unknown:
            valid = ", ".join(sorted({*self.COMMON, *self.OPTIONS[fmt]}))
            raise _error(f"{fmt}: unknown option(s) {sorted(unknown)}; valid: {valid}")
        self.uri, self.format, self.target, self.options = uri, fmt, target, dict(opts)
        self.pack = _flag(opts, "pack", True, fmt)
        block = opts.get("block")
        if block is None:
            self.block: int | None = 128 if self.pack else None
        else:
            if not re.fullmatch(r"[0-9]+", block) or int(block) < 2:
                raise _error(f"{fmt}: block={block!r}: expected an integer >= 2 (tokens per sample)")
            self.block = int(block)
        try:
            self.tokenizer = load_tokenizer(opts.get("tokenizer"))
        except TokenizerError as e:
            raise _error(f"{uri}: {e}") from None
        self.add_bos = _flag(opts, "bos", self.tokenizer.bos_id is not None and fmt != "tokens", fmt)
        self.add_eos = _flag(opts, "eos", self.tokenizer.eos_id is not None and fmt != "tokens", fmt)
        for key, tid in (("bos", self.tokenizer.bos_id), ("eos", self.tokenizer.eos_id)):
            if getattr(self, f"add_{key}") and tid is None:
                raise _error(f"{fmt}: {key}=1 but the tokenizer {self.tokenizer.name} has no {key} token")
        self.instruct = "prompt" in opts or "completion" in opts
        if self.instruct and not ("prompt" in opts and "completion" in opts):
            raise _error(f"{fmt}: instruction data needs both prompt= and completion= (the field names)")
        if self.instruct and "text" in opts:
            raise _error(f"{fmt}: give text= or prompt=/completion=, not both")
        if fmt == "text":
            self.doc = opts.get("doc", "file")
            if self.doc not in ("file", "line"):
                raise _error(f"text: doc={self.doc!r}: expected file or line")
            p = Path(target).expanduser()
            if p.is_dir():
                self.root = _existing_dir(fmt, target)
                pattern = opts.get("glob", "*.txt")
                self.rels = sorted(str(f.relative_to(self.root)) for f in self.root.rglob(pattern) if f.is_file())
                if not self.rels:
                    raise _error(f"text: no files matching {pattern!r} under {self.root}")
            else:
                f = _existing_file(fmt, target)
                self.root, self.rels = f.parent, [f.name]
        elif fmt in ("jsonl", "tokens"):
            f = _existing_file(fmt, target)
            self.root, self.rels = f.parent, [f.name]
        else:
            self.root = _existing_dir(fmt, target)
            self.rels = []
        self.fields = (opts["prompt"], opts["completion"]) if self.instruct else (opts.get("text", "text"),)

    # -- identity ---------------------------------------------------------------------------------
    @cached_property
    def name_split(self) -> tuple[str, str]:
        from kd.core.data import _name_split

        if self.format == "hf":
            name = re.sub(r"[^A-Za-z0-9._-]+", "-", self.options.get("name", self.root.resolve().name)) or "data"
            return name, self.options.get("split", "train")
        path = Path(self.target)
        return _name_split(path.with_suffix("") if path.is_file() else path, self.options)  # val.jsonl: split val

    def _identity(self) -> dict[str, Any]:
        from kd.core.data import file_manifest

        ident: dict[str, Any] = {
            "tokenizer": {"name": self.tokenizer.name, "hash": self.tokenizer.hash},
            "block": self.block,
            "pack": self.pack,
            "bos": self.add_bos,
            "eos": self.add_eos,
            "fields": list(self.fields),
            "instruct": self.instruct,
        }
        if self.format == "text":
            ident["doc"] = self.doc
            ident["encoding"] = self.options.get("encoding", "utf-8")
        if self.format == "hf":
            ident["fingerprint"] = str(self._hf_dataset()._fingerprint)
        else:
            ident["files"] = [(rel, size, h) for rel, size, _mtime, h in file_manifest(self.root, self.rels)]
        return ident

    @cached_property
    def dataset_id(self) -> str:
        """``name/split@hash16``: changes with any file's content, the tokenizer, block, layout or fields."""
        from kd.core.data import _digest

        name, split = self.name_split
        return f"{name}/{split}@{_digest(self.format, self._identity())[:16]}"

    def manifest(self) -> dict[str, Any]:
        """JSON-able identity for cache metadata; refuses when the files changed since opening."""
        ident = self._identity()
        from kd.core.data import _digest

        name, split = self.name_split
        if f"{name}/{split}@{_digest(self.format, ident)[:16]}" != self.dataset_id:
            raise _error(f"{self.uri} changed since it was opened (was {self.dataset_id}); open it again")
        return {
            "format": self.format,
            "uri": self.uri,
            "dataset_id": self.dataset_id,
            "num_samples": len(self),
            "num_classes": self.num_classes,
            "num_tokens": int(self._arrays[0].shape[0]),
            **ident,
        }

    # -- reading documents ------------------------------------------------------------------------
    def _hf_dataset(self) -> Any:
        if getattr(self, "_hf", None) is None:
            from kd.core.data import load_hf_split

            ds = load_hf_split(self.root, self.options.get("split", "train"))
            for f in self.fields:
                if f not in ds.column_names:
                    raise _error(f"hf: no column {f!r}; columns: {', '.join(ds.column_names)}")
            self._hf = ds
        return self._hf

    def _documents(self) -> Iterator[tuple[str, ...]]:
        """Each document as (text,) or (prompt, completion), in a fixed order (read as they are
        tokenised: a corpus's text is never all in memory at once)."""
        if self.format == "text":
            enc = self.options.get("encoding", "utf-8")
            for rel in self.rels:
                try:
                    text = (self.root / rel).read_text(encoding=enc)
                except (UnicodeDecodeError, LookupError) as e:
                    raise _error(f"text: cannot decode {self.root / rel} as {enc}: {e}") from None
                if self.doc == "file":
                    yield (text,)
                else:
                    yield from ((line,) for line in text.splitlines() if line.strip())
            return
        if self.format == "hf":
            ds = self._hf_dataset().select_columns(list(self.fields))
            cols = [ds[f] for f in self.fields]
            for i, row in enumerate(zip(*cols)):
                for f, v in zip(self.fields, row):
                    if not isinstance(v, str):
                        raise _error(f"hf: row {i} of {self.root}: column {f!r} is {type(v).__name__}, not text")
                yield tuple(row)
            return
        path = self.root / self.rels[0]
        with open(path, "rb") as fh:  # decoded line by line: a bad byte is named with its line
            for n, raw in enumerate(fh, 1):
                try:
                    # a byte-order mark (as Windows editors save UTF-8) starts the file, not its JSON
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise _error(f"jsonl: {path}:{n} is not UTF-8 text ({e.reason} at byte {e.start})") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise _error(f"jsonl: {path}:{n} is not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise _error(f"jsonl: {path}:{n} is a JSON {type(obj).__name__}, not an object")
                row = []
                for f in self.fields:
                    if f not in obj:
                        raise _error(f"jsonl: {path}:{n} has no field {f!r}; fields: {', '.join(obj)}")
                    if not isinstance(obj[f], str):
                        raise _error(f"jsonl: {path}:{n}: field {f!r} is {type(obj[f]).__name__}, not text")
                    if _SURROGATE_ESCAPE.search(raw):  # rare: only then is the text encoded to check it
                        try:
                            obj[f].encode("utf-8")
                        except UnicodeEncodeError as e:
                            bad = f"\\u{ord(obj[f][e.start]):04x}"
                            raise _error(
                                f"jsonl: {path}:{n}: field {f!r} holds {bad}, half of a UTF-16 surrogate pair "
                                "and no character (JSON escapes it, UTF-8 cannot hold it); fix the text"
                            ) from None
                    row.append(obj[f])
                yield tuple(row)

    def _stream_key(self) -> str:
        """What the token stream depends on (files or fingerprint, tokenizer, bos/eos, fields, doc,
        encoding; not the block or the layout, which only cut it): the sidecar's name."""
        from kd.core.data import _digest

        ident = self._identity()
        ident.pop("block")
        ident.pop("pack")
        return _digest("kd-tokens", TOKEN_SIDECAR_VERSION, self.format, ident)[:32]

    def _sidecar(self) -> Path:
        from kd.core.data import cache_dir

        return cache_dir() / "tokens" / self._stream_key()

    def _load_sidecar(self, where: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The arrays a previous run wrote to ``where``, memory-mapped; None when absent or not whole."""
        try:
            tokens = np.load(where / "tokens.npy", mmap_mode="r", allow_pickle=False)
            mask = np.load(where / "mask.npy", mmap_mode="r", allow_pickle=False)
            offsets = np.load(where / "offsets.npy", allow_pickle=False)
        except (OSError, ValueError):
            return None
        n = tokens.shape[0] if tokens.ndim == 1 else -1
        whole = (
            tokens.dtype == token_dtype(self.vocab_size)
            and mask.dtype == np.bool_
            and mask.shape == (n,)
            and offsets.dtype == np.int64
            and offsets.ndim == 1
            and len(offsets) >= 1
            and int(offsets[0]) == 0
            and int(offsets[-1]) == n
        )
        return (tokens, mask, offsets) if whole else None

    def _write_sidecar(self, where: Path, arrays: tuple[np.ndarray, np.ndarray, np.ndarray], stats: Any) -> bool:
        """Keep the arrays for later runs and DataLoader workers, unless a file changed while it was read
        (or too recently to tell, as git's racy index): its content hash in the name would not be theirs."""
        import os
        import time

        from kd.core.data import _RACY_NS

        try:
            if stats != self._file_stats() or any(time.time_ns() - m < _RACY_NS for _, _, m in stats):
                return False
        except OSError:  # a file gone since
            return False
        tmp = where.with_name(f"{where.name}.{os.getpid()}.tmp")
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            for name, a in zip(("tokens", "mask", "offsets"), arrays):
                np.save(tmp / f"{name}.npy", a, allow_pickle=False)
            os.rename(tmp, where)  # whole or absent; a racing writer's copy is as good
            return True
        except OSError:  # a read-only cache dir, a full disk, another process first: re-tokenised next time
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            return False

    def _file_stats(self) -> list[tuple[str, int, int]]:
        if self.format == "hf":
            return []
        out = []
        for rel in self.rels:
            st = (self.root / rel).stat()
            out.append((rel, st.st_size, st.st_mtime_ns))
        return out

    @cached_property
    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token stream in ``token_dtype(vocab)``, loss mask bool, document start offsets int64 [D + 1]).

        Tokenised once per corpus, tokenizer and options: the arrays are kept as .npy files in
        ``cache_dir()/tokens/KEY`` (KEY: ``_stream_key``, over the files' content hashes) and
        memory-mapped by every later process, DataLoader workers included."""
        if self.format == "tokens":
            return self._stored_ids()
        where = getattr(self, "_token_dir", None)
        loaded = self._load_sidecar(where) if where is not None else None
        if loaded is not None:
            return loaded
        stats = self._file_stats()
        where = self._sidecar()
        loaded = self._load_sidecar(where)
        if loaded is None:
            arrays = self._tokenise()
            if not self._write_sidecar(where, arrays, stats):
                return arrays
            loaded = self._load_sidecar(where)
            if loaded is None:
                return arrays
        self._token_dir = where
        return loaded

    def _stored_ids(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``tokens:FILE.npy``: the file's 1-D integer ids, memory-mapped (never read whole), checked
        against the vocabulary before use. The mask is a view of one True: ``_sample`` marks the
        tokenizer's bos ids as no target from the ids themselves (no mask file of 1 B a token)."""
        path = self.root / self.rels[0]
        try:
            ids = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise _error(f"tokens: {path} is not a .npy array of token ids (numpy.save): {e}") from None
        if ids.ndim != 1 or ids.dtype.kind not in "ui":
            raise _error(f"tokens: {path} holds {ids.dtype} {list(ids.shape)}; expected a 1-D integer array of "
                         "token ids (uint16 or uint32: 2 or 4 bytes a token)")  # fmt: skip
        vocab = int(self.tokenizer.vocab_size)
        for lo in range(0, len(ids), 1 << 24):  # in pieces: the check never holds the file in memory twice
            part = ids[lo : lo + (1 << 24)]
            if len(part) and (int(part.min()) < 0 or int(part.max()) >= vocab):
                at = lo + int(np.flatnonzero((part < 0) | (part >= vocab))[0])
                raise _error(
                    f"{self.uri}: token {at} of {path} is id {int(ids[at])}, outside the vocabulary of the tokenizer "
                    f"{self.tokenizer.name} ({vocab} ids, 0..{vocab - 1}); give the ?tokenizer= the ids were made with"
                )
        mask = np.broadcast_to(np.True_, ids.shape)
        return ids, mask, np.asarray([0, len(ids)], dtype=np.int64)

    def _tokenise(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every document through the tokenizer, 1024 at a time, into numpy arrays: no Python int per
        token, and per chunk one array, not one per document."""
        chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        docs = self._documents()
        while chunk := list(itertools.islice(docs, 1024)):
            chunks.append(self._encode_chunk(chunk))
        if not chunks:
            return np.empty(0, token_dtype(self.vocab_size)), np.empty(0, bool), np.zeros(1, np.int64)
        lengths = np.concatenate([c[2] for c in chunks])
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks]), offsets

    def _encode_chunk(self, chunk: list[tuple[str, ...]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, loss mask, per-document lengths) of some documents: ``[bos] text [eos]`` each, the
        mask False at bos and, for instruction data, at the prompt; empty documents dropped."""
        tok, vocab = self.tokenizer, int(self.tokenizer.vocab_size)
        bos, eos = int(self.add_bos), int(self.add_eos)
        texts = tok.encode_many([d[0] for d in chunk])
        comps = tok.encode_many([d[1] for d in chunk]) if self.instruct else [texts[0][:0]] * len(texts)
        # Ids are checked before they are narrowed to token_dtype (bytes, uint8, never reach 259).
        wide = [parts for parts in (texts, comps) if parts and np.iinfo(parts[0].dtype).max >= vocab]
        for p in (np.concatenate(parts) for parts in wide):
            if len(p) and int(p.max()) >= vocab:
                raise _error(
                    f"{self.uri}: the tokenizer {tok.name} gave token id {int(p[p >= vocab][0])}, outside its "
                    f"vocabulary of {vocab} ids (0..{vocab - 1}); a model indexes its embedding and its "
                    "logits by these ids"
                )
        # Two C calls for the whole chunk, nothing per token in Python and no index array: the ids are
        # one concatenation of [bos] text [completion] [eos] per document, the mask one np.repeat of
        # (bos: False, prompt: False, completion and text: True, eos: True) by those lengths.
        lt = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
        lc = np.fromiter((len(c) for c in comps), dtype=np.int64, count=len(comps))
        lengths = bos + eos + lt + lc
        dtype = token_dtype(vocab)
        head = [np.asarray([tok.bos_id], dtype)] if bos else []
        tail = [np.asarray([tok.eos_id], dtype)] if eos else []
        pieces: list[np.ndarray] = []
        for t, c, n in zip(texts, comps, lengths.tolist()):
            if n:  # an empty document (no text, no bos/eos) takes no place
                pieces += [*head, t, c, *tail]
        tokens = np.concatenate(pieces, dtype=dtype, casting="unsafe") if pieces else np.empty(0, dtype)
        counts = np.stack([np.full_like(lt, bos), lt, lc, np.full_like(lt, eos)], axis=1).reshape(-1)
        target = np.tile(np.asarray([False, not self.instruct, True, True]), len(lt))
        mask = np.repeat(target, counts)
        return tokens, mask, lengths[lengths > 0]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # The arrays are memory-mapped again from the sidecar (_token_dir) in the receiving process,
        # or re-tokenised there when none could be written.
        state.pop("_arrays", None)
        state.pop("_hf", None)
        return state

    # -- the SampleSource protocol -------------------------------------------------------------
    def __len__(self) -> int:
        tokens, _, offsets = self._arrays
        if self.pack:
            return int(tokens.shape[0]) // int(self.block or 1)
        return int(offsets.shape[0]) - 1

    def __repr__(self) -> str:
        return f"TokenSource({self.uri!r})"

    def _where(self) -> str:
        """The file (or folder of files) the tokens come from, for messages."""
        if self.format == "hf":
            return f"the dataset {self.root} (split {self.options.get('split', 'train')})"
        if len(self.rels) == 1:
            return str(self.root / self.rels[0])
        return f"the {len(self.rels)} files under {self.root}"

    def why_empty(self) -> str:
        """Why this source holds no sample: its token count against the block (``pack=1``), or no document."""
        tokens = int(self._arrays[0].shape[0])
        if not self.pack:
            return f"{self.uri}: no document with a token in {self._where()} (pack=0: one sample per document)"
        block = int(self.block or 1)
        fix = f"lower ?block= to at most {tokens}, or give more text" if tokens >= 2 else "give more text"
        return (
            f"{self.uri}: {tokens} tokens (bos/eos included) in {self._where()}, fewer than one block of "
            f"{block} (samples are whole blocks of ?block={block} tokens, the remainder dropped): {fix}"
        )

    @property
    def num_classes(self) -> int:
        """The vocabulary size (a token teacher's logits have this last dimension)."""
        return int(self.tokenizer.vocab_size)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)

    @property
    def class_names(self) -> list[str]:
        return []

    @property
    def augmentation(self) -> str:
        return "none"

    @cached_property
    def labels(self) -> torch.Tensor:
        """All 0: a token sample has no class; its targets are its own next tokens."""
        return torch.zeros(len(self), dtype=torch.int64)

    def _sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self)
        if not 0 <= i < n:
            raise IndexError(f"sample {i} out of range for {self.uri} ({n} samples)")
        tokens, mask, offsets = self._arrays
        if self.pack:
            b = int(self.block or 0)
            t = tokens[i * b : (i + 1) * b]
            if self.format == "tokens" and self.tokenizer.bos_id is not None:
                return t, t != self.tokenizer.bos_id  # stored ids: bos is no target, as in a text stream
            return t, mask[i * b : (i + 1) * b]
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        if self.block is not None:
            hi = min(hi, lo + self.block)
        return tokens[lo:hi], mask[lo:hi]

    def batch(self, indices: torch.Tensor | Sequence[int]) -> TokenBatch:
        """Tokens, loss mask and attention mask of ``indices``; documents right-padded to the longest."""
        idx = [int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
        rows = [self._sample(i) for i in idx]
        width = max((len(t) for t, _ in rows), default=0)
        tokens = torch.full((len(rows), width), int(self.tokenizer.pad_id), dtype=torch.int64)
        loss = torch.zeros((len(rows), width), dtype=torch.bool)
        attn = torch.zeros((len(rows), width), dtype=torch.bool)
        for r, (t, m) in enumerate(rows):
            tokens[r, : len(t)] = torch.from_numpy(np.array(t, dtype=np.int64))
            loss[r, : len(t)] = torch.from_numpy(np.array(m, dtype=bool))
            attn[r, : len(t)] = True
        return TokenBatch(tokens, loss, attn)

    def get(self, indices: torch.Tensor, views: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids int64 ``[B, S]`` (padded with the pad id in ``pack=0``; see ``masks``)."""
        if views is not None and bool((torch.as_tensor(views) != 0).any()):
            raise _error(f"{self.uri}: token sources have no views (got view ids other than 0)")
        return self.batch(indices).tokens

    def masks(self, indices: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss mask, attention mask), both bool ``[B, S]``, aligned with ``get(indices)``."""
        b = self.batch(indices)
        return b.loss_mask, b.attention_mask


def refuse_no_samples(source: Any, flag: str = "") -> None:
    """Refuse, before any work, a dataset with no sample (a token file shorter than one block),
    naming it (``flag``: the option that gave it); a cache or a training run would fail deep inside
    on an empty split ("cache dataset_size must be a positive integer")."""
    if len(source):
        return
    why = source.why_empty() if callable(getattr(source, "why_empty", None)) else f"{source!r} has no samples"
    raise _error(f"{flag} {why}" if flag else why)


def open_token_source(uri: str, fmt: str, target: str, opts: dict[str, str]) -> TokenSource:
    """What ``kd.core.data.open_source`` calls for ``text:``, ``jsonl:`` and ``hf:...?text=``."""
    return TokenSource(uri, fmt, target, opts)


# -- sparse per-position teacher targets -------------------------------------------------------
@dataclass
class TokenTargets:
    """A token teacher's output at each position, sparse: ``K << V`` ids per position.

    Two forms (the per-token losses in ``kd.student_trainer.losses.token_kd`` take both):

    * ``logits`` + ``lse`` (top-k or sampled unique ids): the teacher's logits at the
      stored ids and the row's ``logsumexp(z / temperature)`` over the whole vocabulary,
      so each stored probability and the remaining mass ``1 - sum`` are exact at that
      temperature; the losses compare the remaining mass as one "rest" bucket.
    * ``counts`` (sampled ids, Anshumann et al. 2025): unique ids drawn from the teacher
      at ``temperature`` with how often each was drawn; ``counts / N`` is an unbiased
      estimate of the teacher's distribution.

    ``ids`` are int64 ``[B, S, K]``; a slot with id ``-1`` is unused (fewer unique ids at
    that position). ``temperature`` is the one the lse / draws were taken at; the losses
    refuse another.
    """

    ids: torch.Tensor
    vocab_size: int
    logits: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.ids.dim() != 3 or self.ids.dtype != torch.int64:
            raise ValueError(f"ids must be int64 [B, S, K], got {self.ids.dtype} {list(self.ids.shape)}")
        if (self.logits is None) != (self.lse is None):
            raise ValueError("give logits and lse together")
        if self.logits is None and self.counts is None:
            raise ValueError("sparse token targets need logits + lse, or counts")
        for name in ("logits", "counts"):
            t = getattr(self, name)
            if t is not None and t.shape != self.ids.shape:
                raise ValueError(f"{name} has shape {list(t.shape)}; ids have {list(self.ids.shape)}")
        if self.lse is not None and self.lse.shape != self.ids.shape[:2]:
            raise ValueError(f"lse has shape {list(self.lse.shape)}; expected {list(self.ids.shape[:2])}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if bool(((self.ids < -1) | (self.ids >= self.vocab_size)).any()):
            raise ValueError(f"ids must lie in [0, {self.vocab_size}) (or be -1 for an unused slot)")

    def to(self, device: torch.device | str) -> TokenTargets:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return TokenTargets(
            self.ids.to(device), self.vocab_size, mv(self.logits), mv(self.lse), mv(self.counts), self.temperature
        )

    @classmethod
    def topk(cls, teacher_logits: torch.Tensor, k: int, temperature: float = 1.0) -> TokenTargets:
        """The top-``k`` form of dense teacher logits ``[B, S, V]`` (what a cache would store), in
        float32 or wider. The rest mass 1 - sum(stored p) is as exact as the stored lse: in
        float32 it carries an absolute error of ~1e-7."""
        z = teacher_logits.to(torch.promote_types(teacher_logits.dtype, torch.float32))
        vals, ids = z.topk(k, dim=-1)
        return cls(ids, z.shape[-1], vals, torch.logsumexp(z / temperature, dim=-1), None, temperature)

    @classmethod
    def sample(
        cls,
        teacher_logits: torch.Tensor,
        draws: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        with_logits: bool = False,
    ) -> TokenTargets:
        """``draws`` ids drawn with replacement from softmax(z / T) per position, merged into
        unique ids with counts (unused slots -1). ``with_logits`` also keeps their logits and
        the lse (then the losses use the exact probabilities and the rest bucket instead)."""
        z = teacher_logits.float()
        b, s, v = z.shape
        probs = torch.softmax(z / temperature, dim=-1).reshape(b * s, v)
        drawn = torch.multinomial(probs, draws, replacement=True, generator=generator)  # [B*S, N]
        ones = torch.ones(b * s, draws, device=z.device)
        counts_full = torch.zeros(b * s, v, device=z.device).scatter_add_(1, drawn, ones)
        k = min(draws, v)
        counts, ids = counts_full.topk(k, dim=1)  # the unique ids first, then zero counts
        ids = torch.where(counts > 0, ids, torch.full_like(ids, -1))
        logits = torch.where(counts > 0, z.reshape(b * s, v).gather(1, ids.clamp(min=0)), torch.zeros_like(counts))
        lse = torch.logsumexp(z / temperature, dim=-1)
        ids, counts = ids.reshape(b, s, k), counts.reshape(b, s, k)
        if not with_logits:
            return cls(ids, v, None, None, counts, temperature)
        return cls(ids, v, logits.reshape(b, s, k), lse, counts, temperature)
