"""Every registered method declares whether its loss reads the teacher's logits only up to a
constant per row (``teacher_logits_shift_invariant``); the trainer refuses targets that lost those
offsets (top-k, q8/q4, pca caches, a server's top-k, a mixture of teachers) for the methods that
need them. This module derives each method's property from its loss, in float64: the loss with
the teacher's logits z and with z + c (c a random constant per row, several seeds), at the
method's defaults and at every option value that changes the answer; equal to 1e-10 is
invariant. A method declared otherwise fails here."""

from __future__ import annotations

import functools

import pytest
import torch

from kd.bench.methods import FEATURE_MATCHES, _feature_options
from kd.core.data import Dataset, load_dataset
from kd.models import digits_cnn, digits_cnn_student
from kd.student_trainer.losses import METHODS, FeatureMethod
from kd.student_trainer.sources import Batch, LocalSource
from kd.student_trainer.train import TrainConfig, _FeaturePlan, _with_rotations, rotation_shape, seed_everything
from kd.teacher_server.loading import Teacher, load_teacher, save_weights

SEEDS = (0, 1, 2)
EPOCH, EPOCHS = 5, 40  # inside every schedule's active part (DKD's warm-up, ESKD's KD phase, GKD's decay)
# Option values that change whether a loss is shift-invariant (the rest keep its answer at the defaults).
VARIANTS: dict[str, list[dict[str, object]]] = {
    "ka-dtd": [
        {"dtd": "cwsm"},
        {"dtd": "none"},
        {"beta": 0.0},
        {"gamma": 0.0},
        {"alpha": 0.0},
        {"ka": "none"},
        {"ka": "none", "dtd": "cwsm"},
    ],  # fmt: skip
    "noisy": [{"noise_fraction": 0.0}, {"noise_variance": 0.0}, {"alpha": 0.0}, {"seed": 3}],
    "pad": [{"distance": "l2"}, {"distance": "l2", "weight": 0.0}],
    # head="auto" is the fitted head (L_fit on z_t) for a server or a cache, the sources that lose offsets:
    # declared for that; here (an in-process teacher) "fit" forces it.
    "srd": [
        {"sr_weight": 0.0, "head": "fit"},
        {"sr_weight": 0.0, "head": "teacher"},
        {"weight": 0.0, "fit_weight": 0.0},
        {"sr_weight": 0.0, "fit_weight": 0.0},
    ],  # fmt: skip
    "eskd": [{"stop_fraction": 0.0}],
    "at": [{"kd_weight": 1.0}],  # the common KD term of every feature method: softmax only
}
LOGIT_METHODS = sorted(n for n, m in METHODS.items() if not isinstance(m, FeatureMethod))
FEATURE_METHODS = sorted(n for n, m in METHODS.items() if isinstance(m, FeatureMethod))
CASES = [(n, {}) for n in sorted(METHODS)] + [(n, v) for n in sorted(VARIANTS) for v in VARIANTS[n]]


def _observed(loss_of) -> bool:
    """Whether ``loss_of(shift)`` (shift: [B, 1] float64 or None) is the same with every seed's
    shift as without; a difference between 1e-10 and 1e-6 (relative) is neither, and fails."""
    base = float(loss_of(None).detach())
    diffs = []
    for seed in SEEDS:
        g = torch.Generator().manual_seed(seed)
        shift = (torch.rand(1, generator=g, dtype=torch.float64) * 20 - 10) + torch.randn(
            1, generator=g, dtype=torch.float64
        )
        rows = shift + 3.0 * torch.randn(64, 1, generator=g, dtype=torch.float64)
        diffs.append(abs(float(loss_of(rows).detach()) - base) / max(1.0, abs(base)))
    worst = max(diffs)
    assert worst <= 1e-10 or min(diffs) > 1e-6, f"neither invariant nor clearly not: relative changes {diffs}"
    return worst <= 1e-10


