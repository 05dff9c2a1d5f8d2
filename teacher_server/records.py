"""Activation records (Lopes, Fenu, Starner 2017): statistics of a teacher's activations on
its real training data, per layer and per class, computed where the data lives.

For each recorded layer (module path, or ``logits`` for the teacher's output) with its
activations flattened to D values per sample, and each class k (the label):

* ``<layer>/count`` [K]: samples of the class;
* ``<layer>/mean``, ``<layer>/std`` [K, D]: per-unit mean and standard deviation;
* ``<layer>/eigvecs`` [K, D, R], ``<layer>/eigvals`` [K, R]: the top-R principal
  directions of the class's activation covariance (the compressed "spectral" record:
  a client can sample activations as mean + eigvecs @ (sqrt(eigvals) * z)). Each
  direction's sign is fixed (its largest-magnitude entry is positive), so the records
  are a function of the data alone.

The data is any sample source (``kd.core.data.open_source``: the bundled digits, image
folders, npz, ...) streamed in batches through ``kd.core.data.loader`` (decoding in
worker processes), so memory does not grow with the dataset: per layer and class the
accumulators hold min(N_k, D) x D numbers. A class with more samples than units keeps
its count, mean and scatter matrix (sum of centred outer products, float64, merged batch
by batch with Chan et al.'s parallel update, which stays exact where sum(x x^T) - N m m^T
would cancel); a class with fewer keeps its rows (float32, as the teacher gave them), so
the SVD of its centred rows is exact and costs less than the D x D matrix would.

Written as safetensors with the teacher's fingerprint and the dataset id in the
metadata; ``kd serve --records NAME=FILE`` refuses a file made for another teacher.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kd.core.data import loader
from kd.core.factory import logits_of
from kd.core.samples import SampleSource
from kd.core.views import conform
from kd.teacher_server.loading import Teacher

LOGITS = "logits"
MAX_ACCUMULATOR_BYTES = 4 << 30  # refuse a layer set whose accumulators would not fit a modest machine


class _Moments:
    """Streaming per-class statistics of one layer (``D`` values per sample)."""

    def __init__(self, counts: torch.Tensor, d: int) -> None:
        self.d = d
        self.expected = counts
        k = len(counts)
        self.buffered = [0 < int(n) <= d for n in counts]  # rows are smaller than the D x D scatter
        self.rows: dict[int, list[torch.Tensor]] = {c: [] for c in range(k) if self.buffered[c]}
        self.n = torch.zeros(k, dtype=torch.long)
        self.mean = torch.zeros(k, d, dtype=torch.float64)
        self.scatter = {c: torch.zeros(d, d, dtype=torch.float64) for c in range(k)
                        if int(counts[c]) > d}  # fmt: skip

    @staticmethod
    def nbytes(counts: torch.Tensor, d: int) -> int:
        return sum(int(n) * d * 4 if int(n) <= d else d * d * 8 for n in counts)

    def add(self, acts: torch.Tensor, labels: torch.Tensor) -> None:
        for c in labels.unique().tolist():
            a = acts[labels == c]
            if self.buffered[c]:
                self.rows[c].append(a.clone())
                continue
            x = a.double()
            nb = len(x)
            mb = x.mean(0)
            centred = x - mb
            n = int(self.n[c])
            total = n + nb
            delta = mb - self.mean[c]
            self.mean[c] += delta * (nb / total)
            self.scatter[c] += centred.t() @ centred + torch.outer(delta, delta) * (n * nb / total)
            self.n[c] = total

    def finish(self, rank: int) -> dict[str, torch.Tensor]:
        k, d = len(self.expected), self.d
        r = min(rank, d)
        count = torch.zeros(k)
        mean, std = torch.zeros(k, d), torch.zeros(k, d)
        vecs, vals = torch.zeros(k, d, r), torch.zeros(k, r)
        for c in range(k):
            if self.buffered[c]:
                ac = torch.cat(self.rows.pop(c)).double()
                count[c] = len(ac)
                mean[c] = ac.mean(0).float()
                std[c] = ac.std(0, unbiased=False).float()
                # Top-r right singular vectors of the centred rows = covariance eigenvectors.
                _, sv, vh = torch.linalg.svd(ac - ac.mean(0), full_matrices=False)
                m = min(r, len(sv))
                top, lam = vh[:m].t(), sv[:m] ** 2 / len(ac)
            elif c in self.scatter:
                n = int(self.n[c])
                count[c] = n
                cov = self.scatter.pop(c) / n
                mean[c] = self.mean[c].float()
                std[c] = cov.diagonal().clamp_min(0).sqrt().float()
                ev, evec = torch.linalg.eigh(cov)  # ascending
                m = min(r, n)
                top, lam = evec[:, -m:].flip(1), ev[-m:].flip(0).clamp_min(0)
            else:
                continue
            if m:
                pivot = top.abs().argmax(0)
                sign = torch.sign(top[pivot, torch.arange(m)])
                top = top * torch.where(sign == 0, 1.0, sign)
            vecs[c, :, :m] = top.float()
            vals[c, :m] = lam.float()
        return {"count": count, "mean": mean, "std": std, "eigvecs": vecs, "eigvals": vals}


def _model_input(x: torch.Tensor, teacher: Teacher) -> torch.Tensor:
    """A batch as the teacher takes it: uint8 pixels scaled to [0, 1] (what a float source
    gives), flat digits reshaped to the teacher's per-sample shape."""
    if x.dtype == torch.uint8 and teacher.input_dtype.is_floating_point:
        x = x.float() / 255
    return conform(x, teacher.input_shape).to(teacher.device, teacher.input_dtype)


