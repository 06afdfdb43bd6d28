"""nn.Linear(bias=False) without a following BatchNorm exports with dequantized integer weights
(issue 19): torch writes it as MatMul(x, Transpose(W)), which the exporter turns into a Gemm."""

import onnx
import pytest
import torch
from torch import nn

from hdrq_plugin import convert_to_brevitas
from hdrq_plugin.convert import calibrate_activations
from hdrq_plugin.export import export_qdq, validate
from hdrq_plugin.export.graph_facts import float_weight_nodes
from hdrq_plugin.export.rewrites.linear_weights import transposed_weights_to_gemm
from hdrq_plugin.export.validation.ort_runtime import optimized_op_types


def _bias_free_head() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 16, bias=False), nn.ReLU(), nn.Linear(16, 10, bias=False)).eval()


@pytest.mark.parametrize(("bits", "weights"), [("w8a8", "int8"), ("w4a4", "int8"), ("w4a4-per-channel", "int4"),
                                               ("w4a8", "int4-in-int8")])
def test_bias_free_linears_export_with_integer_weights_and_validate(bits, weights, tmp_path):
    model = calibrate_activations(convert_to_brevitas(_bias_free_head(), bits), [torch.randn(32, 3, 12, 12)])
    path = export_qdq(model, tmp_path / "m.onnx", torch.randn(2, 3, 12, 12), weights=weights)
    graph = onnx.load(path)
    assert float_weight_nodes(graph) == [] and not any(n.op_type == "MatMul" for n in graph.graph.node)
    report = validate(path, model, [torch.randn(32, 3, 12, 12)], batch_sizes=(1,), repeats=1)
    assert report.ok, report.failures
    if weights != "int4":
        assert "MatMul" not in optimized_op_types(path) and "Gemm" not in optimized_op_types(path)


def test_a_matmul_whose_weight_is_not_dequantized_is_left_to_the_float_weight_check():
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 3])
    w = onnx.numpy_helper.from_array(torch.randn(3, 4).numpy(), "w")
    graph = onnx.helper.make_graph([onnx.helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
                                    onnx.helper.make_node("MatMul", ["x", "wt"], ["y"])], "g", [x], [y], [w])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    assert transposed_weights_to_gemm(model) == []
    assert float_weight_nodes(model) != []
