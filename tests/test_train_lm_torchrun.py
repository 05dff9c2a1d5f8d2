"""``kd train-lm`` under torchrun: 2 CPU ranks (gloo), one epoch then ``--resume`` for the second,
end with the weights and losses of one process with the same steps. SGD (a per-rank weighting
error or a gradient not summed moves the weights by as much, where Adam would normalise it away),
accumulation over micro-batches, and a last step of one sequence whose slice on rank 1 is empty
(that rank must still join the step's all-reduce). The ranks ask a real token server (127.0.0.1)
for their slices only: together, one process's rows. Real torchrun subprocesses, modules and a
corpus the test writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import Result
from typer.testing import CliRunner

from kd.cli import app
from kd.core.data import open_source
from kd.teacher_server.loading import load_teacher, read_state_dict
from kd.teacher_server.server import TeacherOptions, start_server

# Teacher and student the torchrun ranks import by name: a module the test writes next to the corpus.
# The student notes the rows it runs in eval mode (validation) in eval-RANK.txt beside the module.
MODELS = """
import os
import torch
from torch import nn

class BigramLM(nn.Module):
    input_shape = (-1,)

    def __init__(self, dim, scale, seed, notes=False):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(259, dim)
        self.prev = nn.Embedding(259, dim)
        self.head = nn.Linear(dim, 259)
        self.scale = scale
        self.notes = notes

    def forward(self, tokens, attention_mask=None):
        if self.notes and not self.training:
            name = f"eval-{os.environ.get('RANK', 'solo')}.txt"
            with open(os.path.join(os.path.dirname(__file__), name), "a") as f:
                f.write(f"{len(tokens)}\\n")
        prev = nn.functional.pad(self.prev(tokens)[:, :-1], (0, 0, 1, 0))
        return self.head(torch.tanh(self.embed(tokens) + prev)) * self.scale

def teacher():
    return BigramLM(12, 2.0, 31)

