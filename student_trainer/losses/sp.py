"""``sp``: Tung & Mori 2019, "Similarity-Preserving Knowledge Distillation" (ICCV 2019).

For a batch of b samples and a matched layer, Q = the map flattened per sample
([b, C*H*W]); the similarity matrix is G = normalize_rows(Q Q^T) ([b, b], each row
L2-normalised; ``kd.core.reductions.similarity``, so the server sends G_t as ``layer@sp``,
computed over the samples of each request). Teacher and student may have any shapes:
only the batch has to be the same. Loss, summed over the matched pairs:

    L = gamma / b^2 * sum_pairs ||G_s - G_t||_F^2

exactly the paper's L_SP and the official-code-equivalent CRD implementation
(RepDistiller ``distiller_zoo/SP.py``: ``(G_s - G_t)^2`` summed, divided by b^2).
Default gamma = 3000 (the paper's CIFAR-10 setting; CRD uses 3000 on CIFAR-100).

G is scale-invariant (multiplying every sample's features by one positive constant
leaves it unchanged). Because G relates the samples of one request, the teacher's G must
come from the same batch the student sees (a server computes it per request; a cache
cannot store it); a shape mismatch raises a ValueError naming both sizes.
"""

from __future__ import annotations

import torch

from kd.student_trainer.losses import register_feature


@register_feature(
    "sp",
    "Tung & Mori 2019, Similarity-Preserving Knowledge Distillation (ICCV)",
    reduce="sp",
    teacher_logits_shift_invariant=True,
    couples=True,
)
def sp_loss(
    student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor], *, gamma: float = 3000.0
) -> torch.Tensor:
    if not student_feats or len(student_feats) != len(teacher_feats):
        raise ValueError(f"sp: got {len(student_feats)} student and {len(teacher_feats)} teacher similarity matrices")
    total = student_feats[0].new_zeros(())
    for k, (s, t) in enumerate(zip(student_feats, teacher_feats)):
        if s.ndim != 2 or s.shape[0] != s.shape[1]:
            raise ValueError(f"sp: match {k}: expected a [b, b] similarity matrix, got student {tuple(s.shape)}")
        if s.shape != t.shape:
            raise ValueError(
                f"sp: match {k}: student similarity {tuple(s.shape)} != teacher similarity {tuple(t.shape)}; "
                "the teacher's matrix must be computed over the same batch as the student's"
            )
        b = s.shape[0]
        total = total + (s - t.to(s.dtype)).pow(2).sum() / b**2
    return gamma * total
