"""NIPQ (CVPR 2023): quantization-aware training with learned per-tensor bit-widths and
truncations under pseudo-quantization noise (the same noise core as HDRQ), against an
average-bit or BOPs budget. docs/nipq_method.md.

``quantizers`` (the Brevitas injectors), ``cost`` (bits, BOPs), ``budget`` (targets, freezing),
``passes`` (range observation, BN re-estimation), ``train`` (the training loop), ``widths`` (the
merge rule for differing widths) and ``family`` (how NIPQ plugs into conversion and merge).
"""

from .cost import CostReport, NIPQModelError, describe_costs
from .quantizers import NIPQActQuantizer, NIPQSignedActQuantizer, NIPQWeightQuantizer
from .train import (
           CPU_EPOCHS,
           NIPQConfig,
           NIPQResult,
           NIPQTarget,
           NIPQTrainingError,
           nipq_train,
           quantize_nipq,
)
from .widths import land_merged_widths

__all__ = ["CPU_EPOCHS", "CostReport", "NIPQActQuantizer", "NIPQConfig", "NIPQModelError", "NIPQResult",
           "NIPQSignedActQuantizer", "NIPQTarget", "NIPQTrainingError", "NIPQWeightQuantizer", "describe_costs",
           "land_merged_widths", "nipq_train", "quantize_nipq"]
