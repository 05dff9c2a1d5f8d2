"""Dataset folders and shards that broke kd's readers without a word (session 17's attack on them).

Every file is written here with its format's own tools (Pillow, tarfile) in tmp dirs; the per-file
hash sidecars go to a tmp ``KD_CACHE_DIR``.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kd.core.data import DatasetError, open_source

OLD_NS = 1_600_000_000_000_000_000  # an mtime long before any hashing: the sidecar trusts it


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path / "kd-cache"))


def png(path: Path | bytes, value: int) -> None:
    """A 4x4 RGB PNG of one grey level, stored uncompressed: every such file has the same size."""
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(path, format="PNG", compress_level=0)


def test_a_link_looping_back_into_its_own_folder_is_refused_not_read_forty_times(tmp_path: Path) -> None:
    root = tmp_path / "loop"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            png(root / c / f"{i}.png", 50 * i)
    assert len(open_source(f"imagefolder:{root}")) == 4
    (root / "a" / "deeper").mkdir()
    os.symlink("..", root / "a" / "deeper" / "up")  # a/deeper/up -> a: a loop
    # The old code walked a/deeper/up/deeper/up/... until the path was too long: 80 extra samples of class a
    with pytest.raises(DatasetError) as e:
        open_source(f"imagefolder:{root}")
    link = root / "a" / "deeper" / "up"
    assert str(e.value).startswith(f"imagefolder: {link} links to {root / 'a'}, a folder it is in")
    os.unlink(root / "a" / "deeper" / "up")
    os.symlink(str(root / "b"), root / "a" / "deeper" / "b")  # a link elsewhere is no loop: read as files of a
    src = open_source(f"imagefolder:{root}")
    assert len(src) == 6 and src.labels.tolist() == [0, 0, 0, 0, 1, 1]


def test_a_file_name_that_is_not_utf8_is_read_and_its_hash_kept(tmp_path: Path) -> None:
    root = tmp_path / "latin1"
    (root / "c").mkdir(parents=True)
    png(os.fsencode(root / "c") + b"/caf\xe9.png", 200)  # a Latin-1 name: not UTF-8
    png(root / "c" / "plain.png", 10)
    os.utime(root / "c" / "plain.png", ns=(OLD_NS, OLD_NS))
    os.utime(os.fsencode(root / "c") + b"/caf\xe9.png", ns=(OLD_NS, OLD_NS))
    # The old code raised UnicodeEncodeError writing the hash sidecar (a traceback from kd precompute)
    first = open_source(f"imagefolder:{root}")
    assert len(first) == 2 and first.get(torch.tensor([0]))[0, 0, 0, 0].item() == pytest.approx(200 / 255)
    again = open_source(f"imagefolder:{root}")
    assert again.dataset_id == first.dataset_id and again.manifest()["dataset_id"] == first.dataset_id
    png(os.fsencode(root / "c") + b"/caf\xe9.png", 201)
    assert open_source(f"imagefolder:{root}").dataset_id != first.dataset_id


@pytest.mark.parametrize("how", ["rewritten", "renamed over"])
def test_a_file_replaced_with_the_same_size_and_mtime_changes_the_dataset_id(tmp_path: Path, how: str) -> None:
    # cp -p, rsync -t, touch -r or an extracted archive carry an mtime over: the old sidecar trusted the kept
    # hash on (size, mtime) alone, so the id stayed and a resumed precompute kept the old image's targets
    root = tmp_path / "data"
    (root / "c").mkdir(parents=True)
    target = root / "c" / "x.png"
    png(target, 0)
    os.utime(target, ns=(OLD_NS, OLD_NS))
    first = open_source(f"imagefolder:{root}").dataset_id
    assert open_source(f"imagefolder:{root}").dataset_id == first  # kept hash: unchanged
    if how == "rewritten":
        png(target, 255)
    else:
        png(tmp_path / "other.png", 255)
        os.replace(tmp_path / "other.png", target)
    os.utime(target, ns=(OLD_NS, OLD_NS))
    src = open_source(f"imagefolder:{root}")
    assert src.get(torch.tensor([0])).min().item() == 1.0  # the new pixels are read ...
    assert src.dataset_id != first  # ... and the id says the data changed


def test_a_tar_shard_replaced_with_the_same_size_and_mtime_is_indexed_again(tmp_path: Path) -> None:
    def shard(labels: bytes) -> None:
        with tarfile.open(tmp_path / "s.tar", "w") as tf:
            for k, lab in enumerate(labels):
                for name, payload in ((f"{k}.png", b"\x89PNG not read here"), (f"{k}.cls", bytes([lab]))):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(payload), 0
                    tf.addfile(info, io.BytesIO(payload))
        os.utime(tmp_path / "s.tar", ns=(OLD_NS, OLD_NS))

    uri = f"webdataset:{tmp_path / 's.tar'}"
    shard(b"0123")
    first = open_source(uri)
    first_id = first.dataset_id
    assert first.labels.tolist() == [0, 1, 2, 3]
    shard(b"3210")  # same size, same mtime: the old index sidecar (keyed on them) gave the old labels
    again = open_source(uri)
    assert again.labels.tolist() == [3, 2, 1, 0] and again.dataset_id != first_id


def test_npz_arrays_of_one_value_or_without_a_header_are_dataset_errors(tmp_path: Path) -> None:
    # the old code: TypeError (len() of a 0-d array) and AttributeError (numpy hands back a compressed
    # member without the .npy magic as bytes), tracebacks from kd precompute --dataset npz:...
    np.savez(tmp_path / "x0.npz", x=np.float32(3), y=np.array([0]))
    with pytest.raises(DatasetError, match=r"the inputs \(array 'x' of .*x0\.npz\) are one value \(float32 3\.0\)"):
        open_source(f"npz:{tmp_path / 'x0.npz'}")
    np.savez(tmp_path / "y0.npz", x=np.zeros((2, 3), np.float32), y=np.int64(0))
    with pytest.raises(DatasetError, match=r"npz: labels must be a 1-d integer array, got int64 \[\]"):
        open_source(f"npz:{tmp_path / 'y0.npz'}")
    with zipfile.ZipFile(tmp_path / "raw.npz", "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", "not an array")
        z.writestr("y.npy", "not an array")
    with pytest.raises(DatasetError, match=r"npz: member 'x' of .*raw\.npz is not a readable \.npy array"):
        open_source(f"npz:{tmp_path / 'raw.npz'}")


def test_jsonl_text_with_a_lone_surrogate_escape_is_named_not_a_unicode_traceback(tmp_path: Path) -> None:
    # JSON may escape half of a UTF-16 pair ("\ud800"), json.loads takes it, and the old code crashed
    # tokenising it with UnicodeEncodeError (a traceback); a whole escaped pair is one character and reads
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "\\ud83d\\ude00 pair"}\n{"text": "half \\ud800 of one"}\n')
    src = open_source(f"jsonl:{path}?pack=0")
    with pytest.raises(DatasetError) as e:
        len(src)
    assert str(e.value) == (
        f"jsonl: {path}:3: field 'text' holds \\ud800, half of a UTF-16 surrogate pair and no character (JSON "
        "escapes it, UTF-8 cannot hold it); fix the text"
    )
    path.write_text('{"text": "fine"}\n{"text": "\\ud83d\\ude00 pair"}\n')
    assert len(open_source(f"jsonl:{path}?pack=0")) == 2


def test_a_named_pipe_among_the_images_is_refused_not_waited_on(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "c").mkdir(parents=True)
    png(root / "c" / "a.png", 0)
    fifo = root / "c" / "b.png"
    os.mkfifo(fifo)  # the old code hung hashing it: open() waits for a writer
    done = threading.Event()

    def unblock() -> None:  # so that the old code fails this test instead of hanging it: a writer comes and goes
        while not done.wait(5):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # no reader waiting (ENXIO)
                pass

    helper = threading.Thread(target=unblock, daemon=True)
    helper.start()
    try:
        with pytest.raises(DatasetError) as e:
            _ = open_source(f"imagefolder:{root}").dataset_id
    finally:
        done.set()
        helper.join()
    assert str(e.value) == (
        f"{fifo} is a named pipe, not a regular file: reading it could wait for ever; remove it from the dataset"
    )


def test_samples_of_another_length_are_named_not_stacked_by_torch(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"x": [[1.0, 2.0], [3.0], [4.0, 5.0]], "label": [0, 1, 0]}).save_to_disk(tmp_path / "hf")
    src = open_source(f"hf:{tmp_path / 'hf'}")
    assert torch.equal(src.get(torch.tensor([0, 2])), torch.tensor([[1.0, 2.0], [4.0, 5.0]]))
    want = f"row 1 of {tmp_path / 'hf'} has shape [1] but this source's samples have [2] (that of sample 0)"
    # the old code: RuntimeError "stack expects each tensor to be equal size" naming no row, and a read of
    # that row alone (a batch of it, a DataLoader worker's) handed the teacher a sample of another width
    with pytest.raises(DatasetError, match=re.escape(want)):
        src.get(torch.arange(3))
    with pytest.raises(DatasetError, match=re.escape(want)):
        src.read(1)
