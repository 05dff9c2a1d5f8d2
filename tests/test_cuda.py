"""The CUDA path of the server and the trainer. Skipped where no GPU is present
(CI and most machines); run on a GPU node with `pytest tests/test_cuda.py`."""

from __future__ import annotations

import math

import pytest
import torch

from kd.core.data import load_dataset
from kd.models import digits_student
from kd.student_trainer.sources import LocalSource
from kd.student_trainer.train import TrainConfig, seed_everything, train_student
from kd.teacher_server.client import TeacherClient
from kd.teacher_server.loading import load_teacher
from kd.teacher_server.server import TeacherOptions, start_server

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize(
    ("amp", "channels_last", "tol"), [("fp32", False, 1e-4), ("bf16", True, 5e-2), ("fp16", True, 1e-2)]
)
def test_served_on_cuda_matches_cpu(amp: str, channels_last: bool, tol: float) -> None:
    torch.manual_seed(0)
    cpu = load_teacher("cnn", "kd.models:digits_cnn")
    gpu = load_teacher("cnn", "kd.models:digits_cnn", device="cuda")
    gpu.model.load_state_dict(cpu.model.state_dict())
    running = start_server(
        [gpu], port=0, options={"cnn": TeacherOptions(amp=amp, channels_last=channels_last, max_batch_size=64)}
    )
    try:
        x = torch.rand(100, 1, 8, 8)
        with TeacherClient(f"127.0.0.1:{running.port}") as c:
            out = c.infer("cnn", x, features=["layer1", "layer2"], pool_features=True)
            streamed = torch.cat(
                [o["logits"] for _, o in c.infer_stream("cnn", [(i, x[i : i + 7]) for i in range(0, 100, 7)])]
            )
        with torch.inference_mode():
            ref = cpu.model(x)
            feat = cpu.model.layer2(cpu.model.layer1(x)).mean(dim=(2, 3))
        torch.testing.assert_close(out["logits"], ref, rtol=tol, atol=tol)
        torch.testing.assert_close(streamed, ref, rtol=tol, atol=tol)
        torch.testing.assert_close(out["feature/layer2"], feat, rtol=tol, atol=tol)
        assert out["feature/layer1"].shape == (100, 32)
        assert running.endpoints["cnn"].teacher.device.type == "cuda"
    finally:
        running.stop(grace=1)


def test_local_source_and_training_on_cuda() -> None:
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    teacher = load_teacher("t", "kd.models:digits_teacher", device="cuda")
    src = LocalSource(teacher)
    idx = torch.arange(50)
    with torch.inference_mode():
        ref = teacher.model.cpu()(train.inputs[idx])
    teacher.model.cuda()
    torch.testing.assert_close(src.targets(idx, train.inputs[idx]), ref, rtol=1e-4, atol=1e-4)
    seed_everything(0)
    student = digits_student()
    r = train_student(student, train, test, TrainConfig(method="kd", epochs=3, device="cuda"), source=src)
    assert len(r.acc_per_epoch) == 3 and next(student.parameters()).device.type == "cuda"
    assert r.test_acc > 0.2


