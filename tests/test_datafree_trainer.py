"""The data-free methods train their student through the shared trainer
(``kd.student_trainer.train.train_student``): the recipe (optimiser, schedule, clipping) is the
one the config names, the run directory gets the trainer's config.json and metrics.csv, and no
method steps the student with an optimiser of its own. Runs go through a real teacher server."""

from __future__ import annotations

import csv
import json
import math
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from cli_checks import refused

from kd.core.data import load_dataset
from kd.demo_datafree import QUICK
from kd.models import digits_cnn_student
from kd.student_trainer.datafree import DATAFREE, get
from kd.student_trainer.datafree.common import DataFreeConfig, Generator, ServedTeacher
from kd.student_trainer.datafree.fast_dfkd import MetaGenerator
from kd.student_trainer.train import seed_everything
from kd.teacher_server.client import TeacherClient
from kd.teacher_server.loading import load_teacher
from kd.teacher_server.records import compute_records, save_records
from kd.teacher_server.server import TeacherOptions, start_server

TRAIN = load_dataset("digits", "train")
TEST = load_dataset("digits", "test")


@pytest.fixture(scope="module")
def address(digits_cnn_spec, tmp_path_factory: pytest.TempPathFactory):
    """One white-tier digits CNN teacher with activation records (lopes and adv-samples need them)."""
    spec = digits_cnn_spec(5)
    t = load_teacher("white", spec)
    recs = compute_records(t, TRAIN, ["layer2", "logits"], rank=4)
    records = save_records(tmp_path_factory.mktemp("records") / "r.safetensors", recs, t, TRAIN.dataset_id)
    running = start_server([t], options={"white": TeacherOptions(access="white", records=str(records))})
    yield f"127.0.0.1:{running.port}"
    running.stop(grace=1)


def run(address: str, name: str, config: DataFreeConfig, student: torch.nn.Module, **options):
    with TeacherClient(address, client_id=f"dft-{uuid.uuid4().hex[:8]}") as client:
        return get(name).run(ServedTeacher(client, "white"), student, config, test=TEST, **options)


def rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_dafl_trains_with_the_recipes_sgd_and_cosine_and_writes_the_run_directory(address: str, tmp_path: Path):
    """6 rounds, an epoch every 2: three metrics rows whose learning rate is the cosine's at each
    epoch's first step, SGD recorded in config.json and its momentum buffers in the checkpoint,
    and the result's history is the trainer's per-epoch evaluation."""
    seed_everything(0)
    config = DataFreeConfig(steps=6, batch_size=8, lr=0.05, eval_every=2, optimizer="sgd", momentum=0.8,
                            schedule="cosine", run_dir=str(tmp_path))  # fmt: skip
    res = run(address, "dafl", config, digits_cnn_student(), nz=16, generator_width=8)
    got = rows(tmp_path)
    assert [int(r["epoch"]) for r in got] == [0, 1, 2]
    # one student step per round: epoch e starts at step 2e of 6
    assert [float(r["lr"]) for r in got] == pytest.approx([0.05 * 0.5 * (1 + math.cos(math.pi * 2 * e / 6))
                                                          for e in range(3)], rel=1e-12)  # fmt: skip
    assert res.history == [(2, float(got[0]["test_acc"])), (4, float(got[1]["test_acc"])),
                           (6, float(got[2]["test_acc"]))]  # fmt: skip
    assert res.test_acc == float(got[2]["test_acc"])
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["optimizer"], saved["schedule"], saved["momentum"], saved["epochs"]) == ("sgd", "cosine", 0.8, 3)
    assert saved["method_options"] == {"datafree": "dafl"}
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["optimizer"]
    assert state["param_groups"][0]["momentum"] == 0.8
    assert all("momentum_buffer" in s for s in state["state"].values()) and state["state"]


def test_a_methods_recipe_defaults_fill_only_what_the_config_leaves_at_its_default(address: str, tmp_path: Path):
    """dafl's ``student_optimizer="sgd"`` becomes the recipe's optimiser, but a config that names
    one (as ``--optimizer`` would) wins; dfme's step schedule at 10/30/50% of the run is the
    trainer's multistep schedule (epochs shortened so each milestone starts one)."""
    opts = dict(nz=16, generator_width=8)
    run(address, "dafl", DataFreeConfig(steps=1, batch_size=8, run_dir=str(tmp_path / "a")), digits_cnn_student(),
        student_optimizer="sgd", **opts)  # fmt: skip
    run(address, "dafl", DataFreeConfig(steps=1, batch_size=8, optimizer="adamw", run_dir=str(tmp_path / "b")),
        digits_cnn_student(), student_optimizer="sgd", **opts)  # fmt: skip
    assert json.loads((tmp_path / "a" / "config.json").read_text())["optimizer"] == "sgd"
    assert json.loads((tmp_path / "b" / "config.json").read_text())["optimizer"] == "adamw"

    config = DataFreeConfig(steps=10, batch_size=8, lr=0.1, run_dir=str(tmp_path / "c"))
    res = run(address, "dfme", config, digits_cnn_student(), nz=16, generator_width=8, d_iter=1)
    saved = json.loads((tmp_path / "c" / "config.json").read_text())
    assert (saved["schedule"], saved["milestones"], saved["gamma"], saved["epochs"]) == ("multistep", [1, 3, 5],
                                                                                         0.3, 10)  # fmt: skip
    assert [float(r["lr"]) for r in rows(tmp_path / "c")] == pytest.approx(
        [0.1 * 0.3**k for k in (0, 1, 1, 2, 2, 3, 3, 3, 3, 3)], rel=1e-12)  # fmt: skip
    assert [s for s, _ in res.history] == [10]  # eval_every 0: the result reports the end only


