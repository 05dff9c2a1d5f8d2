"""DeepInversion / ADI and Fast-DFKD against a real teacher server (digits CNN with BatchNorm):
the loss terms against float64 computations written here, the client loop against the server's
own synthesis, the meta update, query accounting, tier refusals and a student above chance."""

from __future__ import annotations

import copy
import math

import grpc
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd.core.data import load_dataset
from kd.models import digits_cnn_student
from kd.student_trainer.datafree import DATAFREE, DataFreeConfig, ServedTeacher, get
from kd.student_trainer.datafree import deepinversion as di
from kd.student_trainer.datafree import fast_dfkd as fd
from kd.teacher_server.client import TeacherClient, TeacherRequestError
from kd.teacher_server.gradients import total_variation
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
def server(cnn_spec: str):
    """One server, the same weights as a WHITE-tier and a FEATURES-tier (one below) teacher."""
    teachers = [load_teacher(tier, cnn_spec) for tier in ("white", "features")]
    running = start_server(teachers, options={t.name: TeacherOptions(access=t.name) for t in teachers})
    yield f"127.0.0.1:{running.port}", running
    running.stop(grace=1)


@pytest.fixture
def client(server, request: pytest.FixtureRequest):
    with TeacherClient(server[0], client_id=request.node.name) as c:
        yield c


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


# -- float64 references written out ------------------------------------------------------------------
def ref_tv(x: torch.Tensor) -> float:
    x = x.double()
    _, _, h, w = x.shape
    sums = [0.0, 0.0, 0.0, 0.0]
    for i in range(h):
        for j in range(w):
            if j + 1 < w:
                sums[0] += float(((x[:, :, i, j] - x[:, :, i, j + 1]) ** 2).sum())
            if i + 1 < h:
                sums[1] += float(((x[:, :, i, j] - x[:, :, i + 1, j]) ** 2).sum())
            if i + 1 < h and j + 1 < w:
                sums[2] += float(((x[:, :, i + 1, j] - x[:, :, i, j + 1]) ** 2).sum())
                sums[3] += float(((x[:, :, i, j] - x[:, :, i + 1, j + 1]) ** 2).sum())
    return sum(math.sqrt(s) for s in sums)


def softmax64(v: list[float]) -> list[float]:
    top = max(v)
    e = [math.exp(a - top) for a in v]
    return [a / sum(e) for a in e]


def ref_adi(s: torch.Tensor, t: torch.Tensor, temperature: float) -> float:
    total = 0.0
    for si, ti in zip(s.double().tolist(), t.double().tolist()):
        p = softmax64([a / temperature for a in si])
        q = softmax64([a / temperature for a in ti])
        clamp = lambda v: min(max(v, 0.01), 0.99)  # noqa: E731
        for pc, qc in zip(p, q):
            m = clamp((pc + qc) / 2)
            total += 0.5 * m * math.log(m / clamp(pc)) + 0.5 * m * math.log(m / clamp(qc))
    js = total / len(s)
    return 1.0 - min(max(js, 0.0), 1.0)


def ref_adv(s: torch.Tensor, t: torch.Tensor) -> float:
    total = 0.0
    for si, ti in zip(s.double().tolist(), t.double().tolist()):
        if max(range(len(si)), key=si.__getitem__) == max(range(len(ti)), key=ti.__getitem__):
            p, q = softmax64(ti), softmax64(si)
            total += sum(a * math.log(a / b) for a, b in zip(p, q))
    return -total / len(s)


def ref_bn_f64(model: nn.Module, x: torch.Tensor, weights: list[float], previous=None, m: float = 0.0):
    """Float64 R_bn (optionally blended with a previous state) and logits, x requiring grad."""
    net = copy.deepcopy(model).double().eval()
    seen: list[torch.Tensor] = []
    bns = [b for b in net.modules() if isinstance(b, nn.BatchNorm2d)]
    hooks = [b.register_forward_hook(lambda mod, i, o: seen.append(i[0])) for b in bns]
    logits = net(x)
    for h in hooks:
        h.remove()
    total, stats = 0.0, []
    for k, (w, b, f) in enumerate(zip(weights, bns, seen)):
        n = f.shape[0] * f.shape[2] * f.shape[3]
        mu = f.sum(dim=(0, 2, 3)) / n
        var = ((f - mu[None, :, None, None]) ** 2).sum(dim=(0, 2, 3)) / n
        stats.append((mu.detach(), var.detach()))
        if previous is not None:
            mu, var = m * previous[k][0] + (1 - m) * mu, m * previous[k][1] + (1 - m) * var
        total = total + w * (((mu - b.running_mean) ** 2).sum().sqrt() + ((var - b.running_var) ** 2).sum().sqrt())
    return total, logits, stats


