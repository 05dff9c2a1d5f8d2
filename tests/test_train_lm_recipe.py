"""``kd train-lm``'s recipe is ``kd train``'s: SGD with momentum (and Nesterov), a cosine or multistep
schedule per optimizer step with a linear warm-up, and gradient clipping. Before, train_tokens had
a constant learning rate, SGD without momentum and no clipping. Each run is checked against a
training loop written here (the same batches, targets and loss; the rates from the schedules'
definitions), and the CLI's refusals of flags that would be ignored or cannot work."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from cli_checks import refused
from tiny_lm import BigramLM
from typer.testing import CliRunner

from kd.cli import app
from kd.core.data import open_source
from kd.core.signals import Stopped
from kd.core.tokens import next_token_labels
from kd.student_trainer.losses import get_method
from kd.student_trainer.sources import LocalSource
from kd.student_trainer.train import train_tokens


def teacher_lm() -> BigramLM:
    torch.manual_seed(51)
    return BigramLM(16, 3.0)


def student_lm() -> BigramLM:
    torch.manual_seed(52)
    return BigramLM(8, 1.0)


@pytest.fixture(scope="module")
def uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("lmrecipe")
    (d / "t.txt").write_text("\n".join(f"row {i}: " + "ab cd " * (1 + i % 4) for i in range(20)) + "\n")
    return f"text:{d / 't.txt'}?doc=line&pack=0&block=32"


@pytest.fixture(scope="module")
def data(uri: str):
    return open_source(uri), LocalSource(f"{__name__}:teacher_lm")


def cosine_warmup(epochs: int, per_epoch: int, warmup_epochs: float):
    warm = round(warmup_epochs * per_epoch)

    def rate(epoch: int, step: int) -> float:
        g = epoch * per_epoch + step
        t = min(max(g - warm, 0) / (epochs * per_epoch - warm), 1.0)
        return 0.5 * (1 + math.cos(math.pi * t)) * ((g + 1) / warm if g < warm else 1.0)

    return rate


def multistep(milestones: list[int], gamma: float):
    return lambda epoch, step: gamma ** len([m for m in milestones if epoch >= m])


def reference(data, epochs: int, batch_size: int, lr: float, rate, make_opt, clip: float) -> dict:
    """The loop train_tokens should be: seeded order per epoch, one optimizer step per batch."""
    train, source = data
    student, loss_fn = student_lm(), get_method("token-fkl")
    opt = make_opt(student.parameters())
    gen = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        order = torch.randperm(len(train), generator=gen)
        for step, lo in enumerate(range(0, len(train), batch_size)):
            idx = order[lo : lo + batch_size]
            b = train.batch(idx)
            labels = next_token_labels(b.tokens, b.loss_mask)
            opt.zero_grad(set_to_none=True)
            loss_fn(student(b.tokens), source.token_targets(idx, b.tokens, b.attention_mask), labels).backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(list(student.parameters()), clip)
            for group in opt.param_groups:
                group["lr"] = lr * rate(epoch, step)
            opt.step()
    return student.state_dict()


def assert_same(got: dict, want: dict) -> None:
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)


def test_adamw_with_a_cosine_after_warm_up_and_clipping(data) -> None:
    """20 sequences in batches of 4: 5 steps an epoch, 3 epochs; warm-up over 1.4 epochs (7 steps),
    then a cosine to 0; every step's gradient clipped to norm 0.05 (the gradients here are larger)."""
    student = student_lm()
    train_tokens(student, *data, epochs=3, batch_size=4, lr=0.05, optimizer="adamw", weight_decay=0.01,
                 schedule="cosine", warmup_epochs=1.4, clip_grad_norm=0.05)  # fmt: skip
    want = reference(data, 3, 4, 0.05, cosine_warmup(3, 5, 1.4),
                     lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.01), 0.05)  # fmt: skip
    assert_same(student.state_dict(), want)
    # the same run without the warm-up, the cosine or the clipping ends elsewhere (each is in effect)
    for other in ({"schedule": "constant"}, {"warmup_epochs": 0.0}, {"clip_grad_norm": 0.0}):
        moved = student_lm()
        train_tokens(moved, *data, epochs=3, batch_size=4, lr=0.05, optimizer="adamw", weight_decay=0.01,
                     **{"schedule": "cosine", "warmup_epochs": 1.4, "clip_grad_norm": 0.05, **other})  # fmt: skip
        assert any(not torch.allclose(moved.state_dict()[k], want[k], atol=1e-4) for k in want), other


def test_sgd_with_nesterov_momentum_and_a_multistep_schedule(data) -> None:
    student = student_lm()
    train_tokens(student, *data, epochs=3, batch_size=4, lr=0.2, optimizer="sgd", momentum=0.8, nesterov=True,
                 schedule="multistep", milestones=[1, 2], gamma=0.5)  # fmt: skip
    want = reference(data, 3, 4, 0.2, multistep([1, 2], 0.5),
                     lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.8, nesterov=True), 0.0)  # fmt: skip
    assert_same(student.state_dict(), want)


