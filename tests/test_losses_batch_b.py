"""Batch B losses -- ``tfkd-reg``, ``tfkd-self``, ``gkd``, ``eskd``, ``ka-dtd`` -- against
hand-written float64 references (explicit exp / log / sum, loops where the method is per-sample),
plus the properties each method is built on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import make_batch, np64, ref_ce, ref_log_softmax, ref_softmax

from kd.core.targets import SparseTargets
from kd.student_trainer.losses import get_method
from kd.student_trainer.losses.eskd import eskd_loss
from kd.student_trainer.losses.gkd import gkd_loss
from kd.student_trainer.losses.ka_dtd import dtd_temperatures, ka_dtd_loss, probability_shift
from kd.student_trainer.losses.tfkd_reg import tfkd_reg_loss, virtual_teacher
from kd.student_trainer.losses.tfkd_self import tfkd_self_loss

NEW = ("tfkd-reg", "tfkd-self", "gkd", "eskd", "ka-dtd")

# ---------------------------------------------------------------------------
# Independent reference: numpy float64, explicit exp / sum / log.
# ---------------------------------------------------------------------------


def ref_kl_rows(log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    """sum_c p (log p - log q), one value per row."""
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=1)


def ref_kd(zs: np.ndarray, zt: np.ndarray, labels: np.ndarray, temperature: float, alpha: float) -> float:
    kl = ref_kl_rows(ref_log_softmax(zt / temperature), ref_log_softmax(zs / temperature)).mean()
    return alpha * temperature**2 * kl + (1.0 - alpha) * ref_ce(zs, labels)


def ref_tfkd_reg(
    zs: np.ndarray, labels: np.ndarray, alpha: float, temperature: float, multiplier: float, correct_prob: float
) -> float:
    b, c = zs.shape
    u = np.empty((b, c))
    for i in range(b):
        for k in range(c):
            u[i, k] = correct_prob if k == labels[i] else (1.0 - correct_prob) / (c - 1)
    log_v = ref_log_softmax(u / temperature)  # T on the virtual teacher only
    log_s = ref_log_softmax(zs)
    kl_mean = ref_kl_rows(log_v, log_s).sum() / (b * c)  # reduction "mean"
    return (1.0 - alpha) * ref_ce(zs, labels) + alpha * multiplier * kl_mean


def ref_tfkd_self(
    zs: np.ndarray, zt: np.ndarray, labels: np.ndarray, alpha: float, temperature: float, multiplier: float
) -> float:
    b, c = zs.shape
    kl_sum = ref_kl_rows(ref_log_softmax(zt / temperature), ref_log_softmax(zs / temperature)).sum()
    return (1.0 - alpha) * ref_ce(zs, labels) + alpha * temperature**2 * multiplier * kl_sum / (b * c)


def ref_edt(rate: float, epoch_1based: int, factor: float, step: int) -> float:
    """The reference's adjust_loss_alpha (ImageNet, lrdv1): rate * factor ** (epoch // step), 1-based."""
    return rate * factor ** (epoch_1based // step)


def ref_gkd(
    zs: np.ndarray,
    zt: np.ndarray,
    labels: np.ndarray,
    temperature: float,
    kd_weight: float,
    ce_weight: float,
    decay: float,
    decay_every: float,
    epoch: int,
    epochs: int,
) -> float:
    total, count = 0.0, 0
    for i in range(zs.shape[0]):
        if int(np.argmax(zt[i])) != labels[i]:
            continue
        log_t = ref_log_softmax(zt[i : i + 1] / temperature)
        log_s = ref_log_softmax(zs[i : i + 1] / temperature)
        total += float(ref_kl_rows(log_t, log_s)[0])
        count += 1
    guided = temperature**2 * total / count if count else 0.0
    weight = ref_edt(kd_weight, epoch + 1, decay, int(round(decay_every * epochs)))
    return weight * guided + ce_weight * ref_ce(zs, labels)


def ref_shift(zt: np.ndarray, labels: np.ndarray) -> np.ndarray:
    out = np.array(zt, dtype=np.float64, copy=True)
    for i in range(out.shape[0]):
        j = int(np.argmax(out[i]))
        out[i, j], out[i, labels[i]] = out[i, labels[i]], out[i, j]
    return out


def ref_taus(zs: np.ndarray, zt_adj: np.ndarray, t0: float, beta: float, gamma: float, dtd: str) -> np.ndarray:
    b = zs.shape[0]
    if dtd == "none" or beta == 0.0:
        return np.full(b, t0)
    w = np.empty(b)
    for i in range(b):
        if dtd == "flsw":
            cos = np.dot(zs[i], zt_adj[i]) / (np.sqrt(np.dot(zs[i], zs[i])) * np.sqrt(np.dot(zt_adj[i], zt_adj[i])))
            w[i] = max(1.0 - cos, 0.0) ** gamma
        else:
            w[i] = 1.0 / ref_softmax(zs[i : i + 1]).max()
    return np.maximum(t0 + beta * (w.mean() - w), t0 / 10.0)


def ref_ka_dtd(
    zs: np.ndarray,
    zt: np.ndarray,
    labels: np.ndarray,
    t0: float,
    alpha: float,
    beta: float,
    gamma: float,
    dtd: str,
    ka: str,
) -> float:
    zt_adj = ref_shift(zt, labels) if ka == "ps" else np.asarray(zt, np.float64)
    taus = ref_taus(zs, zt_adj, t0, beta, gamma, dtd)
    soft = 0.0
    for i, tau in enumerate(taus):
        log_t = ref_log_softmax(zt_adj[i : i + 1] / tau)
        log_s = ref_log_softmax(zs[i : i + 1] / tau)
        soft += tau**2 * float(ref_kl_rows(log_t, log_s)[0])
    return alpha * soft / len(taus) + (1.0 - alpha) * ref_ce(zs, labels)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def with_correctness(zt: torch.Tensor, y: torch.Tensor, correct: list[bool]) -> torch.Tensor:
    """Teacher logits whose argmax is the label exactly on the rows marked True."""
    zt = zt.clone()
    c = zt.shape[1]
    for i, ok in enumerate(correct):
        j = int(y[i]) if ok else (int(y[i]) + 1) % c
        zt[i, j] = zt[i].max() + 1.0
    return zt


def ref_bucket_kl_rows(zs: np.ndarray, sparse: SparseTargets, temperature: float) -> np.ndarray:
    """KL per row over the stored classes plus one rest bucket (what the losses compare for topk
    targets), float64; the teacher's buckets from its dense maximum-entropy completion (exact at T_c)."""
    log_p = ref_log_softmax(np64(sparse.dense()) / temperature)
    log_q = ref_log_softmax(zs / temperature)
    out = np.empty(len(zs))
    for i, ids in enumerate(sparse.indices.numpy()):
        rest = np.setdiff1d(np.arange(zs.shape[1]), ids)
        p = np.append(np.exp(log_p[i, ids]), np.exp(log_p[i, rest]).sum())
        q = np.append(np.exp(log_q[i, ids]), np.exp(log_q[i, rest]).sum())
        keep = p > 0
        out[i] = (p[keep] * np.log(p[keep] / q[keep])).sum()
    return out


def topk_targets(zt: torch.Tensor, k: int, tc: float) -> SparseTargets:
    vals, idx = zt.topk(k, dim=1)
    return SparseTargets("topk", idx, vals, torch.logsumexp(zt / tc, dim=1), zt.shape[1], tc)


def extreme_batch(batch: int = 8, classes: int = 10, seed: int = 13) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (batch, classes), generator=g).float() * 2 - 1
    zs = (signs * 1e4).requires_grad_(True)
    zt = -signs.roll(1, dims=1) * 1e4
    y = torch.randint(0, classes, (batch,), generator=g)
    return zs, zt, y


