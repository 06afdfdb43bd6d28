"""Peak memory of one training step, and the largest batch that fits a memory budget.

What a user of HOT (docs/hot_method.md §6) wants to know is not the bytes autograd saves but the
peak of a whole step — forward, saved tensors, backward temporaries, gradients — because that is
what must fit the machine. It is measured, not modelled: the resident-set high-water mark of one
forward + backward on a copy of the model (Linux: ``/proc/self/clear_refs`` resets the mark). While
measuring, glibc is told to serve every block ≥ 64 KiB by ``mmap`` (``mallopt``), so a freed tensor
leaves the resident set at once instead of staying cached in the heap: the peak is then the peak
of live memory, the same for plain and HOT steps.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import HDRQPluginError
from .mode import HOTConfig, hot_mode

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter (malloc.h)
_MMAP_THRESHOLD_BYTES = 64 * 1024


class MemoryBudgetError(HDRQPluginError, ValueError):
    """The budget is below the peak of one step at batch size 1, or peaks cannot be measured here."""


@dataclass(frozen=True)
class BatchFit:
    """The largest batch whose measured step peak fits ``budget_bytes`` (``peak_bytes`` at it)."""

    batch_size: int
    peak_bytes: int
    budget_bytes: int
    hot: bool
    limited_by_data: bool  # every sample fits in one batch: the budget would allow more


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        match = re.search(rf"^{field}:\s+(\d+) kB", handle.read(), re.MULTILINE)
    if match is None:
        raise MemoryBudgetError(f"cannot read {field} from /proc/self/status: step peaks need Linux")
    return int(match.group(1))


def _return_freed_blocks_to_the_os() -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "mallopt") or libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES) != 1:
        raise MemoryBudgetError("cannot set glibc's mmap threshold: step peaks need glibc")


def measure_step_peak(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                      hot: HOTConfig | None = None) -> int:
    """Bytes the resident set grows by during one cross-entropy forward + backward of ``model``.

    The peak of a training step after the first (the step's gradients are freed before it, as
    ``zero_grad(set_to_none=True)`` does). Runs on a deep copy in train mode: the caller's
    parameters, gradients and BatchNorm statistics are untouched. ``hot`` back-propagates with
    HOT, ``None`` plainly.
    """
    _return_freed_blocks_to_the_os()
    trial = copy.deepcopy(model).train()
    with hot_mode(trial, hot) if hot is not None else contextlib.nullcontext():
        # one step first: kernels compiled, per-layer choices (LQS) made and the gradients
        # allocated, as in every step of a training loop after the first; then the measured one
        for measured in (False, True):
            for parameter in trial.parameters():
                parameter.grad = None
            if measured:
                before = _status_kib("VmRSS")
                _reset_peak()
            F.cross_entropy(trial(inputs), labels).backward()
    return max(_status_kib("VmHWM") - before, 0) * 1024


def _reset_peak() -> None:
    """VmHWM := VmRSS (Linux ≥ 4.0, proc(5) "clear_refs")."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError as error:
        raise MemoryBudgetError(f"cannot reset the peak resident set ({error})") from error


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
