"""Gradient accumulation and bf16 in ``train_tokens``: micro-batches weighted by their token
counts make ``accumulate=A`` at batch B the same step as one batch of A * B (float64, one SGD
step, documents of different lengths so a plain mean of micro-batch losses would differ)."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_lm import BigramLM
from torch import nn

from kd.core.data import open_source
from kd.core.tokens import next_token_labels
from kd.precompute import LocalTokenTeacher, precompute_tokens
from kd.student_trainer.losses.token_kd import token_mask
from kd.student_trainer.sources import CacheSource
from kd.student_trainer.train import train_tokens

VOCAB = 259


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("acc")
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    lines = [" ".join(words[: 1 + (3 * i) % 8]) for i in range(8)]  # 8 documents, 6 to 63 bytes
    (d / "c.txt").write_text("\n".join(lines) + "\n")
    source = open_source(f"text:{d / 'c.txt'}?doc=line&pack=0&block=40")
    torch.manual_seed(3)
    teacher = LocalTokenTeacher(BigramLM(dim=16, scale=3.0))
    caches = {}
    for codec in ("fp32", "topk:8"):
        caches[codec] = d / codec.replace(":", "-")
        precompute_tokens(source, teacher, caches[codec], codec=codec, batch_size=8)
    torch.manual_seed(4)
    student = BigramLM().double()
    return source, caches, student


def _step(setup, codec: str, batch_size: int, accumulate: int, **kw) -> tuple[list[float], nn.Module]:
    source, caches, student = setup
    model = copy.deepcopy(student)
    losses = train_tokens(model, source, CacheSource(str(caches[codec])), method=kw.pop("method", "token-fkl"),
                          epochs=1, batch_size=batch_size, accumulate=accumulate, optimizer="sgd", lr=0.5, seed=7,
                          **kw)  # fmt: skip
    return losses, model


def _gap(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize(("codec", "method"), [("fp32", "token-fkl"), ("topk:8", "token-gjsd")])
def test_accumulation_is_one_big_batch(setup, codec: str, method: str) -> None:
    source, _, student = setup
    # The micro-batches of one step hold different numbers of counted tokens (the test's premise).
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(7))
    counts = []
    for m in range(0, 8, 4):
        b = source.batch(order[m : m + 4])
        counts.append(int(token_mask(next_token_labels(b.tokens, b.loss_mask)).sum()))
    assert counts[0] != counts[1]
    full_loss, full = _step(setup, codec, 8, 1, method=method)
    for batch, acc in ((4, 2), (2, 4), (1, 8)):
        loss, model = _step(setup, codec, batch, acc, method=method)
        assert loss[0] == pytest.approx(full_loss[0], rel=1e-12, abs=1e-12)
        for a, b in zip(full.parameters(), model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert _gap(full, student) > 1e-3  # the step happened
    _, two_steps = _step(setup, codec, 4, 1, method=method)  # two steps of 4: not the same weights
    assert _gap(full, two_steps) > 1e-4


def test_bf16_autocast_trains_close_to_fp32(setup) -> None:
    source, caches, student = setup
    loss32, m32 = _step(setup, "fp32", 4, 2)
    setup_f32 = (source, caches, copy.deepcopy(student).float())
    loss_f, m_f = _step(setup_f32, "fp32", 4, 2)
    loss_b, m_b = _step(setup_f32, "fp32", 4, 2, amp="bf16")
    assert loss_f[0] == pytest.approx(loss32[0], rel=1e-5)
    assert loss_b[0] == pytest.approx(loss_f[0], rel=2e-2) and loss_b[0] != loss_f[0]  # bf16 matmuls ran
    assert all(p.dtype == torch.float32 for p in m_b.parameters())  # weights stay fp32 (autocast only)
    with pytest.raises(ValueError, match="fp32 or bf16"):
        _step(setup_f32, "fp32", 4, 1, amp="fp16")
    with pytest.raises(ValueError, match="accumulate"):
        _step(setup_f32, "fp32", 4, 0)
