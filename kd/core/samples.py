"""The sample-source contract: what precompute, the server (inputs by reference)
and the trainer read a dataset through.

A sample source is a map-style collection of ``len(source)`` samples, each with
an integer label, and a seeded *view* policy. ``get(indices, views)`` returns
the inputs of those samples as the named views (view ``None``: the plain
sample), so every reader that agrees on (sample, view) sees the same pixels.
``dataset_id`` names the data exactly (a manifest hash for files, Arrow's
fingerprint for ``hf:``): a cache built on other data is refused by it.

Any object with these members is a sample source (``typing.Protocol``); the
bundled digits (``kd.core.data.Dataset``) is one. The file formats live beside
this module in ``kd.core.data`` and are opened by URI with ``open_source``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

VIEW_STRIDE = 1 << 16  # views per sample at most

# Upper bounds of user-given sizes that are multiplied into one allocation, checked where the
# option is parsed: without them a typo (input_shape=3x100000x100000, views crop:pad=100000)
# was accepted and then tried as a 120-240 GB allocation at the first read (the allocator's
# message, or an overcommitting machine killing the process). No real use comes near them:
# MAX_SAMPLE_ELEMENTS values per sample (2**28: 1 GiB as float32; a 4K RGB image holds 2**24.6,
# a 512^3 CT volume 2**27, a 16-frame 224x224 clip 2**21.3); MAX_IMAGE_SIDE pixels per side of
# a resized image or crop (8192: 8K; 3 x 8192^2 is under MAX_SAMPLE_ELEMENTS); MAX_CROP_PAD
# pixels of a padded crop's shift (1024: recipes pad 4 at 32 px and up to ~32 at 224 px, and
# a shift beyond the image leaves only zeros).
MAX_SAMPLE_ELEMENTS = 1 << 28
MAX_IMAGE_SIDE = 8192
MAX_CROP_PAD = 1024


def sample_size_problem(dims: tuple[int, ...]) -> str | None:
    """Why a sample of shape ``dims`` (-1: a variable length, not counted) is too large, or None."""
    n = 1
    for d in dims:
        n *= max(d, 1)
    if n > MAX_SAMPLE_ELEMENTS:
        return f"{n:,} values per sample is over the bound of {MAX_SAMPLE_ELEMENTS:,} (2**28)"
    return None


@runtime_checkable
class SampleSource(Protocol):
    """A dataset as kd reads it: by index and view, never as one tensor in RAM."""

    @property
    def dataset_id(self) -> str:
        """``name/split@hash``: changes whenever any sample or label changes."""
        ...

    @property
    def num_classes(self) -> int: ...

    @property
    def augmentation(self) -> str:
        """Name and version of the view policy (``"none"`` when there is none)."""
        ...

    @property
    def labels(self) -> torch.Tensor:
        """int64 ``[N]``, without decoding any sample."""
        ...

    def __len__(self) -> int: ...

    def get(self, indices: torch.Tensor, views: torch.Tensor | None = None) -> torch.Tensor:
        """Inputs ``[B, *sample_shape]`` of ``indices`` (as views ``views`` when given)."""
        ...


def view_seeds(indices: torch.Tensor, views: torch.Tensor | None, num_views: int) -> torch.Tensor | None:
    """The augmentation seed of each (sample, view); None when there is one plain view.

    ``seed = index * 65536 + view``: a pure function of the key, so precompute,
    server and trainer agree without storing seeds.
    """
    if num_views <= 1 or views is None:
        return None
    if num_views > VIEW_STRIDE:
        raise ValueError(f"at most {VIEW_STRIDE} views per sample")
    return indices.long() * VIEW_STRIDE + views.long()
