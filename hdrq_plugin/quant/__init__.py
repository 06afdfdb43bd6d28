"""Quantizers and the pure math under them: HDRQ's Brevitas quantizers, pseudo-quantization noise,
step-size search, AdaRound's learned rounding, and the switches the engines drive them with.

A new quantizer (family) goes here or in its own folder, plus one line in
:data:`hdrq_plugin.families.BUILTIN_FAMILIES`. The math (``noise``, ``step_size``) imports nothing
of the package.
"""

from .control import bake_learned_rounding, integer_weight, swap_weight_quantizer
from .learned_round import AdaRoundQuantizer
from .noise import pseudo_quantize, sample_rounding_noise
from .quantizers import (
    HDRQ_FAMILY,
    HDRQActQuantizer,
    HDRQPerChannelQuantizer,
    HDRQQuantizer,
    HDRQSignedActQuantizer,
    QuantMode,
)

__all__ = [
    "HDRQ_FAMILY", "AdaRoundQuantizer", "HDRQActQuantizer", "HDRQPerChannelQuantizer", "HDRQQuantizer",
    "HDRQSignedActQuantizer", "QuantMode", "bake_learned_rounding", "integer_weight", "pseudo_quantize",
    "sample_rounding_noise", "swap_weight_quantizer",
]
