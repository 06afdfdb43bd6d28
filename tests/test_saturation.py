"""Regression test: exported files must compute the model on x86 CPUs without VNNI.

The demo's merged W4A4 file failed validation on a fresh machine while passing here: its 8-bit
classifier (and stem) ran onnxruntime's u8s8 kernels, which on CPUs without VNNI add pairs of
uint8 x int8 products in a saturating int16 (MLAS, vpmaddubsw). This machine has VNNI, so the
failing CPU is emulated with qemu's user mode (``qemu-x86_64 -cpu Haswell``: AVX2, no VNNI).
The test shows the file without the uint8 weight storage really breaks there (the check can
fail), and the exported file does not.
"""

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny_models import tiny_resnet

from hdrq_plugin import convert_to_brevitas
from hdrq_plugin.convert import calibrate_activations
from hdrq_plugin.export import export_qdq
from hdrq_plugin.export.graph_facts import output_float_error_steps, output_step

QEMU = shutil.which("qemu-x86_64")
pytestmark = pytest.mark.skipif(
    QEMU is None, reason="needs qemu-x86_64 (Debian package qemu-user; .ci/run installs it) to emulate a CPU without VNNI")

RUN_ORT = """
import sys, numpy as np, onnxruntime as ort
options = ort.SessionOptions(); options.log_severity_level = 3; options.intra_op_num_threads = 1
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
np.save(sys.argv[3], session.run(None, {session.get_inputs()[0].name: np.load(sys.argv[2])})[0])
"""


def _on_haswell(onnx_path, x: np.ndarray, folder) -> np.ndarray:
    script, inputs, outputs = folder / "run_ort.py", folder / "x.npy", folder / "y.npy"
    script.write_text(RUN_ORT)
    np.save(inputs, x)
    subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, str(script), str(onnx_path), str(inputs), str(outputs)],
                   check=True, capture_output=True, timeout=300)
    return np.load(outputs)


@pytest.fixture(scope="module")
def saturating_model():
    """A W4A4 model whose 8-bit classifier has large same-sign weights: wide int8 codes in a row."""
    model = tiny_resnet(seed=0)
    with torch.no_grad():
        model.fc.weight.copy_(torch.linspace(0.5, 1.0, model.fc.weight.numel()).reshape(model.fc.weight.shape))
    gen = torch.Generator().manual_seed(1)
    calib = [torch.rand(16, 3, 16, 16, generator=gen) * 4 for _ in range(2)]
    qmodel = calibrate_activations(convert_to_brevitas(model, "w4a4"), calib)
    x = torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 4
    with torch.no_grad():
        reference = qmodel(x).numpy()
    return qmodel, x, reference


def _export(qmodel, x, path, saturation_safe=True):
    return export_qdq(qmodel, path, x[:1], weights="int4-in-int8", saturation_safe=saturation_safe)


def test_without_uint8_weights_the_file_breaks_on_a_cpu_without_vnni(saturating_model, tmp_path):
    qmodel, x, reference = saturating_model
    path = _export(qmodel, x, tmp_path / "int8-weights.onnx", saturation_safe=False)
    import onnx

    step = output_step(onnx.load(path))
    off = np.abs(_on_haswell(path, x.numpy(), tmp_path) - reference).max() / step
    assert off > output_float_error_steps(onnx.load(path)), "the emulated CPU no longer saturates: test is void"


def test_the_exported_file_computes_the_model_on_a_cpu_without_vnni(saturating_model, tmp_path):
    qmodel, x, reference = saturating_model
    path = _export(qmodel, x, tmp_path / "exported.onnx")
    import onnx

    model = onnx.load(path)
    off = np.abs(_on_haswell(path, x.numpy(), tmp_path) - reference).max() / output_step(model)
    assert off <= output_float_error_steps(model)


def test_the_file_says_whether_it_is_saturation_safe(saturating_model, tmp_path):
    import onnx

    qmodel, x, _ = saturating_model
    for safe in (True, False):
        model = onnx.load(_export(qmodel, x, tmp_path / f"{safe}.onnx", saturation_safe=safe))
        props = {p.key: p.value for p in model.metadata_props}
        assert props["hdrq.saturation_safe"] == ("true" if safe else "false")


def test_a_7_bit_weight_grid_keeps_int8_weights_and_computes_the_model_without_vnni(tmp_path):
    """The fast safe file (issue 22): 8-bit layers on a 7-bit weight grid (codes -64..63,
    onnxruntime's reduce_range) need no uint8 storage, so they keep u8s8/VNNI kernels, and the
    emulated CPU without VNNI computes the model."""
    import onnx
    from onnx import TensorProto

    from hdrq_plugin import BitSpec

    model = tiny_resnet(seed=0)
    with torch.no_grad():  # the same wide same-sign classifier that saturates at 8 bits above
        model.fc.weight.copy_(torch.linspace(0.5, 1.0, model.fc.weight.numel()).reshape(model.fc.weight.shape))
    gen = torch.Generator().manual_seed(1)
    calib = [torch.rand(16, 3, 16, 16, generator=gen) * 4 for _ in range(2)]
    qmodel = calibrate_activations(convert_to_brevitas(model, BitSpec(4, 4, edge_weight_bits=7)), calib)
    x = torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 4
    with torch.no_grad():
        reference = qmodel(x).numpy()
    path = _export(qmodel, x, tmp_path / "seven-bit-edges.onnx")
    exported = onnx.load(path)
    weights = [t for t in exported.graph.initializer if t.dims and len(t.dims) >= 2]
    assert weights and all(t.data_type == TensorProto.INT8 for t in weights)
    off = np.abs(_on_haswell(path, x.numpy(), tmp_path) - reference).max() / output_step(exported)
    assert off <= output_float_error_steps(exported)
