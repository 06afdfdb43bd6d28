"""Peak memory of one training step, and the largest batch that fits a memory budget.

What a user of HOT (docs/hot_method.md §6) wants to know is not the bytes autograd saves but the
peak of a whole step — forward, saved tensors, backward temporaries, gradients — because that is
what must fit the machine. It is measured, not modelled: torch's own profiler reports every
allocation and free of torch's CPU allocator (``profile_memory=True``), and the peak is the
highest running sum of those events over one forward + backward. That is the peak of live tensor
bytes: it does not depend on the process heap (a resident-set high-water mark does: freed blocks
the C library keeps, other threads, earlier steps), so the same step always measures the same.
Memory outside torch's allocator (oneDNN's scratch pads, the interpreter) is not counted.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from ..errors import HDRQPluginError
from .mode import HOTConfig, hot_mode


class MemoryBudgetError(HDRQPluginError, ValueError):
    """The budget is below the peak of one step at batch size 1, or the inputs cannot be batched."""


@dataclass(frozen=True)
class BatchFit:
    """The largest batch whose measured step peak fits ``budget_bytes`` (``peak_bytes`` at it)."""

    batch_size: int
    peak_bytes: int
    budget_bytes: int
    hot: bool
    limited_by_data: bool  # every sample fits in one batch: the budget would allow more


def peak_of_events(byte_deltas) -> int:
    """Highest running sum of allocation (+) and free (−) sizes, from 0 (never below 0)."""
    running = peak = 0
    for delta in byte_deltas:
        running += delta
        peak = max(peak, running)
    return peak


@contextlib.contextmanager
def live_tensor_peak():
    """Measures the peak growth of live CPU tensor bytes inside the block: ``result["peak_bytes"]``.

    Frees of tensors allocated before the block count too (a step frees its saved tensors), so
    the figure is the peak above what was live when the block began.
    """
    result: dict[str, int] = {}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        yield result
    events = [event for event in profiler.profiler.kineto_results.events()
              if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda event: event.start_ns())  # stable: same-time events keep their order
    result["peak_bytes"] = peak_of_events(event.nbytes() for event in events)


def measure_step_peak(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                      hot: HOTConfig | None = None) -> int:
    """Peak growth of live tensor bytes during one cross-entropy forward + backward of ``model``.

    The peak of a training step after the first (the step's gradients are freed before it, as
    ``zero_grad(set_to_none=True)`` does; they count in the peak). Runs on a deep copy in train
    mode: the caller's parameters, gradients and BatchNorm statistics are untouched. ``hot``
    back-propagates with HOT, ``None`` plainly.
    """
    trial = copy.deepcopy(model).train()
    with hot_mode(trial, hot) if hot is not None else contextlib.nullcontext():
        # one step first: per-layer choices (LQS) made, as in every step of a loop after the first
        F.cross_entropy(trial(inputs), labels).backward()
        for parameter in trial.parameters():
            parameter.grad = None
        with live_tensor_peak() as measured:
            F.cross_entropy(trial(inputs), labels).backward()
    return measured["peak_bytes"]


def fit_batch_to_budget(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, budget_bytes: int,
                        hot: HOTConfig | None = None) -> BatchFit:
    """The largest batch of ``images`` whose one-step peak (:func:`measure_step_peak`) ≤ ``budget_bytes``.

    Doubles the batch until a step no longer fits, then bisects; every answer is a measured step.
    """
    if budget_bytes <= 0:
        raise MemoryBudgetError(f"memory budget must be positive, got {budget_bytes} bytes")
    if len(images) == 0 or len(images) != len(labels):
        raise MemoryBudgetError(f"need as many labels as images (≥ 1), got {len(images)} and {len(labels)}")

    def peak(batch: int) -> int:
        return measure_step_peak(model, images[:batch], labels[:batch], hot)

    fitting, fitting_peak = 1, peak(1)
    if fitting_peak > budget_bytes:
        raise MemoryBudgetError(
            f"one step at batch 1 peaks at {fitting_peak / 2**20:.1f} MiB, over the budget of "
            f"{budget_bytes / 2**20:.1f} MiB")
    failing = None
    while failing is None and fitting < len(images):
        trial = min(2 * fitting, len(images))
        trial_peak = peak(trial)
        if trial_peak <= budget_bytes:
            fitting, fitting_peak = trial, trial_peak
        else:
            failing = trial
    while failing is not None and failing - fitting > 1:
        middle = (fitting + failing) // 2
        middle_peak = peak(middle)
        if middle_peak <= budget_bytes:
            fitting, fitting_peak = middle, middle_peak
        else:
            failing = middle
    return BatchFit(fitting, fitting_peak, budget_bytes, hot is not None, limited_by_data=failing is None)
