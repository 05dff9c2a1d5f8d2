"""Token datasets (kd.core.tokens): tokenizers, packing and masks, identity, URIs, errors.

Every corpus is written by the test; expected token ids are spelled out by hand (the byte
tokenizer's ids are the UTF-8 bytes; pad 256, bos 257, eos 258)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from kd.core.data import DatasetError, loader, open_source
from kd.core.samples import SampleSource
from kd.core.tokens import (
    IGNORE_INDEX,
    ByteTokenizer,
    JsonTokenizer,
    TokenizerError,
    TokenSource,
    load_tokenizer,
    next_token_labels,
)

PAD, BOS, EOS = 256, 257, 258
F, T = False, True


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path / "kd-cache"))


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def b(text: str) -> list[int]:
    return list(text.encode("utf-8"))


# -- tokenizers ---------------------------------------------------------------------------------
def test_byte_tokenizer_round_trip() -> None:
    tok = ByteTokenizer()
    for text in ["", "hello", "naïve café – 東京 🙂", "tab\tnew\nline"]:
        ids = tok.encode(text)
        assert ids == b(text)
        assert tok.decode(ids) == text
        assert tok.decode([BOS, *ids, EOS, PAD, PAD]) == text  # specials are not text
    assert tok.vocab_size == 259 and (tok.pad_id, tok.bos_id, tok.eos_id) == (PAD, BOS, EOS)
    assert tok.hash == ByteTokenizer().hash and len(tok.hash) == 16
    assert isinstance(load_tokenizer("byte"), ByteTokenizer) and isinstance(load_tokenizer(None), ByteTokenizer)


def _train_tokenizer(path: Path, corpus: list[str], vocab: int = 300) -> Path:
    tokenizers = pytest.importorskip("tokenizers")  # optional: pip install tokenizers (in the dev extra)
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(corpus * 10, trainer)
    tk.save(str(path))
    return path


def test_json_tokenizer_trained_here(tmp_path: Path) -> None:
    corpus = ["the cat sat on the mat", "the dog ate the cat food"]
    path = _train_tokenizer(tmp_path / "tokenizer.json", corpus)
    tok = JsonTokenizer(path)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    for text in ["the cat sat", "über the dog, 東京"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    assert len(tok.encode("the cat sat on the mat")) < len(b("the cat sat on the mat"))  # merges learnt
    assert pickle.loads(pickle.dumps(tok)).encode("the dog") == tok.encode("the dog")
    # a source with it: the tokens are the tokenizer's, wrapped in its bos/eos
    (tmp_path / "c.txt").write_text("the cat sat")
    src = open_source(f"text:{tmp_path / 'c.txt'}?tokenizer={path}&pack=0")
    assert src.get(torch.tensor([0]))[0].tolist() == [1, *tok.encode("the cat sat"), 2]
    assert src.vocab_size == tok.vocab_size
    # another tokenizer file names other tokens: another dataset id
    other = _train_tokenizer(tmp_path / "other.json", ["completely different words here"], vocab=280)
    src2 = open_source(f"text:{tmp_path / 'c.txt'}?tokenizer={other}&pack=0")
    assert src2.dataset_id != src.dataset_id
    # ?tokenizer= a Hugging Face model's directory: its tokenizer.json (it was "does not exist")
    src3 = open_source(f"text:{tmp_path / 'c.txt'}?tokenizer={tmp_path}&pack=0")
    assert src3.dataset_id == src.dataset_id and torch.equal(
        src3.get(torch.tensor([0]))[0], src.get(torch.tensor([0]))[0]
    )
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="is a directory without a tokenizer.json"):
        JsonTokenizer(tmp_path / "empty")


class GapLM(torch.nn.Module):
    """A token teacher over ``vocab`` ids ([B, S] int64 -> [B, S, vocab]): an embedding, so an id
    past its vocabulary is an IndexError, as in any language model."""

    input_shape = (-1,)

    def __init__(self, vocab: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, vocab)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.embed(tokens)


def gap_lm(vocab: int = 41) -> GapLM:
    return GapLM(int(vocab))


def test_json_tokenizer_with_gaps_in_its_ids_counts_up_to_its_largest_id(tmp_path: Path) -> None:
    """A tokenizer.json whose ids have gaps (4 tokens, ids 0, 1, 2, 40): its vocabulary is what models
    index by, the largest id + 1 (41), not the token count (4) get_vocab_size gives, which let id 40
    through to a 4-id teacher (an IndexError traceback from kd precompute)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    from kd.cache import CacheReader
    from kd.cli import app

    tk = tokenizers.Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "a": 2, "b": 40}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tok.json"
    tk.save(str(path))
    tok = JsonTokenizer(path)
    assert tok.vocab_size == 41 and (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, None)
    (tmp_path / "c.txt").write_text("a b a b\nb b a\n")
    uri = f"text:{tmp_path / 'c.txt'}?doc=line&pack=0&tokenizer={path}"
    src = open_source(uri)
    batch = src.batch(range(len(src)))
    assert batch.tokens[0].tolist() == [2, 40, 2, 40, 1] and batch.tokens[1].tolist() == [40, 40, 2, 1, 0]
    assert src.vocab_size == src.num_classes == 41
    # kd precompute: a teacher of the token count (4 ids) is refused by name, not an IndexError ...
    from typer.testing import CliRunner

    runner = CliRunner()
    args = ["precompute", "--dataset", uri, "--codec", "fp16"]
    res = runner.invoke(app, [*args, "--source", f"local:{__name__}:gap_lm?vocab=4", "--out", str(tmp_path / "c4")])
    assert res.exit_code == 2 and not isinstance(res.exception, IndexError), res.output  # _fail: a usage error
    assert "vocabulary of 4 but the dataset's tokenizer has 41 token ids" in " ".join(res.output.split())
    # ... and one of the tokenizer's 41 ids reads every token.
    res = runner.invoke(app, [*args, "--source", f"local:{__name__}:gap_lm", "--out", str(tmp_path / "c41")])
    assert res.exit_code == 0, res.output
    reader = CacheReader(tmp_path / "c41")
    assert reader.meta.num_classes == 41 and len(reader) == 2


