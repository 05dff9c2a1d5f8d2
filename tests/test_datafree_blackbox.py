"""Black-box data-free methods against a real server: DFME (teacher at the ``scores`` tier,
forward-difference gradients, never InputGradient) and ZSDB3KD (teacher at the ``labels``
tier, boundary distances from label queries only)."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import grpc
import pytest
import torch
import torch.nn.functional as F

from kd.core.data import load_dataset
from kd.models import digits_cnn_student
from kd.student_trainer.datafree import DataFreeConfig, ServedTeacher, dfme, get, zsdb3kd
from kd.student_trainer.train import accuracy
from kd.teacher_server.client import TeacherClient, TeacherRequestError
from kd.teacher_server.loading import Teacher, load_teacher
from kd.teacher_server.server import TeacherOptions, start_server

TRAIN = load_dataset("digits", "train")
TEST = load_dataset("digits", "test")


@pytest.fixture(scope="module")
def cnn_spec(digits_cnn_spec) -> str:
    return digits_cnn_spec(5)


@pytest.fixture(scope="module")
def local(cnn_spec: str) -> Teacher:
    return load_teacher("local", cnn_spec)


@pytest.fixture(scope="module")
def tiered(cnn_spec: str):
    """One server, the same weights under one name per tier."""
    teachers = [load_teacher(tier, cnn_spec) for tier in ("scores", "labels")]
    running = start_server(teachers, options={t.name: TeacherOptions(access=t.name, max_queue_delay_us=200)
                                              for t in teachers})  # fmt: skip
    yield f"127.0.0.1:{running.port}"
    running.stop(grace=1)


def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _changed(before: list[torch.Tensor], module: torch.nn.Module) -> bool:
    return all(not torch.equal(a, b.detach()) for a, b in zip(before, module.parameters()))


def _denied(call) -> None:
    with pytest.raises(TeacherRequestError) as err:
        call()
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED, err.value


# == DFME ==================================================================================================
def test_dfme_mean_correction_is_the_papers_logit_recovery_from_probabilities() -> None:
    t = torch.randn(5, 10, dtype=torch.float64) * 3
    logp = torch.log(torch.softmax(t, 1))  # what the paper's attack has: probabilities
    recovered = logp - logp.mean(1, keepdim=True)
    torch.testing.assert_close(dfme.correct_logits(t, "mean"), recovered)
    assert torch.equal(dfme.correct_logits(t, "none"), t)
    with pytest.raises(ValueError, match="logit_correction"):
        dfme.correct_logits(t, "min")


def test_dfme_l1_and_forward_differences_match_a_float64_loop() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 10, generator=g, dtype=torch.float64), torch.randn(4, 10, generator=g, dtype=torch.float64)
    for n in range(4):
        assert float(dfme.l1_per_sample(s, t)[n]) == pytest.approx(
            sum(abs(float(s[n, k] - t[n, k])) for k in range(10)) / 10
        )
    n, m, shape, eps = 3, 5, (1, 2, 2), 1e-3
    u = dfme.sphere_directions(n, m, shape, g).double()
    assert torch.allclose(u.flatten(2).norm(dim=2), torch.ones(n, m, dtype=torch.float64))
    f0, fu = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, m, generator=g, dtype=torch.float64)
    got = dfme.forward_difference_gradient(f0, fu, u, eps)
    d = 4
    for i in range(n):
        want = torch.zeros(shape, dtype=torch.float64)
        for j in range(m):
            want += (fu[i, j] - f0[i]) / eps * u[i, j]
        torch.testing.assert_close(got[i], want * d / m)


def test_dfme_estimator_recovers_a_known_gradient() -> None:
    """E[d u u^T] = I: with many directions the estimate of a smooth function's gradient is close."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(1, 1, 4, 4, generator=g, dtype=torch.float64)
    x = torch.randn(1, 1, 4, 4, generator=g, dtype=torch.float64)

    def f(z):  # <a, z> + |z|^2 / 2 per sample, gradient a + z
        return (a * z).flatten(1).sum(1) + 0.5 * z.flatten(1).pow(2).sum(1)

    m, eps = 4000, 1e-4
    u = dfme.sphere_directions(1, m, (1, 4, 4), g).double()
    fu = f((x[:, None] + eps * u).reshape(m, 1, 4, 4)).reshape(1, m)
    est = dfme.forward_difference_gradient(f(x), fu, u, eps)
    assert F.cosine_similarity(est.flatten(), (a + x).flatten(), dim=0) > 0.95
    assert float(est.norm() / (a + x).norm()) == pytest.approx(1.0, abs=0.15)


