"""Float weight averaging: the reference merge."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hdrq_examples.models import ResNetConfig, build_resnet
from hdrq_plugin.merge.float_merge import average_float_models, merge_relative_to


def _small_net(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2)).eval()


def _linear(seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(3, 2)


def test_merging_a_model_with_itself_is_identity():
    model = _linear(0)
    merged = average_float_models([model, model, model])
    for name, tensor in model.state_dict().items():
        assert torch.allclose(merged.state_dict()[name], tensor)


def test_default_merge_is_the_elementwise_mean():
    a, b = _linear(0), _linear(1)
    merged = average_float_models([a, b])
    assert torch.allclose(merged.weight, (a.weight + b.weight) / 2)
    assert torch.allclose(merged.bias, (a.bias + b.bias) / 2)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3).filter(lambda c: sum(c) > 1e-3))
def test_coefficients_weight_each_model(raw):
    coefficients = [c / sum(raw) for c in raw]
    models = [_linear(seed) for seed in range(3)]
    merged = average_float_models(models, coefficients)
    expected = sum(c * m.weight for c, m in zip(coefficients, models, strict=True))
    assert torch.allclose(merged.weight, expected, atol=1e-6)


def test_batchnorm_running_statistics_are_averaged_too():
    a, b = build_resnet(ResNetConfig(widths=(4, 8))), build_resnet(ResNetConfig(widths=(4, 8)))
    a.bn1.running_mean.fill_(1.0)
    b.bn1.running_mean.fill_(3.0)
    assert torch.allclose(average_float_models([a, b]).bn1.running_mean, torch.full((4,), 2.0))


def test_integer_buffers_are_copied_from_the_first_model():
    a, b = build_resnet(ResNetConfig(widths=(4, 8))), build_resnet(ResNetConfig(widths=(4, 8)))
    a.bn1.num_batches_tracked.fill_(7)
    b.bn1.num_batches_tracked.fill_(100)
    assert int(average_float_models([a, b]).bn1.num_batches_tracked) == 7


def test_inputs_are_not_modified():
    a, b = _linear(0), _linear(1)
    before = a.weight.detach().clone()
    merged = average_float_models([a, b])
    merged.weight.data.zero_()
    assert torch.equal(a.weight, before)


def test_coefficients_that_do_not_sum_to_one_are_rejected():
    with pytest.raises(ValueError, match="sum to 1"):
        average_float_models([_linear(0), _linear(1)], [0.5, 0.6])


def test_negative_coefficients_are_rejected():
    with pytest.raises(ValueError, match="non-negative"):
        average_float_models([_linear(0), _linear(1)], [1.5, -0.5])


def test_non_convex_coefficients_are_allowed_when_asked_for():
    a, b = _linear(0), _linear(1)
    merged = average_float_models([a, b], [2.0, -1.0], require_convex=False)
    assert torch.allclose(merged.weight, 2 * a.weight - b.weight, atol=1e-6)


def test_wrong_number_of_coefficients_is_rejected():
    with pytest.raises(ValueError, match="3 coefficients for 2 models"):
        average_float_models([_linear(0), _linear(1)], [0.2, 0.3, 0.5])


def test_models_of_different_shapes_are_rejected_naming_the_entry():
    with pytest.raises(ValueError, match="weight"):
        average_float_models([nn.Linear(3, 2), nn.Linear(4, 2)])


def test_models_of_different_classes_are_rejected():
    with pytest.raises(TypeError, match="Conv2d"):
        average_float_models([nn.Linear(3, 2), nn.Conv2d(3, 2, 1)])


def test_an_empty_list_is_rejected():
    with pytest.raises(ValueError, match="at least one"):
        average_float_models([])


def test_task_arithmetic_with_coefficients_summing_to_one_is_the_average():
    source, a, b = _linear(0), _linear(1), _linear(2)
    relative = merge_relative_to(source, [a, b], [0.5, 0.5])
    assert torch.allclose(relative.weight, average_float_models([a, b]).weight, atol=1e-6)


def test_task_arithmetic_with_zero_coefficients_returns_the_source():
    source, a = _linear(0), _linear(1)
    assert torch.allclose(merge_relative_to(source, [a], [0.0]).weight, source.weight)


def test_task_arithmetic_adds_scaled_task_vectors():
    source, a, b = _linear(0), _linear(1), _linear(2)
    merged = merge_relative_to(source, [a, b], [0.3, 0.3])
    expected = source.weight + 0.3 * (a.weight - source.weight) + 0.3 * (b.weight - source.weight)
    assert torch.allclose(merged.weight, expected, atol=1e-6)


def test_merged_conv_network_runs():
    inputs = torch.randn(2, 3, 6, 6)
    models = [_small_net(seed) for seed in range(2)]
    assert average_float_models(models)(inputs).shape == (2, 2)
