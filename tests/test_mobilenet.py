"""The inverted-residual digits family: shapes, config round trip, the zoo trains and caches it,
and the NIPQ cost model sees its depthwise convs and residual adds."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hdrq_examples.classifiers import FAMILIES, build_classifier, builder_of
from hdrq_examples.mobilenet import DigitsMobileNet, MobileNetConfig, build_mobilenet
from hdrq_examples.models import CifarResNet
from hdrq_examples.zoo import BenchmarkRecipe, load_or_build_benchmark
from hdrq_plugin import convert_to_brevitas
from hdrq_plugin.architectures import get_architecture
from hdrq_plugin.nipq.cost import describe_costs

SMALL = MobileNetConfig(stem_width=8, widths=(8, 16), blocks_per_stage=2, expand=2, head_width=16)


def test_mobilenet_maps_32x32_images_to_ten_logits():
    assert build_mobilenet(SMALL).eval()(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_config_round_trips_through_a_dict_and_names_its_family():
    assert MobileNetConfig.from_dict(SMALL.to_dict()) == SMALL
    assert SMALL.to_dict()["family"] == "inverted-residual"
    with pytest.raises(ValueError, match="family"):
        MobileNetConfig(family="resnet")
    with pytest.raises(ValueError, match="widths"):
        MobileNetConfig(widths=(8, 0))
    with pytest.raises(ValueError, match="expand"):
        MobileNetConfig(expand=0)


def test_each_family_config_builds_its_model():
    assert isinstance(build_classifier(FAMILIES["inverted-residual"]), DigitsMobileNet)
    assert isinstance(build_classifier(FAMILIES["resnet"]), CifarResNet)
    with pytest.raises(TypeError, match="no classifier family"):
        build_classifier({"widths": (8,)})


def test_blocks_keep_the_residual_only_where_the_shape_is_kept():
    blocks = [m for m in build_mobilenet(SMALL).features if hasattr(m, "use_residual")]
    # stage 1: stride 1 8→8 (add) twice; stage 2: stride 2 8→16 (no add), then 16→16 (add)
    assert [b.use_residual for b in blocks] == [True, True, False, True]


def test_checkpoints_may_name_the_builder_and_rebuild_the_family():
    assert get_architecture("hdrq_examples.mobilenet:build_mobilenet") is build_mobilenet
    from hdrq_plugin.run.checkpoint import ModelRecipe

    recipe = ModelRecipe(builder_of(SMALL), {"config": SMALL.to_dict()})  # what the demo's float_recipe writes
    assert isinstance(recipe.build(), DigitsMobileNet) and recipe.build().config == SMALL


def test_nipq_prices_depthwise_convs_and_the_linear_bottlenecks():
    torch.manual_seed(0)
    qmodel = convert_to_brevitas(build_mobilenet(SMALL).eval(), "nipq-w4a4")
    report = describe_costs(qmodel, torch.rand(1, 3, 32, 32)).report()
    depthwise = [n for n in report.weight_bits if n.endswith("conv.1.0.weight")]
    assert len(depthwise) == 4
    # the linear bottlenecks' (signed) outputs and the adds' outputs are learned widths of their own
    assert sum(name.endswith("conv_2_0_output_quant.act_quant") for name in report.act_bits) == 4
    assert sum(name.startswith("add") for name in report.act_bits) == 3


def test_the_zoo_builds_caches_and_reloads_the_family(tmp_path):
    recipe = dataclasses.replace(BenchmarkRecipe.tiny(), architecture=SMALL)
    assert recipe.cache_key() != BenchmarkRecipe.tiny().cache_key()
    built = load_or_build_benchmark(recipe, cache_dir=tmp_path)
    assert isinstance(built.source_model, DigitsMobileNet) and not built.from_cache
    again = load_or_build_benchmark(recipe, cache_dir=tmp_path)
    assert again.from_cache
    for target in recipe.target_domains:
        a, b = built.adapted[target].state_dict(), again.adapted[target].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_a_mixed_precision_nipq_mobilenet_exports_and_runs_at_every_ort_level(tmp_path, weights):
    """Depthwise convs at 3 bits, a projection at 6, the rest at 4: the QDQ file runs in onnxruntime
    at every graph optimization level and gives Brevitas' logits up to float32 summation order."""
    import numpy as np
    import onnxruntime as ort

    from hdrq_plugin.export import export_qdq
    from hdrq_plugin.nipq.quantizers import LearnedBitWidth

    torch.manual_seed(0)
    qmodel = convert_to_brevitas(build_mobilenet(SMALL).eval(), "nipq-w4a4").eval()
    for name, module in qmodel.named_modules():
        if isinstance(module, LearnedBitWidth) and not module.pinned:
            module.freeze(3 if ".conv.1.0." in f".{name}" else 6 if name.startswith("features.3.conv.2") else 4)
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        qmodel(x)  # activation ranges
        ref = qmodel(x).numpy()
    path = export_qdq(qmodel, tmp_path / "m.onnx", x[:1], weights=weights)
    for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"):
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        out = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(
            None, {"input": x.numpy()})[0]
        # Int32Bias makes the integer path equal Brevitas up to float32 summation order
        assert np.abs(out - ref).max() < 1e-4 * max(1.0, np.abs(ref).max()), level
        assert (out.argmax(1) == ref.argmax(1)).all(), level
