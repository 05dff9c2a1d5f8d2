"""Token (language-model) teachers served per position: a tiny Hugging Face GPT-2 built from
a config and saved as safetensors, and a plain torch token module, on real gRPC servers.

Every served number is checked against the model run in-process on each *unpadded*
sequence alone, so padding, batching and the packing of positions cannot hide a bug.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import NamedTuple

import grpc
import pytest
import torch
from torch import nn

from kd.core.signature import VARIABLE
from kd.teacher_server.client import DatasetRef, TeacherClient, TeacherRequestError
from kd.teacher_server.lm import TokenBatcher, TokenRunner, group_rows, prepare
from kd.teacher_server.loading import load_teacher
from kd.teacher_server.server import TeacherOptions, start_server
from kd.v1 import teacher_pb2 as pb

try:  # in the dev extras (and the lm extra); the plain-module tests below run without it
    import transformers
except ImportError:  # pragma: no cover - a bare install
    transformers = None

VOCAB, N_POS, BUDGET = 300, 64, 48
LAYER = "transformer.h.0"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    if transformers is None:
        pytest.skip("transformers is not installed (pip install transformers); the plain token module tests still run")
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=N_POS, n_embd=32, n_layer=2, n_head=2,
                                  bos_token_id=0, eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    d = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(str(d), safe_serialization=True)
    (d / "vocab.json").write_text('{"a": 0, "b": 1}')
    return d


class Backend(NamedTuple):
    """The served teacher and an independent in-process copy: logits [S, V] and the hidden
    states [S, D] of ``layer`` for one unpadded sequence."""

    teacher: object
    layer: str
    logits: Callable[[torch.Tensor], torch.Tensor]
    hidden: Callable[[torch.Tensor], torch.Tensor]


@pytest.fixture(scope="module")
def lm(request):
    """The tiny GPT-2 (Hugging Face) or, where transformers is absent, a plain torch token module."""
    if transformers is None:
        ref = tiny_token_lm(VOCAB, N_POS).eval()
        teacher = load_teacher("gpt", f"{__name__}:tiny_token_lm?vocab={VOCAB}&max_length={N_POS}&input_shape=-1")
        return Backend(teacher, "rnn", lambda s: ref(s[None])[0], lambda s: ref.rnn(ref.embed(s[None]))[0][0])
    d = request.getfixturevalue("hf_dir")
    ref = transformers.GPT2LMHeadModel.from_pretrained(str(d), dtype=torch.float32).eval()
    return Backend(
        load_teacher("gpt", f"hf:{d}"),
        LAYER,
        lambda s: ref(s[None]).logits[0],
        lambda s: ref(s[None], output_hidden_states=True).hidden_states[1][0],  # after block 0
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A token dataset (byte tokenizer: ids < 259 < VOCAB), one document per line."""
    from kd.core.data import open_source

    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("hello there\nkd serves teachers\nab\nanother line of text here\n")
    return open_source(f"text:{path}?doc=line&pack=0")


@pytest.fixture(scope="module")
def served(lm, corpus):
    running = start_server([lm.teacher], batching=TeacherOptions(max_batch_tokens=BUDGET, max_batch_size=8,
                                                                 max_queue_delay_us=1000), metrics_port=0,
                           datasets={"docs": corpus})  # fmt: skip
    client = TeacherClient(f"127.0.0.1:{running.port}", timeout=60)
    yield running, client
    client.close()
    running.stop(grace=1)


def _seqs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]


