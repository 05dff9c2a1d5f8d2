"""``train_tokens`` from a live token teacher: ``server:HOST:PORT/TEACHER`` (a real gRPC server on
127.0.0.1) gives the per-position targets ``[B, S, ...]`` of the same teacher run in process
(``local:``), sending the real lengths and unpacking the server's packed answer, so both train a
student the same way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from kd.core.data import open_source
from kd.core.tokens import TokenTargets
from kd.student_trainer.sources import parse_source
from kd.student_trainer.train import train_tokens
from kd.teacher_server.loading import load_teacher
from kd.teacher_server.server import TeacherOptions, start_server

VOCAB = 259


class PrefixLM(nn.Module):
    """A causal LM whose logits at s depend on every token up to s (a running mean of embeddings):
    right padding never changes a real position, and a shifted or unpacked-wrong answer shows."""

    input_shape = (-1,)

    def __init__(self, dim: int, scale: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.head = nn.Linear(dim, VOCAB)
        self.scale = scale

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        e = self.embed(tokens)
        steps = torch.arange(1, tokens.shape[1] + 1, dtype=e.dtype).view(1, -1, 1)
        return self.head(torch.tanh(e.cumsum(1) / steps)) * self.scale


def teacher_lm() -> PrefixLM:
    torch.manual_seed(31)
    return PrefixLM(16, 3.0)


def student_lm() -> PrefixLM:
    torch.manual_seed(32)
    return PrefixLM(8, 1.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> object:
    d: Path = tmp_path_factory.mktemp("srvtok")
    lines = ["the cat sat on the mat.", "a dog", "the bird sang in the tall tree all day long.", "log", "mat and cat"]
    (d / "c.txt").write_text("\n".join(lines * 3) + "\n")
    return open_source(f"text:{d / 'c.txt'}?doc=line&pack=0&block=32")  # one padded document per line


@pytest.fixture(scope="module")
def served() -> str:
    running = start_server([load_teacher("lm", f"{__name__}:teacher_lm")],
                           batching=TeacherOptions(max_batch_tokens=256, max_batch_size=8, warmup=False))  # fmt: skip
    yield f"127.0.0.1:{running.port}"
    running.stop(grace=1)


def test_server_targets_are_per_position_like_the_local_ones(data, served) -> None:
    b = data.batch(torch.arange(6))
    assert not bool(b.attention_mask.all())  # the batch has padding: lengths matter
    local = parse_source(f"local:{__name__}:teacher_lm")
    with parse_source(f"server:{served}/lm") as server:
        got = server.token_targets(torch.arange(6), b.tokens, b.attention_mask)
        assert list(got.shape) == [*b.tokens.shape, VOCAB]
        want = local.targets(torch.arange(6), b.tokens)
        # The same fp32 model on the same real positions; the server batches rows by length without
        # the padding, so a matmul may sum in another order: equal to float32 rounding.
        real = b.attention_mask
        torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
        assert bool((got[~real] == 0).all())  # padding is not computed; no loss counts it
        # Without lengths (targets()): every position, as the in-process teacher sees the ids.
        torch.testing.assert_close(server.targets(torch.arange(6), b.tokens), want, rtol=1e-5, atol=1e-5)
    with parse_source(f"server:{served}/lm", topk=5) as top:  # top-k next to the model: TokenTargets
        t = top.token_targets(torch.arange(6), b.tokens, b.attention_mask)
        assert isinstance(t, TokenTargets) and list(t.ids.shape) == [*b.tokens.shape, 5]
        torch.testing.assert_close(t.ids[real], want[real].topk(5).indices)


def test_train_tokens_from_a_served_teacher_matches_the_local_one(data, served) -> None:
    kw = {"epochs": 2, "batch_size": 4, "lr": 0.02, "seed": 3}
    local_student, served_student = student_lm(), student_lm()
    local = train_tokens(local_student, data, parse_source(f"local:{__name__}:teacher_lm"), **kw)
    with parse_source(f"server:{served}/lm") as server:
        remote = train_tokens(served_student, data, server, **kw)
    # Targets equal to float32 rounding (above); two epochs of Adam on a tiny model keep the losses and
    # weights within 1e-5 relative of each other, far below the loss's change between epochs.
    assert remote == pytest.approx(local, rel=1e-5) and local[1] < local[0]
    for p, q in zip(local_student.parameters(), served_student.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
