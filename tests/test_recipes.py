"""Training recipes (student_trainer/optim.py), the trainer's hooks, factories with arguments
(kd/core/factory.py), sample sources and the shipped configs/."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from kd.cli import _fail, app
from kd.core import factory
from kd.core.data import load_dataset
from kd.models import MLP, DigitsCNN, digits_student
from kd.student_trainer import optim
from kd.student_trainer.train import Hooks, StepContext, TrainConfig, train_student
from kd.teacher_server.config import read_table
from kd.teacher_server.loading import TeacherLoadError, TeacherSpec, load_teacher, save_weights

ROOT = Path(__file__).resolve().parents[1]
TRAIN, TEST = load_dataset("digits", "train"), load_dataset("digits", "test")
SUB = torch.randperm(len(TRAIN), generator=torch.Generator().manual_seed(7))[:50]  # 5 steps of 10


def _student(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return digits_student()


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- learning rates ---------------------------------------------------------------------------


def _scheduled_lrs(config: TrainConfig) -> tuple[list[float], list[float]]:
    """(lr the trainer reports, lr of an extra optimiser's group whose base rate is 1.0) per step."""
    extra = nn.Linear(2, 2)
    extra_opt = torch.optim.SGD(extra.parameters(), lr=1.0)
    reported, groups = [], []

    def on_step(epoch: int, step: int, loss: float, lr: float) -> None:
        reported.append(lr)
        groups.append(extra_opt.param_groups[0]["lr"])

    def loss(ctx: StepContext) -> torch.Tensor:
        return nn.functional.cross_entropy(ctx.model(ctx.inputs), ctx.labels)

    hooks = Hooks(extra=[(extra, extra_opt)], loss=loss, on_step=on_step)
    train_student(_student(), TRAIN, TEST, config, subset=SUB, hooks=hooks)
    return reported, groups


def test_multistep_schedule_matches_the_formula_and_torch() -> None:
    cfg = TrainConfig(method="ce", epochs=5, batch_size=10, lr=0.05, optimizer="sgd", schedule="multistep",
                      milestones=[1, 3], gamma=0.1)  # fmt: skip
    reported, groups = _scheduled_lrs(cfg)
    # independent reference: torch's MultiStepLR, stepped once per epoch (5 steps per epoch)
    p = nn.Parameter(torch.zeros(1))
    ref_opt = torch.optim.SGD([p], lr=0.05)
    sched = torch.optim.lr_scheduler.MultiStepLR(ref_opt, milestones=[1, 3], gamma=0.1)
    ref = []
    for _ in range(5):
        ref += [ref_opt.param_groups[0]["lr"]] * 5
        ref_opt.step()
        sched.step()
    assert reported == pytest.approx(ref, rel=1e-12)
    assert groups == pytest.approx([r / 0.05 for r in ref], rel=1e-12)  # the extra optimiser's own base rate
    assert reported[4] == pytest.approx(0.05) and reported[5] == pytest.approx(0.005)
    assert reported[15] == pytest.approx(0.0005)


def test_cosine_with_linear_warmup_matches_the_formula() -> None:
    cfg = TrainConfig(method="ce", epochs=4, batch_size=10, lr=0.1, optimizer="adamw", weight_decay=0.05,
                      schedule="cosine", warmup_epochs=1)  # fmt: skip
    reported, groups = _scheduled_lrs(cfg)
    ref = []
    for g in range(20):  # 4 epochs x 5 steps; 5 warm-up steps, then 15 of cosine
        if g < 5:
            ref.append(0.1 * (g + 1) / 5)
        else:
            ref.append(0.1 * 0.5 * (1 + math.cos(math.pi * (g - 5) / 15)))
    assert reported == pytest.approx(ref, rel=1e-12, abs=1e-15)
    assert groups == pytest.approx([r / 0.1 for r in ref], rel=1e-12, abs=1e-14)
    assert reported[0] == pytest.approx(0.02) and reported[5] == pytest.approx(0.1)


def test_warmup_alone_then_constant() -> None:
    recipe = optim.Recipe(lr=1.0, warmup_epochs=0.5)
    # 10 steps per epoch: 5 warm-up steps at 1/5 .. 5/5, then 1
    assert [optim.lr_factor(recipe, 0, s, 10, 3) for s in range(7)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1, 1, 1])
    assert optim.lr_factor(recipe, 2, 9, 10, 3) == 1.0