def test_json_tokenizer_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(TokenizerError, match="does not exist"):
        JsonTokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    pytest.importorskip("tokenizers")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        JsonTokenizer(bad)
    monkeypatch.setitem(__import__("sys").modules, "tokenizers", None)  # as if not installed
    with pytest.raises(TokenizerError, match="needs the 'tokenizers' package"):
        JsonTokenizer(bad)
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(DatasetError, match="pip install tokenizers"):
        open_source(f"text:{tmp_path / 'c.txt'}?tokenizer={bad}")


# -- instruction data: packing and masks, exact ---------------------------------------------------
@pytest.fixture()
def chat(tmp_path: Path) -> Path:
    return _jsonl(tmp_path / "chat.jsonl", [{"p": "ab", "c": "c"}, {"p": "d", "c": "efg", "extra": 1}])


def test_packed_prompt_completion_exact(chat: Path) -> None:
    src = open_source(f"jsonl:{chat}?prompt=p&completion=c&block=4")
    assert isinstance(src, TokenSource) and isinstance(src, SampleSource)
    # stream: [bos a b c eos] [bos d e f g eos] = 11 tokens -> 2 blocks of 4, 3 dropped
    # loss:   [ F  F F T  T ] [ F  F T T T  T ]
    assert len(src) == 2
    batch = src.batch(torch.tensor([0, 1]))
    assert batch.tokens.tolist() == [[BOS, 97, 98, 99], [EOS, BOS, 100, 101]]
    assert batch.loss_mask.tolist() == [[F, F, F, T], [T, F, F, T]]
    assert batch.attention_mask.all()  # packing does not mask across documents
    assert src.get(torch.tensor([1])).tolist() == [[EOS, BOS, 100, 101]]
    assert src.get(torch.tensor([1])).dtype == torch.int64
    loss, attn = src.masks([1, 0])
    assert loss.tolist() == [[T, F, F, T], [F, F, F, T]] and attn.all()
    # the logits at position s predict token s + 1: labels on the logits' positions
    labels = next_token_labels(batch.tokens, batch.loss_mask)
    X = IGNORE_INDEX
    assert labels.tolist() == [[X, X, 99, X], [X, X, 101, X]]
    assert src.labels.tolist() == [0, 0] and src.num_classes == 259 and src.augmentation == "none"


