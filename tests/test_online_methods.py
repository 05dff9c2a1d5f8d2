"""Online and peer distillation (kd.student_trainer.online): each loss against a float64
reference written out here with loops over the paper's formula (checked against the official
code, cited in each method's docstring), which terms carry gradients (the detached targets),
a few real training steps of each method on digits through ``train_student``, and ``kd online``."""

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
from kd.core.data import load_dataset
from kd.models import digits_cnn_student
from kd.student_trainer.online import METHODS, OnlineResult, method_options, train_online
from kd.student_trainer.online.common import sigmoid_rampup
from kd.student_trainer.online.dcm import dcm_loss
from kd.student_trainer.online.od_cheap import od_cheap_loss
from kd.student_trainer.online.oemc import oemc_loss
from kd.student_trainer.online.okddip import okddip_loss
from kd.student_trainer.online.one import one_loss
from kd.student_trainer.online.pcl import pcl_loss
from kd.student_trainer.train import TrainConfig, seed_everything

TRAIN = load_dataset("digits", "train")
TEST = load_dataset("digits", "test")
SUBSET = torch.arange(96)
D = torch.float64
B, K = 5, 7


# ----------------------------------------------------------------------------- plain float references
def _log_softmax(row: list[float], t: float = 1.0) -> list[float]:
    row = [v / t for v in row]
    top = max(row)
    lse = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - lse for v in row]


def _kl_t(student: torch.Tensor, target: torch.Tensor, t: float) -> float:
    """T^2 * mean over samples of sum_k p_t (log p_t - log p_s)."""
    total = 0.0
    for zs, zt in zip(student.tolist(), target.tolist()):
        ls, lt = _log_softmax(zs, t), _log_softmax(zt, t)
        total += sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))
    return t * t * total / len(student)


def _ce(z: torch.Tensor, y: torch.Tensor) -> float:
    return -sum(_log_softmax(row)[int(c)] for row, c in zip(z.tolist(), y)) / len(z)


def _logits(n: int, seed: int, scale: float = 2.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, K, generator=g, dtype=D) * scale).requires_grad_(True) for _ in range(n)]


def _labels(seed: int) -> torch.Tensor:
    return torch.randint(0, K, (B,), generator=torch.Generator().manual_seed(seed))


def _grads(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, tensors, allow_unused=True, retain_graph=True)
    return [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, tensors)]


def test_sigmoid_rampup_is_mean_teachers() -> None:
    assert sigmoid_rampup(0, 80) == pytest.approx(math.exp(-5.0), rel=1e-12)
    assert sigmoid_rampup(40, 80) == pytest.approx(math.exp(-5.0 * 0.25), rel=1e-12)
    assert sigmoid_rampup(80, 80) == 1.0 and sigmoid_rampup(200, 80) == 1.0
    assert sigmoid_rampup(0, 0) == 1.0


# ----------------------------------------------------------------------------- ONE
def test_one_loss_matches_reference_and_detaches_the_ensemble() -> None:
    z = _logits(3, 0)
    g_raw = torch.randn(B, 3, generator=torch.Generator().manual_seed(1), dtype=D).requires_grad_(True)
    gate = g_raw.softmax(1)
    y, t, w = _labels(2), 3.0, 0.37
    got = one_loss(z, gate, y, temperature=t, consistency_weight=w)
    gl = gate.tolist()
    ens = torch.tensor([[sum(gl[b][i] * z[i][b, k].item() for i in range(3)) for k in range(K)]
                        for b in range(B)], dtype=D)  # fmt: skip
    ref = sum(_ce(zi.detach(), y) for zi in z) + _ce(ens, y) + w * sum(_kl_t(zi.detach(), ens, t) for zi in z)
    assert float(got.detach()) == pytest.approx(ref, rel=1e-12)
    # the gate learns from the ensemble's CE only: the KL targets are constants
    ce_only = F.cross_entropy((gate.unsqueeze(-1) * torch.stack(z, 1)).sum(1), y)
    assert torch.allclose(_grads(got, [g_raw])[0], _grads(ce_only, [g_raw])[0], rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------- OKDDip
def _okddip_ref(z, leader, q, k, y, t, alpha, w) -> float:
    m = len(z)
    kl = 0.0
    for i in range(m):
        target = torch.zeros(B, K, dtype=D)
        for b in range(B):
            e = [sum(q[b, i, d].item() * k[b, j, d].item() for d in range(q.shape[2])) for j in range(m)]
            top = max(e)
            a = [math.exp(v - top) for v in e]
            a = [v / sum(a) for v in a]
            for j in range(m):
                target[b] += a[j] * z[j][b].detach()
        kl += _kl_t(z[i].detach(), target, t)
    group = sum(zi.detach() for zi in z) / m
    kl += _kl_t(leader.detach(), group, t)
    return sum(_ce(zi.detach(), y) for zi in z) + _ce(leader.detach(), y) + alpha * w * kl


@pytest.mark.parametrize("detach", [False, True])
def test_okddip_loss_matches_reference(detach: bool) -> None:
    z = _logits(3, 3)
    (leader,) = _logits(1, 4)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, 3, 2, generator=g, dtype=D).requires_grad_(True)
    k = torch.randn(B, 3, 2, generator=g, dtype=D).requires_grad_(True)
    y, t, alpha, w = _labels(6), 3.0, 0.8, 0.6
    got = okddip_loss(z, leader, q, k, y, temperature=t, alpha=alpha, consistency_weight=w, detach_targets=detach)
    assert float(got.detach()) == pytest.approx(_okddip_ref(z, leader, q, k, y, t, alpha, w), rel=1e-12)
    gq, gk = _grads(got, [q, k])
    # the official targets keep their graph: that is how the attention projections learn
    assert bool(gq.abs().sum() > 0 and gk.abs().sum() > 0) is (not detach)


