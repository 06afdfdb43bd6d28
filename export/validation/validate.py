"""``validate``: does an exported file compute the Brevitas model, on integer kernels, how fast?

Checks on onnxruntime's CPU provider (ORT_ENABLE_ALL), per dataset: parity on the integer grid
(every activation quantizer's codes compared with PyTorch's, differing codes judged by
:mod:`.parity`), top-1 agreement, the largest output difference in output steps, the first
diverging layer, and the accuracy on both sides; then the op types of the optimized graph
(int8 files must run QLinearConv/QGemm), median latency against the float32 twin at batch 1
and a serving batch, and file sizes. Failed checks are listed in ``ValidationReport.failures``,
one line each naming the file's dataset, the layer and the figure; nothing is a warning.

The arithmetic behind the parity check: :mod:`.parity`. Issue 9 (the demo's merged W4A4 file
failing on a fresh machine, exact here) was a CPU-dependent kernel, not accumulation order:
:func:`.unsigned_grids.store_wide_weights_as_uint8`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from ..errors import ValidationError
from ..formats.float_export import export_float
from ..graph_facts import output_float_error_steps, output_step
from ..metadata import QDQ_FORMAT, read_metadata
from ..model_facts import model_sha256, require_brevitas_model
from .activation_codes import OnnxCodeReader
from .ort_runtime import (
    FLOAT_COMPUTE_OPS,
    INTEGER_KERNELS,
    NO_INTEGER_KERNEL_IN_ORT,
    cpu_session,
    median_latencies_ms,
    optimized_op_types,
)
from .parity import DatasetParity, ParityTolerance
from .parity_run import ParityRun

DEFAULT_BATCH_SIZES = (1, 8)  # latency at batch 1 (edge) and at a small serving batch
DEFAULT_REPEATS = 30  # at most this many timed runs per session and batch size; the median is reported
# Timed rounds per batch size stop after this many seconds, after one warm-up round: at 224x224 one
# batch-64 round of a W8A8 ResNet-18 took 6-9 s here, so 30 rounds at batch 64 were most of the
# 133 s validate took (issue 19, docs/export.md §7). Pass batch_sizes=(1, 64) for that figure.
DEFAULT_LATENCY_BUDGET_S = 2.0
LATENCY_WARMUP_ROUNDS = 1
DEFAULT_THREADS = 2  # intra-op threads of the latency measurement; figures in docs/toolchain_notes.md use 2
DEFAULT_TOLERANCE = ParityTolerance()
_INTEGER_WEIGHT_STORAGES = ("int8", "int4-in-int8")  # files onnxruntime must run on integer kernels


@dataclass
class ValidationReport:
    """Everything ``validate`` measured; ``ok`` is False when any check failed."""

    onnx_path: str
    weights: str
    metadata: dict[str, str]
    samples: int = 0
    max_abs_diff: float = 0.0
    output_step: float | None = None  # step of the output grid (graph_facts.output_step)
    output_bound_steps: float | None = None  # allowed output difference where codes agree (parity.py)
    parity: dict[str, DatasetParity] = field(default_factory=dict)  # dataset -> measurements
    optimized_op_types: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[int, dict[str, float]] = field(default_factory=dict)
    file_bytes: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def exact(self) -> bool:
        return self.samples > 0 and self.max_abs_diff == 0.0

    @property
    def accuracy(self) -> dict[str, dict[str, float]]:
        """dataset -> {"onnxruntime", "pytorch", "changed_predictions", "samples"} (labelled data)."""
        found = {}
        for name, tally in self.parity.items():
            accuracy = tally.accuracy()
            if accuracy is not None:
                found[name] = {**accuracy, "changed_predictions": tally.predictions - tally.top1_agreeing,
                               "samples": tally.labelled}  # pixels, for dense outputs
        return found

    @property
    def top1_agreement(self) -> dict[str, float | None]:
        return {name: tally.top1_agreement for name, tally in self.parity.items()}

    @property
    def max_diff_in_output_steps(self) -> float | None:
        return None if not self.output_step else self.max_abs_diff / self.output_step

    @property
    def first_diverging_layer(self) -> dict[str, str | None]:
        return {name: tally.first_diverging_layer for name, tally in self.parity.items()}

    @property
    def integer_kernels(self) -> dict[str, int]:
        return {op: n for op, n in self.optimized_op_types.items() if op in INTEGER_KERNELS}

    @property
    def float_compute_ops(self) -> dict[str, int]:
        return {op: n for op, n in self.optimized_op_types.items() if op in FLOAT_COMPUTE_OPS}

    def to_dict(self) -> dict:
        data = asdict(self)
        data["parity"] = {name: tally.to_dict() for name, tally in self.parity.items()}
        data.update(ok=self.ok, exact=self.exact, accuracy=self.accuracy, top1_agreement=self.top1_agreement,
                    max_diff_in_output_steps=self.max_diff_in_output_steps,
                    first_diverging_layer=self.first_diverging_layer,
                    integer_kernels=self.integer_kernels, float_compute_ops=self.float_compute_ops)
        return data

    def summary(self) -> str:
        """One line: the file and its first failure (or that it passed), for logs and CLIs."""
        if self.ok:
            agreement = ", ".join(f"{name} {100 * a:.2f} %" + _certified_changes(self.parity[name])
                                  for name, a in self.top1_agreement.items() if a is not None)
            return f"{self.onnx_path}: validation passed (top-1 agreement {agreement})"
        more = f" (+{len(self.failures) - 1} more)" if len(self.failures) > 1 else ""
        return f"{self.onnx_path}: validation failed: {self.failures[0]}{more}"

    def raise_if_failed(self) -> ValidationReport:
        if self.failures:
            raise ValidationError(f"{self.onnx_path} failed validation:\n- " + "\n- ".join(self.failures))
        return self

    def __str__(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)


def _certified_changes(tally: DatasetParity) -> str:
    """The changed predictions a passing dataset was allowed, by cause (parity.py, "Top-1")."""
    causes = [f"{n} {what}" for n, what in ((tally.tie_flip_predictions, "by certified tie flips"),
                                             (tally.logit_tie_predictions, "by float32 logit ties"))
              if n]
    return f" (predictions changed: {', '.join(causes)})" if causes else ""


def _as_datasets(data: object) -> dict[str, Iterable]:
    if isinstance(data, Mapping):
        if not data:
            raise ValueError("data is an empty mapping; give name -> iterable of (x, y) batches")
        return {str(name): batches for name, batches in data.items()}
    if isinstance(data, torch.Tensor):
        return {"data": [data]}
    if isinstance(data, Iterable):
        return {"data": data}
    raise TypeError(f"data must be a mapping name -> batches or an iterable of batches, got {type(data).__name__}")


def _kernel_failures(weights: str, op_types: dict[str, int]) -> list[str]:
    if weights not in _INTEGER_WEIGHT_STORAGES:
        return []  # true INT4 runs as DequantizeLinear + float Conv by design (docs/toolchain_notes.md)
    failures = []
    if not any(op in INTEGER_KERNELS for op in op_types):
        failures.append(f"{weights} file runs no integer kernel (no QLinearConv/QGemm) in onnxruntime")
    # a layer onnxruntime cannot run on integers is reported (float_compute_ops), not failed
    floats = {op: n for op, n in op_types.items() if op in FLOAT_COMPUTE_OPS and op not in NO_INTEGER_KERNEL_IN_ORT}
    if floats:
        failures.append(f"{weights} file leaves weight layers in float after optimization: {floats}")
    return failures


def validate(onnx_path: str | os.PathLike, model: nn.Module, data: object, *,
             batch_sizes: Iterable[int] = DEFAULT_BATCH_SIZES, repeats: int = DEFAULT_REPEATS,
             threads: int = DEFAULT_THREADS, float_onnx_path: str | os.PathLike | None = None,
             tolerance: ParityTolerance = DEFAULT_TOLERANCE, max_batches: int | None = None,
             raise_on_failure: bool = False,
             latency_budget_s: float | None = DEFAULT_LATENCY_BUDGET_S) -> ValidationReport:
    """Validate an ``export_qdq`` file against ``model`` on ``data`` in onnxruntime (CPU).

    ``data``: a mapping dataset name -> iterable of ``(x, y)`` batches (accuracy per dataset),
    or one iterable of batches or tensors. Latency: up to ``repeats`` timed rounds per batch
    size, stopped after ``latency_budget_s`` seconds (``None``: all ``repeats``).
    ``float_onnx_path``: the float32 twin for the latency and size baseline (exported from ``model`` with quantizers off when omitted).
    Raises :class:`NotAnHdrqExportError` for files not written by this package and, with
    ``raise_on_failure``, :class:`ValidationError` listing every failed check.
    """
    path = Path(onnx_path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX file at {path}")
    onnx_model = onnx.load(path)
    metadata = read_metadata(onnx_model, str(path))
    if metadata["format"] != QDQ_FORMAT:
        raise ValueError(f"{path} is a {metadata['format']} file; validate takes export_qdq files")
    require_brevitas_model(model)
    batch_sizes = tuple(int(b) for b in batch_sizes)
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch_sizes must be positive, got {batch_sizes}")
    report = ValidationReport(str(path), metadata.get("weights", "unknown"), metadata)
    if metadata.get("source_model_sha256") != model_sha256(model):
        report.failures.append("the file was exported from a different model state "
                               "(hdrq.source_model_sha256 does not match the model given)")
    report.output_step = output_step(onnx_model)
    report.output_bound_steps = output_float_error_steps(onnx_model)

    was_training = model.training
    model.eval()
    try:
        run = ParityRun(OnnxCodeReader(path, threads), model, report.output_step, report.output_bound_steps,
                         tolerance)
        inputs: list[torch.Tensor] = []
        for name, batches in _as_datasets(data).items():
            tally = run.dataset(name, batches, max_batches, inputs)
            report.parity[name] = tally
            report.samples += tally.samples
            report.failures += tally.failures(name, tolerance, report.output_bound_steps)
        report.failures += [f"parity: {problem}" for problem in run.misaligned or []]
        report.max_abs_diff = max((t.max_diff_steps for t in report.parity.values()), default=0.0)
        if report.output_step:
            report.max_abs_diff *= report.output_step
        report.optimized_op_types = dict(optimized_op_types(path, threads))
        report.failures += _kernel_failures(report.weights, report.optimized_op_types)
        if inputs:
            with tempfile.TemporaryDirectory(prefix="hdrq-validate-") as folder:
                twin = Path(float_onnx_path) if float_onnx_path is not None else export_float(
                    model, Path(folder) / "float32.onnx", inputs[0][None])
                _measure_latency_and_size(report, run.reader.session, twin,
                                          torch.stack(inputs).numpy(), batch_sizes, repeats, threads,
                                          latency_budget_s)
    finally:
        model.train(was_training)
    if raise_on_failure:
        report.raise_if_failed()
    return report


def _measure_latency_and_size(report: ValidationReport, session, float_path: Path, inputs: np.ndarray,
                              batch_sizes: tuple[int, ...], repeats: int, threads: int,
                              latency_budget_s: float | None) -> None:
    sessions = {"quantized": session, "float32": cpu_session(float_path, threads)}
    for batch_size in batch_sizes:
        batch = np.ascontiguousarray(inputs[np.arange(batch_size) % len(inputs)])
        medians = median_latencies_ms(sessions, batch, repeats, warmup=LATENCY_WARMUP_ROUNDS,
                                      budget_s=latency_budget_s)
        medians["float32_over_quantized"] = medians["float32"] / medians["quantized"]
        report.latency_ms[batch_size] = medians
    report.file_bytes = {"quantized": Path(report.onnx_path).stat().st_size,
                         "float32": float_path.stat().st_size}
