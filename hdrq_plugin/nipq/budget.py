"""NIPQ's budget: the target (average bits or BOPs), whether it is reachable, and freezing the
learned widths onto it (the projection is our addition to the reference).

The reference freezes ``round(b_c)`` after training; its cost (L1 on the rounded totals) has
brought the deployed widths onto the budget by then, and so does ours (``cost.py``). The freeze
here closes any remaining gap by measured loss per bit and refills what is left under it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..bitspec import MAX_BITS, MIN_BITS, BitSpec
from .cost import CostModel, CostReport
from .quantizers import LearnedBitWidth

__all__ = ["NIPQTarget", "check_reachable", "freeze_bits", "parse_target"]


@dataclass(frozen=True)
class NIPQTarget:
    """What the cost term aims at: average weight/activation bits, or BOPs per sample."""

    weight_bits: float | None = None
    act_bits: float | None = None
    bops: float | None = None

    def __post_init__(self) -> None:
        if self.bops is None and self.weight_bits is None and self.act_bits is None:
            raise ValueError("a NIPQ target needs average bits (weights and/or activations) or BOPs")
        if self.bops is not None and (self.weight_bits is not None or self.act_bits is not None):
            raise ValueError("give either average bits or a BOPs target, not both")
        for name in ("weight_bits", "act_bits"):
            value = getattr(self, name)
            if value is not None and not MIN_BITS <= float(value) <= MAX_BITS:
                raise ValueError(f"target {name}={value} is outside {MIN_BITS}..{MAX_BITS} bits")
        if self.bops is not None and not (math.isfinite(self.bops) and self.bops > 0):
            raise ValueError(f"a BOPs target must be a positive number, got {self.bops}")

    def describe(self) -> str:
        if self.bops is not None:
            return f"{self.bops / 1e9:.4g} GBOPs"
        return f"average w{self.weight_bits}a{self.act_bits}"


def parse_target(target, model_cost: CostModel | None = None) -> NIPQTarget:
    """``4`` / ``4.5`` (both kinds), ``"w4a4"``, ``{"gbops": 0.5}``, ``{"bops": 5e8}`` or a NIPQTarget.

    ``None`` takes the nominal bits the model was converted with (``"nipq-w4a4"`` -> 4 and 4).
    """
    if isinstance(target, NIPQTarget):
        return target
    if isinstance(target, bool):
        raise TypeError(f"unsupported NIPQ target {target!r}")
    if isinstance(target, (int, float)):
        return NIPQTarget(weight_bits=float(target), act_bits=float(target))
    if isinstance(target, str):
        try:
            spec = BitSpec.parse(target)
        except ValueError:
            raise ValueError(f"NIPQ target {target!r} is not average bits like 'w4a4' or 4.0") from None
        return NIPQTarget(weight_bits=float(spec.weight_bits), act_bits=float(spec.act_bits))
    if isinstance(target, dict):
        if set(target) == {"gbops"}:
            return NIPQTarget(bops=float(target["gbops"]) * 1e9)
        if set(target) == {"bops"}:
            return NIPQTarget(bops=float(target["bops"]))
        return NIPQTarget(**target)
    if target is None:
        if model_cost is None:
            raise ValueError("target=None needs the model to read its nominal bits from")
        def nominal(tensors):
            learned = {t.bits.nominal_bits for t in tensors if not t.bits.pinned}
            if len(learned) != 1:
                raise ValueError(f"the model has no single nominal bit-width ({sorted(learned)}); pass target")
            return float(learned.pop())
        return NIPQTarget(weight_bits=nominal(model_cost.weights), act_bits=nominal(model_cost.activations))
    raise TypeError(f"unsupported NIPQ target {target!r}")


def check_reachable(cost: CostModel, target: NIPQTarget) -> None:
    """Raise if ``target`` cannot be met: BOPs below the all-2-bit minimum, or no learned tensor."""
    if target.bops is not None:
        low, high = cost.bops_bounds()
        if target.bops < low:
            raise ValueError(
                f"BOPs target {target.bops:.4g} ({target.bops / 1e9:.4g} GBOPs) is unreachable: the minimum "
                f"reachable is {low:.4g} ({low / 1e9:.4g} GBOPs), every learned width at {MIN_BITS} bits and "
                "the pinned (edge) layers at their fixed widths")
        return
    for kind, bits in (("weights", target.weight_bits), ("activations", target.act_bits)):
        if bits is not None and not any(not t.bits.pinned for t in cost._tensors(kind)):
            raise ValueError(f"the model has no learned {kind} quantizer to meet an average of {bits} bits")


@torch.no_grad()
def freeze_bits(model_cost: CostModel, target=None, *, fit_budget: bool = True,
                measure_loss: Callable[[], float] | None = None) -> CostReport:
    """Freeze every learned width at ``round(b_c)``; with ``fit_budget`` then put it on the target.

    The cost term (:func:`hdrq_plugin.nipq.cost.average_bits_loss`) already holds the rounded
    widths on the budget, so this usually moves nothing. What is left (our addition to the
    reference): while over budget, lower by one bit the width with the least **measured loss
    per bit saved** (``measure_loss``: the task loss on fixed batches; without it, the width
    whose b_c was nearest to rounding down); then refill: while some width can go up one bit
    and stay within budget, raise the one with the most loss removed per bit added. It ends at
    most the budget and less than one smallest move below it (no upward move fits).
    Average bits are fitted per kind; BOPs over all learned widths.
    """
    learned = [t for t in model_cost.weights + model_cost.activations if not t.bits.pinned]
    continuous = {id(t.bits): float(t.bits.continuous()) for t in learned}
    for t in learned:
        if not t.bits.is_frozen:
            t.bits.freeze()
    if fit_budget and target is not None:
        if target.bops is not None:
            _fit(lambda: float(model_cost.bops(deployed=True)), target.bops, [t.bits for t in learned],
                 continuous, measure_loss)
        for kind, bits in (("weights", target.weight_bits), ("activations", target.act_bits)):
            mine = [t.bits for t in model_cost._tensors(kind) if not t.bits.pinned]
            if bits is not None and mine:
                _fit(lambda kind=kind: float(model_cost.average_bits(kind, learned_only=True, deployed=True)),
                     bits, mine, continuous, measure_loss)
    return model_cost.report()


def _fit(measure, budget: float, learned: list[LearnedBitWidth], continuous: dict,
         measure_loss: Callable[[], float] | None) -> None:
    """Greedy one-bit moves onto ``measure() <= budget``, ranked by loss per unit of budget."""
    def price(width: LearnedBitWidth, delta: int, spent: float, base_loss: float | None, admissible):
        """Loss change per unit of budget of moving ``width`` by ``delta`` bits (None if it does not fit)."""
        bits = int(width.frozen_bits)
        if not MIN_BITS <= bits + delta <= MAX_BITS:
            return None
        width.freeze(bits + delta)
        try:
            change = measure() - spent
            if not change or not admissible(spent + change):
                return None
            if base_loss is None:  # no data: the distance b_c has to go, a proxy of the loss
                return (abs(bits + delta - continuous[id(width)]) - abs(bits - continuous[id(width)])) / abs(change)
            return (measure_loss() - base_loss) / abs(change)  # measured only for moves that fit
        finally:
            width.freeze(bits)

    def base() -> tuple[float, float | None]:
        return measure(), None if measure_loss is None else measure_loss()

    # down: the least loss per unit of budget saved first. Lazy greedy: a width's price is measured
    # again only after it moved (moving one width barely changes the others' prices), so the
    # projection costs one loss measurement per width plus one per move.
    prices = None  # measured only when over budget: on budget (the usual case) nothing is priced
    while measure() > budget:
        if prices is None:
            spent, base_loss = base()
            prices = {id(w): price(w, -1, spent, base_loss, lambda _after: True) for w in learned}
        offers = [(prices[id(w)], i, w) for i, w in enumerate(learned) if prices[id(w)] is not None]
        if not offers:
            return
        _, _, pick = min(offers)
        pick.freeze(int(pick.frozen_bits) - 1)
        spent, base_loss = base()
        prices[id(pick)] = price(pick, -1, spent, base_loss, lambda _after: True)
    while True:  # refill: most loss removed per unit of budget spent, while it fits
        spent, base_loss = base()
        offers = [(p, i, w) for i, w in enumerate(learned)
                  if (p := price(w, +1, spent, base_loss, lambda after: after <= budget)) is not None]
        if not offers:
            return
        _, _, pick = min(offers)
        pick.freeze(int(pick.frozen_bits) + 1)
