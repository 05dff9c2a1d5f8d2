"""Students with tied weights (a GPT-2 style LM whose output head is its input embedding): ``save_weights``
stores the shared tensor once and ``read_state_dict`` restores it, so ``--out`` of the training commands
writes them and a ``module:factory@FILE`` spec loads them back; a student that cannot be saved at all is
refused before training, in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from kd.cli import app
from kd.teacher_server.loading import TeacherSpec, build_model, load_teacher, read_state_dict, save_weights

VOCAB = 259


class TiedLM(nn.Module):
    """A tiny causal LM whose head is its embedding (``head.weight is embed.weight``)."""

    input_shape = (-1,)

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.prev = nn.Embedding(VOCAB, dim)
        self.head = nn.Linear(dim, VOCAB)
        self.head.weight = self.embed.weight  # tied, as GPT-2's lm_head and wte

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        prev = nn.functional.pad(self.prev(tokens)[:, :-1], (0, 0, 1, 0))
        return self.head(torch.tanh(self.embed(tokens) + prev))


def tied_lm(seed: int = 3) -> TiedLM:
    torch.manual_seed(seed)
    return TiedLM()


class SparseBufferLM(TiedLM):
    """A student safetensors cannot hold (a sparse buffer): ``--out`` must refuse it before training."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mask", torch.eye(3).to_sparse())


def sparse_lm() -> SparseBufferLM:
    torch.manual_seed(4)
    return SparseBufferLM()


class SlicedBuffers(nn.Module):
    """Two buffers that are different views of one storage: no alias can stand for either."""

    def __init__(self) -> None:
        super().__init__()
        whole = torch.arange(10.0)
        self.register_buffer("a", whole[:4])
        self.register_buffer("b", whole[4:])


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_tied_weights_round_trip_through_a_spec(tmp_path: Path) -> None:
    model = tied_lm(seed=3)
    with torch.no_grad():  # the head and the embedding are one tensor: a change shows in both names
        model.embed.weight.mul_(2.0)
    path = save_weights(model, tmp_path / "tied.safetensors")
    state = read_state_dict(path)
    assert torch.equal(state["head.weight"], state["embed.weight"])

    # Through kd's loading path, into a model initialised differently: identical tensors, still tied.
    spec = f"{__name__}:tied_lm@{path}?seed=9"
    loaded = build_model(TeacherSpec.parse(spec))
    _same_state(model, loaded)
    assert loaded.head.weight is loaded.embed.weight
    teacher = load_teacher("tied", spec)  # a token teacher (input_shape (-1,)) from the same file
    _same_state(model, teacher.model)
    tokens = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        assert torch.equal(teacher.model(tokens), model(tokens))

    # safetensors' own load_model reads it too (the same "dropped -> kept" metadata as its save_model).
    from safetensors.torch import load_model

    other = tied_lm(seed=11)
    load_model(other, str(path))
    _same_state(model, other)


def test_views_of_one_storage_are_saved_apart(tmp_path: Path) -> None:
    model = SlicedBuffers()
    state = read_state_dict(save_weights(model, tmp_path / "views.safetensors"))
    assert torch.equal(state["a"], torch.arange(4.0)) and torch.equal(state["b"], torch.arange(4.0, 10.0))


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("tied")
    (d / "c.txt").write_text("the cat sat on the mat. the dog sat on the log. " * 4)
    data = f"text:{d / 'c.txt'}?block=16"
    cache = d / "cache"
    res = CliRunner().invoke(app, ["precompute", "--source", f"local:{__name__}:tied_lm?seed=5", "--dataset", data,
                                   "--out", str(cache), "--codec", "topk:8", "--batch-size", "8"])  # fmt: skip
    assert res.exit_code == 0, res.output
    return {"data": data, "cache": f"cache:{cache}"}


def _train_lm(token_cache: dict[str, str], student: str, out: Path):
    return CliRunner().invoke(app, ["train-lm", "--source", token_cache["cache"], "--dataset", token_cache["data"],
                                    "--val-dataset", token_cache["data"], "--student", student, "--epochs", "1",
                                    "--batch-size", "4", "--lr", "0.05", "--out", str(out)])  # fmt: skip


def test_train_lm_out_saves_a_tied_student(tmp_path: Path, token_cache) -> None:
    out = tmp_path / "student.safetensors"
    res = _train_lm(token_cache, f"{__name__}:tied_lm", out)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["losses"]
    loaded = build_model(TeacherSpec.parse(f"{__name__}:tied_lm@{out}?seed=9"))
    assert loaded.head.weight is loaded.embed.weight
    assert not torch.equal(loaded.embed.weight, tied_lm().embed.weight)  # the trained weights, not the initial


def test_an_unsaveable_student_is_refused_before_training(tmp_path: Path, token_cache) -> None:
    out = tmp_path / "student.safetensors"
    res = _train_lm(token_cache, f"{__name__}:sparse_lm", out)
    assert res.exit_code == 2, res.output
    assert "cannot be saved" in res.output and "mask" in res.output
    assert "epoch 1" not in res.output and "Traceback" not in res.output  # refused before any training
    assert not out.exists()
