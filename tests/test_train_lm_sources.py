"""``kd train-lm`` from a live token teacher: ``--source server:HOST:PORT/TEACHER`` (a real gRPC
server on 127.0.0.1, full logits or ``--server-topk K``) and ``--source local:SPEC`` train a student
exactly as the library's ``train_tokens`` does from the same source, and a source that cannot give
per-token targets is refused up front with one line. Tiny token modules, a corpus the test writes."""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
from cli_checks import refused
from click.testing import Result
from tiny_lm import BigramLM
from torch import nn
from typer.testing import CliRunner

from kd.cli import app
from kd.core.data import open_source
from kd.student_trainer.sources import LocalSource, ServerSource
from kd.student_trainer.train import train_tokens
from kd.teacher_server.loading import load_teacher
from kd.teacher_server.server import TeacherOptions, start_server


def teacher_lm() -> BigramLM:
    torch.manual_seed(41)
    return BigramLM(16, 3.0)


def student_lm() -> BigramLM:
    torch.manual_seed(42)
    return BigramLM(8, 1.0)


def wide_lm() -> BigramLM:
    """A token teacher of another vocabulary (300 ids) than the byte corpus's."""
    torch.manual_seed(43)
    return BigramLM(8, 1.0, vocab=300)


TEACHER, STUDENT = f"{__name__}:teacher_lm", f"{__name__}:student_lm"
RUN = {"epochs": 2, "batch_size": 4, "lr": 0.03, "seed": 5}


def cli(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("lmsrc")
    (d / "train.txt").write_text("\n".join(f"line {i}: the cat sat on the mat"[: 9 + 2 * i] for i in range(12)) + "\n")
    (d / "val.txt").write_text("the dog sat on the log\nthe bird sang\n")
    return {"train": f"text:{d / 'train.txt'}?doc=line&pack=0&block=32",
            "val": f"text:{d / 'val.txt'}?doc=line&pack=0&block=32"}  # fmt: skip


@pytest.fixture(scope="module")
def served() -> str:
    running = start_server(
        [load_teacher("lm", TEACHER), load_teacher("wide", f"{__name__}:wide_lm"),
         load_teacher("digits", "kd.models:digits_teacher")],
        batching=TeacherOptions(max_batch_tokens=512, max_batch_size=8, warmup=False),
    )  # fmt: skip
    yield f"127.0.0.1:{running.port}"
    running.stop(grace=1)


def train_lm(corpus: dict[str, str], source: str, *extra: str) -> dict:
    args = ["train-lm", "--source", source, "--dataset", corpus["train"], "--val-dataset", corpus["val"],
            "--student", STUDENT, "--epochs", str(RUN["epochs"]), "--batch-size", str(RUN["batch_size"]),
            "--lr", str(RUN["lr"]), "--seed", str(RUN["seed"]), *extra]  # fmt: skip
    r = cli(*args)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.strip().splitlines()[-1])


def library_losses(corpus: dict[str, str], source, **options) -> list[float]:
    """The same run through ``train_tokens`` directly (the CLI seeds torch before the student is built;
    the factory seeds its own weights, so the student starts the same)."""
    return train_tokens(student_lm(), open_source(corpus["train"]), source, method="token-fkl",
                        epochs=RUN["epochs"], batch_size=RUN["batch_size"], lr=RUN["lr"], seed=RUN["seed"],
                        method_options=options)  # fmt: skip


def test_train_lm_from_a_server_and_in_process_trains_as_the_library_does(corpus, served) -> None:
    local = train_lm(corpus, f"local:{TEACHER}")
    assert local["losses"] == library_losses(corpus, LocalSource(TEACHER))  # the same arithmetic, bit for bit
    remote = train_lm(corpus, f"server:{served}/lm")
    # The server computes the same fp32 teacher on the real positions only, batched by length, so
    # a matmul may sum in another order: equal to float32 rounding, not bit for bit.
    assert remote["losses"] == pytest.approx(local["losses"], rel=1e-5)
    assert remote["val_ppl"] == pytest.approx(local["val_ppl"], rel=1e-5)
    assert remote["source"] == f"server:{served}/lm"


