"""Rewrite Brevitas' 4-bit weights (int8 initializer -> Clip(-8..7) -> DequantizeLinear) into
true ONNX INT4 initializers at opset 21 / IR 10, halving their storage.

Brevitas never writes the INT4 type (docs/toolchain_notes.md, "Export"). Neither onnx nor
onnxruntime has a pass that re-types existing QDQ weight initializers: onnxruntime's
``quantize_static`` re-quantizes a float model with its own scales, which would lose the
exact integers and scales Brevitas learned. So the graph surgery below is hand-written; the
bit packing itself is onnx's (``onnx.helper.make_tensor(..., raw=True)`` packs two per byte).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper, version_converter

from ..errors import ExportError
from ..graph_facts import consumers, drop_unused_initializers, initializers

INT4_OPSET = 21  # first opset whose DequantizeLinear accepts int4 (ONNX operator changelog)
INT4_IR_VERSION = 10  # IR version that introduced the 4-bit types (onnx.helper.VERSION_TABLE)
# Integer range of each 4-bit type, keyed by the 8-bit type Brevitas stores the codes in.
_FOUR_BIT = {
    TensorProto.INT8: (TensorProto.INT4, -8, 7),
    TensorProto.UINT8: (TensorProto.UINT4, 0, 15),
}


def _scalar(name: str, inits: dict[str, TensorProto]) -> int | None:
    tensor = inits.get(name)
    return None if tensor is None else int(numpy_helper.to_array(tensor))


def _packed(name: str, data_type: int, values: np.ndarray) -> TensorProto:
    # raw=True packs two codes per byte into raw_data; without it onnx stores each packed byte
    # as a varint in int32_data, which costs ~40 % more bytes (measured on ResNet-8).
    container = np.int8 if data_type == TensorProto.INT4 else np.uint8
    return onnx.helper.make_tensor(name, data_type, list(values.shape), values.astype(container), raw=True)


def upgrade_to_int4_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """Convert the graph to opset 21 with onnx's version converter and set IR version 10."""
    current = next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))
    if current < INT4_OPSET:
        model = version_converter.convert_version(model, INT4_OPSET)
        # The converter leaves its shape inference behind as value_info; it is optional, and
        # dropping it keeps the INT4 file as lean as the int8 one (runtimes infer shapes anyway).
        del model.graph.value_info[:]
    model.ir_version = max(model.ir_version, INT4_IR_VERSION)
    return model


def rewrite_weights_to_int4(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Store every weight whose Clip range fits 4 bits as INT4 (UINT4); return the names rewritten.

    A weight qualifies when an 8-bit initializer feeds only a Clip with constant bounds inside
    the 4-bit range and that Clip feeds only DequantizeLinear nodes. The Clip is dropped (the
    4-bit type enforces the range) and each DequantizeLinear gets a zero point of the same
    4-bit type, as the operator requires. Wider weights (the 8-bit edge layers) stay int8;
    ``export_qdq`` checks that every <=4-bit layer was rewritten.
    """
    model = upgrade_to_int4_opset(model)
    graph = model.graph
    inits = initializers(graph)
    users = consumers(graph)
    rewritten, dropped_clips = [], []
    zero_points: dict[tuple, str] = {}
    for clip in graph.node:
        if clip.op_type != "Clip" or len(clip.input) != 3:
            continue
        weight = inits.get(clip.input[0])
        if weight is None or weight.data_type not in _FOUR_BIT or len(users[weight.name]) != 1:
            continue
        four_bit_type, low, high = _FOUR_BIT[weight.data_type]
        bounds = (_scalar(clip.input[1], inits), _scalar(clip.input[2], inits))
        if None in bounds or bounds[0] < low or bounds[1] > high:
            continue
        dequantizers = users.get(clip.output[0], [])
        if not dequantizers or any(node.op_type != "DequantizeLinear" for node in dequantizers):
            continue
        if any(len(dq.input) > 2 and dq.input[2] not in inits for dq in dequantizers):
            continue  # a computed zero point: leave this weight in int8
        codes = np.clip(numpy_helper.to_array(weight), *bounds)  # exactly what the Clip computed
        weight.CopyFrom(_packed(weight.name, four_bit_type, codes))
        for dq in dequantizers:
            dq.input[0] = weight.name
            if len(dq.input) > 2:
                zero_point = numpy_helper.to_array(inits[dq.input[2]])
                if zero_point.min() < low or zero_point.max() > high:
                    raise ExportError(f"zero point of {weight.name!r} does not fit {low}..{high}")
                key = (four_bit_type, zero_point.shape, zero_point.tobytes())
                if key not in zero_points:  # DequantizeLinear needs a zero point of its input's type
                    zero_points[key] = f"hdrq_4bit_zero_point_{len(zero_points)}"
                    graph.initializer.append(_packed(zero_points[key], four_bit_type, zero_point))
                dq.input[2] = zero_points[key]
        dropped_clips.append(clip)
        rewritten.append(weight.name)
    for clip in dropped_clips:
        graph.node.remove(clip)
    drop_unused_initializers(graph)
    return model, rewritten
