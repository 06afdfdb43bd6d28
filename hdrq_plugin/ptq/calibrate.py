"""``hdrq_calibrate``: post-training calibration of a converted Brevitas model, HDRQ or a baseline.

    qmodel = convert_to_brevitas(theta_t, "w4a4", act_quant=HDRQActQuantizer,
                                 signed_act_quant=HDRQSignedActQuantizer)
    hdrq_calibrate(qmodel, target_loader, source=theta_0)              # HDRQ, paper defaults
    hdrq_calibrate(qmodel, target_loader, config=HDRQConfig.cpu_preset("qdrop"))

or, the Brevitas way (the user runs the data loop; reconstruction runs on exit)::

    with hdrq_mode(qmodel, source=theta_0):
        for images, _ in target_loader:
            qmodel(images)

Steps: swap in the method's weight quantizer (HDRQ's learnable-step quantizer, or AdaRound's
for the baselines) with L_p-searched steps, calibrate the activation steps on the calibration
set (Brevitas ``calibration_mode``; this alone is the RTN baseline), then block-wise
reconstruction (:mod:`hdrq_plugin.ptq.engine`). Labels are never read.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from ..bitspec import MAX_BITS, MIN_BITS
from ..convert.to_brevitas import COMPUTE_LAYERS, calibrate_activations, compute_layers
from ..data import collect_inputs
from ..quant.control import activation_scale_parameters, swap_weight_quantizer
from ..quant.learned_round import AdaRoundQuantizer
from ..quant.quantizers import HDRQQuantizer
from .config import HDRQConfig
from .engine import IterationRecord, ReconstructionReport, reconstruct
from .source import source_weights_for

with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    from brevitas.proxy.runtime_quant import ActQuantProxyFromInjectorBase

__all__ = ["hdrq_calibrate", "hdrq_mode", "calibrate_with_report", "prepare_quantizers"]


def hdrq_calibrate(
    model: nn.Module,
    calibration_data: Iterable,
    source: nn.Module | None = None,
    config: HDRQConfig | None = None,
    *,
    callback: Callable[[IterationRecord], None] | None = None,
) -> nn.Module:
    """Calibrate ``model`` in place with ``config``'s method (default: HDRQ) and return it.

    ``model`` is a Brevitas GraphModule from :func:`hdrq_plugin.convert_to_brevitas`.
    ``calibration_data`` is any iterable or DataLoader of tensors or ``(input, label)`` pairs; the
    first ``config.num_samples`` samples are used. ``source`` is the float source model θ0 (BN
    folded here, layers matched by name) or an already converted one; ``None`` anchors the
    distance term to the model's own float weights. ``callback`` sees every training step.
    """
    calibrate_with_report(model, calibration_data, source, config, callback=callback)
    return model


def calibrate_with_report(
    model: nn.Module,
    calibration_data: Iterable,
    source: nn.Module | None = None,
    config: HDRQConfig | None = None,
    *,
    callback: Callable[[IterationRecord], None] | None = None,
) -> ReconstructionReport:
    """:func:`hdrq_calibrate`, returning the per-unit report (errors, time, cache memory)."""
    config = config or HDRQConfig()
    if not isinstance(config, HDRQConfig):
        raise TypeError(f"config must be an HDRQConfig, got {type(config).__name__}")
    _check_converted(model)
    inputs = _calibration_inputs(calibration_data, config)
    sources = source_weights_for(model, source)  # before any change to the model's weights
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        prepare_quantizers(model, inputs, config)
        return reconstruct(model, inputs, sources, config, callback=callback)


@contextlib.contextmanager
def hdrq_mode(
    model: nn.Module,
    source: nn.Module | None = None,
    config: HDRQConfig | None = None,
    *,
    callback: Callable[[IterationRecord], None] | None = None,
) -> Iterator[nn.Module]:
    """Record the inputs the user feeds ``model`` inside the block; calibrate on exit.

    Like Brevitas' ``calibration_mode``: the forward passes inside the block only collect data
    (their outputs are those of the uncalibrated model).
    """
    recorded: list[torch.Tensor] = []

    def record(_module, args):
        if not args or not isinstance(args[0], torch.Tensor):
            raise TypeError("inside hdrq_mode, call the model with its input tensor as first positional argument")
        recorded.append(args[0].detach().clone())

    handle = model.register_forward_pre_hook(record)
    try:
        yield model
    finally:
        handle.remove()
    hdrq_calibrate(model, recorded, source, config, callback=callback)


def prepare_quantizers(qmodel: nn.Module, inputs: torch.Tensor, config: HDRQConfig) -> None:
    """Give ``qmodel`` the method's weight quantizer (L_p steps) and calibrate its activation steps."""
    check_bit_widths(qmodel)
    if config.reconstructs:
        _check_hdrq_activations(qmodel)
    weight_quantizer = AdaRoundQuantizer if config.weight_rounding == "learned" else HDRQQuantizer
    swap_weight_quantizer(qmodel, weight_quantizer)
    # one batch per 32 samples: calibration_mode averages the per-batch L_p steps
    calibrate_activations(qmodel, list(inputs.split(32)))


