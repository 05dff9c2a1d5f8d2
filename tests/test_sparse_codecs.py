"""Sparse targets whose loss is minimised by the teacher: topk:K + rest bucket, rand:M subsets,
sample:K counts (Anshumann et al. 2025), the quantised dense codecs q8/q4, and codec versions.

Every loss is checked against a float64 reference written here from the definitions."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch

from kd.cache import CacheMeta, CacheReader, CacheWriter, StaleCacheError
from kd.cache.codecs import CODEC_VERSION, GAUSS_STEP, LowRankBasis, bytes_per_sample, covered_mass, get_codec
from kd.cache.store import META_KEY
from kd.core.targets import SparseTargets, sparse_kl
from kd.student_trainer.losses import get_method
from kd.student_trainer.losses.kd import soft_kl


def teacher_logits(rows: int, classes: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, classes, generator=g) * 2
    z[:, :3] += 5  # a few dominant classes, a long tail (most of the mass at T = 4 is outside any small top-k)
    return z


def keys_of(n: int, start: int = 0) -> np.ndarray:
    return np.stack([np.arange(start, start + n), np.zeros(n, dtype=np.int64)], axis=1)


def bucket_kl64(p_stored: list[list[float]], q_logits: torch.Tensor, ids: torch.Tensor, t: float) -> float:
    """float64, by the definition: KL over the stored classes plus one rest bucket, batch mean.
    ``p_stored[r]``: the teacher's probabilities at ``ids[r]``; the rest bucket holds 1 - their sum."""
    total = 0.0
    for r, row in enumerate(p_stored):
        z = [float(v) / t for v in q_logits[r]]
        m = max(z)
        norm = m + math.log(sum(math.exp(v - m) for v in z))
        q = [math.exp(v - norm) for v in z]
        stored = [int(i) for i in ids[r]]
        q_rest = sum(qv for c, qv in enumerate(q) if c not in stored)
        p_rest = 1.0 - sum(row)
        total += sum(p * math.log(p / q[c]) for p, c in zip(row, stored) if p > 0)
        if len(set(stored)) < len(q):
            total += p_rest * math.log(p_rest / q_rest)
    return total / len(p_stored)


# ---------------------------------------------------------------- topk:K + rest bucket


