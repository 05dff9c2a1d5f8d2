"""Language-model (token) teachers: loading, a token-budget batcher, per-position outputs.

A **token teacher** maps token ids ``[B, S]`` (int64) and an attention mask ``[B, S]``
to logits ``[B, S, V]``; it is called as ``model(tokens, attention_mask=mask)`` and its
output is unwrapped by ``kd.core.factory.logits_of`` (a tensor, ``.logits``, ...). Two
ways to load one:

* ``hf:DIR[?task=causal-lm|masked-lm]``: a Hugging Face ``AutoModelForCausalLM`` /
  ``AutoModelForMaskedLM`` from a *local* directory (``config.json`` + safetensors
  weights; never a download, never ``trust_remote_code``, never a pickled
  ``pytorch_model.bin``). Needs ``transformers`` (``pip install -e '.[lm]'`` in kd's repository). The task
  comes from the config's ``architectures`` unless given.
* ``module:factory[@WEIGHTS][?input_shape=-1&...]``: any module with that signature;
  ``input_shape=-1`` (or a model attribute ``input_shape = (-1,)``) marks it a token
  teacher. Optional model attributes: ``max_length`` (int) and ``tokenizer_hash`` (str).

Its signature: ``tokens: int64 [S] -> logits: float32 [S, V]`` with ``extra`` facts
``kind=tokens``, ``task``, ``vocab_size``, ``max_length`` (0: not bounded) and
``tokenizer`` (sha256/16 over the tokenizer files of the directory, when it has any).
The target fingerprint covers those facts (``kd.core.signature.target_fingerprint``).
An ``hf:DIR`` with a tokenizer.json also reports ``tokenizer_json`` (sha256/16 of that
file, as a dataset's ``?tokenizer=`` hashes it) and ``tokenizer_vocab`` (``kd.core.tokens.vocab_hash``
of its vocabulary, when the ``tokenizers`` package reads it), which the trainers compare with the
data's: the vocabularies where both are known, else the files.

**Requests** are right-padded ``[N, S]`` ids (int64 or int32) with the real length of
each row (``InferRequest.lengths``; none: every row is S long) and optionally the
positions whose outputs are wanted (``InferRequest.positions``, bool ``[N, S]``; none:
every real position). Every output is **packed**: ``[P, ...]`` for the P asked
positions in row-major order, computed on the model's device (only those positions
leave it): "logits" [P, V], "topk_values"/"topk_indices" [P, k] with "logsumexp" [P]
(of logits / sparse_temperature), "sample_indices"/"sample_counts"/"sample_values"
[P, K] (``token_samples`` draws at sparse_temperature merged into K unique ids with their
counts; -1 / 0 in unused slots; ``kd.core.tokens.TokenTargets``' counts form),
"probs" [P, V], "labels" [P], "token_logprobs" [P] (log p(tokens[s + 1] | tokens[:s + 1])
at each asked position s, for on-policy distillation; causal LMs only) and
"feature/<layer>" [P, D] (hidden states of named layers).

**Batching** (``TokenBatcher``): rows are scheduled by a token budget
(``max_batch_tokens`` >= rows x longest row of the forward, at most ``max_batch_size``
rows) and grouped by length around the oldest waiting row, so padding stays small;
the padded share of every forward is reported to the metrics. A row longer than the
budget or the model's ``max_length`` is refused before it is queued.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from torch import nn

from kd.core import factory
from kd.core.signature import VARIABLE, TeacherSignature, TensorSpec, target_fingerprint, target_options
from kd.core.sparse import sent_topk_logsumexp, topk_parts
from kd.core.tokens import vocab_hash
from kd.teacher_server import access as tiers
from kd.teacher_server.batcher import (
    BatcherStats,
    BatchObservation,
    Company,
    DeadlineExpiredError,
    QueueAccounting,
)
from kd.teacher_server.loading import Teacher, TeacherLoadError, TeacherSpec, build_model, fingerprint
from kd.teacher_server.outputs import FLOAT_OUT, OutputRangeError, check_finite
from kd.v1 import teacher_pb2 as pb

log = logging.getLogger("kd.serve")

KIND = "tokens"
TASKS = ("causal-lm", "masked-lm")
# Files whose bytes define a Hugging Face tokenizer (those present are hashed).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
)  # fmt: skip
MAX_SAMPLE_DRAWS = 4096
_OUT_ITEMSIZE = {pb.DTYPE_UNSPECIFIED: 4, pb.FLOAT32: 4, pb.FLOAT16: 2, pb.BFLOAT16: 2}


class TokenRequestError(ValueError):
    """A token request the server refuses: a gRPC status code and a message with the numbers."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def is_token_teacher(teacher: Teacher) -> bool:
    """Whether ``teacher`` takes token ids (a signature with ``kind=tokens``)."""
    return teacher.signature is not None and teacher.signature.extra.get("kind") == KIND


def tokenizer_hash(directory: str | Path) -> str | None:
    """sha256 (16 hex) over the names and bytes of the tokenizer files in ``directory``; None without any."""
    d = Path(directory)
    h, found = hashlib.sha256(), False
    for name in TOKENIZER_FILES:
        p = d / name
        if p.is_file():
            found = True
            h.update(f"{name}:{p.stat().st_size}:".encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16] if found else None


def _tokenizer_vocab_hash(path: Path) -> str | None:
    """``kd.core.tokens.vocab_hash`` of a tokenizer.json's vocabulary; None without the optional
    ``tokenizers`` package or for a file it cannot read (then the file hash alone is compared)."""
    try:
        import tokenizers
    except ImportError:
        return None
    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception:  # noqa: BLE001 - the Rust side raises a plain Exception on a malformed file
        return None
    return vocab_hash(tok.get_vocab(with_added_tokens=True))