def test_optimizers_step_as_their_update_rules() -> None:
    """One or two steps by hand: SGD momentum + L2 weight decay, Nesterov, AdamW's decoupled decay."""
    g = torch.tensor([0.5, -1.0])
    w0 = torch.tensor([1.0, 2.0])

    def run(recipe: optim.Recipe, steps: int) -> torch.Tensor:
        p = nn.Parameter(w0.clone())
        opt = optim.make_optimizer([p], recipe)
        for _ in range(steps):
            p.grad = g.clone()
            opt.step()
        return p.detach()

    lr, mu, wd = 0.1, 0.9, 0.01
    # SGD (PyTorch form): d = g + wd*w; b = mu*b + d (b = d at first); w -= lr*b (nesterov: d + mu*b)
    d1 = g + wd * w0
    w1 = w0 - lr * d1
    d2 = g + wd * w1
    b2 = mu * d1 + d2
    sgd = optim.Recipe(optimizer="sgd", lr=lr, momentum=mu, weight_decay=wd)
    torch.testing.assert_close(run(sgd, 2), w1 - lr * b2, rtol=1e-6, atol=1e-7)
    nes = optim.Recipe(optimizer="sgd", lr=lr, momentum=mu, weight_decay=wd, nesterov=True)
    w1n = w0 - lr * (d1 + mu * d1)
    d2n = g + wd * w1n
    torch.testing.assert_close(run(nes, 2), w1n - lr * (d2n + mu * (mu * d1 + d2n)), rtol=1e-6, atol=1e-7)
    # AdamW, one step: w = w*(1 - lr*wd) - lr * m_hat / (sqrt(v_hat) + eps), m_hat/sqrt(v_hat) = sign(g)
    adamw = optim.Recipe(optimizer="adamw", lr=lr, weight_decay=wd)
    torch.testing.assert_close(run(adamw, 1), w0 * (1 - lr * wd) - lr * g.sign(), rtol=1e-6, atol=1e-6)
    # Adam's weight decay is L2 in the gradient instead: the first step is still lr * sign(g + wd*w)
    adam = optim.Recipe(optimizer="adam", lr=lr, weight_decay=wd)
    torch.testing.assert_close(run(adam, 1), w0 - lr * (g + wd * w0).sign(), rtol=1e-6, atol=1e-6)
    assert isinstance(optim.make_optimizer([nn.Parameter(w0)], adamw), torch.optim.AdamW)


@pytest.mark.parametrize(
    "bad, message",
    [({"optimizer": "lamb"}, "unknown optimizer"), ({"schedule": "step"}, "unknown schedule"),
     ({"amp": "fp8"}, "unknown amp"), ({"schedule": "multistep"}, "needs milestones"),
     ({"schedule": "multistep", "milestones": [5, 2]}, "increasing"), ({"nesterov": True}, "nesterov"),
     ({"lr": -0.1}, "lr must be"), ({"lr": float("nan")}, "lr must be"), ({"weight_decay": -1.0}, "weight_decay"),
     ({"gamma": 0.0}, "gamma must be"), ({"clip_grad_norm": float("inf")}, "clip_grad_norm")],
)  # fmt: skip
def test_bad_recipes_are_refused(bad: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        train_student(_student(), TRAIN, TEST, TrainConfig(method="ce", epochs=1, **bad), subset=SUB)


# --- clipping, AMP, channels-last --------------------------------------------------------------


def test_clip_grad_norm_clips() -> None:
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    (model(torch.full((2, 4), 100.0)).pow(2).sum()).backward()
    before = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert before > 10
    optim.clip_gradients(opt, optim.Recipe(clip_grad_norm=0.5), None)
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert float(after) == pytest.approx(0.5, rel=1e-5)


def test_clipping_in_the_loop_bounds_the_step() -> None:
    """Plain SGD (lr 1, no momentum) on one batch: the weights move by exactly the clipped norm."""
    cfg = TrainConfig(method="ce", epochs=1, batch_size=50, lr=1.0, optimizer="sgd", momentum=0.0,
                      clip_grad_norm=1e-3)  # fmt: skip
    student = _student()
    w0 = _params(student)
    train_student(student, TRAIN, TEST, cfg, subset=SUB)
    moved = torch.linalg.vector_norm(torch.stack([(student.state_dict()[k] - w0[k]).norm() for k in w0]))
    assert float(moved) == pytest.approx(1e-3, rel=1e-3)
    unclipped = _student()
    train_student(unclipped, TRAIN, TEST, TrainConfig(**{**cfg.__dict__, "clip_grad_norm": 0.0}), subset=SUB)
    free = torch.linalg.vector_norm(torch.stack([(unclipped.state_dict()[k] - w0[k]).norm() for k in w0]))
    assert float(free) > 0.01  # without clipping the same step is much larger


@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_on_cpu(amp: str, dtype: torch.dtype) -> None:
    seen: list[torch.dtype] = []

    def loss(ctx: StepContext) -> torch.Tensor:
        logits = ctx.model(ctx.inputs)
        seen.append(logits.dtype)
        return nn.functional.cross_entropy(logits, ctx.labels)

    student = _student()
    w0 = _params(student)
    cfg = TrainConfig(method="ce", epochs=2, batch_size=10, lr=1e-2, amp=amp)
    result = train_student(student, TRAIN, TEST, cfg, subset=SUB, hooks=Hooks(loss=loss))
    assert seen and set(seen) == {dtype}
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in student.state_dict().values())
    assert any(not torch.equal(student.state_dict()[k], w0[k]) for k in w0)
    assert all(math.isfinite(x) for x in result.loss_per_epoch)


