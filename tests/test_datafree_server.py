"""The server surface for data-free distillation: access tiers, input gradients (VJP),
BatchNorm statistics and loss with momentum state, activation records, server-side
synthesis, and per-client query accounting -- against a real server on loopback."""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
import torch.nn.functional as F
from gates import HeldForward
from typer.testing import CliRunner

from kd.cli import app
from kd.core.data import load_dataset
from kd.student_trainer.train import seed_everything
from kd.teacher_server.client import TeacherClient, TeacherRequestError
from kd.teacher_server.config import load_config
from kd.teacher_server.gradients import batchnorm_layers
from kd.teacher_server.loading import Teacher, load_teacher
from kd.teacher_server.records import compute_records, save_records
from kd.teacher_server.server import TeacherOptions, start_server

TRAIN = load_dataset("digits", "train")
TEST = load_dataset("digits", "test")


@pytest.fixture(scope="module")
def cnn_spec(digits_cnn_spec) -> str:
    return digits_cnn_spec(2)


@pytest.fixture(scope="module")
def cnn(cnn_spec: str) -> Teacher:
    return load_teacher("cnn", cnn_spec)


@pytest.fixture(scope="module")
def records_file(cnn: Teacher, tmp_path_factory: pytest.TempPathFactory) -> Path:
    recs = compute_records(cnn, TRAIN, ["logits", "layer2"], rank=3)
    return save_records(tmp_path_factory.mktemp("rec") / "records.safetensors", recs, cnn, TRAIN.dataset_id)


@pytest.fixture(scope="module")
def address(cnn: Teacher, records_file: Path):
    running = start_server([cnn], options={"cnn": TeacherOptions(max_queue_delay_us=20_000, records=str(records_file))})
    yield f"127.0.0.1:{running.port}", running
    running.stop(grace=1)


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def local_vjp(t: Teacher, x: torch.Tensor, g_logits: torch.Tensor, layer: str, g_feat: torch.Tensor) -> torch.Tensor:
    seen = {}
    h = dict(t.model.named_modules())[layer].register_forward_hook(lambda m, i, o: seen.setdefault("f", o))
    x = x.clone().requires_grad_(True)
    out = t.model(x)
    h.remove()
    ((out * g_logits).sum() + (seen["f"] * g_feat).sum()).backward()
    return x.grad


# -- input gradients --------------------------------------------------------------------------
def test_input_gradient_equals_local_autograd(address, cnn: Teacher) -> None:
    addr, _ = address
    x = images(5)
    g = torch.randn(5, 10)
    gf = torch.randn(5, 32, 8, 8)
    with TeacherClient(addr) as c:
        grad, outs = c.input_gradient("cnn", x, {"logits": g, "feature/layer1": gf}, return_outputs=True)
        only_logits, _ = c.input_gradient("cnn", x, {"logits": g})
    torch.testing.assert_close(grad, local_vjp(cnn, x, g, "layer1", gf), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(only_logits, local_vjp(cnn, x, g, "layer1", torch.zeros_like(gf)), rtol=1e-4,
                               atol=1e-5)  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(outs["logits"], cnn.model(x), rtol=1e-4, atol=1e-5)
    assert set(outs) == {"logits", "feature/layer1"}
    # The teacher stays frozen: no parameter gradient is left behind.
    assert all(p.grad is None for p in cnn.model.parameters())


def test_input_gradient_of_a_layer_the_next_module_changes_in_place(address, cnn: Teacher) -> None:
    # layer1.1 and layer2.1 are BatchNorms followed by ReLU(inplace=True): the feature the upstream
    # gradient is paired with, and the one returned, is the BN output, not the ReLU's.
    addr, _ = address
    x = images(4, seed=3)
    g = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    g1 = torch.randn(4, 32, 8, 8, generator=torch.Generator().manual_seed(2))
    g2 = torch.randn(4, 64, 8, 8, generator=torch.Generator().manual_seed(3))
    # The reference: a copy with out-of-place ReLUs, plain autograd.
    ref = copy.deepcopy(cnn.model).eval()
    for name, m in list(ref.named_modules()):
        if isinstance(m, torch.nn.ReLU):
            parent, _, leaf = name.rpartition(".")
            setattr(ref.get_submodule(parent), leaf, torch.nn.ReLU(inplace=False))
    seen = {}
    for name in ("layer1.1", "layer2.1"):
        ref.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
    xr = x.clone().requires_grad_(True)
    logits = ref(xr)
    assert seen["layer1.1"].min() < 0 and seen["layer2.1"].min() < 0  # what the ReLU would overwrite
    (want,) = torch.autograd.grad(
        (logits * g).sum() + (seen["layer1.1"] * g1).sum() + (seen["layer2.1"] * g2).sum(), xr, retain_graph=True
    )
    with TeacherClient(addr) as c:
        grad, outs = c.input_gradient(
            "cnn", x, {"logits": g, "feature/layer1.1": g1, "feature/layer2.1": g2}, return_outputs=True
        )
        only_layer1, _ = c.input_gradient("cnn", x, {"feature/layer1.1": g1})
    torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs["feature/layer1.1"], seen["layer1.1"].detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["feature/layer2.1"], seen["layer2.1"].detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["logits"], logits.detach(), rtol=1e-4, atol=1e-5)
    (want1,) = torch.autograd.grad((seen["layer1.1"] * g1).sum(), xr)
    torch.testing.assert_close(only_layer1, want1, rtol=1e-4, atol=1e-5)
    assert all(p.grad is None for p in cnn.model.parameters())


