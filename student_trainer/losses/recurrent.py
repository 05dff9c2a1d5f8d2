"""``recurrent``: Pintea, Liu, van Gemert 2018, "Recurrent Knowledge Distillation" (ICIP 2018;
arXiv 1805.07170).

The paper shrinks the student further by "recasting multiple residual layers in the teacher
network into a single recurrent student layer": a stack of K residual blocks of a teacher
stage becomes one student block whose weights are shared over K unrolled steps,

    x_{k+1} = x_k + f(x_k),  k = 0 .. K-1     (one f, applied K times)

and the student is trained by knowledge distillation from the teacher.

Distillation term (what the loss computes): attention transfer (Zagoruyko & Komodakis
2017) between each matched student map S and teacher map T,

    a(F) = normalize(mean_c F_c^2)   (flattened over H*W, L2 per sample; ``kd.core.reductions``)
    L    = beta * sum_matches mean_{n, hw} (a(S) - a(T))^2      (as ``at``: the authors' AT code,
                                                              RepDistiller and mdistiller)

so the teacher's side travels as ``layer@at``. Matches are the outputs of the recurrent
stage and of the teacher stage it replaces (the end of a residual group, as in AT), and
optionally each unrolled step with the teacher block it recasts: ``RecurrentResidual``
below exposes step k's output as the submodule ``steps.k`` so ``--match
rec.steps.0=layer2.0 --match rec.steps.1=layer2.1`` works with the ordinary hooks (a hook on
the shared block itself would only keep its last call). The Hinton KD term is the common
``kd_weight`` option (AT's own experiments combine AT with KD).

Assumptions (say so when citing): only the abstract was retrievable through the search
tool. We assumed the distillation term of the attention-transfer codebase the paper's
set-up follows (WRN teachers on CIFAR-10 / Scenes, the datasets of Zagoruyko & Komodakis),
with AT's defaults p = 2, beta = 1000; the per-step matching is offered, not claimed.
Of the paper's three recurrent variants, ``RecurrentResidual`` implements the plain one
(shared f, residual update) with an optional BN per step (``step_norm``) as an option.
"""

from __future__ import annotations

import torch
from torch import nn

from kd.student_trainer.losses import register_feature


class RecurrentResidual(nn.Module):
    """One residual block ``block`` unrolled ``steps`` times with shared weights:
    x <- x + block(x); step k's output passes through ``self.steps[k]`` (an identity), so a
    forward hook can tap every step by name. ``step_norm`` adds a BN per step (unshared)."""

    def __init__(self, block: nn.Module, steps: int, *, step_norm: int = 0) -> None:
        super().__init__()
        if steps < 1:
            raise ValueError(f"RecurrentResidual needs steps >= 1, got {steps}")
        self.block = block
        self.steps = nn.ModuleList(nn.Identity() for _ in range(steps))
        self.norms = nn.ModuleList(nn.BatchNorm2d(step_norm) for _ in range(steps)) if step_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k, tap in enumerate(self.steps):
            y = self.block(x)
            if self.norms is not None:
                y = self.norms[k](y)
            x = tap(x + y)
        return x


@register_feature(
    "recurrent",
    "Pintea, Liu & van Gemert 2018, Recurrent Knowledge Distillation (ICIP)",
    reduce="at",
    teacher_logits_shift_invariant=True,
    couples=False,
)
def recurrent_loss(
    student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor], *, beta: float = 1000.0
) -> torch.Tensor:
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(f"recurrent: {len(student_feats)} student and {len(teacher_feats)} teacher features")
    terms = []
    for k, (s, t) in enumerate(zip(student_feats, teacher_feats)):
        if s.shape != t.shape:
            raise ValueError(
                f"recurrent: match {k} has student attention {tuple(s.shape)} and teacher attention "
                f"{tuple(t.shape)}; the matched maps need the same spatial size"
            )
        terms.append((s - t.to(s.dtype)).pow(2).mean())
    return beta * torch.stack(terms).sum()
