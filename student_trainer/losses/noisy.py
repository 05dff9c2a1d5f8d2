"""``noisy``: Sau & Balasubramanian 2016, "Deep Model Compression: Distilling
Knowledge from Noisy Teachers" (arXiv:1610.09650).

The teacher's logits are perturbed with multiplicative Gaussian noise on a
random subset of the batch -- a regulariser that simulates learning from
several teachers -- and the student is distilled from the perturbed logits:

    r_i   ~ Bernoulli(noise_fraction)                one draw per sample i
    xi_ic ~ N(0, 1)                                  one draw per logit
    z'_t  = z_t * (1 + sqrt(noise_variance) * xi)     on the rows with r_i = 1, z_t elsewhere
    L     = kd(z_s, z'_t, y; T, alpha)
          = alpha * T^2 * KL(softmax(z'_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y)

``kd`` is this project's Hinton loss (KL "batchmean": summed over classes,
averaged over samples). Defaults: noise_fraction = 0.5, noise_variance
(sigma^2) = 0.1 (KD_Lib's ``NoisyTeacher``), and T = 4, alpha = 0.9 (this
project's ``kd`` defaults), so that noise_fraction = 0 or noise_variance = 0
is exactly ``kd``.

Choices where references disagree:

* Which samples. "A fraction alpha of the samples" is drawn here as an
  independent Bernoulli(noise_fraction) per sample (in expectation that
  fraction; unbiased for any batch size). KD_Lib instead perturbs the whole
  batch with probability alpha.
* The student loss. The paper regresses the student's logits onto the
  perturbed ones (an L2 loss, as in Ba & Caruana's mimic learning); KD_Lib and
  this function use Hinton's softened KL at temperature T. The noise fraction
  is called ``noise_fraction``, not alpha, since ``alpha`` is the KD weight as
  in ``kd``.

Randomness: with ``seed=None`` (the default) the draws come from torch's global
generator for the logits' device, so ``torch.manual_seed`` makes a run
reproducible and every step gets fresh noise. With an integer ``seed``, a
local generator seeded with it is used and the global RNG is not touched --
but then every call with the same shapes draws the *same* noise, so use it for
tests and one-off evaluations, not for training. Draw order (part of the
contract, so results are reproducible): ``rand(B)`` for r (r_i = u_i <
noise_fraction), then ``randn(B, C)`` for xi, both in the working dtype
(float32, or float64 for float64 logits) on the logits' device. With
noise_fraction = 0 or noise_variance = 0 nothing is drawn.

Needs dense teacher logits: perturbing a top-k cache would leave its stored
log-sum-exp (and so its tail mass) inconsistent.
"""

from __future__ import annotations

import math

import torch

from kd.student_trainer.losses import register
from kd.student_trainer.losses.kd import kd_loss


def perturb_teacher(
    teacher_logits: torch.Tensor,
    noise_fraction: float,
    noise_variance: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """z * (1 + sigma * xi) on a Bernoulli(noise_fraction) subset of rows, in float32 or wider."""
    if not 0.0 <= noise_fraction <= 1.0:
        raise ValueError(f"noise_fraction must be in [0, 1], got {noise_fraction}")
    if noise_variance < 0:
        raise ValueError(f"noise_variance must be >= 0, got {noise_variance}")
    dt = torch.promote_types(teacher_logits.dtype, torch.float32)
    z = teacher_logits.to(dt)
    if noise_fraction == 0 or noise_variance == 0:
        return z
    b, c = z.shape
    chosen = torch.rand(b, generator=generator, dtype=dt, device=z.device) < noise_fraction
    xi = torch.randn(b, c, generator=generator, dtype=dt, device=z.device)
    noisy = z * (1.0 + math.sqrt(noise_variance) * xi)
    return torch.where(chosen[:, None], noisy, z)


def _noise_invariant(options: dict[str, object]) -> bool:
    """z * (1 + sigma * xi) scales each logit by its own factor, so the perturbed targets depend on the
    logits' absolute values (a per-row shift of z is not a shift of the result); without noise this is
    kd, and alpha = 0 leaves only CE."""
    return options["noise_fraction"] == 0 or options["noise_variance"] == 0 or options["alpha"] == 0


@register(
    "noisy",
    "Sau & Balasubramanian 2016, Deep Model Compression: Distilling Knowledge from Noisy Teachers",
    teacher_logits_shift_invariant=_noise_invariant,
    couples=True,
)
def noisy_teacher_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 4.0,
    alpha: float = 0.9,
    noise_fraction: float = 0.5,
    noise_variance: float = 0.1,
    seed: int | None = None,
) -> torch.Tensor:
    generator = None
    if seed is not None:
        generator = torch.Generator(device=teacher_logits.device)
        generator.manual_seed(int(seed))  # 2.0 from JSON is a whole number; torch takes only an int
    noisy = perturb_teacher(teacher_logits, noise_fraction, noise_variance, generator)
    return kd_loss(student_logits, noisy, labels, temperature=temperature, alpha=alpha)
