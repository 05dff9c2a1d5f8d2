"""The ``kd`` command line (typer)."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from kd.core.signals import Stopped  # stdlib only: the CLI's start stays fast

app = typer.Typer(
    help="kd: teacher-as-a-service knowledge distillation.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)
cache_app = typer.Typer(help="Inspect and check soft-label caches.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
# soft_wrap: a line is printed whole, not wrapped at 80 columns when stderr is a file or a pipe (a log
# line cut in two cannot be grepped).
console = Console(stderr=True, soft_wrap=True)


# torch re-raises a DataLoader worker's exception as "Caught X in DataLoader worker process N.",
# then the worker's whole traceback, then "module.X: message" (kd.core.data.worker_error_message).
_WORKER_WRAPPER = re.compile(
    r"Caught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback \(most recent call last\):\n"
    r".*\n(?:[\w.]+\.)?\1: (.*)\Z",
    re.DOTALL,
)


def _fail(message: str, code: int = 2) -> None:
    from rich.markup import escape

    # A worker's error as itself: the commands that print f"{type(e).__name__}: {e}" (kd train,
    # evaluate, train-lm, ...) printed torch's wrapper, the worker's traceback included.
    message = _WORKER_WRAPPER.sub(lambda m: m.group(2).strip(), message)
    # escaped: a message's own square brackets ("[x]", a list of names) are text, not markup;
    # never wrapped: a path or a name cut by the terminal's width is no longer findable
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    # SystemExit, not typer.Exit: click's Exit is a RuntimeError, which the commands' own
    # `except (..., RuntimeError)` around their work caught and printed again ("error: 2").
    raise SystemExit(code)


def _count(n: int, noun: str) -> str:
    """``n`` and the noun, plural unless n is 1 ("1 record", "2 records")."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _parse_options(items: list[str]) -> dict[str, object]:
    """``key=value`` pairs; values parsed as JSON where they can be (numbers, true/false)."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            _fail(f"option {item!r} must look like key=value")
        if key in out:  # --opt temperature=4 --opt temperature=2 trained at 2 without a word
            _fail(f"option {key!r} is given twice ({key}={json.dumps(out[key])} and {item}); give it once")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _floats(text: str | None, option: str = "value") -> list[float] | None:
    """Comma-separated numbers (None stays None); anything else fails naming ``option``."""
    if text is None:
        return None
    parts = text.split(",")
    try:
        # An empty entry ("0.5,,0.5") is refused, not skipped: it read as one value fewer than typed.
        if not all(v.strip() for v in parts):
            raise ValueError(text)
        return [float(v) for v in parts]
    except ValueError:
        _fail(f"{option} {text!r}: expected comma-separated numbers, e.g. 0.485,0.456,0.406")


def _probe_mkdir(path: Path) -> None:
    """Raise the OSError that making ``path`` (and its missing parents) would raise, and leave nothing
    behind: every directory made here is removed again, so a later refusal leaves the disk as it was."""
    made: list[Path] = []
    try:
        for d in [*reversed(path.parents), path]:  # outermost first, as mkdir(parents=True) makes them
            if not d.exists():
                d.mkdir()
                made.append(d)
    finally:
        for d in reversed(made):
            d.rmdir()


def _save_student(model, out: Path, what: str = "the student") -> None:
    """Write a trained student's weights (safetensors) to ``out``; any failure (an unwritable path, a
    tensor safetensors cannot hold) is a one-line error, never a traceback."""
    from safetensors import SafetensorError

    from kd.teacher_server.loading import save_weights

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_weights(model, out)
    except (OSError, RuntimeError, ValueError, TypeError, SafetensorError) as e:
        _fail(f"cannot write {what} to {str(out)!r}: {type(e).__name__}: {e}")


def _check_saveable(model, out: Path | None) -> None:
    """Before training: with ``--out``, the initial student must be one ``_save_student`` can write
    (dtypes, layouts, shared tensors; no weights are written), so a run is not lost at its end."""
    if out is None:
        return
    from safetensors import SafetensorError

    from kd.teacher_server.loading import check_saveable

    try:
        check_saveable(model)
    except (RuntimeError, ValueError, TypeError, SafetensorError) as e:
        _fail(f"--out {str(out)!r}: the student cannot be saved as safetensors: {type(e).__name__}: {e}")


def _check_out(out: Path | None, flag: str = "--out") -> None:
    """Before any training: ``out`` must be writable (not a directory, its parent a writable directory)
    and named ``*.safetensors``, so a trained student is never lost to a path that was wrong from the start."""

    if out is None:
        return
    if out.is_dir():
        _fail(f"{flag} {str(out)!r} is a directory; give the file to write")
    if out.suffix != ".safetensors":
        # The student is written as safetensors, and every loader (kd evaluate, kd serve, --student
        # ...@WEIGHTS) reads a file by its suffix: under another name it would be read as a torch pickle
        # and refused, so the trained student could not be loaded again.
        _fail(f"{flag} {str(out)!r}: the student is saved as safetensors; give a name ending in .safetensors "
              f"(e.g. {str(out.with_suffix('.safetensors'))!r}), which kd's loaders read as such")  # fmt: skip
    suffix = ".connectors.safetensors"
    if flag == "--out" and out.name.endswith(suffix):
        # connectors_path(X.safetensors) is this very name: a student written here would overwrite the
        # connectors of a feature run with --out X.safetensors (and that run would overwrite this student).
        owner = out.with_name(out.name.removesuffix(suffix) + ".safetensors")
        _fail(
            f"{flag} {str(out)!r} ends in {suffix}, where kd train writes the connectors of --out "
            f"{str(owner)!r}; a student saved there would overwrite them (or be overwritten): choose another name"
        )
    _check_file_out(out, flag)


def _check_file_out(out: Path | None, flag: str) -> None:
    """Before any work: a file a command writes at its end (--json, --save, --out) must be one it can
    write (not a directory; the nearest existing folder above it writable), so a finished run is not
    lost to a traceback at its last line."""
    import os

    if out is None:
        return
    if out.is_dir():
        _fail(f"{flag} {str(out)!r} is a directory; give the file to write")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        _fail(f"{flag} {str(out)!r} cannot be written: {str(parent)!r} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        _fail(f"{flag} {str(out)!r} cannot be written: {str(parent)!r} is not writable")


def _check_dir_out(out: Path, flag: str) -> None:
    """Before any work: an output folder (made when missing) that is not a file and not below one."""
    for d in [out, *out.parents]:
        if d.exists():
            if not d.is_dir():
                what = "is a file" if d == out else f"cannot be made: {str(d)!r} is a file"
                _fail(f"{flag} {str(out)!r} {what}, not a directory")
            break


def connectors_path(out: Path) -> Path:
    """Where a feature method's connectors go beside the student ``out``: its name with
    ``.connectors.safetensors`` in place of ``.safetensors`` (student.safetensors ->
    student.connectors.safetensors, as always), or appended to the whole name of any other
    file, so distinct --out names never share one connectors file (with_suffix turned both
    student_lr0.05 and student_lr0.1 into student_lr0.connectors.safetensors)."""
    return out.with_name(out.name.removesuffix(".safetensors") + ".connectors.safetensors")


def _check_run_options(seed: int, device: str) -> None:
    """``--seed`` (numpy takes 0 to 2**32 - 1) and ``--device`` (one this torch has), before any work."""
    from kd.teacher_server.loading import device_problem

    if not 0 <= seed < 2**32:
        _fail(f"--seed must be >= 0 and < 2**32, got {seed}")
    if problem := device_problem(device):
        _fail(f"--device {problem}")


def rank_device(device: str, local_rank: int) -> str:
    """The device of a torchrun rank: a bare ``cuda`` is this rank's GPU, ``cuda:LOCAL_RANK`` (every
    rank on GPU 0 would share it, and NCCL refuses two ranks on one device); a device with an index,
    or the CPU, as given (one rank per node, or the user's own choice)."""
    return f"cuda:{local_rank}" if device == "cuda" else device


def _join_torchrun(device: str) -> tuple[str, int]:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on CUDA, gloo on the CPU) and
    take this rank's device -> (device, rank); else (device, 0)."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device, (dist.get_rank() if dist.is_available() and dist.is_initialized() else 0)
    device = rank_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    from kd.teacher_server.loading import device_problem

    if problem := device_problem(device):  # cuda:LOCAL_RANK on a node with fewer GPUs than ranks
        _fail(f"--device {problem} (torchrun rank {os.environ.get('RANK', '?')}, local rank "
              f"{os.environ.get('LOCAL_RANK', '0')})")  # fmt: skip
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))  # NCCL's collectives run on the current device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device, dist.get_rank()


def _leave_process_group() -> None:
    """Under torchrun: every rank at this point, then the group destroyed. Ranks that destroyed it
    and exited one after another aborted now and then ("terminate called without an active
    exception", SIGABRT, both gloo ranks, about 1 run in 7 of test_train_loop's torchrun tests)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _stop_signals():
    """SIGTERM and SIGINT recorded from now on (``kd.core.signals.StopSignals``), for a loop that
    asks ``first()`` between its steps and ends there cleanly: a scheduler's or ``kill``'s polite
    SIGTERM no longer kills the process mid-step. A second Ctrl-C (1 s after the first: torchrun
    forwards the terminal's to ranks that got it already) still exits at once."""
    import threading

    from kd.core.signals import StopSignals

    if threading.current_thread() is not threading.main_thread():
        # Python installs signal handlers from the main thread only; a command run from another
        # (a job runner, a notebook's worker thread) keeps the default behaviour instead of failing.
        return _NoStopSignals()
    signals = StopSignals(force_after_s=1.0)
    signals.close()  # nobody waits on its wake-up pipe: the handlers stay, the fd goes back
    return signals


class _NoStopSignals:
    """``_stop_signals`` off the main thread: no signal is ever recorded."""

    def first(self) -> int | None:
        return None

    def close(self, restore_handlers: bool = False) -> None:
        pass


def _stopped_exit(signum: int, message: str) -> None:
    """One line on how to resume, then exit 128 + the signal (130 for SIGINT, 143 for SIGTERM):
    the shell's status for a job ended by that signal, so a scheduler sees an unfinished job."""
    import signal

    console.print(f"stopped by {signal.Signals(signum).name}: {message}", highlight=False, soft_wrap=True)
    raise SystemExit(128 + signum)


class _Signalled(BaseException):
    """SIGTERM or SIGINT inside ``_stopped_politely``: a BaseException, so the commands' ``except
    Exception`` (a study's per-method error rows) lets it through to the ``finally`` blocks."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _stopped_politely(command: str) -> Iterator[None]:
    """For a command whose loops cannot stop between steps (studies, demos, benches, kd records):
    SIGTERM or SIGINT ends it as an exception raised in the main thread, so its ``finally`` blocks
    run (the ``kd serve`` subprocesses of chain and the demos are stopped, not left serving with no
    parent; a peer's server is stopped), then one line and exit 128 + the signal, with no traceback.
    Further signals while it unwinds are ignored, so the clean-up is not cut short."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, _frame: object) -> None:
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)
        raise _Signalled(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    except _Signalled as e:
        _stopped_exit(e.signum, f"{command} did not finish; what it had not written yet is not saved "
                      "(run it again from the start)")  # fmt: skip
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _stopped_unsaved(stopped: Stopped, command: str) -> None:
    """``_stopped_exit`` for a command that cannot resume (``stopped``: the trainer's
    ``kd.core.signals.Stopped``): its student is half-trained, so nothing of it is written."""
    _stopped_exit(stopped.signum, f"{stopped.where}; the student is not saved: {command} has no --resume "
                  "(run it again from the start)")  # fmt: skip


def _error_text(e: BaseException) -> str:
    """What a command's catch-all prints: kd's own refusals (a ValueError naming the option, file or
    record; a diverged run's FloatingPointError) as they are, anything else after its type, which
    says where it came from ("error: ValueError: --dataset ..." read as noise)."""
    if isinstance(e, (ValueError, FloatingPointError)) and str(e):
        return str(e)
    return f"{type(e).__name__}: {e}"


def _check_run_dir(run_dir: Path | None, resume: bool, checkpoint_every: int) -> None:
    """--run-dir, --resume and --checkpoint-every of a command whose trainer writes a checkpoint."""
    if resume and run_dir is None:
        _fail("--resume continues the run in --run-dir: give --run-dir")
    if checkpoint_every < 0 or (checkpoint_every and run_dir is None):
        _fail(f"--checkpoint-every {checkpoint_every}: a number of steps >= 0, with --run-dir to write to")
    if run_dir is not None and run_dir.exists() and not run_dir.is_dir():
        _fail(f"--run-dir {str(run_dir)!r} is a file, not a directory")
    # The checkpoint is first written after an epoch (or N steps, or at a stop): a folder that cannot
    # be made there would fail only then, with that work lost. Checked without creating anything.
    for above in run_dir.parents if run_dir is not None and not run_dir.exists() else ():
        if above.exists():
            if not above.is_dir():
                _fail(f"--run-dir {str(run_dir)!r} cannot be made: {str(above)!r} is a file, not a directory")
            break


def _stopped_resumable(stopped: Stopped, run_dir: Path | None) -> None:
    """``_stopped_exit`` for a trainer that left a checkpoint in ``run_dir`` when given one."""
    if run_dir is None:
        _stopped_exit(stopped.signum, f"{stopped.where}; the student is not saved: no --run-dir to resume from "
                      "(run it again from the start; with --run-dir a stop leaves a checkpoint)")  # fmt: skip
    _stopped_exit(stopped.signum, f"{stopped.where}; checkpoint in {run_dir}: run the same command with --resume to "
                  "continue")  # fmt: skip


def _call(fn, *args, errors: tuple[type[Exception], ...] = (ValueError, TypeError), **kwargs):
    """``fn(*args, **kwargs)``; a refusal (ValueError/TypeError: bad option, data or recipe) becomes
    ``_fail`` with its message, so every command reports refusals the same way."""
    try:
        return fn(*args, **kwargs)
    except errors as e:
        _fail(str(e))


def _report(title: str, columns: list[str], rows: list[list[str]], *, caption: str | None = None,
            json_out: Path | None = None, result: object = None) -> None:  # fmt: skip
    """The study commands' output: one table on stdout, and the full result as JSON when asked."""
    table = Table(title=title, caption=caption)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=1))


