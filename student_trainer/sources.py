"""Soft-target sources: where a training step gets the teacher's targets.

All of them give the same targets for the same sample and view (a test compares them):

* ``CacheSource``: reads precomputed targets from an LMDB cache (or a directory
  of shards) by (sample index, view id).
* ``ServerSource``: asks a running ``kd serve`` (or a pool of them) over one
  bidirectional stream, keeping ``depth`` batches in flight ahead of the
  training step, so the student rarely waits for the network or the teacher.
  With ``dataset=`` it sends sample keys instead of pixels (inputs by
  reference; the server holds the data and replays the same seeded views).
  A token teacher is asked on its own protocol (``token_targets``: ids with their
  lengths, per-position answers unpacked to ``[B, S, ...]``), one request per batch.
* ``LocalSource``: runs a teacher in this process (the classic way).
* ``ReadThroughSource``: a cache in front of another source: a miss asks the
  other source and writes the answer back, so the first epoch fills the cache
  and later ones read it.

Targets are dense float32 logits [B, C] or ``kd.core.targets.SparseTargets``.
"""

from __future__ import annotations

import copy
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import numpy as np
import torch

from kd.cache import CacheMeta, CacheWriter
from kd.cache.codecs import logit_offsets_lost, sparse_targets_of
from kd.cache.sharded import ShardedCacheWriter, open_cache, shard_count_at
from kd.core import reductions
from kd.core.data import Dataset, view_seeds
from kd.core.signature import target_fingerprint
from kd.core.targets import SparseTargets, Targets
from kd.core.views import pixels_to_input
from kd.teacher_server.client import DatasetRef, TeacherClient, TeacherRequestError
from kd.teacher_server.loading import Teacher, load_teacher
from kd.teacher_server.runner import ModelRunner


