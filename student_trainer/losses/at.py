"""``at``: Zagoruyko & Komodakis 2017, "Paying More Attention to Attention: Improving the
Performance of Convolutional Neural Networks via Attention Transfer" (ICLR 2017).

For each matched pair of maps F (student) and G (teacher) with the same spatial size,
the spatial attention map is a(F) = normalize(mean_c |F_c|^p) (flattened over H*W,
L2-normalised per sample; ``kd.core.reductions.attention``, so the server can send a(G)
instead of G as ``layer@at``). The loss, as in the authors' code
(``szagoruyko/attention-transfer`` ``utils.at_loss``, added to the loss in ``cifar.py`` as
``opt.beta * sum(loss_groups)``), RepDistiller (``Attention``, weight beta = 1000) and
mdistiller (``AT.py``, ``FEAT_WEIGHT`` = 1000):

    L = beta * sum_pairs mean_{n, hw} (a(F)_{n,hw} - a(G)_{n,hw})^2

The paper's equation writes beta / 2 times the p-norm of the difference of the normalised
vectors (not squared, not averaged); every released code, and so this method, uses beta
times the mean of the squared differences, with which the paper's beta = 1000 was run.
(Before this was checked, kd used beta / 2 here: a run with the old beta = B is this
method with beta = B / 2.)

Defaults: p = 2, beta = 1000 (the authors' CIFAR setting, ``--beta 1e+3``). The channel
counts may differ (the mean over channels removes them); the spatial sizes must agree
(mdistiller average-pools the larger map to the smaller; here a mismatch is an error).

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
    teacher_logits_shift_invariant=True,
    couples=False,
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
    return beta * total