# ---------------------------------------------------------------------------
# tfkd-reg
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("correct_prob", [0.9, 0.99])
@pytest.mark.parametrize("multiplier", [1.0, 100.0])
@pytest.mark.parametrize("temperature", [1.0, 5.0, 20.0])
@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 1.0])
def test_tfkd_reg_matches_reference(alpha: float, temperature: float, multiplier: float, correct_prob: float) -> None:
    zs, _, y = make_batch(6, 9, 3.0, seed=int(alpha * 10 + temperature + multiplier))
    got = tfkd_reg_loss(
        zs, None, y, alpha=alpha, temperature=temperature, multiplier=multiplier, correct_prob=correct_prob
    )
    want = ref_tfkd_reg(np64(zs), y.numpy(), alpha, temperature, multiplier, correct_prob)
    assert got.dtype == torch.float64 and got.shape == ()
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_tfkd_reg_float32_and_registry_defaults() -> None:
    zs, _, y = make_batch(16, 100, 4.0, seed=3, dtype=torch.float32)
    got = get_method("tfkd-reg")(zs, None, y)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref_tfkd_reg(np64(zs), y.numpy(), 0.1, 20.0, 100.0, 0.99), rel=1e-5)


def test_tfkd_reg_needs_no_teacher() -> None:
    m = get_method("tfkd-reg")
    assert m.needs_teacher is False
    zs, zt, y = make_batch(5, 7, 2.0, seed=4)
    without = m(zs, None, y).item()
    assert np.isfinite(without)
    # A teacher, if one is passed anyway, is ignored.
    assert m(zs, zt, y).item() == without
    assert m(zs, -50 * zt, y).item() == without


