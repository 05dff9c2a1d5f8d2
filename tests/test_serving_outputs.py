"""Outputs made next to the model: clients ask only for what they keep.

A top-k cache filled through a real server asks for top-k (+ the log-sum-exp at
the cache's temperature) and writes the records the codec writes from full
logits; the replies are a fraction of full logits' bytes. The per-request
post-processing runs before the host copy (``DynamicBatcher.submit(post=...)``),
and the host copy goes through reused staging buffers (pinned on CUDA; the same
code unpinned here)."""

from __future__ import annotations

import sys

import grpc
import pytest
import torch

from kd.cache import CacheReader
from kd.core.data import load_dataset
from kd.core.sparse import topk_parts
from kd.core.targets import SparseTargets
from kd.precompute import precompute
from kd.student_trainer.sources import LocalSource, ServerSource
from kd.teacher_server.batcher import DynamicBatcher
from kd.teacher_server.client import TeacherClient, TeacherRequestError
from kd.teacher_server.loading import Teacher, load_teacher
from kd.teacher_server.outputs import postprocess
from kd.teacher_server.runner import HostStaging, ModelRunner
from kd.teacher_server.server import BatchingOptions, start_server
from kd.v1 import teacher_pb2 as pb

CLASSES = 200
K = 10
T = 4.0


@pytest.fixture(scope="module")
def wide() -> Teacher:
    """A 200-class teacher on the digits' 64 inputs (seeded weights, scaled up so the
    distribution at T is far from uniform and the top-k are well separated)."""
    torch.manual_seed(7)
    t = load_teacher("wide", f"kd.models:MLP?sizes=[64,128,{CLASSES}]")
    with torch.no_grad():
        for p in t.model.parameters():
            p.mul_(3.0)
    return t


@pytest.fixture(scope="module")
def running(wide: Teacher):
    srv = start_server([wide], port=0, batching=BatchingOptions(max_batch_size=256, max_queue_delay_us=2000))
    yield srv
    srv.stop(grace=1)


def _reply_bytes(srv) -> float:
    return srv.metrics.reply_bytes("wide")


class AllLogits(ServerSource):
    """A server source that does not know top-k: it asks for full logits (the old path)."""

    keeping_topk = None


def test_a_topk_cache_through_a_server_asks_for_topk_and_writes_the_codecs_records(running, tmp_path) -> None:
    data = load_dataset("digits", "test")
    address = f"127.0.0.1:{running.port}"
    before = _reply_bytes(running)
    with ServerSource(address) as src:
        precompute(data, src, tmp_path / "sparse", codec=f"topk:{K}", temperature=T, workers=0, progress=False)
    topk_bytes = _reply_bytes(running) - before
    with AllLogits(address) as src:
        precompute(data, src, tmp_path / "dense", codec=f"topk:{K}", temperature=T, workers=0, progress=False)
    full_bytes = _reply_bytes(running) - before - topk_bytes
    n = len(data)
    # Exactly K fp32 values + K int32 classes + one fp32 log-sum-exp per sample, not C logits.
    assert topk_bytes == n * (K * 4 + K * 4 + 4)
    assert full_bytes == n * CLASSES * 4
    assert topk_bytes * 9 < full_bytes
    sparse, dense = CacheReader(tmp_path / "sparse"), CacheReader(tmp_path / "dense")
    idx = list(range(n))
    a, b = sparse.targets(idx), dense.targets(idx)
    assert isinstance(a, SparseTargets) and a.temperature == T
    assert torch.equal(a.indices, b.indices) and torch.equal(a.logits, b.logits)
    torch.testing.assert_close(a.logsumexp, b.logsumexp, rtol=1e-6, atol=1e-6)
    # And the probabilities are those at the cache's T, not at 1 (the mismatch this resolves): codec
    # version 3 stores log p at T in fp16 (2^-11 |log p|, rescaled by at most the largest of those).
    z = LocalSource(running.endpoints["wide"].teacher).targets(torch.tensor(idx), data.get(torch.tensor(idx)))
    ref = torch.log_softmax(z.double() / T, dim=1).gather(1, a.indices)
    got = a.logits.double() / T - a.logsumexp.double()[:, None]
    assert bool(((got - ref).abs() <= 2 * 2.0**-11 * ref.abs().amax(1, keepdim=True) + 1e-5).all())


