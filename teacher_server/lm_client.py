"""The client side of token teachers (kd.teacher_server.lm): requests and per-position answers.

``TeacherClient`` takes these methods from ``TokenClientMixin``:

* ``infer_tokens(teacher, tokens, ...) -> TokenOutputs``: one request; any of full
  logits, top-k + log-sum-exp, sampled ids with counts, probabilities at T, labels,
  hidden states, log-probabilities of the given tokens, at the positions asked for.
* ``token_logits`` / ``token_topk`` / ``token_samples`` / ``token_logprobs`` /
  ``token_hidden``: the same, returning ``[N, S, ...]`` tensors or
  ``kd.core.tokens.TokenTargets``.
* ``infer_tokens_stream(teacher, batches, ...)``: many requests in flight on one
  InferStream (precompute), yielding ``(key, TokenOutputs)`` in input order.

``tokens`` are int64 or int32 ``[N, S]`` right-padded ids with ``lengths`` (or an
``attention_mask`` whose ones are a prefix of each row), or a list of 1-D sequences
(padded here). ``positions`` (bool ``[N, S]``) picks the positions whose outputs are
wanted; by default every real position (for ``token_logprobs``: every real position
but the last, which has no next token).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kd.core.tokens import TokenTargets
from kd.core.wire import fill_proto, from_proto, proto_dtype
from kd.v1 import teacher_pb2 as pb

TokenInput = torch.Tensor | Sequence[Sequence[int] | torch.Tensor]


def pad_tokens(
    tokens: TokenInput, lengths: Sequence[int] | torch.Tensor | None = None, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, list[int]]:
    """Right-padded ids ``[N, S]`` (int64 or int32 as given) and each row's real length."""
    if not isinstance(tokens, torch.Tensor):
        rows = [torch.as_tensor(t, dtype=torch.int64).reshape(-1) for t in tokens]
        if not rows or any(r.numel() == 0 for r in rows):
            raise ValueError("give at least one sequence, none of them empty")
        if lengths is not None or attention_mask is not None:
            raise ValueError("a list of sequences carries its lengths; give no lengths/attention_mask")
        width = max(r.numel() for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.int64)
        for i, r in enumerate(rows):
            ids[i, : r.numel()] = r
        return ids, [r.numel() for r in rows]
    if tokens.ndim != 2:
        raise ValueError(f"token ids must be [N, S], got shape {list(tokens.shape)}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"token ids must be int64 or int32, got {tokens.dtype}")
    n, s = tokens.shape
    if attention_mask is not None:
        if lengths is not None:
            raise ValueError("give lengths or attention_mask, not both")
        mask = attention_mask.to(torch.bool).cpu()
        lens = mask.sum(dim=1)
        prefix = torch.arange(s).unsqueeze(0) < lens.unsqueeze(1)
        if not bool((prefix == mask).all()):
            raise ValueError("attention_mask must be right padding (ones, then zeros, in each row)")
        return tokens.cpu(), [int(v) for v in lens]
    if lengths is None:
        return tokens.cpu(), [s] * n
    return tokens.cpu(), [int(v) for v in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]


def real_positions(lengths: Sequence[int], width: int, *, drop_last: bool = False) -> torch.Tensor:
    """bool ``[N, width]``: the real positions of each row (without its last one with ``drop_last``)."""
    lens = torch.tensor(list(lengths)) - (1 if drop_last else 0)
    return torch.arange(width).unsqueeze(0) < lens.unsqueeze(1)


def token_spec(
    *,
    logits: bool = False,
    dtype: torch.dtype = torch.float32,
    top_k: int = 0,
    sparse_temperature: float = 0.0,
    samples: int = 0,
    seed: int = 0,
    temperature: float = 0.0,
    labels: bool = False,
    token_logprobs: bool = False,
    hidden: Iterable[str] = (),
    hidden_dtype: torch.dtype = torch.float32,
) -> pb.OutputSpec:
    """The ``OutputSpec`` of a token request (see ``TokenClientMixin.infer_tokens``)."""
    return pb.OutputSpec(
        logits=logits,
        logits_dtype=proto_dtype(dtype),
        top_k=top_k,
        sparse_temperature=sparse_temperature,
        token_samples=samples,
        token_sample_seed=seed,
        probs_temperature=temperature,
        labels=labels,
        token_logprobs=token_logprobs,
        features=list(hidden),
        features_dtype=proto_dtype(hidden_dtype),
    )


def _is_ref(x: Any) -> bool:
    """A ``kd.teacher_server.client.DatasetRef`` (samples of a token dataset on the server)."""
    return hasattr(x, "dataset") and hasattr(x, "indices") and not isinstance(x, torch.Tensor)


def token_request(
    teacher: str, ids: Any, lengths: Sequence[int], positions: torch.Tensor | None, spec: pb.OutputSpec,
    request_id: str = "",
) -> pb.InferRequest:  # fmt: skip
    """The request for right-padded ``ids`` [N, S] with their lengths, or for a DatasetRef
    (``ids``; then lengths are the server's and the answer carries "positions"): the image
    request of ``kd.teacher_server.client.make_request`` plus the token fields."""
    from kd.teacher_server.client import make_request

    ref = _is_ref(ids)
    req = make_request(teacher, None if ref else ids, ids if ref else None, spec, request_id)
    req.lengths.extend(lengths)
    if positions is not None:
        fill_proto(req.positions, positions.to(torch.bool))
    return req


def encode_token_request(
    teacher: str, spec: pb.OutputSpec, tokens: Any, lengths: Any, attention_mask: torch.Tensor | None,
    positions: torch.Tensor | None, drop_last: bool, request_id: str = "",
) -> tuple[tuple[Any, list[int], torch.Tensor | None], bytes]:  # fmt: skip
    """The one way a token request is made (``infer_tokens`` and ``infer_tokens_stream``):
    ((ids or the ref, lengths, positions sent), serialised request). ``drop_last``: by
    default ask every real position but the last (``token_logprobs``)."""
    ids, lens, sent = _inputs(tokens, lengths, attention_mask, positions, drop_last)
    return (ids, lens, sent), token_request(teacher, ids, lens, sent, spec, request_id).SerializeToString()


@dataclass
class TokenOutputs:
    """A token teacher's answer: each output packed ``[P, ...]`` over the True entries of
    ``positions`` (row-major); ``dense`` / ``*_targets`` put them back on ``[N, S]``."""

    positions: torch.Tensor  # bool [N, S]
    outputs: dict[str, torch.Tensor]
    vocab_size: int
    fingerprint: str = ""
    temperature: float = 1.0  # of "logsumexp" and of the draws (sparse_temperature)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.outputs[key]

    def dense(self, key: str, fill: float | int = 0) -> torch.Tensor:
        """Output ``key`` on ``[N, S, ...]``, ``fill`` at the positions not asked for."""
        packed = self.outputs[key]
        n, s = self.positions.shape
        out = torch.full((n, s, *packed.shape[1:]), fill, dtype=packed.dtype)
        out[self.positions] = packed
        return out

    def topk_targets(self) -> TokenTargets:
        """The top-k form (ids, logits, row lse); positions not asked for have ids -1."""
        return TokenTargets(
            self.dense("topk_indices", -1).to(torch.int64),
            self.vocab_size,
            logits=self.dense("topk_values").float(),
            lse=self.dense("logsumexp"),
            temperature=self.temperature,
        )

    def sample_targets(self, with_logits: bool = False) -> TokenTargets:
        """The sampled form: unique ids with their draw counts (and, ``with_logits``, their
        logits and the row lse); positions not asked for have ids -1 and counts 0."""
        ids = self.dense("sample_indices", -1).to(torch.int64)
        counts = self.dense("sample_counts").float()
        if not with_logits:
            return TokenTargets(ids, self.vocab_size, counts=counts, temperature=self.temperature)
        return TokenTargets(ids, self.vocab_size, self.dense("sample_values").float(), self.dense("logsumexp"),
                            counts, self.temperature)  # fmt: skip


def _inputs(
    tokens: Any, lengths: Any, attention_mask: torch.Tensor | None, positions: torch.Tensor | None, drop_last: bool
) -> tuple[Any, list[int], torch.Tensor | None]:
    """(ids or the ref, lengths, the positions mask to send: None for the server's default)."""
    if _is_ref(tokens):
        return tokens, [], None if positions is None else positions.to(torch.bool).cpu()
    ids, lens = pad_tokens(tokens, lengths, attention_mask)
    if positions is not None:
        return ids, lens, positions.to(torch.bool).cpu()
    return ids, lens, real_positions(lens, ids.shape[1], drop_last=True) if drop_last else None


def _outputs(
    resp: pb.InferResponse, ids: Any, lens: list[int], sent: torch.Tensor | None, drop_last: bool, vocab: int,
    sparse_temperature: float,
) -> TokenOutputs:  # fmt: skip
    outs = {k: from_proto(v) for k, v in resp.outputs.items()}
    if "positions" in outs:  # by reference: the server says which positions it answered
        positions = outs.pop("positions").to(torch.bool)
    elif sent is not None:
        positions = sent
    else:
        positions = real_positions(lens, ids.shape[1], drop_last=drop_last)
    return TokenOutputs(positions, outs, vocab, resp.fingerprint, sparse_temperature or 1.0)


class TokenClientMixin:
    """Token-teacher calls of ``TeacherClient`` (needs its ``_call``, ``_check_reply``, ``_infer``,
    ``_ordered_stream``, ``describe`` and ``usage``)."""

    _vocab_sizes: dict[str, int]

    def _vocab(self, teacher: str) -> int:
        cache = self.__dict__.setdefault("_vocab_sizes", {})
        if teacher not in cache:
            cache[teacher] = int(self.describe(teacher).num_classes)  # type: ignore[attr-defined]
        return cache[teacher]

    def infer_tokens(
        self,
        teacher: str,
        tokens: TokenInput | Any,
        *,
        lengths: Sequence[int] | torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        logits: bool = False,
        dtype: torch.dtype = torch.float32,
        top_k: int = 0,
        sparse_temperature: float = 0.0,
        samples: int = 0,
        seed: int = 0,
        temperature: float = 0.0,
        labels: bool = False,
        token_logprobs: bool = False,
        hidden: Iterable[str] = (),
        hidden_dtype: torch.dtype = torch.float32,
    ) -> TokenOutputs:
        """One request to a token teacher. Outputs (packed over the asked positions):
        "logits" [P, V] in ``dtype``; ``top_k``: "topk_values", "topk_indices" [P, k] and
        "logsumexp" [P] of logits / ``sparse_temperature`` (0: 1); ``samples``: that many
        draws per position at ``sparse_temperature`` (seeded by ``seed``) as unique
        "sample_indices" with "sample_counts" (and "sample_values") [P, K]; ``temperature``
        > 0: "probs" [P, V]; ``labels``: "labels" [P]; ``token_logprobs``: "token_logprobs"
        [P], log p(tokens[s + 1] | tokens[:s + 1]); ``hidden``: "feature/<layer>" [P, D].

        ``tokens`` may be a ``DatasetRef`` to a token dataset registered on the server: its
        samples' positions with a next-token target are asked (or ``positions``, on the
        padded width the server's dataset gives), and the answer says which."""
        from kd.teacher_server.client import Usage

        spec = token_spec(logits=logits, dtype=dtype, top_k=top_k, sparse_temperature=sparse_temperature,
                          samples=samples, seed=seed, temperature=temperature, labels=labels,
                          token_logprobs=token_logprobs, hidden=hidden, hidden_dtype=hidden_dtype)  # fmt: skip
        (ids, lens, sent), body = encode_token_request(teacher, spec, tokens, lengths, attention_mask, positions,
                                                       token_logprobs)  # fmt: skip
        resp = self._call(self._infer, body)  # type: ignore[attr-defined]
        self._check_reply(resp)  # type: ignore[attr-defined]
        self.usage = Usage.of(resp.usage)
        return _outputs(resp, ids, lens, sent, token_logprobs, self._vocab(teacher), sparse_temperature)

    def token_logits(self, teacher: str, tokens: TokenInput, **kw: Any) -> torch.Tensor:
        """Full logits ``[N, S, V]`` (zeros at positions not asked for)."""
        return self.infer_tokens(teacher, tokens, logits=True, **kw).dense("logits")

    def token_topk(self, teacher: str, tokens: TokenInput, k: int, temperature: float = 1.0, **kw: Any) -> TokenTargets:
        """Top-``k`` ids and logits with the lse of logits / ``temperature`` per position."""
        return self.infer_tokens(teacher, tokens, top_k=k, sparse_temperature=temperature, **kw).topk_targets()

    def token_samples(
        self, teacher: str, tokens: TokenInput, draws: int, *, seed: int = 0, temperature: float = 1.0,
        with_logits: bool = False, **kw: Any,
    ) -> TokenTargets:  # fmt: skip
        """``draws`` ids drawn per position at ``temperature`` (1: the paper's), unique ids + counts."""
        out = self.infer_tokens(teacher, tokens, samples=draws, seed=seed, sparse_temperature=temperature, **kw)
        return out.sample_targets(with_logits)

    def token_logprobs(self, teacher: str, tokens: TokenInput, **kw: Any) -> torch.Tensor:
        """float32 ``[N, S]``: log p_teacher(tokens[s + 1] | tokens[:s + 1]) at each asked
        position (default: every real position but the last), 0 elsewhere."""
        return self.infer_tokens(teacher, tokens, token_logprobs=True, **kw).dense("token_logprobs")

    def token_hidden(
        self, teacher: str, tokens: TokenInput, layers: Iterable[str], **kw: Any
    ) -> dict[str, torch.Tensor]:
        """Hidden states ``[N, S, D]`` of the named layers (zeros at positions not asked for)."""
        layers = list(layers)
        out = self.infer_tokens(teacher, tokens, hidden=layers, **kw)
        return {name: out.dense(f"feature/{name}") for name in layers}

    def infer_tokens_stream(
        self,
        teacher: str,
        batches: Iterable[tuple[Any, TokenInput, Sequence[int] | None, torch.Tensor | None]],
        *,
        depth: int = 8,
        **kw: Any,
    ) -> Iterator[tuple[Any, TokenOutputs]]:
        """Pipelined token requests over one InferStream: ``batches`` yields ``(key, tokens (or a
        DatasetRef), lengths or None, positions or None)``; up to ``depth`` in flight; yields ``(key,
        TokenOutputs)`` in input order. ``kw``: the outputs, as ``infer_tokens`` takes them."""
        sparse_t = kw.get("sparse_temperature", 0.0)
        drop_last = bool(kw.get("token_logprobs", False))
        spec = token_spec(**kw)
        vocab = self._vocab(teacher)

        def encode(item: tuple[Any, Any, Any, torch.Tensor | None], request_id: str) -> tuple[Any, bytes]:
            key, tokens, lengths, positions = item
            sent, body = encode_token_request(teacher, spec, tokens, lengths, None, positions, drop_last, request_id)
            return (key, *sent), body

        def decode(state: tuple[Any, Any, list[int], torch.Tensor | None], resp: pb.InferResponse):
            key, ids, lens, wanted = state
            return key, _outputs(resp, ids, lens, wanted, drop_last, vocab, sparse_t)

        yield from self._ordered_stream(batches, encode, decode, depth)  # type: ignore[attr-defined]
