"""NIPQ's cost constraints: average bits and BOPs as loss terms, and a report of a model's cost.

Formulas (``docs/nipq_method.md`` "Cost constraint"):

- average-bit mode, separately for weights and activations:
  ``L = |Σ b_l·numel_l / U − T·Σ numel_l / U|``; the reference's unit is ``U = 2^23``
  (≈ 2.5× MobileNet-v2's weight count), which makes the term vanish on small models, so the
  default unit here is ``Σ numel_l`` (the term is then in bits of average, whatever the size);
- BOPs mode: ``BOPs_l = k²·C_in·(C_out/groups)·H_out·W_out·b_w,l·b_a,l`` (Linear:
  ``C_in·C_out·b_w·b_a``), ``L = 3·|Σ BOPs_l / U − target / U|``; the reference's unit is
  1e9 against a 5.3 GBOPs target, so the default unit keeps that ratio, ``U = target / 5.3``.

``b_a,l`` is the bit-width of the quantizer that produces layer l's **input** (its own
``input_quant`` or the activation quantizer upstream). The reference code costs every layer
with a stale 32 bits instead, which makes low BOPs targets unreachable.

Bits in the losses are the deployed ``round(b_c)`` with a straight-through gradient
(:func:`round_ste`, as the reference), and the terms are L1: a constant pull until the rounded
widths meet the budget, so what is frozen is already on it. The report uses ``round(b_c)`` too.
Activation sizes and output resolutions come from one probe forward (:func:`describe_costs`).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from brevitas.nn.quant_layer import QuantNonLinearActLayer, QuantWeightBiasInputOutputLayer
from brevitas.proxy.runtime_quant import ActQuantProxyFromInjectorBase
from torch import Tensor, nn

from ..bitspec import MAX_BITS, MIN_BITS
from ..data import plain_tensor
from ..errors import HDRQPluginError
from .quantizers import LearnedBitWidth

__all__ = [
    "CostModel",
    "CostReport",
    "LayerCost",
    "NIPQModelError",
    "TensorCost",
    "describe_costs",
    "average_bits_loss",
    "bops_loss",
    "round_ste",
    "REFERENCE_BOPS_LOSS_WEIGHT",
]

REFERENCE_BOPS_LOSS_WEIGHT = 3.0  # L = 3·SmoothL1(...) (docs/nipq_method.md, reference code)
REFERENCE_BOPS_TARGET_PER_UNIT = 5.3  # reference: unit 1e9 for a 5.3 GBOPs target (docs/nipq_method.md)

# Ops that forward their input's integer grid unchanged: the quantizer feeding a layer may sit
# behind them (FX targets of the converted models).
_GRID_PRESERVING_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout)
_GRID_PRESERVING_FUNCTIONS = (torch.flatten, torch.reshape, F.max_pool2d, F.max_pool1d, operator.getitem)
_GRID_PRESERVING_METHODS = ("view", "reshape", "flatten", "contiguous")


class NIPQModelError(HDRQPluginError, TypeError):
    """The model has a layer the NIPQ cost cannot serve; the message names it."""


@dataclass
class TensorCost:
    """One quantized tensor: its bit-width module and element count (activations: per sample)."""

    name: str
    bits: LearnedBitWidth
    numel: int


@dataclass
class LayerCost:
    """One Conv/Linear layer: multiply-accumulates per sample and the two bit-widths it multiplies."""

    name: str
    macs: int  # k²·C_in/groups·C_out·H_out·W_out (Linear: C_in·C_out), per sample
    weight: TensorCost
    input_quantizer: str  # where b_a comes from (the input quantizer's owner)
    input_bits: LearnedBitWidth


@dataclass
class CostModel:
    """Everything the cost terms need, found once by :func:`describe_costs`."""

    weights: list[TensorCost]
    activations: list[TensorCost]
    layers: list[LayerCost]

    def _tensors(self, kind: str) -> list[TensorCost]:
        if kind not in ("weights", "activations"):
            raise ValueError(f"kind must be 'weights' or 'activations', got {kind!r}")
        return self.weights if kind == "weights" else self.activations

    def average_bits(self, kind: str, *, learned_only: bool = False, deployed: bool = False) -> Tensor:
        """``Σ b_l·numel_l / Σ numel_l`` over weights or activations (``learned_only``: skip pinned)."""
        tensors = [t for t in self._tensors(kind) if not (learned_only and _pinned(t))]
        if not tensors:
            raise ValueError(f"no {'learned ' if learned_only else ''}{kind} quantizer in the model")
        total = sum(t.numel for t in tensors)
        return sum(_bits(t.bits, deployed) * t.numel for t in tensors) / total

    def bops(self, *, deployed: bool = False) -> Tensor:
        """``Σ macs_l·b_w,l·b_a,l`` per sample, b_a from each layer's input quantizer."""
        return sum(layer.macs * _bits(layer.weight.bits, deployed) * _bits(layer.input_bits, deployed)
                   for layer in self.layers)

    def bops_bounds(self) -> tuple[float, float]:
        """The smallest and largest BOPs reachable: learned widths at 2 and 8 bits, pinned ones fixed."""
        def extreme(bits: LearnedBitWidth, value: float) -> float:
            return float(bits.frozen_bits) if bits.is_frozen else value
        low = sum(layer.macs * extreme(layer.weight.bits, 2.0) * extreme(layer.input_bits, 2.0) for layer in self.layers)
        high = sum(layer.macs * extreme(layer.weight.bits, 8.0) * extreme(layer.input_bits, 8.0) for layer in self.layers)
        return low, high

    def average_bits_bounds(self, kind: str) -> tuple[float, float]:
        """Smallest and largest average bits reachable over ``kind`` (pinned widths fixed)."""
        tensors = self._tensors(kind)
        total = sum(t.numel for t in tensors)
        def extreme(t: TensorCost, value: float) -> float:
            return float(t.bits.frozen_bits) if t.bits.is_frozen else value
        return (sum(extreme(t, 2.0) * t.numel for t in tensors) / total,
                sum(extreme(t, 8.0) * t.numel for t in tensors) / total)

    def report(self) -> CostReport:
        """The deployed (rounded or frozen) bits, BOPs and size of the model now."""
        with torch.no_grad():
            weight_bits = {t.name: int(_bits(t.bits, True)) for t in self.weights}
            act_bits = {t.name: int(_bits(t.bits, True)) for t in self.activations}
            return CostReport(
                average_weight_bits=float(self.average_bits("weights", deployed=True)),
                average_act_bits=float(self.average_bits("activations", deployed=True)),
                bops=float(self.bops(deployed=True)),
                weight_bytes=sum(weight_bits[t.name] * t.numel for t in self.weights) / 8.0,
                weight_bits=weight_bits, act_bits=act_bits,
                input_quantizers={layer.name: layer.input_quantizer for layer in self.layers})


