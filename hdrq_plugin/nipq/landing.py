"""Landing the learned widths on the budget during training: coarse-to-fine freezing with error diffusion.

A gradient on the rounded totals cannot hit the budget when one tensor holds about half of it
(the digits ResNet's ``layer3.0.conv2``: one bit of it is 0.48 average bit), so the rounded
total swings round the budget and a projection at the freeze moved 0.07–0.47 average bit at
once (docs/nipq_method.md §6, issue 21). Here the widths land by construction, over a window of
training steps before the freeze point:

- the learned widths freeze one at a time, **largest share of the budget first** (numel share of
  their kind for average bits; share of the layers' MACs they multiply for BOPs), so the coarse
  moves are decided early and the smallest widths, whose one-bit moves are the finest, close
  the gap last;
- each freezes at ``round(b_c − s)``, where ``s`` is the uniform shift (in bits) that puts the
  still-free widths, at their continuous ``b_c``, on the remaining budget (error diffusion: what
  one width's rounding over- or under-spends, the next ones take back), clamped so the widths left
  can still meet the budget; the last one takes what is left, rounded down, so the total ends at
  most the budget;
- between two freezes the weights and the free widths keep training (the free widths under the
  deployed-width cost of :mod:`hdrq_plugin.nipq.cost`), so every move is absorbed by training.

Pure bookkeeping on :class:`hdrq_plugin.nipq.cost.CostModel`; the loop that calls it is
:func:`hdrq_plugin.nipq.train.nipq_train`.
"""

from __future__ import annotations

import math

import torch

from ..bitspec import MAX_BITS, MIN_BITS
from .budget import NIPQTarget
from .cost import CostModel, TensorCost

__all__ = ["landing_order", "landing_steps", "freeze_on_remaining_budget"]


def _budgeted(cost: CostModel, target: NIPQTarget) -> list[tuple[str, TensorCost]]:
    """(budget key, tensor) for every learned tensor the target constrains."""
    if target.bops is not None:
        return [("bops", t) for t in cost.weights + cost.activations if not t.bits.pinned]
    found = []
    for kind, bits in (("weights", target.weight_bits), ("activations", target.act_bits)):
        if bits is not None:
            found += [(kind, t) for t in cost._tensors(kind) if not t.bits.pinned]
    return found


def _bops_share(cost: CostModel) -> dict[int, float]:
    """Share of the layers' MACs each width multiplies (static: a resumed run gets the same order)."""
    macs = dict.fromkeys((id(t.bits) for t in cost.weights + cost.activations), 0.0)
    for layer in cost.layers:
        macs[id(layer.weight.bits)] += layer.macs
        macs[id(layer.input_bits)] = macs.get(id(layer.input_bits), 0.0) + layer.macs
    total = sum(layer.macs for layer in cost.layers) or 1.0
    return {k: v / total for k, v in macs.items()}


def landing_order(cost: CostModel, target: NIPQTarget) -> list[TensorCost]:
    """The budgeted learned tensors, largest share of their budget first (ties: by name)."""
    budgeted = _budgeted(cost, target)
    if target.bops is not None:
        share = _bops_share(cost)
        key = {id(t): share[id(t.bits)] for _, t in budgeted}
    else:
        totals = {kind: sum(t.numel for k, t in budgeted if k == kind) for kind, _ in budgeted}
        key = {id(t): t.numel / totals[kind] for kind, t in budgeted}
    return sorted((t for _, t in budgeted), key=lambda t: (-key[id(t)], t.name))


def landing_steps(count: int, start: int, end: int) -> list[int]:
    """The step after which each of ``count`` widths freezes, spread evenly over ``[start, end)``
    (several per step when the window is shorter than ``count``); empty window: all at ``end``."""
    if end <= start:
        return [end] * count
    return [start + (k * (end - start)) // count for k in range(count)]


def _value(t: TensorCost, overrides: dict[int, float]) -> float:
    if id(t.bits) in overrides:
        return overrides[id(t.bits)]
    return float(t.bits.frozen_bits) if t.bits.is_frozen else float(t.bits.continuous())


def _bops(cost: CostModel, overrides: dict[int, float]) -> float:
    """The layers' BOPs with the widths in ``overrides`` (by ``id`` of the width), the rest as they are."""
    values = {id(t.bits): _value(t, overrides) for t in cost.weights + cost.activations}
    return sum(layer.macs * values[id(layer.weight.bits)] * values[id(layer.input_bits)] for layer in cost.layers)


@torch.no_grad()
def freeze_on_remaining_budget(cost: CostModel, target: NIPQTarget, tensor: TensorCost) -> tuple[int, int]:
    """Freeze ``tensor``'s width so the still-free widths can meet the remaining budget (module doc).

    Returns ``(frozen width, round(b_c) before)``: their difference is the move this landing made.
    """
    rounded = int(tensor.bits.rounded().item())
    kind = "bops" if target.bops is not None else next(k for k, t in _budgeted(cost, target) if t is tensor)
    peers = [t for k, t in _budgeted(cost, target) if k == kind]
    others = [t for t in peers if t is not tensor and not t.bits.is_frozen]
    b = float(tensor.bits.continuous())

    if kind == "bops":
        budget = float(target.bops)

        def spent(width: float, rest: float | None) -> float:
            """BOPs with ``tensor`` at ``width``, the other free widths at ``rest`` (None: their b_c)."""
            overrides = {id(tensor.bits): width}
            if rest is not None:
                overrides.update({id(t.bits): rest for t in others})
            return _bops(cost, overrides)

        def shifted(s: float) -> float:
            """BOPs with every free width (this one included) moved down by ``s`` bits."""
            overrides = {id(t.bits): min(max(_value(t, {}) - s, MIN_BITS), MAX_BITS) for t in others}
            overrides[id(tensor.bits)] = min(max(b - s, MIN_BITS), MAX_BITS)
            return _bops(cost, overrides)

        low, high = -float(MAX_BITS), float(MAX_BITS)  # shifted() falls with s: bisect onto the budget
        while high - low > 1e-6:
            mid = (low + high) / 2
            low, high = (low, mid) if shifted(mid) <= budget else (mid, high)
        shift = high

        def fits(width: int) -> bool:  # the others, at 2 bits, can still meet the budget
            return spent(float(width), float(MIN_BITS)) <= budget * (1 + 1e-9)
    else:
        bits = target.weight_bits if kind == "weights" else target.act_bits
        total = sum(t.numel for t in peers)
        remaining = bits * total - sum(t.numel * float(t.bits.frozen_bits) for t in peers if t.bits.is_frozen)
        free = tensor.numel + sum(t.numel for t in others)
        shift = (b * tensor.numel + sum(t.numel * float(t.bits.continuous()) for t in others) - remaining) / free
        rest = sum(t.numel for t in others)
        def fits(width: int) -> bool:
            return width * tensor.numel + MIN_BITS * rest <= remaining + 1e-9 * total

    # round(b − s), then down until the widths left (at 2 bits) can still meet the budget; the
    # last one therefore takes what is left, rounded down. Any shortfall is the freeze's refill.
    width = min(max(math.floor(b - shift + 0.5), MIN_BITS), MAX_BITS)
    while width > MIN_BITS and not fits(width):
        width -= 1
    tensor.bits.freeze(width)
    return width, rounded
