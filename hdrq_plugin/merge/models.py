"""Merge quantized Brevitas models of one architecture into one deployable integer model.

Weights are merged on their integer grids with averaged scales (the rules of
:mod:`hdrq_plugin.merge.rules`, docs/hdrq_method.md §5); every other floating-point tensor — activation
scales, biases, LayerNorm affine parameters — is averaged with the same coefficients. The result
is a new model (a deep copy of the first) whose every weight lies exactly on its merged grid:
in eval, ``layer.quant_weight().int()`` equals the merged integers and ``.scale`` the merged
scale, so a QDQ export stores exactly what was merged.

The merge reads and writes weights through Brevitas' public surface only, so it works with any
weight quantizer that has one learnable scale parameter proportional to the scale (Brevitas'
``ParameterFromStatsFromParameterScaling``, the HDRQ quantizer): codes and scale come from
``quant_weight()``; the merged latent weight is written as ``codes × scale`` and the scale
parameter rescaled; both are then read back and any mismatch is an error, never an off-grid model.
Float models are averaged by :func:`hdrq_plugin.merge.float_merge.average_float_models`.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import HDRQPluginError
from ..families import loaded_families
from ..quant.control import quantized_layers
from .float_merge import average_float_models, merge_relative_to
from .rules import (
    NOISE_TRIALS,
    ROUNDING_RULES,
    TIE_TOLERANCE,
    merge_integer_weights,
    normalize_coefficients,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # optional-kernel warnings at Brevitas import
    from brevitas.function.ops import max_int, min_int
    from brevitas.nn.mixin.base import QuantLayerMixin
    from brevitas.proxy import ActQuantProxyFromInjector, WeightQuantProxyFromInjector


class MergeCompatibilityError(HDRQPluginError, ValueError):
    """The models cannot be merged; the message names the offending layer."""


@dataclass(frozen=True)
class WeightGrid:
    """The integer weights of one quantized layer as Brevitas deploys them."""

    codes: Tensor  # int64
    scale: Tensor
    bit_width: int
    signed: bool
    narrow_range: bool

    @property
    def qmin(self) -> int:
        return int(min_int(self.signed, self.narrow_range, torch.tensor(float(self.bit_width))))

    @property
    def qmax(self) -> int:
        return int(max_int(self.signed, self.narrow_range, torch.tensor(float(self.bit_width))))


def is_quantized_model(model: nn.Module) -> bool:
    """True when ``model`` contains a Brevitas quantized layer (``QuantLayerMixin``)."""
    return any(isinstance(m, QuantLayerMixin) for m in model.modules())




@contextlib.contextmanager
def evaluation_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode (QuantTensor.int() needs it) and restore every submodule's flag."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag


def read_weight_grid(layer: nn.Module, name: str = "layer") -> WeightGrid:
    """Codes, scale, bit width and signedness of ``layer``'s deployed (eval) weight."""
    with evaluation_mode(layer), torch.no_grad():
        quant = layer.quant_weight()
        codes = quant.int().to(torch.int64)
    if not bool((quant.zero_point == 0).all()):
        raise MergeCompatibilityError(f"layer {name!r} has an asymmetric weight quantizer (non-zero "
                                      "zero point); only symmetric integer weights can be merged")
    return WeightGrid(codes, quant.scale.detach().clone(), int(quant.bit_width), bool(quant.signed),
                      bool(layer.weight_quant.is_narrow_range))


