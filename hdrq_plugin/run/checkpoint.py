"""Quantized-model checkpoints: the recipe to rebuild the architecture plus the state dict.

A Brevitas FX GraphModule does not pickle portably, so a checkpoint stores how to rebuild it —
the float model's builder (``"package.module:function"`` and JSON keyword arguments), the bit
spec and the quantizer family — and the state dict. Loading rebuilds the float model, converts
it exactly as at save time and loads the state strictly, so a checkpoint that does not match
its recipe fails loudly instead of producing a silently different model.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import atomic_write_path
from ..bitspec import BitSpec
from ..errors import HDRQPluginError
from ..families import UnknownFamilyError, get_family

FORMAT = "hdrq-plugin/quantized-model/v1"
FLOAT_FORMAT = "hdrq-plugin/float-model/v1"


class CheckpointError(HDRQPluginError, ValueError):
    """A checkpoint file is missing, corrupt, or does not match its recipe."""


@dataclass
class ModelRecipe:
    """How to rebuild a float model: ``builder`` is ``"package.module:function"``."""

    builder: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        module_name, _, attr = self.builder.partition(":")
        if not module_name or not attr:
            raise CheckpointError(f"builder {self.builder!r} is not of the form 'package.module:function'")
        try:
            factory: Callable[..., nn.Module] = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise CheckpointError(f"cannot import model builder {self.builder!r}: {err}") from err
        return factory(**self.kwargs)


def quantizer_family(name: str) -> dict[str, Any]:
    """Keyword arguments of :func:`convert_to_brevitas` for a family of :mod:`hdrq_plugin.families`.

    ``rtn``: Brevitas' own quantizers; ``hdrq``: HDRQ weight and activation quantizers — every
    method of the reconstruction engine ends in it; ``nipq``: NIPQ quantizers, whose learned
    per-layer widths are restored from the state dict. A name read from a file only selects
    among the families declared in code.
    """
    try:
        return get_family(name).quantizers()
    except UnknownFamilyError as err:
        raise CheckpointError(str(err)) from err


def save_float_model(path: str | Path, model: nn.Module, recipe: ModelRecipe,
                     metadata: dict[str, Any] | None = None) -> Path:
    """Save a float model with the recipe that rebuilds it (atomic)."""
    payload = {"format": FLOAT_FORMAT, "recipe": asdict(recipe),
               "state_dict": model.state_dict(), "metadata": dict(metadata or {})}
    with atomic_write_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_float_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    payload = _read(path, FLOAT_FORMAT)
    recipe = ModelRecipe(**payload["recipe"])
    model = recipe.build()
    _load_state(model, payload["state_dict"], path)
    model.eval()
    return model, {"recipe": recipe, **payload.get("metadata", {})}


def save_quantized(path: str | Path, qmodel: nn.Module, *, recipe: ModelRecipe, bits: str | BitSpec,
                   family: str = "rtn", metadata: dict[str, Any] | None = None) -> Path:
    """Save a quantized model produced by ``convert_to_brevitas(recipe.build(), bits, **family)``."""
    quantizer_family(family)  # validate the name before writing anything
    payload = {
        "format": FORMAT,
        "recipe": asdict(recipe),
        "bits": str(BitSpec.parse(bits)),
        "family": family,
        "state_dict": qmodel.state_dict(),
        "metadata": json.loads(json.dumps(metadata or {}, default=str)),
    }
    with atomic_write_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_quantized(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild and load a quantized model; returns ``(model, info)`` with recipe, bits, metadata."""
    from ..convert.to_brevitas import convert_to_brevitas

    payload = _read(path, FORMAT)
    recipe = ModelRecipe(**payload["recipe"])
    bits = BitSpec.parse(payload["bits"])
    qmodel = convert_to_brevitas(recipe.build(), bits, **quantizer_family(payload["family"]))
    _load_state(qmodel, payload["state_dict"], path)
    qmodel.eval()
    info = {"recipe": recipe, "bits": bits, "family": payload["family"], **payload["metadata"]}
    return qmodel, info


def _read(path: str | Path, expected_format: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated/garbage files
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch file: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != expected_format:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path} is not a {expected_format} checkpoint (found {found!r})")
    return payload


def _load_state(model: nn.Module, state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path} does not match its recipe: {err}") from err
