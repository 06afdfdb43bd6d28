"""The ``hdrq demo`` pipeline end to end on the tiny recipe: every stage reported, files written."""

import json

import pytest

from hdrq_plugin.cli import main
from hdrq_plugin.run.report import STAGES


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HDRQ_CACHE_DIR", str(cache))
        code = main(["demo", "--size", "tiny", "--iterations", "8", "--out", str(out)])
    return code, out


def test_demo_writes_a_tidy_report_with_every_stage(demo_run):
    code, out = demo_run
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    rows = report["rows"]
    assert rows and all({"method", "bits", "stage", "target", "accuracy"} <= row.keys() for row in rows)
    assert {row["stage"] for row in rows} == set(STAGES)
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in rows)
    assert report["recipe"]["iterations_per_unit"] == 8
    assert "zoo_s" in report["timings"] and "quantize_hdrq_s" in report["timings"]
    assert (out / "report.md").read_text().startswith("# hdrq-plugin report")


def test_demo_merges_every_pair_and_all_targets_with_both_rtn_rules(demo_run):
    _, out = demo_run
    rows = json.loads((out / "report.json").read_text())["rows"]
    merged = {(row["method"], row["merged_targets"]) for row in rows if row["stage"] == "merged"}
    subsets = {m for _, m in merged}
    assert subsets == {"mnist+optdigits", "mnist+mnistm", "optdigits+mnistm", "mnist+optdigits+mnistm"}
    for rule in ("rtn+naive", "rtn+half-to-even", "hdrq+noise-sampling", "hdrq+half-to-even"):
        assert (rule, "mnist+optdigits+mnistm") in merged
        assert (f"{rule} [mnist+optdigits]", "mnist+optdigits") in merged


def test_demo_reports_nipq_per_target_and_merged_at_the_average_bits(demo_run):
    _, out = demo_run
    rows = [r for r in json.loads((out / "report.json").read_text())["rows"] if r["method"].startswith("nipq")]
    single = {r["target"]: r for r in rows if r["stage"] == "single"}
    assert set(single) == {"mnist", "optdigits", "mnistm"}
    # averages over all tensors, the 8-bit edges included (the budget itself: tests/test_nipq.py)
    assert all(2.0 <= r["average_weight_bits"] <= 8.0 and 2.0 <= r["average_act_bits"] <= 8.0
               for r in single.values())
    merged = {r["target"] for r in rows if r["stage"] == "merged" and r["method"] == "nipq+noise-sampling"}
    assert {"mnist", "optdigits", "mnistm"} <= merged


def test_demo_exports_onnx_files_that_match_the_merged_model(demo_run):
    _, out = demo_run
    assert (out / "merged-hdrq-int4-in-int8.onnx").is_file() and (out / "merged-hdrq-int4.onnx").is_file()
    report = json.loads((out / "report.json").read_text())
    torch_rows = {r["target"]: r["accuracy"] for r in report["rows"]
                  if r["stage"] == "merged" and r["method"] == "hdrq+noise-sampling"}
    ort_rows = {r["target"]: r["accuracy"] for r in report["rows"]
                if r["stage"] == "merged_ort" and r["method"] == "hdrq+noise-sampling[int4-in-int8]"}
    assert ort_rows == pytest.approx(torch_rows, abs=0.01)
    assert all(v["ok"] for v in report["validation"].values())
    agreement = [r["top1_agreement"] for r in report["rows"] if r["stage"] == "merged_ort" and "top1_agreement" in r]
    assert agreement and min(agreement) >= 0.999


def test_demo_refuses_an_unwritable_output_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["demo", "--size", "tiny", "--out", str(blocker / "sub")]) == 2
    captured = capsys.readouterr()
    assert "wrote" not in captured.out and str(blocker) in captured.err
    assert blocker.read_text() == "not a folder"


def test_demo_refuses_negative_iterations_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["demo", "--size", "tiny", "--iterations", "-1", "--out", str(out)]) == 2
    assert "--iterations -1 is out of range" in capsys.readouterr().err
    assert not out.exists()


def _corrupt_one_weight(model):
    """A broken exporter: the first weight initializer's first code is off by one step."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    tensor = next(t for t in model.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) == 4)
    codes = numpy_helper.to_array(tensor).copy()
    codes.flat[: codes.size // 2] += np.int8(1)
    tensor.CopyFrom(numpy_helper.from_array(codes, tensor.name))
    return []


def test_a_refused_export_keeps_the_report_and_exits_3_with_one_line(tmp_path, monkeypatch, capsys):
    """A broken exporter is caught by export_qdq's own onnxruntime check: no file is written,
    every figure measured before it is kept and each refusal is recorded in the report."""
    from hdrq_plugin.export.formats import qdq

    out, cache = tmp_path / "out", tmp_path / "cache"
    monkeypatch.setenv("HDRQ_CACHE_DIR", str(cache))
    monkeypatch.setattr(qdq, "store_wide_weights_as_uint8", _corrupt_one_weight)
    code = main(["demo", "--size", "tiny", "--iterations", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 3
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "merged-hdrq-int4-in-int8.onnx" in err and "activation codes of" in err
    assert not (out / "merged-hdrq-int4-in-int8.onnx").exists()
    report = json.loads((out / "report.json").read_text())
    stages = {row["stage"] for row in report["rows"]}
    assert {"single", "merged"} <= stages  # everything measured before is kept
    refused = report["validation"]["int4-in-int8"]
    assert refused["ok"] is False and "activation codes of" in refused["refused"]
    # the true INT4 file goes through the same broken step: refused and recorded as well
    assert not report["validation"]["int4"]["ok"] and not (out / "merged-hdrq-int4.onnx").exists()
