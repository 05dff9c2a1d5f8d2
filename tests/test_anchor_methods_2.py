"""The anchors' methods added second (CRD, SRD, ReviewKD, DOT): each loss or update against a
float64 reference written out here from the formulas (checked against mdistiller, RepDistiller
and the authors' code, cited in each method's docstring), and a few real training steps
through ``train_student`` from a local DigitsCNN teacher."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from kd.core.data import load_dataset
from kd.models import digits_cnn_student
from kd.student_trainer.losses import get_method
from kd.student_trainer.losses.crd import CRDConnector, CRDFeatures, crd_loss
from kd.student_trainer.losses.dot import DOT
from kd.student_trainer.losses.reviewkd import ReviewKDConnector, hcl, reviewkd_loss
from kd.student_trainer.losses.srd import SRDConnector, SRDFeatures, srd_loss
from kd.student_trainer.sources import LocalSource
from kd.student_trainer.train import TrainConfig, TrainResult, load_checkpoint, seed_everything, train_student
from kd.teacher_server.loading import load_teacher

TRAIN = load_dataset("digits", "train")
TEST = load_dataset("digits", "test")
SUBSET = torch.arange(96)
D = torch.float64


@pytest.fixture(scope="module")
def source(digits_cnn_spec) -> LocalSource:
    return LocalSource(load_teacher("cnn", digits_cnn_spec(3)))


def _run(source: LocalSource, method: str, matches: list[str], *, falls: bool = True, run_dir=None,
         **options: object) -> TrainResult:  # fmt: skip
    """Two epochs on 96 samples: finite losses, the student's weights move (and the loss falls)."""
    seed_everything(0)
    student = digits_cnn_student()
    before = [p.detach().clone() for p in student.parameters()]
    config = TrainConfig(method=method, matches=matches, epochs=2, batch_size=32, method_options=options)
    result = train_student(student, TRAIN, TEST, config, source=source, subset=SUBSET, run_dir=run_dir)
    assert all(math.isfinite(v) for v in result.loss_per_epoch), result.loss_per_epoch
    assert any(not torch.equal(b, p) for b, p in zip(before, student.parameters())), "the student did not train"
    if falls:
        assert result.loss_per_epoch[-1] < result.loss_per_epoch[0], result.loss_per_epoch
    return result


# ---------------------------------------------------------------------------------------------
# crd (Tian et al. 2019)
# ---------------------------------------------------------------------------------------------
def _bank(labels: torch.Tensor, subset: torch.Tensor | None = None, dim: int = 4) -> CRDConnector:
    torch.manual_seed(11)
    conn = CRDConnector((3,), (5,), feat_dim=dim)
    conn.bind(labels=labels, subset=subset)
    return conn.double()


def _unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(a * a for a in v))
    return [a / n for a in v]


