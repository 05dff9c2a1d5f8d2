"""Every registered method declares whether its loss relates the samples of a batch
(``Method.couples`` / ``FeatureMethod.couples``), and the declaration is measured here.

A loss is per-sample when its value on a batch is the sample-weighted mean of its values on the
parts of that batch: that is what the trainer relies on under torchrun, where each rank computes
the loss on its slice and DDP averages. Anything else (a Pearson correlation over the batch, a
similarity matrix, pairwise distances, a count of correct rows, a median, random draws per row, a
memory bank moved by the batch, a mean over tokens) makes the result depend on how the batch is
split, so the trainer computes such a loss on the gathered global batch. The batch of 8 is split
5 + 3 (unequal, so a mean over a local count shows up too) and everything runs in float64; feature
methods run through the trainer's own feature plan (connectors, reductions, common CE/KD terms)
with the student and connectors in eval mode, so only the loss can relate the samples.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from kd.bench.methods import FEATURE_MATCHES, _feature_options
from kd.core.data import load_dataset
from kd.models import digits_cnn, digits_cnn_student
from kd.student_trainer.losses import METHODS
from kd.student_trainer.sources import Batch, LocalSource
from kd.student_trainer.train import TrainConfig, _FeaturePlan, _with_rotations, seed_everything
from kd.teacher_server.loading import load_teacher, save_weights

TRAIN = load_dataset("digits", "train")
SPLIT = (5, 3)
N = sum(SPLIT)
# Measured: per-sample methods agree to <= 3e-16 relative, the least coupled one (ofd's margin
# fitted over the batch, next to a CE term) differs by 6e-7.
COUPLED_ABOVE = 1e-12


def _parts() -> list[slice]:
    out, lo = [], 0
    for k in SPLIT:
        out.append(slice(lo, lo + k))
        lo += k
    return out


@pytest.fixture(scope="module")
def cnn_source(tmp_path_factory: pytest.TempPathFactory) -> LocalSource:
    # Any weights do: the teacher's outputs are the same tensors for the batch and its parts.
    path = tmp_path_factory.mktemp("coupling") / "cnn.safetensors"
    torch.manual_seed(0)
    save_weights(digits_cnn(), str(path))
    return LocalSource(load_teacher("cnn", f"kd.models:digits_cnn@{Path(path)}"))


def _logit_losses(name: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    method = METHODS[name]
    g = torch.Generator().manual_seed(1)
    c = 10
    # noisy draws its noise from a seeded generator: the same call gives the same draws.
    opts = {"seed": 0} if name == "noisy" else {}
    if name.startswith("token-"):  # [B, S, V] with some positions masked (-100), unequal per sequence
        s = torch.randn(N, 4, c, generator=g, dtype=torch.float64)
        t = torch.randn(N, 4, c, generator=g, dtype=torch.float64)
        y = torch.randint(c, (N, 4), generator=g)
        y[0, :3] = -100
        y[6, 1:] = -100
    else:
        s = torch.randn(N, c, generator=g, dtype=torch.float64)
        t = 2 * torch.randn(N, c, generator=g, dtype=torch.float64)
        y = torch.randint(c, (N,), generator=g)
        y[::2] = t[::2].argmax(1)  # gkd counts the rows the teacher gets right: some are, some not
    if method.pairs:
        # the loop passes [samples; their same-class partners]: a part is its samples and their partners
        def loss(sl: slice) -> torch.Tensor:
            labels = torch.arange(N)[sl] % 3
            return method(torch.cat([s[sl], t[sl]]), None, torch.cat([labels, labels]), epoch=1, epochs=3, **opts)
    else:

        def loss(sl: slice) -> torch.Tensor:
            return method(s[sl], t[sl], y[sl], epoch=1, epochs=3, **opts)

    return loss(slice(0, N)), [loss(p) for p in _parts()]


def _feature_losses(name: str, source: LocalSource) -> tuple[torch.Tensor, list[torch.Tensor]]:
    method = METHODS[name]
    seed_everything(0)
    # teacher_reduce=trainer: the teacher's full maps, sliced per part (a batch statistic such as
    # sp's is then taken over each part, as the loop takes it over what it holds)
    opts = {**_feature_options(name), "teacher_reduce": "trainer"}
    config = TrainConfig(method=name, matches=list(FEATURE_MATCHES[name]), method_options=opts, epochs=3)
    plan = _FeaturePlan(method, config, digits_cnn_student(), TRAIN, torch.arange(64), source)
    idx = torch.tensor([3, 17, 5, 40, 22, 9, 31, 60])
    batch = Batch(idx, TRAIN.get(idx), TRAIN.labels[idx])
    rows = 1
    if method.rotations:  # SSKD: 4 rows per sample; a part keeps its samples' rotations
        batch, rows = _with_rotations(batch, (1, 8, 8)), 4
    _, logits, feats = next(iter(source.iter_outputs([batch], plan.teacher_names)))
    logits, feats = logits.double(), {k: v.double() for k, v in feats.items()}
    model = plan.distilled.double().eval()
    state = copy.deepcopy(model.state_dict())  # CRD's memory bank moves with every call

    def loss(sl: slice) -> torch.Tensor:
        sl = slice(sl.start * rows, sl.stop * rows)
        model.load_state_dict(state)
        torch.manual_seed(0)  # the same draws (CRD's negatives, MGD's masks) for every call
        part = {k: v[sl] for k, v in feats.items()}
        x, y = batch.inputs.double()[sl], batch.labels[sl]
        return plan.loss(model, x, y, logits[sl], part, torch.device("cpu"), 1, config, indices=batch.indices[sl])

    return loss(slice(0, N)), [loss(p) for p in _parts()]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_methods_declared_coupling_is_what_its_loss_does(name: str, cnn_source: LocalSource) -> None:
    method = METHODS[name]
    assert isinstance(method.couples, bool), f"{name} must declare couples=True/False when it registers"
    with torch.no_grad():
        whole, parts = _feature_losses(name, cnn_source) if method.kind == "feature" else _logit_losses(name)
    whole = float(whole)
    weighted = sum(k / N * float(p) for k, p in zip(SPLIT, parts))
    rel = abs(whole - weighted) / abs(whole)
    assert (rel > COUPLED_ABOVE) == method.couples, (
        f"{name}: loss of the batch {whole!r}, weighted mean of its parts {weighted!r} (relative difference "
        f"{rel:.3g}), declared couples={method.couples}"
    )


_GATHER_SPARSE = """
import sys, torch, torch.distributed as dist
from kd.core.targets import SparseTargets
from kd.student_trainer.gather import gather_rows

