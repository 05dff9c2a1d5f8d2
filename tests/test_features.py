"""Feature distillation plumbing: reduced statistics computed by the server, the cache
or the trainer agree; feature methods train the same from every source; connectors
are trained, checkpointed and saved with the student."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from kd.cli import app
from kd.core import reductions
from kd.core.data import load_dataset
from kd.models import digits_cnn_student
from kd.precompute import precompute
from kd.student_trainer.features import Match, Taps
from kd.student_trainer.sources import CacheSource, LocalSource, ServerSource
from kd.student_trainer.train import TrainConfig, seed_everything, train_student
from kd.teacher_server.client import TeacherClient, TeacherRequestError
from kd.teacher_server.loading import Teacher, load_teacher
from kd.teacher_server.server import start_server

TRAIN = load_dataset("digits", "train")
TEST = load_dataset("digits", "test")
SUBSET = torch.arange(96)


@pytest.fixture(scope="module")
def cnn_spec(digits_cnn_spec) -> str:
    return digits_cnn_spec(2)


@pytest.fixture(scope="module")
def cnn(cnn_spec: str) -> Teacher:
    return load_teacher("cnn", cnn_spec)


@pytest.fixture(scope="module")
def address(cnn: Teacher):
    running = start_server([cnn])
    yield f"127.0.0.1:{running.port}"
    running.stop(grace=1)


# -- reductions: definitions ------------------------------------------------------------------
def test_reductions_match_their_definitions_in_float64() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    y = torch.randn(3, 2, 5, 6, dtype=torch.float64)
    maps = {"a": x, "b": y}
    n, c, hw = 3, 4, 30
    # at: mean over channels of x^2, L2-normalised per sample
    for i in range(n):
        q = [sum(float(x[i, k].flatten()[j]) ** 2 for k in range(c)) / c for j in range(hw)]
        norm = math.sqrt(sum(v * v for v in q))
        torch.testing.assert_close(reductions.reduce("a@at", maps)[i], torch.tensor(q, dtype=torch.float64) / norm)
    # at:1 uses |x|
    a1 = x.abs().mean(1).flatten(1)
    torch.testing.assert_close(reductions.reduce("a@at:1", maps), a1 / a1.norm(dim=1, keepdim=True))
    # adain: per-channel mean and sqrt(biased var + 1e-5)
    flat = x.flatten(2)
    mom = reductions.reduce("a@adain", maps)
    torch.testing.assert_close(mom[:, 0], flat.sum(2) / hw)
    torch.testing.assert_close(mom[:, 1], (((flat - flat.mean(2, keepdim=True)) ** 2).sum(2) / hw + 1e-5).sqrt())
    # nst: Gram of unit-norm channel maps over positions, / C
    f = flat / flat.norm(dim=2, keepdim=True)
    g = torch.einsum("nci,ncj->nij", f, f) / c
    torch.testing.assert_close(reductions.reduce("a@nst", maps), g)
    # fsp between a [4 ch] and b [2 ch]
    fsp = torch.einsum("nci,ndi->ncd", x.flatten(2), y.flatten(2)) / hw
    torch.testing.assert_close(reductions.reduce("a@fsp:b", maps), fsp)
    # sp: rows of Q Q^T normalised
    q = x.flatten(1)
    gram = q @ q.t()
    torch.testing.assert_close(reductions.reduce("a@sp", maps), gram / gram.norm(dim=1, keepdim=True))
    # cc: Taylor-expanded RBF, gamma 0.4, order 2, on unit embeddings
    e = q / q.norm(dim=1, keepdim=True)
    d = e @ e.t()
    cc = sum(math.exp(-0.8) * 0.8**p / math.factorial(p) * d**p for p in range(3))
    torch.testing.assert_close(reductions.reduce("a@cc", maps), cc)
    # pool on tokens [N, T, D]
    tok = torch.randn(2, 7, 3, dtype=torch.float64)
    torch.testing.assert_close(reductions.reduce("t@pool", {"t": tok}), tok.mean(1))


def test_nst_mmd_with_the_squared_polynomial_kernel_is_a_gram_distance() -> None:
    """The reason ``@nst`` is a sufficient statistic: MMD^2 with k(u, v) = (u.v)^2 between the
    channel maps of two layers equals ||G_s - G_t||_F^2 of their ``nst`` Grams."""
    torch.manual_seed(1)
    s, t = torch.randn(1, 3, 2, 2, dtype=torch.float64), torch.randn(1, 5, 2, 2, dtype=torch.float64)
    us = F.normalize(s.flatten(2)[0], dim=1)
    ut = F.normalize(t.flatten(2)[0], dim=1)

    def k(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a @ b.t()).pow(2).mean())

    mmd = k(us, us) + k(ut, ut) - 2 * k(us, ut)
    gs, gt = reductions.reduce("x@nst", {"x": s}), reductions.reduce("x@nst", {"x": t})
    assert abs(float((gs - gt).pow(2).sum()) - mmd) < 1e-12


def test_feature_names_are_validated() -> None:
    assert reductions.parse("layer2@fsp:layer3").layers == ("layer2", "layer3")
    assert not reductions.parse("x@sp").per_sample and reductions.parse("x@at").per_sample
    for bad, why in [("x@nope", "unknown reduction"), ("x@fsp", "takes 1..1"), ("x@at:q", "numbers"),
                     ("@at", "empty layer"), ("x@pool:3", "takes 0..0")]:  # fmt: skip
        with pytest.raises(ValueError, match=why):
            reductions.parse(bad)
    with pytest.raises(ValueError, match="4-D"):
        reductions.reduce("x@at", {"x": torch.randn(2, 3)})


# -- server: reduced forms next to the model ---------------------------------------------------
def test_server_reductions_equal_the_trainers(address: str, cnn: Teacher) -> None:
    x = TRAIN.inputs[:7].reshape(7, 1, 8, 8)
    taps = Taps(cnn.model, ["layer1", "layer2"])
    with torch.inference_mode():
        cnn.model(x)
    maps = dict(taps.maps)
    taps.remove()
    names = ["layer2@at", "layer1@adain", "layer2@nst", "layer1@fsp:layer2", "layer2@sp", "pool@cc:0.5:3"]
    maps["pool"] = maps["layer2"].mean((2, 3), keepdim=True)
    with TeacherClient(address) as c:
        out = c.infer("cnn", x, logits=False, features=names)
    assert set(out) == {f"feature/{n}" for n in names}
    for name in names:
        torch.testing.assert_close(out[f"feature/{name}"], reductions.reduce(name, maps), rtol=1e-4, atol=1e-5)
    assert out["feature/layer2@at"].shape == (7, 64) and out["feature/layer1@fsp:layer2"].shape == (7, 32, 64)


def test_batch_reductions_stay_within_each_request_when_batched_together(address: str, cnn: Teacher) -> None:
    """Several requests merged into one forward: each reply's sp matrix covers only its own samples."""
    parts = [TRAIN.inputs[i * 5 : i * 5 + 5].reshape(5, 1, 8, 8) for i in range(6)]
    with TeacherClient(address) as c:
        replies = [o for _, o in c.infer_stream("cnn", ((k, x) for k, x in enumerate(parts)), depth=6,
                                                 features=["layer2@sp"])]  # fmt: skip
    for x, out in zip(parts, replies):
        with torch.inference_mode():
            taps = Taps(cnn.model, ["layer2"])
            cnn.model(x)
            taps.remove()
        torch.testing.assert_close(out["feature/layer2@sp"], reductions.reduce("layer2@sp", taps.maps), atol=1e-5,
                                   rtol=1e-4)  # fmt: skip


