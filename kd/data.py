"""Bundled datasets. The default is scikit-learn's handwritten digits (1797
8x8 images, shipped inside scikit-learn: no download), split once with a fixed
seed so every command and every process sees the same train/test samples.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

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

    @property
    def dataset_id(self) -> str:
        """``name/split@hash``: the hash covers the samples and labels, so a
        cache built on other data (or another split) is refused."""
        h = hashlib.sha256()
        h.update(self.inputs.numpy().tobytes())
        h.update(self.labels.numpy().tobytes())
        return f"{self.name}/{self.split}@{h.hexdigest()[:16]}"

    def __len__(self) -> int:
        return int(self.labels.shape[0])


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


def parse_dataset(ref: str) -> Dataset:
    """``digits`` or ``digits:test`` -> Dataset (split defaults to train)."""
    name, _, split = ref.partition(":")
    return load_dataset(name, split or "train")
