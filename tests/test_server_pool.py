"""A pool of real ``kd serve`` processes as one source (``server:A,B/teacher``): the members must
agree on what the source relies on, a member that drains mid-epoch hands its batches to the
others (the targets stay exactly the same), and a pool's streams are closed before the next
epoch's DataLoader forks its workers. Also the gRPC target schemes ``server:`` takes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from kd.core.data import load_dataset
from kd.student_trainer.sources import Batch, ServerSource, parse_source, split_server_address
from kd.teacher_server.client import TeacherRequestError

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


@pytest.mark.serial
def test_a_member_drained_mid_epoch_hands_its_batches_to_the_others(tmp_path: Path, teacher_spec: str) -> None:
    batches = _batches(8)
    # Requests of 8 on servers that batch at most 8: none is merged with another, so each
    # batch's targets are computed alike whichever server answers, and compare exactly.
    alone = ["--max-batch-size", "8"]
    with served(tmp_path, teacher_spec, alone, alone) as [(a, _), (b, proc_b)]:
        with ServerSource(a, "t") as single:
            want = [t.clone() for _, t in single.iter_targets(batches)]
        got = []
        with ServerSource([a, b], "t", depth=2) as pool:
            started = time.monotonic()
            for i, (batch, t) in enumerate(pool.iter_targets(batches)):
                if i == 10:
                    proc_b.send_signal(signal.SIGTERM)  # a rolling restart: B drains and exits 0
                if i > 10:
                    time.sleep(0.02)  # B's refusals and its exit happen while the epoch goes on
                assert torch.equal(batch.indices, batches[i].indices)
                got.append(t.clone())
            assert time.monotonic() - started < 30
            assert proc_b.wait(30) == 0
            # The next epoch, B gone: its new stream would wait for B to come back (until the
            # client's 60 s stream_timeout); the pool leaves it out until it accepts connections.
            started = time.monotonic()
            second = [t.clone() for _, t in pool.iter_targets(batches)]
            assert time.monotonic() - started < 10
    assert len(got) == len(want) == len(second)
    for i, (g, w, h) in enumerate(zip(got, want, second)):
        assert torch.equal(g, w) and torch.equal(h, w), i


@pytest.mark.serial
def test_a_stalled_member_hands_its_batches_to_the_others(tmp_path: Path, teacher_spec: str) -> None:
    # B stops answering (SIGSTOP: a hung node); its stream's stall timeout fails it, and its
    # unanswered batches go to A.
    batches = _batches(8, limit=400)
    alone = ["--max-batch-size", "8"]
    with served(tmp_path, teacher_spec, alone, alone) as [(a, _), (b, proc_b)]:
        with ServerSource(a, "t") as single:
            want = [t.clone() for _, t in single.iter_targets(batches)]
        got = []
        try:
            with ServerSource([a, b], "t", depth=2, stream_timeout=6.0) as pool:
                for i, (_, t) in enumerate(pool.iter_targets(batches)):
                    if i == 5:
                        proc_b.send_signal(signal.SIGSTOP)
                    got.append(t.clone())
                # The next epoch, B still stalled: left out (a probe of it fails in 1 s) instead
                # of waiting stream_timeout for it again.
                started = time.monotonic()
                second = [t.clone() for _, t in pool.iter_targets(batches)]
                assert time.monotonic() - started < 5
        finally:
            proc_b.send_signal(signal.SIGCONT)
    assert len(got) == len(want) == len(second)
    assert all(torch.equal(g, w) and torch.equal(h, w) for g, w, h in zip(got, want, second))


def test_a_pool_with_no_member_left_names_them(tmp_path: Path, teacher_spec: str) -> None:
    batches = _batches(8, limit=400)
    with served(tmp_path, teacher_spec, [], []) as [(a, proc_a), (b, proc_b)]:
        with ServerSource([a, b], "t", depth=2) as pool:
            with pytest.raises(TeacherRequestError, match="every server of the pool failed") as e:
                for i, _ in enumerate(pool.iter_targets(batches)):
                    if i == 3:
                        proc_a.send_signal(signal.SIGTERM)
                        proc_b.send_signal(signal.SIGTERM)
                    time.sleep(0.01)
        assert a in str(e.value) and b in str(e.value)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, teacher_spec: str) -> Iterator[list[str]]:
    """Two healthy members that register the digits training split (tests that keep them so)."""
    registered = ["--dataset", "train=digits:train"]
    with served(tmp_path_factory.mktemp("pair"), teacher_spec, registered, registered) as members:
        yield [address for address, _ in members]


def test_a_request_error_still_fails_a_pool(pair: list[str]) -> None:
    bad = [Batch(torch.tensor([0, 100000]), torch.zeros(2, 64), torch.zeros(2, dtype=torch.long))]
    with ServerSource(pair, "t", dataset="train") as pool:
        with pytest.raises(TeacherRequestError) as e:
            list(pool.iter_targets(bad))
    assert e.value.code.name in ("INVALID_ARGUMENT", "OUT_OF_RANGE"), e.value


def _pool_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("pool-")]


def test_a_pooled_stream_ends_its_member_streams_before_it_returns(pair: list[str]) -> None:
    # The next epoch's DataLoader forks its workers right after this epoch's stream returns:
    # a member stream still live in its thread then is a gRPC call in flight at the fork, and
    # the forked workers died ("DataLoader worker ... exited unexpectedly", kd train --workers 2).
    batches = _batches(16, limit=320)
    with ServerSource(pair, "t", depth=2) as pool:
        for _ in range(3):
            assert len(list(pool.iter_targets(batches))) == len(batches)
            assert _pool_threads() == []
            stream = pool.iter_targets(batches)  # an epoch broken off (an error, a stop)
            next(stream)
            stream.close()
            assert _pool_threads() == []


@pytest.mark.parametrize(
    ("rest", "address", "teacher"),
    [
        ("127.0.0.1:50051", "127.0.0.1:50051", None),
        ("127.0.0.1:50051/t", "127.0.0.1:50051", "t"),
        ("a:1,b:2/t", "a:1,b:2", "t"),
        ("[::1]:50051/t", "[::1]:50051", "t"),
        ("dns:///localhost:50051", "dns:///localhost:50051", None),
        ("dns:///localhost:50051/t", "dns:///localhost:50051", "t"),
        ("dns://8.8.8.8:53/teachers:50051/t", "dns://8.8.8.8:53/teachers:50051", "t"),
        ("dns:localhost:50051/t", "dns:localhost:50051", "t"),
        ("ipv4:10.0.0.1:1,10.0.0.2:2/t", "10.0.0.1:1,10.0.0.2:2", "t"),
        ("ipv6:[::1]:1,[::1]:2", "[::1]:1,[::1]:2", None),
        ("unix:/run/kd/teachers.sock/t", "unix:/run/kd/teachers.sock", "t"),
        ("unix:teachers.sock", "unix:teachers.sock", None),
    ],
)
def test_server_addresses_keep_their_scheme_and_give_the_teacher_after_them(
    rest: str, address: str, teacher: str | None
) -> None:
    assert split_server_address(rest) == (address, teacher)


def test_a_dns_target_reaches_the_server(pair: list[str]) -> None:
    # The README's `--source server:dns:///HOST:PORT/TEACHER`: "dns:///" is not a teacher name.
    port = pair[0].rpartition(":")[2]
    batches = _batches(16, limit=64)
    with ServerSource(pair[0], "t") as direct, parse_source(f"server:dns:///localhost:{port}/t") as by_dns:
        assert by_dns.teacher == "t" and by_dns.fingerprint == direct.fingerprint
        for (_, a), (_, b) in zip(direct.iter_targets(batches), by_dns.iter_targets(batches)):
            assert torch.allclose(a, b, atol=1e-6)
    with parse_source(f"server:dns:///localhost:{port}") as unnamed:  # the server's one teacher
        assert unnamed.teacher == "t"
