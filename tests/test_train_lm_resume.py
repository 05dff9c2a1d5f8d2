"""``train_tokens(run_dir=..., resume=True)`` (``kd train-lm --run-dir D --resume``): a run stopped
mid-epoch, or ended after fewer epochs, continues to exactly the losses and weights of an
uninterrupted run (a dropout student: the generators resume too; Adam: its moments resume), and a
checkpoint that is missing, of another kind, of another run or of another student is refused naming
the file and what differs. In process, a teacher in process; the signal-driven path of the CLI is in
tests/test_polite_stops.py, torchrun's in tests/test_train_lm_torchrun.py."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from tiny_lm import BigramLM
from torch import nn

from kd.core.data import open_source
from kd.core.signals import Stopped
from kd.student_trainer.sources import LocalSource
from kd.student_trainer.train import RUN_CHECKPOINT, train_tokens

RUN = {"batch_size": 3, "accumulate": 2, "lr": 0.02, "seed": 4, "method": "token-fkl"}


def teacher_lm() -> BigramLM:
    torch.manual_seed(51)
    return BigramLM(16, 3.0)


class DropoutLM(nn.Module):
    """A student whose forward draws from torch's generator (dropout on its logits)."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        torch.manual_seed(52)
        self.lm, self.drop = BigramLM(dim, 1.0), nn.Dropout(0.3)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.drop(self.lm(tokens))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("lmresume")
    (d / "t.txt").write_text("\n".join(f"row {i}: " + "ab cd " * (1 + i % 4) for i in range(20)) + "\n")
    data = open_source(f"text:{d / 't.txt'}?doc=line&pack=0&block=32")
    source = LocalSource(f"{__name__}:teacher_lm")
    student = DropoutLM()
    torch.manual_seed(7)
    whole = train_tokens(student, data, source, epochs=3, **RUN)
    return data, source, whole, {k: v.clone() for k, v in student.state_dict().items()}


def stop_at(n: int):
    calls = itertools.count(1)
    return lambda: 15 if next(calls) == n else None


def same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_run_stopped_mid_epoch_resumes_to_the_uninterrupted_run(setup, tmp_path: Path) -> None:
    data, source, whole, weights = setup
    first = DropoutLM()
    torch.manual_seed(7)  # as the uninterrupted run's dropout
    with pytest.raises(Stopped, match=r"in epoch 2 after 2 of its steps"):  # 20 sequences: 4 steps of 6 an epoch
        train_tokens(first, data, source, epochs=3, run_dir=tmp_path, stop=stop_at(7), **RUN)
    assert (tmp_path / RUN_CHECKPOINT).is_file()
    torch.manual_seed(999)  # the generators come from the checkpoint, not from here
    student = DropoutLM()
    assert train_tokens(student, data, source, epochs=3, run_dir=tmp_path, resume=True, **RUN) == whole
    same_weights(student.state_dict(), weights)


def test_a_finished_run_resumes_with_more_epochs(setup, tmp_path: Path) -> None:
    data, source, whole, weights = setup
    first = DropoutLM()
    torch.manual_seed(7)
    assert train_tokens(first, data, source, epochs=1, run_dir=tmp_path, **RUN) == whole[:1]
    student = DropoutLM()
    assert train_tokens(student, data, source, epochs=3, run_dir=tmp_path, resume=True, **RUN) == whole
    same_weights(student.state_dict(), weights)


class FailsAt(LocalSource):
    """The teacher in process, failing at its ``n``-th targets (a crash: no stop, no epoch end)."""

    def __init__(self, spec: str, n: int) -> None:
        super().__init__(spec)
        self.calls = itertools.count(1)
        self.n = n

    def token_targets(self, indices, tokens, attention_mask):
        if next(self.calls) == self.n:
            raise RuntimeError("the teacher's node went away")
        return super().token_targets(indices, tokens, attention_mask)


def test_a_crashed_run_resumes_from_its_last_periodic_checkpoint(setup, tmp_path: Path) -> None:
    data, source, whole, weights = setup
    first, failing = DropoutLM(), FailsAt(f"{__name__}:teacher_lm", 12)  # (their factories seed torch)
    torch.manual_seed(7)
    # 2 micro-batches a step, one probe call first: call 12 is step 2 of epoch 2's second micro-batch
    with pytest.raises(RuntimeError, match="went away"):
        train_tokens(first, data, failing, epochs=3, run_dir=tmp_path, checkpoint_every=1, **RUN)
    ckpt = torch.load(tmp_path / RUN_CHECKPOINT, weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 1)  # after the last whole step, not the last epoch's end
    student = DropoutLM()
    assert train_tokens(student, data, source, epochs=3, run_dir=tmp_path, resume=True, **RUN) == whole
    same_weights(student.state_dict(), weights)
    with pytest.raises(ValueError, match="checkpoint_every=-1"):
        train_tokens(DropoutLM(), data, source, run_dir=tmp_path, checkpoint_every=-1, **RUN)
    with pytest.raises(ValueError, match="with a run_dir"):
        train_tokens(DropoutLM(), data, source, checkpoint_every=2, **RUN)


