"""Specifications of merge_models on real Brevitas models (docs/hdrq_method.md §5)."""

import copy

import brevitas.nn as qnn
import pytest
import torch
from tiny_models import tiny_resnet
from torch import nn

from hdrq_plugin import convert_to_brevitas
from hdrq_plugin.convert import calibrate_activations
from hdrq_plugin.convert.to_brevitas import set_weight_bit_width
from hdrq_plugin.merge.float_merge import average_float_models, merge_relative_to
from hdrq_plugin.merge.models import (
    MergeCompatibilityError,
    merge_models,
    read_weight_grid,
)
from hdrq_plugin.quant.control import quantized_layers
from hdrq_plugin.quant.quantizers import HDRQQuantizer

ROUNDINGS = ("noise-sampling", "half-to-even", "random", "naive")


def _adapted(seed: int, shift: float = 0.02) -> nn.Module:
    """A float model 'fine-tuned' from the seed-0 source: its weights moved by seeded noise."""
    model = tiny_resnet(seed=0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(shift * torch.randn(p.shape, generator=gen))
    return model


def _moved(qmodel: nn.Module, seed: int, shift: float = 0.02) -> nn.Module:
    """A copy of a quantized model whose latent weights moved (cheaper than a new conversion)."""
    model = copy.deepcopy(qmodel)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in _layers(model).values():
            layer.weight.add_(shift * torch.randn(layer.weight.shape, generator=gen))
    return model


def _quantized(float_model: nn.Module, spec: str = "w4a4", calibration_seed: int = 1) -> nn.Module:
    qmodel = convert_to_brevitas(float_model, spec)
    gen = torch.Generator().manual_seed(calibration_seed)
    return calibrate_activations(qmodel, [torch.randn(8, 3, 16, 16, generator=gen) for _ in range(2)])


@pytest.fixture(scope="module")
def pair():
    return _quantized(_adapted(1), calibration_seed=1), _quantized(_adapted(2), calibration_seed=2)


@pytest.fixture(scope="module")
def merges(pair):
    """The pair merged once with every rounding rule (default coefficients and seed)."""
    return {rounding: merge_models(list(pair), rounding=rounding) for rounding in ROUNDINGS}


@pytest.fixture(scope="module")
def inputs():
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def _layers(model):
    return dict(quantized_layers(model))


def _codes(model):
    return {name: read_weight_grid(layer, name).codes for name, layer in _layers(model).items()}


@pytest.mark.parametrize("rounding", ["noise-sampling", "naive"])
def test_merging_a_model_with_itself_returns_it_exactly(pair, inputs, rounding):
    model = pair[0]
    merged = merge_models([model, model], rounding=rounding)
    assert torch.equal(merged(inputs), model(inputs))
    assert all(torch.equal(_codes(merged)[n], c) for n, c in _codes(model).items())


def test_model_order_does_not_change_a_half_to_even_merge(pair, merges, inputs):
    forward = merges["half-to-even"]
    backward = merge_models(list(pair)[::-1], rounding="half-to-even")
    assert torch.equal(forward(inputs), backward(inputs))


def test_model_order_changes_a_noise_sampling_merge_only_on_tie_codes(pair, merges):
    forward, backward = _codes(merges["noise-sampling"]), _codes(merge_models(list(pair)[::-1]))
    first, second = _codes(pair[0]), _codes(pair[1])
    for name in first:
        ties = (first[name] + second[name]) % 2 == 1
        assert torch.equal(forward[name][~ties], backward[name][~ties]), name
        assert ((forward[name] - backward[name])[ties].abs() <= 1).all(), name


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_every_merged_weight_lies_on_its_merged_grid(pair, merges, rounding):
    merged = merges[rounding]
    for name, layer in _layers(merged).items():
        scales = [read_weight_grid(_layers(m)[name], name).scale for m in pair]
        grid = read_weight_grid(layer, name)
        assert torch.allclose(grid.scale, (scales[0] + scales[1]) / 2, rtol=1e-6), name
        assert torch.allclose(layer.weight, grid.codes.float() * grid.scale, rtol=1e-6, atol=0), name
        assert grid.qmin <= int(grid.codes.min()) and int(grid.codes.max()) <= grid.qmax, name


def test_noise_sampling_changes_only_tie_codes_of_a_model(pair, merges):
    noisy, even = _codes(merges["noise-sampling"]), _codes(merges["half-to-even"])
    first, second = _codes(pair[0]), _codes(pair[1])
    changed = 0
    for name in first:
        ties = (first[name] + second[name]) % 2 == 1
        assert torch.equal(noisy[name][~ties], even[name][~ties]), name
        changed += int((noisy[name] != even[name]).sum())
    assert changed > 0


def test_activation_scales_and_biases_are_averaged(pair):
    merged = merge_models(list(pair), coefficients=[0.25, 0.75], rounding="half-to-even")
    states = [m.state_dict() for m in pair]
    merged_state = merged.state_dict()
    keys = [k for k in merged_state if k.endswith(".bias") or ("act_quant" in k and k.endswith(".value"))]
    assert any(k.endswith(".bias") for k in keys) and any("act_quant" in k for k in keys)
    for key in keys:
        expected = 0.25 * states[0][key] + 0.75 * states[1][key]
        assert torch.allclose(merged_state[key], expected, rtol=1e-6), key


def test_merging_leaves_the_input_models_unchanged(pair, inputs):
    before = [m(inputs) for m in pair]
    merge_models(list(pair))
    assert all(torch.equal(m(inputs), b) for m, b in zip(pair, before, strict=True))


def test_task_arithmetic_with_a_full_step_towards_one_model_returns_that_model(pair, inputs):
    merged = merge_models([pair[1]], coefficients=[1.0], source=pair[0])
    assert torch.equal(merged(inputs), pair[1](inputs))


def test_task_arithmetic_with_coefficients_summing_to_one_equals_the_plain_merge(pair, inputs):
    source = _moved(pair[0], seed=4)
    plain = merge_models(list(pair), rounding="half-to-even")
    relative = merge_models(list(pair), rounding="half-to-even", source=source)
    assert torch.allclose(relative(inputs), plain(inputs), atol=1e-6)


def test_float_models_are_averaged_like_average_float_models(inputs):
    models = [_adapted(1), _adapted(2)]
    merged = merge_models(models, coefficients=[0.3, 0.7])
    assert torch.equal(merged(inputs), average_float_models(models, [0.3, 0.7])(inputs))


def test_float_task_arithmetic_matches_merge_relative_to(inputs):
    source, models = tiny_resnet(seed=0), [_adapted(1), _adapted(2)]
    merged = merge_models(models, coefficients=[0.6, 0.7], source=source)
    assert torch.equal(merged(inputs), merge_relative_to(source, models, [0.6, 0.7])(inputs))


def test_models_with_different_bit_widths_raise_naming_the_layer(pair):
    other = copy.deepcopy(pair[1])
    set_weight_bit_width(_layers(other)["layer1.0.conv1"], 3)
    with pytest.raises(MergeCompatibilityError, match="layer 'layer1.0.conv1'.*bit_width"):
        merge_models([pair[0], other])


def test_models_with_different_granularities_raise_naming_the_layer(pair):
    other = copy.deepcopy(pair[1])
    proxy = _layers(other)["layer2.0.conv1"].weight_quant
    proxy.quant_injector = proxy.quant_injector.let(scaling_per_output_channel=True)
    proxy.init_tensor_quant()
    _layers(other)["layer2.0.conv1"].quant_weight()  # materialise the per-channel scale
    with pytest.raises(MergeCompatibilityError, match="layer 'layer2.0.conv1'.*granularity"):
        merge_models([pair[0], other])


def test_models_with_different_architectures_raise_naming_the_layer(pair):
    other = _quantized(tiny_resnet(width=4))
    with pytest.raises(MergeCompatibilityError, match="layer 'conv1'"):
        merge_models([pair[0], other])


def test_an_uncalibrated_model_is_rejected_naming_the_layer(pair):
    uncalibrated = convert_to_brevitas(_adapted(2), "w4a4")
    with pytest.raises(MergeCompatibilityError, match="model 1 is not calibrated.*layer 'relu'"):
        merge_models([pair[0], uncalibrated])


def test_quantized_and_float_models_cannot_be_merged_together(pair):
    with pytest.raises(TypeError, match="quantized"):
        merge_models([pair[0], _adapted(2)])


def test_negative_coefficients_need_a_source(pair):
    with pytest.raises(ValueError, match="source"):
        merge_models(list(pair), coefficients=[1.5, -0.5])


def test_a_weight_quantizer_without_a_learnable_scale_is_rejected_naming_the_layer():
    models = [nn.Sequential(qnn.QuantLinear(4, 3, bias=False, weight_bit_width=4)) for _ in range(2)]
    with pytest.raises(TypeError, match="layer '0'.*learnable scale"):
        merge_models(models)


def test_models_built_with_the_hdrq_quantizer_merge_onto_one_grid():
    torch.manual_seed(0)
    models = [nn.Sequential(qnn.QuantConv2d(3, 4, 3, weight_quant=HDRQQuantizer, weight_bit_width=4))
              for _ in range(2)]
    merged = merge_models(models, rounding="half-to-even")
    grid = read_weight_grid(merged[0], "0")
    scales = [read_weight_grid(m[0], "0").scale for m in models]
    assert torch.allclose(grid.scale, (scales[0] + scales[1]) / 2)
    assert torch.allclose(merged[0].weight, grid.codes.float() * grid.scale, rtol=1e-6, atol=0)


def test_merging_three_models_keeps_the_grid_and_averages_the_scales(pair):
    third = _moved(pair[1], seed=3)
    models = [*pair, third]
    merged = merge_models(models)
    for name, layer in _layers(merged).items():
        scales = [read_weight_grid(_layers(m)[name], name).scale for m in models]
        assert torch.allclose(read_weight_grid(layer, name).scale, sum(scales) / 3, rtol=1e-6), name


def test_the_merged_model_keeps_the_training_flag_of_the_first_model(pair):
    model = copy.deepcopy(pair[0]).train()
    assert merge_models([model, pair[1]]).training
