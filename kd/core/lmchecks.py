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


def refuse_masked_lm(facts: Mapping[str, str], name: str) -> None:
    """Refuse a teacher whose signature says ``task=masked-lm``: its position s scores token s
    itself, so as next-token targets every one would land one position off."""
    if facts.get("task") == "masked-lm":
        raise ValueError(
            f"teacher {name!r} is a masked LM (task=masked-lm): its logits at position s predict token s itself, "
            "not token s + 1, so they are not next-token targets for a causal student; give a causal LM "
            "(hf:DIR?task=causal-lm, or a module whose task is causal-lm)"
        )
