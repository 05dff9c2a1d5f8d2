"""Seeded, replayable views: parsing, drawing, applying, replay across processes, final transforms."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kd.core.data import augment, load_dataset, loader, open_source
from kd.core.views import (
    IDENTITY_PARAMS,
    PARAM_NAMES,
    PARAM_WIDTH,
    Final,
    ViewPolicy,
    apply_params,
    conform,
)

RS = np.random.RandomState(5)
IMAGES = (RS.rand(10, 20, 16, 3) * 255).astype(np.uint8)  # H=20, W=16


def write_folder(root: Path) -> None:
    for i, a in enumerate(IMAGES):
        d = root / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(d / f"{i:02d}.png")


def params(**kw: float) -> torch.Tensor:
    p = IDENTITY_PARAMS.clone()
    for k, v in kw.items():
        p[PARAM_NAMES.index(k)] = v
    return p


def test_parse_names_and_errors() -> None:
    assert ViewPolicy.parse("crop:pad=4;flip").name == "crop:pad=4;flip:p=0.5@v1"
    assert ViewPolicy.parse("shift1") == ViewPolicy.parse("crop:pad=1")
    assert ViewPolicy.parse("none").is_identity and ViewPolicy.parse(None).name == "none@v1"
    rrc = ViewPolicy.parse("rrc:size=32,scale=0.25-1;flip;jitter:brightness=0.2")
    assert rrc.rrc_size == 32 and rrc.rrc_scale == (0.25, 1.0) and rrc.needs_raw
    assert (rrc.brightness, rrc.contrast, rrc.saturation) == (0.2, 0.0, 0.0)
    assert ViewPolicy.parse(rrc.name.split("@")[0]) == rrc  # the name parses back to the policy
    assert ViewPolicy.parse("jitter").contrast == 0.4
    with pytest.raises(ValueError, match="unknown view op 'spin'; known: rrc, crop, flip, jitter"):
        ViewPolicy.parse("spin")
    with pytest.raises(ValueError, match="rrc scale: expected a range"):
        ViewPolicy.parse("rrc:scale=small")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['pads'\]"):
        ViewPolicy.parse("crop:pads=3")


def test_draw_is_deterministic_bounded_and_varied() -> None:
    pol = ViewPolicy.parse("rrc:size=8,scale=0.2-0.6,ratio=0.5-2;crop:pad=2;flip;jitter:brightness=0.3")
    draws = torch.stack([pol.draw(s, 40, 30) for s in range(400)])
    assert draws.shape == (400, PARAM_WIDTH) and draws.dtype == torch.float32
    assert torch.equal(draws[17], pol.draw(17, 40, 30))
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(draws[17], pol.draw(17, 40, 30))
    top, left, h, w = draws[:, 0], draws[:, 1], draws[:, 2], draws[:, 3]
    assert bool(((top + h) <= 1 + 1e-6).all() and ((left + w) <= 1 + 1e-6).all())
    area = h * w
    assert float(area.min()) >= 0.2 - 0.03 and float(area.max()) <= 0.6 + 0.03  # rounding to whole pixels
    aspect = (w * 30) / (h * 40)
    assert float(aspect.min()) >= 0.5 * 0.9 and float(aspect.max()) <= 2 * 1.1
    assert set(draws[:, 4].long().tolist()) == {-2, -1, 0, 1, 2}
    assert 0.4 < float(draws[:, 6].mean()) < 0.6 and set(draws[:, 6].tolist()) == {0.0, 1.0}
    assert 0.7 <= float(draws[:, 7].min()) and float(draws[:, 7].max()) <= 1.3 and len(set(draws[:, 7].tolist())) > 300
    assert (draws[:, 8:] == 1).all()  # contrast and saturation off


def test_rrc_falls_back_to_a_centre_crop_like_torchvision() -> None:
    pol = ViewPolicy.parse("rrc:scale=0.9-1,ratio=1-1")
    p = pol.draw(0, 100, 10)  # a square of 90% of the area never fits a 100x10 image
    assert torch.allclose(p[:4], torch.tensor([0.45, 0.0, 0.1, 1.0]))


def test_apply_crop_shift_flip_jitter_semantics() -> None:
    img = torch.rand(3, 20, 16)
    box = apply_params(img, params(top=0.25, left=0.5, height=0.5, width=0.25), size=(10, 4))
    assert torch.equal(box, img[:, 5:15, 8:12])  # box size == output size: a pure slice
    resized = apply_params(img, params(top=0.25, left=0.5, height=0.5, width=0.25), size=(5, 2))
    want = F.interpolate(img[None, :, 5:15, 8:12], size=(5, 2), mode="bilinear", antialias=True)[0]
    assert torch.equal(resized, want)
    shifted = apply_params(img, params(dy=2, dx=-3))
    ref = np.zeros((3, 20, 16), np.float32)
    ref[:, 2:, :13] = img.numpy()[:, :18, 3:]  # content moves down 2, left 3, zero fill
    assert torch.equal(shifted, torch.from_numpy(ref))
    assert torch.equal(apply_params(img, params(flip=1)), img.flip(-1))
    assert torch.equal(apply_params(img, params(brightness=1.5)), (img * 1.5).clamp(0, 1))
    gray = 0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]
    assert torch.equal(apply_params(img, params(saturation=0.0)), gray.expand(3, -1, -1).clamp(0, 1))
    assert torch.equal(apply_params(img, IDENTITY_PARAMS), img)
    u8 = (img * 255).round().to(torch.uint8)
    assert torch.equal(apply_params(u8, params(flip=1)), u8.float().flip(-1) / 255)
    with pytest.raises(ValueError, match="CHW"):
        apply_params(img[0], IDENTITY_PARAMS)


def test_shift1_is_the_digits_augmentation_pixel_for_pixel() -> None:
    train = load_dataset("digits", "train")
    pol = ViewPolicy.parse("shift1")
    for i, seed in enumerate(range(0, 65536 * 300, 65536 * 3 + 11)):
        x = train.inputs[i]
        assert torch.equal(pol.apply(x.reshape(1, 8, 8), pol.draw(seed, 8, 8)).reshape(64), augment("digits", x, seed))


def test_stored_params_replay_the_view(tmp_path: Path) -> None:
    write_folder(tmp_path / "d")
    src = open_source(f"imagefolder:{tmp_path / 'd'}?views=rrc:size=8,scale=0.3-1;flip;jitter:brightness=0.4")
    raw = torch.from_numpy(np.array(Image.open(sorted((tmp_path / "d" / "c1").iterdir())[0]).convert("RGB")))
    raw = raw.permute(2, 0, 1)  # class c1's first file is sample 5
    for seed in (5 * 65536, 5 * 65536 + 3, 12345):
        x, p = src.read(5, seed)
        assert x.shape == (3, 8, 8)
        stored = np.frombuffer(p.numpy().tobytes(), dtype=np.float32)  # what a cache keeps: 40 bytes
        assert torch.equal(apply_params(raw, torch.from_numpy(stored.copy()), size=(8, 8)), x)
    a, b = src.read(5, 5 * 65536)[0], src.read(5, 5 * 65536 + 1)[0]
    assert not torch.equal(a, b)
    u8 = open_source(f"imagefolder:{tmp_path / 'd'}?dtype=uint8&views=crop:pad=3;flip")
    f32 = open_source(f"imagefolder:{tmp_path / 'd'}?views=crop:pad=3;flip")
    assert torch.equal(u8.read(2, 99)[0].float() / 255, f32.read(2, 99)[0])  # integer shifts stay exact


REPLAY = r"""
import sys, torch
from kd.core.data import loader, open_source
src = open_source(sys.argv[1])
torch.manual_seed(999)  # another global RNG state: must not matter
batches = list(loader(src, batch_size=3, num_views=4, fresh_views=True, shuffle_seed=11, workers=int(sys.argv[3])))
keys = ("indices", "views", "inputs", "params")
torch.save({k: torch.cat([getattr(b, k) for b in batches]) for k in keys}, sys.argv[2])
"""


def test_views_replay_pixel_identically_in_another_process_and_worker_count(tmp_path: Path) -> None:
    write_folder(tmp_path / "d")
    uri = f"imagefolder:{tmp_path / 'd'}?views=rrc:size=12,scale=0.2-1;flip;jitter"
    out = tmp_path / "views.pt"
    env = {**os.environ, "KD_CACHE_DIR": str(tmp_path / "cache")}
    subprocess.run([sys.executable, "-c", REPLAY, uri, str(out), "2"], check=True, env=env, timeout=120)
    theirs = torch.load(out, weights_only=True)
    src = open_source(uri)
    mine = list(loader(src, batch_size=4, num_views=4, fresh_views=True, shuffle_seed=11, workers=0))
    for k in ("indices", "views", "inputs", "params"):
        assert torch.equal(torch.cat([getattr(b, k) for b in mine]), theirs[k]), k
    assert sorted(theirs["indices"].tolist()) == list(range(10))
    # Replay from the stored params alone: no policy, no RNG.
    for j in range(10):
        i = int(theirs["indices"][j])
        raw = src._raw(i)
        assert torch.equal(apply_params(raw, theirs["params"][j], size=(12, 12)), theirs["inputs"][j])


def test_teacher_and_student_share_the_view_but_not_the_final_transform(tmp_path: Path) -> None:
    write_folder(tmp_path / "d")
    src = open_source(f"imagefolder:{tmp_path / 'd'}?views=rrc:size=16;flip")
    batch = next(iter(loader(src, batch_size=4, num_views=2, workers=0)))
    imagenet = Final(size=24, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    teacher_x, student_x = imagenet(batch.inputs), Final(size=12)(batch.inputs)
    assert teacher_x.shape == (4, 3, 24, 24) and student_x.shape == (4, 3, 12, 12)
    up = F.interpolate(batch.inputs, size=(24, 24), mode="bilinear", antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.equal(teacher_x, (up - mean) / std)
    u8 = (batch.inputs * 255).round().to(torch.uint8)
    assert torch.allclose(Final()(u8), batch.inputs, atol=0.5 / 255)


def test_conform_shapes_inputs_for_the_teacher() -> None:
    flat = load_dataset("digits", "test").inputs[:5]
    assert torch.equal(conform(flat, (1, 8, 8)), flat.reshape(5, 1, 8, 8))
    img = torch.rand(2, 3, 16, 16)
    assert conform(img, (3, 16, 16)) is img
    assert conform(img, (3, 8, 8)).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"shape \[3, 16, 16\] cannot be fed to a model that takes \[1, 28, 28\]"):
        conform(img, (1, 28, 28))
