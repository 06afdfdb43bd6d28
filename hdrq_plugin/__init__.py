"""hdrq-plugin: merge-friendly post-training quantization for Brevitas (HDRQ, ICML 2025).

    import brevitas.nn as qnn
    from hdrq_plugin import HDRQConfig, HDRQQuantizer, merge_models, quantize_model

    conv = qnn.QuantConv2d(16, 32, 3, weight_quant=HDRQQuantizer, weight_bit_width=4)
    q = [quantize_model(theta_t, calib_t, HDRQConfig.cpu_preset(), bits="w4a4", source=theta_0).model
         for theta_t, calib_t in targets]
    merged = merge_models(q)

The tree follows the architecture (docs/architecture.md): ``quant`` (quantizers and their math),
``convert`` (float → Brevitas, op policy), ``ptq`` (the reconstruction engine, GPTQ), ``nipq``,
``merge``, ``hot``; then ``export`` (ONNX, onnxruntime) and ``run`` (checkpoints, pipeline) and
the ``cli`` on top. Only the names below are the public face; the rest is reachable by module.
"""

from . import _legacy_paths
from .architectures import register_architecture
from .bitspec import BitSpec
from .convert import adopt_brevitas_model, convert_to_brevitas
from .errors import HDRQPluginError
from .families import QuantizerFamily, register_family
from .hot import HOTConfig, hot_mode
from .merge import average_float_models, error_barrier, merge_models
from .nipq import NIPQConfig
from .ptq import GPTQConfig, HDRQConfig, hdrq_calibrate, hdrq_mode
from .quant import HDRQActQuantizer, HDRQQuantizer, HDRQSignedActQuantizer
from .quantize import QuantizeResult, quantize_model
from .run import ModelRecipe, load_float_model, load_quantized, save_float_model, save_quantized

_legacy_paths.install()

__all__ = [
    "BitSpec", "GPTQConfig", "HDRQActQuantizer", "HDRQConfig", "HDRQPluginError", "HDRQQuantizer",
    "HDRQSignedActQuantizer", "HOTConfig", "ModelRecipe", "NIPQConfig", "QuantizeResult",
    "QuantizerFamily", "adopt_brevitas_model", "average_float_models", "convert_to_brevitas",
    "error_barrier", "hdrq_calibrate", "hdrq_mode", "hot_mode", "load_float_model", "load_quantized",
    "merge_models", "quantize_model", "register_architecture", "register_family",
    "save_float_model", "save_quantized",
]
__version__ = "0.2.0"

#: Names the 0.1 top level exported that now live in a subpackage: still importable from here
#: for one release (with a DeprecationWarning), no longer part of ``import *``.
_MOVED_NAMES = {
    "AdaRoundQuantizer": "quant", "BarrierResult": "merge", "CheckpointError": "run",
    "CostReport": "nipq", "HDRQPerChannelQuantizer": "quant", "MergeCompatibilityError": "merge",
    "NIPQActQuantizer": "nipq", "NIPQModelError": "nipq", "NIPQResult": "nipq",
    "NIPQSignedActQuantizer": "nipq", "NIPQTarget": "nipq", "NIPQTrainingError": "nipq",
    "NIPQWeightQuantizer": "nipq", "QuantMode": "quant", "UnsupportedLayerError": "convert",
    "UnsupportedOpError": "convert", "accuracy": "evaluation", "bake_learned_rounding": "quant",
    "calibrate_activations": "convert", "describe_costs": "nipq", "fold_batchnorm": "convert",
    "harmonic_mean": "evaluation", "integer_weight": "quant", "nipq_train": "nipq", "plot_barrier": "merge",
    "swap_weight_quantizer": "quant",
}


def __getattr__(name: str):
    if name in _MOVED_NAMES:
        import importlib
        import warnings

        where = f"hdrq_plugin.{_MOVED_NAMES[name]}"
        warnings.warn(f"hdrq_plugin.{name} is now {where}.{name}; the old name goes in the next release",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(where), name)
    raise AttributeError(f"module 'hdrq_plugin' has no attribute {name!r}")
