"""Hidden-state distillation for language models (``kd train-lm --feature``).

A *hidden match* pairs one student module with one teacher module whose outputs are hidden states
``[B, S, D]`` (a transformer block, a final norm), written as kd train's ``--match`` pairs are
(``STUDENT=TEACHER``, module paths) with the loss and its weight after colons:
``STUDENT=TEACHER[:LOSS[:WEIGHT]]``, e.g. ``transformer.h.1=transformer.h.3:mse:0.5``.

* ``cosine`` (default): DistilBERT's cosine embedding loss, ``losses/hidden_cosine.py``;
* ``mse``: TinyBERT's hidden-state MSE through a learned W_h, ``losses/hidden_mse.py``.

The student's states are captured with forward hooks (``features.Taps``) and pass through the
match's connector (``features.make_connector`` on the vectors' widths): ``linear`` (D_s -> D_t with
a bias: TinyBERT's W_h) by default for ``mse``; ``auto`` (none where the widths agree, as
DistilBERT, else linear) for ``cosine``. The connectors train with the student, are checkpointed
with it and saved beside it. Both sides are compared at the *counted* positions only (those whose
next token is a target, the token loss's positions), packed ``[P, D]`` in row-major order: a server
computes and sends the teacher's states only there (``ServerSource.token_targets_hidden``), an
in-process teacher's are picked there. Each match's loss is a mean over those positions, like the
token losses, so the trainer's token-share weighting of micro-batches and ranks holds for the sum
``token loss + sum_k weight_k * hidden loss_k``.

A token cache gives the hidden states it stores (``kd precompute --feature LAYER``: fp16, at every real
position); one without the layers asked for is refused up front, naming what it stores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from kd.student_trainer.features import LOGITS, Match, Taps, make_connector
from kd.student_trainer.losses.hidden_cosine import hidden_cosine_loss
from kd.student_trainer.losses.hidden_mse import hidden_mse_loss

HIDDEN_LOSSES = {"cosine": hidden_cosine_loss, "mse": hidden_mse_loss}
# DistilBERT compares the states as they are (one width); TinyBERT always maps the student's by W_h.
DEFAULT_CONNECTOR = {"cosine": "auto", "mse": "linear"}
CONNECTOR_KINDS = ("auto", "linear")


@dataclass(frozen=True)
class HiddenMatch:
    student: str
    teacher: str
    loss: str = "cosine"
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> HiddenMatch:
        """``STUDENT=TEACHER[:LOSS[:WEIGHT]]`` (module paths hold dots, never colons)."""
        pair, *rest = text.split(":")
        what = f"--feature {text!r}"
        try:
            m = Match.parse(pair)
        except ValueError as e:
            raise ValueError(f"{what}: {e}; give STUDENT=TEACHER[:LOSS[:WEIGHT]]") from None
        if len(m.student) != 1:
            raise ValueError(f"{what}: one student and one teacher layer a pair (repeat --feature for more)")
        if m.student[0] == LOGITS:  # kd train's --match name for the output: no module, so no hook (Taps)
            raise ValueError(f"{what}: the student's {LOGITS!r} are its output, which the token loss distils; "
                             "name a module whose output is hidden states [B, S, D]")  # fmt: skip
        if len(rest) > 2:
            raise ValueError(f"{what}: expected STUDENT=TEACHER[:LOSS[:WEIGHT]]")
        loss = rest[0] if rest and rest[0] else "cosine"
        if loss not in HIDDEN_LOSSES:
            raise ValueError(f"{what}: unknown loss {loss!r}; choose {' or '.join(HIDDEN_LOSSES)}")
        weight = 1.0
        if len(rest) == 2:
            try:
                weight = float(rest[1])
            except ValueError:
                raise ValueError(f"{what}: weight {rest[1]!r} is not a number") from None
            if not (math.isfinite(weight) and weight > 0):
                raise ValueError(f"{what}: weight must be a finite number > 0, got {rest[1]}")
        return cls(m.student[0], m.teacher[0], loss, weight)


class HiddenStates(nn.Module):
    """The connectors of a run's hidden matches (one per match), the student's hooks and the loss.

    ``connector``: ``auto`` or ``linear`` for every match, or None for each loss's default
    (``DEFAULT_CONNECTOR``). Build it with ``HiddenStates.build`` (checks both sides' layers)."""

    def __init__(self, matches: Sequence[HiddenMatch], student_widths: Sequence[int],
                 teacher_widths: Sequence[int], connector: str | None = None) -> None:  # fmt: skip
        super().__init__()
        if connector is not None and connector not in CONNECTOR_KINDS:
            raise ValueError(f"--feature-connector {connector!r}: choose {' or '.join(CONNECTOR_KINDS)}")
        self.matches = list(matches)
        self.kinds = [connector or DEFAULT_CONNECTOR[m.loss] for m in self.matches]
        self.widths = [(int(s), int(t)) for s, t in zip(student_widths, teacher_widths)]
        self.connectors = nn.ModuleList(
            make_connector(kind, (s,), (t,)) for kind, (s, t) in zip(self.kinds, self.widths)
        )
        self._taps: Taps | None = None

    @classmethod
    def build(cls, specs: Sequence[str | HiddenMatch], student: nn.Module, source: object, probe: torch.Tensor,
              connector: str | None = None) -> HiddenStates:  # fmt: skip
        """The matches of ``specs`` between ``student`` and ``source``'s teacher, refused (naming the
        layer) where a side has no such layer or its output is not hidden states ``[B, S, D]``, and
        where ``source`` gives no hidden states (a token cache). ``probe``: ids ``[1, S]``; the student
        runs once on two copies of it in eval mode, without a gradient, to read its widths (and see
        that each layer runs and gives one vector per token: ``_student_shapes``)."""
        matches = [s if isinstance(s, HiddenMatch) else HiddenMatch.parse(s) for s in specs]
        if not matches:
            raise ValueError("no --feature pair given")
        widths = getattr(source, "token_hidden_widths", lambda: None)()
        if widths is None:
            where = getattr(source, "path", None) or getattr(source, "name", "this source")
            raise ValueError(f"--feature needs the teacher's hidden states, which this token cache does not store "
                             f"({where}): make one that does (kd precompute --feature "
                             f"{' --feature '.join(dict.fromkeys(m.teacher for m in matches))}), or distil them from "
                             "the teacher itself, --source server:... or local:SPEC")  # fmt: skip
        unknown = [m.teacher for m in matches if m.teacher not in widths]
        if unknown:
            known = ", ".join(list(widths)[:40])
            if getattr(source, "name", "") == "cache":
                raise ValueError(f"--feature: token cache {getattr(source, 'path', '')!r} stores no hidden states of "
                                 f"layer(s) {unknown}; it stores: {known}")  # fmt: skip
            raise ValueError(f"--feature: teacher {getattr(source, 'teacher_name', '')!r} has no hidden-state "
                             f"layer(s) {unknown}; its layers giving [B, S, D]: {known}")  # fmt: skip
        layers = list(dict.fromkeys(m.student for m in matches))
        shapes = _student_shapes(student, probe, layers)
        return cls(matches, [shapes[m.student][-1] for m in matches], [widths[m.teacher] for m in matches],
                   connector)  # fmt: skip

    @property
    def teacher_layers(self) -> list[str]:
        return list(dict.fromkeys(m.teacher for m in self.matches))

    def identity(self) -> list[dict]:
        """What a resumed run must share: each pair, its loss, weight, connector kind and widths."""
        return [{**asdict(m), "connector": k, "widths": list(w)}
                for m, k, w in zip(self.matches, self.kinds, self.widths)]  # fmt: skip

    def attach(self, student: nn.Module) -> None:
        """Hook the student's matched modules (their outputs are kept at every forward until ``detach``)."""
        self.detach()
        self._taps = Taps(student, [m.student for m in self.matches])
        self._taps.maps = {}

    def detach(self) -> None:
        if self._taps is not None:
            self._taps.remove()
            self._taps = None

    def loss(self, counted: torch.Tensor, teacher: dict[str, torch.Tensor]) -> torch.Tensor:
        """sum_k weight_k * loss_k(connector_k(student states at ``counted``), teacher states ``[P, D]``)
        after a student forward; ``counted``: bool ``[B, S]`` on the student's device."""
        assert self._taps is not None, "attach the student first"
        maps, total = self._taps.maps, None
        for m, conn in zip(self.matches, self.connectors):
            # float32: under bf16 autocast of the student's forward the states are bf16, the connector fp32
            s = conn(maps[m.student][counted].float())
            t = teacher[m.teacher].to(s.device)
            term = m.weight * HIDDEN_LOSSES[m.loss](s, t)
            total = term if total is None else total + term
        self._taps.maps = {}  # the step's states are not kept past their loss
        assert total is not None
        return total


def _student_shapes(student: nn.Module, probe: torch.Tensor, layers: list[str]) -> dict[str, tuple[int, ...]]:
    """The outputs' shapes of the student's ``layers`` for two copies of ``probe``'s first row (one
    eval-mode forward, no gradient), refused naming the layer where the forward never runs it (it
    would be missing at the first step) or its output is not one vector per token ``[2, S, D]``:
    the loss picks the counted positions of each batch out of it, so an output that does not
    follow the batch (a position embedding's ``[1, S, D]``) or the sequence cannot be compared."""
    rows = probe[:1].repeat(2, 1)  # two rows: an output of one row whatever the batch shows
    try:
        taps = Taps(student, layers)
    except ValueError as e:
        raise ValueError(f"--feature: {e}") from None
    was_training = student.training
    try:
        student.eval()
        with torch.no_grad():
            student(rows)
    finally:
        taps.remove()
        student.train(was_training)
    unused = [n for n in layers if n not in taps.maps]
    if unused:
        raise ValueError(f"--feature: student module(s) {unused} are not run by its forward: they give no hidden "
                         "states")  # fmt: skip
    shapes = {n: tuple(taps.maps[n].shape) for n in layers}
    bad = [n for n in layers if len(shapes[n]) != 3 or shapes[n][:2] != tuple(rows.shape)]
    if bad:
        raise ValueError(f"--feature: student layer(s) {bad} give {[list(shapes[n]) for n in bad]} for tokens "
                         f"{list(rows.shape)}, not hidden states [B, S, D] (one vector per token)")  # fmt: skip
    return shapes
