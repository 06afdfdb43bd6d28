"""Read-only questions about an ONNX graph: which layers take float weights, which ops fall
outside the standard domain, and how large one step of the graph's output grid is."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

# Ops whose second input is a weight that must come from DequantizeLinear on the integer path.
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Ops that move or reshape values without changing them: an output step passes through them.
_VALUE_PRESERVING_OPS = ("Flatten", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Transpose")
STANDARD_DOMAINS = ("", "ai.onnx")


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {output: node for node in graph.node for output in node.output}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {tensor.name: tensor for tensor in graph.initializer}


def float_weight_nodes(model: onnx.ModelProto) -> list[str]:
    """Conv/Gemm/MatMul nodes whose weight does not come out of a DequantizeLinear."""
    made_by = producers(model.graph)
    found = []
    for node in model.graph.node:
        if node.op_type in WEIGHT_OPS and len(node.input) > 1:
            source = made_by.get(node.input[1])
            if source is None or source.op_type != "DequantizeLinear":
                found.append(node.name or node.op_type)
    return found


def nonstandard_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes outside the default ONNX domain (custom ops a stock runtime may not have)."""
    return [f"{node.domain}::{node.op_type} ({node.name})" for node in model.graph.node
            if node.domain not in STANDARD_DOMAINS]


def _constant(name: str, model: onnx.ModelProto) -> np.ndarray:
    tensor = initializers(model.graph).get(name)
    if tensor is not None:
        return numpy_helper.to_array(tensor)
    node = producers(model.graph).get(name)
    if node is not None and node.op_type == "Constant":
        return numpy_helper.to_array(node.attribute[0].t)
    raise KeyError(name)


def _dequantized_constant(dq: onnx.NodeProto, model: onnx.ModelProto) -> np.ndarray | None:
    """Value of ``DequantizeLinear(clip?(integer constant))`` in float, or None if not constant."""
    made_by = producers(model.graph)
    source = dq.input[0]
    while source in made_by and made_by[source].op_type == "Clip":
        source = made_by[source].input[0]
    try:
        codes = _constant(source, model).astype(np.float64)
        scale = _constant(dq.input[1], model).astype(np.float64)
        zero_point = _constant(dq.input[2], model).astype(np.float64) if len(dq.input) > 2 else 0.0
    except KeyError:
        return None
    axis = next((attr.i for attr in dq.attribute if attr.name == "axis"), 1)
    if np.ndim(scale) == 1 and np.size(scale) > 1:
        shape = [1] * codes.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
        zero_point = np.reshape(zero_point, shape) if np.ndim(zero_point) else zero_point
    return (codes - zero_point) * scale


def output_step(model: onnx.ModelProto) -> float | None:
    """The largest change one grid step of the last quantized tensor makes at the graph output.

    Output produced by DequantizeLinear: its (largest) scale. Output produced by a float
    Gemm/Conv/MatMul whose inputs are dequantized (a head without output quantizer): one step
    of its input times the largest weight magnitude. None when neither pattern applies.
    """
    made_by = producers(model.graph)
    name = model.graph.output[0].name
    while name in made_by and made_by[name].op_type in _VALUE_PRESERVING_OPS:
        name = made_by[name].input[0]
    node = made_by.get(name)
    if node is None:
        return None
    if node.op_type == "DequantizeLinear":
        return float(np.max(_constant(node.input[1], model)))
    if node.op_type in WEIGHT_OPS:
        data_dq, weight_dq = (made_by.get(node.input[0]), made_by.get(node.input[1]))
        if any(dq is None or dq.op_type != "DequantizeLinear" for dq in (data_dq, weight_dq)):
            return None
        weights = _dequantized_constant(weight_dq, model)
        if weights is None:
            return None
        return float(np.max(_constant(data_dq.input[1], model)) * np.max(np.abs(weights)))
    return None
