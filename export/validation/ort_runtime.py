"""onnxruntime CPU sessions as validation uses them: fully optimized, fixed thread count, the
optimized graph's op types, and latencies of several sessions timed side by side."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

# onnxruntime kernels that compute on integers (QDQ groups fused by the CPU provider).
INTEGER_KERNELS = ("QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger",
                   "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits")
# Weight layers computing in float (including onnxruntime's fused and NCHWc variants).
FLOAT_COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm",
                     "FusedMatMul")
#: Weight layers onnxruntime's CPU provider has no integer kernel for: it fuses no QDQ group around
#: them and runs DequantizeLinear -> float op -> QuantizeLinear (measured on a U-Net's 2x2
#: stride-2 ConvTranspose at every optimization level, onnxruntime 1.32; docs/export.md, op policy).
NO_INTEGER_KERNEL_IN_ORT = ("ConvTranspose",)
_QUIET = 3  # onnxruntime log severity "error": hides the NCHWc "hardware specific" warning
#: Every graph optimization level a user can pick; a file must compute the model under each
#: (the optimizers at EXTENDED and above rewrite QDQ groups, e.g. DoubleQDQPairsRemover).
OPTIMIZATION_LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")
DEPLOYED_LEVEL = "ORT_ENABLE_ALL"  # onnxruntime's default, what validate measures


def session_options(threads: int, optimized_model_path: str | os.PathLike | None = None,
                    level: str = DEPLOYED_LEVEL) -> ort.SessionOptions:
    if level not in OPTIMIZATION_LEVELS:
        raise ValueError(f"optimization level must be one of {OPTIMIZATION_LEVELS}, got {level!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = _QUIET
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    return options


def cpu_session(path: str | os.PathLike, threads: int = 2, level: str = DEPLOYED_LEVEL) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), session_options(threads, level=level), providers=["CPUExecutionProvider"])


def optimized_op_types(path: str | os.PathLike, threads: int = 2) -> Counter:
    """Op types of the graph onnxruntime actually runs after ORT_ENABLE_ALL optimization."""
    with tempfile.TemporaryDirectory(prefix="hdrq-ort-") as folder:
        optimized = Path(folder) / "optimized.onnx"
        ort.InferenceSession(str(path), session_options(threads, optimized),
                             providers=["CPUExecutionProvider"])
        graph = onnx.load(optimized).graph
    return Counter(node.op_type for node in graph.node)


def median_latencies_ms(sessions: dict[str, ort.InferenceSession], batch: np.ndarray,
                        repeats: int, warmup: int = 3, budget_s: float | None = None) -> dict[str, float]:
    """Median wall time per run of each session on ``batch``, the sessions taking turns.

    Interleaving the runs exposes every session to the same machine load (other jobs share
    these cores), which a block of runs per session would not. ``budget_s`` stops the timed
    rounds once they have taken that long (at least one round is timed); ``"timed_runs"`` in the
    result says how many rounds the medians are over.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    feeds = {name: {session.get_inputs()[0].name: batch} for name, session in sessions.items()}
    for _ in range(warmup):
        for name, session in sessions.items():
            session.run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    started = time.perf_counter()
    for _ in range(repeats):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds[name])
            times[name].append((time.perf_counter() - start) * 1e3)
        if budget_s is not None and time.perf_counter() - started >= budget_s:
            break
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {**medians, "timed_runs": len(next(iter(times.values())))}