def test_crd_matches_the_hand_computed_nce_and_moves_its_bank() -> None:
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    conn = _bank(labels)
    g = torch.Generator().manual_seed(12)
    v_s = F.normalize(torch.randn(3, 4, generator=g, dtype=D), dim=1)
    v_t = F.normalize(torch.randn(3, 4, generator=g, dtype=D), dim=1)
    idx = torch.tensor([4, 0, 9])
    k, temp, mom = 5, 0.3, 0.25
    mem_s, mem_t = conn.memory_s.clone(), conn.memory_t.clone()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(13)
        contrast = copy.deepcopy(conn).contrast_indices(idx, k, "exact")
    # the draw: the sample itself first, then K distinct samples of other classes
    assert contrast[:, 0].tolist() == idx.tolist()
    for row, i in zip(contrast.tolist(), idx.tolist()):
        assert len(set(row[1:])) == k and all(int(labels[j]) != int(labels[i]) for j in row[1:])
    torch.manual_seed(13)
    got = crd_loss([CRDFeatures(v_s, v_t, conn)], [torch.zeros(3, 5, dtype=D)], indices=idx, weight=0.5,
                   nce_k=k, temperature=temp, momentum=mom)  # fmt: skip
    n = len(labels)
    ref = 0.0
    for v, memory, slot in ((v_s, mem_t, 0), (v_t, mem_s, 1)):  # student vs teacher bank, and back
        raw = [[math.exp(sum(a * b for a, b in zip(memory[j].tolist(), v[r].tolist())) / temp) for j in row]
               for r, row in enumerate(contrast.tolist())]  # fmt: skip
        z = sum(sum(row) for row in raw) / (len(raw) * (k + 1)) * n
        assert float(conn.z[slot]) == pytest.approx(z, rel=1e-12)
        noise = k / n
        nce = 0.0
        for row in raw:
            p = [x / z for x in row]
            nce += math.log(p[0] / (p[0] + noise + 1e-7)) + sum(math.log(noise / (q + noise + 1e-7)) for q in p[1:])
        ref += -nce / len(raw)
    torch.testing.assert_close(got, torch.tensor(0.5 * ref, dtype=D))
    # the bank: normalise(momentum * old + (1 - momentum) * new) at the batch's rows, nothing else
    for memory, before, v in ((conn.memory_s, mem_s, v_s), (conn.memory_t, mem_t, v_t)):
        for r, i in enumerate(idx.tolist()):
            want = _unit([mom * a + (1 - mom) * b for a, b in zip(before[i].tolist(), v[r].tolist())])
            torch.testing.assert_close(memory[i], torch.tensor(want, dtype=D))
        others = [i for i in range(n) if i not in idx.tolist()]
        assert torch.equal(memory[others], before[others])
    # Z is fixed at the first step: a second step keeps it
    z_first = conn.z.clone()
    crd_loss([CRDFeatures(v_s, v_t, conn)], [torch.zeros(3, 5, dtype=D)], indices=idx, nce_k=k)
    assert torch.equal(conn.z, z_first)


def test_crd_draws_negatives_among_the_trained_samples_only() -> None:
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 2, 2])
    conn = _bank(labels, subset=torch.tensor([0, 1, 2, 3, 4, 5]))
    assert conn.num_samples == 6  # N of the noise distribution: the samples trained on
    torch.manual_seed(0)
    many = conn.contrast_indices(torch.tensor([0, 1]), 7, "exact")  # K > the 3 other-class samples: replacement
    assert set(many[0, 1:].tolist()) <= {1, 3, 5} and set(many[1, 1:].tolist()) <= {0, 2, 4}
    relax = conn.contrast_indices(torch.tensor([0, 1, 2]), 2, "relax")
    assert all(int(labels[p]) == int(labels[i]) for p, i in zip(relax[:, 0].tolist(), [0, 1, 2]))
    with pytest.raises(ValueError, match="mode"):
        crd_loss([CRDFeatures(torch.zeros(1, 4), torch.zeros(1, 4), conn)], [torch.zeros(1, 5)],
                 indices=torch.tensor([0]), mode="sideways")  # fmt: skip
    with pytest.raises(ValueError, match="at least 2 classes"):
        CRDConnector((3,), (5,)).bind(labels=torch.zeros(5, dtype=torch.long))


def test_crd_trains_and_checkpoints_its_memory_bank(source: LocalSource, tmp_path) -> None:
    result = _run(source, "crd", ["pool=pool"], falls=False, run_dir=tmp_path, nce_k=32)
    (conn,) = result.connectors
    assert isinstance(conn, CRDConnector) and conn.memory_s.shape == (len(TRAIN), 128)
    assert (conn.z > 0).all()
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    saved = ckpt["connectors"]
    assert torch.equal(saved["0.memory_s"], conn.memory_s) and torch.equal(saved["0.memory_t"], conn.memory_t)
    # rows of trained samples are unit vectors now; rows never trained keep their uniform start
    norms = conn.memory_t.norm(dim=1)
    torch.testing.assert_close(norms[SUBSET], torch.ones(len(SUBSET)))
    assert float(norms[len(SUBSET) :].sub(1).abs().max()) > 0.05


