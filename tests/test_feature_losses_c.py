"""Feature methods, batch C: ``tat`` (target-aware transformer), ``dfa`` (differentiable
feature aggregation), ``recurrent`` (recurrent KD), ``pad-feat`` / ``pad`` (prime-aware
adaptive distillation). Each: a float64 reference written out with loops, the properties
the papers rely on, and a short end-to-end run from a local DigitsCNN teacher."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd.core import reductions
from kd.core.data import load_dataset
from kd.models import digits_cnn_student
from kd.student_trainer.features import Taps
from kd.student_trainer.losses import get_method
from kd.student_trainer.losses.dfa import DFAConnector, DFAFeatures, dfa_loss
from kd.student_trainer.losses.pad import PADLogitConnector, pad_loss
from kd.student_trainer.losses.pad_feat import PADConnector, pad_feat_loss
from kd.student_trainer.losses.recurrent import RecurrentResidual, recurrent_loss
from kd.student_trainer.losses.tat import TaTConnector, TaTFeatures, tat_loss
from kd.student_trainer.sources import LocalSource
from kd.student_trainer.train import TrainConfig, seed_everything, train_student
from kd.teacher_server.loading import load_teacher

TRAIN = load_dataset("digits", "train")
TEST = load_dataset("digits", "test")
SUBSET = torch.arange(128)
D = torch.float64


@pytest.fixture(scope="module")
def source(digits_cnn_spec) -> LocalSource:
    return LocalSource(load_teacher("cnn", digits_cnn_spec(3)))


def _run(source: LocalSource, method: str, matches: list[str], student: nn.Module | None = None, **options):
    seed_everything(0)
    student = digits_cnn_student() if student is None else student
    before = [p.detach().clone() for p in student.parameters()]
    config = TrainConfig(method=method, matches=matches, epochs=2, method_options=options)
    result = train_student(student, TRAIN, TEST, config, source=source, subset=SUBSET)
    assert all(math.isfinite(v) for v in result.loss_per_epoch), result.loss_per_epoch
    assert any(not torch.equal(b, p) for b, p in zip(before, student.parameters())), "the student did not train"
    return result


def _step_lowers(loss_fn, params: list[torch.Tensor], lr: float = 1e-3) -> None:
    """A small step against the gradient lowers the loss; all gradients are finite."""
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params)
    assert all(torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        stepped = [p - lr * g / (g.norm() + 1e-30) for p, g in zip(params, grads)]
        for p, s in zip(params, stepped):
            p.copy_(s)
    assert float(loss_fn().detach()) < float(loss.detach())


# ---------------------------------------------------------------------------------------------
# tat
# ---------------------------------------------------------------------------------------------
def _attend(teacher_vecs: list[list[float]], gamma_vecs: list[list[float]], phi_vecs: list[list[float]]):
    """Reference one-to-all reconfiguration on plain lists: out_i = sum_j softmax_j(<t_i, g_j>) phi_j."""
    out = []
    for ti in teacher_vecs:
        scores = [sum(a * b for a, b in zip(ti, gj)) for gj in gamma_vecs]
        top = max(scores)
        ex = [math.exp(s - top) for s in scores]
        z = sum(ex)
        out.append([sum(ex[j] / z * phi_vecs[j][c] for j in range(len(ex))) for c in range(len(phi_vecs[0]))])
    return out


def _sq_err(a: list[list[float]], b: list[list[float]]) -> float:
    return sum((x - y) ** 2 for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def _pixel(x: torch.Tensor, n: int, r: int, c: int) -> list[float]:
    return [float(x[n, ch, r, c]) for ch in range(x.shape[1])]


def _tat_reference(g, p, t, *, weight, patch, groups, anchor, anchor_weight) -> float:
    n_, c_, h, w = t.shape
    err = 0.0
    for n in range(n_):
        if patch == 0:
            units = [[(r, c) for r in range(h) for c in range(w)]]
            cells = [[[pos] for pos in units[0]]]  # one group of one patch
        else:
            patches = [(pr, pc) for pr in range(h // patch) for pc in range(w // patch)]
            per = len(patches) // groups
            cells = []
            for gi in range(groups):
                members = patches[gi * per : (gi + 1) * per]
                # position q inside the group: pixel (a, b) of every member patch, channels concatenated
                cells.append(
                    [
                        [(pr * patch + a, pc * patch + b) for pr, pc in members]
                        for a in range(patch)
                        for b in range(patch)
                    ]
                )
        for group in cells:

            def vecs(x, group=group, n=n):
                return [sum((_pixel(x, n, r, c) for r, c in q), []) for q in group]

            err += _sq_err(_attend(vecs(t), vecs(g), vecs(p)), vecs(t))
    total = err / t.numel()
    if anchor:
        k = h // anchor  # the reference uses an exact pooling grid

        def pooled(x, n):
            return [
                [
                    sum(float(x[n, ch, ar * k + i, ac * k + j]) for i in range(k) for j in range(k)) / (k * k)
                    for ch in range(c_)
                ]
                for ar in range(anchor)
                for ac in range(anchor)
            ]

        aerr = sum(_sq_err(_attend(pooled(t, n), pooled(g, n), pooled(p, n)), pooled(t, n)) for n in range(n_))
        total += anchor_weight * aerr / (n_ * c_ * anchor * anchor)
    return weight * total


@pytest.mark.parametrize(
    "opts",
    [
        {"patch": 0, "groups": 1, "anchor": 0},
        {"patch": 2, "groups": 2, "anchor": 0},
        {"patch": 2, "groups": 4, "anchor": 2, "anchor_weight": 0.5},
        {"patch": 4, "groups": 1, "anchor": 2},
    ],
)
def test_tat_matches_a_hand_reference(opts: dict) -> None:
    torch.manual_seed(0)
    g, p, t = (torch.randn(2, 3, 4, 4, dtype=D) for _ in range(3))
    opts = {"weight": 0.2, "anchor_weight": 1.0, **opts}
    got = tat_loss([TaTFeatures(g, p, t)], [t], **opts)
    torch.testing.assert_close(got, torch.tensor(_tat_reference(g, p, t, **opts), dtype=D))
    # theta = None falls back to the teacher map (identity theta), the same number
    torch.testing.assert_close(tat_loss([TaTFeatures(g, p, None)], [t], **opts), got)


def test_tat_one_to_all_properties() -> None:
    torch.manual_seed(1)
    t = F.normalize(torch.randn(2, 8, 4, 4, dtype=D), dim=1)  # distinct unit-norm teacher pixels
    # minimum: a sharp attention onto the same position and phi(s) = t rebuild t exactly
    assert float(tat_loss([TaTFeatures(500 * t, t.clone(), t)], [t])) < 1e-12
    # one-to-all: permuting the student's positions (gamma and phi together) changes nothing,
    # whereas a one-to-one (FitNets) distance does change
    g, p = torch.randn(2, 8, 4, 4, dtype=D), torch.randn(2, 8, 4, 4, dtype=D)
    perm = torch.randperm(16)

    def shuffle(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2)[:, :, perm].reshape(x.shape)

    torch.testing.assert_close(
        tat_loss([TaTFeatures(shuffle(g), shuffle(p), t)], [t]), tat_loss([TaTFeatures(g, p, t)], [t])
    )
    assert not torch.allclose((shuffle(p) - t).pow(2).mean(), (p - t).pow(2).mean())
    # finite gradients with saturated softmax (huge similarities) and a small step lowers the loss
    g = (1e4 * torch.randn(2, 8, 4, 4, dtype=D)).requires_grad_()
    p = torch.randn(2, 8, 4, 4, dtype=D, requires_grad=True)
    gg, gp = torch.autograd.grad(tat_loss([TaTFeatures(g, p, t)], [t], patch=2, groups=2, anchor=2), [g, p])
    assert torch.isfinite(gg).all() and torch.isfinite(gp).all()
    g = torch.randn(2, 8, 4, 4, dtype=D, requires_grad=True)
    _step_lowers(lambda: tat_loss([TaTFeatures(g, p, t)], [t], patch=2, groups=2, anchor=2), [g, p])


def test_tat_validates_its_inputs() -> None:
    t = torch.randn(2, 3, 4, 4)
    f = TaTFeatures(t.clone(), t.clone(), t)
    with pytest.raises(ValueError, match="does not divide"):
        tat_loss([f], [t], patch=3)
    with pytest.raises(ValueError, match="groups > 1 needs patch"):
        tat_loss([f], [t], groups=2)
    with pytest.raises(ValueError, match="do not split into 3 groups"):
        tat_loss([f], [t], patch=2, groups=3)
    with pytest.raises(ValueError, match="phi"):
        tat_loss([TaTFeatures(t, torch.randn(2, 5, 4, 4), t)], [t])
    with pytest.raises(ValueError, match="TaT connector"):
        tat_loss([t], [t])


def test_tat_connector_projects_to_the_teacher_and_takes_it() -> None:
    conn = TaTConnector((8, 8, 8), (32, 4, 4))
    assert conn.takes_teacher
    s, t = torch.randn(3, 8, 8, 8), torch.randn(3, 32, 4, 4)
    out = conn(s, t)
    assert out.gamma.shape == out.phi.shape == (3, 32, 4, 4) and out.theta is t
    assert conn(s, None).theta is None
    with pytest.raises(ValueError, match="built for"):
        conn(s, torch.randn(3, 16, 4, 4))
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        TaTConnector((8,), (32,))


@pytest.mark.parametrize("opts", [{}, {"patch": 4, "groups": 2, "anchor": 2}])
def test_tat_end_to_end(source: LocalSource, opts: dict) -> None:
    result = _run(source, "tat", ["layer2=layer2"], **opts)
    conn = result.connectors[0]
    assert not torch.equal(conn.gamma[1].weight, torch.ones_like(conn.gamma[1].weight))
    assert not torch.equal(conn.phi[1].weight, torch.ones_like(conn.phi[1].weight))


# ---------------------------------------------------------------------------------------------
# dfa
# ---------------------------------------------------------------------------------------------
def test_dfa_matches_a_hand_reference() -> None:
    torch.manual_seed(0)
    s1, s2 = torch.randn(2, 3, 2, 2, dtype=D), torch.randn(2, 4, dtype=D)
    r = [torch.randn(2, 3, 2, 2, dtype=D) for _ in range(3)] + [torch.randn(2, 5, dtype=D)]
    t = [torch.randn(2, 3, 2, 2, dtype=D) for _ in range(3)] + [torch.randn(2, 5, dtype=D)]
    a = [0.3, -1.2, 0.7, 2.0]
    feats = [DFAFeatures(r[k], torch.tensor(a[k], dtype=D), s1) for k in range(3)]
    feats.append(DFAFeatures(r[3], torch.tensor(a[3], dtype=D), s2))
    got = dfa_loss(feats, t, weight=100.0, epoch=0, epochs=4)
    # group {0, 1, 2}: softmax weights over a[0..2]; prediction = mean of the regressed maps
    z = sum(math.exp(v) for v in a[:3])
    w = [math.exp(v) / z for v in a[:3]]
    err = 0.0
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in (2, 3, 2, 2))).tolist():
        target = sum(w[k] * float(t[k][tuple(idx)]) for k in range(3))
        pred = sum(float(r[k][tuple(idx)]) for k in range(3)) / 3
        err += (pred - target) ** 2
    expect = err / 24
    # group {3}: one candidate, weight 1: plain FitNets
    expect += sum((float(r[3][i, j]) - float(t[3][i, j])) ** 2 for i in range(2) for j in range(5)) / 10
    torch.testing.assert_close(got, torch.tensor(100.0 * expect, dtype=D))


def test_dfa_search_then_frozen_aggregation() -> None:
    torch.manual_seed(0)
    s = torch.randn(4, 3, 2, 2, dtype=D)
    t = [torch.randn(4, 3, 2, 2, dtype=D) for _ in range(2)]
    alpha = torch.zeros(2, dtype=D, requires_grad=True)
    pred = t[0].clone().requires_grad_()  # the student already imitates candidate 0

    def loss(epoch: int) -> torch.Tensor:
        feats = [DFAFeatures(pred, alpha[k], s) for k in range(2)]
        return dfa_loss(feats, t, search_fraction=0.5, epoch=epoch, epochs=4)

    # search epochs (ceil(0.5 * 4) = 2): alpha gets a gradient; first-order single-level search
    # moves the weight towards the candidate the student imitates (learnability)
    (g,) = torch.autograd.grad(loss(1), [alpha])
    assert float(g[0]) < 0 < float(g[1])
    # after the search the aggregation is frozen: no gradient reaches alpha
    out = loss(2)
    out.backward()
    assert alpha.grad is None and pred.grad is not None
    # zero when the prediction is the aggregated target
    with torch.no_grad():
        w = torch.softmax(alpha, 0)
        exact = w[0] * t[0] + w[1] * t[1]
    assert float(dfa_loss([DFAFeatures(exact, alpha[k], s) for k in range(2)], t, epoch=3, epochs=4)) == 0.0
    # a small step against the gradient lowers the loss (student side and alpha)
    alpha2 = torch.tensor([0.5, -0.5], dtype=D, requires_grad=True)
    p2 = torch.randn(4, 3, 2, 2, dtype=D, requires_grad=True)
    _step_lowers(
        lambda: dfa_loss([DFAFeatures(p2, alpha2[k], s) for k in range(2)], t, epoch=0, epochs=4), [p2, alpha2]
    )


def test_dfa_groups_by_the_student_map() -> None:
    torch.manual_seed(0)
    s = torch.randn(2, 3, dtype=D)
    r = [torch.randn(2, 4, dtype=D) for _ in range(2)]
    t = [torch.randn(2, 4, dtype=D) for _ in range(2)]
    a = [torch.tensor(0.4, dtype=D), torch.tensor(-0.1, dtype=D)]
    grouped = dfa_loss([DFAFeatures(r[k], a[k], s) for k in range(2)], t, epoch=0, epochs=1)
    # the order of the candidates inside a group does not matter
    swapped = dfa_loss([DFAFeatures(r[k], a[k], s) for k in (1, 0)], [t[1], t[0]], epoch=0, epochs=1)
    torch.testing.assert_close(grouped, swapped)
    # equal values but different student layers (distinct tensors): two separate FitNets terms
    separate = dfa_loss([DFAFeatures(r[k], a[k], s.clone()) for k in range(2)], t, epoch=0, epochs=1)
    torch.testing.assert_close(separate, 100.0 * sum((r[k] - t[k]).pow(2).mean() for k in range(2)))
    assert not torch.allclose(grouped, separate)
    # extreme logits: finite gradients
    big = [torch.tensor(1e4, dtype=D, requires_grad=True), torch.tensor(-1e4, dtype=D, requires_grad=True)]
    grads = torch.autograd.grad(dfa_loss([DFAFeatures(r[k], big[k], s) for k in range(2)], t, epoch=0, epochs=1), big)
    assert all(torch.isfinite(g) for g in grads)
    with pytest.raises(ValueError, match="shapes differ"):
        dfa_loss([DFAFeatures(r[0], a[0], s), DFAFeatures(torch.randn(2, 5), a[1], s)], [t[0], torch.randn(2, 5)],
                 epoch=0, epochs=1)  # fmt: skip
    with pytest.raises(ValueError, match="search_fraction"):
        dfa_loss([DFAFeatures(r[0], a[0], s)], [t[0]], search_fraction=2.0, epoch=0, epochs=1)


def test_dfa_connector() -> None:
    conn = DFAConnector((8, 8, 8), (32, 8, 8))
    assert conn.takes_teacher and float(conn.alpha.detach()) == 0.0
    s = torch.randn(2, 8, 8, 8)
    out = conn(s, torch.randn(2, 32, 8, 8))
    assert out.regressed.shape == (2, 32, 8, 8) and out.student is s
    with pytest.raises(ValueError, match="built for"):
        conn(s, torch.randn(2, 16, 8, 8))


def test_dfa_end_to_end(source: LocalSource) -> None:
    matches = ["layer2=layer2.0", "layer2=layer2.1", "layer2=layer2"]
    searched = _run(source, "dfa", matches, search_fraction=0.5)
    alphas = [float(c.alpha.detach()) for c in searched.connectors]
    assert any(a != 0.0 for a in alphas)  # the search moved the aggregation weights
    assert any(not torch.equal(c.regressor.bn.weight, torch.ones(64)) for c in searched.connectors)
    # no search: the uniform aggregation stays exactly uniform
    fixed = _run(source, "dfa", matches, search_fraction=0.0)
    assert [float(c.alpha.detach()) for c in fixed.connectors] == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="shapes differ"):
        _run(source, "dfa", ["layer2=layer1", "layer2=layer2"])


# ---------------------------------------------------------------------------------------------
# recurrent
# ---------------------------------------------------------------------------------------------
def _attention_reference(x: torch.Tensor) -> list[list[float]]:
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1)
    out = []
    for i in range(n):
        q = [sum(float(flat[i, k, j]) ** 2 for k in range(c)) / c for j in range(flat.shape[2])]
        norm = math.sqrt(sum(v * v for v in q))
        out.append([v / norm for v in q])
    return out


def test_recurrent_matches_a_hand_reference() -> None:
    torch.manual_seed(0)
    maps = {"s1": torch.randn(2, 3, 4, 4, dtype=D), "t1": torch.randn(2, 5, 4, 4, dtype=D),
            "s2": torch.randn(2, 4, 2, 2, dtype=D), "t2": torch.randn(2, 6, 2, 2, dtype=D)}  # fmt: skip
    sf = [reductions.reduce(f"{k}@at", maps) for k in ("s1", "s2")]
    tf = [reductions.reduce(f"{k}@at", maps) for k in ("t1", "t2")]
    got = recurrent_loss(sf, tf, beta=1000.0)
    expect = 0.0
    for s, t in (("s1", "t1"), ("s2", "t2")):
        a, b = _attention_reference(maps[s]), _attention_reference(maps[t])
        expect += _sq_err(a, b) / (len(a) * len(a[0]))
    torch.testing.assert_close(got, torch.tensor(1000.0 * expect, dtype=D))  # beta times, as the AT code


def test_recurrent_properties() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(3, 4, 4, 4, dtype=D), torch.randn(3, 7, 4, 4, dtype=D)

    def loss(s: torch.Tensor) -> torch.Tensor:
        return recurrent_loss([reductions.reduce("s@at", {"s": s})], [reductions.reduce("t@at", {"t": t})])

    assert float(recurrent_loss([reductions.reduce("t@at", {"t": t})], [reductions.reduce("t@at", {"t": t})])) == 0.0
    # attention maps ignore the scale of each sample's map and the order of the channels
    scale = torch.tensor([0.01, 3.0, 250.0], dtype=D).view(3, 1, 1, 1)
    torch.testing.assert_close(loss(s * scale), loss(s))
    torch.testing.assert_close(loss(s[:, torch.randperm(4)]), loss(s))
    huge = (1e6 * torch.randn(3, 4, 4, 4, dtype=D)).requires_grad_()
    (g,) = torch.autograd.grad(loss(huge), [huge])
    assert torch.isfinite(g).all()
    p = s.clone().requires_grad_()
    _step_lowers(lambda: loss(p), [p], lr=1e-2)
    with pytest.raises(ValueError, match="same spatial size"):
        recurrent_loss([torch.randn(2, 16)], [torch.randn(2, 4)])


def test_recurrent_residual_unrolls_one_block_and_taps_every_step() -> None:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Tanh())
    rec = RecurrentResidual(block, 3)
    assert sum(p.numel() for p in rec.parameters()) == sum(p.numel() for p in block.parameters())
    x = torch.randn(2, 4, 5, 5)
    taps = Taps(rec, ["steps.0", "steps.1", "steps.2"])
    out = rec(x)
    expect, steps = x, []
    for _ in range(3):
        expect = expect + block(expect)
        steps.append(expect)
    torch.testing.assert_close(out, expect)
    for k in range(3):
        torch.testing.assert_close(taps.maps[f"steps.{k}"], steps[k])
    taps.remove()
    with pytest.raises(ValueError, match="steps >= 1"):
        RecurrentResidual(block, 0)
    assert len(RecurrentResidual(block, 2, step_norm=4).norms) == 2


class _RecurrentStudent(nn.Module):
    """A DigitsCNN-shaped student whose two conv stages are one recurrent residual block."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        block = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.rec = RecurrentResidual(block, 2)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rec(self.stem(x.reshape(-1, 1, 8, 8))).mean((2, 3)))


