"""Hinton KD loss (``kd``) and plain cross-entropy (``ce``) against a hand-written float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import make_batch, np64, ref_ce, ref_log_softmax, ref_softmax

from kd.student_trainer.losses import METHODS, get_method
from kd.student_trainer.losses.kd import kd_loss

# ---------------------------------------------------------------------------
# Independent reference: numpy float64, explicit exp / sum / log.
# ---------------------------------------------------------------------------


def ref_t2_kl(zs: np.ndarray, zt: np.ndarray, temperature: float) -> float:
    """T^2 * mean over batch of sum_c p_t * (log p_t - log p_s)."""
    log_ps = ref_log_softmax(np.asarray(zs, np.float64) / temperature)
    log_pt = ref_log_softmax(np.asarray(zt, np.float64) / temperature)
    pt = np.exp(log_pt)
    per_sample = (pt * (log_pt - log_ps)).sum(axis=1)
    return float(temperature**2 * per_sample.mean())


def ref_kd(zs: np.ndarray, zt: np.ndarray, labels: np.ndarray, temperature: float, alpha: float) -> float:
    return alpha * ref_t2_kl(zs, zt, temperature) + (1.0 - alpha) * ref_ce(zs, labels)


# ---------------------------------------------------------------------------
# Agreement with the reference
# ---------------------------------------------------------------------------

TEMPERATURES = [0.5, 1.0, 2.0, 4.0, 10.0]
ALPHAS = [0.0, 0.1, 0.5, 0.9, 1.0]


@pytest.mark.parametrize("scale", [1.0, 5.0, 100.0, 1000.0])
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_kd_matches_reference_float64(temperature: float, alpha: float, scale: float) -> None:
    zs, zt, y = make_batch(7, 11, scale, seed=int(temperature * 10 + alpha * 100 + scale))
    got = kd_loss(zs, zt, y, temperature=temperature, alpha=alpha)
    want = ref_kd(np64(zs), np64(zt), y.numpy(), temperature, alpha)
    assert got.dtype == torch.float64
    assert got.shape == ()
    assert want > 0
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_matches_reference_float32(temperature: float, alpha: float) -> None:
    zs, zt, y = make_batch(16, 10, 3.0, seed=3, dtype=torch.float32)
    got = kd_loss(zs, zt, y, temperature=temperature, alpha=alpha)
    want = ref_kd(np64(zs), np64(zt), y.numpy(), temperature, alpha)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_alpha_endpoints_isolate_terms() -> None:
    zs, zt, y = make_batch(5, 6, 2.0, seed=11)
    pure_kd = kd_loss(zs, zt, y, temperature=3.0, alpha=1.0).item()
    pure_ce = kd_loss(zs, zt, y, temperature=3.0, alpha=0.0).item()
    assert pure_kd == pytest.approx(ref_t2_kl(np64(zs), np64(zt), 3.0), rel=1e-12)
    assert pure_ce == pytest.approx(ref_ce(np64(zs), y.numpy()), rel=1e-12)
    # alpha=0 must not depend on the teacher at all.
    other_teacher = kd_loss(zs, -zt * 7, y, temperature=3.0, alpha=0.0).item()
    assert other_teacher == pure_ce
    # alpha=1 must not depend on the labels at all.
    other_labels = kd_loss(zs, zt, (y + 1) % 6, temperature=3.0, alpha=1.0).item()
    assert other_labels == pure_kd
    # In between: the convex combination.
    mid = kd_loss(zs, zt, y, temperature=3.0, alpha=0.3).item()
    assert mid == pytest.approx(0.3 * pure_kd + 0.7 * pure_ce, rel=1e-12)


def test_registry_kd_uses_defaults_t4_alpha09() -> None:
    zs, zt, y = make_batch(4, 5, 2.0, seed=5)
    got = get_method("kd")(zs, zt, y).item()
    assert got == pytest.approx(ref_kd(np64(zs), np64(zt), y.numpy(), 4.0, 0.9), rel=1e-12)
    got2 = get_method("kd")(zs, zt, y, temperature=2.0, alpha=0.25).item()
    assert got2 == pytest.approx(ref_kd(np64(zs), np64(zt), y.numpy(), 2.0, 0.25), rel=1e-12)


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 20.0])
def test_zero_when_student_equals_teacher(temperature: float, scale: float, dtype: torch.dtype) -> None:
    zs, _, y = make_batch(8, 10, scale, seed=2, dtype=dtype)
    loss = kd_loss(zs, zs.clone(), y, temperature=temperature, alpha=1.0)
    assert abs(loss.item()) < 1e-6


@pytest.mark.parametrize("alpha", [0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 4.0, 20.0])
def test_positive_when_student_differs(temperature: float, alpha: float) -> None:
    zs, _, y = make_batch(6, 8, 2.0, seed=4)
    zt = zs.clone()
    zt[0, 3] += 0.5  # one small difference in one sample
    loss = kd_loss(zs, zt, y, temperature=temperature, alpha=alpha).item()
    assert loss > 0
    assert loss == pytest.approx(ref_kd(np64(zs), np64(zt), y.numpy(), temperature, alpha), rel=1e-9)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0, 10.0])
def test_gradient_alpha1_is_t_times_softmax_difference_over_batch(temperature: float) -> None:
    zs, zt, y = make_batch(9, 7, 3.0, seed=21)
    zs.requires_grad_(True)
    kd_loss(zs, zt, y, temperature=temperature, alpha=1.0).backward()
    batch = zs.shape[0]
    want = temperature * (ref_softmax(np64(zs) / temperature) - ref_softmax(np64(zt) / temperature)) / batch
    np.testing.assert_allclose(zs.grad.numpy(), want, rtol=0, atol=1e-13)
    # The teacher side receives no gradient path at all.
    assert not zt.requires_grad


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9])
def test_gradient_mixed_alpha_matches_analytic(alpha: float) -> None:
    temperature = 3.0
    zs, zt, y = make_batch(6, 5, 2.0, seed=8)
    zs.requires_grad_(True)
    kd_loss(zs, zt, y, temperature=temperature, alpha=alpha).backward()
    b, c = zs.shape
    onehot = np.eye(c)[y.numpy()]
    soft = temperature * (ref_softmax(np64(zs) / temperature) - ref_softmax(np64(zt) / temperature)) / b
    hard = (ref_softmax(np64(zs)) - onehot) / b
    np.testing.assert_allclose(zs.grad.numpy(), alpha * soft + (1 - alpha) * hard, rtol=0, atol=1e-13)


@pytest.mark.parametrize("alpha", [0.9, 1.0])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_gradient_finite_at_extreme_fp32_logits(temperature: float, alpha: float) -> None:
    g = torch.Generator().manual_seed(13)
    signs = torch.randint(0, 2, (8, 10), generator=g).float() * 2 - 1
    zs = (signs * 1e4).requires_grad_(True)
    zt = -signs.roll(1, dims=1) * 1e4
    y = torch.randint(0, 10, (8,), generator=g)
    loss = kd_loss(zs, zt, y, temperature=temperature, alpha=alpha)
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert loss.item() > 0
    assert torch.isfinite(zs.grad).all()
    # and it is still the right gradient (softmaxes saturate but stay well-defined)
    b, c = zs.shape
    soft = temperature * (ref_softmax(np64(zs) / temperature) - ref_softmax(np64(zt) / temperature)) / b
    hard = (ref_softmax(np64(zs)) - np.eye(c)[y.numpy()]) / b
    np.testing.assert_allclose(zs.grad.numpy(), alpha * soft + (1 - alpha) * hard, rtol=0, atol=1e-5)


def logit_matching_limit(zs: np.ndarray, zt: np.ndarray) -> float:
    """Hinton's high-temperature limit: (1/2C) * mean_b sum_c ((zs - mean zs) - (zt - mean zt))^2."""
    c = zs.shape[1]
    d = (zs - zs.mean(axis=1, keepdims=True)) - (zt - zt.mean(axis=1, keepdims=True))
    return float((d**2).sum(axis=1).mean() / (2 * c))


