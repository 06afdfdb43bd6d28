"""The segmentation study's error barrier between two targets' models (benchmarks/segmentation/study.py)."""

import pytest
import torch.nn.functional as F
from torch.utils.data import ConcatDataset

from benchmarks.segmentation import export_figures, study
from benchmarks.segmentation.study import BARRIER_STEPS, _pair_barrier
from hdrq_examples.segmentation_zoo import SegmentationRecipe, load_or_build_segmentation_zoo
from hdrq_plugin.convert.to_brevitas import fold_batchnorm
from hdrq_plugin.merge.barrier import evaluate_loss_and_accuracy
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
