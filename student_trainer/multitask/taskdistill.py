"""Domain adaptation through task distillation (Zhou, Kalra & Krähenbühl 2020, ECCV, arXiv 2008.11911;
code: bradyz/task-distillation) on digits and a re-rendered target domain that kd generates.

The method: the end task is labelled only in the source domain, but a *recognition* label
(semantic segmentation in the paper, a bird's-eye semantic map in the code) exists in both
domains. Task distillation goes through a proxy model that reads the recognition label:

1. the source model ``f^S`` (source images -> task) is trained on source labels;
2. the proxy ``f^P := D_S(f^S)`` (recognition label -> task) is distilled from ``f^S`` on the
   source domain (input: the source images' recognition labels, target: ``f^S``'s outputs);
3. the target model ``f^T := D_T(f^P)`` (target images -> task) is distilled from the proxy on
   unlabelled target images: its target is ``f^P`` applied to the *target's* recognition labels.

At test time ``f^T`` reads target images only. Checked with the code search against the authors'
code (``policy_transfer/train_stage2.py``: the teacher is the stage-1 proxy, fed the target's
``mapview`` from the dataset, i.e. the ground-truth map, not a predicted one; the target network
reads RGB and regresses the proxy's waypoints with an L1 loss; Adam) and with the paper's abstract
and summary (``f^P = D_S(f^S)``, ``f^T = D_T(f^P)``, ground-truth recognition labels in the
target instead of end-task labels).

kd's small version: the task is the digit class; the source domain is the bundled digits; the
target domain (``render_target``) is the digit shifted by up to one pixel, half-blurred, contrast-scaled,
inverted (dark strokes on a bright ground) and noised, seeded per split. The recognition label is
the digit's foreground mask (a 2-class segmentation: pixels of the clean, shifted glyph above
0.5), known in both domains as a renderer knows it. Differences: a 10-way classification, so the
distillation losses are the KL divergence to the teacher's softmax (temperature ``temperature``)
instead of the code's L1 on waypoints; the source and target images are disjoint halves of the
digits train split (the paper's domains are different simulators); the proxy is distilled from
``f^S`` alone (stage 1 of the code trains on the source expert's outputs, which is the same thing).
The report compares the source-only model and an oracle trained on target labels.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from kd.core.data import load_dataset
from kd.student_trainer import optim
from kd.student_trainer.multitask.nets import MultiHead

THRESHOLD = 0.5  # digits pixels are in [0, 1]; the foreground mask is x > 0.5
_BLUR = torch.tensor([1.0, 2.0, 1.0])


def foreground_mask(x: torch.Tensor) -> torch.Tensor:
    """The recognition label of clean digits ``[N, 64]``: 1 on the glyph's pixels, 0 elsewhere."""
    return (x > THRESHOLD).to(x.dtype)


