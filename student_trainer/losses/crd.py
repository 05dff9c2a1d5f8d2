"""``crd``: Tian, Krishnan, Isola 2019, "Contrastive Representation Distillation" (ICLR 2020;
arXiv 1910.10699; authors' code HobbitLong/RepDistiller ``crd/``; mdistiller ``distillers/CRD.py``).

CRD maximises a lower bound on the mutual information between the teacher's and the student's
representations with noise-contrastive estimation (NCE) against a memory bank. Both sides'
penultimate features (e.g. DigitsCNN's ``pool``: ``--match pool=pool``) are embedded by a
linear map each and L2-normalised, v_s = e_s(f_s) / ||e_s(f_s)||, v_t likewise (d = 128). A
memory bank holds, for every training sample i, one student and one teacher embedding,
m_s[i] and m_t[i]. For a sample i of the batch, with j_0 = i its positive and j_1..j_K its K
negatives (samples of other classes):

    P_s[i, k] = exp(<m_t[j_k], v_s[i]> / tau) / Z_s        (the student against the teacher bank)
    P_t[i, k] = exp(<m_s[j_k], v_t[i]> / tau) / Z_t        (the teacher against the student bank)
    NCE(P)    = -(1/B) sum_i [ log(P[i,0] / (P[i,0] + K/N + eps))
                             + sum_{k>=1} log((K/N) / (P[i,k] + K/N + eps)) ]          eps = 1e-7
    L         = weight * (NCE(P_s) + NCE(P_t))

Z_s and Z_t are fixed at the first step as N times the mean of that step's exp(./tau); N is
the number of training samples. After each step the bank moves towards the batch's
embeddings, m[i] <- normalise(momentum * m[i] + (1 - momentum) * v[i]) (no gradient). The
bank starts uniform in [-1/sqrt(d/3), 1/sqrt(d/3)]. The embeddings and the bank are the
connector (``CRDConnector``), trained and checkpointed with the student; the bank is sized by
the training set through the trainer's ``bind`` and indexed by the batch's dataset indices
(the loss declares ``indices``).

Defaults: weight = 0.8, CE weight 1 (RepDistiller ``-a 0 -b 0.8``, mdistiller
``CRD.LOSS.FEAT_WEIGHT``), K = 16384 (``nce_k``), tau = 0.07, momentum = 0.5, d = 128
(``feat_dim``), mode "exact". All checked against mdistiller's ``ContrastMemory`` /
``ContrastLoss`` and RepDistiller's ``CIFAR100InstanceSample``.

Negatives, as RepDistiller's sampled datasets draw them: K indices from the samples of other
classes, without replacement when there are at least K of them, else with replacement. Mode
"exact" takes the sample itself as its positive; "relax" a random sample of its own class
(the bank is still updated at the sample itself).

Where kd differs: the references draw the negatives in the data loader (numpy's RNG); kd draws
them in the loss with torch's RNG (seeded, saved in checkpoints), and only among the samples
being trained on (``subset``), so a run on part of a dataset never contrasts against bank
rows that are never updated; N is then the subset's size. The positive's class is the sample's
label from the training set, not the batch (they are the same).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kd.student_trainer.losses import register_feature

FEAT_DIM = 128
NCE_EPS = 1e-7


class CRDFeatures(NamedTuple):
    student: torch.Tensor  # v_s [B, d], normalised
    teacher: torch.Tensor | None  # v_t [B, d], normalised (None without a teacher feature)
    bank: CRDConnector


class CRDConnector(nn.Module):
    """The two embeddings and the memory bank (buffers ``memory_s``, ``memory_t``, ``z``)."""

    takes_teacher = True

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], feat_dim: int = FEAT_DIM):
        super().__init__()
        self.feat_dim = feat_dim
        self.embed_s = nn.Linear(math.prod(student_shape), feat_dim)
        self.embed_t = nn.Linear(math.prod(teacher_shape), feat_dim)
        self.bound = False

    def bind(self, *, labels: torch.Tensor, subset: torch.Tensor | None = None, **_: object) -> None:
        """Allocate the bank for a training set with these labels (the trainer calls this once)."""
        labels = torch.as_tensor(labels).long().cpu()
        subset = torch.arange(len(labels)) if subset is None else torch.as_tensor(subset).long().cpu()
        if len(subset) < 2 or len(torch.unique(labels[subset])) < 2:
            raise ValueError("crd contrasts samples of other classes: it needs a training set with at least 2 classes")
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        n = len(labels)
        self.register_buffer("memory_s", torch.rand(n, self.feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_t", torch.rand(n, self.feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("z", torch.full((2,), -1.0))  # Z_s, Z_t; < 0: not set yet
        self.register_buffer("labels", labels)
        self.register_buffer("members", subset)  # the samples negatives are drawn from
        self.bound = True

    @property
    def num_samples(self) -> int:
        return len(self.members)

    def forward(self, s: torch.Tensor, t: torch.Tensor | None) -> CRDFeatures:
        v_s = F.normalize(self.embed_s(s.flatten(1)), dim=1)
        v_t = None if t is None else F.normalize(self.embed_t(t.detach().flatten(1).to(s.dtype)), dim=1)
        return CRDFeatures(v_s, v_t, self)

    def contrast_indices(self, indices: torch.Tensor, k: int, mode: str) -> torch.Tensor:
        """[B, 1 + K]: each sample's positive, then K samples of other classes (RepDistiller's draw)."""
        idx = indices.detach().cpu().long()
        member_labels = self.labels[self.members].cpu()
        members = self.members.cpu()
        out = torch.empty(len(idx), k + 1, dtype=torch.long)
        labels = self.labels.cpu()[idx]
        for c in torch.unique(labels).tolist():
            rows = (labels == c).nonzero().flatten()
            negatives = members[member_labels != c]
            if len(negatives) == 0:
                raise ValueError(f"crd: class {c} has no samples of other classes to contrast with")
            if k <= len(negatives):
                pick = torch.rand(len(rows), len(negatives)).argsort(dim=1)[:, :k]
            else:
                pick = torch.randint(len(negatives), (len(rows), k))
            out[rows, 1:] = negatives[pick]
            if mode == "relax":
                positives = members[member_labels == c]
                out[rows, 0] = positives[torch.randint(len(positives), (len(rows),))]
            else:
                out[rows, 0] = idx[rows]
        return out.to(indices.device)

    def scores(self, f: CRDFeatures, indices: torch.Tensor, contrast: torch.Tensor,
               temperature: float, momentum: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(P_s, P_t), each [B, 1 + K]; then the bank moves towards this batch's embeddings."""
        if f.teacher is None:
            raise ValueError("crd: the connector got no teacher feature")
        dt = self.memory_s.dtype
        v_s, v_t = f.student.to(dt), f.teacher.to(dt)
        w_t = self.memory_t[contrast].detach()  # [B, 1 + K, d]
        w_s = self.memory_s[contrast].detach()
        p_s = torch.exp(torch.einsum("bkd,bd->bk", w_t, v_s) / temperature)
        p_t = torch.exp(torch.einsum("bkd,bd->bk", w_s, v_t) / temperature)
        with torch.no_grad():
            if self.z[0] < 0:
                self.z[0] = p_s.mean() * self.num_samples
            if self.z[1] < 0:
                self.z[1] = p_t.mean() * self.num_samples
        p_s, p_t = p_s / self.z[0], p_t / self.z[1]
        with torch.no_grad():
            for memory, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
                moved = memory[indices] * momentum + v.detach() * (1.0 - momentum)
                memory.index_copy_(0, indices, F.normalize(moved, dim=1))
        return p_s, p_t