def merge_models(models: Sequence[nn.Module], coefficients: Sequence[float] | None = None, *,
                 rounding: str = "noise-sampling", trials: int = NOISE_TRIALS, seed: int = 0,
                 source: nn.Module | None = None, tie_tolerance: float = TIE_TOLERANCE) -> nn.Module:
    """Merge models of one architecture into a new model (the inputs are not modified).

    ``coefficients`` weigh the models (uniform by default) and must sum to 1 — unless ``source``
    (θ0, a model of the same kind and architecture) is given: then the merge is task arithmetic,
    ``θ0 + Σ c_t (θ_t − θ0)``, i.e. a merge of ``[source, *models]`` with coefficients
    ``[1 − Σ c_t, *c_t]`` (with Σ c_t = 1 it equals the plain merge). ``rounding`` is one of
    ``noise-sampling`` (docs/hdrq_method.md §5, ``trials`` draws), ``half-to-even``, ``random`` (one draw) or
    ``naive`` (re-rounding of the averaged dequantized weights; biased, for comparison only);
    ``seed`` makes the draws reproducible. Float models (no Brevitas layer) are averaged
    instead; they have no grid, so ``rounding``, ``trials`` and ``seed`` do not apply to them.
    """
    models = list(models)
    if not models:
        raise ValueError("merge_models needs at least one model")
    for index, model in enumerate(models):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model {index} is a {type(model).__name__}, not a torch.nn.Module")
    if rounding not in ROUNDING_RULES:
        raise ValueError(f"unknown rounding {rounding!r}; choose one of {', '.join(ROUNDING_RULES)}")
    members, weights = _members_and_coefficients(models, coefficients, source)
    kinds = {is_quantized_model(m) for m in members}
    if len(kinds) > 1:
        raise TypeError("cannot merge quantized (Brevitas) and float models together"
                        + (" (check `source`)" if source is not None else ""))
    if not kinds.pop():
        if source is None:
            return average_float_models(models, weights)
        return merge_relative_to(source, models, weights[1:])
    labels = [f"model {i}" for i in range(len(models))]
    labels = labels if source is None else ["source", *labels]
    return _merge_quantized(members, weights, labels, first=models[0], rounding=rounding, trials=trials,
                            generator=torch.Generator().manual_seed(seed), tie_tolerance=tie_tolerance)


def _members_and_coefficients(models, coefficients, source):
    if source is None:
        weights = normalize_coefficients(coefficients, len(models))
        if any(c < 0 for c in weights):
            raise ValueError(f"coefficients must be non-negative for a plain merge, got {weights}; "
                             "negative ones need task arithmetic (pass `source`)")
        return models, weights
    if not isinstance(source, nn.Module):
        raise TypeError(f"source is a {type(source).__name__}, not a torch.nn.Module")
    if coefficients is None:
        task = (1.0 / len(models),) * len(models)
    else:
        task = tuple(float(c) for c in coefficients)
        if len(task) != len(models):
            raise ValueError(f"got {len(task)} coefficients for {len(models)} models")
    return [source, *models], normalize_coefficients((1.0 - sum(task), *task), len(models) + 1)


def _merge_quantized(members, coefficients, labels, *, first, rounding, trials, generator, tie_tolerance):
    for label, model in zip(labels, members, strict=True):  # first: un-calibrated models lack scale entries
        check_calibrated(model, label)
    first_index = next(i for i, m in enumerate(members) if m is first)
    hooks = [family.merge for family in loaded_families() if family.merge is not None]
    for hook in hooks:  # e.g. NIPQ: per-layer widths differ -> every member at the wider one
        members = hook.align_members(members)
    check_same_architecture(members, labels)
    merged = copy.deepcopy(members[first_index])
    layers = quantized_layers(merged)
    owned = _weight_state_keys(merged, layers)
    _average_other_tensors(members, coefficients, merged, owned)
    for hook in hooks:  # e.g. NIPQ's activation truncations: averaged as α, not as θ
        hook.average_extra_state(members, coefficients, merged)
    member_layers = [dict(m.named_modules()) for m in members]
    for name, layer in layers:
        grids = [read_weight_grid(modules[name], name) for modules in member_layers]
        _check_same_grid(name, grids, labels)
        result = merge_integer_weights([g.codes for g in grids], [g.scale for g in grids], coefficients,
                                       qmin=grids[0].qmin, qmax=grids[0].qmax, rounding=rounding,
                                       trials=trials, generator=generator, tie_tolerance=tie_tolerance)
        write_weight_grid(layer, name, result.codes, result.scale)
    return merged


