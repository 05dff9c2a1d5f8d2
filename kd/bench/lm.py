"""``kd bench lm``: a token (language-model) teacher served against the same model in-process,
and what its soft targets cost to keep, in one run.

Absolute rates depend on the machine and its neighbours, so the results that matter are
ratios of windows measured in the same run: for each load, an in-process window and a
served window, alternated (ABBA) over ``rounds``, the ratio being the median of the
per-round ratios of **real tokens per second** (padding never counts as work done).

Loads (each the same padded batches on both sides; the teacher a byte-level causal
transformer, ``kd.demo_lm.ByteLM``, random init: throughput does not depend on training):

* ``b1``: one client, batch 1 x ``length`` tokens, asking top-k + log-sum-exp (what a
  ``topk:K`` cache keeps);
* ``b16``: one client, batch 16 x ``length``, top-k; ``b16_fp16``: the same batches asking
  full fp16 logits (what an ``fp16`` cache keeps);
* ``mixed``: ``mixed_clients`` concurrent clients, each sending batch ``mixed_batch`` of
  lengths drawn uniformly from ``mixed_lengths``, top-k. In-process, each client batch is
  one forward padded to its longest row; served, the token-budget batcher
  (``max_batch_tokens``) regroups the rows of all clients by length, so the padding it
  computes (``kd_padding_positions_total`` / ``kd_token_positions_total``, read from the server's
  metrics) can be smaller than the clients' own, and the ratio can exceed 1.

In-process work per batch: the forward, then the same post-processing the server does at
every real position (top-k values/ids and the log-sum-exp, or the logits cast to fp16).
The server runs in this process (``start_server`` on a loopback port; its model thread
has the same torch threads as the in-process loop) and the clients are threads with one
channel each, so client, RPC and model share one interpreter: the ratio prices what
serving costs on one machine, not a remote client's view. Each served window starts after
every client has had one answer (connection set-up stays out) and ends when the last
request started before its end is answered; the server's counters are read at both ends,
so they cover exactly the window's requests (the tokens the clients count equal the real
positions the server counts).

Bytes per token per codec: for the model's vocabulary, measured from token caches that
``kd.precompute.precompute_tokens`` writes through the server into a temporary directory
(``CacheReader.token_stats``: one record per sequence, header + length + crc included); for
32k and 50k vocabularies, computed from ``kd.cache.codecs`` at the same sequence length.

With ``hf`` and ``transformers`` importable, a tiny GPT-2 (vocabulary 50257, built from a
config saved to a temporary directory, served as ``hf:DIR``) adds the ``hf_b16`` load.
"""

from __future__ import annotations

import platform
import sysconfig
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from kd.bench import report_console
from kd.bench.serve import _device_name, default_threads

console = Console(stderr=True, soft_wrap=True)  # each line whole in a log, as kd.cli's

TEACHER_NAME = "lm"
HF_NAME = "gpt2"
CODECS = ("fp32", "fp16", "q8", "q4", "topk:16", "sample:16", "rand:64")
LARGE_VOCABS = (32000, 50257)
SEQUENCE_HEADER = 4  # the u32 position count in front of a token record's rows (kd.cache.store)


