"""Output paths that cannot be written are refused before any work, with one `error:` line naming
the option: the study commands, benches, kd records and kd peer wrote their --json/--out/--save
only at the end, so a directory there (or a file where a folder goes) cost the whole run and
ended in a traceback (IsADirectoryError, FileExistsError)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from kd.cli import app
from kd.models import digits_teacher
from kd.teacher_server.loading import save_weights
from tests.cli_checks import refused

# (arguments, the option refused); DIR is an existing directory, FILE an existing file. The work
# arguments are small so that the old code (which checked nothing) ran to its crash quickly.
SMALL = {
    "graph": ["--seeds", "1", "--epochs", "1", "--teacher-epochs", "1"],
    "multitask": ["--seeds", "1", "--epochs", "1", "--teacher-epochs", "1"],
    "taskdistill": ["--seeds", "1", "--epochs", "1"],
    "chain": ["--no-serve", "--epochs", "1", "--teacher-epochs", "1", "--labeled", "20"],
}
CASES = [
    (["graph", *SMALL["graph"], "--json", "DIR"], "--json 'DIR' is a directory"),
    (["graph", *SMALL["graph"], "--json", "FILE/x.json"], "--json 'FILE/x.json' cannot be written: 'FILE' is not"),
    (["multitask", *SMALL["multitask"], "--json", "DIR"], "--json 'DIR' is a directory"),
    (["taskdistill", *SMALL["taskdistill"], "--json", "DIR"], "--json 'DIR' is a directory"),
    (["records", "--teacher", "TEACHER", "--out", "DIR"], "--out 'DIR' is a directory"),
    (["chain", *SMALL["chain"], "--out", "FILE"], "--out 'FILE' is a file, not a directory"),
    (["chain", *SMALL["chain"], "--out", "FILE/sub"], "--out 'FILE/sub' cannot be made: 'FILE' is a file"),
    (
        [
            "qkd",
            "--teacher",
            "TEACHER",
            "--epochs-self",
            "1",
            "--epochs-co",
            "0",
            "--epochs-tutor",
            "0",
            "--out",
            "FILE",
        ],
        "--out 'FILE' is a file, not a directory",
    ),
    (
        ["explain", "--model", "t=kd.models:digits_teacher@TEACHER", "--images", "1", "--steps", "1", "--out", "FILE"],
        "--out 'FILE' is a file, not a directory",
    ),
    (["demo", "--seeds", "1", "--epochs", "1", "--teacher-epochs", "1", "--out", "FILE"], "--out 'FILE' is a file"),
    (["demo-lm", "--quick", "--out", "FILE"], "--out 'FILE' is a file"),
    (["demo-datafree", "--quick", "--out", "FILE"], "--out 'FILE' is a file"),
    (["peer", "--name", "a", "--peer", "127.0.0.1:1/b", "--json", "DIR"], "--json 'DIR' is a directory"),
    (["peer", "--name", "a", "--peer", "127.0.0.1:1/b", "--save", "DIR"], "--save 'DIR' is a directory"),
    (["bench", "serve", "--quick", "--json", "DIR"], "--json 'DIR' is a directory"),
    (["bench", "lm", "--quick", "--json", "DIR"], "--json 'DIR' is a directory"),
    (["bench", "cache", "--quick", "--json", "DIR"], "--json 'DIR' is a directory"),
    (["bench", "data", "--samples", "20", "--json", "DIR"], "--json 'DIR' is a directory"),
    (["bench", "methods", "--quick", "--json", "DIR"], "--json 'DIR' is a directory"),
]


@pytest.mark.parametrize(("args", "needle"), CASES, ids=[" ".join(c[0][:2]) + f" {i}" for i, c in enumerate(CASES)])
def test_unwritable_outputs_are_refused_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        args: list[str], needle: str) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    Path("DIR").mkdir()
    Path("FILE").write_text("kept")
    if any("TEACHER" in a for a in args):
        save_weights(digits_teacher(), tmp_path / "teacher.safetensors")
    args = [a.replace("TEACHER", "teacher.safetensors") for a in args]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    r = CliRunner().invoke(app, args)
    refused(r, needle)
    # nothing made or changed: no output folder, the file and the folder as they were
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert Path("FILE").read_text() == "kept"
