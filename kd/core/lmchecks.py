"""Up-front checks that a token teacher, a student and a token dataset fit one another.

Distillation on token data goes wrong silently when the parts disagree: a masked LM's
logits at position s describe token s (a causal student learns position s as the
prediction of token s + 1), a dataset tokenised by another tokenizer of the same
vocabulary size gives targets for other tokens, and a sequence longer than a model's
positions fails deep inside its embedding. These checks read what each part says of
itself (a teacher's signature facts, a model's ``max_length`` or Hugging Face config,
a token source's tokenizer and lengths) and raise a ``ValueError`` naming the numbers
before any work.

Only ``kd.core`` is imported: the server, the trainer and the precompute all use them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

# The Hugging Face config fields that bound a model's positions (as kd.teacher_server.lm reads
# them for a teacher). Not ``config.max_length``: that is a generation default, not a limit.
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def refuse_masked_lm(facts: Mapping[str, str], name: str) -> None:
    """Refuse a teacher whose signature says ``task=masked-lm``: its position s scores token s
    itself, so as next-token targets every one would land one position off."""
    if facts.get("task") == "masked-lm":
        raise ValueError(
            f"teacher {name!r} is a masked LM (task=masked-lm): its logits at position s predict token s itself, "
            "not token s + 1, so they are not next-token targets for a causal student; give a causal LM "
            "(hf:DIR?task=causal-lm, or a module whose task is causal-lm)"
        )


def teacher_tokenizer(facts: Mapping[str, str]) -> str | None:
    """The teacher's tokenizer identity in the scheme of ``TokenSource.tokenizer.hash``, or None.

    A module teacher states it (its ``tokenizer_hash`` attribute, e.g. ``ByteTokenizer().hash``).
    An ``hf:DIR`` teacher's ``tokenizer`` fact hashes every tokenizer file of the directory, which
    no dataset's hash equals; its ``tokenizer_json`` fact is the hash of its tokenizer.json, as a
    dataset's ``?tokenizer=DIR/tokenizer.json`` reports it (absent from older servers: unknown)."""
    if facts.get("source") == "hf":
        return facts.get("tokenizer_json") or None
    return facts.get("tokenizer") or None


def refuse_other_tokenizer(facts: Mapping[str, str], name: str, source: Any, flag: str = "--dataset") -> None:
    """Refuse a token ``source`` tokenised by another tokenizer than teacher ``name``'s, when both
    know theirs: the vocabulary sizes may agree while every id means another token. Where both
    state their vocabulary's hash (an ``hf:`` teacher's ``tokenizer_vocab``, a tokenizer.json
    dataset's ``vocab_hash``), that is compared: the same tokenizer saved with other formatting
    (another ``tokenizers`` version, a copy) is the same; else the files' hashes are."""
    tokenizer = getattr(source, "tokenizer", None)
    theirs_vocab, ours_vocab = facts.get("tokenizer_vocab"), getattr(tokenizer, "vocab_hash", None)
    if theirs_vocab and ours_vocab:
        theirs, ours = theirs_vocab, ours_vocab
    else:
        theirs, ours = teacher_tokenizer(facts), getattr(tokenizer, "hash", None)
    if theirs and ours and str(theirs) != str(ours):
        raise ValueError(
            f"{flag} {source.dataset_id} is tokenised by {tokenizer.name} (hash {ours}) but teacher {name!r} by "
            f"another tokenizer (hash {theirs}): the same ids would mean other tokens. Give the dataset the "
            "teacher's tokenizer (?tokenizer=PATH/tokenizer.json)"
        )


def refuse_other_dataset_tokenizer(source: Any, other: Any, flag: str, other_flag: str) -> None:
    """Refuse two token sources tokenised differently (``flag`` names ``source``): their vocabularies
    where both know them (``vocab_hash``), else their tokenizers' hashes."""
    both = all(hasattr(getattr(d, "tokenizer", None), "vocab_hash") for d in (source, other))
    key = "vocab_hash" if both else "hash"
    a = getattr(getattr(source, "tokenizer", None), key, None)
    b = getattr(getattr(other, "tokenizer", None), key, None)
    if a and b and a != b:
        raise ValueError(
            f"{flag} is tokenised by {source.tokenizer.name} (hash {a}), {other_flag} by {other.tokenizer.name} "
            f"(hash {b}): the same ids would mean other tokens; give both the same ?tokenizer="
        )