@dataclass(frozen=True)
class LMBenchSettings:
    seconds: float = 2.0  # measured window per side and round
    rounds: int = 3  # alternated in-process / served windows behind each ratio
    dim: int = 128  # the ByteLM teacher
    layers: int = 2
    heads: int = 4
    max_length: int = 512
    length: int = 128  # the b1 / b16 loads
    big_batch: int = 16
    mixed_clients: int = 8
    mixed_batch: int = 4
    mixed_lengths: tuple[int, int] = (16, 512)
    batches_per_client: int = 4  # distinct batches each client cycles through
    max_batch_tokens: int = 4096
    max_queue_delay_us: int = 2000
    top_k: int = 16
    corpus_bytes: int = 16_384  # text precomputed into each codec's cache
    block: int = 128  # tokens per cached sequence
    codecs: tuple[str, ...] = CODECS
    hf: bool = True  # also a tiny GPT-2 through `hf:DIR` when transformers imports
    device: str = "cpu"
    threads: int = 0  # torch threads of the model thread and of the in-process loop; 0 = default_threads()
    seed: int = 0

    @classmethod
    def make(cls, quick: bool, **overrides: Any) -> LMBenchSettings:
        """The full settings, or the ``--quick`` ones (seconds, for tests); ``None`` overrides are ignored."""
        base = cls()
        if quick:
            base = cls(seconds=0.2, rounds=2, dim=32, layers=1, heads=2, max_length=128, length=64,
                       mixed_lengths=(8, 128), batches_per_client=2, max_batch_tokens=1024, corpus_bytes=512,
                       block=32, codecs=("fp16", "q4", "topk:8"), hf=False)  # fmt: skip
        return cls(**{**asdict(base), **{k: v for k, v in overrides.items() if v is not None}})

    def check(self) -> None:
        lo, hi = self.mixed_lengths
        if min(self.seconds, self.rounds, self.length, self.big_batch, self.mixed_clients, self.mixed_batch,
               self.batches_per_client, self.top_k, self.block) <= 0 or not 1 <= lo <= hi:  # fmt: skip
            raise ValueError("every size, count and duration must be > 0, and mixed lengths 1 <= lo <= hi")
        longest = max(self.length, hi)
        if longest > self.max_length:
            raise ValueError(f"loads of up to {longest} tokens for a teacher of max_length {self.max_length}")
        if self.max_batch_tokens < max(self.big_batch * self.length, hi):
            raise ValueError(f"max_batch_tokens {self.max_batch_tokens} < {self.big_batch} x {self.length}: the b16 "
                             "load would not run as one forward (as it does in-process)")  # fmt: skip


# -- loads -----------------------------------------------------------------------------------


@dataclass
class Batch:
    tokens: torch.Tensor  # int64 [B, S], right-padded
    lengths: list[int]

    @property
    def real(self) -> int:
        return sum(self.lengths)

    @property
    def padded(self) -> int:
        return self.tokens.shape[0] * self.tokens.shape[1]


@dataclass
class Load:
    name: str
    teacher: str  # served name
    output: str  # "topk" or "fp16"
    clients: list[list[Batch]]  # per client, the batches it cycles through
    shape: str = ""  # clients x batch x tokens, for the report

    @property
    def batches(self) -> list[Batch]:
        """Every client's batches, interleaved (what the in-process loop runs, in this order)."""
        out = []
        for j in range(max(len(c) for c in self.clients)):
            out.extend(c[j] for c in self.clients if j < len(c))
        return out


def _batch(g: torch.Generator, vocab: int, lengths: list[int]) -> Batch:
    width = max(lengths)
    tokens = torch.randint(0, vocab, (len(lengths), width), generator=g)
    for r, n in enumerate(lengths):
        tokens[r, n:] = 0
    return Batch(tokens, lengths)


def make_loads(s: LMBenchSettings, vocab: int, hf_vocab: int | None) -> list[Load]:
    g = torch.Generator().manual_seed(s.seed)
    n = s.batches_per_client

    def fixed(batch: int, length: int, v: int) -> list[list[Batch]]:
        return [[_batch(g, v, [length] * batch) for _ in range(n)]]

    lo, hi = s.mixed_lengths
    mixed = [
        [_batch(g, vocab, torch.randint(lo, hi + 1, (s.mixed_batch,), generator=g).tolist()) for _ in range(n)]
        for _ in range(s.mixed_clients)
    ]
    b16 = fixed(s.big_batch, s.length, vocab)
    big = f"1 x {s.big_batch} x {s.length}"
    loads = [
        Load("b1", TEACHER_NAME, "topk", fixed(1, s.length, vocab), f"1 x 1 x {s.length}"),
        Load("b16", TEACHER_NAME, "topk", b16, big),
        Load("b16_fp16", TEACHER_NAME, "fp16", b16, big),
        Load("mixed", TEACHER_NAME, "topk", mixed, f"{s.mixed_clients} x {s.mixed_batch} x {lo}..{hi}"),
    ]
    if hf_vocab is not None:
        loads.append(Load("hf_b16", HF_NAME, "topk", fixed(s.big_batch, s.length, hf_vocab), big))
    return loads


# -- windows ---------------------------------------------------------------------------------


