"""Sparse soft targets, and the KL divergence against them without densifying.

Dense targets are plain logits ``[B, C]`` (full and quantised codecs, and ``pca:K``, whose
K coefficients in a low-rank basis decode to dense logits). Sparse ones come from the cache's
``topk:K``, ``rand:M`` and ``sample:K`` codecs (or a server's top-k output) and keep
``K << C`` entries per row, so a 32000-class teacher costs K entries, not C.

* ``topk``: the K largest teacher logits, their classes and the row's
  log-sum-exp of z / T_c (T_c the cache's temperature, 1 by default), so each
  stored probability and the remaining mass ``1 - sum(stored probs)`` at T_c are
  exact (a ``topk:K`` cache of codec version 3 gives the logits shifted by a
  constant per row, ``T_c * log p``, with log-sum-exp 0: the same probabilities).
  The loss compares K + 1 buckets, the stored classes and one **rest bucket**
  (student side: logsumexp of the student over the classes not stored),
  and is minimised exactly when the student matches the teacher on them; the
  tail is never spread evenly over the other classes (an outside audit measured
  0.67 for that against 0.76 for the bucket on topk:10). At T != T_c the stored
  probabilities are not known exactly: the rest is modelled as C - K equal logits
  that give the exact rest mass at T_c (an approximation; precompute at the
  training T). ``dense()`` (for methods that need dense logits) is that same
  maximum-entropy completion.
* ``subset``: like ``topk`` for any stored set (``rand:M``: classes chosen by the
  record key), stored as logits at T_c with ``logsumexp`` 0; only valid at T_c.
* ``sample``: unique ids drawn from softmax(z / T_s) (Anshumann et al. 2025,
  "Sparse Logit Sampling", T_s = 1 by default) with their counts; ``logits``
  holds the counts and ``logsumexp`` the number of draws N (``counts``,
  ``draws``). The target is the empirical distribution counts / N; the KL
  against it has the full KL's gradient in expectation. Only defined at T_s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TAIL_FLOOR = 1e-12
KINDS = ("topk", "subset", "sample")


@dataclass
class SparseTargets:
    kind: str  # "topk" | "subset" | "sample"
    indices: torch.Tensor  # [B, K] int64 class ids (sample: unused slots hold 0 with count 0)
    logits: torch.Tensor  # [B, K] float32 teacher logits at those classes (sample: the draw counts)
    logsumexp: torch.Tensor  # [B] float32: of z / temperature (sample: the number of draws)
    num_classes: int
    temperature: float | None = None  # T_c (topk/subset; None = 1) or the sampling temperature T_s

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown sparse target kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.kind == "sample" and not self.temperature:
            raise ValueError("sampled targets need their sampling temperature")

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @property
    def counts(self) -> torch.Tensor:
        """sample: how often each stored id was drawn [B, K]."""
        if self.kind != "sample":
            raise ValueError(f"{self.kind} targets have logits, not counts")
        return self.logits

    def to(self, device: torch.device | str) -> SparseTargets:
        return SparseTargets(
            self.kind,
            self.indices.to(device),
            self.logits.to(device),
            self.logsumexp.to(device),
            self.num_classes,
            self.temperature,
        )

    def __getitem__(self, rows: torch.Tensor | slice) -> SparseTargets:
        return SparseTargets(
            self.kind, self.indices[rows], self.logits[rows], self.logsumexp[rows], self.num_classes, self.temperature
        )

    def tail_logit(self) -> torch.Tensor:
        """topk: the logit each non-stored class gets so that, at T_c, the rest mass
        is spread evenly over them (the maximum-entropy completion). [B]"""
        tc = self.temperature or 1.0
        rest = self.num_classes - self.indices.shape[1]
        top_mass = torch.exp(self.logits / tc - self.logsumexp[:, None]).sum(dim=1).clamp(max=1.0)
        tail = (1.0 - top_mass).clamp(min=TAIL_FLOOR) / max(rest, 1)
        return tc * (torch.log(tail) + self.logsumexp)

    def dense(self) -> torch.Tensor:
        """The dense logits [B, C] of the maximum-entropy completion (topk only; for methods
        that need dense targets, tests and small C). The KD losses never use it. They are the
        teacher's logits only up to a constant per row (and made up outside the top K): fit for
        losses that read softmax only, which is why the trainer refuses the others on top-k
        targets (``teacher_logits_shift_invariant``)."""
        if self.kind != "topk":
            raise ValueError(
                f"{self.kind} targets have no dense form (sampled counts, or a random subset of the classes); "
                "use a method that accepts sparse targets (kd, token-fkl) or a dense codec"
            )
        out = self.tail_logit()[:, None].expand(len(self), self.num_classes).clone()
        return out.scatter_(1, self.indices, self.logits)

    def bucket_log_probs(
        self, temperature: float, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """topk/subset: (log p at the K stored classes [B, K], log of the rest mass [B]) at T.

        Exact at T_c: the rest is ``1 - sum(p_k)`` from the stored log-sum-exp, computed as
        ``log(-expm1(logsumexp(log p_k)))`` so a tiny rest keeps its digits. At another T
        (topk only) the rest is modelled as C - K equal logits giving that mass at T_c."""
        if self.kind == "sample":
            raise ValueError("sampled targets have counts, not probabilities per bucket")
        tc = self.temperature or 1.0
        v = self.logits.to(dtype)
        lse = self.logsumexp.to(dtype)
        if math.isclose(temperature, tc, rel_tol=1e-6):
            log_p = v / temperature - lse[:, None]
            stored = torch.logsumexp(log_p, dim=1).clamp(max=-TAIL_FLOOR)
            return log_p, torch.log(-torch.expm1(stored)).clamp(min=math.log(TAIL_FLOOR))
        if self.kind != "topk":
            raise ValueError(
                f"these {self.kind} targets hold the teacher's probabilities at temperature {tc}; they are only "
                f"known there, not at {temperature} (precompute at the training temperature)"
            )
        rest = self.num_classes - self.indices.shape[1]
        scores = v / temperature
        if rest == 0:
            return F.log_softmax(scores, dim=1), torch.full_like(lse, -math.inf)
        tail = self.tail_logit().to(dtype) / temperature + math.log(rest)
        norm = torch.logsumexp(torch.cat([scores, tail[:, None]], dim=1), dim=1)
        return scores - norm[:, None], tail - norm


Targets = torch.Tensor | SparseTargets


def sample_temperature_refusal(drawn: float, temperature: float) -> str | None:
    """Why sampled targets drawn at temperature ``drawn`` cannot train a KL at ``temperature`` (None
    where they can): the loss's refusal, and the trainer's before any step (``check_sample_temperature``)."""
    if math.isclose(temperature, drawn, rel_tol=1e-6):
        return None
    return (
        f"these targets were drawn at temperature {drawn}; the sampled distribution estimates the "
        f"teacher only there, so train at temperature {drawn:g}, not {temperature:g} "
        "(sample:K caches are drawn at T = 1 unless precomputed with --temperature)"
    )


def sparse_kl(student_logits: torch.Tensor, t: SparseTargets, temperature: float) -> torch.Tensor:
    """KL(p_t || p_s) at temperature T, batchmean, with teacher targets never densified.

    topk/subset: over the K stored classes plus the rest bucket; sample: against the
    empirical distribution counts / N (only at the sampling temperature)."""
    if student_logits.shape[1] != t.num_classes:
        raise ValueError(f"student has {student_logits.shape[1]} classes, targets {t.num_classes}")
    dt = torch.promote_types(student_logits.dtype, torch.float32)
    log_q = F.log_softmax(student_logits.to(dt) / temperature, dim=1)
    log_q_k = log_q.gather(1, t.indices)
    zero = torch.zeros((), dtype=dt, device=log_q.device)
    if t.kind == "sample":
        refusal = sample_temperature_refusal(t.temperature, temperature)
        if refusal is not None:
            raise ValueError(refusal)
        counts = t.counts.to(dt)
        valid = counts > 0
        w = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
        log_w = torch.log(torch.where(valid, w, torch.ones((), dtype=dt, device=w.device)))
        return torch.where(valid, w * (log_w - log_q_k), zero).sum(dim=1).mean()
    log_p_k, log_p_rest = t.bucket_log_probs(temperature, dt)
    top = (log_p_k.exp() * (log_p_k - log_q_k)).sum(dim=1)
    stored = torch.zeros_like(log_q, dtype=torch.bool).scatter_(1, t.indices, True)
    has_rest = (~stored).any(dim=1)
    log_q_rest = torch.logsumexp(log_q.masked_fill(stored, -math.inf), dim=1)
    rest = torch.where(has_rest, log_p_rest.exp() * (log_p_rest - torch.where(has_rest, log_q_rest, zero)), zero)
    return (top + rest).mean()