def test_high_temperature_limit_is_logit_matching() -> None:
    zs, zt, y = make_batch(10, 12, 3.0, seed=17)
    limit = logit_matching_limit(np64(zs), np64(zt))
    assert limit > 0
    errs = {}
    for temperature in [10.0, 100.0, 1000.0]:
        got = kd_loss(zs, zt, y, temperature=temperature, alpha=1.0).item()
        errs[temperature] = abs(got - limit) / limit
    assert errs[1000.0] < 1e-3
    # it really is a limit: the error shrinks as T grows
    assert errs[1000.0] < errs[100.0] < errs[10.0]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_invariant_to_per_row_constants(temperature: float) -> None:
    zs, zt, y = make_batch(6, 9, 3.0, seed=31)
    g = torch.Generator().manual_seed(99)
    cs = torch.randn(6, 1, generator=g, dtype=torch.float64) * 50
    ct = torch.randn(6, 1, generator=g, dtype=torch.float64) * 50
    base = kd_loss(zs, zt, y, temperature=temperature, alpha=0.6).item()
    shifted_s = kd_loss(zs + cs, zt, y, temperature=temperature, alpha=0.6).item()
    shifted_t = kd_loss(zs, zt + ct, y, temperature=temperature, alpha=0.6).item()
    shifted_both = kd_loss(zs + cs, zt + ct, y, temperature=temperature, alpha=0.6).item()
    assert shifted_s == pytest.approx(base, rel=1e-11)
    assert shifted_t == pytest.approx(base, rel=1e-11)
    assert shifted_both == pytest.approx(base, rel=1e-11)
    # a per-column change is NOT a symmetry (guards against a test that cannot fail)
    col = torch.zeros(1, 9, dtype=torch.float64)
    col[0, 0] = 5.0
    assert kd_loss(zs + col, zt, y, temperature=temperature, alpha=0.6).item() != pytest.approx(base, rel=1e-3)