def _inprocess(model: torch.nn.Module, hf: bool, load: Load, s: LMBenchSettings, device: torch.device) -> dict:
    """The forward + the server's post-processing over the load's batches, in a loop, for
    ``s.seconds`` (after one warm-up batch); counts the real tokens of completed batches."""
    from kd.teacher_server.lm import call_model

    cuda = device.type == "cuda"
    batches = load.batches
    masks = [torch.arange(b.tokens.shape[1]).unsqueeze(0) < torch.tensor(b.lengths).unsqueeze(1) for b in batches]

    def one(i: int) -> None:
        b, mask = batches[i], masks[i]
        ids, m = (b.tokens.to(device), mask.to(device)) if cuda else (b.tokens, mask)
        z = call_model(model, ids, m, hf)[m]
        if load.output == "fp16":
            out = [z.to(torch.float16)]
        else:
            values, idx = z.topk(s.top_k, dim=-1)
            out = [values, idx.to(torch.int32), torch.logsumexp(z, dim=-1)]
        if cuda:
            for t in out:
                t.cpu()

    with torch.inference_mode():
        one(0)
        tokens = requests = 0
        begin = time.monotonic()
        end = begin + s.seconds
        i = 0
        while time.monotonic() < end:
            one(i % len(batches))
            tokens += batches[i % len(batches)].real
            requests += 1
            i += 1
        elapsed = time.monotonic() - begin
    padded = sum(batches[j % len(batches)].padded for j in range(requests))
    return {"tokens": tokens, "requests": requests, "seconds": elapsed, "tokens_per_s": tokens / elapsed,
            "padding_share": 1.0 - tokens / padded if padded else 0.0}  # fmt: skip


def _counters(running: Any, teacher: str) -> dict[str, float]:
    """The server's token, forward and reply counters for ``teacher`` (its Prometheus registry)."""
    reg = running.metrics.registry
    label = {"teacher": teacher}

    def get(name: str) -> float:
        return float(reg.get_sample_value(name, label) or 0.0)

    return {
        "positions": get("kd_token_positions_total"),
        "padding": get("kd_padding_positions_total"),
        "forwards": get("kd_forwards_total"),
        "rows": get("kd_batch_size_sum"),
        "reply_bytes": get("kd_reply_bytes_total"),
    }


def _served(clients: list[Any], running: Any, load: Load, s: LMBenchSettings) -> dict:
    """Every client (a thread, its own channel) sends its batches in a loop for ``s.seconds``;
    the window starts once all had one answer and ends when the last request is answered."""
    n = len(load.clients)
    kw: dict[str, Any] = {"logits": True, "dtype": torch.float16} if load.output == "fp16" else \
        {"top_k": s.top_k, "sparse_temperature": 1.0}  # fmt: skip
    ready = threading.Barrier(n + 1)
    go = threading.Event()
    when: list[float] = [0.0]
    done: list[tuple[int, int, float] | None] = [None] * n
    errors: list[BaseException] = []

    def call(i: int, b: Batch) -> None:
        out = clients[i].infer_tokens(load.teacher, b.tokens, lengths=b.lengths, **kw)
        if int(out.positions.sum()) != b.real:
            raise RuntimeError(f"the server answered {int(out.positions.sum())} positions for {b.real} tokens")

    def run(i: int) -> None:
        try:
            batches = load.clients[i]
            call(i, batches[0])  # connection and first-call costs stay out of the window
        except BaseException as e:  # noqa: BLE001 - re-raised by the caller
            errors.append(e)
            ready.abort()
            return
        try:
            ready.wait()
        except threading.BrokenBarrierError:
            return
        go.wait()
        end = when[0] + s.seconds
        tokens = requests = 0
        try:
            while time.monotonic() < end:
                b = batches[requests % len(batches)]
                call(i, b)
                tokens += b.real
                requests += 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        done[i] = (tokens, requests, time.monotonic())

    threads = [threading.Thread(target=run, args=(i,), daemon=True, name=f"client-{i}") for i in range(n)]
    for t in threads:
        t.start()
    try:
        ready.wait()
    except threading.BrokenBarrierError:
        for t in threads:
            t.join()
        raise RuntimeError(f"load {load.name}: a client failed before the window: {errors[0]!r}") from errors[0]
    before = _counters(running, load.teacher)
    when[0] = time.monotonic()
    go.set()
    for t in threads:
        t.join()
    after = _counters(running, load.teacher)
    if errors:
        raise RuntimeError(f"load {load.name}: a client failed: {errors[0]!r}") from errors[0]
    got = [d for d in done if d is not None]
    tokens = sum(d[0] for d in got)
    elapsed = max(d[2] for d in got) - when[0]
    c = {k: after[k] - before[k] for k in after}
    return {
        "tokens": tokens,
        "requests": sum(d[1] for d in got),
        "seconds": elapsed,
        "tokens_per_s": tokens / elapsed,
        "server": c,
        "padding_share": c["padding"] / c["positions"] if c["positions"] else 0.0,
        "rows_per_forward": c["rows"] / c["forwards"] if c["forwards"] else None,
        "reply_bytes_per_token": c["reply_bytes"] / tokens if tokens else None,
    }


