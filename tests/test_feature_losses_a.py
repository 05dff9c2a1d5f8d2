"""Feature-level KD methods fsp, nst, sp, cckd, adain, rkd, pkt: each against an independent
float64 reference written out by hand (loops over the formula of the paper), their
properties (zero at the teacher, invariances the papers claim, finite gradients at
extreme inputs, a step against the gradient lowers the loss, errors naming the
problem), and a short training run from a real DigitsCNN teacher through LocalSource."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from kd.core import reductions
from kd.core.data import load_dataset
from kd.models import DigitsCNN, digits_cnn_student
from kd.student_trainer.features import ConvBN
from kd.student_trainer.losses import FeatureMethod, get_method
from kd.student_trainer.losses.adain import moments_connector
from kd.student_trainer.sources import LocalSource
from kd.student_trainer.train import TrainConfig, TrainResult, seed_everything, train_student
from kd.teacher_server.loading import Teacher, load_teacher

TRAIN = load_dataset("digits", "train")
TEST = load_dataset("digits", "test")
F64 = torch.float64


def loss_of(name: str) -> Callable[..., torch.Tensor]:
    method = get_method(name)
    assert isinstance(method, FeatureMethod)
    return method.loss


def red(name: str, maps: dict[str, torch.Tensor]) -> torch.Tensor:
    """The trainer's path: the method's reduction of the student's (or teacher's) map."""
    return reductions.reduce(name, maps)


def lowers(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, rel: float = 1e-3) -> None:
    """A small step against the gradient (relative size ``rel``) lowers the loss."""
    x = x.detach().clone().requires_grad_(True)
    before = fn(x)
    (g,) = torch.autograd.grad(before, x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    with torch.no_grad():
        after = fn(x - rel * x.norm() / g.norm() * g)
    assert after < before, (float(before), float(after))


def finite_grad(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> None:
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x)
    loss.backward()
    assert torch.isfinite(loss), float(loss)
    assert x.grad is not None and torch.isfinite(x.grad).all()


def extremes(shape: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    """float32 inputs at the edges: huge, tiny, all zero, constant, duplicated samples."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    dup = base.clone()
    dup[1] = dup[0]
    return [base * 1e4, base * 1e-6, torch.zeros(shape), torch.full(shape, 3.0), dup]


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) <= 1.0 else abs(x) - 0.5


# -- registry -----------------------------------------------------------------------------------
def test_methods_are_registered_with_their_reduction_connector_and_layers() -> None:
    expected = {
        "fsp": ("fsp:{1}", "auto", 2),
        "nst": ("nst", None, 1),
        "sp": ("sp", None, 1),
        "cckd": ("cc", None, 1),
        "adain": ("adain", moments_connector, 1),
        "rkd": (None, None, 1),
        "pkt": (None, None, 1),
    }
    for name, (reduce, connector, layers) in expected.items():
        m = get_method(name)
        assert isinstance(m, FeatureMethod) and (m.reduce, m.connector, m.layers) == (reduce, connector, layers)
    assert get_method("fsp").own_defaults == {"weight": 50.0}
    assert get_method("nst").own_defaults == {"lam": 50.0}
    assert get_method("sp").own_defaults == {"gamma": 3000.0}
    assert get_method("rkd").own_defaults == {"distance_weight": 25.0, "angle_weight": 50.0}
    assert get_method("pkt").own_defaults["weight"] == 30000.0
    assert get_method("cckd").extras == {"student_logits", "teacher_logits"}


# -- fsp ----------------------------------------------------------------------------------------
def _fsp_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """G[n, i, j] = sum_hw a[n, i, hw] b[n, j, hw] / HW, the larger map block-averaged first."""
    if a.shape[2] > b.shape[2]:
        f = a.shape[2] // b.shape[2]
        pooled = torch.zeros(a.shape[0], a.shape[1], b.shape[2], b.shape[3], dtype=F64)
        for y in range(b.shape[2]):
            for x in range(b.shape[3]):
                pooled[:, :, y, x] = a[:, :, y * f : (y + 1) * f, x * f : (x + 1) * f].mean(dim=(2, 3))
        a = pooled
    n, c1, h, w = a.shape
    g = torch.zeros(n, c1, b.shape[1], dtype=F64)
    for s, i, j in itertools.product(range(n), range(c1), range(b.shape[1])):
        g[s, i, j] = sum(float(a[s, i, y, x] * b[s, j, y, x]) for y in range(h) for x in range(w)) / (h * w)
    return g