@pytest.mark.parametrize("name", sorted(DATAFREE))
def test_no_method_steps_the_student_outside_the_recipe(address: str, name: str) -> None:
    """With config.lr 0.05 but a recipe that scales it by 1e-30 from the first step, every
    method's student keeps its weights (a method stepping the student with an optimiser of its
    own at config.lr would move them by ~1e-3); the same run at gamma 1 moves them."""
    settings = QUICK[name]
    base = replace(DataFreeConfig(lr=0.05, generator_lr=1e-2), **settings["config"])
    options = dict(settings.get("options", {}), **({"max_draws": 1000} if name == "zsdb3kd" else {}))
    moved = {}
    for gamma in (1e-30, 1.0):
        seed_everything(0)
        student = digits_cnn_student()
        before = {k: v.detach().clone() for k, v in student.named_parameters()}
        extra = {}
        if name in ("dafl", "dfad", "zskt"):
            extra["generator"] = Generator((1, 8, 8), nz=16, width=8)
        elif name == "fast-dfkd":
            extra.update(generator=MetaGenerator((1, 8, 8), nz=16, ngf=8), nz=16)
        g0 = {k: v.detach().clone() for k, v in extra["generator"].named_parameters()} if extra else {}
        config = replace(base, schedule="multistep", milestones=[0], gamma=gamma)
        res = run(address, name, config, student, **options, **extra)
        assert res.samples > 0 and math.isfinite(res.test_acc)
        moved[gamma] = max(float((v.detach() - before[k]).abs().max()) for k, v in student.named_parameters())
        if name == "fast-dfkd":  # its meta-generator keeps its own optimiser: it learns either way
            assert any(not torch.equal(v, g0[k]) for k, v in extra["generator"].named_parameters())
    assert moved[1e-30] < 1e-20, moved
    assert moved[1.0] > 1e-4, moved


def test_kd_datafree_takes_the_train_commands_recipe_flags(address: str, tmp_path: Path) -> None:
    """``kd datafree`` runs a method against the server with ``kd train``'s recipe flags, writes the
    run directory and the student's weights; a bad recipe flag exits 2 naming it before any query."""
    from typer.testing import CliRunner

    from kd.cli import app
    from kd.teacher_server.loading import read_state_dict

    args = ["datafree", "dafl", "--server", f"{address}/white", "--steps", "2", "--eval-every", "1", "--batch-size",
            "8", "--lr", "0.05", "--optimizer", "sgd", "--momentum", "0.5", "--schedule", "cosine", "--opt", "nz=16",
            "--opt", "generator_width=8", "--run-dir", str(tmp_path / "run"),
            "--out", str(tmp_path / "s.safetensors")]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    printed = json.loads(res.stdout.strip().splitlines()[-1])
    got = rows(tmp_path / "run")
    assert [float(r["lr"]) for r in got] == pytest.approx([0.05, 0.05 * 0.5 * (1 + math.cos(math.pi / 2))])
    assert printed["method"] == "dafl" and printed["test_acc"] == float(got[-1]["test_acc"]) and printed["samples"] > 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["optimizer"], saved["momentum"], saved["schedule"]) == ("sgd", 0.5, "cosine")
    student = digits_cnn_student()
    student.load_state_dict(read_state_dict(tmp_path / "s.safetensors"))  # the trained student, loadable

    bad = CliRunner().invoke(app, [*args[:4], "--optimizer", "nope"])
    assert bad.exit_code == 2 and "unknown optimizer 'nope'" in bad.output


def test_kd_datafree_refuses_a_student_of_another_width_before_any_query(address: str, tmp_path: Path) -> None:
    """kd datafree trains through train_student, which now checks the student's outputs against the data's
    classes as kd train did alone: before, a 20-output student wrote its run directory, queried the teacher
    and failed at its first step with a shape error."""
    from typer.testing import CliRunner

    from kd.cli import app

    spec = "kd.models:DigitsCNN?num_classes=20&width=4"
    args = ["datafree", "dfad", "--server", f"{address}/white", "--student", spec, "--steps", "1", "--batch-size",
            "8", "--val-dataset", "digits:test", "--run-dir", str(tmp_path / "run")]  # fmt: skip
    refused(CliRunner().invoke(app, args), "the student gives 20 outputs per sample but digits/test", "10 classes")
    assert not (tmp_path / "run").exists()


