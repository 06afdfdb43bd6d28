"""``hdrq demo --task segmentation`` end to end on the tiny recipe: report, ONNX file, mask pictures."""

import json

import matplotlib.image
import pytest

from hdrq_examples.segmentation_scenes import TARGET_DOMAINS
from hdrq_plugin.cli import main


@pytest.fixture(scope="module")
def segmentation_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("segdemo")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HDRQ_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        code = main(["demo", "--task", "segmentation", "--size", "tiny", "--iterations", "2", "--out", str(out)])
    return code, out


def test_segmentation_demo_reports_miou_at_every_stage(segmentation_run):
    code, out = segmentation_run
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


def test_segmentation_demo_draws_one_mask_picture_per_target(segmentation_run):
    _, out = segmentation_run
    for target in TARGET_DOMAINS:
        picture = matplotlib.image.imread(out / f"masks-{target}.png")
        assert picture.ndim == 3 and picture.shape[0] > 100 and picture.shape[1] > 300  # 4 columns of panels
    assert (out / "merged-hdrq-int4-in-int8.onnx").is_file()


def test_segmentation_demo_refuses_classification_only_options(tmp_path):
    assert main(["demo", "--task", "segmentation", "--hot", "--out", str(tmp_path)]) == 2
