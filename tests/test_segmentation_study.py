"""The segmentation study (benchmarks/segmentation): error barriers, merge rules and their diagnosis, tables."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset

from benchmarks.mtda.cells import dequantized_average_model, grid_statistics
from benchmarks.segmentation import export_figures, study, tables
from benchmarks.segmentation.study import BARRIER_STEPS, MERGE_RULES, _merged_rows, _pair_barrier
from benchmarks.segmentation.tables import GRID_STATISTICS
from hdrq_examples.segmentation_metrics import mean_iou
from hdrq_examples.segmentation_scenes import NUM_CLASSES
from hdrq_examples.segmentation_zoo import SegmentationRecipe, load_or_build_segmentation_zoo
from hdrq_plugin.convert.to_brevitas import fold_batchnorm
from hdrq_plugin.errors import InputError
from hdrq_plugin.merge.barrier import evaluate_loss_and_accuracy
from hdrq_plugin.merge.models import merge_models, read_weight_grid
from hdrq_plugin.quant.control import quantized_layers
from hdrq_plugin.quantize import quantize_model


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    recipe = SegmentationRecipe.tiny(width=8, scenes={"train": 16, "calib": 32, "val": 4, "test": 4})
    return load_or_build_segmentation_zoo(recipe, cache_dir=tmp_path_factory.mktemp("cache"))


def test_float_and_quantized_pair_barriers_run_on_the_merged_path(bench):
    targets = list(bench.recipe.target_domains)
    data = ConcatDataset([bench.domains[t].test for t in targets[:2]])
    folded = [fold_batchnorm(bench.adapted[t]) for t in targets[:2]]
    barrier = _pair_barrier(*folded, bench, targets)
    assert len(barrier["lambdas"]) == BARRIER_STEPS and not barrier["quantized"]
    for end, model in ((0, folded[0]), (-1, folded[1])):
        loss, accuracy = evaluate_loss_and_accuracy(model, data, F.cross_entropy)
        assert barrier["losses"][end] == pytest.approx(loss, rel=1e-4)
        assert barrier["accuracies"][end] == pytest.approx(accuracy)
    assert barrier["max_barrier"] >= 0 and all(0 <= a <= 1 for a in barrier["accuracies"])  # pixel accuracy
    quantized = [quantize_model(bench.adapted[t], bench.domains[t].calib, bits="w4a4", method="rtn").model
                 for t in targets[:2]]
    q_barrier = _pair_barrier(*quantized, bench, targets, rounding="half-to-even", seed=0)
    assert q_barrier["quantized"] and len(q_barrier["losses"]) == BARRIER_STEPS


@pytest.mark.parametrize("bad", [["--bits", "w9a9"], ["--bits", "four"], ["--iterations", "0"], ["--seeds", "-1"]])
def test_study_refuses_bad_arguments_in_one_line_before_loading_the_zoo(bad, tmp_path, capsys, monkeypatch):
    def no_zoo(*args, **kwargs):
        raise AssertionError("the zoo was loaded before the arguments were checked")

    monkeypatch.setattr(study, "load_or_build_segmentation_zoo", no_zoo)
    with pytest.raises(SystemExit) as exit_info:
        study.main(["--size", "tiny", *bad, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("bad", [["--repeats", "3"], ["--threads", "0"], ["--resolution", "0"], ["--models", "vgg"]])
def test_export_figures_refuse_bad_arguments_before_loading_a_zoo(bad, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export_figures, "load_or_build_segmentation_zoo", lambda *a, **k: pytest.fail("zoo loaded"))
    with pytest.raises(SystemExit) as exit_info:
        export_figures.main([*bad, "--out", str(tmp_path / "figures.json")])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def rtn_model(bench):
    target = bench.recipe.target_domains[0]
    return quantize_model(bench.adapted[target], bench.domains[target].calib, bits="w4a4", method="rtn").model


def _moved_by_one_step(model):
    """A copy of ``model`` whose smallest first-layer weight moved up one grid step (its code +1;
    the per-channel maximum, hence the scale, unchanged)."""
    moved = copy.deepcopy(model)
    name, layer = quantized_layers(moved)[0]
    grid = read_weight_grid(layer, name)
    index = grid.codes.abs().flatten().argmin()
    scale = grid.scale.expand_as(grid.codes).flatten()[index]
    with torch.no_grad():
        layer.weight.view(-1)[index] += scale.to(layer.weight.dtype)
    assert int(read_weight_grid(layer, name).codes.flatten()[index]) == int(grid.codes.flatten()[index]) + 1
    return moved


def test_grid_statistics_are_zero_for_equal_models_and_count_one_moved_code(rtn_model):
    assert grid_statistics([rtn_model, rtn_model]) == dict.fromkeys(GRID_STATISTICS, 0.0)
    total = sum(layer.weight.numel() for _, layer in quantized_layers(rtn_model))
    stats = grid_statistics([rtn_model, _moved_by_one_step(rtn_model)])
    # codes one apart: one disagreement of one step, a tie (odd code sum), merged half a step away
    assert stats["disagreement"] == pytest.approx(1 / total)
    assert stats["code_gap"] == pytest.approx(1 / total)
    assert stats["tie_fraction"] == pytest.approx(1 / total)
    assert stats["rounding_error"] == pytest.approx((0.25 / total) ** 0.5, rel=1e-4)


def test_every_merge_rule_of_a_model_with_itself_gives_that_model(bench, rtn_model):
    """The dequantized average runs with unquantized weights: of a model with itself that is the
    model's own quantized weights, so every rule's mIoU equals the model's own."""
    pair = tuple(bench.recipe.target_domains[:2])
    own = {t: mean_iou(rtn_model, bench.domains[t].test, NUM_CLASSES) for t in pair}
    for rule in MERGE_RULES:
        [row] = _merged_rows([rtn_model, rtn_model], bench, pair, rule, seed=0, stage="merged")
        assert row["rounding"] == rule and row["miou"] == pytest.approx(own), rule