# ---------------------------------------------------------------------------------------------
# srd (Yang et al. 2021)
# ---------------------------------------------------------------------------------------------
def test_srd_matches_the_hand_computed_feature_and_regression_terms() -> None:
    g = torch.Generator().manual_seed(14)
    f, t = torch.randn(2, 3, 2, 2, generator=g, dtype=D), torch.randn(2, 3, 2, 2, generator=g, dtype=D)
    logits, z_t = torch.randn(2, 4, generator=g, dtype=D), torch.randn(2, 4, generator=g, dtype=D)
    fm = sum((sum(f[n, c].flatten().tolist()) / 4 - sum(t[n, c].flatten().tolist()) / 4) ** 2
             for n in range(2) for c in range(3)) / 6  # fmt: skip
    sr = sum((a - b) ** 2 for a, b in zip(logits.flatten().tolist(), z_t.flatten().tolist())) / 8
    got = srd_loss([SRDFeatures(f, logits)], [t], teacher_logits=z_t, weight=2.0, fm_weight=0.3, sr_weight=1.5)
    torch.testing.assert_close(got, torch.tensor(2.0 * (0.3 * fm + 1.5 * sr), dtype=D))
    assert get_method("srd").own_defaults == {"weight": 1.0, "fm_weight": 1.0, "sr_weight": 1.0, "fit_weight": 1.0,
                                              "head": "auto"}  # fmt: skip
    # the "fit" variant adds the regression of the teacher's logits on its own pooled map
    fit = torch.randn(2, 4, generator=g, dtype=D)
    fit_ref = sum((a - b) ** 2 for a, b in zip(fit.flatten().tolist(), z_t.flatten().tolist())) / 8
    got = srd_loss([SRDFeatures(f, logits, fit)], [t], teacher_logits=z_t, weight=2.0, fit_weight=0.7)
    torch.testing.assert_close(got, torch.tensor(2.0 * (fm + sr) + 0.7 * fit_ref, dtype=D))
    with pytest.raises(ValueError, match="same batch and channels"):
        srd_loss([SRDFeatures(f[:, :2], logits)], [t], teacher_logits=z_t)


def test_srd_classifies_the_student_feature_with_the_teachers_own_head(source: LocalSource) -> None:
    conn = SRDConnector((16, 8, 8), (64, 8, 8))
    conn.bind(source=source)
    head = source.teacher.model.head
    assert torch.equal(conn.head_weight, head.weight.detach().cpu())
    conn.eval()
    s = torch.randn(3, 16, 8, 8)
    with torch.no_grad():
        out = conn(s)
        want = head(conn.transfer(s).mean(dim=(2, 3)))
    torch.testing.assert_close(out.logits, want)
    assert not any(n.startswith("head") for n, _ in conn.named_parameters())  # frozen: buffers, not trained
    with pytest.raises(ValueError, match="outputs, not weights"):
        SRDConnector((16, 8, 8), (64, 8, 8)).bind(source=object(), options={"head": "teacher"})
    with pytest.raises(ValueError, match="channels"):
        SRDConnector((8, 8, 8), (32, 8, 8)).bind(source=source)  # layer1's width is not the head's input


def test_srd_trains(source: LocalSource) -> None:
    result = _run(source, "srd", ["layer2=layer2"])
    assert result.connectors[0].transfer[0].out_channels == 64 and result.connectors[0].head_fit is None


def test_srd_fit_variant_learns_the_teachers_head_from_its_outputs(source: LocalSource) -> None:
    """Without the teacher's weights (a server, a cache) the head is regressed from the teacher's
    own pooled map and logits; the student's terms never move it (detached on its path)."""
    result = _run(source, "srd", ["layer2=layer2"], head="fit")
    assert isinstance(result.connectors[0].head_fit, torch.nn.Linear)
    assert not hasattr(result.connectors[0], "head_weight")
    # the fit term alone, trained longer on the teacher's outputs, recovers the teacher's head
    torch.manual_seed(18)
    conn = SRDConnector((16, 8, 8), (64, 8, 8))
    conn.bind(source=source, options={"head": "fit"})
    idx = torch.arange(128)
    _, z_t, feats = next(iter(source.iter_outputs([(idx, TRAIN.get(idx), TRAIN.labels[idx])], ["layer2"])))
    t = feats["layer2"]
    pooled = t.mean(dim=(2, 3))
    head = source.teacher.model.head
    with torch.no_grad():
        torch.testing.assert_close(head(pooled), z_t)  # the premise: z_t is linear in the pooled map
        before = float((conn.head_fit(pooled) - z_t).pow(2).mean())
    opt = torch.optim.Adam(conn.head_fit.parameters(), lr=0.05)
    s = torch.randn(128, 16, 1, 1)  # the student side is not what this fits (1x1 maps: cheap)
    for _ in range(300):
        out = conn(s, t)
        loss = srd_loss([out], [t], teacher_logits=z_t, weight=0.0, head="fit")
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float((conn.head_fit(pooled) - z_t).pow(2).mean())
    assert after < before / 100, (before, after)
    grads = torch.autograd.grad(conn(s[:4], t[:4]).logits.sum(), list(conn.head_fit.parameters()), allow_unused=True)
    assert all(g is None for g in grads)


