"""The quantizer-family registry: the one place a family of quantizers plugs in.

A family is the set of Brevitas quantizers a model is converted with (weights, unsigned and
signed activations) plus the few things the rest of the library must know about it: the bit-spec
prefix that selects it (``"nipq-w4a4"``), whether it allows per-channel weights, and hooks the
merge and the bit-width setter call. Conversion, merge, checkpoints, bit specs and the CLI read
this registry; none of them names a family. A new family lives in its own folder and adds one
line to :data:`BUILTIN_FAMILIES` (or calls :func:`register_family` from user code).

Checkpoints store a family *name*; loading looks it up here. Only families declared in code are
ever loaded, so a file can choose among them but never name code to run.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import HDRQPluginError


class UnknownFamilyError(HDRQPluginError, ValueError):
    """No quantizer family of that name is declared or registered."""


@dataclass(frozen=True)
class MergeHooks:
    """What a family adds to :func:`hdrq_plugin.merge_models` (every hook is a no-op for models
    without the family's quantizers)."""

    #: members → members on one common grid layout (e.g. NIPQ widens each width to the widest)
    align_members: Callable[[Sequence[nn.Module]], list[nn.Module]]
    #: (members, coefficients, merged) → None: average state the generic merge does not own
    average_extra_state: Callable[[Sequence[nn.Module], Sequence[float], nn.Module], None]
    #: (layer, name, codes, scale) → True if it wrote the merged grid itself
    write_weight_grid: Callable[[nn.Module, str, Any, Any], bool]


@dataclass(frozen=True)
class QuantizerFamily:
    """A named set of quantizers for :func:`hdrq_plugin.convert_to_brevitas`."""

    name: str
    weight_quant: type | None  # None: the conversion's default (Brevitas' own, per the spec)
    act_quant: type | None
    signed_act_quant: type | None
    spec_prefix: str | None = None  # "nipq" selects this family in "nipq-w4a4"
    per_channel: bool = True  # False: per-tensor specs only (e.g. one learned width per tensor)
    merge: MergeHooks | None = None
    #: (weight/act proxy, bit_width) → None, called after a width is set explicitly
    on_bit_width_set: Callable[[nn.Module, int], Any] | None = None

    def quantizers(self) -> dict[str, type]:
        """Keyword arguments of :func:`convert_to_brevitas` (empty for the default family)."""
        pairs = {"weight_quant": self.weight_quant, "act_quant": self.act_quant,
                 "signed_act_quant": self.signed_act_quant}
        return {k: v for k, v in pairs.items() if v is not None}


#: Declared families: name → "module:attribute" of a QuantizerFamily, imported on first use so
#: that reading the registry costs nothing. Fixed in code: files only ever select a name here.
BUILTIN_FAMILIES: dict[str, str] = {
    "rtn": "hdrq_plugin.convert.to_brevitas:RTN_FAMILY",
    "hdrq": "hdrq_plugin.quant.quantizers:HDRQ_FAMILY",
    "nipq": "hdrq_plugin.nipq.family:NIPQ_FAMILY",
}
#: Prefixes of the declared families (kept here so parsing a bit spec imports no quantizer).
BUILTIN_PREFIXES: dict[str, str] = {"nipq": "nipq"}

_loaded: dict[str, QuantizerFamily] = {}


def register_family(family: QuantizerFamily) -> QuantizerFamily:
    """Add (or replace) a family from user code; returns it."""
    _loaded[family.name] = family
    if family.spec_prefix:
        BUILTIN_PREFIXES[family.spec_prefix] = family.name
    return family


def family_names() -> tuple[str, ...]:
    return tuple(dict.fromkeys([*BUILTIN_FAMILIES, *_loaded]))


def get_family(name: str) -> QuantizerFamily:
    """The family called ``name``; raises :class:`UnknownFamilyError` for any other name."""
    if name not in _loaded:
        if not isinstance(name, str) or name not in BUILTIN_FAMILIES:
            raise UnknownFamilyError(f"unknown quantizer family {name!r}; known: {', '.join(family_names())}")
        module_name, _, attribute = BUILTIN_FAMILIES[name].partition(":")
        _loaded[name] = getattr(importlib.import_module(module_name), attribute)
    return _loaded[name]


def family_for_prefix(prefix: str) -> QuantizerFamily:
    return get_family(BUILTIN_PREFIXES[prefix])


def spec_prefixes() -> tuple[str, ...]:
    return tuple(BUILTIN_PREFIXES)


def loaded_families() -> list[QuantizerFamily]:
    """Every declared family (imported now): merge and width hooks consult them all."""
    return [get_family(name) for name in family_names()]
