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
    know theirs: the vocabulary sizes may agree while every id means another token."""
    theirs = teacher_tokenizer(facts)
    tokenizer = getattr(source, "tokenizer", None)
    ours = getattr(tokenizer, "hash", None)
    if theirs and ours and str(theirs) != str(ours):
        raise ValueError(
            f"{flag} {source.dataset_id} is tokenised by {tokenizer.name} (hash {ours}) but teacher {name!r} by "
            f"another tokenizer (hash {theirs}): the same ids would mean other tokens. Give the dataset the "
            "teacher's tokenizer (?tokenizer=PATH/tokenizer.json)"
        )


def refuse_other_dataset_tokenizer(source: Any, other: Any, flag: str, other_flag: str) -> None:
    """Refuse two token sources tokenised differently (``flag`` names ``source``)."""
    a = getattr(getattr(source, "tokenizer", None), "hash", None)
    b = getattr(getattr(other, "tokenizer", None), "hash", None)
    if a and b and a != b:
        raise ValueError(
            f"{flag} is tokenised by {source.tokenizer.name} (hash {a}), {other_flag} by {other.tokenizer.name} "
            f"(hash {b}): the same ids would mean other tokens; give both the same ?tokenizer="
        )
