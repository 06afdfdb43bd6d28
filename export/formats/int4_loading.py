"""Run a true-INT4 file on onnxruntime's integer kernels: its 4-bit weights are widened to 8 bits
in memory when the session is created; the file on disk keeps the packed 4-bit bytes (issue 22).

Stock onnxruntime (CPU provider) has no integer kernel for 4-bit Conv/Gemm weights: its QDQ
fusions select 8-bit (and 16-bit) weight types only, so an INT4 file runs as DequantizeLinear +
float Conv — measured on ResNet-18 at 224×224 (benchmarks/latency/int8_default.py, its
optimized graph via ``SessionOptions.optimized_model_filepath``): no integer-kernel node, and
1.8–2.3× slower than FP32. Widening is exact: the codes, scales and zero points are the same
numbers in an 8-bit type (DequantizeLinear at opset 21 takes int8/uint8 too), so the graph is the
``"int4-in-int8"`` file's graph and onnxruntime fuses it onto QLinearConv/QGemm.

    session = int4_session("model-int4.onnx")          # instead of ort.InferenceSession(path)

Hand-written because neither onnx nor onnxruntime has a pass that re-types initializers.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..graph_facts import consumers

#: 4-bit type -> the 8-bit type of the same signedness.
_WIDER = {TensorProto.INT4: (TensorProto.INT8, np.int8), TensorProto.UINT4: (TensorProto.UINT8, np.uint8)}


def widen_int4_weights(model: onnx.ModelProto) -> list[str]:
    """Re-type, in place, every INT4/UINT4 initializer read only by DequantizeLinear nodes (weights
    and their zero points) to INT8/UINT8 with the same values; return the names re-typed."""
    graph = model.graph
    users = consumers(graph)
    widened = []
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type not in _WIDER:
            continue
        readers = users.get(tensor.name, [])
        if not readers or any(node.op_type != "DequantizeLinear" for node in readers):
            continue  # not a QDQ weight: leave it as the file has it
        _, dtype = _WIDER[tensor.data_type]
        values = numpy_helper.to_array(tensor).astype(dtype)  # onnx unpacks two codes per byte
        graph.initializer[index].CopyFrom(numpy_helper.from_array(values, tensor.name))
        widened.append(tensor.name)
    return widened


def int4_session(path: str | os.PathLike, options=None, providers: list[str] | None = None):
    """An ``onnxruntime.InferenceSession`` of the file at ``path`` with its 4-bit weights widened
    to 8 bits first (:func:`widen_int4_weights`); any other file is loaded unchanged."""
    import onnxruntime as ort

    model = onnx.load(os.fspath(path))
    widen_int4_weights(model)
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=providers or ["CPUExecutionProvider"])