def prefetched(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """Iterate ``items`` in a background thread, ``depth`` items ahead of the consumer.

    Reading targets (LMDB reads, decoding) or running a teacher then overlaps the
    consumer's work (the student's step, or cache writes). Errors are re-raised
    in the consumer; closing the consumer stops the thread.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    done = object()
    stop = threading.Event()

    def put(entry: tuple) -> bool:
        """Hand ``entry`` to the consumer; False once the consumer has gone."""
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put((done, e))

    thread = threading.Thread(target=work, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = q.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        # Wait for the item in progress (a teacher forward, a read): a process that exits while
        # this thread is inside native code can abort ("terminate called without an active exception").
        thread.join(timeout=60)


class Batch(NamedTuple):
    """A batch as the trainer builds it. ``inputs`` are already the pixels of
    the views named by ``views`` (None: the plain samples)."""

    indices: torch.Tensor
    inputs: torch.Tensor
    labels: torch.Tensor
    views: torch.Tensor | None = None
    # Samples in the global batch this one is a rank's part of (None: it is the whole batch).
    global_size: int | None = None


class SoftTargetSource:
    name: str = "source"
    teacher_name: str = ""
    fingerprint: str
    num_classes: int

    def targets(self, indices: torch.Tensor, inputs: torch.Tensor, views: torch.Tensor | None = None) -> Targets:
        """Teacher targets for these samples (and views)."""
        raise NotImplementedError

    def token_targets(self, indices: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor) -> Targets:
        """A token teacher's per-position targets ``[B, S, ...]`` for right-padded ids ``tokens``
        [B, S] whose real positions ``attention_mask`` (bool [B, S]) marks (``train_tokens``). By
        default ``targets``: the teacher sees the padding too, whose positions no token loss counts;
        a source that can leave the padding out (a server) does."""
        return self.targets(indices, tokens)

    def token_hidden_widths(self) -> dict[str, int] | None:
        """A token teacher's layers giving hidden states ``[B, S, D]``, by name -> D; None where the
        source cannot give hidden states (a token cache stores none)."""
        return None

    def token_targets_hidden(
        self, indices: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
        layers: list[str],
    ) -> tuple[Targets, dict[str, torch.Tensor]]:  # fmt: skip
        """``token_targets`` (at least at ``positions``) and the teacher's hidden states of ``layers``
        at ``positions`` (bool ``[B, S]``), each packed ``[P, D]`` float32 in row-major order."""
        raise ValueError(f"a {self.name} source gives no hidden states: use server: or local:")

    def logit_offsets_lost(self) -> str | None:
        """None where the targets are the teacher's logits as it computed them; else what the source
        keeps instead (a top-k, quantised log-probabilities, ...), for the trainer's refusal of methods
        that read absolute logits (``kd.student_trainer.train.check_logit_offsets``)."""
        return None

    def sparse_kind(self) -> str | None:
        """The kind of the sparse targets it gives (``SparseTargets.kind``: "topk", "sample" or "subset"),
        known without reading one; None for dense logits."""
        return None

    def sampled_at(self) -> float | None:
        """The temperature its targets were drawn at where they are draws (a sample:K cache, or its draws
        asked of a server): the only one a loss can train on them at; None for any other targets."""
        return None

    def sparse_targets(self) -> str | None:
        """None where the targets are dense logits ``[B, C]``; else what the sparse ones are (a top-k,
        sampled or subset cache, a server asked for its top-k), for the trainer's refusal of methods
        that need dense logits (``kd.student_trainer.train.check_sparse_targets``)."""
        return None

    def iter_targets(self, batches: Iterable[Batch | tuple]) -> Iterator[tuple[Batch, Targets]]:
        """Pair each batch with its targets; sources that can work ahead override this."""
        for b in batches:
            b = Batch(*b)
            yield b, self.targets(b.indices, b.inputs, b.views)

    def iter_outputs(
        self, batches: Iterable[Batch | tuple], features: list[str], pool: bool = False
    ) -> Iterator[tuple[Batch, torch.Tensor, dict[str, torch.Tensor]]]:
        """Like ``iter_targets`` plus the teacher's named features (for precompute)."""
        if features:
            raise ValueError(f"a {self.name} source cannot compute teacher features; use server: or local:")
        for b, t in self.iter_targets(batches):
            yield b, t, {}

    def close(self) -> None:
        pass

    def __enter__(self) -> SoftTargetSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CacheSource(SoftTargetSource):
    name = "cache"

    def __init__(self, path: str, *, prefetch: int = 0, **expect: Any) -> None:
        self.reader = open_cache(path, **{k: v for k, v in expect.items() if v is not None})
        self.path = str(path)
        # Batches read ahead in a background thread. Off by default: on a machine whose
        # cores are all busy with the student's step (2 CPU cores, kd bench cache) the
        # reader's Python competes with the step and makes it slower; with spare cores
        # (a GPU trainer) it takes the read off the step's critical path.
        self.prefetch = prefetch
        meta = self.reader.meta
        self.fingerprint = meta.teacher_fingerprint
        self.num_classes = meta.num_classes
        self.dataset_id = meta.dataset_id
        self.teacher_name = meta.teacher
        self.views = meta.views
        self.augmentation = meta.augmentation  # the view policy its views were made with ("" without views)

    def logit_offsets_lost(self) -> str | None:
        lost = logit_offsets_lost(self.reader.meta.codec)
        return None if lost is None else f"cache {self.path!r}: {lost}"

    def sparse_targets(self) -> str | None:
        sparse = sparse_targets_of(self.reader.meta.codec)
        return None if sparse is None else f"cache {self.path!r}: {sparse}"

    def sampled_at(self) -> float | None:
        return _drawn_at(self.reader.codec)

    def sparse_kind(self) -> str | None:
        return _sparse_kind_of(self.reader.meta.codec)

    def targets(self, indices: torch.Tensor, inputs: torch.Tensor, views: torch.Tensor | None = None) -> Targets:
        if self.reader.meta.per_token:
            # A token teacher's cache: TokenTargets (or dense [B, S, V]) padded to the batch's tokens [B, S].
            width = inputs.shape[1] if isinstance(inputs, torch.Tensor) and inputs.dim() == 2 else None
            return self.reader.token_targets(indices, width)  # type: ignore[union-attr]
        return self.reader.targets(indices, views)

    def token_hidden_widths(self) -> dict[str, int] | None:
        """The hidden states a token cache stores (``kd precompute --feature``), layer -> D; None for a
        cache of per-sample records or a token cache without them."""
        meta = self.reader.meta
        if not meta.per_token or not meta.features:
            return None
        return {name: int(shape[-1]) for name, shape in meta.features.items()}

    def token_targets_hidden(
        self, indices: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
        layers: list[str],
    ) -> tuple[Targets, dict[str, torch.Tensor]]:  # fmt: skip
        """The stored targets padded to ``tokens``' width and the stored hidden states of ``layers``
        (fp16 as the cache keeps them, in float32) picked at ``positions``, packed ``[P, D]``."""
        if not self.reader.meta.per_token:
            return super().token_targets_hidden(indices, tokens, attention_mask, positions, layers)
        targets, hidden = self.reader.token_targets_hidden(indices, tokens.shape[1])  # type: ignore[union-attr]
        mask = positions.to(torch.bool).cpu()
        return targets, {name: hidden[name][mask] for name in layers}

    def iter_targets(self, batches: Iterable[Batch | tuple]) -> Iterator[tuple[Batch, Targets]]:
        if self.prefetch:
            # Reads (and builds) the next batches while the student trains on this one.
            return prefetched(super().iter_targets(batches), depth=self.prefetch)
        return super().iter_targets(batches)

    def iter_outputs(
        self, batches: Iterable[Batch | tuple], features: list[str], pool: bool = False
    ) -> Iterator[tuple[Batch, Targets, dict[str, torch.Tensor]]]:
        """Targets plus stored teacher features. A reduced feature (``layer@at``) is read
        as stored, or computed here from the stored full map of its layer."""
        plan = self._feature_plan(features, pool)

        def read() -> Iterator[tuple[Batch, Targets, dict[str, torch.Tensor]]]:
            for b in batches:
                b = Batch(*b)
                stored = self.reader.features(b.indices, b.views) if features else {}
                feats = {name: stored[name] if direct else reductions.reduce(name, stored) for name, direct in plan}
                yield b, self.reader.targets(b.indices, b.views), feats

        return prefetched(read(), depth=self.prefetch) if self.prefetch else read()

    def _feature_plan(self, features: list[str], pool: bool) -> list[tuple[str, bool]]:
        stored = self.reader.meta.features
        pooled = self.reader.meta.features_pooled
        plan = []
        for name in features:
            f = reductions.parse(name)
            if name in stored and (pool or f.reduction is not None or not pooled):
                plan.append((name, True))
                continue
            if not f.per_sample:
                raise ValueError(
                    f"feature {name!r} relates the samples of a batch to each other and cannot be read from a "
                    f"cache; ask for {f.layer!r} (the cache computes nothing) or use a server/local source"
                )
            missing = [layer for layer in f.layers if layer not in stored]
            if missing or (pooled and f.reduction not in (None, "pool")):
                raise ValueError(
                    f"cache {self.path!r} does not store teacher feature {name!r}"
                    + (f" (its layers {missing} are not stored)" if missing else " (its maps are stored pooled)")
                    + f"; stored: {sorted(stored) or 'none'}{' (pooled)' if pooled else ''}"
                )
            plan.append((name, False))
        return plan


@dataclass(frozen=True)
class SampleDraws:
    """A server's draws for a ``sample:K[xR]`` cache (``ServerSource.keeping_samples``):
    unique ids and counts per round, int32 [B, R, K] (``CacheWriter.put_samples`` stores them)."""

    ids: torch.Tensor
    counts: torch.Tensor


def refuse_live_weights(source: object) -> None:
    """A cache holds one teacher's targets under one fingerprint: a served teacher whose weights
    may change while it is read (``kd serve --accept-weights``) is refused as a cache's source."""
    if getattr(source, "live_weights", False):
        raise ValueError(f"teacher {getattr(source, 'teacher_name', '?')!r} takes live weight updates "
                         "(--accept-weights): its answers may come from several weight versions, so it cannot fill "
                         "a cache; serve a fixed copy of it")  # fmt: skip


def sample_uniforms(codec: Any, indices: torch.Tensor, views: torch.Tensor | None) -> torch.Tensor:
    """The uniforms a ``sample:K[xR]`` codec draws the records (index, view) with, float64
    [B, R * K]: sent to the server so that its draws are the records the codec makes from
    full logits (the codec's keyed draws: ``SampleCodec.encode`` with record keys)."""
    idx = indices.detach().cpu().numpy().astype(np.int64)
    vw = np.zeros_like(idx) if views is None else views.detach().cpu().numpy().astype(np.int64)
    return codec.uniforms(np.stack([idx, vw], axis=1))


def server_topk_lost(k: int, where: str = "the server") -> str:
    """What a server source asked for its top-k only (``topk=K``, ``kd train --server-topk K``) loses."""
    return (f"{where} is asked for the top {k} logits only (--server-topk {k}): the other classes' logits are made "
            "up (top-k targets lose the logits' offsets)")  # fmt: skip


def server_topk_sparse(k: int, where: str = "the server") -> str:
    """What a server source asked for its top-k only (``--server-topk K``) gives: sparse targets."""
    return f"{where} is asked for the top {k} logits only (--server-topk {k}): it gives sparse targets"


class ServerSource(SoftTargetSource):
    name = "server"
    # train_tokens asks for the next micro-batch's targets while the student trains on this one:
    # a request waits on the network and the teacher, and the client is thread-safe.
    token_targets_ahead = 1

    def __init__(
        self,
        address: str | list[str],
        teacher: str | None = None,
        *,
        depth: int = 8,
        dataset: str | None = None,
        num_views: int = 1,
        topk: int = 0,
        temperature: float | None = None,
        **client_options: Any,
    ) -> None:
        """``topk=K``: ask the server only for what a ``topk:K`` cache (or a loss that accepts
        sparse targets) keeps: K logits and classes and the log-sum-exp of z / ``temperature``
        per row, made next to the model, instead of C logits; targets are ``SparseTargets``."""
        if topk < 0 or (temperature is not None and not (math.isfinite(temperature) and temperature > 0)):
            raise ValueError(f"topk must be >= 0 and temperature a finite number > 0, got {topk}, {temperature}")
        self.topk, self.topk_temperature = topk, temperature or 1.0
        self.sample_codec: Any = None  # keeping_samples: a sample:K[xR] codec whose draws are asked for
        self.client = TeacherClient(address, **client_options)
        self._client_options = client_options  # the pool's later probes of a failed member (_members_up)
        self.addresses = [a for a in address.split(",") if a] if isinstance(address, str) else list(address)
        # One channel per server for streams: a stream is one HTTP/2 call, which gRPC's round_robin
        # pins to a single server, so a pool gets a stream per server and the batches take turns.
        self.pool: list[TeacherClient] = []
        if len(self.addresses) > 1:
            self.pool = [TeacherClient(a, **client_options) for a in self.addresses]
        try:
            if self.pool:
                # The round-robin client's describe reaches one member, chosen by gRPC: every
                # member is asked, and they must agree on all that this source takes from the
                # description, or batches would get answers of whichever member they reach.
                desc = _agreed_description(
                    [(a, c.describe(teacher)) for a, c in zip(self.addresses, self.pool)], dataset
                )
            else:
                desc = self.client.describe(teacher)
        except BaseException:
            self.close()
            raise
        self.teacher = self.teacher_name = desc.name
        self.fingerprint = desc.fingerprint
        # A teacher that takes live weight updates answers from whichever version it holds: fine
        # for live targets (peer training), not for a cache keyed by one fingerprint.
        self.live_weights = desc.accepts_weights
        if not self.live_weights:  # a server restarted at an address with other weights fails, named
            for c in (self.client, *self.pool):
                c.expect_fingerprint(desc.name, desc.fingerprint)
        self.num_classes = desc.num_classes
        self.layers = dict(desc.layers)  # name -> per-sample shape: a token teacher's (-1, D) hidden states
        self.access = desc.access  # the tier it is served at: what it may give (teacher_server.access)
        self.input_shape = tuple(desc.input_shape)
        # The teacher's final transform (kd.core.views.pixels_to_input): image views sent by value
        # are resized to its input and normalised with its mean/std, as the server does by reference.
        sig = desc.signature
        self.signature = sig  # what a token trainer checks up front (task, tokenizer, max_length)
        self.mean = None if sig is None else sig.mean
        self.std = None if sig is None else sig.std
        self.floating = desc.input_dtype.is_floating_point
        # A token teacher (kd.teacher_server.lm) answers on its own protocol: lengths in, outputs
        # packed over the real positions out (TokenClientMixin), unpacked here to [B, S, ...].
        self.tokens = sig is not None and sig.extra.get("kind") == "tokens"
        self.depth = depth
        self._down: set[int] = set()  # pool members that failed a stream (_members_up)
        self.dataset = dataset  # a dataset registered on the server: send keys, not pixels
        self.served_datasets = desc.datasets  # what the server reports of each: name -> ServedDataset
        self.num_views = num_views

    def _payload(self, indices: torch.Tensor, inputs: torch.Tensor, views: torch.Tensor | None,
                 view_params: bool = False):  # fmt: skip
        if self.dataset is None:
            same_size = tuple(inputs.shape[2:]) == self.input_shape[1:]
            if inputs.dtype == torch.uint8 and same_size and inputs.ndim == 4:
                return inputs  # the server normalises uint8 pixels itself (the same operations), 4x fewer bytes
            pixels = pixels_to_input(inputs, self.input_shape, self.mean, self.std) if self.floating else None
            if pixels is not None:
                return pixels
            if tuple(inputs.shape[1:]) != self.input_shape and inputs[0].numel() == math.prod(self.input_shape):
                # The same samples in the teacher's declared layout (flat digits for a CNN
                # teacher): a view, as an in-process teacher's own reshape would do.
                return inputs.reshape(len(inputs), *self.input_shape)
            return inputs
        seeds = view_seeds(indices, views, self.num_views)
        if seeds is None:
            return DatasetRef(self.dataset, indices.tolist())
        return DatasetRef(self.dataset, indices.tolist(), seeds.tolist(), view_params)

    def keeping_topk(self, k: int, temperature: float | None = None) -> ServerSource:
        """This source (the same connections) asking for top-k only: see ``topk``."""
        other = copy.copy(self)
        other.topk, other.topk_temperature = k, temperature or 1.0
        return other

    def keeping_samples(self, codec: Any) -> ServerSource:
        """This source (the same connections) asking only for the draws a ``sample:K[xR]`` cache
        keeps (``codec``: its ``SampleCodec``, at the cache's temperature), drawn on the server
        with the codec's keyed uniforms: targets are ``SampleDraws``, no logits cross the wire."""
        other = copy.copy(self)
        other.topk, other.sample_codec = 0, codec
        return other

    def logit_offsets_lost(self) -> str | None:
        where = f"server {','.join(self.addresses)}"
        if self.sample_codec is not None:
            return f"{where}: {logit_offsets_lost(self.sample_codec.name)}"
        return None if not self.topk else server_topk_lost(self.topk, where)

    def sparse_targets(self) -> str | None:
        where = f"server {','.join(self.addresses)}"
        if self.sample_codec is not None:
            return f"{where}: {sparse_targets_of(self.sample_codec.name)}"
        return None if not self.topk else server_topk_sparse(self.topk, where)

    def sampled_at(self) -> float | None:
        return None if self.sample_codec is None else float(self.sample_codec.temperature)

    def sparse_kind(self) -> str | None:
        return "sample" if self.sample_codec is not None else "topk" if self.topk else None

    def _asked(self) -> dict[str, Any]:
        c = self.sample_codec
        if c is not None:
            return {"logits": False, "samples": c.k, "sample_rounds": c.rounds, "sparse_temperature": c.temperature}
        if not self.topk:
            return {}
        return {"logits": False, "top_k": self.topk, "sparse_temperature": self.topk_temperature}

    def _targets_of(self, outputs: dict[str, torch.Tensor]) -> Targets | SampleDraws:
        if self.sample_codec is not None:
            return SampleDraws(outputs["sample_indices"], outputs["sample_counts"])
        if not self.topk:
            return outputs["logits"]
        return SparseTargets("topk", outputs["topk_indices"].long(), outputs["topk_values"].float(),
                             outputs["logsumexp"], self.num_classes, self.topk_temperature)  # fmt: skip

    def token_targets(self, indices: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor) -> Targets:
        """A token teacher's targets ``[B, S, V]`` float32 logits (``topk``: ``TokenTargets``) for
        right-padded ``tokens``: only the real positions are computed and sent (the lengths go with
        the request); padding positions hold 0 logits (top-k: ids -1), which no token loss counts."""
        if not self.tokens:
            raise ValueError(f"teacher {self.teacher!r} is not a token teacher; its targets are per sample")
        if self.sample_codec is not None or self.dataset is not None:
            raise ValueError("a token teacher's server source takes token ids by value, with logits or top-k")
        if self.topk:
            return self.client.token_topk(self.teacher, tokens, self.topk, self.topk_temperature,
                                          attention_mask=attention_mask)  # fmt: skip
        return self.client.token_logits(self.teacher, tokens, attention_mask=attention_mask).float()

    def token_hidden_widths(self) -> dict[str, int] | None:
        from kd.teacher_server import access as tiers

        if not self.tokens:
            return None
        if not tiers.allows(self.access, "features"):  # before any step, not at the first request
            raise ValueError(
                str(tiers.AccessDenied(self.teacher, self.access, "features", "hidden states (--feature)"))
            )
        return {name: int(shape[-1]) for name, shape in self.layers.items() if len(shape) == 2}

    def token_targets_hidden(
        self, indices: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
        layers: list[str],
    ) -> tuple[Targets, dict[str, torch.Tensor]]:  # fmt: skip
        """One request: the targets and the hidden states, computed and sent only at ``positions`` (the
        counted ones: every other position's logits are 0, top-k ids -1, which no token loss counts)."""
        if not self.tokens:
            raise ValueError(f"teacher {self.teacher!r} is not a token teacher; its targets are per sample")
        asked: dict[str, Any] = ({"top_k": self.topk, "sparse_temperature": self.topk_temperature} if self.topk
                                 else {"logits": True})  # fmt: skip
        out = self.client.infer_tokens(self.teacher, tokens, attention_mask=attention_mask, positions=positions,
                                       hidden=layers, **asked)  # fmt: skip
        targets = out.topk_targets() if self.topk else out.dense("logits").float()
        return targets, {name: out[f"feature/{name}"].float() for name in layers}

    def targets(self, indices: torch.Tensor, inputs: torch.Tensor, views: torch.Tensor | None = None) -> Targets:
        if self.tokens:  # every position real, as an in-process teacher sees the ids
            return self.token_targets(indices, inputs, torch.ones(inputs.shape, dtype=torch.bool))
        payload = self._payload(indices, inputs, views)
        asked = self._asked()
        if self.sample_codec is not None:
            asked["sample_uniforms"] = sample_uniforms(self.sample_codec, indices, views)
        if isinstance(payload, DatasetRef):
            return self._targets_of(self.client.infer(self.teacher, ref=payload, **asked))
        return self._targets_of(self.client.infer(self.teacher, payload, **asked))

    def iter_targets(self, batches: Iterable[Batch | tuple]) -> Iterator[tuple[Batch, Targets]]:
        if self.tokens:  # the token protocol, one request per batch (the stream below speaks the image one)
            yield from super().iter_targets(batches)
            return
        for batch, logits, _ in self.iter_outputs(batches, []):
            yield batch, logits

    def iter_outputs(
        self, batches: Iterable[Batch | tuple], features: list[str], pool: bool = False
    ) -> Iterator[tuple[Batch, torch.Tensor, dict[str, torch.Tensor]]]:
        for batch, logits, feats, _ in self.iter_outputs_and_params(batches, features, pool):
            yield batch, logits, feats

    def iter_outputs_and_params(
        self, batches: Iterable[Batch | tuple], features: list[str], pool: bool = False, *, view_params: bool = False
    ) -> Iterator[tuple[Batch, torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]]:
        """``iter_outputs`` plus, by reference with ``view_params``, the params of each view as
        the server drew them (float32 [B, PARAM_WIDTH]; None for plain samples or by value)."""
        keyed = ((b, self._payload(b.indices, b.inputs, b.views, view_params)) for b in (Batch(*x) for x in batches))
        if self.sample_codec is not None:  # each batch's draws: its records' keyed uniforms
            keyed = ((b, x, sample_uniforms(self.sample_codec, b.indices, b.views)) for b, x in keyed)
        options = {"features": features, "pool_features": pool, **self._asked()}
        if self.pool:
            up = self._members_up()
            stream = _pooled_stream([self.pool[k] for k in up], self.teacher, keyed, depth=self.depth,
                                    names=[self.addresses[k] for k in up], on_failure=lambda j: self._down.add(up[j]),
                                    **options)  # fmt: skip
        else:
            stream = self.client.infer_stream(self.teacher, keyed, depth=self.depth, **options)
        for batch, outputs in stream:
            feats = {name: outputs[f"feature/{name}"] for name in features}
            yield batch, self._targets_of(outputs), feats, outputs.get("view_params")

    def _members_up(self) -> list[int]:
        """The pool's members to stream to now: a member that failed a stream (``_down``) is left
        out until it answers a describe within ``_REJOIN_PROBE_S`` with the teacher's fingerprint.
        A new stream to a server that is gone waits for it to come back (gRPC's wait_for_ready),
        and one to a stalled server waits for an answer, both until the client's stream_timeout:
        without this every later epoch would wait that long for it. With every member down, all
        are tried (the streams' errors then name each)."""
        for k in sorted(self._down):
            options = {**self._client_options, "timeout": _REJOIN_PROBE_S, "connect_timeout": _REJOIN_PROBE_S}
            try:
                with TeacherClient(self.addresses[k], **options) as probe:
                    back = probe.describe(self.teacher).fingerprint == self.fingerprint
            except Exception:  # noqa: BLE001 - unreachable, stalled or refusing: not back yet
                back = False
            if back:
                self._down.discard(k)
        up = [k for k in range(len(self.pool)) if k not in self._down]
        return up or list(range(len(self.pool)))

    def close(self) -> None:
        self.client.close()
        for c in self.pool:
            c.close()


def _member_facts(d: Any, dataset: str | None) -> dict[str, Any]:
    """What a ``ServerSource`` relies on in one member's description, by the name a refusal gives it."""
    sig = d.signature
    if sig is not None:
        # Sorted: a protobuf map is decoded in an order of its own, another in each server process, and
        # the facts are compared by repr (the same teacher in two kd serve processes was refused).
        sig = replace(sig, extra=dict(sorted(sig.extra.items())))
    facts = {
        "teacher": d.name,
        "fingerprint": d.fingerprint,
        "live weights (--accept-weights)": d.accepts_weights,
        "classes": d.num_classes,
        "class names": tuple(d.class_names),
        "input shape": tuple(d.input_shape),
        "input dtype": str(d.input_dtype).removeprefix("torch."),
        "signature": sig,
    }
    if dataset is not None:  # by reference: the data each member reads for a key
        info = d.datasets.get(dataset)
        # compared as check_served_dataset compares it with --dataset: content hash, size, view policy
        facts[f"dataset {dataset!r}"] = (
            ("not registered",)
            if info is None
            else (info.dataset_id.partition("@")[2], info.num_samples, info.augmentation, info.dataset_id)
        )
    return facts


def _agreed_description(members: list[tuple[str, Any]], dataset: str | None) -> Any:
    """The description a pool's members agree on (the first one's); a ``ValueError`` naming each
    member and its value of every fact they differ on otherwise."""
    facts = [(a, _member_facts(d, dataset)) for a, d in members]

    def same(key: str, value: Any) -> str:
        return repr(value[:3]) if key.startswith("dataset ") else repr(value)  # not the id's name part

    differ = [k for k in facts[0][1] if len({same(k, f[k]) for _, f in facts}) > 1]
    if not differ:
        return members[0][1]

    def shown(key: str, value: Any) -> str:
        if key.startswith("dataset "):
            return value[0] if len(value) == 1 else f"{value[3]} ({value[1]} samples, views {value[2] or 'none'})"
        if key == "fingerprint":
            return str(value)[:12]
        if key == "signature":  # long: its fields that differ are named by the other facts, or here in short
            return (
                "none"
                if value is None
                else f"{len(value.inputs)} input(s), {len(value.outputs)} output(s), "
                f"mean {value.mean}, std {value.std}, {dict(value.extra)}"
            )
        return repr(value) if isinstance(value, str) else str(value)

    how = "; ".join(f"{k}: " + ", ".join(f"{a} {shown(k, f[k])}" for a, f in facts) for k in differ)
    raise ValueError(
        f"the server pool serves different teachers: its members differ ({how}); a pool's servers must serve "
        "the same teacher, with the same options and datasets (or give each its own --source)"
    )


# Errors that are a request's own fault: every member would give the same answer, so they fail
# the run. Any other member error (UNAVAILABLE from a draining or dead server, a stalled stream's
# timeout, a reset connection, a server-side failure) is the member's, and its batches go elsewhere.
_REQUEST_FAULTS = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.UNIMPLEMENTED,
})  # fmt: skip

