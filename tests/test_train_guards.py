"""Training guards: a diverged run is an error (never a saved NaN student), resume refuses a checkpoint
of another run (a stale one, another cache, another student) and continues fp16 runs exactly (the grad
scaler's state is in the checkpoint), and the training commands validate their options before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_checks import refused
from typer.testing import CliRunner

from kd.cli import app
from kd.core.data import load_dataset
from kd.models import MLP, digits_student
from kd.student_trainer.sources import CacheSource, LocalSource, ServerSource
from kd.student_trainer.train import Hooks, TrainConfig, seed_everything, train_student


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def run(data, source, config: TrainConfig, student=None, **kw):
    train, test = data
    seed_everything(config.seed)
    student = student if student is not None else digits_student()
    result = train_student(student, train, test, config, source=source, subset=torch.arange(96), **kw)
    return student, result


class Crash(Exception):
    pass


def crash_after(epoch: int) -> Hooks:
    def on_epoch(e: int, row: dict) -> None:
        if e == epoch:
            raise Crash(f"killed after epoch {e}")

    return Hooks(on_epoch=on_epoch)


def crash_at_first_step() -> Hooks:
    def on_step(epoch: int, step: int, loss: float, lr: float) -> None:
        raise Crash("killed before the first epoch ended")

    return Hooks(on_step=on_step)


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


# ---- item 1: NaN training is an error ----


def test_diverging_training_fails_and_saves_no_student(tmp_path: Path) -> None:
    out = tmp_path / "s.safetensors"
    res = invoke("train", "--method", "ce", "--subset", "50", "--epochs", "2", "--lr", "1e30", "--optimizer", "sgd",
                 "--out", str(out), "--run-dir", str(tmp_path / "run"))  # fmt: skip
    assert res.exit_code == 2, res.output
    assert "diverged" in res.output and "Traceback" not in res.output
    assert not out.exists() and not (tmp_path / "run" / "checkpoint.pt").exists()


def test_zero_input_std_is_refused(tmp_path: Path) -> None:
    res = invoke("train", "--method", "ce", "--dataset", "digits?shape=1,8,8", "--student",
                 "kd.models:digits_cnn_student", "--subset", "50", "--epochs", "1", "--input-mean", "0.5",
                 "--input-std", "0")  # fmt: skip
    assert res.exit_code == 2 and "input_std" in res.output and "> 0" in res.output, res.output


VOCAB = 259


class BigramLM(torch.nn.Module):
    input_shape = (-1,)

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, dim)
        self.head = torch.nn.Linear(dim, VOCAB)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens)))


def teacher_lm() -> BigramLM:
    torch.manual_seed(21)
    return BigramLM(16)


def student_lm() -> BigramLM:
    torch.manual_seed(22)
    return BigramLM(8)


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("lm")
    (d / "train").mkdir()
    (d / "train" / "a.txt").write_text("the cat sat on the mat. the dog sat on the log. " * 4)
    uris = {"train": f"text:{d / 'train'}?block=16", "cache": str(d / "cache")}
    res = invoke("precompute", "--source", f"local:{__name__}:teacher_lm", "--dataset", uris["train"], "--out",
                 uris["cache"], "--codec", "topk:8", "--batch-size", "8")  # fmt: skip
    assert res.exit_code == 0, res.output
    return uris


def train_lm(token_cache, *extra: str):
    return invoke("train-lm", "--source", f"cache:{token_cache['cache']}", "--dataset", token_cache["train"],
                  "--val-dataset", token_cache["train"], "--student", f"{__name__}:student_lm", *extra)  # fmt: skip


def test_diverging_token_training_fails_and_saves_no_student(token_cache, tmp_path: Path) -> None:
    out = tmp_path / "lm.safetensors"
    res = train_lm(token_cache, "--lr", "1e30", "--optimizer", "sgd", "--batch-size", "4", "--out", str(out))
    assert res.exit_code == 2, res.output
    assert "diverged" in res.output and "NaN" not in res.stdout and not out.exists()


def test_train_lm_refuses_zero_epochs_and_saves_no_student(token_cache, tmp_path: Path) -> None:
    out = tmp_path / "lm.safetensors"
    # it exited 0 and wrote the untrained student to --out, where kd train refuses --epochs 0
    refused(train_lm(token_cache, "--epochs", "0", "--out", str(out)), "--epochs and --batch-size must be >= 1, got 0")
    assert not out.exists()


# ---- item 2: resume refuses a checkpoint of another run ----


def test_a_new_run_in_a_used_run_dir_leaves_no_checkpoint_to_resume(data, tmp_path: Path) -> None:
    run(data, None, TrainConfig(method="ce", epochs=2, lr=0.01), run_dir=tmp_path)
    other = TrainConfig(method="ce", epochs=2, lr=0.05)
    with pytest.raises(Crash):  # run B, started here without --resume, dies before its first epoch ends
        run(data, None, other, run_dir=tmp_path, hooks=crash_at_first_step())
    with pytest.raises(ValueError, match="no checkpoint.pt"):
        run(data, None, other, run_dir=tmp_path, resume=True)


def test_resume_compares_with_the_config_the_checkpoint_was_written_under(data, tmp_path: Path) -> None:
    run(data, None, TrainConfig(method="ce", epochs=2, lr=0.01), run_dir=tmp_path)
    other = TrainConfig(method="ce", epochs=3, lr=0.05)
    with pytest.raises(Crash):
        run(data, None, other, run_dir=tmp_path / "b", hooks=crash_at_first_step())
    # config.json now says run B's (as a run B killed after writing it left it), the checkpoint is run A's
    (tmp_path / "config.json").write_text((tmp_path / "b" / "config.json").read_text())
    with pytest.raises(ValueError, match=r"checkpoint's config differs in \['epochs', 'lr'\]"):
        run(data, None, other, run_dir=tmp_path, resume=True)


# ---- item 3: fp16 resume restores the grad scaler ----


def test_fp16_resume_restores_the_grad_scaler_and_is_exact(data, teacher, tmp_path: Path) -> None:
    # dkd with beta=1000 overflows fp16 gradients early, so the scaler's scale moves off its initial 65536
    config = TrainConfig(method="dkd", method_options={"beta": 1000.0}, epochs=3, amp="fp16", lr=0.01)
    full, _ = run(data, LocalSource(teacher), config, run_dir=tmp_path / "full")
    with pytest.raises(Crash):
        run(data, LocalSource(teacher), config, run_dir=tmp_path / "res", hooks=crash_after(0))
    resumed, _ = run(data, LocalSource(teacher), config, run_dir=tmp_path / "res", resume=True)
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["scaler"]["scale"] != 65536.0


# ---- item 4: resume refuses another cache of the same teacher, and another student ----


@pytest.fixture(scope="module")
def caches(tmp_path_factory, teacher_spec: str) -> dict[str, str]:
    d = tmp_path_factory.mktemp("caches")
    for codec in ("fp32", "q8"):
        res = invoke("precompute", "--source", f"local:{teacher_spec}", "--dataset", "digits", "--out",
                     str(d / codec), "--codec", codec)  # fmt: skip
        assert res.exit_code == 0, res.output
    return {c: str(d / c) for c in ("fp32", "q8")}


def test_resume_refuses_another_cache_of_the_same_teacher(data, caches, tmp_path: Path) -> None:
    config = TrainConfig(method="kd", epochs=2)
    digits_id = data[0].dataset_id
    with pytest.raises(Crash):
        run(data, CacheSource(caches["fp32"], dataset_id=digits_id), config, run_dir=tmp_path, hooks=crash_after(0))
    with pytest.raises(ValueError, match=r"differs in \['source_identity'\].*'codec': 'q8'"):
        run(data, CacheSource(caches["q8"], dataset_id=digits_id), config, run_dir=tmp_path, resume=True)
    run(data, CacheSource(caches["fp32"], dataset_id=digits_id), config, run_dir=tmp_path, resume=True)


def test_resume_refuses_another_student(data, tmp_path: Path) -> None:
    config = TrainConfig(method="ce", epochs=2)
    with pytest.raises(Crash):
        run(data, None, config, run_dir=tmp_path, hooks=crash_after(0))
    with pytest.raises(ValueError, match=r"differs in \['student'\]"):
        run(data, None, config, student=MLP([64, 32, 10]), run_dir=tmp_path, resume=True)


# ---- item 5: a server pool must serve one teacher ----


def test_a_pool_of_servers_holding_different_weights_is_refused(teacher, teacher_spec: str) -> None:
    from kd.teacher_server.loading import load_teacher
    from kd.teacher_server.server import start_server

    torch.manual_seed(99)
    other = load_teacher("digits", "kd.models:digits_teacher")  # the same name, other (random) weights
    assert other.fingerprint != teacher.fingerprint
    servers = [start_server([t], port=0) for t in (teacher, teacher, other)]
    a, b, c = (f"127.0.0.1:{s.port}" for s in servers)
    try:
        with ServerSource(f"{a},{b}", "digits") as same:  # one teacher on both: a pool
            assert same.fingerprint == teacher.fingerprint
        with pytest.raises(ValueError, match=f"server pool serves different teachers.*{a}.*{c}"):
            ServerSource(f"{a},{c}", "digits")
        res = invoke("train", "--source", f"server:{a},{c}/digits", "--subset", "50", "--epochs", "1")
        assert res.exit_code == 2 and "different teachers" in res.output and "Traceback" not in res.output
    finally:
        for s in servers:
            s.stop(grace=1)


# ---- items 6 and 7: the training commands validate --out and their values before any work ----


def test_an_unwritable_out_is_refused_before_training(tmp_path: Path, token_cache) -> None:
    (tmp_path / "afile").write_text("not a directory")
    out = str(tmp_path / "afile" / "s.safetensors")
    res = invoke("train", "--method", "ce", "--subset", "50", "--epochs", "1", "--out", out,
                 "--run-dir", str(tmp_path / "run"))  # fmt: skip
    assert res.exit_code == 2 and "--out" in res.output and "not a directory" in res.output, res.output
    assert not (tmp_path / "run").exists()  # refused before the run started
    res = train_lm(token_cache, "--out", out)
    assert res.exit_code == 2 and "--out" in res.output and "val perplexity" not in res.output, res.output
    res = invoke("train", "--method", "ce", "--subset", "50", "--epochs", "1", "--out", str(tmp_path))
    assert res.exit_code == 2 and "is a directory" in res.output, res.output


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--epochs", "0"], "--epochs and --batch-size must be >= 1"),
        (["--epochs", "-1"], "--epochs and --batch-size must be >= 1"),
        (["--batch-size", "0"], "--epochs and --batch-size must be >= 1"),
        (["--batch-size", "-3"], "--epochs and --batch-size must be >= 1"),
        (["--subset", "-5"], "--subset must be >= 0"),
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--device", "cuda:99"], "--device 'cuda:99'"),
    ],
)
def test_train_refuses_bad_values(args: list[str], why: str) -> None:
    res = invoke("train", "--method", "ce", "--subset", "50", "--epochs", "1", *args)
    assert res.exit_code == 2 and why in res.output, res.output


def test_other_commands_refuse_a_negative_seed_an_absent_device_and_no_samples(token_cache) -> None:
    for res in (train_lm(token_cache, "--seed", "-1"),
                invoke("onpolicy", "--server", "127.0.0.1:1", "--teacher", "t", "--dataset", token_cache["train"],
                       "--student", f"{__name__}:student_lm", "--seed", "-1")):  # fmt: skip
        assert res.exit_code == 2 and "--seed must be >= 0" in res.output, res.output
    for res in (train_lm(token_cache, "--device", "cuda:99"),
                invoke("evaluate", "--model", "kd.models:digits_student", "--dataset", "digits:test", "--device",
                       "cuda:99"),
                invoke("online", "one", "--epochs", "1", "--labeled", "50", "--device", "cuda:99")):  # fmt: skip
        assert res.exit_code == 2 and "--device 'cuda:99'" in res.output, res.output
    res = invoke("online", "one", "--epochs", "1", "--labeled", "0")
    assert res.exit_code == 2 and "--labeled must be >= 1" in res.output, res.output


# ---- item 8: --opt on the command line overrides the config's method options key by key ----


def test_command_line_opt_merges_with_the_configs(tmp_path: Path, teacher_spec: str) -> None:
    cfg = tmp_path / "kd.yaml"
    cfg.write_text("method: kd\nepochs: 1\nsubset: 50\nopt:\n  temperature: 4\n  alpha: 0.5\n")
    for extra, want in (([], {"temperature": 4, "alpha": 0.5}),
                        (["--opt", "temperature=2"], {"temperature": 2, "alpha": 0.5})):  # fmt: skip
        run_dir = tmp_path / f"run{len(extra)}"
        res = invoke("train", "--config", str(cfg), "--source", f"local:{teacher_spec}", "--run-dir", str(run_dir),
                     *extra)  # fmt: skip
        assert res.exit_code == 0, res.output
        assert json.loads((run_dir / "config.json").read_text())["method_options"] == want


# ---- item 9: more values checked up front ----


def test_onpolicy_checks_the_students_max_length_up_front(token_cache) -> None:
    res = invoke("onpolicy", "--server", "127.0.0.1:1", "--teacher", "t", "--dataset", token_cache["train"],
                 "--student", "kd.demo_lm:byte_lm?dim=16&layers=1&heads=2&max_length=32", "--prompt-tokens", "16",
                 "--max-new-tokens", "32")  # fmt: skip
    assert res.exit_code == 2, res.output
    assert "--prompt-tokens 16 + --max-new-tokens 32 exceed the student's max_length 32" in res.output


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--prefetch", "-1"], "--prefetch must be >= 0"),
        (["--optimizer", "sgd", "--momentum", "5"], "momentum must be < 1"),
        (["--resume"], "--resume continues the run in --run-dir: give --run-dir"),
    ],
)
def test_train_refuses_more_bad_values(args: list[str], why: str, teacher_spec: str) -> None:
    res = invoke("train", "--source", f"local:{teacher_spec}", "--subset", "50", "--epochs", "1", *args)
    assert res.exit_code == 2 and why in res.output, res.output


# ---- evaluate: a model of kd's own factories needs its trained weights ----


def pretrained_student() -> MLP:
    """Stands for another package's factory that builds a model with its weights (e.g. timm's pretrained)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return digits_student()