def test_dfme_generator_gradient_through_the_scores_tier_matches_local_autograd(tiered: str, local: Teacher) -> None:
    torch.manual_seed(0)
    student = digits_cnn_student()
    pre = torch.randn(2, 1, 8, 8)
    n, m = len(pre), 400
    with TeacherClient(tiered, client_id="grad") as c:
        teacher = ServedTeacher(c, "scores")
        grad, loss = dfme.estimate_generator_gradient(teacher, student, pre, m=m, epsilon=1e-3, correction="mean",
                                                      input_range=(0.0, 1.0))  # fmt: skip
        assert (teacher.usage.samples, teacher.usage.gradient_samples) == (n * (m + 1), 0)
    # the same objective in float64, differentiated locally through the in-process teacher
    tm, sm = copy.deepcopy(local.model).double().eval(), copy.deepcopy(student).double().eval()
    p = pre.double().requires_grad_(True)
    x = 0.5 * (torch.tanh(p) + 1)
    t = tm(x)
    t = t - t.mean(1, keepdim=True)
    want_loss = -(sm(x) - t).abs().mean()
    (want,) = torch.autograd.grad(want_loss, p)
    assert float(loss) == pytest.approx(want_loss.item(), rel=1e-4)
    assert float(F.cosine_similarity(grad.double().flatten(), want.flatten(), dim=0)) > 0.8


def test_dfme_runs_at_the_scores_tier_without_input_gradients(tiered: str) -> None:
    torch.manual_seed(0)
    student = digits_cnn_student()
    generator = dfme.PreActivationGenerator((1, 8, 8), nz=16, width=16)
    s0, g0 = _params(student), _params(generator)
    logged: list[dict] = []
    config = DataFreeConfig(steps=3, batch_size=16, lr=0.05, generator_lr=1e-3)
    with TeacherClient(tiered, client_id="dfme-run") as c:
        teacher = ServedTeacher(c, "scores")
        res = get("dfme").run(teacher, student, config, test=TEST, generator=generator, m=2, d_iter=2,
                              student_optimizer="sgd", log=lambda step, v: logged.append(v))  # fmt: skip
        assert (res.samples, res.gradient_samples) == (c.usage.samples, c.usage.gradient_samples)
    assert res.gradient_samples == 0  # never InputGradient
    assert res.samples == 3 * dfme.queries_per_step(16, m=2, g_iter=1, d_iter=2) == 3 * 16 * 5
    assert len(logged) == 3 and all(math.isfinite(v) for d in logged for v in d.values())
    assert _changed(s0, student) and _changed(g0, generator)
    assert res.synthetic is not None and res.synthetic.shape == (16, 1, 8, 8)
    # the generator's images are pixels: squashed into [0, 1] (what the teacher was trained on), and
    # not a constant image (a generator that collapsed would still be in range)
    assert float(res.synthetic.min()) >= 0.0 and float(res.synthetic.max()) <= 1.0
    assert float(res.synthetic.std()) > 1e-3
    assert res.test_acc == accuracy(student, TEST)  # the trained student's own accuracy, as reported


def test_dfme_is_refused_at_the_labels_tier_and_checks_its_options(tiered: str) -> None:
    with TeacherClient(tiered, client_id="dfme-refused") as c:
        teacher = ServedTeacher(c, "labels")
        _denied(lambda: get("dfme").run(teacher, digits_cnn_student(), DataFreeConfig(steps=1, batch_size=4)))
        with pytest.raises(TypeError, match="unknown options"):
            get("dfme").run(teacher, digits_cnn_student(), DataFreeConfig(steps=1), grad_m=3)
    assert get("dfme").tier == "scores"


def test_dfme_student_beats_chance(tiered: str) -> None:
    torch.manual_seed(0)
    config = DataFreeConfig(**{**dfme.DEMO["config"], "steps": 50})
    with TeacherClient(tiered, client_id="dfme-chance") as c:
        res = get("dfme").run(ServedTeacher(c, "scores"), digits_cnn_student(), config, test=TEST,
                              **{**dfme.DEMO["options"], "lr_milestones": ()})  # fmt: skip
    assert res.test_acc > 0.15, res.test_acc


