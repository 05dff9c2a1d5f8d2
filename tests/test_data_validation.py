"""Datasets whose values kd cannot read as they are: refused with the file and the value named,
or read correctly, never silently wrong (16-bit images, bad labels, broken files).

Every file is written here in its real format (Pillow, numpy, ``datasets``, tarfile, the
CIFAR record layout) and opened through ``open_source`` or ``kd precompute``.
"""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_checks import refused
from click.testing import Result
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from kd.cli import app
from kd.core.data import DatasetError, open_source
from kd.teacher_server.loading import load_teacher
from kd.teacher_server.server import start_server

TEACHER = "local:test_data_validation:tiny?num_classes=3&input_shape=3x8x8"
CIFAR10 = [f"data_batch_{k}.bin" for k in range(1, 6)]  # the official binary files, as kd looks for them
CIFAR100 = ["train.bin"]


def tiny(num_classes: int = 3) -> nn.Module:
    """A seeded 3x8x8 image teacher (this module is on pytest's path: ``local:test_data_validation:tiny``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, int(num_classes)))  # fmt: skip


def cli(*args: str) -> Result:
    """``kd ARGS`` in this process (typer's runner on ``kd.cli.app``)."""
    return CliRunner().invoke(app, list(args))


def write_folder(root: Path, n: int = 4, side: int = 8, seed: int = 0) -> Path:
    rs = np.random.RandomState(seed)
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray((rs.rand(side, side, 3) * 255).astype(np.uint8)).save(root / f"c{i % 2}" / f"{i}.png")
    return root


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


# -- precompute options ----------------------------------------------------------------------------
def test_views_on_a_dataset_without_augmentation_is_refused(tmp_path: Path) -> None:
    data = write_folder(tmp_path / "d")
    r = cli("precompute", "--source", TEACHER, "--dataset", f"imagefolder:{data}", "--views", "3",
            "--out", str(tmp_path / "c"), "--workers", "0")  # fmt: skip
    refused(r, "has no augmentation: --views 3 would be 3 copies of the same sample")
    assert not (tmp_path / "c" / "data.mdb").exists()
    r = cli("precompute", "--source", TEACHER, "--dataset", f"imagefolder:{data}?views=flip", "--views", "3",
            "--out", str(tmp_path / "c2"), "--workers", "0")  # fmt: skip
    assert r.exit_code == 0, r.output


# -- labels ---------------------------------------------------------------------------------------
def save_hf(root: Path, labels: list, feature: str) -> Path:
    datasets = pytest.importorskip("datasets")
    imgs = [Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)) for i in range(len(labels))]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.Value(feature)})
    datasets.Dataset.from_dict({"image": imgs, "label": labels}, features=feats).save_to_disk(str(root))
    return root


@pytest.mark.parametrize(
    ("labels", "feature", "message"),
    [
        ([0, None, 2, 1], "int64", r"label column 'label' at row 1 of .* is null: a missing label"),
        ([0.0, 1.5, 2.0, 1.0], "float32", r"label column 'label' at row 1 of .* is 1\.5: not a whole number"),
        ([0, 2, -3, 1], "int64", r"label column 'label' at row 2 of .* is -3: negative"),
        (["cat", "dog", "cat", "dog"], "string", r"label column 'label' at row 0 of .* is 'cat': class labels must be"),
    ],
)
def test_bad_hf_labels_are_refused_naming_the_column_row_and_value(
    tmp_path: Path, labels: list, feature: str, message: str
) -> None:
    src = open_source(f"hf:{save_hf(tmp_path / 'hf', labels, feature)}")
    with pytest.raises(DatasetError, match=message):
        src.labels  # noqa: B018
    with pytest.raises(DatasetError, match=message):
        src.num_classes  # noqa: B018


@pytest.mark.parametrize(
    ("y", "message"),
    [
        (np.full(4, 2**63 + 5, np.uint64), r"label 0 \(array 'y'\) of .*y\.npz is 9223372036854775813: larger than"),
        (np.array([0, 1, -1, 2]), r"label 2 \(array 'y'\) of .*y\.npz is -1: negative"),
    ],
)
def test_bad_npz_labels_are_refused(tmp_path: Path, y: np.ndarray, message: str) -> None:
    np.savez(tmp_path / "y.npz", x=np.zeros((4, 3, 8, 8), np.float32), y=y)
    src = open_source(f"npz:{tmp_path / 'y.npz'}")
    with pytest.raises(DatasetError, match=message):
        src.num_classes  # noqa: B018


