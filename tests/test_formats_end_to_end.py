"""Every dataset format end to end through the CLI: real files written here, one real
`kd serve` process that registers all of them, `kd precompute --views 2` by reference
through that server and in process, `kd cache verify`, and `kd train --dataset URI
--val-dataset URI` from the cache and from the server; plus a `kill -9` and resume of
`kd precompute` on an image folder and `kd train` under torchrun with 2 ranks.

Each format holds the same tiny task (10 classes, 4 training and 2 validation images of
8x8 per class) written with the format's own tools (Pillow, numpy, ``datasets``, the CIFAR
record layout, tarfile). The per-format matrix runs the ``kd`` commands in this process
(typer's runner: the same argument parsing and command code, without paying a Python +
torch start-up per command on a 2-core CI machine); the server, the killed precompute and
the torchrun ranks are separate processes.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from kd.cache import CacheReader
from kd.cli import app
from kd.core.data import open_source
from kd.student_trainer.evaluate import evaluate
from kd.teacher_server.loading import load_teacher, save_weights

HERE = Path(__file__).resolve().parent
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, SIDE, VIEWS = 10, 4, 2, 8, 2
N_TRAIN, N_VAL = CLASSES * TRAIN_PER_CLASS, CLASSES * VAL_PER_CLASS
STUDENT = "test_formats_end_to_end:tiny_cnn?width=4"
AUG = "views=crop:pad=2;flip"  # the seeded views the teacher and the student both see


class TinyCNN(nn.Module):
    """A small convnet on 3 x SIDE x SIDE images (no BatchNorm: DDP ranks equal one process)."""

    def __init__(self, num_classes: int = CLASSES, width: int = 8) -> None:
        super().__init__()
        self.input_shape = (3, SIDE, SIDE)
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU()
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def tiny_cnn(num_classes: int = CLASSES, width: int = 8) -> nn.Module:
    """Factory for ``kd serve`` / ``kd train`` specs (this file is importable with tests/ on PYTHONPATH)."""
    return TinyCNN(num_classes, width)


def images(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """[N, SIDE, SIDE, 3] uint8 images whose colour depends on the class, and their labels."""
    rs = np.random.RandomState(seed)
    labels = np.repeat(np.arange(CLASSES), n_per_class)
    base = rs.randint(0, 256, (CLASSES, 1, 1, 3))
    x = np.clip(base[labels] + rs.randint(-40, 41, (len(labels), SIDE, SIDE, 3)), 0, 255).astype(np.uint8)
    return x, labels


def write_folder(root: Path, x: np.ndarray, y: np.ndarray, fmt: str) -> None:
    for i, (img, lab) in enumerate(zip(x, y)):
        d = root / f"class_{lab}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:03d}.{fmt.lower().replace('jpeg', 'jpg')}", format=fmt, quality=95)


def write_shards(root: Path, prefix: str, x: np.ndarray, y: np.ndarray, shards: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    per = -(-len(x) // shards)
    for s in range(shards):
        with tarfile.open(root / f"{prefix}-{s:03d}.tar", "w") as tf:
            for i in range(s * per, min((s + 1) * per, len(x))):
                buf = io.BytesIO()
                Image.fromarray(x[i]).save(buf, format="PNG")
                for name, payload in ((f"{i:06d}.png", buf.getvalue()), (f"{i:06d}.cls", str(y[i]).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))


def write_cifar(root: Path, train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray]) -> None:
    """The binary CIFAR-10 layout: label byte + R, G, B planes of 32x32 (the 8x8 images blown up 4x)."""
    root.mkdir(parents=True)

    def records(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        big = x.repeat(4, axis=1).repeat(4, axis=2).transpose(0, 3, 1, 2).reshape(len(x), 3072)
        return np.concatenate([y.astype(np.uint8)[:, None], big], axis=1)

    parts = np.array_split(np.arange(len(train[0])), 5)
    for k, part in enumerate(parts, 1):
        records(train[0][part], train[1][part]).tofile(root / f"data_batch_{k}.bin")
    records(*val).tofile(root / "test_batch.bin")
    (root / "batches.meta.txt").write_text("\n".join(f"class_{c}" for c in range(CLASSES)) + "\n")


@dataclass
class World:
    root: Path
    uris: dict[str, tuple[str, str]]  # format -> (train URI with views, val URI)
    teacher_spec: str
    env: dict[str, str]


FORMATS = ("png", "jpeg", "npz", "hf", "cifar", "webdataset")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("formats")
    old = os.environ.get("KD_CACHE_DIR")
    os.environ["KD_CACHE_DIR"] = str(root / "kd-cache")  # manifest sidecars of this process and the others
    train, val = images(TRAIN_PER_CLASS, 0), images(VAL_PER_CLASS, 1)
    uris: dict[str, tuple[str, str]] = {}
    for fmt, ext in (("png", "PNG"), ("jpeg", "JPEG")):
        write_folder(root / fmt / "train", *train, ext)
        write_folder(root / fmt / "val", *val, ext)
        uris[fmt] = (f"imagefolder:{root / fmt / 'train'}?{AUG}", f"imagefolder:{root / fmt / 'val'}")
    np.savez(root / "train.npz", images=train[0], labels=train[1])
    np.savez(root / "val.npz", images=val[0], labels=val[1])
    uris["npz"] = (f"npz:{root / 'train.npz'}?{AUG}", f"npz:{root / 'val.npz'}")
    try:
        import datasets

        feats = datasets.Features(
            {"img": datasets.Image(), "label": datasets.ClassLabel(names=[f"class_{c}" for c in range(CLASSES)])}
        )
        splits = {
            name: datasets.Dataset.from_dict(
                {"img": [Image.fromarray(a) for a in x], "label": y.tolist()}, features=feats
            )
            for name, (x, y) in (("train", train), ("test", val))
        }
        datasets.DatasetDict(splits).save_to_disk(str(root / "hf"))
        uris["hf"] = (f"hf:{root / 'hf'}?split=train&{AUG}", f"hf:{root / 'hf'}?split=test")
    except ImportError:  # `datasets` is an optional dependency: the hf case is skipped without it
        pass
    write_cifar(root / "cifar-10-batches-bin", train, val)
    uris["cifar"] = (f"cifar:{root}?size={SIDE}&{AUG}", f"cifar:{root}?split=test&size={SIDE}")
    write_shards(root / "wds", "train", *train, shards=2)
    write_shards(root / "wds", "val", *val, shards=1)
    uris["webdataset"] = (
        f"webdataset:{root / 'wds'}/train-{{000..001}}.tar?{AUG}",
        f"webdataset:{root / 'wds'}/val-000.tar",
    )
    # The teacher: trained briefly here on the training images, saved as safetensors.
    torch.manual_seed(0)
    teacher = tiny_cnn(width=8)
    x = torch.from_numpy(train[0]).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(train[1])
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(60):
        loss = nn.functional.cross_entropy(teacher(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    weights = save_weights(teacher, root / "teacher.safetensors")
    path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    yield World(root, uris, f"test_formats_end_to_end:tiny_cnn@{weights}?width=8", env)
    if old is None:
        os.environ.pop("KD_CACHE_DIR", None)
    else:
        os.environ["KD_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def served(world: World):
    """One `kd serve` process: the teacher, and every format registered for inputs by reference."""
    port_file = world.root / "port"
    log_path = world.root / "serve.log"
    datasets = [a for fmt, (uri, _) in world.uris.items() for a in ("--dataset", f"{fmt}={uri}")]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kd", "serve", "--teacher", f"t={world.teacher_spec}", *datasets, "--port", "0",
             "--port-file", str(port_file), "--max-queue-delay-us", "500"],
            stdout=log, stderr=subprocess.STDOUT, env=world.env,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while not port_file.exists():
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "kd serve did not start"
                time.sleep(0.05)
            yield f"127.0.0.1:{port_file.read_text()}"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, log_path.read_text()  # drained cleanly
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log_path.read_text()
    for fmt in world.uris:  # the server opened every format's files
        assert f"dataset {fmt} " in text, text


def kd_here(*args: object) -> subprocess.CompletedProcess:
    """A ``kd`` command run in this process; returns what a subprocess run would (rc, stdout, stderr)."""
    r = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)


def result_line(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def all_keys(n: int, views: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(n).repeat_interleave(views), torch.arange(views).repeat(n)


def check_student(out: Path, run: Path, line: dict, val_uri: str, epochs: int) -> None:
    """The recorded metrics are the saved student's top-1/top-5 on the validation split."""
    val = open_source(val_uri)
    student = tiny_cnn(width=4)
    student.load_state_dict(load_file(str(out)))
    acc = evaluate(student, val)
    assert acc.n == N_VAL == len(val)
    assert line["test_acc"] == acc.top1 and line["test_top5"] == acc.top5, (line, acc)
    assert line["val_dataset"] == val.dataset_id
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(epochs))
    assert float(rows[-1]["test_acc"]) == acc.top1 and float(rows[-1]["test_top5"]) == acc.top5
    r = kd_here("evaluate", "--model", f"test_formats_end_to_end:tiny_cnn@{out}?width=4", "--dataset", val_uri)
    assert result_line(r) == {"model": f"test_formats_end_to_end:tiny_cnn@{out}?width=4", "dataset": val.dataset_id,
                              "top1": acc.top1, "top5": acc.top5, "n": N_VAL}  # fmt: skip
    assert f"top-1 {acc.top1:.4f}, top-5 {acc.top5:.4f} on {val.dataset_id} ({N_VAL} samples)" in r.stderr


