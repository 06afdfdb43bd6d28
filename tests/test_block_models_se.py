"""The squeeze-and-excitation block models end to end (the other blocks: ``test_block_models.py``):
convert -> HDRQ calibrate -> merge two fine-tuned copies -> export (INT8 container and true INT4)
-> onnxruntime, with 100 % top-1 agreement."""

import pytest
from block_model_pipeline import SE_BLOCKS, images, integer_kernel_facts, merged_and_exported, top1_agreement


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("block-models-se")
    return {name: merged_and_exported(name, folder) for name in SE_BLOCKS}


@pytest.mark.parametrize("name", SE_BLOCKS)
@pytest.mark.parametrize("weights", ["int4-in-int8", "int4"])
def test_every_se_block_exports_and_onnxruntime_agrees_on_every_top1(exported, name, weights):
    model, paths = exported[name]
    assert top1_agreement(paths[weights], model, images(32, seed=5)) == 1.0


@pytest.mark.parametrize("name", SE_BLOCKS)
def test_in_the_int8_container_every_se_conv_and_linear_runs_on_integer_kernels(exported, name):
    floats, integer_kernels, layers = integer_kernel_facts(exported[name][1]["int4-in-int8"], name)
    assert not floats
    assert integer_kernels == layers
