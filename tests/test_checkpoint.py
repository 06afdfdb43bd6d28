import pytest
import torch

from hdrq_plugin import convert_to_brevitas
from hdrq_plugin.convert import calibrate_activations
from hdrq_plugin.run.checkpoint import CheckpointError, ModelRecipe, load_quantized, save_quantized

RECIPE = ModelRecipe("tiny_models:tiny_resnet", {"width": 8, "seed": 0})


def _quantized():
    qmodel = convert_to_brevitas(RECIPE.build(), "w4a4")
    calibrate_activations(qmodel, [torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))])
    return qmodel


def test_a_saved_quantized_model_loads_with_identical_outputs(tmp_path):
    qmodel = _quantized()
    path = save_quantized(tmp_path / "m.pt", qmodel, recipe=RECIPE, bits="w4a4", metadata={"method": "rtn"})
    loaded, info = load_quantized(path)
    x = torch.randn(3, 3, 16, 16)
    assert torch.equal(loaded(x), qmodel(x))
    assert info["method"] == "rtn" and str(info["bits"]) == "w4a4"


def test_a_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_quantized(path)


def test_a_checkpoint_that_does_not_match_its_recipe_is_rejected(tmp_path):
    qmodel = _quantized()
    wrong = ModelRecipe("tiny_models:tiny_resnet", {"width": 4})
    path = save_quantized(tmp_path / "m.pt", qmodel, recipe=wrong, bits="w4a4")
    with pytest.raises(CheckpointError, match="does not match"):
        load_quantized(path)


def test_saving_into_an_unwritable_place_leaves_nothing_behind(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(OSError):
        save_quantized(target / "sub" / "m.pt", _quantized(), recipe=RECIPE, bits="w4a4")
    assert target.read_text() == "x"


def test_atomically_written_files_get_the_usual_permissions(tmp_path):
    import os

    from hdrq_plugin._io import write_text_atomic

    path = write_text_atomic(tmp_path / "report.json", "{}")
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def _edge_grid_bits(qmodel) -> int:
    from hdrq_plugin.convert.to_brevitas import compute_layers

    return int(compute_layers(qmodel)[0][1].quant_weight().bit_width)


def test_a_checkpoint_from_before_the_saturation_free_default_reloads_with_its_full_eight_bit_grid(tmp_path):
    old = convert_to_brevitas(RECIPE.build(), "w4a4-full-range")  # what "w4a4" built before issue 22
    calibrate_activations(old, [torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))])
    path = save_quantized(tmp_path / "old.pt", old, recipe=RECIPE, bits="w4a4-full-range")
    payload = torch.load(path, weights_only=True)
    del payload["weight_range"]
    payload["bits"] = "w4a4"  # exactly the payload older versions wrote
    torch.save(payload, path)
    loaded, info = load_quantized(path)
    x = torch.randn(3, 3, 16, 16)
    assert _edge_grid_bits(loaded) == 8 and info["bits"].weight_range == "full"
    assert torch.equal(loaded(x), old(x))


def test_a_new_checkpoint_keeps_the_saturation_free_grid(tmp_path):
    path = save_quantized(tmp_path / "m.pt", _quantized(), recipe=RECIPE, bits="w4a4")
    loaded, info = load_quantized(path)
    assert _edge_grid_bits(loaded) == 7 and str(info["bits"]) == "w4a4"


def test_a_checkpoint_whose_weight_range_contradicts_its_bits_is_rejected(tmp_path):
    path = save_quantized(tmp_path / "m.pt", _quantized(), recipe=RECIPE, bits="w4a4")
    payload = torch.load(path, weights_only=True)
    payload["weight_range"] = "full"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="weight_range"):
        load_quantized(path)
