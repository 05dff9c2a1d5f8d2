"""QKD (student_trainer/qkd.py) on the real digits data: a teacher trained here, the three
phases, the int8 conversion, the refusals, and `kd qkd` through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.ao.nn import quantized as nnq
from typer.testing import CliRunner

from kd.cli import app
from kd.core.data import load_dataset
from kd.demo import train_digits_teacher
from kd.models import MLP, digits_student
from kd.precompute import precompute
from kd.student_trainer.qkd import PHASES, QKDConfig, QKDResult, fusable_groups, train_qkd
from kd.student_trainer.sources import CacheSource, LocalSource
from kd.teacher_server.loading import Teacher

EPOCHS = {"self_studying": 3, "co_studying": 4, "tutoring": 3}


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


@pytest.fixture(scope="module")
def trained_teacher(data, tmp_path_factory: pytest.TempPathFactory) -> tuple[Teacher, float, Path]:
    train, test = data
    path = tmp_path_factory.mktemp("qkd-teacher") / "teacher.safetensors"
    teacher, acc = train_digits_teacher(train, test, path, epochs=5)
    return teacher, acc, path


def _student(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return digits_student()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def run(data, trained_teacher):
    """One QKD run; the teacher's and the student's weights snapshotted at the end of every phase."""
    train, test = data
    teacher = trained_teacher[0].model
    before = _state(teacher)
    snapshots: dict[str, dict] = {}

    def on_phase_end(phase: str, student: nn.Module, t: nn.Module | None) -> None:
        assert t is not None
        snapshots[phase] = {"teacher": _state(t), "student": _state(student)}

    config = QKDConfig(epochs_self=EPOCHS["self_studying"], epochs_co=EPOCHS["co_studying"],
                       epochs_tutor=EPOCHS["tutoring"])  # fmt: skip
    result = train_qkd(_student(), teacher, train, test, config, on_phase_end=on_phase_end)
    return result, before, snapshots, teacher


def _acc(model: nn.Module, data) -> float:
    with torch.no_grad():
        return float((model(data.inputs).argmax(1) == data.labels).float().mean())


def test_teacher_trains_quickly(trained_teacher):
    assert trained_teacher[1] > 0.9


def test_int8_model_is_really_quantized(run, data):
    result: QKDResult = run[0]
    quantized = [m for m in result.int8_model.modules() if isinstance(m, nnq.Linear)]
    assert len(quantized) == 2  # 64-16 (fused with its ReLU) and 16-10
    assert type(quantized[0]).__name__ == "LinearReLU"  # Linear+ReLU fused into one int8 kernel
    assert not [m for m in result.int8_model.modules() if type(m) is nn.Linear]  # no float layer left
    for m in quantized:
        w = m.weight()
        assert w.dtype == torch.qint8
        ints = w.int_repr()
        assert ints.dtype == torch.int8 and int(ints.min()) >= -128 and int(ints.max()) <= 127
        assert len(ints.unique()) > 16  # real weights, not a collapsed quantizer
    # the activations between layers are int8 (quint8) tensors too
    seen = []
    hook = quantized[0].register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    result.int8_model(data[1].inputs[:4])
    hook.remove()
    assert seen == [torch.quint8]
    assert any(isinstance(v, tuple) or getattr(v, "dtype", None) == torch.qint8
               for v in result.int8_model.state_dict().values())  # fmt: skip
    # int8 weights take fewer bytes than float32 ones (per-channel scales included)
    assert result.int8_weight_bytes < 0.5 * result.float_weight_bytes
    assert result.float_weight_bytes == 4 * (64 * 16 + 16 + 16 * 10 + 10)
    # torch.save sizes of the state dicts: for 1.2k weights the zip container's overhead dominates them
    assert result.int8_state_bytes > 0 and result.float_state_bytes > 0


def test_accuracies(run, data, trained_teacher):
    result: QKDResult = run[0]
    test = data[1]
    assert result.float_acc > 0.75 and result.int8_acc > 0.75  # chance is 0.1
    assert abs(result.int8_acc - result.float_acc) <= 0.03
    assert result.agreement >= 0.95
    # the reported numbers are the models' own accuracies
    assert result.int8_acc == pytest.approx(_acc(result.int8_model, test))
    assert result.float_acc == pytest.approx(_acc(result.qat_model.eval(), test))
    assert result.acc_per_epoch["tutoring"][-1] == pytest.approx(result.float_acc)
    assert {p: len(result.acc_per_epoch[p]) for p in PHASES} == EPOCHS
    assert {p: len(result.loss_per_epoch[p]) for p in PHASES} == EPOCHS
    assert len(result.teacher_acc_per_epoch) == EPOCHS["co_studying"]
    assert result.teacher_acc_before == pytest.approx(trained_teacher[1])
    assert result.skipped == []
    json.dumps(result.summary())


def test_co_studying_trains_the_teacher_and_tutoring_does_not(run):
    result, before, snapshots, caller_teacher = run
    assert list(snapshots) == list(PHASES)

    def same(a: dict, b: dict) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    assert same(snapshots["self_studying"]["teacher"], before)  # self-studying: student alone
    assert not same(snapshots["co_studying"]["teacher"], before)
    assert same(snapshots["tutoring"]["teacher"], snapshots["co_studying"]["teacher"])
    assert same(_state(result.teacher), snapshots["co_studying"]["teacher"])
    assert same(_state(caller_teacher), before)  # the caller's teacher is never modified
    # the student learns in every phase
    assert not same(snapshots["co_studying"]["student"], snapshots["self_studying"]["student"])
    assert not same(snapshots["tutoring"]["student"], snapshots["co_studying"]["student"])


def test_fusion_groups_of_the_students():
    assert fusable_groups(digits_student()) == [["0", "1"]]
    assert fusable_groups(MLP([64, 32, 16, 10])) == [["0", "1"], ["2", "3"]]


def test_untrainable_teachers_are_refused_for_co_studying(data, trained_teacher):
    train, test = data
    source = LocalSource(trained_teacher[0])  # a soft-target source: targets only, nothing to train
    with pytest.raises(ValueError, match="co-studying trains the teacher.*'local' source"):
        train_qkd(_student(), source, train, test, QKDConfig(epochs_self=1, epochs_co=1, epochs_tutor=1))
    with pytest.raises(ValueError, match="no parameters to train"):
        train_qkd(_student(), nn.Identity(), train, test, QKDConfig(epochs_self=1, epochs_co=1, epochs_tutor=0))
    with pytest.raises(TypeError, match="teacher must be"):
        train_qkd(_student(), "kd.models:digits_teacher", train, test, QKDConfig())


@pytest.mark.parametrize(
    "config, message",
    [
        (QKDConfig(epochs_self=0, epochs_co=0, epochs_tutor=0), "nothing to train"),
        (QKDConfig(epochs_co=-1), "epochs_co"),
        (QKDConfig(temperature=0.0), "temperature"),
        (QKDConfig(alpha=1.5), "alpha"),
        (QKDConfig(batch_size=0), "batch_size"),
        (QKDConfig(backend="tpu"), "backend"),
        (QKDConfig(untrainable_teacher="maybe"), "untrainable_teacher"),
    ],
)
def test_bad_configs_are_refused(data, trained_teacher, config: QKDConfig, message: str):
    with pytest.raises(ValueError, match=message):
        train_qkd(_student(), trained_teacher[0].model, *data, config)


def test_wrong_student_is_refused(data, trained_teacher):
    with pytest.raises(ValueError, match=r"student returns \(5,\) per sample"):
        train_qkd(MLP([64, 16, 5]), trained_teacher[0].model, *data, QKDConfig(epochs_self=1))


def test_tutoring_from_a_cache_equals_tutoring_from_the_module(data, trained_teacher, tmp_path: Path):
    """A cached teacher can tutor (co-studying skipped on request): the same targets, the same student."""
    train, test = data
    teacher = trained_teacher[0]
    precompute(train, LocalSource(teacher), tmp_path / "cache", progress=False)
    config = QKDConfig(epochs_self=1, epochs_co=2, epochs_tutor=2, untrainable_teacher="skip")
    with CacheSource(str(tmp_path / "cache"), dataset_id=train.dataset_id) as cache:
        cached = train_qkd(_student(), cache, train, test, config)
    assert cached.skipped == ["co_studying"] and cached.acc_per_epoch["co_studying"] == []
    assert cached.teacher is None and cached.teacher_acc_before is None
    assert len(cached.acc_per_epoch["tutoring"]) == 2
    local = train_qkd(_student(), teacher.model, train, test, QKDConfig(epochs_self=1, epochs_co=0, epochs_tutor=2))
    a, b = _state(cached.qat_model), _state(local.qat_model)
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    assert cached.int8_acc == pytest.approx(local.int8_acc, abs=0.002)


def test_kd_qkd_cli(trained_teacher, data, tmp_path: Path):
    spec = f"kd.models:digits_teacher@{trained_teacher[2]}"
    out = tmp_path / "out"
    runner = CliRunner()
    r = runner.invoke(app, ["qkd", "--teacher", spec, "--epochs-self", "2", "--epochs-co", "3",
                            "--epochs-tutor", "2", "--out", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    printed = json.loads(r.stdout.strip().splitlines()[-1])
    results = json.loads((out / "results.json").read_text())
    assert printed["int8_acc"] == results["int8_acc"] and printed["float_acc"] == results["float_acc"]
    assert results["int8_acc"] > 0.5 and abs(results["int8_acc"] - results["float_acc"]) <= 0.05
    assert {p: len(v) for p, v in results["acc_per_epoch"].items()} == {
        "self_studying": 2, "co_studying": 3, "tutoring": 2}  # fmt: skip
    assert results["teacher"]["spec"] == spec and results["config"]["epochs_co"] == 3
    # the saved int8 model is the one evaluated
    test = data[1]
    scripted = torch.jit.load(str(out / "student-int8.torchscript.pt"))
    assert _acc(scripted, test) == pytest.approx(results["int8_acc"])
    state = torch.load(out / "student-int8.state_dict.pt", weights_only=True)
    packed = [v for k, v in state.items() if k.endswith("_packed_params._packed_params")]
    assert packed and all(w.dtype == torch.qint8 for w, _bias in packed)
    # the co-studied teacher was saved, and it moved away from the input weights
    original = load_file(str(trained_teacher[2]))
    co_studied = load_file(str(out / "teacher-co-studied.safetensors"))
    assert original.keys() == co_studied.keys()
    assert any(not torch.equal(original[k], co_studied[k]) for k in original)


def test_kd_qkd_cli_refusals(trained_teacher, data, tmp_path: Path):
    runner = CliRunner()
    r = runner.invoke(app, ["qkd", "--epochs-self", "0", "--epochs-co", "0", "--epochs-tutor", "0"])
    assert r.exit_code == 2 and "nothing to train" in r.output
    r = runner.invoke(app, ["qkd", "--teacher", f"kd.models:digits_teacher@{tmp_path / 'missing.safetensors'}",
                            "--out", str(tmp_path / "o1")])  # fmt: skip
    assert r.exit_code == 2 and "missing.safetensors" in r.output
    precompute(data[0], LocalSource(trained_teacher[0]), tmp_path / "cache", progress=False)
    args = ["qkd", "--teacher", f"cache:{tmp_path / 'cache'}", "--epochs-self", "1", "--epochs-co", "1",
            "--epochs-tutor", "1", "--out", str(tmp_path / "o2")]  # fmt: skip
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "co-studying" in r.output and "'cache' source" in r.output
    r = runner.invoke(app, [*args, "--skip-co-studying"])
    assert r.exit_code == 0, r.output
    results = json.loads((tmp_path / "o2" / "results.json").read_text())
    assert results["skipped"] == ["co_studying"] and len(results["acc_per_epoch"]["tutoring"]) == 1
    assert not (tmp_path / "o2" / "teacher-co-studied.safetensors").exists()


def test_qnnpack_backend(data, trained_teacher):
    """The ARM/mobile backend: per-tensor weights, the same int8 modules."""
    if "qnnpack" not in torch.backends.quantized.supported_engines:
        pytest.skip("this torch build has no qnnpack")
    config = QKDConfig(epochs_self=2, epochs_co=1, epochs_tutor=1, backend="qnnpack")
    result = train_qkd(_student(), trained_teacher[0].model, *data, config)
    assert result.backend == "qnnpack"
    weights = [m.weight() for m in result.int8_model.modules() if isinstance(m, nnq.Linear)]
    assert len(weights) == 2 and all(w.dtype == torch.qint8 and w.qscheme() == torch.per_tensor_affine for w in weights)
    assert result.int8_acc > 0.5 and abs(result.int8_acc - result.float_acc) <= 0.05


def test_kd_qkd_help():
    r = CliRunner().invoke(app, ["qkd", "--help"])
    assert r.exit_code == 0, r.output
    assert "--epochs-co" in r.output and "--skip-co-studying" in r.output


def test_the_trainers_width_check_leaves_a_qat_students_observers_alone(data) -> None:
    # train_student checks the student's output width with a forward of one sample before any step: a
    # QAT observer records even in eval mode, so each qkd phase began with every activation range set
    # from that one sample (a kd qkd of 1 self-studying epoch ended at 0.3840 int8 accuracy, 0.3940
    # with the check). The first step must see the observers as prepare_qat left them.
    from kd.student_trainer.qkd import prepare_qat_student
    from kd.student_trainer.train import Hooks, TrainConfig, train_student

    train, test = data
    qat = prepare_qat_student(_student(), "qnnpack" if "fbgemm" not in torch.backends.quantized.supported_engines
                              else "fbgemm")  # fmt: skip
    start = _state(qat)
    assert any(k.endswith("min_val") and torch.isinf(v).all() for k, v in start.items())  # nothing observed yet
    seen: list[dict[str, torch.Tensor]] = []

    def loss(ctx) -> torch.Tensor:
        if not seen:
            seen.append(_state(ctx.model))
        return nn.functional.cross_entropy(ctx.model(ctx.inputs), ctx.labels)

    train_student(qat, train, test, TrainConfig(method="ce", epochs=1, batch_size=64), hooks=Hooks(loss=loss),
                  subset=torch.arange(64))  # fmt: skip
    assert seen and seen[0].keys() == start.keys()
    for k, v in start.items():
        assert torch.equal(seen[0][k], v), k


@pytest.mark.parametrize("stop_at", [40, 170])  # co-studying, first epoch; tutoring, second (38 steps an epoch)
def test_a_stopped_run_resumes_to_the_uninterrupted_int8_student(data, trained_teacher, tmp_path: Path,
                                                                   stop_at: int) -> None:  # fmt: skip
    """train_qkd(run_dir=...) stopped inside a phase, then resume=True: the finished phases come back
    from their checkpoints (the QAT observers, the shared optimiser and batch order, co-studying's
    teacher), the stopped one goes on from its step; the int8 student, the accuracies per epoch and
    the co-studied teacher's are the uninterrupted run's."""
    from kd.core.signals import Stopped

    train, test = data
    teacher = trained_teacher[0].model
    config = QKDConfig(epochs_self=1, epochs_co=2, epochs_tutor=2)
    all_asked = []  # the whole run asks stop() before each of its 190 steps (38 an epoch) and at each epoch's end
    whole = train_qkd(_student(), teacher, train, test, config, run_dir=tmp_path / "whole",
                      stop=lambda: all_asked.append(1))  # fmt: skip
    calls = iter(range(10_000))
    with pytest.raises(Stopped):
        train_qkd(_student(), teacher, train, test, config, run_dir=tmp_path / "cut",
                  stop=lambda: 15 if next(calls) == stop_at else None)  # fmt: skip
    asked = []  # the resumed run does only what the stopped one had not: nothing twice
    got = train_qkd(_student(), teacher, train, test, config, run_dir=tmp_path / "cut", resume=True,
                    stop=lambda: asked.append(1))  # fmt: skip
    assert len(asked) == len(all_asked) - stop_at and len(all_asked) >= 190
    want = whole.int8_model.state_dict()
    for k, v in got.int8_model.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(
                v.dequantize() if v.is_quantized else v, want[k].dequantize() if want[k].is_quantized else want[k]
            ), k
    assert (got.acc_per_epoch, got.teacher_acc_per_epoch, got.int8_acc) == (whole.acc_per_epoch,
                                                                            whole.teacher_acc_per_epoch,
                                                                            whole.int8_acc)  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(got.teacher.state_dict().values(),
                                                 whole.teacher.state_dict().values()))  # fmt: skip
    other = QKDConfig(epochs_self=1, epochs_co=2, epochs_tutor=2, temperature=3.0)
    with pytest.raises(ValueError, match=r"another QKD run \(temperature: checkpoint 2\.0, now 3\.0\)"):
        train_qkd(_student(), teacher, train, test, other, run_dir=tmp_path / "cut", resume=True)