# -- bytes per token ---------------------------------------------------------------------------


def _corpus(directory: Path, nbytes: int) -> Path:
    """The standard library's first ``.py`` files (sorted), ``nbytes`` characters in all:
    text every machine has."""
    root = Path(sysconfig.get_paths()["stdlib"])
    directory.mkdir(parents=True, exist_ok=True)
    used = 0
    for f in sorted(root.glob("*.py")):
        if used >= nbytes:
            break
        try:
            text = f.read_text(encoding="utf-8")[: nbytes - used]
        except (UnicodeDecodeError, OSError):
            continue
        (directory / f"{f.stem}.txt").write_text(text, encoding="utf-8")
        used += len(text)
    return directory


def computed_bytes_per_token(codec: str, vocab: int, length: int) -> float:
    """Bytes per token of a token record of ``length`` positions: the codec's row per
    position, plus the record overhead (header, crc) and the u32 length once per sequence."""
    from kd.cache.codecs import RECORD_OVERHEAD, get_codec

    return get_codec(codec).record_bytes(vocab) + (RECORD_OVERHEAD + SEQUENCE_HEADER) / length


def _caches(address: str, s: LMBenchSettings, tmp: Path) -> dict[str, dict[str, float]]:
    """Precompute the corpus through the server into one token cache per codec; their stats."""
    from kd.cache.store import CacheReader
    from kd.core.data import open_source
    from kd.precompute import ServerTokenTeacher, precompute_tokens

    source = open_source(f"text:{_corpus(tmp / 'corpus', s.corpus_bytes)}?block={s.block}&tokenizer=byte")
    out: dict[str, dict[str, float]] = {}
    for codec in s.codecs:
        path = tmp / "caches" / codec.replace(":", "-")
        remote = ServerTokenTeacher(address, TEACHER_NAME)
        t0 = time.perf_counter()
        try:
            precompute_tokens(source, remote, path, codec=codec, batch_size=16)
        finally:
            remote.close()
        seconds = time.perf_counter() - t0
        stats = CacheReader(path).token_stats()
        out[codec] = {**{k: float(v) for k, v in stats.items()}, "seconds": seconds,
                      "tokens_per_s": stats["positions"] / seconds}  # fmt: skip
    return out


def _tiny_gpt2(directory: Path, s: LMBenchSettings) -> Path | None:
    """A GPT-2 with the real vocabulary (50257) and a small body, random init, saved as
    config + safetensors; None without ``transformers``."""
    try:
        import transformers
    except ImportError:
        return None
    torch.manual_seed(s.seed)
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=s.max_length, n_embd=s.dim, n_layer=s.layers,
                                  n_head=s.heads)  # fmt: skip
    transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(str(directory), safe_serialization=True)
    return directory


# -- the run -------------------------------------------------------------------------------------