def test_server_source_topk_targets_match_the_full_logits(running, wide: Teacher) -> None:
    x = load_dataset("digits", "test").get(torch.arange(37))
    z = ModelRunner(wide)(x)
    with ServerSource(f"127.0.0.1:{running.port}", topk=5, temperature=2.0) as src:
        t = src.targets(torch.arange(37), x)
        (_, streamed), *_ = list(src.iter_targets([(torch.arange(37), x, torch.zeros(37, dtype=torch.long))]))
    values, indices, lse = topk_parts(z, 5, 2.0)
    for got in (t, streamed):
        assert isinstance(got, SparseTargets) and got.kind == "topk" and got.temperature == 2.0
        assert torch.equal(got.indices, indices)
        torch.testing.assert_close(got.logits, values, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.logsumexp, lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [-1.0, float("nan"), 1e9])
def test_a_bad_sparse_temperature_is_invalid_argument(running, temperature: float) -> None:
    with TeacherClient(f"127.0.0.1:{running.port}") as c:
        with pytest.raises(TeacherRequestError) as e:
            c.infer("wide", torch.zeros(2, 64), logits=False, top_k=3, sparse_temperature=temperature)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "sparse_temperature" in e.value.message
        assert c.infer("wide", torch.zeros(2, 64), logits=False, top_k=3)["topk_values"].shape == (2, 3)


def test_post_processing_runs_before_the_host_copy(wide: Teacher) -> None:
    """The runner's to_host gets only what post made (top-k of these rows), never the batch's logits."""
    copied: list[set[str]] = []

    class Recording(ModelRunner):
        def to_host(self, outputs):
            copied.append(set(outputs) if isinstance(outputs, dict) else {"tensor"})
            return super().to_host(outputs)

    spec = pb.OutputSpec(top_k=3, sparse_temperature=2.0)
    b = DynamicBatcher(Recording(wide), max_batch_size=8, max_queue_delay_s=0.0)
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(0))  # split over three forwards
    out = b.submit(x, post=lambda o: postprocess(spec, o, labels_only=False)).result(timeout=30)
    plain = b.submit(x[:4]).result(timeout=30)
    b.close()
    assert copied[-1] == {"logits"}  # the request without post: the batch as it is
    assert copied[:-1] == [{"topk_values", "topk_indices", "logsumexp"}]  # once, for the whole request
    values, indices, lse = topk_parts(ModelRunner(wide)(x), 3, 2.0)
    assert torch.equal(out["topk_indices"], indices.int())
    torch.testing.assert_close(out["topk_values"], values)
    torch.testing.assert_close(out["logsumexp"], lse)
    torch.testing.assert_close(plain["logits"], ModelRunner(wide)(x[:4]))


def test_a_failing_post_fails_its_request_only(wide: Teacher) -> None:
    b = DynamicBatcher(ModelRunner(wide), max_batch_size=64, max_queue_delay_s=0.05)

    def broken(_out):
        raise RuntimeError("post failed")

    bad = b.submit(torch.zeros(3, 64), post=broken)
    good = b.submit(torch.zeros(2, 64), post=lambda o: {"n": o["logits"][:, :1]})
    with pytest.raises(RuntimeError, match="post failed"):
        bad.result(timeout=30)
    assert good.result(timeout=30)["n"].shape == (2, 1)
    b.close()


