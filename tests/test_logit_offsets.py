"""Targets that keep the teacher's logits only up to a constant per row (top-k, q8/q4 and pca caches, a
server asked for its top-k, a mixture of teachers' probabilities) are refused, before any training
step and any teacher or cache work, for the methods whose loss reads absolute logits (noisy, ka-dtd
with flsw, pad with l2, srd, adversarial: ``teacher_logits_shift_invariant``); the others train from
them as before, and full-logit caches (fp32, fp16, bf16, int8) serve every method."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_checks import refused
from typer.testing import CliRunner

from kd.cli import app
from kd.core.data import load_dataset
from kd.models import digits_student
from kd.student_trainer.multi import MultiTeacherSource
from kd.student_trainer.sources import CacheSource, ServerSource
from kd.student_trainer.train import TrainConfig, seed_everything, train_student

LOSING = ("topk:5", "q8", "pca:8", "sample:12")  # the logits up to a constant per row, or (sample) no logits
KEEPING = ("fp16", "int8")
TRAIN = ["train", "--epochs", "1", "--subset", "48", "--batch-size", "16"]
FULL_LOGITS_HINT = "a cache precomputed with --codec fp32, fp16, bf16 or int8"


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory, teacher_spec: str) -> dict[str, str]:
    """Caches of the digits teacher in every codec the tests use, made by ``kd precompute``."""
    d = tmp_path_factory.mktemp("caches")
    out = {}
    for codec in (*LOSING, *KEEPING):
        path = d / codec.replace(":", "-")
        res = invoke("precompute", "--source", f"local:{teacher_spec}", "--dataset", "digits", "--out", str(path),
                     "--codec", codec)  # fmt: skip
        assert res.exit_code == 0, res.output
        out[codec] = str(path)
    return out


@pytest.mark.parametrize("codec", LOSING)
def test_noisy_is_refused_on_a_cache_that_lost_the_offsets(caches, codec: str, tmp_path: Path) -> None:
    out, run = tmp_path / "s.safetensors", tmp_path / "run"
    r = invoke(*TRAIN, "--method", "noisy", "--source", f"cache:{caches[codec]}", "--out", str(out),
               "--run-dir", str(run))  # fmt: skip
    text = refused(r, "method 'noisy' reads the teacher's absolute logits", f"cache {caches[codec]!r}: {codec} keeps",
                   FULL_LOGITS_HINT, "a server: source without --server-topk")  # fmt: skip
    assert ("top-k targets lose the logits' offsets" in text) == codec.startswith("topk:")
    assert not out.exists() and not run.exists()  # refused before the run directory or a step


def test_the_options_decide_for_ka_dtd(caches) -> None:
    """ka-dtd's flsw weights read the raw logits (refused on q8); with cwsm its loss sees only softmax
    and trains from the same cache."""
    source = ["--source", f"cache:{caches['q8']}"]
    refused(invoke(*TRAIN, "--method", "ka-dtd", *source), "method 'ka-dtd' reads the teacher's absolute logits",
            "q8 keeps log-probabilities below each row's maximum")  # fmt: skip
    refused(invoke(*TRAIN, "--method", "ka-dtd", "--opt", "dtd=flsw", *source), "method 'ka-dtd' with dtd='flsw'")
    r = invoke(*TRAIN, "--method", "ka-dtd", "--opt", "dtd=cwsm", *source)
    assert r.exit_code == 0, r.output


def test_shift_invariant_methods_train_from_the_caches_that_lost_the_offsets(caches) -> None:
    # kd and tfkd-self read top-k targets as they are (sparse); dkd and logitstd take dense logits, which
    # q8 and pca give shifted by a constant per row: none of their losses sees it.
    for method, codec in (("kd", "topk:5"), ("tfkd-self", "topk:5"), ("dkd", "q8"), ("logitstd", "pca:8")):
        r = invoke(*TRAIN, "--method", method, "--source", f"cache:{caches[codec]}")
        assert r.exit_code == 0, (method, codec, r.output)
        assert '"test_acc"' in r.stdout


@pytest.mark.parametrize("codec", KEEPING)
def test_noisy_trains_from_full_logit_caches(caches, codec: str) -> None:
    r = invoke(*TRAIN, "--method", "noisy", "--source", f"cache:{caches[codec]}")
    assert r.exit_code == 0, r.output


def test_server_topk_is_refused_before_the_server_is_asked(server, address: str, tmp_path: Path) -> None:
    out = tmp_path / "s.safetensors"
    r = invoke(*TRAIN, "--method", "noisy", "--source", f"server:{address}/digits", "--server-topk", "5",
               "--out", str(out))  # fmt: skip
    refused(r, "method 'noisy' reads the teacher's absolute logits", "--server-topk 5",
            "top-k targets lose the logits' offsets", "a server: source without --server-topk")  # fmt: skip
    assert not out.exists()
    assert not server.metrics.registry.get_sample_value("kd_samples_total", {"teacher": "digits"})
    # The same server without --server-topk gives the full logits: noisy trains from it.
    r = invoke(*TRAIN, "--method", "noisy", "--source", f"server:{address}/digits")
    assert r.exit_code == 0, r.output


def test_read_through_into_a_topk_cache_is_refused_before_the_cache_is_made(teacher_spec: str,
                                                                            tmp_path: Path) -> None:  # fmt: skip
    cache = tmp_path / "rt"
    r = invoke(*TRAIN, "--method", "noisy", "--source", f"cache:{cache}", "--read-through", f"local:{teacher_spec}",
               "--codec", "topk:5")  # fmt: skip
    refused(r, "method 'noisy' reads the teacher's absolute logits", "the read-through cache: topk:5 keeps")
    assert not cache.exists()


def test_train_student_refuses_before_any_work(caches, tmp_path: Path) -> None:
    """The Python API refuses as the CLI does: a logit method, and a feature method (pad with the l2
    distance reads the raw logits) before its teacher probe, and a server source asked for top-k."""
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    digits_id = train.dataset_id
    with (
        CacheSource(caches["pca:8"], dataset_id=digits_id) as src,
        pytest.raises(
            ValueError, match=r"^method 'noisy' reads the teacher's absolute logits.*pca:8 keeps the row-centred logits"
        ),
    ):
        train_student(digits_student(), train, test, TrainConfig(method="noisy", epochs=1), source=src,
                      run_dir=tmp_path / "run")  # fmt: skip
    assert not (tmp_path / "run").exists()
    config = TrainConfig(method="pad", matches=["pool=logits"], method_options={"distance": "l2"}, epochs=1)
    with (
        CacheSource(caches["q8"], dataset_id=digits_id) as src,
        pytest.raises(ValueError, match=r"^method 'pad' with distance='l2' reads the teacher's absolute logits"),
    ):
        train_student(digits_student(), train, test, config, source=src)


def test_server_source_asked_for_topk_is_refused_by_train_student(server, address: str) -> None:
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    with (
        ServerSource(address, "digits", topk=5) as src,
        pytest.raises(
            ValueError, match=r"^method 'ka-dtd' reads .*--server-topk 5.*top-k targets lose the logits' offsets"
        ),
    ):
        train_student(digits_student(), train, test, TrainConfig(method="ka-dtd", epochs=1), source=src)
    assert not server.metrics.registry.get_sample_value("kd_samples_total", {"teacher": "digits"})


def test_a_mixture_of_probabilities_loses_the_offsets_and_mean_logits_keeps_them(caches) -> None:
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    digits_id = train.dataset_id

    def sources():
        return [CacheSource(caches[c], dataset_id=digits_id) for c in KEEPING]

    with pytest.raises(ValueError, match=r"combiner 'mean' returns T \* log of the teachers' mixed probabilities"):
        train_student(digits_student(), train, test, TrainConfig(method="noisy", epochs=1),
                      source=MultiTeacherSource(sources(), "mean"))  # fmt: skip
    seed_everything(0)
    result = train_student(digits_student(), train, test, TrainConfig(method="noisy", epochs=1),
                           source=MultiTeacherSource(sources(), "mean-logits"), subset=torch.arange(32))  # fmt: skip
    assert len(result.loss_per_epoch) == 1
    # One member that lost the offsets is named, whatever the combiner.
    mixed = [CacheSource(caches["topk:5"], dataset_id=digits_id), *sources()[:1]]
    with pytest.raises(ValueError, match=r"but #0 cache .*topk:5 keeps the top 5 classes"):
        train_student(digits_student(), train, test, TrainConfig(method="noisy", epochs=1),
                      source=MultiTeacherSource(mixed, "mean-logits"))  # fmt: skip


def test_kd_methods_says_which_methods_need_full_logits() -> None:
    r = CliRunner().invoke(app, ["methods"], env={"COLUMNS": "400"})
    assert r.exit_code == 0, r.output
    rows = {line.split("│")[1].strip(): line for line in r.output.splitlines() if line.count("│") > 3}
    assert "absolute: full logits" in rows["adversarial"] and "up to a shift" in rows["kd"]
    assert "absolute: full logits (at the defaults; options decide)" in rows["noisy"]
    assert "up to a shift (at the defaults; options decide)" in rows["pad"]


def test_a_logits_match_of_a_feature_loss_not_made_for_logits_is_refused(caches) -> None:
    """rkd's distances on `pool=logits` read the raw logits (refused on q8); pad is made for the teacher's
    logits and with the kl distance sees only their softmax (trains), with l2 reads them (refused)."""
    cnn = ["--student", "kd.models:digits_cnn_student", "--source", f"cache:{caches['q8']}"]
    fed = "the match 'pool=logits' feeds the teacher's logits to method 'rkd' as plain values"
    refused(invoke(*TRAIN, "--method", "rkd", "--match", "pool=logits", *cnn), fed, "q8 keeps")
    refused(invoke(*TRAIN, "--method", "pad", "--match", "pool=logits", "--opt", "distance=l2", *cnn),
            "method 'pad' with distance='l2' reads the teacher's absolute logits")  # fmt: skip
    r = invoke(*TRAIN, "--method", "pad", "--match", "pool=logits", *cnn)
    assert r.exit_code == 0, r.output
