"""The conformance suite's seeded subset (issue 19, deliver 6): generated CNNs of every block
type, each at a bit spec in rotation and every weight storage that applies, end to end
(convert -> calibrate 1 iteration -> merge of two copies -> export -> validate at
ORT_ENABLE_ALL and ORT_DISABLE_ALL). Every case is validated or refused at conversion with the
node named; ``python -m benchmarks.conformance`` runs the full grid (>= 300 cases)."""

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.conformance.generator import BLOCK_TYPES, INPUT_SHAPE, NUM_CLASSES, GeneratedNet, ModelCase
from benchmarks.conformance.run import run_model_spec, sample_subset, storages_for

SUBSET = sample_subset(len(BLOCK_TYPES) + 2, seed=1)  # every block type, 13 models


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    folder = tmp_path_factory.mktemp("conformance")
    torch.set_num_threads(1)
    out = []
    for case, spec in SUBSET:
        out += run_model_spec(case, spec, folder)
    return out


def test_the_subset_covers_every_block_type_and_at_least_40_cases(rows):
    assert {row["block"] for row in rows} == set(BLOCK_TYPES)
    assert len(rows) >= 40


def test_every_case_is_validated_or_refused_at_conversion_naming_the_node(rows):
    others = [f"{r['block']}/{r['model_seed']}/{r['spec']}/{r['storage']} at {r['stage']}: {r['detail']}"
              for r in rows if r["outcome"] not in ("validated", "refused")]
    assert not others, "\n".join(others)


def test_a_generated_model_is_the_same_for_the_same_seed():
    a, b = ModelCase("se-gate", 7).build(), ModelCase("se-gate", 7).build()
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_a_model_the_conversion_cannot_serve_ends_as_refused_with_the_node_named(tmp_path):
    case = ModelCase("conv", 3)

    class WithCumsum(GeneratedNet):
        def forward(self, x):
            return super().forward(x.cumsum(1))

    class Broken(ModelCase):
        def build(self):
            torch.manual_seed(self.seed)
            return WithCumsum(self.block, self.seed).eval()

    rows = run_model_spec(Broken(case.block, case.seed), "w4a4", tmp_path)
    assert len(rows) == len(storages_for("w4a4"))
    assert all(r["outcome"] == "refused" and "graph node 'cumsum'" in r["detail"] for r in rows)


def test_a_file_that_computes_another_function_is_not_counted_as_validated(tmp_path, monkeypatch):
    """The suite's own check fails on a deliberately broken export (one weight code moved)."""
    import onnx
    from onnx import numpy_helper

    from benchmarks.conformance import run
    from hdrq_plugin.export import export_qdq as real_export

    def broken_export(model, path, *args, **kwargs):
        written = real_export(model, path, *args, **kwargs)
        proto = onnx.load(written)
        for init in proto.graph.initializer:
            array = numpy_helper.to_array(init)
            if array.dtype.kind in "iu" and array.ndim == 4:  # a conv weight: move every code by one step
                moved = (array.astype("int64") + 1).clip(array.min(), array.max()).astype(array.dtype)
                init.CopyFrom(numpy_helper.from_array(moved, init.name))
                break
        onnx.save(proto, written)
        return written

    monkeypatch.setattr(run, "export_qdq", broken_export)
    rows = run_model_spec(ModelCase("conv", 0), "w4a4", tmp_path)
    assert rows and all(r["outcome"] == "other" for r in rows)


class _GatedPool(nn.Module):
    """An SE gate broadcast with ``reshape(-1, C, 1, 1)`` (its traced shape is symbolic under the
    dynamic batch axis) followed by a local adaptive average pool: torch.onnx could not read the
    pool's input size ("adaptive_avg_pool2d, input size not accessible", issue 19)."""

    def __init__(self, output_size, functional: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(INPUT_SHAPE[0], 8, 3, padding=(1, 3))  # 8 x 12: divisible by 2 and by (2, 3)
        self.fc1, self.fc2 = nn.Linear(8, 4), nn.Linear(4, 8)
        self.output_size, self.functional = output_size, functional
        self.pool = nn.AdaptiveAvgPool2d(output_size)
        cells = output_size[0] * output_size[1] if isinstance(output_size, tuple) else output_size ** 2
        self.head = nn.Linear(8 * cells, NUM_CLASSES)

    def forward(self, x):
        x = F.relu(self.stem(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
        x = x * s.reshape(-1, x.shape[1], 1, 1)
        x = F.adaptive_avg_pool2d(x, self.output_size) if self.functional else self.pool(x)
        return self.head(torch.flatten(x, 1))


@dataclass(frozen=True)
class _GatedPoolCase(ModelCase):
    output_size: object = 2
    functional: bool = False

    def build(self):
        torch.manual_seed(self.seed)
        return _GatedPool(self.output_size, self.functional).eval()


@pytest.mark.parametrize(("output_size", "functional"), [(2, False), ((2, 3), False), (2, True)],
                         ids=["AdaptiveAvgPool2d(2)", "AdaptiveAvgPool2d((2,3))", "F.adaptive_avg_pool2d"])
def test_a_local_adaptive_pool_after_a_reshaped_gate_is_exported_and_validated(output_size, functional, tmp_path):
    rows = run_model_spec(_GatedPoolCase("se-gate", 16, output_size, functional), "w8a8", tmp_path)
    assert rows and all(r["outcome"] == "validated" for r in rows), [r["detail"] for r in rows]


def test_a_local_adaptive_pool_that_does_not_divide_its_input_is_refused_naming_it(tmp_path):
    from hdrq_plugin import convert_to_brevitas
    from hdrq_plugin.convert import calibrate_activations
    from hdrq_plugin.export import ExportError, export_qdq

    model = _GatedPoolCase("se-gate", 16, output_size=(3, 5)).build()  # 8 x 12 into 3 x 5
    x = torch.randn(8, *INPUT_SHAPE)
    qmodel = calibrate_activations(convert_to_brevitas(model, "w8a8"), [x])
    with pytest.raises(ExportError, match=r"AdaptiveAvgPool2d 'pool' maps an input of size \(8, 12\) to \(3, 5\)"):
        export_qdq(qmodel, tmp_path / "m.onnx", x[:1])
    assert not (tmp_path / "m.onnx").exists()