def test_host_staging_reuses_a_buffer_only_once_nothing_refers_to_it() -> None:
    staging = HostStaging(pin=False)
    first = staging.copy_out({"a": torch.arange(10.0), "b": torch.arange(6, dtype=torch.int32).reshape(2, 3)})
    assert torch.equal(first["a"], torch.arange(10.0)) and first["b"].dtype == torch.int32
    assert torch.equal(first["b"], torch.arange(6, dtype=torch.int32).reshape(2, 3))
    view = first["a"][2:4]  # a view of a view: still holds the buffer
    del first
    second = staging.copy_out({"a": torch.full((10,), 7.0)})
    assert staging.allocated == 2 and staging.reused == 0
    assert torch.equal(view, torch.tensor([2.0, 3.0]))  # not overwritten by the second copy
    del view, second
    third = staging.copy_out({"a": torch.full((3,), 5.0)})
    assert staging.reused == 1 and staging.allocated == 2
    assert torch.equal(third["a"], torch.full((3,), 5.0))


def test_kd_train_with_server_topk_asks_the_server_for_topk_only(server, address: str, tmp_path) -> None:
    from typer.testing import CliRunner

    from kd.cli import app

    teacher = server.endpoints["digits"].teacher.name
    common = ["train", "--source", f"server:{address}/{teacher}", "--epochs", "1", "--subset", "64",
              "--batch-size", "32", "--out", str(tmp_path / "student.safetensors")]  # fmt: skip
    refused = CliRunner().invoke(app, [*common, "--method", "dkd", "--server-topk", "3"])
    assert refused.exit_code == 2 and "method 'dkd' needs the teacher's dense logits" in refused.output
    before = server.metrics.reply_bytes(teacher)
    res = CliRunner().invoke(app, [*common, "--method", "kd", "--opt", "temperature=4", "--server-topk", "3"])
    assert res.exit_code == 0, res.output
    sent = server.metrics.reply_bytes(teacher) - before
    assert sent == 64 * (3 * 4 + 3 * 4 + 4)  # one epoch of 64 samples: top-3 + log-sum-exp, never 10 logits


def test_host_staging_never_hands_one_buffer_to_two_takers() -> None:
    """A buffer taken is in use from the moment it is handed out (before any view of it is
    made), so a second taker, e.g. another instance's completion thread, gets another one."""
    staging = HostStaging(pin=False)
    a = staging.take(100)
    b = staging.take(100)
    assert a.data_ptr() != b.data_ptr() and staging.allocated == 2
    del a
    c = staging.take(50)
    assert staging.reused == 1 and c.numel() == 50 and c.data_ptr() != b.data_ptr()


def _without(missing: str, find_spec):
    return lambda name, *args: None if name == missing else find_spec(name, *args)


def test_bench_serve_peer_triton_says_what_is_missing_and_measures_nothing(tmp_path) -> None:
    import importlib.util

    from typer.testing import CliRunner

    from kd.cli import app

    real_find_spec = importlib.util.find_spec
    out = tmp_path / "bench.json"
    # As on a machine without PyTriton (CI never installs the optional extra), whatever this one has.
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("KD_TRITON_PYTHON", raising=False)
        mp.setattr(importlib.util, "find_spec", _without("pytriton", real_find_spec))
        res = CliRunner().invoke(app, ["bench", "serve", "--quick", "--peer", "triton", "--json", str(out)])
    assert res.exit_code != 0 and "PyTriton" in res.output and "nothing was measured" in res.output
    assert not out.exists()
    # PyTriton in another interpreter (numpy < 2): that one is asked, and its problem named.
    fake = tmp_path / "python-without-pytriton"
    fake.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'pytriton'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    import numpy

    cases = [(fake, "No module named 'pytriton'"), (tmp_path / "absent", "No such file")]
    if int(numpy.__version__.split(".")[0]) >= 2:  # this interpreter, as the other one: its numpy is named
        cases.append((sys.executable, f"numpy {numpy.__version__}: PyTriton 0.7 needs numpy < 2"))
    for python, says in cases:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("KD_TRITON_PYTHON", str(python))
            res = CliRunner().invoke(app, ["bench", "serve", "--quick", "--peer", "triton", "--json", str(out)])
        assert res.exit_code != 0 and f"KD_TRITON_PYTHON={python}" in res.output and says in res.output, res.output
        assert "nothing was measured" in res.output and not out.exists()
    res = CliRunner().invoke(app, ["bench", "serve", "--quick", "--peer", "litserve"])
    assert res.exit_code != 0 and "the only peer is triton" in res.output
