"""Block-wise reconstruction engine: one loop, configured as HDRQ, QDrop, BRECQ, AdaRound or RTN."""

from .config import HDRQConfig
from .engine import IterationRecord, ReconstructionReport, UnitReport, reconstruct

__all__ = ["HDRQConfig", "IterationRecord", "ReconstructionReport", "UnitReport", "reconstruct"]
