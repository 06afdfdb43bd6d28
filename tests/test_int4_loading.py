"""INT4 on disk, integer kernels at run time (issue 22): ``int4_session`` widens the 4-bit weights
to 8 bits in memory, and onnxruntime then runs the file on the INT8 container's integer kernels."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto
from tiny_models import tiny_resnet

from hdrq_plugin import convert_to_brevitas
from hdrq_plugin.convert import calibrate_activations
from hdrq_plugin.export import export_qdq
from hdrq_plugin.export.formats.int4_loading import int4_session, widen_int4_weights
from hdrq_plugin.export.validation.ort_runtime import FLOAT_COMPUTE_OPS, cpu_session, session_options


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("int4")
    gen = torch.Generator().manual_seed(1)
    calib = [torch.rand(16, 3, 16, 16, generator=gen) for _ in range(2)]
    qmodel = calibrate_activations(convert_to_brevitas(tiny_resnet(seed=0), "w4a4"), calib)
    x = torch.rand(8, 3, 16, 16, generator=gen)
    container = export_qdq(qmodel, folder / "container.onnx", x[:1], weights="int4-in-int8")
    int4 = export_qdq(qmodel, folder / "int4.onnx", x[:1], weights="int4")
    return container, int4, x.numpy(), folder


def _optimized_ops(session_factory, folder, name) -> Counter:
    session_factory(session_options(1, folder / name))
    return Counter(node.op_type for node in onnx.load(folder / name).graph.node)


def _float_compute(ops: Counter) -> int:
    return sum(ops[op] for op in FLOAT_COMPUTE_OPS)


def test_stock_onnxruntime_runs_the_int4_file_in_float(files):
    """Why the loader exists; also shows the float-compute count below can be non-zero."""
    _, int4, _, folder = files
    ops = _optimized_ops(lambda o: ort.InferenceSession(str(int4), o, providers=["CPUExecutionProvider"]),
                         folder, "plain.onnx")
    assert _float_compute(ops) > 0


def test_the_widened_int4_file_runs_on_the_containers_integer_kernels(files):
    container, int4, _, folder = files
    expected = _optimized_ops(lambda o: ort.InferenceSession(str(container), o, providers=["CPUExecutionProvider"]),
                              folder, "container-opt.onnx")
    widened = _optimized_ops(lambda o: int4_session(int4, o), folder, "widened-opt.onnx")
    assert widened == expected and _float_compute(widened) == 0


def test_the_widened_int4_file_computes_what_the_container_computes(files):
    container, int4, x, _ = files
    expected = cpu_session(container, 1).run(None, {"input": x})[0]
    got = int4_session(int4, session_options(1)).run(None, {"input": x})[0]
    np.testing.assert_array_equal(got, expected)


def test_the_file_on_disk_keeps_its_4_bit_weights(files):
    _, int4, _, _ = files
    before = int4.read_bytes()
    int4_session(int4, session_options(1))
    assert int4.read_bytes() == before
    assert any(t.data_type == TensorProto.INT4 for t in onnx.load(int4).graph.initializer)


def test_widening_touches_only_4_bit_qdq_weights(files):
    container, int4, _, _ = files
    assert widen_int4_weights(onnx.load(container)) == []
    model = onnx.load(int4)
    names = widen_int4_weights(model)
    assert names and not any(t.data_type in (TensorProto.INT4, TensorProto.UINT4) for t in model.graph.initializer)
