"""The CIFAR model zoo of the knowledge-distillation literature, at 3x32x32.

These are the students (and some teachers) of the CRD benchmark tables, so results
trained here compare with published numbers:

* Tian, Krishnan, Isola, "Contrastive Representation Distillation", ICLR 2020,
  code https://github.com/HobbitLong/RepDistiller (``models/``);
* Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022, code
  https://github.com/megvii-research/mdistiller (``mdistiller/models/cifar/``),
  which reuses the same CIFAR definitions.

The architectures below are re-implemented from those definitions (written anew,
not copied) and keep the same module names, so a plain ``state_dict`` of a
RepDistiller/mdistiller checkpoint loads with ``strict=True``. (Their files keep the
weights under a ``"model"`` key: save ``ckpt["model"]`` to safetensors first.)

Parameter counts at 100 classes, counted from these modules, which follow the
reference definitions layer for layer (published: CRD paper/mdistiller tables):

=================  ===========  =========  ==============================================
factory            parameters   published  reference definition
=================  ===========  =========  ==============================================
``resnet8x4``        1,233,540      1.23M  RepDistiller ``models/resnet.py`` resnet8x4
``resnet32x4``       7,433,860      7.43M  RepDistiller ``models/resnet.py`` resnet32x4
``wrn_16_2``           703,284      0.70M  RepDistiller ``models/wrn.py`` wrn_16_2
``wrn_40_2``         2,255,156      2.26M  RepDistiller ``models/wrn.py`` wrn_40_2
``shufflenet_v1``      949,258      0.95M  RepDistiller ``models/ShuffleNetv1.py`` ShuffleV1
``shufflenet_v2``    1,355,528      1.36M  RepDistiller ``models/ShuffleNetv2.py`` ShuffleV2
``mobilenet_v2``       812,836      0.81M  RepDistiller ``models/mobilenetv2.py`` mobile_half
=================  ===========  =========  ==============================================

Every factory is ``factory(num_classes=100) -> nn.Module``; the model has
``input_shape = (3, 32, 32)`` (so ``kd serve --teacher
t=kd.student_trainer.zoo:resnet8x4@weights.safetensors`` needs no ``?input_shape``) and
``stages``, the names of its feature stages for feature distillation (ask the server for
e.g. ``layer3``). Blocks return plain tensors: a stage's output is the feature CRD's
``is_feat=True, preact=False`` returns for it (after the ReLU for ResNet and ShuffleNet; WRN's
pre-activation blocks and MobileNetV2's linear bottlenecks end without one, as in the reference).

Small MLP/CNN models for the bundled ``digits`` data are in :mod:`kd.models`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ZOO",
    "mobilenet_v2",
    "moonshine_wrn",
    "resnet8x4",
    "resnet32x4",
    "shufflenet_v1",
    "shufflenet_v2",
    "wrn_16_2",
    "wrn_40_2",
]

INPUT_SHAPE = (3, 32, 32)


def _conv_bn_init(model: nn.Module) -> None:
    """He-normal (fan_out) convs, unit BN, zero biases: the init of the reference code."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- ResNet (CIFAR)


