"""Per-token LM distillation losses (token-fkl/rkl/gjsd/tv/skl) against an independent float64
reference written with explicit loops over positions and vocabulary entries, dense and sparse
(rest bucket, sampled counts); masking, gradients, GKD's beta limits, perplexity/accuracy."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kd.core.data import open_source
from kd.core.targets import SparseTargets
from kd.core.tokens import IGNORE_INDEX, TokenTargets, next_token_labels
from kd.student_trainer.losses import get_method
from kd.student_trainer.losses.token_kd import (
    TokenMetrics,
    evaluate_tokens,
    next_token_accuracy,
    perplexity,
    sparse_buckets,
)

B, S, V = 2, 4, 11
KINDS = [  # (method, options, reference kind)
    ("token-fkl", {}, "fkl"),
    ("token-rkl", {}, "rkl"),
    ("token-gjsd", {"beta": 0.3}, "gjsd"),
    ("token-gjsd", {"beta": 0.0}, "fkl"),
    ("token-gjsd", {"beta": 1.0}, "rkl"),
    ("token-tv", {}, "tv"),
    ("token-skl", {"alpha": 0.2}, "skl"),
    ("token-skl", {"alpha": 0.2, "reverse": True}, "srkl"),
]


# -- the reference: plain Python floats, one position at a time -------------------------------------
def _softmax(row: list[float], t: float) -> list[float]:
    m = max(x / t for x in row)
    e = [math.exp(x / t - m) for x in row]
    z = sum(e)
    return [x / z for x in e]


def _kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def _div(kind: str, p: list[float], q: list[float], beta: float = 0.5, alpha: float = 0.1) -> float:
    if kind == "fkl":
        return _kl(p, q)
    if kind == "rkl":
        return _kl(q, p)
    if kind == "tv":
        return 0.5 * sum(abs(x - y) for x, y in zip(p, q))
    if kind == "gjsd":
        m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
        return beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    if kind == "skl":
        return _kl(p, [alpha * x + (1 - alpha) * y for x, y in zip(p, q)])
    if kind == "srkl":
        return _kl(q, [alpha * y + (1 - alpha) * x for x, y in zip(p, q)])
    raise AssertionError(kind)


def _opts(kind: str, options: dict) -> dict:
    return {"beta": options.get("beta", 0.5), "alpha": options.get("alpha", 0.1)}


def ref_dense(kind: str, zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor, t: float, **kw: float) -> float:
    total, n = 0.0, 0
    for b in range(zs.shape[0]):
        for s in range(zs.shape[1]):
            if int(labels[b, s]) == IGNORE_INDEX:
                continue
            p = _softmax(zt[b, s].double().tolist(), t)
            q = _softmax(zs[b, s].double().tolist(), t)
            total += _div(kind, p, q, **kw)
            n += 1
    return total / n * t * t


def ref_sparse(kind: str, zs: torch.Tensor, zt: torch.Tensor, k: int, labels: torch.Tensor, **kw: float) -> float:
    """Top-k of the teacher + one rest bucket, at T = 1; built from the full teacher row."""
    total, n = 0.0, 0
    for b in range(zs.shape[0]):
        for s in range(zs.shape[1]):
            if int(labels[b, s]) == IGNORE_INDEX:
                continue
            p_full = _softmax(zt[b, s].double().tolist(), 1.0)
            q_full = _softmax(zs[b, s].double().tolist(), 1.0)
            top = sorted(range(len(p_full)), key=lambda i: -p_full[i])[:k]
            p = [p_full[i] for i in top]
            q = [q_full[i] for i in top]
            if k < len(p_full):
                p.append(1.0 - sum(p))
                q.append(sum(q_full[i] for i in range(len(q_full)) if i not in top))
            total += _div(kind, p, q, **kw)
            n += 1
    return total / n


@pytest.fixture()
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(B, S, V, generator=g, dtype=torch.float64) * 2
    zt = torch.randn(B, S, V, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, 0] = labels[1, 3] = IGNORE_INDEX  # a prompt position and a padding position
    return zs, zt, labels


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize(("name", "options", "ref"), KINDS)
def test_dense_matches_reference(batch, name, options, ref, temperature) -> None:
    zs, zt, labels = batch
    got = get_method(name)(zs, zt, labels, temperature=temperature, **options)
    want = ref_dense(ref, zs, zt, labels, temperature, **_opts(ref, options))
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)
    # float32 inputs are computed in float32 and agree to float32 rounding
    got32 = get_method(name)(zs.float(), zt.float(), labels, temperature=temperature, **options)
    assert got32.item() == pytest.approx(want, rel=2e-5, abs=1e-6)


@pytest.mark.parametrize(("name", "options", "ref"), KINDS)
def test_sparse_rest_bucket_matches_reference(batch, name, options, ref) -> None:
    zs, zt, labels = batch
    targets = TokenTargets.topk(zt.double(), 3)
    assert targets.ids.shape == (B, S, 3)
    got = get_method(name)(zs, targets, labels, **options)
    want = ref_sparse(ref, zs, zt, 3, labels, **_opts(ref, options))
    assert got.item() == pytest.approx(want, rel=1e-6, abs=1e-9)  # the stored logits are float32


@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize(("name", "options", "ref"), KINDS)
def test_sparse_with_every_id_equals_dense(batch, name, options, ref, temperature) -> None:
    zs, zt, labels = batch
    targets = TokenTargets.topk(zt, V, temperature=temperature)
    dense = get_method(name)(zs, zt, labels, temperature=temperature, **options)
    sparse = get_method(name)(zs, targets, labels, temperature=temperature, **options)
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-6, abs=1e-9)
    # and a cache's SparseTargets (topk, [B, S, K]) is taken the same way
    st = SparseTargets("topk", targets.ids, targets.logits, targets.lse, V, temperature)
    assert get_method(name)(zs, st, labels, temperature=temperature, **options).item() == pytest.approx(
        sparse.item(), rel=1e-12
    )


def test_rest_bucket_mass(batch) -> None:
    zs, zt, _ = batch
    targets = TokenTargets.topk(zt, 4)
    log_q = torch.log_softmax(zs, dim=-1)
    log_p, log_qb, valid = sparse_buckets(log_q, targets, 1.0)
    p_full = torch.softmax(zt, dim=-1)
    q_full = torch.softmax(zs, dim=-1)
    assert bool(valid.all())
    for b in range(B):
        for s in range(S):
            ids = targets.ids[b, s].tolist()
            stored = sum(float(p_full[b, s, i]) for i in ids)
            assert math.exp(float(log_p[b, s, -1])) == pytest.approx(1.0 - stored, rel=1e-5)
            rest_q = sum(float(q_full[b, s, i]) for i in range(V) if i not in ids)
            assert math.exp(float(log_qb[b, s, -1])) == pytest.approx(rest_q, rel=1e-10)
            for j, i in enumerate(ids):
                assert math.exp(float(log_p[b, s, j])) == pytest.approx(float(p_full[b, s, i]), rel=1e-5)
    # the bucket loss is zero when the student matches the teacher, and only then
    same = get_method("token-fkl")(zt, targets, torch.zeros(B, S, dtype=torch.long))
    assert abs(same.item()) < 1e-6
    assert get_method("token-fkl")(zs, targets, torch.zeros(B, S, dtype=torch.long)).item() > 0.01


def test_unused_slots_count_for_nothing(batch) -> None:
    zs, zt, labels = batch
    t3 = TokenTargets.topk(zt, 3)
    padded = TokenTargets(
        torch.cat([t3.ids, torch.full((B, S, 2), -1)], -1), V,
        torch.cat([t3.logits, torch.full((B, S, 2), 123.0, dtype=t3.logits.dtype)], -1), t3.lse,
    )  # fmt: skip
    for name, options, _ in KINDS:
        a = get_method(name)(zs, t3, labels, **options)
        b = get_method(name)(zs, padded, labels, **options)
        assert b.item() == pytest.approx(a.item(), rel=1e-12)


def test_sampled_counts_forward_kl(batch) -> None:
    zs, zt, labels = batch
    zs = zs.clone().requires_grad_(True)
    targets = TokenTargets.sample(zt, 16, generator=torch.Generator().manual_seed(3))
    assert targets.logits is None and targets.counts is not None
    assert bool((targets.counts.sum(-1) == 16).all())
    loss = get_method("token-fkl")(zs, targets, labels)
    # reference: KL(w || q) with w = counts / N over the drawn ids, mean over unmasked positions
    total, n = 0.0, 0
    grad_ref = torch.zeros(B, S, V, dtype=torch.float64)
    for b in range(B):
        for s in range(S):
            if int(labels[b, s]) == IGNORE_INDEX:
                continue
            q = _softmax(zs[b, s].detach().tolist(), 1.0)
            w = [0.0] * V
            for i, c in zip(targets.ids[b, s].tolist(), targets.counts[b, s].tolist()):
                if i >= 0:
                    w[i] += c / 16
            total += sum(w[i] * math.log(w[i] / q[i]) for i in range(V) if w[i] > 0)
            n += 1
            for i in range(V):
                grad_ref[b, s, i] = q[i] - w[i]  # d/dz of -sum w log q: unbiased for q - p_t
    assert loss.item() == pytest.approx(total / n, rel=1e-6)
    loss.backward()
    assert torch.allclose(zs.grad, grad_ref / n, atol=1e-7)
    with pytest.raises(ValueError, match="not estimated without bias"):
        get_method("token-rkl")(zs, targets, labels)
    with pytest.raises(ValueError, match="drawn at temperature 1.0"):
        get_method("token-fkl")(zs, targets, labels, temperature=2.0)


def test_sampled_ids_with_logits_use_the_rest_bucket(batch) -> None:
    zs, zt, labels = batch
    t = TokenTargets.sample(zt, 6, generator=torch.Generator().manual_seed(1), with_logits=True)
    got = get_method("token-tv")(zs, t, labels)
    total, n = 0.0, 0
    for b in range(B):
        for s in range(S):
            if int(labels[b, s]) == IGNORE_INDEX:
                continue
            p_full, q_full = _softmax(zt[b, s].tolist(), 1.0), _softmax(zs[b, s].tolist(), 1.0)
            ids = [i for i in t.ids[b, s].tolist() if i >= 0]
            p = [p_full[i] for i in ids] + [1 - sum(p_full[i] for i in ids)]
            q = [q_full[i] for i in ids] + [sum(q_full[i] for i in range(V) if i not in ids)]
            total += _div("tv", p, q)
            n += 1
    assert got.item() == pytest.approx(total / n, rel=1e-6)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize(("name", "options", "ref"), KINDS)
def test_masked_tokens_contribute_nothing(batch, name, options, ref, sparse) -> None:
    zs, zt, labels = batch
    zs = zs.clone().requires_grad_(True)
    target = TokenTargets.topk(zt, 3) if sparse else zt
    loss = get_method(name)(zs, target, labels, **options)
    loss.backward()
    masked = labels == IGNORE_INDEX
    assert bool((zs.grad[masked] == 0).all()) and bool((zs.grad[~masked] != 0).any())
    zs2, zt2 = zs.detach().clone(), zt.clone()
    zs2[masked] = torch.randn(int(masked.sum()), V, dtype=zs2.dtype) * 50
    zt2[masked] = torch.randn(int(masked.sum()), V, dtype=zt2.dtype) * 50
    target2 = TokenTargets.topk(zt2, 3) if sparse else zt2
    assert get_method(name)(zs2, target2, labels, **options).item() == pytest.approx(loss.item(), rel=1e-12)
    # a bool mask is the same as the labels' mask
    assert get_method(name)(zs2, target2, ~masked, **options).item() == pytest.approx(loss.item(), rel=1e-12)
    # no position counted: 0, with a (zero) gradient
    none = get_method(name)(zs, target, torch.full_like(labels, IGNORE_INDEX), **options)
    assert none.item() == 0.0 and none.requires_grad


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize(("name", "options", "ref"), KINDS)
def test_gradients_finite_at_extreme_logits(name, options, ref, sparse) -> None:
    g = torch.Generator().manual_seed(5)
    zs = (torch.randn(B, S, V, generator=g) * 30).requires_grad_(True)
    zs.data[1, 2] *= 1e3  # a saturated student row as well
    zt = torch.randn(B, S, V, generator=g) * 1e4
    zt[0, 1] = -1e30
    zt[0, 1, 2] = 1e30  # a one-hot teacher: the top-3 mass rounds to 1, the rest bucket to 0
    labels = torch.zeros(B, S, dtype=torch.long)
    target = TokenTargets.topk(zt, 3) if sparse else zt
    loss = get_method(name)(zs, target, labels, **options)
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(zs.grad).all())
    assert bool((zs.grad != 0).any())


def test_gjsd_beta_limits(batch) -> None:
    zs, zt, labels = batch
    m = get_method("token-gjsd")
    fkl = get_method("token-fkl")(zs, zt, labels).item()
    rkl = get_method("token-rkl")(zs, zt, labels).item()
    assert m(zs, zt, labels, beta=0.0).item() == fkl  # TRL: beta = 0 is forward KL
    assert m(zs, zt, labels, beta=1.0).item() == rkl  # and beta = 1 reverse KL
    eps = 1e-8  # the mixture form is JSD = beta * fkl + O(beta^2); float64 keeps the 1e-8 scale exact
    assert m(zs, zt, labels, beta=eps).item() / eps == pytest.approx(fkl, rel=1e-4)
    assert m(zs, zt, labels, beta=1 - eps).item() / eps == pytest.approx(rkl, rel=1e-4)
    assert m(zs, zt, labels, beta=eps).item() < 1e-7  # the mixture form itself vanishes at the ends
    mid = m(zs, zt, labels, beta=0.5).item()
    assert 0 < mid <= math.log(2) + 1e-12  # the symmetric JSD is bounded by log 2
    # skew KL at alpha = 0 is the plain KL in each direction
    assert get_method("token-skl")(zs, zt, labels, alpha=0.0).item() == fkl
    assert get_method("token-skl")(zs, zt, labels, alpha=0.0, reverse=True).item() == rkl


def test_ce_weight_adds_next_token_cross_entropy(batch) -> None:
    zs, zt, labels = batch
    base = get_method("token-fkl")(zs, zt, labels).item()
    both = get_method("token-fkl")(zs, zt, labels, ce_weight=0.5).item()
    ce, n = 0.0, 0
    for b in range(B):
        for s in range(S):
            if int(labels[b, s]) != IGNORE_INDEX:
                ce -= math.log(_softmax(zs[b, s].tolist(), 1.0)[int(labels[b, s])])
                n += 1
    assert both == pytest.approx(base + 0.5 * ce / n, rel=1e-10)


def test_bad_input_is_refused(batch) -> None:
    zs, zt, labels = batch
    with pytest.raises(ValueError, match="beta=1.5 must be >= 0 and <= 1"):
        get_method("token-gjsd")(zs, zt, labels, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        get_method("token-fkl")(zs, zt, labels, temperature=0.0)
    with pytest.raises(ValueError, match="only known there"):
        get_method("token-rkl")(zs, TokenTargets.topk(zt, 3, temperature=1.0), labels, temperature=2.0)
    dup = TokenTargets.topk(zt, 3)
    dup.ids[0, 0, 1] = dup.ids[0, 0, 0]
    with pytest.raises(ValueError, match="same id twice"):
        get_method("token-fkl")(zs, dup, labels)
    with pytest.raises(ValueError, match="teacher logits"):
        get_method("token-tv")(zs, zt[:, :2], labels)
    with pytest.raises(ValueError, match="ids must lie in"):
        TokenTargets(torch.full((1, 1, 2), V), V, counts=torch.ones(1, 1, 2))
    for name in ("token-fkl", "token-rkl", "token-gjsd", "token-tv", "token-skl"):
        assert get_method(name).accepts_sparse


# -- metrics ----------------------------------------------------------------------------------
def test_perplexity_and_accuracy(batch) -> None:
    zs, _, labels = batch
    nll, correct, n = 0.0, 0, 0
    for b in range(B):
        for s in range(S):
            y = int(labels[b, s])
            if y == IGNORE_INDEX:
                continue
            q = _softmax(zs[b, s].tolist(), 1.0)
            nll -= math.log(q[y])
            correct += int(max(range(V), key=lambda i: q[i]) == y)
            n += 1
    assert perplexity(zs, labels) == pytest.approx(math.exp(nll / n), rel=1e-10)
    assert next_token_accuracy(zs, labels) == correct / n
    # accumulated over two halves = over the whole
    m = TokenMetrics().update(zs[:1], labels[:1]).update(zs[1:], labels[1:])
    assert m.tokens == n and m.perplexity == pytest.approx(math.exp(nll / n), rel=1e-10)


def test_evaluate_tokens_on_a_validation_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path / "kd-cache"))
    rows = [{"q": "2+2=", "a": "4"}, {"q": "say hi: ", "a": "hi there"}, {"q": "x", "a": "yz"}]
    f = tmp_path / "val.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = open_source(f"jsonl:{f}?prompt=q&completion=a&pack=0")
    torch.manual_seed(0)
    model = torch.nn.Embedding(src.vocab_size, src.vocab_size)  # a bigram LM: logits from the current token
    metrics = evaluate_tokens(model, src, batch_size=2)
    nll, correct, n = 0.0, 0, 0
    tok = src.tokenizer
    for r in rows:
        ids = [tok.bos_id, *tok.encode(r["q"]), *tok.encode(r["a"]), tok.eos_id]
        first_target = 1 + len(tok.encode(r["q"]))
        for pos in range(first_target, len(ids)):  # completion tokens and eos are the targets
            logits = model.weight[ids[pos - 1]].detach().double().tolist()
            q = _softmax(logits, 1.0)
            nll -= math.log(q[ids[pos]])
            correct += int(max(range(len(q)), key=lambda i: q[i]) == ids[pos])
            n += 1
    assert metrics.tokens == n == 1 + 1 + 8 + 1 + 2 + 1
    assert metrics.perplexity == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert metrics.accuracy == correct / n
    b = src.batch([0, 1])
    labels = next_token_labels(b.tokens, b.loss_mask)
    assert int((labels != IGNORE_INDEX).sum()) == 2 + 9


def test_classifier_logits_are_one_position_per_sample() -> None:
    """[B, C] logits with [B] labels: the token losses are plain logit methods (Hinton KD's value)."""
    g = torch.Generator().manual_seed(2)
    zs, zt = torch.randn(8, 10, generator=g, dtype=torch.float64), torch.randn(8, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (8,), generator=g)
    for t in (1.0, 4.0):
        want = get_method("kd")(zs, zt, y, temperature=t, alpha=1.0).item()
        assert get_method("token-fkl")(zs, zt, y, temperature=t).item() == pytest.approx(want, rel=1e-12)
    labels = y[:, None]
    for name, options, ref in KINDS:
        want = ref_dense(ref, zs[:, None], zt[:, None], labels, 1.0, **_opts(ref, options))
        assert get_method(name)(zs, zt, y, **options).item() == pytest.approx(want, rel=1e-10)


def test_cache_sample_targets_become_counts() -> None:
    """A cache's ``sample:K`` record (draws merged into unique ids with counts, unused slots count 0)
    becomes TokenTargets counts; its forward-KL gradient is the one kd's sparse_kl gives for the same draws."""
    from kd.core.sparse import unique_counts
    from kd.core.targets import sparse_kl
    from kd.student_trainer.losses.token_kd import _as_token_targets

    g = torch.Generator().manual_seed(4)
    zs, zt = torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g) * 2
    ids = torch.multinomial(torch.softmax(zt, 1), 12, replacement=True, generator=g)
    uid, cnt = unique_counts(ids)
    st = SparseTargets("sample", uid, cnt.float(), cnt.sum(1).float(), 9, 1.0)
    tt = _as_token_targets(st)
    for r in range(6):
        got = {i: c for i, c in zip(tt.ids[r, 0].tolist(), tt.counts[r, 0].tolist()) if i >= 0}
        assert got == {i: float(ids[r].tolist().count(i)) for i in set(ids[r].tolist())}
    a = zs.clone().requires_grad_(True)
    get_method("token-fkl")(a, st, torch.zeros(6, dtype=torch.long)).backward()
    b = zs.clone().requires_grad_(True)
    sparse_kl(b, st, 1.0).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
