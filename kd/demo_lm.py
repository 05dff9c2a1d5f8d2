"""``kd demo-lm``: language-model distillation end to end on a corpus every machine has.

1. corpus: the Python standard library's own source files (no download), copied into
   ``OUT/corpus/{train,val}`` as ``.txt`` so the token sources' identity is stable; the
   training and validation files are disjoint;
2. a byte-level causal transformer teacher is trained with next-token CE and saved as
   safetensors, then served in-process on a loopback port (``start_server``);
3. token caches are precomputed *through the server*: dense ``fp16``, the sparse ``topk:K``
   (+ exact rest mass) and ``sample:K`` (Sparse Logit Sampling counts), and (full run)
   ``pca:40@80``, 10 bytes per token (1/50 of fp16) in a stored low-rank basis (``fit_basis``);
4. one smaller student (same seed, same initial weights) is trained with CE only, from each
   cache with per-token forward KL, and on-policy from the live server (GKD);
5. every model's validation perplexity is measured on the same validation tokens, next to
   the cache's bytes per token; ``OUT/results.json`` and a bar chart ``OUT/ppl.png``.

Why: it shows what the sparse codecs cost in student quality against what they save in
storage, and that a served teacher can drive on-policy distillation, at a scale that runs
in minutes on two CPU cores. ``quick=True`` shrinks everything for tests.
"""

from __future__ import annotations

import json
import math
import platform
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from kd.core.data import open_source
from kd.core.tokens import ByteTokenizer, TokenSource, next_token_labels
from kd.precompute import ServerTokenTeacher, precompute_tokens
from kd.student_trainer.losses.token_kd import evaluate_tokens
from kd.student_trainer.onpolicy import OnPolicyConfig, train_onpolicy
from kd.student_trainer.sources import CacheSource
from kd.student_trainer.train import train_tokens

console = Console()
TEACHER_NAME = "teacher"


class ByteLM(nn.Module):
    """A small pre-norm causal transformer over byte ids: tokens ``[B, S]`` -> logits ``[B, S, V]``.

    Learned positions up to ``max_length``; padding is on the right, so the causal mask
    alone keeps real positions from seeing it (the ``attention_mask`` argument the server
    passes is accepted and not needed)."""

    input_shape = (-1,)  # a token teacher (kd.teacher_server.lm)

    def __init__(self, vocab: int = 259, dim: int = 64, layers: int = 2, heads: int = 4, max_length: int = 128) -> None:
        super().__init__()
        self.max_length = max_length
        self.tokenizer_hash = ByteTokenizer().hash
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_length, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)  # fmt: skip
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        s = tokens.shape[1]
        if s > self.max_length:
            raise ValueError(f"sequence of {s} tokens is longer than max_length {self.max_length}")
        x = self.embed(tokens) + self.pos(torch.arange(s, device=tokens.device))
        mask = nn.Transformer.generate_square_subsequent_mask(s, device=tokens.device)
        return self.head(self.norm(self.blocks(x, mask=mask, is_causal=True)))


def byte_lm(dim: int = 64, layers: int = 2, heads: int = 4, max_length: int = 128) -> ByteLM:
    """The factory ``kd serve`` specs name (``kd.demo_lm:byte_lm@WEIGHTS?dim=...``)."""
    return ByteLM(259, dim, layers, heads, max_length)


@dataclass
class Settings:
    train_bytes: int
    val_bytes: int
    file_bytes: int  # at most this much of each stdlib file (more files, more variety)
    block: int
    teacher: dict[str, int]
    student: dict[str, int]
    teacher_epochs: int
    teacher_lr: float
    student_epochs: int
    student_lr: float
    batch_size: int
    codecs: list[str] = field(default_factory=lambda: ["fp16", "topk:16", "sample:32"])


QUICK = Settings(train_bytes=12_000, val_bytes=3_000, file_bytes=3_000, block=32,
                 teacher={"dim": 32, "layers": 1, "heads": 2}, student={"dim": 16, "layers": 1, "heads": 2},
                 teacher_epochs=2, teacher_lr=3e-3, student_epochs=1, student_lr=3e-3, batch_size=16,
                 codecs=["fp16", "topk:8", "sample:16"])  # fmt: skip
