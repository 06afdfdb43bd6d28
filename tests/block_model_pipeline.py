"""The block models' end-to-end pipeline, shared by ``test_block_models.py`` and
``test_block_models_se.py``: convert -> HDRQ calibrate -> merge two fine-tuned copies -> export
(INT8 container and true INT4). The models are split over two files so that pytest-xdist's
``--dist loadfile`` runs the two halves on both cores."""

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from hdrq_examples.block_models import INPUT_SHAPE, NUM_CLASSES, block_model
from hdrq_plugin import HDRQConfig, convert_to_brevitas, hdrq_calibrate, merge_models
from hdrq_plugin.export import export_qdq
from hdrq_plugin.export.validation.ort_runtime import (
    FLOAT_COMPUTE_OPS,
    INTEGER_KERNELS,
    cpu_session,
    optimized_op_types,
)
from hdrq_plugin.run.checkpoint import quantizer_family

BITS = "w4a8"  # 4-bit inner weights: the INT8 container and true INT4 both apply
CONFIG = HDRQConfig.cpu_preset("hdrq", iterations=3, num_samples=8, batch_size=4)
#: the squeeze-and-excitation models, the costliest to calibrate and export: test_block_models_se.py
SE_BLOCKS = ("mobilenet_v3_se", "efficientnet_se")


def images(count: int, seed: int) -> torch.Tensor:
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
    return hdrq_calibrate(qmodel, images(CONFIG.num_samples, seed), source=source, config=CONFIG)


def merged_and_exported(name: str, folder: Path) -> tuple[nn.Module, dict[str, Path]]:
    """(merged Brevitas model of two fine-tuned, HDRQ-calibrated copies, {weights: ONNX path})."""
    source = block_model(name)
    targets = [_fine_tuned(source, seed) for seed in (1, 2)]
    for target in targets:
        assert any(not torch.equal(a, b) for a, b in zip(source.parameters(), target.parameters(), strict=True))
    merged = merge_models([_quantized(t, source, seed) for seed, t in zip((3, 4), targets, strict=True)]).eval()
    paths = {weights: export_qdq(merged, folder / f"{name}_{weights}.onnx", images(2, seed=6), weights=weights)
             for weights in ("int4-in-int8", "int4")}
    return merged, paths


def top1_agreement(path, model: nn.Module, images: torch.Tensor) -> float:
    """Top-1 agreement between onnxruntime (``cpu_session``) and the Brevitas model on the same images."""
    got = cpu_session(path, threads=1).run(None, {"input": images.numpy()})[0]
    with torch.no_grad():
        expected = model(images).detach().numpy()
    return float((got.argmax(1) == expected.argmax(1)).mean())


def integer_kernel_facts(path, name: str) -> tuple[dict[str, int], int, int]:
    """(float compute ops, integer-kernel count) of the optimized INT8 container, and the model's
    conv + linear layer count the kernels must equal."""
    ops = optimized_op_types(path, threads=1)
    floats = {op: n for op, n in ops.items() if op in FLOAT_COMPUTE_OPS}
    layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in block_model(name).modules())
    return floats, sum(n for op, n in ops.items() if op in INTEGER_KERNELS), layers


def end_to_end_checks(names, folder_name: str):
    """The module fixture ``exported`` and the two end-to-end checks over ``names``; each test file
    binds them at module level, so both halves run the same checks on their own models."""

    @pytest.fixture(scope="module", name="exported")
    def exported(tmp_path_factory):
        """name -> (merged Brevitas model of two fine-tuned, HDRQ-calibrated copies, {weights: ONNX path})."""
        folder = tmp_path_factory.mktemp(folder_name)
        return {name: merged_and_exported(name, folder) for name in names}

    @pytest.mark.parametrize("name", names)
    @pytest.mark.parametrize("weights", ["int4-in-int8", "int4"])
    def exports_and_onnxruntime_agrees_on_every_top1(exported, name, weights):
        model, paths = exported[name]
        assert top1_agreement(paths[weights], model, images(32, seed=5)) == 1.0

    @pytest.mark.parametrize("name", names)
    def every_conv_and_linear_runs_on_integer_kernels_in_the_int8_container(exported, name):
        floats, integer_kernels, layers = integer_kernel_facts(exported[name][1]["int4-in-int8"], name)
        assert not floats
        assert integer_kernels == layers

    return exported, exports_and_onnxruntime_agrees_on_every_top1, \
        every_conv_and_linear_runs_on_integer_kernels_in_the_int8_container
