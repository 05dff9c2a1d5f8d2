"""`kd train --config` and `kd serve --config` files a user gets wrong: each is refused with one
`error:` line naming the file and the key, before any work (no run directory, no server)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from kd.cli import app
from kd.teacher_server.config import ConfigError, load_config, read_table
from tests.cli_checks import refused

# (file name, bytes, what the refusal must say). Each trained or crashed before: YAML syntax
# errors, tags and second documents were tracebacks (yaml's own errors), a non-UTF-8 byte a
# UnicodeDecodeError, a key given twice in YAML kept the last (TOML refuses it), batch-size and
# batch_size both kept one, `epochs = true` trained 1 epoch, a YAML key without a value trained
# with the default, `config = ...` inside a config was ignored, `opt = 5` a TypeError, and a
# value of the wrong type was click's "Invalid value for '--epochs'" without the file.
TRAIN_FILES = [
    ("syntax.yaml", b"epochs: [1\n", ["is not valid YAML", "while parsing a flow sequence", "(line 2, column 1)"]),
    ("tag.yaml", b'epochs: !!python/object/apply:os.system ["true"]\n', ["is not valid YAML", "constructor"]),
    ("two.yaml", b"epochs: 1\n---\nepochs: 2\n", ["expected a single document in the stream"]),
    ("latin1.yaml", b"method: kd\nlr: 0.1 # \xe9\n", ["is not UTF-8 text (byte 0xe9 at offset 21)"]),
    ("twice.yaml", b"epochs: 240\nlr: 0.1\nepochs: 1\n", ["key 'epochs' is given twice in one mapping (line 3)"]),
    ("twice_opt.yaml", b"opt:\n  kd: {alpha: 0.9}\n  kd: {alpha: 0.5}\n", ["key 'kd' is given twice"]),
    ("spelled.toml", b"batch-size = 64\nbatch_size = 32\n", ["'batch-size' and 'batch_size' are the same option"]),
    ("bool.toml", b"epochs = true\n", ["epochs must be a whole number, got True"]),
    ("flag.toml", b'progress = "no"\n', ["progress must be true or false, got 'no'"]),
    ("novalue.yaml", b"epochs:\n", ["epochs has no value"]),
    ("nested.toml", b'config = "other.toml"\n', ["config cannot name another config file"]),
    ("opt.toml", b"opt = 5\n", ["opt must be a table of method options", "got 5"]),
    ("type.toml", b'epochs = "ten"\n', ["epochs: Input should be a valid integer", "(got 'ten')"]),
    ("list.toml", b"lr = [0.1, 0.2]\n", ["lr takes one value, got the list [0.1, 0.2]"]),
    ("inf.yaml", b"subset: .inf\n", ["subset: Input should be a finite number (got inf)"]),
]


@pytest.mark.parametrize(("name", "text", "needles"), TRAIN_FILES, ids=[t[0] for t in TRAIN_FILES])
def test_train_config_mistakes_are_refused_naming_the_file(tmp_path: Path, name: str, text: bytes,
                                                            needles: list[str]) -> None:  # fmt: skip
    path = tmp_path / name
    path.write_bytes(text)
    run_dir = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "--config", str(path), "--method", "ce", "--run-dir", str(run_dir)])
    refused(r, str(path), *needles)
    assert not run_dir.exists()


def test_a_directory_given_as_the_config_file_is_named_as_one(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["train", "--config", str(tmp_path), "--method", "ce"])
    refused(r, "is a directory; give the TOML or YAML file")


def test_good_config_files_still_read() -> None:
    # the shipped recipes (YAML mappings, lists, nested opt tables) read as before
    root = Path(__file__).resolve().parents[1]
    table = read_table(root / "configs" / "cifar100_mdistiller.yaml")
    assert table["milestones"] == [150, 180, 210] and table["opt"] == {"kd": {"temperature": 4, "alpha": 0.9}}


SERVE_FILES = [
    ("syntax.yaml", b"teacher:\n  - name: t\n    spec: [x\n", "is not valid YAML"),
    ("twice.yaml", b"server:\n  port: 0\n  port: 50051\n", "key 'port' is given twice in one mapping (line 3)"),
    ("twice_teacher.yaml", b"teacher:\n  - name: a\n    spec: m:f\n    name: b\n", "key 'name' is given twice"),
    ("latin1.toml", b"[server]\nhost = '\xff'\n", "is not UTF-8 text (byte 0xff at offset 17)"),
]


@pytest.mark.parametrize(("name", "text", "needle"), SERVE_FILES, ids=[t[0] for t in SERVE_FILES])
def test_serve_config_mistakes_are_refused_naming_the_file(tmp_path: Path, name: str, text: bytes,
                                                            needle: str) -> None:  # fmt: skip
    path = tmp_path / name
    path.write_bytes(text)
    with pytest.raises(ConfigError, match="not valid YAML|given twice|not UTF-8") as e:
        load_config(path)
    assert str(path) in str(e.value) and needle in str(e.value) and "\n" not in str(e.value)
    r = CliRunner().invoke(app, ["serve", "--config", str(path), "--port", "0"])
    refused(r, str(path), needle)


TEACHER = '[[teacher]]\nname = "t"\nspec = "kd.models:digits_teacher"\n'
SERVE_VALUES = [
    # token_file = "" served with no token at all; a teacher named "" was served (--teacher refuses it);
    # max_batch_size 10**23 was torch's overflow traceback at the warm-up
    ('[server]\ntoken_file = ""\n' + TEACHER, "[server]: token_file is empty"),
    ('[[teacher]]\nname = ""\nspec = "kd.models:digits_teacher"\n', "#1: `name` and `spec` must not be empty"),
    (TEACHER + "max_batch_size = 100000000000000000000000\n", "max_batch_size must be in 1..2147483647"),
]


@pytest.mark.parametrize(("text", "needle"), SERVE_VALUES, ids=["token_file", "name", "max_batch_size"])
def test_serve_config_values_that_cannot_work_are_refused(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "serve.toml"
    path.write_text(text)
    refused(CliRunner().invoke(app, ["serve", "--config", str(path), "--port", "0"]), str(path), needle)


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--max-batch-size", "8"], "--max-batch-size set the options of --teacher teachers"),
        (["--no-warmup", "--device", "cpu", "--amp", "bf16"], "--amp, --no-warmup set the options"),
        (["--max-batch-size", "100000000000000000000000"], "--max-batch-size must be in 1..2147483647"),
    ],
    ids=["max-batch-size", "warmup and amp", "huge"],
)
def test_serve_teacher_flags_beside_a_config_of_teachers_are_refused(tmp_path: Path, flags: list[str],
                                                                     needle: str) -> None:  # fmt: skip
    # the flags set only --teacher's options: the config's teacher served with 256, warmed up, fp32
    path = tmp_path / "serve.toml"
    path.write_text(TEACHER)
    refused(CliRunner().invoke(app, ["serve", "--config", str(path), "--port", "0", *flags]), needle)
