"""A family of tiny float CNNs, one per common block, for the convert → calibrate → merge → export tests
(``tests/test_block_models.py``) and the exporter's graph facts (``benchmarks.latency.integer_path_facts``).

Each model is small (widths 8–16, 16×16 inputs) but has the real block structure; together they
cover depthwise, grouped and pointwise convs, ReLU/ReLU6/Hardswish/SiLU/Hardsigmoid/Sigmoid,
inverted residuals with linear bottlenecks, squeeze-and-excitation, networks without residual
adds, bottlenecks with 1×1 projections, max and average pooling, ``torch.flatten`` and
``nn.Flatten``, concatenated branches, dropout, and a model written with functional calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hdrq_examples.architectures import (
    Bottleneck,
    ConvBNAct,
    InceptionBlock,
    InvertedResidual,
    SqueezeExcite,
    randomize_batchnorm,
)

NUM_CLASSES = 10
INPUT_SHAPE = (3, 16, 16)


class DepthwiseSeparableNet(nn.Module):
    """MobileNetV1/VGG style: no residual add, depthwise + pointwise convs, ReLU6, max pool,
    ``nn.Flatten`` and dropout before the classifier."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = ConvBNAct(3, width, 3, 1, act=nn.ReLU6)
        self.dw1 = ConvBNAct(width, width, 3, 2, groups=width, act=nn.ReLU6)
        self.pw1 = ConvBNAct(width, 2 * width, 1, act=nn.ReLU6)
        self.pool = nn.MaxPool2d(2)
        self.dw2 = ConvBNAct(2 * width, 2 * width, 3, 1, groups=2 * width, act=nn.ReLU6)
        self.pw2 = ConvBNAct(2 * width, 2 * width, 1, act=nn.ReLU6)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(2 * width, NUM_CLASSES)

    def forward(self, x):
        x = self.pool(self.pw1(self.dw1(self.stem(x))))
        x = self.pw2(self.dw2(x))
        return self.fc(self.dropout(self.flatten(self.gap(x))))


class GroupedBottleneckNet(nn.Module):
    """ResNeXt style: max-pooled stem, bottlenecks with grouped 3×3 convs and a 1×1 projection,
    ``torch.flatten``."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = ConvBNAct(3, width, 3)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(Bottleneck(width, width, 2 * width, 1, groups=2),
                                    Bottleneck(2 * width, width, 2 * width, 1, groups=2))
        self.layer2 = nn.Sequential(Bottleneck(2 * width, 2 * width, 4 * width, 2, groups=4))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, NUM_CLASSES)

    def forward(self, x):
        x = self.layer2(self.layer1(self.maxpool(self.stem(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class InvertedResidualNet(nn.Module):
    """MobileNetV2 style: inverted residuals (ReLU6, linear bottleneck), with and without the add."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            ConvBNAct(3, width, 3, 1, act=nn.ReLU6),
            InvertedResidual(width, width, 1, 1),
            InvertedResidual(width, 2 * width, 2, 4),
            InvertedResidual(2 * width, 2 * width, 1, 4),
            ConvBNAct(2 * width, 4 * width, 1, act=nn.ReLU6))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(4 * width, NUM_CLASSES))

    def forward(self, x):
        return self.classifier(self.flatten(self.pool(self.features(x))))


class SqueezeExciteNet(nn.Module):
    """MobileNetV3 / EfficientNet style: inverted residuals with SE; ``act``/``gate`` pick the family
    (Hardswish + Hardsigmoid for V3, SiLU + Sigmoid for EfficientNet)."""

    def __init__(self, width: int = 8, act=nn.Hardswish, gate=nn.Hardsigmoid, se_act=nn.ReLU) -> None:
        super().__init__()

        def se(channels):
            return SqueezeExcite(channels, max(4, channels // 4), act=se_act, gate=gate)

        self.features = nn.Sequential(
            ConvBNAct(3, width, 3, 1, act=act),
            InvertedResidual(width, width, 1, 1, act=act, se=se),
            InvertedResidual(width, 2 * width, 2, 3, act=act, se=se),
            InvertedResidual(2 * width, 2 * width, 1, 3, act=act, se=se),
            ConvBNAct(2 * width, 4 * width, 1, act=act))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * width, NUM_CLASSES)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class InceptionNet(nn.Module):
    """GoogLeNet style: branches concatenated, one block pooling by max and one by average."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.stem = ConvBNAct(3, 2 * width, 3, 2)
        self.block1 = InceptionBlock(2 * width, width, pool="max")
        self.block2 = InceptionBlock(4 * width, width, pool="avg")
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(4 * width, NUM_CLASSES)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class FunctionalNet(nn.Module):
    """Layers with weights are modules; everything else is a functional call in ``forward``."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.conv3 = nn.Conv2d(width, 2 * width, 1)
        self.conv4 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.se1 = nn.Conv2d(2 * width, width, 1)
        self.se2 = nn.Conv2d(width, 2 * width, 1)
        self.branch = nn.Conv2d(2 * width, 2 * width, 1)
        self.fc = nn.Linear(4 * width, NUM_CLASSES)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu6(self.conv2(x))
        x = F.max_pool2d(F.hardswish(self.conv3(x)), 2)
        y = F.silu(self.conv4(x))
        s = torch.sigmoid(self.se2(F.relu(self.se1(y.mean((2, 3), keepdim=True)))))
        y = y * s
        y = y + x
        z = F.hardsigmoid(self.branch(F.avg_pool2d(x, 3, 1, 1)))
        out = torch.cat([y, z], dim=1)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(F.dropout(out, 0.2, self.training))


#: name -> (builder, blocks the model covers)
BLOCK_MODELS = {
    "depthwise_separable": (DepthwiseSeparableNet, "depthwise + pointwise convs, ReLU6, no residual add, "
                                                   "max pool, nn.Flatten, dropout"),
    "grouped_bottleneck": (GroupedBottleneckNet, "grouped 3x3 convs, bottleneck with 1x1 projection, "
                                                 "ReLU, max pool, torch.flatten"),
    "inverted_residual": (InvertedResidualNet, "inverted residual with linear bottleneck, ReLU6, "
                                               "nn.Flatten, dropout"),
    "mobilenet_v3_se": (SqueezeExciteNet, "squeeze-and-excitation (Hardsigmoid gate), Hardswish"),
    "efficientnet_se": (lambda: SqueezeExciteNet(act=nn.SiLU, gate=nn.Sigmoid, se_act=nn.SiLU),
                        "squeeze-and-excitation (Sigmoid gate), SiLU"),
    "inception_concat": (InceptionNet, "concatenated branches, max and average pooling"),
    "functional": (FunctionalNet, "torch.nn.functional activations, pooling, mean, cat, flatten, dropout"),
}


def block_model(name: str, seed: int = 0) -> nn.Module:
    """The named model with seeded weights and non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = BLOCK_MODELS[name][0]()
    return randomize_batchnorm(model, seed)
