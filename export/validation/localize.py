"""Where the deployed graph's function first changes, when the instrumented twin cannot see it.

Exposing activations as graph outputs changes which rewrites onnxruntime applies, so a file
that onnxruntime's optimizers turn into another function can have a twin whose codes all agree
(issue 19: DoubleQDQPairsRemover does not merge pairs whose tensors are graph outputs). Here the
graph is cut after each activation quantizer's DequantizeLinear in turn, keeping everything
before it as deployed, and run at the same optimization level: the first cut whose codes differ
from the Brevitas model's names the layer. Only run on failure: one session per cut.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx.utils import Extractor
from torch import nn

from ..graph_facts import consumers
from .activation_codes import capture_activation_codes
from .ort_runtime import session_options


def first_changed_layer(path: str | os.PathLike, sites: list, model: nn.Module, x: torch.Tensor,
                        level: str) -> tuple[str, str]:
    """Name the first activation quantizer whose codes the deployed graph, cut right after it,
    computes differently from ``model`` on ``x``, or the layers after the last one: (name, detail)."""
    onnx_model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))  # the Extractor needs value_info
    users = consumers(onnx_model.graph)
    extractor = Extractor(onnx_model)
    input_name = onnx_model.graph.input[0].name
    with torch.no_grad(), capture_activation_codes(model) as captured:
        model(x)
    for site, record in zip(sites, captured, strict=True):
        dequantize = next((u for u in users.get(site.codes_tensor, []) if u.op_type == "DequantizeLinear"), None)
        if dequantize is None:
            continue
        cut = extractor.extract_model([input_name], [dequantize.output[0]])
        session = ort.InferenceSession(cut.SerializeToString(), session_options(1, level=level),
                                       providers=["CPUExecutionProvider"])
        values = session.run(None, {input_name: x.numpy()})[0]
        codes = np.round(values.astype(np.float64) / site.scale).astype(np.int64)
        differing = int((codes != record.codes.astype(np.int64)).sum())
        if differing:
            return record.name, f"node {site.node}: {differing} codes differ when the graph is cut after it"
    last = captured[-1].name if captured else "the input"
    return f"after {last}", "every activation quantizer agrees when the graph is cut after it; the output differs"
