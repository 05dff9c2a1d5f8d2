"""The view is shared, the final transform is per model (issue 13, "augmentation-consistent targets").

A PNG folder of 40x40 images written here, seeded views ``rrc:size=32;flip`` (32x32 crops),
a teacher taking [3, 24, 24] with its own mean/std and a student taking [3, 16, 16]. One
dataset URI serves both: the teacher side maps each view to its input (resize + its
normalisation: a local teacher, a client sending pixels by value and a server reading them by
reference all do the same), the student side applies its own ``Final`` on the device.
The cache keeps the data identity and the view policy (the teacher's final transform is in its
fingerprint), and by reference it stores the view params the server drew.

Both models only accept their own resolution (their heads flatten the feature map), so a
missing resize fails loudly; forward hooks check what the student's first conv sees.
"""

from __future__ import annotations

import os

import grpc
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from kd.cache import StaleCacheError
from kd.cache.sharded import open_cache
from kd.cli import app
from kd.core.data import open_source
from kd.core.samples import VIEW_STRIDE
from kd.core.views import Final, apply_params
from kd.precompute import precompute, read_view_params
from kd.student_trainer.sources import CacheSource, LocalSource, ServerSource
from kd.student_trainer.train import TrainConfig, train_student
from kd.teacher_server.client import DatasetRef, TeacherClient, TeacherRequestError
from kd.teacher_server.loading import load_teacher
from kd.teacher_server.server import TeacherOptions, start_server

CLASSES, PER_CLASS, SIDE, VIEWS = 3, 4, 40, 3
N = CLASSES * PER_CLASS
POLICY = "rrc:size=32;flip"
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
TEACHER_SPEC = "test_final_transform:tiny_teacher"
STUDENT_SPEC = "test_final_transform:tiny_student"


