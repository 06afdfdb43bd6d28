"""The default INT8 file is fast and exact on every CPU (issue 22).

8-bit layers default to the saturation-free weight grid (codes -64..63), so ``export_qdq`` keeps
their weights as int8 (u8s8 kernels: VNNI, AVX2, ARM) and onnxruntime fuses every layer into an
integer kernel. The checks are shown to fail on the files they exist to catch: a full-range int8
weight (saturates without VNNI) and the uint8 storage of the old default (u8u8 kernels).
"""

import onnx
import pytest
import torch
from onnx import TensorProto
from tiny_models import tiny_resnet

from hdrq_plugin import convert_to_brevitas, merge_models
from hdrq_plugin.convert import calibrate_activations
from hdrq_plugin.convert.to_brevitas import compute_layers
from hdrq_plugin.export import export_qdq
from hdrq_plugin.export.graph_facts import saturating_int8_weights, stored_weights
from hdrq_plugin.export.validation.ort_runtime import FLOAT_COMPUTE_OPS, INTEGER_KERNELS, optimized_op_types

SHAPE = (3, 16, 16)


def _calibrated(spec: str, seed: int = 0, shift: float = 0.0):
    model = tiny_resnet(seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(shift)
    gen = torch.Generator().manual_seed(1)
    return calibrate_activations(convert_to_brevitas(model, spec), [torch.randn(8, *SHAPE, generator=gen) for _ in range(3)])


def fast_int8_problems(path) -> list[str]:
    """Why ``path`` is not a fast, saturation-free INT8 file ([] when it is): every weight stored
    as int8 within +-64, every weight layer on an onnxruntime integer kernel after optimization."""
    model = onnx.load(path)
    weights = stored_weights(model)
    problems = [f"{layer}: weights stored as {TensorProto.DataType.Name(t.data_type)}, not INT8"
                for layer, t in weights.items() if t.data_type != TensorProto.INT8]
    problems += [f"{layer}: int8 codes beyond +-64" for layer in saturating_int8_weights(model)]
    ops = optimized_op_types(path, threads=1)
    integer = sum(ops[op] for op in INTEGER_KERNELS)
    if integer < len(weights):
        problems.append(f"{integer} integer kernels for {len(weights)} weight layers")
    floats = {op: n for op, n in ops.items() if op in FLOAT_COMPUTE_OPS}
    if floats:
        problems.append(f"float weight layers after optimization: {floats}")
    return problems


def _export(qmodel, path, **kwargs):
    return export_qdq(qmodel, path, torch.randn(1, *SHAPE), **kwargs)


@pytest.mark.parametrize("spec,weights", [("w8a8", "int8"), ("w8a8-per-channel", "int8"),
                                          ("w4a4", "int4-in-int8")])
def test_the_default_file_stores_saturation_free_int8_weights_on_integer_kernels(spec, weights, tmp_path):
    path = _export(_calibrated(spec), tmp_path / "default.onnx", weights=weights)
    assert fast_int8_problems(path) == []


def test_the_check_fails_for_a_full_range_int8_weight(tmp_path):
    path = _export(_calibrated("w8a8-full-range"), tmp_path / "full.onnx", saturation_safe=False)
    problems = fast_int8_problems(path)
    assert problems and all("beyond +-64" in p for p in problems)


def test_the_check_fails_for_the_old_default_uint8_storage(tmp_path):
    # a full 8-bit grid (old checkpoints, w8a8-full-range) is still exported safely, as uint8
    path = _export(_calibrated("w8a8-full-range"), tmp_path / "uint8.onnx")
    problems = fast_int8_problems(path)
    assert problems and all("UINT8" in p for p in problems)


def test_a_merge_of_default_w8a8_models_keeps_the_saturation_free_grid(tmp_path):
    merged = merge_models([_calibrated("w8a8", shift=0.0), _calibrated("w8a8", shift=0.01)],
                          rounding="half-to-even")
    for name, layer in compute_layers(merged):
        grid = layer.quant_weight()
        assert int(grid.bit_width) == 7 and grid.int().abs().max() <= 64, name
    assert fast_int8_problems(_export(merged, tmp_path / "merged.onnx")) == []


def test_models_of_different_weight_ranges_do_not_merge():
    from hdrq_plugin.merge.models import MergeCompatibilityError

    with pytest.raises(MergeCompatibilityError, match="bit_width"):
        merge_models([_calibrated("w8a8"), _calibrated("w8a8-full-range")])


def _weight_graph(codes, low, high):
    import numpy as np
    from onnx import helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Clip", ["w", "lo", "hi"], ["c"]), helper.make_node("DequantizeLinear", ["c", "s", "zp"], ["out"])],
        "g", [], [helper.make_tensor_value_info("out", TensorProto.FLOAT, list(codes.shape))],
        [numpy_helper.from_array(codes.astype(np.int8), "w"), numpy_helper.from_array(np.int8(low), "lo"),
         numpy_helper.from_array(np.int8(high), "hi"), numpy_helper.from_array(np.float32(0.02), "s"),
         numpy_helper.from_array(np.int8(0), "zp")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _run_graph(model):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]


@pytest.mark.parametrize("low,high,codes_span,dropped", [
    (-64, 63, (-64, 63), True),     # the saturation-free 8-bit grid: a no-op Clip, dropped
    (-16, 15, (-16, 15), True),     # a 5-bit grid
    (-8, 7, (-8, 7), False),        # 4-bit: kept for the INT4 storage rewrite
    (-64, 63, (-70, 63), False),    # a code the Clip changes: not a no-op, kept
    (-128, 127, (-128, 127), False),  # full range: beyond +-64, left to the uint8 storage
])
def test_weight_clips_are_dropped_only_where_they_change_nothing(low, high, codes_span, dropped):
    import copy

    import numpy as np

    from hdrq_plugin.export.rewrites.unsigned_grids import drop_saturation_free_weight_clips

    codes = np.random.default_rng(0).integers(codes_span[0], codes_span[1] + 1, size=(6, 5))
    codes.flat[:2] = codes_span  # both ends present
    original = _weight_graph(codes, low, high)
    rewritten = copy.deepcopy(original)
    assert drop_saturation_free_weight_clips(rewritten) == (["w"] if dropped else [])
    onnx.checker.check_model(rewritten, full_check=True)
    assert ("Clip" in {n.op_type for n in rewritten.graph.node}) != dropped
    assert _run_graph(original).tobytes() == _run_graph(rewritten).tobytes()


def test_a_clip_bound_read_by_one_clip_is_not_taken_for_a_weight():
    """A full-grid Clip whose bounds no other Clip shares (its neighbours' Clips were dropped):
    the bound 127 is an int8 constant beyond +-64 read by one Clip, but only the weight it clips
    is stored as uint8, else the Clip mixes an int8 input with uint8 bounds (an invalid file)."""
    import copy

    import numpy as np

    from hdrq_plugin.export.rewrites.unsigned_grids import store_wide_weights_as_uint8

    codes = np.random.default_rng(1).integers(-20, 21, size=(6, 5))  # codes within +-64
    original = _weight_graph(codes, -127, 127)
    rewritten = copy.deepcopy(original)
    assert store_wide_weights_as_uint8(rewritten) == []
    onnx.checker.check_model(rewritten, full_check=True)
    assert _run_graph(original).tobytes() == _run_graph(rewritten).tobytes()
    codes.flat[0] = 100  # a weight beyond +-64: stored as uint8, bounds with it
    wide = _weight_graph(codes, -127, 127)
    assert store_wide_weights_as_uint8(wide) == ["w"]
    onnx.checker.check_model(wide, full_check=True)
    assert _run_graph(_weight_graph(codes, -127, 127)).tobytes() == _run_graph(wide).tobytes()


def test_nipq_edges_are_pinned_on_the_saturation_free_grid_and_export_as_fast_int8(tmp_path):
    from hdrq_plugin.nipq.quantizers import LearnedBitWidth

    model = convert_to_brevitas(tiny_resnet(seed=0), "nipq-w4a4").eval()
    for module in model.modules():
        if isinstance(module, LearnedBitWidth) and not module.pinned:
            module.freeze(4)
    x = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(x)
    layers = dict(compute_layers(model))
    for edge in ("conv1", "fc"):
        assert layers[edge].quant_weight().int().abs().max() <= 64, edge
    assert fast_int8_problems(export_qdq(model, tmp_path / "nipq.onnx", x[:1], weights="int4-in-int8")) == []
