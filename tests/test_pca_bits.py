"""``pca:K@N``: N bits per row allocated over K low-rank coefficients, cells chosen for the KL.

Checked against independent references: the allocation against a brute-force optimum, the
encoder against a plain float64 re-solve of the Fisher-weighted least squares after each
quantised coefficient (the codec uses GPTQ's Cholesky updates), the bit layout against a
bit-by-bit unpacking; the old ``pca:K[bB]`` spellings against their documented layout and a
golden basis; and a token cache built through ``precompute_tokens``."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kd.cache import CacheReader
from kd.cache.codecs import (
    ADAPTIVE_STEP_SCALE,
    GAUSS_MSE,
    GAUSS_STEP,
    LowRankBasis,
    allocate_bits,
    bytes_per_sample,
    get_codec,
)
from kd.cache.store import BASIS_KEY, CacheMeta, CacheWriter
from kd.cli import app


def low_rank_logits(rows: int, classes: int, rank: int, seed: int, decay: float = 0.8) -> torch.Tensor:
    """Logits W h + b, float64, with h of width ``rank`` whose spread decays by ``decay`` per
    dimension (as a trained head's principal spreads do)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(classes, rank, generator=g, dtype=torch.float64)
    b = torch.randn(classes, generator=g, dtype=torch.float64) * 2
    h = torch.randn(rows, rank, generator=g, dtype=torch.float64) * decay ** torch.arange(rank, dtype=torch.float64)
    return h @ w.T + b


def kl(z: torch.Tensor, q: torch.Tensor) -> float:
    """Mean KL(softmax z || softmax q) per row, float64."""
    lp, lq = torch.log_softmax(z.double(), 1), torch.log_softmax(q.double(), 1)
    return float((lp.exp() * (lp - lq)).sum(1).mean())


def test_allocation_is_the_brute_force_optimum_and_the_record_has_exactly_n_bits() -> None:
    sigma = np.array([3.0, 2.2, 1.0, 0.9, 0.3], dtype=np.float32)
    mse = GAUSS_MSE
    for total in (1, 6, 13, 22):
        got = allocate_bits(sigma, total)
        best = min(
            (b for b in itertools.product(range(9), repeat=5) if sum(b) == total),
            key=lambda b: sum(float(s) ** 2 * mse[k] for s, k in zip(sigma, b)),
        )
        cost = [sum(float(s) ** 2 * mse[k] for s, k in zip(sigma, b)) for b in (got, best)]
        assert int(got.sum()) == total and cost[0] == pytest.approx(cost[1], rel=1e-12), (total, got, best)
    assert allocate_bits(sigma, 13).tolist() == [4, 4, 3, 2, 0]  # leading coefficients more, the tail none
    with pytest.raises(ValueError, match="41 bits do not fit 5 coefficients"):
        allocate_bits(sigma, 41)
    # The record is ceil(N / 8) bytes, whatever the basis; pca:K@N of 80 bits is 10 bytes.
    for name, nbytes in (("pca:40@80", 10), ("pca:5@13", 2), ("pca:3@24", 3), ("pca:2@1", 1)):
        assert get_codec(name).record_bytes(259) == nbytes and bytes_per_sample(name, 259) == nbytes + 8


def fisher_reference(z: torch.Tensor, basis: LowRankBasis, widths: np.ndarray, steps: np.ndarray,
                     euclidean: bool = False) -> np.ndarray:  # fmt: skip
    """Cells by the definition, one row at a time in float64: among the stored coefficients, from
    the last to the first, solve min (x - B^T c)^T M (x - B^T c) over those not yet fixed, quantise
    the first of them to its nearest cell, fix it, repeat. M = F + lambda I: F the row's Fisher
    matrix at T = 1 and lambda = 1e-9 tr(B F B^T) / A + 1e-12 tr(B B^T) / A over the A stored
    coefficients (what keeps a nearly one-hot row's system regular); M = I with ``euclidean``."""
    act = [j for j in range(len(widths)) if widths[j] > 0][::-1]
    comps = basis.components.astype(np.float64)
    stored = comps[act]
    out = np.zeros((len(z), len(widths)), dtype=np.int64)
    for r in range(len(z)):
        row = z[r].double().numpy()
        x = row - row.mean() - basis.mean.astype(np.float64)
        p = np.exp(row - row.max())
        p /= p.sum()
        d = np.eye(len(p)) - p[None, :]  # rows e_c - p: F = sum_c p_c (e_c - p)(e_c - p)^T, exact when p_max ~ 1
        fisher = d.T @ (p[:, None] * d)
        lam = (np.trace(stored @ fisher @ stored.T) * 1e-9 + np.trace(stored @ stored.T) * 1e-12) / len(act)
        metric = np.eye(len(p)) if euclidean else fisher + lam * np.eye(len(p))
        fixed = np.zeros(len(x))  # B_f^T q_f so far
        for i, j in enumerate(act):
            free = comps[act[i:]]
            resid = x - fixed
            c = np.linalg.solve(free @ metric @ free.T, free @ metric @ resid)
            half = 1 << (int(widths[j]) - 1)
            cell = min(max(math.floor(c[0] / steps[j]), -half), half - 1)
            out[r, j] = cell + half
            fixed = fixed + (cell + 0.5) * steps[j] * comps[j]
    return out


def unpack_reference(raw: np.ndarray, widths: list[int]) -> np.ndarray:
    """Fields one after another, least significant bit first, bit i of the record in byte i // 8."""
    out = np.zeros((len(raw), len(widths)), dtype=np.int64)
    for r in range(len(raw)):
        at = 0
        for j, w in enumerate(widths):
            for k in range(w):
                out[r, j] |= ((int(raw[r, (at + k) // 8]) >> ((at + k) % 8)) & 1) << k
            at += w
    return out


def test_encode_matches_the_float64_reference_and_decode_rebuilds_the_midpoints() -> None:
    c, k, n = 30, 6, 13
    z = low_rank_logits(40, c, rank=8, seed=1, decay=0.7)
    basis = LowRankBasis.fit(z[:32], k, weighted=True)
    codec = get_codec(f"pca:{k}@{n}", basis=basis)
    widths = codec.allocation(c)
    assert int(widths.sum()) == n and widths.tolist() == allocate_bits(basis.sigma, n).tolist()
    assert widths[-1] < widths[0] and 0 in widths.tolist()  # a real variable allocation, some dropped
    table = [0.0] + [GAUSS_STEP[b] for b in range(1, 9)]
    steps = np.array([ADAPTIVE_STEP_SCALE * table[w] * float(s) for w, s in zip(widths, basis.sigma)])
    np.testing.assert_allclose(codec.steps(c), np.maximum(steps, 1e-12), rtol=1e-15)
    raw = codec.encode(z)
    assert raw.shape == (40, 2)  # 13 bits
    assert not (raw[:, 1] >> 5).any()  # the 3 spare bits of the last byte are 0
    stored = [int(w) for w in widths if w]
    cells = unpack_reference(raw, stored)
    want = fisher_reference(z, basis, widths, steps)[:, widths > 0]
    assert np.array_equal(cells, want)
    # Decode: mean + sum of the cells' midpoints times the components (0 for dropped ones).
    mid = np.zeros((40, k))
    mid[:, widths > 0] = (cells - (1 << widths[widths > 0] >> 1) + 0.5) * steps[widths > 0]
    ref = basis.mean.astype(np.float64) + mid @ basis.components.astype(np.float64)
    np.testing.assert_array_equal(codec.coefficients(raw, c), mid)
    torch.testing.assert_close(codec.decode(raw, c).double(), torch.from_numpy(ref), rtol=0, atol=1e-5)


def test_confident_and_one_hot_rows_encode(tmp_path: Path) -> None:
    """A confident teacher (median top probability 0.9999, as trained classifiers give) made the
    Fisher encoder fail with numpy's "Matrix is not positive definite": B diag(p) B^T - (Bp)(Bp)^T
    cancels when p is nearly one-hot. A row whose softmax is exactly one-hot in float64 (the
    others underflow) has no Fisher metric at all: its cells are the squared error's choice."""
    c, k, n = 40, 8, 20
    z = low_rank_logits(96, c, rank=10, seed=2, decay=0.8) * 25
    assert float(torch.softmax(z, 1).max(1).values.median()) > 0.9999
    hot = torch.randn(8, c, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    hot[torch.arange(8), torch.arange(8)] += 2000.0  # exp(-2000) underflows: p is exactly one-hot
    assert bool((torch.softmax(hot, 1).max(1).values == 1.0).all())
    codec = get_codec(f"pca:{k}@{n}")
    codec = get_codec(f"pca:{k}@{n}", basis=codec.fit_basis(torch.cat([z, hot])))
    widths, steps = codec.allocation(c), codec.steps(c)
    raw = codec.encode(torch.cat([z, hot]))
    cells = unpack_reference(raw, [int(w) for w in widths if w])
    assert np.array_equal(cells[:96], fisher_reference(z, codec.basis, widths, steps)[:, widths > 0])
    assert np.array_equal(cells[96:], fisher_reference(hot, codec.basis, widths, steps, euclidean=True)[:, widths > 0])
    assert torch.isfinite(codec.decode(raw, c)).all()
    # through a cache, as `kd precompute --codec pca:K@N` writes one
    meta = CacheMeta(teacher_fingerprint="t", dataset_id="d", dataset_size=len(z), codec=f"pca:{k}@{n}",
                     num_classes=c)  # fmt: skip
    with CacheWriter(tmp_path / "c", meta, basis=codec.basis.to_bytes()) as w:
        w.put(list(range(len(z))), z.float())
    got = CacheReader(str(tmp_path / "c")).get(list(range(len(z))))
    torch.testing.assert_close(got, codec.decode(codec.encode(z.float()), c), rtol=0, atol=0)


def test_the_kl_choice_of_cells_beats_rounding_and_the_old_codec_at_the_same_bytes() -> None:
    """At 3 bytes per row: the Fisher-weighted cells with error feedback give a lower KL than
    rounding each weighted-least-squares coefficient to its cell, and far lower than pca:6b4."""
    c, rows = 64, 600
    z = low_rank_logits(rows, c, rank=24, seed=2)
    fit, test = z[:400], z[400:]
    new = get_codec("pca:16@24").fit_basis(fit)
    codec = get_codec("pca:16@24", basis=new)
    got = kl(test, codec.decode(codec.encode(test), c))
    # Rounding: the same cells' grid, each weighted-least-squares coefficient to its nearest cell.
    widths, steps = codec.allocation(c), codec.steps(c)
    comps = new.components.astype(np.float64)
    x = (test - test.mean(1, keepdim=True)).numpy() - new.mean
    p = torch.softmax(fit, 1).numpy().mean(0)  # the class weights of the fit
    w = np.clip(np.sqrt(p / p.max()), 1e-2, None)
    coef = np.linalg.solve((comps * w) @ comps.T, (comps * w) @ x.T).T
    half = (1 << widths) >> 1
    cells = np.clip(np.floor(coef / steps), -half, half - 1)
    rounded = new.mean + np.where(widths > 0, (cells + 0.5) * steps, 0.0) @ comps
    old = get_codec("pca:6b4", basis=LowRankBasis.fit(fit, 6))
    assert old.record_bytes(c) == codec.record_bytes(c) == 3
    kl_round, kl_old = kl(test, torch.from_numpy(rounded)), kl(test, old.decode(old.encode(test), c))
    assert got < 0.8 * kl_round and got < 0.5 * kl_old, (got, kl_round, kl_old)


def test_weighted_basis_spans_a_low_rank_teacher_and_stores_its_coefficient_spread() -> None:
    c, r = 40, 5
    z = low_rank_logits(200, c, rank=r - 1, seed=3)
    basis = LowRankBasis.fit(z, r, weighted=True)
    comps = basis.components.astype(np.float64)
    x = (z - z.mean(1, keepdim=True)).numpy() - basis.mean
    p = torch.softmax(z, 1).numpy().mean(0)
    w = np.clip(np.sqrt(p / p.max()), 1e-2, None)
    coef = np.linalg.solve((comps * w) @ comps.T, (comps * w) @ x.T).T
    assert np.abs(coef @ comps - x).max() < 5e-3 * np.abs(x).max()  # rank r holds it (fp16 components)
    np.testing.assert_allclose(basis.sigma, coef.std(0), rtol=1e-5)
    plain = LowRankBasis.fit(z, r)
    assert not np.array_equal(plain.components, basis.components)  # another metric, other directions
    assert LowRankBasis.from_bytes(basis.to_bytes()).to_bytes() == basis.to_bytes()


def test_old_spellings_keep_their_layout_and_basis_format() -> None:
    """pca:K[bB] caches written before pca:K@N decode as before: B bits per coefficient in the
    documented order, midpoints of GAUSS_STEP[B] * sigma cells, and the same basis bytes."""
    mean = (np.arange(12, dtype=np.float32) - 5.5) / 4
    comps = [[((i * 7 + j * 3) % 11 - 5) / 8 for j in range(12)] for i in range(5)]
    basis = LowRankBasis(mean, np.array(comps, dtype=np.float32), np.array([2, 1.5, 1, 0.75, 0.5], np.float32))
    digest = hashlib.sha256(basis.to_bytes()).hexdigest()
    assert digest == "243492f962b70e8c74baf7112d52792bcafe08090860ed264192a6aba5f8fd22"  # the format of PR 15
    raw = (np.arange(21, dtype=np.int64).reshape(7, 3) * 37 % 256).astype(np.uint8)
    for name, k, bits in (("pca:5", 5, 4), ("pca:5b4", 5, 4), ("pca:4b6", 4, 6), ("pca:3b8", 3, 8)):
        codec = get_codec(name, basis=basis.to_bytes())
        assert codec.record_bytes(12) == math.ceil(k * bits / 8) == 3
        cells = unpack_reference(raw, [bits] * k)
        half = 1 << (bits - 1)
        mid = (cells - half + 0.5) * (GAUSS_STEP[bits] * basis.sigma[:k].astype(np.float64))
        assert np.array_equal(codec.coefficients(raw, 12), mid), name
        ref = mean.astype(np.float64) + mid @ np.array(comps)[:k]
        torch.testing.assert_close(codec.decode(raw, 12).double(), torch.from_numpy(ref), rtol=0, atol=2e-6)
    # pca:K@N's layout is pinned the same way: its allocation and steps are part of the format.
    codec = get_codec("pca:5@13", basis=basis.to_bytes())
    widths = [4, 3, 3, 2, 1]  # allocate_bits of sigma 2, 1.5, 1, 0.75, 0.5 over 13 bits
    assert codec.allocation(12).tolist() == widths and codec.record_bytes(12) == 2
    table = {4: 0.3352, 3: 0.5860, 2: 0.9957, 1: 1.5958}  # GAUSS_STEP, times 1.25
    cells = unpack_reference(raw[:, :2], widths)
    mid = np.zeros((7, 5))
    for j, w in enumerate(widths):
        mid[:, j] = (cells[:, j] - (1 << w >> 1) + 0.5) * (1.25 * table[w] * float(basis.sigma[j]))
    np.testing.assert_allclose(codec.coefficients(raw[:, :2], 12), mid, rtol=1e-15)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("pca:4@0", "must lie in 1..32"),
        ("pca:4@33", "must lie in 1..32"),
        ("pca:0@8", "K must be a positive integer"),
        ("pca:4@", "expected pca:K, pca:KbB"),
        ("pca:4b3@8", "expected pca:K, pca:KbB"),
        ("pca:@8", "expected pca:K, pca:KbB"),
        ("pca:4@x", "as in pca:64, pca:80b3 or pca:40@80"),
    ],
)
def test_bad_spellings_are_refused(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_codec(name)


class TinyLM(torch.nn.Module):
    """[B, S] tokens -> [B, S, V] logits of a rank-8 head."""

    fingerprint = "tiny-lm-pca-bits"

    def __init__(self, vocab: int) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.embed = torch.nn.Embedding(vocab, 8)
        self.head = torch.nn.Linear(8, vocab)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.head(torch.tanh(self.embed(tokens))) * 3


def test_token_cache_stores_the_basis_and_reports_its_bytes(tmp_path: Path) -> None:
    from kd.core.data import open_source
    from kd.precompute import precompute_tokens

    (tmp_path / "c.txt").write_text("\n".join(f"line {i}: " + "abcdefg"[: 1 + i % 7] * 3 for i in range(20)) + "\n")
    source = open_source(f"text:{tmp_path / 'c.txt'}?doc=line&pack=0&block=24")
    vocab = int(source.vocab_size)
    lm, out = TinyLM(vocab), tmp_path / "tok"
    b = source.batch(list(range(len(source))))
    lengths = b.attention_mask.sum(dim=1)
    z = lm(b.tokens, lengths)
    positions = torch.cat([z[r, : int(lengths[r])] for r in range(len(source))])
    given = get_codec("pca:8@20").fit_basis(positions).to_bytes()
    precompute_tokens(source, lm, out, codec="pca:8@20", batch_size=4, basis=given)
    reader = CacheReader(out)
    assert reader._get_raw(BASIS_KEY) == given and reader.verify().ok
    codec = get_codec("pca:8@20", basis=given)
    dense = reader.token_targets(list(range(len(source))))
    assert torch.equal(dense[b.attention_mask.bool()], codec.decode(codec.encode(positions), vocab))
    assert kl(positions, dense[b.attention_mask.bool()]) < 0.05 * kl(positions, torch.zeros_like(positions))
    res = CliRunner().invoke(app, ["cache", "info", str(out)])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout[res.stdout.index("{") :])
    n = len(positions)
    assert info["codec"] == "pca:8@20" and info["basis_bytes"] == LowRankBasis.size(vocab, 8) == len(given)
    assert info["bytes_per_token"] == pytest.approx(3 + 12 * len(source) / n, abs=1e-3)  # 20 bits: 3 bytes
    assert info["bytes_per_token_with_basis"] == pytest.approx(3 + (12 * len(source) + len(given)) / n, abs=1e-3)
