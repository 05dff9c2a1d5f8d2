"""`kd qkd` (student_trainer/qkd.py) on file datasets: the same images written here as an
``npz`` and as a PNG ``imagefolder`` (train and val splits), streamed through the data layer
(the folder decoded in a worker process). Both runs must give the same QKD result, and the
saved int8 student must score on the validation split what the run reports."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from kd.cli import app
from kd.core.data import open_source
from kd.student_trainer.evaluate import evaluate
from kd.student_trainer.qkd import quiet_quantization_warnings
from kd.teacher_server.loading import save_weights

CLASSES, SIDE = 4, 8


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int = CLASSES) -> None:
        super().__init__()
        self.input_shape = (3, SIDE, SIDE)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1))
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def tiny_cnn(num_classes: int = CLASSES) -> nn.Module:
    """The teacher's factory (this file is importable: tests/ is on sys.path under pytest)."""
    return TinyCNN(num_classes)


def tiny_student(num_classes: int = CLASSES) -> nn.Module:
    """A quantizable student on 3 x 8 x 8 images (Linear+ReLU fuse into one int8 kernel)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIDE * SIDE, 16), nn.ReLU(), nn.Linear(16, num_classes))
    model.input_shape = (3, SIDE, SIDE)
    return model


def _images(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rs = np.random.RandomState(seed)
    labels = np.repeat(np.arange(CLASSES), per_class)
    base = np.random.RandomState(0).randint(0, 256, (CLASSES, 1, 1, 3))  # the same class colours in both splits
    x = np.clip(base[labels] + rs.randint(-60, 61, (len(labels), SIDE, SIDE, 3)), 0, 255).astype(np.uint8)
    return x, labels


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("qkd-data")
    old = os.environ.get("KD_CACHE_DIR")
    os.environ["KD_CACHE_DIR"] = str(root / "kd-cache")
    uris: dict[str, dict[str, str]] = {"npz": {}, "png": {}}
    for split, per_class, seed in (("train", 10, 1), ("val", 4, 2)):
        x, y = _images(per_class, seed)
        np.savez(root / f"{split}.npz", images=x, labels=y)
        for i, (img, lab) in enumerate(zip(x, y)):
            d = root / "png" / split / f"class_{lab}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i:03d}.png")
        uris["npz"][split] = f"npz:{root / f'{split}.npz'}"
        uris["png"][split] = f"imagefolder:{root / 'png' / split}"
    torch.manual_seed(0)
    teacher = tiny_cnn()
    x, y = _images(10, 1)
    inputs = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(40):
        loss = nn.functional.cross_entropy(teacher(inputs), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    weights = save_weights(teacher, root / "teacher.safetensors")
    yield root, uris, f"test_qkd_datasets:tiny_cnn@{weights}"
    if old is None:
        os.environ.pop("KD_CACHE_DIR", None)
    else:
        os.environ["KD_CACHE_DIR"] = old


def _qkd(world, fmt: str, out: Path, *extra: str):
    root, uris, spec = world
    args = ["qkd", "--teacher", spec, "--student", "test_qkd_datasets:tiny_student", "--dataset", uris[fmt]["train"],
            "--val-dataset", uris[fmt]["val"], "--epochs-self", "1", "--epochs-co", "2", "--epochs-tutor", "1",
            "--batch-size", "8", "--out", str(out), *extra]  # fmt: skip
    return CliRunner().invoke(app, args)


def test_kd_qkd_on_npz_and_png_folder(world, tmp_path: Path) -> None:
    _, uris, spec = world
    results = {}
    for fmt, extra in (("npz", ()), ("png", ("--workers", "1"))):
        r = _qkd(world, fmt, tmp_path / fmt, *extra)
        assert r.exit_code == 0, r.output
        res = json.loads((tmp_path / fmt / "results.json").read_text())
        assert res["dataset"] == open_source(uris[fmt]["train"]).dataset_id
        assert {p: len(v) for p, v in res["acc_per_epoch"].items()} == {
            "self_studying": 1, "co_studying": 2, "tutoring": 1}  # fmt: skip
        assert len(res["teacher_acc_per_epoch"]) == 2 and res["teacher"]["spec"] == spec
        # the saved int8 student scores on the validation split what the run reports
        with quiet_quantization_warnings():
            scripted = torch.jit.load(str(tmp_path / fmt / "student-int8.torchscript.pt"))
            acc = evaluate(scripted, open_source(uris[fmt]["val"]))
        assert acc.n == CLASSES * 4 and acc.top1 == res["int8_acc"]
        assert (tmp_path / fmt / "teacher-co-studied.safetensors").is_file()
        results[fmt] = res
    # lossless PNGs hold the npz's pixels and the batch order is seeded: the same run, whoever decodes
    keys = ("float_acc", "int8_acc", "agreement", "acc_per_epoch", "loss_per_epoch", "teacher_acc_per_epoch",
            "teacher_acc_before", "teacher_acc_after")  # fmt: skip
    assert {k: results["png"][k] for k in keys} == {k: results["npz"][k] for k in keys}
    assert all(loss > 0 for losses in results["npz"]["loss_per_epoch"].values() for loss in losses)


def test_kd_qkd_off_digits_needs_a_val_dataset_and_a_teacher(world, tmp_path: Path) -> None:
    _, uris, _ = world
    r = CliRunner().invoke(app, ["qkd", "--dataset", uris["npz"]["train"], "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "--val-dataset URI is required" in r.output
    r = CliRunner().invoke(app, ["qkd", "--dataset", uris["npz"]["train"], "--val-dataset", uris["npz"]["val"],
                                 "--out", str(tmp_path / "b")])  # fmt: skip
    assert r.exit_code == 2 and "without --teacher a digits teacher is trained here" in r.output
