import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from brevitas import nn as qnn
from brevitas.graph.calibrate import calibration_mode
from brevitas.graph.quantize import (
    COMPUTE_LAYER_MAP,
    QUANT_ACT_MAP,
    QUANT_IDENTITY_MAP,
    preprocess_for_quantize,
    quantize,
)
from brevitas.quant import Int8WeightPerTensorFloat
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from tiny_models import tiny_resnet
from torch import nn

from hdrq_plugin import convert_to_brevitas
from hdrq_plugin.convert import calibrate_activations
from hdrq_plugin.export import (
    ExportError,
    NotAnHdrqExportError,
    ValidationError,
    convert_to_ort_format,
    export_qdq,
    rewrite_weights_to_int4,
    validate,
)
from hdrq_plugin.export.rewrites.unsigned_grids import shift_clipped_signed_activations
from hdrq_plugin.export.validation.ort_runtime import FLOAT_COMPUTE_OPS, optimized_op_types

SHAPE = (3, 16, 16)
FAST = {"batch_sizes": (1, 4), "repeats": 2}  # latency is measured, not judged, in these tests


def _batches(count: int, seed: int, batch: int = 8):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *SHAPE, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
            for _ in range(count)]


def _calibrated(spec: str):
    qmodel = convert_to_brevitas(tiny_resnet(seed=0), spec)
    return calibrate_activations(qmodel, _batches(4, seed=1))



@pytest.fixture(scope="module")
def w4a8():
    return _calibrated("w4a8")


@pytest.fixture(scope="module")
def w4a8_files(w4a8, tmp_path_factory):
    """The W4A8 model exported once per weight storage (tests below only read these files)."""
    folder = tmp_path_factory.mktemp("w4a8")
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(3))
    return {weights: export_qdq(w4a8, folder / f"{weights}.onnx", x, weights=weights,
                                metadata={"method": "hdrq", "merged_targets": ["mnist", "mnistm"]})
            for weights in ("int8", "int4", "int4-in-int8")}


@pytest.fixture(scope="module")
def w4a4_per_channel():
    return _calibrated("w4a4-per-channel")


@pytest.fixture
def example():
    return torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(3))