def _shift(img: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Translate each ``[8, 8]`` image by its own (dy, dx) in {-1, 0, 1}, zero fill."""
    out = torch.zeros_like(img)
    for a in (-1, 0, 1):
        for b in (-1, 0, 1):
            sel = (dy == a) & (dx == b)
            if not bool(sel.any()):
                continue
            moved = torch.roll(img[sel], shifts=(a, b), dims=(1, 2))
            if a == 1:
                moved[:, 0, :] = 0
            elif a == -1:
                moved[:, -1, :] = 0
            if b == 1:
                moved[:, :, 0] = 0
            elif b == -1:
                moved[:, :, -1] = 0
            out[sel] = moved
    return out


def render_target(x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The target-domain images ``[N, 64]`` of digits ``x`` and their recognition labels (masks).

    Per sample, drawn from ``seed``: a shift of -1..1 pixels per axis; then half a 3x3 binomial
    blur (the mean of the image and its blur), a contrast in [0.6, 1.0], inversion and Gaussian
    noise (sd 0.05), clipped to [0, 1]. The mask is the foreground of the shifted clean glyph,
    aligned with the rendered image."""
    if x.ndim != 2 or x.shape[1] != 64:
        raise ValueError(f"digits images are [N, 64], got {tuple(x.shape)}")
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    dy, dx = torch.randint(-1, 2, (2, n), generator=g)
    contrast = 0.6 + 0.4 * torch.rand(n, generator=g)
    noise = 0.05 * torch.randn(n, 64, generator=g)
    shifted = _shift(x.detach().cpu().float().reshape(n, 8, 8), dy, dx)
    k = (_BLUR[:, None] * _BLUR[None, :] / 16).reshape(1, 1, 3, 3)
    blurred = (0.5 * shifted + 0.5 * F.conv2d(shifted[:, None], k, padding=1)[:, 0]).reshape(n, 64)
    image = (1.0 - contrast[:, None] * blurred + noise).clamp(0.0, 1.0)
    mask = foreground_mask(shifted.reshape(n, 64))
    return image.to(x.device, x.dtype), mask.to(x.device, x.dtype)


@dataclass
class TaskDistillConfig:
    width: int = 16
    epochs: int = 30  # every stage: source model, proxy, target model, oracle
    batch_size: int = 64
    lr: float = 3e-3
    temperature: float = 1.0
    seeds: int = 1
    seed: int = 0
    domain_seed: int = 0  # the source/target split and the renderings
    device: str = "cpu"

    def validate(self) -> None:
        if min(self.width, self.batch_size, self.seeds) < 1 or self.epochs < 0:
            raise ValueError("width, batch_size and seeds must be >= 1, epochs >= 0")
        if not (math.isfinite(self.lr) and math.isfinite(self.temperature) and self.lr > 0 and self.temperature > 0):
            raise ValueError(f"lr and temperature must be finite numbers > 0, got {self.lr} and {self.temperature}")


@dataclass(frozen=True)
class Domains:
    """Labelled source images with masks, unlabelled target images with masks, and test sets."""

    source_x: torch.Tensor
    source_y: torch.Tensor
    source_mask: torch.Tensor
    target_x: torch.Tensor
    target_mask: torch.Tensor
    target_y: torch.Tensor  # for the oracle only; task distillation never reads it
    source_test_x: torch.Tensor
    target_test_x: torch.Tensor
    target_test_mask: torch.Tensor
    test_y: torch.Tensor


def make_domains(domain_seed: int = 0, device: str | torch.device = "cpu") -> Domains:
    """Source: half of the digits train split; target: the other half, rendered; test: the test
    split, clean (source) and rendered (target). Deterministic in ``domain_seed``."""
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(domain_seed))
    src, tgt = perm[: len(perm) // 2], perm[len(perm) // 2 :]
    tx, tmask = render_target(train.inputs[tgt], seed=2 * domain_seed + 1)
    ex, emask = render_target(test.inputs, seed=2 * domain_seed + 2)
    d = Domains(train.inputs[src], train.labels[src], foreground_mask(train.inputs[src]), tx, tmask,
                train.labels[tgt], test.inputs, ex, emask, test.labels)  # fmt: skip
    return Domains(**{k: v.to(device) for k, v in asdict(d).items()})


def _logits(model: MultiHead, x: torch.Tensor) -> torch.Tensor:
    return model(x)["digit"]


def fit(model: MultiHead, x: torch.Tensor, config: TaskDistillConfig, *, seed: int, labels: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None) -> list[float]:  # fmt: skip
    """Train ``model`` in place with CE on ``labels`` or KL to ``teacher_logits`` (T^2-scaled); loss per epoch."""
    if (labels is None) == (teacher_logits is None):
        raise ValueError("give labels or teacher_logits")
    opt = optim.make_optimizer(model.parameters(), optim.Recipe(lr=config.lr))
    gen = torch.Generator().manual_seed(seed)
    t = config.temperature
    history = []
    for _ in range(config.epochs):
        model.train()
        total = 0.0
        order = torch.randperm(len(x), generator=gen).to(x.device)
        for s in range(0, len(x), config.batch_size):
            idx = order[s : s + config.batch_size]
            out = _logits(model, x[idx])
            if labels is not None:
                loss = F.cross_entropy(out, labels[idx])
            else:
                p_t = F.log_softmax(teacher_logits[idx] / t, 1)
                loss = F.kl_div(F.log_softmax(out / t, 1), p_t, log_target=True, reduction="batchmean") * t * t
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        history.append(total / len(x))
    return history


@torch.no_grad()
def accuracy(model: MultiHead, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((_logits(model, x).argmax(1) == y).float().mean())


@torch.no_grad()
def _outputs(model: MultiHead, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return _logits(model, x)


def run_seed(d: Domains, config: TaskDistillConfig, seed: int) -> dict[str, float]:
    """One seed of the three stages and both baselines; accuracies."""
    dev = d.source_x.device

    def new(i: int) -> MultiHead:
        torch.manual_seed(1000 * seed + i)
        return MultiHead({"digit": 10}, config.width).to(dev)

    source = new(0)
    fit(source, d.source_x, config, seed=seed, labels=d.source_y)
    proxy = new(1)  # f^P = D_S(f^S): masks in, the source model's outputs on the same images as targets
    fit(proxy, d.source_mask, config, seed=seed + 1, teacher_logits=_outputs(source, d.source_x))
    target = new(2)  # f^T = D_T(f^P): target images in, the proxy's outputs on their masks as targets
    fit(target, d.target_x, config, seed=seed + 2, teacher_logits=_outputs(proxy, d.target_mask))
    oracle = new(2)  # the target model's initialisation, trained on the target labels
    fit(oracle, d.target_x, config, seed=seed + 2, labels=d.target_y)
    return {
        "source_only": accuracy(source, d.target_test_x, d.test_y),
        "task_distilled": accuracy(target, d.target_test_x, d.test_y),
        "oracle": accuracy(oracle, d.target_test_x, d.test_y),
        "source_model_on_source": accuracy(source, d.source_test_x, d.test_y),
        "proxy_on_target_masks": accuracy(proxy, d.target_test_mask, d.test_y),
    }


ROWS = ("source_only", "task_distilled", "oracle", "source_model_on_source", "proxy_on_target_masks")


def run(config: TaskDistillConfig) -> dict:
    """Every seed's accuracies on the target test set (and two diagnostics), with means."""
    config.validate()
    t0 = time.perf_counter()
    d = make_domains(config.domain_seed, config.device)
    per_seed = [run_seed(d, config, config.seed + s) for s in range(config.seeds)]
    out: dict = {"config": asdict(config), "per_seed": per_seed,
                 "mean": {k: sum(r[k] for r in per_seed) / len(per_seed) for k in ROWS},
                 "sizes": {"source": len(d.source_x), "target_unlabelled": len(d.target_x),
                           "test": len(d.test_y)}}  # fmt: skip
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out
