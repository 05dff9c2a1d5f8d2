"""What the student reads and writes: uint8 samples mean value/255 on every path (training steps,
the feature probe, validation, kd evaluate), the student's outputs must match the data's classes,
its weights must fit its architecture, and what kd train saves (--out, the connectors) can be
loaded again and is checked writable before training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_checks import refused
from typer.testing import CliRunner

from kd.cli import app, connectors_path
from kd.core.data import open_source
from kd.models import MLP, digits_cnn_student
from kd.student_trainer.evaluate import evaluate
from kd.student_trainer.sources import LocalSource
from kd.student_trainer.train import TrainConfig, load_checkpoint, seed_everything, train_student
from kd.teacher_server.loading import TeacherLoadError, load_teacher, read_state_dict, save_weights


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The digits as 0..255 uint8 images [N, 1, 8, 8] (train 240, val 120) in one npz pair, and their
    float32 twins (value/255, written here by numpy) in another."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(d.images * 255 / 16).astype(np.uint8)[:, None]
    y = d.target.astype(np.int64)
    root = tmp_path_factory.mktemp("u8")
    uris = {}
    for name, rows in (("train", slice(0, 240)), ("val", slice(240, 360))):
        np.savez(root / f"{name}_u8.npz", x=x[rows], y=y[rows])
        np.savez(root / f"{name}_f32.npz", x=x[rows].astype(np.float32) / np.float32(255), y=y[rows])
        uris[f"{name}_u8"] = f"npz:{root / f'{name}_u8.npz'}?dtype=uint8"
        uris[f"{name}_f32"] = f"npz:{root / f'{name}_f32.npz'}"
    return uris


def test_a_uint8_split_and_its_float_twin_train_and_score_the_same(splits: dict[str, str]) -> None:
    """Training steps, validation and the feature probe on a uint8 split read value/255: the same
    weights, connectors and accuracies as on the float twin. (Before: the first step failed with
    "Input type (unsigned char) and bias type (float)", and validation scored raw 0..255 values.)"""
    u8 = open_source(splits["train_u8"]), open_source(splits["val_u8"])
    f32 = open_source(splits["train_f32"]), open_source(splits["val_f32"])
    assert u8[0].get(torch.arange(2)).dtype == torch.uint8
    torch.manual_seed(3)
    teacher = load_teacher("cnn", "kd.models:digits_cnn")  # seeded, untrained: the same teacher for both
    runs = {}
    for name, (train, val) in (("u8", u8), ("f32", f32)):
        for method, source in (("ce", None), ("fitnet", LocalSource(teacher))):
            seed_everything(0)
            student = digits_cnn_student()
            config = TrainConfig(method=method, epochs=2, batch_size=32, lr=1e-2,
                                 matches=["layer2=layer2"] if method == "fitnet" else [])  # fmt: skip
            res = train_student(student, train, val, config, source=source)
            runs[name, method] = student, res
    for method in ("ce", "fitnet"):
        (s_u8, r_u8), (s_f, r_f) = runs["u8", method], runs["f32", method]
        for (k, a), b in zip(s_u8.state_dict().items(), s_f.state_dict().values()):
            assert torch.equal(a, b), (method, k, float((a - b).abs().max()))
        assert r_u8.acc_per_epoch == r_f.acc_per_epoch, method
        if method == "fitnet":
            for a, b in zip(r_u8.connectors.state_dict().values(), r_f.connectors.state_dict().values()):
                assert torch.equal(a, b)
    # the accuracy both report is the student's on the float pixels, counted here
    student = runs["f32", "ce"][0].eval()
    x, y = torch.from_numpy(np.load(splits["val_f32"][4:])["x"]), torch.from_numpy(np.load(splits["val_f32"][4:])["y"])
    with torch.no_grad():
        hits = int((student(x).argmax(1) == y).sum())
    assert runs["u8", "ce"][1].acc_per_epoch[-1] == hits / 120
    assert evaluate(student, u8[1]).correct1 == evaluate(student, f32[1]).correct1 == hits
    # a resize (conform to another input_shape) of uint8 pixels resizes value/255, as of the float twin
    acc_u8 = evaluate(nn_flat(), u8[1], input_shape=(1, 4, 4))
    acc_f32 = evaluate(nn_flat(), f32[1], input_shape=(1, 4, 4))
    assert (acc_u8.correct1, acc_u8.correct5) == (acc_f32.correct1, acc_f32.correct5)


def nn_flat() -> torch.nn.Module:
    """A seeded classifier of 1x4x4 images whose prediction depends on the input's scale (a bias)."""
    torch.manual_seed(5)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 10))


