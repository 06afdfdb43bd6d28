"""NIPQ's budget: the target (average bits or BOPs), whether it is reachable, and freezing the
learned widths onto it (the projection is our addition to the reference).

The reference freezes ``round(b_c)`` after its 40 noise epochs, by which time the continuous cost
term has brought the widths to the budget. Short schedules stop short of it (measured on the
digits zoo: 4.3 / 5.9 average weight / activation bits after 30 steps at a 4-bit target), so
the freeze here moves widths one bit at a time until the budget holds.
"""

from __future__ import annotations

import math
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
                tolerance: float = 0.02) -> CostReport:
    """Freeze every learned width at ``round(b_c)``; with ``fit_budget`` then project onto the target.

    Our addition to the reference (its continuous cost only approaches the budget, and short
    schedules stop short of it): widths move one bit at a time, the one whose b_c was nearest to
    rounding the other way first, round robin (no width moves twice before the others moved
    once). BOPs: down until at most the target, then up while it stays at most the target (to
    land within ``tolerance`` below it). Average bits: down, per kind, until
    the learned tensors' average is at most the target.
    """
    learned = [t for t in model_cost.weights + model_cost.activations if not t.bits.pinned]
    continuous = {id(t.bits): float(t.bits.continuous()) for t in learned}
    for t in learned:
        if not t.bits.is_frozen:
            t.bits.freeze()
    if fit_budget and target is not None:
        if target.bops is not None:
            _fit(lambda: float(model_cost.bops(deployed=True)), target.bops, [t.bits for t in learned],
                 continuous, tolerance)
        for kind, bits in (("weights", target.weight_bits), ("activations", target.act_bits)):
            mine = [t.bits for t in model_cost._tensors(kind) if not t.bits.pinned]
            if bits is not None and mine:
                _fit(lambda kind=kind: float(model_cost.average_bits(kind, learned_only=True, deployed=True)),
                     bits, mine, continuous, None)
    return model_cost.report()


def _fit(measure, budget: float, learned: list[LearnedBitWidth], continuous: dict, tolerance: float | None) -> None:
    """Greedy one-bit moves onto ``measure() <= budget`` (and ``>= budget·(1-tolerance)`` if given)."""
    moves = {id(b): 0 for b in learned}  # round robin: a width moves again only after the others
    while measure() > budget:
        candidates = [b for b in learned if int(b.frozen_bits) > MIN_BITS]
        if not candidates:
            return
        pick = max(candidates, key=lambda b: (-moves[id(b)], float(b.frozen_bits) - continuous[id(b)]))
        pick.freeze(int(pick.frozen_bits) - 1)
        moves[id(pick)] += 1
    if tolerance is None:
        return
    while measure() < budget * (1 - tolerance):
        ordered = sorted((b for b in learned if int(b.frozen_bits) < MAX_BITS),
                         key=lambda b: continuous[id(b)] - float(b.frozen_bits), reverse=True)
        for pick in ordered:
            pick.freeze(int(pick.frozen_bits) + 1)
            if measure() <= budget:
                continuous[id(pick)] = float(pick.frozen_bits)
                break
            pick.freeze(int(pick.frozen_bits) - 1)
        else:
            return