def _pinned(t: TensorCost) -> bool:
    return getattr(t.bits, "pinned", False)


def _bits(bits: LearnedBitWidth, deployed: bool) -> Tensor:
    return bits.rounded() if deployed else bits.continuous()


@dataclass
class CostReport:
    """A model's cost as deployed: average bits, BOPs per sample, weight storage in bytes."""

    average_weight_bits: float
    average_act_bits: float
    bops: float
    weight_bytes: float  # Σ b_w·numel_w / 8, the packed integer weights (scales and biases excluded)
    weight_bits: dict[str, int] = field(default_factory=dict)
    act_bits: dict[str, int] = field(default_factory=dict)
    input_quantizers: dict[str, str] = field(default_factory=dict)

    @property
    def gbops(self) -> float:
        return self.bops / 1e9

    def as_dict(self) -> dict:
        return {"average_weight_bits": self.average_weight_bits, "average_act_bits": self.average_act_bits,
                "bops": self.bops, "weight_bytes": self.weight_bytes, "weight_bits": dict(self.weight_bits),
                "act_bits": dict(self.act_bits), "input_quantizers": dict(self.input_quantizers)}


def round_ste(bits: Tensor) -> Tensor:
    """``round(b)`` clamped to the exported 2..8 in the forward, identity gradient (the reference's
    ``round_ste``): the cost sees the *deployed* widths and still reaches θ_b."""
    return bits + (torch.round(bits).clamp(MIN_BITS, MAX_BITS) - bits).detach()


