"""A MobileNetV2-style digits classifier: the zoo's second model family (inverted residuals).

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks" (2018), §3–4: a 3×3
stem, then inverted residual blocks (1×1 expansion → depthwise 3×3 → linear 1×1 projection, the
residual add where the shape is kept; ReLU6), a 1×1 head conv, global average pooling and one
linear classifier. Sized for 32×32 digits on two CPU cores: a stride-2 stem (as MobileNetV2's),
then the stages of :class:`MobileNetConfig`, each after the first opening with a stride-2 block.

It differs from :class:`hdrq_examples.models.CifarResNet` where quantization feels it: depthwise
convs (one 3×3 filter per channel: few weights, wide ranges), linear bottlenecks (signed
activations into the adds) and ReLU6. Module names follow torchvision (``features.N``,
``classifier``); FX-traceable, so ``convert_to_brevitas`` quantizes it like the ResNet.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .architectures import ConvBNAct, InvertedResidual


@dataclass(frozen=True)
class MobileNetConfig:
    """Architecture of :class:`DigitsMobileNet`; ``asdict`` of it is enough to rebuild the model."""

    family: str = "inverted-residual"  # tells this config from ResNetConfig in a recipe's dict
    stem_width: int = 16
    widths: tuple[int, ...] = (16, 24, 32)  # one stage each; stages after the first start at stride 2
    blocks_per_stage: int = 2
    expand: int = 4  # the inverted residual's expansion ratio (MobileNetV2: 6; 4 keeps CPU time down)
    head_width: int = 128
    num_classes: int = 10
    in_channels: int = 3

    def __post_init__(self) -> None:
        if self.family != "inverted-residual":
            raise ValueError(f"MobileNetConfig.family is 'inverted-residual', got {self.family!r}")
        widths = tuple(int(w) for w in self.widths)
        if not widths or any(w <= 0 for w in widths):
            raise ValueError(f"widths must be positive integers, got {self.widths!r}")
        object.__setattr__(self, "widths", widths)
        for name in ("stem_width", "blocks_per_stage", "expand", "head_width", "num_classes", "in_channels"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MobileNetConfig:
        return cls(**{**data, "widths": tuple(data["widths"])})


class DigitsMobileNet(nn.Module):
    """``features`` (stem, inverted residual stages, 1×1 head), ``pool``, ``classifier``."""

    def __init__(self, config: MobileNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or MobileNetConfig()
        c = self.config
        layers: list[nn.Module] = [ConvBNAct(c.in_channels, c.stem_width, 3, 2, act=nn.ReLU6)]  # stride 2, as V2
        channels = c.stem_width
        for stage, width in enumerate(c.widths):
            for index in range(c.blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                layers.append(InvertedResidual(channels, width, stride, c.expand))
                channels = width
        layers.append(ConvBNAct(channels, c.head_width, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c.head_width, c.num_classes)
        for module in self.modules():  # torchvision's MobileNetV2 init
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def build_mobilenet(config: MobileNetConfig | dict | None = None) -> DigitsMobileNet:
    """Build a fresh :class:`DigitsMobileNet` from a config or its ``to_dict()`` form."""
    if isinstance(config, dict):
        config = MobileNetConfig.from_dict(config)
    return DigitsMobileNet(config)
