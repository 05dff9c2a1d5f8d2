"""``ka-dtd``: Wen, Lai, Qian 2019, "Preparing Lessons: Improve Knowledge Distillation with Better
Supervision": Knowledge Adjustment (KA) by Probability Shift, and Dynamic Temperature
Distillation (DTD).

KA, Probability Shift: where the teacher is wrong (argmax z_t != y), swap the teacher's value at
its predicted class with its value at the ground-truth class, so that the adjusted target peaks
at the label and keeps the teacher's other "dark knowledge". The swap is done on the logits: a
swap is a permutation, which commutes with softmax, so it is the same as swapping the
probabilities at any temperature (and is exactly TextBrewer's ``probability_shift_``). Where the
teacher is right the swap is the identity.

    z'_t = z_t with z_t[y] and z_t[argmax z_t] exchanged

DTD: a per-sample temperature around the base tau_0, lower for the samples that are harder (so
their targets are sharper and their gradients larger), with the batch mean as the pivot:

    tau_i = max(tau_0 + beta * (mean_j w_j - w_i), tau_0 / 10)
    flsw ("focal-loss-style weights"):  w_i = (1 - cos(z_s[i], z'_t[i])) ** gamma
    cwsm ("confidence weighted by student max"):  w_i = 1 / max_c softmax(z_s[i])_c

w is computed without gradient (detached student logits) and from the adjusted teacher logits.
TextBrewer adds 1e-3 to max p_s in cwsm; not needed here (max p_s >= 1/C). The floor tau_0 / 10 is
this project's guard (no source has one): it only binds when beta * (spread of w) exceeds
0.9 * tau_0, and keeps the temperature positive.

    L = alpha * (1 / B) * sum_i tau_i^2 * KL(softmax(z'_t[i] / tau_i) || softmax(z_s[i] / tau_i))
        + (1 - alpha) * CE(z_s, y)

KL: per sample, summed over classes, averaged over the batch ("batchmean"), each times its
tau_i^2 as in Hinton KD, so that with beta = 0 (or ``dtd="none"``) and a teacher that is always
right this is exactly ``kd``. ``ka="none"`` switches KA off (DTD only).

Defaults: tau_0 = 4, alpha = 0.9 (those of ``kd``), flsw with beta = 1, gamma = 1 (our choice;
the paper's per-dataset values were not found).

What this was checked against:

* The paper (arXiv 1911.07471, v1-v3): only its abstract and introduction could be retrieved (KA
  for incorrect teacher supervision, DTD for "overly uncertain" supervision). Its method section --
  the KA and DTD equations, the loss weights, beta / gamma -- was not, so the formulas above are
  STILL UNVERIFIED against the paper's own text.
* airaria/TextBrewer, which cites arXiv:1911.07471: ``src/textbrewer/distiller_utils.py``
  ``probability_shift_`` swaps the teacher's values at its argmax and at the label (as here);
  ``src/textbrewer/schedulers.py`` flsw: w = (1 - <v/|v|, t/|t|>) ** gamma and cwsm:
  w = 1 / (max softmax(v) + 1e-3), both tau = tau_0 + beta * (mean(w) - w) on detached logits (as
  here); its distillers call the scheduler on the teacher logits *after* ``probability_shift_``
  (as here). Differences: TextBrewer's ``kd_ce_loss`` (its "ce" KD loss) is the soft
  cross-entropy -- the KL up to the teacher's entropy, so the same student gradient -- with no
  tau^2 factor; here each sample's KL is scaled by tau_i^2 as in Hinton KD. TextBrewer has no
  temperature floor; some versions of its flsw add eps = 1e-4 to the norms (here: cosine, eps 1e-12).
* SforAiDl/KD_Lib ``KD_Lib/KD/vision/KA/PS.py`` swaps the teacher's top-1 and *top-2* values
  instead (the same as here only when the label is the teacher's second choice); its
  ``KA/LSR.py`` is KA's other variant, label-smoothing regularization (where the teacher is wrong
  the target becomes ``correct_prob`` at the label and the rest spread uniformly) -- not
  implemented here (``ka="lsr"`` is refused).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.student_trainer.losses import register

DTD_MODES = ("flsw", "cwsm", "none")
KA_MODES = ("ps", "none")


def probability_shift(teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """z_t with the value at its argmax and the value at the label exchanged, per row (a copy)."""
    z = teacher_logits.detach().clone()
    rows = torch.arange(z.shape[0], device=z.device)
    top = z.argmax(dim=1)
    at_top = z[rows, top].clone()
    at_label = z[rows, labels].clone()
    z[rows, top] = at_label
    z[rows, labels] = at_top
    return z


def dtd_temperatures(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    beta: float,
    gamma: float,
    mode: str,
) -> torch.Tensor:
    """Per-sample temperatures tau_i [B] (no gradient flows through them)."""
    if mode not in DTD_MODES:
        raise ValueError(f"dtd must be one of {DTD_MODES}, got {mode!r}")
    dt = torch.promote_types(student_logits.dtype, torch.float32)
    b = student_logits.shape[0]
    if mode == "none" or beta == 0.0:
        return torch.full((b,), float(temperature), dtype=dt, device=student_logits.device)
    with torch.no_grad():
        s = student_logits.detach().to(dt)
        if mode == "flsw":
            cos = F.cosine_similarity(s, teacher_logits.detach().to(dt), dim=1, eps=1e-12)
            w = (1.0 - cos).clamp(min=0.0) ** gamma
        else:  # cwsm
            w = 1.0 / F.softmax(s, dim=1).amax(dim=1)
        tau = temperature + beta * (w.mean() - w)
        return tau.clamp(min=temperature / 10.0)


def _dtd_invariant(options: dict[str, object]) -> bool:
    """flsw's weights are cosines of the raw teacher logits, which a per-row shift changes (KA's swap,
    cwsm and the KL see only their softmax); beta = 0 or gamma = 0 makes every temperature tau_0,
    alpha = 0 leaves only CE."""
    return options["dtd"] != "flsw" or options["beta"] == 0 or options["gamma"] == 0 or options["alpha"] == 0


@register(
    "ka-dtd",
    "Wen, Lai, Qian 2019, Preparing Lessons: Improve Knowledge Distillation with Better Supervision",
    teacher_logits_shift_invariant=_dtd_invariant,
    couples=True,
)
def ka_dtd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 4.0,
    alpha: float = 0.9,
    beta: float = 1.0,
    gamma: float = 1.0,
    dtd: str = "flsw",
    ka: str = "ps",
) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if ka not in KA_MODES:
        raise ValueError(f"ka must be one of {KA_MODES}, got {ka!r}")
    dt = torch.promote_types(student_logits.dtype, torch.float32)
    target = probability_shift(teacher_logits, labels) if ka == "ps" else teacher_logits.detach()
    tau = dtd_temperatures(student_logits, target, temperature, beta, gamma, dtd)[:, None]
    log_s = F.log_softmax(student_logits.to(dt) / tau, dim=1)
    log_t = F.log_softmax(target.to(dt) / tau, dim=1)
    per_sample = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(dim=1)
    soft = (tau[:, 0] ** 2 * per_sample).mean()
    if alpha == 1.0:
        return alpha * soft
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student_logits, labels)
