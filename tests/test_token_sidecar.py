"""Token corpora tokenised into numpy arrays (2 bytes a token for vocabularies up to 65536) and kept
in a memory-mapped sidecar (``KD_CACHE_DIR/tokens/KEY``) that later opens and DataLoader workers
reuse, keyed by the files' content and the tokenizer. The ids and masks are checked against a
reference written here in plain Python (byte ids: the UTF-8 bytes; a tokenizer.json: the
``tokenizers`` package's own encode, one document at a time)."""

from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest

from kd.core.data import open_source

PAD, BOS, EOS = 256, 257, 258


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path / "kd-cache"))
    return tmp_path / "kd-cache"


def _age(*paths: Path) -> None:
    """Written a minute ago: old enough to be trusted (a file modified within 2 s is not cached)."""
    past = time.time_ns() - 60 * 10**9
    for p in paths:
        os.utime(p, ns=(past, past))


def _reference(docs: list[tuple[list[int], list[int]]], bos: bool, eos: bool) -> tuple[list[int], list[bool], list]:
    """The stream, mask and document offsets from (prompt ids, target ids) per document, in plain Python."""
    ids: list[int] = []
    mask: list[bool] = []
    offsets = [0]
    for prompt, target in docs:
        d_ids = ([BOS] if bos else []) + prompt + target + ([EOS] if eos else [])
        d_mask = ([False] if bos else []) + [False] * len(prompt) + [True] * len(target) + ([True] if eos else [])
        if d_ids:
            ids += d_ids
            mask += d_mask
            offsets.append(len(ids))
    return ids, mask, offsets


def _check(src, ids: list[int], mask: list[bool], offsets: list[int]) -> None:
    tokens, m, off = src._arrays
    assert tokens.dtype == np.uint16 and tokens.nbytes == 2 * len(ids)  # not int64's 8 bytes a token
    assert tokens.tolist() == ids and m.tolist() == mask and off.tolist() == offsets
    # and the samples read from them, as a model gets them
    b = src.batch(range(len(src)))
    if src.pack:
        blk = src.block
        want = np.asarray(ids[: len(src) * blk]).reshape(-1, blk)
        assert b.tokens.numpy().tolist() == want.tolist()
        assert b.loss_mask.numpy().tolist() == np.asarray(mask[: len(src) * blk]).reshape(-1, blk).tolist()


def test_byte_ids_and_masks_match_a_plain_python_reference(tmp_path: Path) -> None:
    d = tmp_path / "docs"
    d.mkdir()
    texts = {"a.txt": "naïve café – 東京 🙂\nsecond line\n", "b.txt": "", "c.txt": "crlf\r\nline two\r\n\r\n  \n"}
    for name, text in texts.items():
        (d / name).write_bytes(text.encode("utf-8"))
    read = {n: (d / n).read_text(encoding="utf-8") for n in sorted(texts)}  # universal newlines, as kd reads
    # One document per file; the empty file is [bos, eos] (kept), or nothing without them (dropped).
    for opts, bos, eos in (("", True, True), ("&bos=0&eos=0", False, False), ("&bos=0", False, True)):
        src = open_source(f"text:{d}?block=4{opts}")
        _check(src, *_reference([([], list(t.encode())) for t in read.values()], bos, eos))
    # One document per non-empty line, more than one chunk of 1024 documents.
    lines = [f"line {i} {'é' * (i % 7)}" for i in range(2600)]
    (tmp_path / "lines.txt").write_text("\n".join(lines[:1300]) + "\n\n   \n" + "\n".join(lines[1300:]))
    src = open_source(f"text:{tmp_path / 'lines.txt'}?doc=line&pack=0&block=9")
    _check(src, *_reference([([], list(t.encode())) for t in lines], True, True))
    assert len(src) == 2600 and src.batch([5]).tokens[0].tolist() == [BOS, *list(lines[5].encode())[:8]]
    # Instruction data: the prompt is no target, the completion and its eos are.
    rows = [{"q": f"q{i} ¿", "a": "" if i % 5 == 0 else f"answer {i}"} for i in range(1100)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = open_source(f"jsonl:{tmp_path / 'chat.jsonl'}?prompt=q&completion=a&pack=0")
    _check(src, *_reference([(list(r["q"].encode()), list(r["a"].encode())) for r in rows], True, True))


def test_tokenizer_json_ids_match_the_tokenizers_package(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")  # optional: pip install tokenizers (in the dev extra)
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(["the cat sat on the mat", "the dog ate the cat food"] * 10, trainer)
    tk.save(str(tmp_path / "tok.json"))
    ref = tokenizers.Tokenizer.from_file(str(tmp_path / "tok.json"))
    lines = [f"the cat {i} sat on the {'dog ' * (i % 4)}mat über" for i in range(1500)]
    (tmp_path / "c.txt").write_text("\n".join(lines))
    src = open_source(f"text:{tmp_path / 'c.txt'}?doc=line&tokenizer={tmp_path / 'tok.json'}&block=16")
    docs = [([], list(ref.encode(t, add_special_tokens=False).ids)) for t in lines]
    ids, mask, offsets = _reference(docs, True, True)
    ids = [1 if i == BOS else 2 if i == EOS else i for i in ids]  # this tokenizer's <s> and </s>
    _check(src, ids, mask, offsets)


def test_the_arrays_are_kept_reused_and_invalidated_with_the_files(tmp_path: Path, _cache_dir: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world, " * 50)
    uri = f"text:{corpus}?block=8"
    # A file written within 2 s may still be changing: tokenised, not kept.
    assert len(open_source(uri)) == 81 and not (_cache_dir / "tokens").exists()
    _age(corpus)
    first = open_source(uri)
    want = first._arrays[0].tolist()
    kept = sorted((_cache_dir / "tokens").iterdir())
    assert len(kept) == 1 and sorted(p.name for p in kept[0].iterdir()) == ["mask.npy", "offsets.npy", "tokens.npy"]
    assert isinstance(first._arrays[0], np.memmap) and Path(first._arrays[0].filename) == kept[0] / "tokens.npy"
    # Another block cuts the same stream: the same sidecar. A later open reads it, not the text: what
    # the sidecar says is what it gets (shown by editing the sidecar).
    tokens = np.load(kept[0] / "tokens.npy")
    tokens[:5] = [72, 73, 74, 75, 76]
    np.save(kept[0] / "tokens.npy", tokens)
    again = open_source(f"text:{corpus}?block=16")
    assert again._arrays[0][:6].tolist() == [72, 73, 74, 75, 76, want[5]] and len(again) == 40
    # A DataLoader worker (the source pickled) maps the same file instead of tokenising again.
    worker = pickle.loads(pickle.dumps(again))
    assert "_arrays" not in worker.__dict__ and worker._arrays[0][:5].tolist() == [72, 73, 74, 75, 76]
    assert Path(worker._arrays[0].filename) == kept[0] / "tokens.npy"
    # A sidecar cut short is not used: the text is tokenised again.
    np.save(kept[0] / "tokens.npy", tokens[:-3])
    assert open_source(uri)._arrays[0].tolist() == want
    # Other content (same size): another key, its own tokens.
    corpus.write_text("HELLO world, " * 50)
    _age(corpus)
    changed = open_source(uri)._arrays[0].tolist()
    assert changed[:6] == [BOS, *b"HELLO"] and len(list((_cache_dir / "tokens").iterdir())) == 2
    # Another tokenizer option (no bos): another stream, another sidecar.
    assert open_source(f"{uri}&bos=0")._arrays[0][:5].tolist() == list(b"HELLO")
    assert len(list((_cache_dir / "tokens").iterdir())) == 3
