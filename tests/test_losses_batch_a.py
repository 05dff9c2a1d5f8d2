"""Logit methods ``dkd``, ``dist``, ``spherical``, ``noisy`` against hand-written float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference import make_batch, np64, ref_softmax

from kd.core.targets import SparseTargets
from kd.student_trainer.losses import get_method
from kd.student_trainer.losses.dist import dist_loss
from kd.student_trainer.losses.dkd import dkd_loss
from kd.student_trainer.losses.kd import kd_loss
from kd.student_trainer.losses.noisy import noisy_teacher_loss, perturb_teacher
from kd.student_trainer.losses.spherical import spherical_loss

# ---------------------------------------------------------------------------
# Independent references: numpy float64, explicit exp / sum / log.
# ---------------------------------------------------------------------------


def ref_logsumexp(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    m = a.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=1, keepdims=True)))[:, 0]


def ref_log_softmax(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a - ref_logsumexp(a)[:, None]


def ref_ce(zs: np.ndarray, labels: np.ndarray) -> float:
    return float(-ref_log_softmax(zs)[np.arange(len(labels)), labels].mean())


def ref_kl_rows(log_pt: np.ndarray, log_ps: np.ndarray) -> np.ndarray:
    """Per-row sum_c p_t (log p_t - log p_s)."""
    return (np.exp(log_pt) * (log_pt - log_ps)).sum(axis=1)


def ref_t2_kl(zs: np.ndarray, zt: np.ndarray, t: float) -> float:
    return float(t**2 * ref_kl_rows(ref_log_softmax(zt / t), ref_log_softmax(zs / t)).mean())


def ref_kd(zs: np.ndarray, zt: np.ndarray, labels: np.ndarray, t: float, alpha: float) -> float:
    return alpha * ref_t2_kl(zs, zt, t) + (1 - alpha) * ref_ce(zs, labels)


def extreme_batch(batch: int = 8, classes: int = 10, seed: int = 13) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 logits of +-1e4: every softmax saturates."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (batch, classes), generator=g).float() * 2 - 1
    zs = (signs * 1e4).requires_grad_(True)
    zt = -signs.roll(1, dims=1) * 1e4
    y = torch.randint(0, classes, (batch,), generator=g)
    return zs, zt, y


# --- DKD -------------------------------------------------------------------


def ref_dkd_parts(zs: np.ndarray, zt: np.ndarray, y: np.ndarray, t: float) -> tuple[float, float]:
    """(TCKD, NCKD), each T^2 * batchmean KL; the non-target softmax drops the label's column."""
    tckd, nckd = [], []
    for i in range(len(y)):
        rows = []
        for z in (zs[i] / t, zt[i] / t):
            others = np.delete(z, y[i])
            m_all, m_oth = z.max(), others.max()
            lse_all = m_all + math.log(np.exp(z - m_all).sum())
            lse_oth = m_oth + math.log(np.exp(others - m_oth).sum())
            log_b = np.array([z[y[i]] - lse_all, lse_oth - lse_all])
            log_q = others - lse_oth
            rows.append((log_b, log_q))
        (lb_s, lq_s), (lb_t, lq_t) = rows
        tckd.append((np.exp(lb_t) * (lb_t - lb_s)).sum())
        nckd.append((np.exp(lq_t) * (lq_t - lq_s)).sum())
    return float(t**2 * np.mean(tckd)), float(t**2 * np.mean(nckd))


def ref_dkd(
    zs: np.ndarray,
    zt: np.ndarray,
    y: np.ndarray,
    *,
    epoch: int,
    alpha: float,
    beta: float,
    t: float,
    warmup: int,
    ce_weight: float,
) -> float:
    tckd, nckd = ref_dkd_parts(zs, zt, y, t)
    w = 1.0 if warmup == 0 else min((epoch + 1) / warmup, 1.0)
    return ce_weight * ref_ce(zs, y) + w * (alpha * tckd + beta * nckd)


