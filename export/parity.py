"""How close onnxruntime's output must be to the Brevitas model's, and the running tally of it.

Why not "max abs diff == 0": onnxruntime accumulates convolutions in int32 and requantizes with
a float32 multiplier, Brevitas computes the same grid values with float32 convolutions. The
two round differently when a value sits within float error of a half step, so a few codes
per million flip by one; deeper layers pass the flip on. Measured on this machine
(benchmarks/export_latency.py, ResNet-8 widths 32/64/128, 32x32 input): W4A4 files agree to
1e-7 (float32 noise of the float logits), 8-bit-activation files differ by up to ~3 output
steps on <= 2 % of the logits, while one wrong weight code, a bias off by one LSB or an
activation scale off by 0.5 % moves 16-92 % of the logits by more than one step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ParityTolerance:
    """ORT matches Brevitas when few output elements differ by more than a few output steps."""

    output_steps: float = 1.0  # issue 4: "at most one output step"
    max_share_beyond: float = 0.05  # measured: rounding ties <= 2 %, real export errors >= 16 %

    def __post_init__(self) -> None:
        if self.output_steps < 0:
            raise ValueError(f"output_steps must be >= 0, got {self.output_steps}")
        if not 0.0 <= self.max_share_beyond <= 1.0:
            raise ValueError(f"max_share_beyond must be in [0, 1], got {self.max_share_beyond}")


@dataclass
class ParityTally:
    """Accumulates differences between two model outputs batch by batch."""

    output_step: float | None  # None: the grid is unknown, so any difference counts as beyond
    tolerance: ParityTolerance
    elements: int = 0
    beyond: int = 0
    max_abs_diff: float = 0.0

    @property
    def threshold(self) -> float:
        return 0.0 if self.output_step is None else self.tolerance.output_steps * self.output_step

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        if reference.shape != candidate.shape:
            raise ValueError(f"output shapes differ: reference {reference.shape}, onnxruntime {candidate.shape}")
        diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
        self.elements += diff.size
        self.beyond += int(np.count_nonzero(diff > self.threshold))
        if diff.size:
            self.max_abs_diff = max(self.max_abs_diff, float(diff.max()))

    @property
    def share_beyond(self) -> float:
        return self.beyond / self.elements if self.elements else 0.0

    def failure(self) -> str | None:
        """A message when the outputs disagree beyond the tolerance, else None."""
        if self.elements == 0:
            return "no data was given to compare onnxruntime with the model"
        if self.share_beyond <= self.tolerance.max_share_beyond:
            return None
        step = "unknown output step" if self.output_step is None else f"output step {self.output_step:.3g}"
        return (f"parity: {self.share_beyond:.2%} of output elements differ by more than "
                f"{self.tolerance.output_steps:g} step(s) ({step}; max abs diff "
                f"{self.max_abs_diff:.3g}), allowed {self.tolerance.max_share_beyond:.2%}")