def _spent(bits: LearnedBitWidth, deployed: bool) -> Tensor:
    return round_ste(bits.continuous()) if deployed else bits.continuous()


def average_bits_loss(model_cost: CostModel, kind: str, target: float, *, unit: float | None = None,
                      deployed: bool = True) -> Tensor:
    """``|Σ b·numel / U − T·Σ numel / U|`` over the learned tensors of ``kind`` (docs/nipq_method.md).

    ``b = round_ste(b_c)`` (``deployed``): an L1 price per element-bit that stays constant until the
    *rounded* total meets the budget and flips sign there, as the reference's SmoothL1 on
    element-bit totals of ~10^7 does (always in its L1 regime). ``U`` defaults to their Σ numel
    (so the term is in bits of average). Pinned widths (the 8-bit edge layers) are outside the
    budget, as they are in a uniform W4A4 model.
    """
    tensors = [t for t in model_cost._tensors(kind) if not t.bits.pinned]
    total = sum(t.numel for t in tensors)
    unit = float(total) if unit is None else float(unit)
    spent = sum(_spent(t.bits, deployed) * t.numel for t in tensors) / unit
    return F.l1_loss(spent, torch.as_tensor(target * total / unit, dtype=spent.dtype))


def bops_loss(model_cost: CostModel, target_bops: float, *, unit: float | None = None,
              weight: float = REFERENCE_BOPS_LOSS_WEIGHT, deployed: bool = True) -> Tensor:
    """``3·|Σ BOPs / U − target / U|`` on the deployed (``round_ste``) widths (docs/nipq_method.md);
    ``U`` defaults to ``target / 5.3``."""
    unit = target_bops / REFERENCE_BOPS_TARGET_PER_UNIT if unit is None else float(unit)
    spent = sum(layer.macs * _spent(layer.weight.bits, deployed) * _spent(layer.input_bits, deployed)
                for layer in model_cost.layers) / unit
    return weight * F.l1_loss(spent, torch.as_tensor(target_bops / unit, dtype=spent.dtype))


# --- discovery -------------------------------------------------------------------------------

def _learned_bits(proxy: nn.Module | None) -> LearnedBitWidth | None:
    if proxy is None or not getattr(proxy, "is_quant_enabled", False):
        return None
    found = [m for m in proxy.modules() if isinstance(m, LearnedBitWidth)]
    return found[0] if found else None


def _act_proxies(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, ActQuantProxyFromInjectorBase):
            yield name, module


def _producing_quantizer(graph_model: nn.Module, node) -> tuple[str, nn.Module] | None:
    """Walk back from a layer's input through grid-preserving ops to the module that quantized it."""
    while True:
        if node.op == "call_module":
            module = graph_model.get_submodule(node.target)
            proxy = getattr(module, "act_quant", None)
            if isinstance(module, QuantNonLinearActLayer) or proxy is not None:
                return f"{node.target}.act_quant", proxy
            if isinstance(module, _GRID_PRESERVING_MODULES):
                node = node.args[0]
                continue
            return None
        if node.op == "call_function" and node.target in _GRID_PRESERVING_FUNCTIONS:
            node = node.args[0]
            continue
        if node.op == "call_method" and node.target in _GRID_PRESERVING_METHODS:
            node = node.args[0]
            continue
        return None


