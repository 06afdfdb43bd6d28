"""The demo's CPU cuts change no number: the in-place inference quantization equals Brevitas' own,
and a cached result is reused only for its exact inputs and code (a damaged entry is recomputed)."""

import pytest
import torch
from brevitas.core.function_wrapper import Identity
from brevitas.core.quant import IntQuant as BrevitasIntQuant

from hdrq_examples.demo_results import RESULTS_FORMAT, ResultCache
from hdrq_plugin.quant.quantizers import PseudoQuantIntQuant


def _inputs(scale: torch.Tensor) -> torch.Tensor:
    """Values on exact rounding ties (k + 1/2 steps), far outside the range, ±0, ±inf and NaN."""
    generator = torch.Generator().manual_seed(0)
    ties = (torch.arange(-40, 40, dtype=torch.float32) + 0.5) * scale.flatten()[0]
    special = torch.tensor([0.0, -0.0, 1e30, -1e30, float("inf"), float("-inf"), float("nan")])
    noise = torch.randn(4, 3, 5, 5, generator=generator) * 3
    return torch.cat([noise.flatten(), ties, special])


def _quant(signed: bool, narrow: bool) -> PseudoQuantIntQuant:
    return PseudoQuantIntQuant(narrow_range=narrow, signed=signed, input_view_impl=Identity(), bit_width=4).eval()


@pytest.mark.parametrize("signed,narrow,zero_point", [(True, False, 0.0), (False, False, 0.0), (True, True, 0.0),
                                                      (False, False, 3.0)])
def test_inference_quantization_is_bit_identical_to_brevitas(signed, narrow, zero_point):
    quant = _quant(signed, narrow)
    scale = torch.nn.Parameter(torch.tensor(0.37))
    zp, bits = torch.tensor(zero_point), torch.tensor(4.0)
    x = _inputs(scale.detach())
    with torch.no_grad():
        fast = quant(scale, zp, bits, x)
        reference = BrevitasIntQuant.forward(quant, scale, zp, bits, x)
    assert fast.shape == reference.shape
    same = (fast == reference) | (fast.isnan() & reference.isnan())
    assert bool(same.all())
    assert torch.equal(torch.signbit(fast), torch.signbit(reference))  # -0.0 stays -0.0


def test_per_channel_scales_are_bit_identical_too():
    quant = _quant(True, False)
    scale = torch.rand(4, 1, 1, 1, generator=torch.Generator().manual_seed(1)) + 0.05
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(2)) * 4
    with torch.no_grad():
        assert torch.equal(quant(scale, torch.tensor(0.0), torch.tensor(4.0), x),
                           BrevitasIntQuant.forward(quant, scale, torch.tensor(0.0), torch.tensor(4.0), x))


def test_a_broken_in_place_path_is_caught_by_the_comparison(monkeypatch):
    # the comparison above can fail: truncating instead of rounding to even differs on the ties
    monkeypatch.setattr(torch.Tensor, "round_", lambda self: self.trunc_())
    quant = _quant(True, False)
    scale = torch.tensor(0.37)
    x = _inputs(scale)
    with torch.no_grad():
        fast = quant(scale, torch.tensor(0.0), torch.tensor(4.0), x)
    monkeypatch.undo()
    with torch.no_grad():
        reference = BrevitasIntQuant.forward(quant, scale, torch.tensor(0.0), torch.tensor(4.0), x)
    assert not torch.equal(fast[:100], reference[:100])


def test_with_autograd_the_step_still_gets_its_gradient():
    quant = _quant(True, False)
    scale = torch.nn.Parameter(torch.tensor(0.37))
    y = quant(scale, torch.tensor(0.0), torch.tensor(4.0), torch.randn(50, generator=torch.Generator().manual_seed(3)))
    y.sum().backward()
    assert scale.grad is not None and scale.grad != 0


def _counting(value):
    calls = []

    def compute():
        calls.append(1)
        return value
    return compute, calls


def test_a_result_is_computed_once_per_key_and_reread_exactly(tmp_path):
    cache = ResultCache.under(tmp_path)
    compute, calls = _counting({"accuracy": 0.1 + 0.2, "rows": [{"target": "mnist", "accuracy": 1 / 3}]})
    first, hit_first = cache.get_or_compute("merges", {"seed": 0}, compute)
    second, hit_second = cache.get_or_compute("merges", {"seed": 0}, compute)
    assert (hit_first, hit_second) == (False, True) and len(calls) == 1
    assert first == second and second["accuracy"] == 0.1 + 0.2  # floats survive JSON bit for bit
    _, hit_other = cache.get_or_compute("merges", {"seed": 1}, compute)  # another input: another key
    assert not hit_other and len(calls) == 2


@pytest.mark.parametrize("damage", ["not json", "truncated", "other key", "other format"])
def test_a_corrupt_or_stale_result_is_computed_again_and_replaced(tmp_path, damage):
    import json

    cache = ResultCache.under(tmp_path)
    compute, calls = _counting([1, 2, 3])
    cache.get_or_compute("barrier", {"pair": ["a", "b"]}, compute)
    path = cache.path("barrier", cache.key("barrier", {"pair": ["a", "b"]}))
    content = json.loads(path.read_text())
    path.write_text({"not json": "\x00garbage",
                     "truncated": path.read_text()[:20],
                     "other key": json.dumps({**content, "key": "0" * 64, "value": [9]}),
                     "other format": json.dumps({**content, "format": RESULTS_FORMAT + "-old", "value": [9]}),
                     }[damage])
    value, hit = cache.get_or_compute("barrier", {"pair": ["a", "b"]}, compute)
    assert (value, hit, len(calls)) == ([1, 2, 3], False, 2)
    assert json.loads(path.read_text())["value"] == [1, 2, 3]  # replaced
    assert cache.get_or_compute("barrier", {"pair": ["a", "b"]}, compute) == ([1, 2, 3], True)


def test_the_key_covers_the_code_version(monkeypatch):
    import hdrq_examples.demo_results as demo_results

    before = ResultCache.key("merges", {"seed": 0})
    monkeypatch.setattr(demo_results, "source_digest", lambda: "another code version")
    assert ResultCache.key("merges", {"seed": 0}) != before