# -- (a) loss terms --------------------------------------------------------------------------------------
def test_image_priors_match_float64() -> None:
    x = torch.randn(3, 2, 5, 6, generator=torch.Generator().manual_seed(1))
    assert float(di.total_variation_l2(x)) == pytest.approx(ref_tv(x), rel=1e-5)
    # the server's loop uses the same prior: the two modes optimise the same objective
    assert float(total_variation(x)) == pytest.approx(ref_tv(x), rel=1e-5)
    per_sample = [math.sqrt(sum(v * v for v in row)) for row in x.double().reshape(3, -1).tolist()]
    assert float(di.input_l2(x)) == pytest.approx(sum(per_sample) / 3, rel=1e-6)
    flat = torch.randn(3, 64)  # not images: no TV (as on the server), and no jitter
    assert float(di.total_variation_l2(flat)) == 0.0 == float(total_variation(flat))
    with pytest.raises(ValueError, match="need \\[N, C, H, W\\] images"):
        di.jitter_flip(flat, 2, False, torch.Generator())


def test_adi_competition_matches_float64_and_pushes_towards_disagreement() -> None:
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(6, 10, generator=g) * 3, torch.randn(6, 10, generator=g) * 3
    assert float(di.adi_competition(s, t, 3.0)) == pytest.approx(ref_adi(s, t, 3.0), rel=1e-5)
    assert float(di.adi_competition(s, t, 1.0)) == pytest.approx(ref_adi(s, t, 1.0), rel=1e-5)
    assert float(di.adi_competition(t, t, 3.0)) == pytest.approx(1.0, abs=1e-6)  # agreement costs the most
    # the official form: nn.KLDivLoss(batchmean)(log p, m) is KL(m || p)
    p, q = F.softmax(s / 3, 1), F.softmax(t / 3, 1)
    mm = (0.5 * (p + q)).clamp(0.01, 0.99)
    kl = nn.KLDivLoss(reduction="batchmean")
    official = 1 - (0.5 * kl(p.clamp(0.01, 0.99).log(), mm) + 0.5 * kl(q.clamp(0.01, 0.99).log(), mm)).clamp(0, 1)
    assert float(di.adi_competition(s, t, 3.0)) == pytest.approx(float(official), rel=1e-5)
    # a gradient step on the student's logits that lowers R_adi moves them away from the teacher's
    s2 = s.clone().requires_grad_(True)
    di.adi_competition(s2, t).backward()
    moved = (s2 - 0.5 * s2.grad).detach()
    assert float(F.kl_div(F.log_softmax(moved, 1), F.softmax(t, 1), reduction="batchmean")) > float(
        F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="batchmean")
    )


def test_adversarial_loss_matches_float64() -> None:
    g = torch.Generator().manual_seed(3)
    t = torch.randn(8, 10, generator=g) * 2
    s = t + torch.randn(8, 10, generator=g)  # mostly the same argmax, some not
    agree = int((s.argmax(1) == t.argmax(1)).sum())
    assert 0 < agree < 8
    assert float(fd.adversarial_loss(s, t)) == pytest.approx(ref_adv(s, t), rel=1e-5)
    assert float(fd.adversarial_loss(t, t)) == pytest.approx(0.0, abs=1e-7)