def test_fsp_matches_the_hand_computed_gram_matrices() -> None:
    torch.manual_seed(0)
    n = 3
    s = {"a": torch.randn(n, 2, 4, 4, dtype=F64), "b": torch.randn(n, 3, 4, 4, dtype=F64),
         "c": torch.randn(n, 3, 2, 2, dtype=F64)}  # fmt: skip
    t = {k: torch.randn_like(v) for k, v in s.items()}
    weight = 7.0
    ref = 0.0
    for x, y in (("a", "b"), ("b", "c")):  # the second pair pools b (4x4) to c's 2x2
        gs, gt = _fsp_ref(s[x], s[y]), _fsp_ref(t[x], t[y])
        ref += sum(float(gs[q] - gt[q]) ** 2 for q in itertools.product(*map(range, gs.shape))) / gs.numel()
    ours = loss_of("fsp")([red("a@fsp:b", s), red("b@fsp:c", s)], [red("a@fsp:b", t), red("b@fsp:c", t)], weight=weight)
    torch.testing.assert_close(ours, torch.tensor(weight * ref, dtype=F64))


def test_fsp_properties() -> None:
    torch.manual_seed(1)
    fsp = loss_of("fsp")
    t1, t2 = torch.randn(4, 3, 5, 5, dtype=F64), torch.randn(4, 6, 5, 5, dtype=F64)
    gt = red("a@fsp:b", {"a": t1, "b": t2})
    assert float(fsp([gt.clone()], [gt])) == 0.0

    def f(x: torch.Tensor) -> torch.Tensor:
        return fsp([red("a@fsp:b", {"a": x, "b": t2 * 0.5})], [gt])

    lowers(f, torch.randn_like(t1))
    for x in extremes((4, 3, 5, 5)):
        finite_grad(lambda v: fsp([red("a@fsp:b", {"a": v, "b": v[:, :2].repeat(1, 3, 1, 1)})],
                                  [gt.float()]), x)  # fmt: skip
    with pytest.raises(ValueError, match="channel count"):
        fsp([torch.zeros(4, 3, 5)], [gt])
    with pytest.raises(ValueError, match=r"\[N, C1, C2\]"):
        fsp([torch.zeros(4, 18)], [gt])


# -- nst ----------------------------------------------------------------------------------------
def _mmd2_poly(s: torch.Tensor, t: torch.Tensor) -> float:
    """MMD^2 between the channel maps (each L2-normalised over H*W) of one sample, from the
    kernel definition k(x, y) = (x^T y)^2, summing over every pair of channels."""
    fs = [c.flatten() / c.flatten().norm() for c in s]
    ft = [c.flatten() / c.flatten().norm() for c in t]

    def k(x: torch.Tensor, y: torch.Tensor) -> float:
        return float(sum(x[i] * y[i] for i in range(len(x)))) ** 2

    cs, ct = len(fs), len(ft)
    tt = sum(k(a, b) for a in ft for b in ft) / ct**2
    ss = sum(k(a, b) for a in fs for b in fs) / cs**2
    st = sum(k(a, b) for a in fs for b in ft) / (cs * ct)
    return tt + ss - 2 * st