def test_input_gradients_of_many_clients_share_forwards(cnn: Teacher) -> None:
    """Eight clients' gradient requests that arrive while the model is busy share forwards.
    The first forward is held (``HeldForward``) so that they arrive together for sure."""
    held = HeldForward(cnn.model)
    running = start_server([dataclasses.replace(cnn, model=held)],
                           options={"cnn": TeacherOptions(max_queue_delay_us=20_000, warmup=False)})  # fmt: skip
    results: dict[int, torch.Tensor] = {}
    xs = {k: images(3, seed=k) for k in range(9)}
    gs = {k: torch.randn(3, 10, generator=torch.Generator().manual_seed(100 + k)) for k in range(9)}

    def client(k: int) -> None:
        with TeacherClient(f"127.0.0.1:{running.port}", timeout=30) as c:
            results[k] = c.input_gradient("cnn", xs[k], {"logits": gs[k]})[0]

    try:
        held.crowd(client, 9)
        batcher = running.endpoints["cnn"].vjp_batchers[frozenset()]
        assert batcher.stats.requests == 9 and batcher.stats.forwards <= 3, list(batcher.stats.batch_sizes)
    finally:
        running.stop(grace=1)
    for k in range(9):
        zero = torch.zeros(3, 32, 8, 8)
        torch.testing.assert_close(results[k], local_vjp(cnn, xs[k], gs[k], "layer1", zero), rtol=1e-4, atol=1e-5)


def test_gradient_requests_are_validated(address) -> None:
    addr, _ = address
    with TeacherClient(addr) as c:
        for upstream, why in [({}, "upstream is empty"), ({"logits": torch.randn(2, 9)}, "expected [2, 10]"),
                              ({"feature/nope": torch.randn(2, 3)}, "upstream key 'feature/nope'"),
                              ({"logits": torch.full((2, 10), float("nan"))}, "NaN")]:  # fmt: skip
            with pytest.raises(TeacherRequestError) as err:
                c.input_gradient("cnn", images(2), upstream)
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and why in err.value.message
        assert c.input_gradient("cnn", images(2), {"logits": torch.ones(2, 10)})[0].shape == (2, 1, 8, 8)


# -- BatchNorm ---------------------------------------------------------------------------------
def local_bn(t: Teacher, x: torch.Tensor, previous=None, m: float = 0.0):
    """DeepInversion's R_bn written out: ||mu - running_mean||_2 + ||var - running_var||_2 per BN input."""
    seen = []
    bns = batchnorm_layers(t.model)
    hs = [bn.register_forward_hook(lambda mod, i, o: seen.append(i[0])) for _, bn in bns]
    x = x.clone().requires_grad_(True)
    t.model(x)
    for h in hs:
        h.remove()
    total, blends = 0.0, []
    for k, ((_, bn), f) in enumerate(zip(bns, seen)):
        mu = f.mean(dim=(0, 2, 3))
        var = ((f - mu[None, :, None, None]) ** 2).mean(dim=(0, 2, 3))
        if previous is not None:
            mu, var = m * previous[k][0] + (1 - m) * mu, m * previous[k][1] + (1 - m) * var
        blends.append((mu.detach(), var.detach()))
        total = total + (mu - bn.running_mean).norm() + (var - bn.running_var).norm()
    total.backward()
    return float(total), x.grad, blends


