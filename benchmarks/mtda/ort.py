"""The tool a deployment engineer would reach for: onnxruntime's own ``quantize_static``.

The float merge is exported to an FP32 ONNX file, pre-processed with onnxruntime's
``quant_pre_process`` (shape inference and graph optimisation, the documented first step),
quantized by ``onnxruntime.quantization.quantize_static`` (QDQ format, MinMax or Entropy
calibration on the pooled calibration images of the merged targets) and run in an onnxruntime
CPU session, whose accuracy on each target is the result.

Measured on onnxruntime 1.32 here: QInt8 and QInt4 weights, QUInt8 and QUInt4 activations all
work with MinMax, Entropy (and Percentile) calibration; 4-bit types need opset 21 to be standard
ONNX (below it ORT falls back to its com.microsoft Q/DQ ops), so the FP32 file is converted to
opset 21 first. To match our own models' policy (BitSpec: 8-bit first conv and last linear
weights, 8-bit network input), the first Conv's and the last Gemm's weights and the graph
input are set to 8 bits with ``TensorQuantOverrides``; everything else is ORT's default
(per-tensor weights, asymmetric activations).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import version_converter
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn
from torch.utils.data import TensorDataset

from hdrq_plugin.export import export_float

INPUT_NAME, OUTPUT_NAME = "input", "output"
ORT_INT4_OPSET = 21  # docs/toolchain_notes.md: standard INT4 QuantizeLinear/DequantizeLinear need opset 21
CALIBRATION_BATCH = 8
EVAL_BATCH = 256


class _ImageReader(CalibrationDataReader):
    """onnxruntime's calibration protocol over a tensor of images, in small batches."""

    def __init__(self, images: torch.Tensor) -> None:
        self._batches = iter([{INPUT_NAME: batch.numpy()} for batch in images.split(CALIBRATION_BATCH)])

    def get_next(self):
        return next(self._batches, None)


def export_float_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """FP32 ONNX of a float model (hdrq_plugin.export.export_float), converted to opset 21."""
    exported = export_float(model, path.with_suffix(".exported.onnx"), example)
    onnx.save(version_converter.convert_version(onnx.load(str(exported)), ORT_INT4_OPSET), str(path))
    return path


def edge_overrides(model_path: Path) -> dict:
    """8-bit first-conv and last-linear weights and 8-bit input (our BitSpec's edge policy)."""
    graph = onnx.load(str(model_path)).graph
    compute = [node for node in graph.node if node.op_type in ("Conv", "Gemm", "MatMul")]
    if not compute:
        raise ValueError(f"{model_path} has no Conv/Gemm/MatMul node to quantize")
    overrides = {compute[0].input[1]: [{"quant_type": QuantType.QInt8}],
                 compute[-1].input[1]: [{"quant_type": QuantType.QInt8}],
                 INPUT_NAME: [{"quant_type": QuantType.QUInt8}]}
    return overrides


@contextlib.contextmanager
def _quiet_onnxruntime():
    """quantize_static prints its calibration progress and logs a warning per 4-bit model."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def ort_accuracy(session: ort.InferenceSession, data: TensorDataset) -> float:
    images, labels = data.tensors
    correct = 0
    for batch, truth in zip(images.split(EVAL_BATCH), labels.split(EVAL_BATCH), strict=True):
        logits = session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})[0]
        correct += int((np.argmax(logits, axis=1) == truth.numpy()).sum())
    return correct / len(labels)


def ort_quantize_static_accuracies(float_model: nn.Module, calibration: TensorDataset, tests: dict[str, TensorDataset],
                                   *, weight_type: str, activation_type: str, calibration_method: str,
                                   workdir: str | Path | None = None) -> dict[str, float]:
    """Accuracy per target of ``quantize_static(float_model)`` run in onnxruntime (module doc)."""
    images = calibration.tensors[0]
    with tempfile.TemporaryDirectory(dir=workdir) as folder:
        folder = Path(folder)
        fp32 = export_float_onnx(float_model, images[:1], folder / "float.onnx")
        prepared = folder / "float-pre.onnx"
        quant_pre_process(str(fp32), str(prepared))
        quantized = folder / "quantized.onnx"
        with _quiet_onnxruntime():
            quantize_static(str(prepared), str(quantized), _ImageReader(images), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType[activation_type], weight_type=QuantType[weight_type],
                            calibrate_method=CalibrationMethod[calibration_method], per_channel=False,
                            extra_options={"TensorQuantOverrides": edge_overrides(prepared)})
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # a shared 2-core machine
        session = ort.InferenceSession(str(quantized), options, providers=["CPUExecutionProvider"])
        return {target: ort_accuracy(session, data) for target, data in tests.items()}
