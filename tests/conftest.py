"""Shared fixtures: a real teacher (the bundled digits MLP with seeded weights
saved as safetensors) and a real gRPC server on 127.0.0.1, port 0."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kd.models import digits_teacher
from teacher_server.loading import Teacher, load_teacher
from teacher_server.server import BatchingOptions, RunningServer, start_server

torch.set_num_threads(2)


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
