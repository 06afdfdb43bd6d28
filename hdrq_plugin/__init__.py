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

#: Public name → the module that defines it. Imported on first use (PEP 562), so that
#: ``import hdrq_plugin`` and the ``hdrq`` parser (``--help``, argument errors) need no torch.
_PUBLIC_NAMES = {
    "BitSpec": "bitspec", "GPTQConfig": "ptq", "HDRQActQuantizer": "quant", "HDRQConfig": "ptq",
    "HDRQPluginError": "errors", "HDRQQuantizer": "quant", "HDRQSignedActQuantizer": "quant",
    "HOTConfig": "hot", "ModelRecipe": "run", "NIPQConfig": "nipq", "QuantizeResult": "quantize",
    "QuantizerFamily": "families", "adopt_brevitas_model": "convert", "average_float_models": "merge",
    "convert_to_brevitas": "convert", "error_barrier": "merge", "hdrq_calibrate": "ptq", "hdrq_mode": "ptq",
    "hot_mode": "hot", "load_float_model": "run", "load_quantized": "run", "merge_models": "merge",
    "quantize_model": "quantize", "register_architecture": "architectures", "register_family": "families",
    "save_float_model": "run", "save_quantized": "run",
}

#: Subpackages and modules reachable as attributes once ``hdrq_plugin`` is imported.
_SUBPACKAGES = frozenset({
    "architectures", "bitspec", "cli", "cli_commands", "convert", "data", "errors", "evaluation", "export",
    "families", "hot", "merge", "nipq", "options", "progress", "ptq", "quant", "quantize", "run",
})

_legacy_paths.install()

__all__ = list(_PUBLIC_NAMES)
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
    import importlib

    if name in _PUBLIC_NAMES:
        value = getattr(importlib.import_module(f"hdrq_plugin.{_PUBLIC_NAMES[name]}"), name)
        globals()[name] = value  # later look-ups are plain attribute reads
        return value
    if name in _MOVED_NAMES:
        import warnings

        where = f"hdrq_plugin.{_MOVED_NAMES[name]}"
        warnings.warn(f"hdrq_plugin.{name} is now {where}.{name}; the old name goes in the next release",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(where), name)
    if name in _SUBPACKAGES:  # ``import hdrq_plugin; hdrq_plugin.export.validate``, as when eagerly imported
        return importlib.import_module(f"hdrq_plugin.{name}")
    raise AttributeError(f"module 'hdrq_plugin' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
