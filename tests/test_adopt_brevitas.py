"""Brevitas models in (issue 19): ``adopt_brevitas_model`` puts HDRQ quantizers in place of a
Brevitas model's own, keeping every layer's bit width and granularity; the result calibrates,
merges, exports and validates. Models: the ``brevitas_examples`` package's bnn_pynq TFC and
ImageNet MobileNetV1 families (random init, BatchNorm statistics from data; no downloads), and
a hand-written Brevitas model."""

import warnings

import pytest
import torch
from torch import nn

from hdrq_plugin import HDRQConfig, adopt_brevitas_model, hdrq_calibrate, merge_models
from hdrq_plugin.convert import UnsupportedLayerError
from hdrq_plugin.export import export_qdq, validate
from hdrq_plugin.merge.models import read_weight_grid
from hdrq_plugin.quant.control import quantized_layers
from hdrq_plugin.quant.quantizers import HDRQQuantizer

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import brevitas.nn as qnn
    from brevitas.quant import (
        Int8ActPerTensorFloat,
        Int8WeightPerChannelFloat,
        Int8WeightPerTensorFloat,
        Uint8ActPerTensorFloat,
    )
    from brevitas_examples.bnn_pynq.models import model_with_cfg
    from brevitas_examples.imagenet_classification.models.mobilenetv1 import MobileNet

CONFIG = HDRQConfig.cpu_preset("hdrq", iterations=1, num_samples=16, batch_size=8)


class HandWritten(nn.Module):
    """Brevitas layers with Brevitas quantizers, each at its own width and granularity."""

    def __init__(self):
        super().__init__()
        self.inp = qnn.QuantIdentity(act_quant=Int8ActPerTensorFloat, return_quant_tensor=True)
        self.conv1 = qnn.QuantConv2d(3, 8, 3, padding=1, weight_quant=Int8WeightPerChannelFloat, weight_bit_width=6)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = qnn.QuantReLU(act_quant=Uint8ActPerTensorFloat, bit_width=5, return_quant_tensor=True)
        self.conv2 = qnn.QuantConv2d(8, 8, 3, padding=1, groups=8, weight_quant=Int8WeightPerTensorFloat,
                                     weight_bit_width=3)
        self.relu2 = qnn.QuantReLU(act_quant=Uint8ActPerTensorFloat, bit_width=4, return_quant_tensor=True)
        self.pool = nn.MaxPool2d(2)
        self.fc = qnn.QuantLinear(8 * 4 * 4, 10, bias=True, weight_quant=Int8WeightPerTensorFloat, weight_bit_width=8)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(self.inp(x))))
        x = self.pool(self.relu2(self.conv2(x)))
        return self.fc(x.flatten(1))


def _with_bn_statistics(model: nn.Module, shape) -> nn.Module:
    """Random-init networks: BatchNorm statistics from a few random batches, so activations do not vanish."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.rand(64, *shape))
    return model.eval()


def _tfc():
    torch.manual_seed(0)
    return _with_bn_statistics(model_with_cfg("tfc_2w2a", pretrained=False)[0], (1, 28, 28)), (1, 28, 28)


def _mobilenet():
    torch.manual_seed(0)
    model = MobileNet(channels=[[8], [16], [16, 16], [32]], first_stage_stride=False, act_bit_width=4,
                      weight_bit_width=4, avg_pool_kernel_size=2, num_classes=10)
    return _with_bn_statistics(model, (3, 16, 16)), (3, 16, 16)


def _hand_written():
    torch.manual_seed(0)
    return _with_bn_statistics(HandWritten(), (3, 8, 8)), (3, 8, 8)


MODELS = {"bnn_pynq-tfc-2w2a": _tfc, "imagenet-mobilenetv1": _mobilenet, "hand-written": _hand_written}


def _weight_formats(model: nn.Module) -> dict[str, tuple[int, bool]]:
    return {name: (int(layer.weight_quant.bit_width()), layer.quant_weight().scale.numel() > 1)
            for name, layer in quantized_layers(model, enabled_only=False)}


@pytest.mark.parametrize("name", list(MODELS))
def test_adopting_keeps_each_layers_bit_width_and_granularity_with_hdrq_quantizers(name):
    model, _ = MODELS[name]()
    adopted = adopt_brevitas_model(model)
    assert _weight_formats(adopted) == _weight_formats(model)
    for _, layer in quantized_layers(adopted, enabled_only=False):
        assert issubclass(layer.weight_quant.quant_injector, HDRQQuantizer)


def test_a_hand_written_models_activation_widths_are_kept():
    model, _ = _hand_written()
    adopted = dict(adopt_brevitas_model(model).named_modules())
    assert int(adopted["relu1"].act_quant.bit_width()) == 5 and int(adopted["relu2"].act_quant.bit_width()) == 4


@pytest.mark.parametrize("name", list(MODELS))
def test_an_adopted_brevitas_model_calibrates_merges_exports_and_validates(name, tmp_path):
    model, shape = MODELS[name]()
    calibration = torch.rand(32, *shape, generator=torch.Generator().manual_seed(1))
    quantized = [hdrq_calibrate(adopt_brevitas_model(model), calibration[i * 16:(i + 1) * 16], config=CONFIG)
                 for i in range(2)]
    merged = merge_models(quantized).eval()
    assert _weight_formats(merged) == _weight_formats(model)
    images = torch.rand(64, *shape, generator=torch.Generator().manual_seed(2))
    for weights in ("int8", "int4"):
        path = export_qdq(merged, tmp_path / f"{weights}.onnx", images[:1], weights=weights)
        report = validate(path, merged, [images], batch_sizes=(1,), repeats=1, threads=1)
        assert report.ok, (weights, report.failures)


def test_binary_layers_are_refused_naming_the_layer():
    model = model_with_cfg("cnv_1w1a", pretrained=False)[0]
    with pytest.raises(UnsupportedLayerError, match=r"layer 'conv_features\.1' has 1-bit \(binary\) weights"):
        adopt_brevitas_model(model)


def test_a_brevitas_layer_that_cannot_be_served_is_named():
    model = nn.Sequential(qnn.QuantConv2d(3, 4, 3, weight_bit_width=4), qnn.QuantSigmoid(bit_width=8))
    with pytest.raises(UnsupportedLayerError, match=r"layer '1' of type QuantSigmoid cannot be adopted"):
        adopt_brevitas_model(model)


def test_a_float_model_is_sent_to_convert_to_brevitas():
    with pytest.raises(UnsupportedLayerError, match="convert_to_brevitas"):
        adopt_brevitas_model(nn.Sequential(nn.Conv2d(3, 4, 3)))


def test_the_weight_grid_of_an_adopted_layer_is_at_the_layers_width():
    model, _ = _hand_written()
    adopted = dict(adopt_brevitas_model(model).named_modules())
    assert read_weight_grid(adopted["conv2"]).bit_width == 3
