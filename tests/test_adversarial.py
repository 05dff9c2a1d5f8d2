"""``adversarial`` (Xu et al. 2017): the formula in float64, who each term trains, and
a real run where the discriminator learns alongside the student."""

from __future__ import annotations

import math

import torch

from kd.core.data import load_dataset
from kd.models import digits_student
from kd.student_trainer.losses import get_method
from kd.student_trainer.losses.adversarial import LogitDiscriminator, adversarial_loss
from kd.student_trainer.sources import LocalSource
from kd.student_trainer.train import TrainConfig, seed_everything, train_student
from kd.teacher_server.loading import Teacher


def _log_sigmoid(v: float) -> float:
    return -math.log1p(math.exp(-v))


def _ce(row: list[float], y: int) -> float:
    m = max(row)
    return -(row[y] - m - math.log(sum(math.exp(r - m) for r in row)))


def test_matches_a_hand_computation_in_float64() -> None:
    torch.manual_seed(0)
    b, c = 4, 5
    d = LogitDiscriminator(c, hidden=7).double()
    z_s, z_t = torch.randn(b, c, dtype=torch.float64), torch.randn(b, c, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 4])
    loss = adversarial_loss([d(z_s, z_t)], [z_t], labels=y, student_logits=z_s, adv_weight=0.7, l1_weight=0.3)
    with torch.no_grad():
        dt, ds = d.net(z_t).tolist(), d.net(z_s).tolist()
    loss_d = sum(-_log_sigmoid(dt[i][0]) - math.log1p(-math.exp(_log_sigmoid(ds[i][0]))) for i in range(b)) / b
    loss_d += sum(_ce(dt[i][1:], int(y[i])) + _ce(ds[i][1:], int(y[i])) for i in range(b)) / b
    loss_g = sum(-_log_sigmoid(ds[i][0]) + _ce(ds[i][1:], int(y[i])) for i in range(b)) / b
    l1 = sum(abs(float(z_s[i, j] - z_t[i, j])) for i in range(b) for j in range(c)) / (b * c)
    assert abs(float(loss.detach()) - (loss_d + 0.7 * loss_g + 0.3 * l1)) < 1e-10


def test_each_player_moves_only_its_own_weights_toward_its_own_goal() -> None:
    torch.manual_seed(1)
    d = LogitDiscriminator(6, hidden=8).double()
    z_t = torch.randn(5, 6, dtype=torch.float64)
    z_s = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 6, (5,))
    loss = adversarial_loss([d(z_s, z_t)], [z_t], labels=y, student_logits=z_s, l1_weight=0.0)
    loss.backward()
    # The student's gradient is that of the generator term alone (D held fixed) ...
    z = z_s.detach().clone().requires_grad_(True)
    out = d.net(z)
    ones = torch.ones(5, dtype=torch.float64)
    g = torch.nn.functional.binary_cross_entropy_with_logits(out[:, 0], ones) + torch.nn.functional.cross_entropy(
        out[:, 1:], y
    )
    (grad_g,) = torch.autograd.grad(g, z)
    torch.testing.assert_close(z_s.grad, grad_g)
    # ... and D's gradient that of the discriminator term alone (the student's logits detached).
    d2 = LogitDiscriminator(6, hidden=8).double()
    d2.load_state_dict(d.state_dict())
    ot, os_ = d2.net(z_t), d2.net(z_s.detach())
    loss_d = (
        torch.nn.functional.binary_cross_entropy_with_logits(ot[:, 0], ones)
        + torch.nn.functional.binary_cross_entropy_with_logits(os_[:, 0], 0 * ones)
        + torch.nn.functional.cross_entropy(ot[:, 1:], y)
        + torch.nn.functional.cross_entropy(os_[:, 1:], y)
    )
    loss_d.backward()
    for (name, p1), p2 in zip(d.named_parameters(), d2.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, msg=name)

    # A step against the student's gradient lowers the generator's loss under the same D.
    def gen_loss(v: torch.Tensor) -> float:
        o = d.net(v)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(o[:, 0], ones)
        return float(bce + torch.nn.functional.cross_entropy(o[:, 1:], y))

    with torch.no_grad():
        assert gen_loss(z_s - 0.01 * z_s.grad) < gen_loss(z_s)


def test_l1_term_vanishes_when_the_student_matches_and_gradients_stay_finite() -> None:
    d = LogitDiscriminator(4).double()
    z = torch.full((3, 4), 1e4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2])
    only_l1 = adversarial_loss([d(z, z.detach())], [z.detach()], labels=y, student_logits=z, adv_weight=0.0)
    zero_l1 = adversarial_loss([d(z, z.detach())], [z.detach()], labels=y, student_logits=z, adv_weight=0.0,
                               l1_weight=0.0)  # fmt: skip
    assert abs(float(only_l1 - zero_l1)) < 1e-12
    only_l1.backward()
    assert torch.isfinite(z.grad).all()


def test_trains_a_digits_student_with_a_learning_discriminator(teacher: Teacher) -> None:
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    seed_everything(0)
    student = digits_student()
    method = get_method("adversarial")
    assert method.default_matches == ("logits=logits",)
    res = train_student(student, train, test, TrainConfig(method="adversarial", epochs=2), source=LocalSource(teacher),
                        subset=torch.arange(128))  # fmt: skip
    assert all(math.isfinite(v) for v in res.loss_per_epoch)
    d = res.connectors[0]
    assert isinstance(d, LogitDiscriminator)
    fresh = LogitDiscriminator(10)
    seed_everything(0)
    digits_student()
    fresh = LogitDiscriminator(10)  # the initialisation the run started from
    assert not torch.equal(d.net[0].weight, fresh.net[0].weight)