@pytest.mark.parametrize("temperature", [0, 0.0, -1.0, -4])
def test_nonpositive_temperature_raises(temperature: float) -> None:
    zs, zt, y = make_batch(2, 3, 1.0, seed=0)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(zs, zt, y, temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        get_method("kd")(zs, zt, y, temperature=temperature)


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------


def test_kd_defaults() -> None:
    m = get_method("kd")
    assert m.name == "kd"
    assert m.defaults == {"temperature": 4.0, "alpha": 0.9}
    assert m.needs_teacher is True
    assert m.loss is kd_loss


def test_unknown_option_raises_type_error_naming_it() -> None:
    zs, zt, y = make_batch(2, 3, 1.0, seed=0)
    with pytest.raises(TypeError, match="temprature"):
        get_method("kd")(zs, zt, y, temprature=2.0)
    with pytest.raises(TypeError, match="temperature"):
        get_method("ce")(zs, None, y, temperature=2.0)


def test_unknown_method_lists_available() -> None:
    with pytest.raises(ValueError) as exc:
        get_method("no-such-method")
    msg = str(exc.value)
    assert "no-such-method" in msg
    assert {"ce", "kd"} <= set(METHODS)
    for name in METHODS:
        assert name in msg


def test_ce_needs_no_teacher() -> None:
    m = get_method("ce")
    assert m.needs_teacher is False
    assert m.defaults == {}
    zs, _, y = make_batch(5, 4, 2.0, seed=6)
    got = m(zs, None, y).item()
    assert got == pytest.approx(ref_ce(np64(zs), y.numpy()), rel=1e-12)


def test_kd_without_teacher_raises() -> None:
    zs, _, y = make_batch(5, 4, 2.0, seed=6)
    with pytest.raises(ValueError, match="teacher"):
        get_method("kd")(zs, None, y)
