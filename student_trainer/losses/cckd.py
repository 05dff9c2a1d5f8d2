"""``cckd``: Peng, Jin, Liu, Zhou, Wu, Liu, Li, Zhang 2019, "Correlation Congruence for
Knowledge Distillation" (ICCV 2019).

CCKD adds to the instance-level KD term a *correlation congruence* term: the n x n
matrix of kernel values between the embeddings of the samples of a batch should be the
same for student and teacher. The kernel is the Gaussian RBF
k(x, y) = exp(-gamma ||x - y||^2), which for L2-normalised embeddings is
exp(-2 gamma) exp(2 gamma x^T y), approximated by its P-th order Taylor expansion:

    psi(F)[i, j] = sum_{p=0..P} exp(-2 gamma) (2 gamma)^p / p! (e_i^T e_j)^p,    e_i = F_i / ||F_i||

(``kd.core.reductions.rbf_taylor``, reduction ``cc``; the server sends psi(F_t) as
``layer@cc``, computed over each request's samples.) gamma = 0.4, P = 2: the values of
torchdistill's CCKD configuration (this package's notes); the paper's own table of
values was not re-checked here. They are fixed by the reduction name: to change them
the method would need ``reduce="cc:GAMMA:P"`` (see the report; the trainer does not yet
let an option choose the reduction's arguments).

Loss (the paper's L_CC = 1/n^2 ||psi(F_t) - psi(F_s)||_2^2, summed over matches):

    L = instance_weight * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))
        + cc_weight / n^2 * sum_pairs ||psi(F_s) - psi(F_t)||_F^2

The paper's full objective is alpha * CE + (1 - alpha) * L_KD + beta * L_CC; here CE is
the common ``ce_weight`` term (alpha) and ``instance_weight`` is (1 - alpha). Defaults:
instance_weight = 1, T = 4 (mdistiller's KD temperature, as ``kd``), ce_weight = 1 (common).

cc_weight default = 100 (our choice, assumption): torchdistill's ImageNet setting
(weight 0.003) uses the *non-squared* norm divided by n^2 on an *unnormalised* learned
128-d projection, whose kernel values are orders of magnitude larger, and the paper's
CIFAR-100 beta was not available to check; on L2-normalised embeddings psi stays within
[exp(-2g)(1 - 2g + 2g^2), exp(-2g)(1 + 2g + 2g^2)] ~ [0.23, 0.95], a typical mean squared difference is 1e-3 to
1e-2, and 100 makes the term comparable to CE at the start of training.

Embeddings: typically the penultimate layer (DigitsCNN's ``pool`` outputs [C, 1, 1],
flattened by the reduction). Connector: none. psi is [n, n] whatever the embedding
sizes, so student and teacher embeddings of different widths need no projection;
torchdistill adds a trainable linear layer on *both* sides (Linear4CCKD, 128-d), which
needs a trainable head on the teacher's side and cannot go through a teacher service.
CRD's "correlation" (``distiller_zoo/CC.py``) is a different, kernel-free variant.
"""

from __future__ import annotations

import torch

from kd.student_trainer.losses import register_feature
from kd.student_trainer.losses.kd import soft_kl


@register_feature(
    "cckd",
    "Peng et al. 2019, Correlation Congruence for Knowledge Distillation (ICCV)",
    reduce="cc",
    teacher_logits_shift_invariant=True,
    couples=True,
    # The instance-level KD term compares dense logits; without it the loss reads no logits.
    accepts_sparse=lambda o: o["instance_weight"] == 0,
)
def cckd_loss(
    student_feats: list[torch.Tensor],
    teacher_feats: list[torch.Tensor],
    *,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    cc_weight: float = 100.0,
    instance_weight: float = 1.0,
    temperature: float = 4.0,
) -> torch.Tensor:
    if not student_feats or len(student_feats) != len(teacher_feats):
        raise ValueError(f"cckd: got {len(student_feats)} student and {len(teacher_feats)} teacher kernel matrices")
    if temperature <= 0:
        raise ValueError(f"cckd: temperature must be > 0, got {temperature}")
    total = student_feats[0].new_zeros(())
    for k, (s, t) in enumerate(zip(student_feats, teacher_feats)):
        if s.ndim != 2 or s.shape[0] != s.shape[1]:
            raise ValueError(f"cckd: match {k}: expected an [n, n] kernel matrix, got student {tuple(s.shape)}")
        if s.shape != t.shape:
            raise ValueError(
                f"cckd: match {k}: student kernel matrix {tuple(s.shape)} != teacher {tuple(t.shape)}; "
                "the teacher's matrix must be computed over the same batch as the student's"
            )
        n = s.shape[0]
        total = total + (s - t.to(s.dtype)).pow(2).sum() / n**2
    loss = cc_weight * total
    if instance_weight:
        if not torch.is_tensor(teacher_logits) or teacher_logits.shape != student_logits.shape:
            shape = tuple(teacher_logits.shape) if torch.is_tensor(teacher_logits) else type(teacher_logits).__name__
            raise ValueError(
                f"cckd: the instance-level KD term needs dense teacher logits shaped like the student's "
                f"{tuple(student_logits.shape)}, got {shape}"
            )
        loss = loss + instance_weight * temperature**2 * soft_kl(student_logits, teacher_logits, temperature)
    return loss