@pytest.mark.parametrize(
    ("text", "message"),
    [(b"-1", r"label k1\.cls in .*s\.tar is '-1': class labels are 0\.\."),
     (b"9" * 23, r"label k1\.cls in .*s\.tar is '9{23}': class labels are 0\.\.")],
)  # fmt: skip
def test_bad_tar_labels_are_refused(tmp_path: Path, text: bytes, message: str) -> None:
    png = image_bytes(np.zeros((8, 8, 3), np.uint8), "PNG")
    shard = write_tar(tmp_path / "s.tar", [("k0.png", png), ("k0.cls", b"0"), ("k1.png", png), ("k1.cls", text)])
    with pytest.raises(DatasetError, match=message):
        open_source(f"webdataset:{shard}")


def test_cifar10_label_byte_outside_its_10_classes_is_refused(tmp_path: Path) -> None:
    labels = np.array([3, 9, 200, 1], np.uint8)
    records = np.concatenate([labels[:, None], np.zeros((4, 3072), np.uint8)], axis=1)
    for k in range(1, 6):
        records.tofile(tmp_path / f"data_batch_{k}.bin")
    src = open_source(f"cifar:{tmp_path}")
    with pytest.raises(
        DatasetError, match=r"label byte of record 2 of .*data_batch_1\.bin is 200: outside the 10 classes"
    ):
        src.labels  # noqa: B018


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "the number of classes must be >= 1"),
        ("-5", "the number of classes must be >= 1"),
        ("abc", "expected a whole number of classes"),
        ("2", r"label 2 \(array 'y'\) .* is 2: outside the 2 classes of \?classes=2"),
    ],
)
def test_classes_option_is_checked(tmp_path: Path, value: str, message: str) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 3, 8, 8), np.float32), y=np.array([0, 1, 2, 0]))
    with pytest.raises(DatasetError, match=rf"{message}"):
        open_source(f"npz:{tmp_path / 'd.npz'}?classes={value}").num_classes  # noqa: B018
    assert open_source(f"npz:{tmp_path / 'd.npz'}?classes=5").num_classes == 5


def test_precompute_refuses_a_null_label_before_writing(tmp_path: Path) -> None:
    hf = save_hf(tmp_path / "hf", [0, 1, None, 2], "int64")
    r = cli("precompute", "--source", TEACHER, "--dataset", f"hf:{hf}", "--out", str(tmp_path / "c"), "--workers", "0")
    refused(r, "label column 'label' at row 2", "is null")
    assert not (tmp_path / "c" / "data.mdb").exists()


# -- inputs by reference ------------------------------------------------------------------------------
def test_by_reference_refuses_a_local_dataset_that_is_not_the_servers(tmp_path: Path) -> None:
    served, other = write_folder(tmp_path / "served"), write_folder(tmp_path / "other", seed=1)  # same sizes
    uri = f"imagefolder:{served}?views=flip"
    running = start_server([load_teacher("t", TEACHER.removeprefix("local:"))], port=0,
                           datasets={"good": open_source(uri)})  # fmt: skip
    try:
        source = f"server:127.0.0.1:{running.port}/t"

        def by_ref(dataset: str, out: str, *more: str) -> Result:
            return cli("precompute", "--source", source, "--by-reference", "good", "--dataset", dataset,
                       "--views", "2", "--out", str(tmp_path / out), "--workers", "0", *more)  # fmt: skip

        refused(by_ref(f"imagefolder:{other}?views=flip", "c1"), "--by-reference 'good': the server's dataset is not")
        refused(by_ref(f"imagefolder:{served}?views=flip&size=6", "c2"), "is not --dataset")  # decoded otherwise
        refused(by_ref(f"imagefolder:{served}?views=crop:pad=2", "c3"), "its views are 'flip:p=0.5@v1'")
        r = cli("precompute", "--source", source, "--by-reference", "nope", "--dataset", uri, "--out",
                str(tmp_path / "c4"), "--workers", "0")  # fmt: skip
        refused(r, "the server has no such dataset; it has registered: good")
        assert not any((tmp_path / c / "data.mdb").exists() for c in ("c1", "c2", "c3", "c4"))
        assert by_ref(uri, "ok").exit_code == 0  # the same data: filled
    finally:
        running.stop(grace=1)


