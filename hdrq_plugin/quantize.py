"""One call from a float model and its target's data to a calibrated quantized model.

The face the CLI, the demo and the benchmarks share: convert with the method's quantizer
family, then calibrate with the method's configuration of the one reconstruction engine.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .bitspec import BitSpec
from .calibrate import hdrq_calibrate
from .checkpoint import quantizer_family
from .convert import convert_to_brevitas
from .quant_control import bake_learned_rounding
from .reconstruction.config import HDRQConfig


def quantize_model(model: nn.Module, calibration_data: Iterable, *, bits: str | BitSpec,
                   method: str = "hdrq", source: nn.Module | None = None, seed: int = 0,
                   iterations: int | None = None, config: HDRQConfig | None = None,
                   ) -> tuple[nn.Module, str]:
    """Convert ``model`` and calibrate it with ``method`` at the CPU preset (or ``config``).

    Returns ``(quantized_model, family)``; ``family`` goes into the checkpoint so the model can
    be rebuilt (:func:`hdrq_plugin.checkpoint.load_quantized`).
    """
    if config is None:
        overrides = {"seed": seed}
        if iterations is not None:
            overrides["iterations"] = iterations
        config = HDRQConfig.cpu_preset(method, **overrides)
    family = "hdrq"
    qmodel = convert_to_brevitas(model, bits, **quantizer_family(family))
    hdrq_calibrate(qmodel, calibration_data, source=source, config=config)
    # AdaRound/BRECQ/QDrop end with hard rounding variables; baking them into latent weights on
    # the grid (codes × step) gives every method the same quantizer family, so all merge,
    # export and reload the same way
    bake_learned_rounding(qmodel)
    return qmodel, family