# ---------------------------------------------------------------------------------------------
# reviewkd (Chen et al. 2021)
# ---------------------------------------------------------------------------------------------
def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return sum((x - y) ** 2 for x, y in zip(a.flatten().tolist(), b.flatten().tolist())) / a.numel()


def _pool(x: torch.Tensor, size: int) -> torch.Tensor:
    n, c, h, _ = x.shape
    step = h // size
    out = torch.zeros(n, c, size, size, dtype=D)
    for i in range(size):
        for j in range(size):
            out[:, :, i, j] = x[:, :, i * step : (i + 1) * step, j * step : (j + 1) * step].mean(dim=(2, 3))
    return out


def test_hcl_matches_the_hand_computed_pyramid() -> None:
    g = torch.Generator().manual_seed(15)
    s8, t8 = torch.randn(2, 3, 8, 8, generator=g, dtype=D), torch.randn(2, 3, 8, 8, generator=g, dtype=D)
    s4, t4 = torch.randn(2, 3, 4, 4, generator=g, dtype=D), torch.randn(2, 3, 4, 4, generator=g, dtype=D)
    s1, t1 = torch.randn(2, 5, 1, 1, generator=g, dtype=D), torch.randn(2, 5, 1, 1, generator=g, dtype=D)
    ref8 = (_mse(s8, t8) + _mse(_pool(s8, 4), _pool(t8, 4)) / 2 + _mse(_pool(s8, 2), _pool(t8, 2)) / 4
            + _mse(_pool(s8, 1), _pool(t8, 1)) / 8) / (1 + 1 / 2 + 1 / 4 + 1 / 8)  # fmt: skip
    ref4 = (_mse(s4, t4) + _mse(_pool(s4, 2), _pool(t4, 2)) / 2 + _mse(_pool(s4, 1), _pool(t4, 1)) / 4) / 1.75
    torch.testing.assert_close(hcl(s8, t8), torch.tensor(ref8, dtype=D))
    torch.testing.assert_close(hcl(s4, t4), torch.tensor(ref4, dtype=D))
    torch.testing.assert_close(hcl(s1, t1), torch.tensor(_mse(s1, t1), dtype=D))
    # the loss: the sum over levels, times the warm-up min((epoch + 1) / warmup, 1)
    total = ref8 + ref4 + _mse(s1, t1)
    got = reviewkd_loss([[s8, s4, s1]], [[t8, t4, t1.flatten(1)]], epoch=4, weight=3.0, warmup=20)
    torch.testing.assert_close(got, torch.tensor(3.0 * 5 / 20 * total, dtype=D))
    torch.testing.assert_close(reviewkd_loss([[s8, s4, s1]], [[t8, t4, t1]], epoch=40), torch.tensor(total, dtype=D))
    assert get_method("reviewkd").own_defaults == {"weight": 1.0, "warmup": 20}


