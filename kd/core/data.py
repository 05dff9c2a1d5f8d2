"""Bundled datasets. The default is scikit-learn's handwritten digits (1797
8x8 images, shipped inside scikit-learn: no download), split once with a fixed
seed so every command and every process sees the same train/test samples.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache, cached_property

import numpy as np
import torch

from kd.core.samples import VIEW_STRIDE, view_seeds  # noqa: F401 - re-exported

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 1 / 3


@dataclass(frozen=True)
class Dataset:
    """An in-memory dataset: inputs [N, ...] float32, labels [N] int64."""

    name: str
    split: str
    inputs: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    @cached_property
    def dataset_id(self) -> str:
        """``name/split@hash``: the hash covers the samples and labels, so a
        cache built on other data (or another split) is refused."""
        h = hashlib.sha256()
        h.update(self.inputs.numpy().tobytes())
        h.update(self.labels.numpy().tobytes())
        return f"{self.name}/{self.split}@{h.hexdigest()[:16]}"

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def augmentation(self) -> str:
        """Name (and version) of the seeded augmentation ``views`` applies."""
        return AUGMENTATIONS[self.name]

    def get(self, indices: torch.Tensor, views: torch.Tensor | None = None) -> torch.Tensor:
        """``kd.core.samples.SampleSource.get``: the samples, or their seeded views."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        if views is None:
            return self.inputs[idx]
        return self.views(idx, idx * VIEW_STRIDE + torch.as_tensor(views, dtype=torch.long))

    def views(self, indices: torch.Tensor | list[int], seeds: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """The samples at ``indices``; with ``seeds``, each sample's augmented view.

        A view is a deterministic function of (sample, seed), so a server, a
        cache and a trainer that agree on the seed see exactly the same pixels.
        """
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.inputs[idx]
        if seeds is None:
            return x
        seeds = torch.as_tensor(seeds, dtype=torch.long)
        if seeds.shape != idx.shape:
            raise ValueError(f"{len(seeds)} view seeds for {len(idx)} indices")
        return torch.stack([augment(self.name, row, int(s)) for row, s in zip(x, seeds)]) if len(idx) else x


@cache
def _digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)  # pixel intensities 0..16 -> 0..1
    y = y.astype(np.int64)
    return tuple(  # type: ignore[return-value]
        train_test_split(x, y, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=y)
    )


def load_dataset(name: str = "digits", split: str = "train") -> Dataset:
    """Load a bundled dataset split (``digits`` with ``train`` or ``test``)."""
    if name != "digits":
        raise ValueError(f"unknown dataset {name!r}; bundled datasets: digits")
    x_tr, x_te, y_tr, y_te = _digits_split()
    if split == "train":
        x, y = x_tr, y_tr
    elif split == "test":
        x, y = x_te, y_te
    else:
        raise ValueError(f"unknown split {split!r} of dataset digits; splits: train, test")
    return Dataset(name, split, torch.from_numpy(x.copy()), torch.from_numpy(y.copy()), 10)


AUGMENTATIONS = {"digits": "digits-shift1-v1"}


def augment(name: str, sample: torch.Tensor, seed: int) -> torch.Tensor:
    """The seeded augmentation of one sample of dataset ``name``.

    digits: a random translation of the 8x8 image by -1, 0 or +1 pixels on
    each axis (zero fill), as in small-image KD training.
    """
    if name != "digits":
        raise ValueError(f"no augmentation defined for dataset {name!r}")
    g = torch.Generator().manual_seed(seed)
    dy, dx = (torch.randint(-1, 2, (2,), generator=g)).tolist()
    img = sample.reshape(8, 8)
    out = torch.zeros_like(img)
    ys, yd = (slice(0, 8 - dy), slice(dy, 8)) if dy >= 0 else (slice(-dy, 8), slice(0, 8 + dy))
    xs, xd = (slice(0, 8 - dx), slice(dx, 8)) if dx >= 0 else (slice(-dx, 8), slice(0, 8 + dx))
    out[yd, xd] = img[ys, xs]
    return out.reshape(sample.shape)


def parse_dataset(ref: str) -> Dataset:
    """``digits`` or ``digits:test`` -> Dataset (split defaults to train)."""
    name, _, split = ref.partition(":")
    return load_dataset(name, split or "train")
