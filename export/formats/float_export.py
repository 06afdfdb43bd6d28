"""``export_float``: the FP32 ONNX twin of a model, the baseline for latency and file size.

A Brevitas model is exported with every quantizer switched off (Brevitas'
``quantization_status_manager``), so the twin runs the same architecture on the same latent
float weights; a plain torch model is exported as it is.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import onnx
import torch
from brevitas.graph.calibrate import quantization_status_manager
from torch import nn

from hdrq_plugin._io import atomic_write_path
from hdrq_plugin.quant.control import quantized_layers

from ..errors import ExportError
from ..metadata import float_metadata_props, set_metadata
from ..model_facts import model_sha256, require_fitting_input
from .qdq import DYNAMIC_BATCH, INPUT_NAME, OUTPUT_NAME, QCDQ_OPSET
from .static_pools import with_static_pools


def _quantizers_off(model: nn.Module):
    if not quantized_layers(model, enabled_only=False):
        return contextlib.nullcontext()
    return quantization_status_manager(
        model, disable_act_quant=True, disable_weight_quant=True, disable_bias_quant=True)


def export_float(model: nn.Module, path: str | os.PathLike, example_input: torch.Tensor,
                 overwrite: bool = False) -> Path:
    """Write ``model`` (quantizers off) as a float32 ONNX file with a dynamic batch axis."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    try:
        with _quantizers_off(model):
            require_fitting_input(model, example_input)
            with atomic_write_path(path, overwrite=overwrite) as tmp:
                with warnings.catch_warnings(), torch.no_grad():
                    warnings.simplefilter("ignore")  # torch's TorchScript-exporter deprecation notice
                    try:
                        torch.onnx.export(
                            with_static_pools(model, example_input), (example_input,), str(tmp), opset_version=QCDQ_OPSET,
                            dynamo=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                            dynamic_axes=DYNAMIC_BATCH)
                    except Exception as err:
                        first_line = str(err).strip().split("\n", 1)[0][:500]  # not torch's graph dump
                        raise ExportError(f"float export failed: {type(err).__name__}: {first_line}") from err
                onnx_model = onnx.load(tmp)
                set_metadata(onnx_model, float_metadata_props(model_sha256(model)))
                onnx.save(onnx_model, tmp)
                onnx.checker.check_model(str(tmp), full_check=True)
    finally:
        model.train(was_training)
    return Path(path)
