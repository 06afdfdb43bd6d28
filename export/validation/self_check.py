"""``export_qdq``'s own check: the written file computes the model in onnxruntime, at every
optimization level, on the example input.

The graph optimizers of onnxruntime's higher levels rewrite QDQ groups, and a rewrite that is
exact only under conditions the file does not meet changes the function (issue 19: the
DoubleQDQPairsRemover merging back-to-back Q/DQ pairs with two scales, EXTENDED and above). So
the file is run under DISABLE_ALL, BASIC, EXTENDED and ALL and judged by the parity rules of
:mod:`.parity` (codes compared at every activation quantizer, ties certified), as ``validate``
judges it on real data.
"""

from __future__ import annotations

import os

import onnx
import torch
from torch import nn

from ..graph_facts import output_float_error_steps, output_step
from .activation_codes import OnnxCodeReader
from .ort_runtime import OPTIMIZATION_LEVELS
from .parity import ParityTolerance
from .parity_run import ParityRun

SELF_CHECK_THREADS = 1  # deterministic and cheap: a handful of samples


def onnxruntime_failures(path: str | os.PathLike, model: nn.Module, example_input: torch.Tensor,
                         levels: tuple[str, ...] = OPTIMIZATION_LEVELS) -> list[str]:
    """One line per way the file at ``path`` fails to compute ``model`` on ``example_input``,
    each prefixed with the optimization level; empty when it computes the model at every level."""
    onnx_model = onnx.load(str(path))
    step, bound = output_step(onnx_model), output_float_error_steps(onnx_model)
    was_training = model.training
    model.eval()
    failures = []
    model64 = None  # one float64 copy for every level
    try:
        for level in levels:
            run = ParityRun(OnnxCodeReader(path, SELF_CHECK_THREADS, level=level), model, step, bound,
                            ParityTolerance(), model64=model64)
            tally = run.dataset("example input", [example_input], None, [])
            found = tally.failures("example input", ParityTolerance(), bound)
            found += [f"parity: {problem}" for problem in run.misaligned or []]
            failures += [f"{level}: {line}" for line in found]
            model64 = run.model64
    finally:
        model.train(was_training)
    return failures
