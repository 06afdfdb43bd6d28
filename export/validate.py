"""``validate``: does an exported file compute the Brevitas model, on integer kernels, how fast?

Checks on onnxruntime's CPU provider (ORT_ENABLE_ALL): parity with the model on the data
(:mod:`.parity`), the op types of the optimized graph (int8 files must run QLinearConv/QGemm),
accuracy per dataset, median latency against the float32 twin at batch 1 and a serving batch,
and file sizes. Failed checks are listed in ``ValidationReport.failures``; nothing is a warning.
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

from .errors import ValidationError
from .float_export import export_float
from .graph_facts import output_step
from .metadata import QDQ_FORMAT, read_metadata
from .model_facts import model_sha256, require_brevitas_model
from .ort_runtime import (
    FLOAT_COMPUTE_OPS,
    INTEGER_KERNELS,
    cpu_session,
    median_latencies_ms,
    optimized_op_types,
)
from .parity import ParityTally, ParityTolerance

DEFAULT_BATCH_SIZES = (1, 64)  # issue 4: batch 1 and a serving batch
DEFAULT_REPEATS = 30  # timed runs per session and batch size; the median is reported
DEFAULT_THREADS = 2  # this machine's cores (toolchain-facts.md measured with 2 threads)
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
    relative_error: float = 0.0  # ||onnxruntime - pytorch||_2 / ||pytorch||_2 over all outputs
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
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
    def max_diff_in_output_steps(self) -> float | None:
        return None if not self.output_step else self.max_abs_diff / self.output_step

    @property
    def integer_kernels(self) -> dict[str, int]:
        return {op: n for op, n in self.optimized_op_types.items() if op in INTEGER_KERNELS}

    @property
    def float_compute_ops(self) -> dict[str, int]:
        return {op: n for op, n in self.optimized_op_types.items() if op in FLOAT_COMPUTE_OPS}

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(ok=self.ok, exact=self.exact, max_diff_in_output_steps=self.max_diff_in_output_steps,
                    integer_kernels=self.integer_kernels, float_compute_ops=self.float_compute_ops)
        return data

    def raise_if_failed(self) -> ValidationReport:
        if self.failures:
            raise ValidationError(f"{self.onnx_path} failed validation:\n- " + "\n- ".join(self.failures))
        return self

    def __str__(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)


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


def _split_batch(batch: object, dataset: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` or ``(x, y, ...)`` -> ``(x, y or None)``, the forms a DataLoader yields."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], labels
    raise TypeError(f"dataset {dataset!r} must yield tensors or (input, label) pairs, got {type(batch).__name__}")


def _compare_on_data(session, model: nn.Module, datasets: dict[str, Iterable], tally: ParityTally,
                     max_batches: int | None) -> tuple[dict[str, dict[str, float]], list[torch.Tensor], int]:
    """Run both models on every batch; return accuracy per dataset, a few inputs, sample count."""
    accuracy, kept_inputs, samples = {}, [], 0
    input_name, input_rank = session.get_inputs()[0].name, len(session.get_inputs()[0].shape)
    for name, batches in datasets.items():
        correct = {"onnxruntime": 0, "pytorch": 0}
        labelled = changed = 0
        for index, batch in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            x, y = _split_batch(batch, name)
            if x.dim() != input_rank:
                raise ValueError(f"dataset {name!r} batch {index} has shape {tuple(x.shape)}; the file "
                                 f"takes {input_rank}-D batches (batch axis first)")
            x = x.detach().to(torch.float32).contiguous()
            with torch.no_grad():
                reference = model(x)
            reference = getattr(reference, "value", reference).numpy()
            candidate = session.run(None, {input_name: x.numpy()})[0]
            tally.add(reference, candidate)
            samples += x.shape[0]
            if len(kept_inputs) < 64:
                kept_inputs.extend(x[: 64 - len(kept_inputs)])
            if y is not None and reference.ndim == 2:
                labels = y.numpy()
                correct["pytorch"] += int((reference.argmax(1) == labels).sum())
                correct["onnxruntime"] += int((candidate.argmax(1) == labels).sum())
                changed += int((reference.argmax(1) != candidate.argmax(1)).sum())
                labelled += len(labels)
        if labelled:
            accuracy[name] = {"onnxruntime": correct["onnxruntime"] / labelled,
                              "pytorch": correct["pytorch"] / labelled,
                              "changed_predictions": changed, "samples": labelled}
    return accuracy, kept_inputs, samples


def _kernel_failures(weights: str, op_types: dict[str, int]) -> list[str]:
    if weights not in _INTEGER_WEIGHT_STORAGES:
        return []  # true INT4 runs as DequantizeLinear + float Conv by design (toolchain-facts.md)
    failures = []
    if not any(op in INTEGER_KERNELS for op in op_types):
        failures.append(f"{weights} file runs no integer kernel (no QLinearConv/QGemm) in onnxruntime")
    floats = {op: n for op, n in op_types.items() if op in FLOAT_COMPUTE_OPS}
    if floats:
        failures.append(f"{weights} file leaves weight layers in float after optimization: {floats}")
    return failures


def validate(onnx_path: str | os.PathLike, model: nn.Module, data: object, *,
             batch_sizes: Iterable[int] = DEFAULT_BATCH_SIZES, repeats: int = DEFAULT_REPEATS,
             threads: int = DEFAULT_THREADS, float_onnx_path: str | os.PathLike | None = None,
             tolerance: ParityTolerance = DEFAULT_TOLERANCE, max_batches: int | None = None,
             raise_on_failure: bool = False) -> ValidationReport:
    """Validate an ``export_qdq`` file against ``model`` on ``data`` in onnxruntime (CPU).

    ``data``: a mapping dataset name -> iterable of ``(x, y)`` batches (accuracy per dataset),
    or one iterable of batches or tensors. ``float_onnx_path``: the float32 twin for the
    latency and size baseline (exported from ``model`` with quantizers off when omitted).
    Raises :class:`NotAnHdrqExportError` for files not written by this package and, with
    ``raise_on_failure``, :class:`ValidationError` listing every failed check.
    """
    path = Path(onnx_path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX file at {path}")
    metadata = read_metadata(onnx.load(path, load_external_data=False), str(path))
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

    was_training = model.training
    model.eval()
    try:
        session = cpu_session(path, threads)
        tally = ParityTally()
        report.accuracy, inputs, report.samples = _compare_on_data(
            session, model, _as_datasets(data), tally, max_batches)
        report.max_abs_diff, report.relative_error = tally.max_abs_diff, tally.relative_error
        report.output_step = output_step(onnx.load(path))
        report.failures += tally.failures(tolerance)
        report.optimized_op_types = dict(optimized_op_types(path, threads))
        report.failures += _kernel_failures(report.weights, report.optimized_op_types)
        if inputs:
            with tempfile.TemporaryDirectory(prefix="hdrq-validate-") as folder:
                twin = Path(float_onnx_path) if float_onnx_path is not None else export_float(
                    model, Path(folder) / "float32.onnx", inputs[0][None])
                _measure_latency_and_size(report, session, twin, torch.stack(inputs).numpy(),
                                          batch_sizes, repeats, threads)
    finally:
        model.train(was_training)
    if raise_on_failure:
        report.raise_if_failed()
    return report


def _measure_latency_and_size(report: ValidationReport, session, float_path: Path, inputs: np.ndarray,
                              batch_sizes: tuple[int, ...], repeats: int, threads: int) -> None:
    sessions = {"quantized": session, "float32": cpu_session(float_path, threads)}
    for batch_size in batch_sizes:
        batch = np.ascontiguousarray(inputs[np.arange(batch_size) % len(inputs)])
        medians = median_latencies_ms(sessions, batch, repeats)
        medians["float32_over_quantized"] = medians["float32"] / medians["quantized"]
        report.latency_ms[batch_size] = medians
    report.file_bytes = {"quantized": Path(report.onnx_path).stat().st_size,
                         "float32": float_path.stat().st_size}