def test_reviewkd_fuses_from_the_deepest_level_down() -> None:
    torch.manual_seed(16)
    conn = ReviewKDConnector([(4, 4, 4), (6,)], [(5, 4, 4), (7, 1, 1)]).double().eval()
    x0, x1 = torch.randn(2, 4, 4, 4, dtype=D), torch.randn(2, 6, dtype=D)
    with torch.no_grad():
        out0, out1 = conn([x0, x1])
        deep, shallow = conn.abfs[1], conn.abfs[0]
        assert deep.att is None and shallow.att is not None and shallow.conv1[0].out_channels == 6  # min(512, 6)
        a1 = deep.conv1(x1.view(2, 6, 1, 1))
        want1 = deep.conv2(a1)
        a0 = shallow.conv1(x0)
        r = a1.expand(2, 6, 4, 4)  # nearest resize of a 1x1 map
        w = torch.sigmoid(shallow.att[0](torch.cat([a0, r], dim=1)))
        want0 = shallow.conv2(a0 * w[:, :1] + r * w[:, 1:])
    torch.testing.assert_close(out1, want1)
    torch.testing.assert_close(out0, want0)
    assert out0.shape == (2, 5, 4, 4) and out1.shape == (2, 7, 1, 1)


def test_reviewkd_trains(source: LocalSource) -> None:
    result = _run(source, "reviewkd", ["layer1,layer2,pool=layer1,layer2,pool"], warmup=0)
    (conn,) = result.connectors
    assert [a.conv2[0].out_channels for a in conn.abfs] == [32, 64, 64]


# ---------------------------------------------------------------------------------------------
# dot (Zhao et al. 2023): the optimiser
# ---------------------------------------------------------------------------------------------
def _dot_reference(theta, steps, lr, m, delta, wd):
    """mdistiller's update rule, element by element; steps: [(task grads or None, kd grads or None)]."""
    m_task, m_kd, mean = m - delta, m + delta, m
    theta = [list(p) for p in theta]
    b_task: list = [None] * len(theta)
    b_kd: list = [None] * len(theta)
    for task, kd in steps:
        for i, p in enumerate(theta):
            if task[i] is None:
                continue
            d = [g + wd * x for g, x in zip(task[i], p)]
            if b_task[i] is None:
                b_task[i] = d
            else:
                mu = m_task if kd[i] is not None else mean
                b_task[i] = [mu * b + x for b, x in zip(b_task[i], d)]
            theta[i] = [x - lr * b for x, b in zip(p, b_task[i])]
        for i, p in enumerate(theta):
            if kd[i] is None:
                continue
            d = list(kd[i])
            if b_kd[i] is None:
                b_kd[i] = d
            elif task[i] is not None:
                b_kd[i] = [m_kd * b + x for b, x in zip(b_kd[i], d)]
            else:
                b_kd[i] = [mean * b + x + wd * y for b, x, y in zip(b_kd[i], d, p)]
            theta[i] = [x - lr * b for x, b in zip(p, b_kd[i])]
    return theta


def test_dot_matches_the_hand_computed_two_momentum_update() -> None:
    g = torch.Generator().manual_seed(17)
    params = [torch.randn(3, generator=g, dtype=D) for _ in range(3)]  # both grads, task only, kd only
    steps = []
    for _ in range(3):
        task = [torch.randn(3, generator=g, dtype=D).tolist(), torch.randn(3, generator=g, dtype=D).tolist(), None]
        kd = [torch.randn(3, generator=g, dtype=D).tolist(), None, torch.randn(3, generator=g, dtype=D).tolist()]
        steps.append((task, kd))
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = DOT(ps, lr=0.1, momentum=0.9, delta=0.075, weight_decay=0.01)
    for task, kd in steps:
        for p, gk in zip(ps, kd):
            p.grad = None if gk is None else torch.tensor(gk, dtype=D)
        opt.capture_kd()
        assert all(p.grad is None for p in ps)
        for p, gt in zip(ps, task):
            p.grad = None if gt is None else torch.tensor(gt, dtype=D)
        opt.step()
        opt.zero_grad(set_to_none=True)
    want = _dot_reference([p.tolist() for p in params], steps, 0.1, 0.9, 0.075, 0.01)
    for p, w in zip(ps, want):
        torch.testing.assert_close(p.detach(), torch.tensor(w, dtype=D))
    # not plain SGD with momentum 0.9 on the summed gradient (the split matters)
    sgd = [torch.nn.Parameter(p.clone()) for p in params]
    plain = torch.optim.SGD(sgd, lr=0.1, momentum=0.9, weight_decay=0.01)
    for task, kd in steps:
        for p, gt, gk in zip(sgd, task, kd):
            p.grad = sum(torch.tensor(x, dtype=D) for x in (gt, gk) if x is not None)
        plain.step()
    assert float((sgd[0] - ps[0]).detach().abs().max()) > 1e-4


