"""Fast-DFKD: data-free KD with a meta-learned generator, against a served teacher.

Paper: Gongfan Fang, Kanya Mo, Xinchao Wang, Jie Song, Shitao Bei, Haofei Zhang, Mingli Song.
"Up to 100x Faster Data-free Knowledge Distillation." AAAI 2022, arXiv:2112.06253. Official
code: zju-vipa/Fast-Datafree (``datafree/synthesis/fast_meta.py``, ``datafree_kd.py``,
``scripts/fast_cifar.sh``).

DeepInversion optimises every batch from noise for thousands of steps; Fast-DFKD keeps a
generator G_theta whose weights are a meta-learned *initialisation* shared by all batches, so
that a few (k = ``g_steps``) inner steps adapt a copy of it to a new batch. One round:

    z ~ N(0, I) [B, nz], y ~ U{0..C-1};  theta' <- theta (a copy);  A = random shift (+ flip)
    k times:  x = G_theta'(z),  minimise over (theta', z) with Adam (lr_g, lr_z; betas 0.5, 0.999)
        L_G = a_bn * R_bn^mmt(A(x)) + a_oh * CE(t(A(x)), y) + a_adv * L_adv(A(x))
        R_bn^mmt = sum_l ||running_mean_l - ((1 - m) mu_l + m mu_bar_l)||_2
                       + ||running_var_l - ((1 - m) var_l + m var_bar_l)||_2
        L_adv = -mean_i [argmax s(x_i) = argmax t(x_i)] * KL(softmax t(x_i) || softmax s(x_i))
    meta update of theta with Adam(lr = lr_g * k, betas 0.5, 0.999) on
        FOMAML (``meta="fomaml"``, the official ``is_maml=1``): the sum over the k inner steps of
        the gradients w.r.t. theta' at that step;
        Reptile (``meta="reptile"``, ``is_maml=0``): theta - theta'_k.
    the batch x of least L_G (the inputs seen before an inner step) joins a memory bank with
    the teacher's logits on it; the student then takes ``kd_steps`` steps of
        L_S = T^2 KL(softmax(t(x)/T) || softmax(s(x)/T))   on random batches of the bank.

(mu_l, var_l) are the batch statistics at the input of the teacher's BN layer l and
(mu_bar_l, var_bar_l) their exponential moving average over past batches with momentum
m = ``bn_momentum``; the average and R_bn live on the server (``BatchNormLoss`` with a
``state_id``): R_bn, its input gradient and the logits come in one call, the VJP of the
logits' gradient in a second one (``deepinversion.bn_loss_and_logits``). The adversarial term
and KD start after ``warmup`` rounds (synthesis only before that). Queries per round:
2 * B * k gradient samples + B samples.

Defaults and their source: the official ``scripts/fast_cifar.sh`` ResNet-34 -> ResNet-18 line
(the one the README's 94.05% on CIFAR-10 comes from, "modify --dataset to apply to CIFAR10"):
``--g_steps 2 --lr_z 0.015 --lr_g 5e-3 --bn 10 --oh 0.5 --adv 1.33 --bn_mmt 0.9 --warmup 20
--kd_steps 400 --ep_steps 400 --T 20 --is_maml 1``; nz = 256 and the generator (linear ->
BN -> 2x up -> conv -> BN -> LeakyReLU(0.2) -> 2x up -> conv -> BN -> LeakyReLU -> conv ->
sigmoid, ngf = 64) of ``datafree/models/generator.py``; the synthesis augmentation is
``RandomCrop(padding=4)`` + ``RandomHorizontalFlip`` (``shift``, ``flip``); random targets.
``lr_g`` is ``config.generator_lr`` (set it to 5e-3 for the official value), T is
``config.temperature`` (official 20), one round = one official "epoch" (ep_steps / kd_steps = 1).

Assumed or simplified: the official hook commits the momentum state once per round, from the
last inner step's statistics, and every inner step reads the committed state; the server
updates a state on each call, so inner step j uses its own state id and reads the average of
inner step j's statistics over past rounds -- exact for the last step and for the committed
average, an approximation for the earlier ones. No ``reset_l0`` (its official condition is
always true and resets every layer). The student is distilled with the shared trainer's
recipe (``DataFreeConfig``: Adam by default) decayed per step with a cosine to 0 over the KD
steps (``student_schedule``)
instead of SGD(lr 0.2, momentum 0.9, wd 1e-4) with a per-epoch cosine to 2e-4, on
the bank's stored logits without the official re-query on augmented samples. The generator's
sigmoid output is in [0, 1]: a teacher expecting normalised inputs would need the official
``normalizer`` after it (not implemented). Reptile's gradient drops the official factor 67
(Adam is invariant to it up to eps).
"""

