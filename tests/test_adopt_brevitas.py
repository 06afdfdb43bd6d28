"""Brevitas models in (issue 19): ``adopt_brevitas_model`` puts HDRQ quantizers in place of a
Brevitas model's own, keeping every layer's bit width and granularity; the result calibrates,
merges, exports and validates. Models: the ``brevitas_examples`` package's bnn_pynq TFC and
ImageNet MobileNetV1 families (random init, BatchNorm statistics from data; no downloads), and
a hand-written Brevitas model."""

import warnings

import pytest
import torch
from torch import nn

from benchmarks.conformance.brevitas_models import (
    HandWritten,  # noqa: F401  (the hand-written Brevitas model)
    bnn_pynq,
    hand_written,
    mobilenet_v1,
    weight_formats,
)
from hdrq_plugin import HDRQConfig, adopt_brevitas_model, hdrq_calibrate, merge_models
from hdrq_plugin.convert import UnsupportedLayerError
from hdrq_plugin.export import export_qdq, validate
from hdrq_plugin.merge.models import read_weight_grid
from hdrq_plugin.quant.control import quantized_layers
from hdrq_plugin.quant.quantizers import HDRQQuantizer

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import brevitas.nn as qnn
    from brevitas_examples.bnn_pynq.models import model_with_cfg

CONFIG = HDRQConfig.cpu_preset("hdrq", iterations=1, num_samples=16, batch_size=8)
_hand_written = hand_written
_weight_formats = weight_formats
#: CNV 2W2A is left to the benchmark (30 s); the tests take one model per family plus the hand-written one.
MODELS = {"bnn_pynq-tfc-2w2a": bnn_pynq("tfc_2w2a", (1, 28, 28)), "imagenet-mobilenetv1": mobilenet_v1,
          "hand-written": hand_written}


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


#: TFC 2W2A (2-bit weights and activations, random init) has logits that tie exactly in PyTorch;
#: onnxruntime computes the same codes (validate: "every activation code agrees") and logits within
#: 2e-6 of them, and breaks 1-2 of 64 ties the other way. validate's top-1 rule does not yet count an
#: exact logit tie as a tie (issue-19-export's rule certifies activation-code ties only).
LOGIT_TIES = pytest.mark.xfail(strict=True, reason="exact logit ties fail validate's top-1 rule (see LOGIT_TIES)")


@pytest.mark.parametrize("name", [pytest.param(n, marks=LOGIT_TIES) if n == "bnn_pynq-tfc-2w2a" else n
                                  for n in MODELS])
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
