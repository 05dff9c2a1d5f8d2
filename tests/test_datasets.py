"""Datasets from files: every format written for real here, read back exactly.

Each test writes its data with the format's own tools (Pillow, numpy, the
``datasets`` library, the CIFAR record layout, tarfile) into a tmp dir and reads
it back through ``open_source``: pixel values, labels and length must match the
arrays the test wrote. Identity (``dataset_id``) must change on any edit, and
bad input must fail with an error that names the problem.
"""

from __future__ import annotations

import io
import os
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, features

import kd.core.data as data_mod
from kd.core.data import (
    FORMATS,
    DatasetError,
    ViewBatch,
    augment,
    file_manifest,
    load_dataset,
    loader,
    open_source,
)
from kd.core.samples import SampleSource
from kd.core.views import resize_center
from kd.precompute import manifest_of
from kd.student_trainer.evaluate import evaluate

RS = np.random.RandomState(13)
IMAGES = (RS.rand(24, 12, 10, 3) * 255).astype(np.uint8)  # [N, H, W, C], H != W to catch transposes
LABELS = np.arange(24) % 3


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path / "kd-cache"))


def chw(a: np.ndarray) -> torch.Tensor:
    """What a source must return for an HWC uint8 image: float32 CHW in [0, 1]."""
    return torch.from_numpy(np.array(a)).permute(2, 0, 1).float() / 255


def write_folder(root: Path, fmt: str = "PNG", n: int = 24, **save: object) -> list[tuple[Path, int, int]]:
    """Images i -> root/class_<label>/img_<i>.<ext>; returns (path, image index, label) in listing order."""
    ext = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[fmt]
    out = []
    for i in range(n):
        d = root / f"class_{LABELS[i]}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"img_{i:03d}.{ext}"
        Image.fromarray(IMAGES[i]).save(p, format=fmt, **save)
        out.append((p, i, int(LABELS[i])))
    return sorted(out, key=lambda t: (t[2], t[0].name))


# -- imagefolder ---------------------------------------------------------------------------
def test_imagefolder_png_reads_back_exact_pixels_and_labels(tmp_path: Path) -> None:
    files = write_folder(tmp_path / "train")
    src = open_source(f"imagefolder:{tmp_path / 'train'}")
    assert isinstance(src, SampleSource)
    assert len(src) == 24 and src.num_classes == 3 and src.class_names == ["class_0", "class_1", "class_2"]
    assert src.labels.dtype == torch.int64
    assert src.labels.tolist() == [lab for _, _, lab in files]
    for pos, (_, i, _) in enumerate(files):
        assert torch.equal(src.read(pos)[0], chw(IMAGES[i]))
    batch = src.get(torch.tensor([0, 5, 23]))
    assert batch.shape == (3, 3, 12, 10) and batch.dtype == torch.float32
    u8 = open_source(f"imagefolder:{tmp_path / 'train'}?dtype=uint8")
    assert torch.equal(u8.read(7)[0], torch.from_numpy(IMAGES[files[7][1]]).permute(2, 0, 1))
    assert src.dataset_id.startswith("train/") or src.dataset_id.startswith(f"{tmp_path.name}/train@")


def test_imagefolder_jpeg_and_webp_decode_like_pillow(tmp_path: Path) -> None:
    files = write_folder(tmp_path / "j", "JPEG", n=9, quality=95)
    src = open_source(f"imagefolder:{tmp_path / 'j'}")
    for pos, (p, _, lab) in enumerate(files):
        want = np.asarray(Image.open(p).convert("RGB"))
        assert torch.equal(src.read(pos)[0], chw(want)) and int(src.labels[pos]) == lab
    if features.check("webp"):
        files = write_folder(tmp_path / "w", "WEBP", n=9, lossless=True)
        web = open_source(f"imagefolder:{tmp_path / 'w'}")
        for pos, (_, i, _) in enumerate(files):
            assert torch.equal(web.read(pos)[0], chw(IMAGES[i]))  # lossless: the exact pixels
    gray = open_source(f"imagefolder:{tmp_path / 'j'}?mode=L")
    assert gray.sample_shape == (1, 12, 10)