def crd_connector(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    return CRDConnector(student_shape, teacher_shape)


def nce_loss(p: torch.Tensor, num_samples: int) -> torch.Tensor:
    """mdistiller's / RepDistiller's ``ContrastLoss`` on [B, 1 + K] scores (column 0: the positive)."""
    k = p.shape[1] - 1
    noise = k / float(num_samples)
    log_d1 = torch.log(p[:, 0] / (p[:, 0] + noise + NCE_EPS))
    log_d0 = torch.log(noise / (p[:, 1:] + noise + NCE_EPS))
    return -(log_d1.sum() + log_d0.sum()) / p.shape[0]


@register_feature(
    "crd",
    "Tian, Krishnan, Isola 2019, Contrastive Representation Distillation (ICLR 2020, arXiv 1910.10699)",
    connector=crd_connector,
    teacher_logits_shift_invariant=True,
    couples=True,
)
def crd_loss(
    student_feats: list[CRDFeatures],
    teacher_feats: list[torch.Tensor],
    *,
    indices: torch.Tensor,
    weight: float = 0.8,
    nce_k: int = 16384,
    temperature: float = 0.07,
    momentum: float = 0.5,
    mode: str = "exact",
) -> torch.Tensor:
    if mode not in ("exact", "relax"):
        raise ValueError(f"crd: mode must be 'exact' or 'relax', got {mode!r}")
    if nce_k < 1:
        raise ValueError(f"crd: nce_k must be >= 1, got {nce_k}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"crd: momentum must be in [0, 1], got {momentum}")
    if not student_feats or len(student_feats) != len(teacher_feats):
        raise ValueError(f"crd: got {len(student_feats)} student and {len(teacher_feats)} teacher features")
    terms = []
    for k, f in enumerate(student_feats):
        if not isinstance(f, CRDFeatures):
            raise ValueError(f"crd: match {k}: expected the CRD connector's embeddings, got {type(f).__name__}")
        if not f.bank.bound:
            raise ValueError("crd: the memory bank is not bound to a training set (the trainer binds it)")
        idx = indices.to(f.bank.memory_s.device).long()
        contrast = f.bank.contrast_indices(idx, int(nce_k), mode)
        p_s, p_t = f.bank.scores(f, idx, contrast, temperature, momentum)
        terms.append(nce_loss(p_s, f.bank.num_samples) + nce_loss(p_t, f.bank.num_samples))
    return weight * torch.stack(terms).sum().to(student_feats[0].student.dtype)