@pytest.mark.parametrize("fmt", FORMATS)
def test_format_served_precomputed_verified_and_trained(fmt: str, world: World, served: str, tmp_path: Path):
    if fmt not in world.uris:
        pytest.skip("the optional dependency `datasets` is not installed")
    uri, val_uri = world.uris[fmt]
    src = open_source(uri)
    assert len(src) == N_TRAIN and src.num_classes == CLASSES
    total = N_TRAIN * VIEWS

    # Precompute the same (sample, view) pairs twice: the server reading the files by
    # reference (its registered dataset), and this process reading them for a local teacher.
    by_server, in_process = tmp_path / "by-server", tmp_path / "in-process"
    r = kd_here("precompute", "--source", f"server:{served}/t", "--by-reference", fmt, "--dataset", uri,
                "--views", VIEWS, "--workers", 0, "--batch-size", 16, "--out", by_server)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"wrote {total}, skipped 0" in r.stderr
    r = kd_here("precompute", "--source", f"local:{world.teacher_spec}", "--dataset", uri, "--views", VIEWS,
                "--workers", 0, "--batch-size", 16, "--out", in_process)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"wrote {total}, skipped 0" in r.stderr
    for cache in (by_server, in_process):
        v = kd_here("cache", "verify", cache)
        assert v.returncode == 0 and f"{total}/{total} records good, 0 corrupt, 0 missing" in v.stderr, v.stderr

    a, b = CacheReader(by_server), CacheReader(in_process)
    assert sorted(a.keys()) == sorted(b.keys()) == sorted(zip(*(t.tolist() for t in all_keys(N_TRAIN, VIEWS))))
    assert a.meta.dataset_id == b.meta.dataset_id == src.dataset_id and a.meta.views == VIEWS
    assert a.meta.dataset_manifest["format"] == {"png": "imagefolder", "jpeg": "imagefolder"}.get(fmt, fmt)
    idx, views = all_keys(N_TRAIN, VIEWS)
    x = src.get(idx, views)
    assert not torch.equal(x, src.get(idx)), "the views must differ from the plain samples"
    teacher = load_teacher("t", world.teacher_spec)
    with torch.inference_mode():
        want = teacher.model(x)
    # The server's targets, this process's and the teacher's on the seeded views: the same.
    torch.testing.assert_close(a.get(idx, views), b.get(idx, views), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.get(idx, views), want, rtol=1e-5, atol=1e-6)

    # Train the student from the cache and from the live server, evaluated on the val split.
    lines = {}
    for name, source in (("cache", f"cache:{by_server}"), ("server", f"server:{served}/t")):
        out, run = tmp_path / f"{name}.safetensors", tmp_path / f"run-{name}"
        r = kd_here("train", "--source", source, "--dataset", uri, "--val-dataset", val_uri, "--views", VIEWS,
                    "--student", STUDENT, "--epochs", 2, "--batch-size", 16, "--opt", "temperature=2",
                    "--out", out, "--run-dir", run)  # fmt: skip
        lines[name] = line = result_line(r)
        assert line["dataset"] == src.dataset_id and line["world_size"] == 1
        assert f"top-1 {line['test_acc']:.4f}, top-5 {line['test_top5']:.4f} on {line['val_dataset']}" in r.stderr
        check_student(out, run, line, val_uri, epochs=2)
    # Same targets, same seed, same views: the two students end with the same weights.
    one, two = load_file(str(tmp_path / "cache.safetensors")), load_file(str(tmp_path / "server.safetensors"))
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-4, atol=1e-5)


