"""Merging N models into one: the rules on one integer grid (pure math, ``rules``), the model-level
merge (``models``), the float merge (``float_merge``) and the error barrier between two models
(``barrier``). docs/merging.md.

A new merge rule goes in ``rules`` (a function of codes, scales and coefficients) and its name in
``ROUNDING_RULES``; the CLI's ``--rounding`` choices read that tuple.
"""

from .barrier import BarrierResult, error_barrier, plot_barrier
from .float_merge import average_float_models
from .models import MergeCompatibilityError, merge_models
from .rules import ROUNDING_RULES, merge_integer_weights

__all__ = ["ROUNDING_RULES", "BarrierResult", "MergeCompatibilityError", "average_float_models",
           "error_barrier", "merge_integer_weights", "merge_models", "plot_barrier"]