def test_every_method_runs_on_cuda_and_matches_cpu() -> None:
    from kd.student_trainer.losses import METHODS

    g = torch.Generator().manual_seed(0)
    zs = torch.randn(16, 10, generator=g) * 3
    zt = torch.randn(16, 10, generator=g) * 3
    y = torch.randint(0, 10, (16,), generator=g)
    for name, method in sorted(METHODS.items()):
        if method.kind == "feature":  # see test_every_feature_method_trains_on_cuda
            continue
        opts = {"seed": 0} if "seed" in method.defaults else {}
        out = {}
        for dev in ("cpu", "cuda"):
            s = zs.clone().to(dev).requires_grad_(True)
            t = None if not method.needs_teacher else zt.to(dev)
            loss = method(s, t, y.to(dev), epoch=3, epochs=10, **opts)
            loss.backward()
            out[dev] = (loss.detach().cpu(), s.grad.cpu())
        if name == "noisy":  # the noise is drawn on each device's own generator: compare shapes only
            assert torch.isfinite(out["cuda"][0]) and out["cuda"][1].shape == zs.shape
            continue
        torch.testing.assert_close(out["cuda"][0], out["cpu"][0], rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(out["cuda"][1], out["cpu"][1], rtol=1e-4, atol=1e-5, msg=name)


def test_every_feature_method_trains_on_cuda(tmp_path) -> None:
    """Each feature method's loop (hooks, connectors, reductions) on a CUDA student and teacher."""
    from kd.bench.methods import FEATURE_MATCHES
    from kd.core.data import load_dataset
    from kd.models import digits_cnn, digits_cnn_student
    from kd.student_trainer.losses import METHODS
    from kd.student_trainer.sources import LocalSource
    from kd.student_trainer.train import TrainConfig, seed_everything, train_student
    from kd.teacher_server.loading import load_teacher, save_weights

    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    seed_everything(0)
    path = save_weights(digits_cnn(), tmp_path / "cnn.safetensors")
    teacher = load_teacher("cnn", f"kd.models:digits_cnn@{path}", device="cuda")
    for name, method in sorted(METHODS.items()):
        if method.kind != "feature":
            continue
        seed_everything(0)
        student = digits_cnn_student()
        config = TrainConfig(method=name, matches=list(FEATURE_MATCHES[name]), epochs=1, device="cuda")
        res = train_student(student, train, test, config, source=LocalSource(teacher), subset=torch.arange(64))
        assert all(math.isfinite(v) for v in res.loss_per_epoch), name
        assert next(student.parameters()).device.type == "cuda", name


def test_outputs_made_on_cuda_through_pinned_buffers_equal_cpus() -> None:
    """Top-k, log-sum-exp at T, probabilities, labels and reduced features are made on the
    GPU (kd.teacher_server.outputs) and copied back through reused pinned buffers; they equal
    the CPU server's. Two instances on the one GPU serve the same answers."""
    from kd.teacher_server.runner import HostStaging

    torch.manual_seed(0)
    cpu = load_teacher("cnn", "kd.models:digits_cnn")
    gpu = load_teacher("cnn", "kd.models:digits_cnn", device="cuda")
    gpu.model.load_state_dict(cpu.model.state_dict())
    servers = [start_server([t], port=0, options={"cnn": TeacherOptions(max_batch_size=16, instances=n)})
               for t, n in ((cpu, 1), (gpu, 2))]  # fmt: skip
    try:
        x = torch.rand(40, 1, 8, 8)
        asked = dict(logits=False, top_k=5, sparse_temperature=4.0, temperature=2.0, labels=True,
                     features=["layer1@at", "layer2"], pool_features=True)  # fmt: skip
        outs = []
        for s in servers:
            with TeacherClient(f"127.0.0.1:{s.port}") as c:
                outs.append(c.infer("cnn", x, **asked))
        want, got = outs
        assert set(got) == set(want) == {"topk_values", "topk_indices", "logsumexp", "probs", "labels",
                                         "feature/layer1@at", "feature/layer2"}  # fmt: skip
        assert torch.equal(got["topk_indices"], want["topk_indices"]) and torch.equal(got["labels"], want["labels"])
        for key in want:
            torch.testing.assert_close(got[key].float(), want[key].float(), rtol=1e-4, atol=1e-4)
        runner = servers[1].endpoints["cnn"].batcher.runners[0]
        assert runner.staging.pin and runner.staging.allocated >= 1
    finally:
        for s in servers:
            s.stop(grace=1)
    staging = HostStaging(pin=True)
    y = torch.randn(1000, device="cuda")
    first = staging.copy_out({"y": y})
    assert first["y"].is_pinned() and torch.equal(first["y"], y.cpu())
    del first
    staging.copy_out({"y": y[:10]})
    assert staging.reused == 1 and staging.allocated == 1


def test_resuming_a_dropout_student_on_cuda_continues_the_cuda_generator(tmp_path) -> None:
    """Dropout on CUDA draws from the device's generator, which checkpoints did not hold: a run stopped
    mid-epoch and resumed (seed_everything reseeds it) drew other masks than the uninterrupted run. The
    checkpoint's ``cuda_rng`` restores it; the resumed run ends with the uninterrupted run's weights
    (the same kernels on the same device; without the generator the weights differ by ~1e-2)."""
    from kd.models import MLP
    from kd.student_trainer.train import load_checkpoint

    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    config = TrainConfig(method="ce", epochs=2, batch_size=16, device="cuda")  # 6 steps an epoch
    sub = torch.arange(96)

    def student() -> torch.nn.Module:
        seed_everything(0)
        return MLP([64, 64, 10], dropout=0.5)

    whole = student()
    train_student(whole, train, test, config, subset=sub)
    part, run, calls = student(), tmp_path / "run", iter(range(100))
    train_student(part, train, test, config, subset=sub, run_dir=run, stop=lambda: 15 if next(calls) == 8 else None)
    assert len(load_checkpoint(run / "checkpoint.pt")["cuda_rng"]) == torch.cuda.device_count()
    resumed = student()
    train_student(resumed, train, test, config, subset=sub, run_dir=run, resume=True)
    for a, b in zip(resumed.state_dict().values(), whole.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def teacher_lm() -> torch.nn.Module:
    from tiny_lm import BigramLM

    torch.manual_seed(41)
    return BigramLM(16, 3.0)


def student_lm() -> torch.nn.Module:
    from tiny_lm import BigramLM

    torch.manual_seed(42)
    return BigramLM(8, 1.0)


def lm_losses(corpus: str, device: str, topk: int) -> list[float]:
    """``train_tokens`` of a student on ``device`` from a token teacher served on ``device``
    (full logits, or the top-k at T = 2 made next to the model: [batch, seq, vocab] outputs)."""
    from kd.core.data import open_source
    from kd.student_trainer.sources import ServerSource
    from kd.student_trainer.train import train_tokens

    running = start_server(
        [load_teacher("lm", f"{__name__}:teacher_lm", device=device)],
        batching=TeacherOptions(max_batch_tokens=512, max_batch_size=8, warmup=False),
    )
    try:
        with ServerSource(f"127.0.0.1:{running.port}", "lm", topk=topk, temperature=2.0) as source:
            return train_tokens(student_lm(), open_source(corpus), source, method="token-fkl", epochs=2,
                                batch_size=4, lr=0.03, seed=5, method_options={"temperature": 2.0},
                                device=device)  # fmt: skip
    finally:
        running.stop(grace=1)


@pytest.mark.parametrize("topk", [0, 8])
def test_a_token_teacher_served_on_cuda_trains_a_cuda_student_as_the_cpu_does(tmp_path, topk: int) -> None:
    text = tmp_path / "train.txt"
    text.write_text("\n".join(f"line {i}: the cat sat on the mat"[: 9 + 2 * i] for i in range(12)) + "\n")
    corpus = f"text:{text}?doc=line&pack=0&block=32"
    cpu, gpu = lm_losses(corpus, "cpu", topk), lm_losses(corpus, "cuda", topk)
    assert len(gpu) == 2
    assert gpu == pytest.approx(cpu, rel=1e-4)  # fp32 both; kernels sum in another order
