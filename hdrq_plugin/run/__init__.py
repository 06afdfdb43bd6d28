"""Running the library on files: checkpoints (``checkpoint``), the multi-target pipeline
(``pipeline``: quantize every target, merge, export, validate), task runners (``distributed``:
sequential or Ray) and the demo report (``report``).

This layer sits above the core and :mod:`hdrq_plugin.export` (docs/architecture.md); only the
checkpoint functions are imported here, so ``import hdrq_plugin`` loads neither Ray nor onnx.
"""

from .checkpoint import (
    CheckpointError,
    ModelRecipe,
    load_float_model,
    load_quantized,
    save_float_model,
    save_quantized,
)

__all__ = ["CheckpointError", "ModelRecipe", "load_float_model", "load_quantized", "save_float_model",
           "save_quantized"]
