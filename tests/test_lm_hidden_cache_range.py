"""Hidden states past fp16's range in ``kd precompute --feature`` of a token dataset: refused naming
the dataset sequence they come from, in process (the cache writer's check) and through a real
server (which refuses the fp16 answer OUT_OF_RANGE without naming a row), for a batched top-k
request and a per-sequence sampled one alike; nothing of that sequence is written. And a token
server refuses only the request whose answer is out of range, not the others batched in its forward
(a sampled precompute's concurrent per-sequence requests, any clients)."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest
import torch
from tiny_lm import BigramLM
from typer.testing import CliRunner

from kd.cache.sharded import open_cache
from kd.cli import app
from kd.core.data import open_source
from kd.teacher_server.client import TeacherClient, TeacherRequestError
from kd.teacher_server.loading import load_teacher
from kd.teacher_server.server import TeacherOptions, start_server

LOUD = ord("Z")  # the byte tokenizer's id of "Z": only sequence 7 holds it
GATE = ord("Q")  # a row holding it keeps its forward waiting until the test opens the gate
GATE_OPEN, IN_FORWARD = threading.Event(), threading.Event()


def loud_lm() -> BigramLM:
    """A teacher whose embedding of "Z" is past fp16's range (its logits stay finite: tanh)."""
    torch.manual_seed(41)
    m = BigramLM(16, 3.0)
    with torch.no_grad():
        m.embed.weight[LOUD, 0] = 1e5
    return m


class _Gated(BigramLM):
    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if bool((tokens == GATE).any()):
            IN_FORWARD.set()
            assert GATE_OPEN.wait(60)
        return super().forward(tokens)


def gated_lm() -> _Gated:
    torch.manual_seed(41)
    m = _Gated(16, 3.0)
    with torch.no_grad():
        m.embed.weight[LOUD, 0] = 1e5
    return m


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("loud")
    lines = [f"line {i}: the cat sat on the mat"[: 9 + 2 * i] for i in range(12)]
    lines[7] = "line 7: Zebra"
    (d / "train.txt").write_text("\n".join(lines) + "\n")
    uri = f"text:{d / 'train.txt'}?doc=line&pack=0&block=32"
    b = open_source(uri).batch(list(range(12)))
    assert [i for i in range(12) if bool((b.tokens[i] == LOUD).any())] == [7]
    return uri


@pytest.fixture(scope="module")
def served() -> str:
    running = start_server([load_teacher("loud", f"{__name__}:loud_lm")],
                           batching=TeacherOptions(max_batch_tokens=512, max_batch_size=8, warmup=False))  # fmt: skip
    yield f"127.0.0.1:{running.port}"
    running.stop(grace=1)


@pytest.mark.parametrize("where", ["local", "served"])
@pytest.mark.parametrize("codec", ["topk:4", "sample:4x2"])
def test_states_past_fp16_are_refused_naming_the_sequence(corpus, served, where: str, codec: str,
                                                          tmp_path: Path) -> None:  # fmt: skip
    source = f"local:{__name__}:loud_lm" if where == "local" else f"server:{served}/loud"
    out = tmp_path / "c"
    r = CliRunner().invoke(app, ["precompute", "--source", source, "--dataset", corpus, "--codec", codec,
                                 "--feature", "embed", "--batch-size", "5", "--out", str(out)])  # fmt: skip
    assert r.exit_code == 2, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception  # no traceback
    text = " ".join(r.output.split())
    assert "sequence 7:" in text and "sequences" not in text, text  # that one, not its whole request
    assert "embed" in text, text
    written = {i for i, _ in open_cache(str(out)).keys()}
    assert written == {0, 1, 2, 3, 4}  # the batches before it kept, nothing of its batch


def test_a_token_answer_out_of_range_fails_only_its_own_request() -> None:
    running = start_server([load_teacher("gated", f"{__name__}:gated_lm")],
                           batching=TeacherOptions(max_batch_tokens=512, max_batch_size=8, warmup=False))  # fmt: skip
    batcher = running.servicer.endpoints["gated"].batcher
    client = TeacherClient(f"127.0.0.1:{running.port}")
    results: dict[str, object] = {}

    def ask(name: str, token: int) -> None:
        try:
            results[name] = client.infer_tokens("gated", torch.tensor([[257, token, 258]]), lengths=[3], top_k=4,
                                                hidden=["embed"], hidden_dtype=torch.float16)  # fmt: skip
        except TeacherRequestError as e:
            results[name] = e

    try:
        GATE_OPEN.clear()
        IN_FORWARD.clear()
        threads = [threading.Thread(target=ask, args=("gate", GATE))]
        threads[0].start()
        assert IN_FORWARD.wait(60)  # the model is busy: the next two requests queue together
        threads += [threading.Thread(target=ask, args=(n, t)) for n, t in (("loud", LOUD), ("good", ord("a")))]
        for t in threads[1:]:
            t.start()
        for _ in range(600):  # both queued (a condition, not a duration)
            if len(batcher._queue) == 2:
                break
            threading.Event().wait(0.05)
        assert len(batcher._queue) == 2
        GATE_OPEN.set()
        for t in threads:
            t.join(60)
        loud = results["loud"]
        assert isinstance(loud, TeacherRequestError) and loud.code == grpc.StatusCode.OUT_OF_RANGE, loud
        assert "feature/embed" in loud.message
        for name in ("gate", "good"):  # answered, as if the loud request had not been there
            out = results[name]
            assert not isinstance(out, TeacherRequestError), (name, out)
            assert out["feature/embed"].dtype == torch.float16 and bool(out["feature/embed"].isfinite().all())
            assert out["feature/embed"].shape == (3, 16)
        assert batcher.stats.forwards == 2  # the loud and the good request shared one forward
    finally:
        GATE_OPEN.set()
        client.close()
        running.stop(grace=1)
