"""One grid per activation (issue 19): a layer after a quantized activation reads its codes, so no
file holds back-to-back Q/DQ pairs with two scales, and every file computes the model under every
onnxruntime optimization level; export_qdq refuses a file that does not.

The pattern, not one model: seeded generated models with Linear -> act -> Linear stacks (MLP
heads after a conv trunk, plain MLPs) and Linear-based squeeze-and-excitation gates, at 8 and 4 bits.
"""

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from brevitas import nn as qnn
from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerTensorFloat, Int32Bias, Uint8ActPerTensorFloat
from torch import nn

from hdrq_plugin import convert_to_brevitas
from hdrq_plugin.convert import calibrate_activations
from hdrq_plugin.export import ExportError, export_qdq, validate
from hdrq_plugin.export.graph_facts import initializers
from hdrq_plugin.export.validation.ort_runtime import OPTIMIZATION_LEVELS

SHAPE = (3, 12, 12)


class MLPHead(nn.Module):
    """Conv trunk, pooled, then Linear -> ReLU -> ... -> Linear (a VGG-style classifier)."""

    def __init__(self, gen: torch.Generator):
        super().__init__()
        width = int(torch.randint(4, 12, (1,), generator=gen))
        hidden = [int(h) for h in torch.randint(8, 40, (int(torch.randint(1, 4, (1,), generator=gen)),), generator=gen)]
        self.trunk = nn.Sequential(nn.Conv2d(3, width, 3), nn.BatchNorm2d(width), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        layers, previous = [], width
        for size in hidden:
            layers += [nn.Linear(previous, size), nn.ReLU(), nn.Dropout(0.1)]
            previous = size
        self.head = nn.Sequential(*layers, nn.Linear(previous, 10))

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.trunk(x)), 1))


class FlatMLP(nn.Module):
    """Flatten -> Linear -> ReLU6 -> Linear -> ReLU -> Linear: the MLP on raw pixels."""

    def __init__(self, gen: torch.Generator):
        super().__init__()
        a, b = (int(v) for v in torch.randint(16, 48, (2,), generator=gen))
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(SHAPE)), a), nn.ReLU6(), nn.Linear(a, b),
                                 nn.ReLU(), nn.Linear(b, 10))

    def forward(self, x):
        return self.net(x)


