"""Heo, Lee, Yun & Choi 2019: KD with boundary-supporting adversarial samples (BSS), data-free.

Byeongho Heo, Minsik Lee, Sangdoo Yun, Jin Young Choi, "Knowledge Distillation with
Adversarial Samples Supporting Decision Boundary", AAAI 2019, arXiv:1805.05532; official
code bhheo/BSS_distillation (``attacks/attack_BSS.py``, ``train_BSS_distillation.py``).

Boundary-supporting samples (BSS): starting from a transfer-set sample x0 that the teacher
assigns to its base class b, and a target class k, a targeted attack through the teacher
moves x toward the b/k decision boundary:

    g_i      = grad_x (f_k(x_i) - f_b(x_i))          (through the server's input gradient)
    x_{i+1}  = clip(x_i + eta * (f_b(x_i) - f_k(x_i) + 1e-4) * g_i / ||g_i||_2)

for at most ``attack_steps`` steps; a sample stops as soon as the teacher no longer
predicts b for it (it reached / crossed the boundary). f are the teacher's logits. To first
order a step shrinks the margin f_b - f_k by the factor (1 - eta * ||g||): eta depends on
the input scale. The official eta = 0.3 suits its normalised CIFAR inputs; on the 8x8
digits in [0, 1] (||g|| ~ 10) it jumps far past the boundary in one step, so the demo
uses eta = 0.05 (margins shrink ~2x per step, samples end near the boundary). The
update is the official code's (the gradient normalised once, not DeepFool's ||g||^2);
the paper's printed equation was not checked against it. The
target class is drawn from the teacher's softmax over the classes other than b
(probability proportional to p_k). Defaults from the official code: eta = 0.3, 10 steps,
L2-normalised gradient, no overshoot; ``attack_size`` = 64 base samples per batch (of
256 there; the demo keeps that quarter: 16 of 64), the correctly classified ones (here:
teacher argmax == the class the sample was made for) with the largest student/teacher
disagreement sum_{j != y} (p_t,j - p_s,j)^2.

Student loss per batch (official ``train_attack_CE``), with progress p = step / steps:

    L = ce_weight * CE(s(x), y) + alpha(p) * H_T(t(x), s(x)) + beta(p) * H_T(t(x_bss), s(x_bss))
    H_T(t, s) = -(1/N) sum_n sum_c softmax(t_n / T)_c log softmax(s_n / T)_c
    alpha(p) = 3 * max(1 - p, 0) + 1        (4 -> 1)
    beta(p)  = 2 * max(1 - 4p/3, 0)         (2 -> 0 at 3/4 of training; no attack after that)

T = ``config.temperature`` (official: 3). H_T is the official soft cross-entropy (no T^2
factor); it equals KL(t || s) at temperature T plus the teacher's entropy, so its student
gradients are those of the KL.

Data-free transfer set (the choice this module makes): the paper attacks real training
samples; here the base set is synthesised by Lopes et al.'s record-based reconstruction
(``student_trainer.datafree.lopes.Reconstructor``, variant ``base_variant``), so the
method needs the teacher's activation records as well as input gradients (WHITE tier).
y is the class each reconstruction was drawn for (the paper's ground-truth label; the
teacher agrees with it for nearly all reconstructions and disagreeing samples are never
attacked). Lopes's reconstructions are preferred over the DAFL generator because they are
made once, before distillation, like a real transfer set, and each carries the class it
was made for.

Steps: ``base_batches`` reconstructed batches of ``config.batch_size`` form the base set
(their teacher logits are queried once); then ``config.steps`` student steps each take a
random minibatch of it, run the attack on up to ``attack_size`` of its samples, and
update the student with L. The learning rate follows the official step schedule (x0.1 at
half of the steps, x0.01 at 3/4: the trainer's multistep schedule) on the config's recipe
(Adam at ``config.lr`` by default) instead of SGD from 0.1.
Simplifications: a fixed synthetic base set instead of epochs over real data with
augmentation; the official clip range [-2.5, 2.5] (normalised CIFAR) becomes
``input_range``.

Queries: the base set costs what lopes costs; each attack step is one input-gradient
request (which also returns the logits) for the samples still on their base class, and
each batch adds ``attack_size`` samples for the teacher's logits on the final BSS.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.core.data import Dataset
from kd.student_trainer.datafree import register
from kd.student_trainer.datafree.common import DataFreeConfig, DataFreeResult, Run, ServedTeacher, given_options
from kd.student_trainer.datafree.lopes import Reconstructor, for_student

NAME = "adv-samples"
PAPER = ("Heo, Lee, Yun & Choi 2019, Knowledge Distillation with Adversarial Samples Supporting Decision Boundary, "
         "AAAI 2019, arXiv:1805.05532")  # fmt: skip

# Settings for ``kd demo-datafree`` on the bundled digits (records of logits, layer1, layer2).
DEMO = {
    "config": {"steps": 800, "batch_size": 64, "lr": 1e-2, "temperature": 3.0},
    "options": {"base_batches": 12, "base_iterations": 50, "attack_size": 16, "attack_steps": 4, "eta": 0.05},
}


def alpha_schedule(progress: float) -> float:
    """Weight of the KD term on the transfer set (official: 4 at the start, 1 at the end)."""
    return 3.0 * max(1.0 - progress, 0.0) + 1.0


def beta_schedule(progress: float) -> float:
    """Weight of the BSS term (official: 2 at the start, 0 from 3/4 of training on)."""
    return 2.0 * max(1.0 - 4.0 / 3.0 * progress, 0.0)


def lr_factor(progress: float) -> float:
    """The official step schedule: the learning rate / 10 at half of training, / 100 at 3/4 (the
    trainer's multistep schedule with milestones at those fractions of the steps)."""
    return 1.0 if progress < 0.5 else 0.1 if progress < 0.75 else 0.01


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """H_T(t, s): -(1/N) sum softmax(t/T) * log_softmax(s/T) (the official KD term)."""
    p = F.softmax(teacher_logits.detach() / temperature, 1)
    return -(p * F.log_softmax(student_logits / temperature, 1)).sum() / len(student_logits)


def bss_loss(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, s_adv: torch.Tensor | None, t_adv: torch.Tensor | None,
             *, alpha: float, beta: float, temperature: float, ce_weight: float = 1.0) -> torch.Tensor:  # fmt: skip
    """The student's loss on one batch (see the module docstring)."""
    loss = ce_weight * F.cross_entropy(s, y) + alpha * soft_cross_entropy(s, t, temperature)
    if beta > 0 and s_adv is not None and t_adv is not None and len(s_adv):
        loss = loss + beta * soft_cross_entropy(s_adv, t_adv, temperature)
    return loss


def select_bases(t_logits: torch.Tensor, s_logits: torch.Tensor, y: torch.Tensor, size: int) -> torch.Tensor:
    """Indices of the samples to attack: teacher-correct ones, the ``size`` with the largest
    sum_{j != y} (p_t,j - p_s,j)^2 when there are more."""
    ok = torch.nonzero(t_logits.argmax(1) == y).flatten()
    if len(ok) <= size:
        return ok
    diff = (F.softmax(t_logits[ok], 1) - F.softmax(s_logits[ok].detach(), 1)) ** 2
    score = diff.sum(1) - diff.gather(1, y[ok, None]).squeeze(1)
    return ok[score.argsort(descending=True)[:size]]


def sample_targets(t_logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A target class per sample, drawn from the teacher's softmax without its top class."""
    p = F.softmax(t_logits.detach().double(), 1).cpu()
    top = p.argmax(1, keepdim=True)
    p.scatter_(1, top, 0.0)
    p[p.sum(1) <= 0] = 1.0  # every other probability underflowed: uniform over the rest
    p.scatter_(1, top, 0.0)
    return torch.multinomial(p, 1, generator=gen).squeeze(1).to(t_logits.device)


def boundary_samples(teacher: ServedTeacher, x0: torch.Tensor, base: torch.Tensor, target: torch.Tensor, *,
                     steps: int = 10, eta: float = 0.3,
                     input_range: tuple[float, float] | None = (0.0, 1.0)) -> tuple[torch.Tensor, int]:  # fmt: skip
    """The BSS attack from ``x0`` (base classes ``base``, targets ``target``) through the
    teacher's input gradient; -> (samples, steps run). One request per step, for the
    samples the teacher still assigns to their base class."""
    x = x0.detach().clone()
    active = torch.arange(len(x), device=x.device)
    onehot = F.one_hot(target, teacher.num_classes).float() - F.one_hot(base, teacher.num_classes).float()
    done = 0
    for _ in range(steps):
        if len(active) == 0:
            break
        xa = x[active]
        grad, outs = teacher.client.input_gradient(teacher.name, teacher.to_wire(xa), {"logits": onehot[active].cpu()},
                                                   return_outputs=True)  # fmt: skip
        logits = outs["logits"].to(x.device)
        done += 1
        still = logits.argmax(1) == base[active]
        if not bool(still.any()):
            break
        idx, grad, logits = active[still], grad.to(x.device)[still].reshape(-1, *x.shape[1:]), logits[still]
        rows = torch.arange(len(idx), device=x.device)
        margin = logits[rows, base[idx]] - logits[rows, target[idx]]
        norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
        shape = (-1,) + (1,) * (x.dim() - 1)
        step = (eta * (margin + 1e-4) / norm).reshape(shape) * grad
        x[idx] = x[idx] + step
        if input_range is not None:
            x[idx] = x[idx].clamp(*input_range)
        active = idx
    return x, done


@register(NAME, PAPER, tier="white")
def run(
    teacher: ServedTeacher,
    student: nn.Module,
    config: DataFreeConfig,
    *,
    test: Dataset | None = None,
    base_batches: int = 16,
    base_variant: str = "all-layers",
    base_iterations: int = 1000,
    base_lr: float = 0.07,
    attack_size: int = 64,
    attack_steps: int = 10,
    eta: float = 0.3,
    ce_weight: float = 1.0,
    input_range: tuple[float, float] | None = (0.0, 1.0),
    **unknown: object,
) -> DataFreeResult:
    """Make a data-free base set with lopes, then distil with BSS for ``config.steps``
    student steps (see the module docstring). Options: ``base_batches``, ``base_variant``,
    ``base_iterations``, ``base_lr`` (the lopes reconstruction), ``attack_size``,
    ``attack_steps``, ``eta`` (the attack), ``ce_weight`` (the CE term), ``input_range``."""
    if unknown:
        raise TypeError(f"adv-samples: unknown option(s) {sorted(unknown)}; valid: base_batches, base_variant, "
                        "base_iterations, base_lr, attack_size, attack_steps, eta, ce_weight, input_range")  # fmt: skip
    if base_batches < 1 or attack_size < 0 or attack_steps < 0:
        raise ValueError("base_batches must be >= 1 and attack_size, attack_steps >= 0, got "
                         f"{base_batches}, {attack_size}, {attack_steps}")  # fmt: skip
    r = Run(NAME, teacher, student, config, test)
    maker = Reconstructor(teacher, variant=base_variant, iterations=base_iterations, lr=base_lr,
                          input_range=input_range, seed=config.seed, device=config.device)  # fmt: skip
    xs, ys = zip(*(maker.batch(config.batch_size) for _ in range(base_batches)))
    pool_x, pool_y = torch.cat(xs), torch.cat(ys)
    pool_t = torch.cat([teacher.logits(pool_x[s : s + 256]) for s in range(0, len(pool_x), 256)])
    student.to(config.device).train()
    gen = torch.Generator().manual_seed(config.seed + 1)
    r.keep(given_options(run, locals()), gen=gen)  # the base set is made again, the same, before a resume
    now: dict[str, object] = {}

    def rounds(first: int, end: int):
        """One student batch of the base set per step (its BSS are made in the loss: they need the
        student's logits on the batch)."""
        for step in range(first, end):
            idx = torch.randint(len(pool_x), (min(config.batch_size, len(pool_x)),), generator=gen).to(pool_x.device)
            now["progress"] = (step + 1) / config.steps
            yield pool_x[idx], pool_y[idx], pool_t[idx]

    def loss(ctx) -> torch.Tensor:
        x, y, t = ctx.inputs, ctx.labels, ctx.teacher_logits
        alpha, beta = alpha_schedule(now["progress"]), beta_schedule(now["progress"])
        s = ctx.model(for_student(student, x))
        s_adv = t_adv = None
        if beta > 0 and attack_size > 0 and attack_steps > 0:
            pick = select_bases(t, s, y, attack_size)
            if len(pick):
                targets = sample_targets(t[pick], gen)
                x_adv, _ = boundary_samples(teacher, x[pick], t[pick].argmax(1), targets, steps=attack_steps, eta=eta,
                                            input_range=input_range)  # fmt: skip
                t_adv = teacher.logits(x_adv)
                s_adv = ctx.model(for_student(student, x_adv))
        return bss_loss(s, t, y, s_adv, t_adv, alpha=alpha, beta=beta, temperature=config.temperature,
                        ce_weight=ce_weight)  # fmt: skip

    # The official step schedule (x0.1 at half of the steps, x0.01 at 3/4) as the trainer's multistep.
    r.train(rounds, loss, asks={"schedule": "multistep"}, fractions=(0.5, 0.75))
    return r.result(pool_x)