def test_channels_last_converts_conv_weights() -> None:
    torch.manual_seed(0)
    model = DigitsCNN()
    cfg = TrainConfig(method="ce", epochs=1, batch_size=25, channels_last=True)
    train_student(model, TRAIN, TEST, cfg, subset=SUB)
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not all(w.is_contiguous() for w in convs)


# --- hooks ------------------------------------------------------------------------------------


def test_hooks_train_an_extra_module_and_see_every_epoch() -> None:
    """An auxiliary head on the student's detached logits, with its own optimiser: it learns,
    and the student ends exactly as without it (its term reaches only its own weights)."""
    torch.manual_seed(3)
    aux = nn.Linear(10, 10)
    aux0 = _params(aux)
    epochs_seen: list[int] = []
    rows: list[dict] = []
    steps: list[tuple[int, int]] = []

    def loss(ctx: StepContext) -> dict[str, torch.Tensor]:
        logits = ctx.model(ctx.inputs)
        return {"loss": nn.functional.cross_entropy(logits, ctx.labels),
                "aux": nn.functional.cross_entropy(aux(logits.detach()), ctx.labels)}  # fmt: skip

    def on_epoch(epoch: int, row: dict) -> None:
        epochs_seen.append(epoch)
        rows.append(row)

    hooks = Hooks(extra=[(aux, torch.optim.SGD(aux.parameters(), lr=0.1))], loss=loss, on_epoch=on_epoch,
                  on_step=lambda e, s, loss, lr: steps.append((e, s)))  # fmt: skip
    cfg = TrainConfig(method="ce", epochs=3, batch_size=10)
    with_aux = _student()
    result = train_student(with_aux, TRAIN, TEST, cfg, subset=SUB, hooks=hooks)
    assert epochs_seen == [0, 1, 2]
    assert [r["test_acc"] for r in rows] == result.acc_per_epoch
    assert steps == [(e, s) for e in range(3) for s in range(5)]
    assert all(not torch.equal(aux.state_dict()[k], aux0[k]) for k in aux0)
    plain = _student()
    plain_result = train_student(plain, TRAIN, TEST, cfg, subset=SUB)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, with_aux.state_dict()[k]), k
    assert plain_result.loss_per_epoch == result.loss_per_epoch  # "loss" alone is reported


# --- model outputs, factories, errors ---------------------------------------------------------


@dataclass
class _Output:  # what a Hugging Face model returns: an object with .logits
    logits: torch.Tensor
    hidden_states: torch.Tensor | None = None


