"""Hidden states in a token cache (``kd precompute --feature LAYER`` of a token dataset, read by
``kd train-lm --feature``): each position's fp16 states stored after its codec row, the same records
in process and through a real server (asked in fp16), exactly the teacher's states rounded to fp16,
and a student trained from the cache gets the token loss plus the hidden losses computed on those
states (a float64 reference written here). Caches without the layer are refused naming what they
store."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import test_lm_hidden
import torch
from cli_checks import refused
from test_lm_hidden import TEACHER, cli, reference_term, student_lm, teacher_lm

from kd.cache import CacheReader
from kd.cache.sharded import open_cache
from kd.core.data import open_source
from kd.core.tokens import IGNORE_INDEX, next_token_labels
from kd.precompute import LocalTokenTeacher, ServerTokenTeacher, precompute_tokens
from kd.student_trainer.hidden import HiddenMatch, HiddenStates
from kd.student_trainer.sources import CacheSource
from kd.student_trainer.train import train_tokens

corpus, served = test_lm_hidden.corpus, test_lm_hidden.served  # its corpus and served teacher (module fixtures)
LAYERS = ["embed", "head", "prev"]  # widths 16, 259 (the head's outputs are [B, S, V] too) and 16


def _states(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    t = teacher_lm()
    with torch.no_grad():
        e, p = t.embed(tokens), t.prev(tokens)
        return {"embed": e, "prev": p, "head": t.head(torch.tanh(e + torch.nn.functional.pad(p[:, :-1], (0, 0, 1, 0))))}


@pytest.mark.parametrize("codec", ["topk:4", "sample:4x2", "fp32"])
def test_the_cache_keeps_the_teachers_states_in_fp16_in_process_and_served_alike(
    corpus, served, codec: str, tmp_path: Path
) -> None:
    train = open_source(corpus["train"])
    local = LocalTokenTeacher.from_spec(TEACHER, name="lm")
    precompute_tokens(train, local, tmp_path / "plain", codec=codec, batch_size=5)
    precompute_tokens(train, local, tmp_path / "local", codec=codec, batch_size=5, features=LAYERS)
    remote = ServerTokenTeacher(served, "lm")
    try:
        precompute_tokens(train, remote, tmp_path / "served", codec=codec, batch_size=5, features=LAYERS)
    finally:
        remote.close()
    plain, mine, theirs = (CacheReader(tmp_path / n) for n in ("plain", "local", "served"))
    assert mine.meta.features == {"embed": [16], "head": [259], "prev": [16]}
    assert theirs.meta.features == mine.meta.features
    everything = range(len(train))
    for a, b in zip(mine.read_sequences(everything), theirs.read_sequences(everything), strict=True):
        np.testing.assert_array_equal(a, b)  # the same bytes, codec rows and states
    b = train.batch(list(everything))
    real = b.attention_mask
    torch.manual_seed(0)  # a read of sample:KxR picks one round a position from the global generator
    targets, hidden = mine.token_targets_hidden(everything, b.tokens.shape[1])
    torch.manual_seed(0)
    want_targets = plain.token_targets(everything, b.tokens.shape[1])
    for name in ("ids", "logits", "lse", "counts"):  # the targets are those of a cache without states
        got, want = (getattr(t, name, t if name == "logits" else None) for t in (targets, want_targets))
        if want is not None:
            assert torch.equal(got, want), name
    states = _states(b.tokens)
    for name in LAYERS:
        assert hidden[name].shape == (*b.tokens.shape, states[name].shape[-1])
        assert torch.equal(hidden[name][real], states[name][real].half().float())  # rounded once, to fp16
        assert not hidden[name][~real].any()  # zeros at padding
    # bytes per position: the codec row plus 2 D bytes a layer
    assert mine.record_bytes - plain.record_bytes == 2 * (16 + 259 + 16)


def _reference(student, tokens: torch.Tensor, loss_mask: torch.Tensor, pairs: list[str], connectors) -> float:
    """token-fkl on the teacher's fp32 logits + sum_k w_k * loss_k on its fp16-rounded states, float64."""
    s = copy.deepcopy(student).double()
    keep = next_token_labels(tokens, loss_mask) != IGNORE_INDEX
    teacher = {k: v.half().double() for k, v in _states(tokens).items()}
    with torch.no_grad():
        log_p, log_q = teacher_lm().double()(tokens).log_softmax(-1), s(tokens).log_softmax(-1)
        total = float((log_p.exp() * (log_p - log_q)).sum(-1)[keep].mean())
        mine = {"embed": s.embed(tokens), "prev": s.prev(tokens)}
        for pair, conn in zip(pairs, connectors):
            m = HiddenMatch.parse(pair)
            a, b = copy.deepcopy(conn).double()(mine[m.student][keep]), teacher[m.teacher][keep]
            total += m.weight * reference_term(m.loss, a, b)
    return total


