"""Quantized-model checkpoints: the recipe to rebuild the architecture plus the state dict.

A Brevitas FX GraphModule does not pickle portably, so a checkpoint stores how to rebuild it —
the float model's builder (``"package.module:function"`` and JSON keyword arguments), the bit
spec and the quantizer family — and the state dict. Loading rebuilds the float model, converts
it exactly as at save time and loads the state strictly, so a checkpoint that does not match
its recipe fails loudly instead of producing a silently different model.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import save_torch_atomic
from ..architectures import (
    build_architecture,
    builder_name,
    check_builder_kwargs,
    get_architecture,
    register_architecture,
)
from ..bitspec import BitSpec
from ..errors import HDRQPluginError, one_line
from ..families import UnknownFamilyError, get_family

FORMAT = "hdrq-plugin/quantized-model/v1"
FLOAT_FORMAT = "hdrq-plugin/float-model/v1"


class CheckpointError(HDRQPluginError, ValueError):
    """A checkpoint file is missing, corrupt, or does not match its recipe."""


@dataclass
class ModelRecipe:
    """How to rebuild a float model: ``builder`` names a registered builder
    (:mod:`hdrq_plugin.architectures`, ``"package.module:function"``) and ``kwargs`` are plain values."""

    builder: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        """Build through the registry: a recipe read from a file can only name, never import."""
        return build_architecture(self.builder, self.kwargs)

    @classmethod
    def from_payload(cls, recipe: Any, path: str | Path) -> ModelRecipe:
        if not isinstance(recipe, dict) or set(recipe) - {"builder", "kwargs"} or "builder" not in recipe:
            raise CheckpointError(f"checkpoint {path} has a malformed recipe")
        return cls(recipe["builder"], recipe.get("kwargs") or {})


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


def save_float_model(path: str | Path, model: nn.Module, recipe: ModelRecipe | Callable[..., nn.Module],
                     metadata: dict[str, Any] | None = None, **kwargs: Any) -> Path:
    """Save a float model with the recipe that rebuilds it (atomic, byte-reproducible).

    ``recipe``: a :class:`ModelRecipe` naming a registered builder, or the builder function
    itself (registered here; ``kwargs`` are its plain keyword arguments). Loading the file
    needs the builder registered again (``register_architecture`` or ``--arch module:function``).
    """
    if callable(recipe) and not isinstance(recipe, ModelRecipe):
        recipe = ModelRecipe(builder_name(register_architecture(recipe)), dict(kwargs))
    elif kwargs:
        raise TypeError("keyword arguments go into the ModelRecipe when one is given")
    builder = get_architecture(recipe.builder)
    check_builder_kwargs(recipe.builder, builder, recipe.kwargs)
    payload = {"format": FLOAT_FORMAT, "recipe": asdict(recipe),
               "state_dict": model.state_dict(), "metadata": dict(metadata or {})}
    return save_torch_atomic(path, payload)


def load_float_model(path: str | Path, arch: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A float model saved by :func:`save_float_model`, or a plain ``state_dict`` file whose
    architecture ``arch`` names (a registered builder, called without arguments)."""
    payload = _read(path, FLOAT_FORMAT, allow_state_dict=True)
    if "format" not in payload:  # a plain state_dict
        if arch is None:
            raise CheckpointError(f"{path} is a plain state_dict: name the model that reads it with "
                                  "--arch package.module:function (API: load_float_model(path, arch=...))")
        recipe, state, metadata = ModelRecipe(arch), payload, {}
    else:
        recipe = ModelRecipe.from_payload(payload.get("recipe"), path)
        state, metadata = payload.get("state_dict"), payload.get("metadata") or {}
    model = recipe.build()
    _load_state(model, state, path)
    model.eval()
    return model, {**(metadata if isinstance(metadata, dict) else {}), "recipe": recipe}


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
    return save_torch_atomic(path, payload)


def load_quantized(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild and load a quantized model; returns ``(model, info)`` with recipe, bits, metadata."""
    from ..convert.to_brevitas import convert_to_brevitas

    payload = _read(path, FORMAT)
    recipe = ModelRecipe.from_payload(payload.get("recipe"), path)
    try:
        bits = BitSpec.parse(payload.get("bits"))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} has a bad bit spec: {one_line(err)}") from err
    family = quantizer_family(payload.get("family"))
    metadata = payload.get("metadata") if isinstance(payload.get("metadata"), dict) else {}
    qmodel = convert_to_brevitas(recipe.build(), bits, **family)
    _load_state(qmodel, payload.get("state_dict"), path)
    qmodel.eval()
    info = {**metadata, "recipe": recipe, "bits": bits, "family": payload["family"]}
    return qmodel, info


def read_torch_file(path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)`` with every failure as one line naming the file."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a directory, not a file")
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err):
            raise CheckpointError(
                f"{what} {path} holds pickled Python objects, which are not loaded (they could run code); "
                "save model.state_dict() (or hdrq_plugin.save_float_model) instead") from err
        raise CheckpointError(f"{what} {path} is corrupt or not a torch file: {one_line(err)}") from err
    except Exception as err:  # torch raises many types (EOFError, RuntimeError, OSError) for bad files
        raise CheckpointError(f"{what} {path} is corrupt, truncated or not a torch file: {one_line(err)}") from err


def _read(path: str | Path, expected_format: str, *, allow_state_dict: bool = False) -> dict[str, Any]:
    payload = read_torch_file(path)
    if allow_state_dict and _is_state_dict(payload):
        return payload
    if not isinstance(payload, dict) or payload.get("format") != expected_format:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path} is not a {expected_format} checkpoint (found {found!r})")
    return payload


def _is_state_dict(payload: Any) -> bool:
    return (isinstance(payload, dict) and bool(payload) and "format" not in payload
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload.items()))


def _load_state(model: nn.Module, state_dict: Any, path: str | Path) -> None:
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"checkpoint {path} has no state dict")
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"checkpoint {path}: {key} holds NaN or infinite values")
    try:
        model.load_state_dict(state_dict, strict=True)
    except (RuntimeError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} does not match its recipe: {one_line(err)}") from err