def test_nst_reduced_form_equals_the_kernel_mmd() -> None:
    torch.manual_seed(2)
    s = torch.randn(3, 4, 2, 3, dtype=F64)  # 4 student channels
    t = torch.randn(3, 7, 2, 3, dtype=F64)  # 7 teacher channels, same 2x3 grid
    s2, t2 = torch.randn(3, 2, 3, 3, dtype=F64), torch.randn(3, 5, 3, 3, dtype=F64)
    ref = sum(_mmd2_poly(s[n], t[n]) for n in range(3)) / 3 + sum(_mmd2_poly(s2[n], t2[n]) for n in range(3)) / 3
    lam = 3.0
    ours = loss_of("nst")([red("x@nst", {"x": s}), red("x@nst", {"x": s2})],
                          [red("x@nst", {"x": t}), red("x@nst", {"x": t2})], lam=lam)  # fmt: skip
    torch.testing.assert_close(ours, torch.tensor(lam / 2 * ref, dtype=F64))


def test_nst_properties() -> None:
    torch.manual_seed(3)
    nst = loss_of("nst")
    t = torch.randn(4, 6, 3, 3, dtype=F64)
    gt = red("x@nst", {"x": t})
    assert float(nst([red("x@nst", {"x": t.clone()})], [gt])) == pytest.approx(0.0, abs=1e-24)
    # Neuron selectivity is a set of normalised patterns: a positive scale per channel and
    # the order of the channels do not change it.
    s = torch.randn(4, 3, 3, 3, dtype=F64)
    base = nst([red("x@nst", {"x": s})], [gt])
    scaled = s * torch.rand(1, 3, 1, 1, dtype=F64).add(0.1) * 100
    shuffled = s[:, [2, 0, 1]]
    torch.testing.assert_close(nst([red("x@nst", {"x": scaled})], [gt]), base)
    torch.testing.assert_close(nst([red("x@nst", {"x": shuffled})], [gt]), base)
    lowers(lambda x: nst([red("x@nst", {"x": x})], [gt]), s)
    for x in extremes((4, 3, 3, 3)):
        finite_grad(lambda v: nst([red("x@nst", {"x": v})], [gt.float()]), x)
    with pytest.raises(ValueError, match="same spatial size"):
        nst([red("x@nst", {"x": torch.randn(4, 3, 2, 2, dtype=F64)})], [gt])