# -- loading --------------------------------------------------------------------------------------
def _hf_options(spec: str) -> tuple[Path, str | None]:
    path, _, opts = spec.removeprefix("hf:").partition("?")
    try:
        kwargs, shape = factory.parse_options(opts, spec, "teacher")
    except factory.FactoryError as e:
        raise TeacherLoadError(str(e)) from None
    unknown = set(kwargs) - {"task"} | ({"input_shape"} if shape is not None else set())
    if unknown:
        raise TeacherLoadError(f"unknown option(s) {sorted(unknown)} in {spec!r}; known: task")
    task = kwargs.get("task")
    if task is not None and task not in TASKS:
        raise TeacherLoadError(f"task={task!r} in {spec!r}: choose {' or '.join(TASKS)}")
    return Path(path).expanduser(), task


def load_hf(directory: Path, task: str | None) -> tuple[nn.Module, str, int]:
    """A Hugging Face LM from a local directory -> (model in fp32, task, max length or 0)."""
    if not (directory / "config.json").is_file():
        raise TeacherLoadError(f"{str(directory)!r} has no config.json: not a Hugging Face model directory")
    if not any(directory.glob("*.safetensors")) and not (directory / "model.safetensors.index.json").is_file():
        raise TeacherLoadError(
            f"{str(directory)!r} has no safetensors weights; pickled weights (pytorch_model.bin) are refused. "
            "Save with model.save_pretrained(dir, safe_serialization=True)"
        )
    try:
        import transformers
    except ImportError:
        raise TeacherLoadError(
            f"hf:{directory} needs the 'transformers' package: pip install transformers "
            "(or pip install -e '.[lm]' in kd's repository)"
        ) from None
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a bad config
        raise TeacherLoadError(f"cannot read the config of {str(directory)!r}: {e}") from e
    if task is None:
        archs = list(getattr(config, "architectures", None) or [])
        task = "masked-lm" if any(a.endswith("ForMaskedLM") for a in archs) else "causal-lm"
    cls = transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModelForMaskedLM
    try:
        model = cls.from_pretrained(str(directory), local_files_only=True, use_safetensors=True,
                                    trust_remote_code=False, dtype=torch.float32)  # fmt: skip
    except Exception as e:  # noqa: BLE001
        raise TeacherLoadError(f"cannot load {task} model from {str(directory)!r}: {type(e).__name__}: {e}") from e
    max_length = 0
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            max_length = value
            break
    _cut_padded_vocabulary(model, directory)
    return model, task, max_length


def _cut_padded_vocabulary(model: nn.Module, directory: Path) -> None:
    """Cut a model's embedding and output rows to its tokenizer's ids where the model has more.

    Many LMs (Pythia, OPT, Phi, Qwen, ...) pad ``vocab_size`` past their tokenizer's ids (to a
    multiple of 64 or 128, for speed): no token maps to the extra rows, their logits are untrained,
    and a dataset of the model's own tokenizer has fewer ids than its logits. The real ids' logits
    are unchanged by the cut (every other row stays as it is), and top-k and sampling can no longer
    pick an id no text has. A model without a tokenizer.json, or when the optional ``tokenizers``
    package is missing, is left as it is."""
    path = directory / "tokenizer.json"
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not path.is_file() or emb is None:
        return
    from kd.core.tokens import JsonTokenizer, TokenizerError

    try:
        ids = JsonTokenizer(path).vocab_size
    except TokenizerError:
        return
    if 0 < ids < emb.num_embeddings:
        model.resize_token_embeddings(ids)


def call_model(model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor, hf: bool) -> torch.Tensor:
    """The logits ``[B, S, V]`` of ``model`` for right-padded ``tokens`` and their attention mask."""
    if hf:
        out = model(input_ids=tokens, attention_mask=mask.long(), use_cache=False)
    else:
        out = model(tokens, attention_mask=mask)
    return factory.logits_of(out)


