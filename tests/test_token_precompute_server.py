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
pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
