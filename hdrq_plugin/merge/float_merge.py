"""Float model merging by weight averaging — the reference every quantized merge is compared with.

Model soups / model merging (Wortsman et al., "Model soups", ICML 2022; HDRQ paper §3): models
fine-tuned from one source share an initialisation, so averaging their parameters elementwise
gives one model that serves all their targets. The HDRQ paper merges with λ = 1/T.

Every floating-point entry of the state dicts is combined — parameters and buffers alike, so
BatchNorm running statistics are averaged too. Entries that are not floating point (BatchNorm's
``num_batches_tracked`` counter) cannot be interpolated and are copied from the first model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

_SUM_TOLERANCE = 1e-6


def _check_same_architecture(models: Sequence[nn.Module]) -> list[dict[str, torch.Tensor]]:
    if len(models) == 0:
        raise ValueError("need at least one model to merge")
    for index, model in enumerate(models):
        if not isinstance(model, nn.Module):
            raise TypeError(f"models[{index}] is a {type(model).__name__}, not a torch.nn.Module")
        # Compare class names, not classes: torch.fx gives every GraphModule its own subclass.
        if type(model).__name__ != type(models[0]).__name__:
            raise TypeError(f"models[{index}] is a {type(model).__name__}, models[0] a {type(models[0]).__name__}")
    states = [model.state_dict() for model in models]
    reference = states[0]
    for index, state in enumerate(states[1:], start=1):
        if state.keys() != reference.keys():
            differing = sorted(set(state) ^ set(reference))
            raise ValueError(f"models[{index}] has different state-dict entries than models[0]: {differing[:5]}")
        for name, tensor in state.items():
            if tensor.shape != reference[name].shape or tensor.dtype != reference[name].dtype:
                raise ValueError(
                    f"models[{index}].{name} is {tuple(tensor.shape)} {tensor.dtype}, "
                    f"models[0].{name} is {tuple(reference[name].shape)} {reference[name].dtype}"
                )
    return states


def _check_coefficients(coefficients: Sequence[float], count: int, require_convex: bool) -> list[float]:
    values = [float(c) for c in coefficients]
    if len(values) != count:
        raise ValueError(f"got {len(values)} coefficients for {count} models")
    if not all(math.isfinite(c) for c in values):
        raise ValueError(f"coefficients must be finite, got {values}")
    if require_convex:
        if any(c < 0 for c in values):
            raise ValueError(f"coefficients must be non-negative (pass require_convex=False to allow), got {values}")
        if abs(sum(values) - 1.0) > _SUM_TOLERANCE:
            raise ValueError(f"coefficients must sum to 1 (pass require_convex=False to allow), sum is {sum(values)}")
    return values


def _linear_combination(models: Sequence[nn.Module], coefficients: Sequence[float]) -> nn.Module:
    states = _check_same_architecture(models)
    merged_state = {}
    for name, first in states[0].items():
        if not first.is_floating_point():
            merged_state[name] = first.clone()
            continue
        total = torch.zeros_like(first, dtype=torch.float64)
        for coefficient, state in zip(coefficients, states, strict=True):
            total += coefficient * state[name].to(torch.float64)
        merged_state[name] = total.to(first.dtype)
    merged = copy.deepcopy(models[0])
    merged.load_state_dict(merged_state)
    return merged


def average_float_models(
    models: Sequence[nn.Module], coefficients: Sequence[float] | None = None, *, require_convex: bool = True
) -> nn.Module:
    """A new model whose every float entry is ``Σ_i c_i · θ_i`` (default ``c_i = 1/T``).

    The models must share class, state-dict names, shapes and dtypes. Coefficients must be
    non-negative and sum to 1 unless ``require_convex=False``. The inputs are not modified.
    """
    if len(models) == 0:
        raise ValueError("need at least one model to merge")
    if coefficients is None:
        coefficients = [1.0 / len(models)] * len(models)
    values = _check_coefficients(coefficients, len(models), require_convex)
    return _linear_combination(models, values)


def merge_relative_to(source: nn.Module, models: Sequence[nn.Module], coefficients: Sequence[float]) -> nn.Module:
    """Task arithmetic: ``θ0 + Σ_t λ_t (θ_t − θ0)`` (Ilharco et al., "Editing models with task arithmetic", 2023).

    With λ summing to 1 this equals :func:`average_float_models`; λ may be any finite numbers
    (a sum below 1 keeps the merge closer to the source).
    """
    if len(models) == 0:
        raise ValueError("need at least one adapted model to merge")
    values = _check_coefficients(coefficients, len(models), require_convex=False)
    return _linear_combination([source, *models], [1.0 - sum(values), *values])