def check_same_architecture(models: Sequence[nn.Module], labels: Sequence[str] | None = None) -> None:
    """Raise :class:`MergeCompatibilityError` naming the first layer where the models differ:
    module type, tensor names or shapes (per-tensor vs per-channel scales), or a quantizer's
    bit width, signedness or narrow range."""
    labels = list(labels) if labels is not None else [f"model {i}" for i in range(len(models))]
    first = labels[0]
    reference = dict(models[0].named_modules(remove_duplicate=False))
    reference_state = models[0].state_dict()
    for label, model in zip(labels[1:], models[1:], strict=True):
        modules, state = dict(model.named_modules(remove_duplicate=False)), model.state_dict()
        for name in sorted(reference.keys() & modules.keys()):
            mine, theirs = _quantizer_signature(modules[name]), _quantizer_signature(reference[name])
            if mine != theirs:
                raise MergeCompatibilityError(
                    f"layer {_layer_of(name + '.')!r}: quantizer {name!r} is {theirs} in {first} but "
                    f"{mine} in {label}")
        for key in sorted(reference_state.keys() | state.keys()):
            if key not in state or key not in reference_state:
                raise MergeCompatibilityError(
                    f"layer {_layer_of(key)!r}: tensor {key!r} exists in only one of {first} and {label}")
            if state[key].shape != reference_state[key].shape:
                raise MergeCompatibilityError(
                    f"layer {_layer_of(key)!r}: {key!r} has shape {tuple(reference_state[key].shape)} in "
                    f"{first} but {tuple(state[key].shape)} in {label} (granularity or size differs)")
        for name in sorted((reference.keys() | modules.keys()) - {""}):  # the root: FX renames it
            if name not in modules or name not in reference:
                raise MergeCompatibilityError(
                    f"layer {name!r} exists in only one of {first} and {label}: different architectures")
            if type(modules[name]).__name__ != type(reference[name]).__name__:
                raise MergeCompatibilityError(
                    f"layer {_layer_of(name + '.')!r}: module {name!r} is a {type(reference[name]).__name__} "
                    f"in {first} but a {type(modules[name]).__name__} in {label}")


def _quantizer_signature(module: nn.Module) -> dict | None:
    """Bit width, signedness and range of an enabled weight/activation quantizer (else None)."""
    if not isinstance(module, (ActQuantProxyFromInjector, WeightQuantProxyFromInjector)):
        return None
    if not module.is_quant_enabled:
        return {"enabled": False}
    return {"bit_width": float(module.bit_width()), "signed": bool(module.is_signed),
            "narrow_range": bool(module.is_narrow_range)}


def _layer_of(key: str) -> str:
    """The module path of a state-dict key, cut before the quantizer internals."""
    for marker in (".weight_quant.", ".input_quant.", ".output_quant.", ".act_quant.", ".bias_quant."):
        if marker in key:
            return key.split(marker)[0]
    return key.rpartition(".")[0] or key


def _check_same_grid(name: str, grids: Sequence[WeightGrid], labels: Sequence[str]) -> None:
    reference = grids[0]
    for label, grid in zip(labels[1:], grids[1:], strict=True):
        for field in ("bit_width", "signed", "narrow_range"):
            if getattr(grid, field) != getattr(reference, field):
                raise MergeCompatibilityError(
                    f"layer {name!r}: weight {field} is {getattr(reference, field)} in {labels[0]} but "
                    f"{getattr(grid, field)} in {label}")
        if grid.scale.shape != reference.scale.shape:
            raise MergeCompatibilityError(
                f"layer {name!r}: weight scale shape {tuple(reference.scale.shape)} in {labels[0]} but "
                f"{tuple(grid.scale.shape)} in {label} (per-tensor vs per-channel)")


def check_calibrated(model: nn.Module, label: str = "model") -> None:
    """Raise naming the first activation quantizer whose scale was never calibrated.

    Brevitas' runtime-statistics scalers (``ParameterFromRuntimeStatsScaling``) keep a step
    ``counter``; their learned ``value`` is only in use once it exceeds ``collect_stats_steps``.
    """
    for name, module in model.named_modules():
        counter, steps = getattr(module, "counter", None), getattr(module, "collect_stats_steps", None)
        if isinstance(counter, int) and isinstance(steps, int) and counter <= steps:
            raise MergeCompatibilityError(
                f"{label} is not calibrated: the activation quantizer of layer {_layer_of(name + '.')!r} "
                f"({name}) has no scale yet "
                "(run hdrq_plugin.calibrate_activations or a calibration method first)")


