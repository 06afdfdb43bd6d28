"""The ``hdrq demo`` pipeline end to end on the tiny recipe: every stage reported, files written."""

import json

import pytest

from hdrq_plugin.cli import main
from hdrq_plugin.run.report import STAGES

#: the tiny demo's settings; two NIPQ epochs (not the default ten) exercise every NIPQ row
DEMO_ARGS = ["demo", "--size", "tiny", "--iterations", "8", "--nipq-epochs", "2"]


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory, tiny_zoo_cache):
    """The demo's cache, holding only the tiny zoo (built once per run, tests/conftest.py)."""
    return tiny_zoo_cache(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, demo_cache):
    out = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HDRQ_CACHE_DIR", str(demo_cache))
        code = main([*DEMO_ARGS, "--out", str(out)])
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
    assert {"zoo_s", "quantize_s", "quantize_hdrq_task_s", "quantize_nipq_task_s"} <= report["timings"].keys()
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
    merged = {r["target"]: r for r in rows if r["stage"] == "merged" and r["method"] == "nipq+noise-sampling"}
    assert {"mnist", "optdigits", "mnistm"} <= merged.keys()
    # the widest-width merge, then the same merge landed back on the members' budget
    landed = {r["target"]: r for r in rows if r["stage"] == "merged" and r["method"] == "nipq+noise-sampling+landed"}
    assert {"mnist", "optdigits", "mnistm"} <= landed.keys()
    budget = max(r["average_weight_bits"] for r in single.values())
    assert landed["mnist"]["average_weight_bits"] <= min(merged["mnist"]["average_weight_bits"], budget) + 1e-9


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


def test_demo_refuses_zero_workers_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["demo", "--size", "tiny", "--workers", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--workers must be >= 1, got 0" in err and len(err.strip().splitlines()) == 1
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


def test_a_refused_export_keeps_the_report_and_exits_3_with_one_line(demo_run, demo_cache, tmp_path, monkeypatch,
                                                                     capsys):
    """A broken exporter is caught by export_qdq's own onnxruntime check: no file is written,
    every figure measured before it is kept and each refusal is recorded in the report. (The
    zoo and the quantized models come from the first run's cache: the same settings, so a rerun
    reuses every one of them, which this also checks.)"""
    from hdrq_plugin.export.formats import qdq

    out = tmp_path / "out"
    monkeypatch.setenv("HDRQ_CACHE_DIR", str(demo_cache))
    monkeypatch.setattr(qdq, "store_wide_weights_as_uint8", _corrupt_one_weight)
    code = main([*DEMO_ARGS, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 3
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "merged-hdrq-int4-in-int8.onnx" in err and "activation codes of" in err
    assert not (out / "merged-hdrq-int4-in-int8.onnx").exists()
    report = json.loads((out / "report.json").read_text())
    stages = {row["stage"] for row in report["rows"]}
    assert {"single", "merged"} <= stages  # everything measured before is kept
    assert report["zoo_from_cache"] and report["quantized_from_cache"] == 9
    first = json.loads((demo_run[1] / "report.json").read_text())["rows"]
    assert [r for r in report["rows"] if r["stage"] != "merged_ort"] == [r for r in first if r["stage"] != "merged_ort"]
    refused = report["validation"]["int4-in-int8"]
    assert refused["ok"] is False and "activation codes of" in refused["refused"]
    # the true INT4 file goes through the same broken step: refused and recorded as well
    assert not report["validation"]["int4"]["ok"] and not (out / "merged-hdrq-int4.onnx").exists()


def test_overlapping_the_merges_with_the_quantizations_changes_no_figure(demo_run, tmp_path, monkeypatch,
                                                                       tiny_zoo_cache):
    """``--workers 1`` computes everything in one process, one step after another; the default
    overlaps the merges, barrier and exports with NIPQ on the workers: the same rows and curves."""
    _, overlapped = demo_run
    # only the zoo is cached (as for demo_run): every quantization, merge and evaluation runs
    monkeypatch.setenv("HDRQ_CACHE_DIR", str(tiny_zoo_cache(tmp_path / "cache")))
    assert main([*DEMO_ARGS, "--workers", "1", "--out", str(tmp_path / "serial")]) == 0
    serial = json.loads((tmp_path / "serial" / "report.json").read_text())
    parallel = json.loads((overlapped / "report.json").read_text())
    assert serial["rows"] == parallel["rows"]  # same figures, same order
    assert serial["barrier"] == parallel["barrier"]
    assert serial["quantized_from_cache"] == parallel["quantized_from_cache"] == 0


def test_a_cached_rerun_reuses_every_figure_and_reports_the_same_rows(demo_run, demo_cache, tmp_path, monkeypatch):
    """The second run with the same cache quantizes, merges, evaluates and validates nothing again
    (its exported files are byte-identical, so their validations are reused) and reports the very
    same rows; the files it writes are its own."""
    from hdrq_examples import demo_results

    calls = []
    compute = demo_results.ResultCache.get_or_compute

    def spy(self, step, inputs, function):
        value, hit = compute(self, step, inputs, function)
        calls.append((step, hit))
        return value, hit

    monkeypatch.setenv("HDRQ_CACHE_DIR", str(demo_cache))
    monkeypatch.setattr(demo_results.ResultCache, "get_or_compute", spy)
    out = tmp_path / "rerun"
    assert main([*DEMO_ARGS, "--out", str(out)]) == 0
    assert calls and all(hit for _, hit in calls), calls
    assert {step for step, _ in calls} == {"float-references", "merges", "barrier", "nipq-merge",
                                           "validate-int4-in-int8", "validate-int4"}
    report = json.loads((out / "report.json").read_text())
    first = json.loads((demo_run[1] / "report.json").read_text())
    assert report["rows"] == first["rows"] and report["barrier"] == first["barrier"]
    assert report["quantized_from_cache"] == 9
    assert all(v["from_cache"] and v["onnx_path"].startswith(str(out)) for v in report["validation"].values())
    assert (out / "barrier.png").is_file() and (out / "merged-hdrq.pt").is_file()
