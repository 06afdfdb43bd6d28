"""Float model → Brevitas model: the conversion (BN folding, quantizer placement) and the op policy.

A newly supported op (a layer type, a functional call, a tensor method) goes in ``op_policy``:
what is quantized around it, or the :class:`UnsupportedOpError` that names it.
"""

from .from_brevitas import adopt_brevitas_model
from .op_policy import UnsupportedLayerError, UnsupportedOpError
from .to_brevitas import (
           RTN_FAMILY,
           calibrate_activations,
           compute_layers,
           convert_to_brevitas,
           fold_batchnorm,
)

__all__ = ["RTN_FAMILY", "UnsupportedLayerError", "adopt_brevitas_model", "UnsupportedOpError", "calibrate_activations", "compute_layers",
           "convert_to_brevitas", "fold_batchnorm"]
