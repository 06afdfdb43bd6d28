"""HDRQ and AdaRound Brevitas quantizers: modes, steps, integers, state dicts, swapping."""

import math

import brevitas.nn as qnn
import numpy as np
import pytest
import torch
from brevitas.graph.calibrate import calibration_mode
from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerTensorFloat, Int32Bias, Uint8ActPerTensorFloat
from torch import nn

from hdrq_plugin.quant.control import (
    activation_scale_parameters,
    bake_learned_rounding,
    freeze_rounding,
    initialize_weight_scales_mse,
    integer_weight,
    quantized_layers,
    rounding_parameters,
    rounding_regularizer,
    set_activation_drop,
    set_noise_shape,
    set_quant_mode,
    set_weight_step,
    swap_weight_quantizer,
    weight_scale_parameters,
    weight_step,
)
from hdrq_plugin.quant.learned_round import AdaRoundQuantizer
from hdrq_plugin.quant.quantizers import (
    HDRQActQuantizer,
    HDRQPerChannelQuantizer,
    HDRQQuantizer,
    HDRQSignedActQuantizer,
    QuantMode,
)
from hdrq_plugin.quant.step_size import lp_clipping_search


def _brevitas_net(seed: int = 0, weight_quant=Int8WeightPerTensorFloat, act_quant=Uint8ActPerTensorFloat,
                  signed_act_quant=Int8ActPerTensorFloat, bits: int = 4) -> nn.Module:
    """A small Brevitas CNN made of the layers a converted model is made of."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        qnn.QuantIdentity(act_quant=signed_act_quant, bit_width=8, return_quant_tensor=True),
        qnn.QuantConv2d(3, 8, 3, weight_quant=weight_quant, weight_bit_width=8, bias_quant=Int32Bias,
                        return_quant_tensor=True),
        qnn.QuantReLU(act_quant=act_quant, bit_width=bits, return_quant_tensor=True),
        qnn.QuantConv2d(8, 8, 3, weight_quant=weight_quant, weight_bit_width=bits, bias_quant=Int32Bias,
                        return_quant_tensor=True),
        qnn.QuantReLU(act_quant=act_quant, bit_width=bits, return_quant_tensor=True),
        nn.Flatten(),
        qnn.QuantLinear(8 * 4 * 4, 5, weight_quant=weight_quant, weight_bit_width=8, bias_quant=Int32Bias),
    )
    return net.eval()


def _inputs(count: int = 3, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 8, 8, generator=gen) for _ in range(count)]


def _calibrate(net: nn.Module) -> nn.Module:
    with torch.no_grad(), calibration_mode(net):
        for x in _inputs():
            net(x)
    return net.eval()


def _hdrq_net(seed: int = 0) -> nn.Module:
    return _calibrate(_brevitas_net(seed, HDRQQuantizer, HDRQActQuantizer, HDRQSignedActQuantizer))


def _rtn(weight: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round(weight / step), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def _conv(bits=4, quant=HDRQQuantizer, seed=0, **kwargs) -> qnn.QuantConv2d:
    torch.manual_seed(seed)
    return qnn.QuantConv2d(4, 6, 3, weight_quant=quant, weight_bit_width=bits, **kwargs)


# --- the weight quantizer ----------------------------------------------------------------------

def test_weight_step_starts_at_the_lp_search_of_the_weight():
    conv = _conv()
    step = conv.quant_weight().scale
    assert torch.equal(step.detach(), lp_clipping_search(conv.weight.detach().flatten(), -8, 7))


def test_per_channel_steps_have_one_entry_per_output_channel():
    assert _conv(quant=HDRQPerChannelQuantizer).quant_weight().scale.shape == (6, 1, 1, 1)
    assert _conv(quant=HDRQQuantizer.let(scaling_per_output_channel=True)).quant_weight().scale.shape == (6, 1, 1, 1)


@pytest.mark.parametrize("bits", [1, 9])
def test_bit_widths_outside_two_to_eight_are_rejected_when_the_layer_is_built(bits):
    for quant in (HDRQQuantizer, AdaRoundQuantizer):
        with pytest.raises(ValueError, match="bit_width=.* outside the supported range 2..8"):
            _conv(bits=bits, quant=quant)
    with pytest.raises(ValueError, match="2..8"):
        qnn.QuantReLU(act_quant=HDRQActQuantizer, bit_width=bits)


def test_eval_integers_are_the_clamped_rounding_of_weight_over_step():
    conv = _conv(bits=3)
    conv.train()
    set_quant_mode(conv, QuantMode.NOISE)
    opt = torch.optim.Adam(conv.parameters(), lr=1e-2)
    for _ in range(3):  # move weights and step off their initial values
        opt.zero_grad()
        conv.quant_weight().value.pow(2).sum().backward()
        opt.step()
    conv.eval()
    assert torch.equal(integer_weight(conv), _rtn(conv.weight, weight_step(conv), 3).to(torch.int64))
    assert torch.equal(conv.quant_weight().int(), integer_weight(conv))


def test_noise_mode_differs_from_rounding_but_stays_within_one_step_inside_the_range():
    conv = _conv()
    conv.train()
    set_quant_mode(conv, "round")
    rounded = conv.quant_weight().value.detach()
    set_quant_mode(conv, "noise")
    noisy = conv.quant_weight().value.detach()
    step = weight_step(conv)
    inside = (conv.weight > -8 * step) & (conv.weight < 7 * step)
    assert not torch.equal(noisy, rounded)
    assert bool(((noisy - rounded).abs()[inside] <= step * (1 + 1e-6)).all())
    assert torch.equal(noisy[~inside], rounded[~inside])  # clipped weights saturate in both modes


def test_eval_rounds_to_nearest_whatever_the_mode():
    conv = _conv()
    rounded = conv.eval().quant_weight().value
    set_quant_mode(conv, "noise")
    assert torch.equal(conv.quant_weight().value, rounded)


def test_ste_mode_gradient_wrt_weight_is_one_inside_and_zero_when_clipped():
    """STE clips on the rounded value (Brevitas and LSQ alike): inside means round(W/s) in range."""
    conv = _conv()
    conv.train()
    set_quant_mode(conv, "ste")
    conv.quant_weight().value.sum().backward()
    codes = torch.round(conv.weight / weight_step(conv))
    inside = ((codes >= -8) & (codes <= 7)).float()
    assert 0 < inside.sum() < inside.numel()
    assert torch.equal(conv.weight.grad, inside)


def test_noise_mode_gradient_wrt_step_is_the_noise_inside_and_the_bound_when_clipped():
    conv = _conv()
    conv.train()
    set_quant_mode(conv, "noise")
    torch.manual_seed(5)
    weight_q = conv.quant_weight().value
    weight_q.sum().backward()
    step = weight_step(conv)
    w = conv.weight.detach()
    noise = (weight_q.detach() - w) / step
    high, low = w >= 7 * step, w <= -8 * step
    inside = ~(high | low)
    expected = noise[inside].sum() + 7 * high.sum() - 8 * low.sum()
    assert weight_scale_parameters(conv)[0].grad.item() == pytest.approx(expected.item(), rel=1e-4)


def test_noise_reproduces_under_the_global_seed():
    conv = _conv()
    conv.train()
    set_quant_mode(conv, "noise")
    torch.manual_seed(11)
    first = conv.quant_weight().value.detach()
    torch.manual_seed(11)
    assert torch.equal(conv.quant_weight().value.detach(), first)


def test_uniform_noise_shape_is_selectable_and_unknown_shapes_are_rejected():
    conv = _conv()
    assert set_noise_shape(conv, "uniform") == 1
    with pytest.raises(ValueError, match="noise_shape"):
        set_noise_shape(conv, "gaussian")


def test_set_weight_step_changes_the_deployed_step():
    conv = _conv()
    set_weight_step(conv, 0.05)
    assert conv.eval().quant_weight().scale.item() == pytest.approx(0.05)
    with pytest.raises(ValueError, match="positive"):
        set_weight_step(conv, -1.0)


def test_forced_reinitialisation_recomputes_the_lp_step_from_the_current_weight():
    conv = _conv()
    conv.quant_weight()
    with torch.no_grad():
        conv.weight.mul_(3)
    assert initialize_weight_scales_mse(conv) == 0
    assert initialize_weight_scales_mse(conv, force=True) == 1
    assert torch.equal(weight_step(conv), lp_clipping_search(conv.weight.detach().flatten(), -8, 7))


# --- the activation quantizers -----------------------------------------------------------------

def test_activation_steps_are_calibrated_by_the_lp_search():
    relu = qnn.QuantReLU(act_quant=HDRQActQuantizer, bit_width=4, return_quant_tensor=True)
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), calibration_mode(relu):
        relu(x)
    (step,) = activation_scale_parameters(relu)
    assert step.item() == pytest.approx(lp_clipping_search(torch.relu(x), 0, 15).item(), rel=1e-6)
    assert not relu.eval()(x).signed


def test_activation_step_gradient_is_lsq_scaled():
    def step_grad(quant):
        identity = _calibrate(nn.Sequential(qnn.QuantIdentity(act_quant=quant, bit_width=4))).train()
        set_quant_mode(identity, "ste")
        identity(_inputs(1)[0]).pow(2).sum().backward()
        return activation_scale_parameters(identity)[0].grad.item()

    numel = 4 * 3 * 8 * 8
    scaled = step_grad(HDRQSignedActQuantizer)
    plain = step_grad(HDRQSignedActQuantizer.let(lsq_gradient_scaling=False))
    assert scaled == pytest.approx(plain / math.sqrt(numel * 7), rel=1e-5)


def test_activation_drop_passes_float_inputs_with_the_given_probability():
    identity = _calibrate(nn.Sequential(qnn.QuantIdentity(act_quant=HDRQSignedActQuantizer, bit_width=4)))
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    identity.train()
    set_quant_mode(identity, "ste")
    assert set_activation_drop(identity, 0.3) == 1
    torch.manual_seed(0)
    passed = (identity(x) == x).float().mean().item()
    assert passed == pytest.approx(0.3, abs=0.02)  # quantized values equal x only on the grid
    set_activation_drop(identity, 0.0)
    assert (identity(x) == x).float().mean().item() < 0.01
    with pytest.raises(ValueError, match="drop_probability"):
        set_activation_drop(identity, 1.0)


def test_round_mode_in_training_equals_evaluation_even_with_drop_set():
    net = _hdrq_net()
    x = _inputs(1, seed=7)[0]
    expected = net.eval()(x)
    net.train()
    set_activation_drop(net, 0.5)
    assert set_quant_mode(net, "round") == 6  # three weight, two ReLU and one input quantizer
    assert torch.equal(net(x), expected)


# --- models: swapping, state dicts --------------------------------------------------------------

def test_swapped_model_in_round_mode_computes_round_to_nearest_with_the_learned_step():
    net = _calibrate(_brevitas_net())
    names = swap_weight_quantizer(net, HDRQQuantizer)
    assert names == ["1", "3", "6"]
    for _, layer in quantized_layers(net):
        bits = int(layer.quant_weight().bit_width)
        step = weight_step(layer)
        assert torch.equal(step, lp_clipping_search(layer.weight.detach().flatten(), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1))
        assert torch.equal(layer.eval().quant_weight().value, _rtn(layer.weight, step, bits) * step)
    assert [int(layer.quant_weight().bit_width) for _, layer in quantized_layers(net)] == [8, 4, 8]
    x = _inputs(1, seed=9)[0]
    expected = net.eval()(x)
    net.train()
    set_quant_mode(net, "round")
    assert torch.equal(net(x), expected)


def test_swapping_keeps_the_float_weights_and_optionally_the_old_step():
    net = _calibrate(_brevitas_net())
    weights = [layer.weight.detach().clone() for _, layer in quantized_layers(net)]
    steps = [layer.quant_weight().scale.detach().clone() for _, layer in quantized_layers(net)]
    swap_weight_quantizer(net, HDRQQuantizer, keep_step=True)
    for (_, layer), weight, step in zip(quantized_layers(net), weights, steps, strict=True):
        assert torch.equal(layer.weight, weight)
        assert torch.allclose(weight_step(layer), step)


def test_swapping_into_a_model_without_quantized_layers_is_an_error():
    with pytest.raises(ValueError, match="no quantized"):
        swap_weight_quantizer(nn.Sequential(nn.Linear(2, 2)), HDRQQuantizer)


def test_state_dict_round_trips_into_a_fresh_model():
    net = _hdrq_net()
    net.train()
    set_quant_mode(net, "noise")
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for x in _inputs(2):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
    fresh = _brevitas_net(seed=123, weight_quant=HDRQQuantizer, act_quant=HDRQActQuantizer,
                          signed_act_quant=HDRQSignedActQuantizer)
    fresh.load_state_dict(net.state_dict())
    x = _inputs(1, seed=5)[0]
    assert torch.equal(fresh.eval()(x), net.eval()(x))


def test_quantized_model_runs_exactly_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from brevitas.export import export_onnx_qcdq

    net = _hdrq_net()
    x = _inputs(1, seed=4)[0]
    path = tmp_path / "net.onnx"
    export_onnx_qcdq(net, args=x, export_path=str(path), opset_version=13, dynamo=False,
                     keep_initializers_as_inputs=False)
    session = ort.InferenceSession(str(path))
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(out, net(x).detach().numpy(), rtol=0, atol=1e-6)


# --- learned rounding (AdaRound) ---------------------------------------------------------------

def test_adaround_starts_at_the_float_weight_inside_the_range():
    conv = _conv(quant=AdaRoundQuantizer)
    conv.train()
    soft = conv.quant_weight().value
    step = weight_step(conv)
    inside = (conv.weight > -8 * step) & (conv.weight < 7 * step)
    assert torch.allclose(soft[inside], conv.weight[inside], atol=1e-6)
    assert set_quant_mode(conv, "noise") == 0  # learned rounding has no noise mode


def test_frozen_adaround_rounds_hard_in_training_and_deploys_floor_plus_decision():
    conv = _conv(quant=AdaRoundQuantizer)
    conv.train()
    conv.quant_weight()
    (v,) = rounding_parameters(conv)
    with torch.no_grad():
        v.copy_(torch.randn(v.shape, generator=torch.Generator().manual_seed(0)) * 3)
    assert freeze_rounding(conv) == 1
    hard_train = conv.quant_weight().value
    step = weight_step(conv)
    h = torch.clamp(torch.sigmoid(v) * 1.2 - 0.1, 0, 1)
    codes = torch.clamp(torch.floor(conv.weight / step) + (h > 0.5).float(), -8, 7)
    assert torch.equal(hard_train, codes * step)
    assert torch.equal(integer_weight(conv), codes.to(torch.int64))


def test_rounding_regularizer_is_the_adaround_formula():
    conv = _conv(quant=AdaRoundQuantizer)
    conv.quant_weight()
    (v,) = rounding_parameters(conv)
    h = torch.clamp(torch.sigmoid(v) * 1.2 - 0.1, 0, 1)
    assert rounding_regularizer(conv, 2.0).item() == pytest.approx((1 - (2 * h - 1).abs().pow(2)).sum().item(), rel=1e-6)
    with pytest.raises(ValueError, match="no learned-rounding"):
        rounding_regularizer(_conv(), 2.0)


def test_adaround_state_dict_round_trips_with_its_frozen_state():
    conv = _conv(quant=AdaRoundQuantizer)
    conv.train()
    conv.quant_weight()
    with torch.no_grad():
        rounding_parameters(conv)[0].add_(torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(1)))
    freeze_rounding(conv)
    fresh = _conv(quant=AdaRoundQuantizer, seed=9)
    fresh.load_state_dict(conv.state_dict())
    fresh.train()
    assert torch.equal(fresh.quant_weight().value, conv.quant_weight().value)


def test_baking_learned_rounding_keeps_the_integers_under_plain_rounding():
    net = _calibrate(_brevitas_net())
    swap_weight_quantizer(net, AdaRoundQuantizer)
    net.train()
    net(_inputs(1)[0])  # initialise V
    for v in rounding_parameters(net):
        with torch.no_grad():
            v.add_(torch.randn(v.shape, generator=torch.Generator().manual_seed(2)))
    codes = [integer_weight(layer) for _, layer in quantized_layers(net)]
    assert bake_learned_rounding(net) == ["1", "3", "6"]
    assert rounding_parameters(net) == []
    for (_, layer), expected in zip(quantized_layers(net), codes, strict=True):
        assert torch.equal(integer_weight(layer), expected)
        assert len(list(layer.weight_quant.parameters())) == 1