def test_the_dequantized_average_keeps_a_half_step_that_every_integer_merge_rounds(rtn_model):
    moved = _moved_by_one_step(rtn_model)
    name, _ = quantized_layers(rtn_model)[0]
    ceiling = dict(dequantized_average_model([rtn_model, moved]).named_modules())[name]
    integer = dict(merge_models([rtn_model, moved], rounding="half-to-even").named_modules())[name]
    grid = read_weight_grid(integer, name)
    halfway = (ceiling.weight.detach() / grid.scale - grid.codes).abs()
    assert float(halfway.max()) == pytest.approx(0.5, abs=1e-4)  # the moved weight, between two codes
    assert int((halfway > 1e-3).sum()) == 1


def _cell(**merged):
    rows = [{"stage": "merged", "merge": study.ALL, "rounding": rule, "own_rule": rule == "half-to-even",
             "harmonic_mean": value} for rule, value in merged.items()]
    return {"rows": rows, "barrier": {}, "seconds": 0.0}


def test_paired_tables_read_each_rule_and_refuse_a_missing_one():
    cells = {"0/w3a3/rtn": _cell(**{"half-to-even": 0.20, "noise-sampling": 0.20, "dequantized-average": 0.25}),
             "0/w3a3/hdrq": _cell(**{"half-to-even": 0.18, "noise-sampling": 0.19, "dequantized-average": 0.26})}
    for row in cells["0/w3a3/hdrq"]["rows"]:
        row["own_rule"] = row["rounding"] == "noise-sampling"
    tables = study.paired_tables(cells)
    assert tables["own"][0]["mean_difference"] == pytest.approx(-0.01)  # HDRQ noise-sampling vs RTN half-to-even
    assert tables["half-to-even"][0]["mean_difference"] == pytest.approx(-0.02)
    assert tables["dequantized-average"][0]["mean_difference"] == pytest.approx(+0.01)
    del cells["0/w3a3/hdrq"]["rows"][0]
    with pytest.raises(KeyError, match="half-to-even"):
        study.paired_table(cells, "half-to-even")
    assert set(study.paired_tables(cells)) == {"own", "noise-sampling", "dequantized-average"}  # a rule not in every cell


def test_tables_unite_runs_and_refuse_conflicts_corrupt_files_and_overwriting_an_input(tmp_path, capsys):
    settings = {"size": "tiny", "iterations": 2}
    cell = _cell(**{"half-to-even": 0.2})
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"settings": {**settings, "zoo_timings_seed0": {}}, "cells": {"0/w4a4/rtn": cell}}))
    second.write_text(json.dumps({"settings": {**settings, "zoo_timings_seed1": {}}, "cells": {"1/w4a4/rtn": cell}}))
    united = tables.unite([json.loads(first.read_text()), json.loads(second.read_text())])
    assert set(united["cells"]) == {"0/w4a4/rtn", "1/w4a4/rtn"} and "zoo_timings_seed1" in united["settings"]
    with pytest.raises(InputError, match="settings"):
        tables.unite([json.loads(first.read_text()), {"settings": {**settings, "iterations": 3}, "cells": {}}])
    with pytest.raises(InputError, match="0/w4a4/rtn differs"):
        tables.unite([json.loads(first.read_text()), {"settings": settings, "cells": {"0/w4a4/rtn": _cell(
            **{"half-to-even": 0.3})}}])
    corrupt, odd_key = tmp_path / "corrupt.json", tmp_path / "odd-key.json"
    corrupt.write_text('{"settings": ')
    odd_key.write_text(json.dumps({"settings": settings, "cells": {"seed-zero": cell}}))
    unwritable = str(tmp_path / "a.json" / "united.json")  # below a file: no folder can be made there
    for argv in ([str(first), "--out", str(first)], [str(corrupt)], [str(odd_key)], [str(tmp_path / "missing.json")],
                 [str(first), "--out", unwritable]):
        before = first.read_text()
        with pytest.raises(SystemExit) as exit_info:
            tables.main(argv)
        assert exit_info.value.code == 2 and first.read_text() == before
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_paired_t_is_the_mean_over_its_standard_error():
    assert tables.paired_t([0.01, 0.02, 0.03]) == f"{0.02 / (0.01 / 3 ** 0.5):+.2f}"  # +3.46
    assert tables.paired_t([0.01]) == "—" and tables.paired_t([0.02, 0.02]) == "—"