def test_imagefolder_size_option_and_mixed_sizes(tmp_path: Path) -> None:
    write_folder(tmp_path / "d", n=6)
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "d" / "class_0" / "zz_big.png")
    src = open_source(f"imagefolder:{tmp_path / 'd'}")
    big = src.labels.tolist().index(0) + 2  # class_0 holds img_000, img_003, then zz_big
    with pytest.raises(DatasetError, match=r"zz_big\.png is 30x20 .* give \?size=N"):
        src.read(big)
    sized = open_source(f"imagefolder:{tmp_path / 'd'}?size=8")
    assert sized.sample_shape == (3, 8, 8)
    assert torch.equal(sized.read(0)[0], resize_center(chw(IMAGES[0]), (8, 8)))
    assert sized.read(big)[0].shape == (3, 8, 8)
    assert sized.dataset_id != src.dataset_id  # the decode size is part of what was seen


def test_imagefolder_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        open_source(f"imagefolder:{tmp_path / 'nope'}")
    (tmp_path / "flat").mkdir()
    Image.fromarray(IMAGES[0]).save(tmp_path / "flat" / "a.png")
    with pytest.raises(DatasetError, match="no class folders"):
        open_source(f"imagefolder:{tmp_path / 'flat'}")
    write_folder(tmp_path / "e", n=3)
    (tmp_path / "e" / "empty_class").mkdir()
    with pytest.raises(DatasetError, match="empty_class has no images"):
        open_source(f"imagefolder:{tmp_path / 'e'}")
    write_folder(tmp_path / "c", n=3)
    bad = tmp_path / "c" / "class_1" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    src = open_source(f"imagefolder:{tmp_path / 'c'}")
    assert src.labels.tolist() == [0, 1, 1, 2]  # labels never decode an image
    with pytest.raises(DatasetError, match=r"cannot decode image .*broken\.png"):
        src.get(torch.arange(len(src)))
    with pytest.raises(DatasetError, match=r"unknown dataset format 'tiff'.*imagefolder, npz, npy, hf, cifar"):
        open_source(f"tiff:{tmp_path}")
    with pytest.raises(DatasetError, match="prefix a path with its format"):
        open_source(str(tmp_path))
    with pytest.raises(DatasetError, match=r"unknown option\(s\) \['colour'\]"):
        open_source(f"imagefolder:{tmp_path / 'c'}?colour=1")
    with pytest.raises(DatasetError, match="unknown view op 'twist'"):
        open_source(f"imagefolder:{tmp_path / 'c'}?views=twist")
    assert "webdataset" in FORMATS and "module" in FORMATS


# -- identity ------------------------------------------------------------------------------
def test_dataset_id_changes_on_edit_add_remove_and_only_then(tmp_path: Path, monkeypatch) -> None:
    files = write_folder(tmp_path / "train", n=9)
    uri = f"imagefolder:{tmp_path / 'train'}"
    old = 1_600_000_000_000_000_000  # files older than their hashing are trusted by the sidecar
    for p, _, _ in files:
        os.utime(p, ns=(old, old))
    first = open_source(uri).dataset_id
    hashed: list[str] = []
    real = data_mod._hash_file
    monkeypatch.setattr(data_mod, "_hash_file", lambda p: hashed.append(str(p)) or real(p))
    assert open_source(uri).dataset_id == first and hashed == []  # re-open: stat only, no re-hash
    manifest = open_source(uri).manifest()
    assert manifest["dataset_id"] == first and len(manifest["files"]) == 9
    assert manifest["files"][0][0] == os.path.join("class_0", "img_000.png") and manifest["files"][0][1] > 0

    opened = open_source(uri)
    assert opened.dataset_id == first
    target = files[4][0]  # same size, new content, written just now
    a = np.asarray(Image.open(target)).copy()
    a[0, 0] = 255 - a[0, 0]
    Image.fromarray(a).save(target)
    edited = open_source(uri).dataset_id
    assert edited != first and hashed == [str(target)]
    with pytest.raises(DatasetError, match=f"changed since it was opened \\(was {first}\\)"):
        opened.manifest()  # a cache must not record a manifest of other data under the old id

    Image.fromarray(IMAGES[0]).save(tmp_path / "train" / "class_2" / "new.png")
    added = open_source(uri).dataset_id
    assert added not in (first, edited)
    (tmp_path / "train" / "class_2" / "new.png").unlink()
    assert open_source(uri).dataset_id == edited  # back to the same files: the same id
    files[0][0].unlink()
    assert open_source(uri).dataset_id not in (first, edited, added)


