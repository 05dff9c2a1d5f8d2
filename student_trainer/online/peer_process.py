"""Deep mutual learning with each peer in its own process: Ying Zhang, Tao Xiang, Timothy M.
Hospedales, Huchuan Lu 2018, "Deep Mutual Learning", CVPR 2018, arXiv:1706.00384.

DML trains K peers together; peer k minimises its cross-entropy plus the KL from every other
peer's prediction on the same batch (T = 1 in the paper; ``temperature`` scales both sides and
the term by T^2 as the other online methods here do)::

    L_k = CE(z_k, y) + 1/(K-1) sum_{l != k} T^2 KL(softmax(z_l/T) || softmax(z_k/T))

with z_l a constant for peer k. The paper updates the peers in turn on each batch; here every
peer takes the others' predictions as they are when it asks (``dml_loss``).

Across processes (the reason for this file): a peer may be too large to share a device with its
peers, so each peer trains in its own process (its own GPU) and serves its current weights
through a teacher server started with live weight updates (``kd serve --accept-weights``,
``kd.teacher_server.weights``). Each step it sends its batch by value to every other peer's
server and takes their logits as z_l; every ``publish_every`` steps it publishes its own weights
to its own server (``TeacherClient.publish_weights``). The others' predictions are therefore
stale by up to ``publish_every`` steps (plus the time an update takes), and come from their
served models in eval mode (BatchNorm running statistics), where one-process DML uses the peers'
train-mode outputs. ``train_dml_local`` is the one-process reference (staleness 0) the
README's staleness table compares against; ``kd peer`` runs one peer.

Peers meet through their servers only: a peer publishes its initial weights (version 1), waits
until every other peer's server serves version >= 1, trains, publishes its final weights and
keeps serving until no peer has asked for ``linger`` seconds, so a slower peer never loses its
teacher before it is done.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from kd.core import factory
from kd.core.samples import SampleSource
from kd.student_trainer.online.common import ce_sum, check_temperature, kl_t
from kd.student_trainer.train import Hooks, StepContext, TrainConfig, accuracy, seed_everything, train_student
from kd.teacher_server.client import TeacherClient, TeacherRequestError

PAPER = "Zhang, Xiang, Hospedales, Lu 2018, Deep Mutual Learning (arXiv:1706.00384)"


def dml_loss(
    logits: torch.Tensor, peer_logits: Sequence[torch.Tensor], labels: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """DML's loss of one peer (module docstring); ``peer_logits`` are constants (detached here)."""
    check_temperature(temperature)
    ce = ce_sum([logits], labels)
    if not peer_logits:
        return ce
    kl = torch.stack([kl_t(logits, z.detach().to(logits.device), temperature) for z in peer_logits])
    return ce + kl.mean()


def build_model(spec: str, init_seed: int) -> nn.Module:
    """``module:factory[?key=value]`` built under ``init_seed`` (the peer's own initialisation)."""
    f = factory.parse_factory(spec, "peer model")
    if f.weights:
        raise ValueError(f"peer model {spec!r}: give the factory only; a peer starts from its own seeded init")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return factory.call_factory(f.factory, dict(f.kwargs), "peer model")


@dataclass(frozen=True)
class PeerAddress:
    """Another peer: its server and the teacher name it serves itself under. The port may be
    ``@FILE``: read from FILE (``kd serve --port-file``) once it exists."""

    host: str
    port: str
    name: str

    @classmethod
    def parse(cls, text: str) -> PeerAddress:
        host, sep, rest = text.partition(":")
        port, slash, name = rest.rpartition("/")
        if not (sep and slash and host and port and name):
            raise ValueError(f"peer {text!r} must look like HOST:PORT/NAME (PORT may be @PORT_FILE)")
        if not port.startswith("@") and not port.isdigit():
            raise ValueError(f"peer {text!r}: port {port!r} is neither a number nor @PORT_FILE")
        return cls(host, port, name)

    def address(self, timeout: float = 120.0) -> str:
        if not self.port.startswith("@"):
            return f"{self.host}:{self.port}"
        path, deadline = Path(self.port[1:]), time.monotonic() + timeout
        while not (path.is_file() and path.read_text().strip().isdigit()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"peer {self.name!r}: port file {str(path)!r} did not appear in {timeout:.0f} s")
            time.sleep(0.05)
        return f"{self.host}:{path.read_text().strip()}"