# ----------------------------------------------------------------------------- PCL
def test_pcl_loss_matches_reference_and_its_teachers_are_constants() -> None:
    z, means = _logits(3, 7), _logits(3, 8)
    (ens,) = _logits(1, 9)
    y, t, w = _labels(10), 3.0, 0.45
    got = pcl_loss(z, ens, means, y, temperature=t, consistency_weight=w)
    ref = _ce(ens.detach(), y)
    for i, zi in enumerate(z):
        pm = sum(_kl_t(zi.detach(), means[j].detach(), t) for j in range(3) if j != i) / 2
        ref += _ce(zi.detach(), y) + w * _kl_t(zi.detach(), ens.detach(), t) + w * pm
    assert float(got.detach()) == pytest.approx(ref, rel=1e-12)
    g_ens, *g_means = _grads(got, [ens, *means])
    assert torch.allclose(g_ens, _grads(F.cross_entropy(ens, y), [ens])[0], rtol=1e-10, atol=1e-14)
    assert all(float(g.abs().sum()) == 0.0 for g in g_means)


# ----------------------------------------------------------------------------- DCM
def test_dcm_loss_matches_reference_and_each_side_learns_only_as_student() -> None:
    a, b = _logits(3, 11), _logits(3, 12)
    y, t, weight = _labels(13), 2.0, 0.7
    got = dcm_loss(a, b, y, temperature=t, weight=weight)
    ref = sum(_ce(z.detach(), y) for z in a + b)
    ref += weight * sum(_kl_t(za.detach(), zb.detach(), t) + _kl_t(zb.detach(), za.detach(), t) for za in a for zb in b)
    assert float(got.detach()) == pytest.approx(ref, rel=1e-12)
    # network A's gradient: its CE and the KLs where B teaches it (B's logits as constants)
    own_a = sum(F.cross_entropy(za, y) for za in a) + weight * sum(
        F.kl_div(F.log_softmax(za / t, 1), F.softmax(zb.detach() / t, 1), reduction="batchmean") * t * t
        for za in a for zb in b
    )  # fmt: skip
    for g, g_ref in zip(_grads(got, a), _grads(own_a, a)):
        assert torch.allclose(g, g_ref, rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------- OD with cheap convolutions
@pytest.mark.parametrize("reduction", ["mean", "batchmean"])
def test_od_cheap_loss_matches_reference_and_its_teacher_learns_from_the_kl(reduction: str) -> None:
    s = _logits(4, 16)
    (t,) = _logits(1, 17)
    y, temp = _labels(18), 4.0
    got = od_cheap_loss(s, t, y, temperature=temp, reduction=reduction)
    per_class = 1 / K if reduction == "mean" else 1.0  # the official F.kl_div default: mean over B * K
    ref = _ce(t.detach(), y) + sum(_ce(z.detach(), y) + per_class * _kl_t(z.detach(), t.detach(), temp) for z in s)
    assert float(got.detach()) == pytest.approx(ref, rel=1e-12)
    (g_t,) = _grads(got, [t])
    (g_ce,) = _grads(F.cross_entropy(t, y), [t])
    assert not torch.allclose(g_t, g_ce)  # the official teacher is not detached: the KL terms reach it
    (g_det,) = _grads(od_cheap_loss(s, t, y, temperature=temp, reduction=reduction, detach_teacher=True), [t])
    assert torch.allclose(g_det, g_ce, rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------- OEMC
def test_oemc_loss_matches_reference_and_its_targets_are_constants() -> None:
    z = _logits(3, 19)
    g = torch.Generator().manual_seed(20)
    f0 = torch.randn(B, 4, 3, 3, generator=g, dtype=D).requires_grad_(True)
    adapted = [torch.randn(B, 4, 3, 3, generator=g, dtype=D).requires_grad_(True) for _ in range(2)]
    y, t, a, b, c = _labels(21), 3.0, 0.6, 0.3, 0.2
    got = oemc_loss(z, adapted, f0, y, temperature=t, ce_weight=a, feature_weight=b, kl_weight=c)
    ens = sum(zi.detach() for zi in z) / 3
    flat0 = f0.flatten().tolist()
    mse = sum(sum((u - v) ** 2 for u, v in zip(m.flatten().tolist(), flat0)) / m.numel() for m in adapted)
    ref = a * sum(_ce(zi.detach(), y) for zi in z) + b * mse + c * sum(_kl_t(zi.detach(), ens, t) for zi in z)
    assert float(got.detach()) == pytest.approx(ref, rel=1e-12)
    (g_f0,) = _grads(got, [f0])
    assert float(g_f0.abs().sum()) == 0.0  # the uncompressed student's map is a target only
    # each student's gradient: its own CE and its KL to the constant ensemble (the ensemble is not trained)
    own = [a * F.cross_entropy(zi, y) + c * F.kl_div(F.log_softmax(zi / t, 1), F.softmax(ens / t, 1),
                                                     reduction="batchmean") * t * t for zi in z]  # fmt: skip
    for g_z, g_ref in zip(_grads(got, z), [_grads(o, [zi])[0] for o, zi in zip(own, z)]):
        assert torch.allclose(g_z, g_ref, rtol=1e-10, atol=1e-14)


def test_losses_refuse_bad_input() -> None:
    z = _logits(2, 14)
    y = _labels(15)
    with pytest.raises(ValueError, match="temperature"):
        one_loss(z, torch.full((B, 2), 0.5, dtype=D), y, temperature=0.0)
    with pytest.raises(ValueError, match="gate"):
        one_loss(z, torch.full((B, 3), 1 / 3, dtype=D), y)
    with pytest.raises(ValueError, match="temporal mean"):
        pcl_loss(z, z[0], z[:1], y)
    with pytest.raises(ValueError, match="no option"):
        method_options("one", {"tmperature": 2.0})
    with pytest.raises(ValueError, match="temperature"):
        method_options("pcl", {"temperature": -1.0})
    with pytest.raises(ValueError, match="reduction"):
        od_cheap_loss(z, z[0], y, reduction="sum")
    with pytest.raises(ValueError, match="adapted map"):
        oemc_loss(z, [], torch.zeros(B, 1, 1, 1, dtype=D), y)
    with pytest.raises(ValueError, match="unknown online method"):
        method_options("dml", {})


# ----------------------------------------------------------------------------- real training runs
def _initial(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The weights ``train_online`` starts from (same seed, same construction order)."""
    seed_everything(seed)
    s = METHODS[name].setup((64,), 10, width=8, branches=3, options=method_options(name), config=TrainConfig())
    modules = {"student": s.student, **s.others}
    return {f"{k}.{n}": p.detach().clone() for k, m in modules.items() for n, p in m.named_parameters()}


def _run(name: str, **options: object) -> OnlineResult:
    """Three epochs on 96 samples; no ramp-up (a constant KL weight), so the losses compare."""
    before = _initial(name)
    if "rampup" in METHODS[name].OPTIONS:
        options = {"rampup": 0.0, **options}
    res = train_online(name, TRAIN, TEST, TrainConfig(epochs=3, batch_size=32), subset=SUBSET, options=options)
    assert all(math.isfinite(v) for v in res.loss_per_epoch), res.loss_per_epoch
    assert res.loss_per_epoch[-1] < res.loss_per_epoch[0], res.loss_per_epoch
    after = {f"{k}.{n}": p for k, m in {"student": res.student, **res.others}.items() for n, p in m.named_parameters()}
    assert after.keys() == before.keys()
    unchanged = [n for n in before if torch.equal(before[n], after[n].detach().cpu())]
    assert not unchanged, f"{name}: these weights did not train: {unchanged}"
    assert res.ensemble_acc in res.accuracies.values() and res.best_branch in res.accuracies
    assert res.best_branch_acc == max(v for k, v in res.accuracies.items() if "ensemble" not in k)
    return res


def test_one_trains_every_branch_and_the_gate() -> None:
    res = _run("one")
    assert set(res.accuracies) == {"branch0", "branch1", "branch2", "ensemble"}
    assert res.acc_per_epoch[-1] == res.accuracies["ensemble"]  # the deployed head, evaluated every epoch


def test_okddip_trains_peers_leader_and_attention() -> None:
    res = _run("okddip")
    assert set(res.accuracies) == {"peer0", "peer1", "peer2", "leader", "ensemble"}
    assert res.acc_per_epoch[-1] == res.accuracies["leader"]


def test_pcl_trains_branches_ensemble_head_and_temporal_mean() -> None:
    res = _run("pcl", ema_decay=0.9)
    assert res.acc_per_epoch[-1] == res.accuracies["mean_branch0"]
    assert res.ensemble_acc == res.accuracies["mean_ensemble"]


def test_dcm_trains_both_networks_and_their_auxiliary_classifiers() -> None:
    res = _run("dcm")
    assert set(res.accuracies) == {"a_aux0", "a_main", "b_aux0", "b_main", "ensemble"}
    assert res.acc_per_epoch[-1] == res.accuracies["a_main"]
    # the deployed main path is digits_cnn_student's architecture (the auxiliary branch is dropped)
    main = [*res.student.stages.parameters(), *res.student.head.parameters()]
    assert [p.shape for p in main] == [p.shape for p in digits_cnn_student().parameters()]


def test_od_cheap_trains_every_cheap_student_and_the_online_teacher() -> None:
    res = _run("od-cheap")
    assert set(res.accuracies) == {"student0", "student1", "student2", "teacher_ensemble"}
    assert res.acc_per_epoch[-1] == res.accuracies["student0"]


def test_oemc_trains_every_student_the_common_base_and_the_adaptation_layers() -> None:
    res = _run("oemc")
    assert set(res.accuracies) == {"student0", "student1", "student2", "ensemble"}
    assert [s.layer2[0].out_channels for s in res.student.students] == [16, 10, 5]  # floor((n - j)/n * 16)
    assert res.acc_per_epoch[-1] == res.accuracies["student0"]


def test_kd_online_cli_on_digits_and_on_an_npz_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path / "kd-cache"))
    runner = CliRunner()
    out = runner.invoke(app, ["online", "one", "--epochs", "1", "--labeled", "64", "--run-dir", str(tmp_path / "r")])
    assert out.exit_code == 0, out.output
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["method"] == "one" and set(summary["accuracies"]) == {"branch0", "branch1", "branch2", "ensemble"}
    saved = json.loads((tmp_path / "r" / "online.json").read_text())
    assert saved["accuracies"] == summary["accuracies"] and (tmp_path / "r" / "metrics.csv").exists()
    # any dataset URI: 3 x 6 x 6 float arrays, 4 classes
    g = np.random.default_rng(0)
    for split, n in (("train", 48), ("val", 24)):
        y = np.arange(n) % 4
        x = (g.normal(size=(n, 3, 6, 6)) + y[:, None, None, None]).astype(np.float32)
        np.savez(tmp_path / f"{split}.npz", x=x, y=y)
    out = runner.invoke(app, ["online", "dcm", "--epochs", "1", "--dataset", f"npz:{tmp_path / 'train.npz'}",
                              "--val-dataset", f"npz:{tmp_path / 'val.npz'}"])  # fmt: skip
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout.strip().splitlines()[-1])["method"] == "dcm"
    bad = runner.invoke(app, ["online", "pcl", "--epochs", "1", "--opt", "ema_decay=1.5"])
    assert bad.exit_code == 2 and "ema_decay" in bad.output
    bad = runner.invoke(app, ["online", "dml", "--epochs", "1"])
    assert bad.exit_code == 2 and "unknown online method 'dml'" in bad.output
