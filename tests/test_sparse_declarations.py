"""Every method that reads the teacher's targets is classified for sparse ones (a ``topk:K``, ``sample:K`` or
``rand:M`` cache, ``--server-topk``): ``accepts_sparse`` (a feature method: its ``teacher_logits`` keyword,
plus any match whose teacher side is ``logits``, which needs them dense). The trainer refuses the others
before any work (``sparse_refusal``), where they used to fail at their first step with a generic message.

This module derives each method's behaviour from its loss, in float64: the loss on the teacher's dense
logits z, and on the same z as top-k targets with K = C (every class stored: the same distribution, so a
loss that takes them must give the same value, to 1e-10) and with K < C. A loss that raises on them does
not take them; one that gives another value is wrong either way and fails. A method declared otherwise
than its loss behaves fails here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_checks import refused
from typer.testing import CliRunner

from kd.bench.methods import FEATURE_MATCHES, _feature_options
from kd.cli import app
from kd.core.data import load_dataset
from kd.core.targets import SparseTargets
from kd.models import digits_cnn, digits_cnn_student, digits_student
from kd.student_trainer.losses import METHODS, FeatureMethod, sparse_refusal
from kd.student_trainer.sources import Batch, CacheSource, LocalSource, ServerSource
from kd.student_trainer.train import (
    TrainConfig,
    _FeaturePlan,
    _with_rotations,
    rotation_shape,
    seed_everything,
    train_student,
)
from kd.teacher_server.loading import Teacher, load_teacher, save_weights

EPOCH, EPOCHS = 5, 40  # inside every schedule's active part (DKD's warm-up, ESKD's KD phase)
TEACHER_METHODS = sorted(n for n, m in METHODS.items() if m.needs_teacher)
# Option values and matches that change a method's answer (the rest keep the one at the defaults).
VARIANTS: dict[str, list[tuple[dict[str, object], tuple[str, ...] | None]]] = {
    "cckd": [({"instance_weight": 0.0}, None)],  # without its instance-level KD term it reads no logits
    "srd": [({"sr_weight": 0.0, "fit_weight": 0.0}, None)],  # still refuses them (declared for every option)
    "at": [({"kd_weight": 1.0}, None)],  # the common KD term: kd's loss, which takes them
    "rkd": [({}, ("pool=logits",))],  # a feature loss fed the teacher's logits by a match: needs them dense
}
CASES = [(n, {}, None) for n in TEACHER_METHODS] + [(n, o, m) for n in sorted(VARIANTS) for o, m in VARIANTS[n]]


def topk(z: torch.Tensor, k: int) -> SparseTargets:
    """The top-k targets of float64 logits z (``[..., C]``), as a topk cache or server hands them out."""
    values, ids = z.topk(k, dim=-1)
    return SparseTargets("topk", ids, values, torch.logsumexp(z, dim=-1), z.shape[-1], 1.0)


def _observed(loss_of, z: torch.Tensor) -> bool:
    """Whether the loss takes top-k targets: the value on z at K = C, and a finite one at K < C."""
    dense = float(loss_of(z))
    try:
        whole = float(loss_of(topk(z, z.shape[-1])))
        part = float(loss_of(topk(z, 4)))
    except (ValueError, TypeError, AttributeError):
        return False
    assert abs(whole - dense) <= 1e-10 * max(1.0, abs(dense)), f"top-k with K = C gave {whole}, dense {dense}"
    assert torch.isfinite(torch.tensor(part)), part
    return True


def _logit_loss(name: str):
    method = METHODS[name]
    g = torch.Generator().manual_seed(11)
    if name.startswith("token-"):  # per-token losses: [B, S, V] and labels [B, S]
        shape, labels = (3, 5, 12), torch.randint(0, 12, (3, 5), generator=g)
    else:
        shape, labels = (16, 10), torch.randint(0, 10, (16,), generator=g)
        if method.pairs:
            labels = torch.cat([labels[:8], labels[:8]])
    student = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(shape, generator=g, dtype=torch.float64) * 4
    schedule = {k: v for k, v in {"epoch": EPOCH, "epochs": EPOCHS}.items() if k in method.schedule_args}

    def loss_of(t) -> torch.Tensor:
        torch.manual_seed(5)  # the same draws for every call (noisy's noise)
        return method.loss(student, t, labels, **schedule)  # the loss itself: Method's guard is what is checked

    return loss_of, teacher


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> Teacher:
    torch.manual_seed(7)
    path = save_weights(digits_cnn(), tmp_path_factory.mktemp("cnn") / "teacher.safetensors")
    return load_teacher("cnn", f"kd.models:digits_cnn@{path}")


def _feature_loss(name: str, options: dict[str, object], matches: tuple[str, ...], teacher: Teacher):
    """The loss the training loop computes for a feature method (``_FeaturePlan.loss``), float64, one batch."""
    train = load_dataset("digits", "train")
    method = METHODS[name]
    config = TrainConfig(method=name, matches=list(matches), method_options={**_feature_options(name), **options},
                         epochs=EPOCHS, batch_size=8)  # fmt: skip
    source = LocalSource(teacher)
    idx = torch.arange(8)

    def plan() -> tuple[_FeaturePlan, torch.nn.Module]:
        seed_everything(0)  # built afresh for every call: connectors with state start alike
        made = _FeaturePlan(method, config, digits_cnn_student(), train, idx, source)
        return made, made.distilled.double()

    batch = Batch(idx, train.get(idx), train.labels[idx])
    if method.rotations:
        batch = _with_rotations(batch, rotation_shape(digits_cnn_student(), train, source))
    _, logits, feats = next(iter(source.iter_outputs([batch], plan()[0].teacher_names)))
    feats = {k: v.double() for k, v in feats.items()}

    def loss_of(t) -> torch.Tensor:
        fresh, model = plan()
        torch.manual_seed(5)
        return fresh.loss(model, batch.inputs.double(), batch.labels, t, feats, torch.device("cpu"), EPOCH, config,
                          indices=batch.indices).detach()  # fmt: skip

    return loss_of, logits.double()


def test_every_method_is_checked() -> None:
    assert {n for n, _, _ in CASES} == set(TEACHER_METHODS)
    for name in set(METHODS) - set(TEACHER_METHODS):  # never handed targets: nothing to refuse
        assert sparse_refusal(name, {}, "sparse") is None


@pytest.mark.parametrize(
    ("name", "options", "matches"),
    [c for c in CASES if not isinstance(METHODS[c[0]], FeatureMethod)],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_logit_method_declares_what_its_loss_does(name: str, options: dict, matches: None) -> None:
    observed = _observed(*_logit_loss(name))
    declared = sparse_refusal(name, options, "the targets are sparse") is None
    assert declared == observed, f"{name}: its loss {'takes' if observed else 'refuses'} sparse targets; declare " \
                                 "accepts_sparse accordingly"  # fmt: skip


@pytest.mark.parametrize(
    ("name", "options", "matches"),
    [c for c in CASES if isinstance(METHODS[c[0]], FeatureMethod)],
    ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict)
    else ";".join(v or ()),
)  # fmt: skip
def test_feature_method_declares_what_its_loss_does(name: str, options: dict, matches, cnn: Teacher) -> None:
    matches = matches or FEATURE_MATCHES[name]
    opts = {**_feature_options(name), **options}
    observed = _observed(*_feature_loss(name, options, matches, cnn))
    declared = sparse_refusal(name, opts, "the targets are sparse", matches) is None
    assert declared == observed, f"{name} {options} {matches}: its loss {'takes' if observed else 'refuses'} " \
                                 "sparse targets; declare accepts_sparse accordingly"  # fmt: skip


# -- the trainer refuses before any work -------------------------------------------------------
TRAIN = ["train", "--epochs", "1", "--subset", "48", "--batch-size", "16"]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def topk_cache(tmp_path_factory: pytest.TempPathFactory, teacher_spec: str) -> str:
    path = tmp_path_factory.mktemp("caches") / "topk5"
    r = invoke("precompute", "--source", f"local:{teacher_spec}", "--dataset", "digits", "--out", str(path),
               "--codec", "topk:5")  # fmt: skip
    assert r.exit_code == 0, r.output
    return str(path)


def test_a_dense_only_method_on_a_topk_cache_is_refused_before_the_run_starts(topk_cache: str, tmp_path: Path) -> None:
    out, run = tmp_path / "s.safetensors", tmp_path / "run"
    for method in ("dkd", "dist", "gkd"):
        r = invoke(*TRAIN, "--method", method, "--source", f"cache:{topk_cache}", "--out", str(out),
                   "--run-dir", str(run))  # fmt: skip
        refused(r, f"method '{method}' needs the teacher's dense logits", f"cache {topk_cache!r}: topk:5 gives "
                "sparse targets", "a dense codec (--codec fp32", "a method that takes top-k targets (eskd, kd, "
                "tfkd-self")  # fmt: skip
        assert not out.exists() and not run.exists()  # refused before the run directory or a step


def test_a_feature_method_is_classified_by_its_options_and_matches(cnn: Teacher, tmp_path: Path) -> None:
    """cckd reads dense logits in its instance-level KD term (refused), without it none (trains from the
    cache's stored features); pad's logits match needs them dense whatever its loss."""
    cache = tmp_path / "cnn-topk5"
    weights = save_weights(cnn.model, tmp_path / "cnn.safetensors")
    r = invoke("precompute", "--source", f"local:kd.models:digits_cnn@{weights}", "--dataset", "digits", "--out",
               str(cache), "--codec", "topk:5", "--feature", "pool")  # fmt: skip
    assert r.exit_code == 0, r.output
    cnn = ["--student", "kd.models:digits_cnn_student", "--source", f"cache:{cache}", "--opt", "teacher_reduce=trainer"]
    fed = "the match 'pool=logits' of method 'pad' needs the teacher's dense logits"
    refused(invoke(*TRAIN, "--method", "pad", "--match", "pool=logits", *cnn[:4]), fed, "topk:5 gives sparse")
    r = invoke(*TRAIN, "--method", "cckd", "--match", "pool=pool", "--opt", "instance_weight=0", *cnn)
    assert r.exit_code == 0, r.output
    refused(invoke(*TRAIN, "--method", "cckd", "--match", "pool=pool", *cnn),
            "method 'cckd' with teacher_reduce='trainer' needs the teacher's dense logits")  # fmt: skip


def test_read_through_into_a_topk_cache_is_refused_before_the_cache_is_made(teacher_spec: str,
                                                                            tmp_path: Path) -> None:  # fmt: skip
    cache = tmp_path / "rt"
    r = invoke(*TRAIN, "--method", "dkd", "--source", f"cache:{cache}", "--read-through", f"local:{teacher_spec}",
               "--codec", "topk:5")  # fmt: skip
    refused(r, "method 'dkd' needs the teacher's dense logits", "the read-through cache: topk:5 gives sparse targets")
    assert not cache.exists()


def test_server_topk_is_refused_before_the_server_is_asked(server, address: str, topk_cache: str,
                                                          tmp_path: Path) -> None:  # fmt: skip
    """The Python API as the CLI: a server source asked for top-k and a top-k cache are refused by
    train_student before the server answers a forward or a record is read."""
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    with (
        ServerSource(address, "digits", topk=5) as src,
        pytest.raises(ValueError, match=r"^method 'dkd' needs .*--server-topk 5\): it gives sparse targets"),
    ):
        train_student(digits_student(), train, test, TrainConfig(method="dkd", epochs=1), source=src)
    assert not server.metrics.registry.get_sample_value("kd_samples_total", {"teacher": "digits"})
    r = invoke(*TRAIN, "--method", "spherical", "--source", f"server:{address}/digits", "--server-topk", "5")
    refused(r, "method 'spherical' needs the teacher's dense logits", "--server-topk 5): it gives sparse targets")
    assert not server.metrics.registry.get_sample_value("kd_samples_total", {"teacher": "digits"})
    with (
        CacheSource(topk_cache, dataset_id=train.dataset_id) as src,
        pytest.raises(ValueError, match=r"^method 'logitstd' needs the teacher's dense logits"),
    ):
        train_student(digits_student(), train, test, TrainConfig(method="logitstd", epochs=1), source=src,
                      run_dir=tmp_path / "run")  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_ce_and_a_sparse_method_train_from_a_topk_cache(topk_cache: str) -> None:
    for method in ("kd", "ce"):
        r = invoke(*TRAIN, "--method", method, "--source", f"cache:{topk_cache}")
        assert r.exit_code == 0, (method, r.output)


@pytest.fixture(scope="module")
def sample_cache(tmp_path_factory: pytest.TempPathFactory, teacher_spec: str) -> str:
    path = tmp_path_factory.mktemp("caches") / "sample4"  # drawn at T = 1 (no --temperature)
    r = invoke("precompute", "--source", f"local:{teacher_spec}", "--dataset", "digits", "--out", str(path),
               "--codec", "sample:4")  # fmt: skip
    assert r.exit_code == 0, r.output
    return str(path)


def test_a_sample_cache_at_another_temperature_is_refused_before_the_run_starts(sample_cache: str,
                                                                               tmp_path: Path) -> None:  # fmt: skip
    """Draws at T = 1 estimate the teacher only at T = 1: kd at its default T = 4 failed at its first
    step, after the run directory was made ("ValueError: these targets were drawn ..."); now refused
    before it, naming the method and the cache, as kd train-lm does. At T = 1 it trains."""
    out, run = tmp_path / "s.safetensors", tmp_path / "run"
    drawn = "these targets were drawn at temperature 1.0"
    for method, opts, t in (("kd", [], "4"), ("eskd", ["--opt", "temperature=2"], "2"),
                            ("at", ["--match", "a=b", "--opt", "kd_weight=1"], "4")):  # fmt: skip
        r = invoke(*TRAIN, "--method", method, *opts, "--source", f"cache:{sample_cache}", "--out", str(out),
                   "--run-dir", str(run))  # fmt: skip
        refused(r, f"method '{method}' on these targets (cache {sample_cache!r}: sample:4 gives sparse targets",
                drawn, f"so train at temperature 1, not {t} ")  # fmt: skip
        assert not out.exists() and not run.exists()  # refused before the run directory or a step
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    with (
        CacheSource(sample_cache, dataset_id=train.dataset_id) as src,
        pytest.raises(ValueError, match=r"^method 'tfkd-self' on these targets \(cache .*not 6 "),
    ):  # the Python API as the CLI (tfkd-self's default T is 6)
        train_student(digits_student(), train, test, TrainConfig(method="tfkd-self", epochs=1), source=src,
                      run_dir=tmp_path / "run")  # fmt: skip
    assert not (tmp_path / "run").exists()
    r = invoke(*TRAIN, "--method", "kd", "--opt", "temperature=1", "--source", f"cache:{sample_cache}")
    assert r.exit_code == 0, r.output


def test_kd_methods_shows_which_methods_take_sparse_targets() -> None:
    """`kd methods` had no word on it: a user picking a method for a topk:K / sample:K cache or
    --server-topk learnt it from a refusal. Its "sparse targets" column says what each method's
    declaration says (checked against its loss above): yes, no, or "-" where it reads no targets."""
    r = CliRunner().invoke(app, ["methods"], env={"COLUMNS": "1000"})  # one line per row: nothing wraps
    assert r.exit_code == 0, r.output
    header = next(line for line in r.output.splitlines() if "┃ method" in line)
    columns = [c.strip() for c in header.split("┃")[1:-1]]
    assert columns[:4] == ["method", "kind", "teacher logits", "sparse targets"], columns
    cells = {}
    for line in r.output.splitlines():
        parts = [c.strip() for c in line.split("│")[1:-1]]
        if parts and parts[0] in METHODS:
            cells[parts[0]] = parts[3]
    assert set(cells) == set(METHODS)
    assert (cells["kd"], cells["eskd"], cells["tfkd-self"], cells["at"]) == ("yes", "yes", "yes", "yes")
    assert (cells["dkd"], cells["dist"], cells["sskd"], cells["ce"]) == ("no", "no", "no", "-")
    assert cells["cckd"] == "no (at the defaults; options decide)"  # instance_weight=0 makes it yes
    for name, m in METHODS.items():
        said = cells[name].split(" (")[0]
        assert said == ("-" if not m.needs_teacher else "yes" if m.takes_sparse() else "no"), name
