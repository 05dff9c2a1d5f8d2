"""DFME: data-free model extraction from a black-box teacher that serves scores only.

Truong, Maini, Walls, Papernot, "Data-Free Model Extraction", CVPR 2021, arXiv 2011.14779;
official code cake-lab/datafree-model-extraction (``dfme/train.py``,
``dfme/approximate_gradients.py``).

DFAD's adversarial game (a generator makes inputs on which student S and teacher T disagree,
the student learns to agree) with the teacher a black box: the generator's gradient through T
is *estimated* from forward differences of teacher queries, never asked of the server
(no ``InputGradient``: this works with the teacher served at the ``scores`` tier).

Per step (the official ``epoch_itrs`` iteration), with z ~ N(0, I), batch N:

* generator (``g_iter`` times): pre = G(z) before the output activation, x = a(pre) with
  a(p) = lo + (hi - lo) (tanh(p) + 1) / 2; the per-sample loss is
  l_n(pre_n) = -(1/K) sum_k |S(a(pre_n))_k - T~(a(pre_n))_k| (minus the L1 between logits,
  K classes) and the generator minimises L_G = (1/N) sum_n l_n. Its gradient w.r.t. pre_n is
  estimated by forward differences along m random directions u_j uniform on the unit sphere
  of R^d (d = C H W), probing in the pre-activation space as the official code does::

      grad_n ~= (1/N) (d/m) sum_j [l_n(pre_n + eps u_j) - l_n(pre_n)] / eps * u_j

  and back-propagated through G only (``pre.backward(grad)``). The teacher is queried at the
  N (m + 1) points a(pre_n + eps u_j) and a(pre_n) in one request; S is evaluated locally in
  eval mode (as the official code does while probing).
* student (``d_iter`` times): x = a(G(z)) detached, minimise (1/(N K)) sum |S(x) - T~(x)|.

T~ is the teacher's logits after the paper's logit correction. The paper's victim returns
probabilities, so it recovers logits as log p - mean_k log p ("mean" correction, its
default). This server serves logits, so no recovery is needed; but log softmax(t) -
mean_k log softmax(t) = t - mean_k t exactly, so ``logit_correction="mean"`` (default)
centres the served logits and the student sees precisely what the paper's attack computes
from probabilities; ``"none"`` uses the raw logits (DFAD's setting).

Queries per step: N (g_iter (m + 1) + d_iter), every probe counted by the server as a sample
(``gradient_samples`` stays 0). Defaults from the official code: m = 1 (``grad_m``, the
CIFAR-10 script), eps = 1e-3 (``grad_epsilon``), g_iter = 1, d_iter = 5, nz = 256, generator
Adam (lr ``config.generator_lr``; the CIFAR-10 script uses 5e-4), learning rates x 0.3 at 10%,
30% and 50% of the steps (multistep, ``steps`` / ``scale``).

Assumed or simplified:

* the student's recipe is the shared trainer's (``DataFreeConfig``: Adam at ``config.lr``); the
  paper uses SGD lr 0.1, momentum 0.9, weight decay 5e-4: ``student_optimizer="sgd"``;
* the generator is the project's DAFL/DFAD generator (common.Generator, the same blocks as the
  official GeneratorA) with its last BatchNorm (affine=False) moved before the activation as
  in GeneratorA; the activation maps to ``input_range`` (the paper's tanh gives [-1, 1], the
  bundled digits are in [0, 1]);
* the official estimator divides by N K (K classes) where the gradient of the batch-mean loss
  has 1/N: the extra constant 1/K only rescales the estimate, which Adam ignores;
* only the paper's L1 loss (not its KL variant, MAZE's), and no query budget other than
  ``steps`` (the server's ``query_budget`` can bound it).

Measured on the bundled digits (DEMO: 250 steps, 112k score queries, 40-50 s on a loaded CPU
core; DigitsCNN teacher 0.980): student 0.25 / 0.30 / 0.21 for seeds 0 / 1 / 2. The generator
hardly leaves the noise-like images the teacher calls 9 or 5; with the exact gradient
(white-box, i.e. DFAD) the same budget gives ~0.33, so the game, not the estimator, is what
limits it here (the paper spends 2-20M queries).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kd.core.data import Dataset
from kd.student_trainer.datafree import register
from kd.student_trainer.datafree.common import DataFreeConfig, DataFreeResult, Generator, Run, ServedTeacher

NAME = "dfme"
PAPER = "Truong, Maini, Walls, Papernot 2021, Data-Free Model Extraction (CVPR 2021, arXiv 2011.14779)"

DEFAULTS: dict[str, object] = {
    "m": 1,  # random directions per sample for the forward differences (official grad_m)
    "epsilon": 1e-3,  # forward-difference step (official grad_epsilon)
    "g_iter": 1,  # generator updates per step
    "d_iter": 5,  # student updates per step
    "nz": 256,  # generator noise size
    "generator_width": 64,  # DFAD/DAFL ngf
    "logit_correction": "mean",  # "mean": centre the logits (= the paper's recovery from probs); "none": raw
    "input_range": (0.0, 1.0),  # what the activation maps to
    "lr_milestones": (0.1, 0.3, 0.5),  # fractions of steps where both learning rates are multiplied by lr_gamma
    "lr_gamma": 0.3,
    "student_optimizer": "adam",  # "adam" (config.lr) or "sgd" (the paper's: momentum 0.9, weight decay 5e-4)
    "log": None,  # called as log(step, {"loss_g": ..., "loss_s": ...}) after each step
    "generator": None,  # a PreActivationGenerator to train (e.g. to keep or inspect it); default: a fresh one
}

DEMO = {
    "config": {"steps": 250, "batch_size": 64, "lr": 0.1, "generator_lr": 1e-3, "seed": 0},
    "options": {"student_optimizer": "sgd", "generator_width": 32, "nz": 64},
}


# -- the pieces, each testable on its own ----------------------------------------------------------
def correct_logits(t: torch.Tensor, mode: str) -> torch.Tensor:
    """The paper's logit correction: "mean" gives t - mean_k t (= log softmax(t) - its mean)."""
    if mode == "mean":
        return t - t.mean(dim=1, keepdim=True)
    if mode == "none":
        return t
    raise ValueError(f"logit_correction must be 'mean' or 'none', got {mode!r}")