def test_resume_refuses_a_checkpoint_it_cannot_continue(setup, tmp_path: Path) -> None:
    data, source, _, _ = setup
    with pytest.raises(ValueError, match=r"no checkpoint .*checkpoint\.pt. to continue from"):
        train_tokens(DropoutLM(), data, source, epochs=1, run_dir=tmp_path, resume=True, **RUN)
    train_tokens(DropoutLM(), data, source, epochs=1, run_dir=tmp_path, **RUN)
    # The loss's defaults given explicitly are the same run; another value is not.
    opts = {**RUN, "method_options": {"temperature": 1.0}}
    assert len(train_tokens(DropoutLM(), data, source, epochs=2, run_dir=tmp_path, resume=True, **opts)) == 2
    with pytest.raises(ValueError, match=r"options\.temperature: 1\.0 there, 2\.0 here"):
        train_tokens(DropoutLM(), data, source, epochs=3, run_dir=tmp_path, resume=True,
                     **{**RUN, "method_options": {"temperature": 2.0}})  # fmt: skip
    with pytest.raises(ValueError, match=r"of another run \(lr: 0\.02 there, 0\.05 here\)"):
        train_tokens(DropoutLM(), data, source, epochs=2, run_dir=tmp_path, resume=True, **{**RUN, "lr": 0.05})
    with pytest.raises(ValueError, match=r"is not this student's"):
        train_tokens(DropoutLM(dim=4), data, source, epochs=2, run_dir=tmp_path, resume=True, **RUN)
    torch.save({"epoch": 1, "model": {}}, tmp_path / RUN_CHECKPOINT)  # e.g. a kd train checkpoint
    with pytest.raises(ValueError, match=r"is not a kd train-lm checkpoint"):
        train_tokens(DropoutLM(), data, source, epochs=2, run_dir=tmp_path, resume=True, **RUN)


def test_the_cli_refuses_resume_without_a_run_directory(tmp_path: Path) -> None:
    from cli_checks import refused
    from typer.testing import CliRunner

    from kd.cli import app

    (tmp_path / "t.txt").write_text("some text to train on\n" * 4)
    (tmp_path / "file").write_text("")
    base = ["train-lm", "--source", f"local:{__name__}:teacher_lm", "--dataset", f"text:{tmp_path / 't.txt'}?block=16",
            "--val-dataset", f"text:{tmp_path / 't.txt'}?block=16", "--student", f"{__name__}:teacher_lm"]  # fmt: skip
    refused(CliRunner().invoke(app, [*base, "--resume"]), "--resume continues the run in --run-dir: give --run-dir")
    refused(CliRunner().invoke(app, [*base, "--run-dir", str(tmp_path / "file")]), "is a file, not a directory")
    refused(CliRunner().invoke(app, [*base, "--checkpoint-every", "5"]), "--checkpoint-every 5", "with --run-dir")
    text = refused(CliRunner().invoke(app, [*base, "--run-dir", str(tmp_path / "new"), "--resume"]),
                   "no checkpoint", "checkpoint.pt")  # fmt: skip
    assert "error: --resume: no checkpoint" in text  # kd's own refusal, not after its type ("ValueError: ")