from __future__ import annotations

import copy
import math
import uuid

import torch
import torch.nn.functional as F
from torch import nn

from kd.core.data import Dataset
from kd.student_trainer.datafree import register
from kd.student_trainer.datafree.common import DataFreeConfig, DataFreeResult, Run, ServedTeacher
from kd.student_trainer.datafree.deepinversion import (
    SyntheticBank,
    bank_batches,
    batch_targets,
    bn_loss_and_logits,
    kd_on_bank,
    merge_options,
    require_white,
    student_asks,
    value,
)

NAME = "fast-dfkd"
PAPER = (
    "Fang, Mo, Wang, Song, Bei, Zhang, Song. Up to 100x Faster Data-free Knowledge Distillation. AAAI 2022, "
    "arXiv:2112.06253"
)

DEFAULTS: dict[str, object] = {
    "g_steps": 2,  # inner adaptation steps per batch
    "lr_z": 0.015,
    "nz": 256,
    "ngf": 64,
    "bn_weight": 10.0,
    "oh_weight": 0.5,
    "adv_weight": 1.33,
    "bn_momentum": 0.9,
    "warmup": 20,  # rounds of synthesis only (no KD, no adversarial term)
    "kd_steps": 400,
    "student_schedule": "cosine",  # or "constant"
    "meta": "fomaml",  # or "reptile"
    "shift": 4,  # random crop with this zero padding (pixels)
    "flip": True,
    "targets": "random",  # or "cycle"
    "state_ttl": 3600.0,  # seconds the server keeps the BN momentum state between rounds
    "generator": None,  # an nn.Module [B, nz] -> inputs; None: a new MetaGenerator
}


class MetaGenerator(nn.Module):
    """Fast-Datafree's generator for [C, H, W] images (H, W multiples of 4), output in [0, 1]."""

    def __init__(self, shape: tuple[int, ...], nz: int = 256, ngf: int = 64) -> None:
        super().__init__()
        if len(shape) != 3 or shape[1] % 4 or shape[2] % 4:
            raise ValueError(f"the generator makes [C, H, W] images with H, W multiples of 4, got {list(shape)}")
        c, h, w = shape
        self.nz, self.ngf, self.init = nz, ngf, (h // 4, w // 4)
        self.l1 = nn.Linear(nz, 2 * ngf * self.init[0] * self.init[1])
        self.blocks = nn.Sequential(
            nn.BatchNorm2d(2 * ngf),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, 2 * ngf, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * ngf),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, ngf, 3, padding=1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2),
            nn.Conv2d(ngf, c, 3, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.l1(z).view(len(z), 2 * self.ngf, *self.init))


