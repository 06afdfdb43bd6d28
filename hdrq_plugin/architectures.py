"""Model builders a checkpoint may name: a registry declared in code, never chosen by a file.

A checkpoint stores how to rebuild its float architecture (``builder`` name plus keyword
arguments). Importing and calling whatever a file names would let a shared model file run any
function (``os:system``), so a file may only *name* a builder registered here: the project's
own families (declared below), builders a user registers in their own code
(:func:`register_architecture`), or one passed explicitly on the command line
(``--arch module:function``, :func:`allow_architecture`). Keyword arguments read from a file
are checked as well: plain JSON-like values only, and only names the builder accepts.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from .errors import InputError

Builder = Callable[..., nn.Module]

#: The project's own builders: name → "module:attribute", imported on first use. Fixed in code.
BUILTIN_ARCHITECTURES: dict[str, str] = {
    "hdrq_examples.models:build_resnet": "hdrq_examples.models:build_resnet",
    "hdrq_examples.mobilenet:build_mobilenet": "hdrq_examples.mobilenet:build_mobilenet",
    "hdrq_examples.segmentation_models:build_segmentation_model":
        "hdrq_examples.segmentation_models:build_segmentation_model",
}

_registered: dict[str, Builder] = {}

_PLAIN_SCALARS = (type(None), bool, int, float, str)
_MAX_KWARG_DEPTH = 8


class UnknownArchitectureError(InputError):
    """A checkpoint names a model builder that was not registered in code or on the command line."""


def builder_name(builder: Builder) -> str:
    """The registry name of a function: ``"module:qualname"`` (the form ``--arch`` takes)."""
    return f"{builder.__module__}:{builder.__qualname__}"


def register_architecture(builder: Builder, name: str | None = None) -> Builder:
    """Allow checkpoints to name ``builder`` (under ``name``, default ``module:qualname``).

    Usable as a decorator in the user's own model code; returns ``builder`` unchanged.
    """
    if not callable(builder):
        raise InputError(f"register_architecture needs a callable, not {type(builder).__name__}")
    _registered[name or builder_name(builder)] = builder
    return builder


def allow_architecture(spec: str) -> str:
    """Import ``"module:function"`` named by the user (the CLI's ``--arch``) and register it.

    This is the user's explicit choice on the command line, never a value read from a file.
    Returns the registry name.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise InputError(f"--arch {spec!r} is not of the form 'package.module:function'")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as err:
        raise InputError(f"--arch {spec}: cannot import it ({err}); is its package on PYTHONPATH?") from err
    if not callable(target):
        raise InputError(f"--arch {spec} is a {type(target).__name__}, not a function that builds a model")
    register_architecture(target, spec)
    return spec


def architecture_names() -> tuple[str, ...]:
    return tuple(dict.fromkeys([*BUILTIN_ARCHITECTURES, *_registered]))


def get_architecture(name: str) -> Builder:
    """The builder registered as ``name``; refuses any other name with how to allow it."""
    if not isinstance(name, str):
        raise UnknownArchitectureError(f"a model builder name must be a string, not {type(name).__name__}")
    if name not in _registered:
        if name not in BUILTIN_ARCHITECTURES:
            raise UnknownArchitectureError(
                f"the checkpoint names model builder {name!r}, which is not registered; if you trust it, "
                f"pass --arch {name} (API: hdrq_plugin.register_architecture(fn)); "
                f"registered: {', '.join(architecture_names())}")
        module_name, _, attribute = BUILTIN_ARCHITECTURES[name].partition(":")
        _registered[name] = getattr(importlib.import_module(module_name), attribute)
    return _registered[name]


def check_builder_kwargs(name: str, builder: Builder, kwargs: Any) -> dict[str, Any]:
    """Refuse keyword arguments a file could abuse: non-plain values, or names the builder lacks."""
    if not isinstance(kwargs, dict):
        raise InputError(f"the keyword arguments of model builder {name} must be a dict, not "
                         f"{type(kwargs).__name__}")
    try:
        parameters = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        parameters = None  # a builtin without a signature: no name check possible, values still are
    takes_any = parameters is None or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    for key, value in kwargs.items():
        if not isinstance(key, str):
            raise InputError(f"model builder {name}: keyword {key!r} is not a string")
        if not takes_any and (key not in parameters or parameters[key].kind in
                              (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.VAR_POSITIONAL)):
            raise InputError(f"model builder {name} has no parameter {key!r} "
                             f"(it takes: {', '.join(parameters) or 'nothing'})")
        _check_plain(name, key, value, 0)
    return dict(kwargs)


def _check_plain(name: str, key: str, value: Any, depth: int) -> None:
    if depth > _MAX_KWARG_DEPTH:
        raise InputError(f"model builder {name}: keyword {key!r} is nested too deeply")
    if isinstance(value, _PLAIN_SCALARS):
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_plain(name, key, item, depth + 1)
        return
    if isinstance(value, dict):
        for inner_key, item in value.items():
            if not isinstance(inner_key, str):
                raise InputError(f"model builder {name}: keyword {key!r} holds a non-string key")
            _check_plain(name, key, item, depth + 1)
        return
    raise InputError(f"model builder {name}: keyword {key!r} holds a {type(value).__name__}; "
                     "only None, bool, int, float, str, lists and dicts of them are accepted")


def build_architecture(name: str, kwargs: Any = None) -> nn.Module:
    """Build the registered architecture ``name`` with checked keyword arguments."""
    builder = get_architecture(name)
    model = builder(**check_builder_kwargs(name, builder, {} if kwargs is None else kwargs))
    if not isinstance(model, nn.Module):
        raise InputError(f"model builder {name} returned a {type(model).__name__}, not a torch.nn.Module")
    return model
