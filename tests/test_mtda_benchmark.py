"""The multi-target benchmark (benchmarks/mtda/): its aggregation, its grid, its resumable cache,
and one real micro run on the tiny recipe."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.mtda.estimate import CostModel
from benchmarks.mtda.plan import (
    BenchmarkSettings,
    Cell,
    Variant,
    build_plan,
    cell_key,
    cell_splits,
    iterations_of,
    merge_subsets,
)
from benchmarks.mtda.store import CellStore
from benchmarks.mtda.tables import (
    format_mean_std,
    mean_std,
    merged_by_seed,
    paired_difference,
    single_by_seed,
)

TARGETS = ("a", "b", "c")


def hm_row(quantizer: str, merge: str, seed: int, accuracy: float, rule: str = "noise-sampling") -> dict:
    return {"method": f"{quantizer}+{rule}", "bits": "w4a4", "stage": "merged", "target": "harmonic_mean",
            "accuracy": accuracy, "seed": seed, "merge": merge, "quantizer": quantizer, "rounding": rule,
            "split": "test"}


# --- aggregation ---------------------------------------------------------------------------------
def test_format_mean_std_reports_percent_with_sample_std():
    assert format_mean_std([0.70, 0.72, 0.74]) == "72.0 ± 2.0"


def test_a_single_seed_has_no_std():
    assert mean_std([0.5]) == (0.5, None)
    assert format_mean_std([0.5]) == "50.0"


@given(st.lists(st.floats(0.0, 1.0), min_size=2, max_size=8))
def test_mean_lies_between_the_extremes_and_std_matches_statistics(values):
    mean, std = mean_std(values)
    assert min(values) - 1e-12 <= mean <= max(values) + 1e-12
    assert math.isclose(std, statistics.stdev(values), abs_tol=1e-12)


def test_pairs_scope_averages_the_harmonic_means_of_the_two_target_merges():
    rows = [hm_row("hdrq", "a+b", 0, 0.6), hm_row("hdrq", "a+c", 0, 0.8), hm_row("hdrq", "a+b+c", 0, 0.1),
            hm_row("hdrq", "a+b", 1, 0.5), hm_row("hdrq", "a+c", 1, 0.7)]
    pairs = merged_by_seed(rows, bits="w4a4", scope="pairs", all_targets="a+b+c", quantizer="hdrq",
                           rounding="noise-sampling")
    assert pairs == pytest.approx({0: 0.7, 1: 0.6})


def test_all_scope_reads_only_the_all_targets_merge():
    rows = [hm_row("hdrq", "a+b", 0, 0.6), hm_row("hdrq", "a+b+c", 0, 0.4)]
    assert merged_by_seed(rows, bits="w4a4", scope="all", all_targets="a+b+c", quantizer="hdrq",
                          rounding="noise-sampling") == {0: 0.4}


def test_rows_of_another_tie_rule_are_not_mixed_in():
    rows = [hm_row("hdrq", "a+b", 0, 0.6), hm_row("hdrq", "a+b", 0, 0.2, rule="naive")]
    assert merged_by_seed(rows, bits="w4a4", scope="pairs", all_targets="a+b+c", quantizer="hdrq",
                          rounding="naive") == {0: 0.2}


def test_single_accuracy_is_the_mean_over_targets_per_seed():
    rows = [{"method": "qdrop", "bits": "w4a4", "stage": "single", "target": t, "accuracy": acc, "seed": 3,
             "split": "test"} for t, acc in (("a", 0.5), ("b", 0.7))]
    assert single_by_seed(rows, "qdrop", "w4a4") == pytest.approx({3: 0.6})


def test_val_rows_never_enter_the_test_numbers():
    rows = [hm_row("hdrq", "a+b", 0, 0.6), {**hm_row("hdrq", "a+b", 0, 0.9), "split": "val"}]
    where = {"bits": "w4a4", "scope": "pairs", "all_targets": "a+b+c", "quantizer": "hdrq", "rounding": "noise-sampling"}
    assert merged_by_seed(rows, **where) == {0: 0.6}
    assert merged_by_seed(rows, split="val", **where) == {0: 0.9}


def test_paired_difference_uses_only_seeds_both_sides_have():
    assert paired_difference({0: 0.7, 1: 0.6, 2: 0.9}, {0: 0.5, 2: 0.95}) == pytest.approx([0.2, -0.05])


# --- the grid and its cache keys -----------------------------------------------------------------
def test_merges_cover_every_pair_and_all_targets():
    assert merge_subsets(TARGETS) == [("a", "b"), ("a", "c"), ("b", "c"), ("a", "b", "c")]
    assert merge_subsets(("a", "b")) == [("a", "b")]


def test_every_main_method_is_merged_with_every_rule_at_every_bit_width():
    settings = BenchmarkSettings(seeds=(0,), ablation_bits=(), ort=False, merge_then_quantize=())
    _, cells = build_plan(settings, TARGETS)
    merges = {(c.variant, c.bits, c.rule, c.targets) for c in cells if c.kind == "merge"}
    assert len(merges) == len(settings.methods) * len(settings.bits) * len(settings.rules) * 4


def test_quick_settings_are_w4a4_with_one_seed():
    quick = BenchmarkSettings.quick()
    assert quick.bits == ("w4a4",) and quick.seeds == (0,)


def test_cache_key_changes_with_the_recipe_and_the_variant_config():
    settings = BenchmarkSettings(seeds=(0,))
    variants, _ = build_plan(settings, TARGETS)
    cell = Cell("quantize", 0, "w4a4", "hdrq", ("a",))
    key = cell_key(cell, settings, "recipe-1", variants)
    assert cell_key(cell, settings, "recipe-2", variants) != key
    assert cell_key(cell, dataclasses.replace(settings, iterations=7), "recipe-1", variants) != key
    assert cell_key(cell, settings, "recipe-1", variants) == key


def test_noise_settings_only_key_the_stochastic_merges():
    settings = BenchmarkSettings(seeds=(0,))
    fewer = dataclasses.replace(settings, noise_seeds=2)
    variants, _ = build_plan(settings, TARGETS)
    deterministic = Cell("merge", 0, "w4a4", "hdrq", ("a", "b"), "half-to-even")
    stochastic = dataclasses.replace(deterministic, rule="noise-sampling")
    assert cell_key(deterministic, settings, "r", variants) == cell_key(deterministic, fewer, "r", variants)
    assert cell_key(stochastic, settings, "r", variants) != cell_key(stochastic, fewer, "r", variants)


def test_ablation_variants_are_configs_of_the_engine():
    variants, _ = build_plan(BenchmarkSettings(seeds=(0,)), TARGETS)
    assert variants["hdrq-no-noise"].config(0, 10).weight_rounding == "ste"
    assert variants["hdrq-no-distance"].config(0, 10).distance_weight == 0.0
    assert variants["hdrq-lambda0.01"].config(0, 10).distance_weight == 0.01
    assert variants["qdrop-500it"].config(0, 10).iterations == 500


def test_ablations_and_the_variants_they_are_compared_with_are_also_evaluated_on_val():
    settings = BenchmarkSettings(seeds=(0,), ablation_bits=("w4a4",))
    variants, _ = build_plan(settings, TARGETS)
    merge = Cell("merge", 0, "w4a4", "hdrq", ("a", "b"), "noise-sampling")
    assert cell_splits(merge, variants, settings) == ("test", "val")
    assert cell_splits(dataclasses.replace(merge, variant="hdrq-no-noise"), variants, settings) == ("test", "val")
    assert cell_splits(dataclasses.replace(merge, variant="brecq"), variants, settings) == ("test",)
    assert cell_splits(dataclasses.replace(merge, bits="w8a8"), variants, settings) == ("test",)


def test_cost_model_scales_reconstruction_with_iterations():
    settings = BenchmarkSettings(seeds=(0,), iterations=100)
    variants = {"rtn": Variant("rtn", "rtn"), "hdrq": Variant("hdrq", "hdrq")}
    records = [{"cell": {"kind": "quantize", "variant": "rtn"}, "cpu_seconds": 10.0},
               {"cell": {"kind": "quantize", "variant": "hdrq"}, "cpu_seconds": 20.0}]
    model = CostModel(records, variants, settings, lambda v: iterations_of(v, settings), {"a": 100})
    assert model.calibration_cost(variants["hdrq"]) == pytest.approx(20.0)
    assert model.calibration_cost(Variant("hdrq-300", "hdrq", iterations=300)) == pytest.approx(40.0)


def test_cost_model_fits_on_the_iterations_a_cell_ran_not_the_planned_ones():
    planned = BenchmarkSettings(seeds=(0,), iterations=2000)
    variants = {"rtn": Variant("rtn", "rtn"), "hdrq": Variant("hdrq", "hdrq")}
    records = [{"cell": {"kind": "quantize", "variant": "rtn"}, "cpu_seconds": 10.0, "iterations": 0},
               {"cell": {"kind": "quantize", "variant": "hdrq"}, "cpu_seconds": 20.0, "iterations": 100}]
    model = CostModel(records, variants, planned, lambda v: iterations_of(v, planned), {"a": 100})
    assert model.calibration_cost(variants["hdrq"]) == pytest.approx(210.0)


def test_cost_model_scales_merges_with_test_images_and_noise_seeds():
    settings = BenchmarkSettings(seeds=(0,), noise_seeds=4)
    records = [{"cell": {"kind": "merge", "variant": "hdrq"}, "cpu_seconds": 2.0, "evaluated_images": 200}]
    model = CostModel(records, {}, settings, lambda v: 0, {"a": 300, "b": 500, "c": 200})
    assert model.cost(Cell("merge", 0, "w4a4", "hdrq", ("a", "b"), "noise-sampling")) == pytest.approx(32.0)
    assert model.cost(Cell("merge", 0, "w4a4", "hdrq", ("a", "b"), "half-to-even")) == pytest.approx(8.0)
    # three equally weighted models have no ties: one draw
    assert model.cost(Cell("merge", 0, "w4a4", "hdrq", ("a", "b", "c"), "noise-sampling")) == pytest.approx(10.0)


# --- the resumable cache -------------------------------------------------------------------------
def test_a_stored_cell_is_found_by_a_new_store_on_the_same_folder(tmp_path):
    cell = Cell("merge", 0, "w4a4", "hdrq", ("a", "b"), "half-to-even")
    CellStore(tmp_path).put(cell, "k" * 64, {"rows": [], "seconds": 1.0})
    reopened = CellStore(tmp_path)
    assert "k" * 64 in reopened
    assert reopened.get("k" * 64)["seconds"] == 1.0


def test_an_unreadable_record_is_ignored_with_a_warning(tmp_path):
    store = CellStore(tmp_path)
    cell = Cell("float", 0)
    store.put(cell, "f" * 64, {"rows": []})
    store.record_path(cell, "f" * 64).write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable benchmark record"):
        assert "f" * 64 not in CellStore(tmp_path)


# --- a real micro run ----------------------------------------------------------------------------
MICRO = BenchmarkSettings(recipe="tiny", targets=("mnist", "mnistm"), test_images=24, seeds=(0,), bits=("w4a4",),
                          methods=("rtn", "hdrq"), iterations=2, rules=("noise-sampling", "half-to-even"),
                          noise_seeds=2, trials=3, ablation_bits=(), merge_then_quantize=(), ort=False,
                          barrier_steps=3, barrier_pairs="first")


@pytest.mark.slow  # about a minute of CPU: zoo data, four quantized models, merges, a barrier, plots
def test_micro_run_writes_results_and_a_rerun_skips_every_finished_cell(tmp_path, tmp_path_factory, tiny_zoo_cache):
    from benchmarks.mtda.run import BenchmarkRun
    from benchmarks.mtda.summary import write_outputs

    zoo = str(tiny_zoo_cache(tmp_path_factory.mktemp("zoo")))  # the tiny zoo, built once per run (conftest)
    run = BenchmarkRun(MICRO, tmp_path, cache_dir=zoo)
    run.run()
    assert run.pending() == []
    write_outputs(run, command="test", wall_seconds=0.0)
    results = json.loads((tmp_path / "results.json").read_text())
    merged = {(r["quantizer"], r["rounding"]) for r in results["rows"]
              if r["stage"] == "merged" and r["target"] == "harmonic_mean"}
    assert merged == {(q, r) for q in ("rtn", "hdrq") for r in ("noise-sampling", "half-to-even")}
    assert results["recipe"]["benchmark_recipes"]["0"]["seed"] == 0
    assert (tmp_path / "BENCHMARKS.md").read_text().startswith("# Multi-target benchmark")

    # a killed run: one merge never finished; the rerun redoes only it, from the saved models
    merge = next(c for c in run.plan if c.kind == "merge" and c.variant == "hdrq" and c.rule == "half-to-even")
    before = run.store.get(run.key(merge))["rows"]
    run.store.forget(merge, run.key(merge))
    rerun = BenchmarkRun(MICRO, tmp_path, cache_dir=zoo)
    assert rerun.pending() == [merge]
    rerun.run()
    after = rerun.store.get(rerun.key(merge))["rows"]
    assert [r["accuracy"] for r in after] == [r["accuracy"] for r in before]

    changed = BenchmarkRun(dataclasses.replace(MICRO, iterations=3), tmp_path, cache_dir=zoo)
    assert {c.kind for c in changed.pending()} == {"quantize", "merge", "barrier"}


@pytest.mark.slow  # NIPQ training of two tiny targets (one noise epoch, one hard), two merges
def test_nipq_rows_train_on_the_train_split_merge_and_key_their_epochs(tmp_path, tmp_path_factory, tiny_zoo_cache):
    from benchmarks.mtda.run import BenchmarkRun

    settings = dataclasses.replace(MICRO, methods=("nipq",), nipq_epochs=1, barrier_pairs="first")
    zoo = str(tiny_zoo_cache(tmp_path_factory.mktemp("zoo")))
    run = BenchmarkRun(settings, tmp_path, cache_dir=zoo)
    run.run()
    assert run.pending() == [] and not run.failures
    rows = [r for c in run.plan for r in run.store.get(run.key(c)).get("rows", [])]
    single = {r["target"] for r in rows if r["stage"] == "single" and r["quantizer"] == "nipq"}
    merged = {(r["rounding"], r["target"]) for r in rows if r["stage"] == "merged" and r["quantizer"] == "nipq"}
    assert single == {"mnist", "mnistm"}
    assert {("noise-sampling", "mnist"), ("half-to-even", "mnistm")} <= merged
    quantize = next(c for c in run.plan if c.kind == "quantize")
    assert run.store.get(run.key(quantize))["family"] == "nipq"
    longer = BenchmarkRun(dataclasses.replace(settings, nipq_epochs=2), tmp_path, cache_dir=zoo)
    assert quantize in longer.pending()  # more epochs: another model, never the cached one
    with pytest.raises(ValueError, match="nipq_epochs"):
        dataclasses.replace(settings, nipq_epochs=0)