def test_val_dataset_is_required_off_digits_and_must_match_the_classes(world: World) -> None:
    uri, val_uri = world.uris["png"]
    r = kd_here("train", "--method", "ce", "--dataset", uri, "--student", STUDENT, "--epochs", 1)
    assert r.returncode == 2 and "--val-dataset URI is required" in r.stderr
    # A val folder without one of the classes would shift the labels after it: refused.
    partial = world.root / "partial-val"
    x, y = images(1, 2)
    write_folder(partial, x[y != 3], y[y != 3], "PNG")
    r = kd_here("train", "--method", "ce", "--dataset", uri, "--val-dataset", f"imagefolder:{partial}",
                "--student", STUDENT, "--epochs", 1)  # fmt: skip
    assert r.returncode == 2 and "both must hold the same classes" in r.stderr
    r = kd_here("train", "--method", "ce", "--dataset", uri, "--val-dataset", f"imagefolder:{world.root / 'nope'}",
                "--student", STUDENT, "--epochs", 1)  # fmt: skip
    assert r.returncode == 2 and "does not exist" in r.stderr
    # A config file names the datasets by URI too (keys as the options are spelled).
    config = world.root / "train.yaml"
    config.write_text(f"method: ce\ndataset: '{uri}'\nval-dataset: '{val_uri}'\nstudent: '{STUDENT}'\nepochs: 1\n")
    line = result_line(kd_here("train", "--config", config))
    assert line["dataset"] == open_source(uri).dataset_id and line["val_dataset"] == open_source(val_uri).dataset_id
    # digits keeps its default: the bundled test split.
    line = result_line(kd_here("train", "--method", "ce", "--epochs", 1, "--subset", 50))
    assert line["val_dataset"] == open_source("digits:test").dataset_id and line["test_top5"] >= line["test_acc"]


