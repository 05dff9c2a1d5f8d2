"""The command line for token caches: ``kd precompute`` of a token dataset (text files in blocks,
JSON-lines instruction data as documents) with an in-process token teacher or through a server,
``kd cache info``'s bytes per token, and ``kd train-lm`` (per-token loss, accumulation,
validation perplexity and next-token accuracy) on a corpus the test writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_lm import BigramLM
from typer.testing import CliRunner

from kd.cache import CacheReader
from kd.cli import app
from kd.core.data import open_source
from kd.core.tokens import next_token_labels
from kd.student_trainer.losses import get_method
from kd.student_trainer.losses.token_kd import evaluate_tokens
from kd.teacher_server.loading import read_state_dict

VOCAB = 259


def teacher_lm() -> BigramLM:
    torch.manual_seed(21)
    return BigramLM(16, 3.0)


def student_lm() -> BigramLM:
    torch.manual_seed(22)
    return BigramLM(8, 1.0)


TEACHER, STUDENT = f"{__name__}:teacher_lm", f"{__name__}:student_lm"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("lmcli")
    (d / "train").mkdir()
    (d / "val").mkdir()
    text = "the cat sat on the mat. the dog sat on the log. "
    (d / "train" / "a.txt").write_text(text * 4)
    (d / "train" / "b.txt").write_text("a bird sang in the tree; " * 6)
    (d / "val" / "v.txt").write_text("the bird sat on the cat. " * 3)
    rows = [{"q": f"say {w}", "a": f"{w} {w}!"} for w in ("cat", "dog", "bird", "log", "tree", "mat")]
    (d / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "train": f"text:{d / 'train'}?block=16",
        "val": f"text:{d / 'val'}?block=16",
        "chat": f"jsonl:{d / 'chat.jsonl'}?prompt=q&completion=a&pack=0",
        "dir": str(d),
    }


def _ok(result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


def test_precompute_info_and_train_lm_from_the_command_line(tmp_path: Path, corpus) -> None:
    runner = CliRunner()
    cache = tmp_path / "topk"
    args = ["precompute", "--source", f"local:{TEACHER}", "--dataset", corpus["train"], "--out", str(cache),
            "--codec", "topk:8", "--batch-size", "8"]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "B/token" in res.output
    train = open_source(corpus["train"])
    reader = CacheReader(cache)
    assert reader.meta.per_token and reader.meta.dataset_id == train.dataset_id and len(reader) == len(train)
    info = json.loads(_ok(runner.invoke(app, ["cache", "info", str(cache)])))
    # topk:8 at V = 259: 8 fp16 values + 8 two-byte ids + the fp32 lse per position, and 12 B per record.
    assert info["codec"] == "topk:8" and info["index_bytes"] == 2
    assert info["bytes_per_token"] == pytest.approx(8 * 2 + 8 * 2 + 4 + 12 / 16, abs=1e-3)
    assert 0 < info["covered_mass"]["mean"] < 1
    assert runner.invoke(app, args).exit_code == 0 and len(CacheReader(cache)) == len(train)  # resumes

    weights = tmp_path / "student.safetensors"
    res = runner.invoke(app, ["train-lm", "--source", f"cache:{cache}", "--dataset", corpus["train"],
                              "--val-dataset", corpus["val"], "--student", STUDENT, "--method", "token-gjsd",
                              "--opt", "beta=0.5", "--epochs", "2", "--batch-size", "4", "--accumulate", "2",
                              "--lr", "0.03", "--out", str(weights)])  # fmt: skip
    out = json.loads(_ok(res).strip().splitlines()[-1])
    assert "epoch 2:" in res.output and "val perplexity" in res.output
    assert len(out["losses"]) == 2 and out["accumulate"] == 2
    # The printed numbers are the saved student's on the validation split.
    student = student_lm()
    student.load_state_dict(read_state_dict(weights))
    m = evaluate_tokens(student, open_source(corpus["val"]), batch_size=4)
    assert out["val_ppl"] == pytest.approx(m.perplexity, rel=1e-6)
    assert out["val_accuracy"] == pytest.approx(m.accuracy, rel=1e-9) and out["val_tokens"] == m.tokens
    # It learned from the teacher's targets: closer to the teacher on the validation tokens (the teacher is
    # random, so its perplexity on text says nothing).
    val = open_source(corpus["val"]).batch(range(4))
    labels = next_token_labels(val.tokens, val.loss_mask)
    with torch.no_grad():
        z = teacher_lm()(val.tokens)
        gap = [float(get_method("token-fkl")(s(val.tokens), z, labels)) for s in (student_lm(), student)]
    assert gap[1] < 0.9 * gap[0] and out["losses"][1] < out["losses"][0]

    # Refusals name the problem (exit 2): a cache of other tokens, a non-token loss, image-only options.
    res = runner.invoke(app, ["train-lm", "--source", f"cache:{cache}", "--dataset", corpus["val"],
                              "--val-dataset", corpus["val"], "--student", STUDENT])  # fmt: skip
    assert res.exit_code == 2 and "dataset" in res.output
    res = runner.invoke(app, ["train-lm", "--source", f"cache:{cache}", "--dataset", corpus["train"],
                              "--val-dataset", corpus["val"], "--student", STUDENT, "--method", "kd"])  # fmt: skip
    assert res.exit_code == 2 and "token-fkl" in res.output
    res = runner.invoke(app, [*args[:-2], "--views", "2"])
    assert res.exit_code == 2 and "--views" in res.output


def test_precompute_instruction_data_through_a_server(tmp_path: Path, corpus) -> None:
    from kd.teacher_server.loading import load_teacher
    from kd.teacher_server.server import TeacherOptions, start_server

    runner = CliRunner()
    chat = open_source(corpus["chat"])
    running = start_server([load_teacher("lm", TEACHER)], batching=TeacherOptions(max_batch_tokens=256, warmup=False))
    try:
        cache = tmp_path / "sample"
        res = runner.invoke(app, ["precompute", "--source", f"server:127.0.0.1:{running.port}/lm", "--dataset",
                                  corpus["chat"], "--out", str(cache), "--codec", "sample:16"])  # fmt: skip
        assert res.exit_code == 0, res.output
    finally:
        running.stop(grace=1)
    lengths = chat.batch(range(len(chat))).attention_mask.sum(1).tolist()  # documents: one record each
    info = json.loads(_ok(runner.invoke(app, ["cache", "info", str(cache)])))
    assert info["positions"] == sum(lengths)
    assert info["bytes_per_token"] == pytest.approx(sum(12 + n * 16 * 3 for n in lengths) / sum(lengths), abs=1e-3)
    t = CacheReader(cache).token_targets(range(len(chat)))
    assert t.counts is not None and bool((t.counts.sum(-1)[t.ids[..., 0] >= 0] == 16).all())
    res = runner.invoke(app, ["train-lm", "--source", f"cache:{cache}", "--dataset", corpus["chat"],
                              "--val-dataset", corpus["chat"], "--student", STUDENT, "--batch-size", "3"])  # fmt: skip
    out = json.loads(_ok(res).strip().splitlines()[-1])
    b = chat.batch(range(len(chat)))
    assert out["val_tokens"] == int(b.loss_mask[:, 1:].sum())  # completion tokens only: prompts are masked
