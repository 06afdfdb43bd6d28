"""The names and bounds a user passes as options: methods, merge rules, weight storages, counts.

Pure Python on purpose: the command line builds its parser (``hdrq --help``, argument errors)
from these without importing torch, Brevitas or onnxruntime, which take seconds. The modules that
implement each name import its tuple from here, so there is one list per concept.
"""

from __future__ import annotations

from .errors import InputError

#: Block-reconstruction methods of one engine (``hdrq_plugin.ptq.config``: ``HDRQConfig.for_method``).
RECONSTRUCTION_METHODS = ("rtn", "adaround", "brecq", "qdrop", "hdrq")
#: Every ``quantize_model`` method: the reconstructions, GPTQ and NIPQ (``hdrq_plugin.quantize``).
METHOD_NAMES = (*RECONSTRUCTION_METHODS, "gptq", "nipq")
#: Rounding rules of the merge (``hdrq_plugin.merge.rules``).
ROUNDING_RULES = ("noise-sampling", "half-to-even", "random", "naive")
#: Weight storages of the QDQ export (``hdrq_plugin.export.formats.qdq``).
WEIGHT_STORAGES = ("int8", "int4", "int4-in-int8")

#: Seeds reach ``torch.manual_seed`` multiplied by small constants (NIPQ: ``seed * 100_003 +
#: epoch``), which must stay in int64; 32 bits is what numpy and most tools accept too.
MAX_SEED = 2**32 - 1
#: Bounds of the counts a user gives; each one above is minutes or hours of CPU for no benefit
#: (noise-sampling trials saturate long before, docs/merge.md; the CPU preset uses 2 000 iterations).
MAX_TRIALS = 10_000
MAX_ITERATIONS = 1_000_000
MAX_EPOCHS = 10_000
MAX_BARRIER_STEPS = 1_001


def check_seed(seed: int) -> int:
    if not 0 <= seed <= MAX_SEED:
        raise InputError(f"--seed {seed} is out of range: give 0..{MAX_SEED}")
    return seed


def check_count(name: str, value: int | None, low: int, high: int) -> int | None:
    """``value`` within ``[low, high]`` (None = the default), else one line naming the option."""
    if value is not None and not low <= value <= high:
        raise InputError(f"{name} {value} is out of range: give {low}..{high}")
    return value