# How long closing a pooled stream waits for its member threads to finish their last replies.
_POOL_JOIN_S = 15.0
# How long a pool member that failed is given to answer a describe before a later stream.
_REJOIN_PROBE_S = 1.0


def member_failed(error: BaseException) -> bool:
    """Whether ``error`` from one member of a pool is that member's failure (retry the batches on
    another member) rather than the request's own fault (fail the run)."""
    if isinstance(error, TeacherRequestError):
        return error.code not in _REQUEST_FAULTS
    return isinstance(error, (TimeoutError, ConnectionError, grpc.RpcError))


def _pooled_stream(
    clients: list[TeacherClient],
    teacher: str,
    keyed: Iterator[tuple[Any, Any]],
    *,
    depth: int,
    names: list[str] | None = None,
    on_failure: Callable[[int], None] | None = None,
    **options: Any,
) -> Iterator[tuple[Any, dict[str, torch.Tensor]]]:
    """``TeacherClient.infer_stream`` over a pool: batches take turns over the healthy members,
    each member on its own stream (thread), up to ``depth`` batches in flight per member; results
    come back in input order.

    A member that fails (``member_failed``: drained, gone, stalled) leaves the pool for this
    stream, and its unanswered batches are sent again, in order, to the remaining members: the
    members serve one teacher (``_agreed_description``), so the targets are the same whichever
    answers; ``on_failure(k)`` is told. With no member left, ``TeacherRequestError`` UNAVAILABLE names each and why. A
    request's own error is raised as it is. Closing the iterator ends every member's stream and
    waits (bounded) for its thread, so no gRPC call is live after it returns: a DataLoader that
    forks its workers next would otherwise fork in the middle of one."""
    n = len(clients)
    names = names or [c.target for c in clients]
    stop = threading.Event()
    events: queue.Queue = queue.Queue()  # (kind, lane, seq, value) from the lanes' threads
    # A lane is one stream to one member, fed from its inbox until a None. A member's stream sends
    # its next request only after handing on a reply, and waits for it: so a member's inbox is
    # kept ahead of its stream while batches remain (it never waits with replies unread), and at
    # the end of the batches every lane is closed. Batches sent again after that (a member failed
    # late) go on a new lane of a remaining member.
    lane_member: list[int] = []
    lane_inbox: list[queue.Queue] = []
    threads: list[threading.Thread] = []
    open_lane: list[int | None] = [None] * n

    def requests(inbox: queue.Queue) -> Iterator[tuple[Any, ...]]:
        while True:
            try:
                item = inbox.get(timeout=0.1)
            except queue.Empty:
                if stop.is_set():
                    return
                continue
            if item is None:
                return
            yield item

    def serve(lane: int) -> None:
        client = clients[lane_member[lane]]
        try:
            for seq, outputs in client.infer_stream(teacher, requests(lane_inbox[lane]), depth=depth, **options):
                events.put(("ok", lane, seq, outputs))
            events.put(("end", lane, None, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            events.put(("error", lane, None, e))

    def lane_of(k: int) -> int:
        if open_lane[k] is None:
            open_lane[k] = len(lane_member)
            lane_member.append(k)
            lane_inbox.append(queue.Queue())
            threads.append(threading.Thread(target=serve, args=(open_lane[k],), name=f"pool-stream-{k}", daemon=True))
            threads[-1].start()
        return open_lane[k]  # type: ignore[return-value]

    def close_lanes() -> None:
        for k, lane in enumerate(open_lane):
            if lane is not None:
                lane_inbox[lane].put(None)
                open_lane[k] = None

    source = iter(keyed)
    healthy = list(range(n))
    failed: dict[int, str] = {}
    pending: dict[int, tuple[Any, tuple]] = {}  # seq -> (batch, what is sent): not yet yielded
    owner: dict[int, int] = {}  # seq -> the lane it was last sent on, while unanswered
    load = [0] * n  # unanswered batches per member
    ready: dict[int, dict[str, torch.Tensor]] = {}
    sent = want = turn = 0
    exhausted = False

    def least_loaded() -> int:
        nonlocal turn
        turn += 1
        return min(healthy, key=lambda k: (load[k], (k - turn) % n))

    def send(seq: int, k: int) -> None:
        lane = lane_of(k)
        owner[seq] = lane
        load[k] += 1
        lane_inbox[lane].put((seq, *pending[seq][1]))

    def answered(seq: int) -> None:
        lane = owner.pop(seq, None)
        if lane is not None:
            load[lane_member[lane]] -= 1

    def lose(k: int, why: str) -> None:
        """Member k is out: its unanswered batches go, in order, to the others."""
        healthy.remove(k)
        failed[k] = why
        if on_failure is not None:  # the source leaves it out of its next streams until it is back
            on_failure(k)
        if open_lane[k] is not None:
            lane_inbox[open_lane[k]].put(None)  # type: ignore[index]
            open_lane[k] = None
        if not healthy:
            listing = "; ".join(f"{names[j]}: {failed[j]}" for j in sorted(failed))
            raise TeacherRequestError(
                grpc.StatusCode.UNAVAILABLE, f"every server of the pool failed, none is left to ask ({listing})"
            )
        for seq in sorted(s for s, lane in owner.items() if lane_member[lane] == k):
            answered(seq)
            send(seq, least_loaded())
        if exhausted:
            close_lanes()

    try:
        while True:
            while not exhausted:
                k = least_loaded()
                if load[k] > depth:
                    break
                try:
                    batch, *rest = next(source)
                except StopIteration:
                    exhausted = True
                    close_lanes()
                    break
                pending[sent] = (batch, tuple(rest))
                send(sent, k)
                sent += 1
            if want in ready:
                outputs = ready.pop(want)
                batch = pending.pop(want)[0]
                want += 1
                yield batch, outputs
                continue
            if exhausted and want == sent:
                return
            kind, lane, seq, value = events.get()
            k = lane_member[lane]
            if kind == "ok":
                # The first answer counts; a failed member's late answer to a batch sent again
                # is the same teacher's, and the second one is dropped.
                if seq >= want and seq not in ready:
                    ready[seq] = value
                    answered(seq)
            elif k in healthy:
                if kind == "error" and not member_failed(value):
                    raise value
                if kind == "error":
                    lose(k, str(value))
                elif any(o == lane for o in owner.values()):
                    lose(k, "its stream ended with batches unanswered")
    finally:
        stop.set()
        for inbox in lane_inbox:  # each lane sends no more, reads its last replies, and ends
            inbox.put(None)
        deadline = time.monotonic() + _POOL_JOIN_S
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))


