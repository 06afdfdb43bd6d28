"""The CIFAR-style ResNet: shapes, config round trip, and Brevitas can trace and quantize it."""

from __future__ import annotations

import pytest
import torch
from brevitas.graph.quantize import preprocess_for_quantize, quantize

from hdrq_examples.models import ResNetConfig, build_resnet


def test_resnet_maps_32x32_images_to_ten_logits():
    model = build_resnet(ResNetConfig(widths=(8, 16, 32))).eval()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_config_round_trips_through_a_dict():
    config = ResNetConfig(widths=(8, 16), blocks_per_stage=2)
    assert ResNetConfig.from_dict(config.to_dict()) == config


def test_module_names_follow_torchvision():
    names = dict(build_resnet(ResNetConfig(widths=(8, 16, 32))).named_modules())
    assert {"conv1", "bn1", "layer1.0.conv1", "layer2.0.downsample.0", "layer3.0.bn2", "fc"} <= set(names)


@pytest.mark.parametrize("widths", [(0, 8), ()])
def test_invalid_widths_are_rejected(widths):
    with pytest.raises(ValueError, match="widths"):
        ResNetConfig(widths=widths)


def test_brevitas_traces_folds_and_quantizes_the_resnet():
    torch.manual_seed(0)
    model = build_resnet(ResNetConfig(widths=(8, 16, 32))).eval()
    inputs = torch.rand(2, 3, 32, 32)
    expected = model(inputs)
    prepared = preprocess_for_quantize(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in prepared.modules())  # BN folded
    assert torch.allclose(prepared(inputs), expected, atol=1e-4)
    quantized = quantize(prepared).eval()
    assert quantized(inputs).shape == (2, 10)