def test_batchnorm_stats_and_loss_with_momentum_state(address, cnn: Teacher) -> None:
    addr, _ = address
    x1, x2 = images(6, 1), images(6, 2)
    with TeacherClient(addr) as c:
        stats = c.batchnorm_stats("cnn")
        assert set(c.describe("cnn").batch_norms) == {"layer1.1", "layer2.1"}
        torch.testing.assert_close(stats["layer1.1/running_mean"], cnn.model.layer1[1].running_mean)
        # The first state lives long enough for the second call on a loaded machine (with 0.5 s it could
        # expire before the second came); the second's 0.5 s is the expiry checked below.
        first = c.batchnorm_loss("cnn", x1, state_id="run-a", momentum=0.9, ttl_seconds=60)
        second = c.batchnorm_loss("cnn", x2, state_id="run-a", momentum=0.9, ttl_seconds=0.5)
        plain = c.batchnorm_loss("cnn", x2)
        time.sleep(0.7)  # the state expired: the next call under that id starts afresh
        expired = c.batchnorm_loss("cnn", x2, state_id="run-a", momentum=0.9, ttl_seconds=0.5)
    loss1, grad1, blends = local_bn(cnn, x1)
    loss2, grad2, _ = local_bn(cnn, x2, blends, 0.9)
    loss_plain, grad_plain, _ = local_bn(cnn, x2)
    assert first.loss == pytest.approx(loss1, rel=1e-5) and second.loss == pytest.approx(loss2, rel=1e-5)
    assert plain.loss == pytest.approx(loss_plain, rel=1e-5) and expired.loss == pytest.approx(loss_plain, rel=1e-5)
    assert second.loss != pytest.approx(plain.loss, rel=1e-3)
    torch.testing.assert_close(first.input_grad, grad1, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(second.input_grad, grad2, rtol=1e-4, atol=1e-6)
    assert sum(first.per_layer.values()) == pytest.approx(first.loss, rel=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(first.logits, cnn.model(x1), rtol=1e-4, atol=1e-5)


def test_momentum_states_are_each_clients_own(address, cnn: Teacher) -> None:
    """The same state_id from two clients names two states: bob's loss under alice's id blends
    bob's own first batch, never alice's statistics (attack a27: it read hers back)."""
    addr, _ = address
    xa, xb1, xb2 = images(6, 11) * 3 + 2, images(6, 12), images(6, 13)
    with TeacherClient(addr, client_id="alice") as alice, TeacherClient(addr, client_id="bob") as bob:
        alice.batchnorm_loss("cnn", xa, state_id="shared", momentum=0.0, ttl_seconds=30)
        bob.batchnorm_loss("cnn", xb1, state_id="shared", momentum=0.9, ttl_seconds=30)
        second = bob.batchnorm_loss("cnn", xb2, state_id="shared", momentum=0.9, ttl_seconds=30)
    _, _, own = local_bn(cnn, xb1)
    want, _, _ = local_bn(cnn, xb2, own, 0.9)
    assert second.loss == pytest.approx(want, rel=1e-5)


def test_batchnorm_loss_plus_a_logit_gradient_in_one_call(address, cnn: Teacher) -> None:
    addr, _ = address
    x, g = images(4, 3), torch.randn(4, 10)
    with TeacherClient(addr) as c:
        both = c.batchnorm_loss("cnn", x, upstream_logits=g)
        bn_only = c.batchnorm_loss("cnn", x)
        vjp, _ = c.input_gradient("cnn", x, {"logits": g})
    torch.testing.assert_close(both.input_grad, bn_only.input_grad + vjp, rtol=1e-4, atol=1e-5)
    with TeacherClient(addr) as c, pytest.raises(TeacherRequestError, match="at least 2"):
        c.batchnorm_loss("cnn", images(1))


# -- activation records ------------------------------------------------------------------------
def test_activation_records_are_served_and_match_their_definition(address, cnn: Teacher) -> None:
    addr, _ = address
    with TeacherClient(addr) as c:
        assert c.describe("cnn").has_activation_records
        recs, dataset = c.activation_records("cnn")
    assert dataset == TRAIN.dataset_id
    with torch.no_grad():
        logits = cnn.model(TRAIN.inputs.reshape(-1, 1, 8, 8)).double()
    for k in (0, 7):
        rows = logits[TRAIN.labels == k]
        assert int(recs["logits/count"][k]) == len(rows)
        torch.testing.assert_close(recs["logits/mean"][k].double(), rows.mean(0), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(recs["logits/std"][k].double(), rows.std(0, unbiased=False), rtol=1e-4,
                                   atol=1e-4)  # fmt: skip
        # the top direction is the covariance's top eigenvector (up to sign)
        cov = torch.cov(rows.t(), correction=0)
        vals, vecs = torch.linalg.eigh(cov)
        top = recs["logits/eigvecs"][k][:, 0].double()
        assert abs(float(top @ vecs[:, -1])) == pytest.approx(1.0, abs=1e-3)
        assert float(recs["logits/eigvals"][k][0]) == pytest.approx(float(vals[-1]), rel=1e-3)
    assert recs["layer2/mean"].shape == (10, 64 * 8 * 8) and recs["layer2/eigvecs"].shape == (10, 4096, 3)


def test_records_of_another_teacher_are_refused(cnn: Teacher, records_file: Path) -> None:
    seed_everything(5)
    other = load_teacher("other", "kd.models:digits_cnn")  # freshly initialised: other weights
    assert other.fingerprint != cnn.fingerprint
    with pytest.raises(ValueError, match="computed for teacher fingerprint"):
        start_server([other], options={"other": TeacherOptions(records=str(records_file))})


# -- synthesis ---------------------------------------------------------------------------------
def test_server_side_synthesis_streams_progress_then_the_batch(address, cnn: Teacher) -> None:
    addr, _ = address
    with TeacherClient(addr, client_id="synth") as c:
        updates = list(c.synthesize("cnn", 10, iterations=40, lr=0.1, report_every=10, seed=3))
        assert c.usage.gradient_samples == 10 * 40
    assert [u["iteration"] for u in updates] == [10, 20, 30, 40] and updates[-1]["done"]
    assert not any(u["done"] for u in updates[:-1])
    x, y = updates[-1]["inputs"], updates[-1]["targets"]
    assert x.shape == (10, 1, 8, 8) and y.tolist() == list(range(10))
    assert updates[-1]["terms"]["ce"] < updates[0]["terms"]["ce"]
    with torch.no_grad():
        assert float((cnn.model(x).argmax(1) == y).float().mean()) >= 0.9
    with TeacherClient(addr) as c, pytest.raises(TeacherRequestError, match="targets"):
        list(c.synthesize("cnn", 2, targets=[0, 10], iterations=1))


# -- tiers -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiered(cnn_spec: str, records_file: Path):
    teachers = [load_teacher(tier, cnn_spec) for tier in ("white", "features", "scores", "labels")]
    names = [str(k) for k in range(10)]
    options = {t.name: TeacherOptions(access=t.name, records=str(records_file), class_names=names) for t in teachers}
    running = start_server(teachers, options=options)
    yield f"127.0.0.1:{running.port}"
    running.stop(grace=1)


def _refused(call, teacher: str) -> str:
    with pytest.raises(TeacherRequestError) as err:
        call(teacher)
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED, err.value
    return err.value.message


def test_each_tier_refuses_what_it_should(tiered: str) -> None:
    x = images(4)
    g = torch.randn(4, 10)
    with TeacherClient(tiered) as c:
        calls = {
            "labels": lambda t: c.infer(t, x, logits=False, labels=True),
            "scores": lambda t: c.infer(t, x),
            "features": lambda t: c.infer(t, x, logits=False, features=["layer2@at"]),
            "white": lambda t: c.input_gradient(t, x, {"logits": g}),
        }
        white_only = {
            "bn stats": lambda t: c.batchnorm_stats(t),
            "bn loss": lambda t: c.batchnorm_loss(t, x),
            "records": lambda t: c.activation_records(t),
            "synthesis": lambda t: list(c.synthesize(t, 2, iterations=1)),
        }
        order = ["white", "features", "scores", "labels"]
        for served in order:
            desc = c.describe(served)
            assert desc.access == served and desc.class_names == tuple(str(k) for k in range(10))
            assert desc.layers["layer2"] == (64, 8, 8) and desc.input_shape == (1, 8, 8)
            for needed, call in calls.items():
                if order.index(served) <= order.index(needed):
                    call(served)  # allowed
                else:
                    assert f"tier {served!r}" in _refused(call, served)
            for call in white_only.values():
                if served == "white":
                    call(served)
                else:
                    assert "needs tier 'white'" in _refused(call, served)
        # A labels-tier teacher answers a plain request with labels only.
        out = c.infer("labels", x, logits=False)
        assert set(out) == {"labels"} and out["labels"].dtype == torch.int64
        torch.testing.assert_close(out["labels"], c.infer("white", x)["logits"].argmax(1))


# -- accounting --------------------------------------------------------------------------------
def test_query_budget_refuses_before_working_and_reports_usage(cnn: Teacher) -> None:
    running = start_server([cnn], query_budget=10, metrics_port=0)
    addr = f"127.0.0.1:{running.port}"
    try:
        with TeacherClient(addr, client_id="alice") as alice, TeacherClient(addr, client_id="bob") as bob:
            alice.infer("cnn", images(4))
            assert (alice.usage.client, alice.usage.samples, alice.usage.budget) == ("id:alice", 4, 10)
            alice.input_gradient("cnn", images(3), {"logits": torch.ones(3, 10)})
            assert (alice.usage.samples, alice.usage.gradient_samples) == (4, 3)
            with pytest.raises(TeacherRequestError) as err:
                alice.infer("cnn", images(4))
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "7 of 10 queries used" in err.value.message
            alice.infer("cnn", images(3))  # exactly up to the budget still works
            bob.infer("cnn", images(5))  # another client has its own budget
            assert bob.usage.samples == 5
        text = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10).read().decode()
        assert 'kd_client_queries_total{client="id:alice",kind="samples"} 7.0' in text
        assert 'kd_client_queries_total{client="id:alice",kind="gradient_samples"} 3.0' in text
    finally:
        running.stop(grace=1)


def test_access_options_from_config_and_cli(cnn_spec: str, tmp_path: Path, records_file: Path) -> None:
    cfg_file = tmp_path / "serve.toml"
    cfg_file.write_text(
        f'[server]\nquery_budget = 100\n[[teacher]]\nname = "t"\nspec = "{cnn_spec}"\naccess = "scores"\n'
        f'records = "{records_file}"\n'
    )
    cfg = load_config(cfg_file)
    assert cfg.query_budget == 100 and cfg.teachers[0].options.access == "scores"
    with pytest.raises(ValueError, match="3 class_names for 10 classes"):
        start_server([load_teacher("t", cnn_spec)], options={"t": TeacherOptions(class_names=["a", "b", "c"])})
    with pytest.raises(ValueError, match="unknown access tier 'gray'"):
        start_server([load_teacher("t", cnn_spec)], options={"t": TeacherOptions(access="gray")})
    out = tmp_path / "r.safetensors"
    res = CliRunner().invoke(app, ["records", "--teacher", cnn_spec, "--out", str(out), "--layer", "logits",
                                   "--rank", "2"])  # fmt: skip
    assert res.exit_code == 0, res.output
    from safetensors.torch import load_file

    assert load_file(str(out))["logits/eigvecs"].shape == (10, 10, 2)
    res = CliRunner().invoke(app, ["records", "--teacher", cnn_spec, "--out", str(out), "--layer", "nope"])
    assert res.exit_code != 0 and "unknown layer" in res.output


def test_gradient_paths_do_not_disturb_concurrent_feature_requests(address, cnn: Teacher) -> None:
    """Infer's feature hooks and the VJP path run the same modules at once; each sees its own."""
    addr, _ = address
    x = images(6, 9)
    with torch.no_grad():
        ref = cnn.model.layer1(x)
    errors = []

    def grads() -> None:
        with TeacherClient(addr) as c:
            for _ in range(20):
                c.input_gradient("cnn", images(6, 1), {"logits": torch.ones(6, 10)})

    t = threading.Thread(target=grads)
    t.start()
    with TeacherClient(addr) as c:
        for _ in range(20):
            got = c.infer("cnn", x, logits=False, features=["layer1"])["feature/layer1"]
            if not torch.allclose(got, ref, atol=1e-5):
                errors.append(float((got - ref).abs().max()))
    t.join()
    assert not errors


def test_loss_through_the_service_matches_local_for_a_real_client_loss(address, cnn: Teacher) -> None:
    """A DAFL-like client loss (CE to the argmax + entropy of the mean) through Infer + InputGradient."""
    addr, _ = address
    x = images(8, 4)
    with TeacherClient(addr) as c:
        logits = c.infer("cnn", x)["logits"].requires_grad_(True)
        p = F.softmax(logits, 1).mean(0)
        loss = F.cross_entropy(logits, logits.argmax(1)) + (p * p.log()).sum()
        (g,) = torch.autograd.grad(loss, logits)
        grad, _ = c.input_gradient("cnn", x, {"logits": g})
    xl = x.clone().requires_grad_(True)
    lo = cnn.model(xl)
    pl = F.softmax(lo, 1).mean(0)
    (F.cross_entropy(lo, lo.argmax(1)) + (pl * pl.log()).sum()).backward()
    torch.testing.assert_close(grad, xl.grad, rtol=1e-4, atol=1e-6)


def test_input_gradient_batchers_of_idle_layer_sets_are_retired(cnn: Teacher) -> None:
    """Each set of feature layers with an upstream gradient has its batcher; at most
    ``MAX_VJP_BATCHERS`` at once (2 here). A new set retires the least recently used one that no
    call holds; only when every one is held is a new set refused. (They were never retired: the
    first 16 sets anyone asked locked every later new set out, logits alone included.)"""
    running = start_server([cnn], options={"cnn": TeacherOptions(max_queue_delay_us=0, warmup=False)})
    ep = running.endpoints["cnn"]
    ep.MAX_VJP_BATCHERS = 2
    x, g = images(2), torch.randn(2, 10)
    feats = {name: torch.randn(2, *cnn.layers[name], generator=torch.Generator().manual_seed(i))
             for i, name in enumerate(("layer1", "layer2"))}  # fmt: skip
    a, b, both, none = frozenset({"layer1"}), frozenset({"layer2"}), frozenset({"layer1", "layer2"}), frozenset()

    def ask(c: TeacherClient, layers: frozenset) -> torch.Tensor:
        return c.input_gradient("cnn", x, {"logits": g, **{f"feature/{n}": feats[n] for n in layers}})[0]

    try:
        with TeacherClient(f"127.0.0.1:{running.port}", timeout=30) as c:
            ask(c, a)
            ask(c, b)
            assert set(ep.vjp_batchers) == {a, b}
            with ep.vjp_batcher(a):  # a call holds a's batcher
                ask(c, both)  # retires b, the idle one, though a is older
                assert set(ep.vjp_batchers) == {a, both}
                with ep.vjp_batcher(both):
                    with pytest.raises(TeacherRequestError) as err:  # every batcher held: refused
                        ask(c, none)
                    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "at most 2" in err.value.message
                ask(c, none)  # both is idle again: retired
                assert set(ep.vjp_batchers) == {a, none}
            got = ask(c, b)  # a retired set comes back, answering as before
            assert set(ep.vjp_batchers) == {none, b}
        torch.testing.assert_close(got, local_vjp(cnn, x, g, "layer2", feats["layer2"]), rtol=1e-4, atol=1e-5)
        assert running.accepted() == (5, 0)  # the retired batchers' requests still count (3 of the 5)
    finally:
        running.stop(grace=1)
