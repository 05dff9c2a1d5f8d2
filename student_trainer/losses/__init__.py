"""KD methods by name (as torchdistill does): ``kd train --method NAME`` and a
config file name the same registry entry.

Every loss is a pure function of tensors -- student logits, teacher logits,
labels, hyper-parameters -- with no model inside, so the same function works
whether targets come from a server, a cache or a local teacher.

Every method declares ``couples``: whether its loss on a batch differs from the sample-weighted
mean of its losses on the parts of that batch (statistics, pairwise relations, counts, medians
or random draws over the batch, a memory bank moved per batch, a mean over tokens).
``tests/test_batch_coupling.py`` measures it for every registered method and compares. Under
torchrun such a loss is computed on the whole global batch, gathered from the ranks
(``student_trainer.gather``), as one process would; a method that leaves it undeclared (None)
is treated as coupled there.

Every method that reads the teacher's logits declares ``accepts_sparse``: whether its loss takes the
sparse targets of a ``topk:K``, ``sample:K`` or ``rand:M`` cache (or ``--server-topk``) as they are.
The trainer refuses the others on such a source before any work (``sparse_refusal``);
``tests/test_sparse_declarations.py`` checks every registered method's declaration against its loss.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kd.cache.codecs import FULL_LOGIT_CODECS
from kd.core.targets import SparseTargets

LossFn = Callable[..., torch.Tensor]
# Whether a loss sees the teacher's logits only up to a constant per row: a bool, or a function of
# the method's options (its defaults with the given ones over them) for methods where an option decides.
ShiftInvariance = bool | Callable[[dict[str, object]], bool]
# Whether a loss takes sparse teacher targets: a bool, or a function of the method's options (as above).
SparseAcceptance = bool | Callable[[dict[str, object]], bool]
# Passed by the training loop to losses that declare them (0-based epoch, total epochs).
SCHEDULE_ARGS = ("epoch", "epochs")


@dataclass(frozen=True)
class Method:
    name: str
    loss: LossFn
    paper: str
    needs_teacher: bool = True
    # Works on kd.core.targets.SparseTargets (topk/sample caches) without densifying.
    accepts_sparse: bool = False
    # The loop doubles each batch with a same-class partner per sample (CS-KD):
    # the loss gets the student's logits for [x; x'] and labels for both halves.
    pairs: bool = False
    # The loss relates the samples of a batch (see the module docstring); None: not declared.
    couples: bool | None = None
    # The loss is unchanged when the teacher's logits move by a constant per row (it reads them through
    # softmax, ranks, standardisation): then targets that keep only the probabilities (topk/q8/q4/pca
    # caches, a mixture of teachers) train it as the full logits would. False, the default for a method
    # that does not declare it, makes the trainer refuse such targets (``logit_offsets_lost``);
    # tests/test_shift_invariance.py checks every registered method's declaration against its loss.
    teacher_logits_shift_invariant: ShiftInvariance = False
    kind = "logit"  # class attribute (FeatureMethod: "feature")

    def shift_invariant(self, options: dict[str, object] | None = None) -> bool:
        """``teacher_logits_shift_invariant`` for these options (the defaults where not given)."""
        return _resolve_invariance(self.teacher_logits_shift_invariant, {**self.defaults, **(options or {})})

    def takes_sparse(self, options: dict[str, object] | None = None) -> bool:
        """Whether the loss takes sparse teacher targets as they are (``accepts_sparse``)."""
        return bool(self.accepts_sparse)

    @property
    def defaults(self) -> dict[str, object]:
        sig = inspect.signature(self.loss)
        return {
            n: p.default
            for n, p in sig.parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
            and p.default is not inspect.Parameter.empty
            and n not in SCHEDULE_ARGS
        }

    def check_options(self, options: dict[str, object]) -> None:
        """Refuse unknown options and values out of range (see ``check_option_values``)."""
        unknown = set(options) - set(self.defaults)
        if unknown:
            raise TypeError(f"method {self.name!r} has no option(s) {sorted(unknown)}; options: {self.defaults}")
        check_option_values(self.name, self.defaults, options)

    @property
    def schedule_args(self) -> set[str]:
        """Which of ``epoch`` / ``epochs`` the loss takes (warm-ups, decays, early stops)."""
        return set(inspect.signature(self.loss).parameters) & set(SCHEDULE_ARGS)

    def __call__(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | SparseTargets | None,
        labels: torch.Tensor,
        *,
        epoch: int | None = None,
        epochs: int | None = None,
        **hparams: object,
    ) -> torch.Tensor:
        self.check_options(hparams)
        if self.needs_teacher and teacher_logits is None:
            raise ValueError(f"method {self.name!r} needs teacher targets; give it a --source")
        if isinstance(teacher_logits, SparseTargets) and not self.accepts_sparse:
            raise ValueError(
                f"method {self.name!r} needs dense teacher logits, but the targets are sparse "
                f"({teacher_logits.kind}); use a dense cache codec (fp32, fp16, bf16, int8) or a server/local source"
            )
        schedule = {"epoch": epoch, "epochs": epochs}
        for name in self.schedule_args:
            if schedule[name] is None:
                raise ValueError(f"method {self.name!r} needs the {name} (the training loop passes it)")
            hparams[name] = schedule[name]
        return self.loss(student_logits, teacher_logits, labels, **hparams)


def _resolve_invariance(declared: ShiftInvariance, options: dict[str, object]) -> bool:
    return bool(declared(options) if callable(declared) else declared)


_INF = math.inf
# Allowed ranges (low, high, low is excluded) of options by name; a method may override one.
# A temperature divides logits (0, negative, NaN or Inf give NaN or inverted targets); alpha
# mixes the KD and CE terms; weights and coefficients scale a term and are never negative.
OPTION_RANGES: dict[str, tuple[float, float, bool]] = {
    "temperature": (0.0, _INF, True),
    "kd_temperature": (0.0, _INF, True),
    "multiplier": (0.0, _INF, True),
    "alpha": (0.0, 1.0, False),
    "correct_prob": (0.0, 1.0, False),
    "noise_fraction": (0.0, 1.0, False),
    "stop_fraction": (0.0, 1.0, False),
    "search_fraction": (0.0, 1.0, False),
    "decay_every": (0.0, 1.0, True),
    "beta": (0.0, _INF, False),
    "gamma": (0.0, _INF, False),
    "lam": (0.0, _INF, False),
    "decay": (0.0, _INF, False),
    "eps": (0.0, _INF, False),
    "noise_variance": (0.0, _INF, False),
    "warmup": (0.0, _INF, False),
    "sparsity": (0.0, _INF, False),
    "hash_ratio": (0.0, _INF, True),
    # Divides each shallower stage's term once more (mgd, ofd): 0 divides by zero, a negative
    # value flips the sign of every other stage's term.
    "stage_decay": (0.0, _INF, True),
    # eskd: the first epoch without KD (0-based); a negative one trained CE alone without a word.
    "stop_epoch": (0.0, _INF, False),
    # A generator's seed (noisy, mimic's hyperplanes): torch's manual_seed takes 0..2**64 - 1, reads a
    # negative seed as that plus 2**64 (-1 drew 2**64 - 1's numbers under another name) and refused 2**64
    # and above only at the first step. An int bound: a float would round 2**64 - 1 up to 2**64.
    "seed": (0, 2**64 - 1, False),
    "lsh_seed": (0, 2**64 - 1, False),
}
# Options whose default is None (unset) but that take an integer when given: torch's
# manual_seed refused seed=1.5 only at the first step, and epoch numbers are whole.
INTEGER_OPTIONS = ("seed", "stop_epoch")
METHOD_OPTION_RANGES: dict[tuple[str, str], tuple[float, float, bool]] = {
    ("dkd", "alpha"): (0.0, _INF, False),  # DKD's alpha weighs TCKD; it is not a KD/CE mix
    ("token-gjsd", "beta"): (0.0, 1.0, False),  # GKD's mixture weight: 0 = forward KL, 1 = reverse KL
}


def check_option_values(method: str, defaults: dict[str, object], options: dict[str, object]) -> None:
    """Every option's value has its default's type, is finite, and lies in its range.

    ``--opt temperature=NaN`` parses to a float NaN; without this it would train to a NaN loss
    and exit 0. The message names the method, the option and the allowed range."""
    for name, value in options.items():
        default = defaults.get(name)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"method {method!r}: option {name}={value!r} must be true or false")
            continue
        if isinstance(default, str):
            if not isinstance(value, str):
                raise ValueError(f"method {method!r}: option {name}={value!r} must be a string (default {default!r})")
            continue
        if default is None and (value is None or not isinstance(value, (int, float)) or isinstance(value, bool)):
            continue  # an optional setting left unset, or not a number
        if not isinstance(default, (int, float)) and default is not None:
            continue  # lists, tensors, ...: the method checks them
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"method {method!r}: option {name}={value!r} must be a number (default {default!r})")
        if not math.isfinite(value):
            raise ValueError(f"method {method!r}: option {name}={value!r} must be finite")
        integral = isinstance(default, int) or (default is None and name in INTEGER_OPTIONS)
        if integral and not float(value).is_integer():
            raise ValueError(f"method {method!r}: option {name}={value!r} must be an integer (default {default!r})")
        rng = METHOD_OPTION_RANGES.get((method, name)) or OPTION_RANGES.get(name)
        if rng is None and name.endswith("weight"):
            rng = (0.0, _INF, False)
        if rng is not None:
            lo, hi, open_low = rng
            if value < lo or (open_low and value == lo) or value > hi:
                low = f"> {lo:g}" if open_low else f">= {lo:g}"
                high = "" if hi == _INF else f" and <= {hi}" if isinstance(hi, int) else f" and <= {hi:g}"
                raise ValueError(f"method {method!r}: option {name}={value!r} must be {low}{high}")


# Options every feature method takes besides its own: the terms added to the feature
# loss (CE on the labels, Hinton KD on the teacher's logits) and where the teacher's
# reduced statistic is computed ("source": asked reduced from the server/cache/local
# teacher; "trainer": the full map is fetched and reduced here).
FEATURE_COMMON: dict[str, object] = {
    "ce_weight": 1.0,
    "kd_weight": 0.0,
    "kd_temperature": 4.0,
    "teacher_reduce": "source",
}
# Extra tensors a feature loss may declare by name; the loop passes them ("indices": the
# batch's indices into the training set, e.g. CRD's memory bank).
FEATURE_EXTRAS = ("labels", "student_logits", "teacher_logits", "indices")


@dataclass(frozen=True)
class FeatureMethod:
    """A feature-level method: ``loss(student_feats, teacher_feats, *, ...)`` on one tensor
    (or connector output) per match, after the connector and the reduction.

    ``reduce`` names the statistic of ``kd.core.reductions`` both sides are compared in
    (``"at"``, ``"fsp:{1}"`` with ``{1}`` the second layer of the match side, ...);
    ``connector`` a key of ``student_trainer.features.CONNECTORS`` or a factory
    ``(student_shape, teacher_shape) -> nn.Module`` applied to the student's map
    first (a module with ``takes_teacher = True`` also gets the teacher's feature).
    ``layers`` is how many layers each side of a match names (2 for FSP).
    """

    name: str
    loss: LossFn
    paper: str
    reduce: str | None = None
    connector: object = None
    layers: int = 1
    default_matches: tuple[str, ...] = ()
    # The loop turns each batch into its four rotations (0, 90, 180, 270 degrees, sample-major:
    # rows 4i..4i+3), the teacher answering for all (SSKD); the common CE / KD terms see row 4i only.
    rotations: bool = False
    # The method's own defaults for FEATURE_COMMON options, as (name, value) pairs.
    common: tuple[tuple[str, object], ...] = ()
    # The loss relates the samples of a batch (see the module docstring); None: not declared.
    couples: bool | None = None
    # As Method's, for the teacher's logits wherever this loss reads them: its ``teacher_logits``
    # keyword and, for a method made for it (``teacher_side_logits``), a match whose teacher side is
    # ``logits`` (the common KD term only sees softmax).
    teacher_logits_shift_invariant: ShiftInvariance = False
    # The teacher side of its match is the teacher's logits by design (pad, adversarial). Any other
    # feature loss given a ``S=logits`` match reads them as plain values (distances, kernels,
    # regressions): the trainer refuses such a match on targets that lost the logits' offsets.
    teacher_side_logits: bool = False
    # Whether the loss takes sparse teacher logits (its ``teacher_logits`` keyword; a bool, or a function
    # of the options). None: the loss has no such keyword, so it never sees them. A match whose teacher
    # side is ``logits`` needs them dense whatever this says (``sparse_refusal``).
    accepts_sparse: SparseAcceptance | None = None
    needs_teacher = True
    pairs = False
    kind = "feature"

    @property
    def own_defaults(self) -> dict[str, object]:
        sig = inspect.signature(self.loss)
        return {
            n: p.default
            for n, p in sig.parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
            and p.default is not inspect.Parameter.empty
            and n not in SCHEDULE_ARGS
        }

    @property
    def defaults(self) -> dict[str, object]:
        return {**self.own_defaults, **FEATURE_COMMON, **dict(self.common)}

    def shift_invariant(self, options: dict[str, object] | None = None) -> bool:
        """``teacher_logits_shift_invariant`` for these options (the defaults where not given)."""
        return _resolve_invariance(self.teacher_logits_shift_invariant, {**self.defaults, **(options or {})})

    def takes_sparse(self, options: dict[str, object] | None = None) -> bool:
        """Whether the loss itself takes sparse teacher logits (``accepts_sparse``, for these options; the
        common KD term does: it is kd's loss). The matches decide the rest (``sparse_refusal``)."""
        if self.accepts_sparse is None:
            return "teacher_logits" not in self.extras
        return _resolve_invariance(self.accepts_sparse, {**self.defaults, **(options or {})})

    @property
    def extras(self) -> set[str]:
        return set(inspect.signature(self.loss).parameters) & set(FEATURE_EXTRAS + SCHEDULE_ARGS)

    def check_options(self, options: dict[str, object]) -> None:
        unknown = set(options) - set(self.defaults)
        if unknown:
            raise TypeError(f"method {self.name!r} has no option(s) {sorted(unknown)}; options: {self.defaults}")
        check_option_values(self.name, self.defaults, options)
        where = options.get("teacher_reduce", "source")
        if where not in ("source", "trainer"):
            raise ValueError(f"teacher_reduce must be 'source' or 'trainer', got {where!r}")

    def objective(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | SparseTargets | None,
        labels: torch.Tensor,
        student_feats: list,
        teacher_feats: list,
        *,
        epoch: int | None = None,
        epochs: int | None = None,
        indices: torch.Tensor | None = None,
        **options: object,
    ) -> torch.Tensor:
        """ce_weight * CE + kd_weight * KD(T = kd_temperature) + the method's feature loss."""
        self.check_options(options)
        opts = {**FEATURE_COMMON, **dict(self.common), **options}
        own = {k: v for k, v in opts.items() if k not in FEATURE_COMMON}
        given = {"labels": labels, "student_logits": student_logits, "teacher_logits": teacher_logits,
                 "epoch": epoch, "epochs": epochs, "indices": indices}  # fmt: skip
        for name in self.extras:
            if given[name] is None:
                raise ValueError(f"method {self.name!r} needs the {name}")
            own[name] = given[name]
        total = self.loss(student_feats, teacher_feats, **own)
        if self.rotations:  # the common terms on the unrotated samples only
            student_logits, labels = student_logits[::4], labels[::4]
            teacher_logits = None if teacher_logits is None else teacher_logits[::4]
        if opts["ce_weight"]:
            total = total + float(opts["ce_weight"]) * torch.nn.functional.cross_entropy(student_logits, labels)
        if opts["kd_weight"]:
            if teacher_logits is None:
                raise ValueError("kd_weight > 0 needs the teacher's logits")
            kd = METHODS["kd"]
            term = kd(student_logits, teacher_logits, labels, temperature=opts["kd_temperature"], alpha=1.0)
            total = total + float(opts["kd_weight"]) * term
        return total


METHODS: dict[str, Method | FeatureMethod] = {}


def register(
    name: str,
    paper: str,
    *,
    needs_teacher: bool = True,
    accepts_sparse: bool = False,
    pairs: bool = False,
    couples: bool | None = None,
    teacher_logits_shift_invariant: ShiftInvariance = False,
) -> Callable[[LossFn], LossFn]:
    """Register a logit method; ``couples``: see the module docstring. ``teacher_logits_shift_invariant``:
    see ``Method`` (declare True only for a loss that reads the teacher's logits through a per-row
    shift-invariant function)."""

    def deco(fn: LossFn) -> LossFn:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        METHODS[name] = Method(name, fn, paper, needs_teacher, accepts_sparse, pairs, couples,
                               teacher_logits_shift_invariant)  # fmt: skip
        return fn

    return deco


def register_feature(
    name: str,
    paper: str,
    *,
    reduce: str | None = None,
    connector: object = None,
    layers: int = 1,
    default_matches: tuple[str, ...] = (),
    rotations: bool = False,
    common: dict[str, object] | None = None,
    couples: bool | None = None,
    teacher_logits_shift_invariant: ShiftInvariance = False,
    teacher_side_logits: bool = False,
    accepts_sparse: SparseAcceptance | None = None,
) -> Callable[[LossFn], LossFn]:
    """Register a feature method (see ``FeatureMethod``; ``couples``: see the module docstring). A loss
    that takes the ``teacher_logits`` keyword must declare ``accepts_sparse``."""

    def deco(fn: LossFn) -> LossFn:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        if accepts_sparse is None and "teacher_logits" in inspect.signature(fn).parameters:
            raise ValueError(f"feature method {name!r} reads the teacher's logits: declare accepts_sparse")
        METHODS[name] = FeatureMethod(name, fn, paper, reduce, connector, layers, tuple(default_matches), rotations,
                                      tuple((common or {}).items()), couples, teacher_logits_shift_invariant,
                                      teacher_side_logits, accepts_sparse)  # fmt: skip
        return fn

    return deco


def logit_offsets_refusal(
    method: str, options: dict[str, object], lost: str, matches: list[str] | tuple[str, ...] = ()
) -> str | None:
    """The refusal of ``method`` (with ``options``; a feature method with ``matches``, else its
    default ones) on targets that keep only the teacher's logits up to a constant per row (``lost``:
    what they keep, from ``SoftTargetSource.logit_offsets_lost``); None where its loss does not see
    the difference (``teacher_logits_shift_invariant``, ``teacher_side_logits``)."""
    m = get_method(method)
    given = ", ".join(f"{k}={v!r}" for k, v in options.items() if k in m.defaults)
    who = f"method {method!r}{f' with {given}' if given else ''}"
    if not m.shift_invariant(options):
        why = f"{who} reads the teacher's absolute logits (its loss changes when a row's logits move by a constant)"
    else:
        # The teacher side of S=T (comma lists for several layers); a malformed match is refused later.
        fed = logits_matches(m, matches)
        if not isinstance(m, FeatureMethod) or m.teacher_side_logits or not fed:
            return None
        why = f"the match {fed[0]!r} feeds the teacher's logits to {who} as plain values (its feature loss is not " \
              "made for logits and changes when a row's logits move by a constant)"  # fmt: skip
    codecs = f"{', '.join(FULL_LOGIT_CODECS[:-1])} or {FULL_LOGIT_CODECS[-1]}"
    return (
        f"{why}, but {lost}; it would train on other targets than the teacher's. Use targets with full logits: "
        f"a cache precomputed with --codec {codecs}, a server: source without --server-topk, or a local: "
        "teacher; or a method that reads only the teacher's softmax (e.g. kd; `kd methods` marks the methods "
        "that need full logits)"
    )


def logits_matches(method: Method | FeatureMethod, matches: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The matches (``S=T``; a feature method's default ones where none are given) whose teacher side
    is the teacher's logits."""
    texts = matches or (method.default_matches if isinstance(method, FeatureMethod) else ())
    return [t for t in texts if "logits" in (x.strip() for x in t.partition("=")[2].split(","))]


def sparse_refusal(
    method: str, options: dict[str, object], sparse: str, matches: list[str] | tuple[str, ...] = ()
) -> str | None:
    """The refusal of ``method`` (with ``options``; a feature method with ``matches``, else its default
    ones) on a source whose targets are sparse (``sparse``: what they are, from
    ``SoftTargetSource.sparse_targets``); None where its loss takes them (``accepts_sparse``) or it
    reads no teacher targets. Reads declarations only, so the trainer refuses before any work."""
    m = get_method(method)
    if not m.needs_teacher:
        return None  # the loop never asks such a method's source for targets
    given = ", ".join(f"{k}={v!r}" for k, v in options.items() if k in m.defaults)
    who = f"method {method!r}{f' with {given}' if given else ''}"
    if not m.takes_sparse(options):
        why = f"{who} needs the teacher's dense logits (its loss reads every class's logit)"
    else:
        fed = logits_matches(m, matches) if isinstance(m, FeatureMethod) else []
        if not fed:
            return None
        why = f"the match {fed[0]!r} of {who} needs the teacher's dense logits"
    # The logit methods kd train takes that read sparse targets as they are (per-token ones are kd train-lm's).
    takers = sorted(n for n, x in METHODS.items()
                    if isinstance(x, Method) and x.needs_teacher and x.takes_sparse() and x.kind == "logit"
                    and not n.startswith("token-"))  # fmt: skip
    return (
        f"{why}, but {sparse}. Use dense targets: a cache precomputed with a dense codec (--codec fp32, fp16, "
        "bf16, int8, q8, q4 or pca:K), a server: source without --server-topk, or a local: teacher; or a method "
        f"that takes top-k targets ({', '.join(takers)}, or a feature method without a logits match)"
    )


def get_method(name: str) -> Method | FeatureMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}") from None


def _register_all() -> None:
    """Import every module of this package: each registers its method(s)."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


_register_all()