@pytest.mark.parametrize("classes", [2, 10, 100])
@pytest.mark.parametrize("correct_prob", [0.5, 0.9, 0.99, 1.0])
def test_virtual_teacher_is_a_distribution_peaked_at_the_label(classes: int, correct_prob: float) -> None:
    y = torch.tensor([0, classes - 1, classes // 2])
    u = virtual_teacher(y, classes, correct_prob, dtype=torch.float64)
    assert u.shape == (3, classes)
    np.testing.assert_allclose(u.sum(dim=1).numpy(), 1.0, rtol=0, atol=1e-14)
    assert (u >= 0).all()
    np.testing.assert_array_equal(u[torch.arange(3), y].numpy(), correct_prob)
    if correct_prob > 1.0 / classes:
        assert (u.argmax(dim=1) == y).all()
    # The softened virtual teacher the loss uses is a distribution too, still peaked at the label.
    p_v = torch.softmax(u / 20.0, dim=1)
    np.testing.assert_allclose(p_v.sum(dim=1).numpy(), 1.0, rtol=0, atol=1e-14)
    if correct_prob > 1.0 / classes:
        assert (p_v.argmax(dim=1) == y).all()


def test_tfkd_reg_t20_virtual_teacher_is_nearly_uniform_on_cifar100() -> None:
    """Documented consequence of softmax(u / T) with T = 20: ~0.0105 on the true class for C = 100."""
    u = virtual_teacher(torch.tensor([3]), 100, 0.99, dtype=torch.float64)
    p = torch.softmax(u / 20.0, dim=1)[0]
    want = np.exp(0.99 / 20) / (np.exp(0.99 / 20) + 99 * np.exp(0.01 / 99 / 20))
    assert p[3].item() == pytest.approx(want, rel=1e-12)
    assert 0.0104 < p[3].item() < 0.0106


def test_tfkd_reg_mean_reduction_is_batchmean_over_c() -> None:
    """On C = 100, m = 100 with reduction "mean" equals the true (batchmean) KL with weight 1."""
    zs, _, y = make_batch(4, 100, 3.0, seed=8)
    soft = tfkd_reg_loss(zs, None, y, alpha=1.0, temperature=20.0, multiplier=100.0).item()
    u = np64(virtual_teacher(y, 100, 0.99, dtype=torch.float64))
    batchmean = ref_kl_rows(ref_log_softmax(u / 20.0), ref_log_softmax(np64(zs))).mean()
    assert soft == pytest.approx(batchmean, rel=1e-12)


def test_tfkd_reg_gradient_matches_analytic() -> None:
    alpha, temperature, m = 0.3, 20.0, 100.0
    zs, _, y = make_batch(6, 8, 2.0, seed=9)
    zs.requires_grad_(True)
    tfkd_reg_loss(zs, None, y, alpha=alpha, temperature=temperature, multiplier=m).backward()
    b, c = zs.shape
    p_v = ref_softmax(np64(virtual_teacher(y, c, 0.99, dtype=torch.float64)) / temperature)
    p_s = ref_softmax(np64(zs))
    want = alpha * m * (p_s - p_v) / (b * c) + (1 - alpha) * (p_s - np.eye(c)[y.numpy()]) / b
    np.testing.assert_allclose(zs.grad.numpy(), want, rtol=0, atol=1e-13)


def test_tfkd_reg_rejects_bad_options() -> None:
    zs, _, y = make_batch(2, 3, 1.0, seed=0)
    with pytest.raises(ValueError, match="temperature"):
        tfkd_reg_loss(zs, None, y, temperature=0.0)
    with pytest.raises(ValueError, match="correct_prob"):
        tfkd_reg_loss(zs, None, y, correct_prob=1.5)
    with pytest.raises(ValueError, match="2 classes"):
        tfkd_reg_loss(zs[:, :1], None, torch.zeros(2, dtype=torch.long))


# ---------------------------------------------------------------------------
# tfkd-self
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("multiplier", [1.0, 50.0])
@pytest.mark.parametrize("temperature", [1.0, 6.0, 20.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.95, 1.0])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_tfkd_self_matches_reference(scale: float, alpha: float, temperature: float, multiplier: float) -> None:
    zs, zt, y = make_batch(7, 11, scale, seed=int(scale + alpha * 100 + temperature))
    got = tfkd_self_loss(zs, zt, y, alpha=alpha, temperature=temperature, multiplier=multiplier)
    want = ref_tfkd_self(np64(zs), np64(zt), y.numpy(), alpha, temperature, multiplier)
    assert got.dtype == torch.float64 and got.shape == ()
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_tfkd_self_registry_defaults_and_float32() -> None:
    zs, zt, y = make_batch(16, 100, 3.0, seed=5, dtype=torch.float32)
    got = get_method("tfkd-self")(zs, zt, y)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref_tfkd_self(np64(zs), np64(zt), y.numpy(), 0.95, 6.0, 50.0), rel=1e-5)


def test_tfkd_self_zero_soft_term_when_student_is_its_teacher() -> None:
    zs, _, y = make_batch(6, 10, 3.0, seed=6)
    assert abs(tfkd_self_loss(zs, zs.clone(), y, alpha=1.0).item()) < 1e-12


@pytest.mark.parametrize("k", [3, 10])
def test_tfkd_self_sparse_topk_matches_dense_decode(k: int) -> None:
    temperature = 6.0
    zs, zt, y = make_batch(5, 10, 4.0, seed=7)
    sparse = topk_targets(zt, k, temperature)
    got = get_method("tfkd-self")(zs, sparse, y, temperature=temperature)
    # The stored classes plus one rest bucket (with k = C: the dense KL), not an evenly spread tail.
    kl_sum = ref_bucket_kl_rows(np64(zs), sparse, temperature).sum()
    want = 0.05 * ref_ce(np64(zs), y.numpy()) + 0.95 * temperature**2 * 50.0 * kl_sum / (5 * 10)
    assert got.item() == pytest.approx(want, rel=1e-9)


# ---------------------------------------------------------------------------
# gkd
# ---------------------------------------------------------------------------

GKD_CORRECT = [True, False, True, True, False, False, True, False]


@pytest.mark.parametrize("epoch", [0, 28, 29, 30, 59, 99])
@pytest.mark.parametrize("decay", [1.0, 0.9, 0.5])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.1, 1.0), (2.0, 0.0)])
def test_gkd_matches_reference(weights: tuple[float, float], temperature: float, decay: float, epoch: int) -> None:
    kd_weight, ce_weight = weights
    zs, zt, y = make_batch(8, 6, 3.0, seed=epoch + int(decay * 10))
    zt = with_correctness(zt, y, GKD_CORRECT)
    got = gkd_loss(
        zs, zt, y, temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight, decay=decay,
        decay_every=0.3, epoch=epoch, epochs=100,
    )  # fmt: skip
    want = ref_gkd(np64(zs), np64(zt), y.numpy(), temperature, kd_weight, ce_weight, decay, 0.3, epoch, 100)
    assert got.dtype == torch.float64 and got.shape == ()
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_gkd_edt_schedule_is_the_references_imagenet_decay() -> None:
    """0-based epoch e is the reference's 1-based e + 1; step 30 of 100, factor 0.9."""
    zs, zt, y = make_batch(4, 5, 2.0, seed=1)
    zt = with_correctness(zt, y, [True] * 4)
    guided = gkd_loss(zs, zt, y, ce_weight=0.0, decay=1.0, epoch=0, epochs=100).item()
    assert guided > 0
    for epoch in range(100):
        got = gkd_loss(zs, zt, y, ce_weight=0.0, epoch=epoch, epochs=100).item()
        assert got == pytest.approx(guided * 0.9 ** ((epoch + 1) // 30), rel=1e-12)
    # decay=1 keeps the reference's constant GKD weight at every epoch
    assert gkd_loss(zs, zt, y, ce_weight=0.0, decay=1.0, epoch=95, epochs=100).item() == pytest.approx(guided, rel=0)


def test_gkd_ignores_samples_where_the_teacher_is_wrong() -> None:
    zs, zt, y = make_batch(8, 6, 3.0, seed=21)
    zt = with_correctness(zt, y, GKD_CORRECT)
    base = gkd_loss(zs, zt, y, temperature=2.0, epoch=3, epochs=10).item()
    g = torch.Generator().manual_seed(5)
    wrong = [i for i, ok in enumerate(GKD_CORRECT) if not ok]
    fresh = torch.randn(len(wrong), 6, generator=g, dtype=torch.float64) * 40
    other = zt.clone()
    other[wrong] = with_correctness(fresh, y[wrong], [False] * len(wrong))  # still wrong, arbitrary otherwise
    assert not torch.equal(other[wrong], zt[wrong])
    assert torch.equal(other[[0, 2, 3, 6]], zt[[0, 2, 3, 6]])
    assert gkd_loss(zs, other, y, temperature=2.0, epoch=3, epochs=10).item() == base
    # ... and the student's rows for wrong samples get only the CE gradient
    zs1 = zs.clone().requires_grad_(True)
    gkd_loss(zs1, zt, y, temperature=2.0, epoch=3, epochs=10).backward()
    hard = (ref_softmax(np64(zs)) - np.eye(6)[y.numpy()]) / 8
    np.testing.assert_allclose(zs1.grad[wrong].numpy(), hard[wrong], rtol=0, atol=1e-14)
    # whereas changing a correct sample's teacher does change the loss
    changed = zt.clone()
    changed[0] = changed[0] * 0.5
    changed = with_correctness(changed, y, GKD_CORRECT)
    assert gkd_loss(zs, changed, y, temperature=2.0, epoch=3, epochs=10).item() != pytest.approx(base, rel=1e-6)


@pytest.mark.parametrize("ce_weight", [1.0, 0.5])
def test_gkd_equals_ce_when_the_teacher_is_always_wrong(ce_weight: float) -> None:
    zs, zt, y = make_batch(6, 5, 3.0, seed=22)
    zt = with_correctness(zt, y, [False] * 6)
    zs.requires_grad_(True)
    loss = gkd_loss(zs, zt, y, ce_weight=ce_weight, epoch=0, epochs=10)
    assert loss.item() == pytest.approx(ce_weight * ref_ce(np64(zs), y.numpy()), rel=1e-12)
    loss.backward()
    want = ce_weight * (ref_softmax(np64(zs)) - np.eye(5)[y.numpy()]) / 6
    np.testing.assert_allclose(zs.grad.numpy(), want, rtol=0, atol=1e-14)
    # With no CE either the loss is a (differentiable) zero, not NaN.
    zs2 = zs.detach().clone().requires_grad_(True)
    zero = gkd_loss(zs2, zt, y, ce_weight=0.0, epoch=0, epochs=10)
    assert zero.item() == 0.0
    zero.backward()
    assert torch.equal(zs2.grad, torch.zeros_like(zs2))


def test_gkd_averages_over_correct_samples_not_the_batch() -> None:
    """With the teacher always right, GKD is T^2 * batchmean KL (the kd soft term)."""
    zs, zt, y = make_batch(6, 7, 2.0, seed=23)
    right = with_correctness(zt, y, [True] * 6)
    soft = gkd_loss(zs, right, y, temperature=3.0, ce_weight=0.0, decay=1.0, epoch=0, epochs=10).item()
    assert soft == pytest.approx(ref_kd(np64(zs), np64(right), y.numpy(), 3.0, 1.0), rel=1e-12)
    # Two right of six: the average of those two, not a sixth of their sum.
    half = with_correctness(zt, y, [True, True, False, False, False, False])
    got = gkd_loss(zs, half, y, temperature=3.0, ce_weight=0.0, decay=1.0, epoch=0, epochs=10).item()
    want = ref_kd(np64(zs[:2]), np64(half[:2]), y[:2].numpy(), 3.0, 1.0)
    assert got == pytest.approx(want, rel=1e-12)


def test_gkd_gradient_matches_analytic() -> None:
    temperature, kd_w, ce_w = 2.0, 0.7, 1.0
    zs, zt, y = make_batch(8, 6, 2.0, seed=24)
    zt = with_correctness(zt, y, GKD_CORRECT)
    zs.requires_grad_(True)
    gkd_loss(zs, zt, y, temperature=temperature, kd_weight=kd_w, ce_weight=ce_w, epoch=0, epochs=10).backward()
    mask = np.array(GKD_CORRECT, dtype=np.float64)[:, None]
    soft = temperature * (ref_softmax(np64(zs) / temperature) - ref_softmax(np64(zt) / temperature))
    hard = ref_softmax(np64(zs)) - np.eye(6)[y.numpy()]
    want = kd_w * soft * mask / mask.sum() + ce_w * hard / 8
    np.testing.assert_allclose(zs.grad.numpy(), want, rtol=0, atol=1e-13)


def test_gkd_needs_the_schedule_args() -> None:
    zs, zt, y = make_batch(3, 4, 1.0, seed=0)
    with pytest.raises(ValueError, match="epoch"):
        get_method("gkd")(zs, zt, y)
    with pytest.raises(ValueError, match="decay_every"):
        gkd_loss(zs, zt, y, decay_every=0.0, epoch=0, epochs=10)


# ---------------------------------------------------------------------------
# eskd
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("epochs", "stop_fraction", "stop_epoch", "kd_epochs"),
    [
        (10, 0.5, None, {0, 1, 2, 3, 4}),
        (10, 0.3, None, {0, 1, 2}),
        (5, 0.5, None, {0, 1, 2}),  # KD while epoch < 2.5
        (10, 0.0, None, set()),
        (10, 1.0, None, set(range(10))),
        (10, 0.5, 7, set(range(7))),  # an explicit stop_epoch overrides the fraction
    ],
)
def test_eskd_is_kd_before_the_stop_and_ce_after(
    epochs: int, stop_fraction: float, stop_epoch: int | None, kd_epochs: set[int]
) -> None:
    zs, zt, y = make_batch(6, 8, 3.0, seed=epochs + int(stop_fraction * 10))
    kd_ref = ref_kd(np64(zs), np64(zt), y.numpy(), 2.0, 0.7)
    ce_ref = ref_ce(np64(zs), y.numpy())
    assert abs(kd_ref - ce_ref) > 1e-3
    for epoch in range(epochs):
        got = eskd_loss(
            zs, zt, y, temperature=2.0, alpha=0.7, stop_fraction=stop_fraction, stop_epoch=stop_epoch,
            epoch=epoch, epochs=epochs,
        ).item()  # fmt: skip
        want = kd_ref if epoch in kd_epochs else ce_ref
        assert got == pytest.approx(want, rel=1e-10), epoch


def test_eskd_after_the_stop_ignores_the_teacher_and_uses_full_ce_weight() -> None:
    zs, zt, y = make_batch(5, 6, 2.0, seed=31)
    a = get_method("eskd")(zs, zt, y, epoch=7, epochs=10).item()
    b = get_method("eskd")(zs, -9 * zt, y, epoch=7, epochs=10).item()
    assert a == b == pytest.approx(ref_ce(np64(zs), y.numpy()), rel=1e-12)


def test_eskd_registry_defaults_before_the_stop() -> None:
    zs, zt, y = make_batch(5, 6, 2.0, seed=32)
    got = get_method("eskd")(zs, zt, y, epoch=4, epochs=10).item()
    assert got == pytest.approx(ref_kd(np64(zs), np64(zt), y.numpy(), 4.0, 0.9), rel=1e-12)
    with pytest.raises(ValueError, match="epoch"):
        get_method("eskd")(zs, zt, y)


def test_eskd_sparse_topk_matches_dense_decode_and_ce_after() -> None:
    temperature = 2.0
    zs, zt, y = make_batch(5, 12, 3.0, seed=33)
    sparse = topk_targets(zt, 4, temperature)
    before = get_method("eskd")(zs, sparse, y, temperature=temperature, epoch=0, epochs=4).item()
    kl = ref_bucket_kl_rows(np64(zs), sparse, temperature).mean()  # stored classes + rest bucket
    want = 0.9 * temperature**2 * kl + 0.1 * ref_ce(np64(zs), y.numpy())
    assert before == pytest.approx(want, rel=1e-9)
    after = get_method("eskd")(zs, sparse, y, temperature=temperature, epoch=3, epochs=4).item()
    assert after == pytest.approx(ref_ce(np64(zs), y.numpy()), rel=1e-12)


def test_eskd_rejects_bad_options() -> None:
    zs, zt, y = make_batch(2, 3, 1.0, seed=0)
    with pytest.raises(ValueError, match="stop_fraction"):
        eskd_loss(zs, zt, y, stop_fraction=1.5, epoch=0, epochs=10)
    for epoch in (0, 9):
        with pytest.raises(ValueError, match="temperature"):
            eskd_loss(zs, zt, y, temperature=-1.0, epoch=epoch, epochs=10)


# ---------------------------------------------------------------------------
# ka-dtd
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("ka", ["ps", "none"])
@pytest.mark.parametrize("dtd", ["flsw", "cwsm", "none"])
@pytest.mark.parametrize(("beta", "gamma"), [(0.0, 1.0), (1.0, 1.0), (3.0, 0.5), (2.0, 2.0), (100.0, 1.0)])
@pytest.mark.parametrize("alpha", [0.5, 0.9, 1.0])
def test_ka_dtd_matches_reference(alpha: float, beta: float, gamma: float, dtd: str, ka: str) -> None:
    zs, zt, y = make_batch(8, 7, 3.0, seed=int(beta * 10 + gamma * 3 + alpha * 7))
    zt = with_correctness(zt, y, GKD_CORRECT)
    got = ka_dtd_loss(zs, zt, y, temperature=4.0, alpha=alpha, beta=beta, gamma=gamma, dtd=dtd, ka=ka)
    want = ref_ka_dtd(np64(zs), np64(zt), y.numpy(), 4.0, alpha, beta, gamma, dtd, ka)
    assert got.dtype == torch.float64 and got.shape == ()
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_ka_dtd_registry_defaults_and_float32() -> None:
    zs, zt, y = make_batch(16, 10, 3.0, seed=41, dtype=torch.float32)
    got = get_method("ka-dtd")(zs, zt, y)
    assert got.dtype == torch.float32
    want = ref_ka_dtd(np64(zs), np64(zt), y.numpy(), 4.0, 0.9, 1.0, 1.0, "flsw", "ps")
    assert got.item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("dtd", ["flsw", "cwsm", "none"])
def test_ka_changes_nothing_when_the_teacher_is_always_right(dtd: str) -> None:
    zs, zt, y = make_batch(7, 6, 3.0, seed=42)
    zt = with_correctness(zt, y, [True] * 7)
    assert torch.equal(probability_shift(zt, y), zt)
    with_ka = ka_dtd_loss(zs, zt, y, dtd=dtd, ka="ps").item()
    assert with_ka == ka_dtd_loss(zs, zt, y, dtd=dtd, ka="none").item()
    # and without DTD it is exactly Hinton KD
    if dtd == "none":
        assert with_ka == pytest.approx(ref_kd(np64(zs), np64(zt), y.numpy(), 4.0, 0.9), rel=1e-12)


def test_probability_shift_puts_the_maximum_on_the_label() -> None:
    zs, zt, y = make_batch(8, 9, 3.0, seed=43)
    zt = with_correctness(zt, y, GKD_CORRECT)
    original = zt.clone()
    shifted = probability_shift(zt, y)
    assert torch.equal(zt, original)  # input untouched
    assert (shifted.argmax(dim=1) == y).all()
    np.testing.assert_array_equal(shifted.numpy(), ref_shift(np64(zt), y.numpy()))
    for i, ok in enumerate(GKD_CORRECT):
        if ok:
            assert torch.equal(shifted[i], zt[i])
        else:
            # a swap: same values, exactly two positions moved, the teacher's top value now at the label
            assert torch.equal(shifted[i].sort().values, zt[i].sort().values)
            assert int((shifted[i] != zt[i]).sum()) == 2
            assert shifted[i, y[i]] == zt[i].max()
    # The adjusted *distribution* peaks at the label at any temperature, and is still a distribution.
    for temperature in (0.5, 4.0, 20.0):
        p = torch.softmax(shifted / temperature, dim=1)
        assert (p.argmax(dim=1) == y).all()
        np.testing.assert_allclose(p.sum(dim=1).numpy(), 1.0, rtol=0, atol=1e-14)


def test_dtd_lowers_the_temperature_of_harder_samples() -> None:
    zs, zt, y = make_batch(10, 8, 2.0, seed=44)
    for mode in ("flsw", "cwsm"):
        tau = dtd_temperatures(zs, zt, 4.0, 1.0, 1.0, mode).numpy()
        want = ref_taus(np64(zs), np64(zt), 4.0, 1.0, 1.0, mode)
        np.testing.assert_allclose(tau, want, rtol=1e-12, atol=0)
        assert tau.mean() == pytest.approx(4.0, rel=1e-12)  # the batch mean is the pivot (no floor hit)
        assert np.ptp(tau) > 0
    # flsw: the sample least aligned with its teacher gets the lowest temperature
    cos = np.array([np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(np64(zs), np64(zt))])
    tau = dtd_temperatures(zs, zt, 4.0, 1.0, 1.0, "flsw").numpy()
    assert int(np.argmin(tau)) == int(np.argmin(cos))
    # cwsm: the least confident student gets the lowest temperature
    tau = dtd_temperatures(zs, zt, 4.0, 1.0, 1.0, "cwsm").numpy()
    assert int(np.argmin(tau)) == int(np.argmin(ref_softmax(np64(zs)).max(axis=1)))
    # a huge beta is floored at tau_0 / 10
    assert dtd_temperatures(zs, zt, 4.0, 1e3, 1.0, "flsw").min().item() == pytest.approx(0.4, rel=1e-12)


def test_ka_dtd_gradient_treats_the_temperatures_as_constants() -> None:
    alpha = 0.8
    zs, zt, y = make_batch(6, 5, 2.0, seed=45)
    zt = with_correctness(zt, y, [True, False, True, False, False, True])
    zs.requires_grad_(True)
    ka_dtd_loss(zs, zt, y, alpha=alpha, beta=2.0).backward()
    adj = ref_shift(np64(zt), y.numpy())
    tau = ref_taus(np64(zs), adj, 4.0, 2.0, 1.0, "flsw")[:, None]
    soft = tau * (ref_softmax(np64(zs) / tau) - ref_softmax(adj / tau)) / 6
    hard = (ref_softmax(np64(zs)) - np.eye(5)[y.numpy()]) / 6
    np.testing.assert_allclose(zs.grad.numpy(), alpha * soft + (1 - alpha) * hard, rtol=0, atol=1e-13)


def test_ka_dtd_rejects_bad_options() -> None:
    zs, zt, y = make_batch(2, 3, 1.0, seed=0)
    with pytest.raises(ValueError, match="dtd"):
        ka_dtd_loss(zs, zt, y, dtd="focal")
    with pytest.raises(ValueError, match="ka"):
        ka_dtd_loss(zs, zt, y, ka="lsr")
    with pytest.raises(ValueError, match="temperature"):
        ka_dtd_loss(zs, zt, y, temperature=0.0)


# ---------------------------------------------------------------------------
# All five: extreme logits, sparse targets, registry
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("tfkd-reg", {}),
        ("tfkd-reg", {"alpha": 1.0, "temperature": 0.5}),
        ("tfkd-self", {}),
        ("tfkd-self", {"temperature": 0.5}),
        ("gkd", {}),
        ("gkd", {"temperature": 4.0, "ce_weight": 0.0}),
        ("eskd", {}),
        ("eskd", {"temperature": 0.5, "alpha": 1.0}),
        ("ka-dtd", {}),
        ("ka-dtd", {"dtd": "cwsm", "beta": 5.0}),
        ("ka-dtd", {"temperature": 0.5, "beta": 3.0, "gamma": 0.5}),
    ],
)
@pytest.mark.parametrize("epoch", [0, 9])
def test_finite_gradients_at_extreme_fp32_logits(name: str, options: dict, epoch: int) -> None:
    zs, zt, y = extreme_batch()
    zt = with_correctness(zt, y, GKD_CORRECT)  # gkd / ka-dtd: some right, some wrong
    loss = get_method(name)(zs, zt, y, epoch=epoch, epochs=10, **options)
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert torch.isfinite(zs.grad).all()


