"""Per-request post-processing of a forward's outputs, run next to the model.

The batcher calls ``postprocess`` on each request's rows while they are still on
the model's device (``DynamicBatcher.submit(post=...)``), so only what the client
asked for is copied to the host: top-k (K values and classes and a log-sum-exp
per row instead of C logits), probabilities at T, labels, and
reduced or pooled features. For ``[batch, seq, vocab]`` outputs the full logits
would dominate the copy; here they never leave the device unless asked for. The
same code runs on the CPU (nothing to copy there).

Output names are the wire's (proto ``OutputSpec``): "logits", "probs", "labels",
"topk_values", "topk_indices", "logsumexp", "sample_indices", "sample_counts"
(draws in the sample:K codec's layout), "feature/<name>". An output that is not finite raises ``OutputRangeError``
(the service answers OUT_OF_RANGE; nothing is sent).
"""

from __future__ import annotations

import math

import torch

from kd.core import reductions
from kd.core.reductions import shorten
from kd.core.sparse import sample_parts, sent_topk_logsumexp, topk_parts
from kd.v1 import teacher_pb2 as pb

FLOAT_OUT = {pb.FLOAT32: torch.float32, pb.FLOAT16: torch.float16, pb.BFLOAT16: torch.bfloat16}


class OutputRangeError(ValueError):
    """An output has NaN or Inf values: the inputs (or the dtype asked for) overflow the teacher's range."""


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value is finite, from two scalars: min and max propagate NaN and
    surface +-Inf, so one pass without a boolean tensor the size of ``t``."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    # Python floats, not torch.isfinite: on a 0-dim tensor that is ~10 us of dispatch, twice
    # per check and two checks per request (inputs and outputs).
    return math.isfinite(lo.item()) and math.isfinite(hi.item())


def check_finite(key: str, t: torch.Tensor) -> None:
    if not all_finite(t):
        raise OutputRangeError(
            f"output {shorten(key)} has NaN or Inf values for these inputs ({str(t.dtype).removeprefix('torch.')}):"
            " inputs or options outside the range the teacher computes in; nothing is sent"
        )


def nothing_asked(spec: pb.OutputSpec) -> bool:
    """An empty spec: the default answer (logits, or labels for the LABELS tier)."""
    return (not spec.logits and spec.top_k == 0 and spec.probs_temperature == 0
            and not spec.features and not spec.labels and spec.class_samples == 0)  # fmt: skip


def draw_samples(logits: torch.Tensor, k: int, rounds: int, temperature: float,
                 uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``rounds`` x ``k`` draws per row from softmax(logits / T), exactly as the sample:K codec
    draws (``kd.core.sparse.sample_parts``): -> (ids, counts) int32 [N, rounds, k]."""
    ids, counts = sample_parts(logits, k, rounds, temperature, uniforms)
    return ids.to(torch.int32), counts.to(torch.int32)


def postprocess(spec: pb.OutputSpec, out: dict[str, torch.Tensor], *, labels_only: bool,
                uniforms: torch.Tensor | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """The outputs ``spec`` asks for, from one request's forward outputs, on their device.

    ``out``: "logits" [N, C] float32 and the captured "feature/<layer>" maps of these
    N rows. ``labels_only``: the teacher is served at the LABELS tier. ``uniforms``: of the
    draws ``spec.class_samples`` asks for, [N, R * K] (decoded and checked by the service;
    None: drawn from ``spec.class_sample_seed``)."""
    logits = out["logits"]
    dt = FLOAT_OUT.get(spec.logits_dtype, torch.float32)
    empty = nothing_asked(spec)
    result: dict[str, torch.Tensor] = {}
    full = logits.to(dt) if dt != torch.float32 else logits
    check_finite("logits", full)  # even when not sent: top-k and draws come from them
    if spec.logits or (empty and not labels_only):
        result["logits"] = full
    if spec.labels or (empty and labels_only):
        result["labels"] = logits.argmax(dim=1).to(torch.int64)
    temperature = spec.sparse_temperature or 1.0
    if spec.top_k:
        values, indices, lse = topk_parts(logits, spec.top_k, temperature)
        result["topk_values"] = values.to(dt)
        result["topk_indices"] = indices.to(torch.int32)
        if dt != torch.float32:  # the lse of the values as sent: their probabilities and the rest sum to 1
            lse = sent_topk_logsumexp(logits, result["topk_values"], indices, temperature)
        result["logsumexp"] = lse
        check_finite("logsumexp", lse)  # z / T overflows float32 at a small T with finite logits
    if spec.class_samples:
        k, rounds = spec.class_samples, spec.class_sample_rounds or 1
        if uniforms is None:
            g = torch.Generator().manual_seed(int(spec.class_sample_seed) % (1 << 63))
            uniforms = torch.rand(len(logits), rounds * k, generator=g, dtype=torch.float64)
        result["sample_indices"], result["sample_counts"] = draw_samples(logits, k, rounds, temperature, uniforms)
    if spec.probs_temperature > 0:
        result["probs"] = torch.softmax(logits / spec.probs_temperature, dim=1).to(dt)
        check_finite("probs", result["probs"])
    fdt = FLOAT_OUT.get(spec.features_dtype, torch.float32)
    maps = {k.removeprefix("feature/"): v for k, v in out.items() if k.startswith("feature/")}
    for name in spec.features:
        # Reductions run on this request's samples only (batch ones relate them to each other).
        feat = reductions.reduce(name, maps)
        if spec.pool_features and reductions.parse(name).reduction is None:
            feat = reductions.pool(feat)
        feat = feat.to(fdt)
        check_finite(f"feature/{name}", feat)
        result[f"feature/{name}"] = feat
    return result