def _run(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _reference(model, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        out = model(x)
    return getattr(out, "value", out).numpy()


@pytest.mark.parametrize("weights", ["int8", "int4", "int4-in-int8"])
def test_every_weight_storage_passes_the_full_onnx_checker(w4a8_files, weights):
    onnx.checker.check_model(str(w4a8_files[weights]), full_check=True)


def test_onnxruntime_reproduces_a_model_with_quantized_output_exactly(tmp_path, example):
    # Brevitas' own quantize() keeps an output quantizer on the logits: every value is on a grid
    model = _brevitas_quantize_w4a4(tiny_resnet(seed=2))
    path = export_qdq(model, tmp_path / "m.onnx", example)
    x = torch.cat([x for x, _ in _batches(4, seed=5)])
    assert np.abs(_run(path, x) - _reference(model, x)).max() == 0.0


def test_float_logits_match_to_float32_rounding_at_four_bit_activations(w4a4_per_channel, example, tmp_path):
    path = export_qdq(w4a4_per_channel, tmp_path / "m.onnx", example)
    x = torch.cat([x for x, _ in _batches(4, seed=5)])
    reference = _reference(w4a4_per_channel, x)
    assert np.abs(_run(path, x) - reference).max() <= 1e-6 * np.abs(reference).max()


def test_the_int4_file_computes_what_the_int8_file_computes(w4a8_files):
    x = torch.cat([x for x, _ in _batches(2, seed=6)])
    np.testing.assert_allclose(_run(w4a8_files["int4"], x), _run(w4a8_files["int8"], x), atol=1e-6)


def test_int4_files_store_four_bit_weights_as_int4_and_are_smaller(w4a8_files):
    int8, int4 = w4a8_files["int8"], w4a8_files["int4"]
    model = onnx.load(int4)
    four_bit = [t for t in model.graph.initializer if t.data_type == TensorProto.INT4 and len(t.dims) == 4]
    assert len(four_bit) == 5  # every conv but the 8-bit stem
    assert model.opset_import[0].version == 21 and model.ir_version >= 10
    assert int4.stat().st_size < int8.stat().st_size


@pytest.mark.parametrize("weights", ["int8", "int4-in-int8"])
def test_the_optimized_graph_of_int8_storage_runs_integer_convolutions(w4a8_files, weights):
    op_types = optimized_op_types(w4a8_files[weights])
    assert op_types["QLinearConv"] == 6 and op_types["QGemm"] == 1
    assert not any(op in FLOAT_COMPUTE_OPS for op in op_types)


def test_four_bit_activations_run_on_integer_convolutions_and_adds(w4a4_per_channel, example, tmp_path):
    path = export_qdq(w4a4_per_channel, tmp_path / "m.onnx", example)
    op_types = optimized_op_types(path)
    assert op_types["QLinearConv"] == 6 and op_types["QLinearAdd"] == 2
    assert not any(op in FLOAT_COMPUTE_OPS for op in op_types)


def test_the_file_carries_bits_method_targets_hash_and_versions(w4a8_files):
    props = {p.key: p.value for p in onnx.load(w4a8_files["int4"]).metadata_props}
    assert props["hdrq.bits"] == "w4a8" and props["hdrq.granularity"] == "per-tensor"
    assert props["hdrq.weights"] == "int4" and props["hdrq.method"] == "hdrq"
    assert json.loads(props["hdrq.merged_targets"]) == ["mnist", "mnistm"]
    assert len(props["hdrq.source_model_sha256"]) == 64
    assert set(json.loads(props["hdrq.tool_versions"])) >= {"torch", "brevitas", "onnx", "onnxruntime"}


def test_metadata_cannot_override_what_is_read_from_the_model(w4a8, example, tmp_path):
    with pytest.raises(ValueError, match="bits"):
        export_qdq(w4a8, tmp_path / "m.onnx", example, metadata={"bits": "w8a8"})


@pytest.mark.parametrize("batch", [1, 5])
def test_the_batch_axis_is_dynamic(w4a8_files, batch):
    x = torch.randn(batch, *SHAPE)
    assert _run(w4a8_files["int4"], x).shape == (batch, 10)


def test_exporting_leaves_the_model_and_its_outputs_unchanged(example, tmp_path):
    model = _calibrated("w4a8")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = _reference(model, example)
    export_qdq(model, tmp_path / "m.onnx", example, weights="int4")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    np.testing.assert_array_equal(_reference(model, example), before)


def test_an_example_batch_of_one_still_exports_a_dynamic_batch_axis(w4a8, tmp_path):
    path = export_qdq(w4a8, tmp_path / "m.onnx", torch.randn(1, *SHAPE))
    x = torch.randn(5, *SHAPE)
    np.testing.assert_allclose(_run(path, x), _reference(w4a8, x), atol=1e-5)


def test_an_existing_file_is_left_untouched_without_overwrite(w4a8, example, tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        export_qdq(w4a8, path, example)
    assert path.read_bytes() == b"precious"


def test_overwrite_replaces_an_existing_file(w4a8, example, tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    export_qdq(w4a8, path, example, overwrite=True)
    onnx.checker.check_model(str(path), full_check=True)


class _FloatSideBranch(nn.Module):
    """A Brevitas model hiding a functional float convolution that only the exported graph shows."""

    def __init__(self):
        super().__init__()
        self.inp = qnn.QuantIdentity(return_quant_tensor=True)
        self.conv = qnn.QuantConv2d(3, 4, 3, padding=1, weight_bit_width=8)
        self.float_weight = nn.Parameter(torch.randn(4, 4, 1, 1))

    def forward(self, x):
        return F.conv2d(self.conv(self.inp(x)), self.float_weight)


def _calibrate(model: nn.Module) -> nn.Module:
    with torch.no_grad(), calibration_mode(model):
        for x, _ in _batches(2, seed=8):
            model(x)
    return model.eval()


def test_a_failure_after_the_graph_was_written_leaves_no_file(example, tmp_path):
    model = _calibrate(_FloatSideBranch())
    with pytest.raises(ExportError, match="float weights"):
        export_qdq(model, tmp_path / "m.onnx", example)
    assert list(tmp_path.iterdir()) == []


class _WithUnsupportedOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = qnn.QuantIdentity(return_quant_tensor=True)
        self.conv = qnn.QuantConv2d(3, 4, 3, padding=1, weight_bit_width=8)

    def forward(self, x):
        return torch.fft.rfft2(self.conv(self.inp(x))).abs()


def test_an_op_onnx_cannot_express_fails_cleanly_and_leaves_the_model_usable(example, tmp_path):
    model = _calibrate(_WithUnsupportedOp())
    before = _reference(model, example)
    with pytest.raises(ExportError, match="fft"):
        export_qdq(model, tmp_path / "m.onnx", example)
    assert list(tmp_path.iterdir()) == []
    np.testing.assert_array_equal(_reference(model, example), before)


def test_a_model_without_brevitas_layers_is_rejected(example, tmp_path):
    with pytest.raises(TypeError, match="not a Brevitas quantized model"):
        export_qdq(tiny_resnet(), tmp_path / "m.onnx", example)


def test_a_layer_left_in_float_is_named(example, tmp_path):
    model = nn.Sequential(qnn.QuantIdentity(return_quant_tensor=True),
                          qnn.QuantConv2d(3, 4, 3, weight_bit_width=8), nn.Conv2d(4, 4, 1))
    with pytest.raises(ExportError, match=r"un-quantized.*'2'"):
        export_qdq(_calibrate(model), tmp_path / "m.onnx", example)


def test_an_uncalibrated_model_is_rejected_naming_its_quantizers(example, tmp_path):
    model = convert_to_brevitas(tiny_resnet(), "w4a8")
    with pytest.raises(ValueError, match=r"not calibrated.*relu"):
        export_qdq(model, tmp_path / "m.onnx", example)


@pytest.mark.parametrize("shape", [(2, 4, 16, 16), (3, 16, 16)])
def test_an_example_input_of_the_wrong_shape_is_rejected_with_its_shape(w4a8, tmp_path, shape):
    with pytest.raises(ValueError, match=r"shape \(" + ", ".join(map(str, shape))):
        export_qdq(w4a8, tmp_path / "m.onnx", torch.randn(*shape))


def test_int4_storage_needs_four_bit_layers(example, tmp_path):
    with pytest.raises(ValueError, match="at most 4-bit"):
        export_qdq(_calibrated("w8a8"), tmp_path / "m.onnx", example, weights="int4")


def test_validate_passes_a_faithful_file(w4a8, w4a8_files):
    report = validate(w4a8_files["int8"], w4a8, {"a": _batches(2, seed=9), "b": _batches(1, seed=10)}, **FAST)
    assert report.ok, report.failures
    assert report.accuracy["a"]["onnxruntime"] == report.accuracy["a"]["pytorch"]
    assert set(report.latency_ms) == {1, 4} and report.file_bytes["float32"] > report.file_bytes["quantized"]


def test_validate_fails_a_file_whose_weight_scale_was_altered(w4a8, w4a8_files, tmp_path):
    path = tmp_path / "altered.onnx"
    model = onnx.load(w4a8_files["int8"])
    made_by = {out: node for node in model.graph.node for out in node.output}
    conv = [n for n in model.graph.node if n.op_type == "Conv"][2]
    scale = next(t for t in model.graph.initializer if t.name == made_by[conv.input[1]].input[1])
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(1.25), scale.name))
    onnx.save(model, path)
    with pytest.raises(ValidationError, match=r"activation codes of \S+ differ .* from any rounding tie"):
        validate(path, w4a8, _batches(2, seed=9), raise_on_failure=True, **FAST)


def test_validate_flags_a_file_exported_from_another_model_state(w4a8, w4a8_files):
    path = w4a8_files["int8"]
    other = copy.deepcopy(w4a8)
    with torch.no_grad():
        other.get_submodule("fc").bias.add_(1.0)
    report = validate(path, other, _batches(1, seed=9), **FAST)
    assert any("different model state" in failure for failure in report.failures)


def test_validate_rejects_an_onnx_file_not_written_by_this_package(w4a8, example, tmp_path):
    path = tmp_path / "foreign.onnx"
    torch.onnx.export(tiny_resnet(), (example,), str(path), dynamo=False)
    with pytest.raises(NotAnHdrqExportError, match="not written by hdrq_plugin.export"):
        validate(path, w4a8, _batches(1, seed=9), **FAST)


def test_ort_format_conversion_writes_a_loadable_file(w4a8_files, example, tmp_path):
    path = w4a8_files["int8"]
    ort_path = convert_to_ort_format(path, tmp_path / "m.ort")
    assert ort_path.suffix == ".ort"
    np.testing.assert_array_equal(_run(ort_path, example), _run(path, example))


def test_ort_format_refuses_an_int4_file_it_cannot_load_and_writes_nothing(w4a8_files, tmp_path):
    with pytest.raises(ExportError, match="INT4"):
        convert_to_ort_format(w4a8_files["int4"], tmp_path / "m.ort")
    assert list(tmp_path.iterdir()) == []


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
       seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 10.0))