def _check_normalisation(teacher: Teacher, mean: list[float] | None, std: list[float] | None) -> None:
    """Refuse a mean/std that does not fit the teacher's input channels, or a std that is not > 0
    (a std of 0 would make every input infinite)."""
    shape = tuple(teacher.input_shape)
    channels = int(shape[0]) if len(shape) == 3 else None
    for name, vals in (("mean", mean), ("std", std)):
        if vals is None:
            continue
        if channels is not None and len(vals) != channels:
            raise ValueError(
                f"{name} has {len(vals)} value(s) {list(vals)}, but teacher {teacher.name!r} takes {channels} "
                f"input channels (input shape {list(shape)}): give one per channel"
            )
        if not all(math.isfinite(v) for v in vals):
            raise ValueError(f"{name} {list(vals)}: values must be finite numbers")
    if std is not None and any(v <= 0 for v in std):
        raise ValueError(f"std {list(std)}: every value must be > 0")


class LocalSource(SoftTargetSource):
    name = "local"

    def __init__(self, teacher: Teacher | str, *, device: str = "cpu", amp: str = "fp32",
                 mean: list[float] | None = None, std: list[float] | None = None) -> None:  # fmt: skip
        """``mean``/``std``: the teacher's normalisation (as ``kd serve --mean/--std``): image views
        are resized to its input shape and normalised (kd.core.views.pixels_to_input)."""
        if isinstance(teacher, str):
            teacher = load_teacher("local", teacher, device=device)
        _check_normalisation(teacher, mean, std)
        self.teacher = teacher
        self.teacher_name = teacher.name
        self.runner = ModelRunner(teacher, amp=amp)
        # The targets' identity: the same weights under bf16 autocast (or another normalisation)
        # give other targets; equal to a server's fingerprint with the same options.
        self.fingerprint = target_fingerprint(teacher.weights_fingerprint, amp=amp, mean=mean, std=std)
        self.num_classes = teacher.num_classes
        self.mean, self.std = mean, std

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """Image views through the teacher's final transform; samples of as many values as the
        teacher's input in its layout (a view, as ``ServerSource._payload`` does: flat digits for a
        CNN teacher, 1x8x8 images for an MLP); other samples as they are."""
        if not self.teacher.input_dtype.is_floating_point:
            return x
        y = pixels_to_input(x, self.teacher.input_shape, self.mean, self.std)
        if y is not None:
            return y
        shape = tuple(self.teacher.input_shape)
        if len(x) and shape and min(shape) > 0 and tuple(x.shape[1:]) != shape and x[0].numel() == math.prod(shape):
            return x.reshape(len(x), *shape)
        return x

    def targets(self, indices: torch.Tensor, inputs: torch.Tensor, views: torch.Tensor | None = None) -> Targets:
        return self.runner(self._input(inputs))

    def token_hidden_widths(self) -> dict[str, int] | None:
        from kd.teacher_server.lm import is_token_teacher

        if not is_token_teacher(self.teacher):
            return None
        return {name: int(shape[-1]) for name, shape in self.teacher.layers.items() if len(shape) == 2}

    def token_targets_hidden(
        self, indices: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
        layers: list[str],
    ) -> tuple[Targets, dict[str, torch.Tensor]]:  # fmt: skip
        """The logits of every position (as ``token_targets``) and the hidden states picked at ``positions``."""
        out = self.runner.to_host(self.runner.forward(self.runner.prepare(tokens), frozenset(layers)))
        mask = positions.to(torch.bool).cpu()
        return out["logits"], {name: out[f"feature/{name}"][mask].float() for name in layers}

    def iter_outputs(
        self, batches: Iterable[Batch | tuple], features: list[str], pool: bool = False
    ) -> Iterator[tuple[Batch, torch.Tensor, dict[str, torch.Tensor]]]:
        layers = reductions.layers_needed(features)
        unknown = [f for f in layers if f not in self.teacher.layers]
        if unknown:
            raise ValueError(f"unknown layer(s) {unknown} of teacher {self.teacher.name!r}")
        for b in batches:
            b = Batch(*b)
            prepared = self.runner.prepare(self._input(b.inputs))
            out = self.runner.to_host(self.runner.forward(prepared, frozenset(layers)))
            maps = {name: out[f"feature/{name}"] for name in layers}
            feats = {}
            for name in features:
                f = reductions.reduce(name, maps)
                feats[name] = reductions.pool(f) if pool and reductions.parse(name).reduction is None else f
            yield b, out["logits"], feats


