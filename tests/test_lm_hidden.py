"""Hidden-state distillation for language models (``kd train-lm --feature STUDENT=TEACHER[:LOSS[:WEIGHT]]``,
``student_trainer/hidden.py``): DistilBERT's cosine loss and TinyBERT's MSE through a learned
connector, added to the token loss. The loss values against float64 references written here; a
real gRPC server (which computes only the asked layers, at the counted positions) and the same
teacher in process give the same training step by step; the connectors are checkpointed, resumed
to the uninterrupted run's result and saved beside the student; a token cache (no hidden states),
unknown layers and bad pairs are refused before any step. Tiny bigram token modules, a corpus the
test writes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from cli_checks import refused
from safetensors.torch import load_file
from tiny_lm import BigramLM
from typer.testing import CliRunner

from kd.cli import app
from kd.core.data import open_source
from kd.core.tokens import IGNORE_INDEX, next_token_labels
from kd.student_trainer.hidden import HiddenMatch, HiddenStates
from kd.student_trainer.losses.hidden_cosine import hidden_cosine_loss
from kd.student_trainer.losses.hidden_mse import hidden_mse_loss
from kd.student_trainer.sources import CacheSource, LocalSource, ServerSource
from kd.student_trainer.train import train_tokens
from kd.teacher_server.loading import load_teacher
from kd.teacher_server.server import TeacherOptions, start_server


def teacher_lm() -> BigramLM:
    torch.manual_seed(41)
    return BigramLM(16, 3.0)


def student_lm() -> BigramLM:
    torch.manual_seed(42)
    return BigramLM(8, 1.0)


TEACHER, STUDENT = f"{__name__}:teacher_lm", f"{__name__}:student_lm"


class _Positions(BigramLM):
    """A student with a module its forward never runs and a position embedding whose output is
    ``[1, S, D]`` whatever the batch (as GPT-2's ``wpe``)."""

    def __init__(self) -> None:
        super().__init__(8, 1.0)
        self.unused = torch.nn.Linear(8, 8)
        self.pos = torch.nn.Embedding(64, 8)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(tokens) + self.head(self.pos(torch.arange(tokens.shape[1])[None]))


def student_positions() -> _Positions:
    torch.manual_seed(42)
    return _Positions()


# TinyBERT's MSE through a linear 8 -> 16, DistilBERT's cosine through a linear 8 -> 16 (the widths
# differ), and cosine on the 259-wide head outputs with no connector (equal widths)
PAIRS = ["embed=embed:mse:0.5", "prev=prev", "head=head:cosine:0.25"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("lmhidden")
    (d / "train.txt").write_text("\n".join(f"line {i}: the cat sat on the mat"[: 9 + 2 * i] for i in range(12)) + "\n")
    (d / "val.txt").write_text("the dog sat on the log\nthe bird sang\n")
    return {"train": f"text:{d / 'train.txt'}?doc=line&pack=0&block=32",
            "val": f"text:{d / 'val.txt'}?doc=line&pack=0&block=32"}  # fmt: skip


@pytest.fixture(scope="module")
def served() -> str:
    running = start_server([load_teacher("lm", TEACHER)],
                           batching=TeacherOptions(max_batch_tokens=512, max_batch_size=8, warmup=False))  # fmt: skip
    yield f"127.0.0.1:{running.port}"
    running.stop(grace=1)


def test_the_losses_against_float64_references() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    s[3] = -2.0 * t[3]  # an opposite pair: 1 - cos = 2
    sd, td = s.double().tolist(), t.double().tolist()
    cos = []
    for a, b in zip(sd, td):
        dot = sum(x * y for x, y in zip(a, b))
        cos.append(dot / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5))
    want_cos = sum(1 - c for c in cos) / len(cos)
    want_mse = sum((x - y) ** 2 for a, b in zip(sd, td) for x, y in zip(a, b)) / (7 * 5)
    assert float(hidden_cosine_loss(s, t)) == pytest.approx(want_cos, rel=1e-6)
    assert float(hidden_mse_loss(s, t)) == pytest.approx(want_mse, rel=1e-6)
    assert float(hidden_cosine_loss(s[3:4], t[3:4])) == pytest.approx(2.0, rel=1e-6)
    # no counted position: 0 with a gradient (a micro-batch's slice may hold none)
    empty = torch.zeros(0, 5, requires_grad=True)
    assert float(hidden_cosine_loss(empty, t[:0]).detach()) == 0.0 and hidden_mse_loss(empty, t[:0]).requires_grad


def _reference(student: BigramLM, teacher: BigramLM, hidden: HiddenStates, tokens, loss_mask) -> float:
    """token-fkl + sum_k weight_k * loss_k of the whole batch in float64, at the counted positions."""
    s, t = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    conns = [copy.deepcopy(c).double() for c in hidden.connectors]
    keep = next_token_labels(tokens, loss_mask) != IGNORE_INDEX
    with torch.no_grad():
        log_p, log_q = t(tokens).log_softmax(-1), s(tokens).log_softmax(-1)
        total = float((log_p.exp() * (log_p - log_q)).sum(-1)[keep].mean())
        states = {"s": {"embed": s.embed(tokens), "prev": s.prev(tokens)},
                  "t": {"embed": t.embed(tokens), "prev": t.prev(tokens)}}  # fmt: skip
        for side, m in (("s", s), ("t", t)):
            states[side]["head"] = m.head(torch.tanh(states[side]["embed"] + torch.nn.functional.pad(
                states[side]["prev"][:, :-1], (0, 0, 1, 0))))  # fmt: skip
        for pair, conn in zip(PAIRS, conns):
            m = HiddenMatch.parse(pair)
            a, b = conn(states["s"][m.student][keep]), states["t"][m.teacher][keep]
            total += m.weight * reference_term(m.loss, a, b)
    return total


def reference_term(loss: str, a: torch.Tensor, b: torch.Tensor) -> float:
    """One hidden loss of states [P, D] as the papers write it: DistilBERT's mean of 1 - cos(a, b),
    or TinyBERT's elementwise MSE."""
    if loss == "cosine":
        return float((1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean())
    return float(((a - b) ** 2).mean())


def test_the_training_loss_is_the_token_loss_plus_the_weighted_hidden_losses(corpus) -> None:
    train = open_source(corpus["train"])
    source = LocalSource(TEACHER)
    student = student_lm()
    hidden = HiddenStates.build(PAIRS, student, source, train.batch([0]).tokens)
    assert [type(c).__name__ for c in hidden.connectors] == ["Linear", "Linear", "Identity"]
    b = train.batch(range(len(train)))
    want = _reference(student, source.teacher.model, hidden, b.tokens, b.loss_mask)
    # one step over the whole corpus at lr 0: the epoch's loss is the loss at the initial weights
    losses = train_tokens(student, train, source, epochs=1, batch_size=len(train), lr=0.0, optimizer="sgd",
                          hidden=hidden)  # fmt: skip
    assert losses[0] == pytest.approx(want, rel=1e-5)
    plain = train_tokens(student_lm(), train, source, epochs=1, batch_size=len(train), lr=0.0, optimizer="sgd")
    assert losses[0] - plain[0] > 0.05  # the hidden terms are in it
    as_text = train_tokens(student_lm(), train, source, epochs=1, batch_size=len(train), lr=0.0, optimizer="sgd",
                           hidden=PAIRS)  # fmt: skip
    assert as_text == losses  # the pairs as text build the same connectors inside
    assert not student._forward_hooks and not student.embed._forward_hooks  # no hook left on the user's model


def test_a_server_gives_the_in_process_teachers_training_and_only_the_counted_positions(corpus, served) -> None:
    train = open_source(corpus["train"])
    run = {"epochs": 4, "batch_size": len(train), "lr": 0.05, "seed": 3}  # one step an epoch: a loss per step

    def trained(source) -> tuple[list[float], BigramLM, HiddenStates]:
        student = student_lm()
        hidden = HiddenStates.build(PAIRS, student, source, train.batch([0]).tokens)
        return train_tokens(student, train, source, hidden=hidden, **run), student, hidden

    local, s_local, h_local = trained(LocalSource(TEACHER))
    with ServerSource(served, "lm") as source:
        remote, s_remote, h_remote = trained(source)
        b = train.batch(range(4))
        counted = next_token_labels(b.tokens, b.loss_mask) != IGNORE_INDEX
        assert not bool(counted.all())  # padding and the first token: positions the server is not asked
        _, states = source.token_targets_hidden(torch.arange(4), b.tokens, b.attention_mask, counted, ["embed"])
        raw = source.client.infer_tokens("lm", b.tokens, attention_mask=b.attention_mask, positions=counted,
                                         logits=True, hidden=["embed"])  # fmt: skip
    assert sorted(raw.outputs) == ["feature/embed", "logits"]  # the asked layer only, [P, D] at P counted positions
    assert raw["feature/embed"].shape == raw["logits"].shape[:1] + (16,) == (int(counted.sum()), 16)
    assert list(states) == ["embed"] and states["embed"].shape == (int(counted.sum()), 16)
    with torch.no_grad():
        torch.testing.assert_close(states["embed"], teacher_lm().embed(b.tokens)[counted], rtol=0, atol=0)
    # the server computes the same fp32 teacher on its own batches: equal to float32 rounding
    assert remote == pytest.approx(local, rel=1e-5)
    assert remote[-1] < remote[0] - 0.05  # it learns
    for a, b2 in ((s_local, s_remote), (h_local, h_remote)):
        for (k, v), w in zip(a.state_dict().items(), b2.state_dict().values()):
            torch.testing.assert_close(v, w, rtol=1e-4, atol=1e-6, msg=k)


def test_the_connectors_are_checkpointed_and_resume_to_the_uninterrupted_run(corpus, tmp_path: Path) -> None:
    train, source = open_source(corpus["train"]), LocalSource(TEACHER)
    run = {"batch_size": 4, "lr": 0.03, "seed": 5}

    def start(**kw) -> tuple[list[float], BigramLM, HiddenStates]:
        student = student_lm()
        hidden = HiddenStates.build(PAIRS, student, source, train.batch([0]).tokens)
        return train_tokens(student, train, source, hidden=hidden, **run, **kw), student, hidden

    whole, s_whole, h_whole = start(epochs=2)
    start(epochs=1, run_dir=tmp_path)
    resumed, s_res, h_res = start(epochs=2, run_dir=tmp_path, resume=True)
    assert resumed == whole
    for a, b in ((s_whole, s_res), (h_whole, h_res)):
        for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(v, w), k
    # other pairs (a weight), or none, are another run: refused naming the field
    student = student_lm()
    other = HiddenStates.build(["embed=embed:mse:0.4", *PAIRS[1:]], student, source, train.batch([0]).tokens)
    with pytest.raises(ValueError, match="features"):
        train_tokens(student, train, source, hidden=other, epochs=2, run_dir=tmp_path, resume=True, **run)
    with pytest.raises(ValueError, match="features"):
        train_tokens(student_lm(), train, source, epochs=2, run_dir=tmp_path, resume=True, **run)


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def test_cli_train_lm_feature_from_a_server_saves_the_connectors(corpus, served, tmp_path: Path) -> None:
    out = tmp_path / "student.safetensors"
    base = ["train-lm", "--dataset", corpus["train"], "--val-dataset", corpus["val"], "--student", STUDENT,
            "--epochs", "2", "--batch-size", "4", "--lr", "0.03", "--seed", "5"]  # fmt: skip
    feats = [a for p in PAIRS for a in ("--feature", p)]
    r = cli(*base, "--source", f"server:{served}/lm", *feats, "--out", str(out))
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["features"] == PAIRS
    train, source = open_source(corpus["train"]), LocalSource(TEACHER)
    torch.manual_seed(5)  # as the CLI: the seed, then the student, then the connectors
    student = student_lm()
    hidden = HiddenStates.build(PAIRS, student, source, train.batch([0]).tokens)
    want = train_tokens(student, train, source, hidden=hidden, epochs=2, batch_size=4, lr=0.03, seed=5)
    assert got["losses"] == pytest.approx(want, rel=1e-5)
    saved = load_file(str(tmp_path / "student.connectors.safetensors"))
    assert {k: list(v.shape) for k, v in saved.items()} == {
        "connectors.0.weight": [16, 8], "connectors.0.bias": [16], "connectors.1.weight": [16, 8],
        "connectors.1.bias": [16]}  # fmt: skip
    for k, v in hidden.state_dict().items():
        torch.testing.assert_close(saved[k], v, rtol=1e-4, atol=1e-6)


def test_cli_refuses_bad_features_before_any_step(corpus, served, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert cli("precompute", "--source", f"local:{TEACHER}", "--dataset", corpus["train"], "--codec", "topk:4",
               "--out", str(cache)).exit_code == 0  # fmt: skip
    out = tmp_path / "s.safetensors"
    base = ["train-lm", "--dataset", corpus["train"], "--val-dataset", corpus["val"], "--student", STUDENT,
            "--out", str(out)]  # fmt: skip
    refused(cli(*base, "--source", f"cache:{cache}", "--feature", "embed=embed"), "--feature",
            "token cache does not store", "server:", "local:")  # fmt: skip
    local = [*base, "--source", f"local:{TEACHER}"]
    refused(cli(*local, "--feature", "embed=nope"), "teacher", "no hidden-state layer(s) ['nope']", "embed")
    refused(cli(*local, "--feature", "nope=embed"), "student has no module(s) ['nope']")
    refused(cli(*local, "--feature", "embed=embed:l1"), "unknown loss 'l1'", "cosine or mse")
    refused(cli(*local, "--feature", "embed=embed:mse:-1"), "weight must be a finite number > 0")
    refused(cli(*local, "--feature", "embed,prev=embed,prev"), "one student and one teacher layer")
    refused(cli(*local, "--feature", "embed"), "STUDENT=TEACHER")
    # kd train's --match name of the student's output: no module to hook (was KeyError: 'logits' at the first step)
    refused(cli(*local, "--feature", "logits=head"), "--feature 'logits=head'", "the student's 'logits' are its output")
    # a module the forward never runs (was KeyError: 'unused'), an output that does not follow the batch (was
    # IndexError at the first step: the mask [4, S] does not match [1, S, 8])
    other = [a if a != STUDENT else f"{__name__}:student_positions" for a in local]
    refused(cli(*other, "--feature", "unused=embed"), "student module(s) ['unused'] are not run by its forward")
    refused(cli(*other, "--feature", "pos=embed"), "student layer(s) ['pos'] give [[1, ", "] for tokens [2, ",
            "not hidden states [B, S, D]")  # fmt: skip
    refused(cli(*local, "--feature-connector", "linear"), "--feature-connector", "with --feature")
    refused(cli(*local, "--feature", "embed=embed", "--feature-connector", "conv"), "--feature-connector 'conv'")
    refused(cli(*[a if a != str(out) else str(tmp_path / "x.connectors.safetensors") for a in local],
                "--feature", "embed=embed"), "connectors")  # fmt: skip
    # a teacher served at a tier that gives no hidden states: refused before any step, not at the first request
    running = start_server([load_teacher("lm", TEACHER)], options={"lm": TeacherOptions(access="scores",
                                                                                        warmup=False)})  # fmt: skip
    try:
        refused(cli(*base, "--source", f"server:127.0.0.1:{running.port}/lm", "--feature", "embed=embed"),
                "access tier 'scores'", "hidden states (--feature) needs tier 'features'")  # fmt: skip
    finally:
        running.stop(grace=1)
    assert not out.exists()
    with CacheSource(str(cache)) as source, pytest.raises(ValueError, match="token cache does not store"):
        train_tokens(student_lm(), open_source(corpus["train"]), source, hidden=PAIRS)
