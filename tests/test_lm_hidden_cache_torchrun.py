"""``kd train-lm --source cache:DIR --feature S=T`` under torchrun: 2 CPU ranks (gloo) read their
slices' targets and fp16 hidden states from a token cache (``kd precompute --feature``) and end with
the student's and the connectors' weights of one process with the same steps. SGD, accumulation
over micro-batches and a last step of one sequence whose slice on rank 1 is empty (its connector
gradients are zeros it must still all-reduce). Real torchrun subprocesses, a real LMDB cache, a
corpus and model module the test writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_lm_torchrun import MODELS, cli

from kd.cache.sharded import open_cache
from kd.core.data import open_source


@pytest.mark.serial
def test_two_torchrun_ranks_train_lm_from_cached_states_as_one_process(tmp_path: Path) -> None:
    (tmp_path / "ddplm.py").write_text(MODELS)
    # 23 documents of different lengths (padding in every batch); steps of 2 x 11: 11 + 11, then 1.
    (tmp_path / "lines.txt").write_text("\n".join(f"line {i}: " + "abc de" * (1 + i % 5) for i in range(23)) + "\n")
    uri = f"text:{tmp_path / 'lines.txt'}?doc=line&pack=0&block=24"
    assert len(open_source(uri)) == 23
    cache = tmp_path / "cache"
    sys.path.insert(0, str(tmp_path))
    try:
        r = cli("precompute", "--source", "local:ddplm:teacher", "--dataset", uri, "--codec", "topk:8",
                "--feature", "embed", "--out", str(cache))  # fmt: skip
        assert r.exit_code == 0, r.output
        assert open_cache(str(cache)).meta.features == {"embed": [12]}

        def args(out: Path) -> list[str]:
            return ["train-lm", "--source", f"cache:{cache}", "--dataset", uri, "--val-dataset", uri, "--student",
                    "ddplm:student",
                    "--feature", "embed=embed:mse:2.0", "--epochs", "2", "--batch-size", "11", "--accumulate", "2",
                    "--optimizer", "sgd", "--lr", "2.0", "--seed", "3", "--out", str(out)]  # fmt: skip

        one = cli(*args(tmp_path / "one.safetensors"))
        assert one.exit_code == 0, one.output
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("ddplm", None)
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "kd",
         *args(tmp_path / "two.safetensors")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert two.returncode == 0, (two.stdout[-2000:], two.stderr[-3000:])
    for name in ("", ".connectors"):
        a, b = (load_file(str(tmp_path / f"{who}{name}.safetensors")) for who in ("one", "two"))
        assert a.keys() == b.keys() and a, name
        for k in a:
            # the ranks sum their slices' gradients in another order than one process: float32 rounding
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"{name} {k}")
    ra, rb = json.loads(one.stdout.strip().splitlines()[-1]), json.loads(two.stdout.strip().splitlines()[-1])
    assert rb["losses"] == pytest.approx(ra["losses"], rel=1e-5)
