"""The loader reads whole batches (``_Keyed.__getitems__`` -> ``read_batch``), bit-identical to
reading each sample alone (``read``), for every source type, plain and with views.

Every format is written here with its own tools (numpy, Pillow, tarfile, the ``datasets``
library, the CIFAR record layout). For each source the loader's batches (shuffled, so rows
are gathered out of order; ascending, so array sources take one slice) are compared with a
stack of per-sample ``read`` calls: the same values, dtype, indices, labels, views and view
params. Array sources must not read per sample at all: their ``_raw`` is made to fail.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kd.core.data import VIEW_STRIDE, DatasetError, ViewBatch, _Keyed, loader, open_source
from kd.core.views import ViewPolicy

RS = np.random.RandomState(5)
N = 23  # not a multiple of the batch sizes: a short last batch
IMAGES = (RS.rand(N, 12, 10, 3) * 255).astype(np.uint8)  # [N, H, W, C], H != W to catch transposes
LABELS = (np.arange(N) * 7) % 4
VIEWS = ("crop:pad=2;flip;jitter", "rrc:size=6;flip")  # a view of the fitted image; one from the raw image


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path / "kd-cache"))


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _npz(tmp: Path) -> list[str]:
    np.savez(tmp / "d.npz", x=IMAGES, y=LABELS)  # stored: memory-mapped
    np.savez_compressed(tmp / "c.npz", x=IMAGES.astype(np.float64) / 300, y=LABELS)  # read into memory; float64
    return [f"npz:{tmp / 'd.npz'}", f"npz:{tmp / 'd.npz'}?dtype=uint8&size=8", f"npz:{tmp / 'c.npz'}"]


def _npy(tmp: Path) -> list[str]:
    np.save(tmp / "g.npy", IMAGES[:, :, :, 0].astype(">i2"))  # [N, H, W] big-endian int16: cast to uint8
    np.save(tmp / "f.npy", IMAGES.reshape(N, -1)[:, :64].astype(np.float16))  # vectors, float16
    np.save(tmp / "y.npy", LABELS)
    return [f"npy:{tmp / 'g.npy'}?y=y.npy", f"npy:{tmp / 'f.npy'}?y=y.npy&shape=1x8x8&dtype=uint8"]


def _hf(tmp: Path) -> list[str]:
    datasets = pytest.importorskip("datasets")
    labels = datasets.ClassLabel(num_classes=4)
    imgs = datasets.Features({"img": datasets.Image(), "label": labels})
    datasets.Dataset.from_dict(
        {"img": [Image.fromarray(a) for a in IMAGES], "label": LABELS.tolist()}, features=imgs
    ).save_to_disk(str(tmp / "img"))
    flat = datasets.Features({"x": datasets.Sequence(datasets.Value("uint8"), length=64), "label": labels})
    pixels = IMAGES.reshape(N, -1)[:, :64]
    datasets.Dataset.from_dict({"x": pixels, "label": LABELS}, features=flat).save_to_disk(str(tmp / "flat"))
    nested = datasets.Features(
        {
            "x": datasets.Sequence(
                datasets.Sequence(datasets.Sequence(datasets.Value("float64"), length=3), length=10), length=12
            ),
            "label": labels,
        }
    )
    datasets.Dataset.from_dict({"x": IMAGES / 255.0 + 1e-9, "label": LABELS}, features=nested).save_to_disk(
        str(tmp / "nested")
    )
    datasets.Dataset.from_dict({"x": IMAGES.tolist(), "label": LABELS.tolist()}).save_to_disk(str(tmp / "lists"))
    return [
        f"hf:{tmp / 'img'}?image=img",
        f"hf:{tmp / 'flat'}?shape=1x8x8",
        f"hf:{tmp / 'nested'}",
        f"hf:{tmp / 'lists'}?dtype=uint8",
    ]


def _imagefolder(tmp: Path) -> list[str]:
    for i in range(N):
        d = tmp / "folder" / f"c{LABELS[i]}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:03d}.png").write_bytes(_png(IMAGES[i]))
    return [f"imagefolder:{tmp / 'folder'}", f"imagefolder:{tmp / 'folder'}?size=8&mode=L"]


def _webdataset(tmp: Path) -> list[str]:
    (tmp / "wds").mkdir()
    for s in range(2):
        with tarfile.open(tmp / "wds" / f"shard-{s}.tar", "w") as tf:
            for i in range(s * 12, min(N, s * 12 + 12)):
                for name, payload in ((f"{i:04d}.png", _png(IMAGES[i])), (f"{i:04d}.cls", str(LABELS[i]).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
    return [f"webdataset:{tmp / 'wds'}"]


def _cifar(tmp: Path) -> list[str]:
    root = tmp / "cifar-10-batches-bin"
    root.mkdir()
    r = np.random.RandomState(1)
    for k, name in enumerate([f"data_batch_{i}.bin" for i in range(1, 6)]):  # 5 files: a batch spans several
        n = 3 + k
        rec = np.concatenate([r.randint(0, 10, (n, 1)), r.randint(0, 256, (n, 3072))], axis=1).astype(np.uint8)
        rec.tofile(root / name)
    c100 = tmp / "c100"
    c100.mkdir()
    rec = np.concatenate([r.randint(0, 20, (9, 1)), r.randint(0, 100, (9, 1)), r.randint(0, 256, (9, 3072))], axis=1)
    rec.astype(np.uint8).tofile(c100 / "train.bin")
    return [f"cifar:{tmp}", f"cifar:{c100}?dtype=uint8"]


def _digits(tmp: Path) -> list[str]:
    return ["digits:test?shape=1x8x8"]  # the bundled set: read sample by sample through its own read


KINDS = {"npz": _npz, "npy": _npy, "hf": _hf, "imagefolder": _imagefolder, "webdataset": _webdataset}
KINDS |= {"cifar": _cifar, "digits": _digits}
BATCHED = ("npz", "npy", "cifar", "hf")  # these read a batch without any per-sample read (hf: array columns)


def _reference(src, keys: list[int], plain: bool, policy: ViewPolicy | None) -> ViewBatch:
    """The batch as sample-by-sample reads give it: the behaviour the batched path must keep."""
    rows = [src.read(k // VIEW_STRIDE, None if plain else k, policy) for k in keys]
    idx = torch.tensor([k // VIEW_STRIDE for k in keys])
    params = None if plain else torch.stack([r[1] for r in rows])
    return ViewBatch(
        idx,
        torch.stack([r[0] for r in rows]),
        src.labels[idx],
        None if plain else torch.tensor(keys) % VIEW_STRIDE,
        params,
    )


def _same(got: ViewBatch, want: ViewBatch, what: str) -> None:
    for name, a, b in zip(ViewBatch._fields, got, want):
        if b is None:
            assert a is None, f"{what}: {name} should be None"
            continue
        assert a.dtype == b.dtype, f"{what}: {name} is {a.dtype}, per-sample reads give {b.dtype}"
        assert a.shape == b.shape and torch.equal(a, b), f"{what}: {name} differs from per-sample reads"


@pytest.mark.parametrize("kind", list(KINDS))
def test_batched_reads_equal_per_sample_reads(kind: str, tmp_path: Path) -> None:
    for uri in KINDS[kind](tmp_path):
        src, ref = open_source(uri), open_source(uri)
        images = len(ref.read(0)[0].shape) == 3
        if kind in BATCHED and not uri.endswith("image=img"):
            _ = src.native_size, src.sample_shape  # taken once from sample 0, at open
            src._raw = None  # a per-sample read would fail: the batch must be read whole
        n = len(src)
        shuffled = torch.randperm(n, generator=torch.Generator().manual_seed(3))[: min(n, 40)]
        for order, idx in (("ascending", torch.arange(n)), ("shuffled", shuffled)):
            plain = list(loader(src, idx, batch_size=6))
            assert [len(b.indices) for b in plain][:-1] == [6] * ((len(idx) - 1) // 6)
            for b in plain:
                keys = (b.indices * VIEW_STRIDE).tolist()
                _same(b, _reference(ref, keys, True, None), f"{uri} {order} plain")
                keyed = _Keyed(src, None, True, src.labels)
                _same(keyed.__getitems__(keys)._replace(views=None, params=None), b, f"{uri} __getitems__")
            if not images:
                continue
            for policy in VIEWS[:1] if kind == "digits" else VIEWS:  # digits' own read keeps 8x8
                pol = ViewPolicy.parse(policy)
                for fresh in (False, True):
                    ld = loader(src, idx, batch_size=7, views=pol, num_views=3, fresh_views=fresh, shuffle_seed=2)
                    ld.set_epoch(1)
                    for b in ld:
                        keys = (b.indices * VIEW_STRIDE + b.views).tolist()
                        _same(b, _reference(ref, keys, False, pol), f"{uri} {order} views={policy} fresh={fresh}")


def test_batched_reads_in_worker_processes(tmp_path: Path) -> None:
    """Workers get the source pickled and read batches there: the same batches as in process."""
    uri = _npz(tmp_path)[0] + "?views=crop:pad=3;flip"
    src = open_source(uri)
    _ = src.native_size, src.sample_shape
    src._raw = None  # pickled into the workers with the source: they must read batches whole
    args = dict(batch_size=5, num_views=4, fresh_views=True, shuffle_seed=9)
    here = list(loader(src, **args))
    there = list(loader(src, workers=2, **args))
    assert len(here) == len(there) == 5
    for a, b in zip(here, there):
        _same(b, a, "workers=2")
        _same(a, _reference(open_source(uri), (a.indices * VIEW_STRIDE + a.views).tolist(), False, None), "in process")


def test_a_bad_sample_in_a_batch_is_named_as_a_single_read_names_it(tmp_path: Path) -> None:
    """A batch that cannot be converted whole is read sample by sample, so the error names the sample."""
    x = IMAGES[:, :, :, 0].astype(np.int16)
    x[9, 3, 4] = 300  # not a pixel value
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", LABELS)
    src = open_source(f"npy:{tmp_path / 'x.npy'}?y=y.npy")
    good = list(loader(src, torch.arange(8), batch_size=4))
    assert torch.equal(good[1].inputs, torch.from_numpy(IMAGES[4:8, None, :, :, 0]).float() / 255)
    with pytest.raises(DatasetError, match=f"sample 9 of {tmp_path / 'x.npy'}: integer samples .* found 0..300"):
        list(loader(src, torch.tensor([2, 9, 5]), batch_size=4))
    with pytest.raises(IndexError, match=f"index {N} out of range"):
        src.read_batch([1, N, 2])
    x, params = src.read_batch([], [])
    assert x.shape == (0, 1, 12, 10) and params is not None and params.shape == (0, 10)


def test_a_bench_window_reads_its_batches_whole(tmp_path: Path) -> None:
    """kd bench's window of a source (precompute of one window) passes whole batches through."""
    from kd.bench.data import _Window

    uri = _npz(tmp_path)[0] + "?views=crop:pad=2"
    src = open_source(uri)
    _ = src.native_size, src.sample_shape
    src._raw = None
    win, ref = _Window(src, 7, 12), open_source(uri)
    for b in loader(win, batch_size=5, num_views=2):
        keys = (b.indices * VIEW_STRIDE + b.views).tolist()
        rows = [ref.read(k // VIEW_STRIDE + 7, k) for k in keys]  # the window's seeds, the source's samples
        want = ViewBatch(b.indices, torch.stack([r[0] for r in rows]), ref.labels[b.indices + 7], b.views,
                         torch.stack([r[1] for r in rows]))  # fmt: skip
        _same(b, want, "window")
