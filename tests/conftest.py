"""Shared fixtures: a real teacher (the bundled digits MLP with seeded weights
saved as safetensors) and a real gRPC server on 127.0.0.1, port 0."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kd.models import digits_teacher
from kd.teacher_server.loading import Teacher, load_teacher
from kd.teacher_server.server import BatchingOptions, RunningServer, start_server

# One intra-op thread in the test process and (OMP_NUM_THREADS, unless the caller set it) in every
# process a test starts: the models are tiny (digits MLPs and CNNs, batches of 2 to 256), where a
# second OpenMP thread buys nothing and, on the shared 2-core CI machine, costs up to 10x (a forward
# of digits_cnn: 4 ms on one thread, 61 ms on two while other processes hold the cores). The same
# count on both sides also keeps in-process and subprocess results computed alike.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

# kd's per-user metadata (file manifests, webdataset indexes, token sidecars) goes to a directory of
# this run, for the tests and every process they start: none is read from or left in ~/.cache/kd,
# where a stale one from another checkout could change what a test sees.
_CACHE_DIR = tempfile.mkdtemp(prefix="kd-test-cache-")
os.environ["KD_CACHE_DIR"] = _CACHE_DIR
# Likewise matplotlib's config and font cache (`kd plot` in test_train_loop): it made ~/.config/matplotlib
# and wrote ~/.cache/matplotlib/fontlist-*.json, outside every test's tmp dir.
os.environ["MPLCONFIGDIR"] = os.path.join(_CACHE_DIR, "matplotlib")
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def teacher_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1234)
    model = digits_teacher()
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="session")
def teacher_spec(teacher_weights: Path) -> str:
    return f"kd.models:digits_teacher@{teacher_weights}"


@pytest.fixture(scope="session")
def teacher(teacher_spec: str) -> Teacher:
    return load_teacher("digits", teacher_spec)


@pytest.fixture()
def server(teacher: Teacher):
    running: RunningServer = start_server(
        [teacher], port=0, batching=BatchingOptions(max_batch_size=64, max_queue_delay_us=2000)
    )
    yield running
    running.stop(grace=1)


@pytest.fixture()
def address(server: RunningServer) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture(scope="session")
def digits_cnn_spec(tmp_path_factory: pytest.TempPathFactory):
    """``spec(epochs)``: the SPEC of ``kd.models:digits_cnn`` trained with CE on the digits
    training split (seed 0, Adam 1e-3, batch 64) for that many epochs; trained once per
    session for each epoch count, however many test modules ask for it."""
    from kd.core.data import load_dataset
    from kd.models import digits_cnn
    from kd.student_trainer.train import TrainConfig, seed_everything, train_student
    from kd.teacher_server.loading import save_weights

    specs: dict[int, str] = {}

    def spec(epochs: int) -> str:
        if epochs not in specs:
            train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
            seed_everything(0)
            model = digits_cnn()
            train_student(model, train, test, TrainConfig(method="ce", epochs=epochs, lr=1e-3, batch_size=64))
            path = save_weights(model, tmp_path_factory.mktemp(f"digits-cnn-{epochs}") / "teacher.safetensors")
            specs[epochs] = f"kd.models:digits_cnn@{path}"
        return specs[epochs]

    return spec


@pytest.fixture(autouse=True)
def _one_torch_thread_after_each_test():
    """Each test leaves torch on the one thread set above: a test, or kd code it runs in this process
    (the bench sets its own count), that changed it would otherwise slow every test after it."""
    yield
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
