"""Questions about an ONNX graph (which layers take float weights, which ops fall outside the
standard domain, the step of the output grid) and one cleanup: dropping unread initializers."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

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


def output_producer(model: onnx.ModelProto, made_by: dict[str, onnx.NodeProto]) -> onnx.NodeProto | None:
    """The node that computes the graph's first output, looking through value-preserving ops."""
    name = model.graph.output[0].name
    while name in made_by and made_by[name].op_type in _VALUE_PRESERVING_OPS:
        name = made_by[name].input[0]
    return made_by.get(name)


def output_step(model: onnx.ModelProto) -> float | None:
    """The step of the grid the graph's output lies on (the largest, if per channel).

    Output made by DequantizeLinear: its scale. Output made by a float Gemm/Conv/MatMul whose
    data and weight are dequantized (logits without output quantizer): the accumulator step,
    input scale x weight scale, the grid an Int32Bias output lies on. None otherwise.
    """
    made_by = producers(model.graph)
    node = output_producer(model, made_by)
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


_FLOAT32_UNIT_ROUNDOFF = 2.0 ** -24
_INTEGER_RANGES = {TensorProto.UINT8: (0, 255), TensorProto.INT8: (-128, 127), TensorProto.INT4: (-8, 7),
                   TensorProto.UINT4: (0, 15), TensorProto.INT32: (-2 ** 31, 2 ** 31 - 1)}


def _codes_behind(dq: onnx.NodeProto, model: onnx.ModelProto) -> tuple[np.ndarray | None, tuple[int, int], int]:
    """For a DequantizeLinear: its constant codes (None if computed), their range and zero point."""
    made_by, inits = producers(model.graph), initializers(model.graph)
    zero_point = 0
    zp_type = TensorProto.INT8
    if len(dq.input) > 2 and dq.input[2]:
        zp_type = inits[dq.input[2]].data_type if dq.input[2] in inits else zp_type
        zero_point = int(np.asarray(_constant(dq.input[2], model)).reshape(-1)[0])
    source = dq.input[0]
    low, high = _INTEGER_RANGES.get(zp_type, (-128, 127))
    clip = made_by.get(source)
    if clip is not None and clip.op_type == "Clip" and len(clip.input) == 3:
        low, high = (int(np.asarray(_constant(bound, model)).reshape(-1)[0]) for bound in clip.input[1:])
        source = clip.input[0]
    if source in inits:
        codes = numpy_helper.to_array(inits[source]).astype(np.int64) - zero_point
        return codes, (low - zero_point, high - zero_point), zero_point
    return None, (low - zero_point, high - zero_point), zero_point


def output_float_error_steps(model: onnx.ModelProto) -> float | None:
    """Bound, in output steps, on how far two correct float32 evaluations of the output can
    differ when every activation code agrees (parity.py, point 2).

    Output made by DequantizeLinear: 0 (same codes, same scale). Output made by a Gemm/Conv/
    MatMul on dequantized integers: the dot products of K integer codes scaled to float32
    round with error at most (K + 2) u sum|x w| on one side (Higham, "Accuracy and Stability of
    Numerical Algorithms", §3.1) and 2u |acc| on the other (float32 multiplier applied to an
    exact int32 accumulator), hence (K + 4) u (Q_in max_row sum|w_codes| + max|b_codes|) steps.
    None when the output is made any other way.
    """
    made_by = producers(model.graph)
    node = output_producer(model, made_by)
    if node is None:
        return None
    if node.op_type == "DequantizeLinear":
        return 0.0
    if node.op_type not in WEIGHT_OPS or len(node.input) < 2:
        return None
    data_dq, weight_dq = made_by.get(node.input[0]), made_by.get(node.input[1])
    if any(dq is None or dq.op_type != "DequantizeLinear" for dq in (data_dq, weight_dq)):
        return None
    try:
        weights, _, _ = _codes_behind(weight_dq, model)
        _, (low, high), _ = _codes_behind(data_dq, model)
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias_dq = made_by.get(node.input[2])
            bias = _codes_behind(bias_dq, model)[0] if bias_dq is not None and bias_dq.op_type == "DequantizeLinear" else None
            if bias is None:
                return None
    except KeyError:
        return None
    if weights is None:
        return None
    transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
    rows = weights if node.op_type in ("Conv", "ConvTranspose") or transposed else weights.T
    rows = np.abs(rows.reshape(rows.shape[0], -1))
    terms = rows.shape[1]
    largest_input = max(abs(low), abs(high))
    largest_bias = float(np.abs(bias).max()) if bias is not None else 0.0
    return (terms + 4) * _FLOAT32_UNIT_ROUNDOFF * (largest_input * float(rows.sum(axis=1).max()) + largest_bias)


#: The largest weight code magnitude onnxruntime's u8s8 kernels take without overflow on every
#: x86 CPU: without VNNI (AVX2, e.g. Haswell..Zen 3) MLAS multiplies uint8 activations by int8
#: weights with vpmaddubsw, which adds each pair of adjacent products into a *saturating* int16;
#: 2 x 255 x 64 = 32,640 <= 32,767, 2 x 255 x 65 is not (onnxruntime's own answer to the same
#: overflow is ``reduce_range``: 7-bit weights; :data:`hdrq_plugin.bitspec.WEIGHT_RANGES`).
SATURATION_FREE_WEIGHT_CODE = 64


def stored_weights(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Weight layer name -> the integer initializer its DequantizeLinear reads (through a Clip or not)."""
    made_by, inits = producers(model.graph), initializers(model.graph)
    found = {}
    for node in model.graph.node:
        dq = made_by.get(node.input[1]) if node.op_type in WEIGHT_OPS and len(node.input) > 1 else None
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        source = made_by.get(dq.input[0])
        name = source.input[0] if source is not None and source.op_type == "Clip" else dq.input[0]
        if name in inits:
            found[node.name or node.output[0]] = inits[name]
    return found


def saturating_int8_weights(model: onnx.ModelProto) -> list[str]:
    """Weight layers stored as int8 with a code beyond +-:data:`SATURATION_FREE_WEIGHT_CODE`: the
    layers whose u8s8 kernel can saturate on x86 CPUs without VNNI (docs/export.md §4)."""
    return [layer for layer, tensor in stored_weights(model).items()
            if tensor.data_type == TensorProto.INT8
            and np.abs(numpy_helper.to_array(tensor).astype(np.int16)).max(initial=0) > SATURATION_FREE_WEIGHT_CODE]