class FixedSizeCNN(nn.Module):
    """A conv, a stride-2 conv, a head over the flattened map: takes only ``side`` x ``side``."""

    def __init__(self, side: int, width: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)  # the same weights in every process that builds it
        self.input_shape = (3, side, side)
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.head = nn.Linear(width * (side // 2) ** 2, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1))


def tiny_teacher() -> nn.Module:
    return FixedSizeCNN(24, 6, seed=1)


def tiny_student() -> nn.Module:
    return FixedSizeCNN(16, 4, seed=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("final")
    old = os.environ.get("KD_CACHE_DIR")
    os.environ["KD_CACHE_DIR"] = str(root / "kd-cache")
    rs = np.random.RandomState(0)
    for i in range(N):
        d = root / "images" / f"class_{i % CLASSES}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rs.randint(0, 256, (SIDE, SIDE, 3)).astype(np.uint8)).save(d / f"{i:02d}.png")
    src = open_source(f"imagefolder:{root / 'images'}?views={POLICY}")
    teacher = load_teacher("t", TEACHER_SPEC)
    running = start_server([teacher], port=0, datasets={"d": src},
                           options={"t": TeacherOptions(mean=MEAN, std=STD, warmup=False)})  # fmt: skip
    address = f"127.0.0.1:{running.port}"
    caches = {}
    try:
        sources = {
            "local": LocalSource(teacher, mean=MEAN, std=STD),
            "value": ServerSource(address, "t"),
            "ref": ServerSource(address, "t", dataset="d", num_views=VIEWS),
        }
        for name, teacher_source in sources.items():
            with teacher_source:
                caches[name] = root / name
                precompute(src, teacher_source, caches[name], views=VIEWS, batch_size=5, workers=0, progress=False)
        yield {"root": root, "src": src, "teacher": teacher, "address": address, "caches": caches}
    finally:
        running.stop(grace=1)
        if old is None:
            os.environ.pop("KD_CACHE_DIR", None)
        else:
            os.environ["KD_CACHE_DIR"] = old


KEYS = [(0, 0), (0, 2), (5, 1), (7, 0), (11, 2)]


def _teacher_on(teacher, pixels: torch.Tensor, final: Final) -> torch.Tensor:
    with torch.inference_mode():
        return teacher.model(final(pixels))


def test_cached_targets_are_the_teacher_on_its_own_final_transform(world) -> None:
    src, teacher = world["src"], world["teacher"]
    idx = torch.tensor([i for i, _ in KEYS])
    vw = torch.tensor([v for _, v in KEYS])
    pixels = torch.stack([src.read(i, i * VIEW_STRIDE + v)[0] for i, v in KEYS])
    assert pixels.shape == (len(KEYS), 3, 32, 32)  # the shared view: 32x32 crops of 40x40 images
    want = _teacher_on(teacher, pixels, Final(size=24, mean=tuple(MEAN), std=tuple(STD)))
    unnormalised = _teacher_on(teacher, pixels, Final(size=24))
    fingerprints = set()
    for name, path in world["caches"].items():
        reader = open_cache(path)
        fingerprints.add(reader.meta.teacher_fingerprint)
        assert reader.meta.augmentation == src.augmentation and reader.meta.dataset_id == src.dataset_id
        got = reader.targets(idx, vw)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
        assert not torch.allclose(got, unnormalised, atol=1e-3), name  # the teacher's mean/std were applied
    # A local teacher with the server's normalisation makes targets of the same identity.
    with ServerSource(world["address"], "t") as served:
        assert fingerprints == {served.fingerprint}
    assert fingerprints != {teacher.weights_fingerprint}


def test_by_reference_stores_the_view_params_the_server_drew(world) -> None:
    src, teacher, caches = world["src"], world["teacher"], world["caches"]
    idx = torch.arange(N).repeat_interleave(VIEWS)
    vw = torch.arange(VIEWS).repeat(N)
    by_value = read_view_params(caches["local"], idx, vw)
    by_ref = read_view_params(caches["ref"], idx, vw)
    assert torch.equal(by_ref, by_value)
    assert torch.equal(read_view_params(caches["value"], idx, vw), by_value)
    assert len({tuple(p[:4].tolist()) for p in by_ref}) > N  # crops differ across samples and views
    assert set(by_ref[:, 6].tolist()) == {0.0, 1.0}  # some views flipped, some not
    # Replaying the stored params on the decoded image gives the teacher's pixels and targets.
    reader = open_cache(caches["ref"])
    final_t = Final(size=24, mean=tuple(MEAN), std=tuple(STD))
    for i, v in KEYS:
        params = read_view_params(caches["ref"], [i], [v])[0]
        raw = src.read(i)[0]  # the plain 40x40 image
        replayed = apply_params(raw, params, (32, 32))
        assert torch.equal(replayed, src.read(i, i * VIEW_STRIDE + v)[0])
        torch.testing.assert_close(reader.targets(torch.tensor([i]), torch.tensor([v])),
                                   _teacher_on(teacher, replayed[None], final_t), rtol=1e-5, atol=1e-5)  # fmt: skip
    with TeacherClient(world["address"]) as client:
        out = client.infer("t", ref=DatasetRef("d", [3, 4], [3 * VIEW_STRIDE + 1, 4 * VIEW_STRIDE], True))
        assert torch.equal(out["view_params"], read_view_params(caches["local"], [3, 4], [1, 0]))
        assert "view_params" not in client.infer("t", ref=DatasetRef("d", [3], [3 * VIEW_STRIDE + 1]))
        with pytest.raises(TeacherRequestError, match="needs view_seeds") as err:
            client.infer("t", ref=DatasetRef("d", [3], None, True))
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def _student_sees(world, source, input_size: int = 16) -> tuple[set[tuple[int, ...]], nn.Module]:
    src = world["src"]
    test = open_source(f"imagefolder:{world['root'] / 'images'}")  # plain 40x40 samples
    student = tiny_student()
    seen: set[tuple[int, ...]] = set()
    student.conv1.register_forward_hook(lambda _m, inp, _o: seen.add(tuple(inp[0].shape[1:])))
    config = TrainConfig(method="kd", epochs=1, batch_size=5, views=VIEWS, input_size=input_size)
    with source:
        train_student(student, src, test, config, source=source)
    return seen, student


def test_the_student_trains_at_its_own_resolution_from_the_cache_and_the_server(world) -> None:
    seen_cache, from_cache = _student_sees(world, CacheSource(str(world["caches"]["local"])))
    assert seen_cache == {(3, 16, 16)}  # training views and evaluation samples alike
    seen_ref, from_ref = _student_sees(world, ServerSource(world["address"], "t", dataset="d", num_views=VIEWS))
    seen_value, from_value = _student_sees(world, ServerSource(world["address"], "t"))
    assert seen_ref == seen_value == {(3, 16, 16)}
    for other in (from_ref, from_value):  # the same targets, so the same student
        for a, b in zip(from_cache.parameters(), other.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # Without its Final the student meets 32x32 views and cannot take them: refused before any step,
    # probed on a training view (the stored 40x40 sample is not what the loop feeds).
    with pytest.raises(ValueError, match=r"cannot take the samples .* shaped \[3, 32, 32\]"):
        _student_sees(world, CacheSource(str(world["caches"]["local"])), input_size=0)


def test_a_cache_made_with_another_view_policy_is_refused(world) -> None:
    other = open_source(f"imagefolder:{world['root'] / 'images'}?views=crop:pad=4;flip")
    assert other.dataset_id == world["src"].dataset_id  # the same data; only the views differ
    path = world["root"] / "other-views"
    with LocalSource(world["teacher"], mean=MEAN, std=STD) as local:
        precompute(other, local, path, views=VIEWS, batch_size=6, workers=0, progress=False)
    with pytest.raises(ValueError, match="made with 'crop:pad=4;flip:p=0.5@v1'"):
        _student_sees(world, CacheSource(str(path)))
    with pytest.raises(StaleCacheError, match="augmentation"):
        open_cache(path, augmentation=world["src"].augmentation)


def test_cli_precompute_local_teacher_and_train_at_another_resolution(world) -> None:
    root = world["root"]
    uri = f"imagefolder:{root / 'images'}?views={POLICY}"
    runner = CliRunner()
    out = root / "cli-cache"
    res = runner.invoke(app, ["precompute", "--source", f"local:{TEACHER_SPEC}", "--out", str(out), "--dataset", uri,
                              "--views", str(VIEWS), "--workers", "0", "--mean", ",".join(map(str, MEAN)),
                              "--std", ",".join(map(str, STD))])  # fmt: skip
    assert res.exit_code == 0, res.output
    a, b = open_cache(out), open_cache(world["caches"]["ref"])
    assert a.meta.teacher_fingerprint == b.meta.teacher_fingerprint
    idx, vw = torch.arange(N).repeat_interleave(VIEWS), torch.arange(VIEWS).repeat(N)
    torch.testing.assert_close(a.targets(idx, vw), b.targets(idx, vw), rtol=1e-5, atol=1e-5)
    res = runner.invoke(app, ["train", "--source", f"cache:{out}", "--dataset", uri,
                              "--val-dataset", f"imagefolder:{root / 'images'}", "--student", STUDENT_SPEC,
                              "--views", str(VIEWS), "--epochs", "1", "--batch-size", "6", "--input-size", "16",
                              "--input-mean", "0.5,0.5,0.5", "--input-std", "0.25,0.25,0.25"])  # fmt: skip
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["train", "--source", f"cache:{out}", "--dataset", uri,
                              "--val-dataset", f"imagefolder:{root / 'images'}", "--student", STUDENT_SPEC,
                              "--views", str(VIEWS), "--epochs", "1", "--batch-size", "6"])  # fmt: skip
    assert res.exit_code != 0 and "mat1 and mat2" in res.output  # 32x32 views reach a 16x16 student
    val = ["--model", STUDENT_SPEC, "--dataset", f"imagefolder:{root / 'images'}"]
    res = runner.invoke(app, ["evaluate", *val, "--input-size", "16"])
    assert res.exit_code == 0 and '"n": 12' in res.output, res.output
    assert runner.invoke(app, ["evaluate", *val]).exit_code != 0  # 40x40 samples do not fit it