def test_gkd_finite_at_extreme_logits_when_all_wrong() -> None:
    zs, zt, y = extreme_batch()
    zt = with_correctness(zt, y, [False] * 8)
    loss = gkd_loss(zs, zt, y, epoch=0, epochs=10)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zs.grad).all()


@pytest.mark.parametrize("name", ["gkd", "ka-dtd"])
@pytest.mark.parametrize("kind", ["topk", "sample"])
def test_sparse_targets_refused_with_a_clear_error(name: str, kind: str) -> None:
    zs, zt, y = make_batch(4, 10, 2.0, seed=51, dtype=torch.float32)
    vals, idx = zt.topk(3, dim=1)
    sparse = SparseTargets(kind, idx, vals, torch.logsumexp(zt, dim=1), 10, 1.0)
    assert get_method(name).accepts_sparse is False
    with pytest.raises(ValueError, match="dense") as exc:
        get_method(name)(zs, sparse, y, epoch=0, epochs=10)
    assert name in str(exc.value) and kind in str(exc.value)


def test_registry_entries() -> None:
    want = {
        "tfkd-reg": (
            {"alpha": 0.1, "temperature": 20.0, "multiplier": 100.0, "correct_prob": 0.99},
            False, False, set(), tfkd_reg_loss,
        ),
        "tfkd-self": ({"alpha": 0.95, "temperature": 6.0, "multiplier": 50.0}, True, True, set(), tfkd_self_loss),
        "gkd": (
            {"temperature": 1.0, "kd_weight": 1.0, "ce_weight": 1.0, "decay": 0.9, "decay_every": 0.3},
            True, False, {"epoch", "epochs"}, gkd_loss,
        ),
        "eskd": (
            {"temperature": 4.0, "alpha": 0.9, "stop_fraction": 0.5, "stop_epoch": None},
            True, True, {"epoch", "epochs"}, eskd_loss,
        ),
        "ka-dtd": (
            {"temperature": 4.0, "alpha": 0.9, "beta": 1.0, "gamma": 1.0, "dtd": "flsw", "ka": "ps"},
            True, False, set(), ka_dtd_loss,
        ),
    }  # fmt: skip
    for name, (defaults, needs_teacher, accepts_sparse, schedule, fn) in want.items():
        m = get_method(name)
        assert m.name == name
        assert m.defaults == defaults, name
        assert m.needs_teacher is needs_teacher, name
        assert m.accepts_sparse is accepts_sparse, name
        assert m.schedule_args == schedule, name
        assert m.loss is fn
        assert "20" in m.paper and len(m.paper) > 20


@pytest.mark.parametrize("name", NEW)
def test_unknown_option_and_missing_teacher(name: str) -> None:
    zs, zt, y = make_batch(3, 4, 1.0, seed=0)
    with pytest.raises(TypeError, match="temprature"):
        get_method(name)(zs, zt, y, epoch=0, epochs=10, temprature=2.0)
    if get_method(name).needs_teacher:
        with pytest.raises(ValueError, match="teacher"):
            get_method(name)(zs, None, y, epoch=0, epochs=10)