dist.init_process_group("gloo")
rank = dist.get_rank()
rows = (3, 1)[rank]  # unequal slices: the second rank's is padded for the gather
g = torch.Generator().manual_seed(rank)
mine = SparseTargets("topk", torch.randint(0, 10, (rows, 4), generator=g), torch.randn(rows, 4, generator=g),
                     torch.randn(rows, generator=g), 10, 2.0)
mine.logits.requires_grad_(True)
every = gather_rows({"t": mine}, [3, 1])["t"]
parts = []
for r, n in enumerate((3, 1)):
    h = torch.Generator().manual_seed(r)
    ids = torch.randint(0, 10, (n, 4), generator=h)
    parts.append((ids, torch.randn(n, 4, generator=h), torch.randn(n, generator=h)))
assert isinstance(every, SparseTargets) and (every.kind, every.num_classes, every.temperature) == ("topk", 10, 2.0)
for got, i in ((every.indices, 0), (every.logits, 1), (every.logsumexp, 2)):
    assert torch.equal(got.detach(), torch.cat([p[i] for p in parts])), (rank, i)
(every.logits * torch.arange(16.0).reshape(4, 4)).sum().backward()  # this rank's rows of the gradient
start = (0, 3)[rank]
assert torch.equal(mine.logits.grad, torch.arange(16.0).reshape(4, 4)[start : start + rows])
dist.destroy_process_group()
open(f"{sys.argv[1]}/ok{rank}", "w").close()  # a file per rank: the ranks' prints can interleave
"""


@pytest.mark.serial
def test_sparse_targets_are_gathered_row_by_row_across_ranks(tmp_path: Path) -> None:
    """A batch-coupled feature loss (rkd, sp...) on a top-k cache or --server-topk under torchrun: the
    teacher's SparseTargets are gathered field by field (2 gloo ranks, slices of 3 and 1 rows), in rank
    order, and the backward keeps each rank's rows. Before, gather_rows refused them and every rank
    failed at its first step, where each used to train on its slice."""
    import os
    import subprocess
    import sys

    script = tmp_path / "gather_sparse.py"
    script.write_text(_GATHER_SPARSE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), str(tmp_path)], capture_output=True, text=True, timeout=180,
                         env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("ok*")) == ["ok0", "ok1"]
