"""The README's code examples run as written (the shell lines through `python -m kd`)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from kd.core.data import load_dataset, view_seeds
from kd.teacher_server.loading import load_teacher

README = Path(__file__).resolve().parent.parent / "README.md"


def section_blocks(heading: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block under ``### heading`` (up to the next heading)."""
    text = README.read_text()
    start = text.index(f"### {heading}\n")
    end = text.find("\n## ", start)
    nxt = text.find("\n### ", start + 1)
    body = text[start : min(p for p in (end, nxt, len(text)) if p != -1)]
    return re.findall(r"```(\w+)\n(.*?)```", body, flags=re.S)


def run_shell_lines(code: str, cwd: Path) -> None:
    for line in code.strip().splitlines():
        argv = shlex.split(line.split("  #")[0])
        assert argv[0] == "kd", f"README shell line does not start with kd: {line}"
        r = subprocess.run([sys.executable, "-m", "kd", *argv[1:]], cwd=cwd, capture_output=True, text=True,
                           timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        assert r.returncode == 0, f"{line}\n{r.stderr}"


def test_your_own_training_loop_example(tmp_path: Path, digits_cnn_spec, monkeypatch) -> None:
    blocks = section_blocks("Your own training loop")
    assert [lang for lang, _ in blocks] == ["bash", "python"]
    spec = digits_cnn_spec(2)  # a trained teacher: its targets carry more than the labels
    teacher = load_teacher("cnn", spec)
    shutil.copy(spec.partition("@")[2], tmp_path / "teacher.safetensors")
    run_shell_lines(blocks[0][1], tmp_path)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ns: dict = {"__name__": "readme_example"}
    exec(compile(blocks[1][1], "README.md", "exec"), ns)  # noqa: S102 - our own README
    data, student = ns["data"], ns["student"]
    train = load_dataset("digits", "train")
    # The dataset replays the cached views: item i's inputs are its view's pixels, its targets the teacher's on them.
    assert data.num_views == 2 and len(data) == len(train)
    data.set_epoch(3)
    idx, views = data.keys([0, 1, 2, 3])
    x, y, t = zip(*data.__getitems__([0, 1, 2, 3]))
    torch.testing.assert_close(torch.stack(x), train.views(idx, view_seeds(idx, views, 2)))
    assert torch.equal(torch.stack(y), train.labels[:4])
    with torch.inference_mode():
        torch.testing.assert_close(torch.stack(t), teacher.model(torch.stack(x)), rtol=1e-5, atol=1e-5)

    # The loop distilled: the student is far closer to the teacher than the same network untrained.
    def kl_to_teacher(model: torch.nn.Module) -> float:
        with torch.inference_mode():
            s, z = model(train.inputs), teacher.model(train.inputs)
            return float(F.kl_div(F.log_softmax(s / 4, 1), F.log_softmax(z / 4, 1), log_target=True,
                                  reduction="batchmean"))  # fmt: skip

    fresh = type(student)(*[type(m)(m.in_features, m.out_features) if hasattr(m, "in_features") else m
                            for m in student])  # fmt: skip
    assert kl_to_teacher(student) < 0.5 * kl_to_teacher(fresh)


def test_kd_cache_commands_as_written(tmp_path: Path, teacher, monkeypatch) -> None:
    """The `### kd cache` block, each line through the CLI in this process (a subprocess per line would
    cost seconds): info, verify, export and basis on the caches its paths name."""
    from typer.testing import CliRunner

    from kd.cli import app
    from kd.precompute import precompute
    from kd.student_trainer.sources import LocalSource

    [(lang, code)] = section_blocks("`kd cache`")
    assert lang == "bash"
    monkeypatch.chdir(tmp_path)
    train = load_dataset("digits", "train")
    precompute(train, LocalSource(teacher), "cache/digits", progress=False)
    precompute(train, LocalSource(teacher), "cache/pca", codec="pca:8", progress=False)
    lines = [line.split("  #")[0] for line in code.strip().splitlines()]
    assert {shlex.split(line)[2] for line in lines} == {"info", "verify", "export", "basis"}, lines
    outputs = {}
    for line in lines:
        argv = shlex.split(line)
        assert argv[:2] == ["kd", "cache"], line
        r = CliRunner().invoke(app, argv[1:])
        assert r.exit_code == 0, f"{line}\n{r.output}"
        outputs[argv[2]] = r.output
    assert "1198/1198 records good, 0 corrupt, 0 missing" in outputs["verify"]
    assert (tmp_path / "digits.npz").is_file() and (tmp_path / "basis.bin").is_file()
