"""Specifications of the error barrier (docs/hdrq_method.md §2) and its plot."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_resnet

from hdrq_plugin import convert_to_brevitas
from hdrq_plugin.convert import calibrate_activations
from hdrq_plugin.merge.barrier import (
    BarrierResult,
    error_barrier,
    evaluate_loss_and_accuracy,
    interpolation_barriers,
    plot_barrier,
)
from hdrq_plugin.quant.control import quantized_layers


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 3, 12, 12, generator=gen), torch.randint(0, 10, (8,), generator=gen))
            for _ in range(2)]


@pytest.fixture(scope="module")
def float_pair():
    return tiny_resnet(seed=0), tiny_resnet(seed=1)


@pytest.fixture(scope="module")
def quantized_pair(data):
    first = convert_to_brevitas(tiny_resnet(seed=0), "w4a4")
    calibrate_activations(first, data)
    second = copy.deepcopy(first)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in quantized_layers(second):
            layer.weight.add_(0.05 * torch.randn(layer.weight.shape, generator=gen))
    return first, second


def test_barrier_is_the_excess_over_the_straight_line_between_the_endpoint_losses():
    assert interpolation_barriers([0.0, 0.5, 1.0], [1.0, 3.0, 2.0]) == (0.0, 1.5, 0.0)


def test_max_barrier_and_its_lambda_come_from_the_curve():
    result = BarrierResult((0.0, 0.25, 0.5, 1.0), (1.0, 2.0, 1.0, 1.0), (1.0, 0.5, 1.0, 1.0), quantized=False)
    assert result.max_barrier == 1.0 and result.max_barrier_lambda == 0.25
    assert result.midpoint_barrier == 0.0


def test_result_summary_is_json_ready():
    result = BarrierResult((0.0, 0.5, 1.0), (1.0, 3.0, 2.0), (1.0, 0.5, 1.0), quantized=True, label="w4a4")
    summary = json.loads(json.dumps(result.to_dict()))
    assert summary["max_barrier"] == 1.5 and summary["barriers"] == [0.0, 1.5, 0.0]


def test_barrier_of_a_float_model_with_itself_is_zero(float_pair, data):
    result = error_barrier(float_pair[0], float_pair[0], data, steps=3)
    assert result.max_barrier == pytest.approx(0.0, abs=1e-6)
    assert not result.quantized


def test_barrier_of_a_quantized_model_with_itself_is_zero(quantized_pair, data):
    result = error_barrier(quantized_pair[0], quantized_pair[0], data, steps=3, quantized=True, trials=10)
    assert result.max_barrier == pytest.approx(0.0, abs=1e-6)


def test_quantized_curve_endpoints_equal_the_models_losses(quantized_pair, data):
    result = error_barrier(*quantized_pair, data, steps=3, rounding="half-to-even")
    assert result.losses[0] == evaluate_loss_and_accuracy(quantized_pair[0], data)[0]
    assert result.losses[-1] == evaluate_loss_and_accuracy(quantized_pair[1], data)[0]
    assert result.lambdas == (0.0, 0.5, 1.0)


def test_float_curve_endpoints_equal_the_models_losses_and_accuracies(float_pair, data):
    result = error_barrier(*float_pair, data, steps=2)
    assert (result.losses[0], result.accuracies[0]) == evaluate_loss_and_accuracy(float_pair[0], data)
    assert (result.losses[-1], result.accuracies[-1]) == evaluate_loss_and_accuracy(float_pair[1], data)


def test_a_custom_loss_is_used(float_pair, data):
    result = error_barrier(*float_pair, data, steps=2, loss=lambda logits, y: F.cross_entropy(logits, y) * 0 + 1)
    assert result.losses == (1.0, 1.0)


def test_plot_is_written_as_a_png_and_leaves_no_temporary_file(tmp_path):
    results = [BarrierResult((0.0, 0.5, 1.0), (1.0, 2.0, 1.5), (0.9, 0.5, 0.8), quantized=q) for q in (False, True)]
    path = plot_barrier(results, tmp_path / "barrier.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["barrier.png"]


def test_plot_rejects_a_path_that_is_not_png(tmp_path):
    result = BarrierResult((0.0, 1.0), (1.0, 1.0), (1.0, 1.0), quantized=False)
    with pytest.raises(ValueError, match="PNG"):
        plot_barrier(result, tmp_path / "barrier.jpg")


def test_a_quantized_flag_that_contradicts_the_models_is_rejected(float_pair, data):
    with pytest.raises(TypeError, match="quantized=True"):
        error_barrier(*float_pair, data, quantized=True)


def test_one_shot_iterators_are_rejected(float_pair, data):
    with pytest.raises(TypeError, match="one-shot"):
        error_barrier(*float_pair, iter(data), steps=2)


@pytest.mark.parametrize("steps", [1, 0, 2.5])
def test_fewer_than_two_steps_are_rejected(float_pair, data, steps):
    with pytest.raises(ValueError, match="steps"):
        error_barrier(*float_pair, data, steps=steps)


def test_dense_outputs_give_the_per_pixel_loss_and_the_pixel_accuracy():
    """Segmentation (issue 23): [N, C, H, W] logits against [N, H, W] masks."""
    gen = torch.Generator().manual_seed(1)
    head = torch.nn.Conv2d(3, 4, 1)
    images, masks = torch.randn(6, 3, 5, 5, generator=gen), torch.randint(0, 4, (6, 5, 5), generator=gen)
    loss, accuracy = evaluate_loss_and_accuracy(head, [(images[:4], masks[:4]), (images[4:], masks[4:])])
    with torch.no_grad():
        logits = head(images)
    assert loss == pytest.approx(float(F.cross_entropy(logits, masks)), rel=1e-5)
    assert accuracy == pytest.approx(float((logits.argmax(1) == masks).float().mean()))
    assert 0.0 <= accuracy <= 1.0