class ReadThroughSource(SoftTargetSource):
    """A cache in front of ``upstream``: misses are computed upstream, written, then read.

    Hits and misses both come back through the cache's codec, so a student sees
    the same targets in its first epoch as in later ones.
    """

    name = "read-through"

    def __init__(self, path: str, upstream: SoftTargetSource, dataset: Dataset, *, codec: str = "fp32",
                 views: int = 1, temperature: float | None = None) -> None:  # fmt: skip
        self.upstream = upstream
        refuse_live_weights(upstream)
        self.fingerprint = upstream.fingerprint
        self.num_classes = upstream.num_classes
        self.teacher_name = upstream.teacher_name
        meta = CacheMeta.for_dataset(
            teacher_fingerprint=upstream.fingerprint,
            teacher=upstream.teacher_name,
            num_classes=upstream.num_classes,
            dataset=dataset,
            codec=codec,
            views=views,
            temperature=temperature,
        )
        count = None if (Path(path) / "data.mdb").is_file() else shard_count_at(path)
        if count is None:
            self.writer: CacheWriter | ShardedCacheWriter = CacheWriter(path, meta)
        else:
            # A directory of shards (kd precompute --shard, torchrun): every shard present and
            # alike first, then each shard's writer checks the teacher (and the rest) against it,
            # and misses are written to their shards, where readers look for them.
            open_cache(path).close()
            self.writer = ShardedCacheWriter(path, meta, count)
        self.reader = open_cache(path)
        self.hits = 0
        self.misses = 0
        # Ask upstream only for what the cache keeps (a server draws or picks next to the model).
        c = self.writer.codec
        if meta.codec.startswith("topk:") and callable(getattr(upstream, "keeping_topk", None)):
            self.upstream = upstream.keeping_topk(c.k, c.temperature)
        elif meta.codec.startswith("sample:") and callable(getattr(upstream, "keeping_samples", None)):
            self.upstream = upstream.keeping_samples(c)

    def logit_offsets_lost(self) -> str | None:
        lost = logit_offsets_lost(self.reader.meta.codec)
        return None if lost is None else f"read-through cache: {lost}"

    def sparse_targets(self) -> str | None:
        sparse = sparse_targets_of(self.reader.meta.codec)
        return None if sparse is None else f"read-through cache: {sparse}"

    def sampled_at(self) -> float | None:
        return _drawn_at(self.reader.codec)

    def sparse_kind(self) -> str | None:
        return _sparse_kind_of(self.reader.meta.codec)

    def targets(self, indices: torch.Tensor, inputs: torch.Tensor, views: torch.Tensor | None = None) -> Targets:
        present = torch.tensor(self.reader.present(indices.tolist(), None if views is None else views.tolist()))
        missing = (~present).nonzero().flatten()
        self.hits += int(present.sum())
        self.misses += len(missing)
        if len(missing):
            mv = None if views is None else views[missing]
            got = self.upstream.targets(indices[missing], inputs[missing], mv)
            keys, vws = indices[missing].tolist(), None if mv is None else mv.tolist()
            if isinstance(got, SampleDraws):
                self.writer.put_samples(keys, got.ids, got.counts, vws)
            elif isinstance(got, SparseTargets) and got.kind == "topk":
                self.writer.put_topk(keys, got, vws)
            else:
                self.writer.put(keys, got, vws)
            self.writer.flush()
        return self.reader.targets(indices, views)

    def close(self) -> None:
        self.writer.close()
        self.upstream.close()