def ref_dkd_mdistiller(zs: np.ndarray, zt: np.ndarray, y: np.ndarray, t: float, alpha: float, beta: float) -> float:
    """mdistiller's formulation (probability sums, then log; target masked by -1000 at scale z/T)."""
    b = len(y)
    gt = np.zeros_like(zs, dtype=bool)
    gt[np.arange(b), y] = True
    ps, pt = ref_softmax(zs / t), ref_softmax(zt / t)
    bs = np.stack([(ps * gt).sum(1), (ps * ~gt).sum(1)], 1)
    bt = np.stack([(pt * gt).sum(1), (pt * ~gt).sum(1)], 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        tckd = (bt * (np.log(bt) - np.log(bs))).sum() * t**2 / b if alpha else 0.0
    log_qs = ref_log_softmax(zs / t - 1000.0 * gt)
    qt = ref_softmax(zt / t - 1000.0 * gt)
    with np.errstate(divide="ignore", invalid="ignore"):  # kl_div's convention: 0 * log 0 = 0
        nckd = np.where(qt > 0, qt * (np.log(qt) - log_qs), 0.0).sum() * t**2 / b
    return float(alpha * tckd + beta * nckd)


@pytest.mark.parametrize("scale", [1.0, 5.0, 100.0, 1000.0])
@pytest.mark.parametrize(
    "alpha,beta,t,warmup,ce_weight",
    [(1.0, 8.0, 4.0, 20, 1.0), (1.0, 0.5, 1.0, 1, 1.0), (2.0, 3.0, 0.5, 0, 0.0), (0.0, 1.0, 10.0, 5, 0.3)],
)
def test_dkd_matches_reference_float64(
    alpha: float, beta: float, t: float, warmup: int, ce_weight: float, scale: float
) -> None:
    zs, zt, y = make_batch(7, 11, scale, seed=int(scale + 10 * t + beta))
    for epoch in [0, 3, 50]:
        got = dkd_loss(
            zs, zt, y, epoch=epoch, alpha=alpha, beta=beta, temperature=t, warmup=warmup, ce_weight=ce_weight
        )
        want = ref_dkd(
            np64(zs), np64(zt), y.numpy(), epoch=epoch, alpha=alpha, beta=beta, t=t, warmup=warmup, ce_weight=ce_weight
        )
        assert got.dtype == torch.float64 and got.shape == ()
        assert want > 0
        assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_dkd_matches_reference_float32() -> None:
    zs, zt, y = make_batch(16, 10, 3.0, seed=3, dtype=torch.float32)
    got = dkd_loss(zs, zt, y, epoch=7)
    want = ref_dkd(np64(zs), np64(zt), y.numpy(), epoch=7, alpha=1.0, beta=8.0, t=4.0, warmup=20, ce_weight=1.0)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_dkd_agrees_with_mdistiller_form_for_moderate_logits(t: float) -> None:
    zs, zt, y = make_batch(9, 12, 3.0, seed=41)
    got = dkd_loss(zs, zt, y, epoch=100, alpha=1.0, beta=8.0, temperature=t, ce_weight=0.0).item()
    assert got == pytest.approx(ref_dkd_mdistiller(np64(zs), np64(zt), y.numpy(), t, 1.0, 8.0), rel=1e-10)


def test_dkd_excludes_target_exactly_where_the_1000_mask_leaks() -> None:
    # The label's tempered logit is 3000 above the rest: subtracting 1000 leaves it dominant.
    zs = torch.tensor([[3000.0, 1.0, 2.0, 0.5]], dtype=torch.float64)
    zt = torch.tensor([[3000.0, 0.0, 2.5, 1.0]], dtype=torch.float64)
    y = torch.tensor([0])
    nckd = dkd_loss(zs, zt, y, epoch=100, alpha=0.0, beta=1.0, temperature=1.0, ce_weight=0.0).item()
    log_qs = ref_log_softmax(np64(zs)[:, 1:])
    log_qt = ref_log_softmax(np64(zt)[:, 1:])
    assert nckd == pytest.approx(float(ref_kl_rows(log_qt, log_qs)[0]), rel=1e-12)
    assert nckd > 0.05
    leaky = ref_dkd_mdistiller(np64(zs), np64(zt), y.numpy(), 1.0, 0.0, 1.0)
    assert leaky < 1e-6  # the masked softmax is still all on the label: NCKD vanishes


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dkd_decomposition_reproduces_kd_per_sample(t: float, seed: int) -> None:
    """Paper Eq. 1: KL(p_t||p_s) = TCKD + (1 - p_t,g) * NCKD, for one sample (so batchmean = per sample)."""
    zs, zt, y = make_batch(1, 9, 3.0, seed=seed)
    tckd = dkd_loss(zs, zt, y, epoch=100, alpha=1.0, beta=0.0, temperature=t, ce_weight=0.0).item()
    nckd = dkd_loss(zs, zt, y, epoch=100, alpha=0.0, beta=1.0, temperature=t, ce_weight=0.0).item()
    p_gt_t = ref_softmax(np64(zt) / t)[0, y.item()]
    assert tckd + (1 - p_gt_t) * nckd == pytest.approx(ref_t2_kl(np64(zs), np64(zt), t), rel=1e-10)


def test_dkd_warmup_schedule_is_mdistillers_with_0_based_epochs() -> None:
    zs, zt, y = make_batch(6, 8, 2.0, seed=5)
    kd_part = dkd_loss(zs, zt, y, epoch=10**6, ce_weight=0.0).item()
    ce = ref_ce(np64(zs), y.numpy())
    assert kd_part > 0
    # mdistiller: min(epoch_1based / 20, 1); 0-based epoch e is its epoch e + 1.
    for epoch, w in [(0, 1 / 20), (1, 2 / 20), (9, 10 / 20), (18, 19 / 20), (19, 1.0), (20, 1.0), (239, 1.0)]:
        got = dkd_loss(zs, zt, y, epoch=epoch).item()
        assert got == pytest.approx(ce + w * kd_part, rel=1e-12), epoch
    # warmup = 0: no warm-up; warmup = 1 (ImageNet): full weight from the first epoch.
    assert dkd_loss(zs, zt, y, epoch=0, warmup=0).item() == pytest.approx(ce + kd_part, rel=1e-12)
    assert dkd_loss(zs, zt, y, epoch=0, warmup=1).item() == pytest.approx(ce + kd_part, rel=1e-12)
    # The registry passes the training loop's epoch and refuses to run without it.
    m = get_method("dkd")
    assert m(zs, zt, y, epoch=4).item() == pytest.approx(ce + 5 / 20 * kd_part, rel=1e-12)
    with pytest.raises(ValueError, match="epoch"):
        m(zs, zt, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
@pytest.mark.parametrize("t", [0.5, 4.0])
def test_dkd_kd_parts_zero_when_student_equals_teacher(t: float, scale: float, dtype: torch.dtype) -> None:
    zs, _, y = make_batch(8, 10, scale, seed=2, dtype=dtype)
    only_kd = dkd_loss(zs, zs.clone(), y, epoch=100, temperature=t, ce_weight=0.0)
    assert abs(only_kd.item()) < 1e-6
    with_ce = dkd_loss(zs, zs.clone(), y, epoch=100, temperature=t)
    assert with_ce.item() == pytest.approx(ref_ce(np64(zs), y.numpy()), rel=1e-5)


def test_dkd_positive_when_only_non_target_classes_differ() -> None:
    zs, _, y = make_batch(4, 6, 2.0, seed=9)
    zt = zs.clone()
    other = (y[0].item() + 1) % 6
    zt[0, other] += 1.0
    tckd = dkd_loss(zs, zt, y, epoch=100, alpha=1.0, beta=0.0, ce_weight=0.0).item()
    nckd = dkd_loss(zs, zt, y, epoch=100, alpha=0.0, beta=1.0, ce_weight=0.0).item()
    assert tckd > 0 and nckd > 0
    # A change that scales all non-target probabilities alike leaves NCKD at zero: only TCKD sees it.
    zt2 = zs.clone()
    zt2[0, y[0]] += 1.0
    assert dkd_loss(zs, zt2, y, epoch=100, alpha=0.0, beta=1.0, ce_weight=0.0).item() == pytest.approx(0, abs=1e-14)
    assert dkd_loss(zs, zt2, y, epoch=100, alpha=1.0, beta=0.0, ce_weight=0.0).item() > 0


def test_dkd_two_classes_has_no_non_target_term() -> None:
    zs, zt, y = make_batch(5, 2, 2.0, seed=12)
    assert dkd_loss(zs, zt, y, epoch=100, alpha=0.0, beta=1.0, ce_weight=0.0).item() == 0.0
    # and TCKD is then the whole KD: b is the full distribution.
    tckd = dkd_loss(zs, zt, y, epoch=100, alpha=1.0, beta=0.0, ce_weight=0.0).item()
    assert tckd == pytest.approx(ref_t2_kl(np64(zs), np64(zt), 4.0), rel=1e-10)


@pytest.mark.parametrize("t", [0.5, 1.0, 4.0])
def test_dkd_gradient_finite_at_extreme_fp32_logits(t: float) -> None:
    zs, zt, y = extreme_batch()
    loss = dkd_loss(zs, zt, y, epoch=100, temperature=t)
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(zs.grad).all()
    want = ref_dkd(np64(zs), np64(zt), y.numpy(), epoch=100, alpha=1.0, beta=8.0, t=t, warmup=20, ce_weight=1.0)
    # fp32 log-probabilities of ~1e4 / T carry absolute errors of a few ulp(1e4 / T): ~1e-4 relative here
    assert loss.item() == pytest.approx(want, rel=1e-3)


def test_dkd_gradient_matches_finite_differences() -> None:
    zs, zt, y = make_batch(3, 5, 2.0, seed=17)
    f = lambda z: dkd_loss(z, zt, y, epoch=4, alpha=1.5, beta=2.0, temperature=2.0, warmup=10)  # noqa: E731
    assert torch.autograd.gradcheck(f, (zs.clone().requires_grad_(True),))


# --- DIST ------------------------------------------------------------------


def ref_pearson(a: np.ndarray, b: np.ndarray, eps: float = 1e-8) -> float:
    a = a - a.sum() / len(a)
    b = b - b.sum() / len(b)
    return float((a * b).sum() / (math.sqrt((a * a).sum()) * math.sqrt((b * b).sum()) + eps))


def ref_dist_parts(zs: np.ndarray, zt: np.ndarray, tau: float) -> tuple[float, float]:
    ys, yt = ref_softmax(zs / tau), ref_softmax(zt / tau)
    n, c = ys.shape
    inter = 1 - sum(ref_pearson(ys[i], yt[i]) for i in range(n)) / n
    intra = 1 - sum(ref_pearson(ys[:, j], yt[:, j]) for j in range(c)) / c
    return inter, intra


def ref_dist(
    zs: np.ndarray, zt: np.ndarray, y: np.ndarray, *, beta: float, gamma: float, tau: float, ce_weight: float
) -> float:
    inter, intra = ref_dist_parts(zs, zt, tau)
    return ce_weight * ref_ce(zs, y) + beta * tau**2 * inter + gamma * tau**2 * intra


@pytest.mark.parametrize("scale", [1.0, 5.0, 100.0, 1000.0])
@pytest.mark.parametrize(
    "beta,gamma,tau,ce_weight", [(1.0, 1.0, 1.0, 1.0), (2.0, 2.0, 4.0, 1.0), (1.0, 0.0, 0.5, 0.0), (0.0, 3.0, 2.0, 0.5)]
)
def test_dist_matches_reference_float64(beta: float, gamma: float, tau: float, ce_weight: float, scale: float) -> None:
    zs, zt, y = make_batch(9, 11, scale, seed=int(scale + 7 * tau + gamma))
    got = dist_loss(zs, zt, y, beta=beta, gamma=gamma, temperature=tau, ce_weight=ce_weight)
    want = ref_dist(np64(zs), np64(zt), y.numpy(), beta=beta, gamma=gamma, tau=tau, ce_weight=ce_weight)
    assert got.dtype == torch.float64 and got.shape == ()
    assert want > 0
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_dist_matches_reference_float32_and_exact_pearson() -> None:
    zs, zt, y = make_batch(16, 10, 3.0, seed=3, dtype=torch.float32)
    got = dist_loss(zs, zt, y)
    want = ref_dist(np64(zs), np64(zt), y.numpy(), beta=1.0, gamma=1.0, tau=1.0, ce_weight=1.0)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    # eps aside, the relations are 1 - Pearson r (numpy's corrcoef as a second, eps-free reference).
    ys, yt = ref_softmax(np64(zs)), ref_softmax(np64(zt))
    inter = 1 - np.mean([np.corrcoef(ys[i], yt[i])[0, 1] for i in range(16)])
    intra = 1 - np.mean([np.corrcoef(ys[:, j], yt[:, j])[0, 1] for j in range(10)])
    assert got.item() == pytest.approx(ref_ce(np64(zs), y.numpy()) + inter + intra, rel=1e-4)


def test_dist_tau_squared_is_applied() -> None:
    zs, zt, y = make_batch(8, 10, 2.0, seed=8)
    for tau in [0.5, 2.0, 4.0]:
        got = dist_loss(zs, zt, y, beta=1.0, gamma=0.0, temperature=tau, ce_weight=0.0).item()
        inter, _ = ref_dist_parts(np64(zs), np64(zt), tau)
        assert got == pytest.approx(tau**2 * inter, rel=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 5.0])
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_dist_relations_vanish_when_student_equals_teacher(tau: float, scale: float, dtype: torch.dtype) -> None:
    zs, _, y = make_batch(8, 10, scale, seed=2, dtype=dtype)
    zt = zs + torch.randn(8, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype) * 20
    # a per-row shift of the logits leaves softmax, hence both relations, unchanged
    rel = dist_loss(zs, zt, y, temperature=tau, ce_weight=0.0).item()
    assert 0 <= rel < 1e-4 * tau**2
    # and what remains is eps / (||.||^2 + eps), exactly as the reference computes it
    inter, intra = ref_dist_parts(np64(zs), np64(zs), tau)
    assert rel == pytest.approx(
        tau**2 * (inter + intra), rel=1e-3, abs=1e-6 * tau**2 if dtype == torch.float32 else 1e-14
    )


def test_dist_is_at_most_4_tau2_and_max_for_anticorrelated() -> None:
    zs, _, y = make_batch(6, 2, 3.0, seed=4)
    # two classes: y_t = 1 - y_s is perfectly anti-correlated row-wise and column-wise
    loss = dist_loss(zs, -zs, y, temperature=2.0, ce_weight=0.0).item()
    assert loss == pytest.approx(4 * 2.0**2, rel=1e-6)


def test_dist_high_temperature_inter_is_logit_pearson() -> None:
    """tau -> inf: softmax(z/tau) ~ 1/C + (z - mean z)/(C tau), and Pearson is affine invariant."""
    zs, zt, y = make_batch(10, 12, 3.0, seed=17)
    a, b = np64(zs), np64(zt)
    limit = 1 - np.mean([np.corrcoef(a[i], b[i])[0, 1] for i in range(10)])
    errs = {}
    for tau in [3.0, 10.0, 100.0]:
        got = dist_loss(zs, zt, y, beta=1.0, gamma=0.0, temperature=tau, ce_weight=0.0).item() / tau**2
        errs[tau] = abs(got - limit) / limit
    assert errs[100.0] < 1e-3
    assert errs[100.0] < errs[10.0] < errs[3.0]


@pytest.mark.parametrize("tau", [0.5, 1.0, 4.0])
def test_dist_gradient_finite_at_extreme_fp32_logits(tau: float) -> None:
    zs, zt, y = extreme_batch()
    loss = dist_loss(zs, zt, y, temperature=tau)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(zs.grad).all()
    want = ref_dist(np64(zs), np64(zt), y.numpy(), beta=1.0, gamma=1.0, tau=tau, ce_weight=1.0)
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_dist_constant_columns_and_single_sample_are_finite() -> None:
    # batch of 1: every column is constant, intra = 1 with zero gradient
    zs, zt, y = make_batch(1, 6, 2.0, seed=5)
    zs.requires_grad_(True)
    only_intra = dist_loss(zs, zt, y, beta=0.0, gamma=1.0, ce_weight=0.0)
    only_intra.backward()
    assert only_intra.item() == 1.0
    assert torch.equal(zs.grad, torch.zeros_like(zs))


def test_dist_gradient_matches_finite_differences() -> None:
    zs, zt, y = make_batch(4, 5, 2.0, seed=19)
    f = lambda z: dist_loss(z, zt, y, beta=1.0, gamma=2.0, temperature=2.0)  # noqa: E731
    assert torch.autograd.gradcheck(f, (zs.clone().requires_grad_(True),))


# --- Spherical -------------------------------------------------------------


def ref_sphere(z: np.ndarray, m: float, eps: float = 1e-7) -> np.ndarray:
    c = z.shape[1]
    centred = z - z.sum(axis=1, keepdims=True) / c
    var = (centred * centred).sum(axis=1, keepdims=True) / c
    return m * centred / np.sqrt(var + eps)


def ref_spherical(zs: np.ndarray, zt: np.ndarray, y: np.ndarray, *, t: float, m: float, alpha: float) -> float:
    ns, nt = ref_sphere(zs, m), ref_sphere(zt, m)
    return alpha * ref_t2_kl(ns, nt, t) + (1 - alpha) * ref_ce(ns, y)


@pytest.mark.parametrize("scale", [1.0, 5.0, 100.0, 1000.0])
@pytest.mark.parametrize("t,m,alpha", [(4.0, 2.0, 0.9), (1.0, 3.0, 0.5), (0.5, 1.0, 1.0), (10.0, 2.5, 0.0)])
def test_spherical_matches_reference_float64(t: float, m: float, alpha: float, scale: float) -> None:
    zs, zt, y = make_batch(7, 11, scale, seed=int(scale + 10 * t + m))
    got = spherical_loss(zs, zt, y, temperature=t, multiplier=m, alpha=alpha)
    want = ref_spherical(np64(zs), np64(zt), y.numpy(), t=t, m=m, alpha=alpha)
    assert got.dtype == torch.float64 and got.shape == ()
    assert want > 0
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_spherical_matches_reference_float32() -> None:
    zs, zt, y = make_batch(16, 10, 3.0, seed=3, dtype=torch.float32)
    got = spherical_loss(zs, zt, y)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref_spherical(np64(zs), np64(zt), y.numpy(), t=4.0, m=2.0, alpha=0.9), rel=1e-5)


