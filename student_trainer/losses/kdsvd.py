"""``kdsvd``: Lee, Kim, Song 2018, "Self-supervised Knowledge Distillation Using Singular Value
Decomposition" (ECCV 2018; authors' TensorFlow code sseung0703/SSKD_SVD; RepDistiller
``distiller_zoo/KDSVD.py``, mdistiller ``distillers/KDSVD.py``).

Each matched map F [C, H, W] is read as a matrix X = [H*W, C] and decomposed, X = U S V^T. The
leading right singular vectors (columns of V, C-dimensional) summarise the map; the student
keeps k + 3 of them, the teacher k, and each teacher vector v_t,j is paired with the student
vector of largest |cosine|, its sign flipped to agree (``align_rsv``). Both are scaled by the
teacher's leading singular values normalised to unit length, s_t[:k] / ||s_t[:k]||. What is
transferred is the *relation between consecutive matches* i - 1 and i, a Gaussian kernel on
every pair of coordinates of the paired vectors:

    R_i[n, a, b, j] = exp( -(v_i[n, a, j] - v_{i-1}[n, b, j])^2 / 8 )      (a < C_i, b < C_{i-1}, j < k)
    L = weight * sum_{i >= 1} (1/N) sum_{n, a, b, j} (R_i^s - R_i^t)^2

(non-finite entries of the squared difference are dropped, as in both libraries). Defaults:
k = 1, weight = 1 (mdistiller ``KDSVD.K`` and ``FEAT_WEIGHT``). Matches are listed shallow to
deep and need at least two; each student map must have its teacher map's channel count, so a
narrower student goes through the ``auto`` connector (1x1 conv + BN to the teacher's width; an
adaptation: RepDistiller's pairs share widths).

References disagree on the matrix: RepDistiller (and the authors' code) decompose [H*W, C]
(``view(-1, C, H*W).transpose``), so V lives in channel space, as the paper describes;
mdistiller decomposes [C*H, W] (``view(N, C*H, W)``), so its V is W-dimensional. kd follows
RepDistiller and the paper. The teacher's side is detached. The SVD's gradient is undefined
where singular values repeat (PyTorch then gives non-finite gradients); both libraries share
this.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.student_trainer.losses import register_feature


class _SafeSVD(torch.autograd.Function):
    """Thin SVD x = U S V^T returning (S, V), with the textbook gradient made finite.

    For gradients reaching V and S only (U unused), with F_ij = 1 / (s_j^2 - s_i^2), i != j:

        dx = U (diag(dS) + S (F * (V^T dV - dV^T V))) V^T + U S^-1 dV^T (I - V V^T)

    PyTorch's own backward is this formula, infinite where two singular values coincide and
    where one is 0. Here |s_j^2 - s_i^2| is kept >= 1e-6 s_max^2 and s >= 1e-6 s_max (the usual
    remedy, as the authors' TensorFlow code guards its SVD gradient): the gradient is exact
    wherever the singular values are well separated, and bounded where they are not."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        v = vh.transpose(-2, -1)
        ctx.save_for_backward(u, s, v)
        return s, v

    @staticmethod
    def backward(ctx, ds: torch.Tensor, dv: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        u, s, v = ctx.saved_tensors
        top = s.amax(dim=-1, keepdim=True).clamp_min(1e-30)
        s2 = s.pow(2)
        diff = s2.unsqueeze(-2) - s2.unsqueeze(-1)  # [i, j] = s_j^2 - s_i^2
        eps = 1e-6 * top.unsqueeze(-1).pow(2)
        sign = torch.where(diff >= 0, torch.ones_like(diff), -torch.ones_like(diff))
        f = 1.0 / torch.where(diff.abs() < eps, sign * eps, diff)
        f = f * (1.0 - torch.eye(s.shape[-1], dtype=s.dtype, device=s.device))
        vt_dv = v.transpose(-2, -1) @ dv
        inner = torch.diag_embed(ds) + s.unsqueeze(-1) * (f * (vt_dv - vt_dv.transpose(-2, -1)))
        dx = u @ inner @ v.transpose(-2, -1)
        if v.shape[-2] > v.shape[-1]:  # x has fewer rows than columns: V is not square
            s_inv = 1.0 / torch.maximum(s, 1e-6 * top)
            proj = torch.eye(v.shape[-2], dtype=v.dtype, device=v.device) - v @ v.transpose(-2, -1)
            dx = dx + (u * s_inv.unsqueeze(-2)) @ dv.transpose(-2, -1) @ proj
        return dx


def right_singular(feat: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(V[:, :, :n] columns unit-normalised [N, C, n], S[:, :n] normalised to unit length [N, n])."""
    x = feat.flatten(2).transpose(1, 2)  # [N, H*W, C]
    s, v = _SafeSVD.apply(x)
    v = torch.where(torch.isfinite(v), v, torch.zeros_like(v))
    s = torch.where(torch.isfinite(s), s, torch.zeros_like(s))
    return F.normalize(v[:, :, :n], dim=1), F.normalize(s[:, :n], dim=1)


def align(v_s: torch.Tensor, v_t: torch.Tensor) -> torch.Tensor:
    """For each teacher vector, the student vector of largest |cosine|, with the cosine's sign."""
    cosine = v_s.transpose(1, 2) @ v_t  # [N, k + 3, k]
    best = cosine.abs().amax(dim=1, keepdim=True)
    mask = torch.where(cosine.abs() == best, torch.sign(cosine), torch.zeros_like(cosine))
    return v_s @ mask


@register_feature(
    "kdsvd",
    "Lee, Kim, Song 2018, Self-supervised Knowledge Distillation Using Singular Value Decomposition (ECCV)",
    connector="auto",
    teacher_logits_shift_invariant=True,
    couples=False,
)
def kdsvd_loss(
    student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor], *, weight: float = 1.0, k: int = 1
) -> torch.Tensor:
    if k < 1:
        raise ValueError(f"kdsvd: k must be >= 1, got {k}")
    if len(student_feats) < 2 or len(student_feats) != len(teacher_feats):
        raise ValueError(
            f"kdsvd relates consecutive matches: give at least 2 (got {len(student_feats)} student and "
            f"{len(teacher_feats)} teacher maps)"
        )
    total = student_feats[0].new_zeros(())
    prev_s = prev_t = None
    for i, (fs, ft) in enumerate(zip(student_feats, teacher_feats)):
        if fs.ndim != 4 or fs.shape[:2] != ft.shape[:2]:
            raise ValueError(
                f"kdsvd: match {i}: student map {tuple(fs.shape)} and teacher map {tuple(ft.shape)} need the same "
                "batch and channel count ([N, C, H, W]); the auto connector maps the student's channels"
            )
        v_t, s_t = right_singular(ft.detach().to(fs.dtype), k)
        v_s, _ = right_singular(fs, k + 3)
        v_s = align(v_s, v_t)
        v_t = v_t * s_t.unsqueeze(1)
        v_s = v_s * s_t.unsqueeze(1)
        if i > 0:
            rbf_s = torch.exp(-(v_s.unsqueeze(2) - prev_s.unsqueeze(1)).pow(2) / 8)
            rbf_t = torch.exp(-(v_t.unsqueeze(2) - prev_t.unsqueeze(1)).pow(2) / 8)
            sq = (rbf_s - rbf_t).pow(2)
            sq = torch.where(torch.isfinite(sq), sq, torch.zeros_like(sq))
            total = total + sq.sum() / len(fs)
        prev_s, prev_t = v_s, v_t
    return weight * total
