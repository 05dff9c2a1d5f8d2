"""Record-based data-free methods against a real server: ``lopes`` (Lopes et al. 2017,
reconstruction from activation records) and ``adv-samples`` (Heo et al. 2019, boundary-
supporting samples on a lopes-made transfer set). Losses are checked against float64
computations written here; runs go through the served digits CNN teacher."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import grpc
import pytest
import torch
import torch.nn.functional as F

from kd.core.data import load_dataset
from kd.models import digits_cnn_student
from kd.student_trainer.datafree import adv_samples as bss
from kd.student_trainer.datafree import get, lopes
from kd.student_trainer.datafree.common import DataFreeConfig, ServedTeacher
from kd.teacher_server.client import TeacherClient, TeacherRequestError
from kd.teacher_server.loading import load_teacher
from kd.teacher_server.records import compute_records, save_records
from kd.teacher_server.server import TeacherOptions, start_server

TRAIN = load_dataset("digits", "train")
TEST = load_dataset("digits", "test")
LAYERS = ["layer2", "logits"]  # the order lopes matches them in: the teacher's, logits last


@pytest.fixture(scope="module")
def spec(digits_cnn_spec) -> str:
    return digits_cnn_spec(5)


@pytest.fixture(scope="module")
def local(spec: str) -> torch.nn.Module:
    """The teacher in float64, for the reference computations."""
    return copy.deepcopy(load_teacher("local", spec).model).double().eval()


@pytest.fixture(scope="module")
def records_file(spec: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    t = load_teacher("cnn", spec)
    recs = compute_records(t, TRAIN, LAYERS, rank=4)
    return save_records(tmp_path_factory.mktemp("records") / "records.safetensors", recs, t, TRAIN.dataset_id)


@pytest.fixture(scope="module")
def address(spec: str, records_file: Path):
    teachers = [load_teacher(tier, spec) for tier in ("white", "features")]
    options = {t.name: TeacherOptions(access=t.name, records=str(records_file)) for t in teachers}
    running = start_server(teachers, options=options)
    yield f"127.0.0.1:{running.port}"
    running.stop(grace=1)


@pytest.fixture()
def client(address: str, request: pytest.FixtureRequest):
    with TeacherClient(address, client_id=request.node.name) as c:  # fresh query counters per test
        yield c


def local_acts(model: torch.nn.Module, x: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_hook(lambda _m, _i, o, n=n: seen.__setitem__(n, o))
             for n in layers if n != "logits"]  # fmt: skip
    try:
        seen["logits"] = model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def ref_loss(acts: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], recs, classes, variant: str):
    """The lopes losses in float64, sample by sample."""
    total = torch.zeros((), dtype=torch.float64)
    for name, target in targets.items():
        a = acts[name].reshape(len(classes), -1).double()
        target = target.double()
        rec = recs[name]
        if variant == "spectral":
            lam = torch.stack([rec.eigvals[int(k)].double() for k in classes])
            err = 0.0
            for i, k in enumerate(classes.tolist()):
                c = rec.eigvecs[k].double().t() @ (a[i] - rec.mean[k].double())
                err = err + ((c - target[i]) ** 2).sum()
            total = total + err / target.numel() / lam.mean()
        elif name == "logits":
            total = total + ((a - target) ** 2).sum() / a.numel()
        else:
            total = total + ((a.clamp_min(0) - target.clamp_min(0)) ** 2).sum() / a.numel()
    return total


# -- lopes: losses ------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", lopes.VARIANTS)
def test_lopes_losses_and_their_gradient_through_the_server_match_float64(client, local, variant: str) -> None:
    teacher = ServedTeacher(client, "white")
    recs = lopes.parse_records(teacher.records())
    layers = lopes.choose_layers(recs, variant, None, teacher.layers)
    assert layers == (["logits"] if variant == "top-layer" else LAYERS)
    gen = torch.Generator().manual_seed(1)
    classes = lopes.balanced_classes(recs["logits"].count, 12, offset=3)
    assert classes.tolist() == [3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4]
    targets = lopes.sample_targets(recs, layers, classes, variant, gen)
    x = torch.rand(12, 1, 8, 8, generator=gen).requires_grad_(True)
    feats = tuple(n for n in layers if n != "logits")
    logits, got = teacher(x, features=feats) if feats else (teacher(x), {})
    loss = lopes.reconstruction_loss({"logits": logits, **got}, targets, recs, classes, variant)
    loss.backward()

    x64 = x.detach().double().requires_grad_(True)
    want = ref_loss(local_acts(local, x64, layers), targets, recs, classes, variant)
    want.backward()
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-4)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-3, atol=1e-6)
    assert x.grad.abs().sum() > 0


def test_lopes_targets_follow_the_records(client) -> None:
    recs = lopes.parse_records(ServedTeacher(client, "white").records())
    rec = recs["logits"]
    gen = torch.Generator().manual_seed(0)
    classes = torch.full((20000,), 7)
    draws = lopes.sample_activations(rec, classes, gen).double()
    torch.testing.assert_close(draws.mean(0), rec.mean[7].double(), atol=4 * float(rec.std[7].max()) / 141, rtol=0)
    torch.testing.assert_close(draws.std(0), rec.std[7].double(), rtol=0.03, atol=1e-4)
    coef = lopes.sample_coefficients(rec, classes, gen).double()
    torch.testing.assert_close(coef.var(0), rec.eigvals[7].double(), rtol=0.05, atol=1e-6)
    # the coefficients of the recorded mean itself are 0; of mean + e_1 they are E^T e_1
    a = rec.mean[[7, 7]].clone()
    a[1] += rec.eigvecs[7][:, 0]
    c = lopes.coefficients(a, rec, torch.tensor([7, 7]))
    torch.testing.assert_close(c[0], torch.zeros(4), atol=1e-5, rtol=0)
    assert float(c[1, 0]) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("variant", lopes.VARIANTS)
def test_lopes_reconstructions_are_recognised_by_the_teacher(client, local, variant: str) -> None:
    teacher = ServedTeacher(client, "white")
    maker = lopes.Reconstructor(teacher, variant=variant, iterations=20, seed=0)
    first = lopes.Reconstructor(teacher, variant=variant, iterations=1, seed=0)
    x, classes = maker.batch(20)
    first.batch(20)
    assert x.shape == (20, 1, 8, 8) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert math.isfinite(maker.last_loss) and maker.last_loss < 0.8 * first.last_loss
    with torch.no_grad():
        agree = (local(x.double()).argmax(1) == classes).float().mean()
    assert agree >= 0.6, (variant, float(agree))  # top-layer draws may put another class on top


# -- lopes: runs --------------------------------------------------------------------------------
def test_lopes_distils_a_student_that_beats_chance(client) -> None:
    teacher = ServedTeacher(client, "white")
    torch.manual_seed(0)
    student = digits_cnn_student()
    before = [p.detach().clone() for p in student.parameters()]
    steps, bs, its = 5, 48, 20
    cfg = DataFreeConfig(steps=steps, batch_size=bs, lr=3e-3, seed=0)
    res = get("lopes").run(teacher, student, cfg, test=TEST, iterations=its, kd_steps=40)
    after = list(student.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    # one forward and one input gradient per iteration, one logits query per batch
    assert (res.samples, res.gradient_samples) == (steps * (its + 1) * bs, steps * its * bs)
    assert (client.usage.samples, client.usage.gradient_samples) == (res.samples, res.gradient_samples)
    assert res.synthetic is not None and res.synthetic.shape == (16, 1, 8, 8)
    assert res.test_acc > 0.2, res.test_acc  # chance is 0.1


def test_lopes_refuses_below_white_and_bad_options(client) -> None:
    with pytest.raises(TeacherRequestError) as err:
        get("lopes").run(ServedTeacher(client, "features"), digits_cnn_student(), DataFreeConfig(steps=1))
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert client.usage.samples == client.usage.gradient_samples == 0
    white = ServedTeacher(client, "white")
    with pytest.raises(TypeError, match="unknown option.*'lr_input'"):
        get("lopes").run(white, digits_cnn_student(), DataFreeConfig(steps=1), lr_input=0.1)
    with pytest.raises(ValueError, match="unknown lopes variant 'spectral-pairs'"):
        get("lopes").run(white, digits_cnn_student(), DataFreeConfig(steps=1), variant="spectral-pairs")
    with pytest.raises(ValueError, match="recorded layers are"):
        get("lopes").run(white, digits_cnn_student(), DataFreeConfig(steps=1), layers=("layer1",))
    assert get("lopes").tier == "white" and get("adv-samples").tier == "white"


def test_a_teacher_without_records_is_refused_before_querying(spec: str) -> None:
    running = start_server([load_teacher("bare", spec)])
    try:
        with TeacherClient(f"127.0.0.1:{running.port}", client_id="bare") as c:
            for name in ("lopes", "adv-samples"):
                with pytest.raises(ValueError, match="without activation records"):
                    get(name).run(ServedTeacher(c, "bare"), digits_cnn_student(), DataFreeConfig(steps=1))
            assert c.usage.samples == c.usage.gradient_samples == 0
    finally:
        running.stop(grace=1)


# -- adv-samples: losses ------------------------------------------------------------------------
def test_bss_loss_and_schedules_match_float64() -> None:
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 10, generator=gen), 3 * torch.randn(6, 10, generator=gen)
    sa, ta = torch.randn(4, 10, generator=gen), 3 * torch.randn(4, 10, generator=gen)
    y = torch.randint(10, (6,), generator=gen)
    got = bss.bss_loss(s, t, y, sa, ta, alpha=2.5, beta=0.7, temperature=3.0, ce_weight=0.5)

    def soft(s, t, temp):
        s, t = s.double() / temp, t.double() / temp
        p = t.exp() / t.exp().sum(1, keepdim=True)
        logq = s - s.exp().sum(1, keepdim=True).log()
        return -(p * logq).sum(1).mean()

    s64 = s.double()
    ce = (s64.exp().sum(1).log() - s64.gather(1, y[:, None]).squeeze(1)).mean()
    want = 0.5 * ce + 2.5 * soft(s, t, 3.0) + 0.7 * soft(sa, ta, 3.0)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    no_bss = bss.bss_loss(s, t, y, sa, ta, alpha=2.5, beta=0.0, temperature=3.0, ce_weight=0.5)
    assert float(no_bss) == pytest.approx(float(0.5 * ce + 2.5 * soft(s, t, 3.0)), rel=1e-5)
    # soft cross-entropy = KL at temperature T + the teacher's entropy: same student gradient
    kl = F.kl_div(F.log_softmax(s / 3, 1), F.log_softmax(t / 3, 1), reduction="batchmean", log_target=True)
    p = F.softmax(t.double() / 3, 1)
    assert float(bss.soft_cross_entropy(s, t, 3.0)) == pytest.approx(float(kl) - float((p * p.log()).sum(1).mean()),
                                                                     rel=1e-5)  # fmt: skip
    for progress, alpha, beta, lr in [(0.0, 4.0, 2.0, 1.0), (0.5, 2.5, 2 / 3, 0.1), (0.75, 1.75, 0.0, 0.01),
                                      (1.0, 1.0, 0.0, 0.01)]:  # fmt: skip
        assert bss.alpha_schedule(progress) == pytest.approx(alpha)
        assert bss.beta_schedule(progress) == pytest.approx(beta, abs=1e-12)
        assert bss.lr_factor(progress) == lr


def test_bss_selection_and_target_sampling() -> None:
    gen = torch.Generator().manual_seed(3)
    t, s = 2 * torch.randn(40, 10, generator=gen), torch.randn(40, 10, generator=gen)
    y = t.argmax(1).clone()
    y[:10] = (y[:10] + 1) % 10  # the teacher is "wrong" on these: never attacked
    picked = bss.select_bases(t, s, y, 8)
    pt, ps = F.softmax(t.double(), 1), F.softmax(s.double(), 1)
    score = [sum(float((pt[i, j] - ps[i, j]) ** 2) for j in range(10) if j != int(y[i])) for i in range(40)]
    want = sorted(range(10, 40), key=lambda i: -score[i])[:8]
    assert sorted(picked.tolist()) == sorted(want)
    assert sorted(bss.select_bases(t, s, y, 100).tolist()) == list(range(10, 40))
    # targets: never the top class, drawn in proportion to the remaining probabilities
    logits = torch.tensor([[4.0, 2.0, 1.0, 0.0]]).repeat(30000, 1)
    k = bss.sample_targets(logits, torch.Generator().manual_seed(0))
    freq = torch.bincount(k, minlength=4).double() / len(k)
    p = F.softmax(logits[0].double(), 0)
    assert freq[0] == 0
    torch.testing.assert_close(freq[1:], p[1:] / p[1:].sum(), atol=0.01, rtol=0)


def test_bss_attack_through_the_server_matches_float64(client, local) -> None:
    teacher = ServedTeacher(client, "white")
    gen = torch.Generator().manual_seed(2)
    x0 = TEST.inputs[:24].reshape(-1, 1, 8, 8).clone()
    with torch.no_grad():
        base = local(x0.double()).argmax(1)
    target = bss.sample_targets(local(x0.double()).detach(), gen)
    eta, steps = 0.3, 4  # the official eta: margins shrink ~1/3 per step on this teacher
    got, done = bss.boundary_samples(teacher, x0, base, target, steps=steps, eta=eta)
    assert done == steps and client.usage.samples == 0 and 0 < client.usage.gradient_samples <= steps * 24

    x = x0.double().clone()
    for _ in range(steps):
        xv = x.clone().requires_grad_(True)
        out = local(xv)
        fb, fk = out.gather(1, base[:, None]).squeeze(1), out.gather(1, target[:, None]).squeeze(1)
        (g,) = torch.autograd.grad((fk - fb).sum(), xv)
        move = (out.argmax(1) == base).double().detach()
        norm = g.flatten(1).norm(dim=1)
        scale = move * eta * ((fb - fk).detach() + 1e-4) / norm
        x = (x + scale[:, None, None, None] * g).clamp(0, 1)
    torch.testing.assert_close(got.double(), x, rtol=0, atol=2e-4)
    with torch.no_grad():
        m0 = (local(x0.double()).gather(1, base[:, None]) - local(x0.double()).gather(1, target[:, None])).squeeze(1)
        m1 = (local(got.double()).gather(1, base[:, None]) - local(got.double()).gather(1, target[:, None])).squeeze(1)
    assert float(m1.median()) < 0.5 * float(m0.median())  # moved toward the b/k boundary


# -- adv-samples: runs --------------------------------------------------------------------------
def test_adv_samples_runs_on_a_data_free_base_set(client) -> None:
    teacher = ServedTeacher(client, "white")
    torch.manual_seed(0)
    student = digits_cnn_student()
    before = [p.detach().clone() for p in student.parameters()]
    cfg = DataFreeConfig(steps=200, batch_size=48, lr=1e-2, temperature=3.0, seed=0)
    base_batches, its = 3, 20
    res = get("adv-samples").run(teacher, student, cfg, test=TEST, base_batches=base_batches, base_iterations=its,
                                 attack_size=8, attack_steps=3, eta=0.05)  # fmt: skip
    after = list(student.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert (client.usage.samples, client.usage.gradient_samples) == (res.samples, res.gradient_samples)
    base_cost = base_batches * its * 48
    assert res.gradient_samples > base_cost  # the attacks queried input gradients
    assert res.samples > base_cost + base_batches * 48  # ... and the teacher's logits on the BSS
    assert res.test_acc > 0.2, res.test_acc  # chance is 0.1


def test_adv_samples_refuses_below_white_and_bad_options(client) -> None:
    with pytest.raises(TeacherRequestError) as err:
        get("adv-samples").run(ServedTeacher(client, "features"), digits_cnn_student(), DataFreeConfig(steps=1))
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert client.usage.samples == client.usage.gradient_samples == 0
    white = ServedTeacher(client, "white")
    with pytest.raises(TypeError, match="unknown option.*'epsilon'"):
        get("adv-samples").run(white, digits_cnn_student(), DataFreeConfig(steps=1), epsilon=1.0)
    with pytest.raises(ValueError, match="base_batches must be >= 1"):
        get("adv-samples").run(white, digits_cnn_student(), DataFreeConfig(steps=1), base_batches=0)


def test_demo_settings_are_valid_config_and_options() -> None:
    import inspect

    for module in (lopes, bss):
        assert set(module.DEMO) == {"config", "options"}
        DataFreeConfig(**module.DEMO["config"])
        params = inspect.signature(module.run).parameters
        assert set(module.DEMO["options"]) <= set(params) - {"teacher", "student", "config", "test", "unknown"}