@dataclass
class PeerResult:
    name: str
    test_acc: float
    acc_per_epoch: list[float]
    loss_per_epoch: list[float]
    steps: int
    published_version: int  # the version of the last publish (1 = the initial weights)
    publishes: int
    # How old the peers' weights were when they answered, in steps of this peer: its step minus the
    # step of their snapshot (their version v holds the weights of step (v - 1) * publish_every,
    # assuming the peers publish as often as this one), 0 for a snapshot of a step this peer has not
    # reached yet (a peer ahead serves weights newer, not older, than this one's).
    mean_peer_age: float
    max_peer_age: int
    seconds: float
    state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def summary(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k != "state"}


def wait_for_peers(clients: dict[str, TeacherClient], version: int = 1, timeout: float = 120.0) -> None:
    """Block until every peer's server serves at least ``version`` of its weights."""
    deadline = time.monotonic() + timeout
    for name, client in clients.items():
        while True:
            try:
                if client.describe(name).weights_version >= version:
                    break
            except TeacherRequestError:
                pass  # not up yet
            if time.monotonic() > deadline:
                raise TimeoutError(f"peer {name!r} at {client.target} did not serve weights version {version} "
                                   f"within {timeout:.0f} s")  # fmt: skip
            time.sleep(0.05)


def train_peer(
    model: nn.Module,
    train: SampleSource,
    test: SampleSource,
    config: TrainConfig,
    *,
    name: str,
    publish_to: str,
    peers: Sequence[PeerAddress],
    publish_every: int = 1,
    temperature: float = 1.0,
    subset: torch.Tensor | None = None,
    wait_timeout: float = 120.0,
    max_lag: int | None = None,
) -> PeerResult:
    """Train ``model`` (one peer) by DML against ``peers``, publishing it to the server at
    ``publish_to`` (its teacher ``name``, served with accept_weights) every ``publish_every``
    steps and once more at the end; ``config.seed`` fixes the batch order (the same for every
    peer when they share it), the model arrives initialised (``build_model``).

    ``max_lag``: bounded staleness (stale synchronous parallel). A peer whose served weights
    are more than ``max_lag`` steps older than this peer's step is asked again until they are
    not (every peer publishing every ``publish_every`` steps; ``max_lag >= publish_every - 1``
    never blocks the slower peer, so the peers cannot wait on each other). None: unbounded,
    each peer runs at its own speed and a faster one sees ever older weights of a slower one.
    Ages are read from the versions, so they assume each peer's server started at version 0
    (its own server, as ``kd peer --serve-port`` starts one)."""
    if publish_every < 1:
        raise ValueError(f"publish_every must be >= 1, got {publish_every}")
    if max_lag is not None and max_lag < publish_every - 1:
        raise ValueError(f"max_lag must be >= publish_every - 1 = {publish_every - 1}, got {max_lag}")
    check_temperature(temperature)
    config = replace(config, method="ce", method_options={})
    t0 = time.perf_counter()
    own = TeacherClient(publish_to, timeout=60.0)
    clients = {p.name: TeacherClient(p.address(wait_timeout), timeout=60.0) for p in peers}
    try:
        own.wait_ready(wait_timeout)
        version = own.publish_weights(name, model)
        publishes, ages = 1, []
        wait_for_peers(clients, 1, wait_timeout)
        shapes = {peer: client.describe(peer).input_shape for peer, client in clients.items()}
        steps = 0

        def loss(ctx: StepContext) -> torch.Tensor:
            logits = ctx.model(ctx.inputs)
            x = ctx.inputs.detach().to("cpu", torch.float32)
            peer_logits = []
            for peer, client in clients.items():
                deadline = time.monotonic() + wait_timeout
                while True:
                    z = client.infer(peer, x.reshape(x.shape[0], *shapes[peer]))["logits"]
                    # never negative: a peer ahead of this one would count as -d steps old and pull
                    # the mean below the true staleness of the peers that are behind
                    age = max(0, steps - (client.served_by[1] - 1) * publish_every)
                    if max_lag is None or age <= max_lag:
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"peer {peer!r} stayed {age} step{'s' * (age != 1)} behind for "
                                           f"{wait_timeout:.0f} s")  # fmt: skip
                    time.sleep(0.002)
                peer_logits.append(z.to(logits.device))
                ages.append(age)
            return dml_loss(logits, peer_logits, ctx.labels, temperature=temperature)

        def on_step(epoch: int, step: int, value: float, lr: float) -> None:
            nonlocal steps, version, publishes
            steps += 1
            if steps % publish_every == 0:
                version = own.publish_weights(name, model)
                publishes += 1

        res = train_student(model, train, test, config, hooks=Hooks(loss=loss, on_step=on_step), subset=subset)
        if steps % publish_every:
            version = own.publish_weights(name, model)  # the final weights are always served
            publishes += 1
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        result = PeerResult(
            name=name, test_acc=accuracy(model, test, device=config.device), acc_per_epoch=res.acc_per_epoch,
            loss_per_epoch=res.loss_per_epoch, steps=steps, published_version=version, publishes=publishes,
            mean_peer_age=sum(ages) / len(ages) if ages else math.nan, max_peer_age=max(ages, default=0),
            seconds=time.perf_counter() - t0, state=state,
        )  # fmt: skip
    finally:
        for c in (own, *clients.values()):
            c.close()
    return result


