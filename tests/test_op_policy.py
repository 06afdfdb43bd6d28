"""What cannot be converted is named; the exporter's integer-path rewrites change no value."""

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from hdrq_plugin import convert_to_brevitas
from hdrq_plugin.convert import UnsupportedLayerError
from hdrq_plugin.convert.op_policy import UnsupportedOpError
from hdrq_plugin.export.rewrites.integer_path import drop_redundant_clips, quantize_before_reshapes
from hdrq_plugin.export.rewrites.unsigned_grids import shift_clipped_signed_activations


class _FunctionalWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))

    def forward(self, x):
        return F.conv2d(x, self.weight)


class _Gelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return F.gelu(self.conv(x))


class _LeakyFunctional(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return F.leaky_relu(self.conv(x))


def test_a_weight_used_by_a_functional_call_is_named_with_what_to_do():
    with pytest.raises(UnsupportedLayerError, match=r"parameter 'weight'.*conv2d.*nn.Conv2d"):
        convert_to_brevitas(_FunctionalWeight(), "w8a8")


def test_an_unsupported_function_is_named():
    with pytest.raises(UnsupportedOpError, match=r"op \S*gelu \(graph node 'gelu'\)"):
        convert_to_brevitas(_Gelu(), "w8a8")


def test_an_unsupported_module_made_from_a_functional_call_is_named():
    with pytest.raises(UnsupportedLayerError, match=r"LeakyReLU.*functional call"):
        convert_to_brevitas(_LeakyFunctional(), "w8a8")


def test_an_unsupported_activation_module_is_named_with_the_supported_ones():
    with pytest.raises(UnsupportedLayerError, match=r"layer '1' of type GELU.*Hardswish.*SiLU"):
        convert_to_brevitas(nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU()), "w8a8")


# --- exporter rewrites: exact on every input ----------------------------------------------------

def _run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _clip_then_quantize(low: float, high: float, scale: float, zero_point: int, dtype):
    graph = helper.make_graph(
        [helper.make_node("Clip", ["x", "lo", "hi"], ["c"]),
         helper.make_node("QuantizeLinear", ["c", "s", "zp"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["out"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [256])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [256])],
        [numpy_helper.from_array(np.float32(low), "lo"), numpy_helper.from_array(np.float32(high), "hi"),
         numpy_helper.from_array(np.float32(scale), "s"), numpy_helper.from_array(np.array(zero_point, dtype), "zp")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@settings(max_examples=40, deadline=None)
@given(scale=st.floats(0.005, 0.1), high=st.floats(0.5, 8.0), seed=st.integers(0, 2**31 - 1))
def test_dropping_a_clip_before_a_quantizer_changes_no_value(scale, high, seed):
    # a ReLU6-like Clip(0, high) before an unsigned 8-bit grid: dropped iff the grid saturates inside it
    original = _clip_then_quantize(0.0, high, scale, 0, np.uint8)
    rewritten = copy.deepcopy(original)
    dropped = drop_redundant_clips(rewritten)
    x = np.random.default_rng(seed).uniform(-2 * high, 3 * high, size=256).astype(np.float32)
    x[:4] = [high, np.nextafter(np.float32(high), np.float32(9)), 0.0, -0.0]
    assert _run(rewritten, x).tobytes() == _run(original, x).tobytes()
    assert dropped == int(np.rint(np.float32(high) / np.float32(scale)) >= 255)


def test_a_clip_inside_the_grid_is_kept():
    model = _clip_then_quantize(0.0, 6.0, 0.05, 0, np.uint8)  # the grid reaches 12.75 > 6
    assert drop_redundant_clips(model) == 0
    assert [n.op_type for n in model.graph.node][0] == "Clip"


def test_a_dropped_clip_is_a_broken_model_when_the_grid_reaches_past_it():
    # the check above is not vacuous: removing this Clip by hand changes outputs
    model = _clip_then_quantize(0.0, 6.0, 0.05, 0, np.uint8)
    unclipped = copy.deepcopy(model)
    unclipped.graph.node[1].input[0] = "x"
    del unclipped.graph.node[0]
    x = np.linspace(-1, 10, 256, dtype=np.float32)
    assert _run(unclipped, x).tobytes() != _run(model, x).tobytes()


def test_a_quantizer_copied_before_flatten_changes_no_value():
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["p"]),
         helper.make_node("Flatten", ["p"], ["f"]),
         helper.make_node("QuantizeLinear", ["f", "s", "zp"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["out"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8, 3, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4, 8])],
        [numpy_helper.from_array(np.float32(0.07), "s"), numpy_helper.from_array(np.int8(3), "zp")])
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    rewritten = copy.deepcopy(original)
    assert quantize_before_reshapes(rewritten) == 1
    assert [n.op_type for n in rewritten.graph.node][:3] == ["GlobalAveragePool", "QuantizeLinear", "DequantizeLinear"]
    x = np.random.default_rng(0).normal(0, 5, size=(4, 8, 3, 3)).astype(np.float32)
    assert _run(rewritten, x).tobytes() == _run(original, x).tobytes()


def test_a_signed_activation_read_by_several_consumers_is_stored_as_uint8_without_changing_values():
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["a"]),
         helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["b"]),
         helper.make_node("Add", ["a", "b"], ["out"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [256])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [256])],
        [numpy_helper.from_array(np.float32(0.05), "s"), numpy_helper.from_array(np.int8(-2), "zp")])
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    shifted = copy.deepcopy(original)
    assert shift_clipped_signed_activations(shifted) == 1
    zero_point = next(t for t in shifted.graph.initializer if t.name == shifted.graph.node[0].input[2])
    assert zero_point.data_type == TensorProto.UINT8
    x = np.random.default_rng(1).normal(0, 8, size=256).astype(np.float32)
    assert _run(shifted, x).tobytes() == _run(original, x).tobytes()