def test_a_cosine_run_resumes_exactly_and_refuses_more_epochs(data, tmp_path: Path) -> None:
    """The schedule is a function of the step: a run stopped mid-epoch resumes to the same weights.
    A cosine reaches 0 at the end of its epochs, so more epochs on resume are refused (they would
    change the rates of the steps trained), naming the recipe."""
    run = {"epochs": 2, "batch_size": 4, "lr": 0.05, "schedule": "cosine", "warmup_epochs": 0.4}
    whole = student_lm()
    train_tokens(whole, *data, **run)
    calls = iter(range(100))
    with pytest.raises(Stopped):
        train_tokens(student_lm(), *data, run_dir=tmp_path, stop=lambda: 15 if next(calls) == 7 else None, **run)
    resumed = student_lm()
    train_tokens(resumed, *data, run_dir=tmp_path, resume=True, **run)
    for k, v in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    with pytest.raises(ValueError, match=r"another run .*recipe"):
        train_tokens(student_lm(), *data, run_dir=tmp_path, resume=True, **{**run, "epochs": 3})


@pytest.mark.parametrize(
    ("flags", "why"),
    [
        (["--momentum", "0.5"], "--momentum applies only with --optimizer sgd"),
        (["--milestones", "1"], "--milestones applies only with --schedule multistep"),
        (["--schedule", "multistep"], "the multistep schedule needs milestones"),
        (["--schedule", "step"], "unknown schedule 'step'"),
        (["--optimizer", "dot"], "--optimizer 'dot': kd train-lm takes adam, adamw, sgd"),
        (["--clip-grad-norm", "-1"], "clip_grad_norm must be a finite number >= 0"),
        (["--warmup-epochs", "nan"], "warmup_epochs must be a finite number >= 0"),
        (["--optimizer", "adam", "--nesterov"], "nesterov needs --optimizer sgd"),
    ],
)  # fmt: skip
def test_recipe_flags_that_cannot_apply_are_refused_before_any_work(uri: str, tmp_path: Path, flags, why) -> None:
    r = CliRunner().invoke(app, ["train-lm", "--source", f"local:{__name__}:teacher_lm", "--dataset", uri,
                                 "--val-dataset", uri, "--student", f"{__name__}:student_lm",
                                 "--run-dir", str(tmp_path / "run"), *flags])  # fmt: skip
    refused(r, why)
    assert not (tmp_path / "run").exists()


def linear_warmup(epochs: int, per_epoch: int, warmup_epochs: float):
    """transformers' get_linear_schedule_with_warmup after the warm-up: (N - g) / (N - W)."""
    warm, total = round(warmup_epochs * per_epoch), epochs * per_epoch

    def rate(epoch: int, step: int) -> float:
        g = epoch * per_epoch + step
        return (g + 1) / warm if g < warm else (total - g) / (total - warm)

    return rate


def test_adam_with_a_linear_decay_after_warm_up(data) -> None:
    student = student_lm()
    train_tokens(student, *data, epochs=2, batch_size=4, lr=0.05, schedule="linear", warmup_epochs=0.6)
    want = reference(data, 2, 4, 0.05, linear_warmup(2, 5, 0.6), lambda p: torch.optim.Adam(p, lr=0.05), 0.0)
    assert_same(student.state_dict(), want)


def gpt2_lm(seed: int = 3, dim: int = 16):
    """A tiny Hugging Face GPT-2 over the byte tokenizer's 259 ids, taken as a token module."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=259, n_positions=64, n_embd=dim, n_layer=1, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    model = transformers.GPT2LMHeadModel(cfg)
    model.input_shape = (-1,)  # kd's marker of a token teacher
    return model


def gpt2_teacher():
    return gpt2_lm(11, 16)


def gpt2_student():
    return gpt2_lm(12, 16)


def test_the_shipped_causal_lm_recipe_trains_as_its_settings_say(uri: str, tmp_path: Path) -> None:
    """configs/distil_causal_lm.yaml (DistilBERT's recipe for a causal LM: its loss weights, AdamW, linear
    warm-up and decay, clipping, the cosine on GPT-2's last hidden states) runs on tiny GPT-2s, with the
    command line's --epochs/--batch-size/--accumulate winning, and trains the student train_tokens
    trains with those settings."""
    from kd.teacher_server.loading import read_state_dict

    config = Path(__file__).resolve().parents[1] / "configs" / "distil_causal_lm.yaml"
    out = tmp_path / "s.safetensors"
    r = CliRunner().invoke(app, ["train-lm", "--config", str(config), "--source", f"local:{__name__}:gpt2_teacher",
                                 "--dataset", uri, "--val-dataset", uri, "--student", f"{__name__}:gpt2_student",
                                 "--epochs", "2", "--batch-size", "4", "--accumulate", "2",
                                 "--out", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    want = gpt2_student()
    train_tokens(want, open_source(uri), LocalSource(f"{__name__}:gpt2_teacher"), method="token-fkl", epochs=2,
                 batch_size=4, accumulate=2, lr=5e-4, optimizer="adamw", weight_decay=0.0, schedule="linear",
                 warmup_epochs=0.15, clip_grad_norm=1.0, method_options={"temperature": 2.0, "ce_weight": 0.4},
                 hidden=["transformer.ln_f=transformer.ln_f:cosine:0.2"])  # fmt: skip
    got, expected = read_state_dict(out), want.state_dict()
    shared = [k for k in expected if k in got]
    assert len(shared) >= len(expected) - 1, (sorted(got), sorted(expected))  # (a tied lm_head may be left out)
    for k in shared:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-7)


def test_a_config_key_train_lm_does_not_take_is_refused_naming_it(uri: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.001\nmilestone: [2]\n")
    r = CliRunner().invoke(app, ["train-lm", "--config", str(bad), "--source", f"local:{__name__}:teacher_lm",
                                 "--dataset", uri, "--val-dataset", uri,
                                 "--student", f"{__name__}:student_lm"])  # fmt: skip
    refused(r, "unknown option(s) ['milestone']; see `kd train-lm --help`")