def run_bench(settings: LMBenchSettings) -> dict[str, Any]:
    """Run every load and the caches; returns the results (what ``--json`` writes)."""
    from kd.demo_lm import byte_lm
    from kd.teacher_server.client import TeacherClient
    from kd.teacher_server.lm import load_token_teacher
    from kd.teacher_server.loading import load_teacher
    from kd.teacher_server.server import TeacherOptions, start_server

    s = settings
    s.check()
    t_start = time.perf_counter()
    threads = s.threads or default_threads()
    torch.set_num_threads(threads)
    device = torch.device(s.device)
    torch.manual_seed(s.seed)
    cfg = {"dim": s.dim, "layers": s.layers, "heads": s.heads, "max_length": s.max_length}
    spec = "kd.demo_lm:byte_lm?" + "&".join(f"{k}={v}" for k, v in cfg.items())
    teacher = load_token_teacher(TEACHER_NAME, spec, device=s.device, model=byte_lm(**cfg))
    vocab = int(teacher.num_classes)
    params = sum(p.numel() for p in teacher.model.parameters())
    with tempfile.TemporaryDirectory(prefix="kd-bench-lm-") as tmp_name:
        tmp = Path(tmp_name)
        teachers = [teacher]
        hf_dir = _tiny_gpt2(tmp / "gpt2", s) if s.hf else None
        hf_teacher = load_teacher(HF_NAME, f"hf:{hf_dir}", device=s.device) if hf_dir is not None else None
        if hf_teacher is not None:
            teachers.append(hf_teacher)
        models = {t.name: (t.model, t.signature.extra.get("source") == "hf") for t in teachers}
        hf_vocab = int(hf_teacher.num_classes) if hf_teacher is not None else None
        loads = make_loads(s, vocab, hf_vocab)
        console.print(
            f"teacher {spec}: {params / 1e6:.2f}M parameters, vocabulary {vocab}"
            + (f"; {HF_NAME} hf:DIR, vocabulary {hf_vocab}" if hf_teacher is not None else "")
            + f"; on {device}, torch threads {threads}; {s.seconds:g} s windows, {s.rounds} round(s) per ratio",
            highlight=False,
        )
        options = TeacherOptions(max_batch_tokens=s.max_batch_tokens, max_queue_delay_us=s.max_queue_delay_us,
                                 max_batch_size=256, threads=threads)  # fmt: skip
        running = start_server(teachers, port=0, batching=options)
        address = f"127.0.0.1:{running.port}"
        clients = [TeacherClient(address, timeout=120.0) for _ in range(max(len(ld.clients) for ld in loads))]
        rounds: dict[str, list[dict]] = {ld.name: [] for ld in loads}
        try:
            for c in clients:
                c.wait_ready(60.0)
            if clients[0].describe(TEACHER_NAME).fingerprint != running.endpoints[TEACHER_NAME].fingerprint:
                raise RuntimeError("the client sees another fingerprint than the server's endpoint has")
            for r in range(s.rounds):
                for ld in loads:
                    model, hf = models[ld.teacher]
                    sides: dict[str, dict] = {}
                    order = ("inprocess", "served") if r % 2 == 0 else ("served", "inprocess")
                    for side in order:
                        if side == "inprocess":
                            sides[side] = _inprocess(model, hf, ld, s, device)
                        else:
                            sides[side] = _served(clients, running, ld, s)
                    ratio = sides["served"]["tokens_per_s"] / sides["inprocess"]["tokens_per_s"]
                    rounds[ld.name].append({"round": r, "order": list(order), **sides, "ratio": ratio})
                    console.print(
                        f"  round {r + 1}/{s.rounds} {ld.name}: in-process {sides['inprocess']['tokens_per_s']:,.0f}, "
                        f"served {sides['served']['tokens_per_s']:,.0f} tokens/s ({ratio:.3f})",
                        highlight=False,
                    )
            console.print(f"precomputing {len(s.codecs)} token caches through the server ...", highlight=False)
            caches = _caches(address, s, tmp)
        finally:
            for c in clients:
                c.close()
            running.stop(grace=5.0)

    results_loads: dict[str, dict] = {}
    for ld in loads:
        rs = rounds[ld.name]
        served = [x["served"] for x in rs]
        srv = {k: sum(x["server"][k] for x in served) for k in served[0]["server"]}
        tokens = sum(x["tokens"] for x in served)
        results_loads[ld.name] = {
            "shape": ld.shape,
            "teacher": ld.teacher,
            "output": ld.output,
            "clients": len(ld.clients),
            "batch": ld.clients[0][0].tokens.shape[0],
            "lengths": sorted({n for c in ld.clients for b in c for n in b.lengths}),
            "ratio": float(np.median([x["ratio"] for x in rs])),
            "inprocess_tokens_per_s": float(np.mean([x["inprocess"]["tokens_per_s"] for x in rs])),
            "served_tokens_per_s": float(np.mean([x["tokens_per_s"] for x in served])),
            "padding_share": srv["padding"] / srv["positions"] if srv["positions"] else 0.0,
            "inprocess_padding_share": 1.0 - sum(b.real for b in ld.batches) / sum(b.padded for b in ld.batches),
            "rows_per_forward": srv["rows"] / srv["forwards"] if srv["forwards"] else None,
            "positions_per_forward": srv["positions"] / srv["forwards"] if srv["forwards"] else None,
            "rows_per_request": sum(len(b.lengths) for b in ld.batches) / len(ld.batches),
            "reply_bytes_per_token": srv["reply_bytes"] / tokens if tokens else None,
            "server": srv,
            "rounds": rs,
        }
    out: dict[str, Any] = {f"served_over_inprocess_{name}": v["ratio"] for name, v in results_loads.items()}
    mixed = results_loads["mixed"]
    out.update({
        "padding_share_mixed": mixed["padding_share"],
        "inprocess_padding_share_mixed": mixed["inprocess_padding_share"],
        "rows_per_forward_mixed": mixed["rows_per_forward"],
        "bytes_per_token": {c: v["bytes_per_token"] for c, v in caches.items()},
        "bytes_per_token_computed": {
            str(v): {c: computed_bytes_per_token(c, v, s.block) for c in s.codecs} for v in (vocab, *LARGE_VOCABS)
        },
        "caches": caches,
        "vocab_size": vocab,
        "loads": results_loads,
        "settings": {**asdict(s), "threads": threads},
        "torch_threads": threads,
        "device": str(device),
        "device_name": _device_name(device),
        "teacher": {"spec": spec, "parameters": params, "fingerprint": teacher.fingerprint},
        "hf_teacher": None if hf_teacher is None else {
            "vocab_size": hf_vocab, "parameters": sum(p.numel() for p in hf_teacher.model.parameters()),
            "fingerprint": hf_teacher.fingerprint},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "seconds": round(time.perf_counter() - t_start, 1),
    })  # fmt: skip
    return out


