"""``kd serve`` refuses a bad option, config value or file before any work: one line naming the
option and the problem, exit status 2, never a traceback and never a server that starts and
then refuses every request. Real CLI runs (typer's CliRunner on ``kd.cli.app``) and real config
files; a run that starts serving anyway is stopped by SIGTERM once it writes its port file, so
it fails its test instead of hanging it."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner, Result

from kd.cli import app
from kd.teacher_server.config import ConfigError, load_config


def serve(tmp_path: Path, *args: str) -> Result:
    """``kd serve --port-file P ARGS`` in this process; SIGTERM once it serves (a refusal never does)."""
    port_file = tmp_path / "port"
    done = threading.Event()

    def stop_once_serving() -> None:
        while not done.wait(0.05):
            if port_file.exists():
                os.kill(os.getpid(), signal.SIGTERM)  # kd serve's StopSignals: drain and exit 0
                return

    watchdog = threading.Thread(target=stop_once_serving, daemon=True)
    watchdog.start()
    try:
        # --no-warmup sets --teacher's options only (refused beside a config of teachers)
        quick = [] if "--config" in args else ["--no-warmup"]
        return CliRunner().invoke(app, ["serve", *quick, "--port-file", str(port_file), *args])
    finally:
        done.set()
        watchdog.join()


def refused(r: Result, *needles: str) -> str:
    """The one error line of a refused run, after checking it is one (exit 2, no traceback)."""
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), (r.exit_code, r.output, r.exception)
    lines = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--port", "-1"], ["--port", "0..65535", "-1"]),
        (["--port", "99999"], ["--port", "0..65535", "99999"]),
        (["--max-message-mb", "0"], ["--max-message-mb", "got 0"]),
        (["--max-message-mb", "100000"], ["--max-message-mb", "2047"]),
        (["--max-queue-size", "-1"], ["--max-queue-size", ">= 0"]),
        (["--max-queue-delay-us", "-5"], ["--max-queue-delay-us", ">= 0"]),
        (["--workers", "0"], ["--workers", ">= 1"]),
        (["--metrics-port", "99999"], ["--metrics-port", "0..65535"]),
        (["--query-budget", "-1"], ["--query-budget", ">= 0"]),
        (["--device", "tpu"], ["--device", "'tpu'"]),
        (["--instances", "2", "--devices", "cpu,bogus"], ["--devices", "'bogus'"]),
        (["--mean", "abc", "--std", "1"], ["--mean", "'abc'"]),
        (["--mean", "0.5", "--std", "nan"], ["--std", "finite"]),
        (["--host", "999.1.1.1"], ["--host", "999.1.1.1"]),
        (["--accept-weights", "--upload-idle-timeout", "0"], ["--upload-idle-timeout", "> 0"]),
        (["--stream-idle-timeout", "0"], ["--stream-idle-timeout", "(0, 604800]", "got 0"]),
        (["--stream-idle-timeout", "nan"], ["--stream-idle-timeout", "got nan"]),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) and v[0].startswith("--") else "",
)
def test_serve_refuses_a_bad_option(tmp_path: Path, teacher_spec: str, args: list[str], needles: list[str]) -> None:
    refused(serve(tmp_path, "--port", "0", "-t", f"t={teacher_spec}", *args), *needles)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that sees no GPU")
def test_serve_refuses_cuda_where_there_is_none(tmp_path: Path, teacher_spec: str) -> None:
    refused(serve(tmp_path, "--port", "0", "-t", f"t={teacher_spec}", "--device", "cuda"), "--device", "CUDA")


def test_serve_refuses_garbage_records_and_tls_files(tmp_path: Path, teacher_spec: str) -> None:
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"[server]\nport = 1\n" * 10)
    t = f"t={teacher_spec}"
    refused(serve(tmp_path, "--port", "0", "-t", t, "--records", f"t={garbage}"), "activation records", str(garbage))
    refused(serve(tmp_path, "--port", "0", "-t", t, "--tls-cert", str(garbage), "--tls-key", str(garbage)),
            "TLS certificate", str(garbage), "not PEM")  # fmt: skip


CONFIGS = {
    'max_batch_size = "abc"': "max_batch_size must be int, got 'abc'",
    "max_batch_size = 1.5": "max_batch_size must be int, got 1.5",
    'mean = [0.5]\nstd = "x"': "std must be list[float] | None, got 'x'",
    "class_names = [1, 2]": "class_names must be list[str] | None",
    "max_gradient_batch = 0": "max_gradient_batch must be >= 1, got 0",
    "max_queue_delay_us = -100": "max_queue_delay_us must be >= 0, got -100",
    "max_queue_size = -1": "max_queue_size must be >= 0",
    'amp = "fp8"': "amp must be one of fp32, bf16, fp16",
    'device = "tpu"': "device 'tpu' is not a device",
    "mean = [0.5]\nstd = [0.0]": "std must be > 0",
    "upload_idle_timeout_s = -1": "upload_idle_timeout_s must be a number of seconds > 0",
}


@pytest.mark.parametrize("entry", list(CONFIGS), ids=list(CONFIGS))
def test_config_refuses_a_teacher_value_of_the_wrong_type_or_range(tmp_path: Path, entry: str) -> None:
    path = tmp_path / "serve.toml"
    path.write_text(f'[[teacher]]\nname = "t"\nspec = "kd.models:digits_teacher"\n{entry}\n')
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path} [[teacher]] #1: {CONFIGS[entry]}"), str(e.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[server]\nport = "x"\n', "[server]: port must be int, got 'x'"),
        ("[server]\nport = 99999\n", "[server]: port must be in 0..65535, got 99999"),
        ("[server]\nmax_message_mb = 0\n", "[server]: max_message_mb must be in 1..2047, got 0"),
        (
            "[server]\nstream_idle_timeout_s = -1\n",
            "[server]: stream_idle_timeout_s must be a number of seconds in (0, 604800], got -1",
        ),
        ('[server]\nstream_idle_timeout_s = "x"\n', "[server]: stream_idle_timeout_s must be float, got 'x'"),
        ("server = 3\n", ": server must be a table ([server]), got 3"),
        ("teacher = 5\n", ": teacher must be a list of tables ([[teacher]]), got 5"),
    ],
)
def test_config_refuses_a_bad_server_value_or_table(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "serve.toml"
    path.write_text(text + '[[teacher]]\nname = "t"\nspec = "kd.models:digits_teacher"\n' * ("teacher" not in text))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}{' ' if message.startswith('[') else ''}{message}"), str(e.value)


def test_serve_fails_a_bad_config_cleanly(tmp_path: Path, teacher_spec: str) -> None:
    path = tmp_path / "serve.toml"
    path.write_text(f'[[teacher]]\nname = "t"\nspec = "{teacher_spec}"\nmax_batch_size = "abc"\n')
    refused(serve(tmp_path, "--config", str(path)), str(path), "max_batch_size must be int")


def test_serve_refuses_two_datasets_of_one_name(tmp_path: Path, teacher_spec: str) -> None:
    np.savez(tmp_path / "a.npz", x=np.zeros((4, 64), np.float32), y=np.arange(4))
    np.savez(tmp_path / "b.npz", x=np.ones((4, 64), np.float32), y=np.arange(4))
    a, b = f"a=npz:{tmp_path / 'a.npz'}", f"a=npz:{tmp_path / 'b.npz'}"
    # the second replaced the first without a word: clients asking for 'a' got b.npz
    refused(serve(tmp_path, "--port", "0", "-t", f"t={teacher_spec}", "--dataset", a, "--dataset", b),
            f"--dataset {b!r}: the name 'a' is already given to", "(by another --dataset)")  # fmt: skip
    path = tmp_path / "serve.toml"
    table = '[[dataset]]\nname = "a"\nref = "npz:{}"\n'
    path.write_text(f'[[teacher]]\nname = "t"\nspec = "{teacher_spec}"\n' + table.format(tmp_path / "a.npz"))
    refused(serve(tmp_path, "--config", str(path), "--dataset", b), f"(by --config {str(path)!r})")
    path.write_text(path.read_text() + table.format(tmp_path / "b.npz"))
    with pytest.raises(ConfigError, match=r"\[\[dataset\]\] #2: dataset name 'a' is already given to"):
        load_config(path)


def test_serve_refuses_an_empty_dataset(tmp_path: Path, teacher_spec: str) -> None:
    # it was served (0 samples) and every request by reference to it refused
    np.savez(tmp_path / "e.npz", x=np.zeros((0, 64), np.float32), y=np.zeros(0, np.int64))
    e = f"e=npz:{tmp_path / 'e.npz'}"
    refused(serve(tmp_path, "--port", "0", "-t", f"t={teacher_spec}", "--dataset", e),
            f"npz: {tmp_path / 'e.npz'} holds no samples (inputs float32 [0, 64])")  # fmt: skip


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ("input_shape=0x64", "input_shape '0x64' in "),  # was "teacher 't' returned shape (2, 0, 10)"
        ("input_shape=-2x64", "input_shape '-2x64' in "),  # was torch's RuntimeError: exit 1, a traceback
        ("input_shape=64&input_shape=0x64", "option 'input_shape' given twice in teacher spec"),  # the last won
    ],
)
def test_serve_refuses_a_teacher_input_shape_of_no_size(tmp_path: Path, teacher_spec: str, shape: str,
                                                        message: str) -> None:  # fmt: skip
    refused(serve(tmp_path, "--port", "0", "-t", f"t={teacher_spec}?{shape}"), message)
