"""Bit-width specifications such as ``"w4a8"`` or ``"w4a4-per-channel"``."""

from __future__ import annotations

import re
from dataclasses import dataclass

MIN_BITS, MAX_BITS = 2, 8  # integer grids the exporter and onnxruntime's int8 kernels represent


_SPEC = re.compile(r"^w(?P<w>\d+)a(?P<a>\d+)(?P<pc>-per-channel)?$")


@dataclass(frozen=True)
class BitSpec:
    """Weight/activation bit-widths and weight-scale granularity of a quantized model.

    ``edge_weight_bits`` is the weight bit-width of the first conv and the last linear layer;
    keeping them at 8 bits is the reference policy of HDRQ/BRECQ/QDrop (docs/hdrq_method.md §3).
    ``None`` quantizes them like every other layer.
    """

    weight_bits: int
    act_bits: int
    per_channel: bool = False
    edge_weight_bits: int | None = 8

    def __post_init__(self) -> None:
        for name in ("weight_bits", "act_bits", "edge_weight_bits"):
            value = getattr(self, name)
            if value is None and name == "edge_weight_bits":
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {value!r}")
            if not MIN_BITS <= value <= MAX_BITS:
                raise ValueError(f"{name}={value} is outside the supported range {MIN_BITS}..{MAX_BITS}")

    @classmethod
    def parse(cls, text: str | BitSpec) -> BitSpec:
        """Parse ``w<bits>a<bits>[-per-channel]``, e.g. ``w4a8`` or ``w4a4-per-channel``."""
        if isinstance(text, BitSpec):
            return text
        if not isinstance(text, str):
            raise TypeError(f"a bit spec is a string like 'w4a8', got {type(text).__name__}")
        match = _SPEC.match(text.strip().lower())
        if match is None:
            raise ValueError(
                f"malformed bit spec {text!r}: expected 'w<bits>a<bits>' optionally followed by "
                "'-per-channel', e.g. 'w4a8' or 'w4a4-per-channel'"
            )
        return cls(int(match["w"]), int(match["a"]), per_channel=match["pc"] is not None)

    @property
    def granularity(self) -> str:
        return "per-channel" if self.per_channel else "per-tensor"

    def __str__(self) -> str:
        return f"w{self.weight_bits}a{self.act_bits}" + ("-per-channel" if self.per_channel else "")


def split_quantizer_prefix(text: str | BitSpec) -> tuple[str | None, str | BitSpec]:
    """``"nipq-w4a4"`` -> ``("nipq", "w4a4")``; a spec without a known prefix -> ``(None, text)``.

    The prefixes are those of the quantizer families (:mod:`hdrq_plugin.families`).
    """
    from .families import spec_prefixes

    if isinstance(text, str):
        head, sep, rest = text.strip().lower().partition("-")
        if sep and head in spec_prefixes():
            return head, rest
    return None, text