def test_train_lm_from_a_pool_of_servers_takes_turns(corpus, served) -> None:
    other = start_server([load_teacher("lm", TEACHER)], batching=TeacherOptions(max_batch_tokens=512, warmup=False))
    try:
        pool = train_lm(corpus, f"server:{served},127.0.0.1:{other.port}/lm")
        assert other.servicer.endpoints["lm"].batcher.stats.forwards > 0  # the second member answered some
    finally:
        other.stop(grace=1)
    assert pool["losses"] == pytest.approx(train_lm(corpus, f"local:{TEACHER}")["losses"], rel=1e-5)


def test_server_topk_asks_the_top_k_at_the_losss_temperature(corpus, served) -> None:
    # At T = 2 the top-k's log-sum-exp must be the one at 2: one at 1 is refused by the loss at step 1.
    got = train_lm(corpus, f"server:{served}/lm", "--server-topk", "8", "--opt", "temperature=2")
    with ServerSource(served, "lm", topk=8, temperature=2.0) as source:
        want = library_losses(corpus, source, temperature=2.0)
    assert got["losses"] == pytest.approx(want, rel=1e-5)
    full = train_lm(corpus, f"server:{served}/lm", "--opt", "temperature=2")
    assert abs(got["losses"][0] - full["losses"][0]) > 1e-3  # top-8 of 259 is not the full distribution


def test_train_lm_refuses_sources_without_per_token_targets_up_front(corpus, served, tmp_path: Path) -> None:
    base = ["train-lm", "--dataset", corpus["train"], "--val-dataset", corpus["val"], "--student", STUDENT]
    out = tmp_path / "s.safetensors"
    refused(cli(*base, "--source", f"server:{served}/digits", "--out", str(out)), "teacher 'digits'",
            "not a token teacher", "kd train")  # fmt: skip
    refused(cli(*base, "--source", "local:kd.models:digits_teacher", "--out", str(out)), "not a token teacher")
    refused(cli(*base, "--source", f"server:{served}/wide"), "vocabulary 300", "--dataset 259")
    refused(cli(*base, "--source", f"local:{TEACHER}", "--server-topk", "8"), "--server-topk 8",
            "only to --source server:")  # fmt: skip
    refused(cli(*base, "--source", f"server:{served}/lm", "--server-topk", "-1"), "--server-topk -1", "K >= 1")
    refused(cli(*base, "--source", f"server:{served}/lm", "--server-timeout", "0"), "--server-timeout")
    refused(cli(*base, "--source", "http://x"), "--source 'http://x'", "cache:PATH", "server:", "local:")
    assert not out.exists()  # nothing trained or saved


class AskingSource(LocalSource):
    """An in-process teacher that says when and on which thread each micro-batch's targets were asked."""

    def __init__(self, spec: str, ahead: int) -> None:
        super().__init__(spec)
        self.token_targets_ahead = ahead
        self.asked = 0
        self.threads: Counter[int] = Counter()
        self.cond = threading.Condition()

    def token_targets(self, indices, tokens, attention_mask):
        with self.cond:
            self.asked += 1
            self.threads[threading.get_ident()] += 1
            self.cond.notify_all()
        return super().token_targets(indices, tokens, attention_mask)


class Observing(nn.Module):
    """A student that, at each training forward, records whether the next micro-batch's targets of
    the epoch had been asked by then (waiting up to 10 s for it: a thread asking ahead gets there)."""

    def __init__(self, inner: nn.Module, source: AskingSource, per_epoch: int) -> None:
        super().__init__()
        self.inner, self.source, self.per_epoch = inner, source, per_epoch
        self.forwards, self.ahead_seen = 0, []

    def forward(self, tokens, attention_mask=None):
        if self.training:
            epoch, k = divmod(self.forwards, self.per_epoch)
            # 1: train_tokens asks for one sequence's targets before any step (its check of the loss)
            want = 1 + epoch * self.per_epoch + min(k + 2, self.per_epoch)
            with self.source.cond:
                self.ahead_seen.append(self.source.cond.wait_for(lambda: self.source.asked >= want, timeout=10))
            self.forwards += 1
        return self.inner(tokens)


