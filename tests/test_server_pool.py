"""A pool of real ``kd serve`` processes as one source (``server:A,B/teacher``): the members must
agree on what the source relies on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from kd.core.data import load_dataset
from kd.student_trainer.sources import Batch, ServerSource

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


@contextmanager
def served(tmp: Path, teacher_spec: str, *extras: list[str]) -> Iterator[list[tuple[str, subprocess.Popen]]]:
    """One ``kd serve`` process per entry of ``extras`` (its extra flags) on a free loopback port,
    started together; yields [(address, process)], stopped (SIGTERM, then kill) at the end."""
    procs = []
    try:
        for i, extra in enumerate(extras):
            port_file = tmp / f"port-{i}"
            log = open(tmp / f"serve-{i}.log", "w")
            cmd = [sys.executable, "-m", "kd", "serve", "--teacher", f"t={teacher_spec}", "--host", "127.0.0.1",
                   "--port", "0", "--port-file", str(port_file), *extra]  # fmt: skip
            procs.append((port_file, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV)))
            log.close()
        out = []
        deadline = time.monotonic() + 60
        for i, (port_file, proc) in enumerate(procs):
            while not port_file.exists() or not port_file.read_text().strip():
                assert proc.poll() is None, (tmp / f"serve-{i}.log").read_text()
                assert time.monotonic() < deadline, "kd serve did not start"
                time.sleep(0.05)
            out.append((f"127.0.0.1:{port_file.read_text().strip()}", proc))
        yield out
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _batches(size: int = 16, limit: int | None = None) -> list[Batch]:
    data = load_dataset("digits", "train")
    n = len(data) if limit is None else min(limit, len(data))
    out = []
    for start in range(0, n, size):
        idx = torch.arange(start, min(start + size, n))
        out.append(Batch(idx, data.get(idx), torch.as_tensor(data.labels[start : start + len(idx)])))
    return out


def test_pool_members_must_agree_on_datasets_and_live_weights(tmp_path: Path, teacher_spec: str) -> None:
    # B registers other data of the same size under the same name (the digits rows reversed);
    # C takes live weight updates. Each differs from A in one thing a source relies on.
    data = load_dataset("digits", "train")
    x = data.get(torch.arange(len(data))).numpy().reshape(len(data), -1)
    np.savez(tmp_path / "perm.npz", x=x[::-1].copy(), y=np.asarray(data.labels)[::-1].copy())
    with served(
        tmp_path,
        teacher_spec,
        ["--dataset", "train=digits:train"],
        ["--dataset", f"train=npz:{tmp_path / 'perm.npz'}"],
        ["--dataset", "train=digits:train", "--accept-weights"],
    ) as [(a, _), (b, _), (c, _)]:
        for order in ([a, b], [b, a]):  # whichever member answers first, the other is checked too
            with pytest.raises(ValueError, match="members differ") as e:
                ServerSource(order, "t", dataset="train")
            assert "dataset 'train'" in str(e.value) and a in str(e.value) and b in str(e.value)
        for order in ([a, c], [c, a]):
            with pytest.raises(ValueError, match=r"live weights \(--accept-weights\)") as e:
                ServerSource(order, "t")
            assert a in str(e.value) and c in str(e.value)
        # The same members by value (no dataset asked): A and B agree on all the source relies on.
        ServerSource([a, b], "t").close()