class VGGStyle(nn.Module):
    """Conv -> ReLU -> MaxPool -> Flatten -> Linear -> ReLU -> Linear (VGG's classifier)."""

    def __init__(self, gen: torch.Generator):
        super().__init__()
        width, hidden = (int(v) for v in torch.randint(4, 24, (2,), generator=gen))
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4))
        self.classifier = nn.Sequential(nn.Linear(width * 9, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class LinearSE(nn.Module):
    """Conv, a squeeze-and-excitation gate made of Linear layers, then a Linear classifier."""

    def __init__(self, gen: torch.Generator):
        super().__init__()
        width = int(torch.randint(8, 16, (1,), generator=gen))
        self.conv = nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU())
        self.fc1, self.fc2 = nn.Linear(width, width // 2), nn.Linear(width // 2, width)
        self.relu, self.gate = nn.ReLU(), nn.Sigmoid()
        self.pool, self.classifier = nn.AdaptiveAvgPool2d(1), nn.Linear(width, 10)

    def forward(self, x):
        x = self.conv(x)
        s = self.gate(self.fc2(self.relu(self.fc1(torch.flatten(self.pool(x), 1)))))
        x = x * s.view(s.size(0), s.size(1), 1, 1)
        return self.classifier(torch.flatten(self.pool(x), 1))


FAMILIES = {"mlp_head": MLPHead, "flat_mlp": FlatMLP, "vgg_style": VGGStyle, "linear_se": LinearSE}
CASES = [(family, seed, bits) for family in FAMILIES for seed in (0, 1) for bits in ("w8a8", "w4a4")]


def _images(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, *SHAPE, generator=torch.Generator().manual_seed(seed))


def _model(family: str, seed: int, bits: str) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = FAMILIES[family](gen).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, folded at conversion
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5, generator=gen)
                module.running_var.uniform_(0.5, 2.0, generator=gen)
    return calibrate_activations(convert_to_brevitas(model, bits), list(_images(32, seed + 100).split(16)))


def _back_to_back_pairs_with_two_grids(path) -> list[str]:
    """DequantizeLinear -> QuantizeLinear on an activation whose two grids differ."""
    graph = onnx.load(path).graph
    inits, made_by = initializers(graph), {out: n for n in graph.node for out in n.output}
    found = []
    for node in graph.node:
        parent = made_by.get(node.input[0])
        if node.op_type == "QuantizeLinear" and parent is not None and parent.op_type == "DequantizeLinear":
            if onnx.numpy_helper.to_array(inits[node.input[1]]) != onnx.numpy_helper.to_array(inits[parent.input[1]]):
                found.append(node.name)
    return found


@pytest.mark.parametrize(("family", "seed", "bits"), CASES)
def test_linear_act_linear_files_compute_the_model_under_every_optimization_level(family, seed, bits, tmp_path):
    model = _model(family, seed, bits)
    path = export_qdq(model, tmp_path / "m.onnx", _images(4, seed + 200))
    assert _back_to_back_pairs_with_two_grids(path) == []
    x = _images(64, seed + 300)
    with torch.no_grad():
        reference = model(x).numpy()
    for level in OPTIMIZATION_LEVELS:
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        got = session.run(None, {"input": x.numpy()})[0]
        assert (got.argmax(1) == reference.argmax(1)).all(), (level, np.abs(got - reference).max())
    report = validate(path, model, [(x, torch.zeros(64, dtype=torch.long))], batch_sizes=(1,), repeats=1)
    assert report.ok, report.failures


def test_a_linear_after_a_quantized_activation_has_no_input_quantizer_of_its_own():
    model = _model("mlp_head", 0, "w8a8")
    linears = [m for m in model.modules() if isinstance(m, qnn.QuantLinear)]
    first, *after_relu = linears  # the first reads the pooled (off-grid) trunk, the others a ReLU
    assert first.input_quant.is_quant_enabled
    assert after_relu and not any(layer.input_quant.is_quant_enabled for layer in after_relu)


def _double_grid_brevitas_model() -> nn.Module:
    """Hand-written Brevitas: a QuantLinear re-quantizing a QuantReLU's codes on a second grid."""
    torch.manual_seed(0)
    model = nn.Sequential(
        qnn.QuantIdentity(act_quant=Int8ActPerTensorFloat, return_quant_tensor=True),
        qnn.QuantLinear(8, 32, bias=True, weight_quant=Int8WeightPerTensorFloat, bias_quant=Int32Bias),
        qnn.QuantReLU(act_quant=Uint8ActPerTensorFloat, return_quant_tensor=True),
        qnn.QuantLinear(32, 10, bias=True, input_quant=Int8ActPerTensorFloat, weight_quant=Int8WeightPerTensorFloat,
                        bias_quant=Int32Bias))
    return calibrate_activations(model, [torch.randn(64, 8, generator=torch.Generator().manual_seed(i))
                                         for i in range(4)])


def test_export_refuses_a_file_onnxruntime_computes_differently_and_writes_nothing(tmp_path):
    path = tmp_path / "double.onnx"
    with pytest.raises(ExportError, match=r"computes another function.*ORT_ENABLE_\w+.*first changes at 3\.input_quant"):
        export_qdq(_double_grid_brevitas_model(), path, torch.randn(16, 8, generator=torch.Generator().manual_seed(9)))
    assert not path.exists() and os.listdir(tmp_path) == []


def test_validate_names_the_layer_where_the_deployed_function_first_changes(tmp_path, monkeypatch):
    import hdrq_plugin.export.formats.qdq as qdq

    model = _double_grid_brevitas_model()
    monkeypatch.setattr(qdq, "_require_same_function_in_onnxruntime", lambda *args: None)  # write the bad file
    path = export_qdq(model, tmp_path / "double.onnx", torch.randn(4, 8))
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(5))
    report = validate(path, model, [(x, torch.zeros(64, dtype=torch.long))], batch_sizes=(1,), repeats=1)
    assert not report.ok
    assert report.first_diverging_layer == {"data": "3.input_quant"}
    assert any("first changes at 3.input_quant" in failure for failure in report.failures), report.failures
