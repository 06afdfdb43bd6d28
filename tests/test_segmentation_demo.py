"""``hdrq demo --task segmentation`` end to end, run once as `make demo` runs its small case (from
an empty cache): report, ONNX file, mask pictures. One run serves every test (a second, tiny-recipe
run cost 46 CPU seconds and checked the same report, file and pictures)."""

import json
import shlex
from pathlib import Path

import matplotlib.image
import pytest

from hdrq_examples.segmentation_scenes import BACKGROUND, TARGET_DOMAINS
from hdrq_examples.segmentation_zoo import SegmentationRecipe, load_or_build_segmentation_zoo
from hdrq_plugin.cli import main


def _makefile_small_case() -> list[str]:
    """The segmentation command of the Makefile's ``demo`` target, as ``hdrq`` arguments."""
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    recipe = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert "$(VENV)/bin/hdrq $(DEMO_SEGMENTATION_ARGS)" in recipe, recipe  # the demo target runs them
    args = makefile.split("\nDEMO_SEGMENTATION_ARGS = ", 1)[1].split("\n", 1)[0]
    assert "--task segmentation" in args, args
    return shlex.split(args.replace("$(BITS)", "w4a4"))


@pytest.fixture(scope="module")
def segmentation_run(tmp_path_factory):
    """The small case of `make demo`, run once from an empty cache (the zoo is built): about 75 s of
    CPU, 12 min of wall time under a load of 15-20. Every test below reads its outputs."""
    args = _makefile_small_case()
    out, cache = tmp_path_factory.mktemp("demo") / "segmentation", tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HDRQ_CACHE_DIR", str(cache))
        code = main([str(out) if a == "$(OUT)/segmentation" else a for a in args])
    return code, out, cache, args


@pytest.mark.slow
def test_segmentation_demo_reports_miou_at_every_stage(segmentation_run):
    code, out, _, _ = segmentation_run
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["metric"] == "mIoU"
    stages = {row["stage"] for row in report["rows"]}
    assert stages == {"float_source", "float_adapted", "float_merged", "single", "merged", "merged_ort"}
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in report["rows"])
    ort_rows = [row for row in report["rows"] if row["stage"] == "merged_ort"]
    assert {row["target"] for row in ort_rows} == {*TARGET_DOMAINS, "harmonic_mean"}
    assert all(row["validation_ok"] for row in ort_rows)
    assert all(row["pixel_agreement"] >= 0.999 for row in ort_rows if "pixel_agreement" in row)


@pytest.mark.slow
def test_segmentation_demo_draws_one_mask_picture_per_target(segmentation_run):
    _, out, _, _ = segmentation_run
    for target in TARGET_DOMAINS:
        picture = matplotlib.image.imread(out / f"masks-{target}.png")
        assert picture.ndim == 3 and picture.shape[0] > 100 and picture.shape[1] > 300  # 4 columns of panels
    assert (out / "merged-hdrq-int4-in-int8.onnx").is_file()


def test_segmentation_demo_refuses_classification_only_options(tmp_path):
    assert main(["demo", "--task", "segmentation", "--hot", "--out", str(tmp_path)]) == 2


def test_classification_demo_refuses_the_segmentation_small_size(tmp_path, capsys):
    assert main(["demo", "--size", "small", "--out", str(tmp_path)]) == 2
    assert "--task segmentation" in capsys.readouterr().err


@pytest.mark.slow
def test_make_demo_runs_the_small_segmentation_case_end_to_end(segmentation_run, monkeypatch):
    code, out, cache, args = segmentation_run
    assert args[args.index("--size") + 1] == "small" and args[args.index("--out") + 1] == "$(OUT)/segmentation"
    assert code == 0
    monkeypatch.setenv("HDRQ_CACHE_DIR", str(cache))
    report = json.loads((out / "report.json").read_text())
    assert not report["zoo_from_cache"]
    rows = report["rows"]
    assert {(r["method"], r["stage"]) for r in rows} >= {("rtn", "single"), ("hdrq", "single"),
                                                         ("hdrq+noise-sampling[int4-in-int8]", "merged_ort")}
    assert all(r["validation_ok"] for r in rows if r["stage"] == "merged_ort")
    bench = load_or_build_segmentation_zoo(SegmentationRecipe.small())  # from the cache just written
    for target in TARGET_DOMAINS:
        masks = bench.domains[target].test.tensors[1]
        chance = (masks == BACKGROUND).float().mean().item() / (1 + len(set(masks.unique().tolist()) - {BACKGROUND}))
        adapted = next(r["accuracy"] for r in rows if r["stage"] == "float_adapted" and r["target"] == target)
        assert adapted > chance, (target, adapted, chance)  # above painting everything background
        assert matplotlib.image.imread(out / f"masks-{target}.png").ndim == 3