def test_bn_loss_and_logits_value_gradient_and_queries_match_float64(server, client, local: Teacher) -> None:
    teacher = ServedTeacher(client, "white")
    assert teacher.batch_norms == ("layer1.1", "layer2.1")
    x, y = images(6, 4), torch.arange(6) % 10
    weights = (10.0, 1.0)
    xs = x.clone().requires_grad_(True)
    bn, logits = di.bn_loss_and_logits(teacher, xs, layer_weights=weights)
    loss = 3.0 * bn + F.cross_entropy(logits, y) + 0.5 * (logits**2).mean()
    loss.backward()
    assert (client.usage.samples, client.usage.gradient_samples) == (0, 12)  # one BN call + one VJP
    xd = x.double().requires_grad_(True)
    bn_ref, logits_ref, _ = ref_bn_f64(local.model, xd, list(weights))
    (3.0 * bn_ref + F.cross_entropy(logits_ref, y) + 0.5 * (logits_ref**2).mean()).backward()
    assert float(bn.detach()) == pytest.approx(float(bn_ref.detach()), rel=1e-4)
    torch.testing.assert_close(logits.double(), logits_ref.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(xs.grad.double(), xd.grad, rtol=1e-3, atol=1e-5)
    # R_bn alone: no VJP is asked for
    xs2 = x.clone().requires_grad_(True)
    di.bn_loss_and_logits(teacher, xs2)[0].backward()
    assert client.usage.gradient_samples == 18


def test_bn_momentum_state_is_blended_as_fast_dfkd_defines_it(server, client, local: Teacher) -> None:
    teacher = ServedTeacher(client, "white")
    x1, x2 = images(8, 5), images(8, 6)
    first, _ = di.bn_loss_and_logits(teacher, x1, state_id="t-mmt", momentum=0.9)
    second, _ = di.bn_loss_and_logits(teacher, x2, state_id="t-mmt", momentum=0.9)
    ref1, _, stats1 = ref_bn_f64(local.model, x1.double(), [1.0, 1.0])
    ref2, _, _ = ref_bn_f64(local.model, x2.double(), [1.0, 1.0], previous=stats1, m=0.9)
    plain, _, _ = ref_bn_f64(local.model, x2.double(), [1.0, 1.0])
    assert float(first) == pytest.approx(float(ref1), rel=1e-4)
    assert float(second) == pytest.approx(float(ref2), rel=1e-4)
    assert float(second) != pytest.approx(float(plain), rel=1e-3)


def test_random_shift_flip_crops_each_sample_and_passes_gradients() -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.rand(32, 1, 8, 8, generator=g).requires_grad_(True)
    out = fd.random_shift_flip(x, 1, True, g)
    padded = F.pad(x.detach(), (1, 1, 1, 1))
    offsets = set()
    crops = {
        (oy, ox, fl): padded[:, :, oy : oy + 8, ox : ox + 8] for oy in range(3) for ox in range(3) for fl in (0, 1)
    }
    crops = {k: c.flip(-1) if k[2] else c for k, c in crops.items()}
    for i in range(32):
        found = [k for k, c in crops.items() if torch.equal(out[i].detach(), c[i])]
        assert found, f"sample {i} is not a shifted (flipped) crop"
        offsets.add(found[0])
    assert len(offsets) > 4  # per-sample offsets and flips, not one for the whole batch
    out.sum().backward()
    assert x.grad is not None and float(x.grad.sum()) > 0
    rolled = di.jitter_flip(x.detach(), 2, False, g)
    assert any(
        torch.equal(rolled, torch.roll(x.detach(), (a, b), (-2, -1))) for a in range(-2, 3) for b in range(-2, 3)
    )


# -- the client loop is the server's loop ---------------------------------------------------------------
def test_client_loop_equals_server_synthesis_without_client_extras(server, client) -> None:
    teacher = ServedTeacher(client, "white")
    o = {**di.DEFAULTS, "iterations": 5, "lr": 0.1, "bn_weight": 1.0, "tv_weight": 1e-3, "l2_weight": 1e-3,
         "jitter": 0, "adi_scale": 0.0}  # fmt: skip
    y = torch.arange(12) % 10
    student = digits_cnn_student()
    on_server = di.synthesize_on_server(teacher, y, 11, o)
    here = di.synthesize_here(teacher, student, y, 11, o, torch.Generator())
    # The two loops compute the same loss in different orders (one graph on the server; BN loss and
    # VJP by RPC here), and parallel reductions depend on thread scheduling, so the gradients agree
    # only to float rounding. Adam divides by sqrt(v): on pixels whose gradient is near 0 that rounding
    # decides the step, so single pixels can differ by ~lr (3.7e-3 was seen on a loaded machine). What
    # is invariant is the move away from the shared starting noise: compare it as a whole.
    noise = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(11))
    moved_here, moved_server = here - noise, on_server - noise

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    assert float(moved_server.abs().mean()) > 0.05  # the loop moved the batch (5 steps of lr 0.1)
    assert rel(moved_here, moved_server) < 0.02, rel(moved_here, moved_server)
    # the measure tells loops apart: one term changed by a quarter is far outside that bound
    other = di.synthesize_here(teacher, student, y, 11, {**o, "bn_weight": 0.75}, torch.Generator())
    assert rel(other - noise, moved_server) > 0.05, rel(other - noise, moved_server)
    # ADI's competition changes the batch, and leaves no gradient on the student's weights
    adi = di.synthesize_here(teacher, student, y, 11, {**o, "adi_scale": 5.0}, torch.Generator())
    assert not torch.allclose(adi, on_server, atol=1e-3)
    assert all(p.grad is None for p in student.parameters())


