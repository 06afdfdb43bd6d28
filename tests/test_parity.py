"""Parity on the integer grid: what validate accepts as onnxruntime computing the model, and what not.

The arithmetic (tie flips, the float32 bound of the last layer) is specified in
hdrq_plugin/export/parity.py; these tests pin it and show each check fails on a broken file.
"""

import copy

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from tiny_models import tiny_resnet

from hdrq_plugin import convert_to_brevitas
from hdrq_plugin.convert import calibrate_activations
from hdrq_plugin.export import export_qdq, validate
from hdrq_plugin.export.graph_facts import output_float_error_steps
from hdrq_plugin.export.rewrites.unsigned_grids import (
    SATURATION_FREE_WEIGHT_CODE,
    store_wide_weights_as_uint8,
)
from hdrq_plugin.export.validation.parity import (
    TIE_WINDOW_STEPS,
    DatasetParity,
    ParityTolerance,
    certified_logit_ties,
    first_diverging_layer,
    judge_first_divergence,
)

SHAPE = (3, 16, 16)
FAST = {"batch_sizes": (1,), "repeats": 1}


def _batches(count, seed, batch=8):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *SHAPE, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
            for _ in range(count)]


@pytest.fixture(scope="module")
def w4a4():
    return calibrate_activations(convert_to_brevitas(tiny_resnet(seed=0), "w4a4"), _batches(4, seed=1))


@pytest.fixture(scope="module")
def w4a4_file(w4a4, tmp_path_factory):
    path = tmp_path_factory.mktemp("parity") / "w4a4.onnx"
    return export_qdq(w4a4, path, torch.randn(1, *SHAPE), weights="int4-in-int8")


def _edited(path, tmp_path, edit):
    model = onnx.load(path)
    edit(model)
    out = tmp_path / "edited.onnx"
    onnx.save(model, out)
    return out


def _weight_initializer(model, op_type, index):
    made_by = {out: node for node in model.graph.node for out in node.output}
    node = [n for n in model.graph.node if n.op_type == op_type][index]
    dq = made_by[node.input[1]]
    source = made_by.get(dq.input[0])
    name = source.input[0] if source is not None and source.op_type == "Clip" else dq.input[0]
    return next(t for t in model.graph.initializer if t.name == name), dq


# --- the pure rules ---------------------------------------------------------------------------

def test_first_diverging_layer_is_the_earliest_layer_with_a_differing_code():
    ours = [np.zeros((3, 4), np.int16), np.zeros((3, 4), np.int16), np.zeros((3, 4), np.int16)]
    theirs = [a.copy() for a in ours]
    theirs[1][0, 2] = 1  # sample 0 diverges at layer 1 ...
    theirs[2][0, 0] = 5  # ... and stays diverged downstream
    theirs[2][2, 1] = -1  # sample 2 diverges at layer 2; sample 1 never
    assert first_diverging_layer(ours, theirs).tolist() == [1, -1, 2]


def test_a_one_step_flip_at_a_half_step_is_a_tie_flip():
    ours, theirs = np.array([3, 5]), np.array([4, 5])
    grid64 = np.array([3.5 + 1e-9, 5.1])
    verdict = judge_first_divergence(ours, theirs, grid64 - 2e-9, grid64, TIE_WINDOW_STEPS)
    assert (verdict.tie_flips, verdict.unexplained) == (1, 0)


def test_a_one_step_flip_far_from_a_half_step_is_unexplained():
    ours, theirs = np.array([3]), np.array([4])
    verdict = judge_first_divergence(ours, theirs, np.array([3.2]), np.array([3.2]), TIE_WINDOW_STEPS)
    assert (verdict.tie_flips, verdict.unexplained) == (0, 1)
    assert verdict.worst_tie_distance == pytest.approx(0.3)


def test_a_two_step_difference_is_never_a_tie_flip_even_at_a_half_step():
    verdict = judge_first_divergence(np.array([3]), np.array([5]), np.array([3.5]), np.array([3.5]), 0.4)
    assert verdict.unexplained == 1 and verdict.max_step_diff == 2


@settings(max_examples=50, deadline=None)
@given(value=st.floats(-100, 100), error=st.floats(0, 1e-3))
def test_the_tie_window_grows_with_the_reference_float32_error(value, error):
    """A flip is legitimate exactly when the exact value is within float32 error + window of the tie."""
    ours = np.array([np.floor(value)])
    theirs = ours + 1
    half = ours + 0.5
    grid64 = half + error
    legit = judge_first_divergence(ours, theirs, grid64 + error, grid64, TIE_WINDOW_STEPS)
    assert legit.unexplained == 0
    beyond = half + error + 2 * TIE_WINDOW_STEPS  # float32 agrees with float64 here: no error to excuse it
    too_far = judge_first_divergence(ours, theirs, beyond, beyond, TIE_WINDOW_STEPS)
    assert too_far.unexplained == 1


