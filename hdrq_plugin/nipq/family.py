"""NIPQ as a quantizer family: its quantizers and what the merge and the width setter must do.

Registered in :data:`hdrq_plugin.families.BUILTIN_FAMILIES`; selected by bit specs such as
``"nipq-w4a4"``. Per-tensor only (one learned width and truncation per tensor, docs/nipq_method.md).
"""

from __future__ import annotations

from torch import nn

from ..families import MergeHooks, QuantizerFamily
from .quantizers import NIPQActQuantizer, NIPQSignedActQuantizer, NIPQWeightQuantizer, pin_learned_bits
from .widths import average_activation_truncations, widen_to_common_bits, write_nipq_weight_grid


def _pin(proxy: nn.Module, bit_width: int) -> None:
    pin_learned_bits(proxy, bit_width)


NIPQ_FAMILY = QuantizerFamily(
    "nipq", NIPQWeightQuantizer, NIPQActQuantizer, NIPQSignedActQuantizer,
    spec_prefix="nipq", per_channel=False,
    merge=MergeHooks(align_members=widen_to_common_bits,
                     average_extra_state=average_activation_truncations,
                     write_weight_grid=write_nipq_weight_grid),
    on_bit_width_set=_pin,
)