def test_kd_train_and_kd_evaluate_score_a_uint8_split_as_its_float_twin(splits: dict[str, str], tmp_path: Path) -> None:
    """kd train's test_acc and kd evaluate's top-1/top-5 on a uint8 validation split equal those on its
    float twin (before: 0.1 against 0.5 on the repro's digits), and kd train trains on a uint8 split."""
    accs = {}
    for name in ("u8", "f32"):
        out = tmp_path / f"s_{name}.safetensors"
        r = invoke("train", "--method", "ce", "--student", "kd.models:digits_cnn_student", "--dataset",
                   splits[f"train_{name}"], "--val-dataset", splits[f"val_{name}"], "--epochs", "2",
                   "--out", str(out))  # fmt: skip
        assert r.exit_code == 0, r.output
        accs[name] = json.loads(r.stdout.strip().splitlines()[-1])
        assert read_state_dict(out)  # saved
    w_u8, w_f32 = read_state_dict(tmp_path / "s_u8.safetensors"), read_state_dict(tmp_path / "s_f32.safetensors")
    assert all(torch.equal(w_u8[k], w_f32[k]) for k in w_f32)
    assert accs["u8"]["test_acc"] == accs["f32"]["test_acc"] and accs["u8"]["test_top5"] == accs["f32"]["test_top5"]
    scores = {}
    for name in ("u8", "f32"):
        r = invoke("evaluate", "--model", f"kd.models:digits_cnn_student@{tmp_path / 's_f32.safetensors'}",
                   "--dataset", splits[f"val_{name}"])  # fmt: skip
        assert r.exit_code == 0, r.output
        scores[name] = json.loads(r.stdout.strip().splitlines()[-1])
    assert (scores["u8"]["top1"], scores["u8"]["top5"]) == (scores["f32"]["top1"], scores["f32"]["top5"])
    assert scores["f32"]["top1"] == accs["f32"]["test_acc"]


def test_out_must_be_a_safetensors_name_and_the_loader_says_what_a_misnamed_file_is(tmp_path: Path) -> None:
    """kd train --out x.pt wrote safetensors bytes under .pt (exit 0), which every loader then refused as
    "pickled objects": now refused before training; and such a file's refusal says what it is."""
    out = tmp_path / "x.pt"
    for command in (["train", "--method", "ce"], ["train-lm", "--method", "token-fkl", "--source", "cache:c",
                                                  "--dataset", "text:d", "--val-dataset", "text:d",
                                                  "--student", "m:f"]):  # fmt: skip
        text = refused(invoke(*command, "--epochs", "1", "--out", str(out)), f"--out '{out}'", "ending in .safetensors")
        assert str(out.with_suffix(".safetensors")) in text
    assert not out.exists()
    model = MLP([64, 16, 10])
    save_weights(model, tmp_path / "w.safetensors").rename(out)
    with pytest.raises(
        TeacherLoadError, match=r"is a safetensors file under the suffix '\.pt'.*rename it to 'x\.safetensors'"
    ):
        read_state_dict(out)
    text = refused(invoke("evaluate", "--model", f"kd.models:digits_student@{out}", "--dataset", "digits:test"))
    assert "safetensors file under the suffix" in text and "pickled" not in text
    # a real torch file under .pt still loads (the content check does not take it for safetensors)
    torch.save(model.state_dict(), tmp_path / "real.pt")
    loaded = read_state_dict(tmp_path / "real.pt")
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_connectors_path_keeps_each_out_name_and_is_checked_before_training(tmp_path: Path) -> None:
    """The connectors go to OUT's name with .connectors.safetensors for .safetensors (the name files were
    always written under), and a connectors path that cannot be written is refused before training
    (before: a traceback and exit 1 after the student was trained)."""
    assert connectors_path(Path("runs/student.safetensors")) == Path("runs/student.connectors.safetensors")
    assert connectors_path(Path("runs/s_lr0.05.safetensors")) != connectors_path(Path("runs/s_lr0.1.safetensors"))
    assert connectors_path(Path("runs/s_lr0.05")) == Path("runs/s_lr0.05.connectors.safetensors")
    (tmp_path / "fx.connectors.safetensors").mkdir()
    out = tmp_path / "fx.safetensors"
    refused(
        invoke(
            "train",
            "--method",
            "fitnet",
            "--match",
            "layer2=layer2",
            "--source",
            "local:kd.models:digits_cnn",
            "--student",
            "kd.models:digits_cnn_student",
            "--epochs",
            "1",
            "--out",
            str(out),
        ),  # fmt: skip
        "connectors file",
        f"{tmp_path / 'fx.connectors.safetensors'}' is a directory",
    )
    assert not out.exists()
    # a logit method writes no connectors: the same path is no reason to refuse it
    r = invoke("train", "--method", "ce", "--epochs", "1", "--subset", "32", "--out", str(out))
    assert r.exit_code == 0, r.output


