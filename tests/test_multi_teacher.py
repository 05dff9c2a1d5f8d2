"""Several teachers combined into one soft-target source (student_trainer.multi).

Each combiner is checked against an independent float64 computation written here
(numpy, explicit loops), plus properties: identities, weights in the simplex,
CA-MKD favouring the teacher that is right, AE-KD's weights minimising the
combined gradient's norm (against a brute-force grid), refusal of teachers with
different class counts, and training end to end from two real sources.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from kd.core.data import load_dataset
from kd.core.targets import SparseTargets
from kd.models import digits_student, digits_teacher
from kd.student_trainer.losses.kd import kd_loss
from kd.student_trainer.multi import COMBINERS, MultiTeacherSource, ae_kd, get_combiner, min_norm_weights, mixture
from kd.student_trainer.sources import Batch, LocalSource, ServerSource, SoftTargetSource
from kd.student_trainer.train import TrainConfig, seed_everything, train_student
from kd.teacher_server.loading import Teacher, load_teacher

# ---------------------------------------------------------------- references (float64, numpy)


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def ref_mixture_logits(z: np.ndarray, w: np.ndarray, t: float) -> np.ndarray:
    """z [K, B, C], w [B, K] -> T * log(sum_k w[b,k] softmax(z_k[b]/T))."""
    k, b, c = z.shape
    out = np.zeros((b, c))
    for i in range(b):
        p = np.zeros(c)
        for j in range(k):
            p += w[i, j] * np_softmax(z[j, i] / t)
        out[i] = t * np.log(p)
    return out


def ref_ce(z: np.ndarray, y: int) -> float:
    return float(-(z[y] - z.max() - np.log(np.exp(z - z.max()).sum())))


def logits(k: int, b: int = 6, c: int = 7, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(k, b, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def same_distribution(a: torch.Tensor, b: torch.Tensor, t: float) -> None:
    torch.testing.assert_close(torch.softmax(a / t, 1), torch.softmax(b / t, 1), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- combiners vs references


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_mean_probs_matches_reference_and_is_the_mixture_at_t(t: float) -> None:
    z = logits(3)
    out, w = get_combiner("mean-probs")(z, temperature=t)
    ref = ref_mixture_logits(z.numpy(), np.full((6, 3), 1 / 3), t)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(torch.softmax(out / t, 1).numpy(), np_softmax(z.numpy() / t).mean(0), atol=1e-12)
    assert torch.allclose(w, torch.full((6, 3), 1 / 3, dtype=torch.float64))
    assert COMBINERS["mean"] is COMBINERS["mean-probs"]


def test_mean_logits_matches_reference() -> None:
    z = logits(4)
    out, _ = get_combiner("mean-logits")(z)
    np.testing.assert_allclose(out.numpy(), z.numpy().sum(0) / 4, rtol=1e-12, atol=1e-12)


def test_weighted_matches_reference_in_both_spaces_and_checks_its_weights() -> None:
    z = logits(3)
    a = [2.0, 1.0, 1.0]
    out, w = get_combiner("weighted")(z, weights=a, temperature=2.0)
    wn = np.array(a) / 4
    np.testing.assert_allclose(out.numpy(), ref_mixture_logits(z.numpy(), np.tile(wn, (6, 1)), 2.0), atol=1e-10)
    np.testing.assert_allclose(w.sum(1).numpy(), 1.0)
    out_l, _ = get_combiner("weighted")(z, weights=a, space="logits")
    np.testing.assert_allclose(out_l.numpy(), np.tensordot(wn, z.numpy(), axes=1), atol=1e-12)
    with pytest.raises(ValueError, match="2 weight"):
        get_combiner("weighted")(z, weights=[1.0, 1.0])
    with pytest.raises(ValueError, match=">= 0"):
        get_combiner("weighted")(z, weights=[1.0, -1.0, 1.0])


@pytest.mark.parametrize("k", [2, 3, 4])
def test_confidence_matches_ca_mkd_reference(k: int) -> None:
    z = logits(k, seed=k)
    y = torch.randint(0, 7, (6,), generator=torch.Generator().manual_seed(1))
    out, w = get_combiner("confidence")(z, labels=y, temperature=4.0)
    zn = z.numpy()
    ref_w = np.zeros((6, k))
    for b in range(6):
        ce = np.array([ref_ce(zn[j, b], int(y[b])) for j in range(k)])
        ref_w[b] = (1.0 - np.exp(ce) / np.exp(ce).sum()) / (k - 1)
    np.testing.assert_allclose(w.numpy(), ref_w, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(w.sum(1).numpy(), 1.0, atol=1e-12)
    np.testing.assert_allclose(out.numpy(), ref_mixture_logits(zn, ref_w, 4.0), atol=1e-10)


def test_confidence_favours_the_teacher_with_the_lower_ce_on_the_label() -> None:
    y = torch.tensor([0, 1, 2])
    right = torch.full((3, 4), -2.0, dtype=torch.float64)
    right[torch.arange(3), y] = 3.0  # confident and right
    wrong = torch.full((3, 4), -2.0, dtype=torch.float64)
    wrong[torch.arange(3), 3] = 3.0  # confident and wrong
    _, w = get_combiner("confidence")(torch.stack([wrong, right]), labels=y)
    assert (w[:, 1] > w[:, 0]).all() and (w[:, 1] > 0.9).all()


def brute_force_min_norm(vecs: np.ndarray, cap: float, steps: int) -> float:
    """min over a grid of the capped simplex of |sum_k a_k v_k|^2."""
    k = vecs.shape[0]
    best = np.inf
    grid = np.linspace(0.0, 1.0, steps + 1)
    for head in itertools.product(grid, repeat=k - 1):
        last = 1.0 - sum(head)
        a = np.array([*head, last])
        if last < -1e-12 or (a > cap + 1e-12).any():
            continue
        best = min(best, float(np.sum((a @ vecs) ** 2)))
    return best


@pytest.mark.parametrize("k,cap,space", [(2, 1.0, "mean"), (2, 0.6, "flat"), (3, 1.0, "mean"), (3, 0.6, "flat"),
                                         (3, 0.4, "mean")])  # fmt: skip
def test_ae_kd_weights_are_in_the_simplex_and_minimise_the_gradient_norm(k: int, cap: float, space: str) -> None:
    t = 4.0
    z = logits(k, b=5, c=6, seed=10 + k)
    zs = torch.randn(5, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out, w = ae_kd(z, student_logits=zs, temperature=t, tolerance=cap, space=space)
    a = w[0].numpy()
    assert np.allclose(w.numpy(), a[None])  # one weight vector per batch
    assert (a >= -1e-12).all() and abs(a.sum() - 1) < 1e-12 and (a <= cap + 1e-9).all()
    # Independent gradient vectors: d/dz_s [T^2 KL(p_k || p_s)] / T = p_s - p_k per sample.
    g = np.stack([np_softmax(zs.numpy() / t) - np_softmax(z.numpy()[j] / t) for j in range(k)])  # [K, B, C]
    vecs = g.mean(axis=1) if space == "mean" else g.reshape(k, -1)
    ours = float(np.sum((a @ vecs) ** 2))
    grid = brute_force_min_norm(vecs, cap, steps=400 if k == 2 else 100)
    assert ours <= grid + 1e-12, (ours, grid)
    assert ours >= grid - 0.05 * grid - 1e-9  # the grid is close to the optimum too: no degenerate objective
    np.testing.assert_allclose(out.numpy(), ref_mixture_logits(z.numpy(), np.tile(a, (5, 1)), t), atol=1e-10)


def test_min_norm_solver_known_answers() -> None:
    # Two opposite gradients: the min-norm point is their midpoint (norm 0).
    v = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(min_norm_weights(v @ v.T), torch.tensor([0.5, 0.5], dtype=torch.float64))
    # A zero gradient among others takes all the weight unless capped.
    v3 = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(min_norm_weights(v3 @ v3.T), torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    a = min_norm_weights(v3 @ v3.T, cap=0.5)
    assert abs(float(a[1]) - 0.5) < 1e-9 and abs(float(a.sum()) - 1) < 1e-12
    # cap below 1/K means equal weights (as the reference code's nu clamp).
    torch.testing.assert_close(min_norm_weights(v3 @ v3.T, cap=0.1), torch.full((3,), 1 / 3, dtype=torch.float64))


def test_min_norm_solver_on_random_problems() -> None:
    """K = 3: the exact (face enumeration) solver against a fine grid; K = 5: Frank-Wolfe + polish
    (forced with exact_up_to=0) against the exact solver."""
    rng = np.random.default_rng(0)
    grid = np.linspace(0.0, 1.0, 201)
    x, y = np.meshgrid(grid, grid)
    pts = np.stack([x.ravel(), y.ravel(), 1.0 - x.ravel() - y.ravel()], 1)
    for _ in range(60):
        v = rng.normal(size=(3, int(rng.integers(2, 6))))
        cap = float(rng.choice([1.0, 0.6, 0.45]))
        a = min_norm_weights(torch.from_numpy(v @ v.T), cap=cap).numpy()
        assert (a >= 0).all() and (a <= cap + 1e-12).all() and abs(a.sum() - 1) < 1e-12
        ok = (pts[:, 2] >= -1e-12) & (pts.max(1) <= cap + 1e-12)
        assert float(np.sum((a @ v) ** 2)) <= float((((pts[ok] @ v) ** 2).sum(1)).min()) + 1e-12
    for _ in range(20):
        v = torch.from_numpy(rng.normal(size=(5, 4)))
        g = v @ v.T
        exact, fw = min_norm_weights(g, cap=0.4), min_norm_weights(g, cap=0.4, exact_up_to=0)
        # Frank-Wolfe is approximate: documented, measured within ~1e-4 relative here.
        assert float(fw @ g @ fw) <= float(exact @ g @ exact) * (1 + 1e-3) + 1e-9
        assert float(exact @ g @ exact) <= float(fw @ g @ fw) + 1e-12


def test_1909_08097_is_the_ensemble_mean_of_probabilities() -> None:
    z = logits(3)
    a, _ = get_combiner("1909.08097")(z, temperature=3.0)
    b, _ = get_combiner("mean-probs")(z, temperature=3.0)
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- properties


def test_one_teacher_is_the_identity_for_mean_and_weighted() -> None:
    z = logits(1)
    for name, opts in [("mean-probs", {}), ("weighted", {"weights": [5.0]}), ("1909.08097", {})]:
        out, _ = get_combiner(name)(z, temperature=4.0, **opts)
        same_distribution(out, z[0], 4.0)
    out, _ = get_combiner("mean-logits")(z)
    torch.testing.assert_close(out, z[0])
    out, _ = get_combiner("weighted")(z, weights=[2.0], space="logits")
    torch.testing.assert_close(out, z[0])


def test_identical_teachers_give_that_teacher() -> None:
    z1 = logits(1)
    z = z1.expand(3, -1, -1).clone()
    y = torch.arange(6) % 7
    zs = torch.randn(6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    for name in sorted(COMBINERS):
        opts = {"weights": [1.0, 2.0, 3.0]} if name == "weighted" else {}
        if name != "mean-logits":
            opts["temperature"] = 2.0
        out, w = COMBINERS[name](z, labels=y, student_logits=zs, **opts)
        torch.testing.assert_close(w.sum(1), torch.ones(6, dtype=torch.float64))
        if name == "mean-logits":
            torch.testing.assert_close(out, z1[0])
        else:
            same_distribution(out, z1[0], 2.0)


def test_mixture_gives_the_papers_gradient() -> None:
    """KD against the mixture has the gradient of sum_k w_k KL(p_k || p_s) (weights constant)."""
    z = logits(3).float()
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    _, w = get_combiner("confidence")(z, labels=y)
    t = 4.0
    mixed = mixture(z, w, t)
    s1 = torch.randn(6, 7, generator=torch.Generator().manual_seed(5), requires_grad=True)
    s2 = s1.detach().clone().requires_grad_(True)
    kd_loss(s1, mixed, y, temperature=t, alpha=1.0).backward()
    per = [F.kl_div(F.log_softmax(s2 / t, 1), F.log_softmax(z[k] / t, 1), reduction="none", log_target=True).sum(1)
           for k in range(3)]  # fmt: skip
    (t**2 * (torch.stack(per, 1) * w).sum(1).mean()).backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- the source


class FakeSource(SoftTargetSource):
    name = "fake"

    def __init__(self, table: torch.Tensor, teacher_name: str = "t", fingerprint: str = "fp") -> None:
        self.table = table  # [N, C] logits by sample index
        self.num_classes = table.shape[1]
        self.teacher_name = teacher_name
        self.fingerprint = fingerprint

    def targets(self, indices, inputs, views=None):
        return self.table[indices]


def test_class_count_mismatch_is_refused_naming_each_source() -> None:
    a = FakeSource(torch.zeros(4, 10), "resnet", "aaaa")
    b = FakeSource(torch.zeros(4, 100), "vit", "bbbb")
    with pytest.raises(ValueError, match="number of classes") as e:
        MultiTeacherSource([a, b])
    assert "'resnet'" in str(e.value) and "10 classes" in str(e.value)
    assert "'vit'" in str(e.value) and "100 classes" in str(e.value)


def test_bad_options_are_refused() -> None:
    a, b = FakeSource(torch.zeros(4, 3)), FakeSource(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="unknown combiner"):
        MultiTeacherSource([a, b], "median")
    with pytest.raises(ValueError, match="no option"):
        MultiTeacherSource([a, b], "mean", weights=[1, 1])
    with pytest.raises(ValueError, match="needs option"):
        MultiTeacherSource([a, b], "weighted")
    with pytest.raises(ValueError, match="3 weight"):
        MultiTeacherSource([a, b], "weighted", weights=[1, 1, 1])
    with pytest.raises(ValueError, match="needs the student"):
        MultiTeacherSource([a, b], "ae-kd")


def test_source_combines_dense_and_topk_targets_and_needs_labels_for_confidence() -> None:
    gen = torch.Generator().manual_seed(0)
    ta, tb = torch.randn(20, 5, generator=gen) * 3, torch.randn(20, 5, generator=gen) * 3
    multi = MultiTeacherSource([FakeSource(ta), FakeSource(tb)], "mean", temperature=2.0)
    idx = torch.tensor([3, 1, 4, 1, 5])
    out = multi.targets(idx, torch.zeros(5, 1))
    assert out.dtype == torch.float32 and out.shape == (5, 5)
    ref = ref_mixture_logits(torch.stack([ta[idx], tb[idx]]).double().numpy(), np.full((5, 2), 0.5), 2.0)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5)

    conf = MultiTeacherSource([FakeSource(ta), FakeSource(tb)], "confidence")
    with pytest.raises(ValueError, match="needs the batch's labels"):
        conf.targets(idx, torch.zeros(5, 1))
    y = torch.tensor([0, 1, 2, 3, 4])
    direct = conf.targets(idx, torch.zeros(5, 1), labels=y)
    ((b, streamed),) = list(conf.iter_targets([Batch(idx, torch.zeros(5, 1), y)]))
    torch.testing.assert_close(direct, streamed)

    class TopK(FakeSource):
        def targets(self, indices, inputs, views=None):
            z = self.table[indices]
            v, i = z.topk(5, dim=1)
            return SparseTargets("topk", i, v, torch.logsumexp(z, 1), 5)

    sparse = MultiTeacherSource([TopK(ta), FakeSource(tb)], "mean", temperature=2.0)
    torch.testing.assert_close(sparse.targets(idx, torch.zeros(5, 1)), out, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory: pytest.TempPathFactory) -> Teacher:
    torch.manual_seed(4321)
    path = tmp_path_factory.mktemp("teacher-b") / "b.safetensors"
    save_file({k: v.contiguous() for k, v in digits_teacher().state_dict().items()}, str(path))
    return load_teacher("digits-b", f"kd.models:digits_teacher@{path}")


def test_two_real_sources_train_a_student(address: str, teacher: Teacher, other_teacher: Teacher, digits) -> None:
    train, test = digits
    assert other_teacher.fingerprint != teacher.fingerprint
    subset = torch.randperm(len(train), generator=torch.Generator().manual_seed(3))[:128]
    cfg = TrainConfig(method="kd", epochs=2, seed=7, batch_size=32)

    # A server (over the real gRPC stream) and a local teacher, combined by each combiner.
    server, local_b = ServerSource(address), LocalSource(other_teacher)
    try:
        idx = subset[:40]
        x, y = train.inputs[idx], train.labels[idx]
        both_local = MultiTeacherSource([LocalSource(teacher), local_b], "confidence", temperature=4.0)
        via_server = MultiTeacherSource([server, local_b], "confidence", temperature=4.0)
        torch.testing.assert_close(
            via_server.targets(idx, x, labels=y), both_local.targets(idx, x, labels=y), rtol=1e-5, atol=1e-5
        )
        for name, opts in [("mean", {}), ("confidence", {}), ("weighted", {"weights": [3.0, 1.0]}), ("ae-kd", {})]:
            seed_everything(7)
            student = digits_student()
            extra = {"student": student} if name == "ae-kd" else {}
            multi = MultiTeacherSource([server, local_b], name, temperature=4.0, **opts, **extra)
            r = train_student(student, train, test, cfg, source=multi, subset=subset)
            assert len(r.acc_per_epoch) == 2 and all(np.isfinite(r.loss_per_epoch)) and r.loss_per_epoch[0] > 0
            w = multi.last_weights
            assert w is not None and torch.allclose(w.sum(1), torch.ones(len(w), dtype=w.dtype), atol=1e-6)
    finally:
        server.close()

    # Same seed, same teachers: the combined source is as reproducible as a single one.
    states = []
    for _ in range(2):
        seed_everything(7)
        s = digits_student()
        multi = MultiTeacherSource([LocalSource(teacher), LocalSource(other_teacher)], "mean")
        train_student(s, train, test, cfg, source=multi, subset=subset)
        states.append(s.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k])


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory, teacher_spec: str) -> dict[str, str]:
    """The digits teacher precomputed with a dense, a top-k, a sampled and a random-subset codec."""
    from typer.testing import CliRunner

    from kd.cli import app

    root, out = tmp_path_factory.mktemp("multi-caches"), {}
    for codec in ("fp16", "topk:3", "sample:4", "rand:3"):
        out[codec] = str(root / codec.replace(":", "-"))
        r = CliRunner().invoke(app, ["precompute", "--source", f"local:{teacher_spec}", "--codec", codec,
                                     "--out", out[codec]])  # fmt: skip
        assert r.exit_code == 0, r.output
    return out


@pytest.mark.parametrize("codec", ["sample:4", "rand:3"])
def test_a_sampled_or_subset_member_is_refused_up_front_naming_it(caches: dict[str, str], codec: str,
                                                                 tmp_path) -> None:  # fmt: skip
    """Their targets have no dense form to combine: the mixture failed at its first batch ("#1 ... gives
    sampled (sample) targets"), after kd train had set up its run; now refused when the source is made,
    naming the member (its place, cache and codec), and kd train refuses before its run directory."""
    from cli_checks import refused
    from typer.testing import CliRunner

    from kd.cli import app
    from kd.student_trainer.sources import CacheSource

    train = load_dataset("digits", "train")
    members = [CacheSource(caches[c], dataset_id=train.dataset_id) for c in ("fp16", "topk:3", codec)]
    try:
        with pytest.raises(ValueError, match=rf"^#2 cache .*: cache {caches[codec]!r}: {codec} gives sparse targets"):
            MultiTeacherSource(members, "mean", temperature=1.0)
        # dense and top-k members combine (as the targets of the first batch show)
        both = MultiTeacherSource(members[:2], "mean", temperature=1.0)
        assert both.targets(torch.arange(4), torch.zeros(4, 64)).shape == (4, 10)
    finally:
        for m in members:
            m.close()
    run = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "--source", f"cache:{caches['fp16']}", "--source", f"cache:{caches[codec]}",
                                 "--epochs", "1", "--run-dir", str(run)])  # fmt: skip
    refused(r, "#1 cache 'local' (", f"cache {caches[codec]!r}: {codec} gives sparse targets",
            "no dense form to combine")  # fmt: skip
    assert not run.exists()