# -- sp -----------------------------------------------------------------------------------------
def _sp_ref(s: torch.Tensor, t: torch.Tensor) -> float:
    def g(f: torch.Tensor) -> list[list[float]]:
        q = f.reshape(len(f), -1)
        raw = [[float(sum(q[i, d] * q[j, d] for d in range(q.shape[1]))) for j in range(len(q))] for i in range(len(q))]
        return [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in raw]

    gs, gt = g(s), g(t)
    b = len(s)
    return sum((gs[i][j] - gt[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


def test_sp_matches_the_hand_computed_similarity_loss() -> None:
    torch.manual_seed(4)
    s, t = torch.randn(5, 2, 2, 2, dtype=F64), torch.randn(5, 3, 3, 1, dtype=F64)
    s2, t2 = torch.randn(5, 4, dtype=F64), torch.randn(5, 6, dtype=F64)
    gamma = 11.0
    ours = loss_of("sp")([red("x@sp", {"x": s}), red("x@sp", {"x": s2})],
                         [red("x@sp", {"x": t}), red("x@sp", {"x": t2})], gamma=gamma)  # fmt: skip
    torch.testing.assert_close(ours, torch.tensor(gamma * (_sp_ref(s, t) + _sp_ref(s2, t2)), dtype=F64))


def test_sp_properties() -> None:
    torch.manual_seed(5)
    sp = loss_of("sp")
    t = torch.randn(6, 8, 2, 2, dtype=F64)
    gt = red("x@sp", {"x": t})
    assert float(sp([red("x@sp", {"x": t.clone()})], [gt])) == pytest.approx(0.0, abs=1e-24)
    s = torch.randn(6, 3, 2, 2, dtype=F64)
    base = sp([red("x@sp", {"x": s})], [gt])
    torch.testing.assert_close(sp([red("x@sp", {"x": s * 250.0})], [gt]), base)  # scale-invariant
    lowers(lambda x: sp([red("x@sp", {"x": x})], [gt]), s)
    for x in extremes((6, 3, 2, 2)):
        finite_grad(lambda v: sp([red("x@sp", {"x": v})], [gt.float()]), x)
    with pytest.raises(ValueError, match="same batch"):
        sp([red("x@sp", {"x": s[:5]})], [gt])


# -- cckd ---------------------------------------------------------------------------------------
def _cc_ref(f: torch.Tensor, gamma: float = 0.4, order: int = 2) -> list[list[float]]:
    e = [row / row.norm() for row in f.reshape(len(f), -1)]
    out = []
    for i in range(len(e)):
        row = []
        for j in range(len(e)):
            d = float(sum(e[i][k] * e[j][k] for k in range(len(e[i]))))
            row.append(
                sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * d**p for p in range(order + 1))
            )
        out.append(row)
    return out


def _kd_ref(zs: torch.Tensor, zt: torch.Tensor, temp: float) -> float:
    total = 0.0
    for a, b in zip(zs.tolist(), zt.tolist()):
        ps = [math.exp(v / temp) / sum(math.exp(w / temp) for w in a) for v in a]
        pt = [math.exp(v / temp) / sum(math.exp(w / temp) for w in b) for v in b]
        total += sum(q * math.log(q / p) for p, q in zip(ps, pt))
    return temp**2 * total / len(zs)


def test_cckd_matches_the_hand_computed_taylor_kernel_and_kd_term() -> None:
    torch.manual_seed(6)
    s, t = torch.randn(5, 3, 1, 1, dtype=F64), torch.randn(5, 7, 1, 1, dtype=F64)
    zs, zt = torch.randn(5, 4, dtype=F64), torch.randn(5, 4, dtype=F64)
    cs, ct = _cc_ref(s), _cc_ref(t)
    cc = sum((cs[i][j] - ct[i][j]) ** 2 for i in range(5) for j in range(5)) / 25
    ours = loss_of("cckd")([red("x@cc", {"x": s})], [red("x@cc", {"x": t})], student_logits=zs,
                           teacher_logits=zt, cc_weight=13.0, instance_weight=0.7, temperature=2.5)  # fmt: skip
    torch.testing.assert_close(ours, torch.tensor(13.0 * cc + 0.7 * _kd_ref(zs, zt, 2.5), dtype=F64))


def test_cckd_properties() -> None:
    torch.manual_seed(7)
    cckd = loss_of("cckd")
    t = torch.randn(6, 5, dtype=F64)
    ct = red("x@cc", {"x": t})
    z = torch.randn(6, 10, dtype=F64)
    # Zero when the student's embeddings equal the teacher's up to a positive per-sample
    # scale (the kernel is on L2-normalised embeddings) and its logits equal the teacher's.
    scaled = t * torch.rand(6, 1, dtype=F64).add(0.2) * 50
    assert float(cckd([red("x@cc", {"x": scaled})], [ct], student_logits=z, teacher_logits=z)) == pytest.approx(
        0.0, abs=1e-12
    )
    # The Taylor expansion approximates the Gaussian RBF exp(-g ||e_i - e_j||^2): the order-2
    # remainder is at most exp(-2g) (2g)^3 / 3! exp(2g) = (0.8)^3 / 6.
    e = t / t.norm(dim=1, keepdim=True)
    rbf = torch.exp(-0.4 * torch.cdist(e, e).pow(2))
    assert (ct - rbf).abs().max() <= 0.8**3 / 6 + 1e-12
    s = torch.randn(6, 3, dtype=F64)
    lowers(lambda x: cckd([red("x@cc", {"x": x})], [ct], student_logits=z, teacher_logits=z), s)
    lowers(lambda x: cckd([red("x@cc", {"x": t})], [ct], student_logits=x, teacher_logits=z), torch.randn_like(z))
    for x in extremes((6, 3, 1, 1)):
        finite_grad(lambda v: cckd([red("x@cc", {"x": v})], [ct.float()], student_logits=v.flatten(1),
                                   teacher_logits=torch.zeros(6, 3)), x)  # fmt: skip
    with pytest.raises(ValueError, match="same batch"):
        cckd([red("x@cc", {"x": s[:5]})], [ct], student_logits=z[:5], teacher_logits=z[:5])
    with pytest.raises(ValueError, match="dense teacher logits"):
        cckd([ct.clone()], [ct], student_logits=z, teacher_logits=z[:, :3])


# -- adain --------------------------------------------------------------------------------------
def _moments_ref(f: torch.Tensor) -> list[list[tuple[float, float]]]:
    out = []
    for sample in f:
        row = []
        for ch in sample:
            v = ch.flatten().tolist()
            mu = sum(v) / len(v)
            var = sum((a - mu) ** 2 for a in v) / len(v)
            row.append((mu, math.sqrt(var + 1e-5)))
        out.append(row)
    return out


def test_adain_matches_the_hand_computed_moment_loss() -> None:
    torch.manual_seed(8)
    s, t = torch.randn(3, 4, 2, 5, dtype=F64) * 2 + 1, torch.randn(3, 4, 2, 5, dtype=F64)
    ms, mt = _moments_ref(s), _moments_ref(t)
    ref = sum((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2 for rs, rt in zip(ms, mt) for a, b in zip(rs, rt)) / (3 * 4)
    ours = loss_of("adain")([red("x@adain", {"x": s})], [red("x@adain", {"x": t})], weight=3.0)
    torch.testing.assert_close(ours, torch.tensor(3.0 * ref, dtype=F64))


def test_adain_properties() -> None:
    torch.manual_seed(9)
    adain = loss_of("adain")
    t = torch.randn(4, 5, 3, 3, dtype=F64)
    mt = red("x@adain", {"x": t})
    # Only the statistics count: any rearrangement of each map over space costs nothing.
    perm = torch.randperm(9)
    moved = t.flatten(2)[:, :, perm].reshape(t.shape)
    assert float(adain([red("x@adain", {"x": moved})], [mt])) == pytest.approx(0.0, abs=1e-20)
    s = torch.randn(4, 5, 3, 3, dtype=F64)
    lowers(lambda x: adain([red("x@adain", {"x": x})], [mt]), s)
    for x in extremes((4, 5, 3, 3)):
        finite_grad(lambda v: adain([red("x@adain", {"x": v})], [mt.float()]), x)
    with pytest.raises(ValueError, match="channel counts"):
        adain([red("x@adain", {"x": s[:, :3]})], [mt])


def test_adain_connector_maps_the_students_channels_to_the_teachers() -> None:
    assert isinstance(moments_connector((5, 3, 3), (2, 5)), nn.Identity)
    conn = moments_connector((3, 4, 4), (2, 7))
    assert isinstance(conn, ConvBN) and conn(torch.randn(2, 3, 4, 4)).shape == (2, 7, 4, 4)
    # the teacher's full map gives its channel count too
    assert isinstance(moments_connector((3, 4, 4), (7, 4, 4)), ConvBN)
    with pytest.raises(ValueError, match=r"moments \[2, C\]"):
        moments_connector((3, 4, 4), (7, 4))
    with pytest.raises(ValueError, match=r"\[C, H, W\] map"):
        moments_connector((12,), (2, 7))


# -- rkd ----------------------------------------------------------------------------------------
def _rkd_ref(s: torch.Tensor, t: torch.Tensor, wd: float, wa: float) -> float:
    def vecs(f: torch.Tensor) -> list[list[float]]:
        return f.reshape(len(f), -1).tolist()

    def dist(a: list[float], b: list[float]) -> float:
        return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))

    def psi_d(v: list[list[float]]) -> list[list[float]]:
        d = [[dist(a, b) if i != j else 0.0 for j, b in enumerate(v)] for i, a in enumerate(v)]
        b = len(v)
        mu = sum(d[i][j] for i in range(b) for j in range(b) if i != j) / (b * (b - 1))
        return [[x / mu for x in row] for row in d]

    def unit(a: list[float], b: list[float]) -> list[float]:
        diff = [y - x for x, y in zip(a, b)]
        n = math.sqrt(sum(x * x for x in diff))
        return [x / n for x in diff] if n > 0 else [0.0] * len(diff)

    def psi_a(v: list[list[float]]) -> dict[tuple[int, int, int], float]:
        b = len(v)
        return {(i, j, k): sum(x * y for x, y in zip(unit(v[i], v[j]), unit(v[i], v[k])))
                for i in range(b) for j in range(b) for k in range(b)}  # fmt: skip

    vs, vt = vecs(s), vecs(t)
    b = len(vs)
    ds, dt = psi_d(vs), psi_d(vt)
    ld = sum(huber(ds[i][j] - dt[i][j]) for i in range(b) for j in range(b)) / b**2
    as_, at = psi_a(vs), psi_a(vt)
    la = sum(huber(as_[key] - at[key]) for key in as_) / b**3
    return wd * ld + wa * la


def test_rkd_matches_the_hand_computed_distance_and_angle_potentials() -> None:
    torch.manual_seed(10)
    s, t = torch.randn(5, 2, 1, 2, dtype=F64), torch.randn(5, 6, dtype=F64) * 3
    s[3] = s[1]  # coincident student embeddings: a degenerate distance and angles
    ours = loss_of("rkd")([s], [t], distance_weight=2.0, angle_weight=5.0)
    torch.testing.assert_close(ours, torch.tensor(_rkd_ref(s, t, 2.0, 5.0), dtype=F64), rtol=1e-6, atol=1e-6)
    big = torch.randn(5, 3, dtype=F64) * 4  # distances > 1 after normalisation: the linear part of Huber
    big[0] *= 10
    ours = loss_of("rkd")([big], [t], distance_weight=1.0, angle_weight=1.0)
    torch.testing.assert_close(ours, torch.tensor(_rkd_ref(big, t, 1.0, 1.0), dtype=F64), rtol=1e-6, atol=1e-6)


def test_rkd_properties() -> None:
    torch.manual_seed(11)
    rkd = loss_of("rkd")
    t = torch.randn(6, 4, dtype=F64)
    # Both potentials are invariant to rotation, translation and uniform scale.
    rot, _ = torch.linalg.qr(torch.randn(4, 4, dtype=F64))
    moved = 3.7 * t @ rot + torch.randn(1, 4, dtype=F64)
    assert float(rkd([moved], [t])) == pytest.approx(0.0, abs=1e-9)
    assert float(rkd([t[:1]], [t[:1]])) == 0.0  # one sample has no relations
    s = torch.randn(6, 2, 2, dtype=F64)
    lowers(lambda x: rkd([x], [t]), s)
    for x in extremes((6, 3)):
        finite_grad(lambda v: rkd([v], [t.float()]), x)
    with pytest.raises(ValueError, match="of one size"):
        rkd([s[:5]], [t])


# -- pkt ----------------------------------------------------------------------------------------
def _pkt_ref(s: torch.Tensor, t: torch.Tensor, eps: float = 1e-7) -> float:
    def cond(f: torch.Tensor) -> list[list[float]]:
        v = f.reshape(len(f), -1).tolist()
        norms = [math.sqrt(sum(x * x for x in a)) for a in v]
        k = [[(sum(x * y for x, y in zip(a, b)) / ((na + eps) * (nb + eps)) + 1) / 2 for b, nb in zip(v, norms)]
             for a, na in zip(v, norms)]  # fmt: skip
        return [[x / sum(row) for x in row] for row in k]

    q, p = cond(s), cond(t)
    b = len(q)
    return sum(p[i][j] * math.log((p[i][j] + eps) / (q[i][j] + eps)) for i in range(b) for j in range(b)) / b**2


def test_pkt_matches_the_hand_computed_kl_of_conditional_probabilities() -> None:
    torch.manual_seed(12)
    s, t = torch.randn(5, 3, 1, 1, dtype=F64), torch.randn(5, 8, dtype=F64)
    s2, t2 = torch.randn(5, 2, dtype=F64), torch.randn(5, 2, dtype=F64)
    ours = loss_of("pkt")([s, s2], [t, t2], weight=9.0)
    torch.testing.assert_close(ours, torch.tensor(9.0 * (_pkt_ref(s, t) + _pkt_ref(s2, t2)), dtype=F64))


def test_pkt_properties() -> None:
    torch.manual_seed(13)
    pkt = loss_of("pkt")
    t = torch.randn(6, 5, dtype=F64)
    assert float(pkt([t.clone()], [t])) == 0.0
    scaled = t * torch.rand(6, 1, dtype=F64).add(0.5)  # the cosine kernel ignores each sample's norm
    assert float(pkt([scaled], [t])) == pytest.approx(0.0, abs=1e-9)
    s = torch.randn(6, 5, dtype=F64)
    assert float(pkt([s], [t])) > 0  # a KL divergence
    lowers(lambda x: pkt([x], [t]), s)
    for x in extremes((6, 4)):
        finite_grad(lambda v: pkt([v], [t[:, :4].float()]), x)
    with pytest.raises(ValueError, match="of one size"):
        pkt([s[:4]], [t])


# -- end to end ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cnn_teacher(digits_cnn_spec) -> Teacher:
    return load_teacher("cnn", digits_cnn_spec(3))


def _train(teacher: Teacher, method: str, matches: list[str], student: nn.Module | None = None,
           **options: object) -> TrainResult:  # fmt: skip
    seed_everything(0)
    student = digits_cnn_student() if student is None else student
    config = TrainConfig(method=method, matches=matches, epochs=2, method_options=dict(options))
    result = train_student(student, TRAIN, TEST, config, source=LocalSource(teacher), subset=torch.arange(128))
    assert len(result.loss_per_epoch) == 2
    assert all(math.isfinite(v) for v in result.loss_per_epoch), result.loss_per_epoch
    assert result.loss_per_epoch[-1] < result.loss_per_epoch[0], result.loss_per_epoch
    return result


@pytest.mark.parametrize(
    ("method", "matches"),
    [
        ("nst", ["layer2=layer2", "layer1=layer1"]),
        ("sp", ["layer2=layer2"]),
        ("cckd", ["pool=pool"]),
        ("rkd", ["pool=pool"]),
        ("pkt", ["pool=pool", "logits=logits"]),
    ],
)
def test_method_trains_a_student_from_a_local_teacher(cnn_teacher: Teacher, method: str, matches: list[str]) -> None:
    result = _train(cnn_teacher, method, matches)
    assert result.connectors is not None and not list(result.connectors.parameters())  # no connector


def test_fsp_matches_same_widths_directly_and_narrower_students_through_per_layer_connectors(
    cnn_teacher: Teacher,
) -> None:
    same = _train(cnn_teacher, "fsp", ["layer1,layer2=layer1,layer2"], student=DigitsCNN(width=32))
    (conn,) = same.connectors
    assert all(isinstance(c, nn.Identity) for c in conn.layers)  # the paper's setting: no connector
    narrow = _train(cnn_teacher, "fsp", ["layer1,layer2=layer1,layer2"])  # student 8/16 channels, teacher 32/64
    (conn,) = narrow.connectors
    assert [(c.conv.in_channels, c.conv.out_channels) for c in conn.layers] == [(8, 32), (16, 64)]
    assert not torch.equal(conn.layers[0].bn.weight.detach(), torch.ones(32))


def test_adain_trains_its_conv_bn_connector(cnn_teacher: Teacher) -> None:
    result = _train(cnn_teacher, "adain", ["layer2=layer2"])
    assert result.connectors is not None
    (conn,) = result.connectors
    assert isinstance(conn, ConvBN) and conn.conv.in_channels == 16 and conn.conv.out_channels == 64
    # BatchNorm's affine parameters start at exactly 1 and 0: training moved them.
    assert not torch.equal(conn.bn.weight.detach(), torch.ones(64))
    assert not torch.equal(conn.bn.bias.detach(), torch.zeros(64))
