"""Passes of NIPQ training over data that are not training steps (docs/nipq_method.md "Schedule").

Activation truncations start from observed ranges; BatchNorm statistics are re-estimated with
the hard-quantized forward when phase 2 begins.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..data import split_batch
from ..quant.step_size import lp_clipping_search
from .quantizers import LearnedBitWidth, LearnedTruncation

__all__ = ["inputs_of", "labels_of", "observe_activation_ranges", "reestimate_batchnorm", "fit_truncations"]


@torch.no_grad()
def observe_activation_ranges(model: nn.Module, data, *, batches: int = 4) -> int:
    """Set every activation truncation α to the mean over ``batches`` of the batch max|x|.

    The reference starts at fixed 6 / 3 (ReLU6 MobileNet-v2); a plain-ReLU model's ranges differ,
    so by default α starts where Brevitas' max calibration would put it. Returns how many were set.
    """
    truncations = [m for name, m in model.named_modules() if isinstance(m, LearnedTruncation)
                   and ".weight_quant." not in f".{name}."]
    for m in truncations:
        m.observing, m.observed = True, []
    try:
        _forward_batches(model, data, batches, training=False)
    finally:
        for m in truncations:
            m.observing = False
    for m in truncations:
        if m.observed:
            m.set_truncation(max(sum(m.observed) / len(m.observed), 1e-6))
    return sum(bool(m.observed) for m in truncations)


@torch.no_grad()
def _truncation_owners(model: nn.Module):
    """``(name, tensor quantizer)`` of every NIPQ quantizer with a learned truncation and width."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(getattr(m, "scaling_impl", None), LearnedTruncation)
            and isinstance(getattr(m, "msb_clamp_bit_width_impl", None), LearnedBitWidth)]


def truncation_widths(model: nn.Module) -> dict[str, int]:
    """The width each NIPQ truncation is at now, by quantizer name (``fit_truncations``' ``fitted_at``)."""
    return {name: int(m.msb_clamp_bit_width_impl.rounded()) for name, m in _truncation_owners(model)}


def fit_truncations(model: nn.Module, data, *, batches: int = 4, weights: bool = True,
                    activations: bool = True, fitted_at: dict[str, int] | None = None) -> int:
    """Set every NIPQ truncation α (weights and activations) to the L_p-optimal clipping at the
    width its quantizer deploys now (``round(b_c)`` or the frozen width); returns how many.

    Why (docs/nipq_method.md §6, "Truncations at the deployed width"): α from max|x| is the
    right range at 8 bits, but at 3 bits it puts most activations in the rounding dead zone
    (|x| < Δ/2 → 0), and the noise proxy does not see that zone (x + ε·Δ passes small values
    unbiased), so α never learns to shrink and the hard-rounded model collapses (optdigits,
    uniform 3 bits: 10.8 % against STE's 88.3 %). The search is the one the HDRQ and RTN
    calibrations use (:func:`hdrq_plugin.quant.step_size.lp_clipping_search`), on the inputs
    of ``batches`` hard-rounded (eval-mode) forwards.

    ``fitted_at``: the width each quantizer's α was last fitted at (by name), updated here; a
    quantizer still at that width keeps the α it has learned since (issue 21, fourth round:
    re-fitting every weight α when the landed widths froze cost 1.7 points on optdigits avg 4).
    """
    owners = {name: m for name, m in _truncation_owners(model)
              if (weights if ".weight_quant." in f".{name}." else activations)
              and (fitted_at is None or fitted_at.get(name) != int(m.msb_clamp_bit_width_impl.rounded()))}
    for m in owners.values():
        m.scaling_impl.sampling, m.scaling_impl.samples = True, []
    try:
        _forward_batches(model, data, batches, training=False)
    finally:
        for m in owners.values():
            m.scaling_impl.sampling = False
    fitted = 0
    for name, m in owners.items():
        samples, m.scaling_impl.samples = m.scaling_impl.samples, []
        if not samples:
            continue
        bits = m.msb_clamp_bit_width_impl.rounded()
        qmin, qmax = int(m.int_quant.min_int(bits)), int(m.int_quant.max_int(bits))
        step = lp_clipping_search(torch.cat(samples), qmin, qmax)
        # α = Δ·threshold, the inverse of Brevitas' scale = α / int_threshold(b)
        m.scaling_impl.set_truncation(max(float(step) * float(m.int_scaling_impl(bits)), 1e-6))
        if fitted_at is not None:
            fitted_at[name] = int(bits)
        fitted += 1
    return fitted


def _forward_batches(model: nn.Module, data, batches: int, *, training: bool) -> None:
    """Run up to ``batches`` batches through ``model`` in train or eval mode, restoring its mode."""
    was_training = model.training
    model.train(training)
    try:
        for index, batch in enumerate(data):
            if index >= batches:
                break
            model(inputs_of(batch))
    finally:
        model.train(was_training)


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, data, *, batches: int = 50) -> int:
    """Reset and recompute BatchNorm running statistics with the quantized forward (docs/nipq_method.md phase 2).

    Returns the number of BatchNorm layers updated (0 for converted models, whose BN is folded).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    try:
        _forward_batches(model, data, batches, training=True)
    finally:
        for m, momentum in saved:
            m.momentum = momentum
    return len(norms)


def inputs_of(batch) -> Tensor:
    return split_batch(batch, "training data")[0]


def labels_of(batch) -> Tensor | None:
    return split_batch(batch, "training data")[1]