def test_recurrent_end_to_end(source: LocalSource) -> None:
    # the end of each stage, as AT
    _run(source, "recurrent", ["layer1=layer1", "layer2=layer2"], kd_weight=1.0)
    # each unrolled step of the recurrent block recasts one teacher stage
    _run(source, "recurrent", ["rec.steps.0=layer1", "rec.steps.1=layer2"], student=_RecurrentStudent())
    # teacher_reduce=trainer (full maps, reduced here) trains the same
    a = _run(source, "recurrent", ["layer2=layer2"])
    b = _run(source, "recurrent", ["layer2=layer2"], teacher_reduce="trainer")
    assert a.loss_per_epoch == pytest.approx(b.loss_per_epoch, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# pad-feat
# ---------------------------------------------------------------------------------------------
def test_pad_feat_matches_a_hand_reference() -> None:
    torch.manual_seed(0)
    mu, v, t = torch.randn(3, 5, dtype=D), torch.randn(3, 5, dtype=D), torch.randn(3, 5, dtype=D)
    mu2, v2, t2 = (torch.randn(2, 2, 3, 3, dtype=D) for _ in range(3))
    got = pad_feat_loss([(mu, v), (mu2, v2)], [t, t2], weight=2.0, eps=1e-6)
    expect = 0.0
    for a, lv, b in ((mu, v, t), (mu2, v2, t2)):
        fa, flv, fb = a.flatten().tolist(), lv.flatten().tolist(), b.flatten().tolist()
        expect += sum((x - y) ** 2 / (1e-6 + math.exp(s)) + s for x, s, y in zip(fa, flv, fb)) / len(fa)
    torch.testing.assert_close(got, torch.tensor(2.0 * expect, dtype=D))


def test_pad_feat_properties() -> None:
    torch.manual_seed(0)
    t = torch.randn(4, 6, dtype=D)
    v = torch.randn(4, 6, dtype=D)
    # for any variance the regressed feature's optimum is the teacher: zero gradient there
    mu = t.clone().requires_grad_()
    (g,) = torch.autograd.grad(pad_feat_loss([(mu, v)], [t]), [mu])
    assert float(g.abs().max()) == 0.0
    # the optimal log-variance is log of the squared error (eps = 0): hard elements get a larger
    # variance, so a smaller weight 1 / sigma^2
    err = torch.tensor([[0.1, 1.0, 3.0]], dtype=D)
    v_star = torch.log(err**2).requires_grad_()
    (gv,) = torch.autograd.grad(pad_feat_loss([(err, v_star)], [torch.zeros_like(err)], eps=0.0), [v_star])
    torch.testing.assert_close(gv, torch.zeros_like(gv))
    assert (v_star.diff() > 0).all()
    # the gradient on mu is the error weighted by 1 / sigma^2: larger variance, smaller pull
    mu = torch.ones(1, 2, dtype=D, requires_grad=True)
    (gm,) = torch.autograd.grad(pad_feat_loss([(mu, torch.tensor([[0.0, 2.0]], dtype=D))], [torch.zeros(1, 2, dtype=D)],
                                              eps=0.0), [mu])  # fmt: skip
    torch.testing.assert_close(gm[0, 1] / gm[0, 0], torch.tensor(math.exp(-2.0), dtype=D))
    # extreme log-variances and errors: finite gradients; a small step lowers the loss
    mu = (1e3 * torch.randn(4, 6, dtype=D)).requires_grad_()
    lv = torch.tensor([[-30.0, 30.0, 0.0, -5.0, 5.0, 1.0]] * 4, dtype=D, requires_grad=True)
    grads = torch.autograd.grad(pad_feat_loss([(mu, lv)], [t]), [mu, lv])
    assert all(torch.isfinite(g).all() for g in grads)
    mu, lv = torch.randn(4, 6, dtype=D, requires_grad=True), torch.randn(4, 6, dtype=D, requires_grad=True)
    _step_lowers(lambda: pad_feat_loss([(mu, lv)], [t]), [mu, lv])
    with pytest.raises(ValueError, match="log-variance"):
        pad_feat_loss([(t, torch.zeros(4, 1, dtype=D))], [t])
    with pytest.raises(ValueError, match="regressed student"):
        pad_feat_loss([(torch.zeros(4, 5, dtype=D), torch.zeros(4, 5, dtype=D))], [t])


def test_pad_feat_connector_shapes() -> None:
    vec = PADConnector((16,), (64,))
    m, lv = vec(torch.randn(5, 16))
    assert m.shape == lv.shape == (5, 64)
    same = PADConnector((64,), (64,))
    x = torch.randn(5, 64)
    assert same(x)[0] is x  # the regressed feature is the student's own when the sizes agree
    maps = PADConnector((8, 8, 8), (32, 4, 4))
    m, lv = maps(torch.randn(3, 8, 8, 8))
    assert m.shape == lv.shape == (3, 32, 4, 4)
    with pytest.raises(ValueError, match="two vectors or two"):
        PADConnector((16, 1, 1), (10,))


def test_pad_feat_end_to_end(source: LocalSource) -> None:
    result = _run(source, "pad-feat", ["pool=pool"])
    bn = result.connectors[0].log_var.bn
    assert not torch.equal(bn.weight, torch.ones_like(bn.weight))


# ---------------------------------------------------------------------------------------------
# pad (logit form)
# ---------------------------------------------------------------------------------------------
def _kl_reference(zs: list[float], zt: list[float], temp: float) -> float:
    def softmax(z):
        top = max(z)
        e = [math.exp((v - top) / temp) for v in z]
        return [x / sum(e) for x in e]

    ps, pt = softmax(zs), softmax(zt)
    return temp**2 * sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, pt))


