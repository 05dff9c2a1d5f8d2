"""``pkt``: Passalis & Tefas 2018, "Learning Deep Representations with Probabilistic Knowledge
Transfer" (ECCV 2018).

PKT matches the conditional probability distributions that a kernel over the batch
induces in the teacher's and the student's feature spaces. With the cosine-similarity
kernel K(a, b) = (cos(a, b) + 1) / 2 (in [0, 1]) on the flattened per-sample features
x_i (student) and y_i (teacher) (the 1/2 cancels in the normalisation below):

    p_{i|j} = K(y_i, y_j) / sum_k K(y_k, y_j),     q_{i|j} = K(x_i, x_j) / sum_k K(x_k, x_j)

    L = weight * mean_{j, i} p_{i|j} * log((p_{i|j} + eps) / (q_{i|j} + eps))

i.e. KL(teacher || student) per conditional distribution, averaged (not summed) over
the B^2 entries, eps = 1e-7, cosine computed as x / (||x|| + eps): exactly the authors'
code (``passalis/probabilistic_kt``, ``cosine_similarity_loss``) and CRD's copy
(RepDistiller ``distiller_zoo/PKT.py``). The paper's definition excludes k = j
(self-similarity) from the normaliser; that code, and so this method, keeps it in
(each sample's own kernel value, 1, is part of its distribution). The matrix is
symmetric, so normalising rows (as the code does) is the same as the paper's columns.

Default weight = 30000 (CRD's CIFAR-100 setting, with the mean above). No reduction
(features are flattened here; ``"pool=pool"`` uses the penultimate embedding) and no
connector: the kernel matrix is [B, B] whatever the widths. The loss is 0 when the
student's features are the teacher's up to a positive per-sample scale (up to eps).
"""

from __future__ import annotations

import torch

from kd.student_trainer.losses import register_feature


def _conditional(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x / (x.norm(dim=1, keepdim=True) + eps)
    k = (x @ x.t() + 1.0) / 2.0
    return k / k.sum(dim=1, keepdim=True)


@register_feature(
    "pkt",
    "Passalis & Tefas 2018, Learning Deep Representations with Probabilistic Knowledge Transfer (ECCV)",
    teacher_logits_shift_invariant=True,
    couples=True,
)
def pkt_loss(
    student_feats: list[torch.Tensor],
    teacher_feats: list[torch.Tensor],
    *,
    weight: float = 30000.0,
    eps: float = 1e-7,
) -> torch.Tensor:
    if not student_feats or len(student_feats) != len(teacher_feats):
        raise ValueError(f"pkt: got {len(student_feats)} student and {len(teacher_feats)} teacher features")
    total = student_feats[0].new_zeros(())
    for k, (s, t) in enumerate(zip(student_feats, teacher_feats)):
        if s.ndim < 2 or t.ndim < 2 or len(s) != len(t):
            raise ValueError(
                f"pkt: match {k}: expected batches of features [B, ...] of one size, got student "
                f"{tuple(s.shape)} and teacher {tuple(t.shape)}"
            )
        q = _conditional(s.flatten(1), eps)
        p = _conditional(t.flatten(1).to(q.dtype).detach(), eps)
        total = total + (p * torch.log((p + eps) / (q + eps))).mean()
    return weight * total
