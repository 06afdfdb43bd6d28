"""Questions about an ONNX graph (which layers take float weights, which ops fall outside the
standard domain, the step of the output grid) and one cleanup: dropping unread initializers."""

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


def drop_unused_initializers(graph: onnx.GraphProto) -> None:
    """Remove initializers no node and no graph output reads (left behind by rewrites)."""
    used = {name for node in graph.node for name in node.input} | {out.name for out in graph.output}
    for tensor in [tensor for tensor in graph.initializer if tensor.name not in used]:
        graph.initializer.remove(tensor)


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


def output_step(model: onnx.ModelProto) -> float | None:
    """The step of the grid the graph's output lies on (the largest, if per channel).

    Output made by DequantizeLinear: its scale. Output made by a float Gemm/Conv/MatMul whose
    data and weight are dequantized (logits without output quantizer): the accumulator step,
    input scale x weight scale, the grid an Int32Bias output lies on. None otherwise.
    """
    made_by = producers(model.graph)
    name = model.graph.output[0].name
    while name in made_by and made_by[name].op_type in _VALUE_PRESERVING_OPS:
        name = made_by[name].input[0]
    node = made_by.get(name)
    if node is None:
        return None
    try:
        if node.op_type == "DequantizeLinear":
            return float(np.max(_constant(node.input[1], model)))
        if node.op_type in WEIGHT_OPS:
            data_dq, weight_dq = (made_by.get(node.input[0]), made_by.get(node.input[1]))
            if any(dq is None or dq.op_type != "DequantizeLinear" for dq in (data_dq, weight_dq)):
                return None
            return float(np.max(_constant(data_dq.input[1], model))
                         * np.max(_constant(weight_dq.input[1], model)))
    except KeyError:  # a scale computed at run time
        return None
    return None
