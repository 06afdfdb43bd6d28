"""The demo's CPU cuts change no number: the in-place inference quantization equals Brevitas' own."""

import pytest
import torch
from brevitas.core.function_wrapper import Identity
from brevitas.core.quant import IntQuant as BrevitasIntQuant

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