def test_an_out_named_like_a_connectors_file_is_refused(tmp_path: Path) -> None:
    """Run a (a feature method, --out a.safetensors) writes a.connectors.safetensors beside its student;
    another run's --out a.connectors.safetensors would overwrite it (before: exit 0, run a's connectors
    replaced by a student) and is refused before training, its file untouched."""
    out = tmp_path / "a.safetensors"
    cnn = ["--source", "local:kd.models:digits_cnn", "--student", "kd.models:digits_cnn_student", "--epochs", "1",
           "--subset", "32"]  # fmt: skip
    r = invoke("train", "--method", "fitnet", "--match", "layer2=layer2", *cnn, "--out", str(out))
    assert r.exit_code == 0, r.output
    connectors = connectors_path(out)
    before = connectors.read_bytes()
    for method in (["--method", "ce"], ["--method", "fitnet", "--match", "layer2=layer2", *cnn]):
        r = invoke("train", *method, "--epochs", "1", "--subset", "32", "--out", str(connectors))
        refused(r, f"--out {str(connectors)!r}", "ends in .connectors.safetensors",
                f"the connectors of --out {str(out)!r}")  # fmt: skip
        assert connectors.read_bytes() == before


@pytest.mark.parametrize("width", [5, 20])
def test_the_students_outputs_must_match_the_datas_classes(width: int, tmp_path: Path) -> None:
    """kd train and kd evaluate refuse a model with another number of outputs than the data's classes,
    naming both (before: kd evaluate printed top-1 0.0985 for a 5-output model on 10 classes; kd train
    failed at step 0 with "Target 5 is out of bounds", or, with 20 outputs, trained with exit 0)."""
    spec = f"kd.models:MLP?sizes=[64,16,{width}]"
    refused(
        invoke(
            "train",
            "--method",
            "ce",
            "--student",
            spec,
            "--epochs",
            "1",
            "--subset",
            "32",
            "--out",
            str(tmp_path / "s.safetensors"),
            "--run-dir",
            str(tmp_path / "run"),
        ),  # fmt: skip
        f"--student '{spec}' gives {width} outputs per sample but digits/train",
        "has 10 classes",
    )
    assert not (tmp_path / "run" / "checkpoint.pt").exists() and not (tmp_path / "s.safetensors").exists()
    torch.manual_seed(0)
    weights = save_weights(MLP([64, 16, width]), tmp_path / "w.safetensors")
    model = f"kd.models:MLP@{weights}?sizes=[64,16,{width}]"
    refused(invoke("evaluate", "--model", model, "--dataset", "digits:test"),
            f"--model '{model}' gives {width} outputs per sample but digits/test", "has 10 classes")  # fmt: skip