class _ResBlock(nn.Module):
    """Post-activation basic block: 3x3 conv-BN-ReLU, 3x3 conv-BN, add shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR: a 3x3 stem, three stages at 32/16/8 px, global pool, fc.

    Architecture of RepDistiller ``models/resnet.py`` (``ResNet``, BasicBlock), itself after
    He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.
    """

    input_shape = INPUT_SHAPE
    stages = ("layer1", "layer2", "layer3")

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        cin = widths[0]
        for i, (cout, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
            blocks = [_ResBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1) for j in range(n)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            cin = cout
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(cin, num_classes)
        _conv_bn_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def resnet8x4(num_classes: int = 100) -> nn.Module:
    """ResNet8x4 (CRD): depth 8, widths 32-64-128-256; 1,233,540 params at 100 classes (CRD: 1.23M)."""
    return CifarResNet(8, (32, 64, 128, 256), num_classes)


def resnet32x4(num_classes: int = 100) -> nn.Module:
    """ResNet32x4 (CRD): depth 32, widths 32-64-128-256; 7,433,860 params at 100 classes (CRD: 7.43M)."""
    return CifarResNet(32, (32, 64, 128, 256), num_classes)


# --------------------------------------------------------------------------- Wide ResNet


class _WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3, BN-ReLU-conv3x3; 1x1 conv shortcut when the shape changes.

    When the shape changes, the shortcut takes the pre-activated input (as in the reference)."""

    def __init__(self, cin: int, cout: int, stride: int, conv: str = "conv") -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = cheap_conv(cin, cout, stride, conv)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = cheap_conv(cout, cout, 1, conv)
        # Reference parameter name, kept so checkpoints load.
        self.convShortcut = None if cin == cout else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class _WideStage(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int, conv: str = "conv") -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[_WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, conv) for i in range(n)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-d-k for CIFAR: 3x3 stem (16 ch), three pre-activation stages of width 16k/32k/64k,
    final BN-ReLU, global pool, fc.

    Architecture of RepDistiller ``models/wrn.py`` (``WideResNet``, dropout 0), after Zagoruyko
    and Komodakis, "Wide Residual Networks", BMVC 2016. Stages are ``block1``..``block3`` (the
    reference names, so checkpoints load).
    """

    input_shape = INPUT_SHAPE
    stages = ("block1", "block2", "block3")

    def __init__(self, depth: int, widen: int, num_classes: int = 100, conv: str = "conv") -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.block1 = _WideStage(n, widths[0], widths[1], 1, conv)
        self.block2 = _WideStage(n, widths[1], widths[2], 2, conv)
        self.block3 = _WideStage(n, widths[2], widths[3], 2, conv)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], num_classes)
        _conv_bn_init(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def wrn_16_2(num_classes: int = 100) -> nn.Module:
    """WRN-16-2 (CRD): 703,284 params at 100 classes (CRD: 0.70M)."""
    return WideResNet(16, 2, num_classes)


def wrn_40_2(num_classes: int = 100) -> nn.Module:
    """WRN-40-2 (CRD): 2,255,156 params at 100 classes (CRD: 2.26M)."""
    return WideResNet(40, 2, num_classes)


# --------------------------------------------------------------------------- Moonshine


def cheap_conv(cin: int, cout: int, stride: int, kind: str = "conv") -> nn.Module:
    """A 3x3 convolution or one of Moonshine's cheap substitutes (Crowley, Gray, Storkey,
    "Moonshine: Distilling with Cheap Convolutions", NeurIPS 2018, Section 3):

    * ``conv``: the standard 3x3 convolution (the teacher's);
    * ``G<g>``: a grouped 3x3 convolution with g groups, then a 1x1 pointwise convolution
      so the groups mix (``G<C>`` is a depthwise-separable convolution);
    * ``B<b>``: a bottleneck: 1x1 to C_out/b channels, BN-ReLU, 3x3, BN-ReLU, 1x1 back to C_out;
    * ``B<b>G<g>``: the bottleneck with its 3x3 convolution grouped (the paper's BG blocks).
    """
    if kind == "conv":
        return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    import re

    m = re.fullmatch(r"(?:B(\d+))?(?:G(\d+))?", kind)
    if not m or not any(m.groups()):
        raise ValueError(f"cheap convolution {kind!r}: use conv, G<groups>, B<bottleneck> or B<b>G<g>")
    b, g = int(m.group(1) or 0), int(m.group(2) or 1)
    if b:
        mid = max(1, cout // b)
        if mid % g:
            raise ValueError(f"{kind}: the bottleneck's {mid} channels do not split into {g} groups")
        return nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=g, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, cout, 1, bias=False),
        )  # fmt: skip
    if cin % g or cout % g:
        raise ValueError(f"{kind}: {cin} -> {cout} channels do not split into {g} groups")
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, groups=g, bias=False), nn.Conv2d(cout, cout, 1, bias=False))


def moonshine_wrn(depth: int = 40, widen: int = 2, conv: str = "G4", num_classes: int = 100) -> nn.Module:
    """A Moonshine student: WRN-d-k with every block convolution replaced by ``cheap_conv(conv)``,
    same stages (``block1``..``block3``) as the WRN teacher, so attention transfer matches
    them stage by stage (``kd train --method at --match block1=block1 ...``)."""
    return WideResNet(depth, widen, num_classes, conv=conv)


def moonshine_wrn_40_2_g4(num_classes: int = 100) -> nn.Module:
    """WRN-40-2 with G(4) blocks (grouped 3x3 with 4 groups + pointwise)."""
    return moonshine_wrn(40, 2, "G4", num_classes)


def moonshine_wrn_40_2_b2(num_classes: int = 100) -> nn.Module:
    """WRN-40-2 with B(2) bottleneck blocks."""
    return moonshine_wrn(40, 2, "B2", num_classes)