def check_bit_widths(qmodel: nn.Module) -> None:
    """Every quantized weight and activation must use MIN_BITS..MAX_BITS bits."""
    for name, layer in compute_layers(qmodel):
        if layer.weight_quant.is_quant_enabled:
            _check_bits(f"weights of layer {name!r}", layer.weight_quant.bit_width())
    for name, proxy in qmodel.named_modules():
        if isinstance(proxy, ActQuantProxyFromInjectorBase) and proxy.is_quant_enabled:
            _check_bits(f"activation quantizer {name!r}", proxy.bit_width())


def _check_bits(what: str, bit_width) -> None:
    bits = float(bit_width)
    if not bits.is_integer() or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{what} use {bits:g} bits; supported bit-widths are {MIN_BITS}..{MAX_BITS}")


def _check_converted(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a Brevitas model (torch.nn.Module), got {type(model).__name__}")
    if not any(isinstance(m, COMPUTE_LAYERS) for m in model.modules()):
        raise TypeError(
            f"{type(model).__name__} has no Brevitas quantized layer: convert the float model first "
            "with hdrq_plugin.convert_to_brevitas(model, bits, act_quant=HDRQActQuantizer, "
            "signed_act_quant=HDRQSignedActQuantizer)")


def _check_hdrq_activations(qmodel: nn.Module) -> None:
    """Reconstruction learns activation steps and drops activations: it needs HDRQ act quantizers."""
    for name, proxy in qmodel.named_modules():
        if isinstance(proxy, ActQuantProxyFromInjectorBase) and proxy.is_quant_enabled:
            if not activation_scale_parameters(proxy):
                raise TypeError(
                    f"activation quantizer {name!r} is not an HDRQ activation quantizer; reconstruction "
                    "learns activation steps (LSQ) and needs convert_to_brevitas(..., "
                    "act_quant=HDRQActQuantizer, signed_act_quant=HDRQSignedActQuantizer)")


def _calibration_inputs(data: Iterable, config: HDRQConfig) -> torch.Tensor:
    if data is None:
        raise TypeError("calibration_data is required (an iterable of tensors or (input, label) pairs)")
    inputs = collect_inputs(data, max_samples=config.num_samples)  # raises on empty data and NaN/inf
    if inputs.shape[0] < config.num_samples:
        raise ValueError(
            f"the calibration set has {inputs.shape[0]} samples but config.num_samples is "
            f"{config.num_samples}; pass more data or lower num_samples")
    if config.batch_size > inputs.shape[0]:
        raise ValueError(f"batch_size {config.batch_size} exceeds the {inputs.shape[0]} calibration samples")
    if not inputs.is_floating_point():
        inputs = inputs.float()
    return inputs
