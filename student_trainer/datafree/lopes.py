"""Lopes, Fenu & Starner 2017: data-free KD from activation records.

Raphael Gontijo Lopes, Stefano Fenu, Thad Starner, "Data-Free Knowledge Distillation for
Deep Neural Networks", NIPS 2017 Workshop on Learning with Limited Labeled Data,
arXiv:1710.07535; official code irapha/replayed_distillation (TensorFlow).

The data owner ships *activation records* with the model: statistics of the teacher's
activations on its training data, per recorded layer l and class k (``kd records`` ->
``kd.teacher_server.records``; served by ``kd serve --records NAME=FILE``): the per-unit mean
mu_lk and standard deviation sigma_lk (D_l units), and the top-R principal directions
E_lk [D_l, R] with their variances lambda_lk [R] of the class's activation covariance.
From the records alone, inputs are *reconstructed* by optimising them through the frozen
teacher (here: through the server's input-gradient RPC, ``teacher(x, features=...)``) so
that the teacher's activations a_l(x) match a sample drawn from the recorded statistics
of a chosen class k; then the student is distilled on the reconstructions with KD.

Variants (``variant=``), each for a batch of classes k_i chosen round-robin over the
recorded classes, with targets drawn once per batch and then held fixed (as the official
``optimize_dataset`` draws one feed_dict per batch):

* ``"top-layer"`` (paper 3.1): only the top layer ("logits" when recorded, else the last
  recorded layer). Target t_i = mu_k + sigma_k * z, z ~ N(0, I) (the official code's
  per-unit Gaussian ``sample_from_stats``, used there whenever no covariance factor is
  kept). Loss  L = 1/(N D) sum_i ||a(x_i) - t_i||^2.
* ``"all-layers"`` (paper 3.2): every recorded layer, targets drawn independently per
  layer as above. Loss  L = sum_l 1/(N D_l) sum_i ||r_l(a_l(x_i)) - r_l(t_il)||^2 with
  r_l = ReLU on hidden layers (official code: ``relu(placeholder) - relu(tensor)``) and the
  identity on the logits (see below).
* ``"spectral"`` (paper 3.3, "spectral all layers"): the paper records, per layer, the
  coefficients of the activations in the top eigenvectors of the graph Laplacian of the
  network's *weights* (a graph Fourier basis) and matches sampled coefficients. The
  served records hold instead, per class, the top-R eigenvectors of the activation
  *covariance* (a PCA basis, data-dependent rather than weight-dependent). The closest
  faithful version: match the activations' coefficients in the recorded basis to a sample
  of those coefficients,
      c_il(x) = E_lk^T (a_l(x_i) - mu_lk),   c_hat_il ~ N(0, diag(lambda_lk)),
      L = sum_l 1/(N R) sum_i ||c_il(x) - c_hat_il||^2 / mean_{i,r}(lambda_{l k_i r}),
  i.e. the sample mu + E diag(sqrt(lambda)) z that ``kd.teacher_server.records`` documents,
  compared in the R-dimensional spectral space rather than unit by unit (only R << D
  numbers per layer are constrained: the compression that motivates the spectral
  records). Dividing by the batch's mean recorded variance puts layers of different
  scales on one footing (our choice; the paper gives no weighting). Layer *pairs*
  (the paper's second spectral variant, a Laplacian per pair of adjacent layers) have no
  counterpart in per-layer records and are not implemented.

Optimisation of the inputs (official ``optimize_dataset``): x initialised per pixel from
N(0.15, 0.1) (the official MNIST init), Adam with lr 0.07 for 1000 iterations per batch;
we project x onto ``input_range`` (default [0, 1], the bundled digits' range) after every
step, which the official MNIST path did not do.

Distillation: each outer step (``config.steps`` of them) reconstructs one batch of
``config.batch_size`` inputs, asks the teacher for their logits once (``teacher.logits``)
and adds them to the transfer set; then the student takes ``kd_steps`` steps (the shared
trainer's recipe, Adam by default) on
minibatches drawn from the whole transfer set with Hinton's KD loss at
``config.temperature`` (the official distillation used temperature 8 and epochs over the
finished reconstructed set; interleaving lets the run report progress and is the same
objective on a growing set). ``cosine=True`` anneals the student's learning rate to 0 over
all ``steps * kd_steps`` updates (not in the paper; on the digits it steadies the final
accuracy, which otherwise swings by +-10 points between evaluations).

Simplifications: the official hidden-layer ReLU is applied to both sides of the hidden
layers' error but not to the logits (a ReLU there would drop every negative logit, i.e.
the dark knowledge being distilled); the official all-layers weighting 1/D_l on top of
the mean is dropped (each layer's mean squared error counts once); dropout filters (the
official ``all_layers_dropout``) do not apply to served eval-mode teachers.

Queries: each input-optimisation iteration is one forward (N samples) and one input
gradient (N gradient samples); each batch adds N samples for its final logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kd.core.data import Dataset
from kd.student_trainer.datafree import register
from kd.student_trainer.datafree.common import (
    DataFreeConfig,
    DataFreeResult,
    Run,
    ServedTeacher,
    given_options,
    kd_loss,
)

NAME = "lopes"
PAPER = ("Lopes, Fenu & Starner 2017, Data-Free Knowledge Distillation for Deep Neural Networks, "
         "NIPS 2017 LLD workshop, arXiv:1710.07535")  # fmt: skip
VARIANTS = ("top-layer", "all-layers", "spectral")
LOGITS = "logits"

# Settings for ``kd demo-datafree`` on the bundled digits (see the module docstring of
# student_trainer.datafree); they assume records of logits, layer1 and layer2.
DEMO = {
    "config": {"steps": 18, "batch_size": 64, "lr": 1e-2, "temperature": 4.0},
    "options": {"variant": "all-layers", "iterations": 50, "kd_steps": 50, "cosine": True},
}


@dataclass(frozen=True)
class LayerRecord:
    """One recorded layer: per class k, ``mean``/``std`` [K, D], ``eigvecs`` [K, D, R],
    ``eigvals`` [K, R], ``count`` [K]."""

    name: str
    count: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    eigvecs: torch.Tensor
    eigvals: torch.Tensor

    @property
    def dim(self) -> int:
        return int(self.mean.shape[1])


def parse_records(records: dict[str, torch.Tensor]) -> dict[str, LayerRecord]:
    """Group "<layer>/<stat>" tensors by layer."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in records.items():
        layer, _, stat = key.rpartition("/")
        layers.setdefault(layer, {})[stat] = value.float()
    out = {}
    for layer, stats in layers.items():
        missing = {"count", "mean", "std", "eigvecs", "eigvals"} - set(stats)
        if missing:
            raise ValueError(f"activation records of layer {layer!r} lack {sorted(missing)}")
        out[layer] = LayerRecord(layer, stats["count"], stats["mean"], stats["std"], stats["eigvecs"],
                                 stats["eigvals"])  # fmt: skip
    return out