def test_a_relu6_clip_before_a_four_bit_grid_is_judged_against_the_four_bit_range():
    # Clip(0, 6) -> Q(uint8, step 0.4) -> Clip(0, 15) -> DQ: the 4-bit grid tops out at 6, so the
    # first Clip is redundant although the uint8 type would reach 102
    graph = helper.make_graph(
        [helper.make_node("Clip", ["x", "lo", "hi"], ["c"]),
         helper.make_node("QuantizeLinear", ["c", "s", "zp"], ["q"]),
         helper.make_node("Clip", ["q", "qlo", "qhi"], ["qc"]),
         helper.make_node("DequantizeLinear", ["qc", "s", "zp"], ["out"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [256])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [256])],
        [numpy_helper.from_array(np.float32(0.0), "lo"), numpy_helper.from_array(np.float32(6.0), "hi"),
         numpy_helper.from_array(np.float32(0.4), "s"), numpy_helper.from_array(np.uint8(0), "zp"),
         numpy_helper.from_array(np.uint8(0), "qlo"), numpy_helper.from_array(np.uint8(15), "qhi")])
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    rewritten = copy.deepcopy(original)
    assert drop_redundant_clips(rewritten) == 1
    x = np.linspace(-3, 12, 256, dtype=np.float32)
    assert _run(rewritten, x).tobytes() == _run(original, x).tobytes()


def test_relu6_layers_at_w4a4_run_on_integer_kernels(tmp_path):
    from hdrq_examples.block_models import INPUT_SHAPE, block_model
    from hdrq_plugin.convert import calibrate_activations
    from hdrq_plugin.export import export_qdq
    from hdrq_plugin.export.validation.ort_runtime import FLOAT_COMPUTE_OPS, optimized_op_types

    images = torch.randn(8, *INPUT_SHAPE, generator=torch.Generator().manual_seed(0))
    qmodel = calibrate_activations(convert_to_brevitas(block_model("inverted_residual"), "w4a4"), [images])
    ops = optimized_op_types(export_qdq(qmodel, tmp_path / "m.onnx", images[:1]), threads=1)
    assert not {op: n for op, n in ops.items() if op in FLOAT_COMPUTE_OPS}
    assert ops["QLinearConv"] == 10


class _SlicedConcat(nn.Module):
    """Two ReLU branches concatenated, one cropped first (a U-Net joining an odd-sized skip)."""

    def __init__(self, crop: bool):
        super().__init__()
        self.crop = crop
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.relu_a, self.relu_b = nn.ReLU(), nn.ReLU()
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a = self.relu_a(self.a(x))
        if self.crop:
            a = a[..., : x.shape[-2], : x.shape[-1]]
        return self.head(torch.cat([a, self.relu_b(self.b(x))], dim=1))


@pytest.mark.parametrize("crop", [False, True])
def test_a_concat_of_sliced_relu_outputs_is_requantized_on_the_unsigned_grid(crop):
    # Brevitas alone takes a slice for a sign change and gives the concat a signed grid (one bit lost)
    model = convert_to_brevitas(_SlicedConcat(crop).eval(), "w4a4")
    assert model.get_submodule("cat_output_quant").act_quant.is_signed is False