def _logit_loss(name: str, options: dict[str, object]):
    method = METHODS[name]
    g = torch.Generator().manual_seed(11)
    b, c = 16, 10
    student = torch.randn(b, c, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(b, c, generator=g, dtype=torch.float64) * 4
    labels = torch.randint(0, c, (b,), generator=g)
    teacher[:4, 0] += 20.0  # a few confident rows (KA's swap, GKD's correct rows see both kinds)
    if method.pairs:  # CS-KD: [x; x'] with the partners' labels equal
        labels = torch.cat([labels[: b // 2], labels[: b // 2]])

    def loss_of(shift: torch.Tensor | None) -> torch.Tensor:
        z = teacher if shift is None else teacher + shift[:b]
        torch.manual_seed(5)  # the same draws for every call (noisy's noise)
        return method(student, z, labels, epoch=EPOCH, epochs=EPOCHS, **options)

    return loss_of


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> Teacher:
    torch.manual_seed(7)  # seeded weights: the property does not depend on training
    path = save_weights(digits_cnn(), tmp_path_factory.mktemp("cnn") / "teacher.safetensors")
    return load_teacher("cnn", f"kd.models:digits_cnn@{path}")


@functools.cache
def _digits_train() -> Dataset:
    return load_dataset("digits", "train")  # only read below (samples, labels): loaded once, not for every case


def _feature_loss(name: str, options: dict[str, object], teacher: Teacher):
    """The loss the training loop computes for a feature method (``_FeaturePlan.loss``: connectors,
    the teacher side of each match, the common terms), in float64, on one batch of the CNN pair."""
    train = _digits_train()
    method = METHODS[name]
    opts = {**_feature_options(name), **options}
    config = TrainConfig(method=name, matches=list(FEATURE_MATCHES[name]), method_options=opts, epochs=EPOCHS,
                         batch_size=8)  # fmt: skip
    source = LocalSource(teacher)
    idx = torch.arange(8)

    def plan() -> tuple[_FeaturePlan, torch.nn.Module]:
        # Built afresh (seeded) for every call: connectors with state (CRD's memory bank) start alike.
        seed_everything(0)
        made = _FeaturePlan(method, config, digits_cnn_student(), train, idx, source)
        return made, made.distilled.double()

    batch = Batch(idx, train.get(idx), train.labels[idx])
    if method.rotations:
        batch = _with_rotations(batch, rotation_shape(digits_cnn_student(), train, source))
    _, logits, feats = next(iter(source.iter_outputs([batch], plan()[0].teacher_names)))
    logits = logits.double()
    feats = {k: v.double() for k, v in feats.items()}
    x, y = batch.inputs.double(), batch.labels

    def loss_of(shift: torch.Tensor | None) -> torch.Tensor:
        fresh, model = plan()
        z = logits if shift is None else logits + shift[: len(logits)]
        torch.manual_seed(5)
        return fresh.loss(model, x, y, z, feats, torch.device("cpu"), EPOCH, config, indices=batch.indices)

    return loss_of


def test_every_method_is_checked_and_every_variant_is_an_option() -> None:
    assert {n for n, _ in CASES} == set(METHODS)
    for name, variants in VARIANTS.items():
        for v in variants:
            METHODS[name].check_options(v)


@pytest.mark.parametrize(
    ("name", "options"),
    [c for c in CASES if c[0] in LOGIT_METHODS],
    ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()),
)
def test_logit_method_declares_what_its_loss_does(name: str, options: dict[str, object]) -> None:
    observed = _observed(_logit_loss(name, options))
    assert METHODS[name].shift_invariant(options) == observed, (
        f"{name} {options}: its loss is {'' if observed else 'not '}invariant to a per-row shift of the teacher's "
        "logits; declare teacher_logits_shift_invariant accordingly"
    )


@pytest.mark.parametrize(
    ("name", "options"),
    [c for c in CASES if c[0] in FEATURE_METHODS],
    ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()),
)
def test_feature_method_declares_what_its_loss_does(name: str, options: dict[str, object], cnn: Teacher) -> None:
    observed = _observed(_feature_loss(name, options, cnn))
    assert METHODS[name].shift_invariant({**_feature_options(name), **options}) == observed, (
        f"{name} {options}: its loss is {'' if observed else 'not '}invariant to a per-row shift of the teacher's "
        "logits (with its matches on the CNN pair); declare teacher_logits_shift_invariant accordingly"
    )


# Feature methods not made for the teacher's logits whose setup takes a `pool=logits` match on the CNN pair;
# the others refuse it (their connector or statistic needs maps).
BUILD_WITH_LOGITS = {"cckd", "cd", "crd", "mimic", "pkt", "reviewkd", "rkd", "sp", "sskd"}


@pytest.mark.parametrize("name", [n for n in FEATURE_METHODS if not METHODS[n].teacher_side_logits])
def test_a_logits_match_feeds_other_feature_losses_absolute_logits(name: str, cnn: Teacher,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Why the trainer refuses a ``S=logits`` match of a feature method not made for logits on targets
    that lost the offsets: each such loss that takes the match changes with a per-row shift."""
    monkeypatch.setitem(FEATURE_MATCHES, name, ("pool=logits",))
    if name in BUILD_WITH_LOGITS:
        assert not _observed(_feature_loss(name, {}, cnn))
    else:
        with pytest.raises(ValueError):  # at setup, or at the first loss (a statistic of maps)
            _observed(_feature_loss(name, {}, cnn))