def test_server_refuses_bad_feature_names_and_keeps_serving(address: str) -> None:
    with TeacherClient(address) as c:
        for bad, why in [("layer2@bogus", "unknown reduction"), ("layer2@fsp:nowhere", "nowhere"),
                         ("layer2@fsp", "takes 1..1")]:  # fmt: skip
            with pytest.raises(TeacherRequestError) as err:
                c.infer("cnn", TRAIN.inputs[:2].reshape(2, 1, 8, 8), features=[bad])
            assert err.value.code.name == "INVALID_ARGUMENT" and why in str(err.value)
        x = TRAIN.inputs[:2].reshape(2, 1, 8, 8)
        assert c.infer("cnn", x, features=["layer2@at"])["feature/layer2@at"].shape == (2, 64)


# -- the trainer: the same student from every source -------------------------------------------
def _student(method: str, source, *, matches=("layer2=layer2",), epochs: int = 2, **options):
    seed_everything(0)
    student = digits_cnn_student()
    config = TrainConfig(method=method, matches=list(matches), method_options=options, epochs=epochs, batch_size=32)
    res = train_student(student, TRAIN, TEST, config, source=source, subset=SUBSET)
    return student, res


def test_at_trains_the_same_student_from_local_server_and_cache(cnn: Teacher, address: str, tmp_path: Path) -> None:
    local, r_local = _student("at", LocalSource(cnn))
    with ServerSource(address, "cnn") as src:
        served, r_served = _student("at", src)
    # The cache stores only the attention statistic: 64 values per sample instead of 64x8x8.
    rep = precompute(TRAIN, LocalSource(cnn), tmp_path / "c", features=["layer2@at"], progress=False)
    with CacheSource(str(tmp_path / "c")) as src:
        assert src.reader.meta.features == {"layer2@at": [64]}
        cached, r_cached = _student("at", src)
    assert rep.bytes_per_sample < 4 * 10 + 2 * 64 + 64
    # Server and in-process teacher compute the same fp32 statistic: the same student.
    for (name, a), b in zip(local.state_dict().items(), served.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)
    # The cache stores it in fp16: the same training up to that rounding.
    assert r_cached.loss_per_epoch == pytest.approx(r_local.loss_per_epoch, rel=1e-3)
    assert all(math.isfinite(v) for v in r_local.loss_per_epoch)
    assert abs(r_local.test_acc - r_served.test_acc) <= 0.01 and abs(r_local.test_acc - r_cached.test_acc) <= 0.01


