"""hdrq-plugin: merge-friendly post-training quantization for Brevitas (HDRQ, ICML 2025)."""

from .bitspec import BitSpec
from .convert import calibrate_activations, convert_to_brevitas

__all__ = ["BitSpec", "calibrate_activations", "convert_to_brevitas"]
__version__ = "0.1.0"