def test_the_int4_rewrite_keeps_every_code_and_the_dequantized_values(shape, seed, scale):
    codes = np.random.default_rng(seed).integers(-8, 8, size=shape).astype(np.int8)
    graph = helper.make_graph(
        [helper.make_node("Clip", ["w", "lo", "hi"], ["clipped"]),
         helper.make_node("DequantizeLinear", ["clipped", "s", "zp"], ["out"])],
        "g", [], [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(codes, "w"), numpy_helper.from_array(np.int8(-8), "lo"),
         numpy_helper.from_array(np.int8(7), "hi"), numpy_helper.from_array(np.float32(scale), "s"),
         numpy_helper.from_array(np.int8(0), "zp")])
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    rewritten, names = rewrite_weights_to_int4(copy.deepcopy(original))
    onnx.checker.check_model(rewritten, full_check=True)
    weight = next(t for t in rewritten.graph.initializer if t.name == "w")
    assert names == ["w"] and weight.data_type == TensorProto.INT4
    np.testing.assert_array_equal(numpy_helper.to_array(weight).astype(np.int8), codes)
    assert _run_model(rewritten).tobytes() == _run_model(original).tobytes()


@settings(max_examples=25, deadline=None)
@given(zero_point=st.integers(-3, 3), low=st.integers(-128, 0), width=st.integers(0, 127),
       seed=st.integers(0, 2**31 - 1))
