"""Every common CNN block, end to end: convert -> HDRQ calibrate -> merge two fine-tuned copies ->
export (INT8 container and true INT4) -> onnxruntime, with 100 % top-1 agreement. The
squeeze-and-excitation models run in ``test_block_models_se.py`` (both files use
``block_model_pipeline``), so the two halves run on both cores under ``--dist loadfile``.

Top-1 agreement is computed here between onnxruntime (``cpu_session``) and the merged Brevitas
model on the same images, not read from ``validate``.
"""

import numpy as np
import onnx
import pytest
import torch
from block_model_pipeline import (
    BITS,
    SE_BLOCKS,
    end_to_end_checks,
    images,
    top1_agreement,
)
from onnx import numpy_helper
from torch import nn

from hdrq_examples.block_models import BLOCK_MODELS, block_model
from hdrq_plugin import HDRQConfig, convert_to_brevitas, hdrq_calibrate
from hdrq_plugin.export import export_qdq
from hdrq_plugin.ptq.units import find_reconstruction_units

NAMES = [name for name in BLOCK_MODELS if name not in SE_BLOCKS]


def test_the_two_block_model_files_cover_every_block_model():
    assert set(SE_BLOCKS) <= set(BLOCK_MODELS) and NAMES and set(NAMES) | set(SE_BLOCKS) == set(BLOCK_MODELS)


(exported, test_every_block_exports_and_onnxruntime_agrees_on_every_top1,
 test_in_the_int8_container_every_conv_and_linear_runs_on_integer_kernels) = end_to_end_checks(NAMES, "block-models")


def test_top1_agreement_catches_a_broken_export(exported, tmp_path):
    model, paths = exported["inverted_residual"]
    batch = images(32, seed=5)
    broken = onnx.load(paths["int4-in-int8"])
    for tensor in broken.graph.initializer:  # negate every int8 weight: the logits change sign
        if tensor.data_type == onnx.TensorProto.INT8 and len(tensor.dims) >= 2:
            codes = numpy_helper.to_array(tensor).astype(np.int16)
            tensor.CopyFrom(numpy_helper.from_array(np.clip(-codes, -128, 127).astype(np.int8), tensor.name))
    onnx.save(broken, tmp_path / "broken.onnx")
    assert top1_agreement(tmp_path / "broken.onnx", model, batch) < 0.5


@pytest.mark.parametrize("name, block, layers", [
    ("mobilenet_v3_se", "features.2", ("features.2.conv.0.0", "features.2.conv.1.0", "features.2.conv.2.fc1",
                                       "features.2.conv.2.fc2", "features.2.conv.3.0")),
    ("inception_concat", "block1", ("block1.branch1.0", "block1.branch3.0.0", "block1.branch3.1.0",
                                    "block1.branch5.0.0", "block1.branch5.1.0", "block1.branch5.2.0",
                                    "block1.branch_pool.0")),
    ("grouped_bottleneck", "layer2.0", ("layer2.0.reduce.0", "layer2.0.conv.0", "layer2.0.expand.0",
                                        "layer2.0.downsample.0")),
])
def test_blocks_with_se_branches_and_projections_are_single_reconstruction_units(name, block, layers):
    units = {u.name: u for u in find_reconstruction_units(convert_to_brevitas(block_model(name), BITS))}
    assert set(units[block].layers) == set(layers)


def test_relu6_keeps_its_clamp_at_six():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU6()).eval()
    with torch.no_grad():
        model[0].weight.fill_(10.0)  # pre-activations far above 6
    qmodel = convert_to_brevitas(model, "w8a8")
    x = torch.rand(2, 3, 4, 4) + 1.0
    hdrq_calibrate(qmodel, x, config=HDRQConfig.rtn(num_samples=2))
    with torch.no_grad():
        out = qmodel(x)
    assert float(out.max()) <= 6.0 + 1e-6 and float(out.max()) > 5.9


def test_dropout_is_removed_from_the_converted_model_and_the_export(tmp_path):
    model = block_model("depthwise_separable")
    qmodel = convert_to_brevitas(model, BITS)
    assert not any(isinstance(m, nn.Dropout) for m in qmodel.modules())
    hdrq_calibrate(qmodel, images(8, 0), config=HDRQConfig.rtn(num_samples=8))
    path = export_qdq(qmodel, tmp_path / "m.onnx", images(2, 1))
    assert "Dropout" not in {n.op_type for n in onnx.load(path).graph.node}