def test_a_student_trains_on_the_cached_states(corpus, tmp_path: Path) -> None:
    train = open_source(corpus["train"])
    path = tmp_path / "c"
    precompute_tokens(train, LocalTokenTeacher.from_spec(TEACHER), path, codec="fp32", batch_size=4,
                      features=["embed", "prev"])  # fmt: skip
    pairs = ["embed=embed:mse:0.5", "prev=prev"]
    with CacheSource(str(path)) as source:
        assert source.token_hidden_widths() == {"embed": 16, "prev": 16}
        student = student_lm()
        hidden = HiddenStates.build(pairs, student, source, train.batch([0]).tokens)
        b = train.batch(range(len(train)))
        want = _reference(student, b.tokens, b.loss_mask, pairs, hidden.connectors)
        # one step over the whole corpus at lr 0: the epoch's loss is the loss at the initial weights
        losses = train_tokens(student, train, source, epochs=1, batch_size=len(train), lr=0.0, optimizer="sgd",
                              hidden=hidden)  # fmt: skip
        assert losses[0] == pytest.approx(want, rel=1e-6)
        plain = train_tokens(student_lm(), train, source, epochs=1, batch_size=len(train), lr=0.0, optimizer="sgd")
        assert losses[0] - plain[0] > 0.05  # the hidden terms are in it
        # and it learns them: lower hidden losses after a few steps
        trained = train_tokens(student_lm(), train, source, epochs=6, batch_size=4, lr=0.05, hidden=pairs, seed=1)
        assert trained[-1] < trained[0] - 0.05


def test_cli_precompute_and_train_lm_with_cached_states(corpus, served, tmp_path: Path) -> None:
    cache, bare = tmp_path / "c", tmp_path / "bare"
    r = cli("precompute", "--source", f"server:{served}/lm", "--dataset", corpus["train"], "--codec", "topk:4",
            "--feature", "embed", "--out", str(cache))  # fmt: skip
    assert r.exit_code == 0, r.output
    assert open_cache(str(cache)).meta.features == {"embed": [16]}
    info = json.loads(cli("cache", "info", str(cache)).stdout)
    assert info["feature_bytes_per_token"] == {"embed": 32} and "feature_bytes_per_sample" not in info
    r = cli("cache", "verify", str(cache))  # each record's length and checksum, its states included
    assert r.exit_code == 0 and "12/12 records good, 0 corrupt" in r.output, r.output
    assert cli("precompute", "--source", f"local:{TEACHER}", "--dataset", corpus["train"], "--codec", "topk:4",
               "--out", str(bare)).exit_code == 0  # fmt: skip
    base = ["train-lm", "--dataset", corpus["train"], "--val-dataset", corpus["val"], "--student",
            "test_lm_hidden:student_lm", "--epochs", "2", "--batch-size", "4", "--lr", "0.03",
            "--seed", "5"]  # fmt: skip
    r = cli(*base, "--source", f"cache:{cache}", "--feature", "embed=embed:mse")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout.strip().splitlines()[-1])
    train = open_source(corpus["train"])
    with CacheSource(str(cache)) as source:
        torch.manual_seed(5)  # as the CLI: the seed, then the student, then the connectors
        student = student_lm()
        hidden = HiddenStates.build(["embed=embed:mse"], student, source, train.batch([0]).tokens)
        want = train_tokens(student, train, source, hidden=hidden, epochs=2, batch_size=4, lr=0.03, seed=5)
    assert got["losses"] == want
    # a cache without states, or without the layer asked for: refused before any step, naming what to do
    refused(cli(*base, "--source", f"cache:{bare}", "--feature", "embed=embed"), "this token cache does not store",
            "kd precompute --feature embed")  # fmt: skip
    refused(cli(*base, "--source", f"cache:{cache}", "--feature", "prev=prev"), "stores no hidden states of",
            "['prev']", "it stores: embed")  # fmt: skip
    # a resumed precompute asking other states is another cache: refused, the records kept
    r = cli("precompute", "--source", f"local:{TEACHER}", "--dataset", corpus["train"], "--codec", "topk:4",
            "--feature", "prev", "--out", str(cache))  # fmt: skip
    assert r.exit_code != 0 and "features" in r.output, r.output
    assert open_cache(str(cache)).meta.features == {"embed": [16]}
    refused(cli("precompute", "--source", f"local:{TEACHER}", "--dataset", corpus["train"], "--feature", "nope",
                "--out", str(tmp_path / "x")), "no module(s) ['nope']")  # fmt: skip


def test_a_sharded_cache_gives_each_sequences_states_from_its_shard(corpus, tmp_path: Path) -> None:
    train, local = open_source(corpus["train"]), LocalTokenTeacher.from_spec(TEACHER, name="lm")
    precompute_tokens(train, local, tmp_path / "one", codec="topk:4", batch_size=5, features=["embed"])
    for i in range(3):
        precompute_tokens(train, local, tmp_path / "three", codec="topk:4", batch_size=5, features=["embed"],
                          shard=(i, 3))  # fmt: skip
    order = [7, 0, 11, 4, 5]  # shards 1, 0, 2, 1, 2
    one, three = CacheReader(tmp_path / "one").token_targets_hidden(order), open_cache(str(tmp_path / "three"))
    targets, hidden = three.token_targets_hidden(order)
    assert torch.equal(hidden["embed"], one[1]["embed"]) and hidden["embed"].abs().sum() > 0
    assert torch.equal(targets.ids, one[0].ids) and torch.equal(targets.logits, one[0].logits)
