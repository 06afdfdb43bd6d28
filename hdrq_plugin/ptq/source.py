"""The source weights θ0 of HDRQ's distance term, BN-folded and matched to the target by layer name.

docs/hdrq_method.md §3.2: ``R = λ_D Σ_l ‖W_l − W_l^src‖_F`` against the **BN-folded** source weights. The
source is folded by the conversion's own :func:`hdrq_plugin.convert.to_brevitas.fold_batchnorm`, so both
sides of the difference live in the same parametrisation and carry the same layer names.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..convert.to_brevitas import COMPUTE_LAYERS, compute_layers, fold_batchnorm
from ..errors import HDRQPluginError

__all__ = ["SourceMismatchError", "folded_weights", "source_weights_for"]

_FLOAT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


class SourceMismatchError(HDRQPluginError, ValueError):
    """The source model's layers do not match the target's (names or shapes)."""


@torch.no_grad()
def folded_weights(model: nn.Module) -> dict[str, Tensor]:
    """``{layer name: BN-folded weight}`` of a float model, or the weights of a converted one."""
    if any(isinstance(m, COMPUTE_LAYERS) for m in model.modules()):  # already converted: BN is folded
        return {name: layer.weight.detach().clone() for name, layer in compute_layers(model)}
    try:
        folded = fold_batchnorm(model)  # the conversion's own folding: same names, same parametrisation
    except Exception as err:  # FX tracing errors are long; say what failed first
        raise TypeError(f"could not fold the source model's BatchNorm ({type(err).__name__}: {err})") from err
    return {name: m.weight.detach().clone() for name, m in folded.named_modules() if isinstance(m, _FLOAT_LAYERS)}


def source_weights_for(qmodel: nn.Module, source: nn.Module | None) -> dict[str, Tensor]:
    """The source weight of every Conv/Linear of ``qmodel``, checked name by name and shape by shape.

    ``source=None`` anchors the distance term to ``qmodel``'s own weights before calibration.
    """
    targets = compute_layers(qmodel)
    if source is None:
        return {name: layer.weight.detach().clone() for name, layer in targets}
    if not isinstance(source, nn.Module):
        raise TypeError(f"source must be a torch.nn.Module (the float source model θ0), got {type(source).__name__}")
    weights = folded_weights(source)
    for name, layer in targets:
        if name not in weights:
            raise SourceMismatchError(
                f"the source model has no layer {name!r} (target shape {tuple(layer.weight.shape)}); "
                f"its layers are {sorted(weights)[:8]}{'...' if len(weights) > 8 else ''}")
        if weights[name].shape != layer.weight.shape:
            raise SourceMismatchError(
                f"layer {name!r}: source weight shape {tuple(weights[name].shape)} differs from "
                f"target weight shape {tuple(layer.weight.shape)}")
    extra = sorted(set(weights) - {name for name, _ in targets})
    if extra:
        raise SourceMismatchError(
            f"the source model has layer {extra[0]!r} (shape {tuple(weights[extra[0]].shape)}) that the target lacks")
    return {name: weights[name] for name, _ in targets}