def test_one_pass_over_the_files_serves_the_id_and_the_cache_manifest(tmp_path: Path, monkeypatch) -> None:
    files = write_folder(tmp_path / "train", n=9)
    uri = f"imagefolder:{tmp_path / 'train'}"
    passes: list[int] = []
    real = data_mod.file_manifest
    monkeypatch.setattr(data_mod, "file_manifest", lambda root, rels: passes.append(len(rels)) or real(root, rels))
    unchanged = manifest_of(open_source(uri))
    src = open_source(uri)
    first = src.dataset_id
    assert passes == [9, 9] and unchanged["dataset_id"] == first and len(files) == 9
    a = np.asarray(Image.open(files[4][0])).copy()
    a[0, 0] = 255 - a[0, 0]
    Image.fromarray(a).save(files[4][0])  # the folder changes after the id was taken
    # What a cache stores (precompute's manifest_of) comes from the pass the id was taken from: the
    # files that id names, with no second pass over every file (the old code walked them again here
    # and refused). The full per-file manifest still re-reads the files and refuses a changed folder.
    assert manifest_of(src) == unchanged and "files" not in unchanged and passes == [9, 9]
    with pytest.raises(DatasetError, match=f"changed since it was opened \\(was {first}\\)"):
        src.manifest()
    assert passes == [9, 9, 9]
    again = open_source(uri)  # a new open sees the change
    assert again.dataset_id != first and manifest_of(again)["dataset_id"] == again.dataset_id
    assert passes == [9, 9, 9, 9]
    assert pickle.loads(pickle.dumps(again)).dataset_id == again.dataset_id and passes == [9, 9, 9, 9]


def test_first_open_hashes_on_several_threads_the_same_hashes(tmp_path: Path, monkeypatch) -> None:
    import hashlib
    import threading

    rng = np.random.default_rng(0)
    rels = [f"d{i % 7}/f{i:04d}.bin" for i in range(800)]
    for k, rel in enumerate(rels):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_bytes(rng.bytes(int(rng.integers(0, 6000))) if k else b"")  # 2 KiB: blake2b's GIL
    threads: set[str] = set()
    real = data_mod._hash_file
    monkeypatch.setattr(data_mod, "_hash_file", lambda p: threads.add(threading.current_thread().name) or real(p))
    got = file_manifest(tmp_path, rels)
    want = [hashlib.blake2b((tmp_path / rel).read_bytes(), digest_size=16).hexdigest() for rel in rels]
    assert [h for _, _, _, h in got] == want  # bit-identical to one blake2b per file, in listing order
    assert [(rel, size) for rel, size, _, _ in got] == [(rel, (tmp_path / rel).stat().st_size) for rel in rels]
    assert len(threads) > 1 and threading.current_thread().name not in threads
    (tmp_path / rels[5]).unlink()
    with pytest.raises(DatasetError, match=f"cannot read {tmp_path / rels[5]}: No such file"):
        file_manifest(tmp_path, rels)