FULL = Settings(train_bytes=200_000, val_bytes=30_000, file_bytes=8_000, block=128,
                teacher={"dim": 128, "layers": 2, "heads": 4}, student={"dim": 64, "layers": 1, "heads": 4},
                teacher_epochs=8, teacher_lr=2e-3, student_epochs=4, student_lr=3e-3, batch_size=32,
                codecs=["fp16", "topk:16", "sample:32", "pca:40@80"])  # fmt: skip
BASIS_FIT_POSITIONS = 16_384  # a pca basis is fitted on about this many positions spread over the corpus


def fit_basis(codec: str, teacher: nn.Module, source: TokenSource, block: int, batch_size: int) -> bytes:
    """The low-rank basis of a ``pca:`` cache, fitted (``LowRankCodec.fit_basis``) on the teacher's
    logits at every position of evenly spaced training sequences, about ``BASIS_FIT_POSITIONS``.

    Why not ``precompute_tokens``' own fit: it takes 1,024 positions (spread over the corpus since
    it stopped taking the first ones). When it took the first 1,024, here the first 8 blocks (one
    or two files of the sorted corpus), ``pca:40@80``'s decoded targets on the full demo had a mean
    KL of 0.020 nats per token, against 0.013 from positions all over (this fit)."""
    from kd.cache.codecs import get_codec

    every = max(1, len(source) * block // BASIS_FIT_POSITIONS)
    idx = list(range(0, len(source), every))
    rows: list[torch.Tensor] = []
    teacher.eval()
    with torch.no_grad():
        for lo in range(0, len(idx), batch_size):
            b = source.batch(idx[lo : lo + batch_size])
            z, lengths = teacher(b.tokens), b.attention_mask.sum(dim=1)
            rows += [z[r, : int(lengths[r])] for r in range(len(lengths))]
    return get_codec(codec).fit_basis(torch.cat(rows)).to_bytes()


def stdlib_files() -> list[Path]:
    """The standard library's top-level ``.py`` files that decode as UTF-8, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for f in sorted(root.glob("*.py")):
        try:
            f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        files.append(f)
    if len(files) < 4:
        raise RuntimeError(f"found only {len(files)} readable .py files under {root} (the standard library)")
    return files


def write_corpus(out: Path, s: Settings) -> tuple[Path, Path]:
    """Copy stdlib sources into ``out/train`` (from the front of the sorted list) and ``out/val``
    (from the back), each file cut to ``file_bytes`` characters, until each split has its budget."""
    files = stdlib_files()
    dirs = (out / "train", out / "val")
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("*.txt"):
            old.unlink()

    def fill(d: Path, order: list[Path], budget: int, taken: set[Path]) -> None:
        used = 0
        for f in order:
            if used >= budget:
                return
            if f in taken:
                continue
            text = f.read_text(encoding="utf-8")[: min(s.file_bytes, budget - used)]
            (d / f"{f.stem}.txt").write_text(text, encoding="utf-8")
            taken.add(f)
            used += len(text)

    taken: set[Path] = set()
    fill(dirs[1], list(reversed(files)), s.val_bytes, taken)
    fill(dirs[0], files, s.train_bytes, taken)
    return dirs


def train_ce(
    model: nn.Module, source: TokenSource, *, epochs: int, batch_size: int, lr: float, seed: int
) -> list[float]:
    """Next-token CE training (Adam, shuffled batches, the same loop shape as ``train_tokens``) -> mean
    loss per epoch. For the teacher and the CE-only student."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(source), generator=gen)
        total, n = 0.0, 0
        for lo in range(0, len(order), batch_size):
            b = source.batch(order[lo : lo + batch_size])
            labels = next_token_labels(b.tokens, b.loss_mask)
            logits = model(b.tokens)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            total += float(loss.detach()) * len(b.tokens)
            n += len(b.tokens)
        losses.append(total / max(n, 1))
    return losses


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_demo_lm(out: str | Path, quick: bool = False, seed: int = 0, threads: int = 1) -> dict[str, Any]:
    """Run the whole demo into ``out`` (see the module docstring) -> the results dict (also results.json).

    ``threads``: torch's intra-op threads while it runs (restored after). One by default: the
    models are small (0.5M parameters), and on a shared 2-core machine two threads wait on each
    other: 15 teacher steps took 26-30 s with two and 6-7 s with one (load average ~5), and the
    full demo (with a 4-epoch teacher) 855 s with two, 510 s with one."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_demo_lm(out, quick, seed, threads)
    finally:
        torch.set_num_threads(before)


def _run_demo_lm(out: str | Path, quick: bool, seed: int, threads: int) -> dict[str, Any]:
    from kd.teacher_server.client import TeacherClient
    from kd.teacher_server.loading import load_teacher, save_weights
    from kd.teacher_server.server import TeacherOptions, start_server

    t0 = time.perf_counter()
    s = QUICK if quick else FULL
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_dir, val_dir = write_corpus(out / "corpus", s)
    train = open_source(f"text:{train_dir}?block={s.block}&tokenizer=byte")
    val = open_source(f"text:{val_dir}?block={s.block}&tokenizer=byte")
    if len(train) < s.batch_size or len(val) < 1:
        raise RuntimeError(f"corpus too small: {len(train)} training and {len(val)} validation blocks")
    console.print(f"corpus: {len(train)} training and {len(val)} validation blocks of {s.block} bytes "
                  f"(Python {platform.python_version()} standard library)", highlight=False)  # fmt: skip
    rows: list[dict[str, Any]] = []

    def evaluate(name: str, model: nn.Module, started: float, **extra: Any) -> dict[str, Any]:
        m = evaluate_tokens(model, val, batch_size=32)
        row = {"name": name, "ppl": m.perplexity, "val_tokens": m.tokens, "seconds": time.perf_counter() - started,
               **extra}  # fmt: skip
        rows.append(row)
        console.print(f"{name}: val ppl {m.perplexity:.3f} ({row['seconds']:.1f} s)", highlight=False)
        return row

    # 1. The teacher: CE on the training split, saved, then served.
    started = time.perf_counter()
    teacher_cfg = {**s.teacher, "max_length": s.block}
    torch.manual_seed(seed)
    teacher = byte_lm(**teacher_cfg)
    train_ce(teacher, train, epochs=s.teacher_epochs, batch_size=s.batch_size, lr=s.teacher_lr, seed=seed)
    weights = save_weights(teacher, out / "teacher.safetensors")
    spec = f"kd.demo_lm:byte_lm@{weights}?" + "&".join(f"{k}={v}" for k, v in teacher_cfg.items())
    evaluate("teacher", teacher, started, params=_params(teacher))

    student_cfg = {**s.student, "max_length": s.block}

    def fresh_student() -> ByteLM:
        torch.manual_seed(seed + 1)  # every student starts from the same weights
        return byte_lm(**student_cfg)

    served = load_teacher(TEACHER_NAME, spec)
    running = start_server([served], batching=TeacherOptions(max_batch_tokens=max(4096, s.block * s.batch_size),
                                                             max_batch_size=s.batch_size, warmup=False))  # fmt: skip
    address = f"127.0.0.1:{running.port}"
    codecs: dict[str, dict[str, float]] = {}
    try:
        # 2. CE only.
        started = time.perf_counter()
        student = fresh_student()
        train_ce(student, train, epochs=s.student_epochs, batch_size=s.batch_size, lr=s.student_lr, seed=seed)
        # bytes_per_token None, shown "-": CE reads no teacher targets, so a figure (0.0) would be no measurement.
        evaluate("ce", student, started, params=_params(student), bytes_per_token=None)

        # 3. A cache per codec, precomputed through the server, and a KD student from each.
        for codec in s.codecs:
            started = time.perf_counter()
            path = out / "caches" / codec.replace(":", "-")
            basis = fit_basis(codec, teacher, train, s.block, s.batch_size) if codec.startswith("pca:") else None
            remote = ServerTokenTeacher(address, TEACHER_NAME)
            try:
                precompute_tokens(train, remote, path, codec=codec, batch_size=s.batch_size, basis=basis)
            finally:
                remote.close()
            cache = CacheSource(str(path))
            bpt = float(cache.reader.token_stats()["bytes_per_token"])
            student = fresh_student()
            train_tokens(student, train, cache, method="token-fkl", epochs=s.student_epochs, batch_size=s.batch_size,
                         lr=s.student_lr, seed=seed)  # fmt: skip
            row = evaluate(f"kd {codec}", student, started, bytes_per_token=bpt, codec=codec)
            codecs[codec] = {"ppl": row["ppl"], "bytes_per_token": bpt}

        # 4. On-policy (GKD) from the live server, as many optimiser steps as a KD student takes.
        started = time.perf_counter()
        student = fresh_student()
        steps = s.student_epochs * math.ceil(len(train) / s.batch_size)
        cfg = OnPolicyConfig(steps=steps, batch_size=s.batch_size, prompt_tokens=s.block // 4,
                             max_new_tokens=s.block - s.block // 4, lmbda=0.5, lr=s.student_lr, seed=seed,
                             eval_prompts=0)  # fmt: skip
        with TeacherClient(address) as client:
            res = train_onpolicy(student, client, TEACHER_NAME, train, cfg)
        evaluate("on-policy", student, started, steps=steps, on_policy_batches=res.on_policy_batches,
                 tokens_scored=res.tokens_scored)  # fmt: skip
    finally:
        running.stop(grace=1)

    by = {r["name"]: r for r in rows}
    result = {
        "teacher_ppl": by["teacher"]["ppl"],
        "student_ce_ppl": by["ce"]["ppl"],
        "student_kd_ppl": by[f"kd {s.codecs[0]}"]["ppl"],  # full KD: the dense fp16 cache
        "student_onpolicy_ppl": by["on-policy"]["ppl"],
        "codecs": codecs,
        "rows": rows,
        "seconds": time.perf_counter() - t0,
        "quick": quick,
        "seed": seed,
        "threads": threads,
        "teacher": {"spec": spec, "weights": str(weights), "config": teacher_cfg, "params": _params(teacher)},
        "student": {"config": student_cfg, "params": _params(fresh_student())},
        "corpus": {"python": platform.python_version(), "stdlib": sysconfig.get_paths()["stdlib"],
                   "train_blocks": len(train), "val_blocks": len(val), "block": s.block,
                   "train_dataset_id": train.dataset_id, "val_dataset_id": val.dataset_id},
    }  # fmt: skip
    try:
        _plot(rows, out / "ppl.png")
        result["plot"] = str(out / "ppl.png")
    except ImportError:  # matplotlib is optional
        result["plot"] = None
    (out / "results.json").write_text(json.dumps(result, indent=2))
    return result


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    names = [r["name"] for r in rows]
    ax.bar(names, [r["ppl"] for r in rows], color=["k"] + ["C0"] * (len(rows) - 1))
    ax.set_ylabel("validation perplexity (bytes)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def print_report(result: dict[str, Any]) -> None:
    """The demo's table: validation perplexity and bytes per token of each model ("-" where a row
    reads no cache: the teacher, the CE student and the on-policy one)."""
    table = Table(title=f"kd demo-lm: byte-level LM on the Python standard library ({result['seconds']:.0f} s)")
    for col in ("model", "val ppl", "bytes/token", "val tokens", "seconds"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in result["rows"]:
        bpt = r.get("bytes_per_token")
        table.add_row(r["name"], f"{r['ppl']:.3f}", "-" if bpt is None else f"{bpt:.1f}", str(r["val_tokens"]),
                      f"{r['seconds']:.1f}")  # fmt: skip
    console.print(table)
