"""``kd demo-lm --quick`` end to end: stdlib corpus, served byte-level teacher, three caches
precomputed through the server, CE / KD-per-codec / on-policy students, results.json.

Quick mode's models are too small for "KD beats CE" to be guaranteed, so the checks are the
relations that must hold whatever the numbers: the stored bytes per token follow from each
codec's record layout, every model is scored on the same validation tokens, and the teacher's
reported perplexity is what its saved weights give on the validation split."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from kd.cache import CacheReader
from kd.cache.codecs import index_bytes
from kd.cli import app
from kd.core.data import open_source
from kd.demo_lm import QUICK, byte_lm

V = 259  # the byte tokenizer's vocabulary


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("demo-lm")
    res = CliRunner().invoke(app, ["demo-lm", "--quick", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out, json.loads((out / "results.json").read_text()), res.output


def test_results_have_every_model_scored_on_the_same_validation_tokens(demo) -> None:
    out, r, output = demo
    for key in ("teacher_ppl", "student_ce_ppl", "student_kd_ppl", "student_onpolicy_ppl", "codecs", "seconds"):
        assert key in r
    assert set(r["codecs"]) == set(QUICK.codecs)
    ppls = [r["teacher_ppl"], r["student_ce_ppl"], r["student_kd_ppl"], r["student_onpolicy_ppl"]]
    ppls += [c["ppl"] for c in r["codecs"].values()]
    # Trained models beat the uniform guess over the vocabulary (ppl = V), and no ppl is below 1.
    assert all(math.isfinite(p) and 1 < p < V for p in ppls), ppls
    assert r["student_kd_ppl"] == r["codecs"]["fp16"]["ppl"]  # full KD is the dense cache's student
    assert r["student_kd_ppl"] != r["student_ce_ppl"]  # the targets reached the student
    # Independent count of the validation targets: every loss-mask token after a block's first.
    val = open_source(f"text:{out / 'corpus' / 'val'}?block={QUICK.block}&tokenizer=byte")
    b = val.batch(range(len(val)))
    want = int(b.loss_mask[:, 1:].sum())
    assert want > 0 and [row["val_tokens"] for row in r["rows"]] == [want] * 6
    assert [row["name"] for row in r["rows"]] == ["teacher", "ce", *(f"kd {c}" for c in QUICK.codecs), "on-policy"]
    onp = r["rows"][-1]
    assert 0 < onp["on_policy_batches"] < onp["steps"] and onp["tokens_scored"] > 0  # lmbda = 0.5 mixes both
    assert "kd demo-lm" in output and "sample:16" in output
    assert (out / "ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bytes_per_token_follow_the_codec_layouts(demo) -> None:
    out, r, _ = demo
    w = index_bytes(V)
    assert w == 2
    # Per record: 12 bytes (header, position count, crc) over its `block` positions, then per position:
    # fp16 = 2 V; topk:8 = 8 fp16 logits + 8 ids + fp32 lse; sample:16 = 16 ids + 16 one-byte counts.
    row = {"fp16": 2 * V, "topk:8": 8 * 2 + 8 * w + 4, "sample:16": 16 * (w + 1)}
    for codec, stats in r["codecs"].items():
        assert stats["bytes_per_token"] == pytest.approx(row[codec] + 12 / QUICK.block, rel=1e-12), codec
        reader = CacheReader(out / "caches" / codec.replace(":", "-"))
        assert reader.verify().ok and reader.meta.codec == codec
        assert reader.meta.dataset_id == r["corpus"]["train_dataset_id"]
        assert reader.token_stats()["sequences"] == r["corpus"]["train_blocks"]
    bpt = [r["codecs"][c]["bytes_per_token"] for c in ("fp16", "sample:16", "topk:8")]
    assert bpt == sorted(bpt, reverse=True)


def test_teacher_ppl_is_what_the_saved_weights_give(demo) -> None:
    out, r, _ = demo
    model = byte_lm(**r["teacher"]["config"])
    model.load_state_dict(load_file(str(out / "teacher.safetensors")))
    model.eval()
    val = open_source(f"text:{out / 'corpus' / 'val'}?block={QUICK.block}&tokenizer=byte")
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(len(val)):  # one block at a time, float64 log-softmax, targets found by a plain loop
            b = val.batch([i])
            logp = torch.log_softmax(model(b.tokens)[0].double(), dim=-1)
            for s in range(b.tokens.shape[1] - 1):
                if b.loss_mask[0, s + 1]:
                    nll -= float(logp[s, b.tokens[0, s + 1]])
                    n += 1
    assert n == r["rows"][0]["val_tokens"]
    assert r["teacher_ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_the_table_shows_bytes_per_token_only_for_rows_that_read_a_cache(demo) -> None:
    """The CE student reads no teacher targets: its bytes per token are not applicable ("-", null in
    results.json), as the teacher's and the on-policy student's, not 0.0; each cache row shows its
    cache's figure."""
    _, r, output = demo
    rows = {row["name"]: row for row in r["rows"]}
    assert rows["ce"]["bytes_per_token"] is None
    # rich draws the header's cells with "┃", the body's with "│"
    table = [[c.strip() for c in re.split("[│┃]", line)[1:-1]] for line in output.splitlines()
             if len(re.findall("[│┃]", line)) == 6]  # fmt: skip
    header = next(cells for cells in table if "bytes/token" in cells)
    shown = {cells[0]: cells[header.index("bytes/token")] for cells in table if cells[0] in rows}
    assert set(shown) == set(rows), output
    for name, cell in shown.items():
        bpt = rows[name].get("bytes_per_token")
        assert cell == ("-" if bpt is None else f"{bpt:.1f}"), (name, cell)
    assert [n for n, c in shown.items() if c == "-"] == ["teacher", "ce", "on-policy"]
