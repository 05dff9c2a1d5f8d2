"""Access tiers and query accounting: how much of a teacher each client may see and use.

Tiers, most to least (each includes those below it):

* ``white``: everything, including input gradients, BatchNorm statistics and loss,
  activation records and server-side synthesis (white-box data-free methods);
* ``features``: outputs plus named intermediate features;
* ``scores``: logits, probabilities, top-k (black-box methods such as DFME);
* ``labels``: the argmax class only (decision-based methods such as ZSDB3KD).

Accounting counts, per client, the samples answered and the samples whose gradient was
computed (a zeroth-order probe is an ordinary sample). With a budget, a request that
would exceed it is refused with RESOURCE_EXHAUSTED before any work is done. Even score
access permits model extraction (Truong et al. 2021), so a low tier goes with a budget.

A client is identified by its bearer token (hashed) when the server requires one, else
by its TLS client certificate under mutual TLS (the name gRPC authenticated), else by its
``kd-client-id`` metadata, else by its address without the port. Without tokens or
certificates an identity is only a claim: budgets are as strong as the authentication in
front of them. At most ``max_clients`` clients are remembered (the least recently seen go
first), so distinct claimed ids cannot grow the server's memory or its metrics.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import grpc

from kd.v1 import teacher_pb2 as pb

TIERS = ("white", "features", "scores", "labels")
_RANK = {name: i for i, name in enumerate(TIERS)}
PROTO = {"white": pb.WHITE, "features": pb.FEATURES, "scores": pb.SCORES, "labels": pb.LABELS}
FROM_PROTO = {v: k for k, v in PROTO.items()} | {pb.ACCESS_UNSPECIFIED: "white"}


def parse_access(value: str) -> str:
    tier = value.strip().lower()
    if tier not in _RANK:
        raise ValueError(f"unknown access tier {value!r}; use one of {', '.join(TIERS)}")
    return tier


def allows(tier: str, needed: str) -> bool:
    """Whether a teacher served at ``tier`` may give what ``needed`` requires."""
    return _RANK[tier] <= _RANK[needed]


class AccessDenied(Exception):
    def __init__(self, teacher: str, tier: str, needed: str, what: str) -> None:
        super().__init__(
            f"teacher {teacher!r} is served at access tier {tier!r}; {what} needs tier {needed!r} or above "
            f"(tiers from most to least: {', '.join(TIERS)})"
        )


def require(teacher: str, tier: str, needed: str, what: str) -> None:
    if not allows(tier, needed):
        raise AccessDenied(teacher, tier, needed, what)


def client_identity(context: grpc.ServicerContext | None) -> str:
    if context is None:
        return "local"
    metadata = dict(context.invocation_metadata() or ())
    token = metadata.get("authorization")
    if token:
        if isinstance(token, bytes):
            token = token.decode(errors="replace")
        return "token:" + hashlib.sha256(token.encode()).hexdigest()[:12]
    cert = _certificate_identity(context)
    if cert:
        return f"cert:{cert}"
    declared = metadata.get("kd-client-id")
    if declared:
        if isinstance(declared, bytes):
            declared = declared.decode(errors="replace")
        return f"id:{declared[:_MAX_ID]}"
    peer = context.peer() or "unknown"
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


_MAX_ID = 128
INSTANCE_KEY = "kd-client-instance"
# The trailing metadata key of a stream the server closed because it was idle ("idle": past
# stream_idle_timeout_s; "reclaimed": its place went to another stream at a limit). Only streams
# with nothing in flight are closed, so a client reopens and resends what was unanswered.
STREAM_CLOSED_KEY = "kd-stream-closed"


def stream_key(context: grpc.ServicerContext | None) -> str:
    """Whom the per-client stream limit (max_streams_per_client) counts: the client's identity,
    refined by its ``kd-client-instance`` metadata (kd's clients send a random one per
    ``TeacherClient``) unless the identity is authenticated. Without a token or certificate the
    identity is the host's address or a claimed id, which many honest processes share (one
    host, one NAT) and anyone can vary, so a limit per identity alone refuses the 17th honest
    process and stops no one. A token or certificate is the one client the operator admitted:
    its processes share its limit, as they share its query budget (accounting is never keyed
    on the instance)."""
    identity = client_identity(context)
    if context is None or identity.startswith(("token:", "cert:")):
        return identity
    instance = dict(context.invocation_metadata() or ()).get(INSTANCE_KEY)
    if isinstance(instance, bytes):
        instance = instance.decode(errors="replace")
    return f"{identity}#{instance[:_MAX_ID]}" if instance else identity


def _certificate_identity(context: grpc.ServicerContext) -> str:
    """The authenticated client certificate's name (mutual TLS), '' without one."""
    try:
        names = context.peer_identities()
    except Exception:  # noqa: BLE001 - a context without transport security
        return ""
    if not names:
        return ""
    return b",".join(names).decode(errors="replace")[:_MAX_ID]


class BudgetExceeded(Exception):
    pass


@dataclass
class _Count:
    samples: int = 0
    gradient_samples: int = 0


class Accounting:
    """Thread-safe per-client counters with an optional budget on samples + gradient samples."""

    def __init__(self, budget: int = 0, on_charge=None, *, max_clients: int = 10_000, on_forget=None) -> None:
        if budget < 0:
            raise ValueError(f"query budget must be >= 0 (0 = none), got {budget}")
        if max_clients < 1:
            raise ValueError(f"max_clients must be >= 1, got {max_clients}")
        self.budget = budget
        self.max_clients = max_clients
        self._counts: OrderedDict[str, _Count] = OrderedDict()
        self._lock = threading.Lock()
        self._on_charge = on_charge  # (client, kind, n) -> None, e.g. a metrics counter
        self._on_forget = on_forget  # (client) -> None: drop its metrics series

    @property
    def clients(self) -> int:
        """How many clients are remembered (at most ``max_clients``)."""
        return len(self._counts)

    def charge(self, client: str, *, samples: int = 0, gradient_samples: int = 0) -> pb.Usage:
        """Count a request before doing it; refuse it if it would go over the budget."""
        forgotten = []
        with self._lock:
            c = self._counts.get(client)
            if c is None:
                c = self._counts[client] = _Count()
                while len(self._counts) > self.max_clients:
                    forgotten.append(self._counts.popitem(last=False)[0])
            else:
                self._counts.move_to_end(client)
            used = c.samples + c.gradient_samples
            if self.budget and used + samples + gradient_samples > self.budget:
                raise BudgetExceeded(
                    f"query budget exhausted for client {client!r}: {used} of {self.budget} queries used, this "
                    f"request needs {samples + gradient_samples} (samples {samples}, gradient samples "
                    f"{gradient_samples})"
                )
            c.samples += samples
            c.gradient_samples += gradient_samples
            usage = pb.Usage(client=client, samples=c.samples, gradient_samples=c.gradient_samples, budget=self.budget)
        if self._on_forget is not None:
            for name in forgotten:
                self._on_forget(name)
        if self._on_charge is not None:
            if samples:
                self._on_charge(client, "samples", samples)
            if gradient_samples:
                self._on_charge(client, "gradient_samples", gradient_samples)
        return usage

    def usage(self, client: str) -> pb.Usage:
        with self._lock:
            c = self._counts.get(client, _Count())
            return pb.Usage(client=client, samples=c.samples, gradient_samples=c.gradient_samples, budget=self.budget)