def choose_layers(recorded: dict[str, LayerRecord], variant: str, layers: tuple[str, ...] | None,
                  teacher_layers: dict[str, tuple[int, ...]]) -> list[str]:  # fmt: skip
    """The recorded layers a variant matches: the top one for top-layer, all otherwise;
    in the teacher's layer order with the logits last (the records arrive in a map whose
    order is arbitrary, and the targets are drawn layer by layer from one generator)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown lopes variant {variant!r}; use one of {', '.join(VARIANTS)}")
    if not recorded:
        raise ValueError("the teacher's activation records are empty")
    order = {n: i for i, n in enumerate(teacher_layers)} | {LOGITS: len(teacher_layers)}
    ranked = sorted(recorded, key=lambda n: (order.get(n, -1), n))
    if layers is not None:
        unknown = [n for n in layers if n not in recorded]
        if unknown or not layers:
            raise ValueError(f"layers {list(layers)}: recorded layers are {ranked}")
        chosen = [n for n in ranked if n in layers]
    elif variant == "top-layer":
        chosen = ranked[-1:]  # the logits, else the deepest recorded module
    else:
        chosen = ranked
    for n in chosen:
        if n != LOGITS and n not in teacher_layers:
            raise ValueError(f"recorded layer {n!r} is not a feature the teacher serves ({list(teacher_layers)})")
    return chosen


def balanced_classes(count: torch.Tensor, n: int, offset: int = 0) -> torch.Tensor:
    """n class ids, round-robin over the classes that have records (count > 0)."""
    present = torch.nonzero(count > 0).flatten()
    if len(present) == 0:
        raise ValueError("the activation records hold no class with samples")
    return present[(torch.arange(n) + offset) % len(present)]


def sample_activations(rec: LayerRecord, classes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-unit Gaussian draws, mu_k + sigma_k * z: [N, D]."""
    z = torch.randn(len(classes), rec.dim, generator=gen)
    return rec.mean[classes] + rec.std[classes] * z