def _padded(seqs):
    ids = torch.zeros((len(seqs), max(len(s) for s in seqs)), dtype=torch.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    return ids, [len(s) for s in seqs]


def _ref_logits(lm, seq):
    with torch.no_grad():
        return lm.logits(seq)


def test_signature_tokenizer_hash_and_fingerprint(hf_dir, served, tmp_path):
    _, client = served
    d = client.describe("gpt")
    sig = d.signature
    assert [(s.name, s.dtype, s.shape) for s in sig.inputs] == [("tokens", torch.int64, (VARIABLE,))]
    assert [(s.name, s.shape) for s in sig.outputs] == [("logits", (VARIABLE, VOCAB))]
    assert sig.extra["vocab_size"] == str(VOCAB) and sig.extra["max_length"] == str(N_POS)
    assert sig.extra["task"] == "causal-lm" and len(sig.extra["tokenizer"]) == 16
    assert d.layers[LAYER] == (VARIABLE, 32)
    assert d.target_options["tokenizer"] == sig.extra["tokenizer"]
    # The same weights behind another tokenizer file: same weights fingerprint, other targets.
    other = tmp_path / "other"
    shutil.copytree(hf_dir, other)
    (other / "vocab.json").write_text('{"a": 1, "b": 0}')
    t2 = load_teacher("gpt2", f"hf:{other}")
    assert t2.weights_fingerprint == d.weights_fingerprint
    assert t2.signature.extra["tokenizer"] != sig.extra["tokenizer"]
    assert t2.fingerprint != d.fingerprint
    (other / "vocab.json").unlink()
    t3 = load_teacher("gpt3", f"hf:{other}")
    assert "tokenizer" not in t3.signature.extra and t3.fingerprint not in (d.fingerprint, t2.fingerprint)


def test_logits_at_asked_positions_match_unpadded_forwards(served, lm):
    _, client = served
    seqs = _seqs([5, 17, 3, 11])
    ids, lens = _padded(seqs)
    g = torch.Generator().manual_seed(1)
    positions = (torch.rand(ids.shape, generator=g) < 0.5) & (torch.arange(ids.shape[1]) < torch.tensor(lens)[:, None])
    positions[2, :] = False
    positions[2, 1] = True  # every row asks for at least one position
    out = client.infer_tokens("gpt", ids, lengths=lens, positions=positions, logits=True)
    assert out["logits"].shape == (int(positions.sum()), VOCAB)
    dense = out.dense("logits")
    for i, s in enumerate(seqs):
        ref = _ref_logits(lm, s)
        ask = positions[i, : len(s)]
        torch.testing.assert_close(dense[i, : len(s)][ask], ref[ask], rtol=0, atol=2e-5)
        assert bool((dense[i][~positions[i]] == 0).all())
    # int32 ids, fp16 logits, an attention mask instead of lengths: the same numbers.
    mask = torch.arange(ids.shape[1])[None] < torch.tensor(lens)[:, None]
    half = client.infer_tokens("gpt", ids.to(torch.int32), attention_mask=mask, positions=positions, logits=True,
                               dtype=torch.float16)  # fmt: skip
    assert half["logits"].dtype == torch.float16
    torch.testing.assert_close(half["logits"].float(), out["logits"], rtol=1e-3, atol=2e-3)
    assert not torch.equal(half["logits"].float(), out["logits"])


def test_topk_lse_and_probabilities(served, lm):
    _, client = served
    seqs = _seqs([9, 4], seed=2)
    out = client.infer_tokens("gpt", seqs, top_k=5, sparse_temperature=2.0, temperature=0.5)
    targets = out.topk_targets()
    assert targets.temperature == 2.0 and targets.ids.shape == (2, 9, 5)
    for i, s in enumerate(seqs):
        z = _ref_logits(lm, s).double()
        vals, ids = z.topk(5, dim=-1)
        n = len(s)
        assert torch.equal(targets.ids[i, :n], ids)
        torch.testing.assert_close(targets.logits[i, :n].double(), vals, rtol=0, atol=2e-5)
        torch.testing.assert_close(targets.lse[i, :n].double(), torch.logsumexp(z / 2.0, -1), rtol=0, atol=2e-5)
        torch.testing.assert_close(out.dense("probs")[i, :n].double(), torch.softmax(z / 0.5, -1), rtol=0, atol=1e-6)
        assert bool((targets.ids[i, n:] == -1).all())


def test_sampled_ids_with_counts(served, lm):
    _, client = served
    seqs = _seqs([6, 10], seed=3)
    a = client.token_samples("gpt", seqs, 64, seed=7)
    b = client.token_samples("gpt", seqs, 64, seed=7)
    c = client.token_samples("gpt", seqs, 64, seed=8)
    assert a.temperature == 1.0 and a.vocab_size == VOCAB
    assert torch.equal(a.ids, b.ids) and torch.equal(a.counts, b.counts)  # deterministic for a seed
    assert not torch.equal(a.ids, c.ids)
    real = torch.arange(10)[None] < torch.tensor([6, 10])[:, None]
    assert bool((a.counts.sum(-1)[real] == 64).all()) and bool((a.counts.sum(-1)[~real] == 0).all())
    used = a.ids >= 0
    assert bool((a.ids[used] < VOCAB).all()) and bool(((a.counts > 0) == used).all())
    for row in a.ids[real]:  # unique ids per position
        kept = row[row >= 0]
        assert kept.unique().numel() == kept.numel()
    # Rows of one request in two forwards (2 x 40 > the budget): each forward keeps its own
    # widest set of unique ids; the answer pads them to one width.
    stats = served[0].endpoints["gpt"].batcher.stats
    forwards = stats.forwards
    split = client.token_samples("gpt", _seqs([40, 30], seed=9), 64, seed=2)
    assert stats.forwards - forwards == 2
    real = torch.arange(40)[None] < torch.tensor([40, 30])[:, None]
    assert bool((split.counts.sum(-1)[real] == 64).all()) and bool(((split.counts > 0) == (split.ids >= 0)).all())
    # The draws follow the teacher at the asked temperature: a peaked softmax (T = 0.05) at one
    # position, 4000 draws; every id's frequency within 6 sigma of its probability.
    draws = 4000
    peaked = client.infer_tokens("gpt", seqs[:1], samples=draws, seed=1, sparse_temperature=0.05)
    p = torch.softmax(_ref_logits(lm, seqs[0]).double() / 0.05, -1)
    freq = torch.zeros(6, VOCAB, dtype=torch.float64)
    ids, counts = peaked["sample_indices"].long(), peaked["sample_counts"].double()
    freq.scatter_add_(1, ids.clamp(min=0), torch.where(ids >= 0, counts, torch.zeros_like(counts)))
    freq /= draws
    assert bool(((freq - p).abs() <= 6 * (p * (1 - p) / draws).sqrt() + 2e-3).all())
    assert float(p.max(-1).values.max()) > 0.5  # the check has teeth: a row far from uniform


def test_log_probs_of_given_tokens(served, lm):
    _, client = served
    seqs = _seqs([8, 13, 2], seed=4)
    lp = client.token_logprobs("gpt", seqs)
    assert lp.dtype == torch.float32 and lp.shape == (3, 13)
    for i, s in enumerate(seqs):
        logp = torch.log_softmax(_ref_logits(lm, s).double(), -1)
        want = logp[:-1].gather(1, s[1:, None]).squeeze(1)
        torch.testing.assert_close(lp[i, : len(s) - 1].double(), want, rtol=0, atol=2e-5)
        assert bool((lp[i, len(s) - 1 :] == 0).all())
    # Completion tokens only: positions 3.. of row 1.
    positions = torch.zeros(3, 13, dtype=torch.bool)
    positions[1, 3:12] = True
    stats = served[0].endpoints["gpt"].batcher.stats
    rows_before = stats.samples
    part = client.token_logprobs("gpt", seqs, positions=positions)
    assert stats.samples - rows_before == 1  # rows without an asked position never run
    torch.testing.assert_close(part[1, 3:12], lp[1, 3:12], rtol=0, atol=1e-6)
    assert bool((part[~positions] == 0).all())


def test_hidden_states_of_named_layers(served, lm):
    _, client = served
    seqs = _seqs([7, 3], seed=5)
    hidden = client.token_hidden("gpt", seqs, [lm.layer])[lm.layer]
    assert hidden.shape == (2, 7, 32)
    for i, s in enumerate(seqs):
        with torch.no_grad():
            ref = lm.hidden(s)
        torch.testing.assert_close(hidden[i, : len(s)], ref, rtol=0, atol=2e-5)


def _code(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(TeacherRequestError) as e:
        fn()
    return e.value.code, e.value.message


def test_refusals_name_the_numbers_and_the_server_keeps_serving(served):
    _, client = served
    code, msg = _code(lambda: client.infer_tokens("gpt", _seqs([BUDGET + 2]), logits=True))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and str(BUDGET + 2) in msg and f"max_batch_tokens={BUDGET}" in msg
    code, msg = _code(lambda: client.infer_tokens("gpt", [torch.tensor([1, VOCAB, 2])], logits=True))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and f"token id {VOCAB}" in msg
    last = torch.ones(1, 4, dtype=torch.bool)
    code, msg = _code(lambda: client.infer_tokens("gpt", _seqs([4]), positions=last, token_logprobs=True))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "last position 3" in msg
    code, msg = _code(lambda: client.infer("gpt", torch.zeros(2, 5)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "FLOAT32" in msg
    code, msg = _code(lambda: client.synthesize("gpt", 2).__next__())
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "token ids" in msg
    # A malformed positions tensor is named as such (it was reported as the inputs).
    from kd.core.wire import to_proto

    bad = to_proto(torch.ones(1, 4, dtype=torch.bool))
    bad.dtype = 99
    req = pb.InferRequest(teacher="gpt", inputs=to_proto(_seqs([4])[0][None]), positions=bad,
                          outputs=pb.OutputSpec(token_logprobs=True))  # fmt: skip
    with grpc.insecure_channel(f"127.0.0.1:{served[0].port}") as ch:
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary("/kd.v1.TeacherService/Infer", request_serializer=pb.InferRequest.SerializeToString,
                           response_deserializer=pb.InferResponse.FromString)(req, timeout=30)  # fmt: skip
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("positions: "), (
        e.value.details()
    )
    assert client.infer_tokens("gpt", _seqs([BUDGET]), labels=True)["labels"].shape == (BUDGET,)


def test_token_dataset_by_reference(served, corpus):
    from kd.core.tokens import IGNORE_INDEX, next_token_labels

    _, client = served
    ref = DatasetRef("docs", [1, 2, 3])
    out = client.infer_tokens("gpt", ref, token_logprobs=True, top_k=2)
    b = corpus.batch([1, 2, 3])
    assert torch.equal(out.positions, next_token_labels(b.tokens, b.loss_mask) != IGNORE_INDEX)
    lengths = b.attention_mask.sum(1).tolist()
    by_value = client.infer_tokens("gpt", b.tokens, lengths=lengths, positions=out.positions, token_logprobs=True,
                                   top_k=2)  # fmt: skip
    torch.testing.assert_close(out["token_logprobs"], by_value["token_logprobs"], rtol=0, atol=1e-6)
    assert torch.equal(out["topk_indices"], by_value["topk_indices"])
    code, msg = _code(lambda: client.infer_tokens("gpt", DatasetRef("docs", [9]), labels=True))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "index 9 out of range" in msg


def test_stream_of_token_requests_matches_unary(served):
    _, client = served
    batches = [(f"b{i}", _seqs(lens, seed=10 + i), None, None) for i, lens in enumerate([[4, 9], [12], [3, 3, 7]])]
    got = list(client.infer_tokens_stream("gpt", batches, depth=2, top_k=4, token_logprobs=True))
    assert [k for k, _ in got] == ["b0", "b1", "b2"]
    for (_, seqs, _, _), (_, out) in zip(batches, got):
        one = client.infer_tokens("gpt", seqs, top_k=4, token_logprobs=True)
        assert torch.equal(out.positions, one.positions)
        assert torch.equal(out["topk_indices"], one["topk_indices"])
        torch.testing.assert_close(out["token_logprobs"], one["token_logprobs"], rtol=0, atol=1e-5)


def test_padding_share_metric_and_length_grouping(served):
    running, _ = served
    stats = running.endpoints["gpt"].batcher.stats
    before_real, before_padded = stats.real_tokens, stats.padded_tokens
    with TeacherClient(f"127.0.0.1:{running.port}") as c:
        c.infer_tokens("gpt", _seqs([10, 10, 4], seed=6), labels=True)  # one forward of 3 x 10
    assert (stats.real_tokens - before_real, stats.padded_tokens - before_padded) == (24, 30)
    with urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line.startswith("kd_")}
    assert values['kd_token_positions_total{teacher="gpt"}'] == stats.padded_tokens
    assert values['kd_padding_positions_total{teacher="gpt"}'] == stats.padded_tokens - stats.real_tokens
    assert values['kd_padding_share{teacher="gpt"}'] == pytest.approx(stats.padding_share, abs=1e-12)
    assert 0 < stats.padding_share < 1


def test_group_rows_prefers_similar_lengths():
    # (length, order); the oldest row (index 0) always goes in, with its neighbours in length.
    rows = [(30, 0), (4, 1), (29, 2), (5, 3), (31, 4), (6, 5)]
    assert sorted(group_rows(rows, 0, 100, 8)) == [0, 2, 4]  # 3 x 31 = 93 <= 100; a 4th would pad to 124
    assert sorted(group_rows(rows, 1, 100, 8)) == [1, 3, 5]  # the short ones first ...
    assert sorted(group_rows(rows, 1, 1000, 8)) == [0, 1, 2, 3, 4, 5]  # ... all when the budget allows
    assert sorted(group_rows(rows, 0, 100, 2)) == [0, 2]  # max_batch_size


# -- a plain torch token module (no transformers involved) ---------------------------------------
class TinyTokenLM(nn.Module):
    """Embedding + GRU + head: a causal token teacher taking (tokens, attention_mask)."""

    tokenizer_hash = "byte-test"

    def __init__(self, vocab: int = 50, max_length: int = 16, dim: int = 32) -> None:
        super().__init__()
        self.max_length = max_length
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = nn.GRU(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h, _ = self.rnn(self.embed(tokens))
        return self.head(h)


def tiny_token_lm(vocab: int = 50, max_length: int = 16) -> TinyTokenLM:
    torch.manual_seed(3)
    return TinyTokenLM(vocab, max_length)


@pytest.fixture(scope="module")
def gru_teacher():
    return load_teacher("gru", f"{__name__}:tiny_token_lm?vocab=50&input_shape=-1")


def test_plain_token_module_served_with_int32_ids(gru_teacher):
    t = gru_teacher
    assert t.signature.extra["max_length"] == "16" and t.signature.extra["tokenizer"] == "byte-test"
    assert t.num_classes == 50 and t.input_dtype == torch.int64
    running = start_server([t], batching=TeacherOptions(max_batch_tokens=64, max_batch_size=4, warmup=False))
    try:
        with TeacherClient(f"127.0.0.1:{running.port}") as client:
            seqs = [torch.randint(0, 50, (n,), generator=torch.Generator().manual_seed(n)) for n in (3, 9, 16)]
            ids, lens = _padded(seqs)
            out = client.infer_tokens("gru", ids.to(torch.int32), lengths=lens, logits=True, token_logprobs=True)
            lp = out.dense("token_logprobs")
            for i, s in enumerate(seqs):
                with torch.no_grad():
                    z = t.model(s[None].long())[0].double()
                torch.testing.assert_close(out.dense("logits")[i, : len(s) - 1].double(), z[:-1], rtol=0, atol=1e-5)
                want = torch.log_softmax(z, -1)[:-1].gather(1, s[1:, None].long()).squeeze(1)
                torch.testing.assert_close(lp[i, : len(s) - 1].double(), want, rtol=0, atol=1e-5)
            code, msg = _code(lambda: client.infer_tokens("gru", _seqs([17]), logits=True))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, msg)
            # "of teacher 'gru'", not "teacher 'gru''s" (a possessive after the name's quote)
            assert "a row of 17 tokens is longer than the maximum length 16 of teacher 'gru'" in msg, msg
    finally:
        running.stop(grace=1)


def test_token_fields_refused_by_a_classifier(teacher):
    running = start_server([teacher], batching=TeacherOptions(warmup=False))
    try:
        with TeacherClient(f"127.0.0.1:{running.port}") as client:
            code, msg = _code(lambda: client.infer_tokens("digits", [[1, 2, 3]], token_logprobs=True))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "token_logprobs" in msg and "token teachers" in msg
    finally:
        running.stop(grace=1)


class InplaceTokenLM(nn.Module):
    """embed -> proj (Linear) -> ReLU(inplace=True) -> head: the ReLU overwrites proj's output."""

    tokenizer_hash = "byte-test"

    def __init__(self, vocab: int = 50, max_length: int = 16, dim: int = 32) -> None:
        super().__init__()
        self.max_length = max_length
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.act(self.proj(self.embed(tokens))))


def inplace_token_lm(vocab: int = 50, max_length: int = 16) -> InplaceTokenLM:
    torch.manual_seed(5)
    return InplaceTokenLM(vocab, max_length)


def test_hidden_states_of_a_layer_the_next_module_changes_in_place():
    t = load_teacher("inplace", f"{__name__}:inplace_token_lm?vocab=50&input_shape=-1")
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the reference: proj's output from a plain forward of the pieces, no ReLU
        want = t.model.proj(t.model.embed(ids))
        logits = t.model.head(torch.relu(want))
    assert want.min() < 0  # what the in-place ReLU would overwrite
    running = start_server([t], batching=TeacherOptions(max_batch_tokens=64, max_batch_size=4, warmup=False))
    try:
        with TeacherClient(f"127.0.0.1:{running.port}") as client:
            out = client.infer_tokens("inplace", ids, hidden=["proj", "act"], logits=True)
        torch.testing.assert_close(out.dense("feature/proj"), want, rtol=0, atol=1e-6)
        torch.testing.assert_close(out.dense("feature/act"), torch.relu(want), rtol=0, atol=1e-6)
        torch.testing.assert_close(out.dense("logits"), logits, rtol=0, atol=1e-5)
    finally:
        running.stop(grace=1)


class PatternLM(nn.Module):
    """Logits ``scale`` for token 0 and ``-scale`` for every other token, at every position."""

    tokenizer_hash = "byte-test"

    def __init__(self, vocab: int = 50, max_length: int = 16, scale: float = 1.0) -> None:
        super().__init__()
        self.max_length = max_length
        self.scale = scale
        self.embed = nn.Embedding(vocab, vocab)
        with torch.no_grad():
            self.embed.weight.fill_(-1.0)
            self.embed.weight[:, 0] = 1.0

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.embed(tokens) * self.scale


def pattern_lm(vocab: int = 50, max_length: int = 16, scale: float = 1.0) -> PatternLM:
    return PatternLM(vocab, max_length, scale)


def test_token_outputs_that_overflow_are_refused_out_of_range_before_any_draw():
    """Finite logits whose top-k / sampled values overflow float16, whose logsumexp at a small
    sparse_temperature overflows float32 (and whose draws would come from NaN probabilities),
    or whose log-probabilities overflow: OUT_OF_RANGE naming the output, never OK or INTERNAL."""
    big = load_teacher("big", f"{__name__}:pattern_lm?vocab=50&scale=1e6&input_shape=-1")
    huge = load_teacher("huge", f"{__name__}:pattern_lm?vocab=50&scale=2e38&input_shape=-1")
    ids = torch.randint(1, 50, (2, 8), generator=torch.Generator().manual_seed(0))  # no token 0: targets at -scale
    running = start_server([big, huge], batching=TeacherOptions(max_batch_tokens=64, max_batch_size=4, warmup=False))
    try:
        with TeacherClient(f"127.0.0.1:{running.port}") as client:
            refused = [
                ("big", dict(top_k=3, dtype=torch.float16), "topk_values"),
                ("big", dict(samples=3, dtype=torch.float16), "sample_values"),
                ("huge", dict(top_k=3, sparse_temperature=0.001), "logsumexp"),
                ("huge", dict(samples=3, sparse_temperature=0.001), "logsumexp"),
                ("huge", dict(token_logprobs=True), "token_logprobs"),
            ]
            for teacher, kw, name in refused:
                code, msg = _code(lambda teacher=teacher, kw=kw: client.infer_tokens(teacher, ids, **kw))
                assert code == grpc.StatusCode.OUT_OF_RANGE, (teacher, kw, code, msg)
                assert f"output '{name}'" in msg and "NaN or Inf" in msg, (teacher, kw, msg)
            # The same teachers within range: answered, finite, and as the logits say.
            out = client.infer_tokens("huge", ids, top_k=2, samples=3)
            assert torch.equal(out["topk_indices"][:, 0], torch.zeros(16, dtype=torch.int32))
            assert torch.equal(out["topk_values"][:, 0], torch.full((16,), 2e38))
            torch.testing.assert_close(out["logsumexp"], torch.full((16,), 2e38))
            assert torch.equal(out["sample_indices"][:, 0], torch.zeros(16, dtype=out["sample_indices"].dtype))
            assert torch.equal(out["sample_counts"][:, 0], torch.full((16,), 3, dtype=out["sample_counts"].dtype))
            out = client.infer_tokens("big", ids, top_k=3, samples=3, token_logprobs=True)
            assert all(torch.isfinite(v).all() for v in out.outputs.values() if v.is_floating_point())
            torch.testing.assert_close(out["token_logprobs"], torch.full((14,), -2e6))
    finally:
        running.stop(grace=1)


class _Gated(TokenRunner):
    """The real runner, whose first forward waits for ``gate``: requests submitted meanwhile
    queue behind a busy model, unanswered, which is what makes company for the batcher."""

    def __init__(self, teacher) -> None:
        super().__init__(teacher)
        self.inside, self.gate = threading.Event(), threading.Event()

    def run(self, groups):
        if not self.inside.is_set():
            self.inside.set()
            assert self.gate.wait(60), "the test never opened the gate"
        return super().run(groups)


def _work(teacher, n: int):
    ids = torch.randint(0, 50, (1, n), generator=torch.Generator().manual_seed(n))
    return prepare(teacher, ids, [n], None, pb.OutputSpec(labels=True), access="white", max_batch_tokens=10_000,
                   max_message_bytes=1 << 20)  # fmt: skip


def _labels_match(teacher, work, result) -> None:
    with torch.no_grad():
        want = teacher.model(work.tokens)[0].argmax(-1)
    assert torch.equal(result["labels"], want)


def test_token_batcher_groups_queued_rows_by_length(gru_teacher):
    """Four rows queued together: the forwards pair 15 with 14 and 2 with 3 (36 positions
    computed for 34 real ones), not arrival order (15 + 2, 14 + 3: 58)."""
    runner = _Gated(gru_teacher)
    # A long delay, and the four queue behind a held first forward (the budget fills at the 4th).
    batcher = TokenBatcher(runner, max_batch_tokens=32, max_batch_size=8, max_queue_delay_s=2.0)
    try:
        first = batcher.submit(_work(gru_teacher, 5))
        assert runner.inside.wait(30)
        works = [_work(gru_teacher, n) for n in (15, 2, 14, 3)]
        futures = [batcher.submit(w) for w in works]
        runner.gate.set()
        first.result(timeout=60)
        results = [f.result(timeout=60) for f in futures]
        assert batcher.stats.forwards == 3 and batcher.stats.padded_tokens == 5 + 36
        assert batcher.stats.real_tokens == 5 + 34
        for w, r in zip(works, results):
            _labels_match(gru_teacher, w, r)
    finally:
        batcher.close(timeout=5)


def test_token_batcher_waits_its_delay_only_where_company_comes(gru_teacher):
    """As the tensor batcher (``kd.teacher_server.batcher.Company``): a lone caller with one
    request at a time is never held for the queue delay (here 30 s); a request that queued
    behind a busy forward waits for company, from that forward's end, and merges with one
    that comes after it."""
    lone = TokenBatcher(TokenRunner(gru_teacher), max_batch_tokens=64, max_batch_size=2, max_queue_delay_s=30.0)
    try:
        for n in (4, 9, 6, 11, 5, 7):
            w = _work(gru_teacher, n)
            _labels_match(gru_teacher, w, lone.submit(w).result(timeout=10))  # waiting the delay: TimeoutError
        assert list(lone.stats.batch_sizes) == [1] * 6
    finally:
        lone.close(timeout=5)
    runner = _Gated(gru_teacher)
    crowd = TokenBatcher(runner, max_batch_tokens=64, max_batch_size=2, max_queue_delay_s=30.0)
    try:
        first = crowd.submit(_work(gru_teacher, 5))
        assert runner.inside.wait(30)
        a = crowd.submit(_work(gru_teacher, 8))  # arrives while the first is unanswered: company
        runner.gate.set()
        first.result(timeout=60)
        time.sleep(0.05)  # the model is free now; without company, a would run alone at once
        b = crowd.submit(_work(gru_teacher, 9))
        a.result(timeout=60), b.result(timeout=60)
        assert list(crowd.stats.batch_sizes) == [1, 2], "a should have waited for b (max_batch_size 2 fills)"
    finally:
        crowd.close(timeout=5)


def test_a_token_batch_that_fails_after_its_forward_fails_its_callers_and_the_thread_serves_on(gru_teacher):
    """An error outside the forward (here the metrics observer of the 2nd forward) is that
    batch's callers' error; the model thread goes on answering, and a drain completes."""
    seen: list[int] = []

    def observer(obs) -> None:
        seen.append(obs.size)
        if len(seen) == 2:
            raise RuntimeError("observer broke")

    batcher = TokenBatcher(TokenRunner(gru_teacher), max_batch_tokens=64, max_batch_size=4, max_queue_delay_s=0.0,
                           observer=observer)  # fmt: skip
    try:
        works = [_work(gru_teacher, n) for n in (6, 7, 8)]
        _labels_match(gru_teacher, works[0], batcher.submit(works[0]).result(timeout=30))
        with pytest.raises(RuntimeError, match="observer broke"):
            batcher.submit(works[1]).result(timeout=30)
        _labels_match(gru_teacher, works[2], batcher.submit(works[2]).result(timeout=30))
        assert batcher.unresolved == 0 and len(seen) == 3
    finally:
        batcher.close(timeout=5)
    assert not batcher._thread.is_alive()


def test_a_failing_queue_depth_observer_never_stops_the_token_batcher(gru_teacher):
    def depth(_: int) -> None:
        raise RuntimeError("gauge broke")

    batcher = TokenBatcher(TokenRunner(gru_teacher), max_batch_tokens=64, max_batch_size=4, max_queue_delay_s=0.0,
                           on_queue_depth=depth)  # fmt: skip
    try:
        for n in (6, 7, 8):
            w = _work(gru_teacher, n)
            _labels_match(gru_teacher, w, batcher.submit(w).result(timeout=30))
    finally:
        batcher.close(timeout=5)


def test_tokenizer_hash_is_over_the_files(hf_dir):
    from kd.teacher_server.lm import tokenizer_hash

    raw = (hf_dir / "vocab.json").read_bytes()
    want = hashlib.sha256(f"vocab.json:{len(raw)}:".encode() + raw).hexdigest()[:16]
    assert tokenizer_hash(hf_dir) == want


def test_masked_lm_from_a_local_directory(tmp_path):
    if transformers is None:
        pytest.skip("transformers is not installed (pip install transformers)")
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=40)  # fmt: skip
    torch.manual_seed(0)
    transformers.BertForMaskedLM(cfg).eval().save_pretrained(str(tmp_path), safe_serialization=True)
    teacher = load_teacher("bert", f"hf:{tmp_path}")
    assert teacher.signature.extra["task"] == "masked-lm" and teacher.signature.extra["max_length"] == "40"
    reference = transformers.BertForMaskedLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    running = start_server([teacher], batching=TeacherOptions(max_batch_tokens=64, warmup=False))
    try:
        with TeacherClient(f"127.0.0.1:{running.port}") as client:
            seqs = [torch.randint(0, 120, (n,), generator=torch.Generator().manual_seed(n)) for n in (6, 2)]
            logits = client.token_logits("bert", seqs)
            for i, s in enumerate(seqs):  # bidirectional: padding would change every position if unmasked
                with torch.no_grad():
                    ref = reference(s[None]).logits[0]
                torch.testing.assert_close(logits[i, : len(s)], ref, rtol=0, atol=2e-5)
            code, msg = _code(lambda: client.token_logprobs("bert", seqs))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "causal" in msg
    finally:
        running.stop(grace=1)
