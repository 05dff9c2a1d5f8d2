"""``nst``: Huang & Wang 2017, "Like What You Like: Knowledge Distill via Neuron Selectivity
Transfer" (arXiv:1707.01219).

Each channel of a map F [C, H, W] is one sample of a distribution over R^{HW}: its
spatial "selectivity pattern" f_i = F_i / ||F_i|| (flattened, L2-normalised over H*W).
NST matches the teacher's and the student's distributions with the squared Maximum
Mean Discrepancy, here with the polynomial kernel k(x, y) = (x^T y + c)^d, d = 2, c = 0
(the paper's best-performing kernel on CIFAR/ImageNet):

    MMD^2 = 1/C_t^2 sum_{i,i'} k(t_i, t_i') + 1/C_s^2 sum_{j,j'} k(s_j, s_j') - 2/(C_s C_t) sum_{i,j} k(t_i, s_j)

Reduced form (what is computed). For unit vectors x, y: (x^T y)^2 = <x x^T, y y^T>_F
(the Frobenius inner product of the rank-one [HW, HW] matrices). With the spatial Gram
matrix G = (1/C) sum_i f_i f_i^T = f^T f / C ([HW, HW], f = [C, HW], ``kd.core.reductions``
``nst``, so the server sends G_t as ``layer@nst``):

    1/C_t^2 sum_{i,i'} k(t_i, t_i') = <G_t, G_t>_F,   1/C_s^2 sum_{j,j'} k(s_j, s_j') = <G_s, G_s>_F,
    1/(C_s C_t) sum_{i,j} k(t_i, s_j) = <G_t, G_s>_F

(each by bilinearity of <., .>_F), hence MMD^2 = ||G_s||^2 + ||G_t||^2 - 2 <G_s, G_t> =
||G_s - G_t||_F^2 exactly. The channel counts may differ (they only enter through the
1/C averages); the spatial sizes must agree (G is [HW, HW]). A test checks the identity
against the kernel definition in float64.

Loss, per sample, averaged over the batch, summed over matches:

    L = lam / 2 * sum_pairs mean_n ||G_s[n] - G_t[n]||_F^2

The paper's objective is H(y, p_S) + lam/2 * L_MMD^2 with lam = 50 for the polynomial
kernel (as stated in the task brief; not re-checked against the paper's text here). CRD
(RepDistiller ``distiller_zoo/NST.py``) computes the same per-sample MMD^2 (means over
[N, C, C] kernel values) and multiplies it by beta = 50 without the 1/2, i.e. lam = 100
here; CRD also average-pools the larger map to the smaller's size, which this
reduction does not (mismatched spatial sizes raise a ValueError).
"""

from __future__ import annotations

import torch

from kd.student_trainer.losses import register_feature


@register_feature(
    "nst",
    "Huang & Wang 2017, Like What You Like: Knowledge Distill via Neuron Selectivity Transfer",
    reduce="nst",
    teacher_logits_shift_invariant=True,
    couples=False,
)
def nst_loss(
    student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor], *, lam: float = 50.0
) -> torch.Tensor:
    if not student_feats or len(student_feats) != len(teacher_feats):
        raise ValueError(f"nst: got {len(student_feats)} student and {len(teacher_feats)} teacher Gram matrices")
    total = student_feats[0].new_zeros(())
    for k, (s, t) in enumerate(zip(student_feats, teacher_feats)):
        if s.ndim != 3 or t.ndim != 3 or s.shape[1] != s.shape[2]:
            raise ValueError(
                f"nst: match {k}: expected spatial Gram matrices [N, HW, HW], got student {tuple(s.shape)} "
                f"and teacher {tuple(t.shape)}"
            )
        if s.shape != t.shape:
            raise ValueError(
                f"nst: match {k}: student Gram {tuple(s.shape)} != teacher Gram {tuple(t.shape)}; "
                "the matched maps need the same spatial size H*W (and the same batch)"
            )
        total = total + (s - t.to(s.dtype)).pow(2).sum(dim=(1, 2)).mean()
    return lam / 2 * total