def test_dot_trainer_splits_kd_and_ce_gradients(source: LocalSource) -> None:
    """Two full-batch steps through the trainer equal DOT's rule on the gradients of the KD part
    (loss - w CE) and of w CE taken apart here (the first step alone cannot tell them apart)."""
    seed_everything(0)
    student = digits_cnn_student()
    start = copy.deepcopy(student)
    sub = torch.arange(32)
    lr, wd, m, delta = 0.1, 0.01, 0.9, 0.075
    config = TrainConfig(method="kd", optimizer="dot", lr=lr, weight_decay=wd, momentum=m, epochs=2, batch_size=32,
                         method_options={"alpha": 0.6})  # fmt: skip
    train_student(student, TRAIN, TEST, config, source=source, subset=sub)
    x, y = TRAIN.get(sub), TRAIN.labels[sub]
    z_t = torch.as_tensor(source.targets(sub, x)).clone()
    start.train()
    params = list(start.parameters())
    b_task = b_kd = None
    for _ in range(2):
        logits = start(x)
        task = 0.4 * F.cross_entropy(logits, y)
        loss = get_method("kd")(logits, z_t, y, alpha=0.6)
        g_task = torch.autograd.grad(task, params, retain_graph=True)
        g_kd = torch.autograd.grad(loss - task, params)
        with torch.no_grad():
            d_task = [g + wd * p for g, p in zip(g_task, params)]
            b_task = d_task if b_task is None else [(m - delta) * b + d for b, d in zip(b_task, d_task)]
            b_kd = list(g_kd) if b_kd is None else [(m + delta) * b + g for b, g in zip(b_kd, g_kd)]
            for p, bt, bk in zip(params, b_task, b_kd):
                p.sub_(lr * bt + lr * bk)
    for p, q in zip(params, student.parameters()):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-5, atol=2e-6)


def test_dot_refuses_what_it_cannot_split(source: LocalSource) -> None:
    student = digits_cnn_student()
    for config, match in (
        (TrainConfig(method="cskd", optimizer="dot", epochs=1), "pair methods"),
        (TrainConfig(method="ce", optimizer="dot", epochs=1), "no CE weight"),
        (TrainConfig(method="kd", optimizer="dot", amp="fp16", epochs=1), "fp16"),
    ):
        with pytest.raises(ValueError, match=match):
            train_student(student, TRAIN, TEST, config, source=source, subset=SUBSET)


# ---------------------------------------------------------------------------------------------
# sskd (Xu et al. 2020)
# ---------------------------------------------------------------------------------------------
def _cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _kept(scores: list[list[float]], targets: list[int], ratio: float) -> list[int]:
    """Error-level ranking: rank of the target (ties by position), all of rank 0, the lowest others."""
    ranks = [sorted(range(len(row)), key=lambda j, row=row: (-row[j], j)).index(t) for row, t in zip(scores, targets)]
    wrong = sum(r > 0 for r in ranks)
    keep = len(ranks) - wrong + int(wrong * ratio)
    return sorted(sorted(range(len(ranks)), key=lambda i: (ranks[i], i))[:keep])


def _batch_kl(student: list[list[float]], teacher: list[list[float]], temp: float) -> float:
    total = sum(_kl(_log_softmax([v / temp for v in t]), _log_softmax([v / temp for v in s]))
                for s, t in zip(student, teacher))  # fmt: skip
    return temp**2 * total / len(student)


def _log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    lse = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - lse for v in row]


def _kl(log_p: list[float], log_q: list[float]) -> float:
    return sum(math.exp(a) * (a - b) for a, b in zip(log_p, log_q))


