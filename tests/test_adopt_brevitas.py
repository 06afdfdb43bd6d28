"""Brevitas models in (issue 19): ``adopt_brevitas_model`` puts HDRQ quantizers in place of a
Brevitas model's own, keeping every layer's bit width and granularity; the result calibrates,
merges, exports and validates. Models: the ``brevitas_examples`` package's bnn_pynq TFC and
ImageNet MobileNetV1 families (random init, BatchNorm statistics from data; no downloads), and
a hand-written Brevitas model."""

import functools
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
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
#: CNV 2W2A (30 s) runs with the slow tests; the others are one model per family plus the hand-written one.
MODELS = {"bnn_pynq-cnv-2w2a": bnn_pynq("cnv_2w2a", (3, 32, 32)), "bnn_pynq-tfc-2w2a": bnn_pynq("tfc_2w2a", (1, 28, 28)),
          "imagenet-mobilenetv1": mobilenet_v1, "hand-written": hand_written}
END_TO_END = [pytest.param(name, marks=pytest.mark.slow) if name == "bnn_pynq-cnv-2w2a" else name for name in MODELS]


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


@functools.cache  # the TFC model serves three tests: calibrated and merged once; exports and validations read it
def _merged(name):
    model, shape = MODELS[name]()
    calibration = torch.rand(32, *shape, generator=torch.Generator().manual_seed(1))
    quantized = [hdrq_calibrate(adopt_brevitas_model(model), calibration[i * 16:(i + 1) * 16], config=CONFIG)
                 for i in range(2)]
    merged = merge_models(quantized).eval()
    assert _weight_formats(merged) == _weight_formats(model)
    return merged, torch.rand(64, *shape, generator=torch.Generator().manual_seed(2))


#: 2-bit weights and activations (bnn_pynq CNV/TFC 2W2A) give logits that tie exactly on the integer grid;
#: PyTorch and onnxruntime break such ties by float32 summation order. validate counts them as logit ties
#: (parity.py, "Top-1"), so these files pass with every code agreeing.
@pytest.mark.parametrize("name", END_TO_END)
def test_an_adopted_brevitas_model_calibrates_merges_exports_and_validates(name, tmp_path):
    merged, images = _merged(name)
    for weights in ("int8", "int4"):
        path = export_qdq(merged, tmp_path / f"{weights}.onnx", images[:1], weights=weights)
        report = validate(path, merged, [images], batch_sizes=(1,), repeats=1, threads=1)
        assert report.ok, (weights, report.failures)


def _edit_last_layer(path, tmp_path, edit):
    """The file with the last Gemm's weight codes or scale edited (the classifier, after every quantizer)."""
    model = onnx.load(path)
    gemm = [n for n in model.graph.node if n.op_type == "Gemm"][-1]
    made_by = {out: n for n in model.graph.node for out in n.output}
    dq = made_by[gemm.input[1]]
    tensors = {t.name: t for t in model.graph.initializer}
    tensors.update({n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant"})
    codes_name = dq.input[0] if dq.input[0] in tensors else made_by[dq.input[0]].input[0]  # through the Clip
    edit(tensors[codes_name], tensors[dq.input[1]])
    out = tmp_path / "edited.onnx"
    onnx.save(model, out)
    return out


def _one_step(codes, _):
    values = numpy_helper.to_array(codes).copy()
    values.flat[0] += 1 if values.flat[0] < 1 else -1  # stays on the 2-bit grid
    codes.CopyFrom(numpy_helper.from_array(values, codes.name))


def _one_percent(_, scale):
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(1.01), scale.name))


@pytest.mark.parametrize("edit", [_one_step, _one_percent], ids=["one-weight-step", "one-percent-scale"])
def test_logit_ties_do_not_excuse_a_broken_tfc_file(edit, tmp_path):
    merged, images = _merged("bnn_pynq-tfc-2w2a")
    path = export_qdq(merged, tmp_path / "int8.onnx", images[:1], weights="int8")
    report = validate(_edit_last_layer(path, tmp_path, edit), merged, [images], batch_sizes=(1,), repeats=1,
                      threads=1)
    assert not report.ok
    assert report.parity["data"].samples_with_code_divergence == 0  # the edit is after the last quantizer
    assert any("where every activation code agrees" in f for f in report.failures), report.failures


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