# -- the meta update -------------------------------------------------------------------------------------
@pytest.mark.parametrize("meta", ["fomaml", "reptile"])
def test_one_inner_step_meta_update_lands_on_the_adapted_generator(server, client, meta: str) -> None:
    """With k = 1 both meta gradients give Adam's first step along the inner step's direction
    with the same learning rate (lr_g * k): the meta-generator lands where the adapted copy did."""
    teacher = ServedTeacher(client, "white")
    torch.manual_seed(0)
    gen_net = fd.MetaGenerator((1, 8, 8), nz=16, ngf=8)
    before = copy.deepcopy(gen_net)
    o = {**fd.DEFAULTS, "g_steps": 1, "nz": 16, "shift": 0, "flip": False, "bn_momentum": 0.0, "meta": meta}
    synth = fd.FastSynthesizer(teacher, gen_net, o, lr_g=1e-2, device="cpu")
    x, info = synth.synthesize(torch.arange(16) % 10, None, torch.Generator().manual_seed(0))
    assert x.shape == (16, 1, 8, 8) and 0 <= float(x.min()) and float(x.max()) <= 1 and math.isfinite(info["loss"])
    moved = 0
    for p0, p, fp in zip(before.parameters(), gen_net.parameters(), synth.last_fast.parameters()):
        torch.testing.assert_close(p, fp, rtol=0, atol=1e-6 if meta == "fomaml" else 2e-4)
        moved += int((p - p0).abs().gt(1e-3).sum())
    assert moved > 100


# -- (b) runs against the server: queries as counted there ---------------------------------------------
def params(m: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.parameters()]


def changed(before: list[torch.Tensor], m: nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in m.parameters()) and any(
        not torch.equal(a, b.detach()) for a, b in zip(before, m.parameters())
    )


@pytest.mark.parametrize("mode", ["client", "server"])
def test_deepinversion_run_counts_its_queries(server, client, mode: str) -> None:
    teacher = ServedTeacher(client, "white")
    torch.manual_seed(0)
    student = digits_cnn_student()
    before = params(student)
    cfg = DataFreeConfig(steps=2, batch_size=16, lr=1e-3, seed=1, eval_every=1)
    extra = {"adi_scale": 0.2, "clip": (0.0, 1.0), "jitter": 1} if mode == "client" else {}
    res = get("deepinversion").run(teacher, student, cfg, test=TEST, mode=mode, iterations=4, kd_steps=3, **extra)
    per_iteration = 2 if mode == "client" else 1  # BN + VJP calls here; one step of the server's loop
    assert (res.samples, res.gradient_samples) == (2 * 16, per_iteration * 16 * 4 * 2)
    assert (res.samples, res.gradient_samples) == (client.usage.samples, client.usage.gradient_samples)
    student.eval()
    with torch.no_grad():
        own = int((student(TEST.inputs).argmax(1) == TEST.labels).sum()) / len(TEST)
    assert changed(before, student) and res.test_acc == pytest.approx(own, abs=1e-6)  # the trained student's
    assert res.synthetic is not None and res.synthetic.shape == (16, 1, 8, 8) and torch.isfinite(res.synthetic).all()
    assert [s for s, _ in res.history] == [1, 2]
    if mode == "client":
        assert float(res.synthetic.min()) >= 0.0 and float(res.synthetic.max()) <= 1.0