def moonshine_wrn_40_2_b2g2(num_classes: int = 100) -> nn.Module:
    """WRN-40-2 with BG(2, 2) blocks (bottleneck 2, grouped middle conv with 2 groups)."""
    return moonshine_wrn(40, 2, "B2G2", num_classes)


# --------------------------------------------------------------------------- ShuffleNet


def _channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class _ChannelShuffle(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _channel_shuffle(x, self.groups)


class _ShuffleV1Unit(nn.Module):
    """ShuffleNet v1 unit: grouped 1x1 (bottleneck = out/4), shuffle, depthwise 3x3, grouped 1x1.

    Stride 2 concatenates a 3x3 avg-pooled shortcut, stride 1 adds the identity. The first
    1x1 of the network (on the 24-channel stem) is not grouped."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid = cout // 4
        g1 = 1 if cin == 24 else groups
        self.conv1 = nn.Conv2d(cin, mid, 1, groups=g1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.shuffle1 = _ChannelShuffle(g1)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, 2, 1)) if stride == 2 else nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shuffle1(F.relu(self.bn1(self.conv1(x))))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return F.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNetV1(nn.Module):
    """ShuffleNet v1 for CIFAR (CRD's ``ShuffleV1``: g=3, widths 240/480/960, 4/8/4 units).

    1x1 stem to 24 channels (no downsampling), three stages at 16/8/4 px, 4x4 avg pool, linear.
    Architecture of RepDistiller ``models/ShuffleNetv1.py``, after Zhang et al., "ShuffleNet: An
    Extremely Efficient Convolutional Neural Network for Mobile Devices", CVPR 2018.
    """

    input_shape = INPUT_SHAPE
    stages = ("layer1", "layer2", "layer3")

    def __init__(
        self,
        widths: tuple[int, int, int] = (240, 480, 960),
        units: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        cin = 24
        for i, (cout, n) in enumerate(zip(widths, units), start=1):
            # The first unit concatenates its input, so its branch makes only cout - cin channels.
            blocks = [_ShuffleV1Unit(cin, cout - cin, 2, groups)]
            blocks += [_ShuffleV1Unit(cout, cout, 1, groups) for _ in range(n - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            cin = cout
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


class _ShuffleV2Split(nn.Module):
    """ShuffleNet v2 basic unit: split channels in half, 1x1-dw3x3-1x1 on one half, concat, shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        c = channels // 2
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1] // 2
        keep, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return _channel_shuffle(torch.cat([keep, out], 1), 2)


class _ShuffleV2Down(nn.Module):
    """ShuffleNet v2 downsampling unit: two stride-2 branches (dw3x3-1x1 | 1x1-dw3x3-1x1), concat, shuffle."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        mid = cout // 2
        self.conv1 = nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv2 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return _channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNet v2 1x for CIFAR (CRD's ``ShuffleV2``: widths 116/232/464, 3/7/3 basic units
    after each downsampling unit, 1x1 conv to 1024, 4x4 avg pool, linear).

    1x1 stem to 24 channels (no downsampling), stages at 16/8/4 px. Architecture of RepDistiller
    ``models/ShuffleNetv2.py``, after Ma et al., "ShuffleNet V2: Practical Guidelines for
    Efficient CNN Architecture Design", ECCV 2018.
    """

    input_shape = INPUT_SHAPE
    stages = ("layer1", "layer2", "layer3")

    def __init__(
        self,
        widths: tuple[int, int, int, int] = (116, 232, 464, 1024),
        units: tuple[int, int, int] = (3, 7, 3),
        num_classes: int = 100,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        cin = 24
        for i, (cout, n) in enumerate(zip(widths[:3], units), start=1):
            setattr(
                self, f"layer{i}", nn.Sequential(_ShuffleV2Down(cin, cout), *[_ShuffleV2Split(cout) for _ in range(n)])
            )
            cin = cout
        self.conv2 = nn.Conv2d(cin, widths[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.linear = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


def shufflenet_v1(num_classes: int = 100) -> nn.Module:
    """ShuffleNet v1 (CRD ``ShuffleV1``, g=3): 949,258 params at 100 classes (CRD: 0.95M)."""
    return ShuffleNetV1(num_classes=num_classes)


def shufflenet_v2(num_classes: int = 100) -> nn.Module:
    """ShuffleNet v2 1x (CRD ``ShuffleV2``): 1,355,528 params at 100 classes (CRD: 1.36M)."""
    return ShuffleNetV2(num_classes=num_classes)


# --------------------------------------------------------------------------- MobileNetV2


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class _InvertedResidual(nn.Module):
    """1x1 expand (x t) - depthwise 3x3 - linear 1x1 project; identity added when the shape keeps."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(nn.Module):
    """MobileNetV2 for CIFAR as in CRD (``mobile_half``: expansion 6, width multiplier 0.5).

    A stride-2 3x3 stem (32x32 -> 16x16), seven inverted-residual stages ``blocks.0``..``blocks.6``
    (t, c, n, s = 1,16,1,1 / 6,24,2,1 / 6,32,3,2 / 6,64,4,2 / 6,96,3,1 / 6,160,3,2 / 6,320,1,1,
    channels times the width multiplier; note the first stage's expansion is 1 but every later
    one uses ``expand``), a 1x1 conv to 1280 channels (not scaled down), global pool, linear.
    Architecture of RepDistiller ``models/mobilenetv2.py`` (from "Knowledge Distillation via
    Route Constrained Optimization", ICCV 2019), after Sandler et al., "MobileNetV2: Inverted
    Residuals and Linear Bottlenecks", CVPR 2018.
    """

    input_shape = INPUT_SHAPE
    stages = tuple(f"blocks.{i}" for i in range(7))

    def __init__(self, expand: int = 6, width_mult: float = 0.5, num_classes: int = 100) -> None:
        super().__init__()
        setting = [(1, 16, 1, 1), (expand, 24, 2, 1), (expand, 32, 3, 2), (expand, 64, 4, 2)]
        setting += [(expand, 96, 3, 1), (expand, 160, 3, 2), (expand, 320, 1, 1)]
        cin = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(3, cin, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in setting:
            cout = int(c * width_mult)
            units = []
            for j in range(n):
                units.append(_InvertedResidual(cin, cout, s if j == 0 else 1, t))
                cin = cout
            self.blocks.append(nn.Sequential(*units))
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(cin, last, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        _conv_bn_init(self)
        nn.init.normal_(self.classifier[0].weight, 0, 0.01)
        nn.init.zeros_(self.classifier[0].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        x = self.conv2(x)
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


def mobilenet_v2(num_classes: int = 100) -> nn.Module:
    """MobileNetV2 x0.5 (CRD ``MobileNetV2``/``mobile_half``): 812,836 params at 100 classes (CRD: 0.81M)."""
    return MobileNetV2(6, 0.5, num_classes)


# --------------------------------------------------------------------------- registry

ZOO: dict[str, Callable[..., nn.Module]] = {
    "resnet8x4": resnet8x4,
    "resnet32x4": resnet32x4,
    "wrn_16_2": wrn_16_2,
    "wrn_40_2": wrn_40_2,
    "shufflenet_v1": shufflenet_v1,
    "shufflenet_v2": shufflenet_v2,
    "mobilenet_v2": mobilenet_v2,
    "moonshine_wrn_40_2_g4": moonshine_wrn_40_2_g4,
    "moonshine_wrn_40_2_b2": moonshine_wrn_40_2_b2,
    "moonshine_wrn_40_2_b2g2": moonshine_wrn_40_2_b2g2,
}

for _factory in ZOO.values():
    _factory.input_shape = INPUT_SHAPE  # type: ignore[attr-defined]
del _factory


# --------------------------------------------------------------------------- online distillation

# Small CNNs for the online methods of ``kd.student_trainer.online`` (ONE, OKDDip, PCL, DCM),
# at any C x H x W input (flat inputs of a square size, e.g. digits' 64, are read as 1 x 8 x 8).
# One branch path (stem + branch) is ``kd.models.digits_cnn_student`` layer for layer at width 8,
# so an online method's branch compares with a student trained alone.


def image_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """C x H x W of one sample: a 3-D shape as is, a flat square one (digits: 64) as 1 x s x s."""
    if len(shape) == 3:
        return (int(shape[0]), int(shape[1]), int(shape[2]))
    if len(shape) == 1 and round(shape[0] ** 0.5) ** 2 == shape[0]:
        side = round(shape[0] ** 0.5)
        return (1, side, side)
    raise ValueError(f"the online CNNs take C x H x W samples or flat square ones (e.g. 64 = 8x8), not {tuple(shape)}")


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class CNNBranch(nn.Module):
    """conv -> BN -> ReLU -> global average pool -> linear; returns (logits, pooled feature)."""

    def __init__(self, cin: int, cout: int, num_classes: int) -> None:
        super().__init__()
        self.layer2 = _conv_block(cin, cout)
        self.head = nn.Linear(cout, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = F.adaptive_avg_pool2d(self.layer2(x), 1).flatten(1)
        return self.head(feat), feat


class MultiBranchCNN(nn.Module):
    """A shared stem (``layer1``, the shared low layers) and ``branches`` parallel high-layer
    branches (ONE, OKDDip, PCL). ``forward`` gives the mean of the branches' logits;
    ``forward_all`` gives (stem output, [logits], [pooled features])."""

    def __init__(self, input_shape: tuple[int, ...] = (1, 8, 8), num_classes: int = 10, width: int = 8,
                 branches: int = 3) -> None:  # fmt: skip
        super().__init__()
        if branches < 1:
            raise ValueError(f"a multi-branch model needs >= 1 branch, got {branches}")
        self.input_shape = tuple(input_shape)
        self.image_shape = image_shape(self.input_shape)
        self.width = width
        self.layer1 = _conv_block(self.image_shape[0], width)
        self.branches = nn.ModuleList(CNNBranch(width, 2 * width, num_classes) for _ in range(branches))

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        low = self.layer1(x.reshape(x.shape[0], *self.image_shape))
        outs = [b(low) for b in self.branches]
        return low, [o[0] for o in outs], [o[1] for o in outs]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.forward_all(x)[1]).mean(0)


class AuxCNN(nn.Module):
    """``depth`` conv stages and a classifier (the network deployed), plus an auxiliary branch
    off each earlier stage (DCM's auxiliary classifiers at several depths): the branch off stage
    ``i`` runs its own copies of the later stages, then its own classifier (as the official DCM's
    extra residual groups do). At ``depth=2`` the main path is ``kd.models.digits_cnn_student``
    layer for layer. ``forward`` gives the main classifier's logits; ``forward_all`` gives the
    auxiliary branches' (shallowest branch point first), then the main one's."""

    def __init__(self, input_shape: tuple[int, ...] = (1, 8, 8), num_classes: int = 10, width: int = 8,
                 depth: int = 2) -> None:  # fmt: skip
        super().__init__()
        if depth < 2:
            raise ValueError(f"AuxCNN needs depth >= 2 (an auxiliary branch needs an earlier stage), got {depth}")
        self.input_shape = tuple(input_shape)
        self.image_shape = image_shape(self.input_shape)
        widths = [width] + [2 * width] * (depth - 1)
        ins = [self.image_shape[0], *widths[:-1]]
        self.stages = nn.ModuleList(_conv_block(i, o) for i, o in zip(ins, widths))
        self.head = nn.Linear(widths[-1], num_classes)
        self.aux = nn.ModuleList(
            nn.Sequential(*(_conv_block(ins[k], widths[k]) for k in range(i + 1, depth))) for i in range(depth - 1)
        )
        self.aux_heads = nn.ModuleList(nn.Linear(widths[-1], num_classes) for _ in range(depth - 1))

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x.reshape(x.shape[0], *self.image_shape)
        out = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.aux):
                a = F.adaptive_avg_pool2d(self.aux[i](x), 1).flatten(1)
                out.append(self.aux_heads[i](a))
        return [*out, self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.image_shape)
        for stage in self.stages:
            x = stage(x)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class CheapCNN(nn.Module):
    """A standard conv stage, then a cheap one (``cheap_conv(kind)``: Moonshine's grouped or
    bottleneck substitutes) -> BN -> ReLU; a classifier on the pooled map. The students of online
    distillation with cheap convolutions (Xie et al. 2019). ``forward_all`` gives (logits, the
    last stage's map) so a teacher head can read the maps."""

    def __init__(self, input_shape: tuple[int, ...] = (1, 8, 8), num_classes: int = 10, width: int = 8,
                 conv: str = "G4") -> None:  # fmt: skip
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.image_shape = image_shape(self.input_shape)
        self.layer1 = _conv_block(self.image_shape[0], width)
        self.layer2 = nn.Sequential(cheap_conv(width, 2 * width, 1, conv), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.head = nn.Linear(2 * width, num_classes)

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.layer2(self.layer1(x.reshape(x.shape[0], *self.image_shape)))
        return self.head(F.adaptive_avg_pool2d(fmap, 1).flatten(1)), fmap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x)[0]
