"""Token precompute in shards: ``kd precompute --shard I/N`` and ``torchrun`` ranks split the
sequences of a token corpus as the image path splits samples (sequence i into shard i % N), and
the directory of shards reads back as the one-process cache (records, ``kd cache info``,
``token_targets`` padded across shards)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_checks import refused
from typer.testing import CliRunner

from kd.cache import CacheReader
from kd.cache.sharded import open_cache
from kd.cli import app
from kd.core.data import open_source

# A token teacher the torchrun ranks import by name: a module the test writes next to the corpus.
TEACHER_MODULE = """
import torch
from torch import nn

class BigramLM(nn.Module):
    input_shape = (-1,)

    def __init__(self):
        super().__init__()
        torch.manual_seed(31)
        self.embed = nn.Embedding(259, 12)
        self.prev = nn.Embedding(259, 12)
        self.head = nn.Linear(12, 259)

    def forward(self, tokens, attention_mask=None):
        prev = nn.functional.pad(self.prev(tokens)[:, :-1], (0, 0, 1, 0))
        return self.head(torch.tanh(self.embed(tokens) + prev)) * 2.0

def teacher():
    return BigramLM()
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, str]:
    d = tmp_path_factory.mktemp("tokshards")
    (d / "shardlm.py").write_text(TEACHER_MODULE)
    # One document per line, of different lengths (pack=0): shards hold sequences of other widths.
    lines = [f"line {i}: " + "abc de" * (1 + i % 5) for i in range(23)]
    (d / "lines.txt").write_text("\n".join(lines) + "\n")
    return d, f"text:{d / 'lines.txt'}?doc=line&pack=0&block=24"


def _env(d: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(d), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _precompute(d: Path, uri: str, out: Path, *launcher: str, extra: tuple[str, ...] = ()) -> None:
    cmd = [sys.executable, *launcher, "-m", "kd", "precompute", "--source", "local:shardlm:teacher",
           "--dataset", uri, "--out", str(out), "--codec", "topk:6", "--batch-size", "4", *extra]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(d))
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.serial
def test_torchrun_ranks_each_precompute_their_shard_of_a_token_corpus(tmp_path: Path, corpus) -> None:
    d, uri = corpus
    n = len(open_source(uri))
    assert n == 23
    _precompute(d, uri, tmp_path / "one")
    _precompute(d, uri, tmp_path / "two", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
    one, two = CacheReader(tmp_path / "one"), open_cache(tmp_path / "two")
    # Each rank wrote only its sequences, into its own shard (not the whole corpus twice into one).
    assert not (tmp_path / "two" / "data.mdb").exists()
    assert [(s.meta.shard_index, s.meta.shard_count) for s in two.shards] == [(0, 2), (1, 2)]
    assert sorted(i for i, _ in two.shards[0].keys()) == list(range(0, n, 2))
    assert sorted(i for i, _ in two.shards[1].keys()) == list(range(1, n, 2))
    # The union is the one-process cache, record for record.
    assert sorted(two.keys()) == sorted(one.keys()) and len(two) == n
    for a, b in zip(one.read_sequences(range(n)), two.read_sequences(range(n))):
        assert np.array_equal(a, b)
    # Read as one cache, padded to the longest sequence of the request whichever shard holds it.
    idx = [3, 0, 9, 4]  # odd and even: both shards, the longest (9: 5 repeats) in shard 1
    want, got = one.token_targets(idx), two.token_targets(idx)
    assert got.ids.shape == want.ids.shape == (4, 24, 6)
    for name in ("ids", "logits", "lse"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert torch.equal(two.token_targets(idx, 30).ids, one.token_targets(idx, 30).ids)
    assert two.token_stats() == one.token_stats()
    info = json.loads(CliRunner().invoke(app, ["cache", "info", str(tmp_path / "two")]).stdout)
    assert info["shards"] == 2 and info["records"] == n and info["positions"] == one.token_stats()["positions"]


def test_shard_option_splits_a_token_corpus_and_refuses_a_bad_shard(tmp_path: Path, corpus) -> None:
    d, uri = corpus
    sys.path.insert(0, str(d))  # the teacher module, for the in-process command line
    try:
        runner = CliRunner()
        args = ["precompute", "--source", "local:shardlm:teacher", "--dataset", uri,
                "--out", str(tmp_path / "c"), "--codec", "fp16"]  # fmt: skip
        for i in range(3):
            r = runner.invoke(app, [*args, "--shard", f"{i}/3"])
            assert r.exit_code == 0, r.output
        reader = open_cache(tmp_path / "c")
        for i in range(3):
            assert sorted(k for k, _ in reader.shards[i].keys()) == list(range(i, 23, 3))
        z = reader.token_targets(range(23))
        assert z.shape == (23, 24, 259)
        # A resumed shard writes nothing again.
        r = runner.invoke(app, [*args, "--shard", "1/3"])
        assert r.exit_code == 0 and "wrote 0, skipped 8" in r.output, r.output
        # More shards than sequences: the last shard is empty (its folder still there for readers) ...
        r = runner.invoke(app, [*args[:-3], str(tmp_path / "e"), "--codec", "fp16", "--shard", "23/24"])
        assert r.exit_code == 0 and "wrote 0, skipped 0 already cached sequences, no sequence in this shard" in r.output
        # ... and a pca basis cannot be fitted on it: refused, naming the way out.
        pca = [*args[:-3], str(tmp_path / "p"), "--codec", "pca:4", "--shard", "23/24"]
        refused(runner.invoke(app, pca), "shard 23/24 holds none of the 23 sequences", "--basis")
        refused(runner.invoke(app, [*args, "--shard", "3/3"]), "--shard", "need 0 <= I < N")
        refused(runner.invoke(app, [*args, "--shard", "1/2"]), "holds a cache in 3 shards, not 2")
        refused(runner.invoke(app, [*args[:-4], "--out", str(tmp_path / "c")]), "holds a cache in 3 shards")
    finally:
        sys.path.remove(str(d))