def test_train_student_refuses_a_student_of_another_width_before_the_run(tmp_path: Path) -> None:
    """The shared training entry (kd chain, kd explain, the demos, kd online, kd datafree and kd qkd train
    through it) checks the width as kd train does: a 20-output student on digits used to train with CE and
    return (exit 0), scored over 20 classes; with 5 outputs it failed at its first step (an IndexError)."""
    train, test = open_source("digits:train"), open_source("digits:test")
    for width in (20, 5):
        with pytest.raises(ValueError, match=rf"^the student gives {width} outputs per sample but digits/train.* has "
                                             "10 classes"):  # fmt: skip
            train_student(MLP([64, 16, width]), train, test, TrainConfig(method="ce", epochs=1),
                          subset=torch.arange(32), run_dir=tmp_path / "run")  # fmt: skip
        assert not (tmp_path / "run").exists()


def test_student_weights_that_do_not_fit_are_one_error_line(tmp_path: Path, teacher_spec: str) -> None:
    """--student SPEC@WEIGHTS of another architecture: kd train (and kd qkd, which builds its student the
    same way) refuse it with exit 2 and one error: line naming the file and the mismatch (before: kd
    train printed load_state_dict's traceback, exit 1)."""
    weights = save_weights(MLP([64, 32, 10]), tmp_path / "wide.safetensors")
    spec = f"kd.models:digits_student@{weights}"
    for command in (["train", "--method", "ce", "--epochs", "1"],
                    ["qkd", "--teacher", teacher_spec, "--out", str(tmp_path / "q")]):  # fmt: skip
        refused(
            invoke(*command, "--student", spec),
            f"weights file '{weights}' does not fit the student",
            "size mismatch for 0.weight: copying a param with shape torch.Size([32, 64])",
        )


def test_a_cpu_checkpoint_holds_no_cuda_generators_and_one_that_does_still_resumes(tmp_path: Path) -> None:
    """The CPU side of saving torch.cuda's generators (the CUDA side, resuming a dropout student exactly,
    is tests/test_cuda.py's and runs only on a GPU): a CPU run's checkpoint has no ``cuda_rng``, and a
    CPU resume of a checkpoint that has one ignores it and still ends with the uninterrupted run's weights."""
    train, test = open_source("digits:train"), open_source("digits:test")
    config = TrainConfig(method="ce", epochs=2, batch_size=16)  # 6 steps an epoch
    sub = torch.arange(96)

    def student() -> torch.nn.Module:
        seed_everything(0)
        return MLP([64, 16, 10], dropout=0.5)

    whole = student()
    train_student(whole, train, test, config, subset=sub)
    part = student()
    run = tmp_path / "run"
    steps = iter(range(100))
    train_student(part, train, test, config, subset=sub, run_dir=run, stop=lambda: 15 if next(steps) == 3 else None)
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert "cuda_rng" not in ckpt and ckpt["partial"]["steps"] == 3
    ckpt["cuda_rng"] = [torch.zeros(16, dtype=torch.uint8)]  # as a CUDA run would hold, unreadable here
    torch.save(ckpt, run / "checkpoint.pt")
    resumed = student()
    train_student(resumed, train, test, config, subset=sub, run_dir=run, resume=True)
    for a, b in zip(resumed.state_dict().values(), whole.state_dict().values()):
        assert torch.equal(a, b)


def test_samples_the_student_cannot_take_are_named(tmp_path: Path, teacher_spec: str) -> None:
    """Samples of another shape than the model takes (an RGB folder for a one-channel model): kd train
    and kd evaluate name the samples' shape and the URI options that reshape them (before: only torch's
    "error: RuntimeError: mat1 and mat2 shapes cannot be multiplied (24x8 and 64x16)")."""
    rs = np.random.RandomState(0)
    np.savez(tmp_path / "rgb.npz", x=rs.randint(0, 256, (20, 3, 8, 8)).astype(np.uint8), y=np.arange(20) % 10)
    uri = f"npz:{tmp_path / 'rgb.npz'}"
    spec = "kd.models:digits_student"
    needles = ("cannot take the samples of rgb/train@", "shaped [3, 8, 8]", "give the dataset ?shape=")
    args = ("--dataset", uri, "--val-dataset", uri, "--epochs", "1", "--run-dir", str(tmp_path / "run"))
    refused(invoke("train", "--method", "ce", "--student", spec, *args), f"--student '{spec}'", *needles)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    refused(invoke("evaluate", "--model", teacher_spec, "--dataset", uri), f"--model '{teacher_spec}'", *needles)