def _tally_with_one_changed_prediction(cause: str) -> DatasetParity:
    tally = DatasetParity()
    reference = np.array([[1.0, 0.0], [0.0, 1.0]])
    candidate = np.array([[1.0, 0.0], [1.0, 0.0]])  # sample 1's prediction changed
    agree = np.array([True, cause != "codes_agree"]) & np.array([True, cause == "codes_agree"])
    tally.add_outputs(reference, candidate, None, 1.0, agree)
    changed = np.array([False, True])
    tally.add_top1_causes(changed & (cause == "codes_agree"), changed & (cause == "tie"),
                          changed & (cause == "not_a_tie"))
    return tally


def test_a_prediction_changed_although_every_code_agrees_fails():
    failures = _tally_with_one_changed_prediction("codes_agree").failures("a", ParityTolerance(), None)
    assert any("changed although every activation code agrees" in f for f in failures)


def test_a_prediction_changed_by_certified_tie_flips_is_counted_not_failed():
    tally = _tally_with_one_changed_prediction("tie")
    assert tally.failures("a", ParityTolerance(), None) == []
    assert tally.tie_flip_samples == 1 and tally.top1_agreement == 0.5


def test_a_prediction_changed_by_a_difference_that_is_not_a_tie_fails():
    failures = _tally_with_one_changed_prediction("not_a_tie").failures("a", ParityTolerance(), None)
    assert any("changed by differences that are not rounding ties" in f for f in failures)


BOUND = 1e-3  # a last layer's float32 bound, in output steps


def _logit_tie_tally(reference, candidate, bound=BOUND):
    """Two samples whose activation codes all agree, tallied the way ParityRun does it."""
    tally, agree = DatasetParity(), np.ones(len(reference), dtype=bool)
    tally.add_outputs(reference, candidate, None, 1.0, agree)
    ties = certified_logit_ties(reference, candidate, 1.0, bound)
    changed = reference.argmax(1) != candidate.argmax(1)
    tally.add_top1_causes(changed & ~ties, np.zeros_like(agree), np.zeros_like(agree), ties)
    return tally, ties


@settings(max_examples=50, deadline=None)
@given(margin=st.floats(0.0, 1.99 * BOUND), logit=st.floats(-50, 50))
def test_a_prediction_changed_within_twice_the_float32_bound_is_a_logit_tie(margin, logit):
    """Codes agree, each logit moved by (just under) the bound: a reference margin < 2B may flip."""
    move = 0.999 * BOUND  # not the bound itself: float64 rounding of the test's own sums
    reference = np.array([[logit + margin, logit, logit - 3]])
    candidate = np.array([[logit + margin - move, logit + move, logit - 3]])
    tally, ties = _logit_tie_tally(reference, candidate)
    assert ties.tolist() == [candidate.argmax() != reference.argmax()]
    assert tally.failures("a", ParityTolerance(), BOUND) == []


@settings(max_examples=50, deadline=None)
@given(excess=st.floats(1e-6, 10.0), logit=st.floats(-50, 50))
def test_a_prediction_changed_beyond_twice_the_float32_bound_fails_although_codes_agree(excess, logit):
    margin = 2 * BOUND + excess
    reference = np.array([[logit + margin, logit]])
    candidate = np.array([[logit, logit + margin]])  # flipped by more than float32 can explain
    tally, ties = _logit_tie_tally(reference, candidate)
    assert not ties.any() and tally.logit_tie_samples == 0
    assert any("changed although every activation code agrees and the reference margin exceeds" in f
               for f in tally.failures("a", ParityTolerance(), BOUND))


def test_no_logit_tie_is_certified_without_a_float32_bound():
    reference, candidate = np.array([[1.0, 1.0]]), np.array([[1.0, 1.0 + 1e-7]])
    tally, ties = _logit_tie_tally(reference, candidate, bound=None)
    assert not ties.any()
    assert any("has no float32 error bound" in f for f in tally.failures("a", ParityTolerance(), None))


# --- validate on real files --------------------------------------------------------------------

def test_a_faithful_w4a4_file_has_identical_codes_and_full_top1_agreement(w4a4, w4a4_file):
    report = validate(w4a4_file, w4a4, {"a": _batches(2, seed=9)}, **FAST)
    assert report.ok, report.failures
    parity = report.parity["a"]
    assert parity.samples_with_code_divergence == 0 and parity.first_diverging_layer is None
    assert report.top1_agreement == {"a": 1.0}
    assert parity.max_diff_steps_where_codes_agree <= report.output_bound_steps


