"""Post-training quantization: one block-reconstruction engine configured as RTN, AdaRound,
BRECQ, QDrop or HDRQ (``HDRQConfig.for_method``), its units and boundary cache, the calibration
entry points, and GPTQ through Brevitas.

A new PTQ method is a configuration of the engine (``config.py``: a method name and its
switches), or, if it is not a reconstruction, a module here with its config dataclass registered
in :mod:`hdrq_plugin.quantize` (as GPTQ is).
"""

from .calibrate import calibrate_with_report, hdrq_calibrate, hdrq_mode
from .config import HDRQConfig
from .engine import IterationRecord, ReconstructionReport, UnitReport, reconstruct
from .gptq import GPTQConfig, gptq_calibrate

__all__ = ["GPTQConfig", "HDRQConfig", "IterationRecord", "ReconstructionReport", "UnitReport",
           "calibrate_with_report", "gptq_calibrate", "hdrq_calibrate", "hdrq_mode", "reconstruct"]