def print_report(results: dict[str, Any], out: Console | None = None) -> None:
    """The loads as a table, then bytes per token per codec."""
    out = report_console(out, width=150)
    s = results["settings"]
    table = Table(
        title=f"kd bench lm: {results['teacher']['spec']} ({results['teacher']['parameters'] / 1e6:.2f}M) on "
        f"{results['device']} ({results['device_name']}), torch threads {results['torch_threads']}, "
        f"max_batch_tokens {s['max_batch_tokens']}, {s['seconds']:g} s windows"
    )
    for col in ("load", "clients x batch x tokens", "asks", "in-process tok/s", "served tok/s", "served / in-process",
                "per round", "padding server", "padding batches", "rows / fwd", "reply B / tok"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("load", "clients x batch x tokens", "asks", "per round")
                         else "right")  # fmt: skip
    for name, ld in results["loads"].items():
        teacher = results["hf_teacher"] if ld["teacher"] != TEACHER_NAME else None
        asks = f"top-{s['top_k']} + lse" if ld["output"] == "topk" else "fp16 logits"
        table.add_row(
            name + (f" (GPT-2, V={teacher['vocab_size']})" if teacher else ""),
            ld["shape"],
            asks,
            f"{ld['inprocess_tokens_per_s']:,.0f}",
            f"{ld['served_tokens_per_s']:,.0f}",
            f"{ld['ratio']:.3f}",
            ", ".join(f"{x['ratio']:.2f}" for x in ld["rounds"]),
            f"{ld['padding_share']:.3f}",
            f"{ld['inprocess_padding_share']:.3f}",
            "-" if ld["rows_per_forward"] is None else f"{ld['rows_per_forward']:.1f}",
            "-" if ld["reply_bytes_per_token"] is None else f"{ld['reply_bytes_per_token']:,.0f}",
        )
    out.print(table)
    out.print("tok/s: real tokens per second (padding excluded). padding server: kd_padding_positions_total / "
              "kd_token_positions_total over the served windows (the token-budget batcher's forwards); padding "
              "batches: the clients' own padded batches, as the in-process loop runs them. rows / fwd: rows per "
              "server forward.",
              highlight=False)  # fmt: skip
    vocab = results["vocab_size"]
    computed = results["bytes_per_token_computed"]
    codecs = Table(title=f"bytes per token per codec ({s['block']}-token sequences; measured: token caches "
                         f"precomputed through the server, V = {vocab})")  # fmt: skip
    codecs.add_column("codec", justify="left")
    codecs.add_column(f"V={vocab} measured", justify="right")
    codecs.add_column("x smaller than fp16", justify="right")
    others = [v for v in computed if v != str(vocab)]
    for v in others:
        codecs.add_column(f"V={v}", justify="right")
    fp16 = results["bytes_per_token"].get("fp16")
    for c, bpt in results["bytes_per_token"].items():
        codecs.add_row(c, f"{bpt:,.2f}", f"{fp16 / bpt:.1f}" if fp16 else "-",
                       *(f"{computed[v][c]:,.2f}" for v in others))  # fmt: skip
    out.print(codecs)
