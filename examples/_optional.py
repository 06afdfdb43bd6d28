"""Import the optional packages the example data needs, with an error that says what to install."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, pip_name: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise ImportError naming the pip package that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{purpose} needs the optional package {pip_name!r}: "
            f"pip install {pip_name}  (or: pip install 'hdrq-plugin[examples]')"
        ) from err
