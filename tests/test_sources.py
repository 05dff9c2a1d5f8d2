"""Soft-target sources agree, and the training loop is reproducible from any of them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kd.cache import CacheMeta, CacheReader, CacheWriter, StaleCacheError
from kd.core.data import load_dataset
from kd.models import digits_student
from kd.precompute import precompute
from kd.student_trainer.sources import CacheSource, LocalSource, ServerSource, parse_source
from kd.student_trainer.train import TrainConfig, seed_everything, train_student
from kd.teacher_server.loading import Teacher


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def test_cache_server_and_local_sources_yield_the_same_targets(tmp_path: Path, address: str, teacher: Teacher, digits):
    train, _ = digits
    local = LocalSource(teacher)
    server = ServerSource(address)
    report = precompute(train, server, tmp_path / "c", codec="fp32", progress=False)
    assert report.written == len(train) and report.skipped == 0
    cache = CacheSource(str(tmp_path / "c"), teacher_fingerprint=teacher.fingerprint, dataset_id=train.dataset_id)
    assert local.fingerprint == server.fingerprint == cache.fingerprint == teacher.fingerprint
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:300]
    x = train.inputs[idx]
    a, b, c = local.targets(idx, x), server.targets(idx, x), cache.targets(idx, x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
    # The pipelined path pairs every batch with its own targets, in order.
    batches = [(i, train.inputs[i], train.labels[i]) for i in torch.split(idx, 37)]
    seen = []
    for b, t in server.iter_targets(batches):
        seen.append(b.indices)
        torch.testing.assert_close(t, local.targets(b.indices, train.inputs[b.indices]), rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.cat(seen), idx)
    server.close()


def test_precompute_resumes_and_refuses_another_teacher(tmp_path: Path, teacher: Teacher, digits) -> None:
    train, _ = digits
    local = LocalSource(teacher)
    # A cache interrupted after its first 500 records (committed, as by a killed precompute). They
    # hold the teacher's logits + 1, so the test can tell whether the resumed run skipped them.
    meta = CacheMeta.for_dataset(teacher_fingerprint=local.fingerprint, teacher=local.teacher_name,
                                 num_classes=local.num_classes, dataset=train, codec="fp32")  # fmt: skip
    with torch.inference_mode():
        logits = teacher.model(train.inputs)
    with CacheWriter(tmp_path / "c", meta) as w:
        w.put(range(500), logits[:500] + 1.0)
    first = precompute(train, local, tmp_path / "c", progress=False)
    assert (first.written, first.skipped) == (len(train) - 500, 500)
    reader = CacheReader(tmp_path / "c")
    assert reader.verify().ok
    got = reader.get(range(len(train)))
    assert torch.equal(got[:500], logits[:500] + 1.0)  # skipped, not recomputed
    torch.testing.assert_close(got[500:], logits[500:], rtol=1e-5, atol=1e-5)  # the rest computed now
    again = precompute(train, local, tmp_path / "c", progress=False)
    assert again.written == 0 and again.skipped == len(train)
    with pytest.raises(StaleCacheError, match="dataset_id"):
        CacheSource(str(tmp_path / "c"), dataset_id=load_dataset("digits", "test").dataset_id)
    other = LocalSource("kd.models:digits_teacher")  # fresh random weights: another fingerprint
    with pytest.raises(StaleCacheError, match="teacher_fingerprint"):
        precompute(train, other, tmp_path / "c", progress=False)


def test_training_is_reproducible_and_source_independent(tmp_path: Path, teacher: Teacher, digits) -> None:
    train, test = digits
    local = LocalSource(teacher)
    precompute(train, local, tmp_path / "c", progress=False)
    cache = CacheSource(str(tmp_path / "c"))
    ahead = CacheSource(str(tmp_path / "c"), prefetch=2)  # reads in a background thread
    subset = torch.randperm(len(train), generator=torch.Generator().manual_seed(3))[:96]
    cfg = TrainConfig(method="kd", epochs=3, seed=7)
    students = []
    for source in (local, cache, local, ahead):
        seed_everything(7)
        s = digits_student()
        r = train_student(s, train, test, cfg, source=source, subset=subset)
        assert len(r.acc_per_epoch) == 3 and all(loss > 0 for loss in r.loss_per_epoch)
        students.append(s.state_dict())
    for k in students[0]:
        assert torch.equal(students[0][k], students[2][k]), "same seed, same source: must be identical"
        torch.testing.assert_close(students[0][k], students[1][k], rtol=1e-4, atol=1e-5)
        assert torch.equal(students[1][k], students[3][k]), "prefetching must not change what is read"


def test_kd_needs_a_source_and_sources_parse(tmp_path: Path, digits) -> None:
    train, test = digits
    with pytest.raises(ValueError, match="needs a soft-target source"):
        train_student(digits_student(), train, test, TrainConfig(method="kd", epochs=1))
    with pytest.raises(ValueError, match="unknown source kind"):
        parse_source("ftp:somewhere")
    with pytest.raises(ValueError, match="expected cache:PATH"):
        parse_source("cache")
