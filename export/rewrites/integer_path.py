"""Exact graph rewrites that keep onnxruntime's integer kernels connected in a Brevitas QDQ graph.

onnxruntime fuses ``DequantizeLinear -> op -> QuantizeLinear`` groups into integer kernels
(QLinearConv, QGemm, QLinearGlobalAveragePool, ...) only when the pattern is exact. Brevitas'
export leaves three patterns that break it (measured on ResNet-18 / MobileNetV2-style graphs,
benchmarks/export_latency.py --size 224):

* a signed int8 activation pair (:mod:`.unsigned_grids`): onnxruntime on x86 wants uint8;
* ``Clip(0, 6) -> QuantizeLinear`` after a ReLU6: the Clip sits between the Conv and its
  QuantizeLinear. When the grid saturates at or below the Clip's bounds the Clip changes no
  quantized value (QuantizeLinear is monotone: Q(clip(x, lo, hi)) = Q(x) for every x iff
  Q(lo) = q_min and Q(hi) = q_max, where a sub-8-bit grid's q_min/q_max are the bounds of the
  integer Clip after the QuantizeLinear), so it is dropped;
* ``DequantizeLinear -> Flatten -> Gemm`` (a Linear reading a ReLU's codes through a flatten,
  :mod:`hdrq_plugin.convert.shared_grids`): the Gemm cannot be fused because no DequantizeLinear
  feeds it. Flatten only moves grid values, and requantizing a grid value on its own grid gives
  its code back (s * k / s rounds to k: the float32 error is below |k| 2^-23 << 1/2 for 8-bit
  codes), so a copy of the pair goes after the Flatten;
* ``GlobalAveragePool -> Flatten -> QuantizeLinear`` (the classifier's input): the pool cannot
  be fused because no QuantizeLinear follows it. Flatten only moves values, so
  Q(Flatten(x)) = Flatten(Q(x)) for a per-tensor grid: a copy of the QuantizeLinear /
  DequantizeLinear pair is put in front of the Flatten.

Each rewrite is exact (the file computes bit-identical outputs); onnxruntime has no pass for any
of them (its ClipQuantFusion only removes a Clip whose bounds cover the grid's full float range,
and only when the Clip has a single consumer), hence hand-written.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..graph_facts import consumers, drop_unused_initializers, initializers, producers
from .unsigned_grids import shift_clipped_signed_activations

#: Name suffix of the QuantizeLinear copies put before a reshape: a copy of a quantizer the model
#: runs once, which parity checks (activation_codes.py) must not count as a quantizer of its own.
COPIED_QUANTIZE_SUFFIX = "_quantize_before"
COPIED_AFTER_SUFFIX = "_quantize_after"  # the copy after a reshape (requantize_after_reshapes)
COPIED_QUANTIZE_SUFFIXES = (COPIED_QUANTIZE_SUFFIX, COPIED_AFTER_SUFFIX)
_RANGES = {TensorProto.INT8: (-128, 127), TensorProto.UINT8: (0, 255)}
_RESHAPES = ("Flatten", "Reshape", "Squeeze", "Unsqueeze")
_GRID_KEEPING = (*_RESHAPES, "MaxPool")  # ops whose outputs are values of their input


def keep_integer_path(model: onnx.ModelProto) -> dict[str, int]:
    """Apply every rewrite in place; return how many places each one changed."""
    return {
        "redundant_clips_dropped": drop_redundant_clips(model),
        "quantize_copied_before_reshape": quantize_before_reshapes(model),
        "quantize_copied_after_reshape": requantize_after_reshapes(model),
        "signed_activations_stored_as_uint8": shift_clipped_signed_activations(model),
    }


def _quantizer_constants(quantize: onnx.NodeProto, inits: dict) -> tuple[np.float32, int, int, int] | None:
    """Scalar scale, zero point and integer range of a QuantizeLinear with constant inputs."""
    if len(quantize.input) < 3 or quantize.input[1] not in inits or quantize.input[2] not in inits:
        return None
    scale, zero_point = (numpy_helper.to_array(inits[name]) for name in quantize.input[1:3])
    kind = inits[quantize.input[2]].data_type
    if scale.size != 1 or zero_point.size != 1 or kind not in _RANGES:
        return None
    return np.float32(scale.reshape(())), int(zero_point.reshape(())), *_RANGES[kind]


def _quantized(value: float, scale: np.float32, zero_point: int, low: int, high: int) -> int:
    # QuantizeLinear: saturate(round_half_to_even(x / s) + zp), computed in float32
    return int(np.clip(np.rint(np.float32(value) / scale) + zero_point, low, high))


def _narrowed_range(quantize: onnx.NodeProto, full: tuple[int, int], inits: dict, users: dict) -> tuple[int, int]:
    """The codes a QuantizeLinear can hand on: a sub-8-bit grid is its type's range narrowed by
    the integer Clip(s) Brevitas puts after it (``Q -> Clip(0, 15) -> DQ`` for 4 bits)."""
    after = users.get(quantize.output[0], [])
    clips = [n for n in after if n.op_type == "Clip" and len(n.input) == 3 and all(b in inits for b in n.input[1:])]
    if not after or len(clips) != len(after):
        return full
    bounds = {tuple(int(numpy_helper.to_array(inits[b])) for b in c.input[1:]) for c in clips}
    if len(bounds) != 1:
        return full
    (low, high), = bounds
    return max(low, full[0]), min(high, full[1])


def drop_redundant_clips(model: onnx.ModelProto) -> int:
    """Remove every Clip whose only consumer is a QuantizeLinear that already saturates inside it."""
    graph = model.graph
    inits, users = initializers(graph), consumers(graph)
    dropped = []
    for clip in graph.node:
        if clip.op_type != "Clip":
            continue
        following = users.get(clip.output[0], [])
        if len(following) != 1 or following[0].op_type != "QuantizeLinear" or following[0].input[0] != clip.output[0]:
            continue
        grid = _quantizer_constants(following[0], inits)
        bounds = list(clip.input[1:]) + [""] * (3 - len(clip.input))
        if grid is None or any(name and name not in inits for name in bounds):
            continue
        grid = (*grid[:2], *_narrowed_range(following[0], grid[2:], inits, users))
        low_ok = not bounds[0] or _quantized(numpy_helper.to_array(inits[bounds[0]]), *grid) == grid[2]
        high_ok = not bounds[1] or _quantized(numpy_helper.to_array(inits[bounds[1]]), *grid) == grid[3]
        if low_ok and high_ok:
            following[0].input[0] = clip.input[0]
            dropped.append(clip)
    for clip in dropped:
        graph.node.remove(clip)
    drop_unused_initializers(graph)
    return len(dropped)


def quantize_before_reshapes(model: onnx.ModelProto) -> int:
    """``x -> Flatten -> Q`` with ``x`` not dequantized becomes ``x -> Q -> DQ -> Flatten -> Q``.

    Only when the reshape's single consumer is a per-tensor QuantizeLinear (so the copy computes
    the same codes) and ``x`` is made by an op onnxruntime can fuse with a following
    QuantizeLinear (anything but a DequantizeLinear, which would make a useless pair).
    """
    graph = model.graph
    inits, users, made_by = initializers(graph), consumers(graph), producers(graph)
    inserted = 0
    for index, reshape in reversed(list(enumerate(graph.node))):
        if reshape.op_type not in _RESHAPES:
            continue
        following = users.get(reshape.output[0], [])
        if len(following) != 1 or following[0].op_type != "QuantizeLinear" \
                or _quantizer_constants(following[0], inits) is None:
            continue
        source = made_by.get(reshape.input[0])
        if source is None or source.op_type in ("DequantizeLinear", "QuantizeLinear"):
            continue
        quantize = following[0]
        name = f"{reshape.input[0]}_hdrq_requantized"
        copy_q = helper.make_node("QuantizeLinear", [reshape.input[0], *quantize.input[1:3]], [f"{name}_q"],
                                  name=f"{reshape.name}{COPIED_QUANTIZE_SUFFIX}")
        copy_dq = helper.make_node("DequantizeLinear", [f"{name}_q", *quantize.input[1:3]], [name],
                                   name=f"{reshape.name}_dequantize_before")
        reshape.input[0] = name
        graph.node.insert(index, copy_dq)
        graph.node.insert(index, copy_q)
        inserted += 1
    return inserted


def requantize_after_reshapes(model: onnx.ModelProto) -> int:
    """``Q -> DQ -> Flatten -> op`` becomes ``Q -> DQ -> Flatten -> Q -> DQ -> op`` (same grid);
    also with max pooling or other reshapes between the DequantizeLinear and the reshape.

    Only for a per-tensor DequantizeLinear with constant scale and zero point, and a reshape none
    of whose consumers is a QuantizeLinear (that is :func:`quantize_before_reshapes`' pattern).
    """
    graph = model.graph
    inits, users, made_by = initializers(graph), consumers(graph), producers(graph)
    outputs = {output.name for output in graph.output}
    inserted = 0
    for index, reshape in reversed(list(enumerate(graph.node))):
        if reshape.op_type not in _RESHAPES or reshape.output[0] in outputs:
            continue
        source = made_by.get(reshape.input[0])
        while source is not None and source.op_type in _GRID_KEEPING:  # e.g. DQ -> MaxPool -> Flatten
            source = made_by.get(source.input[0])
        following = users.get(reshape.output[0], [])
        if source is None or source.op_type != "DequantizeLinear" or not following \
                or any(user.op_type == "QuantizeLinear" for user in following) \
                or _quantizer_constants(source, inits) is None:
            continue
        name = f"{reshape.output[0]}_hdrq_requantized"
        copy_q = helper.make_node("QuantizeLinear", [reshape.output[0], *source.input[1:3]], [f"{name}_q"],
                                  name=f"{reshape.name}{COPIED_AFTER_SUFFIX}")
        copy_dq = helper.make_node("DequantizeLinear", [f"{name}_q", *source.input[1:3]], [name],
                                   name=f"{reshape.name}_dequantize_after")
        for user in following:
            for position, value in enumerate(user.input):
                if value == reshape.output[0]:
                    user.input[position] = name
        graph.node.insert(index + 1, copy_dq)
        graph.node.insert(index + 1, copy_q)
        inserted += 1
    return inserted
