"""DIST+ teacher acclimation (kd.student_trainer.online.dist_plus): both objectives against a
float64 reference written out with loops over the formula, which model each term's gradient
reaches (in the loss, in one real step of the shared trainer, and over a short real run), and
the refusal of a teacher the run cannot train (a server, a cache)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from kd.cli import app
from kd.core.data import load_dataset
from kd.models import digits_cnn
from kd.student_trainer.online import METHODS, method_options, train_online
from kd.student_trainer.online.dist_plus import dist_plus_loss, setup
from kd.student_trainer.sources import ServerSource
from kd.student_trainer.train import StepContext, TrainConfig, seed_everything

TRAIN = load_dataset("digits", "train")
TEST = load_dataset("digits", "test")
D = torch.float64
B, K = 6, 5


# ----------------------------------------------------------------------------- plain float reference
def _softmax(row: list[float], t: float) -> list[float]:
    top = max(v / t for v in row)
    e = [math.exp(v / t - top) for v in row]
    return [v / sum(e) for v in e]


def _pearson(a: list[float], b: list[float], eps: float = 1e-8) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    na = math.sqrt(sum((x - ma) ** 2 for x in a))
    nb = math.sqrt(sum((y - mb) ** 2 for y in b))
    return num / (na * nb + eps)


def _relation(za: torch.Tensor, zb: torch.Tensor, beta: float, gamma: float, t: float) -> float:
    ya = [_softmax(r, t) for r in za.tolist()]
    yb = [_softmax(r, t) for r in zb.tolist()]
    inter = 1 - sum(_pearson(a, b) for a, b in zip(ya, yb)) / len(ya)
    cols = range(len(ya[0]))
    intra = 1 - sum(_pearson([r[c] for r in ya], [r[c] for r in yb]) for c in cols) / len(cols)
    return t * t * (beta * inter + gamma * intra)


def _ce(z: torch.Tensor, y: torch.Tensor) -> float:
    total = 0.0
    for row, c in zip(z.tolist(), y.tolist()):
        top = max(row)
        total += top + math.log(sum(math.exp(v - top) for v in row)) - row[c]
    return total / len(z)


def _logits(seed: int) -> torch.Tensor:
    return (torch.randn(B, K, generator=torch.Generator().manual_seed(seed), dtype=D) * 2).requires_grad_(True)


OPTS = {"beta": 1.5, "gamma": 0.7, "temperature": 2.0, "ce_weight": 0.8, "acclimation_weight": 0.6,
        "teacher_ce_weight": 1.3}  # fmt: skip


def test_both_objectives_match_the_reference_in_float64() -> None:
    z_s, z_t = _logits(0), _logits(1)
    y = torch.randint(0, K, (B,), generator=torch.Generator().manual_seed(2))
    got = dist_plus_loss(z_s, z_t, y, **OPTS)
    rel = _relation(z_s.detach(), z_t.detach(), OPTS["beta"], OPTS["gamma"], OPTS["temperature"])
    assert got["loss"].dtype == D
    assert float(got["loss"].detach()) == pytest.approx(OPTS["ce_weight"] * _ce(z_s, y) + rel, rel=1e-12)
    teacher_ref = OPTS["teacher_ce_weight"] * _ce(z_t, y) + OPTS["acclimation_weight"] * rel
    assert float(got["acclimation"].detach()) == pytest.approx(teacher_ref, rel=1e-12)


def test_each_model_gets_only_its_own_terms_gradient() -> None:
    z_s, z_t = _logits(3), _logits(4)
    y = torch.randint(0, K, (B,), generator=torch.Generator().manual_seed(5))
    got = dist_plus_loss(z_s, z_t, y, **OPTS)
    g_s, g_t = torch.autograd.grad(got["loss"] + got["acclimation"], [z_s, z_t])
    # the student: CE + DIST to the teacher's predictions as constants (kd's own dist, checked elsewhere)
    from kd.student_trainer.losses.dist import dist_loss

    own_s = dist_loss(z_s, z_t.detach(), y, beta=OPTS["beta"], gamma=OPTS["gamma"],
                      temperature=OPTS["temperature"], ce_weight=OPTS["ce_weight"])  # fmt: skip
    (ref_s,) = torch.autograd.grad(own_s, [z_s])
    # the teacher: its CE + the acclimation distance to the student's predictions as constants
    t = OPTS["temperature"]
    y_t, y_s = F.softmax(z_t / t, 1), F.softmax(z_s.detach() / t, 1)

    def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)

    dist = t * t * (OPTS["beta"] * (1 - pearson(y_t, y_s).mean()) + OPTS["gamma"] * (1 - pearson(y_t.T, y_s.T).mean()))
    own_t = OPTS["teacher_ce_weight"] * F.cross_entropy(z_t, y) + OPTS["acclimation_weight"] * dist
    (ref_t,) = torch.autograd.grad(own_t, [z_t])
    assert torch.allclose(g_s, ref_s, rtol=1e-10, atol=1e-13)
    assert torch.allclose(g_t, ref_t, rtol=1e-10, atol=1e-13)
    # without acclimation the teacher learns from its labels only
    plain = dist_plus_loss(z_s, z_t, y, **{**OPTS, "acclimation_weight": 0.0})
    (g_t0,) = torch.autograd.grad(plain["loss"] + plain["acclimation"], [z_t])
    (ce_t,) = torch.autograd.grad(OPTS["teacher_ce_weight"] * F.cross_entropy(z_t, y), [z_t])
    assert torch.allclose(g_t0, ce_t, rtol=1e-10, atol=1e-14) and not torch.allclose(g_t, ce_t)


def _teacher(seed: int = 7) -> torch.nn.Module:
    torch.manual_seed(seed)
    return digits_cnn()


def test_one_real_step_routes_each_term_to_its_own_model() -> None:
    seed_everything(0)
    s = setup((64,), 10, width=8, branches=1, options=method_options("dist-plus"), config=TrainConfig(),
              teacher=_teacher())  # fmt: skip
    student, teacher = s.student, s.others["teacher"]
    x, y = TRAIN.get(torch.arange(32)), TRAIN.labels[:32]
    ctx = StepContext(student, x, y, None, torch.arange(32), 0, 0, TrainConfig())

    def grads(which: str | None) -> dict[str, torch.Tensor]:
        for m in (student, teacher):
            m.train().zero_grad(set_to_none=True)
        terms = s.loss(ctx)
        (sum(terms.values()) if which is None else terms[which]).backward()
        return {f"{tag}.{n}": (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                for tag, m in (("s", student), ("t", teacher)) for n, p in m.named_parameters()}  # fmt: skip

    both, own_s, own_t = grads(None), grads("loss"), grads("acclimation")
    for name, g in both.items():
        # the student's weights get exactly the student's term, the teacher's exactly the acclimation objective
        ref, other = (own_s, own_t) if name.startswith("s.") else (own_t, own_s)
        assert torch.allclose(g, ref[name], rtol=1e-5, atol=1e-7), name
        assert float(other[name].abs().sum()) == 0.0, name
    assert any(float(g.abs().sum()) > 0 for n, g in both.items() if n.startswith("t."))


def _run(teacher: torch.nn.Module, **options: object):
    return train_online("dist-plus", TRAIN, TEST, TrainConfig(epochs=2, batch_size=32), subset=torch.arange(96),
                        options=options, teacher=teacher)  # fmt: skip


def test_a_real_run_acclimates_the_teacher_and_trains_the_student() -> None:
    original = _teacher()
    before = {n: p.detach().clone() for n, p in original.named_parameters()}
    frozen = _run(copy.deepcopy(original), acclimation_weight=0.0, teacher_ce_weight=0.0)
    label_only = _run(copy.deepcopy(original), acclimation_weight=0.0)
    acclimated = _run(copy.deepcopy(original))
    assert set(acclimated.accuracies) == {"student", "teacher"} and acclimated.ensemble_acc is None
    assert all(math.isfinite(v) for r in (frozen, acclimated) for v in r.loss_per_epoch)

    def params(res) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in res.others["teacher"].named_parameters()}

    # no teacher term: its weights do not move (plain DIST with a fixed teacher)
    assert all(torch.equal(before[n], p) for n, p in params(frozen).items())
    # its own CE moves it; the acclimation term moves it somewhere else
    assert all(not torch.equal(before[n], p) for n, p in params(label_only).items())
    assert any(not torch.allclose(params(label_only)[n], p) for n, p in params(acclimated).items())
    # and the student trains in every case
    teacher = _teacher()
    seed_everything(0)  # as train_online: the student's initialisation
    student0 = METHODS["dist-plus"].setup((64,), 10, width=8, branches=1, options=method_options("dist-plus"),
                                          config=TrainConfig(), teacher=teacher).student  # fmt: skip
    start = dict(student0.named_parameters())
    assert all(not torch.equal(start[n].detach(), p.detach()) for n, p in acclimated.student.named_parameters())


def test_a_teacher_the_run_cannot_train_is_refused(address: str) -> None:
    served = ServerSource(address, "digits")
    with pytest.raises(ValueError, match="a server's weights cannot be trained from here"):
        train_online("dist-plus", TRAIN, TEST, TrainConfig(epochs=1), subset=torch.arange(32), teacher=served)
    with pytest.raises(ValueError, match="needs a pretrained teacher"):
        train_online("dist-plus", TRAIN, TEST, TrainConfig(epochs=1), subset=torch.arange(32))
    out = CliRunner().invoke(app, ["online", "dist-plus", "--epochs", "1", "--teacher", "cache:/nowhere"])
    assert out.exit_code == 2 and "a cache holds fixed outputs" in " ".join(out.output.split()), out.output
