"""The CIFAR student zoo: shapes, published parameter counts, stages, loading as a teacher."""

from __future__ import annotations

import pytest
import torch

from kd.student_trainer import zoo
from kd.teacher_server.loading import load_teacher

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


def _moonshine_params(kind: str) -> int:
    """WRN-40-2's count with each block's two 3x3 convolutions swapped for Moonshine's cheap
    ones, counted by formula: G(g) = 9 cin cout / g + cout^2 (grouped + pointwise);
    B(b)G(g) = cin m + 2m + 9 m^2 / g + 2m + m cout with m = cout / b (1x1, BN, 3x3, BN, 1x1)."""
    b = int(kind[1:].split("G")[0]) if kind.startswith("B") else 0
    g = int(kind.split("G")[1]) if "G" in kind else 1

    def cheap(cin: int, cout: int) -> int:
        if b:
            m = cout // b
            return cin * m + 2 * m + 9 * m * m // g + 2 * m + m * cout
        return 9 * cin * cout // g + cout * cout

    total = PARAMS["wrn_40_2"][0]
    for cin, cout in ((16, 32), (32, 64), (64, 128)):
        for i in range(6):
            first = cin if i == 0 else cout
            total += cheap(first, cout) - 9 * first * cout + cheap(cout, cout) - 9 * cout * cout
    return total


# Moonshine students (no published counts to compare: the formula's count, twice).
for _name, _kind in (("moonshine_wrn_40_2_g4", "G4"), ("moonshine_wrn_40_2_b2", "B2"),
                     ("moonshine_wrn_40_2_b2g2", "B2G2")):  # fmt: skip
    PARAMS[_name] = (_moonshine_params(_kind), float(_moonshine_params(_kind)))
REFERENCE_KEYS |= {
    "moonshine_wrn_40_2_g4": "block3.layer.5.conv2.1.weight",
    "moonshine_wrn_40_2_b2": "block2.layer.0.conv1.4.running_mean",
    "moonshine_wrn_40_2_b2g2": "block1.layer.3.conv2.6.weight",
}

NAMES = list(zoo.ZOO)


def test_cheap_convolutions_are_what_moonshine_describes() -> None:
    g4 = zoo.cheap_conv(32, 64, 2, "G4")
    assert g4[0].groups == 4 and g4[0].stride == (2, 2) and g4[1].kernel_size == (1, 1)
    b2g2 = zoo.cheap_conv(32, 64, 1, "B2G2")
    assert [type(m).__name__ for m in b2g2] == ["Conv2d", "BatchNorm2d", "ReLU"] * 2 + ["Conv2d"]
    assert b2g2[0].out_channels == 32 and b2g2[3].groups == 2
    x = torch.randn(2, 32, 8, 8)
    assert g4(x).shape == (2, 64, 4, 4) and b2g2(x).shape == (2, 64, 8, 8)
    for bad in ("G3", "X2", "B2G5"):
        with pytest.raises(ValueError, match="split into|cheap convolution"):
            zoo.cheap_conv(32, 64, 1, bad)
    assert sum(p.numel() for p in zoo.moonshine_wrn_40_2_b2g2().parameters()) < 0.3 * PARAMS["wrn_40_2"][0]


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
    t = load_teacher("x", f"kd.student_trainer.zoo:{name}")
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
    t = load_teacher("x", f"kd.student_trainer.zoo:resnet8x4@{path}")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(t.model(x), src(x))
    assert t.layers["layer3"] == (256, 8, 8)


def test_attention_transfer_into_a_moonshine_student_stage_by_stage(tmp_path) -> None:
    """Moonshine's recipe: a WRN teacher, the same WRN with cheap convolutions as the student,
    AT on every stage (generated images: a shape-and-plumbing test)."""
    from kd.core.data import Dataset
    from kd.student_trainer.sources import LocalSource
    from kd.student_trainer.train import TrainConfig, train_student
    from kd.teacher_server.loading import save_weights

    torch.manual_seed(0)
    data = Dataset("noise", "train", torch.randn(16, 3, 32, 32), torch.randint(0, 100, (16,)), 100)
    path = save_weights(zoo.wrn_16_2(), tmp_path / "wrn.safetensors")
    teacher = load_teacher("wrn", f"kd.student_trainer.zoo:wrn_16_2@{path}")
    student = zoo.moonshine_wrn(16, 2, "G4")
    before = student.block1.layer[0].conv1[0].weight.detach().clone()
    matches = [f"{s}={s}" for s in student.stages]
    res = train_student(student, data, data, TrainConfig(method="at", matches=matches, epochs=1, batch_size=8),
                        source=LocalSource(teacher))  # fmt: skip
    assert torch.isfinite(torch.tensor(res.loss_per_epoch)).all()
    assert not torch.equal(before, student.block1.layer[0].conv1[0].weight)