def test_documents_padded_per_batch(chat: Path) -> None:
    src = open_source(f"jsonl:{chat}?prompt=p&completion=c&pack=0")
    assert len(src) == 2
    batch = src.batch([0, 1])
    assert batch.tokens.tolist() == [[BOS, 97, 98, 99, EOS, PAD], [BOS, 100, 101, 102, 103, EOS]]
    assert batch.loss_mask.tolist() == [[F, F, F, T, T, F], [F, F, T, T, T, T]]
    assert batch.attention_mask.tolist() == [[T, T, T, T, T, F], [T, T, T, T, T, T]]
    assert src.get(torch.tensor([0])).tolist() == [[BOS, 97, 98, 99, EOS]]  # padded to its own batch only
    X = IGNORE_INDEX
    assert next_token_labels(batch.tokens, batch.loss_mask).tolist() == [
        [X, X, 99, EOS, X, X],
        [X, 101, 102, 103, EOS, X],
    ]
    # block truncates a document; bos=0 / eos=0 leave the markers out
    short = open_source(f"jsonl:{chat}?prompt=p&completion=c&pack=0&block=3&bos=0")
    assert short.batch([1]).tokens.tolist() == [[100, 101, 102]]
    assert short.batch([1]).loss_mask.tolist() == [[F, T, T]]
    bare = open_source(f"jsonl:{chat}?prompt=p&completion=c&pack=0&bos=0&eos=0")
    assert bare.batch([0]).tokens.tolist() == [[97, 98, 99]]


def test_text_files_and_lines(tmp_path: Path) -> None:
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "b.txt").write_text("xyz")
    (d / "a.txt").write_text("hi\n\nyo")
    (d / "skip.md").write_text("not matched")
    src = open_source(f"text:{d}?pack=0")
    assert len(src) == 2  # sorted by path: a.txt, b.txt; one document per file
    assert src.batch([0]).tokens.tolist() == [[BOS, *b("hi\n\nyo"), EOS]]
    assert src.batch([1]).loss_mask.tolist() == [[F, T, T, T, T]]
    lines = open_source(f"text:{d / 'a.txt'}?doc=line&pack=0")
    assert lines.batch([0, 1]).tokens.tolist() == [[BOS, *b("hi"), EOS], [BOS, *b("yo"), EOS]]
    packed = open_source(f"text:{d}?block=5")
    stream = [BOS, *b("hi\n\nyo"), EOS, BOS, *b("xyz"), EOS]
    assert len(packed) == len(stream) // 5 == 2
    assert packed.get(torch.tensor([0, 1])).tolist() == [stream[0:5], stream[5:10]]
    # the generic loader stacks fixed-length blocks
    batches = list(loader(packed, torch.arange(2), 2))
    assert batches[0].inputs.tolist() == [stream[0:5], stream[5:10]]


def test_jsonl_text_field_and_hf(tmp_path: Path) -> None:
    rows = [{"body": "one"}, {"body": "two two"}]
    src = open_source(f"jsonl:{_jsonl(tmp_path / 'w.jsonl', rows)}?text=body&pack=0")
    assert src.batch([1]).tokens.tolist() == [[BOS, *b("two two"), EOS]]
    assert src.batch([1]).loss_mask[0].tolist() == [F] + [T] * 8
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"content": ["one", "two two"], "n": [1, 2]}).save_to_disk(str(tmp_path / "hfd"))
    hf = open_source(f"hf:{tmp_path / 'hfd'}?text=content&pack=0")
    assert isinstance(hf, TokenSource)
    assert hf.batch([0, 1]).tokens.tolist() == src.batch([0, 1]).tokens.tolist()
    assert hf.dataset_id.startswith("hfd/train@")
    with pytest.raises(DatasetError, match="no column 'nope'"):
        len(open_source(f"hf:{tmp_path / 'hfd'}?text=nope"))


