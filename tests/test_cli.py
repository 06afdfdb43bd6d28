"""The ``hdrq`` command line end to end on a tiny model: files in, files out, clear failures."""

import json

import pytest
import torch
from tiny_models import tiny_resnet

from hdrq_plugin.cli import EXIT_BAD_INPUT, main
from hdrq_plugin.run.checkpoint import ModelRecipe, save_float_model

RECIPE = ModelRecipe("tiny_models:tiny_resnet", {"width": 8, "seed": 0})


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Two float target models, their calibration/test data, and a source model on disk."""
    folder = tmp_path_factory.mktemp("cli")
    gen = torch.Generator().manual_seed(0)
    for name, seed in (("source", 0), ("target_a", 1), ("target_b", 2)):
        recipe = ModelRecipe("tiny_models:tiny_resnet", {"width": 8, "seed": seed})
        save_float_model(folder / f"{name}.pt", recipe.build(), recipe)
    inputs = torch.randn(40, 3, 16, 16, generator=gen)
    torch.save({"inputs": inputs[:32]}, folder / "calib.pt")
    labels = tiny_resnet(seed=1)(inputs[32:]).argmax(1)
    torch.save({"inputs": inputs[32:], "labels": labels}, folder / "test.pt")
    return folder


def _quantize(ws, name, method="rtn", extra=()):
    out = ws / f"{name}-{method}.pt"
    code = main(["quantize", str(ws / f"{name}.pt"), "--calibration", str(ws / "calib.pt"),
                 "--source", str(ws / "source.pt"), "--method", method, "--bits", "w4a8",
                 "--out", str(out), *extra])
    assert code == 0
    return out


def test_quantize_merge_export_validate_round_trip(workspace, capsys):
    ws = workspace
    qa = _quantize(ws, "target_a", "hdrq", ("--iterations", "4"))
    qb = _quantize(ws, "target_b", "hdrq", ("--iterations", "4"))
    merged = ws / "merged.pt"
    assert main(["merge", str(qa), str(qb), "--out", str(merged), "--trials", "5"]) == 0
    onnx_path = ws / "merged.onnx"
    assert main(["export", str(merged), "--out", str(onnx_path), "--weights", "int4-in-int8",
                 "--input-shape", "1,3,16,16"]) == 0
    capsys.readouterr()
    report_path = ws / "validation.json"
    code = main(["validate", str(onnx_path), "--model", str(merged), "--data", str(ws / "test.pt"),
                 "--json", str(report_path)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(report_path.read_text())
    assert report["max_abs_diff"] <= 1e-5


def test_a_malformed_bit_spec_exits_with_a_clear_message(workspace, capsys):
    code = main(["quantize", str(workspace / "target_a.pt"), "--calibration", str(workspace / "calib.pt"),
                 "--bits", "w4", "--out", str(workspace / "x.pt")])
    assert code == EXIT_BAD_INPUT
    assert "malformed bit spec" in capsys.readouterr().err
    assert not (workspace / "x.pt").exists()


def test_a_corrupt_checkpoint_exits_with_a_clear_message(workspace, capsys):
    bad = workspace / "corrupt.pt"
    bad.write_bytes(b"\x00garbage")
    code = main(["merge", str(bad), str(bad), "--out", str(workspace / "m.pt")])
    assert code == EXIT_BAD_INPUT
    assert "corrupt" in capsys.readouterr().err
    assert not (workspace / "m.pt").exists()


def test_merging_checkpoints_of_different_bit_widths_is_refused(workspace, capsys):
    qa = _quantize(workspace, "target_a")
    out = workspace / "w8.pt"
    assert main(["quantize", str(workspace / "target_b.pt"), "--calibration", str(workspace / "calib.pt"),
                 "--method", "rtn", "--bits", "w8a8", "--out", str(out)]) == 0
    code = main(["merge", str(qa), str(out), "--out", str(workspace / "bad-merge.pt")])
    assert code == EXIT_BAD_INPUT
    assert "layer" in capsys.readouterr().err


def test_nan_calibration_data_is_refused(workspace, capsys):
    data = torch.randn(32, 3, 16, 16)
    data[3, 0, 0, 0] = float("nan")
    torch.save({"inputs": data}, workspace / "nan.pt")
    code = main(["quantize", str(workspace / "target_a.pt"), "--calibration", str(workspace / "nan.pt"),
                 "--method", "rtn", "--out", str(workspace / "nan-q.pt")])
    assert code == EXIT_BAD_INPUT
    assert "NaN" in capsys.readouterr().err


def test_an_unwritable_output_folder_is_refused(workspace, capsys):
    blocker = workspace / "a-file"
    blocker.write_text("x")
    code = main(["quantize", str(workspace / "target_a.pt"), "--calibration", str(workspace / "calib.pt"),
                 "--method", "rtn", "--out", str(blocker / "q.pt")])
    assert code == EXIT_BAD_INPUT
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("bits,vnni_only,stored,saturating", [
    ("w8a8", False, "INT8", False),             # the default: int8 codes within +-64
    ("w8a8", True, "INT8", False),              # --vnni-only changes nothing for it
    ("w8a8-full-range", False, "UINT8", False),  # the opt-in full grid: safe uint8 storage
    ("w8a8-full-range", True, "INT8", True),    # ... or int8 that saturates without VNNI
])
def test_bits_and_export_flags_pick_the_weight_grid_and_its_storage(workspace, bits, vnni_only, stored,
                                                                     saturating):
    import onnx
    from onnx import TensorProto

    from hdrq_plugin.export.graph_facts import saturating_int8_weights, stored_weights

    checkpoint = workspace / f"{bits}.pt"
    if not checkpoint.exists():
        assert main(["quantize", str(workspace / "target_a.pt"), "--calibration", str(workspace / "calib.pt"),
                     "--method", "rtn", "--bits", bits, "--out", str(checkpoint)]) == 0
    path = workspace / f"{bits}-{vnni_only}.onnx"
    assert main(["export", str(checkpoint), "--out", str(path), *(["--vnni-only"] if vnni_only else [])]) == 0
    model = onnx.load(path)
    assert {TensorProto.DataType.Name(t.data_type) for t in stored_weights(model).values()} == {stored}
    assert bool(saturating_int8_weights(model)) == saturating