# -- user mistakes: a clear error, never a traceback ----------------------------------------------
@pytest.mark.parametrize(
    ("x", "kind"),
    [
        (np.array(["a"] * 4), "text"),
        (np.zeros((4, 3, 8, 8), "datetime64[s]"), "dates"),
        (np.zeros((4, 3, 8, 8), dtype=[("a", "f4")]), "structured records"),
    ],
)
def test_npz_inputs_that_are_not_numbers_are_refused(tmp_path: Path, x: np.ndarray, kind: str) -> None:
    np.savez(tmp_path / "x.npz", x=x, y=np.arange(4) % 2)
    with pytest.raises(DatasetError, match=rf"npz: the inputs \(array 'x' of .*x\.npz\) are .* \({kind}\)"):
        open_source(f"npz:{tmp_path / 'x.npz'}").get(torch.tensor([0]))


def test_hf_dataset_with_no_rows_is_refused(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict({"image": [], "label": []}, features=feats).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(DatasetError, match=r"hf: .*hf.*(has no rows|with at least one row)"):
        open_source(f"hf:{tmp_path / 'hf'}")


def test_hf_image_column_with_a_null_row_is_refused(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    img = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict({"image": [img, None, img], "label": [0, 1, 0]}, features=feats).save_to_disk(
        str(tmp_path / "hf")
    )
    src = open_source(f"hf:{tmp_path / 'hf'}")
    assert src.get(torch.tensor([0])).shape == (1, 3, 8, 8)
    with pytest.raises(DatasetError, match=r"hf: row 1 of .*hf has no image \(null in column 'image'\)"):
        src.get(torch.tensor([1]))


@pytest.mark.parametrize("cut", [100, 600])  # inside the header of k1.png / inside its data
def test_tar_shard_truncated_is_refused(tmp_path: Path, cut: int) -> None:
    png = image_bytes(np.zeros((8, 8, 3), np.uint8), "PNG")
    shard = write_tar(tmp_path / "s.tar", [("k0.png", png), ("k0.cls", b"0"), ("k1.png", png), ("k1.cls", b"1")])
    data = shard.read_bytes()
    k1 = 512 + -(-len(png) // 512) * 512 + 1024  # the header of k1.png
    shard.write_bytes(data[: k1 + cut])
    with pytest.raises(DatasetError, match=r"webdataset: .*s\.tar is truncated or corrupt"):
        open_source(f"webdataset:{shard}")
    whole = write_tar(tmp_path / "whole.tar", [("k0.png", png), ("k0.cls", b"0")])
    assert len(open_source(f"webdataset:{whole}")) == 1


def test_precompute_out_that_is_a_file_or_cannot_be_made_is_refused(tmp_path: Path) -> None:
    data = write_folder(tmp_path / "d")
    (tmp_path / "afile").write_text("not a cache")
    for out, message in ((tmp_path / "afile", "is a file, not a cache directory"),
                         (tmp_path / "afile" / "c", "cannot create the cache directory")):  # fmt: skip
        r = cli("precompute", "--source", TEACHER, "--dataset", f"imagefolder:{data}", "--out", str(out),
                "--workers", "0")  # fmt: skip
        refused(r, f"--out '{out}'", message)
    assert (tmp_path / "afile").read_text() == "not a cache"


def test_cache_export_to_an_unwritable_path_is_refused_and_the_written_name_is_reported(tmp_path: Path) -> None:
    data = write_folder(tmp_path / "d")
    cache = tmp_path / "c"
    assert cli("precompute", "--source", TEACHER, "--dataset", f"imagefolder:{data}", "--out", str(cache),
               "--workers", "0").exit_code == 0  # fmt: skip
    (tmp_path / "afile").write_text("")
    refused(cli("cache", "export", str(cache), "--out", str(tmp_path / "afile" / "x.npz")), "cannot write the export")
    r = cli("cache", "export", str(cache), "--out", str(tmp_path / "foo"))
    assert r.exit_code == 0 and f"exported 4 records to {tmp_path / 'foo.npz'}" in " ".join(r.output.split())
    with np.load(tmp_path / "foo.npz") as z:
        assert z["logits"].shape == (4, 3)


class TokLM(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, 8), nn.Linear(8, vocab)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.embed(tokens))


def toklm(vocab: int = 259) -> nn.Module:
    """A token teacher (``local:test_data_validation:toklm?vocab=V&input_shape=-1``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return TokLM(int(vocab))


def test_token_teacher_with_a_smaller_vocabulary_than_the_tokenizer_is_refused(tmp_path: Path) -> None:
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("hello world, a small corpus of bytes\n" * 4)
    args = ["precompute", "--dataset", f"text:{tmp_path / 'corpus'}?block=8", "--codec", "fp16"]
    r = cli(
        *args, "--source", "local:test_data_validation:toklm?vocab=100&input_shape=-1", "--out", str(tmp_path / "a")
    )
    refused(r, "has a vocabulary of 100 but the dataset's tokenizer has 259 token ids")
    assert not (tmp_path / "a" / "data.mdb").exists()
    r = cli(
        *args, "--source", "local:test_data_validation:toklm?vocab=259&input_shape=-1", "--out", str(tmp_path / "b")
    )
    assert r.exit_code == 0, r.output


def test_a_corrupt_image_read_in_a_worker_is_reported_with_its_own_message(tmp_path: Path) -> None:
    data = write_folder(tmp_path / "d")
    Image.fromarray(np.full((64, 64, 3), 7, np.uint8)).save(tmp_path / "d" / "c1" / "z.jpg", quality=90)
    jpg = (tmp_path / "d" / "c1" / "z.jpg").read_bytes()
    (tmp_path / "d" / "c1" / "z.jpg").write_bytes(jpg[: len(jpg) * 2 // 3])  # the last sample: read in a worker
    r = cli("precompute", "--source", TEACHER, "--dataset", f"imagefolder:{data}?size=8", "--out",
            str(tmp_path / "c"), "--workers", "2")  # fmt: skip
    text = refused(r, f"error: cannot decode image {data / 'c1' / 'z.jpg'}: ")
    assert "Caught" not in text and "DataLoader worker" not in text


# -- unclear messages -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--mean", "0.5,0.5", "--std", "0.2,0.2,0.2"], "mean has 2 value(s) [0.5, 0.5], but teacher 'local' takes 3"),
        (["--mean", "0.5,0.5,0.5", "--std", "0,0.2,0.2"], "std [0.0, 0.2, 0.2]: every value must be > 0"),
        (["--commit-every", "0"], "--batch-size and --commit-every must be >= 1, got 256 and 0"),
        (["--commit-every", "-5"], "--batch-size and --commit-every must be >= 1, got 256 and -5"),
        (["--mean", "abc"], "--mean 'abc': expected comma-separated numbers"),
        # an empty entry was skipped: three values read as the two typed around it, or "0.5,,0.5,0.5" as three
        (["--mean", "0.5,,0.5,0.5"], "--mean '0.5,,0.5,0.5': expected comma-separated numbers"),
        (["--std", "0.2,0.2,"], "--std '0.2,0.2,': expected comma-separated numbers"),
    ],
)
def test_precompute_options_out_of_range_are_refused(tmp_path: Path, options: list[str], message: str) -> None:
    data = write_folder(tmp_path / "d")
    r = cli("precompute", "--source", TEACHER, "--dataset", f"imagefolder:{data}", "--out", str(tmp_path / "c"),
            "--workers", "0", *options)  # fmt: skip
    refused(r, message)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    ("size", "message"), [("0", "rrc size=0: must be 1..8192 pixels"), ("x", "rrc size='x': expected a whole number")]
)
def test_rrc_size_must_be_a_positive_number(tmp_path: Path, size: str, message: str) -> None:
    data = write_folder(tmp_path / "d")
    with pytest.raises(DatasetError, match=rf"views='rrc:size={size}': {message}"):
        open_source(f"imagefolder:{data}?views=rrc:size={size}")


class Pairs(torch.utils.data.Dataset):
    """A map-style dataset of (image, label) with no targets/labels attribute and no declared identity."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.full((3, 8, 8), i / 4), i % 2


def pairs() -> Pairs:
    return Pairs()


def test_module_source_identity_is_the_same_in_every_process(tmp_path: Path) -> None:
    """Its labels (read item by item) are hashed as int64, not as the addresses of Python objects."""
    import os
    import subprocess
    import sys

    uri = "module:test_data_validation:pairs"
    here = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
    code = f"from kd.core.data import open_source; print(open_source({uri!r}).dataset_id)"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert other.returncode == 0, other.stderr
    src = open_source(uri)
    assert src.labels.tolist() == [0, 1, 0, 1]
    assert other.stdout.strip() == src.dataset_id


# -- byte order and damaged files ------------------------------------------------------------------
@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])  # memory-mapped / read into memory
def test_big_endian_npz_arrays_are_read_in_native_order(tmp_path: Path, save) -> None:
    rs = np.random.RandomState(0)
    x, pixels, y = rs.rand(4, 3, 8, 8).astype(np.float32), rs.randint(0, 256, (4, 3, 8, 8)), np.array([0, 2, 1, 2])
    save(tmp_path / "f.npz", x=x.astype(">f4"), y=y.astype(">i8"))
    save(tmp_path / "u.npz", x=pixels.astype(">u2"), y=y.astype(">u2"))  # 16-bit pixel values 0..255
    src = open_source(f"npz:{tmp_path / 'f.npz'}")
    assert torch.equal(src.get(torch.arange(4)), torch.from_numpy(x))  # the values, not byte-swapped garbage
    assert src.labels.tolist() == [0, 2, 1, 2] and src.num_classes == 3
    src = open_source(f"npz:{tmp_path / 'u.npz'}?dtype=uint8")
    assert torch.equal(src.get(torch.arange(4)), torch.from_numpy(pixels.astype(np.uint8)))
    assert src.labels.tolist() == [0, 2, 1, 2]
    r = cli("precompute", "--source", TEACHER, "--dataset", f"npz:{tmp_path / 'f.npz'}", "--out",
            str(tmp_path / "c"), "--workers", "0")  # fmt: skip
    assert r.exit_code == 0, r.output