def sample_coefficients(rec: LayerRecord, classes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Spectral coefficients c ~ N(0, diag(lambda_k)): [N, R]."""
    vals = rec.eigvals[classes]
    return vals.clamp_min(0).sqrt() * torch.randn(vals.shape, generator=gen)


def coefficients(acts: torch.Tensor, rec: LayerRecord, classes: torch.Tensor) -> torch.Tensor:
    """E_k^T (a - mu_k) for each sample: [N, R]."""
    centred = acts.reshape(len(acts), -1) - rec.mean[classes]
    return torch.einsum("ndr,nd->nr", rec.eigvecs[classes], centred)


def sample_targets(recs: dict[str, LayerRecord], layers: list[str], classes: torch.Tensor, variant: str,
                   gen: torch.Generator) -> dict[str, torch.Tensor]:  # fmt: skip
    draw = sample_coefficients if variant == "spectral" else sample_activations
    return {n: draw(recs[n], classes, gen) for n in layers}


def reconstruction_loss(acts: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                        recs: dict[str, LayerRecord], classes: torch.Tensor, variant: str) -> torch.Tensor:  # fmt: skip
    """The variant's matching loss, summed over layers (see the module docstring)."""
    total = None
    for name, target in targets.items():
        a = acts[name].reshape(len(target), -1)
        if variant == "spectral":
            rec = recs[name]
            scale = rec.eigvals[classes].mean().clamp_min(1e-8)
            term = F.mse_loss(coefficients(a, rec, classes), target) / scale
        elif name == LOGITS:
            term = F.mse_loss(a, target)
        else:
            term = F.mse_loss(F.relu(a), F.relu(target))
        total = term if total is None else total + term
    assert total is not None
    return total


def reconstruct(teacher: ServedTeacher, recs: dict[str, LayerRecord], layers: list[str], classes: torch.Tensor,
                *, variant: str, iterations: int, lr: float, init: tuple[float, float],
                input_range: tuple[float, float] | None, gen: torch.Generator,
                device: str = "cpu") -> tuple[torch.Tensor, float]:  # fmt: skip
    """Optimise one batch of inputs, one per entry of ``classes``, to reproduce activations
    sampled from the records; -> (inputs [N, *teacher.input_shape], the loss of the last
    iteration, before its update)."""
    n = len(classes)
    targets = {k: v.to(device) for k, v in sample_targets(recs, layers, classes, variant, gen).items()}
    recs_dev = recs if device == "cpu" else {k: _to(r, device) for k, r in recs.items()}
    x = (init[0] + init[1] * torch.randn(n, *teacher.input_shape, generator=gen)).to(device)
    if input_range is not None:
        x = x.clamp(*input_range)
    x.requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    features = tuple(n for n in layers if n != LOGITS)
    cls = classes.to(device)
    loss_value = float("nan")
    for _ in range(iterations):
        logits, feats = teacher(x, features=features) if features else (teacher(x), {})
        acts = {LOGITS: logits, **feats}
        loss = reconstruction_loss(acts, targets, recs_dev, cls, variant)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if input_range is not None:
            with torch.no_grad():
                x.clamp_(*input_range)
        loss_value = float(loss.detach())
    return x.detach(), loss_value


def _to(rec: LayerRecord, device: str) -> LayerRecord:
    return LayerRecord(rec.name, *(t.to(device) for t in (rec.count, rec.mean, rec.std, rec.eigvecs, rec.eigvals)))


def for_student(student: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` in the student's declared per-sample ``input_shape`` when it has one (a flat
    MLP student takes [N, 64] where the teacher takes [N, 1, 8, 8])."""
    shape = getattr(student, "input_shape", None)
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        return x.reshape(len(x), *shape)
    return x


class Reconstructor:
    """Batches of record-matching reconstructions for one teacher (also the base set of
    ``adv-samples``): fetches the records once, cycles through the classes."""

    def __init__(self, teacher: ServedTeacher, *, variant: str = "all-layers", layers: tuple[str, ...] | None = None,
                 iterations: int = 1000, lr: float = 0.07, init: tuple[float, float] = (0.15, 0.1),
                 input_range: tuple[float, float] | None = (0.0, 1.0), seed: int = 0,
                 device: str = "cpu") -> None:  # fmt: skip
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        if input_range is not None and not input_range[0] < input_range[1]:
            raise ValueError(f"input_range must be (low, high) with low < high, got {input_range}")
        if variant not in VARIANTS:
            raise ValueError(f"unknown lopes variant {variant!r}; use one of {', '.join(VARIANTS)}")
        if not teacher.has_activation_records:
            raise ValueError(
                f"teacher {teacher.name!r} is served without activation records: compute them with `kd records` "
                "where the data lives and serve them with `kd serve --records NAME=FILE`"
            )
        self.teacher = teacher
        self.records = parse_records(teacher.records())  # WHITE tier: the server refuses below it
        self.layers = choose_layers(self.records, variant, layers, teacher.layers)
        counts = self.records[self.layers[0]].count
        if len(counts) != teacher.num_classes:
            raise ValueError(f"records hold {len(counts)} classes, the teacher has {teacher.num_classes}")
        self.variant, self.iterations, self.lr, self.init = variant, iterations, lr, init
        self.input_range, self.device = input_range, device
        self.gen = torch.Generator().manual_seed(seed)
        self.made = 0
        self.last_loss = float("nan")

    def state_dict(self) -> dict[str, object]:
        return {"gen": self.gen.get_state(), "made": self.made}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.gen.set_state(state["gen"])
        self.made = int(state["made"])

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(n reconstructed inputs, the class each was drawn for)."""
        classes = balanced_classes(self.records[self.layers[0]].count, n, self.made)
        x, self.last_loss = reconstruct(self.teacher, self.records, self.layers, classes, variant=self.variant,
                                        iterations=self.iterations, lr=self.lr, init=self.init,
                                        input_range=self.input_range, gen=self.gen,
                                        device=self.device)  # fmt: skip
        self.made += n
        return x, classes.to(x.device)


@register(NAME, PAPER, tier="white")
def run(
    teacher: ServedTeacher,
    student: nn.Module,
    config: DataFreeConfig,
    *,
    test: Dataset | None = None,
    variant: str = "all-layers",
    layers: tuple[str, ...] | None = None,
    iterations: int = 1000,
    input_lr: float = 0.07,
    init: tuple[float, float] = (0.15, 0.1),
    input_range: tuple[float, float] | None = (0.0, 1.0),
    kd_steps: int = 50,
    cosine: bool = False,
    **unknown: object,
) -> DataFreeResult:
    """Reconstruct ``config.steps`` batches from the records and distil on them (see the
    module docstring). Options: ``variant`` (top-layer, all-layers, spectral), ``layers``
    (recorded layers to match instead of the variant's default), ``iterations`` and
    ``input_lr`` (Adam on the inputs, per batch), ``init`` (mean, std of the initial
    pixels), ``input_range`` (projection after each step; None: none), ``kd_steps``
    (student steps per reconstructed batch), ``cosine`` (anneal the student's lr)."""
    if unknown:
        raise TypeError(f"lopes: unknown option(s) {sorted(unknown)}; valid: variant, layers, iterations, input_lr, "
                        "init, input_range, kd_steps, cosine")  # fmt: skip
    if kd_steps < 0:
        raise ValueError(f"kd_steps must be >= 0, got {kd_steps}")
    r = Run(NAME, teacher, student, config, test)
    maker = Reconstructor(teacher, variant=variant, layers=layers, iterations=iterations, lr=input_lr, init=init,
                          input_range=input_range, seed=config.seed, device=config.device)  # fmt: skip
    student.to(config.device).train()
    pool_x: list[torch.Tensor] = []
    pool_t: list[torch.Tensor] = []
    pick = torch.Generator().manual_seed(config.seed + 1)
    r.keep(given_options(run, locals()), maker=maker, pool_x=pool_x, pool_t=pool_t, pick=pick)

    def rounds(first: int, end: int):
        """Per step: reconstruct a batch into the transfer set, then ``kd_steps`` student batches of it."""
        for _ in range(first, end):
            x, _ = maker.batch(config.batch_size)
            pool_x.append(x)
            pool_t.append(teacher.logits(x))
            xs, ts = torch.cat(pool_x), torch.cat(pool_t)
            for _ in range(kd_steps):
                idx = torch.randint(len(xs), (min(config.batch_size, len(xs)),), generator=pick).to(xs.device)
                yield for_student(student, xs[idx]), None, ts[idx]

    r.train(rounds, lambda ctx: kd_loss(ctx.model(ctx.inputs), ctx.teacher_logits, config.temperature),
            steps_per_round=max(kd_steps, 1), asks={"schedule": "cosine" if cosine else None})  # fmt: skip
    return r.result(torch.cat(pool_x) if pool_x else None)
