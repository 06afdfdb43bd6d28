"""The values reconstruction trains on: per unit, x_q / x_fp over the calibration set, and y_fp.

Only the *frontier* is kept: the values that cross the boundary between the units already
reconstructed and the units still to come, in two versions — computed by the quantized units
(``x_q``) and by the float model (``x_fp``, quantization disabled, original weights). A unit's
float output ``y_fp`` is computed just before the unit is trained, while its weights are still
the original ones, so no copy of the float model is needed.

Memory: ``N × (2·frontier + |y_fp|)`` floats, with N the number of calibration samples and the
frontier usually one activation tensor (two inside a block whose skip connection crosses units
at layer granularity). For N = 32 and ResNet-18 at 224², the largest frontier (64×56×56) costs
``32 × 3 × 64·56·56 × 4 B ≈ 77 MB``; for the 32×32 digits models a few MB.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from brevitas.quant_tensor import IntQuantTensor
from torch import Tensor

from ..data import plain_tensor
from .units import ReconstructionUnit

__all__ = ["StoredValue", "BoundaryCache"]




@dataclass
class StoredValue:
    """One graph value over the calibration set; the quantization metadata if it was a QuantTensor.

    Per-tensor activation scales are the same for every sample, so one scale serves all rows.
    """

    value: Tensor
    scale: Tensor | None = None
    zero_point: Tensor | None = None
    bit_width: Tensor | None = None
    signed: Tensor | None = None

    @classmethod
    def from_batches(cls, batches: list[Any]) -> StoredValue:
        first = batches[0]
        value = torch.cat([plain_tensor(b).detach() for b in batches])
        if not isinstance(first, IntQuantTensor):
            return cls(value)
        scale = first.scale.detach()
        if scale.dim() > 0 and scale.shape[0] > 1 and scale.shape[0] == plain_tensor(first).shape[0]:
            raise ValueError("per-sample activation scales cannot be cached; use per-tensor activation quantizers")
        return cls(value, scale, first.zero_point.detach(), first.bit_width.detach(), first.signed_t.detach())

    def rows(self, index: Tensor, training: bool, value: Tensor | None = None) -> Any:
        """Samples ``index`` (or a replacement ``value`` for them), re-wrapped as the model saw them."""
        rows = self.value[index] if value is None else value
        if self.scale is None:
            return rows
        return IntQuantTensor(rows, self.scale, self.zero_point, self.bit_width, self.signed,
                              torch.tensor(training))

    @property
    def nbytes(self) -> int:
        return self.value.numel() * self.value.element_size()


class BoundaryCache:
    """Quantized and float versions of the values crossing the current unit boundary."""

    def __init__(self, model_inputs: dict[str, Tensor]) -> None:
        self.quantized: dict[str, StoredValue] = {k: StoredValue(v) for k, v in model_inputs.items()}
        self.float: dict[str, StoredValue] = {k: StoredValue(v) for k, v in model_inputs.items()}
        self.peak_bytes = self.nbytes

    def inputs_of(self, unit: ReconstructionUnit) -> tuple[list[StoredValue], list[StoredValue]]:
        """``(x_q, x_fp)`` of ``unit``, one entry per unit input."""
        missing = [name for name in unit.inputs if name not in self.quantized]
        if missing:
            raise KeyError(f"unit {unit.name!r} needs {missing}, which no earlier unit produced")
        return [self.quantized[n] for n in unit.inputs], [self.float[n] for n in unit.inputs]

    def advance(self, unit: ReconstructionUnit, y_q: list[StoredValue], y_fp: list[StoredValue],
                later_units: Iterable[ReconstructionUnit]) -> None:
        """Add ``unit``'s outputs and forget every value no later unit reads."""
        self.quantized.update(zip(unit.outputs, y_q, strict=True))
        self.float.update(zip(unit.outputs, y_fp, strict=True))
        self.peak_bytes = max(self.peak_bytes, self.nbytes)
        needed = {name for later in later_units for name in later.inputs}
        for name in list(self.quantized):
            if name not in needed:
                del self.quantized[name], self.float[name]

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.quantized.values()) + sum(v.nbytes for v in self.float.values())