def l1_per_sample(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(1/K) sum_k |s_k - t_k| per row: the official ``F.l1_loss(reduction='none').mean(1)``."""
    return (s - t).abs().mean(dim=1)


def sphere_directions(n: int, m: int, shape: tuple[int, ...], generator: torch.Generator | None = None):
    """[n, m, *shape] directions uniform on the unit sphere of R^prod(shape) (normalised Gaussians)."""
    u = torch.randn(n, m, math.prod(shape), generator=generator)
    return (u / u.norm(dim=2, keepdim=True)).reshape(n, m, *shape)


def forward_difference_gradient(f0: torch.Tensor, fu: torch.Tensor, u: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Per-sample zeroth-order gradient estimate (d/m) sum_j (f(x + eps u_j) - f(x)) / eps u_j.

    ``f0`` [N] values at x, ``fu`` [N, m] values at the probes, ``u`` [N, m, *shape] unit directions
    -> [N, *shape]."""
    n, m = fu.shape
    d = u[0, 0].numel()
    w = (fu - f0[:, None]) / epsilon  # [N, m]
    return (d / m) * (w.reshape(n, m, *([1] * (u.dim() - 2))) * u).sum(dim=1)


class PreActivationGenerator(nn.Module):
    """The DFAD/DFME generator (official GeneratorA) built from common.Generator's blocks: it
    returns the image *before* the output activation (what DFME perturbs), whose last layer is
    BatchNorm without affine (GeneratorA's order: conv -> BN -> tanh)."""

    def __init__(self, shape: tuple[int, ...], nz: int, width: int) -> None:
        super().__init__()
        g = Generator(shape, nz=nz, width=width)
        self.nz, self.width, self.init = nz, width, g.init
        self.l1 = g.l1
        self.trunk = g.blocks[:-2]  # up to the last conv (drops DAFL's tanh and its trailing BN)
        self.out_bn = nn.BatchNorm2d(shape[0], affine=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.l1(z).view(len(z), 2 * self.width, *self.init)
        return self.out_bn(self.trunk(x))


def activation(pre: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """tanh mapped to [lo, hi]."""
    return lo + (hi - lo) * (torch.tanh(pre) + 1) / 2


@torch.no_grad()
def estimate_generator_gradient(teacher: ServedTeacher, student: nn.Module, pre: torch.Tensor, *, m: int,
                                epsilon: float, correction: str, input_range: tuple[float, float]):  # fmt: skip
    """DFME's estimate of d L_G / d pre for L_G = -(1/N) sum_n l1(S(x_n), T~(x_n)), x = a(pre),
    from N (m + 1) teacher queries (one request). -> (gradient [N, *shape], L_G at pre)."""
    n, shape = len(pre), tuple(pre.shape[1:])
    u = sphere_directions(n, m, shape).to(pre.device)
    points = torch.cat([pre[:, None], pre[:, None] + epsilon * u], dim=1).reshape(n * (m + 1), *shape)
    x = activation(points, *input_range)
    was = student.training
    student.eval()
    s = student(x)
    student.train(was)
    t = correct_logits(teacher.logits(x).to(s.dtype), correction)
    values = -l1_per_sample(s, t).reshape(n, m + 1)
    grad = forward_difference_gradient(values[:, 0], values[:, 1:], u, epsilon) / n
    return grad, values[:, 0].mean()


# -- the method ----------------------------------------------------------------------------------
def _options(options: dict) -> dict:
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"dfme got unknown options {sorted(unknown)}; it takes {sorted(DEFAULTS)}")
    o = {**DEFAULTS, **options}
    for key in ("m", "g_iter", "d_iter", "nz", "generator_width"):
        if int(o[key]) < (0 if key in ("g_iter", "d_iter") else 1):
            raise ValueError(f"dfme option {key} must be a positive integer, got {o[key]!r}")
    if not float(o["epsilon"]) > 0:
        raise ValueError(f"dfme option epsilon must be > 0, got {o['epsilon']!r}")
    correct_logits(torch.zeros(1, 2), str(o["logit_correction"]))  # validates the name
    lo, hi = (float(v) for v in o["input_range"])
    if not hi > lo:
        raise ValueError(f"dfme option input_range must be (lo, hi) with hi > lo, got {o['input_range']!r}")
    o["input_range"] = (lo, hi)
    if o["generator"] is not None and not isinstance(o["generator"], PreActivationGenerator):
        raise TypeError(f"dfme option generator must be a PreActivationGenerator, got {type(o['generator']).__name__}")
    if o["student_optimizer"] not in ("adam", "sgd"):
        raise ValueError(f"dfme option student_optimizer must be 'adam' or 'sgd', got {o['student_optimizer']!r}")
    return o


def queries_per_step(batch_size: int, *, m: int, g_iter: int, d_iter: int) -> int:
    """The official cost_per_iteration: N (g_iter (m + 1) + d_iter)."""
    return batch_size * (g_iter * (m + 1) + d_iter)


@register(NAME, PAPER, tier="scores")
def run(teacher: ServedTeacher, student: nn.Module, config: DataFreeConfig, *, test: Dataset | None = None,
        **options) -> DataFreeResult:  # fmt: skip
    """``config.steps`` rounds of g_iter generator and d_iter student updates on batches of
    ``config.batch_size``; see the module docstring."""
    o = _options(options)
    if len(teacher.input_shape) != 3:
        raise ValueError(f"dfme's generator makes [C, H, W] images; teacher input is {list(teacher.input_shape)}")
    book = Run(NAME, teacher, student, config, test)
    book.keep(o)
    device = config.device
    student.to(device).train()
    generator = o["generator"]
    if generator is None:
        generator = PreActivationGenerator(teacher.input_shape, int(o["nz"]), int(o["generator_width"]))
    generator.to(device).train()
    nz = generator.nz
    opt_g = torch.optim.Adam(generator.parameters(), lr=config.generator_lr)
    # The paper's SGD (momentum 0.9, weight decay 5e-4) when asked; both learning rates x lr_gamma
    # at the lr_milestones fractions of the run (a multistep schedule of the shared trainer).
    sgd = o["student_optimizer"] == "sgd"
    asks = {"optimizer": o["student_optimizer"], "momentum": 0.9 if sgd else None,
            "weight_decay": 5e-4 if sgd else None, "schedule": "multistep", "gamma": float(o["lr_gamma"])}  # fmt: skip
    n, lo_hi, corr = config.batch_size, o["input_range"], str(o["logit_correction"])
    last: dict[str, object] = {}

    def rounds(first: int, end: int):
        """Per step: ``g_iter`` generator updates from forward differences, then ``d_iter`` student batches."""
        for step in range(first, end):
            loss_g = torch.tensor(float("nan"))
            for _ in range(int(o["g_iter"])):
                z = torch.randn(n, nz, device=device)
                pre = generator(z)
                grad, loss_g = estimate_generator_gradient(teacher, student, pre.detach(), m=int(o["m"]),
                                                           epsilon=float(o["epsilon"]), correction=corr,
                                                           input_range=lo_hi)  # fmt: skip
                if not torch.isfinite(loss_g):
                    raise FloatingPointError(f"dfme generator loss is {float(loss_g)} at step {step}")
                opt_g.zero_grad(set_to_none=True)
                pre.backward(grad)
                opt_g.step()
            for _ in range(int(o["d_iter"])):
                with torch.no_grad():  # (never yield inside it: the trainer's step would run without grad)
                    x = activation(generator(torch.randn(n, nz, device=device)), *lo_hi)
                    t = correct_logits(teacher.logits(x), corr)
                last["x"] = x
                yield x, None, t
            if o["log"] is not None:
                o["log"](step, {"loss_g": float(loss_g), "loss_s": book.last_loss})

    book.train(rounds, lambda ctx: F.l1_loss(ctx.model(ctx.inputs), ctx.teacher_logits),
               steps_per_round=max(int(o["d_iter"]), 1), extra=[(generator, opt_g)], asks=asks,
               fractions=[float(f) for f in o["lr_milestones"]])  # fmt: skip
    return book.result(last.get("x"))
