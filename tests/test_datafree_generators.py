"""Generator-based data-free methods against a real teacher server: DAFL (Chen et al. 2019),
DFAD (Fang et al. 2019) and ZSKT (Micaelli & Storkey 2019). Loss terms are checked against
independent float64 computations, gradients through the served teacher against local
autograd, and short runs against the server for accounting, learning and tier refusal."""

from __future__ import annotations

import inspect
import math
import uuid

import grpc
import pytest
import torch

from kd.core.data import load_dataset
from kd.models import digits_cnn_student
from kd.student_trainer.datafree import DATAFREE, dafl, dfad, get, zskt
from kd.student_trainer.datafree.common import DataFreeConfig, Generator, ServedTeacher
from kd.student_trainer.train import seed_everything
from kd.teacher_server.client import TeacherClient, TeacherRequestError
from kd.teacher_server.loading import Teacher, load_teacher
from kd.teacher_server.server import TeacherOptions, start_server

TRAIN = load_dataset("digits", "train")
TEST = load_dataset("digits", "test")
MODULES = {"dafl": dafl, "dfad": dfad, "zskt": zskt}


@pytest.fixture(scope="module")
def cnn_spec(digits_cnn_spec) -> str:
    return digits_cnn_spec(5)


@pytest.fixture(scope="module")
def local(cnn_spec: str) -> Teacher:
    return load_teacher("local", cnn_spec)


@pytest.fixture(scope="module")
def address(cnn_spec: str) -> str:
    """One server, the same weights under one name per tier (white, features)."""
    teachers = [load_teacher(tier, cnn_spec) for tier in ("white", "features")]
    running = start_server(teachers, options={t.name: TeacherOptions(access=t.name, max_queue_delay_us=0)
                                              for t in teachers})  # fmt: skip
    yield f"127.0.0.1:{running.port}"
    running.stop(grace=1)


@pytest.fixture()
def client(address: str):
    with TeacherClient(address, client_id=f"dfg-{uuid.uuid4().hex[:8]}") as c:
        yield c


def logits64(n: int = 6, k: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3


def softmax64(row: list[float], t: float = 1.0) -> list[float]:
    m = max(row)
    e = [math.exp((v - m) / t) for v in row]
    s = sum(e)
    return [v / s for v in e]


# -- (a) loss terms against independent float64 computations ----------------------------------
def test_dafl_loss_terms_match_their_definitions() -> None:
    y = logits64()
    feat = torch.randn(6, 64, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rows = y.tolist()
    oh = sum(-math.log(softmax64(r)[r.index(max(r))]) for r in rows) / len(rows)
    probs = [softmax64(r) for r in rows]
    mean_p = [sum(p[k] for p in probs) / len(probs) for k in range(10)]
    ie = sum(p * math.log10(p) for p in mean_p)
    act = -sum(abs(v) for v in feat.flatten().tolist()) / feat.numel()
    assert float(dafl.one_hot_loss(y)) == pytest.approx(oh, rel=1e-10)
    assert float(dafl.information_entropy_loss(y)) == pytest.approx(ie, rel=1e-10)
    assert float(dafl.activation_loss(feat)) == pytest.approx(act, rel=1e-10)
    total, terms = dafl.generator_loss(y, feat, oh=1.0, ie=5.0, a=0.1)
    assert float(total) == pytest.approx(oh + 5 * ie + 0.1 * act, rel=1e-10)
    assert set(terms) == {"oh", "ie", "a"}
    # a uniform batch-mean softmax is the minimum, -log10(K)
    assert float(dafl.information_entropy_loss(torch.zeros(4, 10, dtype=torch.float64))) == pytest.approx(-1.0)


def test_dfad_mae_matches_its_definition() -> None:
    s, t = logits64(seed=2), logits64(seed=3)
    want = sum(abs(a - b) for ra, rb in zip(s.tolist(), t.tolist()) for a, b in zip(ra, rb)) / s.numel()
    assert float(dfad.mae(s, t)) == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_zskt_divergence_matches_its_definition(temperature: float) -> None:
    s, t = logits64(seed=4), logits64(seed=5)
    kl = 0.0
    for rs, rt in zip(s.tolist(), t.tolist()):
        ps, pt = softmax64(rs, temperature), softmax64(rt, temperature)
        kl += sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, pt))
    assert float(zskt.divergence(s, t, temperature)) == pytest.approx(kl / s.numel(), rel=1e-9)
    assert float(zskt.divergence(t, t, temperature)) == pytest.approx(0.0, abs=1e-12)


