"""``fsp``: Yim, Joo, Bae, Kim 2017, "A Gift from Knowledge Distillation: Fast Optimization,
Network Minimization and Transfer Learning" (CVPR 2017).

The "flow of solution procedure" between two layers of one network is the Gram
matrix of their maps, F1 [C1, H, W] and F2 [C2, H, W] at the same spatial size:

    G(F1, F2)[i, j] = sum_{h, w} F1[i, h, w] * F2[j, h, w] / (H * W)         ([C1, C2])

(``kd.core.reductions.fsp_matrix``: the larger map is average-pooled to the smaller's size
first, as CRD's ``FSP`` does; the server computes G for the teacher as ``L1@fsp:L2``
so only the [C1, C2] matrix travels.) A match names two layers per side,
``"s1,s2=t1,t2"``, and compares G_s = G(s1, s2) with G_t = G(t1, t2) entry by entry, so
the matrices need the teacher's channel counts (C1 of s1 = C1 of t1, C2 of s2 = C2 of t2).
The paper's students have the teacher's widths (shallower ResNets of the same widths);
there the connector is the identity. For a narrower student each of its two layers
goes through its own 1x1 conv + BN to the teacher layer's width first (connector
"auto", one per layer; an adaptation, trained with the student). The loss raises a
ValueError naming both shapes if the matrices still differ.

Loss, summed over matches (pairs of layer pairs):

    L = weight * sum_pairs mean_{n, i, j} (G_s[n, i, j] - G_t[n, i, j])^2

The paper writes L_FSP = 1/N sum_x sum_i lambda_i ||G_i^T(x) - G_i^S(x)||_2^2, i.e. the
squared Frobenius norm summed over entries with a weight lambda_i per pair (the same for
every pair). We use CRD's convention (RepDistiller ``distiller_zoo/FSP.py``: the mean
over entries and samples): per pair this is the paper's term divided by C1 * C2, so
lambda_i = weight / (C1 * C2).

Stages: the paper trains in two stages (FSP alone, then the task loss), and so does
RepDistiller: ``helper/pretrain.py`` first trains the student's feature modules on the sum
of the FSP terms alone (weight 1, ``--init_epochs`` 30), then its main stage trains with CE
(and KD if asked) and *no* FSP term (``loss_kd = 0`` for fsp in ``helper/loops.py``; the
``-b 50`` its script passes has no effect). kd trains the FSP term jointly with CE
(``ce_weight``) and optionally KD (``kd_weight``), an adaptation; its default weight = 50 is
kd's own choice for that joint objective, not a reference setting. RepDistiller's recipe
here: ``--opt weight=1 --opt ce_weight=0`` for the first stage, then ``--method ce`` (or
``kd``) from that student (kd trains the whole student in the first stage, RepDistiller
only its feature modules, i.e. all but the classifier).
"""

from __future__ import annotations

import torch

from kd.student_trainer.losses import register_feature


@register_feature(
    "fsp",
    "Yim, Joo, Bae, Kim 2017, A Gift from Knowledge Distillation: Fast Optimization, "
    "Network Minimization and Transfer Learning (CVPR)",
    reduce="fsp:{1}",
    layers=2,
    # Identity when a student layer has the teacher's width (the paper's setting); else a 1x1 conv + BN
    # per layer, so students narrower than their teacher can be matched (an adaptation).
    connector="auto",
    teacher_logits_shift_invariant=True,
    couples=False,
)
def fsp_loss(
    student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor], *, weight: float = 50.0
) -> torch.Tensor:
    if not student_feats or len(student_feats) != len(teacher_feats):
        raise ValueError(f"fsp: got {len(student_feats)} student and {len(teacher_feats)} teacher FSP matrices")
    total = student_feats[0].new_zeros(())
    for k, (s, t) in enumerate(zip(student_feats, teacher_feats)):
        if s.ndim != 3 or t.ndim != 3:
            raise ValueError(
                f"fsp: match {k}: expected FSP matrices [N, C1, C2], got student {tuple(s.shape)} "
                f"and teacher {tuple(t.shape)}"
            )
        if s.shape != t.shape:
            raise ValueError(
                f"fsp: match {k}: student FSP matrix {list(s.shape[1:])} != teacher {list(t.shape[1:])} "
                f"(batch {s.shape[0]} vs {t.shape[0]}); FSP compares the matrices entry by entry, so each "
                "student layer needs the channel count of the teacher layer it is matched with"
            )
        total = total + (s - t.to(s.dtype)).pow(2).mean()
    return weight * total
