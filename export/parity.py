"""How close onnxruntime's output must be to the Brevitas model's, and the running tally of it.

Why the default is not "max abs diff == 0": onnxruntime accumulates convolutions in int32 and
requantizes with a float32 multiplier, while Brevitas computes the same grid values with
float32 convolutions. The two round differently when a value lies within float error of a
half step, so a few codes per 10^4-10^5 flip by one and later layers pass the flip on.
Measured on this machine (ResNet-8 widths 32/64/128, 32x32 inputs, 256 random images, see
benchmarks/export_latency.py): 4-bit-activation files agree to float32 noise (relative error
~1e-7); 8-bit-activation files differ by many output steps on a few logits, relative L2 error
1e-3 to 2e-3 (5e-3 for a randomly initialised ResNet-20, whose deep random layers amplify
flips). Genuine export errors injected into those files moved the logits much more: a zero
point off by one 1.5e-2, a weight scale off by 10 % 4e-2, an activation scale off by 10 %
5.5e-2, reversed per-channel scales 0.12, a weight scale off by 2x 0.37, a flipped weight
sign 0.44-0.53. The default threshold sits between the two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ParityTolerance:
    """When onnxruntime's output counts as the Brevitas model's output."""

    max_relative_error: float = 1e-2  # measured above: tie flips <= 5e-3, real errors >= 1.5e-2
    max_abs_diff: float | None = None  # e.g. 0.0 to demand exactness (quantized outputs); None: unchecked

    def __post_init__(self) -> None:
        if not self.max_relative_error >= 0:
            raise ValueError(f"max_relative_error must be >= 0, got {self.max_relative_error}")
        if self.max_abs_diff is not None and not self.max_abs_diff >= 0:
            raise ValueError(f"max_abs_diff must be >= 0 or None, got {self.max_abs_diff}")


@dataclass
class ParityTally:
    """Accumulates the differences between reference and candidate outputs, batch by batch."""

    elements: int = 0
    max_abs_diff: float = 0.0
    _squared_error: float = 0.0
    _squared_reference: float = 0.0

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        if reference.shape != candidate.shape:
            raise ValueError(f"output shapes differ: reference {reference.shape}, onnxruntime {candidate.shape}")
        reference, candidate = reference.astype(np.float64), candidate.astype(np.float64)
        diff = np.abs(reference - candidate)
        self.elements += diff.size
        if diff.size:
            self.max_abs_diff = max(self.max_abs_diff, float(diff.max()))
        self._squared_error += float(np.sum(diff * diff))
        self._squared_reference += float(np.sum(reference * reference))

    @property
    def relative_error(self) -> float:
        """``||candidate - reference||_2 / ||reference||_2`` over every output element seen."""
        if self._squared_reference == 0.0:
            return 0.0 if self._squared_error == 0.0 else math.inf
        return math.sqrt(self._squared_error / self._squared_reference)

    def failures(self, tolerance: ParityTolerance) -> list[str]:
        """Messages for every violated bound (empty when the outputs agree)."""
        if self.elements == 0:
            return ["parity: no data was given to compare onnxruntime with the model"]
        found = []
        if self.relative_error > tolerance.max_relative_error:
            found.append(f"parity: relative error {self.relative_error:.3g} exceeds "
                         f"{tolerance.max_relative_error:.3g} (max abs diff {self.max_abs_diff:.3g})")
        if tolerance.max_abs_diff is not None and self.max_abs_diff > tolerance.max_abs_diff:
            found.append(f"parity: max abs diff {self.max_abs_diff:.3g} exceeds {tolerance.max_abs_diff:.3g}")
        return found
