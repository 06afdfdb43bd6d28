"""One verb for "quantize": ``quantize_model(model, data, config)``; the config's type picks the method.

- :class:`~hdrq_plugin.ptq.config.HDRQConfig` — the block-reconstruction engine, configured as
  RTN, AdaRound, BRECQ, QDrop or HDRQ (``HDRQConfig.for_method``; docs/hdrq_method.md §4, §6);
- :class:`~hdrq_plugin.ptq.gptq.GPTQConfig` — GPTQ through Brevitas;
- :class:`~hdrq_plugin.nipq.train.NIPQConfig` — NIPQ quantization-aware training with learned
  bit-widths (``data`` is then labelled training data; docs/nipq_method.md).

A method plugs in with :func:`register_method` (its config type, the quantizer family its models
are saved with, and the function that runs it); the CLI's ``--method`` names come from
:data:`METHOD_NAMES`. The torchao habit: one verb, a config object per job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .bitspec import BitSpec
from .errors import HDRQPluginError
from .options import METHOD_NAMES, RECONSTRUCTION_METHODS  # noqa: F401 (names of this verb)
from .ptq.config import HDRQConfig


class UnknownMethodError(HDRQPluginError, ValueError):
    """No quantization method of that name, or no method for that config type."""


@dataclass
class QuantizeResult:
    """What :func:`quantize_model` made: the quantized model, the quantizer family to save it with
    (:mod:`hdrq_plugin.families`), the method's name and its report where it has one
    (:class:`~hdrq_plugin.ptq.engine.ReconstructionReport`, :class:`~hdrq_plugin.nipq.train.NIPQResult`)."""

    model: nn.Module
    family: str
    method: str
    report: Any = None


@dataclass(frozen=True)
class _Method:
    config_type: type
    run: Callable[..., QuantizeResult]


_BY_CONFIG: dict[type, _Method] = {}


def register_method(config_type: type, run: Callable[..., QuantizeResult]) -> None:
    """Make ``quantize_model(model, data, config_type(...))`` call ``run(model, data, config, bits=, source=)``."""
    _BY_CONFIG[config_type] = _Method(config_type, run)


def quantize_model(model: nn.Module, data: Iterable, config: Any = None, *, bits: str | BitSpec = "w4a4",
                   source: nn.Module | None = None, method: str | None = None, seed: int = 0,
                   iterations: int | None = None) -> QuantizeResult:
    """Convert ``model`` at ``bits`` and quantize it with the method ``config`` selects.

    ``config=None`` takes the CPU preset of ``method`` (default ``"hdrq"``) at ``seed`` (and
    ``iterations`` for the reconstruction methods): see :func:`config_for_method`. ``source`` is
    the float source model θ0 (HDRQ's distance regulariser); the float ``model`` is never modified.
    """
    if config is None:
        config = config_for_method(method or "hdrq", seed=seed, iterations=iterations)
    entry = next((m for t, m in _BY_CONFIG.items() if isinstance(config, t)), None)
    if entry is None:
        known = ", ".join(t.__name__ for t in _BY_CONFIG)
        raise UnknownMethodError(f"no quantization method takes a {type(config).__name__}; configs: {known}")
    return entry.run(model, data, config, bits=bits, source=source)


#: Method names the CLI and the benchmarks accept: the reconstruction engine's, then GPTQ, NIPQ.


def config_for_method(name: str, *, seed: int = 0, iterations: int | None = None) -> Any:
    """The CPU-preset config of a method name (what ``--method NAME`` means on the command line)."""
    if name in RECONSTRUCTION_METHODS:
        overrides: dict[str, Any] = {"seed": seed}
        if iterations is not None:
            overrides["iterations"] = iterations
        return HDRQConfig.cpu_preset(name, **overrides)
    if name == "gptq":
        from .ptq.gptq import GPTQConfig

        return GPTQConfig(seed=seed)
    if name == "nipq":
        from .nipq.train import NIPQConfig

        return NIPQConfig.cpu_preset(seed=seed)
    raise UnknownMethodError(f"unknown method {name!r}; known: {', '.join(METHOD_NAMES)}")


def _reconstruct(model, data, config: HDRQConfig, *, bits, source) -> QuantizeResult:
    from .convert.to_brevitas import convert_to_brevitas
    from .families import get_family
    from .ptq.calibrate import calibrate_with_report
    from .quant.control import bake_learned_rounding

    family = "hdrq"
    qmodel = convert_to_brevitas(model, bits, **get_family(family).quantizers())
    report = calibrate_with_report(qmodel, data, source, config)
    # AdaRound/BRECQ/QDrop end with hard rounding variables; baking them into latent weights on
    # the grid (codes × step) gives every method the same quantizer family, so all merge,
    # export and reload the same way
    bake_learned_rounding(qmodel)
    return QuantizeResult(qmodel, family, config.method, report)


def _gptq(model, data, config, *, bits, source) -> QuantizeResult:
    from .convert.to_brevitas import convert_to_brevitas
    from .ptq.gptq import gptq_calibrate

    qmodel = convert_to_brevitas(model, bits)  # Brevitas' own quantizers: parameter scales
    gptq_calibrate(qmodel, data, num_samples=config.num_samples, act_order=config.act_order,
                   batch_size=config.batch_size)
    return QuantizeResult(qmodel, "rtn", "gptq")


def _nipq(model, data, config, *, bits, source) -> QuantizeResult:
    from .nipq.train import quantize_nipq

    qmodel, result = quantize_nipq(model, data, bits, config=config, seed=config.seed)
    return QuantizeResult(qmodel, "nipq", "nipq", result)


def _register_builtin_methods() -> None:
    from .nipq.train import NIPQConfig
    from .ptq.gptq import GPTQConfig

    register_method(HDRQConfig, _reconstruct)
    register_method(GPTQConfig, _gptq)
    register_method(NIPQConfig, _nipq)


_register_builtin_methods()
__all__ = ["QuantizeResult", "UnknownMethodError", "METHOD_NAMES", "config_for_method", "quantize_model",
           "register_method"]
