"""Peak of one training step (live tensor bytes) and the batch that fits a memory budget."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hdrq_plugin.errors import HDRQPluginError
from hdrq_plugin.hot.budget import (
    MemoryBudgetError,
    fit_batch_to_budget,
    live_tensor_peak,
    measure_step_peak,
    peak_of_events,
)
from hdrq_plugin.hot.mode import HOTConfig

MIB = 1 << 20


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def _data(count: int, size: int = 32):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(count, 3, size, size, generator=generator), torch.randint(0, 10, (count,), generator=generator)


def test_peak_of_events_is_the_highest_running_sum():
    assert peak_of_events([]) == 0
    assert peak_of_events([5, -5, 3, 4, -7]) == 7
    assert peak_of_events([-10, 4]) == 0  # frees of what was live before the block count from 0
    assert peak_of_events([10, -4, 6, -12, 1]) == 12


def test_live_tensor_peak_counts_exactly_what_is_alive_together():
    with live_tensor_peak() as measured:
        a = torch.empty(MIB // 4)  # 1 MiB
        b = torch.empty(MIB // 2)  # 2 MiB: 3 MiB live
        del a
        c = torch.empty(MIB // 8)  # 0.5 MiB: 2.5 MiB live
        del b, c
    assert measured["peak_bytes"] == 3 * MIB


def test_a_step_peak_does_not_depend_on_the_heap_state():
    model, (images, labels) = _net(), _data(16)
    first = measure_step_peak(model, images, labels)
    ballast = [torch.randn(MIB // 4) for _ in range(32)]  # fill and fragment the heap
    del ballast[::2]
    assert measure_step_peak(model, images, labels) == first
    assert measure_step_peak(model, images, labels, HOTConfig()) == measure_step_peak(model, images, labels, HOTConfig())


def test_a_step_peak_covers_the_gradients_and_the_saved_maps():
    model, (images, labels) = _net(), _data(16)
    peak = measure_step_peak(model, images, labels)
    grads = sum(p.numel() * 4 for p in model.parameters())
    # plain autograd keeps at least the float input of the second conv (16×16×32×32 floats)
    assert peak > grads + 16 * 16 * 32 * 32 * 4


def _small_chunks(monkeypatch):
    """HOT's chunks hold 4 MiB of float32, as much as this tiny net's largest map: scaled down to
    the benchmark models' proportion (a chunk ≈ 1/8 of a map) so the comparison means the same."""
    from hdrq_plugin.hot import activations, backward, hadamard

    for module in (activations, backward, hadamard):
        monkeypatch.setattr(module, "_CHUNK", 1 << 14)


def test_hot_lowers_the_peak_and_the_caller_model_is_untouched(monkeypatch):
    _small_chunks(monkeypatch)
    model, (images, labels) = _net(), _data(32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain, hot = measure_step_peak(model, images, labels), measure_step_peak(model, images, labels, HOTConfig())
    assert hot < 0.6 * plain
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_peaks_grow_with_the_batch_and_the_fit_is_the_largest_that_fits():
    model, (images, labels) = _net(), _data(40)
    peaks = {batch: measure_step_peak(model, images[:batch], labels[:batch]) for batch in (4, 5, 8)}
    assert peaks[4] < peaks[5] < peaks[8]
    fit = fit_batch_to_budget(model, images, labels, peaks[5])
    assert (fit.batch_size, fit.peak_bytes, fit.hot, fit.limited_by_data) == (5, peaks[5], False, False)
    assert fit_batch_to_budget(model, images, labels, peaks[5] - 1).batch_size == 4
    everything = fit_batch_to_budget(model, images, labels, 1 << 40)
    assert everything.batch_size == 40 and everything.limited_by_data


def test_hot_fits_a_larger_batch_in_the_same_budget(monkeypatch):
    _small_chunks(monkeypatch)
    model, (images, labels) = _net(), _data(64)
    budget = measure_step_peak(model, images[:16], labels[:16])
    assert fit_batch_to_budget(model, images, labels, budget, HOTConfig()).batch_size > 16


@pytest.mark.parametrize("budget", [0, -1, 1000])
def test_a_budget_below_one_sample_is_one_line_error(budget):
    model, (images, labels) = _net(), _data(4)
    with pytest.raises(MemoryBudgetError) as error:
        fit_batch_to_budget(model, images, labels, budget)
    assert isinstance(error.value, HDRQPluginError) and "\n" not in str(error.value)


def test_mismatched_labels_are_rejected():
    model, (images, labels) = _net(), _data(4)
    with pytest.raises(MemoryBudgetError):
        fit_batch_to_budget(model, images, labels[:3], 1 << 30)


def test_adapt_to_target_picks_the_batch_that_fits():
    from hdrq_examples.models import ResNetConfig, build_resnet
    from hdrq_examples.training import TrainConfig, adapt_to_target

    torch.manual_seed(0)
    source = build_resnet(ResNetConfig(widths=(8, 16, 32)))
    images, labels = _data(48, 16)
    data = torch.utils.data.TensorDataset(images, labels)
    config = TrainConfig(epochs=1, lr=0.01, batch_size=4, augment=None, hot=True)
    budget = measure_step_peak(source, images[:12], labels[:12], HOTConfig())
    adapted = adapt_to_target(source, data, config, seed=0, memory_budget=budget)
    assert adapted.batch_fit.batch_size == 12 and adapted.batch_fit.hot
    assert adapted.batch_fit.peak_bytes <= budget
    assert not any(torch.equal(a, s) for a, s in zip(adapted.parameters(), source.parameters(), strict=True))
    F.cross_entropy(adapted(images), labels)  # a usable model