def split_server_address(rest: str) -> tuple[str, str | None]:
    """``server:``'s part after the colon -> (gRPC address, teacher name or None).

    The teacher is after the first ``/`` that follows the address, and an address may hold
    slashes of its own: ``HOST:PORT[,HOST:PORT...]``, ``[::1]:PORT``, ``dns:///HOST:PORT``,
    ``dns://RESOLVER/HOST:PORT``, ``ipv4:A:P[,B:Q...]``, ``ipv6:[A]:P[,...]``, ``unix:PATH`` (its
    teacher after the last ``/``, unless PATH with it is the socket). An ``ipv4:``/``ipv6:`` list
    becomes a plain one, so it is a pool (one stream per member) like ``HOST:PORT,HOST:PORT``."""
    head = ""
    body = rest
    if rest.startswith("dns:"):
        body = rest[len("dns:") :]
        if body.startswith("//"):  # dns://[RESOLVER]/HOST:PORT: the name starts after the authority's /
            end = body.find("/", 2)
            if end < 0:
                raise ValueError(f"server:{rest}: a dns:// target is dns://[RESOLVER]/HOST:PORT (dns:///HOST:PORT)")
            head, body = "dns:" + body[: end + 1], body[end + 1 :]
        else:
            head = "dns:"
    elif rest.startswith(("unix:", "unix-abstract:")):
        if os.path.exists(rest.partition(":")[2]) or "/" not in rest.partition(":")[2].lstrip("/"):
            return rest, None
        address, _, teacher = rest.rpartition("/")
        return address, teacher or None
    elif rest.startswith(("ipv4:", "ipv6:")):
        body = rest[len("ipv4:") :]
    address, _, teacher = body.partition("/")
    if not address:
        raise ValueError(f"server:{rest}: no server address (expected HOST:PORT[/TEACHER])")
    return head + address, teacher or None


