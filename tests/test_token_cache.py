"""Token caches: one record per sequence, per-position sparse targets, ids as narrow as the
vocabulary allows; precomputed from an in-process token teacher and through the server, verified,
and trained from with the per-token losses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from kd.cache import CacheError, CacheMeta, CacheReader, CacheWriter
from kd.cache.codecs import get_codec, index_bytes
from kd.core.data import open_source
from kd.core.tokens import ByteTokenizer, TokenTargets, next_token_labels
from kd.precompute import LocalTokenTeacher, ServerTokenTeacher, precompute_tokens
from kd.student_trainer.losses import get_method
from kd.student_trainer.sources import CacheSource
from kd.student_trainer.train import train_tokens

VOCAB = 259  # the byte tokenizer's: ids need 2 bytes


class TinyLM(nn.Module):
    """A causal bigram-ish token teacher ([B, S] int64 -> [B, S, V]): position s sees tokens s and s - 1."""

    tokenizer_hash = ByteTokenizer().hash  # the corpus's own tokenizer (a teacher of another one is refused)

    def __init__(self, vocab: int = VOCAB, dim: int = 16, scale: float = 3.0) -> None:
        super().__init__()
        self.max_length = 64
        self.embed = nn.Embedding(vocab, dim)
        self.prev = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)
        self.scale = scale

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        prev = torch.nn.functional.pad(self.prev(tokens)[:, :-1], (0, 0, 1, 0))
        return self.head(torch.tanh(self.embed(tokens) + prev)) * self.scale


def tiny_lm(vocab: int = VOCAB) -> TinyLM:
    torch.manual_seed(5)
    return TinyLM(vocab)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    lines = [f"line {i}: " + "abcdefghij"[: 1 + i % 10] * (1 + i % 3) for i in range(12)]
    (d / "c.txt").write_text("\n".join(lines) + "\n")
    return open_source(f"text:{d / 'c.txt'}?doc=line&pack=0&block=24")


def _meta(codec: str, n: int = 3, vocab: int = VOCAB) -> CacheMeta:
    return CacheMeta("teacher", "tokens", n, codec, vocab, per_token=True, temperature=2.0 if "topk" in codec else None)


@pytest.mark.parametrize(("codec", "row_bytes"), [("fp16", 2 * VOCAB), ("topk:8", 8 * 2 + 8 * 2 + 4),
                                                  ("sample:16", 16 * (2 + 1))])  # fmt: skip
def test_token_codec_round_trip_bytes_per_token_and_index_width(tmp_path: Path, codec: str, row_bytes: int) -> None:
    g = torch.Generator().manual_seed(0)
    lengths = [5, 9, 2]
    seqs = [torch.randn(n, VOCAB, generator=g) * 3 for n in lengths]
    with CacheWriter(tmp_path / "c", _meta(codec)) as w:
        w.put_sequences(range(3), seqs)
    reader = CacheReader(tmp_path / "c")
    assert reader.logit_bytes == row_bytes
    stats = reader.token_stats()
    # Per record: header (4) + position count (4) + crc (4) + L rows.
    assert stats["bytes"] == sum(12 + n * row_bytes for n in lengths) and stats["positions"] == sum(lengths)
    assert stats["bytes_per_token"] == pytest.approx(stats["bytes"] / 16)
    assert reader.verify().ok
    out = reader.token_targets([2, 0, 1], width=10)
    order = [2, 0, 1]
    if codec == "fp16":
        assert out.shape == (3, 10, VOCAB)
        for r, i in enumerate(order):
            torch.testing.assert_close(out[r, : lengths[i]], seqs[i].half().float(), rtol=0, atol=0)
            assert not out[r, lengths[i] :].any()
        return
    assert isinstance(out, TokenTargets) and out.ids.shape[:2] == (3, 10)
    for r, i in enumerate(order):
        n = lengths[i]
        assert bool((out.ids[r, n:] == -1).all())  # padding
        if codec.startswith("topk"):
            vals, ids = seqs[i].topk(8, dim=-1)
            assert torch.equal(out.ids[r, :n], ids)
            # log p at T = 2 (codec version 3: fp16 log-probabilities, logsumexp 0), to fp16's relative step
            ref = torch.log_softmax(seqs[i].double() / 2.0, -1).gather(-1, ids)
            got = out.logits[r, :n].double() / 2.0 - out.lse[r, :n].double()[:, None]
            assert bool(((got - ref).abs() <= 2 * 2.0**-11 * ref.abs().amax(-1, keepdim=True) + 1e-5).all())
            assert out.temperature == 2.0
        else:
            assert out.logits is None and out.temperature == 1.0
            assert torch.equal(out.counts[r, :n].sum(-1), torch.full((n,), 16.0))
            used = out.ids[r, :n] >= 0
            assert bool((used == (out.counts[r, :n] > 0)).all())
            for p in range(n):  # unique ids per position
                assert len(set(out.ids[r, p][used[p]].tolist())) == int(used[p].sum())
    with pytest.raises(ValueError, match="more than the width"):
        reader.token_targets([1], width=4)
    with pytest.raises(CacheError, match="one record per sequence"):
        reader.targets([0])


def test_index_width_follows_the_vocabulary() -> None:
    for vocab, width in ((256, 1), (VOCAB, 2), (65536, 2), (70000, 4)):
        assert index_bytes(vocab) == width
        assert get_codec("topk:8").record_bytes(vocab) == 8 * 2 + 8 * width + 4
        assert get_codec("sample:16").record_bytes(vocab) == 16 * (width + 1)


def _first_loss(method: str, source, cache: CacheSource, idx: torch.Tensor, student: nn.Module, **opts) -> float:
    b = source.batch(idx)
    labels = next_token_labels(b.tokens, b.loss_mask)
    return float(get_method(method)(student(b.tokens), cache.targets(idx, b.tokens), labels, **opts))


def test_precompute_verify_and_train_from_a_token_cache(tmp_path: Path, source) -> None:
    teacher = LocalTokenTeacher(tiny_lm())
    idx = torch.tensor([3, 0, 7, 11])
    b = source.batch(idx)
    labels = next_token_labels(b.tokens, b.loss_mask)
    with torch.no_grad():
        z = teacher.model(b.tokens)
    torch.manual_seed(1)
    student = TinyLM(dim=8, scale=1.0)
    fkl = get_method("token-fkl")
    runner = CliRunner()
    from kd.cli import app

    for codec in ("fp16", "topk:8", "sample:16"):
        path = tmp_path / codec.replace(":", "-")
        report = precompute_tokens(source, teacher, path, codec=codec, batch_size=5)
        assert report.written == len(source) and report.skipped == 0
        assert precompute_tokens(source, teacher, path, codec=codec).written == 0  # resumes: nothing left
        reader = CacheReader(path)
        assert reader.verify().ok and reader.meta.per_token and reader.meta.dataset_id == source.dataset_id
        cache = CacheSource(str(path))
        targets = cache.targets(idx, b.tokens)
        with torch.no_grad():
            got = float(fkl(student(b.tokens), targets, labels))
            if codec == "fp16":  # the live teacher's loss, up to fp16 rounding of its logits
                assert got == pytest.approx(float(fkl(student(b.tokens), z, labels)), rel=1e-3)
            elif codec == "topk:8":  # the rest-bucket loss on the teacher's own top 8
                want = float(fkl(student(b.tokens), TokenTargets.topk(z, 8), labels))
                assert got == pytest.approx(want, rel=1e-3)
            else:
                assert isinstance(targets, TokenTargets) and targets.counts is not None and got == got
        before = [p.detach().clone() for p in student.parameters()]
        losses = train_tokens(student, source, cache, method="token-fkl", epochs=1, batch_size=6, lr=1e-2)
        assert len(losses) == 1 and losses[0] == losses[0]
        assert any(not torch.equal(a, p) for a, p in zip(before, student.parameters()))
        info = runner.invoke(app, ["cache", "info", str(path)])
        assert info.exit_code == 0, info.output
        data = json.loads(info.output)
        stats = reader.token_stats()
        assert data["bytes_per_token"] == pytest.approx(stats["bytes_per_token"], abs=1e-3)
        assert data["index_bytes"] == 2 and data["positions"] == stats["positions"]
        if codec == "topk:8":
            p = torch.softmax(z.double(), -1).topk(8, dim=-1).values.sum(-1)
            assert 0 < data["covered_mass"]["min"] <= data["covered_mass"]["mean"] < 1
            assert data["covered_mass"]["min"] <= float(p[b.attention_mask].min()) + 1e-3
    with pytest.raises(ValueError, match="drawn at temperature 1"):
        _first_loss("token-fkl", source, CacheSource(str(tmp_path / "sample-16")), idx, student, temperature=2.0)


def test_precompute_through_the_server_matches_in_process(tmp_path: Path, source) -> None:
    from kd.teacher_server.loading import load_teacher
    from kd.teacher_server.server import TeacherOptions, start_server

    served = load_teacher("lm", f"{__name__}:tiny_lm?vocab={VOCAB}&input_shape=-1")
    running = start_server([served], batching=TeacherOptions(max_batch_tokens=256, max_batch_size=8, warmup=False))
    try:
        remote = ServerTokenTeacher(f"127.0.0.1:{running.port}", "lm")
        try:
            report = precompute_tokens(source, remote, tmp_path / "srv", codec="topk:8", batch_size=4)
        finally:
            remote.close()
    finally:
        running.stop(grace=1)
    assert report.written == len(source)
    local = tmp_path / "local"
    precompute_tokens(source, LocalTokenTeacher(tiny_lm()), local, codec="topk:8")
    a, b = CacheReader(tmp_path / "srv"), CacheReader(local)
    assert a.meta.teacher_fingerprint != b.meta.teacher_fingerprint  # the served target fingerprint
    ta, tb = a.token_targets(range(len(source))), b.token_targets(range(len(source)))
    assert float((ta.ids == tb.ids).float().mean()) > 0.99  # near-ties may swap
    both = ta.ids == tb.ids
    torch.testing.assert_close(ta.logits[both], tb.logits[both], rtol=0, atol=2e-2)
    torch.testing.assert_close(ta.lse, tb.lse, rtol=0, atol=1e-4)
    assert np.isclose(a.token_stats()["bytes_per_token"], b.token_stats()["bytes_per_token"])


def test_a_teacher_without_a_fingerprint_is_refused_on_both_paths(tmp_path: Path, source) -> None:
    """A cache is keyed by its teacher's fingerprint: a bare module or function states none. Both
    precompute paths refuse it alike, naming the wrapper that does, before any cache is made (the
    token path raised AttributeError from the cache metadata, the image path too)."""
    from kd.core.data import load_dataset
    from kd.models import digits_teacher
    from kd.precompute import precompute

    lm = tiny_lm()
    for bare in (lm, lambda tokens, lengths: lm(tokens)):
        with pytest.raises(TypeError, match=r"states no fingerprint.*LocalTokenTeacher\(model\)"):
            precompute_tokens(source, bare, tmp_path / "tokens", codec="topk:8")
    digits = load_dataset("digits", "train")
    mlp = digits_teacher()
    for bare in (mlp, lambda x: mlp(x)):
        with pytest.raises(TypeError, match=r"states no fingerprint.*LocalSource\(teacher\)"):
            precompute(digits, bare, tmp_path / "images", progress=False, workers=0)
    assert not (tmp_path / "tokens").exists() and not (tmp_path / "images").exists()
    # The wrapper it names works on the same module.
    assert precompute_tokens(source, LocalTokenTeacher(lm), tmp_path / "tokens", codec="topk:8").written == len(source)