def _npz_members(path: Path, members: dict[str, bytes], compression: int) -> Path:
    """An npz (a zip of .npy files) written member by member, so a member can be cut short."""
    import zipfile

    with zipfile.ZipFile(path, "w", compression=compression) as z:
        for name, data in members.items():
            z.writestr(name + ".npy", data)
    return path


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_with_a_truncated_member_is_refused_naming_the_file_and_member(tmp_path: Path, compressed: bool) -> None:
    import zipfile

    x = _npy_bytes(np.zeros((4, 3, 8, 8), np.float32))
    y = _npy_bytes(np.array([0, 1, 2, 0]))
    # x last: a memory map of the cut x ran on into the zip's directory (or past the end: numpy's mmap error)
    path = _npz_members(tmp_path / "cut.npz", {"y": y, "x": x[:-1000]},
                        zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED)  # fmt: skip
    with pytest.raises(DatasetError, match=r"npz: member 'x' of .*cut\.npz is truncated"):
        open_source(f"npz:{path}")
    r = cli("precompute", "--source", TEACHER, "--dataset", f"npz:{path}", "--out", str(tmp_path / "c"),
            "--workers", "0")  # fmt: skip
    refused(r, f"member 'x' of {path} is truncated")


@pytest.mark.parametrize(("variant", "names", "record"), [(10, CIFAR10, 3073), (100, CIFAR100, 3074)])
def test_empty_cifar_file_is_refused_naming_the_file_and_record_size(
    tmp_path: Path, variant: int, names: list[str], record: int
) -> None:
    for name in names:
        np.zeros((2, record), np.uint8).tofile(tmp_path / name)
    assert len(open_source(f"cifar:{tmp_path}")) == 2 * len(names)
    (tmp_path / names[-1]).write_bytes(b"")  # a failed copy: every other file whole
    message = f"{tmp_path / names[-1]} is 0 bytes, not a whole number of {record}-byte CIFAR-{variant} records"
    with pytest.raises(DatasetError, match=re.escape(message)):
        open_source(f"cifar:{tmp_path}")
    r = cli("precompute", "--source", TEACHER, "--dataset", f"cifar:{tmp_path}", "--out", str(tmp_path / "c"),
            "--workers", "0")  # fmt: skip
    refused(r, message)