def load_token_teacher(
    name: str, spec: str, *, device: str = "cpu", trust_archive: bool = False, model: nn.Module | None = None
) -> Teacher:
    """Load (``hf:DIR`` or a factory spec), fingerprint and probe a token teacher with int64 ids."""
    hf = spec.startswith("hf:")
    facts: dict[str, str] = {"kind": KIND}
    if hf:
        directory, task = _hf_options(spec)
        model, task, max_length = load_hf(directory, task)
        tok = tokenizer_hash(directory)
    else:
        if model is None:
            model = build_model(TeacherSpec.parse(spec), trust_archive=trust_archive)
        task = str(getattr(model, "task", "causal-lm"))
        if task not in TASKS:
            raise TeacherLoadError(f"teacher {name!r}: task attribute {task!r}; choose {' or '.join(TASKS)}")
        max_length = int(getattr(model, "max_length", 0) or 0)
        tok = getattr(model, "tokenizer_hash", None)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    weights_fp = fingerprint(model)
    dev = torch.device(device)
    model.to(dev)
    # The probe: int64 ids [2, 3] (never float zeros); hooks find the layers giving [B, S, D].
    b, s = 2, 3 if not max_length else min(3, max_length)
    layers: dict[str, tuple[int, ...]] = {}
    handles = []
    for mod_name, module in model.named_modules():
        if not mod_name:
            continue

        def hook(_m, _i, output, mod_name=mod_name) -> None:
            out = output[0] if isinstance(output, (tuple, list)) and output else output
            if isinstance(out, torch.Tensor) and out.ndim == 3 and tuple(out.shape[:2]) == (b, s):
                layers[mod_name] = (VARIABLE, int(out.shape[2]))

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            logits = call_model(model, torch.zeros((b, s), dtype=torch.int64, device=dev),
                                torch.ones((b, s), dtype=torch.bool, device=dev), hf)  # fmt: skip
    except Exception as e:  # noqa: BLE001 - a model that does not take (tokens, attention_mask)
        raise TeacherLoadError(
            f"teacher {name!r}: a probe with int64 token ids [{b}, {s}] and an attention mask failed: "
            f"{type(e).__name__}: {e}. A token teacher is called as model(tokens, attention_mask=mask)"
        ) from e
    finally:
        for h in handles:
            h.remove()
    if logits.ndim != 3 or tuple(logits.shape[:2]) != (b, s):
        raise TeacherLoadError(f"teacher {name!r} returned shape {tuple(logits.shape)}; expected [batch, seq, vocab]")
    vocab = int(logits.shape[2])
    layers.pop("lm_head", None)  # the logits themselves ([S, V]), not a hidden state
    facts.update(task=task, vocab_size=str(vocab), max_length=str(max_length), source="hf" if hf else "module")
    if tok:
        facts["tokenizer"] = str(tok)
    if hf and (directory / "tokenizer.json").is_file():
        # The directory's tokenizer.json alone, hashed as a dataset's ?tokenizer=PATH reports it
        # (kd.core.tokens.JsonTokenizer.hash), so a dataset of another tokenizer can be told
        # apart; "tokenizer" (every tokenizer file) stays what the fingerprint covers.
        facts["tokenizer_json"] = hashlib.sha256((directory / "tokenizer.json").read_bytes()).hexdigest()[:16]
        ids = _tokenizer_vocab_hash(directory / "tokenizer.json")
        if ids is not None:  # which token each id is, however the file is formatted (compared first)
            facts["tokenizer_vocab"] = ids
    signature = TeacherSignature(
        (TensorSpec("tokens", torch.int64, (VARIABLE,)),),
        (TensorSpec("logits", torch.float32, (VARIABLE, vocab)),),
        extra=facts,
    )
    return Teacher(
        name=name,
        model=model,
        fingerprint=target_fingerprint(weights_fp, facts=fingerprint_facts(facts)),
        input_shape=(VARIABLE,),
        input_dtype=torch.int64,
        num_classes=vocab,
        device=dev,
        spec=spec,
        layers=layers,
        signature=signature,
        weights_fingerprint=weights_fp,
    )


def fingerprint_facts(extra: dict[str, str]) -> dict[str, str]:
    """The signature facts the target fingerprint covers: vocabulary, max length, tokenizer, task."""
    keys = ("task", "vocab_size", "max_length", "tokenizer")
    return {k: extra[k] for k in keys if k in extra}


# -- requests -------------------------------------------------------------------------------------
@dataclass(eq=False)
class TokenWork:
    """One token request, validated: right-padded ids, real lengths, asked positions, outputs."""

    tokens: torch.Tensor  # int64 [N, S], CPU
    lengths: list[int]
    positions: torch.Tensor  # bool [N, S], only within each row's length
    spec: pb.OutputSpec
    layers: tuple[str, ...] = ()
    labels_only: bool = False
    echo_positions: bool = False  # by reference: the client learns the asked positions from the answer

    @property
    def shape(self) -> torch.Size:
        """The ids' shape (the service counts a token request's rows like a tensor batch's)."""
        return self.tokens.shape

    @property
    def rows(self) -> int:
        return int(self.tokens.shape[0])


def _float_dtype(what: str, dt: int) -> torch.dtype:
    if dt not in (pb.DTYPE_UNSPECIFIED, *FLOAT_OUT):
        raise TokenRequestError(f"{what} {pb.DType.Name(dt) if dt in pb.DType.values() else dt} not offered; "
                                "use FLOAT32, FLOAT16 or BFLOAT16")  # fmt: skip
    return FLOAT_OUT.get(dt, torch.float32)


def nothing_asked(spec: pb.OutputSpec) -> bool:
    return not (spec.logits or spec.top_k or spec.token_samples or spec.probs_temperature > 0 or spec.features
                or spec.labels or spec.token_logprobs)  # fmt: skip


