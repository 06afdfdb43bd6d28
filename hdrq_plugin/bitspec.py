"""Bit-width specifications such as ``"w4a8"`` or ``"w4a4-per-channel"``."""

from __future__ import annotations

import re
from dataclasses import dataclass

MIN_BITS, MAX_BITS = 2, 8  # integer grids the exporter and onnxruntime's int8 kernels represent

#: Weight grids of 8-bit layers. "saturation-free" (default): codes -64..63, i.e. a 7-bit grid
#: stored in int8 (onnxruntime's ``reduce_range``, NNCF's saturation fix): x86 CPUs without VNNI
#: add pairs of uint8 x int8 products in a saturating int16 (``vpmaddubsw``), and
#: 2 x 255 x 64 = 32,640 <= 32,767, so the file keeps int8 weights and the fast u8s8 kernels on
#: every CPU (docs/export.md §4). "full": -128..127, an explicit opt-in (the exporter then stores
#: those weights as uint8, u8u8 kernels, to stay exact without VNNI).
WEIGHT_RANGES = ("saturation-free", "full")
SATURATION_FREE_BITS = 7  # the grid an 8-bit layer gets under "saturation-free"
_FULL_RANGE_SUFFIX = "-full-range"

_SPEC = re.compile(r"^w(?P<w>\d+)a(?P<a>\d+)(?P<pc>-per-channel)?(?P<full>-full-range)?$")


@dataclass(frozen=True)
class BitSpec:
    """Weight/activation bit-widths and weight-scale granularity of a quantized model.

    ``edge_weight_bits`` is the weight bit-width of the first conv and the last linear layer;
    keeping them at 8 bits is the reference policy of HDRQ/BRECQ/QDrop (docs/hdrq_method.md §3).
    ``None`` quantizes them like every other layer.

    ``weight_range`` is the weight grid of every 8-bit weight layer (:data:`WEIGHT_RANGES`):
    ``"saturation-free"`` by default, ``"full"`` (spec suffix ``-full-range``) the opt-in full
    int8 grid. Layers below 8 bits are unaffected.
    """

    weight_bits: int
    act_bits: int
    per_channel: bool = False
    edge_weight_bits: int | None = 8
    weight_range: str = "saturation-free"

    def __post_init__(self) -> None:
        if self.weight_range not in WEIGHT_RANGES:
            raise ValueError(f"weight_range must be one of {WEIGHT_RANGES}, got {self.weight_range!r}")
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
        """Parse ``w<bits>a<bits>[-per-channel][-full-range]``, e.g. ``w4a8``, ``w4a4-per-channel``
        or ``w8a8-full-range``."""
        if isinstance(text, BitSpec):
            return text
        if not isinstance(text, str):
            raise TypeError(f"a bit spec is a string like 'w4a8', got {type(text).__name__}")
        match = _SPEC.match(text.strip().lower())
        if match is None:
            raise ValueError(
                f"malformed bit spec {text!r}: expected 'w<bits>a<bits>' optionally followed by "
                "'-per-channel' and '-full-range', e.g. 'w4a8', 'w4a4-per-channel' or 'w8a8-full-range'"
            )
        return cls(int(match["w"]), int(match["a"]), per_channel=match["pc"] is not None,
                   weight_range="full" if match["full"] else "saturation-free")

    def grid_bits(self, bits: int) -> int:
        """The weight grid's bit-width of a layer of ``bits`` weight bits under this spec's range."""
        return SATURATION_FREE_BITS if bits == MAX_BITS and self.weight_range == "saturation-free" else bits

    @property
    def granularity(self) -> str:
        return "per-channel" if self.per_channel else "per-tensor"

    def __str__(self) -> str:
        return (f"w{self.weight_bits}a{self.act_bits}" + ("-per-channel" if self.per_channel else "")
                + (_FULL_RANGE_SUFFIX if self.weight_range == "full" else ""))


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