def serve_until_quiet(requests_served: Callable[[], int], linger: float, limit: float = 600.0) -> None:
    """Return once ``requests_served()`` has not changed for ``linger`` seconds (or after ``limit``)."""
    end = time.monotonic() + limit
    last, since = requests_served(), time.monotonic()
    while time.monotonic() < end and time.monotonic() - since < linger:
        time.sleep(min(0.1, linger))
        now = requests_served()
        if now != last:
            last, since = now, time.monotonic()


def train_dml_local(
    spec: str,
    train: SampleSource,
    test: SampleSource,
    config: TrainConfig,
    *,
    init_seeds: Sequence[int] = (0, 1),
    temperature: float = 1.0,
    subset: torch.Tensor | None = None,
    eval_targets: bool = False,
) -> list[float]:
    """DML with every peer in this process (the staleness-0 reference): peer 0 is
    ``train_student``'s student, the others extra modules with their own optimisers, all on the
    same batches; each peer's loss takes the others' current logits. -> test top-1 per peer.
    ``eval_targets``: the others' logits in eval mode (BatchNorm running statistics), as a
    server answers them, instead of the paper's train-mode outputs."""
    from kd.student_trainer import optim

    if len(init_seeds) < 2:
        raise ValueError("DML needs at least two peers")
    config = replace(config, method="ce", method_options={})
    seed_everything(config.seed)
    models = [build_model(spec, s) for s in init_seeds]
    extra = [(m, optim.make_optimizer(m.parameters(), optim.recipe_of(config))) for m in models[1:]]

    def loss(ctx: StepContext) -> dict[str, torch.Tensor]:
        nets = [ctx.model, *models[1:]]
        targets = logits = [net(ctx.inputs) for net in nets]
        if eval_targets:
            targets = []
            with torch.no_grad():
                for net in nets:
                    net.eval()
                    targets.append(net(ctx.inputs))
                    net.train()
        terms = [dml_loss(z, [o for j, o in enumerate(targets) if j != i], ctx.labels, temperature=temperature)
                 for i, z in enumerate(logits)]  # fmt: skip
        return {"loss": terms[0], **{f"peer{i}": t for i, t in enumerate(terms[1:], 1)}}

    train_student(models[0], train, test, config, hooks=Hooks(extra=extra, loss=loss), subset=subset)
    return [accuracy(m, test, device=config.device) for m in models]
