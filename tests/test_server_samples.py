"""Sample and top-k caches filled through a real server ask only for what they keep.

``sample:K[xR]``: the server draws next to the model with the codec's keyed uniforms
(``OutputSpec.class_samples`` + ``sample_uniforms``) and answers unique ids with counts;
the cache's records equal those the codec makes from the local teacher's full logits.
``--read-through`` (``ReadThroughSource``) asks a server for top-k or draws the same way.
The server's reply bytes (its metrics) show that no logits were sent."""

from __future__ import annotations

import grpc
import pytest
import torch

from kd.cache import CacheReader
from kd.core.data import load_dataset
from kd.core.targets import SparseTargets
from kd.precompute import precompute
from kd.student_trainer.sources import LocalSource, ReadThroughSource, ServerSource
from kd.teacher_server.client import TeacherClient, TeacherRequestError
from kd.teacher_server.loading import Teacher, load_teacher
from kd.teacher_server.server import BatchingOptions, start_server

CLASSES = 200


@pytest.fixture(scope="module")
def wide() -> Teacher:
    """200 classes on the digits' 64 inputs, weights scaled so the draws are spread over few classes."""
    torch.manual_seed(11)
    t = load_teacher("wide", f"kd.models:MLP?sizes=[64,128,{CLASSES}]")
    with torch.no_grad():
        for p in t.model.parameters():
            p.mul_(2.0)
    return t


@pytest.fixture(scope="module")
def running(wide: Teacher):
    # max_queue_delay 0: a request alone is its own forward, so the server's logits are the local ones bit for bit.
    srv = start_server([wide], port=0, batching=BatchingOptions(max_batch_size=512, max_queue_delay_us=0))
    yield srv
    srv.stop(grace=1)


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits", "test")


def _sent(srv) -> float:
    return srv.metrics.reply_bytes("wide")


@pytest.mark.parametrize("codec", ["sample:12", "sample:5x3"])
def test_a_sample_cache_through_a_server_gets_draws_only_and_the_codecs_records(running, wide, data, codec,
                                                                               tmp_path) -> None:  # fmt: skip
    k, _, r = codec.removeprefix("sample:").partition("x")
    k, r = int(k), int(r or 1)
    before = _sent(running)
    with ServerSource(f"127.0.0.1:{running.port}") as src:
        precompute(data, src, tmp_path / "served", codec=codec, batch_size=128, workers=0, progress=False)
    sent = _sent(running) - before
    precompute(data, LocalSource(wide), tmp_path / "local", codec=codec, batch_size=128, workers=0, progress=False)
    n = len(data)
    assert sent == n * r * k * 8  # int32 ids + int32 counts per draw slot, never 200 logits
    served, local = CacheReader(tmp_path / "served"), CacheReader(tmp_path / "local")
    idx = list(range(n))
    ids_s, counts_s = served.codec.decode_rounds(served.read_raw(idx), CLASSES)
    ids_l, counts_l = local.codec.decode_rounds(local.read_raw(idx), CLASSES)
    assert torch.equal(ids_s, ids_l) and torch.equal(counts_s, counts_l)
    assert bool((counts_s.sum(dim=2) == k).all()) and int((counts_s > 0).sum(dim=2).max()) > 1  # real spread


def test_read_through_asks_the_server_for_what_the_cache_keeps(running, wide, data, tmp_path) -> None:
    address = f"127.0.0.1:{running.port}"
    idx = torch.arange(0, 96)
    x = data.get(idx)
    for codec, temperature, per_sample in (("sample:12", None, 12 * 8), ("topk:5", 4.0, 5 * 8 + 4)):
        name = codec.replace(":", "-")
        before = _sent(running)
        with ServerSource(address) as up:
            through = ReadThroughSource(str(tmp_path / f"s-{name}"), up, data, codec=codec, temperature=temperature)
            got = through.targets(idx, x)
            again = through.targets(idx, x)  # hits: nothing more asked
        assert _sent(running) - before == len(idx) * per_sample
        ref = ReadThroughSource(str(tmp_path / f"l-{name}"), LocalSource(wide), data, codec=codec,
                                temperature=temperature).targets(idx, x)  # fmt: skip
        for t in (got, again):
            assert isinstance(t, SparseTargets) and t.kind == codec.partition(":")[0]
            assert torch.equal(t.indices, ref.indices)
            torch.testing.assert_close(t.logits, ref.logits, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(t.logsumexp, ref.logsumexp, rtol=1e-6, atol=1e-6)


def test_bad_sample_uniforms_are_invalid_argument(running) -> None:
    with TeacherClient(f"127.0.0.1:{running.port}") as c:
        x = torch.zeros(3, 64)
        for uniforms, what in ((torch.rand(3, 5), "shape"), (torch.full((3, 4), 1.0), "[0, 1)"),
                               (torch.full((3, 4), float("nan")), "[0, 1)")):  # fmt: skip
            with pytest.raises(TeacherRequestError) as e:
                c.infer("wide", x, logits=False, samples=4, sample_uniforms=uniforms)
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and what in e.value.message
        out = c.infer("wide", x, logits=False, samples=4, sample_rounds=2, sample_seed=5)
        assert set(out) == {"sample_indices", "sample_counts"} and out["sample_counts"].shape == (3, 2, 4)
        assert bool((out["sample_counts"].sum(dim=2) == 4).all())
