"""Switches and accessors for the HDRQ quantizers inside a Brevitas model.

The reconstruction engine drives the quantizers of one unit at a time through these functions:
mode (noise / STE / round), noise shape, QDrop probability, the parameter groups its optimisers
train, the weight-step initialisation, and swapping quantizers into an existing Brevitas model.
Every setter returns how many quantizers it changed so a caller can tell a unit that has none.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from brevitas.core.scaling import ParameterFromRuntimeStatsScaling, ParameterFromStatsFromParameterScaling
from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer
from brevitas.proxy.parameter_quant import WeightQuantProxyFromInjectorBase
from brevitas.proxy.runtime_quant import ActQuantProxyFromInjectorBase
from torch import Tensor, nn

from hdrq_plugin.quant.learned_round import AdaRoundSte
from hdrq_plugin.quant.quantizers import HDRQQuantizer, PseudoQuantIntQuant, QuantMode, UnitIntScaling

__all__ = [
    "set_quant_mode",
    "set_noise_shape",
    "set_activation_drop",
    "weight_scale_parameters",
    "activation_scale_parameters",
    "rounding_parameters",
    "initialize_weight_scales_mse",
    "freeze_rounding",
    "rounding_regularizer",
    "swap_weight_quantizer",
    "bake_learned_rounding",
    "quantized_layers",
    "weight_step",
    "set_weight_step",
    "integer_weight",
]


def _is_hdrq(tensor_quant: nn.Module | None) -> bool:
    """Our quantizers are the Brevitas ones whose scale parameter is the step (unit int scaling)."""
    return isinstance(getattr(tensor_quant, "int_scaling_impl", None), UnitIntScaling)


def _weight_proxies(module: nn.Module) -> Iterator[WeightQuantProxyFromInjectorBase]:
    for m in module.modules():
        if isinstance(m, WeightQuantProxyFromInjectorBase) and _is_hdrq(m.tensor_quant):
            yield m


def _act_tensor_quants(module: nn.Module) -> Iterator[nn.Module]:
    for m in module.modules():
        if isinstance(m, ActQuantProxyFromInjectorBase) and m.fused_activation_quant_proxy is not None:
            tensor_quant = m.fused_activation_quant_proxy.tensor_quant
            if _is_hdrq(tensor_quant):
                yield tensor_quant


def _unique(params: Iterator[nn.Parameter]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for p in params:
        seen.setdefault(id(p), p)
    return list(seen.values())


def _set_on_pseudo_quants(module: nn.Module, attribute: str, value) -> int:
    """Set ``attribute`` on every HDRQ quantizer under ``module``; returns how many changed."""
    quants = [m for m in module.modules() if isinstance(m, PseudoQuantIntQuant)]
    for m in quants:
        setattr(m, attribute, value)
    return len(quants)


def set_quant_mode(module: nn.Module, mode: QuantMode | str) -> int:
    """Set the training-mode rounding of every HDRQ weight and activation quantizer under ``module``."""
    return _set_on_pseudo_quants(module, "quant_mode", QuantMode(mode))


def set_noise_shape(module: nn.Module, shape: str) -> int:
    """Noise of every HDRQ quantizer under ``module``: ``"histogram"`` (the method) or ``"uniform"``."""
    return _set_on_pseudo_quants(module, "noise_shape", shape)


def set_activation_drop(module: nn.Module, probability: float) -> int:
    """QDrop: each HDRQ activation quantizer passes its float input with ``probability`` (training only)."""
    changed = 0
    for tensor_quant in _act_tensor_quants(module):
        tensor_quant.int_quant.drop_probability = probability
        changed += 1
    return changed


def weight_scale_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The learnable weight steps of the HDRQ weight quantizers under ``module`` (one per layer)."""
    return _unique(
        p.tensor_quant.scaling_impl.value
        for p in _weight_proxies(module)
        if isinstance(p.tensor_quant.scaling_impl, ParameterFromStatsFromParameterScaling)
    )


def activation_scale_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The learnable activation steps of the HDRQ activation quantizers under ``module``."""
    return _unique(
        tq.scaling_impl.value
        for tq in _act_tensor_quants(module)
        if isinstance(tq.scaling_impl, ParameterFromRuntimeStatsScaling)
    )


def rounding_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The AdaRound variables V of the learned-rounding weight quantizers under ``module``."""
    return _unique(m.value for m in module.modules() if isinstance(m, AdaRoundSte))


def freeze_rounding(module: nn.Module) -> int:
    """AdaRound soft → hard: every learned rounding under ``module`` becomes ``floor + (h(V) > 0.5)``."""
    changed = 0
    for m in module.modules():
        if isinstance(m, AdaRoundSte):
            m.freeze()
            changed += 1
    return changed


def rounding_regularizer(module: nn.Module, beta: float) -> Tensor:
    """AdaRound's ``Σ 1 - |2h(V) - 1|^β`` summed over the learned roundings under ``module``."""
    terms = [m.regularizer(beta) for m in module.modules() if isinstance(m, AdaRoundSte)]
    if not terms:
        raise ValueError("no learned-rounding weight quantizer under this module")
    return torch.stack(terms).sum()


def quantized_layers(model: nn.Module, *, enabled_only: bool = True,
                     forward_order: bool = False) -> list[tuple[str, QuantWeightBiasInputOutputLayer]]:
    """``(name, layer)`` of every Brevitas weight layer (QuantConv*, QuantLinear): the one listing
    conversion, calibration, merge and export share.

    ``enabled_only``: only layers whose weight quantization is on. ``forward_order``: in the order
    an FX GraphModule calls them (first conv first, classifier last); otherwise module order.
    """
    if forward_order and isinstance(model, torch.fx.GraphModule):
        named = []
        for node in model.graph.nodes:
            if node.op == "call_module" and all(node.target != n for n, _ in named):
                named.append((node.target, model.get_submodule(node.target)))
    else:
        named = list(model.named_modules())
    return [(name, layer) for name, layer in named if isinstance(layer, QuantWeightBiasInputOutputLayer)
            and (not enabled_only or layer.weight_quant.is_quant_enabled)]