class _StopInSecondEpoch:
    """``DataFreeConfig.stop``: SIGTERM at the second student step asked after the first epoch's
    checkpoint was written (metrics.csv appears with it), i.e. inside the run's second epoch."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.asked = run_dir, 0

    def __call__(self) -> int | None:
        if (self.run_dir / "metrics.csv").exists():
            self.asked += 1
            if self.asked >= 2:
                return 15
        return None


def _resume_setting(name: str) -> tuple[DataFreeConfig, dict]:
    """A method's QUICK options over 6 rounds in 3 epochs (fast-dfkd without its server-side BN
    momentum, which a checkpoint cannot hold: see FastSynthesizer.load_state_dict)."""
    settings = QUICK[name]
    config = replace(DataFreeConfig(lr=0.01, generator_lr=1e-2), **settings["config"])
    config = replace(config, steps=6, eval_every=2)
    options = dict(settings.get("options", {}), **({"max_draws": 1000} if name == "zsdb3kd" else {}))
    if name == "fast-dfkd":
        options["bn_momentum"] = 0.0
    if name in ("dafl", "dfad", "zskt"):
        options.update(nz=16, generator_width=8)
    return config, options


@pytest.mark.parametrize("name", sorted(DATAFREE))
def test_a_stopped_run_resumes_from_its_last_epoch_to_the_uninterrupted_result(address: str, name: str,
                                                                               tmp_path: Path) -> None:  # fmt: skip
    """Every method: a run stopped inside its second epoch, then resumed from the run directory,
    ends with the uninterrupted run's student bit for bit, its evaluation history and its query
    count (the method's own state comes back: generators, banks, transfer sets, meta-optimiser)."""
    from kd.core.signals import Stopped

    config, options = _resume_setting(name)
    seed_everything(0)
    whole_student = digits_cnn_student()
    whole = run(address, name, replace(config, run_dir=str(tmp_path / "whole")), whole_student, **options)

    cut = tmp_path / "cut"
    seed_everything(0)
    with pytest.raises(Stopped):
        run(address, name, replace(config, run_dir=str(cut), stop=_StopInSecondEpoch(cut)), digits_cnn_student(),
            **options)  # fmt: skip
    assert len(rows(cut)) == 1  # the first epoch's checkpoint, nothing of the second
    seed_everything(0)
    student = digits_cnn_student()
    resumed = run(address, name, replace(config, run_dir=str(cut), resume=True), student, **options)

    want = whole_student.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in student.state_dict().items())
    assert resumed.history == whole.history and len(whole.history) == 3
    assert (resumed.samples, resumed.gradient_samples) == (whole.samples, whole.gradient_samples)

    def losses(run_dir: Path) -> list[tuple[str, str, str]]:
        return [(r["epoch"], r["train_loss"], r["test_acc"]) for r in rows(run_dir)]

    assert losses(cut) == losses(tmp_path / "whole")  # the second epoch's loss: its steps before the stop not kept


def test_a_resume_with_other_method_options_is_refused_naming_them(address: str, tmp_path: Path) -> None:
    config = DataFreeConfig(steps=4, batch_size=8, eval_every=2, run_dir=str(tmp_path))
    seed_everything(0)
    run(address, "dfad", config, digits_cnn_student(), nz=16, generator_width=8, k=1)
    with pytest.raises(ValueError, match=r"another data-free run \(options: checkpoint .*'k': 1.*'k': 2"):
        run(address, "dfad", replace(config, resume=True), digits_cnn_student(), nz=16, generator_width=8, k=2)
    with pytest.raises(ValueError, match=r"method: checkpoint 'dfad', now 'dafl'"):
        run(address, "dafl", replace(config, resume=True), digits_cnn_student(), nz=16, generator_width=8)


def test_a_resume_without_a_run_directory_is_refused_before_any_query(address: str) -> None:
    """resume=True with no run_dir had nothing to continue from and trained from the start without a
    word (train_student ignored resume without run_dir); both refuse it now, the data-free run
    before its first teacher query."""
    from kd.student_trainer.train import TrainConfig, train_student

    with TeacherClient(address, client_id=f"dft-{uuid.uuid4().hex[:8]}") as client:
        teacher = ServedTeacher(client, "white")
        with pytest.raises(ValueError, match=r"dfad: resume continues the run in run_dir: give run_dir"):
            get("dfad").run(teacher, digits_cnn_student(), DataFreeConfig(steps=2, batch_size=8, resume=True),
                            test=TEST, nz=16, generator_width=8)  # fmt: skip
        assert teacher.usage.samples == 0
    with pytest.raises(ValueError, match=r"resume continues the run in run_dir: give run_dir"):
        train_student(digits_cnn_student(), TRAIN, TEST, TrainConfig(method="ce", epochs=1), resume=True)
