"""``at``: Zagoruyko & Komodakis 2017, "Paying More Attention to Attention: Improving the
Performance of Convolutional Neural Networks via Attention Transfer" (ICLR 2017).

For each matched pair of maps F (student) and G (teacher) with the same spatial size,
the spatial attention map is a(F) = normalize(mean_c |F_c|^p) (flattened over H*W,
L2-normalised per sample; ``kd.core.reductions.attention``, so the server can send a(G)
instead of G as ``layer@at``). The loss, as in the authors' code
(``szagoruyko/attention-transfer``, ``at_loss``):

    L = beta / 2 * sum_pairs mean_{n, hw} (a(F)_{n,hw} - a(G)_{n,hw})^2

Defaults: p = 2, beta = 1000 (the paper's CIFAR setting). The channel counts may
differ (the mean over channels removes them); the spatial sizes must agree.

Crowley et al. 2018, "Moonshine: Distilling with Cheap Convolutions" (NeurIPS) trains
students built from cheap grouped / bottleneck convolutions with exactly this loss:
see ``student_trainer.zoo.moonshine_*`` for those student blocks.
"""

from __future__ import annotations

import torch

from kd.student_trainer.losses import register_feature


@register_feature(
    "at",
    "Zagoruyko & Komodakis 2017, Paying More Attention to Attention (ICLR); Crowley et al. 2018, Moonshine",
    reduce="at",
)
def at_loss(
    student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor], *, beta: float = 1000.0
) -> torch.Tensor:
    total = student_feats[0].new_zeros(())
    for k, (s, t) in enumerate(zip(student_feats, teacher_feats)):
        if s.shape != t.shape:
            raise ValueError(
                f"at: match {k} has student attention {tuple(s.shape)} and teacher attention {tuple(t.shape)}; "
                "the matched maps need the same spatial size"
            )
        total = total + (s - t.to(s.dtype)).pow(2).mean()
    return beta / 2 * total