# What a served teacher may be named (Triton's model names alike): see serve.
_TEACHER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@app.command()
def serve(
    teacher: list[str] = typer.Option(
        [], "--teacher", "-t", help="NAME=SPEC; SPEC is module:factory@WEIGHTS or an archive path. Repeatable."
    ),
    config: Path | None = typer.Option(None, help="TOML/YAML file of teachers, datasets and server options."),
    dataset: list[str] = typer.Option(
        [],
        help="NAME=URI: register a dataset for inputs by reference (any dataset URI kd reads, e.g. "
        "digits=digits:train); samples are read per request and shaped as the teacher takes them. Repeatable.",
    ),
    host: str | None = typer.Option(None, help="Address to bind [127.0.0.1]; 0.0.0.0 for all interfaces."),
    port: int | None = typer.Option(None, help="Port to bind [50051]; 0 picks a free one (see --port-file)."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N (for --teacher)."),
    amp: str = typer.Option("fp32", help="Autocast dtype of the forward: fp32, bf16 or fp16."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the teachers."),
    channels_last: bool = typer.Option(False, "--channels-last", help="Run 4-D inputs in channels-last layout."),
    warmup: bool = typer.Option(True, help="Run each batch size once before serving."),
    threads: int = typer.Option(0, help="torch threads of each teacher's model thread [0 = torch's default]."),
    instances: int = typer.Option(
        1,
        help="Model instances per teacher (Triton's instance groups): copies with their own threads, "
        "fed by one batcher.",
    ),
    devices: str | None = typer.Option(
        None, help="Devices the instances are placed on, round-robin, e.g. cuda:0,cuda:1 [--device]."
    ),
    max_batch_size: int = typer.Option(256, help="Largest merged forward, in samples."),
    preferred_batch_size: list[int] = typer.Option([], help="A batch of this size runs at once. Repeatable."),
    max_queue_delay_us: int = typer.Option(
        2000,
        help="How long a partial batch waits for more requests, where more come (never for a lone client). "
        "0 (Triton's default): never; closed-loop clients of a fixed-cost forward (GPU) then form smaller batches.",
    ),
    max_batch_tokens: int = typer.Option(
        8192, help="Token teachers: positions per forward, padding included; a longer row is refused."
    ),
    max_queue_size: int = typer.Option(
        4096, help="Queued samples per teacher before RESOURCE_EXHAUSTED (0 = unbounded, not advised)."
    ),
    mean: str | None = typer.Option(
        None, help="uint8 inputs: per-channel mean after /255, e.g. 0.485,0.456,0.406 (with --std) [none: x/255 only]."
    ),
    std: str | None = typer.Option(None, help="uint8 inputs: per-channel std after /255 (with --mean)."),
    max_message_mb: int | None = typer.Option(None, help="Largest request/response message, MiB [256]."),
    workers: int | None = typer.Option(None, help="gRPC handler threads [32]."),
    trust_archive: bool = typer.Option(
        False, help="Allow TorchScript / torch.export archives (they are executable code)."
    ),
    token_file: Path | None = typer.Option(
        None, help="Require 'authorization: Bearer <token>' (token in this file; or env KD_TOKEN)."
    ),
    tls_cert: Path | None = typer.Option(None, help="Server certificate (PEM) for TLS."),
    tls_key: Path | None = typer.Option(None, help="Server private key (PEM) for TLS."),
    tls_client_ca: Path | None = typer.Option(
        None, help="CA (PEM) that client certificates must chain to: mutual TLS."
    ),
    metrics_port: int | None = typer.Option(None, help="Serve Prometheus /metrics on this port."),
    port_file: Path | None = typer.Option(None, help="Write the bound port here once serving."),
    access: list[str] = typer.Option(
        [],
        help="What clients may see: TIER for every --teacher, or NAME=TIER; tiers white (default: + gradients, "
        "BN statistics, records, synthesis), features, scores, labels. Repeatable.",
    ),
    records: list[str] = typer.Option([], help="NAME=FILE: serve activation records made by `kd records`."),
    query_budget: int | None = typer.Option(
        None, help="Per client: samples + gradient samples before RESOURCE_EXHAUSTED [0 = no budget]."
    ),
    max_streams: int | None = typer.Option(None, help="Open InferStream/Synthesize calls at once [64]."),
    max_streams_per_client: int | None = typer.Option(
        None, help="Open streams per client: per token or certificate, else per kd client instance [16]."
    ),
    stream_idle_timeout: float | None = typer.Option(
        None,
        help="Close an InferStream with nothing in flight for this many seconds (kd clients reopen it) [300]; "
        "at a stream limit the stream idle longest gives way to a new one.",
    ),
    accept_weights: bool = typer.Option(
        False, "--accept-weights", help="Let clients replace the weights while serving (PublishWeights; kd peer)."
    ),
    upload_idle_timeout: float = typer.Option(
        60.0,
        help="--accept-weights: an upload that sends no chunk for this many seconds is dropped "
        "(DEADLINE_EXCEEDED), so a stalled publisher cannot keep the others out.",
    ),
) -> None:
    """Serve teachers over gRPC with dynamic batching."""
    import os
    import socket

    from kd.core.data import open_source
    from kd.core.files import write_text_atomically
    from kd.core.signals import StopSignals
    from kd.teacher_server.access import parse_access
    from kd.teacher_server.auth import TLSConfig
    from kd.teacher_server.config import (
        ConfigError,
        ServerConfig,
        TeacherEntry,
        load_config,
        server_problem,
        teacher_problem,
    )
    from kd.teacher_server.loading import TeacherLoadError, device_problem, load_teacher
    from kd.teacher_server.server import TeacherOptions, serve_until_signalled, start_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # Every option is checked before the config is read or a teacher loaded: a mistake costs no work.
    server_flags = {"host": host, "port": port, "max_message_mb": max_message_mb, "workers": workers,
                    "metrics_port": metrics_port, "query_budget": query_budget, "max_streams": max_streams,
                    "max_streams_per_client": max_streams_per_client,
                    "stream_idle_timeout_s": stream_idle_timeout}  # fmt: skip
    for key, value in server_flags.items():
        problem = server_problem(key, value)
        if problem:
            _fail(f"--{key.removesuffix('_s').replace('_', '-')} {problem}")
    problem = device_problem(device)
    if problem:
        _fail(f"--device {problem}")
    flags = TeacherOptions(
        max_batch_size=max_batch_size,
        preferred_batch_sizes=list(preferred_batch_size),
        max_queue_delay_us=max_queue_delay_us,
        max_queue_size=max_queue_size,
        max_batch_tokens=max_batch_tokens,
        amp=amp,
        compile=compile,
        channels_last=channels_last,
        warmup=warmup,
        threads=threads,
        instances=instances,
        devices=[d.strip() for d in devices.split(",") if d.strip()] if devices else None,
        mean=_floats(mean, "--mean"),
        std=_floats(std, "--std"),
        upload_idle_timeout_s=upload_idle_timeout,
    )
    bad = teacher_problem(flags)
    if bad:
        key, problem = bad
        flag = {"preferred_batch_sizes": "preferred-batch-size", "upload_idle_timeout_s": "upload-idle-timeout"}
        _fail(f"--{flag.get(key, key.replace('_', '-'))} {problem}")
    import dataclasses

    if config is not None and not teacher:  # the per-teacher flags set --teacher's options only
        base = TeacherOptions()
        names = {"preferred_batch_sizes": "preferred-batch-size", "upload_idle_timeout_s": "upload-idle-timeout",
                 "warmup": "no-warmup"}  # fmt: skip
        given = ["device"] * (device != "cpu") + [
            names.get(f.name, f.name.replace("_", "-"))
            for f in dataclasses.fields(flags)
            if getattr(flags, f.name) != getattr(base, f.name)
        ]
        if given:
            _fail(f"--{', --'.join(given)} set the options of --teacher teachers; the teachers of --config "
                  f"{str(config)!r} take theirs from their [[teacher]] tables (here it would be ignored)")  # fmt: skip

    tiers: dict[str, str] = {}
    for item in access:
        name, sep, tier = item.rpartition("=")
        try:
            tiers[name if sep else "*"] = parse_access(tier)
        except ValueError as e:
            _fail(f"--access {item!r}: {e}")
    served_records = {}
    for item in records:
        name, sep, path = item.partition("=")
        if not sep or not name:
            _fail(f"--records {item!r} must look like NAME=FILE")
        if not Path(path).is_file():
            _fail(f"--records {item!r}: no such file {path!r}")
        served_records[name] = path
    try:
        cfg = load_config(config) if config is not None else ServerConfig()
    except ConfigError as e:
        _fail(str(e))
    for item in teacher:
        name, sep, spec = item.partition("=")
        if not sep or not name:
            _fail(f"--teacher {item!r} must look like NAME=SPEC")
        cfg.teachers.append(TeacherEntry(name, spec, device, flags))
    for entry in cfg.teachers:
        # A name is a metrics label, part of file names (chain's logs) and of server:HOST:PORT/NAME and NAME=SPEC
        # references: a "/" or "=" in it could not be named there again.
        if not _TEACHER_NAME.fullmatch(entry.name):
            where = "--teacher" if entry.name in {i.partition("=")[0] for i in teacher} else f"--config {str(config)!r}"
            _fail(f"{where}: teacher name {entry.name!r} must match {_TEACHER_NAME.pattern} (letters, digits, '_', "
                  "'.', '-'; a letter or digit first)")  # fmt: skip
        tier = tiers.get(entry.name, tiers.get("*"))
        extra = {"access": tier} if tier else {}
        if accept_weights:
            extra["accept_weights"] = True
        if entry.name in served_records:
            extra["records"] = served_records[entry.name]
        if extra:
            entry.options = dataclasses.replace(entry.options, **extra)
    unknown = (set(tiers) - {"*"} | set(served_records)) - {e.name for e in cfg.teachers}
    if unknown:
        _fail(f"--access/--records name unknown teacher(s) {sorted(unknown)}")
    given: set[str] = set()
    for item in dataset:
        name, sep, ref = item.partition("=")
        if not sep or not name:
            _fail(f"--dataset {item!r} must look like NAME=URI")
        if name in cfg.datasets:  # the later one silently replaced it: clients asking for NAME got other data
            where = "another --dataset" if name in given else f"--config {str(config)!r}"
            _fail(f"--dataset {item!r}: the name {name!r} is already given to {cfg.datasets[name]!r} (by {where}); "
                  "dataset names must be unique")  # fmt: skip
        given.add(name)
        cfg.datasets[name] = ref
    if not cfg.teachers:
        _fail("no teachers: give --teacher NAME=SPEC or --config FILE")
    for key, value in server_flags.items():
        if value is not None:
            setattr(cfg, key, value)
    try:
        socket.getaddrinfo(cfg.host, None)
    except (OSError, UnicodeError) as e:
        _fail(f"{'--host' if host is not None else f'{config} [server] host'} {cfg.host!r} cannot be resolved: {e}")
    for key, value in (("token_file", token_file), ("tls_cert", tls_cert), ("tls_key", tls_key),
                       ("tls_client_ca", tls_client_ca)):  # fmt: skip
        if value is not None:
            setattr(cfg, key, str(value))
    cfg.trust_archive = cfg.trust_archive or trust_archive
    token = os.environ.get("KD_TOKEN") or None
    if cfg.token_file:
        try:
            token = Path(cfg.token_file).read_text().strip()
        except OSError as e:
            _fail(f"cannot read token file {cfg.token_file!r}: {e}")
        if not token:
            _fail(f"token file {cfg.token_file!r} is empty")
    tls = None
    if cfg.tls_cert or cfg.tls_key:
        if not (cfg.tls_cert and cfg.tls_key):
            _fail("TLS needs both --tls-cert and --tls-key")
        tls = TLSConfig(Path(cfg.tls_cert), Path(cfg.tls_key), Path(cfg.tls_client_ca) if cfg.tls_client_ca else None)
        try:
            tls.server_credentials()  # the files are read and checked before any teacher loads
        except (ValueError, OSError) as e:
            _fail(str(e))
    elif cfg.tls_client_ca:
        _fail("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    try:
        # SampleSources read by index per request (kd.core.data.open_source), never one tensor in RAM.
        datasets = {name: open_source(uri) for name, uri in cfg.datasets.items()}
        teachers = [
            load_teacher(e.name, e.spec, device=e.device, trust_archive=cfg.trust_archive) for e in cfg.teachers
        ]
        running = start_server(
            teachers,
            host=cfg.host,
            port=cfg.port,
            options={e.name: e.options for e in cfg.teachers},
            datasets=datasets,
            max_workers=cfg.workers,
            max_message_bytes=cfg.max_message_mb << 20,
            tls=tls,
            token=token,
            metrics_port=cfg.metrics_port,
            query_budget=cfg.query_budget,
            max_streams=cfg.max_streams,
            max_streams_per_client=cfg.max_streams_per_client,
            stream_window=cfg.stream_window,
            max_clients=cfg.max_clients,
            stream_idle_timeout_s=cfg.stream_idle_timeout_s,
        )
    except (TeacherLoadError, ValueError, OSError) as e:
        _fail(str(e))
    signals = StopSignals()  # before "serving on" and the port file: a SIGTERM right after them drains
    for t in teachers:
        ep = running.endpoints[t.name]
        console.print(
            f"teacher [bold]{t.name}[/] fingerprint {ep.fingerprint[:16]} input {list(t.input_shape)} "
            f"classes {t.num_classes} on {t.device}, access {ep.access}"
            + (", activation records" if ep.records is not None else ""),
            highlight=False,
        )
    for name, source in datasets.items():
        console.print(f"dataset [bold]{name}[/] {source.dataset_id}, {_count(len(source), 'sample')}", highlight=False)
    security = ("mutual TLS" if cfg.tls_client_ca else "TLS") if tls else "plaintext"
    shown = f"[{cfg.host}]" if ":" in cfg.host else cfg.host  # an IPv6 host as clients name it: [::1]:PORT
    console.print(
        f"serving on {shown}:{running.port} ({security}{', token' if token else ''})"
        + (f", metrics on :{running.metrics_port}/metrics" if running.metrics_port else ""),
        highlight=False,
    )
    if port_file is not None:
        write_text_atomically(port_file, str(running.port))  # a reader never sees a half-written port
    serve_until_signalled(running, signals=signals)
    accepted, unanswered = running.accepted()
    console.print(f"drained: {_count(accepted, 'request')} accepted, {unanswered} unanswered; bye", highlight=False)


@app.command()
def precompute(
    ctx: typer.Context,
    source: str = typer.Option(
        ...,
        help="Teacher to run: server:HOST:PORT[,HOST:PORT...][/TEACHER] or local:SPEC (a token teacher: "
        "local:hf:DIR or local:MOD:FACTORY@WEIGHTS?input_shape=-1).",
    ),
    out: Path = typer.Option(..., help="Cache directory (created, or resumed if it exists)."),
    dataset: str = typer.Option(
        "digits",
        help="Dataset URI: digits[:test], imagefolder:DIR, npz:FILE, cifar:DIR, hf:DIR, webdataset:GLOB, "
        "module:MOD:ATTR, with ?size=..&views=.. options (kd.core.data.open_source); token datasets "
        "(one record per sequence): text:DIR|FILE, jsonl:FILE, hf:DIR?text=COL, tokens:IDS.npy (pre-tokenised), "
        "with ?block=&pack=&tokenizer=.",
    ),
    codec: str = typer.Option(
        "fp32",
        help="fp32, fp16, bf16, int8, q8, q4, topk:K, sample:K[xR], rand:M, pca:K[bB] or pca:K@N "
        "(low-rank basis; @N: N bits in all over K coefficients, allocated by their spread).",
    ),
    basis: Path | None = typer.Option(
        None, help="pca:K: use this saved LowRankBasis file (shards share one) instead of fitting one."
    ),
    temperature: float | None = typer.Option(
        None,
        help="Training T the sparse codecs are made for: topk:K, rand:M, q8/q4 are exact at it; sample:K draws at it "
        "(Anshumann et al.: 1) [1].",
    ),
    views: int = typer.Option(
        1, help="Augmented views per sample (seeded; 1 = the plain samples); each view's params are stored."
    ),
    shard: str | None = typer.Option(
        None, help="I/N: samples i % N == I into OUT/shard-IIIII-of-NNNNN (torchrun: rank)."
    ),
    by_reference: str | None = typer.Option(None, help="Send keys, not pixels: the dataset name on the server."),
    batch_size: int = typer.Option(256, help="Samples per teacher forward (and per request to a server)."),
    commit_every: int = typer.Option(4096, help="Records per LMDB transaction (a kill loses at most these)."),
    feature: list[str] = typer.Option(
        [],
        help="Also store this teacher layer's output (fp16), or a statistic of it: LAYER@at, LAYER@fsp:OTHER, "
        "LAYER@nst, LAYER@adain, LAYER@pool (kd/core/reductions.py); of a token teacher, a module giving hidden "
        "states [B, S, D] (for kd train-lm --feature). Repeatable.",
    ),
    pool_features: bool = typer.Option(False, help="Store features globally average-pooled."),
    device: str = typer.Option("cpu", help="Device for a local: teacher."),
    workers: int | None = typer.Option(
        None, help="DataLoader worker processes that decode the samples [min(4, CPUs); 0 = in this process]."
    ),
    mean: str | None = typer.Option(
        None,
        help="local: teacher's per-channel mean of pixels in [0, 1] (as kd serve --mean); views are also "
        "resized to its input shape.",
    ),
    std: str | None = typer.Option(None, help="local: teacher's per-channel std (as kd serve --std)."),
    server_timeout: float = typer.Option(
        60.0,
        help="With a server: source: seconds the first contact with the server, one request, or a stream's wait for "
        "its next answer may take before the run fails naming the server (an unreachable or stalled server "
        "otherwise blocks it); raise it for a teacher whose forward takes longer.",
    ),
) -> None:
    """Run a dataset through a teacher and store its soft targets in an LMDB cache (resumable)."""
    from kd.cache import CacheError
    from kd.core.data import open_source, worker_error_message
    from kd.precompute import BasisError
    from kd.precompute import precompute as run
    from kd.student_trainer.sources import parse_source

    if source.startswith("cache:"):
        _fail("precompute needs a teacher: server:... or local:...")
    if temperature is not None and not 0 < temperature < float("inf"):  # NaN fails both comparisons
        _fail(f"--temperature must be a finite number > 0, got {temperature}")
    if by_reference and not source.startswith("server:"):
        _fail("--by-reference needs a server: source")
    if (mean or std) and not source.startswith("local:"):
        _fail("--mean/--std are a local: teacher's normalisation; a server applies its own (kd serve --mean/--std)")
    # Options that the source or the other options would ignore without a word (a server's teacher runs
    # on the server's device; a local: teacher has no server to wait for; pooling pools --feature's maps).
    if device != "cpu" and not source.startswith("local:"):
        _fail(f"--device {device} is a local: teacher's device; a server runs its teacher where kd serve put it")
    if pool_features and not feature:
        _fail("--pool-features pools the maps of --feature: give --feature LAYER, or leave it out")
    if batch_size < 1 or commit_every < 1:
        _fail(f"--batch-size and --commit-every must be >= 1, got {batch_size} and {commit_every}")
    if views < 1:  # named here, before the data is opened (the cache's own check says "cache views")
        _fail(f"--views must be >= 1 (1: the plain samples), got {views}")
    if not (math.isfinite(server_timeout) and server_timeout > 0):
        _fail(f"--server-timeout {server_timeout}: give a number of seconds > 0")
    _server_flag_unused(ctx, "server_timeout", [source])
    # a server's client, as kd train's: reaching it, each request and each stream wait bounded alike
    timeouts = {"timeout": server_timeout, "stream_timeout": server_timeout, "connect_timeout": server_timeout}
    which = _shard_of(shard)  # --shard I/N, or this torchrun rank's: checked before the data is read
    import os

    if "LOCAL_RANK" in os.environ:  # a torchrun rank: its own GPU for a local: teacher, not all on cuda:0
        device = rank_device(device, int(os.environ["LOCAL_RANK"]))
    try:
        data = open_source(dataset)
    except (CacheError, ValueError, RuntimeError) as e:
        _fail(str(e))
    try:
        basis_raw = None if basis is None else basis.read_bytes()
    except OSError as e:
        _fail(f"--basis {str(basis)!r}: {e}")
    if out.exists() and not out.is_dir():
        _fail(f"--out {str(out)!r} is a file, not a cache directory")
    if not out.exists():  # can it be made? (made for good once the data and the teacher are checked)
        try:
            _probe_mkdir(out)
        except OSError as e:
            _fail(f"--out {str(out)!r}: cannot create the cache directory ({e.strerror or e})")
    from kd.core.tokens import TokenSource, refuse_no_samples

    if isinstance(data, TokenSource):  # a token dataset: one record per sequence, a token teacher
        try:  # a file shorter than one block: named here, not as the cache's "dataset_size ... 0"
            refuse_no_samples(data, "--dataset")
        except ValueError as e:
            _fail(str(e))
        unused = {"--views": views != 1, "--by-reference": bool(by_reference),
                  "--pool-features": pool_features}  # fmt: skip
        if [k for k, v in unused.items() if v]:
            _fail(f"{', '.join(k for k, v in unused.items() if v)}: not for token datasets (one record per sequence)")
        # Sequences are split as samples are (`which`): under torchrun each rank fills its own shard,
        # not the whole corpus N times into one environment.
        return _precompute_tokens(data, source, out, codec, temperature, batch_size, commit_every, device, basis_raw,
                                  basis, timeouts, which, feature)  # fmt: skip
    try:
        kwargs: dict = {}
        if source.startswith("local:"):
            kwargs = {"device": device, "mean": _floats(mean, "--mean"), "std": _floats(std, "--std")}
        if by_reference:
            kwargs = {"dataset": by_reference, "num_views": views}
        if source.startswith("server:"):
            kwargs |= timeouts
        signals = _stop_signals()
        try:
            with parse_source(source, **kwargs) as src:
                report = run(data, src, out, codec=codec, batch_size=batch_size, views=views,
                             temperature=temperature, shard=which, commit_every=commit_every, features=feature,
                             pool_features=pool_features, workers=workers, basis=basis_raw,
                             stop=signals.first)  # fmt: skip
        finally:
            signals.close(restore_handlers=True)
    except BasisError as e:  # the file's fault: name it
        _fail(f"--basis {str(basis)!r}: {e}")
    except (CacheError, ValueError, RuntimeError, OSError) as e:  # OSError: a full disk, a file gone
        _fail(worker_error_message(e))  # a DataLoader worker's error: its own message, not torch's wrapping
    if report.stopped:
        _stopped_exit(report.stopped, f"{report.written} more records committed to {report.path} "
                      f"({report.skipped} were already there); run the same command again to resume")  # fmt: skip
    console.print(
        f"wrote {report.written}, skipped {report.skipped} already cached, {report.bytes_per_sample} B/sample, "
        f"{report.seconds:.1f}s -> {report.path}",
        highlight=False,
    )


def _shard_of(shard: str | None) -> tuple[int, int] | None:
    """``--shard I/N``, else the torchrun rank and world size, else None (one environment)."""
    from kd.cache.sharded import parse_shard
    from kd.precompute import torchrun_shard

    try:
        return parse_shard(shard) if shard else torchrun_shard()
    except ValueError as e:
        _fail(f"--shard: {e}")


def _precompute_tokens(data, source: str, out: Path, codec: str, temperature: float | None, batch_size: int,
                       commit_every: int, device: str, basis: bytes | None = None,
                       basis_path: Path | None = None, client_options: dict | None = None,
                       shard: tuple[int, int] | None = None, features: list[str] | None = None) -> None:  # fmt: skip
    """``kd precompute`` of a token dataset: a token teacher (``kd.precompute.token_teacher``)
    asked only for what ``codec`` keeps, one record per sequence (with ``features``' hidden states)."""
    from kd.cache import CacheError
    from kd.precompute import BasisError, precompute_tokens, token_teacher

    try:
        teacher = token_teacher(source, device=device, **(client_options or {}))
        signals = _stop_signals()
        try:
            report = precompute_tokens(data, teacher, out, codec=codec, batch_size=batch_size,
                                       temperature=temperature, commit_every=commit_every, progress=True,
                                       basis=basis, shard=shard, stop=signals.first,
                                       features=features or ())  # fmt: skip
        finally:
            signals.close(restore_handlers=True)
            if hasattr(teacher, "close"):
                teacher.close()
        from kd.cache import CacheReader

        stats = CacheReader(report.path).token_stats()  # this run's environment (its shard)
    except BasisError as e:  # the file's fault: name it
        _fail(f"--basis {str(basis_path)!r}: {e}")
    except (CacheError, ValueError, RuntimeError, OSError) as e:
        _fail(str(e))
    if report.stopped:
        _stopped_exit(report.stopped, f"{report.written} more sequences committed to {report.path} "
                      f"({report.skipped} were already there); run the same command again to resume")  # fmt: skip
    # A shard past the last sequence (more torchrun ranks than sequences) holds none: no "nan B/token".
    size = f"{stats['bytes_per_token']:.1f} B/token" if stats["positions"] else "no sequence in this shard"
    console.print(
        f"wrote {report.written}, skipped {report.skipped} already cached sequences, "
        f"{size} ({int(stats['positions'])} positions), {report.seconds:.1f}s -> {report.path}",
        highlight=False,
    )


def _train_config(ctx: typer.Context, value: Path | None) -> Path | None:
    """``--config FILE``: every ``kd train`` option from a TOML or YAML table; options
    given on the command line win. Keys are option names (``batch-size`` or ``batch_size``).

    ``opt`` is a table of the config's ``method``'s options, or a table of such tables keyed by
    method (``opt: {kd: {temperature: 4}, dkd: {...}}``): then a ``--method`` given on the command
    line takes its own entry (none: its defaults). A plain table is for the config's method only:
    ``train`` refuses it under another ``--method`` (see ``_config_method_options``)."""
    if value is None:
        return value
    from kd.teacher_server.config import ConfigError, read_table

    # Refusals here are kd's one-line "error:" (exit 2), not click's usage block.
    try:
        table = read_table(value)
    except ConfigError as e:
        _fail(f"--config: {e}")
    params = {p.name: p for p in ctx.command.params}
    values: dict[str, object] = {}
    spelled: dict[str, str] = {}
    for k, v in table.items():
        key = str(k).replace("-", "_")
        if key in spelled:  # batch-size and batch_size both: one would be dropped without a word
            _fail(f"--config {str(value)!r}: {spelled[key]!r} and {str(k)!r} are the same option; give it once")
        spelled[key], values[key] = str(k), v
    unknown = sorted(set(values) - set(params))
    if unknown:
        _fail(f"--config {str(value)!r}: unknown option(s) {unknown}; see `kd {ctx.info_name} --help`")
    if "config" in values:  # read before this file's values: it would be ignored
        _fail(f"--config {str(value)!r}: config cannot name another config file; give one --config")
    if "resume" in values:  # a file reused by every run of a recipe: each new run would resume (or fail)
        _fail(f"--config {str(value)!r}: resume is not a recipe setting (it continues one run directory): "
              "leave it out of the file and give --resume on the command line")  # fmt: skip
    opt = values.pop("opt", None)
    if opt is not None and not isinstance(opt, (dict, list, str)):
        _fail(f"--config {str(value)!r}: opt must be a table of method options (opt: {{temperature: 4}}) or a "
              f"list of key=value strings, got {opt!r}")  # fmt: skip
    ctx.meta["kd_config_path"] = str(value)
    if isinstance(opt, dict) and any(isinstance(v, dict) for v in opt.values()):  # keyed by method
        from kd.student_trainer.losses import METHODS

        bad = sorted(str(k) for k, v in opt.items() if not isinstance(v, dict) or k not in METHODS)
        if bad:
            _fail(f"--config {str(value)!r}: opt keyed by method must map method names to tables of their "
                  f"options; not such: {bad}")  # fmt: skip
        ctx.meta["kd_config_opt_by_method"] = {
            m: [f"{k}={json.dumps(v)}" for k, v in table.items()] for m, table in opt.items()
        }
    elif opt is not None:
        if isinstance(opt, dict):  # a table of the config's method's options
            opt = [f"{k}={json.dumps(v)}" for k, v in opt.items()]
        # merged with the command line's --opt in train (which wins key by key)
        ctx.meta["kd_config_opt"] = [opt] if isinstance(opt, str) else list(opt)
        # A file without `method` trains the command's default method: its table is that one's.
        default = next((p.default for p in ctx.command.params if p.name == "method"), None)
        ctx.meta["kd_config_opt_method"] = values.get("method", default)
    # A repeatable option (--source, --match, --combiner-opt) written once as a plain string
    # (`source = "cache:X"`) is one entry: click iterates a default_map value of a multiple
    # option, and a string is refused ("Value must be an iterable"), not split into characters.
    multiple = {p.name for p in ctx.command.params if getattr(p, "multiple", False)}
    for key in multiple & set(values):
        if isinstance(values[key], str):
            values[key] = [values[key]]
    if isinstance(values.get("milestones"), list):  # milestones: [150, 180, 210]
        values["milestones"] = ",".join(str(m) for m in values["milestones"])
    for key, v in values.items():
        _check_config_value(ctx, params[key], v, value)
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


def _check_config_value(ctx: typer.Context, param, v: object, path: Path) -> None:
    """A --config value the option takes, checked here so that a refusal names the file and the key
    (click's own check came later as "Invalid value for '--epochs'", an option the user never typed)."""
    where = f"--config {str(path)!r}: {param.name.replace('_', '-')}"
    if v is None:  # YAML's `epochs:` or `~`: the option's default was used without a word
        _fail(f"{where} has no value; give one or leave the key out")
    flag = bool(getattr(param, "is_flag", False))
    if flag != isinstance(v, bool):  # `epochs = true` trained 1 epoch; `progress = "no"` is not a boolean
        _fail(f"{where} must be {'true or false' if flag else 'a ' + _config_kind(param)}, got {v!r}")
    if isinstance(v, list) and not getattr(param, "multiple", False):
        _fail(f"{where} takes one value, got the list {v!r}")
    try:
        param.process_value(ctx, v)
    except Exception as e:  # noqa: BLE001 - click's BadParameter (typer vendors its own click)
        _fail(f"{where}: {getattr(e, 'message', None) or e} (got {v!r})")


def _config_kind(param) -> str:
    """'number', 'whole number' or 'string': what an option of the command line takes, for a message."""
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    return {int: "whole number", float: "number"}.get(annotation, "string")


def _config_method_options(ctx: typer.Context, method: str) -> list[str]:
    """The ``--config`` file's method options that apply to ``method``.

    A plain ``opt`` table belongs to the file's ``method``: under another ``--method`` its keys
    mean something else (kd's alpha 0.9 became DKD's TCKD weight without a word) or do not exist,
    so that is refused, naming the options and their method. Options keyed by method give
    ``method`` its own entry, or none (its defaults)."""
    by_method = ctx.meta.get("kd_config_opt_by_method")
    if by_method is not None:
        return list(by_method.get(method, []))
    items = list(ctx.meta.get("kd_config_opt", []))
    owner = ctx.meta.get("kd_config_opt_method")
    if items and owner is not None and owner != method:
        path = ctx.meta.get("kd_config_path")
        keys = sorted(_parse_options(items))
        _fail(f"--config {path!r} sets method options {keys} for its method {owner!r}, not for --method "
              f"{method!r}: leave --method out, or key the file's opt by method (opt: {{{owner}: {{...}}, "
              f"{method}: {{...}}}}) and give {method}'s there or with --opt")  # fmt: skip
    return items


def _build_student(spec: str):
    """``module:factory[@WEIGHTS][?key=value&...]`` -> the student (kd.core.factory; errors say "student")."""
    from kd.core import factory

    parsed = factory.parse_factory(spec, "student")
    model = factory.call_factory(parsed.factory, parsed.arguments, "student")
    if parsed.weights is not None:
        from kd.teacher_server.loading import TeacherLoadError, read_state_dict

        try:
            model.load_state_dict(read_state_dict(Path(parsed.weights)), strict=True)
        except RuntimeError as e:
            if isinstance(e, TeacherLoadError):
                raise
            # load_state_dict's mismatch report spans lines (missing, unexpected, size mismatch):
            # one line here, naming the file, so every caller refuses it with one error line
            why = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
            raise TeacherLoadError(f"weights file {parsed.weights!r} does not fit the student "
                                   f"{parsed.factory!r}: {why}") from None  # fmt: skip
    return model


def _train_and_val(dataset: str, val_dataset: str | None, command: str = "kd train"):
    """``kd train``'s training and evaluation sources, opened by URI (``kd.core.data.open_source``).

    The evaluation split is the user's to name: only the bundled digits have a known test
    split (``digits:test``, with the training URI's options), so any other dataset without
    ``--val-dataset`` is refused up front rather than trained without a validation number.
    """
    from kd.core.data import open_source, split_uri

    fmt, _, opts = split_uri(dataset)
    if val_dataset is None:
        if fmt != "digits":
            _fail(f"--val-dataset URI is required with --dataset {dataset!r}: the split to report top-1/top-5 on "
                  "(e.g. imagefolder:DIR/val); only digits defaults to its test split")  # fmt: skip
        query = "&".join(f"{k}={v}" for k, v in opts.items() if k != "split")
        val_dataset = "digits:test" + (f"?{query}" if query else "")
    try:
        train_data, val_data = open_source(dataset), open_source(val_dataset)
    except ValueError as e:
        _fail(str(e))
    from kd.core.tokens import TokenSource

    # A token dataset's samples are sequences with per-token targets, not one class label: the
    # classifier trainers would fail deep inside on the shapes ("Expected target size [4, 259]").
    for flag, d in (("--dataset", train_data), ("--val-dataset", val_data)):
        if isinstance(d, TokenSource):
            _fail(f"{flag} {d.dataset_id} is a token dataset: {command} trains classifiers (one label per sample); "
                  "distil a language model with `kd train-lm` (from a token cache, a served token teacher or one in "
                  "process) or `kd onpolicy` (on its own samples, against a served token teacher)")  # fmt: skip
    # Labels are class positions: a val folder missing a class would shift every later label.
    names, val_names = list(train_data.class_names), list(val_data.class_names)
    named = val_names != [str(c) for c in range(len(val_names))]
    if val_data.num_classes > train_data.num_classes or (named and val_names != names):
        _fail(f"--val-dataset {val_dataset!r} has classes {val_names[:10]}{' ...' if len(val_names) > 10 else ''}"
              f" but --dataset {dataset!r} has {names[:10]}{' ...' if len(names) > 10 else ''}; "
              "both must hold the same classes")  # fmt: skip
    return train_data, val_data


def _milestones(milestones: str) -> list[int]:
    """``--milestones`` (comma-separated epochs) as integers; anything else exits 2 naming the flag."""
    try:
        return [int(m) for m in milestones.replace(" ", "").split(",") if m]
    except ValueError:
        _fail(f"--milestones must be comma-separated epochs like 150,180,210, got {milestones!r}")


# The training-recipe flags of kd train, chain, datafree, onpolicy and train-lm, declared once here (they
# were declared in each command, where their spelling, defaults and checks could drift apart): name ->
# (type, default, option declarations, help). A command states only where its own differ (_recipe_flags):
# a default, a help that names its own units (passes, rounds, optimizer steps), --no-FLAG spellings.
RECIPE_FLAGS: dict[str, tuple[type, object, tuple[str, ...], str]] = {
    "lr": (float, 1e-3, (), "The student's base learning rate (see --schedule, --warmup-epochs)."),
    "weight_decay": (float, 0.0, (), "Weight decay (adam: L2 in the gradient; adamw: decoupled; sgd)."),
    "optimizer": (str, "adam", (), "adam, adamw, sgd or dot (DOT, split momenta)."),
    "momentum": (float, 0.9, (), "sgd: momentum."),
    "nesterov": (bool, False, ("--nesterov",), "sgd: Nesterov momentum."),
    "schedule": (str, "constant", (),
                 "constant, cosine or linear (per step, to 0 at the end) or multistep (per epoch)."),
    "milestones": (str, "", (), "multistep: epochs (from 0) at which lr is multiplied by --gamma."),
    "gamma": (float, 0.1, (), "multistep: the factor at each milestone."),
    "warmup_epochs": (float, 0.0, (), "Linear warm-up of the learning rate over this many epochs."),
    "amp": (str, "fp32", (), "fp32, bf16 or fp16 (autocast; fp16 with a grad scaler). CUDA; bf16 on CPU."),
    "channels_last": (bool, False, ("--channels-last",), "Channels-last memory format (CUDA convnets)."),
    "clip_grad_norm": (float, 0.0, (), "Clip the gradients' total norm to this (0: off)."),
}  # fmt: skip


def _recipe_flags(after: str, order: tuple[str, ...] = tuple(RECIPE_FLAGS),
                  **changes: dict[str, object]) -> Callable[[Callable[..., None]], Callable[..., None]]:  # fmt: skip
    """A decorator giving a command the recipe flags of ``RECIPE_FLAGS`` named in ``order`` (all by
    default), placed after its option ``after`` (their place in --help), each with its ``changes``
    (``default``, ``help``, ``decls``). The command takes their values as one keyword-only argument
    ``recipe`` (name -> value), which ``_recipe`` turns into the validated recipe."""
    import functools
    import inspect

    unknown = set(changes) - set(order) | set(order) - set(RECIPE_FLAGS)
    unknown |= {key for change in changes.values() for key in change} - {"default", "help", "decls"}
    if unknown:  # a misspelt change would leave the flag as declared above without a word
        raise TypeError(f"_recipe_flags: not recipe flags of this command, or not a change: {sorted(unknown)}")

    def decorate(fn: Callable[..., None]) -> Callable[..., None]:
        sig = inspect.signature(fn, eval_str=True)  # the annotations as types: typer reads them from here
        params = [p for p in sig.parameters.values() if p.name != "recipe"]
        at = next(i for i, p in enumerate(params) if p.name == after) + 1
        flags = []
        for name in order:
            kind, default, decls, help_text = RECIPE_FLAGS[name]
            change = changes.get(name, {})
            option = typer.Option(change.get("default", default), *change.get("decls", decls),
                                  help=change.get("help", help_text))  # fmt: skip
            flags.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=option,
                                           annotation=kind))  # fmt: skip

        @functools.wraps(fn)
        def command(**kwargs: object) -> None:
            return fn(**{k: v for k, v in kwargs.items() if k not in order}, recipe={n: kwargs[n] for n in order})

        command.__signature__ = sig.replace(parameters=[*params[:at], *flags, *params[at:]])
        command.__annotations__ = {p.name: p.annotation for p in command.__signature__.parameters.values()}
        return command

    return decorate


def _recipe(flags: dict[str, object], ctx: typer.Context | None = None, *,
            validate: bool = True) -> dict[str, object]:  # fmt: skip
    """The recipe flags (``_recipe_flags``' ``recipe``) as ``TrainConfig`` fields (--milestones as
    integers), checked before any work starts; a bad one exits 2 naming it. With ``ctx``, flags that the
    optimiser or schedule would ignore are refused first (``_inert_recipe_flags``; a --config value
    overridden so is reset). ``validate`` False: the command's own config validates them (kd onpolicy)."""
    from kd.student_trainer.optim import recipe_of
    from kd.student_trainer.train import TrainConfig

    recipe = dict(flags)
    if ctx is not None:
        recipe.update(_inert_recipe_flags(ctx, str(recipe["optimizer"]), str(recipe["schedule"])))
    recipe["milestones"] = _milestones(str(recipe["milestones"]))
    if validate:
        try:
            recipe_of(TrainConfig(**recipe)).validate()
        except ValueError as e:
            _fail(str(e))
    return recipe


def _server_flag_unused(ctx: typer.Context, name: str, refs: list[str | None]) -> None:
    """Refuse a server-only option (--server-timeout) set on the command line or in --config when no
    teacher is a server (cache:, local:): it would be ignored without a word, as kd refuses
    --server-topk then and any recipe flag the run would not use (_inert_recipe_flags)."""
    given = getattr(ctx.get_parameter_source(name), "name", None) in ("COMMANDLINE", "ENVIRONMENT", "DEFAULT_MAP")
    named = [r for r in refs if r]
    if given and not any(r.startswith("server:") for r in named):
        _fail(f"--{name.replace('_', '-')} applies only with a server: teacher; got {', '.join(named) or 'none'}: "
              "it would be ignored")  # fmt: skip


def _option_source(ctx: typer.Context, name: str) -> str | None:
    """Where option ``name``'s value came from: "command line" (or the environment), "config" (a
    --config file), or None (its default), for refusing an option that the others make unused."""
    # by name: typer's context may come with its own copy of click's ParameterSource enum
    given = getattr(ctx.get_parameter_source(name), "name", None)
    if given in ("COMMANDLINE", "ENVIRONMENT"):
        return "command line"
    return "config" if given == "DEFAULT_MAP" else None


def _inert_recipe_flags(ctx: typer.Context, optimizer: str, schedule: str) -> dict[str, object]:
    """Refuse recipe flags that the chosen optimiser or schedule would ignore without a word:
    --milestones/--gamma without --schedule multistep (config.json recorded them, the rate stayed
    constant) and --momentum with adam/adamw (byte-identical weights for any value), as --nesterov
    with adam is refused. A value from --config whose optimiser or schedule the command line
    replaced does not apply to it: dropped (back to its default) with a note, not refused, since
    a file's momentum cannot be unset from the command line. Returns the flags to reset."""
    config = ctx.meta.get("kd_config_path")

    def source(name: str) -> str | None:
        return _option_source(ctx, name)

    reset: dict[str, object] = {}
    inert = []
    if schedule != "multistep":
        needs = f"--schedule multistep (the schedule is {schedule})"
        # milestones: its default "" is no milestone, so only a non-empty value is one that is ignored
        inert += [(n, "--schedule", needs) for n in ("milestones", "gamma")
                  if source(n) and (n != "milestones" or ctx.params.get(n))]  # fmt: skip
    if optimizer in ("adam", "adamw") and source("momentum"):
        inert.append(("momentum", "--optimizer", f"--optimizer sgd or dot ({optimizer} has no momentum)"))
    for name, governing, needs in inert:
        flag = "--" + name.replace("_", "-")
        if source(name) == "config" and source(governing[2:]) == "command line":
            console.print(
                f"note: {flag} from --config {config!r} does not apply with the command line's "
                f"{governing} {ctx.params.get(governing[2:])}; left out",
                highlight=False,
                soft_wrap=True,
            )
            reset[name] = next(p.default for p in ctx.command.params if p.name == name)
            continue
        where = f" (set in --config {config!r})" if source(name) == "config" else ""
        _fail(f"{flag}{where} applies only with {needs}: it would be ignored")
    return reset


@app.command()
@_recipe_flags(
    "batch_size",
    lr={"default": 3e-3, "help": "Base learning rate (see --schedule, --warmup-epochs)."},
    nesterov={"decls": ("--nesterov/--no-nesterov",)},
    milestones={"help": "multistep: epochs (from 0) at which lr is multiplied by --gamma, e.g. 150,180,210."},
    channels_last={"decls": ("--channels-last/--no-channels-last",)},
)
def train(
    ctx: typer.Context,
    config: Path | None = typer.Option(
        None, is_eager=True, callback=_train_config, help="TOML/YAML file of these options (the command line wins)."
    ),
    source: list[str] = typer.Option(
        [],
        help="cache:PATH, server:HOST:PORT[,HOST:PORT...][/TEACHER] or local:SPEC (not needed for ce). "
        "Repeat for several teachers, merged by --combiner.",
    ),
    combiner: str = typer.Option(
        "mean",
        help="How several sources' targets merge: mean (of probabilities), mean-logits, weighted, confidence, "
        "ae-kd or 1909.08097 (student_trainer/multi.py).",
    ),
    combiner_opt: list[str] = typer.Option([], help="Combiner option key=value (e.g. weights=[1,2]). Repeatable."),
    method: str = typer.Option("kd", help="A method from `kd methods`."),
    opt: list[str] = typer.Option([], "--opt", help="Method option key=value, e.g. --opt temperature=4. Repeatable."),
    server_topk: int = typer.Option(
        0,
        help="With --source server:...: ask only for the top K logits (+ the log-sum-exp at the method's "
        "temperature), made next to the model, instead of all C; for methods that accept sparse targets (kd).",
    ),
    server_timeout: float = typer.Option(
        60.0,
        help="With server: sources: seconds the first contact with a server, one request, or a stream's wait for "
        "its next answer may take before the run fails naming the server (an unreachable or stalled server "
        "otherwise blocks it); raise it for a teacher whose forward takes longer.",
    ),
    match: list[str] = typer.Option(
        [], help="Feature methods: STUDENT_LAYER=TEACHER_LAYER (module paths; 'logits' = the output). Repeatable."
    ),
    dataset: str = typer.Option(
        "digits",
        help="Training dataset URI: digits[:test], imagefolder:DIR, npz:FILE, cifar:DIR, hf:DIR, webdataset:GLOB, "
        "module:MOD:ATTR, with ?size=..&views=.. options (kd.core.data.open_source).",
    ),
    val_dataset: str | None = typer.Option(
        None,
        help="Dataset URI to evaluate on (top-1 and top-5) after every epoch; required except for digits, "
        "whose default is its test split.",
    ),
    student: str = typer.Option("kd.models:digits_student", help="module:factory of the student."),
    subset: int = typer.Option(0, help="Train on the first N samples of a seeded permutation (0 = all)."),
    views: int = typer.Option(1, help="Replay one of this many seeded augmented views per sample and step."),
    read_through: str | None = typer.Option(
        None, help="With --source cache:PATH: compute misses with this source (server:... or local:...) and store them."
    ),
    codec: str = typer.Option("fp32", help="Codec of a cache created by --read-through."),
    prefetch: int = typer.Option(0, help="cache: source: read this many batches ahead in a thread (spare cores)."),
    epochs: int = typer.Option(60, help="Passes over the training set."),
    batch_size: int = typer.Option(32, help="Samples per optimiser step (under torchrun: the global batch)."),
    workers: int = typer.Option(0, help="Read training batches in this many worker processes (file datasets)."),
    input_size: int = typer.Option(
        0,
        help="The student's own resolution: views (and evaluation samples) resized to NxN on the device "
        "(the teacher keeps its own; one cache serves any size). 0: the views' size.",
    ),
    input_mean: str | None = typer.Option(None, help="The student's own per-channel mean (pixels in [0, 1])."),
    input_std: str | None = typer.Option(None, help="The student's own per-channel std."),
    seed: int = typer.Option(0, help="Seed of the student's initial weights, each epoch's order and --subset's draw."),
    device: str = typer.Option("cpu", help="Device of the student (and of a local: teacher): cpu, cuda or cuda:N."),
    out: Path | None = typer.Option(None, help="Save the student's weights here: a file named *.safetensors."),
    run_dir: Path | None = typer.Option(
        None, help="Write config.json, metrics.csv and a checkpoint per epoch here (see `kd plot`)."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue from --run-dir's checkpoint (exact resume)."),
    progress: bool = typer.Option(
        False, "--progress/--no-progress", help="A progress bar with samples/s and target wait time."
    ),
    keep_every: int = typer.Option(
        0, help="Also keep the weights every N epochs as RUN_DIR/epochs/epoch_NNNN.safetensors (for `kd explain`)."
    ),
    *,
    recipe: dict[str, object],
) -> None:
    """Train a student from a soft-target source with a KD method."""
    import os

    # The config's method options (kept out of click's default_map, which a command-line --opt would
    # replace as a whole) first, so the command line's --opt wins key by key and the rest stay.
    # (each list's keys unique: _parse_options refuses a key given twice in one place)
    given = _parse_options(opt)
    opt = [*(i for i in _config_method_options(ctx, method) if i.partition("=")[0] not in given), *opt]

    if keep_every and run_dir is None:
        _fail("--keep-every needs --run-dir")
    if resume and run_dir is None:
        _fail("--resume continues the run in --run-dir: give --run-dir")
    if prefetch < 0:
        _fail(f"--prefetch must be >= 0 (batches read ahead), got {prefetch}")
    if epochs < 1 or batch_size < 1:
        _fail(f"--epochs and --batch-size must be >= 1, got {epochs} and {batch_size}")
    if subset < 0:
        _fail(f"--subset must be >= 0 (0: all samples), got {subset}")
    if views < 1:  # 0 or negative was recorded in config.json and trained as 1
        _fail(f"--views must be >= 1 (1: the plain samples), got {views}")
    # Options that the sources would ignore without a word (each trained as if it had not been given).
    if codec != "fp32" and read_through is None:
        _fail(f"--codec {codec} is the codec of the cache --read-through creates; without --read-through it is unused")
    if len(source) < 2 and (combiner != "mean" or combiner_opt):
        _fail(f"--combiner/--combiner-opt merge several --source teachers; with {_count(len(source), 'source')} "
              "they would be ignored")  # fmt: skip
    if prefetch and not any(s.startswith("cache:") for s in source):
        _fail(f"--prefetch {prefetch} reads a cache: source ahead; these sources have none: {list(source)}")
    _check_run_options(seed, device)
    _check_out(out)

    import torch
    import torch.distributed as dist

    from kd.student_trainer.losses import FeatureMethod
    from kd.student_trainer.losses import get_method as _get_method

    try:
        feature_method = isinstance(_get_method(method), FeatureMethod)
    except ValueError as e:
        _fail(str(e))
    if out is not None and feature_method:  # the connectors are saved beside the student: writable too
        _check_out(connectors_path(out), "the connectors file of --out")

    from kd.student_trainer.sources import parse_source
    from kd.student_trainer.train import TrainConfig, seed_everything, train_student
    from kd.teacher_server.loading import TeacherLoadError

    recipe = _recipe(recipe, ctx)  # --momentum with adam, --milestones without multistep: refused
    if method.startswith("token-"):  # per-token losses take token data, which kd train does not
        _fail(f"--method {method!r} is a per-token loss: distil a language model with `kd train-lm` or `kd onpolicy`")
    try:  # before any source is opened: a bad --opt is the user's to fix, not a training run's
        _get_method(method).check_options(_parse_options(opt))
    except (TypeError, ValueError) as e:
        _fail(str(e))
    if not (math.isfinite(server_timeout) and server_timeout > 0):
        _fail(f"--server-timeout {server_timeout}: give a number of seconds > 0")
    _server_flag_unused(ctx, "server_timeout", [*source, read_through])
    from kd.cache.codecs import logit_offsets_lost, sparse_targets_of
    from kd.student_trainer.losses import logit_offsets_refusal, sparse_refusal
    from kd.student_trainer.sources import server_topk_lost, server_topk_sparse

    if server_topk < 0:
        _fail(f"--server-topk {server_topk}: needs K >= 1")
    if server_topk and not _get_method(method).needs_teacher:
        _fail(f"--server-topk {server_topk}: method {method!r} reads no teacher targets")
    # What the flags alone say of the targets, refused before any source is opened (a read-through
    # would create its cache first): lost logit offsets for a method that reads absolute logits, sparse
    # targets for one that needs dense logits. A cache: source's codec is read from its metadata later.
    asks_topk = server_topk > 0 and any(ref.startswith("server:") for ref in source)
    for refuse, of_server, of_codec in ((logit_offsets_refusal, server_topk_lost, logit_offsets_lost),
                                        (sparse_refusal, server_topk_sparse, sparse_targets_of)):  # fmt: skip
        said = [of_server(server_topk)] if asks_topk else []
        if read_through is not None and of_codec(codec) is not None:
            said.append(f"the read-through cache: {of_codec(codec)}")
        for what in said:
            if (refusal := refuse(method, _parse_options(opt), what, list(match))) is not None:
                _fail(refusal)
    # Only a server: source asks for top-K (next to the model): a cache holds what it was made with
    # (its codec; a read-through's upstream follows the cache's codec) and a local: teacher gives all
    # C logits, so --server-topk with neither a server: source would be dropped without a word.
    if server_topk and read_through is not None:
        _fail(f"--server-topk {server_topk} does not apply to --read-through: the cache's codec decides what is "
              f"asked and stored; create it with --codec topk:{server_topk}")  # fmt: skip
    if server_topk and not any(ref.startswith("server:") for ref in source):
        _fail(f"--server-topk {server_topk} applies only to --source server:...; got {source or 'no --source'}: "
              "a cache: source holds what its codec stored (precompute with --codec topk:K) and local: gives "
              "all logits")  # fmt: skip
    default_t = _get_method(method).defaults.get("temperature", 1.0)
    sparse_temperature = float(_parse_options(opt).get("temperature", default_t))  # type: ignore[arg-type]
    device, rank = _join_torchrun(device)  # under torchrun: DistributedDataParallel in train_student
    train_data, test_data = _train_and_val(dataset, val_dataset)
    if subset > len(train_data):  # the permutation's first N was all of it: trained on fewer, without a word
        _fail(f"--subset {subset} is larger than --dataset {train_data.dataset_id} "
              f"({_count(len(train_data), 'sample')})")  # fmt: skip
    seed_everything(seed)
    try:
        model = _build_student(student)
    except (TeacherLoadError, ValueError) as e:
        _fail(str(e))
    _check_saveable(model, out)
    from kd.chain import check_val_takes
    from kd.student_trainer.train import student_final

    # A student that cannot take --val-dataset's samples of another shape than --dataset's (evaluated after
    # epoch 1, it failed there with torch's shape error): refused before any source is opened (a --read-through
    # would create its cache first). Samples of the training shape are the training's checks' to name.
    own_input = TrainConfig(input_size=input_size, input_mean=_floats(input_mean, "--input-mean") or [],
                            input_std=_floats(input_std, "--input-std") or [])  # fmt: skip
    if len(test_data) and len(train_data) and test_data.get(torch.arange(1)).shape != train_data.get(
            torch.arange(1)).shape:  # fmt: skip
        _call(check_val_takes, model, test_data, f"--student {student!r}", train=train_data,
              test_name="--val-dataset", train_name="--dataset", final=student_final(own_input))  # fmt: skip

    # A server's client: reaching it, each request, and each wait of a stream for its next answer,
    # bounded alike (the connect wait was the client's own 60 s whatever --server-timeout said).
    timeouts = {"timeout": server_timeout, "stream_timeout": server_timeout, "connect_timeout": server_timeout}

    def open_source(ref: str):
        if ref.startswith("cache:"):
            return parse_source(ref, dataset_id=train_data.dataset_id, prefetch=prefetch)
        from kd.precompute import check_sample_shape

        if ref.startswith("server:") and server_topk:
            teacher = parse_source(ref, topk=server_topk, temperature=sparse_temperature, **timeouts)
        elif ref.startswith("server:"):
            teacher = parse_source(ref, **timeouts)
        else:
            teacher = parse_source(ref, **({"device": device} if ref.startswith("local:") else {}))
        try:  # samples the teacher cannot take: refused now, not at the first step inside the model
            check_sample_shape(train_data, teacher)
        except ValueError as e:
            _fail(str(e))
        return teacher

    src = None
    try:
        if read_through is not None:
            if len(source) != 1 or not source[0].startswith("cache:"):
                _fail("--read-through needs one --source cache:PATH")
            from kd.student_trainer.sources import ReadThroughSource

            # server: and local: as a --source of that kind opens them (timeouts, device).
            cached = read_through.startswith("cache:")
            upstream = parse_source(read_through) if cached else open_source(read_through)
            src = ReadThroughSource(source[0][len("cache:") :], upstream, train_data, codec=codec, views=views)
        elif len(source) == 1:
            src = open_source(source[0])
        elif len(source) > 1:
            from kd.student_trainer.losses import get_method
            from kd.student_trainer.multi import MultiTeacherSource

            # Mix at the loss's temperature, so softmax(targets / T) is the teachers' mixture at T.
            options = {"temperature": get_method(method).defaults.get("temperature", 1.0),
                       **{k: v for k, v in _parse_options(opt).items() if k == "temperature"},
                       **_parse_options(combiner_opt)}  # fmt: skip
            from kd.student_trainer.multi import COMBINERS

            if combiner in COMBINERS and "temperature" not in COMBINERS[combiner].options:
                options.pop("temperature")
            from kd.student_trainer.train import student_final

            # the combiner's student forward (ae-kd) sees the student's own input, as training does
            means, stds = _floats(input_mean, "--input-mean") or [], _floats(input_std, "--input-std") or []
            final = student_final(TrainConfig(input_size=input_size, input_mean=means, input_std=stds))
            members = [open_source(ref) for ref in source]
            try:  # members that cannot be combined (classes, views, sampled targets): refused before any step
                src = MultiTeacherSource(members, combiner, student=model, student_final=final, **options)
            except ValueError as e:
                for m in members:
                    m.close()
                _fail(str(e))
        from kd.student_trainer.train import check_logit_offsets, check_sample_temperature

        try:  # a cache's codec (or a mixture of teachers) that lost the logits' offsets: before any target is read
            check_logit_offsets(method, _parse_options(opt), src, list(match))
            # draws of a sample:K cache at another temperature than the loss's (it failed at the first step)
            check_sample_temperature(method, _parse_options(opt), src)
        except ValueError as e:
            _fail(str(e))
        sub = None
        if subset:
            sub = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(seed))[:subset]
        config = TrainConfig(
            method=method,
            method_options=_parse_options(opt),
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            device=device,
            views=views,
            matches=list(match),
            workers=workers,
            input_size=input_size,
            input_mean=_floats(input_mean, "--input-mean") or [],
            input_std=_floats(input_std, "--input-std") or [],
            **recipe,
        )
        from kd.student_trainer.evaluate import check_output_width
        from kd.student_trainer.train import student_final

        try:  # before any step: a student with another number of outputs than the data's classes
            check_output_width(model, train_data, f"--student {student!r}", final=student_final(config))
        except ValueError as e:
            _fail(str(e))
        hooks = None
        if keep_every and int(os.environ.get("RANK", "0")) == 0:
            from kd.explain import EpochSaver
            from kd.student_trainer.train import Hooks

            saver = EpochSaver(model, run_dir / "epochs", every=keep_every, last=epochs)
            if not resume:
                saver.save_initial()
            hooks = Hooks(on_epoch=saver)
        signals = _stop_signals()
        try:
            result = train_student(model, train_data, test_data, config, source=src, subset=sub, run_dir=run_dir,
                                   resume=resume, progress=progress, hooks=hooks, stop=signals.first)  # fmt: skip
        finally:
            signals.close(restore_handlers=True)
    except Exception as e:  # noqa: BLE001 - every failure here is the user's to read
        _fail(_error_text(e))
    finally:
        if src is not None:
            src.close()
    ranks = dist.get_world_size() if dist.is_initialized() else 1
    _leave_process_group()
    if result.stopped:  # every rank ends so (torchrun sees its workers exit, none killed)
        if rank != 0:
            raise SystemExit(128 + result.stopped)
        epoch, step = result.stopped_at or (0, 0)
        where = f"in epoch {epoch} after {step} step(s)"
        if run_dir is None:
            _stopped_exit(result.stopped, f"{where}; nothing saved (no --run-dir to resume from)")
        _stopped_exit(result.stopped, f"{where}; checkpoint in {run_dir}: run the same command with --resume "
                      "to continue")  # fmt: skip
    if rank != 0:
        return
    if out is not None:
        _save_student(model, out)
        if result.connectors is not None:  # a feature method's trained connectors, beside the student
            _save_student(result.connectors, connectors_path(out), "the connectors")
    from kd.student_trainer.train import evaluate as _evaluate
    from kd.student_trainer.train import student_final

    # The trained student on the evaluation split once more, for top-5 (the loop's last top-1 is the same).
    top5 = _evaluate(model, test_data, device=device, final=student_final(config)).get(5)
    console.print(
        f"top-1 {result.test_acc:.4f}"
        + (f", top-5 {top5:.4f}" if top5 is not None else "")
        + f" on {test_data.dataset_id} ({_count(len(test_data), 'sample')})",
        highlight=False,
    )
    print(
        json.dumps(
            {
                "method": method,
                "source": source,
                "dataset": train_data.dataset_id,
                "val_dataset": test_data.dataset_id,
                "test_acc": result.test_acc,
                "test_top5": top5,
                "epochs": epochs,
                "seconds": round(result.seconds, 2),
                "world_size": ranks,
            }
        )
    )


# The top-level names of kd's own code (installed as kd.*; a source checkout also imports the card's
# folders by their own names). Its factories never load weights: they only initialise.
_OWN_PACKAGES = ("kd", "student_trainer", "teacher_server")


def _check_evaluated_weights(spec: str) -> None:
    """``kd evaluate``'s model must be a trained one: one of kd's own factories (the zoo, kd.models)
    without ``@WEIGHTS`` only initialises, so its accuracy would be a random model's, reported as if
    it meant something. Another package's factory may build a pretrained model by itself (e.g.
    ``timm:create_model?pretrained=true``), so it is left to the user."""
    from kd.core import factory

    try:
        parsed = factory.parse_factory(spec, "model")
        if parsed.weights is not None:
            return
        fn = factory.import_factory(parsed.factory, "model")
    except factory.FactoryError as e:
        _fail(str(e))
    # the module that defines the factory, so a re-export of a zoo model under another name counts too
    module = getattr(fn, "__module__", None) or parsed.factory.partition(":")[0]
    if module.partition(".")[0] in _OWN_PACKAGES:
        name, query, opts = spec.partition("?")
        _fail(f"--model {spec!r} has no @WEIGHTS: kd's factory {parsed.factory!r} only initialises a model, so "
              f"its accuracy would be a random model's; give the trained weights, e.g. "
              f"--model '{name}@student.safetensors{query}{opts}'")  # fmt: skip


@app.command("evaluate")
def evaluate_model(
    model: str = typer.Option(
        ...,
        help="module:factory@WEIGHTS[?key=value&...] of a trained model (a student from `kd train --out`, "
        "or a teacher's SPEC as `kd serve` takes it).",
    ),
    dataset: str = typer.Option(..., help="Dataset URI of the evaluation split, e.g. imagefolder:DIR/val."),
    batch_size: int = typer.Option(256, help="Samples per forward."),
    workers: int = typer.Option(0, help="DataLoader worker processes that decode the samples (0 = in this process)."),
    device: str = typer.Option("cpu", help="Device of the model: cpu, cuda or cuda:N."),
    input_size: int = typer.Option(0, help="The model's resolution, as `kd train --input-size` (0: the samples')."),
    input_mean: str | None = typer.Option(None, help="The model's per-channel mean, as `kd train --input-mean`."),
    input_std: str | None = typer.Option(None, help="The model's per-channel std, as `kd train --input-std`."),
) -> None:
    """Top-1 and top-5 accuracy of a trained model on a dataset (your validation split)."""
    from kd.core import factory
    from kd.core.data import open_source
    from kd.student_trainer.evaluate import check_output_width, evaluate
    from kd.teacher_server.loading import TeacherLoadError

    if batch_size < 1 or workers < 0:
        _fail("--batch-size must be >= 1, --workers >= 0")
    _check_run_options(0, device)
    _check_evaluated_weights(model)
    try:
        data = open_source(dataset)
        net = _build_student(model)
        shape = factory.parse_factory(model, "model").input_shape  # only an explicit ?input_shape= reshapes
        net.to(device)
        from kd.student_trainer.train import TrainConfig, student_final

        final = student_final(TrainConfig(input_size=input_size, input_mean=_floats(input_mean, "--input-mean") or [],
                                          input_std=_floats(input_std, "--input-std") or []))  # fmt: skip
        try:  # before the whole split is read: a model with another number of outputs than its classes
            check_output_width(net, data, f"--model {model!r}", final=final, input_shape=shape)
        except ValueError as e:
            _fail(str(e))
        acc = evaluate(net, data, batch_size=batch_size, workers=workers, device=device, input_shape=shape,
                       final=final)  # fmt: skip
    except (TeacherLoadError, ValueError, RuntimeError, TypeError) as e:
        _fail(_error_text(e))
    top5 = acc.top5 if data.num_classes > 5 else None  # with <= 5 classes every class is in the top 5
    console.print(
        f"top-1 {acc.top1:.4f}" + (f", top-5 {top5:.4f}" if top5 is not None else "")
        + f" on {data.dataset_id} ({_count(acc.n, 'sample')})",
        highlight=False,
    )  # fmt: skip
    print(json.dumps({"model": model, "dataset": data.dataset_id, "top1": acc.top1, "top5": top5, "n": acc.n}))


# short_help here and below: click ends the one-line summary of `kd --help` at the first word ending
# in "." and listed "Compute Lopes et al." (likewise "QKD (Kim et al.").
@app.command(short_help="Lopes et al.'s activation records of a teacher.")
def records(
    ctx: typer.Context,
    teacher: str = typer.Option(..., help="The teacher as kd serve loads it: module:factory@WEIGHTS or local:SPEC."),
    out: Path = typer.Option(..., help="Records file to write (safetensors)."),
    layer: list[str] = typer.Option(
        ["logits"], help="Layer (module path) to record, or 'logits' for the output. Repeatable."
    ),
    dataset: str = typer.Option(
        "digits",
        help="Dataset URI of the real data the records summarise (it stays here): digits, imagefolder:DIR, "
        "npz:FILE, ... (kd.core.data.open_source); streamed in batches.",
    ),
    rank: int = typer.Option(8, help="Principal directions kept per class and layer (the spectral record)."),
    batch_size: int = typer.Option(256, help="Samples per teacher forward."),
    workers: int = typer.Option(0, help="DataLoader worker processes that decode the samples (0 = in this process)."),
    device: str = typer.Option("cpu", help="Device of the teacher: cpu, cuda or cuda:N."),
) -> None:
    """Compute Lopes et al. activation records of a teacher on its real data, for `kd serve --records`."""
    _check_file_out(out, "--out")
    from kd.core.data import open_source
    from kd.teacher_server.loading import TeacherLoadError, load_teacher
    from kd.teacher_server.records import compute_records, save_records

    spec = teacher.removeprefix("local:")
    try:
        with _stopped_politely("kd records"):
            t = load_teacher("teacher", spec, device=device)
            data = open_source(dataset)
            # a --rank the user gave above every layer's width is refused (the default 8 is cut to a narrow layer's)
            recs = compute_records(t, data, list(layer), rank=rank, batch_size=batch_size, workers=workers,
                                   strict_rank=_option_source(ctx, "rank") is not None)  # fmt: skip
            path = save_records(out, recs, t, data.dataset_id)
    except (TeacherLoadError, ValueError) as e:
        _fail(str(e))
    size = sum(v.numel() * v.element_size() for v in recs.values())
    console.print(f"wrote {path}: {len(layer)} layer(s), {size:,} bytes, from {_count(len(data), 'sample')}",
                  highlight=False)  # fmt: skip


@app.command()
def plot(run: Path = typer.Argument(..., help="A --run-dir of `kd train`.")) -> None:
    """Draw a run's metrics.csv (test accuracy and training loss per epoch) to RUN/curves.png."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = run / "metrics.csv"
    if not metrics.is_file():
        _fail(f"no metrics.csv in {str(run)!r}; train with `kd train --run-dir {run}`")
    rows = list(csv.DictReader(open(metrics)))
    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110)
    a.plot(epochs, [float(r["test_acc"]) for r in rows])
    a.set(xlabel="epoch", ylabel="test accuracy")
    b.plot(epochs, [float(r["train_loss"]) for r in rows], color="tab:orange")
    b.set(xlabel="epoch", ylabel="training loss")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.suptitle(str(run))
    fig.tight_layout()
    fig.savefig(run / "curves.png")
    console.print(f"wrote {run / 'curves.png'}", highlight=False)


@app.command()
def methods() -> None:
    """List the KD methods with their papers and default options."""
    from kd.student_trainer.losses import METHODS

    # "teacher logits": whether the loss sees them only up to a constant per row (softmax, ranks; q8/q4
    # and pca caches serve it too) or their absolute values (it needs full logits: fp32/fp16/bf16/int8
    # caches, servers without --server-topk, local teachers); a method whose options decide says so.
    # "sparse targets": whether the loss takes top-k / sampled / random-subset targets as they are
    # (topk:K, sample:K, rand:M caches, --server-topk; its accepts_sparse), or needs every class's logit;
    # "-": it reads no teacher targets. A feature method's S=logits match needs dense logits whatever it says.
    table = Table("method", "kind", "teacher logits", "sparse targets", "paper", "defaults")
    for name, m in sorted(METHODS.items()):
        kind = getattr(m, "kind", "logit")
        defaults = m.own_defaults if kind == "feature" else m.defaults
        if kind == "feature" and m.reduce:
            kind = f"feature (@{m.reduce})"
        targets = "up to a shift" if m.shift_invariant() else "absolute: full logits"
        if callable(m.teacher_logits_shift_invariant):
            targets += " (at the defaults; options decide)"
        sparse = "-" if not m.needs_teacher else "yes" if m.takes_sparse() else "no"
        if m.needs_teacher and callable(m.accepts_sparse):
            sparse += " (at the defaults; options decide)"
        table.add_row(name, kind, targets, sparse, m.paper, ", ".join(f"{k}={v}" for k, v in defaults.items()))
    Console().print(table)


@cache_app.command("info")
def cache_info(
    path: Path = typer.Argument(
        ..., help="The cache: a `kd precompute --out` directory, one environment or a directory of shards."
    ),
) -> None:
    """Print a cache's metadata, record count and size (a directory of shards counts as one)."""
    from kd.cache import CacheError
    from kd.cache.codecs import bytes_per_sample, covered_mass, index_bytes
    from kd.cache.sharded import keys_in_order, open_cache

    try:
        reader = open_cache(path)
    except CacheError as e:
        _fail(str(e))
    info = dict(vars(reader.meta))
    info["records"] = len(reader)
    info["bytes_per_sample"] = bytes_per_sample(reader.meta.codec, reader.meta.num_classes) + sum(
        reader.meta.feature_bytes.values()
    )
    # a token cache's states are per position (token), not per record
    info["feature_bytes_per_token" if reader.meta.per_token else "feature_bytes_per_sample"] = reader.meta.feature_bytes
    info["file_bytes"] = sum(f.stat().st_size for f in path.rglob("data.mdb"))
    if hasattr(reader, "shards"):
        info["shards"] = len(reader.shards)
    if reader.meta.per_token:  # one record per sequence: what a token costs
        stats = reader.token_stats()
        info["bytes_per_sample"] = round(stats["bytes"] / max(stats["sequences"], 1), 1)
        info.update(positions=stats["positions"], bytes_per_token=round(stats["bytes_per_token"], 3),
                    index_bytes=index_bytes(reader.meta.num_classes))  # fmt: skip
    if getattr(reader, "basis_bytes", 0):  # pca:K: the basis is stored once (per shard), amortised over the records
        info["basis_bytes"] = reader.basis_bytes
        unit, count = ("token", info["positions"]) if reader.meta.per_token else ("sample", info["records"])
        per = info[f"bytes_per_{unit}"] + reader.basis_bytes / max(count, 1)
        info[f"bytes_per_{unit}_with_basis"] = round(per, 3)
    if reader.meta.codec.startswith(("topk:", "rand:")) and info["records"]:
        # How much of the teacher's mass at the cache temperature the stored classes hold (first 1024 records).
        keys = list(itertools.islice(keys_in_order(reader), 1024))  # the first 1024 in key order, as sorted
        if reader.meta.per_token:
            t = reader.token_targets([i for i, _ in keys])
        else:
            t = reader.targets([i for i, _ in keys], [v for _, v in keys])
        mass = covered_mass(t)
        info["covered_mass"] = {"mean": round(float(mass.mean()), 6), "min": round(float(mass.min()), 6),
                                "temperature": reader.codec.temperature, "records": len(keys)}  # fmt: skip
    print(json.dumps(info, indent=2))


@cache_app.command("basis")
def cache_basis(
    path: Path = typer.Argument(..., help="The pca:K cache (see below)."),
    out: Path = typer.Argument(..., help="The basis file to write."),
) -> None:
    """Save a pca:K cache's checked low-rank basis to OUT, for `kd precompute --basis OUT` (shards share it).

    PATH: one environment, or a directory of shards (the first shard present: the one a
    sharded precompute runs first, which fits it)."""
    from kd.cache import CacheError
    from kd.cache.store import stored_basis

    env = path if (path / "data.mdb").is_file() else next(iter(sorted(path.glob("shard-*-of-*/data.mdb"))), None)
    if env is None:
        _fail(f"no cache at {str(path)!r}; create one with `kd precompute`")
    env = env if env == path else env.parent
    try:
        raw = stored_basis(env)  # checked: sha256 in the metadata, CRC, shape
    except CacheError as e:
        _fail(str(e))
    if raw is None:
        _fail(f"cache {str(env)!r} has no low-rank basis: only pca:K caches have one")
    try:
        out.write_bytes(raw)
    except OSError as e:
        _fail(f"cannot write the basis to {str(out)!r}: {e}")
    console.print(f"wrote the {len(raw)}-byte basis of {env} -> {out}", highlight=False)


@cache_app.command("verify")
def cache_verify(
    path: Path = typer.Argument(
        ..., help="The cache: a `kd precompute --out` directory, one environment or a directory of shards."
    ),
) -> None:
    """Check every record's checksum and the coverage; exit 1 on any problem."""
    from kd.cache import CacheError
    from kd.cache.sharded import open_cache

    try:
        report = open_cache(path).verify()
    except CacheError as e:
        _fail(str(e))
    for p in report.problems[:20]:
        console.print(f"[red]corrupt:[/] {p}", highlight=False)
    if report.missing:
        shown = ", ".join(f"{i}/{v}" for i, v in report.missing[:10])
        console.print(f"[red]missing {len(report.missing)} of {report.expected}[/] (index/view): {shown}"
                      + (" ..." if len(report.missing) > 10 else ""), highlight=False)  # fmt: skip
    # good + corrupt + missing = expected; the other problems are keys that belong to no expected record
    stray = len(report.problems) - report.corrupt
    console.print(f"{report.present}/{report.expected} records good, {report.corrupt} corrupt, "
                  f"{len(report.missing)} missing" + (f", {_count(stray, 'stray key')}" if stray else ""),
                  highlight=False)  # fmt: skip
    if not report.ok:
        raise typer.Exit(1)


@cache_app.command("export")
def cache_export(
    path: Path = typer.Argument(
        ..., help="The cache: a `kd precompute --out` directory, one environment or a directory of shards."
    ),
    out: Path = typer.Option(..., help="Output file (.npz)."),
    to: str = typer.Option("npz", help="Format: npz."),
) -> None:
    """Export every record for other tools: arrays index, view, and logits (dense codecs)
    or topk/sample indices, logits and logsumexp (sparse codecs; log p = logits / T - logsumexp at
    the cache temperature T, and a topk cache of codec version 3 gives logits = T log p with
    logsumexp 0), plus the metadata as JSON."""
    from kd.cache import CacheError
    from kd.cache.export import export_npz
    from kd.cache.sharded import open_cache

    if to != "npz":
        _fail(f"unknown export format {to!r}; supported: npz")
    written = out if out.name.endswith(".npz") else out.with_name(out.name + ".npz")  # as np.savez named it
    try:
        # a chunk of records at a time: memory stays flat at millions of records (it held ~10x the file)
        count = export_npz(open_cache(path), written)
    except (CacheError, ValueError) as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"--out {str(out)!r}: cannot write the export ({e.strerror or e})")
    console.print(f"exported {_count(count, 'record')} to {written}", highlight=False)


