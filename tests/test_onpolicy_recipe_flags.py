"""``kd onpolicy`` takes the recipe flags of ``kd train`` (README: "recipe flags as `kd train`"):
``--schedule multistep --milestones --gamma`` and sgd's ``--momentum --nesterov`` reach the optimizer
of a real run against a real gRPC token teacher on 127.0.0.1. The learning rate and momentum are read
from the optimizer at each of its steps through torch's global step hook (an observer, not a mock)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from typer.testing import CliRunner

from kd.cli import app
from kd.core.data import open_source
from kd.teacher_server.loading import load_teacher
from kd.teacher_server.server import TeacherOptions, start_server

VOCAB = 259


class BigramLM(nn.Module):
    input_shape = (-1,)

    def __init__(self, dim: int, scale: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.head = nn.Linear(dim, VOCAB)
        self.scale = scale

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens))) * self.scale


def teacher_lm() -> BigramLM:
    torch.manual_seed(41)
    return BigramLM(16, 3.0)


def student_lm() -> BigramLM:
    torch.manual_seed(42)
    return BigramLM(8, 1.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d: Path = tmp_path_factory.mktemp("onpolicy-recipe")
    lines = ["the cat sat on the mat", "a dog ran to the log", "birds sang in the tree", "kd serves a teacher",
             "students sample tokens", "the teacher scores them"]  # fmt: skip
    (d / "c.txt").write_text("\n".join(lines) + "\n")
    running = start_server([load_teacher("lm", f"{__name__}:teacher_lm")],
                           batching=TeacherOptions(max_batch_tokens=512, max_batch_size=8, warmup=False))  # fmt: skip
    yield f"text:{d / 'c.txt'}?doc=line&pack=0&block=24", f"127.0.0.1:{running.port}"
    running.stop(grace=1)


def _run(setup, *flags: str) -> tuple[object, list[dict]]:
    """``kd onpolicy`` with ``flags``; -> (the CLI result, each optimizer step's param group settings)."""
    dataset, address = setup
    seen: list[dict] = []

    def hook(optimizer, _args, _kwargs) -> None:
        g = optimizer.param_groups[0]
        seen.append({k: g.get(k) for k in ("lr", "momentum", "nesterov")})

    handle = register_optimizer_step_pre_hook(hook)
    try:
        res = CliRunner().invoke(app, ["onpolicy", "--server", address, "--teacher", "lm", "--dataset", dataset,
                                       "--student", f"{__name__}:student_lm", "--lmbda", "0", "--batch-size", "2",
                                       "--prompt-tokens", "4", "--max-new-tokens", "6", "--eval-prompts", "0",
                                       *flags])  # fmt: skip
    finally:
        handle.remove()
    return res, seen


def test_multistep_schedule_follows_the_milestones(setup) -> None:
    per_epoch = math.ceil(len(open_source(setup[0])) / 2)  # steps per pass over --dataset at --batch-size 2
    steps = 3 * per_epoch
    res, seen = _run(setup, "--steps", str(steps), "--optimizer", "sgd", "--lr", "0.1", "--schedule", "multistep",
                     "--milestones", "1,2", "--gamma", "0.5", "--momentum", "0.5", "--nesterov")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout.strip().splitlines()[-1])["losses"]) == steps
    want = [0.1 * 0.5 ** sum(1 for m in (1, 2) if s // per_epoch >= m) for s in range(steps)]
    assert [g["lr"] for g in seen] == pytest.approx(want)
    assert all(g["momentum"] == 0.5 and g["nesterov"] is True for g in seen)


def test_multistep_recipe_flags_are_validated(setup) -> None:
    res, seen = _run(setup, "--steps", "2", "--schedule", "multistep")  # no milestones: refused, naming them
    assert res.exit_code == 2 and "milestones" in res.output and not seen
    res, seen = _run(setup, "--steps", "2", "--schedule", "multistep", "--milestones", "x")
    assert res.exit_code == 2 and "--milestones" in res.output and not seen
    res, seen = _run(setup, "--steps", "2", "--optimizer", "sgd", "--momentum", "1.5")
    assert res.exit_code == 2 and "momentum" in res.output and not seen