class _Wrapped(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.net = digits_student()

    def forward(self, x: torch.Tensor):
        z = self.net(x)
        if self.kind == "object":
            return _Output(z, x)
        if self.kind == "dict":
            return {"hidden": x, "logits": z}
        return (z, x)


@pytest.mark.parametrize("kind", ["object", "dict", "tuple"])
def test_hf_style_outputs_train_as_their_logits(kind: str) -> None:
    cfg = TrainConfig(method="ce", epochs=2, batch_size=10)
    torch.manual_seed(0)
    wrapped = _Wrapped(kind)
    plain = _student(0)  # the same initial weights (same seed, same construction)
    r1 = train_student(wrapped, TRAIN, TEST, cfg, subset=SUB)
    r2 = train_student(plain, TRAIN, TEST, cfg, subset=SUB)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, wrapped.net.state_dict()[k]), k
    assert r1.acc_per_epoch == r2.acc_per_epoch


def test_logits_of() -> None:
    z = torch.randn(2, 3)
    assert factory.logits_of(z) is z
    assert factory.logits_of(_Output(z)) is z and factory.logits_of({"logits": z}) is z
    assert factory.logits_of((z, torch.ones(1))) is z
    with pytest.raises(TypeError, match="without 'logits'"):
        factory.logits_of({"scores": z})


def test_factories_with_arguments() -> None:
    lin = factory.build("torch.nn:Linear?in_features=64&out_features=7&bias=false", "student")
    assert isinstance(lin, nn.Linear) and lin.weight.shape == (7, 64) and lin.bias is None
    mlp = factory.build("kd.models:MLP?sizes=[64,32,5]&dropout=0.5")  # JSON list and float
    assert isinstance(mlp, MLP) and [m.out_features for m in mlp if isinstance(m, nn.Linear)] == [32, 5]
    assert any(isinstance(m, nn.Dropout) and m.p == 0.5 for m in mlp)
    gelu = factory.build("torch.nn:GELU?approximate=tanh")  # not JSON: a string
    assert gelu.approximate == "tanh"
    spec = factory.parse_factory("a.b:c@/w/x.pt?n=3&name=r18&input_shape=3x32x32", "teacher")
    assert spec.arguments == {"n": 3, "name": "r18"} and spec.input_shape == (3, 32, 32) and spec.weights == "/w/x.pt"
    with pytest.raises(factory.FactoryError, match="refused the arguments"):
        factory.build("torch.nn:Linear?in_features=3&out_features=2&colour=red")


def test_teacher_spec_with_arguments_loads_weights(tmp_path: Path) -> None:
    torch.manual_seed(5)
    model = MLP([64, 24, 6])
    weights = save_weights(model, tmp_path / "t.safetensors")
    spec = f"kd.models:MLP@{weights}?sizes=[64,24,6]&input_shape=64"
    assert TeacherSpec.parse(spec).kwargs == (("sizes", [64, 24, 6]),)
    t = load_teacher("t", spec)
    assert t.num_classes == 6 and t.input_shape == (64,)
    for k, v in model.state_dict().items():
        assert torch.equal(v, t.model.state_dict()[k])
    with pytest.raises(TeacherLoadError, match="does not fit"):  # other arguments, other architecture
        load_teacher("t", f"kd.models:MLP@{weights}?sizes=[64,25,6]&input_shape=64")


def test_unimportable_factory_says_importable_and_names_the_role() -> None:
    with pytest.raises(factory.FactoryError) as e:
        factory.build("no_such_module_kd:make?n=1", "student")
    assert "student factory" in str(e.value) and "must be importable" in str(e.value)
    assert "teacher" not in str(e.value)
    with pytest.raises(TeacherLoadError, match="teacher factory .* must be importable"):
        load_teacher("t", "no_such_module_kd:make")


