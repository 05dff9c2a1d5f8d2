"""Cross-process deep mutual learning: one peer with its own server (``kd peer``), and the
staleness benchmark (``python -m kd.peers``) behind the README's table.

A peer is a process that starts its own teacher server with live weight updates
(``kd.teacher_server.weights``) on ``--serve-port`` (or publishes to an existing ``kd serve
--accept-weights`` at ``--server``), trains its model by DML against the other peers' servers
(``kd.student_trainer.online.peer_process``) and publishes its weights every N steps.

The benchmark trains the digits pair (``kd.models:digits_cnn_student`` twice, different
initialisations, the same batches) by DML in one process and as two ``kd peer`` processes at
several publish intervals, over seeds, and reports each peer's test top-1.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from kd.core.data import open_source
from kd.core.files import write_text_atomically
from kd.student_trainer.online.peer_process import PeerAddress, build_model, serve_until_quiet, train_dml_local
from kd.student_trainer.online.peer_process import train_peer as _train_peer
from kd.student_trainer.train import TrainConfig

DEFAULT_MODEL = "kd.models:digits_cnn_student"


def labeled_subset(n_train: int, labeled: int | None, seed: int) -> torch.Tensor | None:
    """``kd online``'s seeded draw of the labelled samples (the same for every peer of a seed)."""
    if labeled is None:
        return None
    return torch.randperm(n_train, generator=torch.Generator().manual_seed(1000 + seed))[:labeled]


@dataclass
class PeerRun:
    """One ``kd peer``: what it trains and where it serves and looks for its peers."""

    name: str
    peers: list[str]
    model: str = DEFAULT_MODEL
    init_seed: int = 0
    serve_port: int | None = 0
    host: str = "127.0.0.1"
    server: str | None = None  # publish to this `kd serve --accept-weights` instead of serving
    port_file: Path | None = None
    publish_every: int = 1
    max_lag: int | None = None
    temperature: float = 1.0
    dataset: str = "digits"
    val_dataset: str = "digits:test"
    labeled: int | None = 100
    epochs: int = 150
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0
    device: str = "cpu"
    linger: float = 3.0
    json_out: Path | None = None
    save: Path | None = None

    def problem(self) -> str | None:
        """Why these numbers cannot run, or None: checked before the peer serves or waits for a peer
        (they were checked only once every peer answered; --labeled -1 trained on all but one sample)."""
        if min(self.epochs, self.batch_size) < 1 or (self.labeled is not None and self.labeled < 1):
            sizes = f"{self.epochs}, {self.batch_size}, {self.labeled}"
            return f"--epochs, --batch-size and --labeled must be >= 1, got {sizes}"
        if not (math.isfinite(self.lr) and self.lr > 0):
            return f"--lr must be a finite number > 0, got {self.lr}"
        if not (math.isfinite(self.linger) and self.linger >= 0):
            return f"--linger must be a finite number of seconds >= 0, got {self.linger}"
        if self.serve_port is not None and not 0 <= self.serve_port <= 65535:
            return f"--serve-port must be in 0..65535, got {self.serve_port}"
        for flag, seed in (("--seed", self.seed), ("--init-seed", self.init_seed)):
            if not 0 <= seed < 2**32:
                return f"{flag} must be >= 0 and < 2**32, got {seed}"
        return None


def run_peer(run: PeerRun) -> dict[str, object]:
    """Start the peer's server (unless ``run.server``), train, write the results, and keep
    serving until the other peers stop asking (``run.linger`` seconds without a request)."""
    from safetensors.torch import save_file

    from kd.teacher_server.loading import load_teacher
    from kd.teacher_server.server import TeacherOptions, start_server

    if problem := run.problem():
        raise ValueError(problem)
    peers = [PeerAddress.parse(p) for p in run.peers]
    if not peers:
        raise ValueError("a peer needs at least one other peer (--peer HOST:PORT/NAME)")
    if any(p.name == run.name for p in peers):
        raise ValueError(f"peer name {run.name!r} is also given as a --peer; each peer needs its own name")
    if run.server is None and run.host not in ("127.0.0.1", "localhost", "::1"):
        # its own server takes weight updates and has no token: anyone who reaches it could replace them
        raise ValueError(f"--host {run.host}: a peer's own server accepts weight updates without a token, so it "
                         "binds loopback only; across machines, serve each peer with `kd serve --accept-weights "
                         "--token-file ...` on a private network")  # fmt: skip
    train, test = open_source(run.dataset), open_source(run.val_dataset)
    model = build_model(run.model, run.init_seed)
    running = None
    if run.server is None:
        teacher = load_teacher(run.name, run.model, device=run.device)
        options = TeacherOptions(accept_weights=True, warmup=False, max_queue_delay_us=0, max_batch_size=1024)
        running = start_server([teacher], host=run.host, port=run.serve_port or 0, batching=options)
        if run.port_file is not None:
            write_text_atomically(run.port_file, str(running.port))  # a reader never sees an empty file
    try:
        publish_to = run.server or f"127.0.0.1:{running.port}"
        config = TrainConfig(epochs=run.epochs, batch_size=run.batch_size, lr=run.lr, seed=run.seed,
                             device=run.device)  # fmt: skip
        result = _train_peer(model, train, test, config, name=run.name, publish_to=publish_to, peers=peers,
                             publish_every=run.publish_every, temperature=run.temperature, max_lag=run.max_lag,
                             subset=labeled_subset(len(train), run.labeled, run.seed))  # fmt: skip
        summary = {**result.summary(), "publish_every": run.publish_every, "seed": run.seed,
                   "init_seed": run.init_seed, "model": run.model}  # fmt: skip
        if run.save is not None:
            save_file({k: v.contiguous() for k, v in result.state.items()}, str(run.save))
        if run.json_out is not None:
            write_text_atomically(run.json_out, json.dumps(summary, indent=2))
        if running is not None and run.linger > 0:
            ep = running.endpoints[run.name]
            serve_until_quiet(lambda: ep.batcher.stats.requests, run.linger)
    finally:
        if running is not None:
            running.stop(grace=1.0)
    return summary