def model_max_length(model: Any) -> int | None:
    """The most positions ``model`` takes: its ``max_length`` attribute (kd's convention for token
    modules), else its Hugging Face config's position count; None when it states no bound."""
    value = getattr(model, "max_length", None)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    config = getattr(model, "config", None)
    for key in POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def facts_max_length(facts: Mapping[str, str]) -> int | None:
    """A token teacher's ``max_length`` signature fact (0 or absent: not bounded -> None)."""
    try:
        value = int(facts.get("max_length", 0) or 0)
    except ValueError:
        return None
    return value if value > 0 else None


def longest_sequence(source: Any) -> int:
    """The longest sample (real tokens) of a token source, without building its batches."""
    block = getattr(source, "block", None)
    if getattr(source, "pack", False) and block:
        return int(block)  # packed: every sample is one block
    arrays = getattr(source, "_arrays", None)
    if arrays is not None:  # kd.core.tokens.TokenSource: document offsets, truncated to the block
        lengths = np.diff(arrays[2])
        if block:
            lengths = np.minimum(lengths, int(block))
        return int(lengths.max()) if len(lengths) else 0
    longest = 0  # another token source: its attention masks, a batch at a time
    for lo in range(0, len(source), 256):
        b = source.batch(range(lo, min(lo + 256, len(source))))
        longest = max(longest, int(b.attention_mask.sum(1).max()))
    return longest


def refuse_too_long(longest: int, limit: int | None, who: str, hint: str) -> None:
    """The one-line refusal of the served path (``a row of N tokens is longer than the maximum length
    M of ...``) for a sequence that would run past a model's positions; ``hint``: what to change."""
    if limit is not None and longest > limit:
        # "of WHO", not "WHO's": a quoted name took the possessive after its quote ("teacher 'lm''s")
        raise ValueError(f"a row of {longest} tokens is longer than the maximum length {limit} of {who}: {hint}")


def refuse_narrow_student(model: Any, vocab: int, who: str = "the student") -> int:
    """The width of ``model``'s logits (one eval-mode forward of two ids, 0 and ``vocab - 1``, no
    gradient), refused where it is narrower than the ``vocab`` ids of the data's tokenizer (or its
    embedding takes fewer ids): its logits cannot score every token. Wider is a padded vocabulary
    (Pythia, OPT, Phi, Qwen pad ``vocab_size`` to a multiple of 64 or 128): its first ``vocab``
    columns are the tokenizer's ids and the trainers cut the rest (``real_vocabulary``)."""
    import torch

    from kd.core.factory import logits_of

    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(emb, "num_embeddings", None)
    if isinstance(rows, int) and rows < vocab:  # before a forward that would index past it
        raise ValueError(f"{who} embeds {rows} token ids, fewer than the {vocab} ids of the dataset's tokenizer: "
                         "give a student of the tokenizer's vocabulary (or more: a padded one is cut)")  # fmt: skip
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    width = 2 if (model_max_length(model) or 2) >= 2 else 1
    probe = torch.tensor([[0, vocab - 1][-width:]], dtype=torch.int64, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = logits_of(model(probe))
    except IndexError as e:  # an embedding of fewer rows than the ids (a module without get_input_embeddings)
        raise ValueError(f"{who} cannot take id {vocab - 1} of the dataset's tokenizer ({e}): give a student of "
                         f"its {vocab} ids (or more: a padded one is cut)") from None  # fmt: skip
    finally:
        model.train(was_training)
    got = int(out.shape[-1])
    if got < vocab:
        raise ValueError(f"{who} gives {got} logits per position, fewer than the {vocab} ids of the dataset's "
                         "tokenizer: give a student of the tokenizer's vocabulary (or more: a padded one is "
                         "cut to its first ids)")  # fmt: skip
    return got


def real_vocabulary(logits: Any, vocab: int) -> Any:
    """``logits [..., W]`` of a student cut to the tokenizer's ``vocab`` ids (its first columns):
    a padded vocabulary's extra columns are ids no text has, and would take probability mass from
    the real ones in every softmax (loss, sampling, perplexity). A view: no copy, and the gradient
    of the cut columns is zero. A narrower width is refused naming both numbers."""
    width = int(logits.shape[-1])
    if width == vocab:
        return logits
    if width < vocab:
        raise ValueError(f"the student gives {width} logits per position, fewer than the {vocab} ids of the "
                         "dataset's tokenizer")  # fmt: skip
    return logits[..., :vocab]