def _input_quantizers(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Each compute layer's input quantizer: its own ``input_quant`` or the upstream act quantizer."""
    found: dict[str, tuple[str, nn.Module]] = {}
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantWeightBiasInputOutputLayer)}
    for name, layer in layers.items():
        if layer.input_quant.is_quant_enabled:
            found[name] = (f"{name}.input_quant", layer.input_quant)
    graph = getattr(model, "graph", None)  # torch.fx or Brevitas' backported fx GraphModule
    if graph is not None:
        for node in graph.nodes:
            if node.op == "call_module" and node.target in layers and node.target not in found:
                producer = _producing_quantizer(model, node.args[0])
                if producer is not None:
                    found[node.target] = producer
    missing = sorted(set(layers) - set(found))
    if missing:
        raise NIPQModelError(
            f"cannot tell which quantizer produces the input of layer(s) {missing}: BOPs need each "
            "layer's input bit-width. Give the layer an input_quant, or feed it from a QuantReLU/"
            "QuantIdentity (through max-pool/flatten only), as convert_to_brevitas does"
            + ("" if graph is not None else "; this model has no FX graph to follow (not a torch.fx "
               "GraphModule), so only input_quant counts"))
    return found


@torch.no_grad()
def describe_costs(model: nn.Module, example_input: Tensor) -> CostModel:
    """Find every NIPQ quantizer, its tensor size, and each layer's MACs and input quantizer.

    One forward of ``example_input`` in eval mode measures activation sizes (per sample) and
    output resolutions. Raises :class:`NIPQModelError` naming a layer whose weight or input
    quantizer is not a NIPQ quantizer, or whose input quantizer cannot be found.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantWeightBiasInputOutputLayer)}
    if not layers:
        raise NIPQModelError("the model has no Brevitas QuantConv/QuantLinear layer")
    weights = []
    for name, layer in layers.items():
        bits = _learned_bits(layer.weight_quant)
        if bits is None:
            raise NIPQModelError(f"layer {name!r} has no NIPQ weight quantizer "
                                 f"({type(layer.weight_quant).__name__}); convert with 'nipq-w4a4'")
        weights.append(TensorCost(f"{name}.weight", bits, layer.weight.numel()))
    act_proxies = {name: proxy for name, proxy in _act_proxies(model) if proxy.is_quant_enabled}
    for name, proxy in act_proxies.items():
        if _learned_bits(proxy) is None:
            raise NIPQModelError(f"activation quantizer {name!r} is not a NIPQ quantizer; convert with 'nipq-w4a4'")

    act_numel: dict[str, int] = {}
    out_pixels: dict[str, int] = {}
    handles = []

    def record_act(name):
        def hook(_module, _args, output):
            value = plain_tensor(output)
            if isinstance(value, Tensor):
                act_numel[name] = value[0].numel()
        return hook

    def record_out(name):
        def hook(_module, _args, output):
            value = plain_tensor(output)
            out_pixels[name] = int(value[0].numel() // value.shape[1]) if value.dim() > 2 else 1
        return hook

    for name, proxy in act_proxies.items():
        handles.append(proxy.register_forward_hook(record_act(name)))
    for name, layer in layers.items():
        handles.append(layer.register_forward_hook(record_out(name)))
    was_training = model.training
    model.eval()
    try:
        model(example_input[:1])
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    activations = [TensorCost(name, _learned_bits(proxy), act_numel[name])
                   for name, proxy in act_proxies.items() if name in act_numel]

    inputs = _input_quantizers(model)
    layer_costs = []
    for (name, layer), weight in zip(layers.items(), weights, strict=True):
        quantizer_name, proxy = inputs[name]
        input_bits = _learned_bits(proxy)
        if input_bits is None:
            raise NIPQModelError(f"layer {name!r}: its input quantizer {quantizer_name!r} is not a NIPQ quantizer")
        if isinstance(layer, nn.Linear):
            macs = layer.in_features * layer.out_features
        else:
            k = int(torch.tensor(layer.kernel_size).prod())
            macs = k * (layer.in_channels // layer.groups) * layer.out_channels * out_pixels[name]
        layer_costs.append(LayerCost(name, int(macs), weight, quantizer_name, input_bits))
    return CostModel(weights, activations, layer_costs)
