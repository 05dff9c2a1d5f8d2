"""Highlight Every Step (``hes``) and FRSKD (``frskd``), the online methods with an extra teacher
network: each loss against a float64 reference written out here with loops over the formula,
the self-teacher's BiFPN wiring against a reference built from its parts, which network learns
from which term in a real step on digits, a few real training steps through ``train_online``,
and ``kd online hes --teacher``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from kd.cli import app
from kd.core.data import Dataset, load_dataset
from kd.models import digits_cnn_student
from kd.student_trainer.online import METHODS, method_options, train_online
from kd.student_trainer.online.frskd import SelfTeacher, frskd_loss
from kd.student_trainer.online.hes import attention_distance, hes_loss
from kd.student_trainer.train import StepContext, TrainConfig, seed_everything
from kd.teacher_server.loading import load_teacher

TRAIN = load_dataset("digits", "train")
_TEST = load_dataset("digits", "test")
TEST = Dataset("digits", "test", _TEST.inputs[:64], _TEST.labels[:64], 10)  # small: evaluation is not under test
D = torch.float64
B, K = 4, 6


# ----------------------------------------------------------------------------- plain float references
def _log_softmax(row: list[float], t: float = 1.0) -> list[float]:
    row = [v / t for v in row]
    top = max(row)
    lse = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - lse for v in row]


def _ce(z: torch.Tensor, y: torch.Tensor) -> float:
    return -sum(_log_softmax(row)[int(c)] for row, c in zip(z.tolist(), y)) / len(z)


def _kl_t(student: torch.Tensor, target: torch.Tensor, t: float) -> float:
    """T^2 * (1/B) sum_b sum_k p_t (log p_t - log p_s)."""
    total = 0.0
    for zs, zt in zip(student.tolist(), target.tolist()):
        ls, lt = _log_softmax(zs, t), _log_softmax(zt, t)
        total += sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))
    return t * t * total / len(student)


def _att(f: torch.Tensor) -> list[list[float]]:
    """Per sample: the mean over channels of F^2 at each position, divided by its L2 norm."""
    n, c, h, w = f.shape
    out = []
    for b in range(n):
        a = [sum(f[b, k, i, j].item() ** 2 for k in range(c)) / c for i in range(h) for j in range(w)]
        norm = math.sqrt(sum(v * v for v in a))
        out.append([v / norm for v in a])
    return out


def _at(maps: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    total = 0.0
    for f, g in zip(maps, targets):
        af, ag = _att(f.detach()), _att(g.detach())
        sq = [(u - v) ** 2 for rf, rg in zip(af, ag) for u, v in zip(rf, rg)]
        total += sum(sq) / len(sq)
    return total


def _t(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=D) * scale).requires_grad_(True)


def _grads(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, tensors, allow_unused=True, retain_graph=True)
    return [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, tensors)]


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-10, atol=1e-13)


# ----------------------------------------------------------------------------- loss formulas
def test_hes_loss_matches_reference_and_each_teacher_only_teaches() -> None:
    z_s, z_t = _t(B, K, seed=0, scale=2.0), _t(B, K, seed=1, scale=2.0)
    maps = [_t(B, 3, 4, 4, seed=2), _t(B, 5, 2, 2, seed=3)]
    expert = [_t(B, 7, 4, 4, seed=4), _t(B, 2, 2, 2, seed=5)]
    y = torch.tensor([0, 5, 2, 2])
    lam, beta = 0.3, 50.0
    got = hes_loss(z_s, z_t, maps, expert, y, logit_weight=lam, at_weight=beta)
    course = sum((a - b) ** 2 for rs, rt in zip(z_s.tolist(), z_t.tolist()) for a, b in zip(rs, rt)) / B
    ref = _ce(z_s.detach(), y) + _ce(z_t.detach(), y) + lam * course + beta * _at(maps, expert)
    assert float(got.detach()) == pytest.approx(ref, rel=1e-12)
    g_zt, *g_expert = _grads(got, [z_t, *expert])
    assert _close(g_zt, _grads(F.cross_entropy(z_t, y), [z_t])[0])  # the gradient block: labels only
    assert all(float(g.abs().sum()) == 0.0 for g in g_expert)  # the expert is a target
    (g_zs,) = _grads(got, [z_s])
    own = F.cross_entropy(z_s, y) + lam * (z_t.detach() - z_s).pow(2).sum(1).mean()
    assert _close(g_zs, _grads(own, [z_s])[0])
    assert all(float(g.abs().sum()) > 0 for g in _grads(got, maps))


def test_frskd_loss_matches_reference_and_the_self_teacher_learns_from_labels_only() -> None:
    z_s, z_t = _t(B, K, seed=10, scale=2.0), _t(B, K, seed=11, scale=2.0)
    maps = [_t(B, 3, 4, 4, seed=12), _t(B, 6, 4, 4, seed=13)]
    refined = [_t(B, 6, 4, 4, seed=14), _t(B, 12, 4, 4, seed=15)]
    y = torch.tensor([1, 1, 4, 0])
    alpha, beta, temp = 1.5, 70.0, 3.0
    got = frskd_loss(z_s, z_t, maps, refined, y, alpha=alpha, beta=beta, temperature=temp)
    ref = _ce(z_s.detach(), y) + _ce(z_t.detach(), y) + alpha * _kl_t(z_s.detach(), z_t.detach(), temp)
    ref += beta * _at(maps, refined)
    assert float(got.detach()) == pytest.approx(ref, rel=1e-12)
    g_zt, *g_ref = _grads(got, [z_t, *refined])
    assert _close(g_zt, _grads(F.cross_entropy(z_t, y), [z_t])[0])
    assert all(float(g.abs().sum()) == 0.0 for g in g_ref)
    own = F.cross_entropy(z_s, y) + alpha * temp**2 * F.kl_div(
        F.log_softmax(z_s / temp, 1), F.softmax(z_t.detach() / temp, 1), reduction="batchmean"
    )
    assert _close(_grads(got, [z_s])[0], _grads(own, [z_s])[0])


def test_losses_refuse_bad_input() -> None:
    z, y = _t(B, K, seed=20), torch.zeros(B, dtype=torch.long)
    with pytest.raises(ValueError, match="spatial size"):
        attention_distance([_t(B, 2, 4, 4, seed=21)], [_t(B, 2, 2, 2, seed=22)])
    with pytest.raises(ValueError, match="one target map per map"):
        attention_distance([_t(B, 2, 4, 4, seed=21)], [])
    with pytest.raises(ValueError, match="temperature"):
        frskd_loss(z, z, [], [], y, temperature=0.0)
    with pytest.raises(ValueError, match=">= 0"):
        hes_loss(z, z, [], [], y, logit_weight=-1.0)
    with pytest.raises(ValueError, match="attention_on"):
        METHODS["hes"].setup((64,), 10, width=8, branches=1, options=method_options("hes", {"attention_on": "both"}),
                             config=TrainConfig(), teacher=torch.nn.Identity())  # fmt: skip
    with pytest.raises(ValueError, match="no module"):
        METHODS["hes"].setup((64,), 10, width=8, branches=1, options=method_options("hes"), config=TrainConfig(),
                             teacher=torch.nn.Linear(64, 10))  # fmt: skip
    with pytest.raises(ValueError, match="needs a pretrained teacher"):
        train_online("hes", TRAIN, TEST, TrainConfig(epochs=1))
    with pytest.raises(ValueError, match="takes no pretrained teacher"):
        train_online("frskd", TRAIN, TEST, TrainConfig(epochs=1), teacher=torch.nn.Identity())


# ----------------------------------------------------------------------------- the self-teacher's wiring
def test_self_teacher_is_the_bifpn_top_down_then_bottom_up() -> None:
    """Three levels of 8x8, 4x4, 2x2 (strided pooling and resizing), rebuilt from the module's
    own blocks with the official wiring: a wrong input to a fusion, a missing ReLU or a wrong
    fusion normalisation changes the result."""
    torch.manual_seed(0)
    st = SelfTeacher([2, 3, 4], num_classes=5, width=2, depth=2).double().eval()
    for w in [*st.up_w, *st.down_w]:  # away from the all-ones start, one weight negative (ReLU'd to 0)
        w.data = torch.rand(w.shape, dtype=D) + 0.2
    st.down_w[0].data[1] = -0.5
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(2, c, s, s, generator=g, dtype=D) for c, s in ((2, 8), (3, 4), (4, 2))]
    refined, logits = st(feats)

    def fuse(w: torch.Tensor, xs: list[torch.Tensor]) -> torch.Tensor:
        ws = [max(float(v), 0.0) for v in w.detach()]
        return sum(v / (sum(ws) + 1e-6) * x for v, x in zip(ws, xs))

    def pool(x: torch.Tensor) -> torch.Tensor:  # 3x3 max, stride 2, "same": one zero column/row at the end
        return F.max_pool2d(F.pad(x, [0, 1, 0, 1]), 3, stride=2)

    relu = F.relu
    lat = [st.lat[i](relu(feats[i])) for i in range(3)]
    p2 = lat[2]

    def up2(x: torch.Tensor) -> torch.Tensor:  # nearest, twice the size
        return x.repeat_interleave(2, 2).repeat_interleave(2, 3)

    p1 = st.up_conv[1](fuse(st.up_w[1], [relu(lat[1]), st.up[1](up2(relu(p2)))]))
    p0 = st.up_conv[0](fuse(st.up_w[0], [relu(lat[0]), st.up[0](up2(relu(p1)))]))
    t0 = p0
    t1 = st.down_conv[0](fuse(st.down_w[0], [relu(st.lat2[0](relu(feats[1]))), relu(p1), st.down[0](pool(relu(t0)))]))
    t2 = st.down_conv[1](fuse(st.down_w[1], [relu(st.lat2[1](relu(feats[2]))), st.down[1](pool(relu(t1)))]))
    expect = [relu(t) for t in (t0, t1, t2)]
    assert [tuple(r.shape) for r in refined] == [(2, 4, 8, 8), (2, 6, 4, 4), (2, 8, 2, 2)]
    for r, e in zip(refined, expect):
        assert torch.allclose(r, e, rtol=1e-12, atol=1e-14)
    assert torch.allclose(logits, st.fc(expect[2].mean((2, 3))), rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- real steps on digits
@pytest.fixture(scope="module")
def expert(digits_cnn_spec) -> torch.nn.Module:
    return load_teacher("expert", digits_cnn_spec(2)).model


def _step_grads(loss: torch.Tensor, modules: dict[str, torch.nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    params = {(m, n): p for m, mod in modules.items() for n, p in mod.named_parameters()}
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True, retain_graph=True)
    out: dict[str, dict[str, torch.Tensor]] = {m: {} for m in modules}
    for (m, n), p, g in zip(params, params.values(), grads):
        out[m][n] = torch.zeros_like(p) if g is None else g
    return out


def _ctx(model: torch.nn.Module) -> StepContext:
    idx = torch.arange(32)
    x, y = TRAIN.get(idx), TRAIN.labels[idx]
    return StepContext(model=model, inputs=x, labels=y, teacher_logits=None, indices=idx, epoch=0, step=0,
                       config=TrainConfig())  # fmt: skip


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for n in a:
        assert torch.allclose(a[n], b[n], rtol=1e-5, atol=1e-7), n


@pytest.mark.parametrize("where", ["student", "scratch"])
def test_hes_step_the_scratch_teacher_and_the_student_learn_from_their_own_terms(expert, where: str) -> None:
    seed_everything(0)
    s = METHODS["hes"].setup((64,), 10, width=8, branches=1, config=TrainConfig(), teacher=expert,
                             options=method_options("hes", {"attention_on": where}))  # fmt: skip
    student, scratch = s.student, s.others["scratch_teacher"]
    assert [p.shape for p in student.parameters()] == [p.shape for p in digits_cnn_student().parameters()]
    ctx = _ctx(student)
    got = _step_grads(s.loss(ctx), {"student": student, "scratch": scratch})
    maps_s, z_s = student.forward_all(ctx.inputs)
    maps_t, z_t = scratch.forward_all(ctx.inputs)
    with torch.no_grad():
        ex = expert.layer1(ctx.inputs.reshape(-1, 1, 8, 8))
        ex_maps = [ex, expert.layer2(ex)]
    o = method_options("hes")
    at = o["at_weight"] * attention_distance(maps_s if where == "student" else maps_t, ex_maps)
    own_s = F.cross_entropy(z_s, ctx.labels) + o["logit_weight"] * (z_t.detach() - z_s).pow(2).sum(1).mean()
    own_t = F.cross_entropy(z_t, ctx.labels)
    if where == "student":
        own_s = own_s + at
    else:
        own_t = own_t + at
    _same(got["student"], _step_grads(own_s, {"student": student})["student"])
    _same(got["scratch"], _step_grads(own_t, {"scratch": scratch})["scratch"])
    assert float(at.detach()) > 0


def test_frskd_step_the_self_teacher_learns_from_labels_the_classifier_from_everything() -> None:
    seed_everything(0)
    s = METHODS["frskd"].setup((64,), 10, width=8, branches=1, options=method_options("frskd"), config=TrainConfig())
    student, teacher = s.student, s.others["self_teacher"]
    ctx = _ctx(student)
    got = _step_grads(s.loss(ctx), {"student": student, "teacher": teacher})
    maps, z_s = student.forward_all(ctx.inputs)
    refined, z_t = teacher(maps)
    o = method_options("frskd")
    # the self-teacher: its own CE only (the KL target and the refined maps are detached)
    _same(got["teacher"], _step_grads(F.cross_entropy(z_t, ctx.labels), {"t": teacher})["t"])
    # the classifier: everything, its stages also through the self-teacher's CE (the maps are not detached)
    temp = o["temperature"]
    kl = temp**2 * F.kl_div(F.log_softmax(z_s / temp, 1), F.softmax(z_t.detach() / temp, 1), reduction="batchmean")
    full = F.cross_entropy(z_s, ctx.labels) + F.cross_entropy(z_t, ctx.labels) + o["alpha"] * kl
    full = full + o["beta"] * attention_distance(maps, refined)
    _same(got["student"], _step_grads(full, {"s": student})["s"])
    no_teacher_ce = full - F.cross_entropy(z_t, ctx.labels)
    stage = _step_grads(no_teacher_ce, {"s": student})["s"]["stages.0.0.weight"]
    assert not torch.allclose(got["student"]["stages.0.0.weight"], stage, rtol=1e-3)


def _weights(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{k}.{n}": p.detach().clone() for k, m in modules.items() for n, p in m.named_parameters()}


@pytest.mark.parametrize("name", ["hes", "frskd"])
def test_a_few_real_training_steps_train_every_module_and_not_the_expert(expert, name: str) -> None:
    seed_everything(0)
    kwargs = {"teacher": expert} if name == "hes" else {}
    s = METHODS[name].setup((64,), 10, width=8, branches=3, options=method_options(name), config=TrainConfig(),
                            **kwargs)  # fmt: skip
    before = _weights({"student": s.student, **s.others})
    expert_before = _weights({"expert": expert})
    res = train_online(name, TRAIN, TEST, TrainConfig(epochs=2, batch_size=32), subset=torch.arange(64), **kwargs)
    after = _weights({"student": res.student, **res.others})
    assert after.keys() == before.keys()
    assert not [n for n in before if torch.equal(before[n], after[n])]  # same seed: same initial weights
    assert all(torch.equal(v, _weights({"expert": expert})[k]) for k, v in expert_before.items())
    assert all(math.isfinite(v) for v in res.loss_per_epoch)
    heads = {"hes": {"student", "scratch_teacher"}, "frskd": {"student", "self_teacher"}}[name]
    assert set(res.accuracies) == heads and res.ensemble_acc is None
    assert res.acc_per_epoch[-1] == res.accuracies["student"]  # the deployed head, evaluated every epoch


def test_kd_online_hes_takes_the_expert_from_teacher(tmp_path: Path, digits_cnn_spec) -> None:
    runner = CliRunner()
    val = tmp_path / "val.npz"  # a small evaluation set: evaluation is not what is tested here
    np.savez(val, x=TEST.inputs.numpy(), y=TEST.labels.numpy())
    out = runner.invoke(app, ["online", "hes", "--epochs", "1", "--labeled", "32", "--teacher", digits_cnn_spec(2),
                              "--val-dataset", f"npz:{val}", "--opt", "attention_on=scratch",
                              "--run-dir", str(tmp_path / "r")])  # fmt: skip
    assert out.exit_code == 0, out.output
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["method"] == "hes" and summary["options"]["attention_on"] == "scratch"
    assert set(summary["accuracies"]) == {"student", "scratch_teacher"}
    bad = runner.invoke(app, ["online", "hes", "--epochs", "1"])
    assert bad.exit_code == 2 and "needs a pretrained teacher" in bad.output
    bad = runner.invoke(app, ["online", "hes", "--epochs", "1", "--teacher", "kd.models:no_such_factory"])
    assert bad.exit_code != 0 and "no_such_factory" in bad.output