def test_kill_9_and_resume_precompute_of_an_image_folder(world: World, tmp_path: Path) -> None:
    """A precompute killed mid-way keeps every committed record; the rerun adds exactly the rest."""
    x, y = images(30, 3)  # 300 PNGs x 8 views: long enough to be killed part-way
    write_folder(tmp_path / "big", x, y, "PNG")
    uri = f"imagefolder:{tmp_path / 'big'}?{AUG}"
    # A slower teacher than the tiny one: a WRN-16-2 (seeded weights in a file, so the rerun matches).
    torch.manual_seed(0)
    from kd.student_trainer.zoo import wrn_16_2

    spec = f"kd.student_trainer.zoo:wrn_16_2@{save_weights(wrn_16_2(CLASSES), tmp_path / 'w.safetensors')}"
    spec += f"?num_classes={CLASSES}&input_shape=3x{SIDE}x{SIDE}"
    out, views, total = tmp_path / "c", 8, len(x) * 8
    cmd = [sys.executable, "-m", "kd", "precompute", "--source", f"local:{spec}", "--dataset", uri, "--out", str(out),
           "--views", str(views), "--batch-size", "8", "--commit-every", "32", "--workers", "0"]  # fmt: skip
    log = open(tmp_path / "precompute.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=world.env)
    deadline, committed = time.monotonic() + 180, 0
    try:
        while committed < 96:
            if proc.poll() is not None:
                log.close()
                pytest.fail(f"precompute ended before it could be killed: {(tmp_path / 'precompute.log').read_text()}")
            assert time.monotonic() < deadline, "precompute made no progress"
            if (out / "data.mdb").exists():
                try:
                    committed = len(CacheReader(out))
                except Exception:  # noqa: BLE001 - metadata not committed yet
                    committed = 0
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    after = CacheReader(out).verify()
    assert after.problems == [] and 96 <= after.present < total, (after.present, after.problems)
    resumed = kd_here("precompute", "--source", f"local:{spec}", "--dataset", uri, "--out", out, "--views", views,
                      "--workers", 0)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert f"wrote {total - after.present}, skipped {after.present} already cached" in resumed.stderr
    v = kd_here("cache", "verify", out)
    assert v.returncode == 0 and f"{total}/{total} records good, 0 corrupt, 0 missing" in v.stderr, v.stderr
    reader = CacheReader(out)
    keys = list(reader.keys())
    assert len(keys) == len(set(keys)) == total
    src = open_source(uri)
    idx, vw = torch.tensor([0, 137, 299, 5]), torch.tensor([7, 0, 3, 4])
    with torch.inference_mode():
        want = load_teacher("w", spec).model(src.get(idx, vw))
    torch.testing.assert_close(reader.get(idx, vw), want, rtol=1e-5, atol=1e-5)


@pytest.mark.serial
def test_torchrun_two_ranks_train_from_an_image_folder_cache(world: World, tmp_path: Path) -> None:
    """`kd train` under torchrun (2 CPU ranks, gloo) on a file dataset ends where one process does."""
    uri, val_uri = world.uris["png"]
    cache = tmp_path / "c"
    r = kd_here("precompute", "--source", f"local:{world.teacher_spec}", "--dataset", uri, "--views", VIEWS,
                "--workers", 0, "--out", cache)  # fmt: skip
    assert r.returncode == 0, r.stderr
    # 40 samples in batches of 16: the last global batch (8) splits 4 + 4 across the ranks.
    args = ["train", "--source", f"cache:{cache}", "--dataset", uri, "--val-dataset", val_uri, "--views", str(VIEWS),
            "--student", STUDENT, "--epochs", "2", "--batch-size", "16"]  # fmt: skip
    one = result_line(kd_here(*args, "--out", tmp_path / "one.safetensors"))
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "kd", *args,
         "--out", str(tmp_path / "two.safetensors")],
        capture_output=True, text=True, timeout=300, env=world.env,
    )  # fmt: skip
    two = result_line(ddp)
    assert two["world_size"] == 2 and one["world_size"] == 1
    a, b = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    torch.manual_seed(0)
    init = tiny_cnn(width=4).state_dict()
    assert any(not torch.allclose(init[k], a[k]) for k in a)  # training moved the weights
    assert abs(two["test_acc"] - one["test_acc"]) <= 1 / N_VAL