@torch.no_grad()
def compute_records(
    teacher: Teacher,
    data: SampleSource,
    layers: list[str],
    *,
    rank: int = 8,
    batch_size: int = 256,
    workers: int = 0,
    max_bytes: int = MAX_ACCUMULATOR_BYTES,
    strict_rank: bool = False,
) -> dict[str, torch.Tensor]:
    """The records of ``layers`` over every sample of ``data`` (any ``SampleSource``), read
    in batches of ``batch_size`` (decoded in ``workers`` DataLoader processes). A layer keeps
    min(``rank``, its width) directions; ``strict_rank``: a ``rank`` above every layer's width (a
    value the user chose, which would be cut without a word) is refused after the first batch."""
    unknown = [n for n in layers if n != LOGITS and n not in teacher.layers]
    if unknown:
        raise ValueError(f"unknown layer(s) {unknown} of teacher {teacher.name!r}; valid: {list(teacher.layers)}")
    if not layers:
        raise ValueError("give at least one layer to record (a module path or 'logits')")
    if rank < 1 or batch_size < 1 or workers < 0:
        raise ValueError(f"rank and batch_size must be >= 1 and workers >= 0, got {rank}, {batch_size}, {workers}")
    labels = torch.as_tensor(data.labels, dtype=torch.long)
    if len(labels) == 0:
        raise ValueError(f"dataset {data.dataset_id!r} is empty: no activations to record")
    k = max(int(getattr(data, "num_classes", 0) or 0), int(labels.max()) + 1)
    counts = torch.bincount(labels, minlength=k)
    modules = dict(teacher.model.named_modules())
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str, out: object) -> None:
        out = out[0] if isinstance(out, (tuple, list)) else out
        seen[name] = out.detach().clone()  # a later in-place op (ReLU(inplace=True)) must not change it

    handles = [modules[n].register_forward_hook(lambda _m, _i, o, n=n: keep(n, o)) for n in layers if n != LOGITS]
    moments: dict[str, _Moments] = {}
    try:
        teacher.model.eval()
        for batch in loader(data, None, batch_size, workers=workers):
            x = _model_input(batch.inputs, teacher)
            logits = logits_of(teacher.model(x))
            acts = {n: (logits if n == LOGITS else seen[n]).float().reshape(len(x), -1).cpu() for n in layers}
            if not moments and strict_rank and rank > max(a.shape[1] for a in acts.values()):
                widths = {n: a.shape[1] for n, a in acts.items()}
                raise ValueError(f"--rank {rank}: more principal directions than the recorded layers have values per "
                                 f"sample {widths}; give at most {max(widths.values())}")  # fmt: skip
            if not moments:  # the first batch tells every layer's width: check the memory before any work
                need = sum(_Moments.nbytes(counts, a.shape[1]) for a in acts.values())
                if need > max_bytes:
                    widths = {n: a.shape[1] for n, a in acts.items()}
                    raise ValueError(
                        f"activation records of layers {widths} (values per sample) over {k} classes need "
                        f"{need / 2**30:.1f} GiB of accumulators (per class min(samples, D) x D), over the "
                        f"{max_bytes / 2**30:.1f} GiB limit; record fewer or smaller layers (e.g. logits)"
                    )
                moments = {n: _Moments(counts, a.shape[1]) for n, a in acts.items()}
            for n, a in acts.items():
                moments[n].add(a, batch.labels)
    finally:
        for h in handles:
            h.remove()
    records: dict[str, torch.Tensor] = {}
    for n in layers:
        records |= {f"{n}/{stat}": v for stat, v in moments[n].finish(rank).items()}
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
    from safetensors import SafetensorError

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            records = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError) as e:
        raise ValueError(f"activation records {str(path)!r} are not a readable safetensors file: {e}") from None
    if meta.get("teacher_fingerprint") != teacher.fingerprint:
        raise ValueError(
            f"activation records {str(path)!r} were computed for teacher fingerprint "
            f"{str(meta.get('teacher_fingerprint'))[:16]}, not {teacher.name!r} ({teacher.fingerprint[:16]})"
        )
    return records, meta.get("dataset", "")
