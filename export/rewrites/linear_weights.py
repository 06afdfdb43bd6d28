"""``nn.Linear(bias=False)`` exported as ``DequantizeLinear -> Transpose -> MatMul`` -> ``Gemm``.

torch's exporter writes a Linear without bias as ``MatMul(x, Transpose(W))`` (with a bias it
writes ``Gemm(x, W, b, transB=1)``). With Brevitas' quantized weight the Transpose sits between
the weight's DequantizeLinear and the MatMul, so the weight reaches the MatMul as a float tensor:
onnxruntime cannot fuse it into an integer kernel, and the exporter's check that every weight
comes out of a DequantizeLinear refuses the file (issue 19). ``Gemm(x, W, transB=1)`` computes
the same product x W^T, and is what the same Linear with a bias exports to; onnx and
onnxruntime have no pass that does this for a 2-D input, hence hand-written.
"""

from __future__ import annotations

import onnx
from onnx import helper

from ..graph_facts import consumers, producers


def _rank(model: onnx.ModelProto, name: str) -> int | None:
    for info in (*model.graph.value_info, *model.graph.input, *model.graph.output):
        if info.name == name and info.type.tensor_type.HasField("shape"):
            return len(info.type.tensor_type.shape.dim)
    return None


def transposed_weights_to_gemm(model: onnx.ModelProto) -> list[str]:
    """Rewrite every ``MatMul(x, Transpose(DequantizeLinear(W)))`` with a 2-D ``x`` in place;
    return the names of the MatMul nodes rewritten."""
    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model)  # only to read x's rank
    made_by, users = producers(graph), consumers(graph)
    found = []
    for matmul in graph.node:
        if matmul.op_type != "MatMul":
            continue
        transpose = made_by.get(matmul.input[1])
        if transpose is None or transpose.op_type != "Transpose" or len(users.get(transpose.output[0], [])) != 1:
            continue
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
        source = made_by.get(transpose.input[0])
        if perm == [1, 0] and source is not None and source.op_type == "DequantizeLinear" \
                and _rank(inferred, matmul.input[0]) == 2:
            found.append((matmul, transpose))
    rewritten = []
    for matmul, transpose in found:
        rewritten.append(matmul.name)
        # in place, at the MatMul's position: the weight's DequantizeLinear already comes before it
        matmul.CopyFrom(helper.make_node("Gemm", [matmul.input[0], transpose.input[0]], list(matmul.output),
                                         name=f"{matmul.name}_as_gemm", transB=1))
        graph.node.remove(transpose)
    return rewritten