def _sparse_kind_of(codec: str) -> str | None:
    """What a cache of codec ``codec`` decodes to: its ``SparseTargets.kind``, None for dense logits."""
    for prefix, kind in (("topk:", "topk"), ("sample:", "sample"), ("rand:", "subset")):
        if codec.startswith(prefix):
            return kind
    return None


def _drawn_at(codec: Any) -> float | None:
    """A cache codec's sampling temperature if it stores draws (sample:K[xR]), else None."""
    return float(codec.temperature) if codec.name.startswith("sample:") else None


def parse_source(ref: str, **kwargs: Any) -> SoftTargetSource:
    """``cache:PATH``, ``server:HOST:PORT[,HOST:PORT...][/TEACHER]`` (or another gRPC target:
    ``split_server_address``) or ``local:SPEC``."""
    kind, sep, rest = ref.partition(":")
    if not sep or not rest:
        raise ValueError(f"source {ref!r}: expected cache:PATH, server:HOST:PORT[/TEACHER] or local:SPEC")
    if kind == "cache":
        return CacheSource(rest, **kwargs)
    if kind == "server":
        return ServerSource(*split_server_address(rest), **kwargs)
    if kind == "local":
        return LocalSource(rest, **kwargs)
    raise ValueError(f"unknown source kind {kind!r} in {ref!r}; use cache:, server: or local:")
