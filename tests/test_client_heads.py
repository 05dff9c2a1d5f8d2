"""``TeacherClient.infer`` remembers each question's serialised request head: every
answer must still be the one asked for, whichever questions came before, on a real server."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd.teacher_server import client as client_module
from kd.teacher_server.client import TeacherClient, _outputs, encode_request, spec_of
from kd.teacher_server.loading import load_teacher
from kd.teacher_server.server import start_server

ASKS = [
    {},
    {"top_k": 3},
    {"temperature": 2.0},
    {"labels": True},
    {"logits": False, "top_k": 2, "sparse_temperature": 4.0},
    {"dtype": torch.float16},
    {"samples": 4, "sample_seed": 7},
    {"samples": 4, "sample_seed": 8},
    {"samples": 3, "sample_rounds": 2, "sample_seed": 8},
    {"features": ["2"]},
    {"features": ["2"], "pool_features": True, "logits": False},
    {"features": ["4"], "features_dtype": torch.float16},
]


def _plain(c: TeacherClient, x: torch.Tensor, kw: dict, teacher: str = "digits") -> dict[str, torch.Tensor]:
    """The same question, its request built from scratch (no remembered head)."""
    return _outputs(c._call(c._infer, encode_request(teacher, x, None, spec_of(**kw))))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """The same outputs, dtypes and shapes; float values to 1e-5 (a forward may run on a
    handler thread or on the model thread, whose torch thread counts may sum differently)."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and (torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-5) if a[k].is_floating_point()
             else torch.equal(a[k], b[k]))
        for k in a
    )  # fmt: skip


def test_each_question_gets_its_own_answer_in_any_order(address: str) -> None:
    x = torch.rand(5, 64, generator=torch.Generator().manual_seed(0)) * 16
    with TeacherClient(address) as c:
        want = [_plain(c, x, kw) for kw in ASKS]
        assert len({tuple(sorted(w)) for w in want}) >= 6  # the questions differ in what comes back
        for order in (ASKS, ASKS[::-1], ASKS[1::2] + ASKS[::2]):
            for kw in order:
                assert _same(c.infer("digits", x, **kw), want[ASKS.index(kw)]), kw
        assert len(c._heads) == len(ASKS)  # one per question, not per call
        # Another batch size, the same question: the head is shared, the inputs are not.
        y = torch.rand(2, 64, generator=torch.Generator().manual_seed(1)) * 16
        assert _same(c.infer("digits", y, top_k=3), _plain(c, y, {"top_k": 3}))


def test_remembered_heads_stay_bounded(address: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "_MAX_HEADS", 4)
    x = torch.rand(3, 64, generator=torch.Generator().manual_seed(2)) * 16
    with TeacherClient(address) as c:
        for k in range(1, 10):
            assert _same(c.infer("digits", x, top_k=k), _plain(c, x, {"top_k": k}))
            assert len(c._heads) <= 4
        assert _same(c.infer("digits", x, features=iter(())), _plain(c, x, {}))  # an iterator, read once


def test_each_teacher_gets_its_own_head(teacher_spec: str) -> None:
    running = start_server([load_teacher("a", teacher_spec), load_teacher("b", "kd.bench.serve:free_teacher")])
    try:
        x = torch.rand(4, 64, generator=torch.Generator().manual_seed(3)) * 16
        with TeacherClient(f"127.0.0.1:{running.port}") as c:
            want = {t: _plain(c, x, {}, t) for t in "ab"}
            assert not _same(want["a"], want["b"])
            for t in "abba":
                assert _same(c.infer(t, x), want[t]), t
    finally:
        running.stop(grace=1)


def test_values_that_may_change_in_place_are_sent_as_they_are_now(address: str) -> None:
    """A tensor (or numpy) scalar is not remembered: the value at the call is the one sent."""
    x = torch.rand(3, 64, generator=torch.Generator().manual_seed(4)) * 16
    with TeacherClient(address) as c:
        seed = torch.tensor(7)
        for value in (7, 8, 9):
            got = c.infer("digits", x, samples=4, sample_seed=seed)
            assert _same(got, _plain(c, x, {"samples": 4, "sample_seed": value})), value
            seed += 1  # in place: the same object, another value
        assert not _same(_plain(c, x, {"samples": 4, "sample_seed": 7}), _plain(c, x, {"samples": 4, "sample_seed": 8}))
        assert _same(c.infer("digits", x, top_k=np.array(3)), _plain(c, x, {"top_k": 3}))
        temperature = torch.tensor(2.0)
        assert _same(c.infer("digits", x, temperature=temperature), _plain(c, x, {"temperature": 2.0}))
        temperature *= 2
        assert _same(c.infer("digits", x, temperature=temperature), _plain(c, x, {"temperature": 4.0}))
        assert not c._heads  # none of these was remembered
        c.infer("digits", x, top_k=2)
        with pytest.raises(TypeError):  # as before the cache: a float is no top_k, even after an int one
            c.infer("digits", x, top_k=2.0)