def prepare(
    teacher: Teacher,
    tokens: torch.Tensor,
    lengths: Iterable[int],
    positions: torch.Tensor | None,
    spec: pb.OutputSpec,
    *,
    access: str,
    max_batch_tokens: int,
    max_message_bytes: int,
    echo_positions: bool = False,
) -> TokenWork:
    """Validate a token request before any work (TokenRequestError naming the numbers).
    ``echo_positions``: the answer carries "positions" (bool [N, S]; inputs by reference)."""
    extra = teacher.signature.extra if teacher.signature is not None else {}
    vocab, max_length = teacher.num_classes, int(extra.get("max_length", 0) or 0)
    name = teacher.name
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise TokenRequestError(f"token ids must be [N, S] with N, S >= 1; got shape {list(tokens.shape)}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise TokenRequestError(f"token ids have dtype {str(tokens.dtype).removeprefix('torch.')}; "
                                f"teacher {name!r} takes int64 or int32")  # fmt: skip
    tokens = tokens.to(torch.int64)
    n, s = tokens.shape
    lens = [int(v) for v in lengths] or [s] * n
    if len(lens) != n:
        raise TokenRequestError(f"{len(lens)} lengths for {n} rows of token ids")
    bad = [v for v in lens if not 1 <= v <= s]
    if bad:
        raise TokenRequestError(f"lengths must lie in 1..{s} (the padded width); got {bad[:4]}")
    longest = max(lens)
    if longest > max_batch_tokens:
        raise TokenRequestError(
            f"a row of {longest} tokens is longer than the server's token budget max_batch_tokens="
            f"{max_batch_tokens} of teacher {name!r}; split or truncate it"
        )
    if max_length and longest > max_length:
        raise TokenRequestError(f"a row of {longest} tokens is longer than the maximum length {max_length} of "
                                f"teacher {name!r}")  # fmt: skip
    real = torch.arange(s).unsqueeze(0) < torch.tensor(lens).unsqueeze(1)
    ids = tokens[real]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        value = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise TokenRequestError(f"token id {value} out of range: teacher {name!r} has a vocabulary of {vocab}")
    if positions is None:
        positions = real
    else:
        if tuple(positions.shape) != (n, s):
            raise TokenRequestError(f"positions has shape {list(positions.shape)}; the ids have {[n, s]}")
        if positions.dtype != torch.bool:
            positions = positions != 0
        outside = positions & ~real
        if bool(outside.any()):
            row, col = (int(v) for v in outside.nonzero()[0])
            raise TokenRequestError(f"positions asks for position {col} of row {row}, beyond its length {lens[row]}")
    p = int(positions.sum())
    if p == 0:
        raise TokenRequestError("positions selects no position: nothing to compute")
    _float_dtype("logits_dtype", spec.logits_dtype)
    _float_dtype("features_dtype", spec.features_dtype)
    if not 0 <= spec.top_k <= vocab:
        raise TokenRequestError(f"top_k={spec.top_k} out of range: teacher {name!r} has a vocabulary of {vocab}")
    if not 0 <= spec.token_samples <= MAX_SAMPLE_DRAWS:
        raise TokenRequestError(
            f"token_samples={spec.token_samples} out of range: 0..{MAX_SAMPLE_DRAWS} draws per position"
        )
    for what in ("probs_temperature", "sparse_temperature"):
        temp = getattr(spec, what)
        if temp != 0 and not (math.isfinite(temp) and 1e-3 <= temp <= 1e3):
            raise TokenRequestError(f"{what} must be a finite number in [0.001, 1000] (or 0), got {temp}")
    if spec.pool_features:
        raise TokenRequestError("pool_features is not offered for token teachers: hidden states come per position")
    unknown = [f for f in spec.features if f not in teacher.layers]
    if unknown:
        some = ", ".join(list(teacher.layers)[:40])
        raise TokenRequestError(f"unknown layer(s) {unknown[:8]} of teacher {name!r} (hidden states [P, D]); "
                                f"valid: {some}")  # fmt: skip
    if spec.token_logprobs:
        if extra.get("task") == "masked-lm":
            raise TokenRequestError(f"token_logprobs needs a causal LM; teacher {name!r} is a masked LM")
        last = positions & (torch.arange(s).unsqueeze(0) == torch.tensor(lens).unsqueeze(1) - 1)
        if bool(last.any()):
            row = int(last.nonzero()[0, 0])
            raise TokenRequestError(
                f"token_logprobs at the last position {lens[row] - 1} of row {row}: there is no next token to score "
                "(position s scores tokens[s + 1]); leave the last position out of positions"
            )
    labels_only = not tiers.allows(access, "scores")
    scores = spec.logits or spec.top_k or spec.token_samples or spec.probs_temperature > 0 or spec.token_logprobs
    if scores and labels_only:
        raise TokenRequestError(
            str(tiers.AccessDenied(name, access, "scores", "logits, probabilities, top-k, samples and log-probs")),
            grpc.StatusCode.PERMISSION_DENIED,
        )
    if spec.features and not tiers.allows(access, "features"):
        raise TokenRequestError(str(tiers.AccessDenied(name, access, "features", "hidden states")),
                                grpc.StatusCode.PERMISSION_DENIED)  # fmt: skip
    # The answer's size, before any work.
    isz, fsz = _OUT_ITEMSIZE[spec.logits_dtype], _OUT_ITEMSIZE[spec.features_dtype]
    per = 0
    empty = nothing_asked(spec)
    if spec.logits or (empty and not labels_only):
        per += vocab * isz
    if spec.labels or (empty and labels_only):
        per += 8
    if spec.top_k:
        per += spec.top_k * (isz + 4) + 4
    if spec.token_samples:
        per += min(spec.token_samples, vocab) * (isz + 8) + 4
    if spec.probs_temperature > 0:
        per += vocab * isz
    if spec.token_logprobs:
        per += 4
    per += sum(teacher.layers[f][-1] * fsz for f in spec.features)
    total = p * per + 4096
    if total > max_message_bytes:
        raise TokenRequestError(
            f"the answer would be {total / 2**20:.1f} MiB for {p} positions, over the server's message limit of "
            f"{max_message_bytes / 2**20:.1f} MiB: ask for fewer positions or smaller outputs",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
    layers = tuple(dict.fromkeys(spec.features))
    return TokenWork(tokens, lens, positions, spec, layers, labels_only, echo_positions)


def token_only_fields(request: pb.InferRequest) -> list[str]:
    """The fields of ``request`` that only a token teacher takes (refused by the others)."""
    spec = request.outputs
    asked = {"lengths": bool(request.lengths), "positions": request.HasField("positions"),
             "token_samples": bool(spec.token_samples), "token_logprobs": spec.token_logprobs}  # fmt: skip
    return [name for name, given in asked.items() if given]


def read_ref(datasets: dict, ref: pb.DatasetRef) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """A token dataset's samples by reference (``kd.core.tokens.TokenSource.batch``) -> (ids
    [N, S], lengths, the positions with a next-token target: s where token s + 1 is in the
    loss mask, i.e. where ``next_token_labels`` is not IGNORE_INDEX)."""
    data = datasets.get(ref.dataset)
    if data is None:
        have = ", ".join(sorted(datasets)) or "none"
        raise TokenRequestError(f"unknown dataset {ref.dataset!r}; this server has registered: {have}",
                                grpc.StatusCode.NOT_FOUND)  # fmt: skip
    if not callable(getattr(data, "batch", None)):
        raise TokenRequestError(f"dataset {ref.dataset!r} is not a token dataset (text:, jsonl:, hf:...?text=)")
    if not ref.indices:
        raise TokenRequestError("empty batch: ref has no indices")
    if any(v != 0 for v in ref.view_seeds):
        raise TokenRequestError("token samples have no views: leave view_seeds empty")
    bad = [i for i in ref.indices if not 0 <= i < len(data)]
    if bad:
        raise TokenRequestError(f"index {bad[0]} out of range for dataset {ref.dataset!r} of {len(data)} samples")
    try:
        b = data.batch(list(ref.indices))
    except (ValueError, OSError, RuntimeError, KeyError) as e:
        raise TokenRequestError(f"dataset {ref.dataset!r}: cannot read the samples: {e}",
                                grpc.StatusCode.FAILED_PRECONDITION) from None  # fmt: skip
    lengths = [int(v) for v in b.attention_mask.sum(dim=1)]
    asked = torch.zeros_like(b.loss_mask)
    asked[:, :-1] = b.loss_mask[:, 1:]
    return b.tokens, lengths, asked


# -- per-position outputs, on the model's device ------------------------------------------------------
def _row_seed(seed: int, row: int) -> int:
    digest = hashlib.sha256(f"kd-token-sample:{int(seed)}:{int(row)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_counts(
    z: torch.Tensor, draws: int, temperature: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``draws`` ids per row of ``z`` [P, V] drawn with replacement from softmax(z / T), merged
    into unique ids (int64 [P, K], K = min(draws, V), most drawn first, -1 unused) and counts."""
    p, v = z.shape
    probs = torch.softmax(z.float() / temperature, dim=-1)
    drawn = torch.multinomial(probs, draws, replacement=True, generator=generator)
    full = torch.zeros(p, v, device=z.device, dtype=torch.int32)
    full.scatter_add_(1, drawn, torch.ones_like(drawn, dtype=torch.int32))
    counts, ids = full.topk(min(draws, v), dim=1)
    return torch.where(counts > 0, ids, torch.full_like(ids, -1)), counts


def postprocess(
    work: TokenWork,
    rows: list[int],
    logits: torch.Tensor,
    feats: dict[str, torch.Tensor],
    tokens: torch.Tensor,
    mask: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The outputs ``work`` asks for at its asked positions of ``rows`` (row-major), on the
    logits' device. ``logits`` [n, L, V], ``feats`` [n, L, D], ``tokens`` [n, L] and the asked
    ``mask`` [n, L] hold just these rows, in this order."""
    spec = work.spec
    z = logits[mask]  # [P, V] float32
    dt = FLOAT_OUT.get(spec.logits_dtype, torch.float32)
    out: dict[str, torch.Tensor] = {}
    check_finite("logits", z)
    empty = nothing_asked(spec)
    if spec.logits or (empty and not work.labels_only):
        out["logits"] = z.to(dt)
        check_finite("logits", out["logits"])
    if spec.labels or (empty and work.labels_only):
        out["labels"] = z.argmax(dim=-1).to(torch.int64)
    temperature = spec.sparse_temperature or 1.0
    if spec.top_k:
        values, ids, out["logsumexp"] = topk_parts(z, spec.top_k, temperature)  # the cache's topk arithmetic
        check_finite("logsumexp", out["logsumexp"])  # z / T overflows at a small sparse_temperature
        out["topk_values"] = values.to(dt)
        check_finite("topk_values", out["topk_values"])  # float16 overflows past 65504
        if dt != torch.float32:  # the lse of the values as sent: their probabilities and the rest sum to 1
            out["logsumexp"] = sent_topk_logsumexp(z, out["topk_values"], ids, temperature)
        out["topk_indices"] = ids.to(torch.int32)
    if spec.token_samples:
        if "logsumexp" not in out:
            out["logsumexp"] = torch.logsumexp(z / temperature, dim=-1)
            # Before any draw: a finite logsumexp means z / T has no +Inf (z is finite), so the
            # sampling probabilities softmax(z / T) are a valid distribution.
            check_finite("logsumexp", out["logsumexp"])
        per_row = mask.sum(dim=1).tolist()
        parts_ids, parts_counts = [], []
        for r, zr in zip(rows, torch.split(z, per_row)):
            if zr.shape[0] == 0:
                continue
            g = torch.Generator(device=z.device).manual_seed(_row_seed(spec.token_sample_seed, r))
            ids, counts = sample_counts(zr, spec.token_samples, temperature, g)
            parts_ids.append(ids)
            parts_counts.append(counts)
        ids, counts = torch.cat(parts_ids), torch.cat(parts_counts)
        k = max(1, int((counts > 0).sum(dim=1).max()))  # unique ids come first: the rest is unused
        ids, counts = ids[:, :k], counts[:, :k]
        out["sample_indices"] = ids.to(torch.int32)
        out["sample_counts"] = counts
        values = z.gather(1, ids.clamp(min=0))
        out["sample_values"] = torch.where(ids >= 0, values, torch.zeros_like(values)).to(dt)
        check_finite("sample_values", out["sample_values"])
    if spec.probs_temperature > 0:
        out["probs"] = torch.softmax(z / spec.probs_temperature, dim=-1).to(dt)
        check_finite("probs", out["probs"])
    if spec.token_logprobs:
        nxt = torch.zeros_like(tokens)
        nxt[:, :-1] = tokens[:, 1:]
        target = nxt[mask]
        out["token_logprobs"] = z.gather(1, target.unsqueeze(1)).squeeze(1) - torch.logsumexp(z, dim=-1)
        check_finite("token_logprobs", out["token_logprobs"])
    fdt = FLOAT_OUT.get(spec.features_dtype, torch.float32)
    for name in work.layers:
        out[f"feature/{name}"] = feats[name][mask].to(fdt)
        check_finite(f"feature/{name}", out[f"feature/{name}"])
    return out


def assemble(work: TokenWork, per_row: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A request's outputs from its rows' (host) parts, packed in row-major order; sampled ids
    trimmed to the most unique ids any asked position has."""
    rows = [per_row[r] for r in range(work.rows) if r in per_row]
    if "sample_indices" in rows[0]:  # forwards trim to their own most unique ids: pad to the widest
        k = max(r["sample_indices"].shape[1] for r in rows)
        fills = {"sample_indices": -1, "sample_counts": 0, "sample_values": 0}
        rows = [{**r, **{key: _pad_cols(r[key], k, fill) for key, fill in fills.items()}} for r in rows]
    out = {key: torch.cat([r[key] for r in rows]) for key in rows[0]}
    if work.echo_positions:
        out["positions"] = work.positions
    return out


def _pad_cols(t: torch.Tensor, k: int, fill: int) -> torch.Tensor:
    if t.shape[1] == k:
        return t
    return torch.cat([t, torch.full((t.shape[0], k - t.shape[1]), fill, dtype=t.dtype)], dim=1)


# -- the model runner -------------------------------------------------------------------------------
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TokenRunner:
    """Runs a batch of rows through a token teacher and post-processes on its device."""

    def __init__(self, teacher: Teacher, amp: str = "fp32", *, compile: bool = False, threads: int = 0) -> None:
        if amp not in AMP_DTYPES:
            raise ValueError(f"unknown amp dtype {amp!r}; choose from {', '.join(AMP_DTYPES)}")
        self.teacher = teacher
        self.threads = threads
        self.amp_dtype = AMP_DTYPES[amp]
        self.hf = (teacher.signature.extra.get("source") == "hf") if teacher.signature is not None else False
        self._modules = dict(teacher.model.named_modules())
        self._model = torch.compile(teacher.model) if compile else teacher.model
        self._cuda = teacher.device.type == "cuda"

    def on_thread_start(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)

    def run(self, groups: list[tuple[TokenWork, list[int]]]) -> list[dict[str, torch.Tensor] | OutputRangeError]:
        """One forward over the rows of ``groups`` (each a request and some of its row indices),
        padded to the longest; per group the outputs of those rows, copied to the host, or the
        OutputRangeError that refuses that group's outputs (NaN/Inf) without failing the others."""
        dev = self.teacher.device
        flat = [(w, r) for w, rows in groups for r in rows]
        width = max(w.lengths[r] for w, r in flat)
        n = len(flat)
        tokens = torch.zeros((n, width), dtype=torch.int64)
        attn = torch.zeros((n, width), dtype=torch.bool)
        asked = torch.zeros((n, width), dtype=torch.bool)
        for i, (w, r) in enumerate(flat):
            length = w.lengths[r]
            tokens[i, :length] = w.tokens[r, :length]
            attn[i, :length] = True
            asked[i, :length] = w.positions[r, :length]
        if self._cuda:
            tokens, attn, asked = (t.pin_memory().to(dev, non_blocking=True) for t in (tokens, attn, asked))
        layers = list(dict.fromkeys(name for w, _ in groups for name in w.layers))
        captured: dict[str, torch.Tensor] = {}
        handles = []
        for name in layers:

            def hook(_m, _i, output, name=name) -> None:
                out = output[0] if isinstance(output, (tuple, list)) else output
                # A clone: a later in-place op (ReLU(inplace=True)) must not change it.
                captured[name] = out.clone()

            handles.append(self._modules[name].register_forward_hook(hook))
        try:
            with (
                torch.inference_mode(),
                torch.autocast(dev.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None),
            ):
                logits = call_model(self._model, tokens, attn, self.hf).float()
            results = []
            start = 0
            with torch.inference_mode():
                for work, rows in groups:
                    sl = slice(start, start + len(rows))
                    start += len(rows)
                    feats = {k: captured[k][sl].float() for k in work.layers}
                    try:
                        out = postprocess(work, rows, logits[sl], feats, tokens[sl], asked[sl])
                    except OutputRangeError as e:  # this request's answer alone: the others batched with it stand
                        results.append(e)
                        continue
                    # Split per row on the device, then one copy of each output to the host.
                    results.append({k: v.cpu() for k, v in out.items()})
        finally:
            for h in handles:
                h.remove()
        return results


# -- the token-budget batcher ----------------------------------------------------------------------
@dataclass(eq=False)
class _Req:
    work: TokenWork
    future: Future
    arrival: float
    deadline: float | None
    pending: list[int]  # rows not yet in a forward
    needed: int  # rows with an asked position: the request is done when all have run
    done: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    started: bool = False


@dataclass
class TokenStats(BatcherStats):
    real_tokens: int = 0
    padded_tokens: int = 0  # positions computed, padding included

    @property
    def padding_share(self) -> float:
        return 1.0 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0


def group_rows(
    rows: list[tuple[int, int]], first: int, max_tokens: int, max_rows: int
) -> list[int]:  # fmt: skip
    """Length-aware grouping: indices into ``rows`` (each ``(length, order)``) for one forward,
    always with ``first``; grows from it to the neighbour in length that adds the least
    padding while rows x longest <= ``max_tokens`` and rows <= ``max_rows``."""
    by_len = sorted(range(len(rows)), key=lambda i: (rows[i][0], rows[i][1]))
    pos = by_len.index(first)
    lo = hi = pos
    longest = rows[first][0]
    while hi - lo + 1 < max_rows:
        count = hi - lo + 1
        down = longest - rows[by_len[lo - 1]][0] if lo > 0 else None  # padding added by a shorter row
        up = None
        if hi + 1 < len(by_len):
            up = (rows[by_len[hi + 1]][0] - longest) * count  # every row pads to the longer one
            if (count + 1) * rows[by_len[hi + 1]][0] > max_tokens:
                up = None
        if down is not None and (count + 1) * longest > max_tokens:
            down = None
        if down is None and up is None:
            break
        if up is None or (down is not None and down <= up):
            lo -= 1
        else:
            hi += 1
            longest = rows[by_len[hi]][0]
    return by_len[lo : hi + 1]


class TokenBatcher(QueueAccounting):
    """Queues token requests and runs their rows in length-grouped forwards within a token
    budget, on one model thread. Same contract as ``DynamicBatcher`` for the service:
    ``submit`` -> a future of the request's packed outputs; a bounded queue (rows),
    deadlines and cancellation before the forward, ``close`` drains. The queue delay is
    waited only where company comes (``Company``, as the tensor batcher): never for a lone
    caller with one request at a time."""

    def __init__(
        self,
        runner: TokenRunner,
        *,
        max_batch_tokens: int = 8192,
        max_batch_size: int = 256,
        max_queue_delay_s: float = 0.002,
        max_queue_size: int = 0,
        name: str = "teacher",
        observer: Callable[[BatchObservation], None] | None = None,
        on_queue_depth: Callable[[int], None] | None = None,
        on_tokens: Callable[[int, int], None] | None = None,
    ) -> None:
        if max_batch_tokens < 1 or max_batch_size < 1:
            raise ValueError(f"max_batch_tokens and max_batch_size must be >= 1, got {max_batch_tokens}, "
                             f"{max_batch_size}")  # fmt: skip
        self.runner = runner
        self.name = name
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max(0.0, max_queue_delay_s)
        self.max_queue_size = max_queue_size
        self.stats = TokenStats()
        self._observer, self._on_queue_depth, self._on_tokens = observer, on_queue_depth, on_tokens
        self._queue: list[_Req] = []
        self._queued_tokens = 0
        self._init_accounting()
        self._company = Company()  # the queue delay is waited only where company comes
        self._thread = threading.Thread(target=self._loop, name=f"model-{name}", daemon=True)
        self._thread.start()

    def submit(self, work: TokenWork, *, layers: Iterable[str] = (), deadline: float | None = None,
               post: object = None) -> Future:  # fmt: skip
        """Queue a validated request (``layers`` and ``post`` are the tensor batcher's; the work
        carries its own). The future resolves to its packed outputs."""
        longest = max(work.lengths)
        if longest > self.max_batch_tokens:  # prepare() refuses these first; a direct caller too
            raise ValueError(f"a row of {longest} tokens is over max_batch_tokens={self.max_batch_tokens}")
        # Only rows with an asked position run (the answer has nothing for the others).
        rows = [r for r in range(work.rows) if bool(work.positions[r].any())]
        n = len(rows)
        if n == 0:
            raise ValueError("no position asked: nothing to compute")
        req = _Req(work, Future(), time.monotonic(), deadline, rows, needed=n)
        with self._cv:
            self._company.arrived(bool(self._unresolved))
            self._admit(req.future, n, unit="rows")
            self._queue.append(req)
            self._queued_rows += n
            self._queued_tokens += sum(work.lengths[r] for r in rows)
            self._depth_changed()
            self._cv.notify()
        return req.future

    def close(self, timeout: float | None = None) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout)

    def _drop(self, req: _Req) -> None:
        self._queue.remove(req)
        self._queued_rows -= len(req.pending)
        self._queued_tokens -= sum(req.work.lengths[r] for r in req.pending)

    def _drop_dead(self, now: float) -> None:
        for req in list(self._queue):
            if req.started:
                continue
            if req.deadline is not None and now > req.deadline:
                if req.future.set_running_or_notify_cancel():
                    req.future.set_exception(
                        DeadlineExpiredError(f"deadline passed after {now - req.arrival:.3f}s in the queue")
                    )
                    self.stats.expired += 1
                else:
                    self.stats.cancelled += 1
                self._drop(req)
            elif req.future.cancelled():
                self.stats.cancelled += 1
                self._drop(req)

    def _full(self) -> bool:
        return self._queued_tokens >= self.max_batch_tokens or self._queued_rows >= self.max_batch_size

    def _take(self) -> list[tuple[_Req, list[int]]] | None:
        with self._cv:
            while True:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:
                    return None
                until = self._company.deadline(self._queue[0].arrival, self.max_queue_delay_s)
                while not self._full() and not self._closed:
                    remaining = until - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cv.wait(remaining)
                self._drop_dead(time.monotonic())
                if not self._queue:
                    self._depth_changed()
                    continue
                candidates = [(req, r) for req in self._queue for r in req.pending]
                rows = [(req.work.lengths[r], i) for i, (req, r) in enumerate(candidates)]
                chosen = group_rows(rows, 0, self.max_batch_tokens, self.max_batch_size)  # 0: the oldest row
                groups: dict[int, tuple[_Req, list[int]]] = {}
                for i in sorted(chosen):
                    req, r = candidates[i]
                    groups.setdefault(id(req), (req, []))[1].append(r)
                # Marks each future running, so it cannot be cancelled mid-forward.
                for key, (req, _) in list(groups.items()):
                    if not req.started:
                        if req.future.set_running_or_notify_cancel():
                            req.started = True
                        else:
                            self.stats.cancelled += 1
                            self._drop(req)
                            del groups[key]
                if groups:
                    break
                self._depth_changed()
            self._company.formed(len(groups))
            for req, taken in groups.values():
                picked = set(taken)
                req.pending = [r for r in req.pending if r not in picked]
                self._queued_rows -= len(taken)
                self._queued_tokens -= sum(req.work.lengths[r] for r in taken)
                if not req.pending:
                    self._queue.remove(req)
            self._depth_changed()
            return list(groups.values())

    def _loop(self) -> None:
        if self.runner.threads:
            try:
                self.runner.on_thread_start()
            except Exception:  # noqa: BLE001
                log.exception("batcher %s: the runner's thread set-up failed", self.name)
        while (groups := self._take()) is not None:
            try:
                self._run(groups)
            except BaseException as e:  # noqa: BLE001 - the batch's callers' error, never the thread's
                # (outside the forward: an observer, or outputs that do not split by rows); a
                # dead model thread would leave every later request unanswered.
                log.exception("batcher %s: a batch failed outside the forward", self.name)
                for req, _ in groups:
                    self._fail(req, e)
            finally:
                with self._cv:
                    self._company.free_since = time.monotonic()

    def _run(self, groups: list[tuple[_Req, list[int]]]) -> None:
        """Run one forward of ``groups`` (request, its rows) and answer the requests it completes."""
        started = time.monotonic()
        t0 = time.perf_counter()
        try:
            results = self.runner.run([(req.work, rows) for req, rows in groups])
        except BaseException as e:  # noqa: BLE001 - belongs to the callers
            for req, _ in groups:
                self._fail(req, e)
            return
        compute = time.perf_counter() - t0
        n = sum(len(rows) for _, rows in groups)
        width = max(req.work.lengths[r] for req, rows in groups for r in rows)
        real = sum(req.work.lengths[r] for req, rows in groups for r in rows)
        self.stats.forwards += 1
        self.stats.samples += n
        self.stats.batch_sizes.append(n)
        self.stats.real_tokens += real
        self.stats.padded_tokens += n * width
        if self._observer is not None:
            self._observer(BatchObservation(n, [started - req.arrival for req, _ in groups], compute))
        if self._on_tokens is not None:
            self._on_tokens(real, n * width)
        for (req, rows), out in zip(groups, results):
            if req.future.done():
                continue
            if isinstance(out, OutputRangeError):
                self._fail(req, out)
                continue
            counts = [int(req.work.positions[r].sum()) for r in rows]
            for r, part in zip(rows, _split(out, counts)):
                req.done[r] = part
            if len(req.done) == req.needed:
                try:
                    req.future.set_result(assemble(req.work, req.done))
                except BaseException as e:  # noqa: BLE001
                    req.future.set_exception(e)
                req.done = {}

    def _fail(self, req: _Req, e: BaseException) -> None:
        with self._cv:
            if req in self._queue:
                self._drop(req)
        if not req.future.done():
            req.future.set_exception(e)


def _split(out: dict[str, torch.Tensor], counts: list[int]) -> list[dict[str, torch.Tensor]]:
    parts = {k: torch.split(v, counts) for k, v in out.items()}
    return [{k: parts[k][i] for k in out} for i in range(len(counts))]


# -- the endpoint -------------------------------------------------------------------------------
def token_target_options(teacher: Teacher, amp: str, compile: bool) -> tuple[str, dict[str, str]]:
    """(target fingerprint, target_options) of a token teacher served with these options."""
    facts = fingerprint_facts(dict(teacher.signature.extra)) if teacher.signature is not None else {}
    return (
        target_fingerprint(teacher.weights_fingerprint, amp=amp, compile=compile, facts=facts),
        target_options(amp=amp, compile=compile, facts=facts),
    )


def token_endpoint(teacher: Teacher, options, metrics):
    """The service ``Endpoint`` of a token teacher: a ``TokenBatcher`` by ``max_batch_tokens``,
    int32 ids accepted besides int64, the fingerprint covering the signature facts."""
    from kd.teacher_server.access import parse_access
    from kd.teacher_server.service import Endpoint

    o = options
    if o.mean is not None or o.std is not None:
        raise ValueError(f"teacher {teacher.name!r}: mean/std normalise uint8 images; a token teacher takes ids")
    if o.records:
        raise ValueError(f"teacher {teacher.name!r}: activation records are not offered for token teachers")
    if getattr(o, "instances", 1) != 1:
        raise ValueError(f"teacher {teacher.name!r}: a token teacher runs one instance (instances={o.instances})")
    if o.channels_last:
        log.info("teacher %s: channels_last does not apply to a token teacher; ignored", teacher.name)
    runner = TokenRunner(teacher, amp=o.amp, compile=o.compile, threads=o.threads)
    batcher = TokenBatcher(
        runner,
        max_batch_tokens=o.max_batch_tokens,
        max_batch_size=o.max_batch_size,
        max_queue_delay_s=o.max_queue_delay_us / 1e6,
        max_queue_size=o.max_queue_size,
        name=teacher.name,
        observer=metrics.batch_observer(teacher.name),
        on_queue_depth=metrics.depth_setter(teacher.name),
        on_tokens=metrics.token_observer(teacher.name),
    )
    if o.warmup:  # one short forward (int64 ids), so the first request pays no start-up cost
        width = max(1, min(8, o.max_batch_tokens, int(teacher.signature.extra.get("max_length", 0) or 8)))
        ids = torch.zeros((1, width), dtype=torch.int64)
        work = TokenWork(ids, [width], torch.ones((1, width), dtype=torch.bool), pb.OutputSpec(labels=True))
        runner.run([(work, [0])])
    fp, opts = token_target_options(teacher, o.amp, o.compile)
    return Endpoint(teacher, batcher, accepted=(pb.INT32,), access=parse_access(o.access),
                    fingerprint=fp, target_options=opts)  # fmt: skip