@pytest.mark.parametrize("distance", ["kl", "l2"])
def test_pad_matches_a_hand_reference(distance: str) -> None:
    torch.manual_seed(0)
    zs, zt, v = torch.randn(4, 6, dtype=D), torch.randn(4, 6, dtype=D), torch.randn(4, dtype=D)
    got = pad_loss([v], [zt], student_logits=zs, weight=0.5, temperature=3.0, distance=distance, eps=1e-6)
    expect = 0.0
    for i in range(4):
        a, b = zs[i].tolist(), zt[i].tolist()
        d = _kl_reference(a, b, 3.0) if distance == "kl" else sum((x - y) ** 2 for x, y in zip(a, b)) / 6
        expect += d / (1e-6 + math.exp(float(v[i]))) + float(v[i])
    torch.testing.assert_close(got, torch.tensor(0.5 * expect / 4, dtype=D))


def test_pad_properties() -> None:
    torch.manual_seed(0)
    zt = torch.randn(3, 5, dtype=D)
    v = torch.tensor([-1.0, 0.0, 2.0], dtype=D)
    # student = teacher: the distillation part vanishes, only the variance term remains (its minimum for v)
    torch.testing.assert_close(pad_loss([v], [zt], student_logits=zt.clone()), v.mean())
    # per-sample weights: with the same distance for every sample, the gradient reaching sample
    # i's logits scales with exp(-v_i)
    same = zt[:1].expand(3, 5).clone()
    zs = (same + torch.tensor([[1.0, 0, 0, 0, 0]], dtype=D)).requires_grad_()
    (g,) = torch.autograd.grad(pad_loss([v], [same], student_logits=zs, eps=0.0), [zs])
    norms = g.norm(dim=1)
    torch.testing.assert_close(norms / norms[1], torch.exp(-v), rtol=1e-6, atol=0)
    # hard samples (larger distance) get a larger optimal variance: v* = log d
    d = torch.tensor([0.01, 0.5, 4.0], dtype=D)
    zs_l2 = zt + d.sqrt().unsqueeze(1)  # mean squared logit error = d
    v_star = torch.log(d).requires_grad_()
    (gv,) = torch.autograd.grad(pad_loss([v_star], [zt], student_logits=zs_l2, distance="l2", eps=0.0), [v_star])
    torch.testing.assert_close(gv, torch.zeros_like(gv))
    # extreme inputs: finite gradients; a small step lowers the loss
    zs = (50 * torch.randn(3, 5, dtype=D)).requires_grad_()
    lv = torch.tensor([-30.0, 0.0, 30.0], dtype=D, requires_grad=True)
    grads = torch.autograd.grad(pad_loss([lv], [zt], student_logits=zs), [zs, lv])
    assert all(torch.isfinite(g).all() for g in grads)
    zs, lv = torch.randn(3, 5, dtype=D, requires_grad=True), torch.zeros(3, dtype=D, requires_grad=True)
    _step_lowers(lambda: pad_loss([lv], [zt], student_logits=zs), [zs, lv])
    with pytest.raises(ValueError, match="must be 'logits'"):
        pad_loss([v], [torch.randn(3, 64, 1, 1, dtype=D)], student_logits=zt)
    with pytest.raises(ValueError, match="one per sample"):
        pad_loss([v[:2]], [zt], student_logits=zt)
    with pytest.raises(ValueError, match="distance"):
        pad_loss([v], [zt], student_logits=zt, distance="l1")


def test_pad_connector_is_per_sample() -> None:
    conn = PADLogitConnector((16, 1, 1), (10,))
    assert not getattr(conn, "takes_teacher", False)
    assert conn(torch.randn(6, 16, 1, 1)).shape == (6,)
    with pytest.raises(ValueError, match="teacher's logits"):
        PADLogitConnector((16, 1, 1), (64, 1, 1))


def test_pad_end_to_end(source: LocalSource) -> None:
    result = _run(source, "pad", ["pool=logits"])
    bn = result.connectors[0].log_var[2]
    assert not torch.equal(bn.weight, torch.ones_like(bn.weight))
    _run(source, "pad", ["pool=logits"], distance="l2", kd_weight=0.5)
    with pytest.raises(ValueError, match="teacher's logits"):
        _run(source, "pad", ["pool=pool"])


def test_registry_entries() -> None:
    for name in ("tat", "dfa", "recurrent", "pad-feat", "pad"):
        m = get_method(name)
        assert m.kind == "feature" and m.paper
    assert get_method("recurrent").reduce == "at"
    assert get_method("dfa").extras == {"epoch", "epochs"}
    assert get_method("pad").extras == {"student_logits"}