def random_shift_flip(x: torch.Tensor, shift: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Per sample: a random crop of the zero-padded (by ``shift``) image back to its size, then a
    horizontal flip with probability 1/2 when ``flip``. Differentiable in ``x``."""
    n, _, h, w = x.shape
    if shift:
        xp = F.pad(x, (shift, shift, shift, shift))
        oy = torch.randint(0, 2 * shift + 1, (n,), generator=gen).to(x.device)
        ox = torch.randint(0, 2 * shift + 1, (n,), generator=gen).to(x.device)
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]
        x = xp[torch.arange(n, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    if flip:
        mask = (torch.rand(n, generator=gen) < 0.5).to(x.device)[:, None, None, None]
        x = torch.where(mask, x.flip(-1), x)
    return x


def adversarial_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """L_adv = -mean_i 1[argmax s_i = argmax t_i] * KL(softmax t_i || softmax s_i)."""
    mask = (student_logits.argmax(1) == teacher_logits.argmax(1)).float()
    kl = (F.softmax(teacher_logits, 1) * (F.log_softmax(teacher_logits, 1) - F.log_softmax(student_logits, 1))).sum(1)
    return -(kl * mask).mean()


def generator_loss(teacher: ServedTeacher, student: nn.Module | None, x: torch.Tensor, y: torch.Tensor, o: dict,
                   state_id: str) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    """L_G of an (augmented) batch; ``student=None`` leaves the adversarial term out (warm-up)."""
    bn, t_out = bn_loss_and_logits(teacher, x, state_id=state_id, momentum=o["bn_momentum"] if state_id else 0.0,
                                   ttl=o["state_ttl"])  # fmt: skip
    oh = F.cross_entropy(t_out, y)
    loss = o["bn_weight"] * bn + o["oh_weight"] * oh
    terms = {"bn": value(bn), "oh": value(oh)}
    if student is not None and o["adv_weight"]:
        adv = adversarial_loss(student(x), t_out)
        loss = loss + o["adv_weight"] * adv
        terms["adv"] = value(adv)
    return loss, terms


class FastSynthesizer:
    """The meta-generator and its meta optimiser; ``synthesize`` adapts a copy for one batch."""

    def __init__(self, teacher: ServedTeacher, generator: nn.Module, o: dict, lr_g: float, device: str) -> None:
        self.teacher, self.generator, self.o, self.lr_g, self.device = teacher, generator, o, lr_g, device
        self.meta_opt = torch.optim.Adam(generator.parameters(), lr=lr_g * o["g_steps"], betas=(0.5, 0.999))
        self.run_id = uuid.uuid4().hex  # names this run's BN momentum states on the server
        self.last_fast: nn.Module | None = None

    def state_dict(self) -> dict[str, object]:
        return {"generator": self.generator.state_dict(), "meta_opt": self.meta_opt.state_dict(), "run_id": self.run_id}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """A checkpoint's meta-generator and meta optimiser. The run id comes back too, so the server's
        BN momentum states (``bn_momentum`` > 0) continue while the server keeps them (``state_ttl``);
        they hold the rounds after the checkpoint as well, which makes such a resume close to, not
        exactly, the uninterrupted run (``bn_momentum=0`` resumes exactly)."""
        self.generator.load_state_dict(state["generator"])
        self.meta_opt.load_state_dict(state["meta_opt"])
        self.run_id = str(state["run_id"])

    def synthesize(self, y: torch.Tensor, student: nn.Module | None, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        o = self.o
        z = torch.randn(len(y), o["nz"], generator=gen).to(self.device).requires_grad_(True)
        fast = copy.deepcopy(self.generator).train()
        opt = torch.optim.Adam([{"params": fast.parameters()}, {"params": [z], "lr": o["lr_z"]}], lr=self.lr_g,
                               betas=(0.5, 0.999))  # fmt: skip
        params, fast_params = list(self.generator.parameters()), list(fast.parameters())
        self.meta_opt.zero_grad(set_to_none=False)
        for p in params:
            p.grad = torch.zeros_like(p)
        best, best_cost, terms = None, math.inf, {}
        was = student.training if student is not None else False
        if student is not None:
            student.eval()
        for it in range(o["g_steps"]):
            x = fast(z)
            xa = random_shift_flip(x, o["shift"], o["flip"], gen)
            state_id = f"fast-dfkd/{self.run_id}/{it}" if o["bn_momentum"] else ""
            loss, terms = generator_loss(self.teacher, student, xa, y, o, state_id)
            cost = value(loss)
            if not math.isfinite(cost):
                raise FloatingPointError(f"fast-dfkd: the generator loss is not finite ({terms})")
            if cost < best_cost or best is None:
                best_cost, best = cost, x.detach()
            opt.zero_grad(set_to_none=True)
            loss.backward(inputs=[*fast_params, z])  # the student gets no gradient from synthesis
            if o["meta"] == "fomaml":
                for p, fp in zip(params, fast_params):
                    if fp.grad is not None:
                        p.grad.add_(fp.grad)
            opt.step()
        if o["meta"] == "reptile":
            with torch.no_grad():
                for p, fp in zip(params, fast_params):
                    p.grad.copy_(p - fp)
        self.meta_opt.step()
        self.last_fast = fast  # the copy adapted to this batch, for inspection
        if student is not None:
            student.train(was)
        return best, {"loss": best_cost, **terms}


def _check(o: dict) -> dict:
    if o["meta"] not in ("fomaml", "reptile"):
        raise ValueError(f"fast-dfkd: meta must be 'fomaml' or 'reptile', got {o['meta']!r}")
    if int(o["g_steps"]) < 1 or int(o["kd_steps"]) < 0 or int(o["warmup"]) < 0 or int(o["shift"]) < 0:
        raise ValueError("fast-dfkd: g_steps must be >= 1 and kd_steps, warmup, shift >= 0")
    if not 0 <= float(o["bn_momentum"]) < 1:
        raise ValueError(f"fast-dfkd: bn_momentum must be in [0, 1), got {o['bn_momentum']}")
    if o["student_schedule"] not in ("cosine", "constant"):
        raise ValueError(f"fast-dfkd: student_schedule must be 'cosine' or 'constant', got {o['student_schedule']!r}")
    if o["targets"] not in ("cycle", "random"):
        raise ValueError(f"fast-dfkd: targets must be 'cycle' or 'random', got {o['targets']!r}")
    return o


@register(NAME, PAPER, tier="white")
def run(teacher: ServedTeacher, student: nn.Module, config: DataFreeConfig, *, test: Dataset | None = None,
        **options) -> DataFreeResult:  # fmt: skip
    """``config.steps`` rounds: one batch of ``config.batch_size`` from the adapted generator, then
    (after ``warmup`` rounds) ``kd_steps`` KD steps of the student on the bank. Options: ``DEFAULTS``."""
    o = _check(merge_options(NAME, DEFAULTS, options))
    require_white(NAME, teacher)
    if config.batch_size < 2:
        raise ValueError("fast-dfkd: BatchNorm statistics need config.batch_size >= 2")
    r = Run(NAME, teacher, student, config, test)
    gen = torch.Generator().manual_seed(config.seed)
    generator = o["generator"]
    if generator is None:
        generator = MetaGenerator(teacher.input_shape, o["nz"], o["ngf"])
    generator.to(config.device).train()
    student.to(config.device)
    synth = FastSynthesizer(teacher, generator, o, config.generator_lr, config.device)
    bank = SyntheticBank(config.device)
    r.keep(o, gen=gen, bank=bank, synth=synth)
    last: dict[str, torch.Tensor] = {}

    def rounds(first: int, end: int):
        """Per round: one batch from the adapted generator into the bank, then (after ``warmup``
        rounds) ``kd_steps`` student batches of the bank."""
        for step in range(first, end):
            y = batch_targets(o["targets"], step, config.batch_size, teacher.num_classes, gen).to(config.device)
            x, _ = synth.synthesize(y, student if step + 1 >= o["warmup"] else None, gen)
            bank.add(x, teacher.logits(x))
            last["x"] = x
            if step >= o["warmup"]:
                yield from bank_batches(bank, o["kd_steps"], config, gen)

    r.train(rounds, kd_on_bank(config), steps_per_round=lambda step: o["kd_steps"] if step >= o["warmup"] else 0,
            asks=student_asks(o["student_schedule"]))  # fmt: skip
    return r.result(last.get("x"))


# `kd demo-datafree` on the bundled digits: 5 inner steps (the official "fast5" lr_z) instead of 2,
# which leave the generator near chance for the first ~40 rounds here; a 1-pixel shift, no flip.
DEMO = {
    "config": {"steps": 80, "batch_size": 64, "lr": 3e-3, "generator_lr": 5e-3, "temperature": 4.0, "seed": 0},
    "options": {
        "g_steps": 5,
        "lr_z": 0.01,
        "warmup": 5,
        "kd_steps": 20,
        "shift": 1,
        "flip": False,
        "student_schedule": "constant",
    },
}