def test_evaluate_refuses_kds_own_factory_without_weights(tmp_path: Path, data) -> None:
    for spec, fixed in (("kd.models:digits_student", "kd.models:digits_student@student.safetensors"),
                        ("kd.student_trainer.zoo:resnet8x4?num_classes=10",
                         "kd.student_trainer.zoo:resnet8x4@student.safetensors?num_classes=10")):  # fmt: skip
        refused(invoke("evaluate", "--model", spec, "--dataset", "digits:test"), "has no @WEIGHTS", fixed)
    from kd.student_trainer.evaluate import evaluate
    from kd.teacher_server.loading import save_weights

    weights = tmp_path / "student.safetensors"
    save_weights(pretrained_student(), weights)
    want = evaluate(pretrained_student(), data[1])
    for spec in (f"kd.models:digits_student@{weights}", f"{__name__}:pretrained_student"):
        res = invoke("evaluate", "--model", spec, "--dataset", "digits:test")
        assert res.exit_code == 0, res.output
        line = json.loads(res.stdout.strip().splitlines()[-1])
        assert (line["top1"], line["n"]) == (want.top1, want.n), line


# ---- --server-topk: only a server: source asks for top-K; anything else is refused, never ignored ----


def test_server_topk_without_a_server_source_is_refused(caches, teacher_spec: str, tmp_path: Path) -> None:
    out = tmp_path / "s.safetensors"
    common = ["train", "--epochs", "1", "--subset", "50", "--server-topk", "5", "--out", str(out)]
    for extra in (["--source", f"cache:{caches['fp32']}"], ["--source", f"local:{teacher_spec}"]):
        refused(invoke(*common, *extra), "--server-topk 5 applies only to --source server:", "--codec topk:K")
    refused(invoke(*common, "--source", f"cache:{tmp_path / 'rt'}", "--read-through", f"local:{teacher_spec}"),
            "--server-topk 5 does not apply to --read-through", "--codec topk:5")  # fmt: skip
    assert not out.exists() and not (tmp_path / "rt").exists()