# -- the staleness benchmark -------------------------------------------------------------------
def _two_processes(seed: int, publish_every: int, args: argparse.Namespace, work: Path) -> tuple[list, list]:
    """Two ``kd peer`` processes (init seeds 0 and 1, the same batches) -> (test top-1, summaries)."""
    procs, outs = [], []
    for me, other, init in (("a", "b", 0), ("b", "a", 1)):
        out = work / f"{me}-{seed}-{publish_every}.json"
        cmd = [sys.executable, "-m", "kd", "peer", "--name", me, "--model", args.model, "--init-seed", str(init),
               "--serve-port", "0", "--port-file", str(work / f"{me}.port"),
               "--peer", f"127.0.0.1:@{work / f'{other}.port'}/{other}", "--publish-every", str(publish_every),
               "--max-lag", str(publish_every),
               "--epochs", str(args.epochs), "--labeled", str(args.labeled), "--seed", str(seed),
               "--json", str(out)]  # fmt: skip
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        outs.append(out)
    for p in procs:
        _, err = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise RuntimeError(f"kd peer failed ({p.returncode}): {err[-2000:]}")
    for f in work.glob("*.port"):
        f.unlink()
    return [json.loads(o.read_text())["test_acc"] for o in outs], [json.loads(o.read_text()) for o in outs]


def staleness(args: argparse.Namespace) -> dict[str, object]:
    train, test = open_source("digits"), open_source("digits:test")
    rows: dict[str, dict[str, object]] = {}
    local = []
    for seed in range(args.seeds):
        config = TrainConfig(epochs=args.epochs, batch_size=32, lr=3e-3, seed=seed)
        accs = train_dml_local(args.model, train, test, config, init_seeds=(0, 1),
                               subset=labeled_subset(len(train), args.labeled, seed))  # fmt: skip
        local.append(accs)
        print(f"one process, seed {seed}: {accs}", file=sys.stderr)
    rows["one process"] = {"per_seed": local}
    if args.eval_targets:
        local_eval = []
        for seed in range(args.seeds):
            config = TrainConfig(epochs=args.epochs, batch_size=32, lr=3e-3, seed=seed)
            accs = train_dml_local(args.model, train, test, config, init_seeds=(0, 1), eval_targets=True,
                                   subset=labeled_subset(len(train), args.labeled, seed))  # fmt: skip
            local_eval.append(accs)
            print(f"one process, eval-mode targets, seed {seed}: {accs}", file=sys.stderr)
        rows["one process, eval-mode targets"] = {"per_seed": local_eval}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.publish_every:
            per_seed, ages = [], []
            for seed in range(args.seeds):
                accs, details = _two_processes(seed, n, args, Path(tmp))
                per_seed.append(accs)
                ages += [d["mean_peer_age"] for d in details]
                print(f"two processes, publish every {n}, seed {seed}: {accs}", file=sys.stderr)
            rows[f"two processes, publish every {n}"] = {"per_seed": per_seed, "mean_peer_age": statistics.mean(ages)}
    for row in rows.values():
        flat = [a for accs in row["per_seed"] for a in accs]  # type: ignore[union-attr]
        row["mean"], row["std"] = statistics.mean(flat), statistics.stdev(flat) if len(flat) > 1 else 0.0
    return {"model": args.model, "epochs": args.epochs, "labeled": args.labeled, "seeds": args.seeds, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--labeled", type=int, default=100)
    parser.add_argument("--publish-every", type=lambda s: [int(v) for v in s.split(",")], default=[1, 10, 50])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--no-eval-targets", dest="eval_targets", action="store_false",
                        help="Skip the one-process run with eval-mode targets.")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    res = staleness(args)
    print("| DML on digits | peer test top-1 (mean ± std over 2 peers x seeds) | mean age of the other's weights |")
    print("|---|---|---|")
    for name, row in res["rows"].items():  # type: ignore[union-attr]
        age = f"{row['mean_peer_age']:.1f} steps" if "mean_peer_age" in row else "0"
        print(f"| {name} | {row['mean']:.3f} ± {row['std']:.3f} | {age} |")
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
