"""``dkd``: Zhao, Cui, Song, Qiu, Liang 2022, "Decoupled Knowledge Distillation" (CVPR 2022).

With p = softmax(z / T) and g the ground-truth class of each sample:

    b   = [p_g, 1 - p_g]                        (target vs. all non-target mass)
    q   = softmax over the C - 1 non-target classes of z / T   (p_i / (1 - p_g), i != g)
    TCKD = T^2 * KL(b_t || b_s)
    NCKD = T^2 * KL(q_t || q_s)
    L   = ce_weight * CE(z_s, y) + w(epoch) * (alpha * TCKD + beta * NCKD)
    w(epoch) = min((epoch + 1) / warmup, 1)       (epoch 0-based; w = 1 when warmup = 0)

Both KLs are "batchmean": summed over their classes (2 for TCKD, C - 1 for NCKD)
and averaged over samples, i.e. mdistiller's ``kl_div(..., size_average=False) / B``.
Per sample, KL(p_t || p_s) = KL(b_t || b_s) + (1 - p_t,g) * KL(q_t || q_s): Hinton
KD is the special case alpha = 1, beta = 1 - p_t,g (the paper's Eq. 1).

Defaults are mdistiller's CIFAR-100 setting (``mdistiller/engine/cfg.py``):
alpha = 1, beta = 8, T = 4, warmup = 20, CE weight 1. ImageNet: beta = 0.5,
T = 1, warmup = 1.

Choices where this differs from mdistiller ``mdistiller/distillers/DKD.py``:

* Warm-up. mdistiller multiplies by ``min(epoch / warmup, 1)`` with 1-based
  epochs (its trainer counts from 1), so the first epoch gets 1/20 and epoch 20
  the full weight. Our training loop passes 0-based epochs, hence
  ``(epoch + 1) / warmup``: the same schedule, epoch for epoch.
* Non-target masking. mdistiller subtracts 1000 from the target's *tempered*
  logit (z_g / T - 1000) and takes a softmax over all C classes; that leaks the
  target's mass back in whenever z_g / T exceeds the others by about 1000 or
  more. Here the target column is removed and the softmax is taken over the
  C - 1 others exactly (the paper's definition of q); the two agree to within
  exp(-1000) otherwise.
* log b. mdistiller takes ``log`` of the summed probabilities, which is -inf
  once p_g or 1 - p_g underflows (large logits in fp32). Here
  log p_g = z_g / T - logsumexp(z / T) and
  log(1 - p_g) = logsumexp_{i != g}(z_i / T) - logsumexp(z / T), which are
  finite for any finite logits; equal in exact arithmetic.

Needs dense teacher logits: b and q need the teacher's probability of the
label and the full non-target distribution, which top-k / sampled caches do
not carry.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.student_trainer.losses import register


def _decoupled_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log b [B, 2], log q [B, C-1]) for tempered logits [B, C] and labels [B]."""
    b, c = logits.shape
    target = logits.gather(1, labels[:, None])  # [B, 1]
    keep = torch.ones_like(logits, dtype=torch.bool).scatter_(1, labels[:, None], False)
    others = logits[keep].view(b, c - 1)  # row order preserved, target column dropped
    lse_all = torch.logsumexp(logits, dim=1, keepdim=True)
    lse_others = torch.logsumexp(others, dim=1, keepdim=True)
    log_b = torch.cat([target - lse_all, lse_others - lse_all], dim=1)
    log_q = others - lse_others
    return log_b, log_q


def _kl_batchmean(log_p_t: torch.Tensor, log_p_s: torch.Tensor) -> torch.Tensor:
    """sum_i p_t (log p_t - log p_s) summed over dim 1, averaged over dim 0."""
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()


def warmup_factor(epoch: int, warmup: int) -> float:
    """min((epoch + 1) / warmup, 1) for a 0-based epoch; 1 when warmup is 0."""
    if warmup <= 0:
        return 1.0
    return min((epoch + 1) / warmup, 1.0)


@register(
    "dkd",
    "Zhao, Cui, Song, Qiu, Liang 2022, Decoupled Knowledge Distillation (CVPR)",
    teacher_logits_shift_invariant=True,
    couples=False,
)
def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    epoch: int,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    warmup: int = 20,
    ce_weight: float = 1.0,
) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0 epochs, got {warmup}")
    if epoch < 0:
        raise ValueError(f"epoch is 0-based and must be >= 0, got {epoch}")
    if student_logits.shape[1] < 2:
        raise ValueError("dkd needs at least 2 classes")
    dt = torch.promote_types(student_logits.dtype, torch.float32)
    labels = labels.reshape(-1).long()
    log_b_s, log_q_s = _decoupled_logprobs(student_logits.to(dt) / temperature, labels)
    log_b_t, log_q_t = _decoupled_logprobs(teacher_logits.to(dt) / temperature, labels)
    tckd = _kl_batchmean(log_b_t, log_b_s) * temperature**2
    nckd = _kl_batchmean(log_q_t, log_q_s) * temperature**2
    kd = warmup_factor(epoch, warmup) * (alpha * tckd + beta * nckd)
    if ce_weight == 0:
        return kd
    return ce_weight * F.cross_entropy(student_logits.to(dt), labels) + kd
