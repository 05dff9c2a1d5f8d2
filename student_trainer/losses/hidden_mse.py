"""``mse`` hidden-state loss for language models: TinyBERT's hidden-state distillation (Jiao et al.
2020, "TinyBERT: Distilling BERT for Natural Language Understanding", arXiv:1909.10351, sec. 3.1,
the hidden-states-based distillation eq. L_hidn = MSE(H^S W_h, H^T)).

For the student's hidden states H^S (its positions' rows) mapped by the learned W_h (the match's
connector, a linear D_s -> D_t with a bias, trained with the student) and the teacher's H^T at
each counted position p (a position whose next token is a target):

    L_hidn = mean_{p, d} ((H^S W_h)_{p,d} - H^T_{p,d})^2

an elementwise mean, as ``nn.MSELoss()`` computes it. The reference (huawei-noah
Pretrained-Language-Model ``TinyBERT/general_distill.py``) sums this over the mapped layer pairs
(teacher layer i * layers_per_block for student layer i, the embeddings' output included), weight 1
each, through one ``fit_dense`` W_h shared by every layer, averaging over every position of its
fixed-length batches (padding too). kd differs: a connector of its own per ``--feature`` pair, the
counted positions of the causal-LM loss only, and a weight per pair (default 1); the attention-score
MSE TinyBERT adds is not here.
"""

from __future__ import annotations

import torch


def hidden_mse_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``student``, ``teacher`` ``[P, D]`` -> mean over P and D of the squared difference, in float32
    or wider; 0 (with a gradient) when P = 0."""
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(f"mse: student hidden states {list(student.shape)} and teacher's "
                         f"{list(teacher.shape)} must be the same [P, D]")  # fmt: skip
    dt = torch.promote_types(student.dtype, torch.float32)
    s, t = student.to(dt), teacher.to(dt)
    if s.shape[0] == 0:
        return s.sum() * 0.0
    return (s - t).pow(2).mean()