# == ZSDB3KD ===============================================================================================
def test_zsdb3kd_soft_labels_and_loss_match_float64() -> None:
    d = torch.tensor([[0.0, 1.0, 2.0, math.inf], [3.0, 0.0, 0.5, 1.5]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    neg = zsdb3kd.soft_label_logits(d, y, "negative")
    torch.testing.assert_close(
        neg, torch.tensor([[0.0, -1.0, -2.0, -3.0], [-3.0, 0.0, -0.5, -1.5]], dtype=torch.float64)
    )
    off = zsdb3kd.soft_label_logits(d, y, "official")
    torch.testing.assert_close(off, torch.tensor([[6.0, 1.0, 2.0, 3.0], [3.0, 5.0, 0.5, 1.5]], dtype=torch.float64))
    with pytest.raises(ValueError, match="label_form"):
        zsdb3kd.soft_label_logits(d, y, "positive")
    s = torch.randn(2, 4, dtype=torch.float64)
    T, w = 3.0, 0.7
    want = 0.0
    for i in range(2):
        p = [math.exp(float(neg[i, k]) / T) for k in range(4)]
        q = [math.exp(float(s[i, k]) / T) for k in range(4)]
        p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
        kl = sum(pk * math.log(pk / qk) for pk, qk in zip(p, q))
        ce = -float(s[i, y[i]]) + math.log(sum(math.exp(float(v)) for v in s[i]))
        want += (w * ce + T * T * kl) / 2
    assert float(zsdb3kd.zsdb3kd_loss(s, neg, y, T, w)) == pytest.approx(want, rel=1e-10)


def _linear_labeller(w: torch.Tensor, b: torch.Tensor, counter: list[int]):
    def labels(x: torch.Tensor) -> torch.Tensor:
        counter[0] += len(x)
        return (x.flatten(1).double() @ w.t() + b).argmax(1)

    return labels


def test_zsdb3kd_boundary_searches_on_a_known_linear_teacher() -> None:
    """3 linear classes in R^8: distances along segments and the nearest boundary are exact here."""
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(3, 8, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    count = [0]
    labels = _linear_labeller(w, b, count)
    # one pseudo sample per class: the partner of each (sample, class) pair is determined
    pts = []
    for c in range(3):
        while True:
            p = torch.randn(1, 8, generator=g, dtype=torch.float64) * 3
            if int(labels(p)) == c:
                pts.append(p)
                break
    x, y = torch.cat(pts), torch.arange(3)
    count[0] = 0
    steps = 20
    dist = zsdb3kd.class_distances(labels, x, y, 3, partners=1, bisect_steps=steps, generator=g)
    assert count[0] == 6 * steps
    for i in range(3):
        for j in range(3):
            if i == j:
                assert dist[i, j] == 0
                continue
            delta = x[j] - x[i]
            # entry of the segment x_i + lam delta into class j's region {(w_j - w_k) z + b_j - b_k >= 0 for all k}
            entry = 0.0
            for k in range(3):
                if k == j:
                    continue
                a0 = float((w[j] - w[k]) @ x[i] + b[j] - b[k])
                a1 = float((w[j] - w[k]) @ delta)
                if a0 < 0:
                    entry = max(entry, -a0 / a1)
            norm = float(delta.norm())
            assert float(dist[i, j]) == pytest.approx(entry * norm, abs=norm / 2**steps * 1.01)
    # the outward normal at a boundary point of class 0 vs 1 (class 2 far away) is w_0 - w_1 (normalised)
    w2, b2 = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]], dtype=torch.float64), torch.tensor([0.0, 0.0, -50.0])
    labels2 = _linear_labeller(w2, b2, [0])
    xb = torch.tensor([[0.001, 0.3]], dtype=torch.float64)
    normal = zsdb3kd.boundary_normal(labels2, xb, torch.tensor([0]), probes=400, delta=0.01, generator=g)
    assert float(normal[0].double() @ torch.tensor([-1.0, 0.0], dtype=torch.float64)) > 0.95
    # the nearest boundary of a point of class 0 at distance 0.7 from x_1 = 0: along -e1, distance 0.7
    x0 = torch.tensor([[0.7, 0.0]], dtype=torch.float64)
    d0, theta = zsdb3kd.nearest_boundary(labels2, x0, torch.tensor([0]), directions=64, bisect_steps=20, generator=g)
    assert 0.7 <= float(d0) < 0.8 and float(theta[0, 0]) < -0.9
    # bisect: the returned point satisfies the predicate and is within (hi - lo) / 2^steps of the boundary
    hi = zsdb3kd.bisect(labels2, x0, torch.tensor([[-1.0, 0.0]], dtype=torch.float64), torch.zeros(1),
                        torch.ones(1), lambda lab: lab != 0, 10)  # fmt: skip
    assert 0.7 <= float(hi) <= 0.7 + 1 / 2**10


