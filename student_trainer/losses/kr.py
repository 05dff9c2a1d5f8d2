"""``kr``: Junjie Liu, Dongchao Wen, Hongxing Gao, Wei Tao, Tse-Wei Chen, Kinya Osa, Masami Kato
2019, "Knowledge Representing: Efficient, Sparse Representation of Prior Knowledge for
Knowledge Distillation" (arXiv 1911.05329).

The paper represents the teacher's knowledge through a *representing module* that aggregates
the teacher's features into a more abstract, sparse code, and trains the student to match that
code under a sparse-recoding penalty. The closest faithful version this trainer can run:

    z_t = ReLU(E(T))                       sparse code of the teacher map (E: 1x1 conv, K = C_t)
    T^  = D(z_t)                           reconstruction of the teacher map (D: 1x1 conv)
    z_s = A(S)                             student adapter (1x1 conv + BN, resized to T's size)
    L   = sum_k [ weight * mean (z_s - sg(z_t))^2            student matches the code
                + recon_weight * mean (T^ - T)^2            the code represents T
                + sparsity * mean |z_t| ]                    L1 penalty: a sparse code

sg = stop-gradient: the representing module (E, D) is trained by reconstruction and sparsity
only, as if it were fitted to the teacher first, and the student chases its code. All three
modules live in one connector (``takes_teacher = True``: it gets the student map and the
teacher's full map, ``reduce=None``) and are trained and saved with the student.

Assumptions (the full text was not available to check the details; everything above beyond
"a sparse representation of the teacher's features that the student matches" is ours):
- The representing module is a one-layer sparse auto-encoder on one teacher layer with K = C_t
  code channels; the paper's aggregation over the teacher's parameter distribution / several
  layers is not reproduced.
- The "sparse recoding penalty" is read as an L1 penalty on the code (the brief's reading);
  the paper's penalised-gradient mechanism for the student is not reproduced.
- Defaults weight = 1, recon_weight = 1, sparsity = 0.01 are our choices, not the paper's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.student_trainer.features import ConvBN
from kd.student_trainer.losses import register_feature


class KnowledgeRepresenting(nn.Module):
    """``forward(student_map, teacher_map) -> (z_s, z_t, reconstruction of teacher_map)``."""

    takes_teacher = True

    def __init__(self, c_student: int, c_teacher: int, size: tuple[int, int], code: int | None = None) -> None:
        super().__init__()
        k = c_teacher if code is None else code
        self.adapter = ConvBN(c_student, k, size)
        self.encoder = nn.Conv2d(c_teacher, k, 1)
        self.decoder = nn.Conv2d(k, c_teacher, 1)

    def forward(
        self, s: torch.Tensor, t: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        zs = self.adapter(s)
        if t is None:
            return zs, None, None
        if t.ndim != 4 or t.shape[1] != self.encoder.in_channels:
            raise ValueError(
                f"kr: the representing module expects a teacher map [N, {self.encoder.in_channels}, H, W], "
                f"got {tuple(t.shape)}"
            )
        # clone: a source may hand out inference-mode tensors, which autograd cannot save.
        zt = F.relu(self.encoder(t.to(self.encoder.weight.dtype).clone()))
        return zs, zt, self.decoder(zt)


def kr_connector(s: tuple[int, ...], t: tuple[int, ...]) -> nn.Module:
    if len(s) != 3 or len(t) != 3:
        raise ValueError(f"kr represents [C, H, W] feature maps, got student {list(s)} and teacher {list(t)}")
    return KnowledgeRepresenting(s[0], t[0], (t[1], t[2]))


@register_feature(
    "kr",
    "Liu et al. 2019, Knowledge Representing: Efficient, Sparse Representation of Prior Knowledge for KD",
    connector=kr_connector,
    teacher_logits_shift_invariant=True,
    couples=False,
)
def kr_loss(
    student_feats: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    teacher_feats: list[torch.Tensor],
    *,
    weight: float = 1.0,
    recon_weight: float = 1.0,
    sparsity: float = 0.01,
) -> torch.Tensor:
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(f"kr: {len(student_feats)} student and {len(teacher_feats)} teacher features")
    total: torch.Tensor | None = None
    for k, (out, t) in enumerate(zip(student_feats, teacher_feats)):
        if not isinstance(out, (tuple, list)) or len(out) != 3 or out[1] is None:
            raise ValueError(f"kr: match {k} needs (z_s, z_t, reconstruction) from the kr connector, got {type(out)}")
        zs, zt, rec = out
        if zs.shape != zt.shape:
            raise ValueError(f"kr: match {k}: student code {tuple(zs.shape)} != teacher code {tuple(zt.shape)}")
        if rec.shape != t.shape:
            raise ValueError(f"kr: match {k}: reconstruction {tuple(rec.shape)} != teacher map {tuple(t.shape)}")
        term = (
            weight * (zs - zt.detach()).pow(2).mean()
            + recon_weight * (rec - t.to(rec.dtype)).pow(2).mean()
            + sparsity * zt.abs().mean()
        )
        total = term if total is None else total + term
    assert total is not None
    return total
