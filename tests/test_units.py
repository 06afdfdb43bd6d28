"""Reconstruction units: discovery on converted Brevitas models, exact chaining, shared parameters."""

import pytest
import torch
from tiny_models import tiny_resnet
from torch import nn

from hdrq_plugin import convert_to_brevitas
from hdrq_plugin.convert.to_brevitas import UnsupportedLayerError, calibrate_activations, compute_layers
from hdrq_plugin.ptq.units import find_reconstruction_units, run_model_through_units


@pytest.fixture(scope="module")
def qmodel():
    model = convert_to_brevitas(tiny_resnet(seed=0), "w4a4")
    gen = torch.Generator().manual_seed(0)
    calibrate_activations(model, [torch.randn(8, 3, 16, 16, generator=gen) for _ in range(2)])
    return model


@pytest.mark.parametrize("granularity", ["block", "layer"])
def test_units_cover_every_quantized_layer_exactly_once(qmodel, granularity):
    units = find_reconstruction_units(qmodel, granularity)
    covered = [name for unit in units for name in unit.layers]
    assert sorted(covered) == sorted(name for name, _ in compute_layers(qmodel))


@pytest.mark.parametrize("granularity", ["block", "layer"])
def test_running_the_units_in_sequence_reproduces_the_model_exactly(qmodel, granularity):
    units = find_reconstruction_units(qmodel, granularity)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(run_model_through_units(qmodel, units, x), qmodel(x))


def test_residual_blocks_are_units_and_the_stem_and_head_are_single_layers(qmodel):
    units = find_reconstruction_units(qmodel)
    assert [u.name for u in units] == ["conv1", "layer1.0", "layer2.0", "fc"]
    assert units[2].layers == ("layer2.0.conv1", "layer2.0.conv2", "layer2.0.shortcut.0")


def test_layer_granularity_makes_every_conv_and_linear_its_own_unit(qmodel):
    units = find_reconstruction_units(qmodel, "layer")
    assert all(len(u.layers) == 1 for u in units)
    assert len(units) == len(compute_layers(qmodel))


def test_a_unit_may_consume_several_values(qmodel):
    # at layer granularity the second conv of a block also receives the block's shortcut
    units = {u.name: u for u in find_reconstruction_units(qmodel, "layer")}
    assert len(units["layer1.0.conv2"].inputs) == 2


def test_the_inserted_input_quantizer_joins_the_unit_it_feeds(qmodel):
    stem = find_reconstruction_units(qmodel)[0]
    assert stem.inputs == ("x",)  # the raw model input, quantized inside the stem unit
    assert any(n.target == "x_quant" for n in stem.module.graph.nodes)


def test_units_share_the_model_parameters_instead_of_copying_them(qmodel):
    for unit in find_reconstruction_units(qmodel):
        for name in unit.layers:
            assert unit.module.get_submodule(name) is qmodel.get_submodule(name)


class _Upsampler(nn.Module):
    """A 3-D transposed conv: a layer the engine has no reconstruction rule for (ConvTranspose2d,
    the U-Net's up-convolution, is one it trains since issue 23)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.up = nn.ConvTranspose3d(4, 4, 2, stride=2)

    def forward(self, x):
        return self.up(torch.relu(self.conv(x)).unsqueeze(2))


def test_a_layer_the_engine_cannot_train_is_named_with_the_supported_ones():
    from brevitas.graph.quantize import preprocess_for_quantize, quantize

    qmodel = quantize(preprocess_for_quantize(_Upsampler().eval()))
    with pytest.raises(UnsupportedLayerError, match=r"'up'.*QuantConvTranspose3d.*QuantConv2d"):
        find_reconstruction_units(qmodel)


def test_a_model_that_is_not_an_fx_graph_is_rejected():
    with pytest.raises(TypeError, match="GraphModule"):
        find_reconstruction_units(nn.Sequential(nn.Conv2d(3, 3, 1)))


def test_an_unknown_granularity_is_rejected(qmodel):
    with pytest.raises(ValueError, match="granularity"):
        find_reconstruction_units(qmodel, "channel")
