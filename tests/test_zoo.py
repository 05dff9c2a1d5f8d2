"""The CIFAR student zoo: shapes, published parameter counts, stages, loading as a teacher."""

from __future__ import annotations

import pytest
import torch

from student_trainer import zoo
from teacher_server.loading import load_teacher

# Parameter counts at 100 classes, counted from modules that follow the RepDistiller
# (CRD) definitions layer for layer; the CRD paper/mdistiller tables round them to
# 1.23M, 7.43M, 0.70M, 2.26M, 0.95M, 1.36M, 0.81M.
PARAMS = {
    "resnet8x4": (1_233_540, 1.23e6),
    "resnet32x4": (7_433_860, 7.43e6),
    "wrn_16_2": (703_284, 0.70e6),
    "wrn_40_2": (2_255_156, 2.26e6),
    "shufflenet_v1": (949_258, 0.95e6),
    "shufflenet_v2": (1_355_528, 1.36e6),
    "mobilenet_v2": (812_836, 0.81e6),
}

# One parameter name per model as the reference code spells it, so CRD/mdistiller
# checkpoints load with strict=True.
REFERENCE_KEYS = {
    "resnet8x4": "layer2.0.downsample.0.weight",
    "resnet32x4": "layer3.4.conv2.weight",
    "wrn_16_2": "block2.layer.0.convShortcut.weight",
    "wrn_40_2": "block3.layer.5.bn2.running_var",
    "shufflenet_v1": "layer3.3.conv3.weight",
    "shufflenet_v2": "layer2.0.conv5.weight",
    "mobilenet_v2": "blocks.6.0.conv.7.weight",
}

NAMES = list(zoo.ZOO)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Batches of 2 gain nothing from intra-op threads, and on a busy CPU OpenMP spin-waits
    make them many times slower; restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_registry_covers_the_zoo():
    assert set(zoo.ZOO) == set(PARAMS)
    for name, factory in zoo.ZOO.items():
        assert getattr(zoo, name) is factory
        assert factory.input_shape == (3, 32, 32)
        assert factory.__doc__


@pytest.fixture(scope="module", params=NAMES)
def built(request):
    torch.manual_seed(0)
    return request.param, zoo.ZOO[request.param]()


def test_parameter_count_and_reference_names(built):
    name, model = built
    exact, published = PARAMS[name]
    n = sum(p.numel() for p in model.parameters())
    assert n == exact
    assert abs(n - published) / published < 0.01
    assert REFERENCE_KEYS[name] in model.state_dict()
    modules = dict(model.named_modules())
    assert len(model.stages) >= 3
    for stage in model.stages:
        assert stage in modules, stage


def test_forward_shape_and_stages(built):
    name, model = built
    assert model.input_shape == (3, 32, 32)
    shapes: dict[str, tuple[int, ...]] = {}
    modules = dict(model.named_modules())
    handles = [
        modules[s].register_forward_hook(lambda _m, _i, out, s=s: shapes.__setitem__(s, tuple(out.shape)))
        for s in model.stages
    ]
    model.eval()
    try:
        with torch.inference_mode():
            out = model(torch.randn(2, 3, 32, 32))
    finally:
        for h in handles:
            h.remove()
    assert out.shape == (2, 100)
    assert torch.isfinite(out).all()
    sides = [shapes[s][-1] for s in model.stages]
    assert all(len(shapes[s]) == 4 for s in model.stages)
    assert sides == sorted(sides, reverse=True)  # stages go from fine to coarse
    assert sides[-1] in (8, 4, 2)


@pytest.mark.parametrize("name", NAMES)
def test_ten_classes_train_step(name):
    torch.manual_seed(0)
    model = zoo.ZOO[name](num_classes=10).train()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    torch.nn.functional.cross_entropy(out, torch.tensor([0, 1])).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", NAMES)
def test_loads_as_teacher(name):
    t = load_teacher("x", f"student_trainer.zoo:{name}")
    assert t.input_shape == (3, 32, 32)
    assert t.num_classes == 100
    assert not t.model.training
    for stage in t.model.stages:
        assert len(t.layers[stage]) == 3  # C, H, W feature maps


def test_loads_weights_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    src = zoo.resnet8x4().eval()
    path = tmp_path / "r8x4.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    t = load_teacher("x", f"student_trainer.zoo:resnet8x4@{path}")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(t.model(x), src(x))
    assert t.layers["layer3"] == (256, 8, 8)
