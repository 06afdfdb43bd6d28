"""``export_qdq``: a calibrated Brevitas model -> one checked, self-describing ONNX QDQ file.

Brevitas' QCDQ exporter on the TorchScript path (docs/toolchain_notes.md, "Export") writes integer
weight initializers and keeps Int32Bias (local adaptive average pools exported as the fixed
AvgPool they are at the example input, :mod:`.static_pools`); this module adds the dynamic batch axis, checks that
every weight layer is on the integer path, applies exact rewrites that keep onnxruntime's
integer kernels connected (:mod:`.integer_path`: uint8 activations, redundant ReLU6 Clips,
a quantizer before Flatten), optionally rewrites <=4-bit weights
to true INT4 (:mod:`.int4`), writes the ``hdrq.*`` metadata, checks that onnxruntime computes the
model at every optimization level (:mod:`..validation.self_check`), and writes the file atomically.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import onnx
import torch
from brevitas.export import export_onnx_qcdq
from brevitas.export.onnx.standard.qcdq.manager import StdQCDQONNXManager
from torch import nn

from hdrq_plugin._io import atomic_write_path
from hdrq_plugin.options import WEIGHT_STORAGES  # the storages' names; torch-free for the CLI

from ..errors import ExportCheckError, ExportError
from ..graph_facts import float_weight_nodes, nonstandard_nodes
from ..metadata import quantized_metadata_props, set_metadata, user_metadata_props
from ..model_facts import (
    QuantizationSummary,
    model_sha256,
    require_brevitas_model,
    require_calibrated,
    require_fitting_input,
    summarize_quantization,
)
from ..rewrites.int4 import rewrite_weights_to_int4
from ..rewrites.integer_path import keep_integer_path
from ..rewrites.linear_weights import transposed_weights_to_gemm
from ..rewrites.unsigned_grids import store_wide_weights_as_uint8
from ..validation.self_check import onnxruntime_failures
from .static_pools import with_static_pools

INPUT_NAME, OUTPUT_NAME, BATCH_AXIS = "input", "output", "batch"
# dynamo=False: the dynamo exporter rejects Int32Bias and stores float weights (docs/toolchain_notes.md).
QCDQ_OPSET = 13  # docs/toolchain_notes.md: the measured-good opset for Brevitas' TorchScript QCDQ path
DYNAMIC_BATCH = {INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}}


def _four_bit_layers(summary: QuantizationSummary) -> list[str]:
    return [name for name, bits in summary.weight_bits.items() if bits <= 4]


def _require_storage_fits(weights: str, summary: QuantizationSummary) -> None:
    if weights not in WEIGHT_STORAGES:
        raise ValueError(f"weights must be one of {WEIGHT_STORAGES}, got {weights!r}")
    if weights != "int8" and not _four_bit_layers(summary):
        raise ValueError(
            f"weights={weights!r} needs layers with at most 4-bit weights; this model has "
            f"{sorted(set(summary.weight_bits.values()))}-bit weights only (use weights='int8')")


def write_brevitas_qcdq(model: nn.Module, example_input: torch.Tensor, target: str | os.PathLike) -> None:
    """Run Brevitas' QCDQ export into ``target`` with named I/O and a dynamic batch axis."""
    was_training = model.training
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's TorchScript-exporter deprecation notice
            export_onnx_qcdq(
                model, args=example_input, export_path=str(target), opset_version=QCDQ_OPSET,
                dynamo=False, keep_initializers_as_inputs=False, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamic_axes=DYNAMIC_BATCH)
    except Exception as err:
        first_line = str(err).strip().split("\n", 1)[0][:500]  # torch appends the whole TorchScript graph
        raise ExportError(f"Brevitas QCDQ export failed: {type(err).__name__}: {first_line}") from err
    finally:
        # Brevitas leaves its export mode switched on when torch.onnx.export raises.
        StdQCDQONNXManager.set_export_mode(model, enabled=False)
        model.train(was_training)


def _require_integer_graph(onnx_model: onnx.ModelProto) -> None:
    float_layers = float_weight_nodes(onnx_model)
    if float_layers:
        raise ExportError(f"these nodes take float weights, not dequantized integers: {float_layers}")
    custom = nonstandard_nodes(onnx_model)
    if custom:
        raise ExportError(f"unsupported ops outside the standard ONNX domain: {custom}")


