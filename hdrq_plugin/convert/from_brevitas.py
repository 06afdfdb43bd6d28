"""An existing Brevitas model → the same model on HDRQ's quantizers (issue 19, "Brevitas models in").

A Brevitas model (``QuantConv2d`` / ``QuantLinear`` / ``QuantReLU`` / ``QuantIdentity`` with
Brevitas' own quantizers, each layer at its own bit width, weights per tensor or per channel)
is read layer by layer, turned into its float twin (the same weights; a ``QuantIdentity`` that
quantizes an activation becomes an activation-grid marker, since its quantizer may be the
network's only nonlinearity, as in the bnn_pynq models), and that twin goes through the one
conversion every method uses (:func:`convert_to_brevitas`: BatchNorm folded, HDRQ quantizers,
FX graph). Each layer then gets back its own weight bit width and granularity, and each
activation grid its bit width. The result is what ``hdrq_calibrate``, ``merge_models``,
``export_qdq`` and ``validate`` take.

What is kept and what is not:

* weight bit width and granularity (per tensor / per output channel) of every Conv/Linear;
* bit width and signedness of every activation quantizer (``QuantReLU``, ``QuantIdentity``)
  and of the input quantizer;
* not kept: the Brevitas quantizers' scales (HDRQ calibrates its own; that is the point) and
  per-channel *activation* scales (onnxruntime's QDQ activations are per tensor, so they become
  per-tensor grids).

What cannot be served raises :class:`UnsupportedLayerError` naming the layer: 1-bit (binary)
weights or activations (no integer grid with a zero), Brevitas layers other than the ones
above (``QuantSigmoid``, ``QuantMultiheadAttention``, ...), a scalar normalisation that does
not directly follow a Linear layer.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from ..bitspec import MAX_BITS, MIN_BITS, BitSpec
from ..quant.quantizers import HDRQ_FAMILY
from .op_policy import SignedActivationGrid, UnsignedActivationGrid, UnsupportedLayerError
from .to_brevitas import _set_proxy_bits, compute_layers, convert_to_brevitas, set_weight_bit_width

with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    import brevitas.nn as qnn
    from brevitas.nn.quant_layer import QuantLayerMixin

#: Brevitas layers whose float twin is a plain torch layer holding the same parameters.
_FLOAT_TWINS = {qnn.QuantConv1d: nn.Conv1d, qnn.QuantConv2d: nn.Conv2d, qnn.QuantLinear: nn.Linear}


def adopt_brevitas_model(model: nn.Module) -> torch.fx.GraphModule:
    """Return a copy of a Brevitas model with HDRQ quantizers in place of its own.

    Every Conv/Linear keeps its weight bit width and granularity, every activation quantizer
    its bit width and sign; BatchNorm is folded; the result is an FX GraphModule ready for
    :func:`hdrq_plugin.hdrq_calibrate` (or ``quantize_model``'s lower-level steps), then
    :func:`hdrq_plugin.merge_models`, ``export_qdq`` and ``validate``. The model is not modified.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a Brevitas model (torch.nn.Module), got {type(model).__name__}")
    twin, layer_bits, act_bits, input_bits = _float_twin(model)
    if not layer_bits:
        raise UnsupportedLayerError(f"{type(model).__name__} has no Brevitas QuantConv/QuantLinear layer to adopt; "
                                    "for a float model use convert_to_brevitas")
    spec = BitSpec(max(b for b, _ in layer_bits.values()), max(act_bits.values(), default=8), edge_weight_bits=None)
    qmodel = convert_to_brevitas(twin, spec, weight_quant=HDRQ_FAMILY.weight_quant, act_quant=HDRQ_FAMILY.act_quant,
                                 signed_act_quant=HDRQ_FAMILY.signed_act_quant, input_bits=input_bits)
    modules = dict(qmodel.named_modules())
    for name, layer in compute_layers(qmodel):
        bits, per_channel = layer_bits[name]
        if per_channel:
            layer.weight_quant.quant_injector = layer.weight_quant.quant_injector.let(scaling_per_output_channel=True)
        set_weight_bit_width(layer, bits)
        # a Linear's own input quantizer (after pooling/flatten) reads the grid of the layer before it
    for name, bits in act_bits.items():
        quant = modules.get(name)
        proxy = getattr(quant, "act_quant", None)
        if proxy is None or not proxy.is_quant_enabled:
            raise UnsupportedLayerError(f"activation quantizer {name!r} has no place in the converted graph "
                                        "(is its output used?)")
        _set_proxy_bits(proxy, bits)
    qmodel.eval()
    with torch.no_grad():
        for _, layer in compute_layers(qmodel):
            layer.quant_weight()
    return qmodel


def _float_twin(model: nn.Module):
    """(float copy, {layer: (weight bits, per channel)}, {activation quantizer: bits}, input bits)."""
    twin = copy.deepcopy(model).eval()
    layer_bits: dict[str, tuple[int, bool]] = {}
    act_bits: dict[str, int] = {}
    input_bits = 8
    named = list(twin.named_modules())
    for name, module in named:
        if not isinstance(module, QuantLayerMixin) or isinstance(module, nn.Sequential):
            continue
        if type(module) in _FLOAT_TWINS:
            bits = _bits(name, "weights", module.weight_quant)
            scale = module.quant_weight().scale
            layer_bits[name] = (bits, scale is not None and scale.numel() > 1)
            _replace(twin, name, _plain_layer(module))
        elif isinstance(module, qnn.QuantReLU):
            act_bits[name] = _bits(name, "activations", module.act_quant)
            _replace(twin, name, nn.ReLU())
        elif isinstance(module, qnn.QuantIdentity):
            if not module.act_quant.is_quant_enabled:
                _replace(twin, name, nn.Identity())
                continue
            bits = _bits(name, "activations", module.act_quant)
            signed = bool(module.act_quant.is_signed)
            act_bits[name] = bits
            _replace(twin, name, (SignedActivationGrid if signed else UnsignedActivationGrid)(bits))
        elif isinstance(module, qnn.TruncAvgPool2d):
            _replace(twin, name, nn.AvgPool2d(module.kernel_size, module.stride))
        else:
            raise UnsupportedLayerError(
                f"layer {name!r} of type {type(module).__name__} cannot be adopted: adopt_brevitas_model serves "
                "QuantConv1d/2d, QuantLinear, QuantReLU, QuantIdentity and TruncAvgPool2d; replace it by its "
                "float torch.nn layer first")
    _fold_scalar_norms(twin)
    return twin, layer_bits, act_bits, input_bits


def _bits(name: str, what: str, proxy) -> int:
    if not proxy.is_quant_enabled:
        raise UnsupportedLayerError(f"layer {name!r} has float {what} (its quantizer is disabled); HDRQ quantizes "
                                    f"every layer: give it a quantizer or leave it out of the Brevitas model")
    bits = float(proxy.bit_width())
    if bits == 1:
        raise UnsupportedLayerError(
            f"layer {name!r} has 1-bit (binary) {what}: a ±1 grid has no zero and no integer QDQ form; HDRQ serves "
            f"{MIN_BITS}..{MAX_BITS}-bit integer grids (e.g. the 2W2A variants of bnn_pynq)")
    if not bits.is_integer() or not MIN_BITS <= bits <= MAX_BITS:
        raise UnsupportedLayerError(f"layer {name!r} has {bits:g}-bit {what}; HDRQ serves {MIN_BITS}..{MAX_BITS} bits")
    return int(bits)


def _plain_layer(layer: nn.Module) -> nn.Module:
    """The float torch layer of a Brevitas Conv/Linear, with the same (float) parameters."""
    float_type = _FLOAT_TWINS[type(layer)]
    if float_type is nn.Linear:
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    else:
        plain = float_type(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                           padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                           bias=layer.bias is not None, padding_mode=layer.padding_mode)
    plain.weight = nn.Parameter(layer.weight.detach().clone())
    if layer.bias is not None:
        plain.bias = nn.Parameter(layer.bias.detach().clone())
    return plain


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _is_scalar_norm(module: nn.Module) -> bool:
    """A normalisation with one mean, variance, weight and bias for the whole tensor (bnn_pynq's
    ``TensorNorm``): ``(x - mean) / sqrt(var + eps) * weight + bias`` in eval mode."""
    names = ("running_mean", "running_var", "weight", "bias")
    return all(isinstance(getattr(module, n, None), torch.Tensor) and getattr(module, n).numel() == 1 for n in names) \
        and isinstance(getattr(module, "eps", None), float) and not isinstance(module, nn.modules.batchnorm._NormBase)


@torch.no_grad()
def _fold_scalar_norms(twin: nn.Module) -> None:
    """Fold every scalar normalisation into the Linear/Conv right before it in the same container.

    Brevitas' ``MergeBatchNorm`` folds BatchNorm only; a scalar affine after the last layer is the
    same fold with one coefficient.
    """
    for parent in twin.modules():
        children = list(parent.named_children())
        for i, (child_name, child) in enumerate(children):
            if not _is_scalar_norm(child):
                continue
            previous = children[i - 1][1] if i > 0 else None
            if not isinstance(previous, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                raise UnsupportedLayerError(
                    f"scalar normalisation {child_name!r} ({type(child).__name__}) does not directly follow a Linear "
                    "or Conv layer in its container, so it cannot be folded into one")
            a = child.weight / torch.sqrt(child.running_var + child.eps)
            previous.weight.mul_(a)
            bias = previous.bias if previous.bias is not None else torch.zeros(previous.weight.shape[0])
            previous.bias = nn.Parameter(bias * a + child.bias - child.running_mean * a)
            setattr(parent, child_name, nn.Identity())
