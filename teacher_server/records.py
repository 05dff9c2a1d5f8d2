"""Activation records (Lopes, Fenu, Starner 2017): statistics of a teacher's activations on
its real training data, per layer and per class, computed where the data lives.

For each recorded layer (module path, or ``logits`` for the teacher's output) with its
activations flattened to D values per sample, and each class k (the label):

* ``<layer>/count`` [K]: samples of the class;
* ``<layer>/mean``, ``<layer>/std`` [K, D]: per-unit mean and standard deviation;
* ``<layer>/eigvecs`` [K, D, R], ``<layer>/eigvals`` [K, R]: the top-R principal
  directions of the class's activation covariance (the compressed "spectral" record:
  a client can sample activations as mean + eigvecs @ (sqrt(eigvals) * z)).

Written as safetensors with the teacher's fingerprint and the dataset id in the
metadata; ``kd serve --records NAME=FILE`` refuses a file made for another teacher.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kd.core.data import Dataset
from kd.teacher_server.loading import Teacher

LOGITS = "logits"


@torch.no_grad()
def compute_records(
    teacher: Teacher, data: Dataset, layers: list[str], *, rank: int = 8, batch_size: int = 256
) -> dict[str, torch.Tensor]:
    unknown = [n for n in layers if n != LOGITS and n not in teacher.layers]
    if unknown:
        raise ValueError(f"unknown layer(s) {unknown} of teacher {teacher.name!r}; valid: {list(teacher.layers)}")
    if not layers:
        raise ValueError("give at least one layer to record (a module path or 'logits')")
    modules = dict(teacher.model.named_modules())
    k = int(data.labels.max()) + 1
    outs: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    seen: dict[str, torch.Tensor] = {}
    handles = [
        modules[n].register_forward_hook(lambda _m, _i, o, n=n: seen.__setitem__(n, o.detach().clone()))
        for n in layers
        if n != LOGITS
    ]
    try:
        teacher.model.eval()
        for s in range(0, len(data), batch_size):
            x = data.inputs[s : s + batch_size].to(teacher.device, teacher.input_dtype)
            x = x.reshape(len(x), *teacher.input_shape)
            logits = teacher.model(x)
            for n in layers:
                v = logits if n == LOGITS else seen[n]
                outs[n].append(v.float().reshape(len(x), -1).cpu())
    finally:
        for h in handles:
            h.remove()
    records: dict[str, torch.Tensor] = {}
    for n in layers:
        a = torch.cat(outs[n]).double()
        d = a.shape[1]
        r = min(rank, d)
        count = torch.zeros(k)
        mean, std = torch.zeros(k, d), torch.zeros(k, d)
        vecs, vals = torch.zeros(k, d, r), torch.zeros(k, r)
        for c in range(k):
            ac = a[data.labels == c]
            count[c] = len(ac)
            if len(ac) == 0:
                continue
            mean[c] = ac.mean(0).float()
            std[c] = ac.std(0, unbiased=False).float()
            centred = ac - ac.mean(0)
            # Top-r right singular vectors of the centred activations = covariance eigenvectors.
            _, sv, vh = torch.linalg.svd(centred, full_matrices=False)
            m = min(r, len(sv))
            vecs[c, :, :m] = vh[:m].t().float()
            vals[c, :m] = (sv[:m] ** 2 / len(ac)).float()
        records |= {f"{n}/count": count, f"{n}/mean": mean, f"{n}/std": std, f"{n}/eigvecs": vecs,
                    f"{n}/eigvals": vals}  # fmt: skip
    return records


def save_records(path: str | Path, records: dict[str, torch.Tensor], teacher: Teacher, dataset_id: str) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"teacher": teacher.name, "teacher_fingerprint": teacher.fingerprint, "dataset": dataset_id}
    save_file({k: v.contiguous() for k, v in records.items()}, str(path), metadata=meta)
    return path


def load_records(path: str | Path, teacher: Teacher) -> tuple[dict[str, torch.Tensor], str]:
    """(records, dataset id); refuses records computed for another teacher."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"activation records {str(path)!r} not found")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        records = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    if meta.get("teacher_fingerprint") != teacher.fingerprint:
        raise ValueError(
            f"activation records {str(path)!r} were computed for teacher fingerprint "
            f"{str(meta.get('teacher_fingerprint'))[:16]}, not {teacher.name!r} ({teacher.fingerprint[:16]})"
        )
    return records, meta.get("dataset", "")
