"""hdrq-plugin: merge-friendly post-training quantization for Brevitas (HDRQ, ICML 2025).

    import brevitas.nn as qnn
    from hdrq_plugin import HDRQQuantizer, HDRQConfig, hdrq_calibrate, convert_to_brevitas, merge_models

    conv = qnn.QuantConv2d(16, 32, 3, weight_quant=HDRQQuantizer, weight_bit_width=4)
    qmodel = convert_to_brevitas(theta_t, "w4a4", weight_quant=HDRQQuantizer,
                                 act_quant=HDRQActQuantizer, signed_act_quant=HDRQSignedActQuantizer)
    hdrq_calibrate(qmodel, calibration_loader, source=theta_0, config=HDRQConfig.cpu_preset())
    merged = merge_models([q1, q2, q3])
"""

from .barrier import BarrierResult, error_barrier, plot_barrier
from .bitspec import BitSpec
from .calibrate import hdrq_calibrate, hdrq_mode
from .checkpoint import CheckpointError, load_quantized, save_quantized
from .convert import UnsupportedLayerError, calibrate_activations, convert_to_brevitas, fold_batchnorm
from .evaluation import accuracy, harmonic_mean
from .float_merge import average_float_models
from .hot import HOTConfig, hot_mode
from .learned_round import AdaRoundQuantizer
from .merge import MergeCompatibilityError, merge_models
from .nipq import NIPQConfig, NIPQResult, NIPQTarget, NIPQTrainingError, nipq_train
from .nipq_cost import CostReport, NIPQModelError, describe_costs
from .nipq_quantizers import NIPQActQuantizer, NIPQSignedActQuantizer, NIPQWeightQuantizer
from .op_policy import UnsupportedOpError
from .quant_control import bake_learned_rounding, integer_weight, swap_weight_quantizer
from .quantize import quantize_model
from .quantizers import (
    HDRQActQuantizer,
    HDRQPerChannelQuantizer,
    HDRQQuantizer,
    HDRQSignedActQuantizer,
    QuantMode,
)
from .reconstruction.config import HDRQConfig

__all__ = [
    "AdaRoundQuantizer", "BarrierResult", "BitSpec", "CheckpointError", "HDRQActQuantizer", "HDRQConfig",
    "HDRQPerChannelQuantizer", "HDRQQuantizer", "HDRQSignedActQuantizer", "MergeCompatibilityError",
    "QuantMode", "UnsupportedLayerError", "accuracy", "average_float_models", "bake_learned_rounding",
    "calibrate_activations", "convert_to_brevitas", "error_barrier", "fold_batchnorm", "harmonic_mean",
    "hdrq_calibrate", "hdrq_mode", "integer_weight", "load_quantized", "merge_models", "plot_barrier",
    "quantize_model", "save_quantized", "swap_weight_quantizer",
    "HOTConfig", "hot_mode", "UnsupportedOpError",
    # NIPQ (issue 11)
    "CostReport", "NIPQActQuantizer", "NIPQConfig", "NIPQModelError", "NIPQResult", "NIPQSignedActQuantizer",
    "NIPQTarget", "NIPQTrainingError", "NIPQWeightQuantizer", "describe_costs", "nipq_train",
]
__version__ = "0.1.0"
