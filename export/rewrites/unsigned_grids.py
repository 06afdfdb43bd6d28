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

from ..graph_facts import SATURATION_FREE_WEIGHT_CODE, consumers, drop_unused_initializers, initializers

_SHIFT = 128  # int8 -> uint8 offset


class _SharedConstants:
    """One uint8 initializer per distinct value (a per-node copy would grow small files by ~10 %)."""

    def __init__(self, graph: onnx.GraphProto, prefix: str = "hdrq_uint8_constant") -> None:
        self.graph, self.names, self.prefix = graph, {}, prefix

    def shifted(self, tensor: onnx.TensorProto) -> str:
        values = (numpy_helper.to_array(tensor).astype(np.int16) + _SHIFT).astype(np.uint8)
        key = (values.shape, values.tobytes())
        if key not in self.names:
            self.names[key] = f"{self.prefix}_{len(self.names)}"
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




def _weight_codes(name: str, inits: dict, users: dict) -> tuple[onnx.NodeProto | None, list[onnx.NodeProto]]:
    """``(clip or None, dequantizers)`` when ``name`` is an int8 weight read only through them."""
    readers = users.get(name, [])
    # ``name`` must be the Clip's data input: a Clip's bound constant (e.g. 127 of a full 8-bit
    # grid) is an int8 initializer read only by that Clip too, and is not a weight
    if len(readers) == 1 and readers[0].op_type == "Clip" and len(readers[0].input) == 3 \
            and readers[0].input[0] == name and all(bound in inits for bound in readers[0].input[1:]):
        clip = readers[0]
        return clip, users.get(clip.output[0], [])
    return None, readers


def store_wide_weights_as_uint8(model: onnx.ModelProto) -> list[str]:
    """Store int8 weights whose codes exceed +-64 as uint8 with zero point + 128, in place.

    Why: onnxruntime turns int8 activations into uint8 (+128) on x86, so such a layer runs a
    u8s8 kernel, and on CPUs without VNNI that kernel saturates pairs of products in int16
    (see :data:`SATURATION_FREE_WEIGHT_CODE`): the file then computes another function than
    the model on those CPUs only (the demo's 8-bit stem and classifier, measured
    under ``qemu-x86_64 -cpu Haswell``: logits off by up to 1.08, relative L2 error 2.2e-2,
    while VNNI kernels agreed exactly). uint8 weights select MLAS' u8u8 kernels,
    which widen to 16 bits before multiplying and cannot saturate. The shift is exact, as for
    activations above. Returns the names of the rewritten weights.
    """
    graph = model.graph
    inits, users = initializers(graph), consumers(graph)
    constants = _SharedConstants(graph, prefix="hdrq_uint8_weight_constant")  # names unlike the activations'
    rewritten = []
    for tensor in list(graph.initializer):
        if tensor.data_type != TensorProto.INT8:
            continue
        clip, dequantizers = _weight_codes(tensor.name, inits, users)
        if not dequantizers or any(dq.op_type != "DequantizeLinear" or dq.input[0] != (clip.output[0] if clip else tensor.name)
                                   or len(dq.input) < 3 or dq.input[2] not in inits for dq in dequantizers):
            continue
        zero_points = {dq.input[2] for dq in dequantizers}
        if len(zero_points) != 1:
            continue
        zero_point = numpy_helper.to_array(inits[zero_points.pop()])
        if zero_point.dtype != np.int8 or np.any(zero_point != 0):
            continue  # weights here are symmetric; anything else is left as Brevitas wrote it
        codes = numpy_helper.to_array(tensor)
        if np.abs(codes.astype(np.int16)).max(initial=0) <= SATURATION_FREE_WEIGHT_CODE:
            continue
        tensor.CopyFrom(numpy_helper.from_array((codes.astype(np.int16) + _SHIFT).astype(np.uint8), tensor.name))
        unsigned_zero_point = constants.shifted(numpy_helper.from_array(zero_point))
        if clip is not None:
            for index in (1, 2):
                clip.input[index] = constants.shifted(inits[clip.input[index]])
        for dq in dequantizers:
            dq.input[2] = unsigned_zero_point
        rewritten.append(tensor.name)
    drop_unused_initializers(graph)
    return rewritten


_INT4_RANGE = (-8, 7)


def drop_saturation_free_weight_clips(model: onnx.ModelProto) -> list[str]:
    """Drop Brevitas' integer Clip after int8 weights of saturation-free grids (5..7 bits), in place.

    Brevitas writes every sub-8-bit weight as int8 initializer -> Clip(qmin, qmax) ->
    DequantizeLinear. On a constant whose codes already lie inside the bounds (they are the
    quantizer's output) the Clip changes nothing, so dropping it is exact; the default 8-bit grid
    (-64..63, :data:`hdrq_plugin.bitspec.WEIGHT_RANGES`) then reads as a plain int8 weight, as
    onnxruntime's ``reduce_range`` files do, and a tiny model's file does not grow by two nodes
    and three constants per layer. Clips inside the 4-bit range stay: they mark the weights the
    INT4 storage rewrites (:mod:`.int4`). Returns the names of the weights whose Clip was dropped.
    """
    graph = model.graph
    inits, users = initializers(graph), consumers(graph)
    dropped = []
    for tensor in list(graph.initializer):
        if tensor.data_type != TensorProto.INT8:
            continue
        clip, dequantizers = _weight_codes(tensor.name, inits, users)
        if clip is None or clip.input[0] != tensor.name or not dequantizers \
                or any(dq.op_type != "DequantizeLinear" for dq in dequantizers):
            continue  # (the Clip's int8 bounds are read by it too)
        low, high = (int(numpy_helper.to_array(inits[bound]).reshape(-1)[0]) for bound in clip.input[1:])
        if _INT4_RANGE[0] <= low and high <= _INT4_RANGE[1] or max(-low, high) > SATURATION_FREE_WEIGHT_CODE:
            continue
        codes = numpy_helper.to_array(tensor)
        if codes.min(initial=low) < low or codes.max(initial=high) > high:
            continue  # the Clip would change a code: not a no-op
        for dq in dequantizers:
            dq.input[0] = tensor.name
        graph.node.remove(clip)
        dropped.append(tensor.name)
    drop_unused_initializers(graph)
    return dropped
