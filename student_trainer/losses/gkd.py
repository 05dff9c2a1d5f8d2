"""``gkd``: Zhou, Zhuge, Guan, Liu 2020, "Channel Distillation: Channel-Wise Attention for
Knowledge Distillation" (arXiv 2006.01683): Guided Knowledge Distillation (GKD) with the Early
Decay Teacher (EDT).

GKD distils only the samples the teacher gets right (argmax z_t == y), averaged over those:

    R     = {i : argmax_c z_t[i, c] == y_i},   p = softmax(z / T)
    GKD   = T^2 * (1 / |R|) * sum_{i in R} KL(p_t[i] || p_s[i])       (0 when R is empty)
    w(e)  = kd_weight * decay ** floor((e + 1) / round(decay_every * epochs))
    L     = ce_weight * CE(z_s, y) + w(epoch) * GKD

KL: summed over classes, averaged over the |R| correct samples (not over the batch): the
reference's ``KDLossv2`` (zhouzaida/channel-distillation ``losses/kd_loss.py``) divides the
summed KL by the count of correct samples. There the count can be 0 (0/0 = NaN) and a teacher
probability that underflows to exactly 0 is replaced by 1; here an all-wrong batch gives a zero
GKD term (the loss is then ``ce_weight`` * CE) and no probability is altered.

EDT (``utils/util.py``, ``adjust_loss_alpha``): the reference multiplies each loss by
``rate * factor ** (epoch // 30)`` with 1-based epochs on ImageNet (100 epochs). ``epoch`` here is
0-based, hence ``e + 1``; ``decay_every = 0.3`` makes the step 30 epochs of 100. The paper decays
"the weight of the distillation loss" so that the student gradually takes over; in the reference
code the decaying term (factor 0.9) is the channel-distillation feature loss, while GKD's own
factor is 1. This logit-only loss has GKD as its only teacher term, so EDT is applied to it:
``decay = 0.9`` (the reference's EDT factor) by default, ``decay = 1`` gives the reference's
constant GKD weight. Not reproduced: the reference's "lrdv2" variant, which also switches CE and
GKD off for the first 30 epochs (60 of 200 on CIFAR) while only the feature loss trains -- with
no feature term that would leave nothing to learn from; and its CIFAR steps (epochs 60 and 160
of 200) are not uniform.

Defaults (the reference's ImageNet config, ResNet34 -> ResNet18): T = 1, kd_weight = 1,
ce_weight = 1, decay = 0.9 every 30% of training. Its CIFAR-100 config uses kd_weight = 0.1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.student_trainer.losses import register


def edt_weight(epoch: int, epochs: int, kd_weight: float, decay: float, decay_every: float) -> float:
    """Early Decay Teacher: kd_weight * decay ** floor((epoch + 1) / step), step = round(decay_every * epochs)."""
    if not decay_every > 0:
        raise ValueError(f"decay_every must be > 0 (a fraction of the epochs), got {decay_every}")
    step = max(1, round(decay_every * epochs))
    return kd_weight * decay ** ((epoch + 1) // step)


@register(
    "gkd",
    "Zhou et al. 2020, Channel Distillation: Channel-Wise Attention for Knowledge Distillation (GKD + EDT)",
    teacher_logits_shift_invariant=True,
    couples=True,
)
def gkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    ce_weight: float = 1.0,
    decay: float = 0.9,
    decay_every: float = 0.3,
    epoch: int,
    epochs: int,
) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dt = torch.promote_types(student_logits.dtype, torch.float32)
    correct = teacher_logits.argmax(dim=1) == labels
    log_s = F.log_softmax(student_logits[correct].to(dt) / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits[correct].to(dt) / temperature, dim=1)
    count = int(correct.sum())
    # Sum over the correct rows only (an empty selection sums to 0 and keeps the graph).
    guided = F.kl_div(log_s, log_t, reduction="sum", log_target=True) / max(count, 1) * temperature**2
    weight = edt_weight(epoch, epochs, kd_weight, decay, decay_every)
    loss = weight * guided
    if ce_weight != 0.0:
        loss = loss + ce_weight * F.cross_entropy(student_logits, labels)
    return loss