def test_fail_prints_square_brackets_whole(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        _fail("unknown option(s) ['colour'] in [x] and [bold]not bold[/bold]")
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "unknown option(s) ['colour'] in [x] and [bold]not bold[/bold]" in err


def test_cli_student_error_is_a_student_error() -> None:
    r = CliRunner().invoke(app, ["train", "--method", "ce", "--epochs", "1", "--student", "no_such_module_kd:f?x=[1]"])
    assert r.exit_code == 2
    text = " ".join(r.output.split())
    assert "student factory 'no_such_module_kd:f'" in text and "must be importable" in text
    assert "teacher" not in text


# --- sample sources ---------------------------------------------------------------------------


class _Source:
    """A SampleSource that is not kd.core.data.Dataset: no .inputs, only get()."""

    def __init__(self, data) -> None:
        self._data = data
        self.gets = 0

    dataset_id = property(lambda self: self._data.dataset_id)
    num_classes = property(lambda self: self._data.num_classes)
    augmentation = property(lambda self: self._data.augmentation)
    labels = property(lambda self: self._data.labels)

    def __len__(self) -> int:
        return len(self._data)

    def get(self, indices: torch.Tensor, views: torch.Tensor | None = None) -> torch.Tensor:
        self.gets += 1
        return self._data.get(indices, views)


def test_trains_from_any_sample_source_as_from_the_dataset() -> None:
    cfg = TrainConfig(method="ce", epochs=2, batch_size=10, views=3)
    a, b = _student(), _student()
    src_train, src_test = _Source(TRAIN), _Source(TEST)
    ra = train_student(a, src_train, src_test, cfg, subset=SUB)
    rb = train_student(b, TRAIN, TEST, cfg, subset=SUB)
    # 5 batches x 2 epochs, + 1: the output-width check's probe of the first sample before any step;
    # 1 eval batch x 2
    assert src_train.gets == 11 and src_test.gets == 2
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert ra.acc_per_epoch == rb.acc_per_epoch


# --- run directory, configs, CLI --------------------------------------------------------------


def test_run_dir_records_recipe_lr_and_top5(tmp_path: Path) -> None:
    cfg = TrainConfig(method="ce", epochs=3, batch_size=10, lr=0.05, optimizer="sgd", momentum=0.9,
                      weight_decay=5e-4, schedule="multistep", milestones=[2], gamma=0.5)  # fmt: skip
    student = _student()
    train_student(student, TRAIN, TEST, cfg, subset=SUB, run_dir=tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert {k: config[k] for k in ("optimizer", "lr", "momentum", "weight_decay", "schedule", "milestones", "gamma")} \
        == {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "multistep",
            "milestones": [2], "gamma": 0.5}  # fmt: skip
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.05, 0.05, 0.025])
    with torch.no_grad():  # top-5 of the final student, computed here
        top5 = int((student.eval()(TEST.inputs).topk(5, 1).indices == TEST.labels[:, None]).any(1).sum()) / len(TEST)
        top1 = int((student(TEST.inputs).argmax(1) == TEST.labels).sum()) / len(TEST)
    assert float(rows[-1]["test_top5"]) == top5 and float(rows[-1]["test_acc"]) == top1
    assert top5 > top1


MDISTILLER = {
    "cifar100_mdistiller.yaml": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight-decay": 0.0005,
                                 "batch-size": 64, "epochs": 240, "schedule": "multistep",
                                 "milestones": [150, 180, 210], "gamma": 0.1, "method": "kd",
                                 "opt": {"kd": {"temperature": 4, "alpha": 0.9}}},
    "imagenet_mdistiller.yaml": {"optimizer": "sgd", "lr": 0.2, "momentum": 0.9, "weight-decay": 0.0001,
                                 "batch-size": 512, "epochs": 100, "schedule": "multistep",
                                 "milestones": [30, 60, 90], "gamma": 0.1, "method": "kd",
                                 "opt": {"kd": {"temperature": 1, "alpha": 0.5}}},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(MDISTILLER))
def test_shipped_configs_name_mdistillers_recipes(name: str) -> None:
    """mdistiller: configs/cifar100/kd.yaml + engine/cfg.py, configs/imagenet/r34_r18/kd.yaml."""
    assert read_table(ROOT / "configs" / name) == MDISTILLER[name]


def test_cli_config_file_with_flag_override(tmp_path: Path, teacher_spec: str) -> None:
    run = tmp_path / "run"
    args = ["train", "--config", str(ROOT / "configs" / "cifar100_mdistiller.yaml"), "--source",
            f"local:{teacher_spec}", "--epochs", "2", "--subset", "128", "--milestones", "1",
            "--run-dir", str(run)]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    config = json.loads((run / "config.json").read_text())
    # from the file
    assert config["optimizer"] == "sgd" and config["lr"] == 0.05 and config["momentum"] == 0.9
    assert config["weight_decay"] == 0.0005 and config["batch_size"] == 64 and config["schedule"] == "multistep"
    assert config["method"] == "kd" and config["method_options"] == {"temperature": 4, "alpha": 0.9}
    # from the flags
    assert config["epochs"] == 2 and config["milestones"] == [1] and config["train_samples"] == 128
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [float(x["lr"]) for x in rows] == pytest.approx([0.05, 0.005])


