"""On-policy distillation of a causal LM through a served token teacher (GKD / MiniLLM style).

The student generates continuations of prompts; the teacher, served by ``kd serve``, scores
the student's *own* tokens; the student minimises a per-token divergence on them. A
teacher served once can score many students' samples at the same time, which no
in-process distillation tool offers.

**GKD** (Agarwal et al. 2024, "On-Policy Distillation of Language Models", arXiv
2306.13649, Algorithm 1): at each step, with probability ``lmbda`` (the student data
fraction) the batch's outputs y are sampled from the student given the prompts x
(on-policy), otherwise they are the dataset's own continuations (off-policy, supervised
KD). The loss is the per-token divergence D(p_T(. | x, y<t) || p_S(. | x, y<t)) averaged
over the output tokens y_t, with no gradient through the sampling (as the paper does).
``divergence`` is any of ``kd.student_trainer.losses.token_kd``'s (default ``gjsd`` with
beta = 0.5, the paper's generalised JSD; ``rkl`` is MiniLLM's reverse KL without its
policy-gradient machinery). The teacher's distribution comes from the server as full
logits (``scoring="logits"``) or as top-k logits + log-sum-exp (``scoring="topk"``, the
losses' exact rest-bucket form).

**Cheap variant** ``scoring="logprobs"``: the server returns only log p_T(y_t) of each
sampled token (``client.token_logprobs``: 4 bytes per token instead of 4 V). With y_t
drawn from the student at temperature 1, the per-position reverse KL and its gradient
with the prefix held fixed (the single-step part of MiniLLM's gradient, Gu et al. 2024;
exactly the gradient GKD takes with D = reverse KL) are

    KL(p_S || p_T) = E_{y ~ p_S}[log p_S(y) - log p_T(y)],
    grad KL        = E_{y ~ p_S}[(log p_S(y) - log p_T(y)) grad log p_S(y)]

(the other term, E[grad log p_S(y)], is 0). One sample per position estimates both without
bias, so the loss *value* is mean_t (log p_S(y_t) - log p_T(y_t)) and its *gradient* is that
of the surrogate mean_t sg(log p_S(y_t) - log p_T(y_t)) log p_S(y_t) (sg: stop-gradient),
means over the generated tokens. The effect of y_t on later positions (MiniLLM's long-term
term) is dropped, as in GKD. It needs every batch on-policy (``lmbda`` = 1) and sampling at
temperature 1 (otherwise y is not drawn from p_S); other settings are refused.

Prompts: for instruction data (``prompt=`` / ``completion=``) the prompt part of each
sample (the tokens before the first loss-mask token); otherwise its first ``prompt_tokens``
tokens (fewer for a shorter document, always keeping at least one token to predict).
Generation stops after ``max_new_tokens`` or at the tokenizer's eos (kept); sampling is
seeded (``seed``), so a run's samples are reproducible.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from kd.core.factory import logits_of
from kd.core.lmchecks import (
    facts_max_length,
    longest_sequence,
    model_max_length,
    real_vocabulary,
    refuse_masked_lm,
    refuse_narrow_student,
    refuse_other_tokenizer,
    refuse_too_long,
)
from kd.core.signals import Stopped
from kd.core.tokens import TokenBatch, TokenSource, TokenTargets, refuse_no_samples
from kd.student_trainer.losses.token_kd import (
    DIVERGENCES,
    evaluate_tokens,
    masked_token_mean,
    per_token_divergence,
    token_kd_loss,
)
from kd.student_trainer.optim import (
    AMP_MODES,
    Recipe,
    autocast,
    grad_scaler,
    lr_factor,
    make_optimizer,
    optimizer_step,
    recipe_of,
    set_lr,
)
from kd.student_trainer.train import RUN_CHECKPOINT, load_run_state, read_run_checkpoint, write_run_checkpoint

if TYPE_CHECKING:
    from kd.teacher_server.client import TeacherClient

SCORINGS = ("logits", "topk", "logprobs")


@dataclass
class OnPolicyConfig:
    """Sampling, loss and recipe of an on-policy run (the recipe fields are ``optim.Recipe``'s)."""

    steps: int = 100
    batch_size: int = 8
    prompt_tokens: int = 16  # P: the prompt is a sample's first P tokens (instruction data: its prompt)
    max_new_tokens: int = 32
    temperature: float = 1.0  # the student's sampling temperature (0: greedy)
    lmbda: float = 0.5  # GKD's student data fraction: P(a batch is sampled from the student); TRL's default
    divergence: str = "gjsd"
    beta: float = 0.5  # gjsd's beta (0: forward KL, 1: reverse KL)
    alpha: float = 0.1  # skl / srkl skew
    kd_temperature: float = 1.0  # the divergence's temperature (the teacher's lse is asked at it)
    scoring: str = "logits"  # logits | topk | logprobs
    top_k: int = 0  # scoring="topk": ids per position
    seed: int = 0
    device: str = "cpu"
    eval_batch_size: int = 16
    eval_prompts: int = 64  # held-out prompts for the divergence before/after (0: skip)
    # the recipe (kd.student_trainer.optim.Recipe)
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    schedule: str = "constant"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    amp: str = "fp32"
    clip_grad_norm: float = 0.0

    def validate(self) -> None:
        """Refuse settings that cannot run or would silently compute something else, naming them."""
        for name in ("steps", "batch_size", "prompt_tokens", "max_new_tokens", "eval_batch_size"):
            if int(getattr(self, name)) < (0 if name == "steps" else 1):
                raise ValueError(f"{name} must be >= {0 if name == 'steps' else 1}, got {getattr(self, name)}")
        if self.eval_prompts < 0:
            raise ValueError(f"eval_prompts must be >= 0, got {self.eval_prompts}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not (math.isfinite(self.kd_temperature) and self.kd_temperature > 0):
            raise ValueError(f"kd_temperature must be > 0, got {self.kd_temperature}")
        if not 0 <= self.lmbda <= 1:
            raise ValueError(f"lmbda (the share of on-policy batches) must lie in [0, 1], got {self.lmbda}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence {self.divergence!r}; choose from {', '.join(DIVERGENCES)}")
        if not 0 <= self.beta <= 1 or not 0 <= self.alpha <= 1:
            raise ValueError(f"beta and alpha must lie in [0, 1], got beta={self.beta}, alpha={self.alpha}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"unknown scoring {self.scoring!r}; choose from {', '.join(SCORINGS)}")
        if self.scoring == "topk" and self.top_k < 1:
            raise ValueError("scoring=topk needs top_k >= 1 (ids per position)")
        if self.scoring == "logprobs":
            if self.lmbda != 1:
                raise ValueError(
                    "scoring=logprobs estimates the reverse KL from the student's own samples; dataset "
                    f"(off-policy) batches have none: set lmbda=1 (got {self.lmbda}) or score logits/topk"
                )
            if self.temperature != 1 or self.kd_temperature != 1:
                raise ValueError(
                    "scoring=logprobs needs samples drawn from the student itself: temperature=1 and "
                    f"kd_temperature=1 (got {self.temperature}, {self.kd_temperature})"
                )
        if self.amp not in AMP_MODES:
            raise ValueError(f"unknown amp mode {self.amp!r}; choose from {', '.join(AMP_MODES)}")
        recipe_of(self).validate()


@dataclass
class Sequences:
    """Prompts with their continuations, right-padded, and where the continuations are scored."""

    tokens: torch.Tensor  # int64 [B, W]
    lengths: torch.Tensor  # int64 [B]: real tokens per row
    prompt_lengths: torch.Tensor  # int64 [B]
    positions: torch.Tensor  # bool [B, W]: logits positions s whose next token s + 1 is an output token
    on_policy: bool

    @property
    def num_scored(self) -> int:
        return int(self.positions.sum())


def prompt_lengths(batch: TokenBatch, prompt_tokens: int, instruct: bool) -> torch.Tensor:
    """Each sample's prompt length: its prompt part (instruction data: up to the first loss-mask
    token), else ``prompt_tokens``, cut so at least one real token is left to predict."""
    real = batch.attention_mask.sum(1)
    if instruct:
        has = batch.loss_mask.any(1)
        first = batch.loss_mask.to(torch.int8).argmax(1)
        p = torch.where(has, first, real)
    else:
        p = torch.full_like(real, int(prompt_tokens))
    return torch.minimum(p, real - 1).clamp(min=1)


def _scored_positions(lengths: torch.Tensor, prompt_lens: torch.Tensor, width: int) -> torch.Tensor:
    """bool [B, width]: s in [prompt - 1, length - 2], the positions predicting the outputs."""
    s = torch.arange(width)[None]
    return (s >= prompt_lens[:, None] - 1) & (s <= lengths[:, None] - 2)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: torch.Tensor,
    prompt_lens: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    eos_id: int | None = None,
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
    recipe: Recipe | None = None,
    vocab: int | None = None,
) -> Sequences:
    """Sample up to ``max_new_tokens`` after each row's prompt (``prompts[i, :prompt_lens[i]]``)
    from softmax(logits / ``temperature``) (argmax at 0), stopping a row at ``eos_id`` (kept).
    ``vocab``: the tokenizer's ids; a padded student's logits past them are cut first, so no id
    that no text has (nor the teacher scores) is ever drawn.

    Any causal module works (no KV cache: each step re-runs the rows, right-padded, so a real
    position never sees padding). The draws use ``generator`` on the CPU, so a seed gives the
    same samples on any device."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    b = prompts.shape[0]
    lens = prompt_lens.to(torch.int64).cpu().clone()
    width = int(lens.max()) + max_new_tokens
    buf = torch.full((b, width), int(pad_id), dtype=torch.int64)
    p = prompts[:, : int(lens.max())].cpu()  # a dataset batch is wider than its prompts
    real = torch.arange(p.shape[1])[None] < lens[:, None]
    buf[:, : p.shape[1]] = torch.where(real, p, torch.full_like(p, int(pad_id)))
    start = lens.clone()
    done = torch.zeros(b, dtype=torch.bool)
    rows = torch.arange(b)
    try:
        for _ in range(max_new_tokens):
            if bool(done.all()):
                break
            with autocast(recipe or Recipe(), device):
                logits = logits_of(model(buf[:, : int(lens.max())].to(device)))
            last = logits[rows.to(device), (lens - 1).to(device)].float().cpu()
            if vocab is not None:
                last = real_vocabulary(last, vocab)
            if temperature == 0:
                nxt = last.argmax(-1)
            else:
                probs = torch.softmax(last / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            active = ~done
            buf[rows[active], lens[active]] = nxt[active]
            lens = lens + active.to(torch.int64)
            if eos_id is not None:
                done |= active & (nxt == int(eos_id))
            done |= lens - start >= max_new_tokens
    finally:
        model.train(was_training)
    out = buf[:, : int(lens.max())]
    return Sequences(out, lens, start, _scored_positions(lens, start, out.shape[1]), True)


def dataset_sequences(batch: TokenBatch, prompt_lens: torch.Tensor, max_new_tokens: int) -> Sequences:
    """GKD's off-policy outputs: each sample's own continuation after its prompt, up to
    ``max_new_tokens`` tokens, scored where the next token is in the loss mask."""
    real = batch.attention_mask.sum(1).cpu()
    lens = torch.minimum(real, prompt_lens + max_new_tokens)
    width = int(lens.max())
    tokens = batch.tokens[:, :width].cpu()
    positions = _scored_positions(lens, prompt_lens, width)
    positions[:, :-1] &= batch.loss_mask[:, 1:width].cpu()
    return Sequences(tokens, lens, prompt_lens.clone(), positions, False)


def score(
    client: TeacherClient, teacher: str, seqs: Sequences, *, scoring: str = "logits", top_k: int = 0,
    temperature: float = 1.0,
) -> torch.Tensor | TokenTargets:  # fmt: skip
    """The served teacher at ``seqs.positions``: full logits ``[B, W, V]`` (``logits``),
    ``TokenTargets`` of the top ``top_k`` ids with the lse at ``temperature`` (``topk``), or
    log p_T(tokens[s + 1]) ``[B, W]`` (``logprobs``); zeros / id -1 where not asked."""
    kw: dict[str, Any] = {"lengths": seqs.lengths.tolist(), "positions": seqs.positions}
    if scoring == "logits":
        return client.token_logits(teacher, seqs.tokens, **kw)
    if scoring == "topk":
        return client.token_topk(teacher, seqs.tokens, top_k, temperature, **kw)
    if scoring == "logprobs":
        return client.token_logprobs(teacher, seqs.tokens, **kw)
    raise ValueError(f"unknown scoring {scoring!r}; choose from {', '.join(SCORINGS)}")


def logprob_reverse_kl(
    student_logits: torch.Tensor, tokens: torch.Tensor, teacher_logprobs: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """The sampled-token reverse KL (module docstring): value mean_t (log p_S(y_t) - log p_T(y_t)),
    gradient that of mean_t sg(log p_S(y_t) - log p_T(y_t)) log p_S(y_t), over ``positions``
    (logits position s scores y = tokens[s + 1])."""
    dt = torch.promote_types(student_logits.dtype, torch.float32)
    nxt = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1).to(student_logits.device)  # last column unused
    log_q = F.log_softmax(student_logits.to(dt), dim=-1).gather(-1, nxt[..., None]).squeeze(-1)
    diff = log_q - teacher_logprobs.to(device=log_q.device, dtype=dt)
    mask = positions.to(log_q.device)
    estimate = masked_token_mean(diff, mask)
    surrogate = masked_token_mean(diff.detach() * log_q, mask)
    return estimate.detach() + surrogate - surrogate.detach()


def onpolicy_loss(
    student_logits: torch.Tensor, seqs: Sequences, teacher: torch.Tensor | TokenTargets, config: OnPolicyConfig
) -> torch.Tensor:
    """The step's loss on ``seqs`` from the teacher's scores (``score``), per ``config``."""
    if config.scoring == "logprobs":
        if not isinstance(teacher, torch.Tensor) or teacher.shape != seqs.tokens.shape:
            raise ValueError("scoring=logprobs needs the teacher's log-probabilities [B, W] of the sequences")
        return logprob_reverse_kl(student_logits, seqs.tokens, teacher, seqs.positions)
    teacher = teacher.to(student_logits.device)
    return token_kd_loss(config.divergence, student_logits, teacher, seqs.positions.to(student_logits.device),
                         temperature=config.kd_temperature, beta=config.beta, alpha=config.alpha)  # fmt: skip


def _student_logits(
    model: nn.Module, tokens: torch.Tensor, device: torch.device, recipe: Recipe, vocab: int
) -> torch.Tensor:
    """The student's logits over the tokenizer's ``vocab`` ids (a padded vocabulary's extra columns cut)."""
    with autocast(recipe, device):
        return real_vocabulary(logits_of(model(tokens.to(device))), vocab)


@torch.no_grad()
def heldout_divergence(
    model: nn.Module,
    client: TeacherClient,
    teacher: str,
    source: TokenSource,
    config: OnPolicyConfig,
    *,
    limit: int | None = None,
    seed: int | None = None,
) -> float:
    """Mean per-token ``config.divergence`` between teacher and student on the student's own
    samples from ``source``'s prompts (the first ``limit`` samples, drawn with ``seed``,
    default ``config.seed``), full teacher logits: what on-policy training minimises."""
    device = torch.device(config.device)
    recipe = recipe_of(config)
    n = len(source) if limit is None else min(len(source), int(limit))
    gen = torch.Generator().manual_seed(config.seed if seed is None else seed)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()  # no dropout in the scored forward either
    for lo in range(0, n, config.eval_batch_size):
        batch = source.batch(range(lo, min(lo + config.eval_batch_size, n)))
        seqs = generate(model, batch.tokens, prompt_lengths(batch, config.prompt_tokens, source.instruct),
                        max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                        eos_id=source.tokenizer.eos_id, pad_id=source.tokenizer.pad_id, generator=gen,
                        device=device, recipe=recipe, vocab=source.vocab_size)  # fmt: skip
        t = score(client, teacher, seqs, scoring="logits").to(device)
        d = per_token_divergence(config.divergence,
                                 _student_logits(model, seqs.tokens, device, recipe, source.vocab_size), t,
                                 temperature=config.kd_temperature, beta=config.beta, alpha=config.alpha)  # fmt: skip
        total += float(d[seqs.positions.to(device)].double().sum())
        count += seqs.num_scored
    model.train(was_training)
    return total / count if count else math.nan


@dataclass
class OnPolicyResult:
    steps: int
    on_policy_batches: int
    tokens_scored: int
    losses: list[float]
    val_before: dict[str, float] | None
    val_after: dict[str, float] | None
    divergence_before: float | None
    divergence_after: float | None
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _val(model: nn.Module, val: TokenSource | None, config: OnPolicyConfig) -> dict[str, float] | None:
    if val is None:
        return None
    m = evaluate_tokens(model, val, batch_size=config.eval_batch_size, device=config.device)
    return {"ppl": m.perplexity, "acc": m.accuracy, "nll": m.loss, "tokens": m.tokens}


def longest_rollout(source: TokenSource, config: OnPolicyConfig) -> int:
    """The longest sequence a run builds from ``source``'s samples: a prompt (``prompt_lengths``)
    and at most ``config.max_new_tokens`` tokens after it, sampled or the sample's own."""
    if not source.instruct:  # every prompt is prompt_tokens, cut to leave one real token
        longest = longest_sequence(source)
        return max(1, min(int(config.prompt_tokens), longest - 1)) + int(config.max_new_tokens)
    prompt = 0  # instruction data: each sample's own prompt
    for lo in range(0, len(source), 256):
        batch = source.batch(range(lo, min(lo + 256, len(source))))
        prompt = max(prompt, int(prompt_lengths(batch, config.prompt_tokens, True).max()))
    return prompt + int(config.max_new_tokens)


def check_lengths(
    student: nn.Module,
    facts: dict[str, str],
    teacher: str,
    train: TokenSource,
    config: OnPolicyConfig,
    *,
    val: TokenSource | None = None,
) -> None:
    """Refuse, before any step, a run whose sequences would pass the student's positions (its
    ``max_length`` or Hugging Face config) or the served teacher's (its ``max_length`` fact):
    the student's embedding fails deep inside, the server only at that batch."""
    hint = "lower --prompt-tokens / --max-new-tokens (or the dataset's ?block=)"
    student_limit, teacher_limit = model_max_length(student), facts_max_length(facts)
    for src in (train, val) if val is not None and config.eval_prompts else (train,):
        longest = longest_rollout(src, config)
        refuse_too_long(longest, student_limit, "the student", hint)
        refuse_too_long(longest, teacher_limit, f"teacher {teacher!r}", hint)
    if val is not None:  # the perplexity before and after runs the student over whole samples
        refuse_too_long(longest_sequence(val), student_limit, "the student", "lower --val-dataset's ?block=")


_CKPT_KEYS = {"step", "order", "coin", "sampler", "order_rng", "torch_rng", "model", "optimizer", "scaler", "losses",
              "on_batches", "scored", "before"}  # fmt: skip


def _coin_state(saved: list) -> tuple:
    """``random.Random.getstate()`` from the list a checkpoint holds (its 625 words, then the version):
    the checkpoint stays plain ints, which ``weights_only`` loading accepts."""
    return (int(saved[-1]), tuple(int(v) for v in saved[:-1]), None)


def train_onpolicy(
    student: nn.Module,
    client: TeacherClient,
    teacher: str,
    train: TokenSource,
    config: OnPolicyConfig,
    *,
    val: TokenSource | None = None,
    stop: Callable[[], int | None] | None = None,
    run_dir: Path | None = None,
    resume: bool = False,
    checkpoint_every: int = 0,
) -> OnPolicyResult:
    """Distil ``student`` from the served ``teacher`` on its own samples (GKD, module docstring).

    ``train`` gives the prompts (and the off-policy continuations); ``val``, when given, is
    evaluated before and after (perplexity, next-token accuracy) and its first
    ``eval_prompts`` prompts give the held-out divergence before and after. ``stop() -> signal
    number or None`` is asked before every step (a SIGTERM handler's record): once it answers,
    ``kd.core.signals.Stopped`` is raised there, before the evaluation after.

    ``run_dir``: ``run_dir/checkpoint.pt`` is written when stopped and every ``checkpoint_every``
    steps (0: only when stopped): the student, the optimizer (and fp16's grad scaler), the step, the
    batch order, GKD's coin, the sampler's and torch's generators, the losses and the evaluation
    before. ``resume``: continue from it, to the result of an uninterrupted run; a checkpoint of
    another configuration, dataset or teacher (its weights' fingerprint) is refused naming what
    differs."""
    config.validate()
    if checkpoint_every < 0 or (checkpoint_every and run_dir is None):
        raise ValueError(f"checkpoint_every={checkpoint_every}: a number of steps >= 0, with a run_dir to write to")
    if resume and run_dir is None:
        raise ValueError("resume continues the run in run_dir: give run_dir")
    refuse_no_samples(train)  # named with its token count and block, before the server is asked
    if val is not None:
        refuse_no_samples(val)
    desc = client.describe(teacher)
    # Every later score must come from these weights: gRPC reconnects silently to a server restarted at
    # the address, which may hold other ones (TeacherChangedError then). Not for a teacher taking live
    # weight updates, whose fingerprint changes by design (as ServerSource).
    if not desc.accepts_weights:
        client.expect_fingerprint(desc.name, desc.fingerprint)
    facts = dict(desc.signature.extra) if desc.signature is not None else {}
    # Checked before any step: a masked LM scores each position's own token, not the next one.
    refuse_masked_lm(facts, teacher)
    # The prompts (and the held-out data) must be the teacher's tokens, not merely as many ids.
    refuse_other_tokenizer(facts, teacher, train)
    if val is not None:
        refuse_other_tokenizer(facts, teacher, val, "--val-dataset")
    check_lengths(student, facts, teacher, train, config, val=val)
    vocab = desc.num_classes
    if int(vocab) != train.vocab_size:
        raise ValueError(f"teacher {teacher!r} has {vocab} ids but {train.uri}'s tokenizer has {train.vocab_size}")
    # A padded student samples and learns over its first V logits; a narrower one is refused here.
    refuse_narrow_student(student, int(train.vocab_size))
    started = time.perf_counter()
    device = torch.device(config.device)
    recipe = recipe_of(config)
    student.to(device)
    optimizer = make_optimizer(student.parameters(), recipe)
    scaler = grad_scaler(recipe, device)
    coin = random.Random(config.seed)  # GKD's u ~ U(0, 1) per batch
    sampler = torch.Generator().manual_seed(config.seed)
    order_gen = torch.Generator().manual_seed(config.seed + 1)
    per_epoch = max(math.ceil(len(train) / config.batch_size), 1)
    epochs = max(math.ceil(config.steps / per_epoch), 1)
    eval_n = min(config.eval_prompts, len(val)) if val is not None else 0
    identity = {**json.loads(json.dumps(asdict(config), sort_keys=True)), "dataset": train.dataset_id,
                "val_dataset": val.dataset_id if val is not None else None, "teacher": teacher,
                "fingerprint": None if desc.accepts_weights else desc.fingerprint}  # fmt: skip
    # More steps continue a run whose rates do not depend on its length (a constant or multistep rate; a
    # warm-up counts steps from the start); a cosine or linear decay reaches 0 at the last step, so there
    # the steps are the run's.
    if config.schedule not in ("cosine", "linear"):
        del identity["steps"]
    first = 0
    if resume:
        ckpt = read_run_checkpoint(run_dir, "onpolicy", identity, _CKPT_KEYS, "when it is stopped and every "
                                   "--checkpoint-every steps")  # fmt: skip
        if int(ckpt["step"]) > config.steps:
            raise ValueError(f"checkpoint {str(Path(run_dir) / RUN_CHECKPOINT)!r} is after step {int(ckpt['step'])}: "
                             f"a run of {config.steps} steps ends before it; resume with steps (--steps) >= "
                             f"{int(ckpt['step'])}")  # fmt: skip
        load_run_state(run_dir, ckpt, student, optimizer)
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        first, order = int(ckpt["step"]), ckpt["order"]
        coin.setstate(_coin_state(ckpt["coin"]))
        sampler.set_state(ckpt["sampler"])
        order_gen.set_state(ckpt["order_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in ckpt:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        losses, on_batches, scored = [float(v) for v in ckpt["losses"]], int(ckpt["on_batches"]), int(ckpt["scored"])
        val_before, div_before = ckpt["before"]["val"], ckpt["before"]["divergence"]
    else:
        div_before = heldout_divergence(student, client, teacher, val, config, limit=eval_n) if eval_n else None
        val_before = _val(student, val, config)
        losses: list[float] = []
        on_batches = scored = 0
        order = torch.randperm(len(train), generator=order_gen)

    def save(step: int) -> None:
        write_run_checkpoint(run_dir, "onpolicy", identity, {
            "step": step, "order": order, "coin": list(coin.getstate()[1]) + [coin.getstate()[0]],
            "sampler": sampler.get_state(), "order_rng": order_gen.get_state(), "torch_rng": torch.get_rng_state(),
            **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
            "model": student.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {}, "losses": list(losses),
            "on_batches": on_batches, "scored": scored,
            "before": {"val": val_before, "divergence": div_before}})  # fmt: skip

    for step in range(first, config.steps):
        if stop is not None and (signum := stop()):
            if run_dir is not None:
                save(step)
            raise Stopped(signum, f"after {step} of {config.steps} steps")
        if checkpoint_every and step > first and step % checkpoint_every == 0:
            save(step)
        epoch, i = divmod(step, per_epoch)
        if i == 0 and step:
            order = torch.randperm(len(train), generator=order_gen)
        batch = train.batch(order[i * config.batch_size : (i + 1) * config.batch_size])
        plens = prompt_lengths(batch, config.prompt_tokens, train.instruct)
        if coin.random() < config.lmbda:
            seqs = generate(student, batch.tokens, plens, max_new_tokens=config.max_new_tokens,
                            temperature=config.temperature, eos_id=train.tokenizer.eos_id,
                            pad_id=train.tokenizer.pad_id, generator=sampler, device=device, recipe=recipe,
                            vocab=train.vocab_size)  # fmt: skip
            on_batches += 1
        else:
            seqs = dataset_sequences(batch, plens, config.max_new_tokens)
        keep = seqs.positions.any(1)
        if not bool(keep.any()):  # nothing to predict in this batch (documents as short as their prompts)
            continue
        if not bool(keep.all()):  # the server wants at least one position per row
            seqs = Sequences(seqs.tokens[keep], seqs.lengths[keep], seqs.prompt_lengths[keep], seqs.positions[keep],
                             seqs.on_policy)  # fmt: skip
        targets = score(client, teacher, seqs, scoring=config.scoring, top_k=config.top_k,
                        temperature=config.kd_temperature)  # fmt: skip
        set_lr(optimizer, recipe.lr * lr_factor(recipe, epoch, i, per_epoch, epochs))
        student.train()
        loss = onpolicy_loss(_student_logits(student, seqs.tokens, device, recipe, train.vocab_size), seqs, targets,
                             config)  # fmt: skip
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: the loss is {float(loss)} (lower --lr, or --clip-grad-norm)")
        optimizer.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        optimizer_step(optimizer, recipe, scaler)
        if scaler is not None:
            scaler.update()
        losses.append(float(loss.detach()))
        scored += seqs.num_scored
    if run_dir is not None:  # the finished run: a resume with more --steps goes on from here
        save(config.steps)
    div_after = heldout_divergence(student, client, teacher, val, config, limit=eval_n) if eval_n else None
    return OnPolicyResult(config.steps, on_batches, scored, losses, val_before, _val(student, val, config),
                          div_before, div_after, time.perf_counter() - started)  # fmt: skip
