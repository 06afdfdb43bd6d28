"""Merging NIPQ models whose learned per-layer bit-widths differ: the rule is *the wider of the two*.

Two NIPQ models of one architecture usually learn different widths for the same tensor. Before
:func:`hdrq_plugin.merge.models.merge_models` averages them on one integer grid, every quantizer is
brought to the widest width any member has for it, by **widening** each narrower member:

- the step Δ is kept and the width raised, so the truncation grows to ``Δ·qmax(B)``;
- weights: the latent weight is rewritten as ``codes·Δ``, so the widened layer deploys exactly
  the same integers and dequantized weights (lossless, checked);
- activations: the same grid with a wider range; values the narrow quantizer clipped now pass
  up to the new bound (the only change, and never a coarser grid).

Why the wider: a narrower merged width would re-round every wider member onto a coarser grid
(the loss merging tries to avoid), while widening costs only storage and BOPs, which the merged
model's :class:`hdrq_plugin.nipq.cost.CostReport` states. Truncations are then averaged as α
(not as softplus⁻¹(α)), so a merged step is ``Σ c_t Δ_t`` like every other merged scale.

Widening puts the merged model *over* the members' budget whenever their allocations differ
(digits zoo, three targets at average 4 bits: 4.51 / 4.43 average weight / activation bits).
:func:`land_merged_widths` brings it back: the projection the training freeze uses
(:func:`hdrq_plugin.nipq.budget.freeze_bits`: one bit down at a time, the least measured loss per
bit saved first, then refill), priced on labelled batches of every target, with each weight α
whose width moved re-fitted at its new width (docs/nipq_method.md §6).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .quantizers import LearnedBitWidth, LearnedTruncation

__all__ = ["is_nipq_model", "widen_to_common_bits", "average_activation_truncations", "nipq_truncation",
           "write_nipq_weight_grid", "land_merged_widths"]


def is_nipq_model(model: nn.Module) -> bool:
    return any(isinstance(m, LearnedBitWidth) for m in model.modules())


def _owner(name: str) -> str:
    """``layer.weight_quant.tensor_quant.msb_clamp_bit_width_impl`` -> ``layer.weight_quant.tensor_quant``."""
    return name.rpartition(".")[0]


def nipq_truncation(layer: nn.Module) -> LearnedTruncation | None:
    """The weight truncation α of a NIPQ-quantized layer (None for other quantizers)."""
    found = [m for m in layer.weight_quant.modules() if isinstance(m, LearnedTruncation)]
    return found[0] if found else None


@torch.no_grad()
def _widen(model: nn.Module, widths: dict[str, int]) -> None:
    modules = dict(model.named_modules())
    layers = {f"{name}.weight_quant.tensor_quant": m for name, m in modules.items()
              if getattr(m, "weight_quant", None) is not None and hasattr(m, "quant_weight")}
    for name, bits in widths.items():
        module = modules[name]
        tensor_quant = modules[_owner(name)]
        current = int(module.rounded().item())
        if current == bits:
            module.freeze(bits)
            continue
        layer = layers.get(_owner(name))
        if layer is not None:  # a weight quantizer: keep codes and step exactly
            was = layer.training
            layer.eval()
            before = layer.quant_weight()
            codes, step = before.int().to(torch.float64), before.scale.detach().to(torch.float64)
            module.freeze(bits)
            tensor_quant.scaling_impl.set_truncation(float(step) * _qmax(tensor_quant, bits))
            layer.weight.copy_((codes * step).to(layer.weight.dtype))
            after = layer.quant_weight()
            if not torch.equal(after.int().to(torch.float64), codes):
                raise RuntimeError(f"widening {name!r} from {current} to {bits} bits changed its integer weights")
            layer.train(was)
        else:  # an activation quantizer: same step, wider range
            alpha = float(tensor_quant.scaling_impl.truncation())
            step = alpha / _qmax(tensor_quant, current)
            module.freeze(bits)
            tensor_quant.scaling_impl.set_truncation(step * _qmax(tensor_quant, bits))


def _qmax(tensor_quant: nn.Module, bits: int) -> float:
    """The integer threshold ``α/Δ`` at ``bits`` (Brevitas' own int scaling of this quantizer)."""
    return float(tensor_quant.int_scaling_impl(torch.tensor(float(bits))))


def widen_to_common_bits(models: Sequence[nn.Module], labels: Sequence[str] | None = None) -> list[nn.Module]:
    """Copies of ``models`` whose every NIPQ width is the widest of the members' (module doc).

    Models without NIPQ quantizers are returned as they are. The copies have every NIPQ width
    frozen; a quantizer present in one model only is left to the merge's architecture check.
    """
    models = list(models)
    if not any(is_nipq_model(m) for m in models):
        return models
    widths: dict[str, int] = {}
    for model in models:
        for name, module in model.named_modules():
            if isinstance(module, LearnedBitWidth):
                widths[name] = max(widths.get(name, 0), int(module.rounded().item()))
    widened = []
    for model in models:
        clone = copy.deepcopy(model)
        present = {name for name, m in clone.named_modules() if isinstance(m, LearnedBitWidth)}
        _widen(clone, {name: bits for name, bits in widths.items() if name in present})
        widened.append(clone)
    return widened


@torch.no_grad()
def average_activation_truncations(members: Sequence[nn.Module], coefficients: Sequence[float],
                                   merged: nn.Module) -> None:
    """Set each activation truncation of ``merged`` to ``Σ c_t α_t`` (weights are merged on their grids)."""
    tables = [dict(m.named_modules()) for m in members]
    for name, module in merged.named_modules():
        if isinstance(module, LearnedTruncation) and ".weight_quant." not in f".{name}.":
            alphas = [float(table[name].truncation()) for table in tables]
            module.set_truncation(sum(c * a for c, a in zip(coefficients, alphas, strict=True)))


@torch.no_grad()
def write_nipq_weight_grid(layer: nn.Module, name: str, codes: Tensor, scale: Tensor) -> bool:
    """Write merged ``codes`` on step ``scale`` into a NIPQ layer; False for other quantizers.

    With the width frozen the step is α / qmax(b), so α is rescaled by the step ratio; the caller
    reads the grid back and checks it.
    """
    from ..merge.models import read_weight_grid

    truncation = nipq_truncation(layer)
    if truncation is None:
        return False
    current = read_weight_grid(layer, name).scale
    truncation.set_truncation(float(truncation.truncation()) * float(scale.reshape(-1)[0]) / float(current.reshape(-1)[0]))
    layer.weight.copy_((codes.to(torch.float64) * scale.to(torch.float64)).to(layer.weight.dtype))
    return True


def land_merged_widths(merged: nn.Module, target, batches: Sequence[tuple[Tensor, Tensor]]):
    """Put a merged NIPQ model's widths on ``target`` (the members' budget); returns its CostReport.

    ``batches``: labelled ``(inputs, labels)`` of every target the model serves; a move's price is
    the change of the mean cross-entropy over them (hard-rounded, eval mode) per bit saved. Weights
    re-round on the narrower grid from the merged values; a weight α whose width moved is re-fitted
    there (:func:`hdrq_plugin.nipq.passes.fit_truncations`). ``merged`` is changed in place.
    """
    import torch.nn.functional as F

    from .budget import freeze_bits, parse_target
    from .cost import describe_costs
    from .passes import fit_truncations, truncation_widths

    batches = list(batches)
    if not batches:
        raise ValueError("land_merged_widths needs labelled batches to price the moves")
    was = merged.training
    merged.eval()
    cost = describe_costs(merged, batches[0][0][:1])
    goal = parse_target(target, cost)

    @torch.no_grad()
    def measure_loss() -> float:
        return sum(float(F.cross_entropy(merged(x), y)) for x, y in batches) / len(batches)

    fitted_at = truncation_widths(merged)  # α is re-fitted only where the landing moves the width
    report = freeze_bits(cost, goal, fit_budget=True, measure_loss=measure_loss)
    fit_truncations(merged, [x for x, _ in batches], batches=len(batches), activations=False, fitted_at=fitted_at)
    merged.train(was)
    return report