def test_a_weight_changed_by_one_step_fails_naming_the_first_diverging_layer(w4a4, w4a4_file, tmp_path):
    def bump(model):
        tensor, _ = _weight_initializer(model, "Conv", 2)
        codes = numpy_helper.to_array(tensor).copy()
        codes.flat[: codes.size // 2] += np.where(codes.flat[: codes.size // 2] < 7, 1, -1).astype(codes.dtype)
        tensor.CopyFrom(numpy_helper.from_array(codes, tensor.name))

    report = validate(_edited(w4a4_file, tmp_path, bump), w4a4, {"a": _batches(2, seed=9)}, **FAST)
    assert not report.ok
    assert report.parity["a"].first_diverging_layer is not None
    assert any("a: activation codes of" in failure and "from any rounding tie" in failure
               for failure in report.failures)


def test_a_doubled_activation_scale_fails(w4a4, w4a4_file, tmp_path):
    def double(model):
        quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"][3]
        scale = next(t for t in model.graph.initializer if t.name == quantize.input[1])
        scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(2), scale.name))

    report = validate(_edited(w4a4_file, tmp_path, double), w4a4, {"a": _batches(2, seed=9)}, **FAST)
    assert any("activation scale of" in failure for failure in report.failures)


def test_a_classifier_off_by_one_percent_fails_although_every_code_agrees(w4a4, w4a4_file, tmp_path):
    def scale_classifier(model):
        _, dq = _weight_initializer(model, "Gemm", 0)
        scale = next(t for t in model.graph.initializer if t.name == dq.input[1])
        scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(1.01), scale.name))

    report = validate(_edited(w4a4_file, tmp_path, scale_classifier), w4a4, {"a": _batches(2, seed=9)}, **FAST)
    assert report.parity["a"].samples_with_code_divergence == 0
    assert any("where every activation code agrees" in failure or "farther from the float64 model" in failure
               for failure in report.failures), report.failures


def test_the_output_bound_is_the_float32_error_of_the_last_layer(w4a4_file):
    bound = output_float_error_steps(onnx.load(w4a4_file))
    assert bound is not None and 0.0 < bound < 64.0  # K=16 inputs, 8-bit codes: a few steps at most


# --- the uint8 storage of wide weights (the no-VNNI saturation fix) -----------------------------------------

@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), largest=st.integers(1, 127))
def test_storing_wide_weights_as_uint8_changes_no_value_and_only_wide_ones(seed, largest):
    codes = np.random.default_rng(seed).integers(-largest, largest + 1, size=(4, 6)).astype(np.int8)
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["w", "s", "zp"], ["out"])], "g", [],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4, 6])],
        [numpy_helper.from_array(codes, "w"), numpy_helper.from_array(np.float32(0.02), "s"),
         numpy_helper.from_array(np.int8(0), "zp")])
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    shifted = copy.deepcopy(original)
    rewritten = store_wide_weights_as_uint8(shifted)
    onnx.checker.check_model(shifted, full_check=True)
    wide = np.abs(codes.astype(np.int16)).max() > SATURATION_FREE_WEIGHT_CODE
    assert rewritten == (["w"] if wide else [])
    import onnxruntime as ort

    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
           for m in (original, shifted)]
    assert run[0].tobytes() == run[1].tobytes()


# --- W8A8: the tie rule must not excuse a broken file -------------------------------------------

@pytest.fixture(scope="module")
def w8a8():
    return calibrate_activations(convert_to_brevitas(tiny_resnet(seed=0), "w8a8"), _batches(4, seed=1))


@pytest.fixture(scope="module")
def w8a8_file(w8a8, tmp_path_factory):
    return export_qdq(w8a8, tmp_path_factory.mktemp("parity8") / "w8a8.onnx", torch.randn(2, *SHAPE))


def test_a_faithful_w8a8_file_passes(w8a8, w8a8_file):
    report = validate(w8a8_file, w8a8, {"a": _batches(4, seed=9)}, **FAST)
    assert report.ok, report.failures


def test_one_w8a8_weight_moved_one_step_fails(w8a8, w8a8_file, tmp_path):
    def bump(model):
        tensor, _ = _weight_initializer(model, "Conv", 1)
        stored = numpy_helper.to_array(tensor)
        codes = stored.astype(np.int64)
        largest = int(np.abs(codes - int(np.median(codes))).argmax())  # a weight that matters
        codes.flat[largest] += 1 if codes.flat[largest] < np.iinfo(stored.dtype).max else -1
        tensor.CopyFrom(numpy_helper.from_array(codes.astype(stored.dtype), tensor.name))

    report = validate(_edited(w8a8_file, tmp_path, bump), w8a8, {"a": _batches(4, seed=9)}, **FAST)
    assert any("from any rounding tie" in failure for failure in report.failures), report.failures


def test_one_w8a8_weight_scale_changed_fails(w8a8, w8a8_file, tmp_path):
    def rescale(model):
        _, dq = _weight_initializer(model, "Conv", 1)
        scale = next(t for t in model.graph.initializer if t.name == dq.input[1])
        values = numpy_helper.to_array(scale).copy()
        values.flat[0] *= np.float32(1.01)
        scale.CopyFrom(numpy_helper.from_array(values, scale.name))

    report = validate(_edited(w8a8_file, tmp_path, rescale), w8a8, {"a": _batches(4, seed=9)}, **FAST)
    assert not report.ok and any("from any rounding tie" in f for f in report.failures), report.failures
