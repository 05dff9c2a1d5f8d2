"""Every feature method trains from every source: an in-process teacher, a served one
(statistics computed by the server) and the cache (features stored as the method asks for
them, fp16) -- and the three agree."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kd.bench.methods import FEATURE_MATCHES, _feature_options, _teacher_names
from kd.core.data import load_dataset
from kd.models import digits_cnn_student
from kd.precompute import precompute
from kd.student_trainer.losses import METHODS
from kd.student_trainer.sources import CacheSource, LocalSource, ServerSource
from kd.student_trainer.train import TrainConfig, seed_everything, train_student
from kd.teacher_server.loading import Teacher, load_teacher
from kd.teacher_server.server import start_server

TRAIN = load_dataset("digits", "train")
TEST = load_dataset("digits", "test")
FEATURE_METHODS = sorted(n for n, m in METHODS.items() if m.kind == "feature")


@pytest.fixture(scope="module")
def cnn(digits_cnn_spec) -> Teacher:
    return load_teacher("cnn", digits_cnn_spec(2))


@pytest.fixture(scope="module")
def address(cnn: Teacher):
    running = start_server([cnn])
    yield f"127.0.0.1:{running.port}"
    running.stop(grace=1)


@pytest.fixture(scope="module")
def cache_path(cnn: Teacher, tmp_path_factory: pytest.TempPathFactory) -> Path:
    names = sorted({f for m in FEATURE_METHODS for f in _teacher_names(m, _feature_options(m))})
    out = tmp_path_factory.mktemp("cache") / "features"
    precompute(TRAIN, LocalSource(cnn), out, features=names, progress=False)
    return out


def _losses(method: str, source) -> list[float]:
    seed_everything(0)
    student = digits_cnn_student()
    config = TrainConfig(method=method, matches=list(FEATURE_MATCHES[method]), method_options=_feature_options(method),
                         epochs=2, batch_size=32)  # fmt: skip
    return train_student(student, TRAIN, TEST, config, source=source, subset=torch.arange(64)).loss_per_epoch


def test_every_feature_method_has_matches_for_the_cnn_pair() -> None:
    assert set(FEATURE_MATCHES) == set(FEATURE_METHODS)


@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_feature_method_trains_alike_from_local_server_and_cache(method: str, cnn: Teacher, address: str,
                                                                  cache_path: Path) -> None:  # fmt: skip
    local = _losses(method, LocalSource(cnn))
    with ServerSource(address, "cnn") as src:
        served = _losses(method, src)
    if method == "sskd":
        # SSKD needs the teacher on rotated copies of each batch, which no cache holds.
        with CacheSource(str(cache_path)) as src, pytest.raises(ValueError, match="rotated inputs need a teacher"):
            _losses(method, src)
        assert served == pytest.approx(local, rel=1e-3, abs=1e-5)
        return
    with CacheSource(str(cache_path)) as src:
        cached = _losses(method, src)
    assert all(math.isfinite(v) for v in local + served + cached), (local, served, cached)
    if method == "srd":
        # SRD copies an in-process teacher's classifier; a server or a cache has no weights to
        # give, so there it fits the head to the teacher's outputs (losses/srd.py): those two agree.
        assert cached == pytest.approx(served, rel=2e-2, abs=1e-3)
        assert served != pytest.approx(local, rel=1e-3, abs=1e-5)
        return
    # The server computes what the in-process teacher does (fp32); the cache holds fp16 features.
    assert served == pytest.approx(local, rel=1e-3, abs=1e-5)
    assert cached == pytest.approx(local, rel=2e-2, abs=1e-3)