def test_storing_clipped_signed_activations_as_uint8_changes_no_value(zero_point, low, width, seed):
    x = np.random.default_rng(seed).normal(0.0, 40.0, size=(64,)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
         helper.make_node("Clip", ["q", "lo", "hi"], ["c"]),
         helper.make_node("DequantizeLinear", ["c", "s", "zp"], ["out"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [64])],
        [numpy_helper.from_array(np.float32(0.37), "s"), numpy_helper.from_array(np.int8(zero_point), "zp"),
         numpy_helper.from_array(np.int8(low), "lo"), numpy_helper.from_array(np.int8(low + width), "hi")])
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    shifted = copy.deepcopy(original)
    assert shift_clipped_signed_activations(shifted) == 1
    onnx.checker.check_model(shifted, full_check=True)
    assert _run_model(shifted, {"x": x}).tobytes() == _run_model(original, {"x": x}).tobytes()


def _run_model(model: onnx.ModelProto, feeds: dict | None = None) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds or {})[0]


def _brevitas_quantize_w4a4(model: nn.Module) -> nn.Module:
    """Brevitas' default quantize() flow (aligned residual scales, quantized logits) at W4A4."""
    weight = Int8WeightPerTensorFloat.let(bit_width=4)
    compute = {**COMPUTE_LAYER_MAP}
    for layer in (nn.Conv2d, nn.Linear):
        cls, kwargs = compute[layer]
        compute[layer] = (cls, {**kwargs, "weight_quant": weight})
    acts = {k: (cls, {**kw, "bit_width": 4}) for k, (cls, kw) in QUANT_ACT_MAP.items()}
    identities = {k: (cls, {**kw, "bit_width": 4}) for k, (cls, kw) in QUANT_IDENTITY_MAP.items()}
    qmodel = quantize(preprocess_for_quantize(model), compute_layer_map=compute,
                      quant_act_map=acts, quant_identity_map=identities)
    return _calibrate(qmodel)
