"""Brevitas' own GPTQ (``brevitas.graph.gptq.gptq_mode``), as an external reference baseline.

GPTQ (Frantar et al., ICLR 2023) quantizes a layer's weight columns one after another and
compensates each column's rounding error on the columns not yet quantized, using the inverse
of the input Hessian ``2XXᵀ``. Brevitas implements it; we only drive it, the documented way:
calibrate the activations first, then one pass over the data per layer, then ``update()``.

Pitfall (docs/toolchain_notes.md): GPTQ silently does nothing when the weight scale is recomputed
from the weight statistics at every call (Brevitas' default stats scaling): the updated
columns then get their own new scale. The weights need a *parameter* scale fixed before GPTQ
runs — ``ParameterFromStatsFromParameterScaling``, which ``convert_to_brevitas`` uses by default
and HDRQ's quantizers use too; any other scaling is rejected here.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..convert.to_brevitas import calibrate_activations, compute_layers
from ..data import collect_inputs
from ..progress import progress_bar

with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    from brevitas.core.scaling import ParameterFromStatsFromParameterScaling
    from brevitas.graph.gptq import gptq_mode

__all__ = ["GPTQConfig", "gptq_calibrate", "check_gptq_compatible"]


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ (Frantar et al., 2023) through Brevitas' ``gptq_mode``; selects GPTQ in
    :func:`hdrq_plugin.quantize_model`. Defaults: those of :func:`gptq_calibrate`."""

    num_samples: int = 32  # calibration samples (as the reconstruction engine's CPU preset)
    act_order: bool = True  # GPTQ paper §4 "act-order"; Brevitas' examples enable it at low bits
    batch_size: int = 32
    seed: int = 0  # GPTQ is deterministic; kept so every method config carries a seed


def check_gptq_compatible(qmodel: nn.Module) -> None:
    """Raise if a quantized layer's weight scale is not a fixed parameter (GPTQ would be a no-op)."""
    layers = compute_layers(qmodel)
    if not layers:
        raise TypeError("the model has no Brevitas QuantConv/QuantLinear layer: convert it first")
    for name, layer in layers:
        if not layer.weight_quant.is_quant_enabled:
            continue
        scaling = layer.weight_quant.tensor_quant.scaling_impl
        if not isinstance(scaling, ParameterFromStatsFromParameterScaling):
            raise TypeError(
                f"layer {name!r} computes its weight scale with {type(scaling).__name__}; Brevitas GPTQ "
                "is a silent no-op unless the scale is a parameter "
                "(scaling_impl_type=ScalingImplType.PARAMETER_FROM_STATS, as convert_to_brevitas uses)")


@torch.no_grad()
def gptq_calibrate(
    qmodel: nn.Module,
    calibration_data: Iterable,
    *,
    num_samples: int = 32,
    act_order: bool = True,
    batch_size: int = 32,
) -> nn.Module:
    """Calibrate activation steps, then run Brevitas GPTQ on every Conv/Linear layer, in place.

    Uses the first ``num_samples`` calibration samples (labels ignored), like ``hdrq_calibrate``.
    ``act_order`` processes the columns with the largest Hessian diagonal first (GPTQ paper's
    "act-order" heuristic, which Brevitas' examples enable for low bit-widths).
    """
    check_gptq_compatible(qmodel)
    inputs = collect_inputs(calibration_data, max_samples=num_samples)
    if inputs.shape[0] < num_samples:
        raise ValueError(f"the calibration set has {inputs.shape[0]} samples, GPTQ was asked for {num_samples}")
    batches = list(inputs.split(batch_size))
    qmodel.eval()
    calibrate_activations(qmodel, batches)
    # create_weight_orig=False: Brevitas would keep each layer's float weights in a `weight_orig`
    # buffer and use them whenever weight quantization is off; the model would then not reload
    # from a checkpoint (unexpected keys) and a quantization-disabled evaluation (a merge's
    # dequantized average) would silently run the pre-GPTQ float weights
    with gptq_mode(qmodel, act_order=act_order, use_quant_activations=True, create_weight_orig=False) as gptq:
        for _ in progress_bar(range(gptq.num_layers), desc="GPTQ", unit="layer"):
            for batch in batches:
                gptq.model(batch)
            gptq.update()
    qmodel.eval()
    return qmodel
