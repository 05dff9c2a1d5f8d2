"""``kd explain``: the knowledge a model encodes, measured as in Cheng, Rao, Chen, Zhang,
"Explaining Knowledge Distillation by Quantifying the Knowledge" (CVPR 2020, arXiv 2003.03622).

**Sources, and what is checked.** The paper's method section could not be read (stored copies
of the full text return their opening only), so no section or equation numbers are cited and
the formulas below are our reading of: the abstract and introduction; a copy of the authors'
own Chinese write-up (zhuanlan.zhihu.com/p/113811002, reposted on a public blog; its formulas
were images and are lost, its prose survives); and, for the perturbation model, the public
code of the group's earlier explainer (Guan, Wang, Zhang, Chen, He, Xie, ICML 2019, cited by
the paper for this method). The write-up confirms in words: Gaussian noise with one amplitude
``sigma_i`` per pixel, the image's entropy as the sum of pixel entropies, a concept as a pixel
whose entropy is clearly below the mean background entropy, ``m_x`` as the epoch with the most
foreground concepts *per image*, the optimisation path length (not the epoch count) up to it,
its mean and its "variance" (方差) over images, and rho as the concepts finally used over all
concepts learned during training. Guan et al.'s ``Interpreter.py`` minimises
``mean_d (Phi(x + eps)_d - Phi(x)_d)^2 / std_d^2 - rate * mean_i log sigma_i`` ("Eqn. (7)"
there) with ``sigma = scale * sigmoid(ratio)``; where we differ from it, "vs Guan" says so.

The paper explains why a KD student beats the same network trained on labels (the baseline)
by counting *visual concepts*: input pixels whose information an intermediate layer keeps.
Its three groups of metrics, for a model trained from scratch and saved at several epochs:

1. **Quantity of concepts.** For an input ``x`` and the layer's feature ``f* = f(x)``, the
   pixel-wise entropy ``H_i`` of the information the layer discards: Gaussian perturbations
   ``x' = x + sigma * eps`` (``eps ~ N(0, I)``, one ``sigma_i`` per pixel, shared by a pixel's
   channels) as large as possible while the feature stays close. The Lagrangian::

       min_sigma  Loss(sigma) = E_{x'}[ ||f(x') - f*||^2 ] / delta_f^2  -  lambda * sum_i H_i,
       H_i = C * (log sigma_i + 1/2 log(2 pi e))   (C channels; the entropy of N(x_i, sigma_i^2))

   solved by Adam on ``sigma`` with fresh noise each step (``samples`` draws). ``delta_f^2``
   normalises the distance; we take the layer's total feature variance over the evaluated
   images (sum over dimensions), so ``lambda`` reads as a distortion budget: for a layer that
   is linear near ``x``, the optimum's normalised distortion is exactly ``n lambda / 2``
   (``n`` pixels; ``sigma_i^2 = lambda delta_f^2 / (2 ||J_i||^2)``, ``J_i`` the Jacobian's
   column of pixel i -- the closed form the tests check). vs Guan: they divide each feature
   dimension by its own variance over a sample of inputs (a dimension with little spread
   weighs more; ours weighs dimensions by their raw squared change) and take means where we
   take sums (a constant rescaling of ``lambda``). ``sigma`` is bounded by ``sigma_max``
   (``sigma = sigma_max * sigmoid(s)``, as Guan's ``scale * sigmoid(ratio)``), so a pixel the
   layer ignores gets a finite entropy. vs Guan: we start ``s`` small (``sigma_init``; they
   draw ``ratio ~ N(0, 1)``) with a cosine-decayed rate and keep the last iterate (they keep
   the lowest-loss one). The paper's own ``lambda``, ``b``, any grouping of pixels and its
   optimiser settings are unknown to us; ours are set for the 8x8 digits.
   The background's mean entropy ``H_bg`` (per image) is the baseline; pixel i is a *concept*
   when ``H_bg - H_i > b``. ``N_fg`` and ``N_bg`` count the concepts on the foreground and on the
   background, ``lambda_ratio = E_x[N_fg / (N_fg + N_bg)]`` (images without concepts are left
   out of this mean, and counted). Unchecked: this ratio's exact form (an unofficial summary
   writes ``N_fg / N_bg``; ours stays in [0, 1]). The paper (abstract, intro): a KD student
   has more foreground concepts and fewer background ones.
2. **Learning simultaneously (D_mean, D_std).** With ``w_k`` the weights after epoch ``k``
   and ``m_x = argmax_k N_fg(x; w_k)`` the epoch at which image ``x`` has most foreground
   concepts (the first such epoch), the weight distance
   ``D(x) = sum_{k=1..m_x} ||w_k - w_{k-1}|| / ||w_0||``; ``D_mean = E_x[D(x)]`` (small: the
   concepts are learned early on the optimisation path) and ``D_std`` its spread over images
   (small: the concepts of different images are learned at the same time). We report the
   population standard deviation; the write-up says "variance", the name says std: whether the
   paper takes the root is unchecked (for one run it does not change which model is smaller).
   Consecutive *given* checkpoints stand for consecutive epochs: with one checkpoint every
   ``k`` epochs the path is measured by chords of ``k`` epochs (shorter than the per-epoch path).
3. **Stability of the optimisation direction (rho).** ``S_j(x)`` the set of foreground
   concepts at epoch ``j``, ``M`` the last one: ``rho = E_x[|S_M| / |S_1 u ... u S_M|]``;
   high: few concepts learned and then dropped (fewer detours). Images whose union is empty
   are left out. (The write-up's "finally used" supports ``S_M``, the last epoch.)

Epoch 0 (the initialisation) enters only as ``w_0``: ``m_x`` and the sets run over epochs >= 1.

**Foreground on digits (ours; the paper uses object annotations).** The 8x8 digits carry no
object annotation; a pixel is foreground for an image of class ``c`` when the class's mean
training image has ink above ``fg_threshold`` (default 0.25 of full scale, i.e. 4/16 of the raw
0..16 intensity): about 30 of 64 pixels per class. Everything else, including the always-blank
border, is background.

The layer: by default the input of the model's last ``nn.Linear`` (the features the
classifier reads; the 16 hidden units of the demo's 64-16-10 student), or any module's
output by name. Dropout and BatchNorm run in eval mode.

``explain_models`` measures checkpoints the caller has (``load_checkpoints`` reads a folder
of ``epoch_NNNN.safetensors`` written by ``EpochSaver``); ``explain_demo`` retrains the
``kd demo`` run's teacher and students with their seeds (bit-identical: checked against the
demo's saved teacher and its per-seed accuracies), keeps their per-epoch weights and measures
them.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

HALF_LOG_2PI_E = 0.5 * math.log(2 * math.pi * math.e)
_EPOCH_RE = re.compile(r"^epoch_(\d+)\.safetensors$")


@dataclass
class ExplainConfig:
    """The metric's settings. ``lam`` is the paper's Lagrange weight (ours: the paper gives
    no value for this data); ``b`` the margin below the background's mean entropy (nats)."""

    lam: float = 0.005
    b: float = 0.25
    sigma_max: float = 1.0
    sigma_init: float = 1e-3  # the start, as a fraction of sigma_max
    samples: int = 8
    steps: int = 300
    lr: float = 0.1
    seed: int = 0
    fg_threshold: float = 0.25
    layer: str | None = None  # None: the input of the last nn.Linear
    images: int = 100  # evaluated images (the first ones of the split)
    device: str = "cpu"

    def validate(self) -> None:
        for name in ("lam", "sigma_max", "lr"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        for name in ("samples", "steps", "images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.sigma_init < 1:
            raise ValueError(f"sigma_init must be in (0, 1), got {self.sigma_init}")
        if not (math.isfinite(self.b) and self.b >= 0):  # nan and inf passed `b < 0`
            raise ValueError(f"b must be a finite number >= 0, got {self.b}")


# ----------------------------------------------------------------------------- features


def feature_fn(model: nn.Module, layer: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> f(x)`` flattened to [N, D]: the output of module ``layer``, or (None) the input of
    the model's last ``nn.Linear``. The forward stops at the layer (no logits needed)."""
    modules = dict(model.named_modules())
    if layer is None:
        linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("the model has no nn.Linear; name the layer to explain (--layer)")
        name, take_input = linears[-1], True
    else:
        if layer not in modules or layer == "":
            raise ValueError(f"no module {layer!r} in the model; its modules: {[n for n in modules if n][:40]}")
        name, take_input = layer, False

    class _Stop(Exception):
        pass

    def f(x: torch.Tensor) -> torch.Tensor:
        got: list[torch.Tensor] = []

        def hook(_m, inputs, output):
            got.append(inputs[0] if take_input else output)
            raise _Stop

        handle = modules[name].register_forward_hook(hook)
        try:
            model(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        if not got:
            raise ValueError(f"layer {name!r} was not reached by the model's forward")
        return got[0].reshape(x.shape[0], -1)

    return f


def feature_variance(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    """``delta_f^2``: the total variance of the features over the images (sum over dimensions
    of the per-dimension variance, population form)."""
    with torch.no_grad():
        feats = f(x)
    return float(feats.var(dim=0, unbiased=False).sum())


def _pixel_shape(x: torch.Tensor) -> tuple[tuple[int, ...], int]:
    """sigma's per-sample shape (channels share a pixel's sigma for [N, C, H, W]) and C."""
    if x.dim() == 4:
        return (1, *x.shape[2:]), x.shape[1]
    return tuple(x.shape[1:]), 1


def pixel_entropy(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, config: ExplainConfig,
                  delta2: float | None = None) -> torch.Tensor:  # fmt: skip
    """The paper's pixel-wise entropies ``H_i`` [N, P] (P pixels per image), from the sigma that
    minimises ``E||f(x') - f(x)||^2 / delta_f^2 - lam * sum_i H_i`` for each image (the images
    are independent: one Adam run over all of them, cosine-decayed rate, fresh noise each step)."""
    config.validate()
    delta2 = feature_variance(f, x) if delta2 is None else delta2
    if not delta2 > 0:
        raise ValueError("the layer's features do not vary over the images (delta_f^2 = 0); use more images")
    shape, channels = _pixel_shape(x)
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    with torch.no_grad():
        target = f(x)
    # sigma = sigma_max * sigmoid(s), starting small (at sigma_init * sigma_max): from below, the
    # distortion's gradients stay small, so Adam's second moment (short memory: beta2 = 0.99)
    # does not stall the approach as the large early gradients from above would.
    s0 = math.log(config.sigma_init / (1 - config.sigma_init))
    s = torch.full((x.shape[0], *shape), s0, dtype=x.dtype, device=x.device, requires_grad=True)
    opt = torch.optim.Adam([s], lr=config.lr, betas=(0.9, 0.99))
    n, k = x.shape[0], config.samples
    for step in range(config.steps):
        for group in opt.param_groups:
            group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * step / config.steps))
        sigma = config.sigma_max * torch.sigmoid(s)
        eps = torch.randn((k, *x.shape), generator=gen, dtype=x.dtype).to(x.device)
        xp = (x.unsqueeze(0) + sigma.unsqueeze(0) * eps).reshape(k * n, *x.shape[1:])
        dist = (f(xp).reshape(k, n, -1) - target.unsqueeze(0)).pow(2).sum(-1).mean(0)  # [N]
        entropy = channels * (torch.log(sigma).flatten(1).sum(1) + HALF_LOG_2PI_E * math.prod(shape))
        loss = (dist / delta2 - config.lam * entropy).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        sigma = config.sigma_max * torch.sigmoid(s)
        return (channels * (torch.log(sigma) + HALF_LOG_2PI_E)).flatten(1).detach()


# ----------------------------------------------------------------------------- concepts


def digits_foreground(train_inputs: torch.Tensor, train_labels: torch.Tensor, labels: torch.Tensor,
                      threshold: float = 0.25) -> torch.Tensor:  # fmt: skip
    """Foreground masks [N, P] for images of ``labels``: pixels where the class's mean training
    image has ink above ``threshold`` (the digits have no object annotation)."""
    flat = train_inputs.flatten(1)
    classes = int(train_labels.max()) + 1
    means = torch.stack([flat[train_labels == c].mean(0) for c in range(classes)])
    return means[labels] > threshold


def concepts(H: torch.Tensor, foreground: torch.Tensor, b: float) -> torch.Tensor:
    """Concept masks [N, P]: pixels with ``H_i < H_bg - b``, ``H_bg`` the image's mean
    background entropy. An image without background pixels has no baseline: an error."""
    bg = ~foreground
    if bool((bg.sum(1) == 0).any()):
        raise ValueError("an image has no background pixel, so no background entropy baseline; lower the threshold")
    h_bg = (H * bg).sum(1) / bg.sum(1)
    return H < (h_bg - b).unsqueeze(1)


def concept_counts(H: torch.Tensor, foreground: torch.Tensor, b: float) -> dict[str, object]:
    """``N_fg``, ``N_bg`` (means over images) and ``lambda_ratio = E[N_fg / (N_fg + N_bg)]`` over
    the images with at least one concept; per-image counts alongside."""
    c = concepts(H, foreground, b)
    n_fg = (c & foreground).sum(1)
    n_bg = (c & ~foreground).sum(1)
    total = n_fg + n_bg
    has = total > 0
    ratio = float((n_fg[has].double() / total[has].double()).mean()) if bool(has.any()) else float("nan")
    return {
        "n_fg": float(n_fg.double().mean()),
        "n_bg": float(n_bg.double().mean()),
        "lambda_ratio": ratio,
        "images_without_concepts": int((~has).sum()),
        "n_fg_per_image": n_fg.tolist(),
        "n_bg_per_image": n_bg.tolist(),
    }


# ----------------------------------------------------------------------------- learning


def _flat_params(state: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([state[n].detach().double().flatten().cpu() for n in names])


def weight_path(states: list[dict[str, torch.Tensor]], names: list[str] | None = None) -> list[float]:
    """Cumulative ``sum_{k<=j} ||w_k - w_{k-1}|| / ||w_0||`` for j = 0..M (0 at j = 0), over the
    parameters ``names`` (default: every floating-point tensor of the first state)."""
    if len(states) < 2:
        raise ValueError(f"the learning metrics need >= 2 checkpoints (initial and later), got {len(states)}")
    names = names or [k for k, v in states[0].items() if v.is_floating_point()]
    for i, st in enumerate(states):
        missing = [n for n in names if n not in st]
        if missing:
            raise ValueError(f"checkpoint {i} lacks {missing[:5]}")
    w = [_flat_params(st, names) for st in states]
    norm0 = float(w[0].norm())
    if norm0 == 0:
        raise ValueError("the initial weights are all zero; ||w_0|| cannot normalise the distance")
    path = [0.0]
    for a, b in zip(w[:-1], w[1:]):
        path.append(path[-1] + float((b - a).norm()) / norm0)
    return path


def learning_metrics(path: list[float], n_fg: torch.Tensor) -> dict[str, float]:
    """``D_mean``, ``D_std`` from the cumulative weight path (j = 0..M) and the foreground
    concept counts ``n_fg`` [M + 1, N] (row 0, the initialisation, is not a candidate for m_x)."""
    if n_fg.shape[0] != len(path) or n_fg.shape[0] < 2:
        raise ValueError(f"n_fg has {n_fg.shape[0]} epochs, the path {len(path)} (need the same, >= 2)")
    m = n_fg[1:].double().argmax(0) + 1  # first maximum
    d = torch.tensor(path, dtype=torch.float64)[m]
    return {"D_mean": float(d.mean()), "D_std": float(d.std(unbiased=False)),
            "m_hat_mean": float(m.double().mean())}  # fmt: skip


def stability(fg_concepts: torch.Tensor) -> dict[str, float]:
    """``rho = E_x[|S_M| / |S_1 u ... u S_M|]`` from foreground concept masks [M + 1, N, P]
    (row 0, the initialisation, is left out); images with an empty union are left out."""
    if fg_concepts.shape[0] < 2:
        raise ValueError("rho needs the initial and at least one later checkpoint")
    union = fg_concepts[1:].any(0).sum(1)
    last = fg_concepts[-1].sum(1)
    has = union > 0
    rho = float((last[has].double() / union[has].double()).mean()) if bool(has.any()) else float("nan")
    return {"rho": rho, "images_without_concepts_ever": int((~has).sum())}


# ----------------------------------------------------------------------------- checkpoints


class EpochSaver:
    """A ``Hooks.on_epoch`` that writes ``epoch_NNNN.safetensors`` (weights after epoch NNNN,
    1-based; ``save_initial`` writes epoch 0) every ``every`` epochs and after the last."""

    def __init__(self, model: nn.Module, folder: Path, *, every: int = 1, last: int | None = None) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.model, self.folder, self.every, self.last = model, Path(folder), every, last
        self.folder.mkdir(parents=True, exist_ok=True)

    def save(self, epoch: int) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.model.state_dict().items()}
        save_file(state, str(self.folder / f"epoch_{epoch:04d}.safetensors"))

    def save_initial(self) -> None:
        self.save(0)

    def __call__(self, epoch: int, _row: dict) -> None:
        done = epoch + 1
        if done % self.every == 0 or (self.last is not None and done == self.last):
            self.save(done)


def load_checkpoints(path: str | Path) -> list[tuple[int, dict[str, torch.Tensor]]]:
    """``[(epoch, state_dict)]`` sorted by epoch: a folder of ``epoch_NNNN.safetensors``, or one
    weights file (epoch -1: only the concept counts can be measured)."""
    from kd.teacher_server.loading import TeacherLoadError, read_state_dict

    path = Path(path)
    try:
        if path.is_dir():
            found = sorted((int(m.group(1)), p) for p in path.iterdir() if (m := _EPOCH_RE.match(p.name)))
            if not found:
                raise ValueError(f"{str(path)!r} holds no epoch_NNNN.safetensors checkpoints")
            return [(e, read_state_dict(p)) for e, p in found]
        return [(-1, read_state_dict(path))]
    except TeacherLoadError as e:
        raise ValueError(str(e)) from e


# ----------------------------------------------------------------------------- the study


def explain_model(build: Callable[[], nn.Module], checkpoints: list[tuple[int, dict[str, torch.Tensor]]],
                  x: torch.Tensor, foreground: torch.Tensor, config: ExplainConfig) -> dict[str, object]:  # fmt: skip
    """Every metric for one model: the concept counts of its last checkpoint, and (with the
    initial and later checkpoints) per-epoch counts, D_mean, D_std and rho. The same noise seed
    for every checkpoint, so the curves do not jitter with the draws."""
    model = build().to(config.device)
    param_names = [n for n, _ in model.named_parameters()]
    per_epoch, masks, maps = [], [], []
    for epoch, state in checkpoints:
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"checkpoint of epoch {epoch} does not fit the model: {e}") from e
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        f = feature_fn(model, config.layer)
        H = pixel_entropy(f, x, config).cpu()
        counts = concept_counts(H, foreground, config.b)
        per_epoch.append({"epoch": epoch, **{k: v for k, v in counts.items() if not k.endswith("per_image")}})
        masks.append(concepts(H, foreground, config.b) & foreground)
        maps.append(H)
    final = per_epoch[-1]
    out: dict[str, object] = {
        "epochs": [e for e, _ in checkpoints],
        "n_fg": final["n_fg"], "n_bg": final["n_bg"], "lambda_ratio": final["lambda_ratio"],
        "images_without_concepts": final["images_without_concepts"],
        "per_epoch": per_epoch,
        "mean_entropy_map": maps[-1].mean(0).tolist(),
    }  # fmt: skip
    if len(checkpoints) >= 2 and checkpoints[0][0] == 0:
        path = weight_path([s for _, s in checkpoints], param_names)
        n_fg = torch.stack([m.sum(1) for m in masks])
        out.update(learning_metrics(path, n_fg))
        out.update(stability(torch.stack(masks)))
        out["weight_path"] = path
    out["_H_last"] = maps[-1]  # for the plots; dropped from results.json
    return out


def _plot(name: str, res: dict, x: torch.Tensor, foreground: torch.Tensor, config: ExplainConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    H = res["_H_last"]
    side = int(math.isqrt(H.shape[1]))
    square = side * side == H.shape[1]
    fig, axes = plt.subplots(1, 4 if square else 1, figsize=(13 if square else 4.5, 3.3), dpi=110)
    axes = list(axes) if square else [axes]
    if square:
        c = concepts(H, foreground, config.b)
        im = axes[0].imshow(H.mean(0).reshape(side, side).numpy(), cmap="viridis")
        axes[0].set_title("mean H_i over images (nats)", fontsize=9)
        fig.colorbar(im, ax=axes[0], fraction=0.046)
        axes[1].imshow(x[0].reshape(side, side).cpu().numpy(), cmap="gray_r")
        axes[1].set_title("image 0", fontsize=9)
        axes[2].imshow(H[0].reshape(side, side).numpy(), cmap="viridis")
        axes[2].set_title("its H_i", fontsize=9)
        show = torch.zeros(H.shape[1])
        show[c[0] & foreground[0]] = 2
        show[c[0] & ~foreground[0]] = 1
        axes[3].imshow(show.reshape(side, side).numpy(), cmap="RdYlGn", vmin=0, vmax=2)
        axes[3].contour(foreground[0].reshape(side, side).float().numpy(), levels=[0.5], colors="k", linewidths=0.8)
        axes[3].set_title("concepts: fg green, bg yellow (red: none)", fontsize=9)
        for ax in axes:
            ax.set_xticks([])
            ax.set_yticks([])
    ax = axes[-1] if not square else None
    if ax is not None:
        ax.set_axis_off()
    fig.suptitle(
        f"{name}: N_fg {res['n_fg']:.2f}, N_bg {res['n_bg']:.2f}, lambda {res['lambda_ratio']:.3f}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_curves(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    for name, res in results.items():
        rows = [r for r in res["per_epoch"] if r["epoch"] >= 0]
        if len(rows) < 2:
            continue
        a.plot([r["epoch"] for r in rows], [r["n_fg"] for r in rows], label=name)
        b.plot([r["epoch"] for r in rows], [r["n_bg"] for r in rows], label=name)
    a.set(xlabel="epoch", ylabel="N_fg (foreground concepts)")
    b.set(xlabel="epoch", ylabel="N_bg (background concepts)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def explain_models(models: dict[str, tuple[Callable[[], nn.Module], list[tuple[int, dict[str, torch.Tensor]]]]],
                   x: torch.Tensor, foreground: torch.Tensor, config: ExplainConfig,
                   out: Path | None = None) -> dict[str, dict]:  # fmt: skip
    """Every model's metrics on the images ``x`` (with their foreground masks); with ``out``, a
    plot per model (``OUT/NAME.png``), the concept curves (``OUT/concepts_per_epoch.png``) and
    ``OUT/results.json``."""
    config.validate()
    if x.shape[0] != foreground.shape[0]:
        raise ValueError(f"{x.shape[0]} images but {foreground.shape[0]} foreground masks")
    x = x.to(config.device)
    results = {}
    for name, (build, checkpoints) in models.items():
        if not checkpoints:
            raise ValueError(f"model {name!r} has no checkpoints")
        results[name] = explain_model(build, checkpoints, x, foreground, config)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for name, res in results.items():
            _plot(name, res, x.cpu(), foreground, config, out / f"{_safe(name)}.png")
        _plot_curves(results, out / "concepts_per_epoch.png")
    clean = {n: {k: v for k, v in r.items() if not k.startswith("_")} for n, r in results.items()}
    if out is not None:
        (out / "results.json").write_text(json.dumps({"config": asdict(config), "models": clean}, indent=1))
    return clean


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def digits_images(config: ExplainConfig, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``config.images`` images of a digits split and their foreground masks."""
    from kd.core.data import load_dataset

    train, data = load_dataset("digits", "train"), load_dataset("digits", split)
    n = min(config.images, len(data))
    x, y = data.inputs[:n], data.labels[:n]
    return x, digits_foreground(train.inputs, train.labels, y, config.fg_threshold)


def explain_specs(specs: dict[str, str], config: ExplainConfig, out: Path | None = None,
                  split: str = "test") -> dict[str, dict]:  # fmt: skip
    """``kd explain --model NAME=FACTORY@CHECKPOINTS`` on the bundled digits: FACTORY is a
    ``module:attr[?k=v]`` spec, CHECKPOINTS a folder of ``epoch_NNNN.safetensors`` or one file."""
    from kd.core.factory import FactoryError, FactorySpec, build, parse_factory

    models = {}
    for name, spec in specs.items():
        try:
            parsed = parse_factory(spec, "student")
        except FactoryError as e:
            raise ValueError(str(e)) from e
        if parsed.weights is None:
            raise ValueError(f"model {name!r}: give its checkpoints as FACTORY@PATH (a folder or a weights file)")
        factory = FactorySpec(parsed.factory, None, parsed.kwargs, parsed.input_shape)
        try:
            build(factory, "student")  # fail here, with the factory's message
        except FactoryError as e:
            raise ValueError(str(e)) from e
        models[name] = (lambda s=factory: build(s, "student"), load_checkpoints(parsed.weights))
    x, fg = digits_images(config, split)
    return explain_models(models, x, fg, config, out)


# ----------------------------------------------------------------------------- the demo's models


def explain_demo(demo_dir: Path, out: Path, config: ExplainConfig, *, seeds: int | None = None,
                 every: int = 10, teacher_path: bool = True) -> dict[str, object]:  # fmt: skip
    """Retrain a ``kd demo`` run's teacher and its CE and KD (cache) students with the demo's
    seeds and settings, keeping weights every ``every`` epochs (``OUT/checkpoints/NAME/``), check
    they are the demo's (the teacher's fingerprint equals the saved teacher's; each student's
    final accuracy equals the demo's for its seed), and measure them all. The KD student from the
    live server is the cache student (the demo checks they are identical), so it is not repeated.
    A demo folder without ``results.json`` (a run stopped after its cache) is read with the demo's
    defaults (300 epochs, 100 labels, 3 seeds) and the students' accuracies go unchecked.
    ``teacher_path=False`` measures the saved teacher alone (concept counts; no D or rho)."""
    from kd.core.data import load_dataset
    from kd.models import digits_student, digits_teacher
    from kd.student_trainer.sources import CacheSource
    from kd.student_trainer.train import Hooks, TrainConfig, seed_everything, train_student
    from kd.teacher_server.loading import fingerprint, load_teacher

    demo_dir, out = Path(demo_dir), Path(out)
    demo = {"epochs": 300, "labeled_samples": 100, "seeds": [0, 1, 2]}  # kd demo's defaults
    if (demo_dir / "results.json").exists():
        try:
            demo = json.loads((demo_dir / "results.json").read_text())
        except ValueError as e:
            raise ValueError(f"{str(demo_dir)!r}: its results.json is unreadable ({e})") from e
    weights = demo_dir / "teacher.safetensors"
    if not weights.is_file() or not (demo_dir / "cache").is_dir():
        raise ValueError(f"{str(demo_dir)!r} lacks teacher.safetensors or cache/ of a `kd demo` run")
    saved = load_teacher("digits", f"kd.models:digits_teacher@{weights}")
    torch.set_num_threads(min(2, torch.get_num_threads()))  # as the demo: same threads, same sums
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    epochs, labeled = int(demo["epochs"]), int(demo["labeled_samples"])
    seeds = len(demo["seeds"]) if seeds is None else seeds
    ckpt = out / "checkpoints"
    checks: dict[str, bool] = {}
    accuracies: dict[str, float] = {}

    if teacher_path:  # the teacher, as kd.demo.train_digits_teacher trains it
        teacher_epochs = 40
        seed_everything(0)
        teacher = digits_teacher()
        saver = EpochSaver(teacher, ckpt / "teacher", every=10, last=teacher_epochs)  # 5 checkpoints: it is big
        saver.save_initial()
        train_student(teacher, train, test, TrainConfig(method="ce", epochs=teacher_epochs, lr=1e-3, batch_size=64),
                      hooks=Hooks(on_epoch=saver))  # fmt: skip
        checks["teacher_is_the_demos"] = fingerprint(teacher) == saved.fingerprint

    cache = CacheSource(str(demo_dir / "cache"), teacher_fingerprint=saved.fingerprint, dataset_id=train.dataset_id)
    names = {"ce": "student_ce", "kd": "student_kd"}
    specs: dict[str, list[Path]] = {}
    for seed in range(seeds):
        subset = torch.randperm(len(train), generator=torch.Generator().manual_seed(1000 + seed))[:labeled]
        for method, name in names.items():
            seed_everything(seed)
            student = digits_student()
            folder = ckpt / f"{name}_seed{seed}"
            saver = EpochSaver(student, folder, every=every, last=epochs)
            saver.save_initial()
            r = train_student(student, train, test, TrainConfig(method=method, epochs=epochs, seed=seed),
                              source=cache if method == "kd" else None, subset=subset,
                              hooks=Hooks(on_epoch=saver))  # fmt: skip
            key = "ce" if method == "ce" else "kd_cache"
            if "student_acc_per_seed" in demo:
                checks[f"{name}_seed{seed}_acc_is_the_demos"] = r.test_acc == demo["student_acc_per_seed"][key][seed]
            accuracies[f"{name}_seed{seed}"] = r.test_acc
            specs.setdefault(name, []).append(folder)

    x, fg = digits_images(config)
    models = {"teacher": (digits_teacher, load_checkpoints(ckpt / "teacher" if teacher_path else weights))}
    for name in names.values():
        for seed, folder in enumerate(specs[name]):
            models[f"{name}_seed{seed}"] = (digits_student, load_checkpoints(folder))
    per_model = explain_models(models, x, fg, config, out)
    summary = summarize(per_model, list(names.values()))
    result = {"demo_dir": str(demo_dir), "every": every, "seeds": seeds, "checks": checks, "test_acc": accuracies,
              "problems": [k for k, ok in checks.items() if not ok], "summary": summary,
              "config": asdict(config), "models": per_model}  # fmt: skip
    (out / "results.json").write_text(json.dumps(result, indent=1))
    return result


METRICS = ("n_fg", "n_bg", "lambda_ratio", "D_mean", "D_std", "rho")


def summarize(per_model: dict[str, dict], groups: list[str]) -> dict[str, dict[str, list[float]]]:
    """Per group (``student_kd`` collects ``student_kd_seed0``, ...) and for the teacher:
    each metric's values over seeds (the table shows mean ± std)."""
    out: dict[str, dict[str, list[float]]] = {}
    for name, res in per_model.items():
        group = next((g for g in groups if name.startswith(g + "_seed")), name)
        for m in METRICS:
            if m in res:
                out.setdefault(group, {}).setdefault(m, []).append(float(res[m]))
    return out


def table_rows(summary: dict[str, dict[str, list[float]]]) -> list[list[str]]:
    """One row per model: mean ± std over seeds of every metric."""

    def cell(values: list[float] | None) -> str:
        if not values:
            return "-"
        if len(values) == 1:
            return f"{values[0]:.3f}"
        return f"{statistics.fmean(values):.3f} ± {statistics.pstdev(values):.3f}"

    return [[name, *(cell(vals.get(m)) for m in METRICS)] for name, vals in summary.items()]


def run_explain(config: ExplainConfig, out: Path, *, demo_dir: Path | None = None, specs: dict[str, str] | None = None,
                seeds: int | None = None, every: int = 10, teacher_path: bool = True) -> dict[str, object]:  # fmt: skip
    """``kd explain``: the demo's models (``demo_dir``) or the given checkpoints (``specs``,
    NAME -> FACTORY@PATH); -> a result with ``summary`` (what the table shows)."""
    config.validate()
    if (demo_dir is None) == (not specs):
        raise ValueError("give either --demo DIR or one or more --model NAME=FACTORY@CHECKPOINTS")
    if demo_dir is not None:
        return explain_demo(demo_dir, out, config, seeds=seeds, every=every, teacher_path=teacher_path)
    per_model = explain_specs(specs or {}, config, out)
    result = {"summary": summarize(per_model, []), "config": asdict(config), "models": per_model}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    return result