def test_a_resume_with_fewer_epochs_than_the_checkpoint_began_is_refused(setup, tmp_path: Path) -> None:
    # The run stopped 2 steps into epoch 3: a resume with epochs=2 returned the 2 epochs' losses of a
    # student that had trained on into epoch 3 (and the CLI saved it as a 2-epoch result).
    data, source, whole, weights = setup
    first = DropoutLM()
    torch.manual_seed(7)
    with pytest.raises(Stopped, match=r"in epoch 3 after 2 of its steps"):
        train_tokens(first, data, source, epochs=3, run_dir=tmp_path, stop=stop_at(11), **RUN)
    student = DropoutLM()
    untouched = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(ValueError, match=r"is in epoch 3 after 2 of its steps: a run of 2 epoch\(s\) ends before it; "
                       r"resume with epochs \(--epochs\) >= 3"):  # fmt: skip
        train_tokens(student, data, source, epochs=2, run_dir=tmp_path, resume=True, **RUN)
    same_weights(student.state_dict(), untouched)  # refused before the checkpoint was loaded into it
    assert train_tokens(student, data, source, epochs=3, run_dir=tmp_path, resume=True, **RUN) == whole
    same_weights(student.state_dict(), weights)
    # After the last epoch's end: as many epochs continue to nothing more, fewer are refused.
    assert train_tokens(DropoutLM(), data, source, epochs=3, run_dir=tmp_path, resume=True, **RUN) == whole
    with pytest.raises(ValueError, match=r"is after epoch 3: a run of 1 epoch\(s\) ends before it"):
        train_tokens(DropoutLM(), data, source, epochs=1, run_dir=tmp_path, resume=True, **RUN)


def other_teacher_lm() -> BigramLM:
    torch.manual_seed(53)
    return BigramLM(16, 3.0)


def test_resume_compares_the_teacher_not_how_its_cache_is_named(setup, tmp_path: Path, monkeypatch) -> None:
    # The targets were compared by their description: 'local logits' for any teacher in process (and
    # 'server logits' for any served one), so another teacher resumed the run, while one cache named
    # 'c' and then by its absolute path was 'another run'.
    from typer.testing import CliRunner

    from kd.cli import app
    from kd.student_trainer.sources import CacheSource

    data, source, _, _ = setup
    first = DropoutLM()
    torch.manual_seed(7)
    with pytest.raises(Stopped):
        train_tokens(first, data, source, epochs=2, run_dir=tmp_path / "a", stop=stop_at(3), **RUN)
    other = LocalSource(f"{__name__}:other_teacher_lm")
    fingerprints = r"of another run \(targets\.fingerprint: '[0-9a-f]+' there, '[0-9a-f]+' here\)"
    with pytest.raises(ValueError, match=fingerprints):
        train_tokens(DropoutLM(), data, other, epochs=2, run_dir=tmp_path / "a", resume=True, **RUN)

    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["precompute", "--source", f"local:{__name__}:teacher_lm", "--dataset", data.uri,
                                 "--out", "c"])  # fmt: skip
    assert r.exit_code == 0, r.output
    straight = DropoutLM()
    torch.manual_seed(7)
    whole = train_tokens(straight, data, CacheSource(str(tmp_path / "c"), dataset_id=data.dataset_id), epochs=2, **RUN)
    first = DropoutLM()
    torch.manual_seed(7)
    with pytest.raises(Stopped):
        train_tokens(first, data, CacheSource("c", dataset_id=data.dataset_id), epochs=2, run_dir=tmp_path / "b",
                     stop=stop_at(3), **RUN)  # fmt: skip
    student = DropoutLM()
    by_path = CacheSource(str(tmp_path / "c"), dataset_id=data.dataset_id)
    assert train_tokens(student, data, by_path, epochs=2, run_dir=tmp_path / "b", resume=True, **RUN) == whole
    same_weights(student.state_dict(), straight.state_dict())


def test_the_cli_refuses_a_run_directory_it_could_not_write_before_training(tmp_path: Path) -> None:
    # A --run-dir below a file failed with a traceback (NotADirectoryError) at the first checkpoint,
    # after a whole epoch; a checkpoint that cannot be written later (here checkpoint.pt is a folder)
    # is one error line, not a traceback.
    from cli_checks import refused
    from typer.testing import CliRunner

    from kd.cli import app

    (tmp_path / "t.txt").write_text("some text to train on\n" * 4)
    (tmp_path / "file").write_text("")
    base = ["train-lm", "--source", f"local:{__name__}:teacher_lm", "--dataset", f"text:{tmp_path / 't.txt'}?block=16",
            "--val-dataset", f"text:{tmp_path / 't.txt'}?block=16", "--student", f"{__name__}:teacher_lm"]  # fmt: skip
    below = tmp_path / "file" / "run"
    text = refused(CliRunner().invoke(app, [*base, "--run-dir", str(below)]),
                   f"--run-dir '{below}' cannot be made: '{below.parent}' is a file, not a directory")  # fmt: skip
    assert "epoch 1" not in text
    (tmp_path / "run" / RUN_CHECKPOINT / "x").mkdir(parents=True)
    refused(CliRunner().invoke(app, [*base, "--run-dir", str(tmp_path / "run")]), "Is a directory", RUN_CHECKPOINT)
