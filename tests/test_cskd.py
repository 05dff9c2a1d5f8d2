"""CS-KD: the loss against a float64 reference, the pair sampler, and a training run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import ref_log_softmax

from kd.core.data import load_dataset
from kd.models import digits_student
from kd.student_trainer.losses import get_method
from kd.student_trainer.train import TrainConfig, same_class_partners, seed_everything, train_student


def ref_cskd(z: np.ndarray, y: np.ndarray, t: float, lam: float) -> float:
    b = len(z) // 2
    log_p = ref_log_softmax(z[:b] / t)
    log_q = ref_log_softmax(z[b:] / t)
    kl = (np.exp(log_q) * (log_q - log_p)).sum(axis=1).mean()
    ce = -ref_log_softmax(z[:b])[np.arange(b), y[:b]].mean()
    return float(ce + lam * t * t * kl)


@pytest.mark.parametrize(("t", "lam", "scale"), [(4.0, 1.0, 1.0), (1.0, 0.5, 5.0), (8.0, 2.0, 50.0)])
def test_cskd_matches_reference(t: float, lam: float, scale: float) -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(12, 7, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, 7, (6,), generator=g).repeat(2)
    got = get_method("cskd")(z, None, y, temperature=t, lam=lam)
    assert abs(float(got) - ref_cskd(z.numpy(), y.numpy(), t, lam)) < 1e-9 * max(1.0, abs(float(got)))


def test_cskd_properties() -> None:
    z = torch.randn(4, 5, dtype=torch.float64)
    y = torch.tensor([1, 3, 1, 3])
    same = torch.cat([z[:2], z[:2]]).requires_grad_(True)
    ce_only = torch.nn.functional.cross_entropy(same[:2], y[:2])
    torch.testing.assert_close(get_method("cskd")(same, None, y), ce_only)  # KL 0 when partners agree
    loss = get_method("cskd")(z.clone().requires_grad_(True), None, y)
    assert torch.isfinite(loss)
    zz = z.clone().requires_grad_(True)
    get_method("cskd")(zz, None, y).backward()
    assert torch.count_nonzero(zz.grad[2:]) == 0, "the partner's prediction is a fixed target"
    with pytest.raises(ValueError, match="share their sample's class"):
        get_method("cskd")(z, None, torch.tensor([1, 3, 3, 1]))
    big = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]], requires_grad=True)
    get_method("cskd")(big, None, torch.tensor([0, 0])).backward()
    assert torch.isfinite(big.grad).all()


def test_partners_share_the_class_and_differ_from_the_sample() -> None:
    train = load_dataset("digits", "train")
    subset = torch.arange(200)
    idx = subset[:50]
    partners = same_class_partners(idx, train.labels, subset, torch.Generator().manual_seed(1))
    assert torch.equal(train.labels[partners], train.labels[idx])
    assert bool((partners != idx).all()) and bool(torch.isin(partners, subset).all())
    again = same_class_partners(idx, train.labels, subset, torch.Generator().manual_seed(1))
    assert torch.equal(partners, again)


def test_cskd_trains_without_a_teacher() -> None:
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    seed_everything(0)
    r = train_student(digits_student(), train, test, TrainConfig(method="cskd", epochs=3), subset=torch.arange(200))
    assert len(r.acc_per_epoch) == 3 and all(np.isfinite(r.loss_per_epoch))
    assert r.loss_per_epoch[-1] < r.loss_per_epoch[0] and r.test_acc > 0.2  # learning, above chance (0.1)