def test_topk_rest_bucket_kl_matches_the_float64_definition() -> None:
    z, tc = teacher_logits(6, 40), 2.0
    codec = get_codec("topk:5", tc)
    t = codec.decode_targets(codec.encode(z), 40)
    student = torch.randn(6, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    # The reference from the stored record (fp16 values, fp32 lse), so the comparison is tight ...
    p = [[math.exp(float(v) / tc - float(t.logsumexp[r])) for v in t.logits[r]] for r in range(6)]
    assert float(sparse_kl(student, t, tc)) == pytest.approx(bucket_kl64(p, student, t.indices, tc), rel=1e-9)
    # ... and from the exact teacher: the stored record loses only fp16 rounding.
    exact = torch.softmax(z.double() / tc, 1)
    p_exact = [[float(exact[r, c]) for c in t.indices[r]] for r in range(6)]
    assert float(sparse_kl(student, t, tc)) == pytest.approx(bucket_kl64(p_exact, student, t.indices, tc), rel=2e-3)
    # kd's soft term is T^2 times that KL.
    labels = torch.zeros(6, dtype=torch.long)
    want = tc**2 * bucket_kl64(p, student, t.indices, tc)
    assert float(get_method("kd")(student, t, labels, temperature=tc, alpha=1.0)) == pytest.approx(want, rel=1e-9)


def test_topk_loss_is_minimised_by_the_teacher_not_by_an_even_tail() -> None:
    """The audit's fault: spreading the rest evenly over the other classes makes a student that
    equals the teacher pay a large loss (and pulls its tail flat). With the rest bucket the
    teacher itself has (up to fp16 rounding) zero loss and zero gradient."""
    z, tc = teacher_logits(8, 200, seed=2), 4.0
    codec = get_codec("topk:10", tc)
    t = codec.decode_targets(codec.encode(z), 200)
    assert float(covered_mass(t).mean()) < 0.6  # most of the mass at T = 4 is in the rest
    student = z.double().clone().requires_grad_(True)
    loss = sparse_kl(student, t, tc)
    loss.backward()
    assert float(loss.detach()) < 1e-5
    old = z.double().clone().requires_grad_(True)
    even = soft_kl(old, t.dense().double(), tc)  # the old loss on the same student
    even.backward()
    assert float(even.detach()) > 0.05
    assert float(student.grad.norm()) < 0.02 * float(old.grad.norm())  # fp16 rounding vs a pull on the tail


def test_topk_at_another_temperature_uses_the_documented_model() -> None:
    """At T != T_c the rest is modelled as C - K equal logits with the exact rest mass at T_c:
    the buckets of the dense maximum-entropy completion at T."""
    z, tc, t_train = teacher_logits(5, 30, seed=3), 1.0, 3.0
    codec = get_codec("topk:4", tc)
    t = codec.decode_targets(codec.encode(z), 30)
    student = torch.randn(5, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    p_dense = torch.softmax(t.dense().double() / t_train, 1)
    p = [[float(p_dense[r, c]) for c in t.indices[r]] for r in range(5)]
    assert float(sparse_kl(student, t, t_train)) == pytest.approx(bucket_kl64(p, student, t.indices, t_train), rel=1e-9)
    mass = covered_mass(t, t_train)
    torch.testing.assert_close(mass, torch.tensor([sum(row) for row in p], dtype=torch.float64), rtol=1e-9, atol=0)


# ---------------------------------------------------------------- rand:M


def test_rand_subset_round_trip_and_rest_bucket() -> None:
    z, tc, c = teacher_logits(16, 300, seed=5), 4.0, 300
    codec = get_codec("rand:40", tc)
    assert codec.record_bytes(c) == 4 + 20  # fp16 step and log-covered mass, 40 nibbles: no ids stored
    keys = keys_of(16, start=100)
    t = codec.decode_targets(codec.encode(z, keys), c, keys)
    assert t.kind == "subset" and t.indices.shape == (16, 40)
    assert torch.equal(t.indices, torch.from_numpy(codec.class_ids(keys, c)))  # a function of the keys only
    assert all(len(set(row.tolist())) == 40 for row in t.indices)
    other = codec.class_ids(keys_of(16, start=200), c)
    assert not np.array_equal(other, t.indices.numpy())
    exact = torch.softmax(z.double() / tc, 1)
    p_exact = exact.gather(1, t.indices)
    # The covered mass is stored exactly (fp16 of its log); each probability within the 4-bit step.
    torch.testing.assert_close(covered_mass(t), p_exact.sum(1), rtol=2e-3, atol=0)
    step = float(torch.log(p_exact.max(1).values / p_exact.min(1).values).clamp(max=12).max()) / 15
    err = (torch.log(torch.exp(t.logits.double() / tc)) - torch.log(p_exact)).abs()
    assert float(err.max()) <= step + 0.02
    student = torch.randn(16, c, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    p = [[math.exp(float(v) / tc) for v in t.logits[r]] for r in range(16)]
    assert float(sparse_kl(student, t, tc)) == pytest.approx(bucket_kl64(p, student, t.indices, tc), rel=1e-6)
    # Fewer bits, more classes in the same bytes: rand:74b3 (7 steps) fits 32 bytes.
    c3 = get_codec("rand:74b3", tc)
    assert c3.record_bytes(c) == 4 + 28
    t3 = c3.decode_targets(c3.encode(z, keys), c, keys)
    p3 = exact.gather(1, t3.indices)
    torch.testing.assert_close(covered_mass(t3), p3.sum(1), rtol=2e-3, atol=0)
    step3 = float(torch.log(p3.max(1).values / p3.min(1).values).clamp(max=12).max()) / 7
    assert float((t3.logits.double() / tc - torch.log(p3)).abs().max()) <= step3 + 0.02
    with pytest.raises(ValueError, match="only known there"):
        sparse_kl(student, t, 1.0)
    with pytest.raises(ValueError, match="pass keys"):
        codec.encode(z)
    with pytest.raises(ValueError, match="no dense form"):
        t.dense()


# ---------------------------------------------------------------- sample:K (counts)


def test_sample_counts_loss_matches_the_float64_definition() -> None:
    """sample:K: unique ids with counts drawn at T = 1; the loss is KL(counts / N || q)."""
    z = teacher_logits(6, 25, seed=7)
    codec = get_codec("sample:20")
    assert codec.temperature == 1.0 and codec.record_bytes(25) == 20 * 2  # uint8 id + uint8 count
    keys = keys_of(6)
    t = codec.decode_targets(codec.encode(z, keys), 25, keys)
    assert t.kind == "sample"
    assert torch.equal(t.counts.sum(1), torch.full((6,), 20.0))
    student = torch.randn(6, 25, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    want = 0.0
    for r in range(6):
        zr = [float(v) for v in student[r]]
        m = max(zr)
        norm = m + math.log(sum(math.exp(v - m) for v in zr))
        for i, n in zip(t.indices[r].tolist(), t.counts[r].tolist()):
            if n > 0:
                want += (n / 20) * (math.log(n / 20) - (zr[i] - norm))
    assert float(sparse_kl(student, t, 1.0)) == pytest.approx(want / 6, rel=1e-9)
    with pytest.raises(ValueError, match="drawn at temperature 1"):
        sparse_kl(student, t, 4.0)
    with pytest.raises(ValueError, match="no dense form"):
        codec.decode(codec.encode(z, keys), 25)


def test_sample_draws_follow_the_teacher_at_t1_and_the_record_key() -> None:
    z = teacher_logits(1, 12, seed=9).expand(3000, 12)
    codec = get_codec("sample:8")
    keys = keys_of(3000)
    raw = codec.encode(z, keys)
    assert np.array_equal(raw, codec.encode(z, keys))  # a function of (logits, key)
    assert not np.array_equal(raw[:100], codec.encode(z[:100], keys_of(100, start=5000)))
    t = codec.decode_targets(raw, 12, keys)
    freq = torch.zeros(12, dtype=torch.float64).index_add_(0, t.indices.flatten(), t.counts.flatten().double())
    freq /= freq.sum()
    p = torch.softmax(z[0].double(), 0)  # T = 1: the paper's, not the KD temperature
    sigma = (p * (1 - p) / (3000 * 8)).sqrt()
    assert bool(((freq - p).abs() <= 5 * sigma + 1e-12).all()), (freq - p).abs().max()


def test_sample_rounds_resample_per_read() -> None:
    """sample:KxR stores R independent rounds; a read uses one per record (torch's RNG)."""
    z = teacher_logits(64, 50, seed=10) / 4  # flat: rounds differ
    codec = get_codec("sample:6x3")
    assert codec.record_bytes(50) == 3 * 6 * 2
    keys = keys_of(64)
    raw = codec.encode(z, keys)
    ids, counts = codec.decode_rounds(raw, 50)
    assert torch.equal(counts.sum(2), torch.full((64, 3), 6.0))
    assert not torch.equal(ids[:, 0], ids[:, 1])
    torch.manual_seed(0)
    a = codec.decode_targets(raw, 50, keys)
    torch.manual_seed(0)
    b = codec.decode_targets(raw, 50, keys)
    assert torch.equal(a.indices, b.indices)  # seeded runs repeat
    seen = set()
    for _ in range(12):
        t = codec.decode_targets(raw, 50, keys)
        seen.update(r for r in range(3) if torch.equal(t.indices[0], ids[0, r]))
    assert seen == {0, 1, 2}
    with pytest.raises(ValueError, match="K must be a positive integer"):
        get_codec("topk:6x3")


# ---------------------------------------------------------------- q8 / q4


@pytest.mark.parametrize(("name", "nbytes", "kl_bound"), [("q8", 4 + 1000, 2e-5), ("q4", 4 + 500, 2e-2)])
def test_quantised_dense_codecs(name: str, nbytes: int, kl_bound: float) -> None:
    z = torch.randn(32, 1000, generator=torch.Generator().manual_seed(11)) * 0.7  # a flat teacher
    codec = get_codec(name, 4.0)
    assert codec.record_bytes(1000) == nbytes
    raw = codec.encode(z)
    assert raw.shape == (32, nbytes)
    dec = codec.decode(raw, 1000)
    lp = torch.log_softmax(z.double() / 4, 1)
    lq = torch.log_softmax(dec.double() / 4, 1)
    shift = (lp - lq).mean(1, keepdim=True)  # compare shapes: each value within half a step
    step = (lp.max(1).values - lp.min(1).values) / codec.levels
    assert bool(((lp - lq - shift).abs() <= step[:, None] + 1e-6).all())
    kl = float((lp.exp() * (lp - lq)).sum(1).mean())
    assert 0 < kl < kl_bound


# ---------------------------------------------------------------- versions


def _meta(**kw: object) -> CacheMeta:
    base = dict(teacher_fingerprint="t", dataset_id="d", dataset_size=4, codec="sample:4", num_classes=10)
    return CacheMeta(**{**base, **kw})


def test_codec_version_is_stored_and_old_sample_caches_are_refused(tmp_path: Path) -> None:
    meta = _meta()
    assert meta.codec_version == CODEC_VERSION == 3
    with CacheWriter(tmp_path / "new", meta) as w:
        w.put(range(4), teacher_logits(4, 10))
    assert CacheReader(tmp_path / "new").meta.codec_version == 3
    # A cache written before the field (plain JSON metadata, as version 1 wrote it).
    for codec, refused in (("sample:4", True), ("topk:3", False)):
        path = tmp_path / codec.replace(":", "-")
        body = {k: v for k, v in json.loads(_meta(codec=codec, temperature=4.0).to_json().split(b"\ncrc32=")[0]).items()
                if k != "codec_version"}  # fmt: skip
        env = lmdb.open(str(path), map_size=1 << 20)
        with env.begin(write=True) as txn:
            txn.put(META_KEY, json.dumps(body).encode())
        env.close()
        if refused:
            with pytest.raises(StaleCacheError, match="codec version 1.*rebuild it with `kd precompute"):
                CacheReader(path)
            with pytest.raises(StaleCacheError, match="codec version 1"):  # nor resumed
                CacheWriter(path, _meta(codec=codec, temperature=4.0))
        else:  # the same layout: read, and resumed
            with CacheWriter(path, _meta(codec=codec, temperature=4.0)) as w:
                w.put([1], teacher_logits(1, 10))
            reader = CacheReader(path)
            assert reader.meta.codec_version == 1 and isinstance(reader.targets([1]), SparseTargets)
    with pytest.raises(ValueError, match="newer than this kd"):
        get_codec("fp32", version=CODEC_VERSION + 1)


def test_bench_kl_table_runs_every_new_codec() -> None:
    """kd bench cache's KL table takes the new codecs (rand:M derives its classes from the keys)."""
    from kd.bench.cache import CacheBenchSettings, kl_errors

    s = replace(CacheBenchSettings.make(quick=True), kl_rows=4, kl_draws=2, kl_classes=100)
    out = kl_errors(s, ("topk:10", "rand:32", "sample:12", "q4"))
    assert out["q4"]["kl_rel_error_T4"] < 0.05
    assert out["topk:10"]["kl_rel_error_T4"] > 0  # a bias (the KL of the buckets), reported
    assert math.isfinite(out["sample:12"]["kl_rel_error_T1"]) and math.isfinite(out["rand:32"]["kl_rel_error_T4"])


def test_cache_info_reports_the_covered_mass(tmp_path: Path) -> None:
    """`kd cache info` on a topk cache: the mass its K classes hold at the cache temperature."""
    from typer.testing import CliRunner

    from kd.cli import app

    z = teacher_logits(20, 100, seed=12)
    with CacheWriter(tmp_path / "c", _meta(codec="topk:5", num_classes=100, dataset_size=20, temperature=4.0)) as w:
        w.put(range(20), z)
    r = CliRunner().invoke(app, ["cache", "info", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    mass = json.loads(r.output)["covered_mass"]
    exact = torch.softmax(z.double() / 4, 1).topk(5, dim=1).values.sum(1)
    assert mass["temperature"] == 4.0 and mass["records"] == 20
    assert mass["mean"] == pytest.approx(float(exact.mean()), rel=2e-3)
    assert mass["min"] == pytest.approx(float(exact.min()), rel=2e-3)


# ---------------------------------------------------------------- pca:K (low-rank basis)


def low_rank_logits(rows: int, classes: int, rank: int, seed: int = 0) -> torch.Tensor:
    """Logits W h + b with h of width ``rank``: what a teacher's last linear layer makes."""
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(classes, rank, generator=g), torch.randn(classes, generator=g)
    return torch.randn(rows, rank, generator=g) @ w.T * 0.8 + b


def test_pca_decode_and_kd_loss_match_the_float64_definition() -> None:
    c, k = 40, 6
    z = low_rank_logits(48, c, rank=10, seed=20)
    basis = LowRankBasis.fit(z[:32], k)  # fitted on the first records, used for all
    codec = get_codec("pca:6b4", basis=basis)
    assert codec.record_bytes(c) == 3 and bytes_per_sample("pca:6b4", c) == 3 + 8  # 24 bits, no header
    dec = codec.decode(codec.encode(z), c).double()
    # float64 reference, by the definition: centre each row, subtract the mean row, project,
    # take the cell of each coefficient (step GAUSS_STEP[4] * sigma_j, 16 cells), rebuild from the midpoints.
    mean, comps, sigma = basis.mean.astype(float).tolist(), basis.components.astype(float).tolist(), basis.sigma
    ref = []
    for r in range(48):
        row = [float(v) for v in z[r]]
        x = [v - sum(row) / c - m for v, m in zip(row, mean)]
        out = list(mean)
        for j in range(k):
            step = GAUSS_STEP[4] * float(sigma[j])
            cell = min(max(math.floor(sum(a * b for a, b in zip(x, comps[j])) / step), -8), 7)
            out = [o + (cell + 0.5) * step * v for o, v in zip(out, comps[j])]
        ref.append(out)
    torch.testing.assert_close(dec, torch.tensor(ref, dtype=torch.float64), rtol=0, atol=2e-5)
    # The KD loss on the decoded logits is the dense KL (any temperature: the record holds no T).
    student = torch.randn(48, c, dtype=torch.float64, generator=torch.Generator().manual_seed(21))
    labels = torch.zeros(48, dtype=torch.long)
    for t in (1.0, 4.0):
        want = 0.0
        for r in range(48):
            p = torch.softmax(torch.tensor(ref[r], dtype=torch.float64) / t, 0).tolist()
            q = torch.softmax(student[r] / t, 0).tolist()
            want += sum(a * math.log(a / b) for a, b in zip(p, q))
        got = get_method("kd")(student, dec, labels, temperature=t, alpha=1.0)
        assert float(got) == pytest.approx(t * t * want / 48, rel=1e-5)


def test_pca_exact_for_a_low_rank_teacher_up_to_its_step() -> None:
    """Logits of rank r (plus a per-row constant) lie in a rank-r basis: only quantisation remains,
    at most half a step per coefficient (none is clipped at 8 bits), and more bits shrink it."""
    c, r = 300, 8
    z = low_rank_logits(64, c, rank=r - 1, seed=22) + torch.randn(64, 1, generator=torch.Generator().manual_seed(2))
    basis = LowRankBasis.fit(z, r)
    errs = []
    for bits in (3, 8):
        codec = get_codec(f"pca:{r}b{bits}", basis=basis)
        dec = codec.decode(codec.encode(z), c).double()
        x = z.double() - z.double().mean(1, keepdim=True)
        err = (dec - dec.mean(1, keepdim=True)) - x
        errs.append(float(err.abs().max()))
        if bits == 8:
            bound = 0.5 * torch.from_numpy(codec.steps(c)) @ torch.from_numpy(basis.components).double().abs()
            assert bool((err.abs() <= bound + 1e-4).all())
    assert errs[1] < errs[0] / 10


def test_pca_basis_bytes_checksum_and_errors() -> None:
    z = low_rank_logits(20, 30, rank=5, seed=23)
    basis = LowRankBasis.fit(z, 4)
    raw = basis.to_bytes()
    assert len(raw) == LowRankBasis.size(30, 4) == 20 + 4 * 30 + 4 * 4 + 2 * 4 * 30  # fp16 components
    back = LowRankBasis.from_bytes(raw)
    assert np.array_equal(back.components, basis.components) and np.array_equal(back.sigma, basis.sigma)
    codec = get_codec("pca:4", basis=raw)
    assert np.array_equal(codec.encode(z), get_codec("pca:4", basis=basis).encode(z))
    bad = bytearray(raw)
    bad[100] ^= 1
    with pytest.raises(ValueError, match="checksum"):
        LowRankBasis.from_bytes(bytes(bad))
    with pytest.raises(ValueError, match="needs its low-rank basis"):
        get_codec("pca:4").encode(z)
    with pytest.raises(ValueError, match="rank 5 or more"):
        get_codec("pca:5", basis=basis)
    with pytest.raises(ValueError, match="the basis has 30 classes, the rows 31"):
        codec.encode(torch.zeros(2, 31))
    with pytest.raises(ValueError, match="NaN or Inf"):
        codec.encode(torch.full((2, 30), math.nan))
    for name in ("pca:0", "pca:4b9", "pca:x"):
        with pytest.raises(ValueError, match="pca:"):
            get_codec(name)