# ---- the library entry points refuse a run with no epoch or empty batches, as the CLI does ----


@pytest.mark.parametrize(("field", "value"), [("epochs", 0), ("epochs", -1), ("batch_size", 0)])
def test_train_student_refuses_no_epochs_and_empty_batches(data, field: str, value: int) -> None:
    with pytest.raises(ValueError, match=f"^{field} must be >= 1, got {value}$"):
        run(data, None, TrainConfig(method="ce", **{field: value}))


def test_train_online_refuses_no_epochs(data) -> None:
    from kd.student_trainer.online import train_online

    with pytest.raises(ValueError, match="^epochs must be >= 1, got 0$"):
        train_online("one", data[0], data[1], TrainConfig(epochs=0), subset=torch.arange(32))


# ---- train_tokens: training data without a single target is refused, never reported as a NaN loss ----


def test_token_training_without_targets_is_refused(tmp_path: Path) -> None:
    from kd.core.data import open_source
    from kd.precompute import LocalTokenTeacher, precompute_tokens
    from kd.student_trainer.train import train_tokens

    # block=6 keeps bos and the first 5 prompt bytes of each document: no completion byte is a target
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"q": f"question number {i}", "a": "yes"}) + "\n" for i in range(6)))
    uri = f"jsonl:{path}?prompt=q&completion=a&pack=0&block=6"
    train = open_source(uri)
    precompute_tokens(train, LocalTokenTeacher(teacher_lm()), tmp_path / "cache", codec="topk:8", batch_size=4)
    student = student_lm()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with CacheSource(str(tmp_path / "cache")) as cache, pytest.raises(ValueError, match="no token is a prediction"):
        train_tokens(student, train, cache, epochs=2, batch_size=4, optimizer="adamw", weight_decay=0.1)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # untouched
    res = invoke("train-lm", "--source", f"cache:{tmp_path / 'cache'}", "--dataset", uri, "--val-dataset", uri,
                 "--student", f"{__name__}:student_lm")  # fmt: skip
    refused(res, "no token is a prediction target")