def test_sskd_matches_the_hand_computed_transformation_and_similarity_terms() -> None:
    from kd.student_trainer.losses.sskd import SSKDFeatures, sskd_loss

    g = torch.Generator().manual_seed(19)
    b, c = 3, 4
    r_s, r_t = torch.randn(4 * b, 5, generator=g, dtype=D), torch.randn(4 * b, 5, generator=g, dtype=D)
    z_s, z_t = torch.randn(4 * b, c, generator=g, dtype=D), torch.randn(4 * b, c, generator=g, dtype=D) * 3
    y = torch.randint(0, c, (b,), generator=g).repeat_interleave(4)
    aug = [i for i in range(4 * b) if i % 4]
    nor = [i for i in range(4 * b) if i % 4 == 0]
    keep_tf = _kept([z_t[i].tolist() for i in aug], [int(y[i]) for i in aug], 0.5)
    l_tf = _batch_kl([z_s[aug[k]].tolist() for k in keep_tf], [z_t[aug[k]].tolist() for k in keep_tf], 3.0)
    sim = {
        name: [[_cos(r[i].tolist(), r[j].tolist()) for j in nor] for i in aug] for name, r in (("s", r_s), ("t", r_t))
    }
    own = [i // 3 for i in range(3 * b)]
    keep_ss = _kept(sim["t"], own, 0.75)
    l_ss = _batch_kl([sim["s"][k] for k in keep_ss], [sim["t"][k] for k in keep_ss], 0.5)
    teacher_task = -sum(_log_softmax(row)[t] for row, t in zip(sim["t"], own)) / len(own)
    got = sskd_loss([SSKDFeatures(r_s, r_t)], [torch.zeros(4 * b, 7, dtype=D)], student_logits=z_s,
                    teacher_logits=z_t, labels=y, tf_weight=2.0, ss_weight=5.0, tf_temperature=3.0, ratio_tf=0.5,
                    teacher_ss_weight=0.3)  # fmt: skip
    torch.testing.assert_close(got, torch.tensor(2.0 * l_tf + 5.0 * l_ss + 0.3 * teacher_task, dtype=D))
    assert 0 < len(keep_ss) < 3 * b or len(keep_tf) < 3 * b  # some rows were ranked out (not a no-op ranking)
    # the common CE and KD terms see the unrotated rows only, at SSKD's registered weights
    method = get_method("sskd")
    assert method.rotations and {k: method.defaults[k] for k in ("ce_weight", "kd_weight")} == {
        "ce_weight": 0.1,
        "kd_weight": 0.9,
    }
    total = method.objective(z_s, z_t, y, [SSKDFeatures(r_s, r_t)], [torch.zeros(4 * b, 7, dtype=D)])
    common = 0.1 * F.cross_entropy(z_s[::4], y[::4]) + 0.9 * get_method("kd")(z_s[::4], z_t[::4], y[::4], alpha=1.0)
    own_term = sskd_loss([SSKDFeatures(r_s, r_t)], [torch.zeros(4 * b, 7, dtype=D)], student_logits=z_s,
                         teacher_logits=z_t, labels=y)  # fmt: skip
    torch.testing.assert_close(total, own_term + common)
    with pytest.raises(ValueError, match="4 rows per sample"):
        sskd_loss([SSKDFeatures(r_s[:5], r_t[:5])], [r_t[:5]], student_logits=z_s[:5], teacher_logits=z_t[:5],
                  labels=y[:5])  # fmt: skip


def test_the_loop_rotates_each_batch_for_sskd(source: LocalSource) -> None:
    from kd.student_trainer.sources import Batch
    from kd.student_trainer.train import _with_rotations, rotation_shape

    student = digits_cnn_student()
    shape = rotation_shape(student, TRAIN, source)
    assert shape == (1, 8, 8)  # flat digits: the student's input_shape
    idx = torch.tensor([5, 9])
    out = _with_rotations(Batch(idx, TRAIN.get(idx), TRAIN.labels[idx]), shape)
    assert out.indices.tolist() == [5, 5, 5, 5, 9, 9, 9, 9] and out.inputs.shape == (8, 64)
    img = TRAIN.get(idx).reshape(2, 8, 8)
    for i in range(2):
        for k in range(4):
            want = [[float(img[i, r, c]) for c in range(8)] for r in range(8)]
            for _ in range(k):  # rot90 counter-clockwise: new[r][c] = old[c][7 - r]
                want = [[want[c][7 - r] for c in range(8)] for r in range(8)]
            assert out.inputs[4 * i + k].reshape(8, 8).tolist() == want
    with pytest.raises(ValueError, match="runs on them"):
        rotation_shape(student, TRAIN, None)


def test_sskd_trains(source: LocalSource) -> None:
    result = _run(source, "sskd", ["pool=pool"], falls=False)
    (conn,) = result.connectors
    assert conn.student_head[0].in_features == 16 and conn.teacher_head[0].in_features == 64


# ---------------------------------------------------------------------------------------------
# dist-feat (DIST's dense relation loss, the authors' segmentation code)
# ---------------------------------------------------------------------------------------------
def _pearson(a: list[float], b: list[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    da, db = [x - ma for x in a], [y - mb for y in b]
    num = sum(x * y for x, y in zip(da, db))
    return num / (math.sqrt(sum(x * x for x in da)) * math.sqrt(sum(y * y for y in db)) + 1e-8)


def test_dist_feat_matches_the_hand_computed_dense_relations() -> None:
    g = torch.Generator().manual_seed(20)
    s, t = torch.randn(2, 3, 2, 2, generator=g, dtype=D), torch.randn(2, 3, 2, 2, generator=g, dtype=D) * 2
    rows_s = [[math.exp(v) for v in _log_softmax([float(s[n, c, i, j]) for c in range(3)])]
              for n in range(2) for i in range(2) for j in range(2)]  # fmt: skip
    rows_t = [[math.exp(v) for v in _log_softmax([float(t[n, c, i, j]) for c in range(3)])]
              for n in range(2) for i in range(2) for j in range(2)]  # fmt: skip
    inter = 1 - sum(_pearson(a, b) for a, b in zip(rows_s, rows_t)) / len(rows_s)
    cols = [([r[c] for r in rows_s], [r[c] for r in rows_t]) for c in range(3)]
    intra = 1 - sum(_pearson(a, b) for a, b in cols) / 3
    got = get_method("dist-feat").loss([s], [t], weight=0.5, beta=2.0, gamma=3.0)
    torch.testing.assert_close(got, torch.tensor(0.5 * (2.0 * inter + 3.0 * intra), dtype=D))
    # a monotone (softmax-preserving) relation is all it asks: the teacher itself gives ~0
    assert float(get_method("dist-feat").loss([t.clone()], [t])) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="same shape"):
        get_method("dist-feat").loss([s[:, :2]], [t])


def test_dist_feat_trains(source: LocalSource) -> None:
    result = _run(source, "dist-feat", ["layer2=layer2"])
    assert result.connectors[0].conv.out_channels == 64


def test_dot_splits_a_feature_methods_ce_from_its_connector_terms(source: LocalSource, tmp_path) -> None:
    """CRD under DOT (mdistiller's CRDDOT): the student gets both momenta; CRD's embeddings, which
    only the distillation term reaches, only the distillation buffer (read from the checkpoint)."""
    seed_everything(0)
    student = digits_cnn_student()
    config = TrainConfig(method="crd", matches=["pool=pool"], optimizer="dot", lr=0.05, epochs=1, batch_size=32,
                         method_options={"nce_k": 16})  # fmt: skip
    result = train_student(student, TRAIN, TEST, config, source=source, subset=SUBSET, run_dir=tmp_path)
    assert math.isfinite(result.loss_per_epoch[0])
    state = load_checkpoint(tmp_path / "checkpoint.pt")["optimizer"]["state"]
    names = [n for n, _ in student.named_parameters()]
    names += [f"connectors.{n}" for n, _ in result.connectors.named_parameters()]  # the order DOT was given
    by_name = {names[int(i)]: set(v) for i, v in state.items()}
    assert by_name["head.weight"] == {"momentum_buffer", "momentum_kd_buffer"}
    assert by_name["connectors.0.embed_s.weight"] == {"momentum_kd_buffer"}
    assert "connectors.0.embed_t.weight" in by_name  # the teacher embedding: trained by CRD's term only
