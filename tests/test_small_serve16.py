"""Small refusals that named the wrong thing (issue 16's small items), over real servers, real
files and real CLI runs: a non-finite sample sent by value is named by the dataset sample the
client's batch holds, not only by its row in the request; an hf image that does not decode is
named by its row without Pillow's "<_io.BytesIO object at 0x...>"; --server-timeout without a
server is refused rather than ignored."""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from cli_checks import refused
from PIL import Image
from typer.testing import CliRunner

from kd.cli import app
from kd.core.data import DatasetError, open_source
from kd.student_trainer.sources import Batch, ServerSource
from kd.teacher_server.client import TeacherRequestError
from kd.teacher_server.server import RunningServer


def test_a_non_finite_sample_sent_by_value_is_named_by_its_dataset_index(server: RunningServer) -> None:
    source = ServerSource(f"127.0.0.1:{server.port}", "digits", depth=2, timeout=10)
    x = torch.rand(4, 64)
    x[2, 7] = float("nan")
    batches = [
        Batch(torch.tensor([0, 1, 2, 3]), torch.rand(4, 64), torch.zeros(4, dtype=torch.long)),
        Batch(torch.tensor([40, 41, 42, 43]), x, torch.zeros(4, dtype=torch.long), torch.tensor([0, 3, 1, 2])),
    ]
    try:
        with pytest.raises(TeacherRequestError) as e:
            list(source.iter_outputs(batches, []))
    finally:
        source.close()
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.message.endswith(
        "NaN or Inf in 1 of the request's 4 sample(s), first in row 2 of the inputs (counted from 0): "
        "dataset sample 42, view 1"
    ), e.value.message


def test_an_hf_image_that_does_not_decode_is_named_by_row_without_pillows_stream(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    good = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good, format="PNG")
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    rows = {"image": [{"bytes": good.getvalue(), "path": None}, {"bytes": b"not an image", "path": None}],
            "label": [0, 1]}  # fmt: skip
    datasets.Dataset.from_dict(rows, features=feats).save_to_disk(str(tmp_path / "hf"))
    src = open_source(f"hf:{tmp_path / 'hf'}")
    assert tuple(src.get(torch.tensor([0]), None).shape) == (1, 3, 8, 8)
    with pytest.raises(DatasetError) as e:
        src.get(torch.tensor([1]), None)
    assert str(e.value) == f"cannot decode image row 1 of {tmp_path / 'hf'}: cannot identify image file"


TRAIN_LM = "train-lm --source cache:{tmp}/c --dataset text:{tmp}/x --val-dataset text:{tmp}/x --student m:f"


@pytest.mark.parametrize(
    ("args", "got"),
    [
        ("train --source cache:{tmp}/c --dataset digits:train", "cache:{tmp}/c"),
        (
            "precompute --source local:kd.models:digits_teacher --dataset digits:train --out {tmp}/out",
            "local:kd.models:digits_teacher",
        ),  # fmt: skip
        (TRAIN_LM, "cache:{tmp}/c"),
    ],
    ids=["train", "precompute", "train-lm"],
)
def test_server_timeout_without_a_server_is_refused(tmp_path: Path, args: str, got: str) -> None:
    # --server-timeout with a cache: or local: teacher was ignored without a word; refused before any
    # work, as --server-topk is (the cache and the output are never made).
    r = CliRunner().invoke(app, [*args.format(tmp=tmp_path).split(), "--server-timeout", "5"])
    refused(r, f"--server-timeout applies only with a server: teacher; got {got.format(tmp=tmp_path)}: "
               "it would be ignored")  # fmt: skip
    assert not (tmp_path / "out").exists()