def test_a_live_sources_next_targets_are_asked_while_the_student_trains(corpus) -> None:
    data = open_source(corpus["train"])
    per_epoch = -(-len(data) // RUN["batch_size"])
    assert per_epoch >= 3
    kw = {k: v for k, v in RUN.items() if k != "seed"}
    source = AskingSource(TEACHER, 1)
    student = Observing(student_lm(), source, per_epoch)
    losses = train_tokens(student, data, source, seed=RUN["seed"], **kw)
    assert student.forwards == per_epoch * RUN["epochs"] and all(student.ahead_seen), student.ahead_seen
    assert source.threads[threading.get_ident()] == 1  # the check before any step; the rest on the thread
    plain = AskingSource(TEACHER, 0)
    assert train_tokens(student_lm(), data, plain, seed=RUN["seed"], **kw) == losses  # the same, bit for bit
    assert plain.threads == {threading.get_ident(): source.asked} and plain.asked == source.asked


def test_a_pool_of_server_processes_is_not_refused_for_the_order_of_its_signature_facts(served) -> None:
    # A protobuf map comes off the wire in an order of its own (each kd serve process serialises the
    # token teacher's signature facts in another), and the pool compared the members' signatures by
    # their repr: two processes serving the same teacher were refused about one time in two. Here the
    # second member's description is the first one's with its facts in the reverse order, as another
    # process decodes it.
    from dataclasses import replace

    from kd.student_trainer.sources import _agreed_description
    from kd.teacher_server.client import TeacherClient

    with TeacherClient(served) as client:
        desc = client.describe("lm")
    sig = desc.signature
    assert len(sig.extra) >= 2  # a token teacher's task, kind, vocab_size, ...
    other = replace(desc, signature=replace(sig, extra=dict(reversed(list(sig.extra.items())))))
    assert other.signature == sig and repr(other.signature) != repr(sig)  # the same facts in another order
    assert _agreed_description([("a:1", desc), ("b:2", other)], None) is desc
    changed = replace(desc, signature=replace(sig, extra={**sig.extra, "vocab_size": "300"}))
    with pytest.raises(ValueError, match="serves different teachers.*signature.*'vocab_size': '300'"):
        _agreed_description([("a:1", desc), ("b:2", changed)], None)


def test_losses_the_targets_cannot_serve_are_refused_before_any_step(corpus, tmp_path: Path) -> None:
    """A sample:K cache holds drawn counts: only forward KL is estimated without bias from them, and
    only at the temperature they were drawn at. Refused before the student trains, naming the cache."""
    cache = tmp_path / "s8"
    r = cli("precompute", "--source", f"local:{TEACHER}", "--dataset", corpus["train"], "--codec", "sample:8",
            "--out", str(cache))  # fmt: skip
    assert r.exit_code == 0, r.output
    base = ["train-lm", "--source", f"cache:{cache}", "--dataset", corpus["train"], "--val-dataset", corpus["val"],
            "--student", STUDENT, "--out", str(tmp_path / "s.safetensors")]  # fmt: skip
    refused(cli(*base, "--method", "token-rkl"), "token-rkl on these targets", "codec sample:8",
            "not estimated without bias")  # fmt: skip
    refused(cli(*base, "--opt", "temperature=2"), "token-fkl on these targets", "drawn at temperature 1.0")
    assert not (tmp_path / "s.safetensors").exists()
    assert cli(*base, "--epochs", "1").exit_code == 0  # forward KL at the cache's temperature trains