def _weight_state_keys(model: nn.Module, layers) -> set[str]:
    """State-dict keys set by the weight merge: each layer's weight and its quantizer's state."""
    owned = set()
    for name, layer in layers:
        owned.add(f"{name}.weight")
        owned.update(f"{name}.weight_quant.{key}" for key in layer.weight_quant.state_dict())
    return owned


@torch.no_grad()
def _average_other_tensors(members, coefficients, merged: nn.Module, owned: set[str]) -> None:
    """Average every float tensor not owned by the weight merge; equal tensors are kept as they
    are (so merging a model with itself is exact), unequal non-float ones are an error."""
    targets = merged.state_dict(keep_vars=True)
    states = [m.state_dict() for m in members]
    for key, target in targets.items():
        if key in owned:
            continue
        values = [state[key] for state in states]
        if all(torch.equal(v, values[0]) for v in values[1:]):
            target.copy_(values[0])
        elif target.is_floating_point():
            target.copy_(sum(c * v.to(torch.float64) for c, v in zip(coefficients, values, strict=True)).to(target.dtype))
        else:
            raise MergeCompatibilityError(f"layer {_layer_of(key)!r}: integer state {key!r} differs between models")


def _scale_parameter(layer: nn.Module, name: str) -> nn.Parameter:
    parameters = list(layer.weight_quant.parameters())
    if len(parameters) != 1:
        raise TypeError(
            f"layer {name!r}: its weight quantizer has {len(parameters)} parameters; the merge needs "
            "exactly one learnable scale (e.g. ScalingImplType.PARAMETER_FROM_STATS, as "
            "convert_to_brevitas uses); statistics-based scales cannot be set")
    return parameters[0]


@torch.no_grad()
def write_weight_grid(layer: nn.Module, name: str, codes: Tensor, scale: Tensor) -> None:
    """Set ``layer`` so that its eval ``quant_weight()`` is exactly ``codes`` on step ``scale``.

    The scale parameter is assumed proportional to the scale (true for Brevitas' float-scale
    restrictions); both results are read back and a mismatch raises ``RuntimeError``.
    """
    for family in loaded_families():  # a family whose scale is not one parameter writes its own
        if family.merge is not None and family.merge.write_weight_grid(layer, name, codes, scale):
            _check_written(layer, name, codes, scale)
            return
    parameter = _scale_parameter(layer, name)
    current = read_weight_grid(layer, name).scale
    if parameter.numel() != current.numel():
        raise TypeError(f"layer {name!r}: scale parameter has {parameter.numel()} entries but the "
                        f"scale has {current.numel()}")
    ratio = parameter.detach().to(torch.float64).reshape(current.shape) / current.to(torch.float64)
    parameter.copy_((scale.to(torch.float64) * ratio).reshape(parameter.shape).to(parameter.dtype))
    layer.weight.copy_((codes.to(torch.float64) * scale.to(torch.float64)).to(layer.weight.dtype))
    _check_written(layer, name, codes, scale)


def _check_written(layer: nn.Module, name: str, codes: Tensor, scale: Tensor) -> None:
    written = read_weight_grid(layer, name)
    if not torch.equal(written.codes, codes.to(torch.int64)):
        wrong = int((written.codes != codes).sum())
        raise RuntimeError(f"layer {name!r}: {wrong} merged weights left their grid after writing; "
                           "its weight quantizer does not deploy round(weight / scale)")
    if not torch.allclose(written.scale.to(torch.float64), scale.to(torch.float64).expand_as(written.scale),
                          rtol=1e-5, atol=0.0):
        raise RuntimeError(f"layer {name!r}: the written scale parameter does not give the merged scale; "
                           "its weight quantizer's scale is not proportional to its parameter")
