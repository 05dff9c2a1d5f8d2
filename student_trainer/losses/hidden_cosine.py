"""``cosine`` hidden-state loss for language models: DistilBERT's "cosine embedding loss" (Sanh,
Debut, Chaumond, Wolf 2019, "DistilBERT, a distilled version of BERT", arXiv:1910.01108, sec. 3).

For the student's hidden state h_s (through the match's connector) and the teacher's h_t at each
counted position p (a position whose next token is a target: padding and prompts are out):

    L_cos = mean_p (1 - h_s,p . h_t,p / (||h_s,p|| ||h_t,p||))

as ``nn.CosineEmbeddingLoss`` with target 1 and reduction "mean" computes it (with its eps: 1e-12
added to each squared norm). The reference
(huggingface/transformers ``examples/research_projects/distillation/distiller.py``, ``alpha_cos``)
applies it to the last layer's hidden states only, at every position of the attention mask, with
no projection (teacher and student of one width), weight ``alpha_cos`` (its training command: 1.0,
next to ``alpha_ce`` 5.0 and ``alpha_mlm`` 2.0). kd differs in three places: any layer pairs
(``--feature STUDENT=TEACHER``), the counted positions of the causal-LM loss (the logits' ones)
instead of every real position, and a linear connector where the widths differ. Default weight 1.
"""

from __future__ import annotations

import torch


def hidden_cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``student``, ``teacher`` ``[P, D]`` (P counted positions) -> mean over P of 1 - cos, in float32 or
    wider; 0 (with a gradient) when P = 0."""
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(f"cosine: student hidden states {list(student.shape)} and teacher's "
                         f"{list(teacher.shape)} must be the same [P, D]")  # fmt: skip
    dt = torch.promote_types(student.dtype, torch.float32)
    s, t = student.to(dt), teacher.to(dt)
    if s.shape[0] == 0:
        return s.sum() * 0.0
    eps = 1e-12  # as CosineEmbeddingLoss: on the squared norms, so a zero vector gives cos 0, not NaN
    cos = (s * t).sum(-1) / torch.sqrt((s.pow(2).sum(-1) + eps) * (t.pow(2).sum(-1) + eps))
    return (1.0 - cos).mean()