def test_teacher_statistic_from_the_source_or_the_trainer_gives_the_same_training(cnn: Teacher, address: str) -> None:
    with ServerSource(address, "cnn") as src:
        a, ra = _student("at", src)
    with ServerSource(address, "cnn") as src:
        b, rb = _student("at", src, teacher_reduce="trainer")
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
    assert ra.loss_per_epoch == pytest.approx(rb.loss_per_epoch, rel=1e-4)


def test_cache_with_the_full_map_computes_the_statistic_and_refuses_what_it_lacks(cnn: Teacher, tmp_path: Path):
    precompute(TRAIN, LocalSource(cnn), tmp_path / "full", features=["layer2"], progress=False)
    with CacheSource(str(tmp_path / "full")) as src:
        _, r = _student("at", src, epochs=1)
        assert math.isfinite(r.loss_per_epoch[0])
        # The message names the cache's path (it once said "cache 'cache'", the source kind).
        lacks = f"cache {str(tmp_path / 'full')!r} does not store teacher feature 'layer1@at'"
        with pytest.raises(ValueError, match=re.escape(lacks)):
            _student("at", src, matches=("layer1=layer1",), epochs=1)
    with pytest.raises(ValueError, match="cannot be cached per sample"):
        precompute(TRAIN, LocalSource(cnn), tmp_path / "sp", features=["layer2@sp"], progress=False)


def test_fitnet_connector_is_trained_checkpointed_and_resumed_exactly(cnn: Teacher, tmp_path: Path) -> None:
    src = LocalSource(cnn)
    seed_everything(0)
    full = digits_cnn_student()
    cfg = TrainConfig(method="fitnet", matches=["layer2=layer2"], epochs=3)
    res = train_student(full, TRAIN, TEST, cfg, source=src, subset=SUBSET)
    conv = res.connectors[0].conv.weight
    assert conv.shape == (64, 16, 1, 1)
    seed_everything(0)
    first = digits_cnn_student()
    train_student(first, TRAIN, TEST, TrainConfig(method="fitnet", matches=["layer2=layer2"], epochs=1), source=src,
                  subset=SUBSET, run_dir=tmp_path / "run")  # fmt: skip
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert "connectors" in ckpt and ckpt["connectors"]["0.conv.weight"].shape == (64, 16, 1, 1)
    # an "interrupted" run: continue from the epoch-1 checkpoint to 3 epochs
    cfg_json = json.loads((tmp_path / "run" / "config.json").read_text())
    cfg_json["epochs"] = 3
    (tmp_path / "run" / "config.json").write_text(json.dumps(cfg_json))
    ckpt["config"]["epochs"] = 3  # the checkpoint carries its config too
    torch.save(ckpt, tmp_path / "run" / "checkpoint.pt")
    seed_everything(123)  # resume must not depend on the caller's RNG
    resumed = digits_cnn_student()
    r2 = train_student(resumed, TRAIN, TEST, cfg, source=src, subset=SUBSET, run_dir=tmp_path / "run", resume=True)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(r2.connectors[0].conv.weight, conv)


def test_feature_method_errors_name_the_problem(cnn: Teacher) -> None:
    src = LocalSource(cnn)
    with pytest.raises(ValueError, match="give --match"):
        _student("at", src, matches=())
    with pytest.raises(ValueError, match="student has no module"):
        _student("at", src, matches=("layer7=layer2",))
    with pytest.raises(ValueError, match="unknown layer"):
        _student("at", src, matches=("layer2=layer9",))
    with pytest.raises(TypeError, match="no option"):
        _student("at", src, gamma=3)
    with pytest.raises(ValueError, match="works on logits"):
        _student("kd", src)
    with pytest.raises(ValueError, match="STUDENT_LAYER=TEACHER_LAYER"):
        Match.parse("layer2")


def test_kd_train_cli_feature_method_saves_connectors_and_tensorboard(cnn_spec: str, tmp_path: Path) -> None:
    out = tmp_path / "student.safetensors"
    res = CliRunner().invoke(app, [
        "train", "--method", "fitnet", "--match", "layer2=layer2", "--source", f"local:{cnn_spec}",
        "--student", "kd.models:digits_cnn_student", "--epochs", "1", "--subset", "64", "--out", str(out),
        "--run-dir", str(tmp_path / "run"), "--opt", "kd_weight=1",
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["method"] == "fitnet"
    from safetensors.torch import load_file

    conn = load_file(str(out.with_suffix(".connectors.safetensors")))
    assert conn["0.conv.weight"].shape == (64, 16, 1, 1)
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    res = CliRunner().invoke(app, ["methods"], env={"COLUMNS": "1000"})  # one line per row: nothing wraps
    assert "feature (@at)" in res.output