def _require_same_function_in_onnxruntime(tmp: Path, model: nn.Module, example_input: torch.Tensor,
                                         path: str | os.PathLike) -> None:
    """Refuse a file that onnxruntime, at any optimization level, runs as another function
    (:mod:`..validation.self_check`); the file is not written."""
    failures = onnxruntime_failures(tmp, model, example_input)
    if failures:
        more = f" (+{len(failures) - 1} more)" if len(failures) > 1 else ""
        raise ExportCheckError(f"the exported graph computes another function than the model in onnxruntime, "
                          f"so {path} was not written: {failures[0]}{more}")


def export_qdq(model: nn.Module, path: str | os.PathLike, example_input: torch.Tensor,
               weights: str = "int8", metadata: Mapping[str, object] | None = None,
               overwrite: bool = False, saturation_safe: bool = True) -> Path:
    """Write ``model`` as an ONNX QDQ file at ``path`` and return the path.

    ``weights``: ``"int8"`` stores every weight as an int8 initializer (sub-8-bit grids keep
    Brevitas' Clip); ``"int4-in-int8"`` is the same file for a model that has <=4-bit layers
    (onnxruntime runs them on its int8 kernels); ``"int4"`` stores those layers as true INT4
    at opset 21 (half the bytes, but onnxruntime runs them as float Conv, docs/toolchain_notes.md).
    ``metadata`` adds ``method``, ``merged_targets`` or other entries to the file's ``hdrq.*``
    metadata. Before the file is written, onnxruntime runs it on ``example_input`` under every
    optimization level and it must compute the model there (validate's parity rules); otherwise
    :class:`ExportError` names the level and the layer where the function first changes. The
    file appears complete or not at all; an existing file needs ``overwrite``.

    ``saturation_safe`` (default): weights with codes beyond +-64 are stored as uint8 so the file
    computes the model on every x86 CPU (:func:`.unsigned_grids.store_wide_weights_as_uint8`);
    onnxruntime then runs those layers on u8u8 kernels, which VNNI does not accelerate
    (measured here, W8A8 ResNet-18 224x224, 1 thread: 2.7x slower at batch 1, 3.0x at batch 8;
    W4A4/W4A8 files only have their two 8-bit edge layers affected). ``False`` keeps int8
    weights: fastest on CPUs with VNNI (AVX512-VNNI / AVX-VNNI), but a file that saturates, and
    computes another function, on x86 CPUs without it (docs/export.md). Recorded as
    ``hdrq.saturation_safe``.
    """
    require_brevitas_model(model)
    require_calibrated(model)
    summary = summarize_quantization(model)
    _require_storage_fits(weights, summary)
    props = {**user_metadata_props(metadata),
             **quantized_metadata_props(summary, weights, model_sha256(model)),
             "hdrq.saturation_safe": json.dumps(bool(saturation_safe))}
    require_fitting_input(model, example_input)
    with atomic_write_path(path, overwrite=overwrite) as tmp:
        write_brevitas_qcdq(with_static_pools(model, example_input), example_input, tmp)
        onnx_model = onnx.load(tmp)
        transposed_weights_to_gemm(onnx_model)  # nn.Linear(bias=False): MatMul(x, Transpose(DQ(W)))
        _require_integer_graph(onnx_model)
        keep_integer_path(onnx_model)  # exact rewrites so onnxruntime fuses every layer
        if saturation_safe:
            store_wide_weights_as_uint8(onnx_model)  # no int16 saturation on x86 CPUs without VNNI
        if weights == "int4":
            onnx_model, rewritten = rewrite_weights_to_int4(onnx_model)
            expected = len(_four_bit_layers(summary))
            if len(rewritten) != expected:
                raise ExportError(f"rewrote {len(rewritten)} weights to INT4, expected {expected} "
                                  f"(layers {_four_bit_layers(summary)})")
        set_metadata(onnx_model, props)
        onnx.save(onnx_model, tmp)
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as err:
            raise ExportError(f"the exported graph fails onnx.checker: {err}") from err
        _require_same_function_in_onnxruntime(tmp, model, example_input, path)
    return Path(path)