# -- identity -------------------------------------------------------------------------------------
def test_dataset_id_follows_content_tokenizer_and_layout(tmp_path: Path) -> None:
    f = tmp_path / "t.txt"
    f.write_text("abcdef")
    uri = f"text:{f}?block=4"
    first = open_source(uri).dataset_id
    assert first.startswith("t/train@") and open_source(uri).dataset_id == first
    f.write_text("abcdeg")  # same size, other content
    changed = open_source(uri).dataset_id
    assert changed != first
    f.write_text("abcdef")
    assert open_source(uri).dataset_id == first
    assert open_source(f"text:{f}?block=5").dataset_id != first
    assert open_source(f"text:{f}?block=4&pack=0").dataset_id != first
    assert open_source(f"text:{f}?block=4&eos=0").dataset_id != first
    src = open_source(uri)
    man = src.manifest()
    assert man["dataset_id"] == first and man["num_tokens"] == 8 and man["tokenizer"]["name"] == "byte"
    val = tmp_path / "val.jsonl"  # a file named after a split names the split
    _jsonl(val, [{"text": "x"}])
    assert open_source(f"jsonl:{val}").dataset_id.startswith(f"{tmp_path.name}/val@")
    f.write_text("changed!")
    with pytest.raises(DatasetError, match="changed since it was opened"):
        src.manifest()


def test_pickle_round_trip(chat: Path) -> None:
    src = open_source(f"jsonl:{chat}?prompt=p&completion=c&block=4")
    before = src.batch([0, 1])
    clone = pickle.loads(pickle.dumps(src))
    after = clone.batch([0, 1])
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert clone.dataset_id == src.dataset_id


# -- errors ---------------------------------------------------------------------------------------
def test_jsonl_not_utf8_is_named_by_line_and_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    lines = ['{"text": "one"}\n', '{"text": "two"}\n'] * 3000  # far past one read buffer: the line is still exact
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes("".join(lines).encode() + '{"text": "caf\u00e9"}\n'.encode("latin-1") + b'{"text": "x"}\n')
    with pytest.raises(DatasetError) as e:  # was UnicodeDecodeError's words alone: no file, no line
        len(open_source(f"jsonl:{latin}?pack=0"))
    assert str(e.value) == f"jsonl: {latin}:6001 is not UTF-8 text (invalid continuation byte at byte 13)"
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + "".join(lines[:2]).encode())  # UTF-8 as Windows editors save it
    src = open_source(f"jsonl:{bom}?pack=0")  # was: "bom.jsonl:1 is not valid JSON (Unexpected UTF-8 BOM ...)"
    assert src.batch([0, 1]).tokens.tolist() == [[BOS, *b("one"), EOS], [BOS, *b("two"), EOS]]


def test_bad_input_is_named(tmp_path: Path, chat: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl:2 is not valid JSON"):
        len(open_source(f"jsonl:{bad}"))
    with pytest.raises(DatasetError, match=r"chat.jsonl:1 has no field 'text'"):
        len(open_source(f"jsonl:{chat}"))
    nums = _jsonl(tmp_path / "n.jsonl", [{"text": 5}])
    with pytest.raises(DatasetError, match="field 'text' is int, not text"):
        len(open_source(f"jsonl:{nums}"))
    with pytest.raises(DatasetError, match=r"unknown option\(s\) \['size'\]"):
        open_source(f"jsonl:{chat}?size=3")
    with pytest.raises(DatasetError, match="needs both prompt= and completion="):
        open_source(f"jsonl:{chat}?prompt=p")
    with pytest.raises(DatasetError, match="block='1'"):
        open_source(f"jsonl:{chat}?prompt=p&completion=c&block=1")
    with pytest.raises(DatasetError, match="pack='maybe'"):
        open_source(f"jsonl:{chat}?pack=maybe")
    with pytest.raises(DatasetError, match="does not exist"):
        open_source(f"text:{tmp_path / 'nowhere.txt'}")
    with pytest.raises(DatasetError, match="no files matching"):
        open_source(f"text:{tmp_path}?glob=*.none")
    src = open_source(f"jsonl:{chat}?prompt=p&completion=c&block=4")
    with pytest.raises(DatasetError, match="no views"):
        src.get(torch.tensor([0]), torch.tensor([1]))
    with pytest.raises(IndexError, match="out of range"):
        src.get(torch.tensor([2]))
    with pytest.raises(DatasetError, match="known formats: .*text, jsonl"):
        open_source("txt:whatever")
