import pytest
import torch
from tiny_models import tiny_resnet
from torch import nn

from hdrq_plugin import BitSpec, convert_to_brevitas
from hdrq_plugin.convert import calibrate_activations
from hdrq_plugin.convert.to_brevitas import UnsupportedLayerError, compute_layers


def _calibrated(spec: str, seed: int = 0):
    model = tiny_resnet(seed=seed)
    qmodel = convert_to_brevitas(model, spec)
    gen = torch.Generator().manual_seed(1)
    calibrate_activations(qmodel, [torch.randn(8, 3, 16, 16, generator=gen) for _ in range(4)])
    return model, qmodel


@pytest.mark.parametrize("text", ["w4a8", "w4a4-per-channel", "w8a8", "w2a3", "w8a8-full-range",
                                  "w4a4-per-channel-full-range"])
def test_bit_spec_round_trips_through_its_string(text):
    assert str(BitSpec.parse(text)) == text


@pytest.mark.parametrize("text", ["w4", "a4w4", "w9a8", "w4a1", "w4a8-per-tensorx", "", "W4A8 extra",
                                  "w8a8-full-range-per-channel", "w8a8-fullrange"])
def test_malformed_or_out_of_range_bit_specs_are_rejected(text):
    with pytest.raises(ValueError):
        BitSpec.parse(text)


def test_w8a8_conversion_stays_close_to_the_float_model():
    model, qmodel = _calibrated("w8a8")
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    ref = model(x)
    assert (qmodel(x) - ref).norm() / ref.norm() < 0.03


def test_batchnorm_is_folded_and_every_conv_and_linear_is_quantized():
    _, qmodel = _calibrated("w4a4")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in qmodel.modules())
    names = [name for name, _ in compute_layers(qmodel)]
    assert names == ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.conv2",
                     "layer2.0.shortcut.0", "fc"]


def test_edge_layers_keep_eight_bit_weights_and_inner_layers_use_the_spec():
    # issue 22: an 8-bit layer's default grid is the saturation-free -64..63 (7 bits in int8)
    _, qmodel = _calibrated("w4a4")
    layers = dict(compute_layers(qmodel))
    for edge in ("conv1", "fc"):
        codes = layers[edge].quant_weight()
        assert int(codes.bit_width) == 7
        assert codes.int().min() >= -64 and codes.int().max() <= 63
    inner = layers["layer1.0.conv1"].quant_weight()
    assert int(inner.bit_width) == 4
    assert inner.int().min() >= -8 and inner.int().max() <= 7


def test_the_full_eight_bit_grid_is_an_explicit_opt_in():
    _, qmodel = _calibrated("w8a8-full-range")
    layers = dict(compute_layers(qmodel))
    assert {int(layer.quant_weight().bit_width) for layer in layers.values()} == {8}
    assert max(int(layer.quant_weight().int().abs().max()) for layer in layers.values()) > 64


@pytest.mark.parametrize("spec", ["w8a8", "w8a8-per-channel", "w4a4", "w4a8"])
def test_every_eight_bit_layer_of_a_default_spec_has_saturation_free_codes(spec):
    _, qmodel = _calibrated(spec)
    for name, layer in compute_layers(qmodel):
        codes = layer.quant_weight().int()
        assert codes.abs().max() <= 64, name
    assert {int(layer.quant_weight().bit_width) for _, layer in compute_layers(qmodel)} <= {4, 7}


def test_the_classifier_input_stays_an_eight_bit_activation():
    # the saturation-free range is a weight grid only: uint8 activations cannot saturate vpmaddubsw
    _, qmodel = _calibrated("w4a4")
    assert int(dict(compute_layers(qmodel))["fc"].input_quant.bit_width()) == 8


def test_bit_spec_weight_range_is_checked_and_named_in_its_string():
    assert BitSpec.parse("w8a8").weight_range == "saturation-free"
    assert BitSpec.parse("w8a8-per-channel-full-range") == BitSpec(8, 8, per_channel=True, weight_range="full")
    assert BitSpec(8, 8).grid_bits(8) == 7 and BitSpec(8, 8).grid_bits(4) == 4
    assert BitSpec(8, 8, weight_range="full").grid_bits(8) == 8
    with pytest.raises(ValueError, match="weight_range"):
        BitSpec(8, 8, weight_range="reduced")


def test_per_channel_spec_gives_one_scale_per_output_channel():
    _, qmodel = _calibrated("w4a4-per-channel")
    scale = dict(compute_layers(qmodel))["layer2.0.conv1"].quant_weight().scale
    assert scale.shape == (16, 1, 1, 1)


def test_residual_branches_keep_their_own_activation_scales():
    # a shared (aligned) quantizer at the add would clip the wider branch; see _quantize_graph
    _, qmodel = _calibrated("w8a8")
    conv2_out = qmodel.get_submodule("layer2_0_conv2_output_quant").act_quant.scale()
    shortcut_out = qmodel.get_submodule("layer2_0_shortcut_0_output_quant").act_quant.scale()
    assert not torch.equal(conv2_out, shortcut_out)


def test_the_logits_are_not_quantized():
    _, qmodel = _calibrated("w4a4")
    output = next(n for n in qmodel.graph.nodes if n.op == "output")
    assert [n.target for n in output.all_input_nodes] == ["fc"]


def test_activations_after_relu_are_unsigned():
    _, qmodel = _calibrated("w4a4")
    relu = qmodel.get_submodule("layer1.0.relu")
    assert relu.act_quant.is_signed is False


def test_conversion_does_not_modify_the_float_model():
    model = tiny_resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convert_to_brevitas(model, "w4a4")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unsupported_layers_are_named_with_their_type():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LSTM(4, 4))
    with pytest.raises(UnsupportedLayerError, match=r"'1' of type LSTM"):
        convert_to_brevitas(model, "w4a8")


def test_calibration_rejects_nan_and_empty_data():
    qmodel = convert_to_brevitas(tiny_resnet(), "w4a8")
    bad = torch.randn(2, 3, 16, 16)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        calibrate_activations(qmodel, [bad])
    with pytest.raises(ValueError, match="empty"):
        calibrate_activations(qmodel, [])
