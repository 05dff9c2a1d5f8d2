"""Activation records (teacher_server/records.py, `kd records`) on file datasets: an ``npz``
and a PNG ``imagefolder`` written here hold the same images, streamed in batches through
the data layer. The streaming accumulators are checked against float64 statistics of all
activations at once; the two formats give the same records; `kd records` writes a file
that a real server serves with the dataset's id."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torch import nn
from typer.testing import CliRunner

from kd.cli import app
from kd.core.data import open_source
from kd.teacher_server.client import TeacherClient
from kd.teacher_server.loading import Teacher, load_teacher, save_weights
from kd.teacher_server.records import compute_records
from kd.teacher_server.server import TeacherOptions, start_server

CLASSES, PER_CLASS, SIDE = 4, 12, 8
# head.1 has 6 units and logits 4, fewer than the 12 samples of a class (scatter-matrix path);
# features has 8 x 4 x 4 = 128, more (rows path): both accumulators are checked.
LAYERS = ["features", "head.1", "logits"]
RANK = 3


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int = CLASSES) -> None:
        super().__init__()
        self.input_shape = (3, SIDE, SIDE)
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU()
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 6), nn.ReLU(), nn.Linear(6, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def tiny_cnn(num_classes: int = CLASSES) -> nn.Module:
    """Factory of the teacher's SPEC (this file is importable: tests/ is on sys.path under pytest)."""
    return TinyCNN(num_classes)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("records-data")
    old = os.environ.get("KD_CACHE_DIR")
    os.environ["KD_CACHE_DIR"] = str(root / "kd-cache")
    rs = np.random.RandomState(0)
    labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    base = rs.randint(0, 256, (CLASSES, 1, 1, 3))
    x = np.clip(base[labels] + rs.randint(-60, 61, (len(labels), SIDE, SIDE, 3)), 0, 255).astype(np.uint8)
    np.savez(root / "train.npz", images=x, labels=labels)
    for i, (img, lab) in enumerate(zip(x, labels)):
        d = root / "png" / f"class_{lab}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:03d}.png")
    torch.manual_seed(0)
    weights = save_weights(tiny_cnn(), root / "teacher.safetensors")
    uris = {"npz": f"npz:{root / 'train.npz'}", "png": f"imagefolder:{root / 'png'}"}
    yield root, uris, f"test_records_datasets:tiny_cnn@{weights}"
    if old is None:
        os.environ.pop("KD_CACHE_DIR", None)
    else:
        os.environ["KD_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def teacher(world) -> Teacher:
    return load_teacher("cnn", world[2])


def reference(teacher: Teacher, uri: str) -> dict[str, dict[str, torch.Tensor]]:
    """Float64 statistics of every activation of the dataset at once (one forward of all samples)."""
    src = open_source(uri)
    x = src.get(torch.arange(len(src)))
    modules = dict(teacher.model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    hooks = [modules[n].register_forward_hook(lambda _m, _i, o, n=n: seen.__setitem__(n, o.clone()))
             for n in LAYERS if n != "logits"]  # fmt: skip
    with torch.no_grad():
        seen["logits"] = teacher.model(x)
    for h in hooks:
        h.remove()
    out = {}
    for name in LAYERS:
        a = seen[name].reshape(len(x), -1).double()
        stats: dict[str, list] = {"count": [], "mean": [], "std": [], "vals": [], "cov": []}
        for c in range(CLASSES):
            ac = a[src.labels == c]
            cov = torch.cov(ac.t(), correction=0)
            stats["count"].append(len(ac))
            stats["mean"].append(ac.mean(0))
            stats["std"].append(ac.std(0, unbiased=False))
            stats["vals"].append(torch.linalg.eigvalsh(cov).flip(0)[:RANK])
            stats["cov"].append(cov)
        out[name] = {k: torch.stack(v) if k != "count" else torch.tensor(v) for k, v in stats.items()}
    return out


def test_streaming_records_equal_a_float64_reference_of_all_activations(world, teacher: Teacher) -> None:
    # batches of 5: every class is split across batches, so the accumulators merge partial sums
    recs = compute_records(teacher, open_source(world[1]["npz"]), LAYERS, rank=RANK, batch_size=5)
    ref = reference(teacher, world[1]["npz"])
    for name in LAYERS:
        r = ref[name]
        d = r["mean"].shape[1]
        assert recs[f"{name}/count"].tolist() == [PER_CLASS] * CLASSES
        torch.testing.assert_close(recs[f"{name}/mean"].double(), r["mean"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(recs[f"{name}/std"].double(), r["std"], rtol=1e-5, atol=1e-6)
        vecs = recs[f"{name}/eigvecs"].double()
        assert vecs.shape == (CLASSES, d, RANK)
        for c in range(CLASSES):
            v, lam = vecs[c], r["vals"][c]
            assert float(lam[0]) > 1e-6  # the class's activations vary: the checks below are real
            vals = recs[f"{name}/eigvals"][c].double()
            torch.testing.assert_close(vals, lam, rtol=1e-5, atol=1e-6 * float(lam[0]))
            # eigenvectors of the reference covariance (any basis of a repeated eigenvalue's space
            # passes), orthonormal, with the documented sign
            torch.testing.assert_close(r["cov"][c] @ v, v * lam, rtol=0, atol=1e-6 * float(lam[0]))
            torch.testing.assert_close(v.t() @ v, torch.eye(RANK, dtype=torch.float64), rtol=0, atol=1e-5)
            assert bool((v[v.abs().argmax(0), torch.arange(RANK)] > 0).all())


def test_accumulators_that_would_not_fit_are_refused_up_front(world, teacher: Teacher) -> None:
    with pytest.raises(ValueError, match=r"GiB of accumulators .* record fewer or smaller layers"):
        compute_records(teacher, open_source(world[1]["npz"]), LAYERS, max_bytes=1000)


def test_kd_records_on_npz_and_png_folder_served_with_the_dataset_id(world, teacher: Teacher) -> None:
    root, uris, spec = world
    files = {}
    for fmt, extra in (("npz", []), ("png", ["--workers", "1"])):  # the folder decoded in a worker process
        out = root / f"records-{fmt}.safetensors"
        args = ["records", "--teacher", spec, "--out", out, "--dataset", uris[fmt], "--rank", RANK,
                "--batch-size", 7, *[a for n in LAYERS for a in ("--layer", n)], *extra]  # fmt: skip
        r = CliRunner().invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, r.output
        assert f"from {CLASSES * PER_CLASS} samples" in r.output
        with safe_open(str(out), framework="pt") as f:
            assert f.metadata()["dataset"] == open_source(uris[fmt]).dataset_id
            files[fmt] = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    # lossless PNGs hold the npz's pixels: the same records, whatever the format and the reader
    assert files["npz"].keys() == files["png"].keys()
    for k in files["npz"]:
        torch.testing.assert_close(files["png"][k], files["npz"][k], rtol=1e-5, atol=1e-6)
    direct = compute_records(teacher, open_source(uris["npz"]), LAYERS, rank=RANK, batch_size=7)
    assert all(torch.equal(direct[k], files["npz"][k]) for k in direct)
    # kd serve --records: the server hands the file out with the npz's dataset id
    running = start_server([teacher], options={"cnn": TeacherOptions(records=str(root / "records-png.safetensors"))})
    try:
        with TeacherClient(f"127.0.0.1:{running.port}") as client:
            served, dataset = client.activation_records("cnn")
    finally:
        running.stop(grace=1)
    assert dataset == open_source(uris["png"]).dataset_id
    assert all(torch.equal(served[k], files["png"][k]) for k in files["png"])


def test_kd_records_names_a_bad_dataset_uri(world) -> None:
    r = CliRunner().invoke(app, ["records", "--teacher", world[2], "--out", str(world[0] / "x.safetensors"),
                                 "--dataset", f"npz:{world[0] / 'missing.npz'}"])  # fmt: skip
    assert r.exit_code == 2 and "missing.npz" in r.output