def _report_bench(run_bench, print_report, settings, json_out: Path | None) -> None:
    """Run a benchmark, print its tables, and write its JSON if asked."""
    try:
        with _stopped_politely(f"kd bench {settings.__class__.__module__.rsplit('.', 1)[-1]}"):
            results = run_bench(settings)
    except (RuntimeError, ValueError, OSError) as e:
        _fail(str(e), code=1)
    print_report(results)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(results, indent=2))
        console.print(f"wrote {json_out}", highlight=False)
    if results.get("failed"):  # a method that raised is a failure to report, never a skip
        _fail(f"{len(results['failed'])} method(s) raised: {', '.join(results['failed'])} (see the table)", code=1)


bench_app = typer.Typer(help="Benchmarks.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("serve")
def bench_serve(
    seconds: float | None = typer.Option(None, help="Measured seconds per phase window [3; 1 with --quick]."),
    rounds: int | None = typer.Option(None, help="Alternated windows behind each ratio [3; 1 with --quick]."),
    clients: int = typer.Option(16, help="Client processes of the saturation, batching and overload phases."),
    served_clients: int = typer.Option(3, help="Clients sending batch 64 for served_over_inprocess."),
    served_depth: int = typer.Option(0, help="0: those clients send unary requests; N: InferStream, N in flight."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N: the server's and the in-process model's."),
    threads: int = typer.Option(
        0, help="torch threads of the server and of the in-process loop [0 = half the logical CPUs]."
    ),
    teacher: str = typer.Option("kd.models:bench_teacher", help="module:factory[@WEIGHTS] of the teacher."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the results here as JSON."),
    quick: bool = typer.Option(False, "--quick", help="Short phases (tests, smoke runs)."),
    peer: str | None = typer.Option(
        None,
        help="triton: also run the loads against Triton Inference Server through PyTriton (optional; "
        "exits with an error where PyTriton is not installed).",
    ),
) -> None:
    """Throughput and latency of `kd serve` (subprocess, N client processes) against the model in-process."""
    _check_file_out(json_out, "--json")
    if peer is not None:  # refused before anything is measured
        from kd.bench.serve import triton_peer_problem

        if peer != "triton":
            _fail(f"--peer {peer!r}: the only peer is triton")
        problem = triton_peer_problem()
        if problem:
            _fail(problem)
    from kd.bench.serve import BenchSettings, print_report, run_bench

    if clients < 1 or served_clients < 1 or served_depth < 0 or (rounds is not None and rounds < 1):
        _fail("--clients, --served-clients and --rounds must be >= 1, --served-depth >= 0")
    settings = BenchSettings(
        seconds=seconds if seconds is not None else (1.0 if quick else 3.0),
        rounds=rounds if rounds is not None else (1 if quick else 3),
        warmup=0.25 if quick else 0.5,
        large_batch=4 if quick else 32,
        clients=clients,
        served_clients=served_clients,
        served_depth=served_depth,
        device=device,
        threads=threads,
        teacher=teacher,
        peer=peer or "",
    )
    _report_bench(run_bench, print_report, settings, json_out)


@bench_app.command("lm")
def bench_lm(
    seconds: float | None = typer.Option(None, help="Measured seconds per window [2; 0.2 with --quick]."),
    rounds: int | None = typer.Option(None, help="Alternated in-process / served windows per load [3; 2 --quick]."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N: the server's and the in-process model's."),
    threads: int = typer.Option(0, help="torch threads of the served and in-process model [0 = half the CPUs]."),
    hf: bool = typer.Option(True, help="Also a tiny GPT-2 served as hf:DIR (if transformers imports; not --quick)."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the results here as JSON."),
    quick: bool = typer.Option(False, "--quick", help="A small teacher, short windows (tests, smoke runs)."),
) -> None:
    """Token teachers: served / in-process tokens/s by batch and length mix, padding, bytes per token per codec."""
    _check_file_out(json_out, "--json")
    from kd.bench.lm import LMBenchSettings, print_report, run_bench

    if (seconds is not None and seconds <= 0) or (rounds is not None and rounds < 1) or threads < 0:
        _fail("--seconds must be > 0, --rounds >= 1, --threads >= 0")
    settings = LMBenchSettings.make(quick, seconds=seconds, rounds=rounds, device=device, threads=threads,
                                    hf=None if quick else hf)  # fmt: skip
    _report_bench(run_bench, print_report, settings, json_out)


@bench_app.command("cache")
def bench_cache(
    seeds: int | None = typer.Option(None, help="Student seeds per codec on digits [3; 1 with --quick]."),
    epochs: int | None = typer.Option(None, help="Student epochs on digits [300; 15 with --quick]."),
    views: int = typer.Option(4, help="Augmented views of the V > 1 cache (compared with V = 1)."),
    threads: int = typer.Option(0, help="torch threads [0 = torch's default]."),
    teacher: str = typer.Option(
        "kd.models:bench_teacher", help="module:factory (optionally @WEIGHTS): teacher of the speed phases."
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the results here as JSON."),
    quick: bool = typer.Option(False, "--quick", help="Few epochs, one seed, short phases (tests, smoke runs)."),
) -> None:
    """Cache codecs: bytes per sample, KL error, student accuracy; views; read, precompute and step-time ratios."""
    _check_file_out(json_out, "--json")
    from kd.bench.cache import CacheBenchSettings, print_report, run_bench

    if (seeds is not None and seeds < 1) or (epochs is not None and epochs < 1) or views < 2 or threads < 0:
        _fail("--seeds and --epochs must be >= 1, --views >= 2, --threads >= 0")
    settings = CacheBenchSettings.make(quick, seeds=seeds, epochs=epochs, views=views, threads=threads,
                                       teacher=teacher)  # fmt: skip
    _report_bench(run_bench, print_report, settings, json_out)


@bench_app.command("data")
def bench_data(
    samples: int = typer.Option(50_000, help="JPEG files the bench writes (an ImageFolder of 100 classes)."),
    size: int = typer.Option(64, help="Side of the JPEG files in pixels."),
    resolution: int = typer.Option(32, help="Decoded and resized to this for the teacher and the student."),
    teacher: str = typer.Option("kd.student_trainer.zoo:resnet8x4", help="module:factory[@WEIGHTS] of the teacher."),
    student: str = typer.Option("kd.student_trainer.zoo:wrn_16_2", help="module:factory of the student."),
    workers: int = typer.Option(0, help="DataLoader workers of every phase [0 = min(4, CPUs)]."),
    batch: int = typer.Option(256, help="Batch of decode, forward and precompute."),
    rounds: int = typer.Option(3, help="Interleaved rounds of decode, forward and precompute measurements."),
    window: int = typer.Option(1024, help="Samples per measurement of a round."),
    step_batch: int = typer.Option(64, help="Student batch of the step phase."),
    step_block: int = typer.Option(4, help="Steps per mode per block (the first is not counted)."),
    step_rounds: int = typer.Option(3, help="Interleaved blocks per mode."),
    threads: int = typer.Option(0, help="torch threads [0 = torch's default]."),
    root: Path | None = typer.Option(None, help="Keep the images and cache here (reused if complete) [temporary]."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the results here as JSON."),
) -> None:
    """Data flow at scale: decode, teacher forward and `kd precompute` rates, RSS, step from cache vs no teacher."""
    _check_file_out(json_out, "--json")
    from kd.bench.data import DataBenchSettings, print_report, run_bench

    if (
        min(samples, size, resolution, batch, rounds, window, step_batch, step_block, step_rounds) < 1
        or min(workers, threads) < 0
    ):
        _fail("--samples, --size, --resolution, --batch, --rounds, --window and the step options must be >= 1; "
              "--workers and --threads >= 0")  # fmt: skip
    if samples < 10:
        _fail("--samples must be >= 10")
    settings = DataBenchSettings(
        samples=samples, size=size, resolution=resolution, teacher=teacher, student=student, workers=workers,
        batch=batch, rounds=rounds, window=window,
        step_batch=step_batch, step_block=step_block, step_rounds=step_rounds, threads=threads,
        root=str(root) if root else "",
    )  # fmt: skip
    _report_bench(run_bench, print_report, settings, json_out)


@bench_app.command("methods")
def bench_methods(
    methods: str | None = typer.Option(None, help="Comma-separated methods to run [all registered]; ce, kd always."),
    seeds: int | None = typer.Option(None, help="Student seeds per method [3; 1 with --quick]."),
    epochs: int | None = typer.Option(None, help="Student epochs [300; 10 with --quick]."),
    labeled: int | None = typer.Option(None, help="Labelled training samples the student sees [100]."),
    teacher_epochs: int | None = typer.Option(None, help="Teacher epochs (CE, whole split) [40; 3 with --quick]."),
    threads: int | None = typer.Option(None, help="torch threads [2; 0 = torch's default]."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the results here as JSON."),
    quick: bool = typer.Option(False, "--quick", help="One seed, few epochs (tests, smoke runs)."),
    online_methods: str | None = typer.Option(
        None,
        help="Comma-separated online methods (kd online) of the online section [all; okddip,dist-plus with "
        "--quick]; 'none' skips it.",
    ),
    online_epochs: int | None = typer.Option(None, help="Epochs of the online section [150; 1 with --quick]."),
) -> None:
    """Every registered KD method on the demo's digits setting: test accuracy next to CE and plain KD."""
    _check_file_out(json_out, "--json")
    from kd.bench.methods import MethodsBenchSettings, print_report, run_bench, selected_methods, selected_online

    names = tuple(m.strip() for m in (methods or "").split(",") if m.strip())
    online = None if online_methods is None else tuple(m.strip() for m in online_methods.split(",") if m.strip())
    online = () if online == ("none",) else online
    try:
        selected_methods(names)
        selected_online(online)
    except ValueError as e:
        _fail(str(e))
    counts = (seeds, epochs, labeled, teacher_epochs, online_epochs)
    if any(v is not None and v < 1 for v in counts) or (threads or 0) < 0:
        _fail("--seeds, --epochs, --labeled, --teacher-epochs and --online-epochs must be >= 1, --threads >= 0")
    settings = MethodsBenchSettings.make(quick, seeds=seeds, epochs=epochs, labeled=labeled,
                                         teacher_epochs=teacher_epochs, threads=threads, methods=names,
                                         online_epochs=online_epochs, online_methods=online)  # fmt: skip
    _report_bench(run_bench, print_report, settings, json_out)


@app.command()
@_recipe_flags(
    "batch_size",
    lr={"default": 3e-3, "help": "Each stage's base learning rate (see --schedule, --warmup-epochs; 3e-3: the "
        "stages' before the flag)."},
    optimizer={"help": "Each stage's optimiser (the recipe's names, as `kd train`)."},
    milestones={"help": "multistep: epochs at which lr *= --gamma, e.g. 150,180,210."},
)  # fmt: skip
def chain(
    ctx: typer.Context,
    mode: str = typer.Option("takd", help="takd (teacher -> assistant(s) -> student) or born-again (N generations)."),
    teacher: str | None = typer.Option(
        None, help="module:factory@WEIGHTS of a trained teacher; left out, one is trained as in `kd demo`."
    ),
    model: list[str] = typer.Option(
        [], "--model", "-m", help="module:factory of each successive model, in order. Repeatable."
    ),
    epochs: int = typer.Option(300, help="Epochs of each stage."),
    seeds: int = typer.Option(1, help="Seeds: the whole chain is run once per seed."),
    dataset: str = typer.Option("digits:train", help="Training dataset URI (image folder, npz, hf, ... as kd train)."),
    val_dataset: str = typer.Option("digits:test", help="Dataset URI every model is evaluated on."),
    labeled: int | None = typer.Option(
        None,
        help="Labelled training samples each stage sees (a seeded subset per seed); default: 100 of the "
        "bundled digits (the TAKD experiment's low-data setting), every sample of any other --dataset.",
    ),
    batch_size: int = typer.Option(32, help="Batch size of each stage (32: the stages' batch before the flag)."),
    temperature: float = typer.Option(4.0, "--temperature", "-T", help="KD temperature."),
    alpha: float = typer.Option(0.9, help="KD weight of the soft term."),
    teacher_factory: str = typer.Option("kd.models:digits_teacher", help="Architecture of a teacher trained here."),
    teacher_epochs: int = typer.Option(40, help="Epochs of a teacher trained here."),
    tolerant_gamma: float = typer.Option(0.0, help="Tolerant-teacher weight (Yang et al. 2018), teacher trained here."),
    tolerant_k: int = typer.Option(5, help="K of the tolerant-teacher term (top-1 vs the next K-1 logits)."),
    direct: bool = typer.Option(True, help="takd: also train the last model straight from the teacher."),
    serve: bool = typer.Option(True, help="Serve each stage with `kd serve` (--no-serve: in process)."),
    out: Path = typer.Option(Path("chain-out"), help="Where stage-<i>.safetensors, server logs and chain.json go."),
    *,
    recipe: dict[str, object],
) -> None:
    """Distillation chains: TAKD (teacher -> assistant -> student) or born-again generations, each served in turn."""
    _check_dir_out(out, "--out")
    import math

    from kd.chain import MODES, check_chain, open_splits, run_chain

    if mode not in MODES:
        _fail(f"--mode must be one of {', '.join(MODES)}")
    if min(epochs, seeds, labeled or 1, teacher_epochs, tolerant_k - 1, batch_size) < 1 or temperature <= 0:
        _fail("--epochs, --seeds, --labeled, --teacher-epochs, --batch-size must be >= 1, --tolerant-k >= 2, -T > 0")
    recipe = _recipe(recipe, ctx)  # --momentum with adam, --milestones without multistep: refused, as kd train
    if not (math.isfinite(tolerant_gamma) and tolerant_gamma >= 0):
        _fail(f"--tolerant-gamma must be a finite number >= 0 (0: off), got {tolerant_gamma}")
    # The splits once, for the check and the run (an image folder's opening scans its directories).
    splits = _call(open_splits, dataset, val_dataset, labeled)
    # The rest (--alpha, -T, the models) before stage 0 trains: a refusal (exit 2), not a failed run.
    _call(check_chain, mode=mode, teacher=teacher, models=model or None, epochs=epochs, seeds=seeds, labeled=labeled,
          temperature=temperature, alpha=alpha, teacher_factory=teacher_factory, teacher_epochs=teacher_epochs,
          tolerant_gamma=tolerant_gamma, tolerant_k=tolerant_k, dataset=dataset, val_dataset=val_dataset,
          recipe=recipe, batch_size=batch_size, splits=splits)  # fmt: skip
    signals = _stop_signals()
    try:
        run_chain(out, mode=mode, teacher=teacher, models=model or None, epochs=epochs, seeds=seeds,
                  labeled=labeled, temperature=temperature, alpha=alpha, teacher_factory=teacher_factory,
                  teacher_epochs=teacher_epochs, tolerant_gamma=tolerant_gamma, tolerant_k=tolerant_k,
                  direct=direct, serve=serve, dataset=dataset, val_dataset=val_dataset, recipe=recipe,
                  batch_size=batch_size, stop=signals.first, splits=splits)  # fmt: skip
    except Stopped as e:
        # Each finished stage's weights are in --out; the stage in training is not saved, its server stopped.
        _stopped_exit(e.signum, f"{e.where}; the stages finished before are in {out} (stage-N.safetensors), the "
                      "one in training is not saved: run the chain again to train it")  # fmt: skip
    except (ValueError, RuntimeError) as e:
        _fail(str(e), 1)
    finally:
        signals.close(restore_handlers=True)


@app.command()
@_recipe_flags(
    "temperature",
    optimizer={"help": "The student's optimiser (the recipe's names, as `kd train`)."},
    milestones={"help": "multistep: epochs (of --eval-every rounds) at which lr *= --gamma."},
)
def datafree(
    method: str = typer.Argument(
        ...,
        help="The data-free method: adv-samples, dafl, deepinversion, dfad, dfme, fast-dfkd, lopes, zsdb3kd or zskt.",
    ),
    server: str = typer.Option(
        ..., help="HOST:PORT[/TEACHER] of `kd serve` (the teacher; its name may be left out when the server has one)."
    ),
    student: str = typer.Option("kd.models:digits_cnn_student", help="module:factory of the student."),
    opt: list[str] = typer.Option([], "--opt", help="Method option key=value (JSON values), e.g. --opt k=5."),
    val_dataset: str = typer.Option(
        "digits:test", help="Dataset URI the student is evaluated on (top-1 and top-5) each epoch; 'none': none."
    ),
    steps: int = typer.Option(200, help="The method's rounds (generator/student rounds, synthesised batches)."),
    eval_every: int = typer.Option(0, help="Evaluate (one trainer epoch) every N rounds; 0: only at the end."),
    batch_size: int = typer.Option(64, help="Synthetic samples per round."),
    generator_lr: float = typer.Option(1e-3, help="The generator's learning rate (it follows the schedule too)."),
    temperature: float = typer.Option(4.0, help="KD temperature on synthetic inputs."),
    seed: int = typer.Option(0, help="Seed of the student's and the generator's initial weights and of every draw."),
    device: str = typer.Option("cpu", help="Device of the student: cpu, cuda or cuda:N."),
    out: Path | None = typer.Option(None, help="Save the student's weights here: a file named *.safetensors."),
    run_dir: Path | None = typer.Option(
        None, help="Write config.json, metrics.csv and checkpoint.pt (every --eval-every rounds) here: see --resume."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue --run-dir's run from its last checkpoint (the last --eval-every rounds)."
    ),
    *,
    recipe: dict[str, object],
) -> None:
    """Distil a student from a served teacher without training data (one data-free method).

    The student trains through `kd train`'s trainer and recipe flags; a method's own recipe
    defaults (e.g. dafl's --opt student_optimizer=sgd) apply where a flag is left at its default."""
    _check_out(out)
    _check_run_dir(run_dir, resume, 0)
    from kd.student_trainer.datafree import DataFreeConfig, ServedTeacher, get
    from kd.student_trainer.train import seed_everything
    from kd.teacher_server.client import TeacherClient

    recipe = _recipe(recipe)
    try:
        chosen = get(method)
    except ValueError as e:
        _fail(str(e))
    _check_run_options(seed, device)  # seed -1 was numpy's traceback
    test = None
    if val_dataset != "none":
        from kd.core.data import open_source

        try:
            test = open_source(val_dataset)
        except ValueError as e:
            _fail(str(e))
    config = DataFreeConfig(steps=steps, batch_size=batch_size, generator_lr=generator_lr, temperature=temperature,
                            seed=seed, device=device, eval_every=eval_every,
                            run_dir=None if run_dir is None else str(run_dir), resume=resume, **recipe)  # fmt: skip
    _call(config.validate, method)  # before the server is asked anything
    from kd.student_trainer.sources import split_server_address

    address, name = split_server_address(server)
    seed_everything(seed)
    signals = _stop_signals()
    try:
        model = _build_student(student)
        _check_saveable(model, out)
        config.stop = signals.first
        with TeacherClient(address, client_id=f"datafree-{method}") as client:
            result = chosen.run(ServedTeacher(client, name or None), model, config, test=test, **_parse_options(opt))
    except Stopped as e:
        if run_dir is None:
            _stopped_resumable(e, None)
        if not (run_dir / "checkpoint.pt").is_file():  # stopped before its first --eval-every rounds ended
            _stopped_exit(e.signum, f"{e.where}; the student is not saved: no --eval-every rounds ended, so {run_dir} "
                          "holds no checkpoint to resume from (one is written every --eval-every rounds; 0: only at "
                          "the end): run it again from the start")  # fmt: skip
        # A round's work between checkpoints is in none: the run goes on from the last whole epoch.
        _stopped_exit(e.signum, f"{e.where}; {run_dir} holds the checkpoint of the last --eval-every rounds done: "
                      "run the same command with --resume to continue from there")  # fmt: skip
    except Exception as e:  # noqa: BLE001 - every failure here is the user's to read
        _fail(_error_text(e))
    finally:
        signals.close(restore_handlers=True)
    if out is not None:
        _save_student(model, out)
    print(json.dumps(result.as_dict()))


@app.command()
@_recipe_flags(
    "eval_prompts",
    ("lr", "optimizer", "weight_decay", "momentum", "nesterov", "schedule", "milestones", "gamma", "warmup_epochs",
     "amp", "clip_grad_norm"),
    optimizer={"help": "adam, adamw, sgd (the recipe's names, as `kd train`)."},
    schedule={"help": "constant, cosine or linear (per step, to 0 at the end) or multistep (per pass over --dataset)."},
    milestones={"help": "multistep: passes over --dataset (from 0) at which lr is multiplied by --gamma, e.g. 2,4."},
    warmup_epochs={"help": "Linear warm-up over this many passes over --dataset."},
    amp={"help": "fp32, bf16 or fp16 autocast of the student."},
)  # fmt: skip
def onpolicy(
    ctx: typer.Context,
    config: Path | None = typer.Option(
        None, is_eager=True, callback=_train_config, help="TOML/YAML file of these options (the command line wins)."
    ),
    server: str = typer.Option(..., help="HOST:PORT of `kd serve` with a token (causal LM) teacher."),
    teacher: str = typer.Option(..., help="The served teacher's name."),
    dataset: str = typer.Option(..., help="Token dataset URI giving the prompts, e.g. text:corpus/?block=128."),
    student: str = typer.Option(..., help="module:factory[@WEIGHTS][?k=v] of the causal-LM student."),
    val_dataset: str | None = typer.Option(None, help="Held-out token dataset: perplexity, accuracy, divergence."),
    steps: int = typer.Option(100, help="Training steps (one batch of prompts each)."),
    batch_size: int = typer.Option(8, help="Prompts (sequences) per step."),
    prompt_tokens: int = typer.Option(16, help="Prompt = a sample's first N tokens (instruction data: its prompt)."),
    max_new_tokens: int = typer.Option(32, help="Tokens the student samples per prompt (fewer at eos)."),
    temperature: float = typer.Option(1.0, help="The student's sampling temperature (0: greedy)."),
    lmbda: float = typer.Option(0.5, help="GKD's share of on-policy batches (the rest: the dataset's tokens)."),
    divergence: str = typer.Option("gjsd", help="fkl, rkl, gjsd, tv, skl or srkl (per token)."),
    beta: float = typer.Option(0.5, help="gjsd: beta (0: forward KL, 1: reverse KL)."),
    scoring: str = typer.Option("logits", help="logits, topk (with --top-k) or logprobs (sampled-token reverse KL)."),
    top_k: int = typer.Option(0, help="scoring=topk: ids per position."),
    eval_prompts: int = typer.Option(64, help="Held-out prompts for the divergence before/after (0: skip)."),
    seed: int = typer.Option(
        0, help="Seed of the student's initial weights (without @WEIGHTS), its sampling and the batch order."
    ),
    device: str = typer.Option("cpu", help="Device of the student: cpu, cuda or cuda:N."),
    out: Path | None = typer.Option(None, help="Save the student's weights here: a file named *.safetensors."),
    run_dir: Path | None = typer.Option(
        None, help="Write checkpoint.pt here when stopped (SIGTERM, Ctrl-C) and every --checkpoint-every steps."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue from --run-dir's checkpoint, to the result of an uninterrupted run."
    ),
    checkpoint_every: int = typer.Option(0, help="With --run-dir: also write the checkpoint every N steps."),
    *,
    recipe: dict[str, object],
) -> None:
    """On-policy distillation (GKD / MiniLLM style): the student samples, the served teacher scores its tokens."""
    from kd.core.data import open_source
    from kd.core.lmchecks import model_max_length
    from kd.core.tokens import refuse_no_samples
    from kd.student_trainer.onpolicy import OnPolicyConfig, train_onpolicy
    from kd.student_trainer.train import seed_everything
    from kd.teacher_server.client import TeacherClient

    # --momentum with adam, --milestones without multistep: refused; the rest is validated with the config below
    recipe = _recipe(recipe, ctx, validate=False)
    config = OnPolicyConfig(steps=steps, batch_size=batch_size, prompt_tokens=prompt_tokens,
                            max_new_tokens=max_new_tokens, temperature=temperature, lmbda=lmbda,
                            divergence=divergence, beta=beta, scoring=scoring, top_k=top_k, seed=seed, device=device,
                            eval_prompts=eval_prompts, **recipe)  # fmt: skip
    _check_run_options(seed, device)
    _check_out(out)
    _check_run_dir(run_dir, resume, checkpoint_every)
    try:
        config.validate()
        train_data = open_source(dataset)
        val_data = open_source(val_dataset) if val_dataset else None
        for flag, d in (("--dataset", train_data), ("--val-dataset", val_data)):
            if d is not None:  # before the server is asked anything
                refuse_no_samples(d, flag)
    except ValueError as e:
        _fail(str(e))
    seed_everything(seed)
    try:
        model = _build_student(student)
        _check_saveable(model, out)
        # Before the server is asked anything. model_max_length: a Hugging Face student states its
        # positions in its config (no max_length attribute); train_onpolicy checks the data's lengths.
        limit = model_max_length(model)
        if limit is not None and prompt_tokens + max_new_tokens > limit:
            raise ValueError(f"--prompt-tokens {prompt_tokens} + --max-new-tokens {max_new_tokens} exceed the "
                             f"student's max_length {limit}")  # fmt: skip
        signals = _stop_signals()
        try:
            with TeacherClient(server, client_id="onpolicy") as client:
                result = train_onpolicy(model, client, teacher, train_data, config, val=val_data, stop=signals.first,
                                        run_dir=run_dir, resume=resume, checkpoint_every=checkpoint_every)  # fmt: skip
        finally:
            signals.close(restore_handlers=True)
    except Stopped as e:
        _stopped_resumable(e, run_dir)
    except Exception as e:  # noqa: BLE001 - every failure here is the user's to read
        _fail(_error_text(e))
    if out is not None:
        _save_student(model, out)
    print(json.dumps(result.as_dict()))


@app.command("train-lm")
@_recipe_flags(
    "accumulate",
    ("amp", "optimizer", "lr", "weight_decay", "momentum", "nesterov", "schedule", "milestones", "gamma",
     "warmup_epochs", "clip_grad_norm"),
    amp={"help": "fp32 or bf16 (autocast of the student's forward)."},
    optimizer={"help": "adam, adamw or sgd."},
    schedule={"help": "constant, cosine or linear (per optimizer step, to 0 at the end of --epochs) or multistep "
              "(per epoch)."},
    warmup_epochs={"help": "Linear warm-up over this many epochs of optimizer steps (fractions too, e.g. 0.05)."},
    clip_grad_norm={"help": "Clip each optimizer step's total gradient norm to this (0: off)."},
)  # fmt: skip
def train_lm(
    ctx: typer.Context,
    config: Path | None = typer.Option(
        None, is_eager=True, callback=_train_config, help="TOML/YAML file of these options (the command line wins)."
    ),
    source: str = typer.Option(
        ...,
        help="cache:PATH of a token cache (kd precompute with a token dataset), server:HOST:PORT[,HOST:PORT...]"
        "[/TEACHER] of a served token teacher, or local:SPEC of one run in this process.",
    ),
    dataset: str = typer.Option(
        ..., help="The token dataset to train on (a cache's: the one it was precomputed on), e.g. text:DIR?block=128."
    ),
    val_dataset: str = typer.Option(..., help="Held-out token dataset: validation perplexity and next-token accuracy."),
    student: str = typer.Option(..., help="module:factory[@WEIGHTS][?k=v] of the causal-LM student."),
    method: str = typer.Option("token-fkl", help="token-fkl, token-rkl, token-gjsd, token-tv or token-skl."),
    opt: list[str] = typer.Option([], "--opt", help="Method option key=value, e.g. --opt beta=0.5. Repeatable."),
    epochs: int = typer.Option(1, help="Passes over the token dataset."),
    batch_size: int = typer.Option(8, help="Sequences per micro-batch."),
    accumulate: int = typer.Option(1, help="Micro-batches per optimizer step, weighted by their token counts."),
    seed: int = typer.Option(0, help="Seed of the student's initial weights and the batch order."),
    device: str = typer.Option("cpu", help="Device of the student: cpu, cuda or cuda:N."),
    out: Path | None = typer.Option(None, help="Save the student's weights here: a file named *.safetensors."),
    server_topk: int = typer.Option(
        0,
        help="With --source server:...: ask for the top K tokens of each position (+ the log-sum-exp at the "
        "method's temperature), made next to the model, instead of all V logits.",
    ),
    server_timeout: float = typer.Option(
        60.0,
        help="With --source server:...: seconds the first contact with the server, or one request, may take before "
        "the run fails naming the server.",
    ),
    run_dir: Path | None = typer.Option(
        None, help="Write checkpoint.pt here after each epoch and when stopped (SIGTERM, Ctrl-C): see --resume."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue from --run-dir's checkpoint, to the result of an uninterrupted run."
    ),
    checkpoint_every: int = typer.Option(
        0, help="With --run-dir: also write the checkpoint every N steps (a crash then loses fewer); 0: per epoch."
    ),
    feature: list[str] = typer.Option(
        [],
        "--feature",
        help="Hidden-state distillation: STUDENT=TEACHER[:LOSS[:WEIGHT]] (module paths; LOSS cosine, DistilBERT's, "
        "the default, or mse, TinyBERT's; WEIGHT 1), added to the token loss. Repeatable. Not from a cache.",
    ),
    feature_connector: str | None = typer.Option(
        None,
        help="With --feature: auto (none at equal widths) or linear (D_s -> D_t) for every pair; default: "
        "auto for cosine, linear for mse.",
    ),
    *,
    recipe: dict[str, object],
) -> None:
    """Distil a causal-LM student with a per-token loss from a token cache, a served token teacher or
    one in process (and, with --feature, its hidden states); validation perplexity and accuracy."""
    import time

    from kd.cache import CacheError
    from kd.core.data import open_source
    from kd.core.lmchecks import longest_sequence, model_max_length, refuse_other_dataset_tokenizer, refuse_too_long
    from kd.core.tokens import TokenSource, refuse_no_samples
    from kd.student_trainer.hidden import CONNECTOR_KINDS, HiddenMatch, HiddenStates
    from kd.student_trainer.losses import METHODS, get_method
    from kd.student_trainer.losses.token_kd import evaluate_tokens
    from kd.student_trainer.sources import CacheSource, parse_source
    from kd.student_trainer.train import seed_everything, train_tokens
    from kd.teacher_server.lm import is_token_teacher

    token_methods = sorted(m for m in METHODS if m.startswith("token-"))
    if method not in token_methods:
        _fail(f"--method {method!r}: kd train-lm takes a per-token loss: {', '.join(token_methods)}")
    kind = source.partition(":")[0]
    if kind not in ("cache", "server", "local") or not source.partition(":")[2]:
        _fail(f"--source {source!r}: kd train-lm trains from cache:PATH (a token cache: kd precompute makes it), "
              "server:HOST:PORT[/TEACHER] (a served token teacher) or local:SPEC (one in this process)")  # fmt: skip
    if server_topk < 0 or (server_topk and kind != "server"):
        _fail(f"--server-topk {server_topk}: needs K >= 1 and applies only to --source server:...; got {source!r}")
    if not (math.isfinite(server_timeout) and server_timeout > 0):
        _fail(f"--server-timeout must be a number of seconds > 0, got {server_timeout}")
    _server_flag_unused(ctx, "server_timeout", [source])
    if epochs < 1 or batch_size < 1:  # as kd train: 0 epochs saved the untrained student to --out, exit 0
        _fail(f"--epochs and --batch-size must be >= 1, got {epochs} and {batch_size}")
    from kd.student_trainer.train import TOKEN_OPTIMIZERS

    if recipe["optimizer"] not in TOKEN_OPTIMIZERS:
        _fail(f"--optimizer {recipe['optimizer']!r}: kd train-lm takes {', '.join(TOKEN_OPTIMIZERS)}")
    recipe = _recipe(recipe, ctx)  # --momentum with adam, --milestones without multistep: refused
    _check_run_options(seed, device)
    _check_out(out)
    if out is not None and feature:  # the connectors go beside the student: writable too
        _check_out(connectors_path(out), "the connectors file of --out")
    _check_run_dir(run_dir, resume, checkpoint_every)
    if feature_connector is not None and (not feature or feature_connector not in CONNECTOR_KINDS):
        _fail(f"--feature-connector {feature_connector!r}: {' or '.join(CONNECTOR_KINDS)}, with --feature")
    try:
        matches = [HiddenMatch.parse(f) for f in feature]
    except ValueError as e:
        _fail(str(e))
    options = _parse_options([*_config_method_options(ctx, method), *opt])  # the file's, then --opt's
    device, rank = _join_torchrun(device)  # under torchrun each rank trains on its slice of every step
    teacher_src = None
    try:
        get_method(method).check_options(options)
        train_data, val_data = open_source(dataset), open_source(val_dataset)
        for flag, d in (("--dataset", train_data), ("--val-dataset", val_data)):
            if not isinstance(d, TokenSource):
                raise ValueError(f"{flag} {d.dataset_id}: not a token dataset (text:, jsonl:, hf:DIR?text=...)")
            refuse_no_samples(d, flag)  # before the cache is opened: it names the block, the cache would not
        if val_data.vocab_size != train_data.vocab_size:
            raise ValueError(f"--val-dataset has vocabulary {val_data.vocab_size}, --dataset {train_data.vocab_size}")
        # The cache is --dataset's (its id covers the tokenizer); --val-dataset's ids must be the same tokens.
        refuse_other_dataset_tokenizer(val_data, train_data, "--val-dataset", "--dataset")
        if kind == "cache":
            teacher_src = CacheSource(source[len("cache:") :], dataset_id=train_data.dataset_id)
            if not teacher_src.reader.meta.per_token:
                raise ValueError(f"{source} holds one record per sample; kd train-lm needs a token cache")
        elif kind == "server":
            # Sparse targets hold the log-sum-exp at one temperature: the loss's (token losses' default 1).
            temperature = float(options.get("temperature", get_method(method).defaults.get("temperature", 1.0)))
            teacher_src = parse_source(source, topk=server_topk, temperature=temperature, timeout=server_timeout,
                                       stream_timeout=server_timeout, connect_timeout=server_timeout)  # fmt: skip
            if not teacher_src.tokens:
                raise ValueError(f"--source {source}: teacher {teacher_src.teacher_name!r} is not a token teacher (its "
                                 "targets are one row per sample): distil it with kd train")  # fmt: skip
        else:
            teacher_src = parse_source(source, device=device)
            if not is_token_teacher(teacher_src.teacher):
                raise ValueError(f"--source {source}: teacher {teacher_src.teacher_name!r} is not a token teacher (its "
                                 "signature does not take token ids): distil it with kd train")  # fmt: skip
        # before the student is built; train_tokens checks it again
        if teacher_src.num_classes != train_data.vocab_size:
            raise ValueError(f"--source {source} has vocabulary {teacher_src.num_classes}, --dataset "
                             f"{train_data.vocab_size}")  # fmt: skip
    except Exception as e:  # noqa: BLE001 - a bad cache, server, teacher or dataset: the user's to read
        if teacher_src is not None:
            teacher_src.close()
        _fail(str(e) if isinstance(e, (CacheError, ValueError, TypeError)) else f"{type(e).__name__}: {e}")
    seed_everything(seed)
    try:
        model = _build_student(student)
        # Training and validation run the student over whole samples: both checked before any step.
        for flag, d in (("--dataset", train_data), ("--val-dataset", val_data)):
            refuse_too_long(longest_sequence(d), model_max_length(model), "the student", f"lower {flag}'s ?block=")
        # Built here (its layers checked on both sides before any step) so its trained connectors are ours to save.
        hidden = (HiddenStates.build(matches, model, teacher_src, train_data.batch([0]).tokens, feature_connector)
                  if matches else None)  # fmt: skip
    except (RuntimeError, ValueError) as e:
        teacher_src.close()
        _fail(str(e))
    _check_saveable(model, out)
    t0 = time.perf_counter()

    validated: list = []  # the last epoch's metrics: the trained student's (train_tokens ends with that epoch)

    def validate(epoch: int, loss: float) -> None:
        # Under torchrun every rank validates its share of the split (the same weights), rank 0 prints.
        m = evaluate_tokens(model, val_data, batch_size=batch_size, device=device, across_ranks=True)
        validated[:] = [m]
        if rank != 0:
            return
        console.print(f"epoch {epoch + 1}: loss {loss:.4f}, val perplexity {m.perplexity:.3f}, "
                      f"next-token accuracy {m.accuracy:.4f}", highlight=False)  # fmt: skip

    signals = _stop_signals()
    try:
        losses = train_tokens(model, train_data, teacher_src, method=method, epochs=epochs, batch_size=batch_size,
                              seed=seed, method_options=options, device=device, accumulate=accumulate,
                              on_epoch=validate, stop=signals.first, run_dir=run_dir, resume=resume,
                              checkpoint_every=checkpoint_every, hidden=hidden, **recipe)  # fmt: skip
    except Stopped as e:
        if rank != 0:  # every rank stopped before the same step (train_tokens): rank 0 says so
            raise SystemExit(128 + e.signum) from None
        _stopped_resumable(e, run_dir)
    except (ValueError, TypeError, KeyError, RuntimeError, CacheError, FloatingPointError, OSError) as e:  # bad
        # option, cache, data or student, a diverged run, or a checkpoint that could not be written
        _fail(_error_text(e))
    finally:
        signals.close(restore_handlers=True)
        teacher_src.close()
    _leave_process_group()
    if rank != 0:
        return
    metrics = validated[0] if validated else evaluate_tokens(model, val_data, batch_size=batch_size, device=device)
    if out is not None:
        _save_student(model, out)
        if hidden is not None:  # the trained connectors, beside the student (as kd train's)
            _save_student(hidden, connectors_path(out), "the connectors")
    result = {"method": method, "source": source, "dataset": train_data.dataset_id, "val_dataset": val_data.dataset_id,
              "losses": losses, "val_ppl": metrics.perplexity, "val_accuracy": metrics.accuracy,
              "val_tokens": metrics.tokens, "epochs": epochs, "accumulate": accumulate, "amp": recipe["amp"],
              "features": feature, "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip
    print(json.dumps(result))


@app.command("demo-lm")
def demo_lm(
    out: Path = typer.Option(Path("demo-lm-out"), help="Where corpus, teacher, caches, results.json, ppl.png go."),
    seed: int = typer.Option(0, help="Seed of the teacher's and the students' initial weights and batch order."),
    quick: bool = typer.Option(False, "--quick", help="A tiny corpus and models (tests, smoke runs)."),
) -> None:
    """Language-model KD on the Python standard library: CE vs dense/sparse caches vs on-policy, val perplexity."""
    _check_dir_out(out, "--out")
    import torch

    from kd.demo_lm import print_report, run_demo_lm

    torch.set_num_threads(min(2, torch.get_num_threads()))
    try:
        with _stopped_politely("kd demo-lm"):
            result = run_demo_lm(out, quick=quick, seed=seed)
    except (ValueError, RuntimeError) as e:
        _fail(str(e))
    print_report(result)
    console.print(f"wrote {out / 'results.json'}", highlight=False)


@app.command("demo-datafree")
def demo_datafree(
    out: Path = typer.Option(Path("demo-datafree-out"), help="Where results.json, the teacher and its records go."),
    method: list[str] = typer.Option([], help="Run only these data-free methods (repeatable) [all registered]."),
    teacher_epochs: int = typer.Option(40, help="Epochs of the teacher's CE training on the real data."),
    quick: bool = typer.Option(False, "--quick", help="A few steps per method (tests, smoke runs)."),
) -> None:
    """Data-free distillation on digits: every method against a served teacher, next to real-data KD."""
    _check_dir_out(out, "--out")
    import torch

    from kd.demo_datafree import print_report, run_demo_datafree

    torch.set_num_threads(min(2, torch.get_num_threads()))
    try:
        with _stopped_politely("kd demo-datafree"):
            result = run_demo_datafree(out, methods=list(method) or None, quick=quick, teacher_epochs=teacher_epochs)
    except (ValueError, RuntimeError) as e:
        _fail(str(e))
    print_report(result)
    console.print(f"wrote {out / 'results.json'}", highlight=False)
    if result["problems"]:
        _fail("demo check(s) failed: " + "; ".join(result["problems"]), code=1)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), help="Where teacher, cache, results.json and curves.png go."),
    seeds: int = typer.Option(3, help="Student seeds per setting."),
    epochs: int = typer.Option(300, help="Student epochs."),
    labeled: int = typer.Option(100, help="Training samples the student sees (the teacher sees the whole split)."),
    teacher_epochs: int = typer.Option(
        40, help="Epochs of the teacher's cross-entropy training on the whole training split."
    ),
) -> None:
    """Serve a teacher, cache its soft targets, train students from the cache and the server, print a table."""
    _check_dir_out(out, "--out")
    from kd.demo import run_demo

    try:
        with _stopped_politely("kd demo"):
            run_demo(out, seeds=seeds, epochs=epochs, labeled=labeled, teacher_epochs=teacher_epochs)
    except RuntimeError as e:  # a failed check or a server that did not exit cleanly
        _fail(str(e), code=1)


@app.command(short_help="Cheng et al. 2020's knowledge metrics of models.")
def explain(
    out: Path = typer.Option(Path("explain-out"), help="Where results.json, a plot per model and checkpoints go."),
    demo_dir: Path | None = typer.Option(None, "--demo", help="A `kd demo --out` folder: retrain its models, explain."),
    model: list[str] = typer.Option(
        [],
        help="NAME=FACTORY@CHECKPOINTS (a folder of epoch_NNNN.safetensors or one "
        "weights file), e.g. kd=kd.models:digits_student@runs/kd. Repeatable.",
    ),
    seeds: int | None = typer.Option(None, help="--demo: student seeds to redo [all of the demo's]."),
    every: int = typer.Option(10, help="--demo: keep the students' weights every N epochs."),
    teacher_path: bool = typer.Option(True, help="--demo: retrain the teacher too, for its D and rho."),
    images: int = typer.Option(100, help="Test images measured (the first N)."),
    lam: float = typer.Option(0.005, help="The Lagrange weight lambda of the entropy term."),
    b: float = typer.Option(0.25, help="A concept's entropy lies b nats below the background's mean."),
    steps: int = typer.Option(300, help="Adam steps of the sigma optimisation."),
    samples: int = typer.Option(8, help="Noise draws per image and step."),
    layer: str | None = typer.Option(None, help="Module whose output is explained [the last Linear's input]."),
    device: str = typer.Option("cpu", help="Device of the models and the sigma optimisation: cpu, cuda or cuda:N."),
) -> None:
    """Cheng et al. 2020: visual concepts (N_fg, N_bg, lambda), D_mean, D_std and rho of models."""
    _check_dir_out(out, "--out")
    from kd.explain import METRICS, ExplainConfig, run_explain, table_rows

    specs = dict(_parse_options_pairs(model, "--model"))
    config = ExplainConfig(lam=lam, b=b, steps=steps, samples=samples, layer=layer, images=images, device=device)
    with _stopped_politely("kd explain"):
        res = _call(run_explain, config, out, demo_dir=demo_dir, specs=specs, seeds=seeds, every=every,
                    teacher_path=teacher_path)  # fmt: skip
    _report(f"kd explain (Cheng et al. 2020) on {_count(images, 'digits test image')}", ["model", *METRICS],
            table_rows(res["summary"]), caption=f"{out / 'results.json'}; plots in {out}")  # fmt: skip
    if res.get("problems"):
        _fail(f"the retrained models differ from the demo's: {res['problems']}", code=1)


def _parse_options_pairs(items: list[str], flag: str) -> list[tuple[str, str]]:
    """``NAME=VALUE`` items of a repeatable option -> pairs (names unique)."""
    pairs = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            _fail(f"{flag} {item!r}: expected NAME=VALUE")
        if name in dict(pairs):
            _fail(f"{flag}: the name {name!r} is given twice")
        pairs.append((name, value))
    return pairs


@app.command(short_help="QKD (Kim et al. 2019): an int8 student.")
def qkd(
    ctx: typer.Context,
    teacher: str | None = typer.Option(
        None,
        help="module:factory@WEIGHTS (or local:SPEC) of a trained teacher, co-studied in process; "
        "cache:PATH or server:HOST:PORT (/NAME) can only tutor (add --skip-co-studying). "
        "Left out, a digits teacher is trained here as in `kd demo`.",
    ),
    student: str = typer.Option("kd.models:digits_student", help="module:factory of the (float) student."),
    dataset: str = typer.Option(
        "digits",
        help="Training dataset URI: digits, imagefolder:DIR, npz:FILE, ... (kd.core.data.open_source), streamed.",
    ),
    val_dataset: str | None = typer.Option(
        None, help="Dataset URI to evaluate on; required except for digits, whose default is its test split."
    ),
    workers: int = typer.Option(0, help="Read training batches in this many worker processes (file datasets)."),
    epochs_self: int = typer.Option(6, help="Self-studying epochs: the quantized student alone, cross-entropy."),
    epochs_co: int = typer.Option(20, help="Co-studying epochs: teacher and student learn from each other."),
    epochs_tutor: int = typer.Option(14, help="Tutoring epochs: frozen teacher, student with CE + KD."),
    teacher_epochs: int = typer.Option(40, help="Epochs of a teacher trained here (no --teacher)."),
    lr: float = typer.Option(3e-3, help="Student learning rate (Adam)."),
    teacher_lr: float = typer.Option(1e-4, help="Teacher learning rate in co-studying (Adam)."),
    temperature: float = typer.Option(2.0, "--temperature", "-T", help="KD temperature."),
    alpha: float = typer.Option(0.5, help="KD weight of the student's loss."),
    teacher_alpha: float = typer.Option(0.5, help="KD weight of the teacher's co-studying loss."),
    batch_size: int = typer.Option(32, help="Samples per step, in every phase."),
    seed: int = typer.Option(0, help="Seed of the student's initial weights and the batch order."),
    backend: str = typer.Option("auto", help="Quantized CPU backend: auto, fbgemm, x86 or qnnpack."),
    skip_co_studying: bool = typer.Option(
        False, "--skip-co-studying", help="Skip co-studying when the teacher cannot be trained here (cache/server)."
    ),
    out: Path = typer.Option(Path("qkd-out"), help="Where the int8 student, teacher weights and results.json go."),
    run_dir: Path | None = typer.Option(
        None, help="Each phase's config.json, metrics.csv and checkpoint.pt (every epoch, and when stopped) here."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue --run-dir's run: finished phases loaded, the stopped one from its step."
    ),
) -> None:
    """QKD (Kim et al. 2019): a quantization-aware student trained in three phases, converted to int8."""
    import torch

    from kd.student_trainer.qkd import QKDConfig, quiet_quantization_warnings, train_qkd
    from kd.student_trainer.sources import parse_source
    from kd.student_trainer.train import seed_everything
    from kd.teacher_server.loading import TeacherLoadError, load_teacher, save_weights

    config = QKDConfig(epochs_self=epochs_self, epochs_co=epochs_co, epochs_tutor=epochs_tutor, lr=lr,
                       teacher_lr=teacher_lr, temperature=temperature, alpha=alpha, teacher_alpha=teacher_alpha,
                       batch_size=batch_size, seed=seed, backend=backend, workers=workers,
                       untrainable_teacher="skip" if skip_co_studying else "error")  # fmt: skip
    try:
        config.validate()
    except (ValueError, RuntimeError) as e:
        _fail(str(e))
    _check_run_dir(run_dir, resume, 0)
    _check_dir_out(out, "--out")
    if teacher is not None and _option_source(ctx, "teacher_epochs"):  # it trained with --teacher's as given
        _fail(f"--teacher-epochs {teacher_epochs} applies only to a teacher trained here (no --teacher); with "
              f"--teacher {teacher!r} it would be ignored")  # fmt: skip
    train_data, test_data = _train_and_val(dataset, val_dataset, "kd qkd")
    if teacher is None and (getattr(train_data, "format", "") != "digits" or teacher_epochs < 1):
        _fail("without --teacher a digits teacher is trained here: --dataset digits, --teacher-epochs >= 1")
    out.mkdir(parents=True, exist_ok=True)
    teacher_info: dict[str, object] = {"spec": teacher}
    src = None
    phase_epochs = {"self_studying": epochs_self, "co_studying": epochs_co, "tutoring": epochs_tutor}

    def progress(phase: str, epoch: int, loss: float, acc: float) -> None:  # a long run shows where it is
        console.print(f"qkd {phase} epoch {epoch + 1}/{phase_epochs[phase]}: loss {loss:.4f}, test acc {acc:.4f}",
                      highlight=False)  # fmt: skip

    signals = _stop_signals()
    try:
        if teacher is None:
            from kd.demo import train_digits_teacher

            weights = out / "teacher.safetensors"
            loaded, acc = train_digits_teacher(train_data, test_data, weights, epochs=teacher_epochs,
                                               stop=signals.first)  # fmt: skip
            # (a resume trains it again, the same: seeded; the phases' checkpoints check its weights)
            teacher_obj: object = loaded
            teacher_info = {"spec": loaded.spec, "trained_here": True, "test_acc": acc}
        elif teacher.startswith(("cache:", "server:")):
            kwargs = {"dataset_id": train_data.dataset_id} if teacher.startswith("cache:") else {}
            teacher_obj = src = parse_source(teacher, **kwargs)
        else:
            teacher_obj = load_teacher("qkd", teacher.removeprefix("local:"))
        seed_everything(seed)
        model = _build_student(student)
        result = train_qkd(model, teacher_obj, train_data, test_data, config, on_epoch=progress, stop=signals.first,
                           run_dir=run_dir, resume=resume)  # fmt: skip
    except Stopped as e:
        _stopped_resumable(e, run_dir)
    except TeacherLoadError as e:
        _fail(str(e))
    except (ValueError, RuntimeError, TypeError) as e:
        _fail(_error_text(e))
    finally:
        signals.close(restore_handlers=True)
        if src is not None:
            src.close()
    with quiet_quantization_warnings():
        torch.save(result.int8_model.state_dict(), out / "student-int8.state_dict.pt")
        torch.jit.save(torch.jit.script(result.int8_model), str(out / "student-int8.torchscript.pt"))
    if result.teacher is not None and "co_studying" not in result.skipped and config.epochs_co > 0:
        save_weights(result.teacher, out / "teacher-co-studied.safetensors")
    summary = {**result.summary(), "teacher": teacher_info, "student": student, "dataset": train_data.dataset_id}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    table = Table(title="QKD")
    table.add_column("model")
    table.add_column("test acc", justify="right")
    table.add_column("weight bytes", justify="right")
    table.add_column("state_dict file bytes", justify="right")
    if result.teacher_acc_before is not None:
        table.add_row("teacher (before QKD)", f"{result.teacher_acc_before:.4f}", "", "")
        table.add_row("teacher (after QKD)", f"{result.teacher_acc_after:.4f}", "", "")
    table.add_row("student, fake-quant (QAT, float)", f"{result.float_acc:.4f}", str(result.float_weight_bytes),
                  str(result.float_state_bytes))  # fmt: skip
    table.add_row(f"student, int8 ({result.backend})", f"{result.int8_acc:.4f}", str(result.int8_weight_bytes),
                  str(result.int8_state_bytes))  # fmt: skip
    console.print(table)
    print(json.dumps({"float_acc": result.float_acc, "int8_acc": result.int8_acc, "agreement": result.agreement,
                      "teacher_acc_before": result.teacher_acc_before, "teacher_acc_after": result.teacher_acc_after,
                      "skipped": result.skipped, "out": str(out)}))  # fmt: skip


@app.command()
def online(
    method: str = typer.Argument(
        ..., help="one, okddip, pcl, dcm, od-cheap, oemc, hes, frskd or dist-plus (kd.student_trainer.online)."
    ),
    dataset: str = typer.Option("digits", help="Training dataset URI (kd.core.data.open_source)."),
    val_dataset: str | None = typer.Option(None, help="Evaluation dataset URI; digits defaults to digits:test."),
    epochs: int = typer.Option(150, help="Epochs."),
    labeled: int | None = typer.Option(None, help="Train on this many samples (a seeded draw); all if left out."),
    branches: int = typer.Option(
        3, help="Branches (ONE, PCL), peers besides the leader (OKDDip), students (od-cheap, oemc); DCM: unused."
    ),
    width: int = typer.Option(8, help="CNN width (8: each branch path is kd.models:digits_cnn_student)."),
    opt: list[str] = typer.Option([], "--opt", help="Method option key=value (e.g. temperature=3). Repeatable."),
    batch_size: int = typer.Option(32, help="Samples per step."),
    lr: float = typer.Option(3e-3, help="Learning rate (Adam) of every trained module."),
    seed: int = typer.Option(0, help="Seed of the initial weights, the batch order and the --labeled draw."),
    device: str = typer.Option("cpu", help="Device of the models: cpu, cuda or cuda:N."),
    run_dir: Path | None = typer.Option(None, help="Write config.json, metrics.csv, checkpoint.pt, online.json."),
    teacher: str | None = typer.Option(
        None,
        help="module:factory@WEIGHTS (or local:SPEC) of a pretrained teacher, for methods that need one "
        "(hes: the expert).",
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in --run-dir from its last checkpoint (every module and optimiser)."
    ),
) -> None:
    """Online distillation (ONE, OKDDip, PCL, DCM, od-cheap, OEMC, HES, FRSKD, DIST+): teachers train with
    the students."""
    import torch

    from kd.student_trainer.online import train_online
    from kd.student_trainer.train import TrainConfig

    if min(epochs, batch_size, branches, width, 1 if labeled is None else labeled) < 1 or lr <= 0:
        _fail("--epochs, --batch-size, --branches, --width and --labeled must be >= 1, --lr > 0")
    _check_run_options(seed, device)
    train_data, val_data = _train_and_val(dataset, val_dataset, "kd online")
    subset = None
    if labeled is not None:
        subset = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(1000 + seed))[:labeled]
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device)
    if resume and run_dir is None:
        _fail("--resume continues the run in --run-dir: give --run-dir")
    expert = None
    if teacher is not None and teacher.startswith(("cache:", "server:")):
        _fail(f"--teacher {teacher!r}: online methods run their teacher in this process (dist-plus adapts its "
              "weights, hes reads its maps): a cache holds fixed outputs and a server's weights cannot be trained "
              "from here; give module:factory@WEIGHTS or local:SPEC")  # fmt: skip
    if teacher is not None:
        from kd.teacher_server.loading import TeacherLoadError, load_teacher

        try:
            expert = load_teacher("expert", teacher.removeprefix("local:"), device=device).model
        except TeacherLoadError as e:
            _fail(str(e))
    signals = _stop_signals()
    try:
        result = _call(train_online, method, train_data, val_data, config, branches=branches, width=width,
                       options=_parse_options(opt), subset=subset, run_dir=run_dir, teacher=expert,
                       resume=resume, stop=signals.first)  # fmt: skip
    except Stopped as e:
        if run_dir is None:
            _stopped_exit(e.signum, f"{e.where}; nothing saved (no --run-dir to resume from)")
        _stopped_exit(e.signum, f"{e.where}; checkpoint in {run_dir}: run the same command with --resume to continue")
    finally:
        signals.close(restore_handlers=True)
    ens = "none" if result.ensemble_acc is None else f"{result.ensemble_acc:.4f}"
    _report(f"online: {method}", ["head", "test acc"], [[h, f"{a:.4f}"] for h, a in result.accuracies.items()],
            caption=f"best single head {result.best_branch} {result.best_branch_acc:.4f}; ensemble {ens}")  # fmt: skip
    print(json.dumps(result.summary()))


@app.command()
def peer(
    name: str = typer.Option(..., help="This peer's teacher name on its own server."),
    peer: list[str] = typer.Option(..., "--peer", help="Another peer: HOST:PORT/NAME (PORT may be @PORT_FILE)."),
    model: str = typer.Option("kd.models:digits_cnn_student", help="module:factory of this peer's model."),
    init_seed: int = typer.Option(0, help="Seed of this peer's initialisation (give each peer its own)."),
    serve_port: int = typer.Option(0, help="Port of this peer's own server (0: a free one, see --port-file)."),
    host: str = typer.Option("127.0.0.1", help="Address this peer's server binds."),
    server: str | None = typer.Option(None, help="Publish to this `kd serve --accept-weights` instead of serving."),
    port_file: Path | None = typer.Option(None, help="Write the own server's port here once serving."),
    publish_every: int = typer.Option(1, help="Publish the weights every N steps."),
    max_lag: int | None = typer.Option(
        None,
        help="Bounded staleness: ask a peer again until its weights are at most this many steps old [none: any age].",
    ),
    temperature: float = typer.Option(1.0, help="DML's temperature (the paper: 1)."),
    dataset: str = typer.Option("digits", help="Training dataset URI (kd.core.data.open_source)."),
    val_dataset: str = typer.Option("digits:test", help="Dataset URI this peer is evaluated on."),
    labeled: int | None = typer.Option(100, help="Train on this many samples (kd online's seeded draw)."),
    epochs: int = typer.Option(150, help="Passes over the labelled samples."),
    batch_size: int = typer.Option(32, help="Samples per step."),
    lr: float = typer.Option(3e-3, help="Learning rate (Adam)."),
    seed: int = typer.Option(0, help="Batch order and labelled draw (the same for all peers)."),
    device: str = typer.Option("cpu", help="Device of this peer's model: cpu, cuda or cuda:N."),
    linger: float = typer.Option(3.0, help="After training, serve until no peer asked for this many seconds."),
    json_out: Path | None = typer.Option(None, "--json", help="Write this peer's results here."),
    save: Path | None = typer.Option(None, help="Save the last published weights (safetensors)."),
) -> None:
    """Deep mutual learning with each peer in its own process, through live-updated servers."""
    _check_file_out(json_out, "--json")
    _check_file_out(save, "--save")
    from kd.peers import PeerRun, run_peer

    run = PeerRun(name=name, peers=list(peer), model=model, init_seed=init_seed, serve_port=serve_port, host=host,
                  server=server, port_file=port_file, publish_every=publish_every, max_lag=max_lag,
                  temperature=temperature,
                  dataset=dataset, val_dataset=val_dataset, labeled=labeled, epochs=epochs, batch_size=batch_size,
                  lr=lr, seed=seed, device=device, linger=linger, json_out=json_out, save=save)  # fmt: skip
    with _stopped_politely("kd peer"):
        result = _call(run_peer, run)
    print(json.dumps(result))


@app.command(short_help="GCN distillation with LSP (Yang et al. 2020).")
def graph(
    seeds: int = typer.Option(3, help="Student seeds (CE and LSP students share each seed's initialisation)."),
    epochs: int = typer.Option(40, help="Student epochs."),
    teacher_epochs: int = typer.Option(40, help="Teacher epochs."),
    lsp_weight: float = typer.Option(10.0, help="Weight of the LSP term (the official code: 1.0, on GAT features)."),
    scale: float = typer.Option(2.0, help="L1 kernel scale of LSP (the official code: 100, on PPI's GAT features)."),
    student_hidden: int = typer.Option(4, help="Student width (the teacher: 128, 3 layers)."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the results here."),
) -> None:
    """GCN distillation with the local structure preserving module (Yang et al. 2020) on generated graphs."""
    _check_file_out(json_out, "--json")
    from kd.student_trainer.graph.distill import GraphDistillConfig, run
    from kd.student_trainer.graph.graphs import GraphSpec

    spec = GraphSpec(nodes=150, classes=6, signal=0.45, p_in=0.1, p_out=0.015)
    config = GraphDistillConfig(spec=spec, seeds=seeds, epochs=epochs, teacher_epochs=teacher_epochs,
                                lsp_weight=lsp_weight, scale=scale, student_hidden=student_hidden,
                                train_graphs=10)  # fmt: skip
    with _stopped_politely("kd graph"):
        res = _call(run, config)
    rows = [["teacher GCN", str(res["teacher_params"]), f"{res['teacher_acc']:.4f}"]]
    for n in ("ce", "lsp"):
        rows.append([f"student, {n.upper()}", str(res["student_params"]), _mean_std(res[n]["acc_per_seed"])])
    _report(f"GCN distillation (LSP) on generated graphs, {seeds} seed(s)", ["model", "params", "node accuracy"],
            rows, json_out=json_out, result=res)  # fmt: skip


def _mean_std(values: list[float]) -> str:
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)) ** 0.5
    return f"{mean:.4f} +- {std:.4f}"


@app.command()
def multitask(
    tasks: str = typer.Option("digit,large,ink", help="Comma-separated digits tasks: digit, large (>= 5), ink."),
    seeds: int = typer.Option(3, help="Student seeds (the MTL and KD-MTL students share each seed's start)."),
    epochs: int = typer.Option(30, help="Student epochs."),
    teacher_epochs: int = typer.Option(30, help="Epochs of each single-task teacher."),
    lr: float = typer.Option(3e-3, help="Student (and teacher) learning rate, Adam."),
    adaptor_lr: float = typer.Option(1e-2, help="Adaptors' Adam rate (the authors' code: 0.1, weight decay 5e-4)."),
    dist_weight: float = typer.Option(1.0, help="lambda of every task's feature distillation term."),
    student_width: int = typer.Option(16, help="Student encoder width (the teachers: 16)."),
    served: bool = typer.Option(False, "--served", help="Serve the teachers from a loopback kd teacher server."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the results here."),
) -> None:
    """Knowledge distillation for multi-task learning (Li & Bilen 2020) on digits tasks."""
    _check_file_out(json_out, "--json")
    if epochs < 1 or teacher_epochs < 1:  # as kd train: 0 epochs reported untrained models as results
        _fail(f"--epochs and --teacher-epochs must be >= 1, got {epochs} and {teacher_epochs}")
    from kd.student_trainer.multitask.multitask import MultiTaskConfig, run

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    config = MultiTaskConfig(tasks=names, seeds=seeds, epochs=epochs, teacher_epochs=teacher_epochs, lr=lr,
                             adaptor_lr=adaptor_lr, student_width=student_width, served=served,
                             dist_weights=dict.fromkeys(names, dist_weight))  # fmt: skip
    with _stopped_politely("kd multitask"):
        res = _call(run, config)
    rows = [["single-task teachers", *(f"{res['single_task'][t]:.4f}" for t in names), "0"]]
    for key, label in (("mtl", "multi-task, task losses"), ("kdmtl", "multi-task, KD-MTL")):
        per = res[key]["per_seed"]
        delta = _mean_std(res[key]["delta_mtl_per_seed"])
        rows.append([label, *(_mean_std([m[t] for m in per]) for t in names), delta])
    _report(f"multi-task distillation (KD-MTL) on digits, {seeds} seed(s)",
            ["model", *(f"{t} ({res['metrics'][t]})" for t in names), "delta_MTL %"], rows,
            json_out=json_out, result=res)  # fmt: skip


@app.command(short_help="Task distillation (Zhou et al. 2020).")
def taskdistill(
    seeds: int = typer.Option(3, help="Seeds (each trains source model, proxy, target model and oracle)."),
    epochs: int = typer.Option(30, help="Epochs of every stage."),
    width: int = typer.Option(16, help="CNN width of every model."),
    lr: float = typer.Option(3e-3, help="Adam learning rate."),
    temperature: float = typer.Option(1.0, help="Temperature of the distillation stages' KL."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the results here."),
) -> None:
    """Domain adaptation through task distillation (Zhou et al. 2020): digits -> re-rendered digits."""
    _check_file_out(json_out, "--json")
    if epochs < 1:  # as kd train: 0 epochs reported untrained models as results
        _fail(f"--epochs must be >= 1, got {epochs}")
    from kd.student_trainer.multitask.taskdistill import ROWS, TaskDistillConfig, run

    config = TaskDistillConfig(seeds=seeds, epochs=epochs, width=width, lr=lr, temperature=temperature)
    with _stopped_politely("kd taskdistill"):
        res = _call(run, config)
    where = {"source_model_on_source": "source test", "proxy_on_target_masks": "target test masks"}
    rows = [[row, where.get(row, "target test"), _mean_std([r[row] for r in res["per_seed"]])] for row in ROWS]
    _report(f"task distillation, digits -> re-rendered digits, {seeds} seed(s)", ["model", "evaluated on", "accuracy"],
            rows, json_out=json_out, result=res)  # fmt: skip