def student():
    return BigramLM(6, 1.0, 32, notes=True)
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(dir, dataset URI, a token server of the teacher): the ranks ask it for their slices."""
    d = tmp_path_factory.mktemp("lmddp")
    (d / "ddplm.py").write_text(MODELS)
    # 23 documents of different lengths (padding in every batch); steps of 2 x 11: 11 + 11, then 1.
    (d / "lines.txt").write_text("\n".join(f"line {i}: " + "abc de" * (1 + i % 5) for i in range(23)) + "\n")
    uri = f"text:{d / 'lines.txt'}?doc=line&pack=0&block=24"
    assert len(open_source(uri)) == 23
    sys.path.insert(0, str(d))  # this process serves the teacher and runs the one-process side
    running = None
    try:
        options = TeacherOptions(max_batch_tokens=1024, max_batch_size=32, warmup=False)
        running = start_server([load_teacher("lm", "ddplm:teacher")], batching=options)
        yield d, uri, running
    finally:
        if running is not None:
            running.stop(grace=1)
        sys.path.remove(str(d))
        sys.modules.pop("ddplm", None)


def cli(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def _args(corpus, out: Path, epochs: int = 2) -> list[str]:
    d, uri, running = corpus
    return ["train-lm", "--source", f"server:127.0.0.1:{running.port}/lm", "--dataset", uri, "--val-dataset", uri,
            "--student", "ddplm:student", "--epochs", str(epochs), "--batch-size", "11", "--accumulate", "2",
            "--optimizer", "sgd", "--lr", "2.0", "--seed", "3", "--out", str(out)]  # fmt: skip


def _asked(corpus) -> tuple[int, int]:
    stats = corpus[2].servicer.endpoints["lm"].batcher.stats
    return stats.samples, stats.real_tokens


@pytest.mark.serial
def test_two_torchrun_ranks_train_lm_as_one_process(tmp_path: Path, corpus) -> None:
    before = _asked(corpus)
    one = cli(*_args(corpus, tmp_path / "one.safetensors"))
    assert one.exit_code == 0, one.output
    middle = _asked(corpus)
    path = os.pathsep.join(p for p in (str(corpus[0]), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    # The two ranks train epoch 1 with a checkpoint in --run-dir, then resume for epoch 2: together, one
    # process's two epochs (each rank resumes its own generators; rank 0 wrote the checkpoint).
    run = ["--run-dir", str(tmp_path / "run")]
    first_epoch, two = (
        subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "2",
                "-m",
                "kd",
                *_args(corpus, tmp_path / "two.safetensors", epochs),
                *run,
                *more,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )  # fmt: skip
        for epochs, more in ((1, []), (2, ["--resume"]))
    )
    for r in (first_epoch, two):
        assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    # Each rank asked the teacher for its slice only: together, the rows and tokens of one process.
    after = _asked(corpus)
    # Two epochs of every sequence, plus the first sequence once per process: train_tokens' check of the
    # loss on the targets before any step (2 launches of 2 ranks).
    lengths = open_source(corpus[1]).batch(torch.arange(23)).attention_mask.sum(dim=1)
    epoch_tokens, first = int(lengths.sum()), int(lengths[0])
    assert (middle[0] - before[0], middle[1] - before[1]) == (2 * 23 + 1, 2 * epoch_tokens + first)
    assert (after[0] - middle[0], after[1] - middle[1]) == (2 * 23 + 4, 2 * epoch_tokens + 4 * first)
    a, b = read_state_dict(tmp_path / "one.safetensors"), read_state_dict(tmp_path / "two.safetensors")
    import ddplm

    start = ddplm.student().state_dict()
    assert a.keys() == b.keys() == start.keys()
    for k in a:
        assert not torch.allclose(a[k], start[k], atol=1e-3), k  # trained: far from where it started
        # The ranks sum their slices' gradients in another order than one process sums its tokens,
        # and the server batches their rows otherwise: equal to float32 rounding.
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    # Rank 0 alone prints and saves: one line per epoch, one result; each validation is shared by the
    # ranks (each runs its half of the split: none waits in a collective while another validates),
    # and the result reuses the last epoch's (the same weights: not a third pass).
    assert first_epoch.stderr.count("epoch 1:") == 1 and "epoch 2:" not in first_epoch.stderr, first_epoch.stderr
    assert two.stderr.count("epoch 2:") == 1 and "epoch 1:" not in two.stderr, two.stderr[-3000:]
    rows = {
        name: sum(int(n) for n in (corpus[0] / f"eval-{name}.txt").read_text().split()) for name in ("solo", "0", "1")
    }
    # + one row per launch on every rank: train_tokens reads the student's logit width before any step
    # (an eval-mode forward of one row: a padded vocabulary is cut, a narrower one refused)
    assert rows == {"solo": 2 * 23 + 1, "0": 2 * 12 + 2, "1": 2 * 11 + 2}
    for line in ("epoch 1:", "epoch 2:"):
        led = two.stderr if line == "epoch 2:" else first_epoch.stderr
        ppl = [float(o.split(line)[1].split("val perplexity ")[1].split(",")[0]) for o in (one.output, led)]
        assert ppl[1] == pytest.approx(ppl[0], rel=1e-3), line  # printed to 3 decimals
    assert two.stdout.count('"losses"') == 1, two.stdout
    ra, rb = json.loads(one.stdout.strip().splitlines()[-1]), json.loads(two.stdout.strip().splitlines()[-1])
    assert rb["losses"] == pytest.approx(ra["losses"], rel=1e-5)
    assert rb["val_ppl"] == pytest.approx(ra["val_ppl"], rel=1e-5)


def test_a_torchrun_rank_takes_its_own_gpu() -> None:
    """``--device cuda`` under torchrun is rank LOCAL_RANK's GPU (every rank on cuda:0 would share one,
    and NCCL refuses two ranks on a device); an explicit index, or the CPU, stays as given."""
    from kd.cli import rank_device

    assert [rank_device("cuda", r) for r in (0, 1, 3)] == ["cuda:0", "cuda:1", "cuda:3"]
    assert rank_device("cuda:2", 1) == "cuda:2" and rank_device("cpu", 1) == "cpu"