def test_hf_string_labels_are_refused_saying_they_are_strings_and_how_to_encode_them(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    root = save_hf(tmp_path / "hf", ["cat", "dog", "cat", "bird"], "string")
    message = (
        r"label column 'label' at row 0 of .*hf is 'cat': class labels must be integer class ids 0, 1, \.\.\., "
        r"and column 'label' holds strings \(string\); map them to ids with datasets' "
        r"`ds = ds\.class_encode_column\('label'\)`"
    )
    with pytest.raises(DatasetError, match=message):
        open_source(f"hf:{root}").labels  # noqa: B018
    refused(cli("precompute", "--source", TEACHER, "--dataset", f"hf:{root}", "--out", str(tmp_path / "c"),
                "--workers", "0"), "holds strings", "class_encode_column('label')")  # fmt: skip
    # the advice works: the encoded dataset is read, its ClassLabel names are the class names
    datasets.load_from_disk(str(root)).class_encode_column("label").save_to_disk(str(tmp_path / "encoded"))
    src = open_source(f"hf:{tmp_path / 'encoded'}")
    assert src.class_names == ["bird", "cat", "dog"] and src.labels.tolist() == [1, 2, 1, 0]


def test_a_basis_file_for_another_class_count_is_blamed_on_the_file_not_the_cache(tmp_path: Path) -> None:
    from kd.cache.codecs import LowRankBasis

    saved = tmp_path / "basis5.bin"  # a basis of a 5-class teacher's outputs; this teacher has 3 classes
    saved.write_bytes(LowRankBasis.fit(torch.randn(64, 5, generator=torch.Generator().manual_seed(0)), 2).to_bytes())
    data = write_folder(tmp_path / "d")
    r = cli("precompute", "--source", TEACHER, "--dataset", f"imagefolder:{data}", "--codec", "pca:2@8",
            "--basis", str(saved), "--out", str(tmp_path / "c"), "--workers", "0")  # fmt: skip
    text = refused(r, f"--basis '{saved}': the given low-rank basis has 5 classes but the teacher's outputs have 3")
    assert "basis of cache" not in text  # was: "the low-rank basis of cache '...c' is unusable"
    assert not (tmp_path / "c" / "data.mdb").exists()
    (tmp_path / "corpus").mkdir()  # a token teacher: its vocabulary is the class count
    (tmp_path / "corpus" / "a.txt").write_text("hello world, a small corpus of bytes\n" * 4)
    r = cli("precompute", "--dataset", f"text:{tmp_path / 'corpus'}?block=8", "--codec", "pca:2",
            "--source", "local:test_data_validation:toklm?vocab=259&input_shape=-1", "--basis", str(saved),
            "--out", str(tmp_path / "t"))  # fmt: skip
    refused(r, f"--basis '{saved}': the given low-rank basis has 5 classes but the teacher's outputs have 259")


def test_a_refused_precompute_leaves_no_out_directories_behind(tmp_path: Path) -> None:
    data = write_folder(tmp_path / "d")

    def precompute(out: Path, *more: str) -> Result:
        return cli("precompute", "--source", TEACHER, "--dataset", f"imagefolder:{data}", "--out", str(out),
                   "--workers", "0", *more)  # fmt: skip

    # refused after the --out probe (no augmentation for --views 3): was new/deeper left behind
    refused(precompute(tmp_path / "new" / "deeper" / "c", "--views", "3"), "has no augmentation")
    assert not (tmp_path / "new").exists()
    # refused by the probe itself, its parent made first: a name longer than the file system takes
    refused(precompute(tmp_path / "new2" / ("n" * 300)), "cannot create the cache directory")
    assert not (tmp_path / "new2").exists()
    out = tmp_path / "x" / "y" / "c"
    assert precompute(out).exit_code == 0 and (out / "data.mdb").exists()  # what can be made still is


def test_a_truncated_or_misnamed_npy_file_is_named_for_what_it_is(tmp_path: Path) -> None:
    x, y = tmp_path / "x.npy", tmp_path / "y.npy"
    np.save(y, np.array([0, 1, 2, 0]))
    np.save(x, np.zeros((4, 3, 8, 8), np.float32))
    x.write_bytes(x.read_bytes()[:-100])  # cut short: numpy's own words were followed by an unpickling remark
    with pytest.raises(DatasetError) as e:
        open_source(f"npy:{x}?y={y}")
    assert f"npy: {x} is not a readable .npy array" in str(e.value) and "shorter than its header" in str(e.value)
    assert "unpickle" not in str(e.value)
    np.savez(tmp_path / "a.npz", x=np.zeros((4, 3, 8, 8), np.float32))
    x.write_bytes((tmp_path / "a.npz").read_bytes())  # an npz under a .npy name: np.load returned an NpzFile
    with pytest.raises(DatasetError, match=r"is an npz archive, not a \.npy array: read it with npz:"):
        open_source(f"npy:{x}?y={y}")


def test_cache_export_of_one_record_says_1_record(tmp_path: Path) -> None:
    """The count's noun followed it: "exported 1 records" before."""
    data = write_folder(tmp_path / "d", n=2)
    cache = tmp_path / "c"
    r = cli("precompute", "--source", TEACHER, "--dataset", f"imagefolder:{data}", "--out", str(cache),
            "--workers", "0", "--shard", "0/2")  # fmt: skip
    assert r.exit_code == 0, r.output
    (shard,) = cache.glob("shard-*")  # the other shard is not written: its one environment
    r = cli("cache", "export", str(shard), "--out", str(tmp_path / "one.npz"))
    assert r.exit_code == 0 and f"exported 1 record to {tmp_path / 'one.npz'}" in " ".join(r.output.split()), r.output


# -- non-finite inputs ------------------------------------------------------------------------------
def nan_arrays(n: int = 12, bad: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Float images [n, 3, 8, 8] with one NaN and one Inf in sample ``bad``, labels 0, 1, 2, ..."""
    x = np.random.RandomState(0).rand(n, 3, 8, 8).astype(np.float32)
    x[bad, 0, 1, 2], x[bad, 2, 7, 7] = np.nan, -np.inf
    return x, np.arange(n) % 3


@pytest.mark.parametrize("fmt", ["npz", "npz-uint8", "npy", "hf"])
def test_a_float_sample_holding_nan_or_inf_is_refused_naming_it(tmp_path: Path, fmt: str) -> None:
    x, y = nan_arrays()
    if fmt == "hf":
        datasets = pytest.importorskip("datasets")
        datasets.Dataset.from_dict({"pixel_values": x.tolist(), "label": y.tolist()}).save_to_disk(str(tmp_path / "hf"))
        uri, what = f"hf:{tmp_path / 'hf'}", f"row 5 of {tmp_path / 'hf'}"
    elif fmt == "npy":
        np.save(tmp_path / "x.npy", x)
        np.save(tmp_path / "y.npy", y)
        uri, what = f"npy:{tmp_path / 'x.npy'}?y=y.npy", f"sample 5 of {tmp_path / 'x.npy'}"
    else:
        np.savez(tmp_path / "x.npz", x=x, y=y)
        # ?dtype=uint8 made pixels of them: NaN became 0 without a word
        uri = f"npz:{tmp_path / 'x.npz'}" + ("?dtype=uint8" if fmt == "npz-uint8" else "")
        what = f"sample 5 of {tmp_path / 'x.npz'}"
    message = f"{what} holds NaN or Inf (2 of its 192 values): inputs must be finite numbers"
    src = open_source(uri)
    for read in (
        lambda: src.read(5),
        lambda: src.get(torch.arange(12)),  # one slice of the map
        lambda: src.get(torch.tensor([9, 5, 0])),  # one gather
        lambda: src.read_batch(torch.tensor([4, 5]), torch.tensor([0, 1])),  # with seeds
    ):
        with pytest.raises(DatasetError) as e:
            read()
        assert str(e.value) == message + "; fix or drop that sample"
    assert torch.isfinite(src.get(torch.tensor([0, 1, 2, 3, 4, 6, 7]))).all()  # the others are read as they are
    np.savez(tmp_path / "big.npz", x=np.full((4, 3, 8, 8), 3e38, np.float32), y=np.arange(4))
    assert (open_source(f"npz:{tmp_path / 'big.npz'}").get(torch.arange(4)) == 3e38).all()  # finite; their sum is not

    # through the CLI: named before any record (was "put: logits contain NaN or Inf"), and kd train's refusal
    # names the sample (was "the run diverged: lower --lr"), also when a DataLoader worker reads it
    r = cli("precompute", "--source", TEACHER, "--dataset", uri, "--out", str(tmp_path / "c"), "--workers", "0")
    refused(r, message)
    r = cli("train", "--method", "ce", "--dataset", uri, "--val-dataset", uri, "--student", TEACHER[6:], "--epochs",
            "1", "--out", str(tmp_path / "s.safetensors"), "--workers", "2")  # fmt: skip
    assert "Caught" not in refused(r, message) and not (tmp_path / "s.safetensors").exists()


def test_a_data_error_in_a_kd_train_worker_is_its_own_message_not_torchs_traceback(tmp_path: Path) -> None:
    data = write_folder(tmp_path / "d", n=8)
    (tmp_path / "d" / "c1" / "7.png").write_bytes((tmp_path / "d" / "c1" / "7.png").read_bytes()[:60])
    for command in (["train", "--method", "ce"], ["train", "--source", TEACHER]):
        uri = f"imagefolder:{data}?classes=3"  # the teacher's 3 classes
        r = cli(*command, "--dataset", uri, "--val-dataset", uri, "--student", TEACHER[6:], "--epochs", "1",
                "--out", str(tmp_path / "s.safetensors"), "--workers", "2")  # fmt: skip
        text = refused(r, f"error: cannot decode image {data / 'c1' / '7.png'}: ")
        assert "Caught" not in text and "DataLoader worker" not in text


def test_tar_shard_hard_links_are_read_as_their_file_and_symbolic_links_refused(tmp_path: Path) -> None:
    rs = np.random.RandomState(0)
    a, b = (image_bytes((rs.rand(8, 8, 3) * 255).astype(np.uint8), "PNG") for _ in range(2))

    def link(name: str, kind: bytes, target: str) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, target
        return info

    def shard(path: Path, last: tarfile.TarInfo) -> Path:
        # GNU tar writes a file's second name (a hard link, e.g. a duplicate image) as a link to its first
        write_tar(path, [("s0.png", a), ("s0.cls", b"0"), ("s1.png", b), ("s1.cls", b"1"), ("s2.cls", b"2")])
        with tarfile.open(path, "a") as tf:
            tf.addfile(last)
        return path

    src = open_source(f"webdataset:{shard(tmp_path / 'h.tar', link('s2.png', tarfile.LNKTYPE, 's0.png'))}")
    assert len(src) == 3 and src.labels.tolist() == [0, 1, 2]  # was: "sample 's2' ... has no image member"
    assert torch.equal(src.get(torch.tensor([2])), src.get(torch.tensor([0])))  # s2 is s0's bytes
    assert not torch.equal(src.get(torch.tensor([1])), src.get(torch.tensor([0])))
    with pytest.raises(DatasetError) as e:
        open_source(f"webdataset:{shard(tmp_path / 's.tar', link('s2.png', tarfile.SYMTYPE, 's1.png'))}")
    assert str(e.value).startswith(f"webdataset: member s2.png in {tmp_path / 's.tar'} is a symbolic link (to s1.png)")
    with pytest.raises(DatasetError, match=r"member s2\.png in .* is a hard link to s9\.png, which is not a file"):
        open_source(f"webdataset:{shard(tmp_path / 'x.tar', link('s2.png', tarfile.LNKTYPE, 's9.png'))}")


def test_macos_appledouble_files_in_an_image_folder_are_not_images(tmp_path: Path) -> None:
    # A folder copied from a Mac to another file system has a "._NAME" metadata file beside each
    # file; kd refused the whole folder on the first ("cannot identify image").
    clean = write_folder(tmp_path / "clean")
    mac = write_folder(tmp_path / "mac")
    for png in list(mac.rglob("*.png")):
        (png.parent / f"._{png.name}").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # AppleDouble magic
    a, b = open_source(f"imagefolder:{clean}"), open_source(f"imagefolder:{mac}")
    assert len(b) == len(a) == 4
    assert torch.equal(b.get(torch.arange(4)), a.get(torch.arange(4)))
