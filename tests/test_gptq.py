"""Brevitas GPTQ as an external reference: it must act (not silently no-op) and be refused when it cannot."""

import pytest
import torch
from brevitas.quant import Int8WeightPerTensorFloat
from tiny_models import tiny_resnet

from hdrq_plugin import convert_to_brevitas
from hdrq_plugin.convert import calibrate_activations
from hdrq_plugin.convert.to_brevitas import compute_layers
from hdrq_plugin.ptq.gptq import gptq_calibrate


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(32, 3, 16, 16, generator=gen), torch.randn(64, 3, 16, 16, generator=gen)


def test_gptq_updates_the_weights_and_lowers_the_output_error_of_rtn(data):
    calibration, held_out = data
    model = tiny_resnet(seed=0)
    rtn = calibrate_activations(convert_to_brevitas(model, "w4a4"), [calibration])
    gptq = gptq_calibrate(convert_to_brevitas(model, "w4a4"), calibration)
    assert any(not torch.equal(a.weight, b.weight)
               for (_, a), (_, b) in zip(compute_layers(rtn), compute_layers(gptq), strict=True))
    with torch.no_grad():
        reference = model(held_out)
        assert (gptq(held_out) - reference).pow(2).mean() < (rtn(held_out) - reference).pow(2).mean()


def test_gptq_refuses_weight_scales_recomputed_from_statistics(data):
    qmodel = convert_to_brevitas(tiny_resnet(seed=0), "w4a4", weight_quant=Int8WeightPerTensorFloat)
    with pytest.raises(TypeError, match="silent no-op"):
        gptq_calibrate(qmodel, data[0])


def test_gptq_rejects_a_too_small_calibration_set(data):
    with pytest.raises(ValueError, match="has 8 samples"):
        gptq_calibrate(convert_to_brevitas(tiny_resnet(seed=0), "w4a4"), data[0][:8])


def test_a_gptq_model_reloads_from_its_checkpoint_and_keeps_no_float_copy(data, tmp_path):
    from hdrq_plugin.run.checkpoint import ModelRecipe, load_quantized, save_quantized

    recipe = ModelRecipe("tiny_models:tiny_resnet", {"seed": 0})
    gptq = gptq_calibrate(convert_to_brevitas(recipe.build(), "w4a4"), data[0])
    assert not any(name.endswith("weight_orig") for name in gptq.state_dict())
    save_quantized(tmp_path / "gptq.pt", gptq, recipe=recipe, bits="w4a4", family="rtn")
    reloaded, _ = load_quantized(tmp_path / "gptq.pt")
    with torch.no_grad():
        assert torch.equal(reloaded(data[1]), gptq(data[1]))