def test_a_token_step_without_a_target_leaves_the_weights_alone(tmp_path: Path) -> None:
    """A step whose sequences hold no target (each one a prompt cut by the block) is skipped whole:
    with AdamW's decoupled weight decay (and Adam's moments from earlier steps) an optimizer step on
    zero gradients would still move the weights. So training on the documents with targets plus those
    without gives bit for bit the student of training on the documents with targets alone, over two
    epochs (the empty steps fall before and after real ones)."""
    from kd.core.data import open_source
    from kd.precompute import LocalTokenTeacher, precompute_tokens
    from kd.student_trainer.train import train_tokens

    # One document with targets (bos, 2 prompt bytes, then 3 completion bytes in the block of 6), so that
    # both runs make their real steps on it in the same order; three without (bos, 5 prompt bytes).
    good = [{"q": "hi", "a": "yes"}]
    empty = [{"q": f"a long question {i}", "a": "no"} for i in range(3)]
    teacher = LocalTokenTeacher(teacher_lm())
    students, losses = {}, {}
    for name, rows in (("good", good), ("mixed", good + empty)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        train = open_source(f"jsonl:{path}?prompt=q&completion=a&pack=0&block=6")
        precompute_tokens(train, teacher, tmp_path / name, codec="fp32", batch_size=4)
        students[name] = student_lm().double()
        with CacheSource(str(tmp_path / name)) as cache:
            losses[name] = train_tokens(students[name], train, cache, epochs=2, batch_size=1, lr=0.05, seed=3,
                                        optimizer="adamw", weight_decay=0.5)  # fmt: skip
    start = student_lm().double().state_dict()
    for k, v in students["mixed"].state_dict().items():
        assert torch.equal(v, students["good"].state_dict()[k]), k
        assert not torch.equal(v, start[k]), k  # the real steps did move it
    assert losses["mixed"] == losses["good"]