def test_file_manifest_rehashes_a_racy_same_size_same_mtime_edit(tmp_path: Path) -> None:
    p = tmp_path / "f.bin"
    p.write_bytes(b"a" * 100)
    st = p.stat()
    h1 = file_manifest(tmp_path, ["f.bin"])[0][3]
    p.write_bytes(b"b" * 100)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime, but written after hashing
    assert file_manifest(tmp_path, ["f.bin"])[0][3] != h1


# -- npz / npy -----------------------------------------------------------------------------
def test_npz_memory_maps_and_reads_layouts_exactly(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", images=IMAGES, labels=LABELS)
    src = open_source(f"npz:{tmp_path / 'd.npz'}")
    assert src.x_key == "images" and src.layout == "nhwc" and len(src) == 24
    assert isinstance(src._arrays()[0], np.memmap)  # not read into memory
    assert torch.equal(src.labels, torch.from_numpy(LABELS).long())
    for i in (0, 11, 23):
        assert torch.equal(src.read(i)[0], chw(IMAGES[i]))
    nchw = np.ascontiguousarray(IMAGES.transpose(0, 3, 1, 2)).astype(np.float32) / 7
    np.savez(tmp_path / "f.npz", data=nchw, targets=LABELS, other=np.zeros(3))
    f = open_source(f"npz:{tmp_path / 'f.npz'}?x=data&y=targets")
    assert torch.equal(f.read(5)[0], torch.from_numpy(nchw[5]))  # floats pass unchanged
    flat = RS.rand(24, 64).astype(np.float32)
    np.savez_compressed(tmp_path / "c.npz", x=flat, y=LABELS)  # compressed: read, not mapped
    c = open_source(f"npz:{tmp_path / 'c.npz'}?shape=1x8x8")
    assert torch.equal(c.read(3)[0], torch.from_numpy(flat[3]).reshape(1, 8, 8))
    with pytest.raises(DatasetError, match="no array 'pix'"):
        open_source(f"npz:{tmp_path / 'd.npz'}?x=pix")
    np.savez(tmp_path / "o.npz", x=np.array([{"a": 1}] * 2, dtype=object), y=np.zeros(2, np.int64))
    with pytest.raises(DatasetError, match="never unpickles"):
        open_source(f"npz:{tmp_path / 'o.npz'}")


def test_npy_pair_and_id_changes_with_the_labels(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", IMAGES[:, :, :, 0])  # [N, H, W] grayscale
    np.save(tmp_path / "y.npy", LABELS)
    src = open_source(f"npy:{tmp_path / 'x.npy'}?y=y.npy")
    assert src.sample_shape == (1, 12, 10) and len(src) == 24
    assert torch.equal(src.read(2)[0], torch.from_numpy(IMAGES[2, :, :, 0])[None].float() / 255)
    first = src.dataset_id
    np.save(tmp_path / "y.npy", (LABELS + 1) % 3)
    again = open_source(f"npy:{tmp_path / 'x.npy'}?y=y.npy")
    assert again.dataset_id != first and again.labels.tolist() == ((LABELS + 1) % 3).tolist()
    with pytest.raises(DatasetError, match=r"\?y=LABELS\.npy"):
        open_source(f"npy:{tmp_path / 'x.npy'}")
    np.save(tmp_path / "short.npy", LABELS[:5])
    with pytest.raises(DatasetError, match="24 inputs but 5 labels"):
        open_source(f"npy:{tmp_path / 'x.npy'}?y=short.npy")


# -- Hugging Face datasets --------------------------------------------------------------------
def test_hf_save_to_disk_images_and_arrays(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog", "eel"])})
    rows = {"img": [Image.fromarray(a) for a in IMAGES], "label": LABELS.tolist()}
    ds = datasets.Dataset.from_dict(rows, features=feats)
    datasets.DatasetDict({"train": ds, "test": ds.select(range(6))}).save_to_disk(str(tmp_path / "pets"))
    src = open_source(f"hf:{tmp_path / 'pets'}?image=img&label=label&split=train")
    assert len(src) == 24 and src.class_names == ["cat", "dog", "eel"] and src.num_classes == 3
    assert src.labels.tolist() == LABELS.tolist()
    for i in (0, 9, 23):
        assert torch.equal(src.read(i)[0], chw(IMAGES[i]))
    test = open_source(f"hf:{tmp_path / 'pets'}?split=test")
    assert len(test) == 6 and test.dataset_id.startswith("pets/test@") and test.dataset_id != src.dataset_id
    assert src.manifest()["fingerprint"] == datasets.load_from_disk(str(tmp_path / "pets"))["train"]._fingerprint
    with pytest.raises(DatasetError, match="no split 'val'.*train, test"):
        open_source(f"hf:{tmp_path / 'pets'}?split=val")
    with pytest.raises(DatasetError, match="no column 'pixels'.*img, label"):
        open_source(f"hf:{tmp_path / 'pets'}?image=pixels")
    # Array columns, no Image feature; another content -> another fingerprint -> another id.
    arr = datasets.Dataset.from_dict({"x": IMAGES.tolist(), "y": LABELS.tolist()})
    arr.save_to_disk(str(tmp_path / "arr"))
    a = open_source(f"hf:{tmp_path / 'arr'}?image=x&label=y")
    assert torch.equal(a.read(4)[0], chw(IMAGES[4]))
    changed = IMAGES.copy()
    changed[4, 0, 0, 0] ^= 1
    datasets.Dataset.from_dict({"x": changed.tolist(), "y": LABELS.tolist()}).save_to_disk(str(tmp_path / "arr2"))
    b = open_source(f"hf:{tmp_path / 'arr2'}?image=x&label=y&name=arr")
    assert b.dataset_id.split("@")[0] == a.dataset_id.split("@")[0] and b.dataset_id != a.dataset_id


# -- CIFAR binary ---------------------------------------------------------------------------
def _cifar_records(n: int, label_bytes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    r = np.random.RandomState(seed)
    labels = r.randint(0, 20 if label_bytes == 2 else 10, (n, label_bytes)).astype(np.uint8)
    pixels = r.randint(0, 256, (n, 3072)).astype(np.uint8)
    return labels, pixels


def test_cifar10_and_cifar100_binary_records(tmp_path: Path) -> None:
    root = tmp_path / "cifar-10-batches-bin"
    root.mkdir()
    parts = []
    for k, name in enumerate([f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]):
        lab, pix = _cifar_records(3 + k, 1, k)
        np.concatenate([lab, pix], axis=1).tofile(root / name)
        parts.append((lab, pix))
    (root / "batches.meta.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n")
    src = open_source(f"cifar:{tmp_path}")  # finds the official sub-folder
    labels = np.concatenate([p[0][:, 0] for p in parts[:5]])
    pixels = np.concatenate([p[1] for p in parts[:5]])
    assert len(src) == len(labels) == 25 and src.class_names[3] == "c3" and src.num_classes == 10
    assert src.labels.tolist() == labels.tolist() and src.dataset_id.startswith("cifar10/train@")
    for i in (0, 3, 7, 24):  # across file boundaries
        assert torch.equal(src.read(i)[0], torch.from_numpy(pixels[i].reshape(3, 32, 32)).float() / 255)
    test = open_source(f"cifar:{root}?split=test&dtype=uint8")
    assert len(test) == 8 and torch.equal(test.read(7)[0], torch.from_numpy(parts[5][1][7].reshape(3, 32, 32)))

    c100 = tmp_path / "c100"
    c100.mkdir()
    lab, pix = _cifar_records(5, 2, 99)
    np.concatenate([lab, pix], axis=1).tofile(c100 / "train.bin")
    np.concatenate([lab[:2], pix[:2]], axis=1).tofile(c100 / "test.bin")
    fine = open_source(f"cifar:{c100}")
    coarse = open_source(f"cifar:{c100}?label=coarse")
    assert fine.labels.tolist() == lab[:, 1].tolist() and coarse.labels.tolist() == lab[:, 0].tolist()
    assert fine.num_classes == 100 and coarse.num_classes == 20 and fine.dataset_id != coarse.dataset_id
    assert torch.equal(fine.read(4)[0], torch.from_numpy(pix[4].reshape(3, 32, 32)).float() / 255)
    before = fine.dataset_id
    raw = bytearray((c100 / "train.bin").read_bytes())
    raw[100] ^= 0xFF
    (c100 / "train.bin").write_bytes(bytes(raw))
    assert open_source(f"cifar:{c100}").dataset_id != before
    (c100 / "train.bin").write_bytes(bytes(raw[:-10]))
    with pytest.raises(DatasetError, match="not a whole number of 3074-byte CIFAR-100 records"):
        open_source(f"cifar:{c100}")


class _Canary:
    """Unpickling this creates a file: the proof that a loader ran pickle."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (Path(self.path),))


def test_cifar_python_version_is_refused_without_unpickling(tmp_path: Path) -> None:
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    canary = tmp_path / "unpickled"
    for name in ["data_batch_1", "data_batch_2", "test_batch", "batches.meta"]:
        (root / name).write_bytes(pickle.dumps(_Canary(str(canary))))
    with pytest.raises(DatasetError, match="python \\(pickled\\) version of CIFAR; kd never unpickles"):
        open_source(f"cifar:{tmp_path}")
    assert not canary.exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no train files .* data_batch_1.bin"):
        open_source(f"cifar:{tmp_path / 'empty'}")


# -- webdataset tar shards --------------------------------------------------------------------
def write_shards(root: Path, per_shard: int = 8, shards: int = 3) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(root / f"shard-{s:03d}.tar", "w") as tf:
            for k in range(per_shard):
                i = s * per_shard + k
                buf = io.BytesIO()
                Image.fromarray(IMAGES[i]).save(buf, format="PNG")
                for name, payload in ((f"{i:06d}.png", buf.getvalue()), (f"{i:06d}.cls", str(LABELS[i]).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))


def test_webdataset_shards_by_braces_dir_and_glob(tmp_path: Path) -> None:
    write_shards(tmp_path / "wds")
    src = open_source(f"webdataset:{tmp_path / 'wds'}/shard-{{000..002}}.tar")
    assert len(src) == 24 and src.labels.tolist() == LABELS.tolist()
    for i in (0, 8, 17, 23):
        assert torch.equal(src.read(i)[0], chw(IMAGES[i]))
    same = [open_source(f"webdataset:{tmp_path / 'wds'}"), open_source(f"webdataset:{tmp_path / 'wds'}/*.tar")]
    assert all(s.dataset_id == src.dataset_id for s in same)
    two = open_source(f"webdataset:{tmp_path / 'wds'}/shard-{{000..001}}.tar")
    assert len(two) == 16 and two.dataset_id != src.dataset_id
    got = torch.cat([b.indices for b in loader(src, batch_size=5, workers=2)])
    assert got.tolist() == list(range(24))


def test_webdataset_index_sidecar_and_corrupt_member(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_shards(tmp_path / "wds", shards=2)
    old = 1_600_000_000_000_000_000
    for p in (tmp_path / "wds").iterdir():
        os.utime(p, ns=(old, old))
    uri = f"webdataset:{tmp_path / 'wds'}"
    first = open_source(uri)
    scanned: list[str] = []
    real = data_mod.WebDatasetSource._scan
    monkeypatch.setattr(data_mod.WebDatasetSource, "_scan", lambda self, sh: scanned.append(sh.name) or real(self, sh))
    again = open_source(uri)
    assert scanned == [] and again.dataset_id == first.dataset_id  # headers not re-read
    assert torch.equal(again.read(11)[0], chw(IMAGES[11])) and again.labels.tolist() == LABELS[:16].tolist()

    def rewrite(members: tuple[tuple[str, bytes], ...]) -> None:
        with tarfile.open(tmp_path / "wds" / "shard-001.tar", "w") as tf:
            for name, payload in members:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))

    rewrite((("000100.png", b"\x89PNG garbage"), ("000100.cls", b"1")))
    changed = open_source(uri)
    assert scanned == ["shard-001.tar"] and len(changed) == 9 and changed.dataset_id != first.dataset_id
    with pytest.raises(DatasetError, match=r"cannot decode image sample '000100' in .*shard-001\.tar"):
        changed.read(8)
    rewrite((("000100.png", b"\x89PNG garbage"), ("000100.cls", b"1"), ("000101.cls", b"x")))
    with pytest.raises(DatasetError, match=r"sample '000101' in .*shard-001\.tar has no image \(\.png"):
        open_source(uri)


# -- module:factory --------------------------------------------------------------------------
FACTORY = '''
import torch

class Squares(torch.utils.data.Dataset):
    """A map-style dataset of (image, label); fingerprint declared by the author."""

    fingerprint = "squares-v{version}"

    def __init__(self, n):
        self.n = int(n)
        self.targets = [i % 4 for i in range(self.n)]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((1, 6, 6), i / 100.0), self.targets[i]

def make(n="5"):
    return Squares(n)
'''


def test_module_factory_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "kd_test_factory_mod.py").write_text(FACTORY.format(version=1))
    monkeypatch.syspath_prepend(str(tmp_path))
    src = open_source("module:kd_test_factory_mod:make?n=10")
    assert len(src) == 10 and src.labels.tolist() == [i % 4 for i in range(10)] and src.num_classes == 4
    assert torch.equal(src.read(7)[0], torch.full((1, 6, 6), 0.07))
    assert src.dataset_id.startswith("make/train@")
    assert open_source("module:kd_test_factory_mod:make?n=9").dataset_id != src.dataset_id
    b = next(iter(loader(src, batch_size=10, workers=2)))
    assert torch.equal(b.inputs[:, 0, 0, 0], torch.arange(10) / 100.0)
    with pytest.raises(DatasetError, match="cannot load kd_test_factory_mod:nothing"):
        open_source("module:kd_test_factory_mod:nothing")
    with pytest.raises(DatasetError, match="expected module:PACKAGE.MODULE:FACTORY"):
        open_source("module:kd_test_factory_mod")
    sys.modules.pop("kd_test_factory_mod", None)


# -- digits through the same door ---------------------------------------------------------------
def test_digits_by_uri_and_its_views_keep_the_bundled_augmentation() -> None:
    test = open_source("digits:test")
    assert test.dataset_id == load_dataset("digits", "test").dataset_id
    shaped = open_source("digits?shape=1x8x8")
    train = load_dataset("digits", "train")
    assert shaped.inputs.shape[1:] == (1, 8, 8) and shaped.dataset_id == train.dataset_id
    for i, seed in ((0, 5), (3, 65536 * 3 + 2), (100, 7)):
        x, params = train.read(i, seed)
        assert torch.equal(x, augment("digits", train.inputs[i], seed))
        assert params is not None and params[4:6].abs().max() <= 1
        assert torch.equal(shaped.read(i, seed)[0].reshape(64), x)
    with pytest.raises(DatasetError, match="does not hold 64 values"):
        open_source("digits?shape=3x8x8")


# -- the loader ---------------------------------------------------------------------------------
def test_loader_workers_views_epochs_and_pickling(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=IMAGES, y=LABELS)
    src = open_source(f"npz:{tmp_path / 'd.npz'}?views=crop:pad=2;flip")
    clone = pickle.loads(pickle.dumps(src))  # what a spawned worker receives
    assert torch.equal(clone.read(3, 77)[0], src.read(3, 77)[0]) and "h" not in clone._h

    plain = list(loader(src, torch.arange(10), batch_size=4, workers=2))
    assert [len(b.indices) for b in plain] == [4, 4, 2] and all(isinstance(b, ViewBatch) for b in plain)
    assert plain[0].views is None and plain[0].params is None
    assert torch.equal(torch.cat([b.inputs for b in plain]), src.get(torch.arange(10)))
    assert torch.equal(torch.cat([b.labels for b in plain]), src.labels[:10])

    every = list(loader(src, torch.tensor([5, 2]), batch_size=3, num_views=3))
    keys = [(i, v) for b in every for i, v in zip(b.indices.tolist(), b.views.tolist())]
    assert keys == [(5, 0), (5, 1), (5, 2), (2, 0), (2, 1), (2, 2)]  # sample-major: the cache's key order

    def epoch(e: int, workers: int) -> list[tuple[int, int]]:
        ld = loader(src, batch_size=7, num_views=16, fresh_views=True, shuffle_seed=4, workers=workers)
        ld.set_epoch(e)
        out = []
        for b in ld:
            assert torch.equal(b.inputs, src.get(b.indices, b.views))  # each view is the seeded one
            out += list(zip(b.indices.tolist(), b.views.tolist()))
        return out

    e0, e0_again, e1 = epoch(0, 0), epoch(0, 2), epoch(1, 0)
    assert e0 == e0_again and sorted(i for i, _ in e0) == list(range(24))
    assert e1 != e0 and dict(e1) != dict(e0)  # a new order and fresh views per epoch
    assert len({v for _, v in e0 + e1}) > 8


def test_evaluate_top1_top5_streams_over_a_source(tmp_path: Path) -> None:
    # Each sample is a constant image whose value encodes a class the model will rank.
    n, classes = 40, 7
    labels = np.arange(n) % classes
    rank = (np.arange(n) * 3) % classes  # where the true class lands in the model's ranking (0 = top)
    x = np.repeat(((labels * 8 + rank).astype(np.float32) / 100)[:, None], 4, axis=1)
    np.savez(tmp_path / "e.npz", x=x, y=labels)

    class Ranker(torch.nn.Module):
        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            code = (inp[:, 0] * 100).round().long()
            lab, r = code // 8, code % 8
            # Class order[j] gets logit -j; the true label sits at rank r.
            order = (lab[:, None] - r[:, None] + torch.arange(classes)) % classes
            ranks = -torch.arange(classes).float().expand(len(inp), -1)
            return torch.empty(len(inp), classes).scatter_(1, order, ranks)

    src = open_source(f"npz:{tmp_path / 'e.npz'}")
    acc = evaluate(Ranker(), src, batch_size=6, workers=2)
    want1 = float(np.mean(rank == 0))
    want5 = float(np.mean(rank < 5))
    assert acc.n == n and acc.top1 == pytest.approx(want1) and acc.top5 == pytest.approx(want5)
    top = torch.tensor([i for i in range(n) if rank[i] == 0])
    sub = evaluate(Ranker(), src, indices=top, batch_size=2)
    assert (sub.n, sub.correct1) == (len(top), len(top))


def test_hf_without_the_datasets_package_names_what_to_install(tmp_path: Path, monkeypatch) -> None:
    """hf: without `datasets` said "pip install 'kd[hf]'", which installs nothing of kd's (kd is installed
    from its repository): the message names the package, and the extra as the repository spells it."""
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError, as when absent
    with pytest.raises(data_mod.DatasetError) as e:
        data_mod.open_source(f"hf:{tmp_path}")
    assert "pip install datasets" in str(e.value) and "pip install -e '.[hf]'" in str(e.value), str(e.value)