def attention64(f: torch.Tensor) -> list[list[float]]:
    """Zagoruyko & Komodakis: mean over channels of the squared map, rows L2-normalised."""
    n, c, h, w = f.shape
    out = []
    for i in range(n):
        a = [sum(f[i, ch, y, x].item() ** 2 for ch in range(c)) / c for y in range(h) for x in range(w)]
        norm = math.sqrt(sum(v * v for v in a))
        out.append([v / norm for v in a])
    return out


def test_zskt_attention_loss_matches_its_definition() -> None:
    gen = torch.Generator().manual_seed(6)
    s1, s2 = torch.randn(3, 4, 3, 3, generator=gen, dtype=torch.float64), torch.randn(3, 2, 2, 2, generator=gen,
                                                                                     dtype=torch.float64)  # fmt: skip
    t1, t2 = torch.randn(3, 7, 3, 3, generator=gen, dtype=torch.float64), torch.randn(3, 5, 2, 2, generator=gen,
                                                                                     dtype=torch.float64)  # fmt: skip
    want = 0.0
    for s, t in ((s1, t1), (s2, t2)):
        a_s, a_t = attention64(s), attention64(t)
        diffs = [(x - y) ** 2 for rs, rt in zip(a_s, a_t) for x, y in zip(rs, rt)]
        want += sum(diffs) / len(diffs)
    teacher_att = [torch.tensor(attention64(t1), dtype=torch.float64), torch.tensor(attention64(t2),
                                                                                    dtype=torch.float64)]  # fmt: skip
    assert float(zskt.attention_loss([s1, s2], teacher_att)) == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match="same spatial size"):
        zskt.attention_loss([s1], [teacher_att[1]])


def test_served_attention_feature_is_the_one_the_student_side_computes(client: TeacherClient, local: Teacher) -> None:
    """ZSKT asks the teacher for ``layer2@at`` (computed server-side) and reduces the
    student's map locally: both must be the same function of the map."""
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    served = client.infer("white", x, features=["layer2@at"])["feature/layer2@at"]
    with torch.no_grad():
        f = local.model.layer2(local.model.layer1(x)).double()
    torch.testing.assert_close(served.double(), torch.tensor(attention64(f), dtype=torch.float64), rtol=1e-4,
                               atol=1e-6)  # fmt: skip


def test_dafl_generator_gradient_through_the_server_equals_local_autograd(client: TeacherClient, local: Teacher):
    """DAFL's generator loss uses logits and the penultimate feature; both gradients ride
    on the input-gradient RPC and must equal autograd through the teacher itself."""
    teacher = ServedTeacher(client, "white")
    assert dafl.penultimate_layer(teacher) == "pool"
    x0 = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(8))
    x = x0.clone().requires_grad_(True)
    logits, feats = teacher(x, features=("pool",))
    dafl.generator_loss(logits, feats["pool"], oh=1.0, ie=5.0, a=0.1)[0].backward()

    seen = {}
    hook = local.model.pool.register_forward_hook(lambda _m, _i, out: seen.setdefault("pool", out))
    xl = x0.clone().requires_grad_(True)
    try:
        lo = local.model(xl)
    finally:
        hook.remove()
    dafl.generator_loss(lo, seen["pool"], oh=1.0, ie=5.0, a=0.1)[0].backward()
    assert float(xl.grad.abs().max()) > 0
    torch.testing.assert_close(x.grad, xl.grad, rtol=1e-4, atol=1e-6)


def test_dfad_generator_gradient_through_the_server_equals_local_autograd(client: TeacherClient, local: Teacher):
    teacher = ServedTeacher(client, "white")
    seed_everything(1)
    student = digits_cnn_student()
    x0 = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    x = x0.clone().requires_grad_(True)
    (-dfad.mae(student(x), teacher(x))).backward()
    xl = x0.clone().requires_grad_(True)
    (-dfad.mae(student(xl), local.model(xl))).backward()
    torch.testing.assert_close(x.grad, xl.grad, rtol=1e-4, atol=1e-6)


