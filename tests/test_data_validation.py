"""Datasets whose values kd cannot read as they are: refused with the file and the value named,
or read correctly, never silently wrong (16-bit images, bad labels, broken files).

Every file is written here in its real format (Pillow, numpy, ``datasets``, tarfile, the
CIFAR record layout) and opened through ``open_source`` or ``kd precompute``.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kd.core.data import DatasetError, open_source


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path / "kd-cache"))


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def image_bytes(arr: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format=fmt)
    return buf.getvalue()


# -- 16-bit and 32-bit images ------------------------------------------------------------------
def test_16bit_grayscale_png_is_scaled_to_8_bits_not_clipped_to_white(tmp_path: Path) -> None:
    for cls, value in (("a", 30000), ("b", 300)):
        (tmp_path / "d" / cls).mkdir(parents=True)
        Image.fromarray(np.full((4, 5), value, np.uint16)).save(tmp_path / "d" / cls / "0.png")
    assert Image.open(tmp_path / "d" / "a" / "0.png").mode == "I;16"  # what Pillow reads a 16-bit PNG as
    src = open_source(f"imagefolder:{tmp_path / 'd'}?dtype=uint8")
    x = src.get(torch.tensor([0, 1]))
    assert x.shape == (2, 3, 4, 5)
    assert (x[0] == 30000 >> 8).all() and (x[1] == 300 >> 8).all()  # 117 and 1, was 255 and 255
    gray = open_source(f"imagefolder:{tmp_path / 'd'}?mode=L")
    assert torch.equal(gray.get(torch.tensor([0, 1])).flatten(1)[:, 0], torch.tensor([117 / 255, 1 / 255]))


@pytest.mark.parametrize(
    ("arr", "kind"),
    [(np.full((4, 4), 300000, np.int32), "integer"), (np.full((4, 4), 0.5, np.float32), "floating-point")],
)
def test_32bit_images_are_refused_with_the_file_named(tmp_path: Path, arr: np.ndarray, kind: str) -> None:
    shard = write_tar(tmp_path / "s.tar", [("k0.tiff", image_bytes(arr, "TIFF")), ("k0.cls", b"0")])
    src = open_source(f"webdataset:{shard}?image=tiff")
    with pytest.raises(DatasetError, match=rf"'k0'.*s\.tar has 32-bit {kind} pixels"):
        src.get(torch.tensor([0]))


def test_decompression_bomb_png_is_a_dataset_error(tmp_path: Path) -> None:
    (tmp_path / "d" / "a").mkdir(parents=True)
    Image.new("1", (20000, 10000)).save(tmp_path / "d" / "a" / "bomb.png")  # 200 Mpixel, a few kB on disk
    src = open_source(f"imagefolder:{tmp_path / 'd'}?size=8")
    with pytest.raises(DatasetError, match=r"bomb\.png is too large to decode safely"):
        src.get(torch.tensor([0]))