def test_cli_recipe_flags_and_bad_values(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["train", "--method", "ce", "--epochs", "2", "--subset", "60", "--batch-size", "20", "--optimizer", "sgd",
            "--nesterov", "--schedule", "cosine", "--warmup-epochs", "1", "--lr", "0.1", "--clip-grad-norm", "2",
            "--amp", "bf16", "--run-dir", str(run), "--student", "kd.models:MLP?sizes=[64,8,10]",
            "--out", str(tmp_path / "s.safetensors")]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    shapes = {k: tuple(v.shape) for k, v in load_file(str(tmp_path / "s.safetensors")).items()}
    assert shapes == {"0.weight": (8, 64), "0.bias": (8,), "2.weight": (10, 8), "2.bias": (10,)}
    config = json.loads((run / "config.json").read_text())
    assert (config["nesterov"], config["schedule"], config["warmup_epochs"], config["clip_grad_norm"],
            config["amp"]) == (True, "cosine", 1.0, 2.0, "bf16")  # fmt: skip
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [float(x["lr"]) for x in rows] == pytest.approx([0.1 / 3, 0.1])  # warm-up step 1 of 3; cosine start
    bad = CliRunner().invoke(app, ["train", "--method", "ce", "--schedule", "multistep"])
    assert bad.exit_code == 2 and "needs milestones" in bad.output


def test_worker_processes_give_the_same_training() -> None:
    """Batches read in 2 DataLoader workers (order and views still drawn here): identical result,
    and torch's global RNG (dropout, ...) is left as the in-process path leaves it."""
    cfg = TrainConfig(method="ce", epochs=2, batch_size=10, views=3)
    a, b = _student(), _student()
    ra = train_student(a, TRAIN, TEST, TrainConfig(**{**cfg.__dict__, "workers": 2}), subset=SUB)
    rng_a = torch.get_rng_state()
    torch.manual_seed(0)
    digits_student()  # the same global RNG draws as _student() made for `b`
    rb = train_student(b, TRAIN, TEST, cfg, subset=SUB)
    assert torch.equal(rng_a, torch.get_rng_state())
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert ra.acc_per_epoch == rb.acc_per_epoch


def test_resume_restores_extra_modules_and_refuses_another_set(tmp_path: Path) -> None:
    """A hook's extra modules and their optimisers are in every checkpoint and come back on resume
    (tests/test_online_resume.py checks whole online runs); a run with another number of them is refused."""
    cfg = TrainConfig(method="ce", epochs=1)

    def hooks_with(*modules: nn.Module) -> Hooks:
        return Hooks(extra=[(m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)) for m in modules])

    saved = nn.Linear(2, 2)
    with torch.no_grad():
        saved.weight.fill_(0.25)
    train_student(_student(), TRAIN, TEST, cfg, subset=SUB, run_dir=tmp_path, hooks=hooks_with(saved))
    fresh = nn.Linear(2, 2)  # other weights than the checkpoint's
    train_student(_student(), TRAIN, TEST, cfg, subset=SUB, run_dir=tmp_path, resume=True, hooks=hooks_with(fresh))
    for k, v in saved.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    with pytest.raises(ValueError, match=r"holds 1 extra module\(s\), this run trains 2"):
        train_student(_student(), TRAIN, TEST, cfg, subset=SUB, run_dir=tmp_path, resume=True,
                      hooks=hooks_with(nn.Linear(2, 2), nn.Linear(2, 2)))  # fmt: skip


def test_chain_stages_from_factories_with_arguments(tmp_path: Path) -> None:
    """kd chain: a stage `module:attr?args` is saved and re-served as `module:attr@WEIGHTS?args`."""
    from kd.chain import run_chain

    res = run_chain(tmp_path, mode="born-again", models=["kd.models:MLP?sizes=[64,12,10]"] * 2, epochs=1, labeled=40,
                    teacher_epochs=1, serve=False)  # fmt: skip
    stages = res["runs"][0]["stages"]
    assert stages[0]["spec"] == f"kd.models:MLP@{tmp_path / 'stage-1.safetensors'}?sizes=[64,12,10]"
    assert [s["params"] for s in stages] == [64 * 12 + 12 + 12 * 10 + 10] * 2
    assert stages[1]["fingerprint"] == load_teacher("x", stages[1]["spec"]).fingerprint
