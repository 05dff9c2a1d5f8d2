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
