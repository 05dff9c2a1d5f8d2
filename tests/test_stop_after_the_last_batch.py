"""A stop signal that lands after precompute's last batch stops nothing: the run is complete, so
its report says so (``stopped`` None, every record written) instead of "stopped" with nothing left,
and ``kd precompute`` exits 0. Image samples (npz) and token sequences (a text corpus), in process."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tiny_lm import BigramLM
from torch import nn

from kd.cache.store import CacheReader
from kd.core.data import open_source
from kd.precompute import LocalTokenTeacher, precompute, precompute_tokens
from kd.student_trainer.sources import LocalSource
from kd.teacher_server.loading import load_teacher


def linear() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    model.input_shape = (4,)
    return model


def asked_after_each_batch() -> tuple[list[int], Callable[[], int]]:
    asked: list[int] = []

    def stop() -> int:
        asked.append(1)
        return 15  # SIGTERM, every time it is asked

    return asked, stop


def test_a_signal_after_the_last_image_batch_stops_nothing(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).random((10, 4), dtype=np.float32), y=np.arange(10) % 3)
    source, teacher = open_source(f"npz:{tmp_path / 'd.npz'}"), LocalSource(load_teacher("t", f"{__name__}:linear"))
    asked, stop = asked_after_each_batch()
    whole = precompute(source, teacher, tmp_path / "one", batch_size=16, workers=0, progress=False, stop=stop)
    assert (whole.stopped, whole.written, asked) == (None, 10, [])  # one batch: nothing after it to stop
    asked, stop = asked_after_each_batch()
    part = precompute(source, teacher, tmp_path / "two", batch_size=4, workers=0, progress=False, stop=stop)
    assert (part.stopped, part.written, len(asked)) == (15, 4, 1)  # a batch left: the signal stops the run
    assert len(CacheReader(tmp_path / "one")) == 10


def test_a_signal_after_the_last_token_batch_stops_nothing(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("\n".join(f"line {i}: the cat" for i in range(6)) + "\n")
    source = open_source(f"text:{tmp_path / 't.txt'}?doc=line&pack=0&block=16")
    torch.manual_seed(1)
    teacher = LocalTokenTeacher(BigramLM(8, 2.0))
    asked, stop = asked_after_each_batch()
    whole = precompute_tokens(source, teacher, tmp_path / "one", batch_size=8, stop=stop)
    assert (whole.stopped, whole.written, asked) == (None, 6, [])
    asked, stop = asked_after_each_batch()
    part = precompute_tokens(source, teacher, tmp_path / "two", batch_size=4, stop=stop)
    assert (part.stopped, part.written, len(asked)) == (15, 4, 1)
