"""Store signed activations (QuantizeLinear int8 -> [Clip ->] DequantizeLinear) as uint8 with
zero point + 128, so onnxruntime on x86 fuses the layers around them into integer kernels.

Brevitas writes a sub-8-bit activation as an int8 QuantizeLinear followed by a Clip to the
narrow range (e.g. -8..7) and a DequantizeLinear. onnxruntime's x86 QDQ fusions want uint8
activations and convert int8 Q->DQ pairs themselves (its QDQS8ToU8Transformer), but only when
the two are adjacent: the Clip in between blocks the conversion, and the Conv/Add around it
stay float (measured: 5 of 9 convs and all 3 residual adds of a W4A4 ResNet-8). Shifting codes
by 128 is exact: saturate_u8(round(x/s) + z + 128) - (z + 128) equals
saturate_s8(round(x/s) + z) - z for every x, and the Clip bounds shift with it.
The same blockage happens without a Clip when the DequantizeLinear has several consumers
(onnxruntime duplicates it per consumer first, and its converter then no longer sees one pair):
measured on MobileNet-style blocks, the SE and Hardswish inputs and the shortcut of an inverted
residual left the convs around them in float. So every int8 activation pair is shifted.
This is hand-written because no onnx or onnxruntime pass covers these forms.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .graph_facts import consumers, drop_unused_initializers, initializers

_SHIFT = 128  # int8 -> uint8 offset


class _SharedConstants:
    """One uint8 initializer per distinct value (a per-node copy would grow small files by ~10 %)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph, self.names = graph, {}

    def shifted(self, tensor: onnx.TensorProto) -> str:
        values = (numpy_helper.to_array(tensor).astype(np.int16) + _SHIFT).astype(np.uint8)
        key = (values.shape, values.tobytes())
        if key not in self.names:
            self.names[key] = f"hdrq_uint8_constant_{len(self.names)}"
            self.graph.initializer.append(numpy_helper.from_array(values, self.names[key]))
        return self.names[key]


def shift_clipped_signed_activations(model: onnx.ModelProto) -> int:
    """Rewrite every int8 ``QuantizeLinear -> [Clip ->] DequantizeLinear`` chain in place to uint8.

    A chain qualifies when the QuantizeLinear has a constant int8 zero point, feeds only Clips
    with constant int8 bounds or DequantizeLinear nodes, and each Clip feeds only
    DequantizeLinear nodes; every DequantizeLinear shares that zero point. Returns the number
    of rewritten QuantizeLinear nodes. Shared initializers are never modified (weights may read
    them): new ones are added (one per distinct value), unread ones removed.
    """
    graph = model.graph
    inits = initializers(graph)
    users = consumers(graph)
    rewritten = 0
    shared = _SharedConstants(graph)
    for quantize in list(graph.node):
        if quantize.op_type != "QuantizeLinear" or len(quantize.input) < 3:
            continue
        zero_point = inits.get(quantize.input[2])
        if zero_point is None or zero_point.data_type != TensorProto.INT8:
            continue
        direct = users.get(quantize.output[0], [])
        clips = [node for node in direct if node.op_type == "Clip"]
        if not direct or any(clip.op_type != "Clip" or len(clip.input) != 3
                             or any(bound not in inits for bound in clip.input[1:]) for clip in clips):
            continue
        dequantizers = ([node for node in direct if node.op_type != "Clip"]
                        + [dq for clip in clips for dq in users.get(clip.output[0], [])])
        codes_zero = numpy_helper.to_array(zero_point)
        if not dequantizers or any(dq.op_type != "DequantizeLinear" or len(dq.input) < 3
                                   or dq.input[2] not in inits
                                   or not np.array_equal(numpy_helper.to_array(inits[dq.input[2]]), codes_zero)
                                   for dq in dequantizers):
            continue
        unsigned_zero_point = shared.shifted(zero_point)
        quantize.input[2] = unsigned_zero_point
        for clip in clips:
            for index in (1, 2):
                clip.input[index] = shared.shifted(inits[clip.input[index]])
        for dq in dequantizers:
            dq.input[2] = unsigned_zero_point
        rewritten += 1
    drop_unused_initializers(graph)
    return rewritten