def test_fast_dfkd_run_counts_its_queries_and_trains_both_nets(server, client, local: Teacher) -> None:
    teacher = ServedTeacher(client, "white")
    torch.manual_seed(0)
    student, generator = digits_cnn_student(), fd.MetaGenerator((1, 8, 8), nz=32, ngf=16)
    s0, g0 = params(student), params(generator)
    cfg = DataFreeConfig(steps=3, batch_size=16, lr=1e-3, generator_lr=5e-3, seed=2)
    res = get("fast-dfkd").run(teacher, student, cfg, test=TEST, generator=generator, nz=32, g_steps=2, warmup=1,
                               kd_steps=3, shift=1, flip=False)  # fmt: skip
    assert (res.samples, res.gradient_samples) == (3 * 16, 2 * 16 * 2 * 3)
    assert (res.samples, res.gradient_samples) == (client.usage.samples, client.usage.gradient_samples)
    assert changed(s0, student) and changed(g0, generator)
    assert res.synthetic is not None and torch.isfinite(res.synthetic).all()
    # one momentum state per inner step was kept on the server for this run
    states = server[1].endpoints["white"].bn_states
    ids = [k.partition("\x00")[2] for k in states._items]  # (each client's states are its own: identity, NUL, id)
    ours = [k for k in ids if k.startswith("fast-dfkd/")]
    assert len(ours) >= 2 and {k.rsplit("/", 1)[1] for k in ours} >= {"0", "1"}


# -- (c) tiers and options -------------------------------------------------------------------------------
def test_one_tier_below_white_is_refused_before_any_query(server, client) -> None:
    teacher = ServedTeacher(client, "features")
    assert DATAFREE["deepinversion"].tier == "white" and DATAFREE["fast-dfkd"].tier == "white"
    cfg = DataFreeConfig(steps=1, batch_size=4)
    for name, opts in [("deepinversion", {"iterations": 1}), ("deepinversion", {"mode": "server", "iterations": 1}),
                       ("fast-dfkd", {"g_steps": 1})]:  # fmt: skip
        with pytest.raises(ValueError, match="tier 'white'.*served at tier 'features'"):
            get(name).run(teacher, digits_cnn_student(), cfg, **opts)
    assert (client.usage.samples, client.usage.gradient_samples) == (0, 0)
    # and the server itself refuses what the methods would ask for
    for call in (lambda: di.bn_loss_and_logits(teacher, images(4)),
                 lambda: list(client.synthesize("features", 4, iterations=1))):  # fmt: skip
        with pytest.raises(TeacherRequestError) as err:
            call()
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_options_are_validated(server, client) -> None:
    teacher = ServedTeacher(client, "white")
    cfg = DataFreeConfig(steps=1, batch_size=4)
    with pytest.raises(TypeError, match="unknown option.*bogus"):
        get("deepinversion").run(teacher, digits_cnn_student(), cfg, bogus=1)
    with pytest.raises(TypeError, match="unknown option.*iterations"):
        get("fast-dfkd").run(teacher, digits_cnn_student(), cfg, iterations=3)
    with pytest.raises(ValueError, match="adi_scale only apply in mode='client'"):
        get("deepinversion").run(teacher, digits_cnn_student(), cfg, mode="server", adi_scale=0.2)
    with pytest.raises(ValueError, match="mode must be"):
        get("deepinversion").run(teacher, digits_cnn_student(), cfg, mode="local")
    with pytest.raises(ValueError, match="meta must be"):
        get("fast-dfkd").run(teacher, digits_cnn_student(), cfg, meta="maml")
    with pytest.raises(ValueError, match="targets must be"):
        get("deepinversion").run(teacher, digits_cnn_student(), cfg, targets="all")
    assert client.usage.gradient_samples == 0
    for module in (di, fd):
        assert set(module.DEMO) == {"config", "options"}
        DataFreeConfig(**module.DEMO["config"])
        assert set(module.DEMO["options"]) <= set(module.DEFAULTS)


# -- (d) above chance -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "cfg", "opts"),
    [
        ("deepinversion", {"steps": 6, "batch_size": 32, "lr": 3e-3},
         {"iterations": 20, "lr": 0.1, "bn_weight": 1.0, "kd_steps": 30, "clip": (0.0, 1.0), "jitter": 1,
          "adi_scale": 0.0}),
        ("fast-dfkd", {"steps": 15, "batch_size": 32, "lr": 3e-3, "generator_lr": 5e-3},
         {"g_steps": 5, "lr_z": 0.01, "warmup": 1, "kd_steps": 20, "shift": 1, "flip": False, "nz": 64, "ngf": 32,
          "student_schedule": "constant"}),
    ],
)  # fmt: skip
def test_student_beats_chance_on_digits(server, client, name: str, cfg: dict, opts: dict) -> None:
    teacher = ServedTeacher(client, "white")
    torch.manual_seed(0)
    res = get(name).run(teacher, digits_cnn_student(), DataFreeConfig(seed=0, **cfg), test=TEST, **opts)
    assert res.test_acc > 0.3, res.as_dict()