# -- (b) short runs against the real server ---------------------------------------------------
RUNS = {
    # method: (config, options, expected samples per step, expected gradient samples per step)
    "dafl": (dict(steps=4, batch_size=16), dict(nz=16, generator_width=8), 16, 16),
    "dfad": (dict(steps=3, batch_size=16), dict(k=2, nz=16, generator_width=8), 3 * 16, 16),
    "zskt": (dict(steps=3, batch_size=16), dict(ns=2, ng=2, nz=16, generator_width=8), 3 * 16, 2 * 16),
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_short_run_trains_both_networks_and_reports_the_servers_count(client: TeacherClient, name: str) -> None:
    cfg, opts, per_step, grads_per_step = RUNS[name]
    teacher = ServedTeacher(client, "white")
    seed_everything(0)
    student = digits_cnn_student()
    generator = Generator(teacher.input_shape, nz=opts["nz"], width=opts["generator_width"])
    s0 = {k: v.clone() for k, v in student.state_dict().items()}
    g0 = {k: v.clone() for k, v in generator.state_dict().items()}
    seen: list[tuple[int, dict[str, float]]] = []
    config = DataFreeConfig(lr=1e-2, generator_lr=1e-2, **cfg)
    result = get(name).run(teacher, student, config, test=TEST, generator=generator,
                           callback=lambda step, losses: seen.append((step, losses)), **opts)  # fmt: skip
    assert [s for s, _ in seen] == list(range(cfg["steps"]))
    assert all(math.isfinite(v) for _, losses in seen for v in losses.values())
    assert {"generator", "student"} <= set(seen[0][1])
    for k, v in student.state_dict().items():
        if v.is_floating_point():
            assert not torch.equal(v, s0[k]), f"student {k} did not change"
    for k in ("l1.weight", "blocks.2.weight"):
        assert not torch.equal(generator.state_dict()[k], g0[k]), f"generator {k} did not change"
    # the reported accuracy is the trained student's own on the test split
    assert result.method == name and result.test_acc == pytest.approx(accuracy_on_test(student), abs=1e-6)
    assert result.synthetic is not None and result.synthetic.shape[1:] == (1, 8, 8)
    # The queries the run reports are what the server counted for this client.
    assert result.samples == client.usage.samples == cfg["steps"] * per_step > 0
    assert result.gradient_samples == client.usage.gradient_samples == cfg["steps"] * grads_per_step > 0


@torch.no_grad()
def accuracy_on_test(model: torch.nn.Module) -> float:
    model.eval()
    return int((model(TEST.inputs).argmax(1) == TEST.labels).sum()) / len(TEST)


def local_objective(name: str, local: Teacher, student, x: torch.Tensor) -> float:
    """What each method's generator optimises, evaluated with the local copy of the teacher."""
    seen = {}
    hook = local.model.pool.register_forward_hook(lambda _m, _i, out: seen.setdefault("pool", out))
    try:
        with torch.no_grad():
            t = local.model(x)
            if name == "dafl":  # minimised
                return float(dafl.generator_loss(t, seen["pool"], oh=1.0, ie=5.0, a=0.1)[0])
            s = student(x)
    finally:
        hook.remove()
    return -float(dfad.mae(s, t)) if name == "dfad" else -float(zskt.divergence(s, t))  # maximised: negate


@pytest.mark.parametrize("name", sorted(RUNS))
def test_the_generator_moves_its_objective_the_right_way(client: TeacherClient, local: Teacher, name: str) -> None:
    """With the student frozen (lr 0), ten generator steps lower the generator's loss on a
    fixed batch of codes: DAFL's L_G, DFAD's -MAE, ZSKT's -KL."""
    _, opts, _, _ = RUNS[name]
    teacher = ServedTeacher(client, "white")
    seed_everything(0)
    student = digits_cnn_student()
    generator = Generator(teacher.input_shape, nz=16, width=8)
    z = torch.randn(64, 16, generator=torch.Generator().manual_seed(10))
    before = local_objective(name, local, student, generator(z))
    config = DataFreeConfig(steps=10, batch_size=32, lr=0.0, generator_lr=2e-2)
    get(name).run(teacher, student, config, generator=generator, **{**opts, "nz": 16, "generator_width": 8})
    after = local_objective(name, local, student, generator(z))
    assert after < before - 1e-3, (before, after)


def test_zskt_attention_term_is_on_by_default_and_off_with_beta_zero(client: TeacherClient) -> None:
    teacher = ServedTeacher(client, "white")
    student = digits_cnn_student()
    assert zskt.default_pairs(teacher, student) == [("layer1", "layer1"), ("layer2", "layer2")]
    for beta, positive in ((250.0, True), (0.0, False)):
        seen: list[dict[str, float]] = []
        get("zskt").run(teacher, student, DataFreeConfig(steps=1, batch_size=8), ns=1, nz=8, generator_width=8,
                        beta=beta, callback=lambda _s, losses, seen=seen: seen.append(losses))  # fmt: skip
        assert (seen[0]["attention"] > 0) is positive
        assert seen[0]["student"] == pytest.approx(seen[0]["kl"] + beta * seen[0]["attention"], rel=1e-5)


# -- (c) tiers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(RUNS))
def test_each_method_refuses_a_teacher_one_tier_below_white(client: TeacherClient, name: str) -> None:
    assert DATAFREE[name].tier == "white"
    cfg, opts, _, _ = RUNS[name]
    teacher = ServedTeacher(client, "features")
    with pytest.raises(ValueError, match="needs a teacher served at access tier 'white'"):
        get(name).run(teacher, digits_cnn_student(), DataFreeConfig(**cfg), **opts)
    assert client.usage.samples == 0 and client.usage.gradient_samples == 0  # refused before any query
    # And the server itself refuses the input gradient the method needs at that tier.
    teacher.access = "white"  # claim more than granted: the server has the last word
    with pytest.raises(TeacherRequestError) as err:
        get(name).run(teacher, digits_cnn_student(), DataFreeConfig(**cfg), **opts)
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert client.usage.gradient_samples == 0


@pytest.mark.parametrize("name", sorted(RUNS))
def test_unknown_options_and_bad_layers_are_refused_clearly(client: TeacherClient, name: str) -> None:
    teacher = ServedTeacher(client, "white")
    with pytest.raises(TypeError, match=f"{name}: unknown option\\(s\\) nope; known: "):
        get(name).run(teacher, digits_cnn_student(), DataFreeConfig(steps=1), nope=1)
    bad, why = {"dafl": ({"feature": "pool@at"}, "must be a layer of teacher"), "dfad": ({"k": 0}, "k .* must be >= 1"),
                "zskt": ({"attention": [("nope", "layer2")]}, "has no layer 'nope'")}[name]  # fmt: skip
    with pytest.raises(ValueError, match=why):
        get(name).run(teacher, digits_cnn_student(), DataFreeConfig(steps=1), **bad)
    assert client.usage.samples == 0


@pytest.mark.parametrize("name", sorted(RUNS))
def test_demo_settings_are_valid(name: str) -> None:
    demo = MODULES[name].DEMO
    DataFreeConfig(**demo["config"])
    params = inspect.signature(get(name).run).parameters
    assert set(demo["options"]) <= {p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY}


# -- (d) learning ------------------------------------------------------------------------------
def test_zskt_student_beats_chance_on_digits(client: TeacherClient) -> None:
    """40 pseudo-batches (~4 s of CPU): well above the 10% of chance on the real test set.
    (DAFL and DFAD need several hundred steps on digits; see their DEMO settings.)"""
    teacher = ServedTeacher(client, "white")
    seed_everything(0)
    config = DataFreeConfig(steps=40, batch_size=64, lr=1e-2, generator_lr=1e-3, temperature=1.0)
    options = dict(ns=10, attention=[("layer2", "layer2")], nz=64, generator_width=32, input_mean=0.3,
                   input_std=0.38, clamp=(0.0, 1.0))  # fmt: skip
    result = get("zskt").run(teacher, digits_cnn_student(), config, test=TEST, **options)
    assert result.test_acc > 0.2, result.as_dict()