def test_zsdb3kd_pseudo_samples_keep_their_labels_and_move_off_the_boundaries(local: Teacher) -> None:
    model = local.model.eval()

    def labels(x):
        with torch.no_grad():
            return model(x).argmax(1)

    g = torch.Generator().manual_seed(0)
    x, y = zsdb3kd.draw_pseudo_samples(labels, 10, 3, (1, 8, 8), max_draws=3000, draw_batch=500, fill_sigma=0.1,
                                       input_range=(0.0, 1.0), generator=g)  # fmt: skip
    assert torch.equal(labels(x), y) and 0 <= x.min() and x.max() <= 1
    counts = torch.bincount(y, minlength=10)
    assert counts.max() == 3 and (counts > 0).sum() >= 5
    x2, trace = zsdb3kd.optimise_pseudo_samples(labels, x.clone(), y, iters=6, step=1.0, directions=2,
                                                bisect_steps=6, normal_probes=16, normal_delta=0.05,
                                                input_range=(0.0, 1.0), generator=g)  # fmt: skip
    assert len(trace) == 6 and torch.equal(labels(x2), y) and 0 <= x2.min() and x2.max() <= 1

    def nearest(z):  # the same estimate before and after: many directions
        return zsdb3kd.nearest_boundary(labels, z, y, directions=48, bisect_steps=6, generator=g)[0]

    before, after = nearest(x), nearest(x2)
    assert float(after.mean()) > 1.3 * float(before.mean()), (before.mean(), after.mean())


def test_zsdb3kd_runs_on_labels_only(tiered: str) -> None:
    """Labels is the lowest tier, so there is no tier below to refuse it; what it must do is
    work where logits are refused."""
    torch.manual_seed(0)
    student = digits_cnn_student()
    s0 = _params(student)
    logged: list[tuple[int, dict]] = []
    config = DataFreeConfig(steps=5, batch_size=8, lr=3e-3)
    opts = dict(samples_per_class=2, max_draws=2000, optimize_iters=2, directions=1, normal_probes=4, partners=1,
                bisect_steps=4)  # fmt: skip
    with TeacherClient(tiered, client_id="zs-run") as c:
        teacher = ServedTeacher(c, "labels")
        _denied(lambda: teacher.logits(torch.rand(2, 1, 8, 8)))
        used = c.usage.samples
        res = get("zsdb3kd").run(teacher, student, config, test=TEST, log=lambda s, v: logged.append((s, v)), **opts)
        assert (res.samples, res.gradient_samples) == (c.usage.samples - used, c.usage.gradient_samples)
    assert res.samples > 0 and res.gradient_samples == 0
    stages = logged[0][1]
    assert stages["queries_draw"] + stages["queries_optimise"] + stages["queries_soft_labels"] == res.samples
    losses = [v["loss"] for s, v in logged[1:]]
    assert len(losses) == 5 and all(math.isfinite(v) for v in losses)
    assert _changed(s0, student)
    assert res.synthetic is not None and res.synthetic.shape[1:] == (1, 8, 8)
    with pytest.raises(TypeError, match="unknown options"):
        get("zsdb3kd").run(teacher, student, config, temperature=3.0)
    assert get("zsdb3kd").tier == "labels"


def test_zsdb3kd_student_beats_chance(tiered: str) -> None:
    torch.manual_seed(0)
    config = DataFreeConfig(steps=300, batch_size=64, lr=3e-3, temperature=4.0)
    with TeacherClient(tiered, client_id="zs-chance") as c:
        res = get("zsdb3kd").run(ServedTeacher(c, "labels"), digits_cnn_student(), config, test=TEST,
                                 samples_per_class=10, optimize_iters=10)  # fmt: skip
    # 0.31 in isolation; 0.18 was seen once beside other load (label answers at near-ties move
    # with the server's batch composition). Chance is 0.10 with a binomial std of 0.012 on 599
    # test samples, so 0.15 is still 4 std above a student that learned nothing.
    assert res.test_acc > 0.15, res.test_acc


def test_queries_larger_than_the_servers_queue_go_in_slices(local: Teacher, cnn_spec: str) -> None:
    """zsdb3kd's boundary search asks about thousands of inputs at once: more rows than a server
    queues (max_queue_size) are sent in slices of its batch size, and the answers are the same."""
    teachers = [load_teacher(tier, cnn_spec) for tier in ("scores", "labels")]
    small = TeacherOptions(max_batch_size=8, max_queue_size=16, max_queue_delay_us=0)
    running = start_server(teachers, options={t.name: replace(small, access=t.name) for t in teachers})
    x = torch.rand(50, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = local.model(x)
    try:
        with TeacherClient(f"127.0.0.1:{running.port}", client_id="slices") as c:
            with pytest.raises(TeacherRequestError, match="can never fit max_queue_size=16"):
                c.infer("scores", x)  # one request of 50 rows: what the slices avoid
            scores, labels = ServedTeacher(c, "scores"), ServedTeacher(c, "labels")
            assert scores.chunk == 8
            torch.testing.assert_close(scores.logits(x), want, rtol=1e-5, atol=1e-5)
            assert torch.equal(labels.labels(x), want.argmax(1))
    finally:
        running.stop(grace=1)
