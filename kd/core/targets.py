"""Sparse soft targets, and the KL divergence against them without densifying.

Dense targets are plain logits ``[B, C]``. Sparse ones come from the cache's
``topk:K`` and ``sample:K`` codecs (or a server's top-k output) and keep
``K << C`` entries per row, so a 32000-class teacher costs K entries, not C.

* ``topk``: the K largest teacher logits, their classes and the row's
  log-sum-exp of z / T_c (T_c the cache's temperature, 1 by default), so the
  tail mass ``1 - sum(top-K probs)`` at T_c is known; it is spread evenly over
  the other C - K classes (the dense decode of the cache codec is exactly this
  distribution). At T = T_c the top-K probabilities and the tail mass are
  exact; truncation still biases how the tail is shared, and training at
  another temperature than T_c adds error (precompute with the training T).
* ``sample``: K classes drawn with replacement from the teacher's
  distribution at the sampling temperature T_s, with their logits and the
  row's log-sum-exp at T_s. With the proposal equal to the target, each draw
  has importance weight 1, so ``mean_k (log p_t(i_k) - log p_s(i_k))`` is an
  unbiased estimate of KL(p_t || p_s) (Anshumann et al. 2025, "Sparse Logit
  Sampling"). It is only defined at T = T_s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TAIL_FLOOR = 1e-12


@dataclass
class SparseTargets:
    kind: str  # "topk" | "sample"
    indices: torch.Tensor  # [B, K] int64 class ids
    logits: torch.Tensor  # [B, K] float32 teacher logits at those classes
    logsumexp: torch.Tensor  # [B] float32: of z / temperature
    num_classes: int
    temperature: float | None = None  # T_c (topk; None = 1) or the sampling temperature T_s

    def __post_init__(self) -> None:
        if self.kind not in ("topk", "sample"):
            raise ValueError(f"unknown sparse target kind {self.kind!r}")
        if self.kind == "sample" and not self.temperature:
            raise ValueError("sampled targets need their sampling temperature")

    def __len__(self) -> int:
        return int(self.indices.shape[0])

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
        """topk: the logit each non-top class gets so that, at T_c, the tail mass
        is spread evenly over them. [B]"""
        tc = self.temperature or 1.0
        rest = self.num_classes - self.indices.shape[1]
        top_mass = torch.exp(self.logits / tc - self.logsumexp[:, None]).sum(dim=1).clamp(max=1.0)
        tail = (1.0 - top_mass).clamp(min=TAIL_FLOOR) / max(rest, 1)
        return tc * (torch.log(tail) + self.logsumexp)

    def dense(self) -> torch.Tensor:
        """The dense logits [B, C] this stands for (topk only; for tests and small C)."""
        if self.kind != "topk":
            raise ValueError("sampled targets are an estimator, not a distribution: they have no dense form")
        out = self.tail_logit()[:, None].expand(len(self), self.num_classes).clone()
        return out.scatter_(1, self.indices, self.logits)


Targets = torch.Tensor | SparseTargets


def sparse_kl(student_logits: torch.Tensor, t: SparseTargets, temperature: float) -> torch.Tensor:
    """KL(p_t || p_s) at temperature T, batchmean, with teacher targets never densified."""
    if student_logits.shape[1] != t.num_classes:
        raise ValueError(f"student has {student_logits.shape[1]} classes, targets {t.num_classes}")
    dt = torch.promote_types(student_logits.dtype, torch.float32)
    log_q = F.log_softmax(student_logits.to(dt) / temperature, dim=1)
    log_q_k = log_q.gather(1, t.indices)
    v = t.logits.to(dt)
    if t.kind == "sample":
        if not math.isclose(temperature, t.temperature, rel_tol=1e-6):
            raise ValueError(
                f"these targets were sampled at temperature {t.temperature}; the sampled-KL estimate is "
                f"only unbiased at that temperature, not at {temperature}"
            )
        log_p_k = v / temperature - t.logsumexp.to(dt)[:, None]
        return (log_p_k - log_q_k).mean(dim=1).mean()
    k = t.indices.shape[1]
    rest = t.num_classes - k
    if rest == 0:
        log_p_k = F.log_softmax(v / temperature, dim=1)
        return (log_p_k.exp() * (log_p_k - log_q_k)).sum(dim=1).mean()
    z_tail = t.tail_logit().to(dt) / temperature  # [B]
    lse = torch.logsumexp(torch.cat([v / temperature, (z_tail + math.log(rest))[:, None]], dim=1), dim=1)
    log_p_k = v / temperature - lse[:, None]
    log_p_tail = z_tail - lse  # each of the C - k tail classes
    top = (log_p_k.exp() * (log_p_k - log_q_k)).sum(dim=1)
    sum_log_q_tail = log_q.sum(dim=1) - log_q_k.sum(dim=1)
    tail = log_p_tail.exp() * (rest * log_p_tail - sum_log_q_tail)
    return (top + tail).mean()
