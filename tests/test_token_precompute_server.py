"""Token precompute through a server asks only for what the cache keeps (top-k + lse, sampled ids
with counts drawn next to the model, fp16 logits for an fp16 cache) and writes the same records
as the in-process teacher does; a real server on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kd.cache import CacheReader
from kd.cache.codecs import get_codec
from kd.core.data import open_source
from kd.precompute import LocalTokenTeacher, ServerTokenTeacher, TokenAsk, precompute_tokens, sample_rows, token_ask

VOCAB = 259


class BigramLM(nn.Module):
    """Causal: position s sees tokens s and s - 1 ([B, S] int64 -> [B, S, V])."""

    input_shape = (-1,)

    def __init__(self, dim: int = 12) -> None:
        super().__init__()
        self.max_length = 64
        self.embed = nn.Embedding(VOCAB, dim)
        self.prev = nn.Embedding(VOCAB, dim)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        prev = nn.functional.pad(self.prev(tokens)[:, :-1], (0, 0, 1, 0))
        return self.head(torch.tanh(self.embed(tokens) + prev)) * 3.0


def bigram_lm() -> BigramLM:
    torch.manual_seed(11)
    return BigramLM()


SPEC = f"{__name__}:bigram_lm"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    lines = [f"doc {i}: " + "the quick brown fox"[: 3 + (5 * i) % 17] for i in range(9)]
    (d / "c.txt").write_text("\n".join(lines) + "\n")
    return open_source(f"text:{d / 'c.txt'}?doc=line&pack=0&block=32")  # documents of different lengths


def test_asks_follow_the_codec() -> None:
    assert token_ask(get_codec("topk:8", 2.0)) == TokenAsk("topk", k=8, temperature=2.0)
    assert token_ask(get_codec("sample:16x3")) == TokenAsk("sample", k=16, rounds=3)
    assert token_ask(get_codec("fp16")).dtype == torch.float16 and token_ask(get_codec("fp16")).kind == "logits"
    assert token_ask(get_codec("rand:16")) == TokenAsk("logits")  # key-derived ids: full logits
    assert token_ask(get_codec("q8")) == TokenAsk("logits")


def test_sample_rows_match_the_codec_layout() -> None:
    codec = get_codec("sample:6x2")
    ids = [torch.tensor([[7, 3, -1], [300 - 42, -1, -1]]), torch.tensor([[1, 2, 5], [9, 8, -1]])]
    counts = [torch.tensor([[4, 2, 0], [6, 0, 0]]), torch.tensor([[3, 2, 1], [5, 1, 0]])]
    rows = sample_rows(codec, ids, counts, VOCAB)
    assert rows.shape == (2, codec.record_bytes(VOCAB))
    got_ids, got_counts = codec.decode_rounds(rows, VOCAB)
    assert got_ids[0, 0].tolist() == [3, 7, 0, 0, 0, 0] and got_counts[0, 0].tolist() == [2, 4, 0, 0, 0, 0]
    assert got_ids[1, 1].tolist() == [8, 9, 0, 0, 0, 0] and got_counts[1, 1].tolist() == [1, 5, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="sum to 6"):
        sample_rows(codec, [ids[0]], [counts[0] * 2], VOCAB)


def test_served_records_equal_the_in_process_records(tmp_path: Path, source) -> None:
    from kd.teacher_server.loading import load_teacher
    from kd.teacher_server.server import TeacherOptions, start_server

    codecs = ("topk:8", "sample:12x2", "fp16", "rand:16")
    served = load_teacher("lm", SPEC)
    running = start_server([served], batching=TeacherOptions(max_batch_tokens=256, max_batch_size=8, warmup=False))
    try:
        address = f"127.0.0.1:{running.port}"
        remote = ServerTokenTeacher(address, "lm")
        sent: dict[str, float] = {}  # reply bytes per cached position, by the server's own counter
        try:
            for codec in codecs:
                before = running.metrics.reply_bytes("lm")
                precompute_tokens(source, remote, tmp_path / f"srv-{codec}", codec=codec, batch_size=4,
                                  temperature=2.0 if codec == "topk:8" else None)  # fmt: skip
                positions = CacheReader(tmp_path / f"srv-{codec}").token_stats()["positions"]
                sent[codec] = (running.metrics.reply_bytes("lm") - before) / positions
        finally:
            remote.close()
    finally:
        running.stop(grace=1)
    assert sent["topk:8"] == 8 * 4 + 8 * 4 + 4  # fp32 values, int32 ids, lse: not the 1036 B of fp32 logits
    assert sent["sample:12x2"] <= 2 * (12 * (4 + 4 + 4) + 4)  # per round: ids, counts, values, lse
    assert sent["fp16"] == 2 * VOCAB and sent["rand:16"] == 4 * VOCAB  # fp16 logits; fp32 for key-derived ids
    local = LocalTokenTeacher.from_spec(SPEC, name="lm")
    for codec in codecs:
        path = tmp_path / f"loc-{codec}"
        t = 2.0 if codec == "topk:8" else None
        precompute_tokens(source, local, path, codec=codec, batch_size=3, temperature=t)
        a, b = CacheReader(tmp_path / f"srv-{codec}"), CacheReader(path)
        assert a.meta.teacher_fingerprint == b.meta.teacher_fingerprint  # from_spec: the served fingerprint
        assert a.verify().ok and b.verify().ok
        ra, rb = a.read_sequences(range(len(source))), b.read_sequences(range(len(source)))
        assert [len(r) for r in ra] == [int(n) for n in source.batch(range(len(source))).attention_mask.sum(1)]
        for x, y in zip(ra, rb):
            assert np.array_equal(x, y), codec  # byte-identical records
    # The sampled records hold R rounds of 12 draws at T = 1 from the teacher (not one draw reused).
    t = CacheReader(tmp_path / "srv-sample:12x2")
    ids, counts = get_codec("sample:12x2").decode_rounds(np.concatenate(t.read_sequences([0])), VOCAB)
    assert bool((counts.sum(-1) == 12).all()) and not torch.equal(ids[:, 0], ids[:, 1])


def _records(path: Path, n: int) -> list[np.ndarray]:
    r = CacheReader(path)
    assert r.verify().ok and len(r) == n
    return r.read_sequences(range(n))


def test_a_batch_is_asked_in_requests_whose_answers_fit_the_servers_limit(tmp_path: Path, source) -> None:
    """A server with a 64 KiB message limit cannot send the fp16 logits of a whole batch (164
    positions x 518 B): the batch is asked in several requests, and the records equal those
    of one request per batch (a server with the default limit) and of the in-process teacher."""
    from kd.teacher_server.loading import load_teacher
    from kd.teacher_server.server import TeacherOptions, start_server

    n = len(source)
    positions = int(source.batch(range(n)).attention_mask.sum())
    assert positions * 2 * VOCAB > 64 << 10  # the whole batch's answer does not fit the small limit
    served = load_teacher("lm", SPEC)
    for name, limit in (("whole", None), ("split", 64 << 10)):
        running = start_server([served], batching=TeacherOptions(max_batch_tokens=512, warmup=False),
                               **({} if limit is None else {"max_message_bytes": limit}))  # fmt: skip
        try:
            for codec in ("fp16", "topk:8"):
                remote = ServerTokenTeacher(f"127.0.0.1:{running.port}", "lm")
                try:
                    precompute_tokens(source, remote, tmp_path / f"{name}-{codec}", codec=codec, batch_size=256)
                    if limit is not None and codec == "fp16":
                        assert remote.answer_limit < limit  # learned from the server's refusal
                finally:
                    remote.close()
        finally:
            running.stop(grace=1)
    for codec in ("fp16", "topk:8"):
        precompute_tokens(source, LocalTokenTeacher.from_spec(SPEC, name="lm"), tmp_path / f"loc-{codec}",
                          codec=codec, batch_size=256)  # fmt: skip
        whole, split, local = (_records(tmp_path / f"{k}-{codec}", n) for k in ("whole", "split", "loc"))
        for a, b, c in zip(whole, split, local):
            assert np.array_equal(a, b) and np.array_equal(a, c), codec


def big_bigram(vocab: int = 70_000) -> BigramLM:
    """A causal bigram of a realistic vocabulary (70,000 ids; under a million weights: fast)."""
    torch.manual_seed(5)
    model = BigramLM(4)
    model.embed, model.prev = nn.Embedding(vocab, 4), nn.Embedding(vocab, 4)
    model.head = nn.Linear(4, vocab)
    return model


def test_precompute_default_batch_of_a_large_vocabulary_through_a_server(tmp_path: Path) -> None:
    """kd precompute's default --batch-size (256) at 70,000 ids: 48 blocks of 8 positions ask
    for 51 MiB of fp16 logits, over a 2 MiB server limit (as 4 GiB is over the default 256 MiB
    at block 128): it is asked in requests that fit, and the records equal the in-process ones."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from typer.testing import CliRunner

    from kd.cli import app
    from kd.teacher_server.loading import load_teacher
    from kd.teacher_server.server import TeacherOptions, start_server

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(70_000 - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    rng = np.random.default_rng(0)
    (tmp_path / "a.txt").write_text(" ".join(f"w{i}" for i in rng.integers(0, 69_990, 48 * 8)))
    uri = f"text:{tmp_path / 'a.txt'}?block=8&tokenizer={tmp_path / 'tokenizer.json'}"
    data = open_source(uri)
    assert data.vocab_size == 70_000 and len(data) >= 40
    spec = f"{__name__}:big_bigram"
    running = start_server([load_teacher("lm", spec)], batching=TeacherOptions(max_batch_tokens=512, warmup=False),
                           max_message_bytes=2 << 20)  # fmt: skip
    try:
        res = CliRunner().invoke(app, ["precompute", "--source", f"server:127.0.0.1:{running.port}/lm", "--dataset",
                                       uri, "--codec", "fp16", "--out", str(tmp_path / "srv")])  # fmt: skip
        assert res.exit_code == 0, res.output
    finally:
        running.stop(grace=1)
    precompute_tokens(data, LocalTokenTeacher.from_spec(spec, name="lm"), tmp_path / "loc", codec="fp16",
                      batch_size=256)  # fmt: skip
    for a, b in zip(_records(tmp_path / "srv", len(data)), _records(tmp_path / "loc", len(data))):
        assert np.array_equal(a, b)
