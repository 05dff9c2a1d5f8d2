"""kd explain (Cheng et al. 2020): the sigma optimisation against its closed form on a linear
layer (float64), the concept counts and lambda on a constructed entropy map, D_mean / D_std /
rho on constructed checkpoints, and the CLI on small saved models."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from kd.cli import app
from kd.explain import (
    EpochSaver,
    ExplainConfig,
    concept_counts,
    digits_foreground,
    explain_specs,
    feature_fn,
    feature_variance,
    learning_metrics,
    load_checkpoints,
    pixel_entropy,
    stability,
    weight_path,
)
from kd.models import digits_student


def test_entropy_matches_the_closed_form_on_a_linear_layer() -> None:
    # f(x) = W x + c (module "0" of the model): E||f(x + sigma*eps) - f(x)||^2 = sum_i sigma_i^2 ||W_i||^2,
    # so the Lagrangian's optimum is sigma_i^2 = lam * delta^2 / (2 ||W_i||^2) for every image.
    w = np.array([[1.0, 0.5, 0.0, 2.0, 0.1, 0.3], [0.0, 1.0, 0.2, 0.0, 0.1, 3.0], [0.5, 0.0, 1.0, 0.0, 0.2, 0.0]])
    model = nn.Sequential(nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(w))
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(4, 6)))
    f = feature_fn(model, "0")
    # delta_f^2, independently: total population variance of W x + c over the images.
    feats = x.numpy() @ w.T + model[0].bias.numpy()
    delta2 = float(((feats - feats.mean(0)) ** 2).mean(0).sum())
    assert feature_variance(f, x) == pytest.approx(delta2, rel=1e-12)
    cfg = ExplainConfig(lam=0.05, sigma_max=100.0, samples=64, steps=400, lr=0.05)
    H = pixel_entropy(f, x, cfg).numpy()
    ref = 0.5 * np.log(cfg.lam * delta2 / (2 * (w**2).sum(0))) + 0.5 * math.log(2 * math.pi * math.e)
    assert ref.max() - ref.min() > 2.0  # the pixels differ: a flat answer cannot pass
    assert np.abs(H.mean(0) - ref).max() < 0.03, (H.mean(0), ref)
    assert np.abs(H - ref).max() < 0.08


def test_default_layer_is_the_last_linears_input() -> None:
    model = digits_student()
    x = torch.rand(3, 64)
    got = feature_fn(model)(x)
    assert torch.equal(got, torch.relu(model[0](x)))
    with pytest.raises(ValueError, match="no module 'nope'"):
        feature_fn(model, "nope")


def test_concepts_and_lambda_on_a_constructed_entropy_map() -> None:
    fg = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0]] * 3, dtype=torch.bool)
    H = torch.tensor(
        [
            [0.0, 3.0, 1.0, 5.0, 5.0, 5.0, 2.0, 5.0],  # H_bg 4.25, cut 3.25: fg 0,3,1 -> 3; bg 2 -> 1
            [4.0, 4.0, 1.0, 4.0, 4.0, 2.0, 2.0, 4.0],  # H_bg 3.0, cut 2.0: fg 1 -> 1; bg none (2.0 is not < 2.0)
            [5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0],  # no concepts: left out of lambda
        ]
    )
    res = concept_counts(H, fg, b=1.0)
    assert res["n_fg_per_image"] == [3, 1, 0]
    assert res["n_bg_per_image"] == [1, 0, 0]
    assert res["n_fg"] == pytest.approx(4 / 3)
    assert res["n_bg"] == pytest.approx(1 / 3)
    assert res["lambda_ratio"] == pytest.approx((0.75 + 1.0) / 2)
    assert res["images_without_concepts"] == 1
    with pytest.raises(ValueError, match="no background pixel"):
        concept_counts(H, torch.ones_like(fg), b=1.0)


def test_digits_foreground_is_the_class_mean_ink() -> None:
    train_x = torch.tensor([[0.0, 0.2, 1.0], [0.0, 0.4, 1.0], [1.0, 0.0, 0.0]])
    train_y = torch.tensor([0, 0, 1])
    fg = digits_foreground(train_x, train_y, torch.tensor([1, 0]), threshold=0.25)
    assert fg.tolist() == [[True, False, False], [False, True, True]]  # class 0's mean: 0, 0.3, 1


def _state(w: list[float], bias: float) -> dict[str, torch.Tensor]:
    return {"0.weight": torch.tensor([w]), "0.bias": torch.tensor([bias])}


def test_learning_metrics_on_constructed_checkpoints(tmp_path: Path) -> None:
    # ||w_0|| = ||(3, 4, 0)|| = 5; steps of length 5, 10 and 0 -> path 0, 1, 3, 3.
    states = [_state([3, 4], 0), _state([8, 4], 0), _state([8, 4], 10), _state([8, 4], 10)]
    for epoch, st in zip([0, 10, 20, 30], states):
        save_file(st, str(tmp_path / f"epoch_{epoch:04d}.safetensors"))
    (tmp_path / "notes.txt").write_text("ignored")
    loaded = load_checkpoints(tmp_path)
    assert [e for e, _ in loaded] == [0, 10, 20, 30]
    path = weight_path([s for _, s in loaded], ["0.weight", "0.bias"])
    assert path == pytest.approx([0.0, 1.0, 3.0, 3.0])
    # Foreground concept counts per epoch (rows) and image (columns); epoch 0 is never m_x.
    n_fg = torch.tensor([[9, 9, 9], [5, 1, 1], [2, 4, 3], [2, 3, 3]])
    res = learning_metrics(path, n_fg)  # m_x = 1, 2, 2 (first max) -> D = 1, 3, 3
    assert res["D_mean"] == pytest.approx(7 / 3)
    assert res["D_std"] == pytest.approx(statistics.pstdev([1.0, 3.0, 3.0]))
    assert res["m_hat_mean"] == pytest.approx(5 / 3)
    with pytest.raises(ValueError, match="need the same"):
        learning_metrics(path[:3], n_fg)


def test_rho_on_constructed_concept_sets() -> None:
    t, f_ = True, False
    masks = torch.tensor(
        [
            [[t, t, t], [t, t, t], [t, t, t]],  # epoch 0: not counted
            [[t, f_, f_], [f_, f_, f_], [f_, f_, f_]],
            [[f_, t, f_], [f_, t, f_], [f_, f_, f_]],
            [[f_, t, f_], [f_, t, t], [f_, f_, f_]],
        ]
    )
    res = stability(masks)  # image 0: |{1}| / |{0, 1}|; image 1: |{1, 2}| / |{1, 2}|; image 2: empty union
    assert res["rho"] == pytest.approx((0.5 + 1.0) / 2)
    assert res["images_without_concepts_ever"] == 1


@pytest.fixture(scope="module")
def saved_students(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from kd.core.data import load_dataset
    from kd.student_trainer.train import Hooks, TrainConfig, seed_everything, train_student

    root = tmp_path_factory.mktemp("explain_models")
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    seed_everything(0)
    model = digits_student()
    saver = EpochSaver(model, root / "run", every=2, last=3)
    saver.save_initial()
    train_student(model, train, test, TrainConfig(method="ce", epochs=3), subset=torch.arange(200),
                  hooks=Hooks(on_epoch=saver))  # fmt: skip
    return root / "run", root / "run" / "epoch_0003.safetensors"


def test_epoch_saver_keeps_the_epochs_it_is_asked_for(saved_students: tuple[Path, Path]) -> None:
    folder, last = saved_students
    assert sorted(p.name for p in folder.iterdir()) == [f"epoch_{e:04d}.safetensors" for e in (0, 2, 3)]
    (epoch, state), *_ = load_checkpoints(last)
    assert epoch == -1 and set(state) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_cli_explains_saved_models(saved_students: tuple[Path, Path], tmp_path: Path) -> None:
    folder, last = saved_students
    out = tmp_path / "out"
    student = "kd.models:digits_student"
    args = ["explain", "--out", str(out), "--images", "12", "--steps", "100", "--samples", "4",
            "--model", f"run={student}@{folder}", "--model", f"final={student}@{last}"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    saved = json.loads((out / "results.json").read_text())
    run = saved["models"]["run"]
    assert run["epochs"] == [0, 2, 3] and "D_mean" in run and "rho" in run
    assert run["n_fg"] > 0 and not math.isnan(run["rho"])  # concepts found: the metrics are defined
    assert "D_mean" not in saved["models"]["final"]  # one checkpoint: concept counts only
    assert (out / "run.png").stat().st_size > 0 and (out / "final.png").stat().st_size > 0
    # The CLI passes its options through: the same call in process gives the same numbers.
    cfg = ExplainConfig(images=12, steps=100, samples=4)
    direct = explain_specs({"run": f"kd.models:digits_student@{folder}"}, cfg)
    assert json.dumps(direct["run"], sort_keys=True) == json.dumps(run, sort_keys=True)
    # The last checkpoint of the folder is the file: the same concept counts.
    assert saved["models"]["final"]["n_fg"] == run["n_fg"] and saved["models"]["final"]["n_bg"] == run["n_bg"]
    assert f"{run['D_mean']:.3f}" in res.output


def test_cli_refuses_bad_models(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["explain", "--out", str(tmp_path), "--model", "nope"])
    assert res.exit_code == 2 and "expected NAME=VALUE" in res.output
    res = CliRunner().invoke(app, ["explain", "--out", str(tmp_path), "--model", "a=kd.models:digits_student"])
    assert res.exit_code == 2 and "FACTORY@PATH" in res.output
    res = CliRunner().invoke(
        app, ["explain", "--out", str(tmp_path), "--model", f"a=kd.models:digits_student@{tmp_path}"]
    )
    assert res.exit_code == 2 and "no epoch_NNNN.safetensors" in res.output
    res = CliRunner().invoke(app, ["explain", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--demo DIR" in res.output


def test_kd_train_keeps_epochs_for_explain(tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "student.safetensors"
    args = ["train", "--method", "ce", "--epochs", "3", "--subset", "100", "--run-dir", str(run),
            "--keep-every", "2", "--out", str(out)]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    loaded = load_checkpoints(run / "epochs")
    assert [e for e, _ in loaded] == [0, 2, 3]
    final = load_checkpoints(out)[0][1]
    assert all(torch.equal(final[k], loaded[-1][1][k]) for k in final)
    assert not all(torch.equal(loaded[0][1][k], final[k]) for k in final)  # epoch 0 is the initialisation
    res = CliRunner().invoke(app, ["train", "--method", "ce", "--epochs", "1", "--keep-every", "1"])
    assert res.exit_code == 2 and "--keep-every needs --run-dir" in res.output