def test_spherical_projects_onto_sphere_of_radius_m_sqrt_c() -> None:
    from kd.student_trainer.losses.spherical import spherical_normalize

    zs, _, _ = make_batch(5, 13, 7.0, seed=1)
    n = spherical_normalize(zs, 2.5)
    assert torch.allclose(n.sum(dim=1), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(n.norm(dim=1), torch.full((5,), 2.5 * math.sqrt(13), dtype=torch.float64), rtol=1e-8)


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_spherical_invariant_to_per_row_scale_and_shift(t: float) -> None:
    zs, zt, y = make_batch(6, 9, 3.0, seed=31)
    g = torch.Generator().manual_seed(99)
    a_s = torch.rand(6, 1, generator=g, dtype=torch.float64) * 10 + 0.1
    a_t = torch.rand(6, 1, generator=g, dtype=torch.float64) * 10 + 0.1
    b_s = torch.randn(6, 1, generator=g, dtype=torch.float64) * 50
    b_t = torch.randn(6, 1, generator=g, dtype=torch.float64) * 50
    base = spherical_loss(zs, zt, y, temperature=t, alpha=0.6).item()
    moved = spherical_loss(a_s * zs + b_s, a_t * zt + b_t, y, temperature=t, alpha=0.6).item()
    assert moved == pytest.approx(base, rel=1e-7)
    # plain KD is not scale invariant (guards against a test that cannot fail)
    assert kd_loss(a_s * zs, zt, y, temperature=t, alpha=0.6).item() != pytest.approx(
        kd_loss(zs, zt, y, temperature=t, alpha=0.6).item(), rel=1e-3
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
def test_spherical_zero_when_student_is_positive_affine_of_teacher(scale: float, dtype: torch.dtype) -> None:
    zs, _, y = make_batch(8, 10, scale, seed=2, dtype=dtype)
    assert abs(spherical_loss(zs, zs.clone(), y, alpha=1.0).item()) < 1e-6
    assert abs(spherical_loss(3 * zs + 7, zs, y, alpha=1.0).item()) < 1e-5
    # a negative scale flips the sphere: not a match
    assert spherical_loss(-zs, zs, y, alpha=1.0).item() > 0.1


def test_spherical_high_temperature_limit_is_matching_on_the_sphere() -> None:
    zs, zt, y = make_batch(10, 12, 3.0, seed=17)
    ns, nt = ref_sphere(np64(zs), 2.0), ref_sphere(np64(zt), 2.0)
    limit = float(((ns - nt) ** 2).sum(axis=1).mean() / (2 * 12))
    errs = {}
    for t in [10.0, 100.0, 1000.0]:
        errs[t] = abs(spherical_loss(zs, zt, y, temperature=t, alpha=1.0).item() - limit) / limit
    assert errs[1000.0] < 1e-3
    assert errs[1000.0] < errs[100.0] < errs[10.0]


def test_spherical_gradient_is_orthogonal_to_shift_and_scale() -> None:
    zs, zt, y = make_batch(5, 8, 4.0, seed=23)
    zs.requires_grad_(True)
    spherical_loss(zs, zt, y, alpha=0.7).backward()
    grad = zs.grad.numpy()
    centred = np64(zs) - np64(zs).mean(axis=1, keepdims=True)
    assert np.abs(grad.sum(axis=1)).max() < 1e-12  # shift invariance
    cos = (grad * centred).sum(axis=1) / (np.linalg.norm(grad, axis=1) * np.linalg.norm(centred, axis=1))
    assert np.abs(cos).max() < 1e-6  # scale invariance (up to eps / var)
    assert np.abs(grad).max() > 1e-3


@pytest.mark.parametrize("t", [0.5, 1.0, 4.0])
def test_spherical_gradient_finite_at_extreme_fp32_logits(t: float) -> None:
    zs, zt, y = extreme_batch()
    loss = spherical_loss(zs, zt, y, temperature=t)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(zs.grad).all()
    assert loss.item() == pytest.approx(ref_spherical(np64(zs), np64(zt), y.numpy(), t=t, m=2.0, alpha=0.9), rel=1e-5)
    # a constant row projects to the centre: uniform, finite
    flat = torch.full((2, 5), 3.0, requires_grad=True)
    spherical_loss(flat, torch.randn(2, 5), torch.tensor([0, 1])).backward()
    assert torch.isfinite(flat.grad).all()


# --- Noisy teacher ---------------------------------------------------------


def test_noisy_perturbation_statistics() -> None:
    b, c, frac, var = 20000, 10, 0.3, 0.1
    g = torch.Generator().manual_seed(0)
    z = torch.randn(b, c, generator=g, dtype=torch.float64) * 3 + 0.5
    out = perturb_teacher(z, frac, var, torch.Generator().manual_seed(1))
    changed = (out != z).any(dim=1)
    # fraction of perturbed rows ~ Binomial(b, frac) / b: std 0.0032
    assert changed.double().mean().item() == pytest.approx(frac, abs=0.015)
    # untouched rows are bit-identical
    assert torch.equal(out[~changed], z[~changed])
    # multiplicative noise: out / z - 1 = sigma * xi with xi ~ N(0, 1), one draw per logit
    noise = (out[changed] / z[changed] - 1).flatten().numpy()
    n = noise.size
    assert abs(noise.mean()) < 4 * math.sqrt(var / n)
    assert noise.var() == pytest.approx(var, rel=0.03)  # relative std of the sample variance: sqrt(2/n) ~ 0.5%
    fourth = (noise**4).mean() / noise.var() ** 2
    assert fourth == pytest.approx(3.0, rel=0.05)  # Gaussian kurtosis
    rows = (out[changed] / z[changed] - 1).numpy()
    assert abs(np.corrcoef(rows[:, 0], rows[:, 1])[0, 1]) < 0.05  # independent across classes


def test_noisy_matches_reference_with_documented_draw_order() -> None:
    for seed, (t, alpha, frac, var) in enumerate([(4.0, 0.9, 0.5, 0.1), (2.0, 0.5, 1.0, 0.5), (1.0, 1.0, 0.25, 2.0)]):
        zs, zt, y = make_batch(12, 7, 4.0, seed=seed)
        got = noisy_teacher_loss(
            zs, zt, y, temperature=t, alpha=alpha, noise_fraction=frac, noise_variance=var, seed=100 + seed
        )
        g = torch.Generator().manual_seed(100 + seed)
        u = torch.rand(12, generator=g, dtype=torch.float64).numpy()
        xi = torch.randn(12, 7, generator=g, dtype=torch.float64).numpy()
        zt_np = np64(zt)
        noisy = np.where((u < frac)[:, None], zt_np * (1 + math.sqrt(var) * xi), zt_np)
        assert got.item() == pytest.approx(ref_kd(np64(zs), noisy, y.numpy(), t, alpha), rel=1e-10)
        assert got.item() != pytest.approx(ref_kd(np64(zs), zt_np, y.numpy(), t, alpha), rel=1e-6)


def test_noisy_reduces_to_kd_exactly_without_noise() -> None:
    zs, zt, y = make_batch(8, 10, 5.0, seed=4)
    for dtype in [torch.float32, torch.float64]:
        s, t_ = zs.to(dtype), zt.to(dtype)
        want = kd_loss(s, t_, y, temperature=3.0, alpha=0.7)
        state = torch.get_rng_state()
        assert torch.equal(noisy_teacher_loss(s, t_, y, temperature=3.0, alpha=0.7, noise_fraction=0.0), want)
        assert torch.equal(noisy_teacher_loss(s, t_, y, temperature=3.0, alpha=0.7, noise_variance=0.0), want)
        assert torch.equal(torch.get_rng_state(), state)  # nothing drawn
    # with the defaults (T = 4, alpha = 0.9) and no noise it is the registered kd
    assert get_method("noisy")(zs, zt, y, noise_fraction=0.0).item() == get_method("kd")(zs, zt, y).item()


def test_noisy_randomness_is_reproducible() -> None:
    zs, zt, y = make_batch(16, 10, 3.0, seed=6)
    a = noisy_teacher_loss(zs, zt, y, seed=7)
    assert torch.equal(a, noisy_teacher_loss(zs, zt, y, seed=7))
    assert not torch.equal(a, noisy_teacher_loss(zs, zt, y, seed=8))
    # a seeded call leaves the global RNG alone
    state = torch.get_rng_state()
    noisy_teacher_loss(zs, zt, y, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    # seed=None: torch's global generator, so torch.manual_seed reproduces and successive calls differ
    torch.manual_seed(123)
    first, second = noisy_teacher_loss(zs, zt, y), noisy_teacher_loss(zs, zt, y)
    torch.manual_seed(123)
    assert torch.equal(noisy_teacher_loss(zs, zt, y), first)
    assert not torch.equal(first, second)


def test_noisy_mean_over_noise_stays_near_kd_and_fraction_one_perturbs_all() -> None:
    zs, zt, y = make_batch(4, 6, 2.0, seed=10)
    out = perturb_teacher(zt, 1.0, 0.1, torch.Generator().manual_seed(3))
    assert (out != zt).all(dim=1).all()
    assert out.dtype == torch.float64
    # fp16 teacher logits are perturbed in float32
    assert perturb_teacher(zt.half(), 0.5, 0.1, torch.Generator().manual_seed(3)).dtype == torch.float32


@pytest.mark.parametrize("t", [0.5, 4.0])
def test_noisy_gradient_finite_at_extreme_fp32_logits(t: float) -> None:
    zs, zt, y = extreme_batch()
    loss = noisy_teacher_loss(zs, zt, y, temperature=t, seed=0)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(zs.grad).all()


def test_noisy_rejects_bad_noise_options() -> None:
    zs, zt, y = make_batch(2, 3, 1.0, seed=0)
    for frac in [-0.1, 1.5]:
        with pytest.raises(ValueError, match="noise_fraction"):
            noisy_teacher_loss(zs, zt, y, noise_fraction=frac)
    with pytest.raises(ValueError, match="noise_variance"):
        noisy_teacher_loss(zs, zt, y, noise_variance=-1.0)


# ---------------------------------------------------------------------------
# Registry, validation, sparse targets
# ---------------------------------------------------------------------------

NEW = ["dkd", "dist", "spherical", "noisy"]


def test_registry_entries_and_defaults() -> None:
    expected = {
        "dkd": ({"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup": 20, "ce_weight": 1.0}, {"epoch"}, dkd_loss),
        "dist": ({"beta": 1.0, "gamma": 1.0, "temperature": 1.0, "ce_weight": 1.0}, set(), dist_loss),
        "spherical": ({"temperature": 4.0, "multiplier": 2.0, "alpha": 0.9}, set(), spherical_loss),
        "noisy": (
            {"temperature": 4.0, "alpha": 0.9, "noise_fraction": 0.5, "noise_variance": 0.1, "seed": None},
            set(),
            noisy_teacher_loss,
        ),
    }
    papers = {"dkd": "Decoupled", "dist": "Stronger Teacher", "spherical": "Spherical", "noisy": "Noisy Teachers"}
    for name, (defaults, schedule, fn) in expected.items():
        m = get_method(name)
        assert m.defaults == defaults, name
        assert m.schedule_args == schedule, name
        assert m.loss is fn
        assert m.needs_teacher is True
        assert m.accepts_sparse is False
        assert papers[name] in m.paper


def test_registry_calls_use_defaults() -> None:
    zs, zt, y = make_batch(6, 8, 2.0, seed=5)
    a, b, yy = np64(zs), np64(zt), y.numpy()
    want = ref_dkd(a, b, yy, epoch=2, alpha=1.0, beta=8.0, t=4.0, warmup=20, ce_weight=1.0)
    assert get_method("dkd")(zs, zt, y, epoch=2, epochs=240).item() == pytest.approx(want, rel=1e-12)
    want = ref_dist(a, b, yy, beta=1.0, gamma=1.0, tau=1.0, ce_weight=1.0)
    assert get_method("dist")(zs, zt, y).item() == pytest.approx(want, rel=1e-12)
    want = ref_spherical(a, b, yy, t=4.0, m=2.0, alpha=0.9)
    assert get_method("spherical")(zs, zt, y).item() == pytest.approx(want, rel=1e-12)
    got = get_method("noisy")(zs, zt, y, seed=3).item()
    assert got == noisy_teacher_loss(zs, zt, y, seed=3).item()


@pytest.mark.parametrize("name", NEW)
def test_sparse_targets_are_refused_clearly(name: str) -> None:
    zs, zt, y = make_batch(4, 10, 2.0, seed=1, dtype=torch.float32)
    top = zt.topk(3, dim=1)
    sparse = SparseTargets("topk", top.indices, top.values, torch.logsumexp(zt, dim=1), num_classes=10)
    with pytest.raises(ValueError, match="dense teacher logits") as exc:
        get_method(name)(zs, sparse, y, epoch=0, epochs=10)
    assert name in str(exc.value) and "topk" in str(exc.value)


@pytest.mark.parametrize("name", NEW)
def test_teacher_required(name: str) -> None:
    zs, _, y = make_batch(4, 5, 1.0, seed=1)
    with pytest.raises(ValueError, match="teacher"):
        get_method(name)(zs, None, y, epoch=0)


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_nonpositive_temperature_raises(name: str, temperature: float) -> None:
    zs, zt, y = make_batch(3, 4, 1.0, seed=0)
    with pytest.raises(ValueError, match="temperature"):
        get_method(name)(zs, zt, y, epoch=0, temperature=temperature)


def test_other_invalid_options_raise() -> None:
    zs, zt, y = make_batch(3, 4, 1.0, seed=0)
    with pytest.raises(ValueError, match="warmup"):
        dkd_loss(zs, zt, y, epoch=0, warmup=-1)
    with pytest.raises(ValueError, match="epoch"):
        dkd_loss(zs, zt, y, epoch=-1)
    with pytest.raises(ValueError, match="multiplier"):
        spherical_loss(zs, zt, y, multiplier=0.0)
    with pytest.raises(TypeError, match="tau"):
        get_method("dist")(zs, zt, y, tau=2.0)  # the option is called temperature