def _hdrq_scaling(layer: nn.Module, name: str = "layer") -> ParameterFromStatsFromParameterScaling:
    proxy = getattr(layer, "weight_quant", None)
    if proxy is None or not _is_hdrq(proxy.tensor_quant):
        raise TypeError(f"{name} has no HDRQ weight quantizer (got {type(proxy).__name__})")
    return proxy.tensor_quant.scaling_impl


@torch.no_grad()
def set_weight_step(layer: nn.Module, step: Tensor | float) -> None:
    """Set the learnable weight step of an HDRQ-quantized layer (broadcast to its shape)."""
    scaling = _hdrq_scaling(layer)
    step = torch.as_tensor(step, dtype=scaling.value.dtype, device=scaling.value.device)
    if step.numel() not in (1, scaling.value.numel()):
        raise ValueError(f"step has {step.numel()} values, the layer has {scaling.value.numel()} scales")
    if not bool((step > 0).all()):
        raise ValueError("weight steps must be positive")
    scaling.value.copy_(step.reshape(-1).expand(scaling.value.numel()).reshape(scaling.value.shape))
    scaling.init_done = True


@torch.no_grad()
def initialize_weight_scales_mse(module: nn.Module, *, force: bool = False) -> int:
    """Initialise each HDRQ weight step by the L_p clipping search on the layer's current weight.

    Steps already initialised (first forward done, or loaded from a state dict) are kept unless
    ``force``. Returns the number of steps written.
    """
    written = 0
    for proxy in _weight_proxies(module):
        scaling = proxy.tensor_quant.scaling_impl
        if scaling.init_done and not force:
            continue
        weight = proxy.tracked_parameter_list[0]
        scaling.value.copy_(scaling.parameter_list_stats(weight).reshape(scaling.value.shape))
        scaling.init_done = True
        written += 1
    return written


def weight_step(layer: nn.Module) -> Tensor:
    """The step of an HDRQ-quantized layer's weights (detached)."""
    return _hdrq_scaling(layer).value.detach().clone()


@torch.no_grad()
def integer_weight(layer: nn.Module) -> Tensor:
    """The deployed integers of ``layer``'s weights: the evaluation-mode ``quant_weight().int()``.

    For HDRQ quantizers this is ``clamp(round(W/s), qmin, qmax)``; for learned rounding it is
    ``clamp(floor(W/s) + (h(V) > 0.5), qmin, qmax)``.
    """
    proxy = layer.weight_quant
    was_training = proxy.training
    proxy.eval()
    try:
        return layer.quant_weight().int()
    finally:
        proxy.train(was_training)


def _swap_layer(layer: nn.Module, quantizer: type, settings: dict) -> None:
    injector = quantizer.let(**settings)
    new = injector.proxy_class(layer, injector)
    new.train(layer.weight_quant.training)
    layer.weight_quant = new


def swap_weight_quantizer(
    model: nn.Module, quantizer: type, *, keep_step: bool = False, **let: object
) -> list[str]:
    """Give every quantized QuantConv/QuantLinear of ``model`` a new weight quantizer class.

    The float weights stay (they live on the layer, not in the quantizer). Each layer keeps its
    bit-width and its per-tensor/per-channel granularity unless ``let`` overrides them (e.g.
    ``bit_width=4``, ``scaling_per_output_channel=True``). The new step is the L_p search on the
    layer's weight, or with ``keep_step`` the old quantizer's step. Returns the swapped names.
    """
    if not isinstance(quantizer, type):
        raise TypeError(f"quantizer must be a Brevitas injector class, got {quantizer!r}")
    swapped = []
    for name, layer in list(quantized_layers(model)):
        with torch.no_grad():
            old = layer.quant_weight()
        settings = {"bit_width": int(old.bit_width.item()), "scaling_per_output_channel": old.scale.numel() > 1}
        _swap_layer(layer, quantizer, {**settings, **let})
        if keep_step:
            set_weight_step(layer, old.scale.detach())
        swapped.append(name)
    if not swapped:
        raise ValueError("the model has no quantized QuantConv/QuantLinear layer to swap")
    initialize_weight_scales_mse(model)
    return swapped


@torch.no_grad()
def bake_learned_rounding(model: nn.Module) -> list[str]:
    """Replace each learned-rounding layer by an HDRQ round-to-nearest layer deploying the same integers.

    The latent weight becomes ``codes × step``, so plain rounding reproduces the AdaRound codes
    exactly: after baking, AdaRound/BRECQ/QDrop models merge and export like HDRQ models (one
    learnable step per quantizer, ``quant_weight().int() == round(W/s)``). Returns the baked names.
    """
    baked = []
    for name, layer in list(quantized_layers(model)):
        if not any(isinstance(m, AdaRoundSte) for m in layer.weight_quant.modules()):
            continue
        codes, step = integer_weight(layer), weight_step(layer)
        bits = int(layer.quant_weight().bit_width.item())
        _swap_layer(layer, HDRQQuantizer, {"bit_width": bits, "scaling_per_output_channel": step.numel() > 1})
        set_weight_step(layer, step)
        layer.weight.copy_(codes.to(layer.weight.dtype) * step)
        if not torch.equal(integer_weight(layer), codes):
            raise RuntimeError(f"layer {name!r}: baked weights do not round back to the learned codes")
        baked.append(name)
    return baked
