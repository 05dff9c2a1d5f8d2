"""User-given sizes that are multiplied into one allocation have an upper bound, checked where
the option is parsed: a mistyped size is refused naming the option and the bound, before any
work, instead of being tried as a 100-GB allocation at the first read (or killing the process
on an overcommitting machine). Real CLI runs and real datasets the tests write."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cli_checks import refused
from PIL import Image
from test_serve_options import serve
from typer.testing import CliRunner

from kd.cache.codecs import get_codec
from kd.cli import app
from kd.core.data import DatasetError, open_source
from kd.core.factory import FactoryError, parse_options
from kd.core.samples import MAX_CROP_PAD, MAX_IMAGE_SIDE, MAX_SAMPLE_ELEMENTS
from kd.core.views import ViewPolicy
from kd.teacher_server.loading import load_teacher
from kd.teacher_server.server import start_server


def _image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


@pytest.mark.parametrize(
    ("views", "needles"),
    [
        ("crop:pad=100000", ["crop pad=100000", f"1..{MAX_CROP_PAD} pixels"]),
        ("rrc:size=100000", ["rrc size=100000", f"1..{MAX_IMAGE_SIDE} pixels"]),
        ("crop:pad=x", ["crop pad='x'", "whole number"]),
    ],
)
def test_view_sizes_are_bounded_when_parsed(views: str, needles: list[str]) -> None:
    with pytest.raises(ValueError) as e:
        ViewPolicy.parse(views)
    for needle in needles:
        assert needle in str(e.value), str(e.value)


def test_the_bounds_leave_real_sizes_alone(tmp_path: Path) -> None:
    # The largest values the bounds allow still parse (and one read of a small image still works).
    assert ViewPolicy.parse(f"crop:pad={MAX_CROP_PAD};rrc:size={MAX_IMAGE_SIDE}").pad == MAX_CROP_PAD
    assert parse_options("input_shape=1x512x512x512", "m:f")[1] == (1, 512, 512, 512)
    assert parse_options("input_shape=-1", "m:f")[1] == (-1,)  # a token teacher's variable length
    src = open_source(f"imagefolder:{_image_folder(tmp_path / 'img')}?size=16&views=crop:pad=4")
    assert tuple(src.get(np.array([0]), np.array([1])).shape) == (1, 3, 16, 16)


def test_an_input_shape_over_the_bound_is_refused_when_the_spec_is_parsed() -> None:
    with pytest.raises(FactoryError) as e:
        parse_options("input_shape=3x100000x100000", "m:f")
    assert "input_shape '3x100000x100000'" in str(e.value)
    assert f"30,000,000,000 values per sample is over the bound of {MAX_SAMPLE_ELEMENTS:,}" in str(e.value)


@pytest.mark.parametrize(
    ("option", "needle"),
    [
        ("size=100000", f"size='100000': images are resized to at most {MAX_IMAGE_SIDE} pixels a side"),
        ("size=20x100000", f"at most {MAX_IMAGE_SIDE} pixels a side"),
        ("shape=3x100000x100000", "shape='3x100000x100000': 30,000,000,000 values per sample is over the bound"),
    ],
)
def test_dataset_sizes_over_the_bound_are_refused_when_opened(tmp_path: Path, option: str, needle: str) -> None:
    root = _image_folder(tmp_path / "img")
    with pytest.raises(DatasetError) as e:
        open_source(f"imagefolder:{root}?{option}")
    assert needle in str(e.value), str(e.value)


def test_sample_rounds_are_bounded_when_the_codec_is_parsed() -> None:
    assert get_codec("sample:12x256").rounds == 256
    with pytest.raises(ValueError, match=r"'sample:12x1000000000': at most 256 rounds \(R of sample:KxR\)"):
        get_codec("sample:12x1000000000")


def test_kd_serve_refuses_a_dataset_with_a_view_over_the_bound(tmp_path: Path, teacher_spec: str) -> None:
    root = _image_folder(tmp_path / "img")
    # A run that starts serving anyway (the old behaviour) is stopped once it writes its port file.
    r = serve(
        tmp_path, "--port", "0", "-t", f"t={teacher_spec}", "--dataset", f"d=imagefolder:{root}?views=crop:pad=100000"
    )
    refused(r, "views='crop:pad=100000'", f"must be 1..{MAX_CROP_PAD} pixels")


def test_kd_train_refuses_a_student_input_shape_over_the_bound(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["train", "--method", "ce", "--epochs", "1", "--dataset", "digits:train",
                                 "--student", "kd.models:digits_student?input_shape=3x100000x100000"])  # fmt: skip
    refused(r, "input_shape '3x100000x100000'", "over the bound of 268,435,456")


def test_kd_datafree_refuses_a_batch_over_the_bound() -> None:
    # A CNN teacher of [1, 8, 8] inputs, as dafl's generator makes them.
    r = start_server([load_teacher("cnn", "kd.models:digits_cnn")], port=0)
    try:
        res = CliRunner().invoke(app, ["datafree", "dafl", "--server", f"127.0.0.1:{r.port}/cnn", "--steps", "1",
                                       "--batch-size", "100000000", "--val-dataset", "none"])  # fmt: skip
    finally:
        r.stop(grace=1)
    refused(res, "dafl: batch_size 100000000 of inputs [1, 8, 8]", "at most 2,147,483,648 values (2**31)")
