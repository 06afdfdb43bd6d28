"""A CIFAR-style ResNet small enough to train on two CPU cores, built from plain torch layers.

The layout follows He et al., "Deep Residual Learning for Image Recognition" (2016), §4.2
(CIFAR-10 networks): a 3×3 stem, three stages of basic blocks whose width doubles while the
resolution halves, global average pooling and one linear classifier. With one block per stage
this is "ResNet-8".

Everything is ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.ReLU`` / residual ``+`` /
``nn.AdaptiveAvgPool2d`` / ``nn.Linear``, and every ReLU is its own module, so the model is
FX-traceable and Brevitas' ``preprocess_for_quantize`` + ``quantize`` can convert it (each
ReLU becomes its own ``QuantReLU``). BatchNorm is kept in the float model; conversion folds it.
Module names follow torchvision's ResNet (``conv1``, ``layer1.0.conv1``, ``fc``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ResNetConfig:
    """Architecture of :class:`CifarResNet`; ``asdict`` of it is enough to rebuild the model."""

    widths: tuple[int, ...] = (32, 64, 128)  # measured: 32/64/128 merged far better than 16/32/64
    blocks_per_stage: int = 1  # ResNet-8, the prototype's depth
    num_classes: int = 10
    in_channels: int = 3

    def __post_init__(self) -> None:
        widths = tuple(int(w) for w in self.widths)
        if not widths or any(w <= 0 for w in widths):
            raise ValueError(f"widths must be positive integers, got {self.widths!r}")
        object.__setattr__(self, "widths", widths)
        for name in ("blocks_per_stage", "num_classes", "in_channels"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ResNetConfig:
        return cls(**{**data, "widths": tuple(data["widths"])})


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with a residual connection (a 1×1 conv-BN when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class CifarResNet(nn.Module):
    """``conv1-bn1-relu`` stem, ``layer1..layerN`` stages, ``avgpool``, ``fc``."""

    def __init__(self, config: ResNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or ResNetConfig()
        widths = self.config.widths
        self.conv1 = nn.Conv2d(self.config.in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        in_channels = widths[0]
        for stage, width in enumerate(widths, start=1):
            blocks = []
            for index in range(self.config.blocks_per_stage):
                stride = 2 if stage > 1 and index == 0 else 1
                blocks.append(BasicBlock(in_channels, width, stride))
                in_channels = width
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, self.config.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # He et al. 2015 ("Delving deep into rectifiers") init for ReLU convs, as in torchvision.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for stage in range(1, len(self.config.widths) + 1):
            x = getattr(self, f"layer{stage}")(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def build_resnet(config: ResNetConfig | dict | None = None) -> CifarResNet:
    """Build a fresh :class:`CifarResNet` from a config or its ``to_dict()`` form."""
    if isinstance(config, dict):
        config = ResNetConfig.from_dict(config)
    return CifarResNet(config)
