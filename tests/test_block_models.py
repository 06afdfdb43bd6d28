"""Every common CNN block, end to end: convert -> HDRQ calibrate -> merge two fine-tuned copies ->
export (INT8 container and true INT4) -> onnxruntime, with 100 % top-1 agreement.

Top-1 agreement is computed here between onnxruntime (``cpu_session``) and the merged Brevitas
model on the same images, not read from ``validate``.
"""

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from hdrq_examples.block_models import BLOCK_MODELS, INPUT_SHAPE, NUM_CLASSES, block_model
from hdrq_plugin import HDRQConfig, convert_to_brevitas, hdrq_calibrate, merge_models
from hdrq_plugin.export import export_qdq
from hdrq_plugin.export.validation.ort_runtime import (
    FLOAT_COMPUTE_OPS,
    INTEGER_KERNELS,
    cpu_session,
    optimized_op_types,
)
from hdrq_plugin.ptq.units import find_reconstruction_units
from hdrq_plugin.run.checkpoint import quantizer_family

BITS = "w4a8"  # 4-bit inner weights: the INT8 container and true INT4 both apply
CONFIG = HDRQConfig.cpu_preset("hdrq", iterations=3, num_samples=8, batch_size=4)


def _images(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, *INPUT_SHAPE, generator=torch.Generator().manual_seed(seed))


def _fine_tuned(model: nn.Module, seed: int) -> nn.Module:
    """Two SGD steps on seeded random labels: a target-adapted copy that differs from the source."""
    tuned = copy.deepcopy(model).train()
    gen = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.SGD(tuned.parameters(), lr=0.05)
    for _ in range(2):
        x, y = torch.randn(16, *INPUT_SHAPE, generator=gen), torch.randint(0, NUM_CLASSES, (16,), generator=gen)
        optimiser.zero_grad()
        nn.functional.cross_entropy(tuned(x), y).backward()
        optimiser.step()
    return tuned.eval()


def _quantized(model: nn.Module, source: nn.Module, seed: int) -> nn.Module:
    qmodel = convert_to_brevitas(model, BITS, **quantizer_family("hdrq"))
    return hdrq_calibrate(qmodel, _images(CONFIG.num_samples, seed), source=source, config=CONFIG)


def _top1_agreement(path, model: nn.Module, images: torch.Tensor) -> float:
    got = cpu_session(path, threads=1).run(None, {"input": images.numpy()})[0]
    with torch.no_grad():
        expected = model(images).detach().numpy()
    return float((got.argmax(1) == expected.argmax(1)).mean())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (merged Brevitas model of two fine-tuned, HDRQ-calibrated copies, {weights: ONNX path})."""
    folder = tmp_path_factory.mktemp("block-models")
    built = {}
    for name in BLOCK_MODELS:
        source = block_model(name)
        targets = [_fine_tuned(source, seed) for seed in (1, 2)]
        for target in targets:
            assert any(not torch.equal(a, b) for a, b in zip(source.parameters(), target.parameters(), strict=True))
        merged = merge_models([_quantized(t, source, seed) for seed, t in zip((3, 4), targets, strict=True)]).eval()
        paths = {weights: export_qdq(merged, folder / f"{name}_{weights}.onnx", _images(2, seed=6), weights=weights)
                 for weights in ("int4-in-int8", "int4")}
        built[name] = (merged, paths)
    return built


@pytest.mark.parametrize("name", list(BLOCK_MODELS))
@pytest.mark.parametrize("weights", ["int4-in-int8", "int4"])
def test_every_block_exports_and_onnxruntime_agrees_on_every_top1(exported, name, weights):
    model, paths = exported[name]
    assert _top1_agreement(paths[weights], model, _images(32, seed=5)) == 1.0


@pytest.mark.parametrize("name", list(BLOCK_MODELS))
def test_in_the_int8_container_every_conv_and_linear_runs_on_integer_kernels(exported, name):
    ops = optimized_op_types(exported[name][1]["int4-in-int8"], threads=1)
    assert not {op: n for op, n in ops.items() if op in FLOAT_COMPUTE_OPS}
    layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in block_model(name).modules())
    assert sum(n for op, n in ops.items() if op in INTEGER_KERNELS) == layers


def test_top1_agreement_catches_a_broken_export(exported, tmp_path):
    model, paths = exported["inverted_residual"]
    images = _images(32, seed=5)
    broken = onnx.load(paths["int4-in-int8"])
    for tensor in broken.graph.initializer:  # negate every int8 weight: the logits change sign
        if tensor.data_type == onnx.TensorProto.INT8 and len(tensor.dims) >= 2:
            codes = numpy_helper.to_array(tensor).astype(np.int16)
            tensor.CopyFrom(numpy_helper.from_array(np.clip(-codes, -128, 127).astype(np.int8), tensor.name))
    onnx.save(broken, tmp_path / "broken.onnx")
    assert _top1_agreement(tmp_path / "broken.onnx", model, images) < 0.5


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
    hdrq_calibrate(qmodel, _images(8, 0), config=HDRQConfig.rtn(num_samples=8))
    path = export_qdq(qmodel, tmp_path / "m.onnx", _images(2, 1))
    assert "Dropout" not in {n.op_type for n in onnx.load(path).graph.node}
