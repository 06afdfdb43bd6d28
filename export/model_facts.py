"""What the exporter must know about a Brevitas model before writing it: is it one, is it
calibrated, which bit-widths and granularity it uses, and a fingerprint of its parameters."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from brevitas.core.scaling.standalone import ParameterFromRuntimeStatsScaling
from brevitas.nn.quant_layer import QuantNonLinearActLayer, QuantWeightBiasInputOutputLayer
from torch import nn

from hdrq_plugin.data import plain_tensor
from hdrq_plugin.quant.control import quantized_layers

from .errors import ExportError

# Layers with weights that would silently stay float if left un-quantized.
_FLOAT_WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                        nn.ConvTranspose3d, nn.Linear)
# ONNX QuantizeLinear/DequantizeLinear at opset 13 carry int8/uint8 only.
MAX_EXPORT_BITS = 8


@dataclass(frozen=True)
class QuantizationSummary:
    """Bit-widths and weight granularity read from a Brevitas model's quantizers."""

    weight_bits: dict[str, int]  # weight layer name -> bits
    act_bits: dict[str, int]  # activation quantizer owner name -> bits
    per_channel: dict[str, bool]  # weight layer name -> one scale per output channel
    integer_bias: bool  # every bias is quantized on the accumulator grid (Int32Bias)

    @property
    def granularity(self) -> str:
        kinds = set(self.per_channel.values())
        if kinds == {True}:
            return "per-channel"
        if kinds == {False}:
            return "per-tensor"
        return "mixed"

    @property
    def bits(self) -> str:
        """``w<b>a<b>`` with the narrowest weight and activation grids (edge layers are wider)."""
        return f"w{min(self.weight_bits.values())}a{min(self.act_bits.values())}"


def require_brevitas_model(model: object) -> None:
    """Raise unless ``model`` is a Brevitas model whose every weight layer has integer weights."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    layers = dict(quantized_layers(model, enabled_only=False))
    if not layers:
        raise TypeError(
            f"{type(model).__name__} is not a Brevitas quantized model: it has no brevitas.nn "
            "QuantConv/QuantLinear layers (convert it with hdrq_plugin.convert.to_brevitas.convert_to_brevitas)")
    float_layers = [name for name, module in model.named_modules()
                    if isinstance(module, _FLOAT_WEIGHT_LAYERS)
                    and not isinstance(module, QuantWeightBiasInputOutputLayer)]
    if float_layers:
        raise ExportError(f"layers left un-quantized, they would run in float: {float_layers}")
    for name, layer in layers.items():
        if not layer.weight_quant.is_quant_enabled:
            raise ExportError(f"weight quantization is disabled in layer {name!r}")
        bits = int(layer.weight_quant.bit_width())
        if bits > MAX_EXPORT_BITS:
            raise ExportError(
                f"layer {name!r} has {bits}-bit weights; the QDQ export stores at most "
                f"{MAX_EXPORT_BITS}-bit integers")


def _owner_name(module_path: str) -> str:
    """``layer1.relu.act_quant.fused...scaling_impl`` -> ``layer1.relu.act_quant``."""
    parts = module_path.split(".")
    for index, part in enumerate(parts):
        if part in ("act_quant", "input_quant", "output_quant"):
            return ".".join(parts[:index + 1])
    return module_path


def require_calibrated(model: nn.Module) -> None:
    """Raise if an activation quantizer never saw data (its scale is still the 1.0 placeholder).

    Brevitas' ``ParameterFromRuntimeStatsScaling`` counts the batches it collected statistics
    on; a count of 0 means ``calibration_mode`` (or loading a calibrated state_dict) never ran.
    """
    never_calibrated = sorted({_owner_name(name) for name, module in model.named_modules()
                               if isinstance(module, ParameterFromRuntimeStatsScaling)
                               and module.counter == 0})
    if never_calibrated:
        raise ValueError(
            "the model is not calibrated: these activation quantizers never saw data "
            f"{never_calibrated}; run hdrq_plugin.convert.to_brevitas.calibrate_activations (or Brevitas "
            "calibration_mode) first")


def _activation_quantizers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, QuantNonLinearActLayer):
            yield f"{name}.act_quant", module.act_quant
        if isinstance(module, QuantWeightBiasInputOutputLayer):
            for role in ("input_quant", "output_quant"):
                proxy = getattr(module, role)
                if proxy.is_quant_enabled:
                    yield f"{name}.{role}", proxy


def summarize_quantization(model: nn.Module) -> QuantizationSummary:
    """Read bits and granularity from the quantizers (the model must pass require_brevitas_model)."""
    layers = dict(quantized_layers(model, enabled_only=False))
    with torch.no_grad():
        weight_bits = {name: int(layer.weight_quant.bit_width()) for name, layer in layers.items()}
        per_channel = {name: layer.weight_quant.scale().numel() > 1 for name, layer in layers.items()}
        act_bits = {name: int(proxy.bit_width()) for name, proxy in _activation_quantizers(model)
                    if proxy.is_quant_enabled}
    if not act_bits:
        raise ExportError("the model quantizes no activations, so it has no integer data path")
    integer_bias = all(layer.bias is None or (layer.bias_quant.is_quant_enabled
                                              and layer.bias_quant.requires_input_scale)
                       for layer in layers.values())
    return QuantizationSummary(weight_bits, act_bits, per_channel, integer_bias)


def model_sha256(model: nn.Module) -> str:
    """SHA-256 of the state_dict (names, dtypes, shapes and values, in sorted name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not isinstance(tensor, torch.Tensor):
            continue
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _unbatched_conv_inputs(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Conv layers that receive an input without batch axis (torch accepts those silently)."""
    conv_ranks = {nn.Conv1d: 3, nn.Conv2d: 4, nn.Conv3d: 5}
    offenders, handles = [], []

    def check_rank(name: str, rank: int):
        def hook(_module, args):
            value = getattr(args[0], "value", args[0])  # QuantTensor or Tensor
            if isinstance(value, torch.Tensor) and value.dim() != rank:
                offenders.append(f"{name} got {value.dim()}-D input, needs {rank}-D")
        return hook

    for name, module in model.named_modules():
        rank = next((r for kind, r in conv_ranks.items() if isinstance(module, kind)), None)
        if rank is not None:
            handles.append(module.register_forward_pre_hook(check_rank(name, rank)))
    try:
        with torch.no_grad():
            output = model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(plain_tensor(output), torch.Tensor):
        raise ExportError(f"the model returns {type(output).__name__}; only single-tensor outputs export")
    return offenders


def require_fitting_input(model: nn.Module, example_input: object) -> None:
    """Raise unless ``example_input`` is a float32 batch the model accepts in eval mode."""
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a torch.Tensor, got {type(example_input).__name__}")
    shape = tuple(example_input.shape)
    if example_input.dtype != torch.float32:
        raise TypeError(f"example_input must be float32, got {example_input.dtype} (shape {shape})")
    if example_input.dim() < 2 or shape[0] < 1:
        raise ValueError(f"example_input needs a leading batch axis of size >= 1, got shape {shape}")
    was_training = model.training
    model.eval()
    try:
        offenders = _unbatched_conv_inputs(model, example_input)
    except (RuntimeError, ValueError, IndexError) as err:
        raise ValueError(f"example_input of shape {shape} does not fit the model: {err}") from err
    finally:
        model.train(was_training)
    if offenders:
        raise ValueError(f"example_input of shape {shape} lacks the batch axis: {offenders}")
