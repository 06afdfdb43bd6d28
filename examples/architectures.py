"""Common ImageNet-style CNN blocks and two full-size networks, written in plain torch.

torchvision does not import beside torch 2.13 CPU here (docs/toolchain_notes.md), so the blocks a
Brevitas user brings are written out: conv-BN-activation (any groups, so depthwise and grouped
convs), the MobileNetV2 inverted residual with a linear bottleneck (He/Sandler et al. 2018,
Fig. 3b), squeeze-and-excitation (Hu et al. 2018; MobileNetV3/EfficientNet gate), the ResNet
basic and bottleneck blocks with 1×1 projections (He et al. 2016, Fig. 5) and an Inception-style
block whose branches are concatenated (Szegedy et al. 2015, Fig. 2b). Module names follow
torchvision (``conv1``, ``layer1.0``, ``features.3.conv``, ``classifier``).

:func:`resnet18` and :func:`mobilenet_v2` reproduce torchvision's layer shapes and parameter
counts (11.69 M and 3.50 M at 1,000 classes) with freshly initialised weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Activation = Callable[[], nn.Module]


class ConvBNAct(nn.Sequential):
    """Conv (``groups`` = in_channels: depthwise) → BatchNorm → activation (``None``: linear)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 act: Activation | None = nn.ReLU) -> None:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                                   nn.BatchNorm2d(cout)]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


class SqueezeExcite(nn.Module):
    """Global average pool → FC (1×1 conv) → act → FC → gate → channel-wise multiply (Hu et al. 2018)."""

    def __init__(self, channels: int, reduced: int, act: Activation = nn.ReLU,
                 gate: Activation = nn.Hardsigmoid) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.act = act()
        self.fc2 = nn.Conv2d(reduced, channels, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.gate(self.fc2(self.act(self.fc1(self.avgpool(x)))))
        return x * scale


class InvertedResidual(nn.Module):
    """1×1 expansion → depthwise k×k → (SE) → linear 1×1 projection, residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, act: Activation = nn.ReLU6,
                 kernel: int = 3, se: Callable[[int], nn.Module] | None = None) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNAct(cin, hidden, 1, act=act))
        layers.append(ConvBNAct(hidden, hidden, kernel, stride, groups=hidden, act=act))
        if se is not None:
            layers.append(se(hidden))
        layers.append(ConvBNAct(hidden, cout, 1, act=None))  # the linear bottleneck
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN with a residual add (1×1 conv-BN projection when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """1×1 reduce → 3×3 (``groups`` > 1: ResNeXt) → 1×1 expand, with a 1×1 projection shortcut."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.reduce = ConvBNAct(cin, mid, 1)
        self.conv = ConvBNAct(mid, mid, 3, stride, groups=groups)
        self.expand = ConvBNAct(mid, cout, 1, act=None)
        self.downsample = (ConvBNAct(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else None)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.expand(self.conv(self.reduce(x))) + identity)


class InceptionBlock(nn.Module):
    """Four branches (1×1; 1×1→3×3; 1×1→5×5 as two 3×3; pool→1×1) concatenated on channels."""

    def __init__(self, cin: int, width: int, pool: str = "max") -> None:
        super().__init__()
        self.branch1 = ConvBNAct(cin, width, 1)
        self.branch3 = nn.Sequential(ConvBNAct(cin, width, 1), ConvBNAct(width, width, 3))
        self.branch5 = nn.Sequential(ConvBNAct(cin, width, 1), ConvBNAct(width, width, 3), ConvBNAct(width, width, 3))
        self.pool = nn.MaxPool2d(3, 1, 1) if pool == "max" else nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.branch_pool = ConvBNAct(cin, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(self.pool(x))], 1)


class ResNet(nn.Module):
    """torchvision's ResNet layout: 7×7/2 stem, 3×3/2 max pool, four stages, average pool, fc."""

    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2, 2), widths: tuple[int, ...] = (64, 128, 256, 512),
                 num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = widths[0]
        for stage, (count, width) in enumerate(zip(blocks, widths, strict=True), start=1):
            layers = []
            for index in range(count):
                layers.append(BasicBlock(cin, width, 2 if stage > 1 and index == 0 else 1))
                cin = width
            self.add_module(f"layer{stage}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self.stages = len(blocks)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in range(1, self.stages + 1):
            x = getattr(self, f"layer{stage}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


#: MobileNetV2 stages (expansion t, channels c, repeats n, stride s), Sandler et al. 2018, Table 2.
MOBILENET_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                       (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2: ``features`` (stem, inverted residuals, 1×1 to 1280), ``classifier``."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0,
                 stages: tuple[tuple[int, int, int, int], ...] = MOBILENET_V2_STAGES, last: int = 1280,
                 dropout: float = 0.2) -> None:
        super().__init__()
        cin = _divisible(32 * width)
        features: list[nn.Module] = [ConvBNAct(3, cin, 3, 2, act=nn.ReLU6)]
        for expand, channels, repeats, stride in stages:
            cout = _divisible(channels * width)
            for index in range(repeats):
                features.append(InvertedResidual(cin, cout, stride if index == 0 else 1, expand))
                cin = cout
        last = _divisible(last * max(1.0, width))
        features.append(ConvBNAct(cin, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


def _divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of 8, never below 90 % of ``value`` (torchvision _make_divisible)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _init(model: nn.Module) -> None:
    # torchvision's initialisation: Kaiming-normal fan-out convs, N(0, 0.01) linear layers
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0, 0.01)
            nn.init.zeros_(module.bias)


def resnet18(num_classes: int = 1000) -> ResNet:
    return ResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes)


def mobilenet_v2(num_classes: int = 1000) -> MobileNetV2:
    return MobileNetV2(num_classes)


def randomize_batchnorm(model: nn.Module, seed: int) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine terms (folded at conversion),
    so an untrained model's activations are not all alike; returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                size = module.num_features
                module.running_mean.copy_(torch.randn(size, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(size, generator=gen) * 0.5 + 0.75)
                module.weight.copy_(torch.rand(size, generator=gen) * 0.5 + 0.75)
                module.bias.copy_(torch.randn(size, generator=gen) * 0.1)
    return model.eval()
