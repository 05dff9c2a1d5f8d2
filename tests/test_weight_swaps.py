"""Live weights: a request that swaps keep outpacing still settles on one version.

A request split over several forwards is computed again when a swap falls between them; under a
storm of swaps (publishers back to back, the machine loaded) every try could straddle one. Its
last try holds the next swap off, so the caller gets an answer of one version, never UNAVAILABLE.
"""

from __future__ import annotations

import threading

import torch

from kd.models import digits_cnn_student
from kd.teacher_server.loading import load_teacher
from kd.teacher_server.server import TeacherOptions, start_server
from kd.teacher_server.weights import _MAX_RECOMPUTES, VERSION_KEY


def test_swaps_that_outpace_every_try_are_held_off_on_the_last() -> None:
    torch.manual_seed(1)
    teacher = load_teacher("p", "kd.models:digits_cnn_student")
    running = start_server([teacher], port=0, batching=TeacherOptions(warmup=False, accept_weights=True))
    try:
        slot = running.servicer.endpoints["p"].weights
        torch.manual_seed(2)
        states = [digits_cnn_student().state_dict(), teacher.model.state_dict()]
        publishers: list[threading.Thread] = []
        held_off: list[bool] = []

        def forwards_with_a_swap_between() -> dict[str, torch.Tensor]:
            """Two forwards of one request (rows tagged as VersionedRunner tags them) with a
            publisher's swap attempted between them, as the batcher would meet it."""
            first = slot.version
            # Only the request can hold the publish lock here (every earlier publisher has finished):
            # read before this publisher starts, it says whether the request holds the swap off, with
            # no wait whose length a loaded machine could outlast.
            held = slot._publish_lock.locked()
            p = threading.Thread(target=slot.publish, args=(states[len(publishers) % 2],))
            publishers.append(p)
            p.start()
            if not held:
                p.join()  # the swap goes through between the two forwards
            held_off.append(held)
            second = slot.version
            return {"logits": torch.zeros(2, 10), VERSION_KEY: torch.tensor([first, second])}

        out, fp, version = slot.settle(forwards_with_a_swap_between(), forwards_with_a_swap_between)
        assert held_off == [False] * _MAX_RECOMPUTES + [True]  # swaps went through until the last try
        assert set(out) == {"logits"} and version == _MAX_RECOMPUTES
        assert fp == slot._fingerprints[version][0]
        for p in publishers:
            p.join(10)
            assert not p.is_alive()
        assert slot.version == _MAX_RECOMPUTES + 1  # the held-off swap happened once the request settled
    finally:
        running.stop(grace=0)
