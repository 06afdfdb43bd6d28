"""HOT's compiled backward kernels (hdrq_plugin/hot/fused.py): same values as their eager
definitions at every length (the loop tail included), an unbiased dither, and a clean fallback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hdrq_plugin.hot import fused
from hdrq_plugin.hot.hadamard import block_hadamard_channels, low_sequency_basis, sylvester_hadamard
from hdrq_plugin.hot.mode import HOTConfig, hot_mode

pytestmark = pytest.mark.skipif(not fused.available(), reason="torch.compile failed earlier in this process")

SEED = fused.draw_seed(torch.Generator().manual_seed(3))


@pytest.mark.parametrize("shape", [(8, 10), (3, 5, 7), (2, 16, 9, 9), (1,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_compiled_stochastic_codes_equal_the_eager_definition_at_any_length(shape, dtype):
    # lengths that are not a multiple of the vector width: gcc once cut the loop after the first
    # vector when the hash overflowed a signed int64 (undefined behaviour), leaving memory unwritten
    values = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    scale = values.abs().max() / 127
    compiled = fused.call("stochastic_codes", values, scale, SEED, 127, dtype)
    assert torch.equal(compiled, fused._stochastic_codes(values, scale, SEED, 127, dtype))


def test_compiled_hq_and_rebuild_kernels_equal_their_references():
    generator = torch.Generator().manual_seed(1)
    grad = torch.randn(3, 32, 7, 5, generator=generator)
    maps = grad.reshape(3, 32, -1)
    hadamard = sylvester_hadamard(16)
    transformed = block_hadamard_channels(grad, 16).reshape(3, 32, -1)
    peak = fused.call("hq_peak", maps, hadamard, False)
    assert torch.allclose(peak, transformed.abs().max(), rtol=1e-6)
    scale = peak / 7
    codes = fused.call("hq_codes", maps, hadamard, scale, SEED, 7, False, torch.float32)
    # floor(t/s + u) with u ∈ (0, 1): within one step of t/s, never outside ±7
    assert ((codes - transformed / scale).abs() < 1 + 1e-4).all() and codes.abs().max() <= 7

    coefficients = torch.randint(-127, 128, (2, 3, 5, 8), generator=generator, dtype=torch.int8)
    basis = low_sequency_basis(16, 8)
    rebuilt = (coefficients.float() * 0.01).reshape(-1, 8) @ (basis / 16)
    top, total_abs, total_square = fused.call("rebuild_moments", coefficients, torch.tensor(0.01 / 16), basis)
    assert torch.allclose(top, rebuilt.abs().max()) and torch.allclose(total_abs, rebuilt.abs().sum(), rtol=1e-5)
    assert torch.allclose(total_square, rebuilt.square().sum(), rtol=1e-5)
    requantized = {dtype: fused.call("rebuild_codes", coefficients, torch.tensor(0.01 / 16), basis,
                                     torch.tensor(0.003), 127, dtype) for dtype in (torch.int8, torch.float32)}
    reference = (rebuilt / 0.003).round().clamp(-127, 127)
    assert (requantized[torch.float32].reshape(-1, 16) - reference).abs().max() <= 1  # ties of 1-ulp sums
    # the integer sums are exact: kernels of any output dtype give the same codes
    assert torch.equal(requantized[torch.int8].float(), requantized[torch.float32])


def _mean_rounding_bias(dither) -> float:
    """max over entries of |E[floor(x + u)] − x| over 64 seeds (an unbiased dither: ≈ 0)."""
    values = torch.linspace(-3, 3, 4097)
    index = torch.arange(values.numel())
    total = torch.zeros_like(values)
    for seed in range(256):
        keys = fused.draw_seed(torch.Generator().manual_seed(seed))
        total += torch.floor(values + dither(index, keys))
    return float((total / 256 - values).abs().mean())


def test_the_hash_dither_rounds_without_bias_and_a_constant_dither_does_not():
    # 256 draws of a Bernoulli: the mean's standard error is ≤ 0.5/16 = 0.031 per entry; averaged
    # over entries the absolute deviation is ≈ 0.8·σ ≈ 0.02. Rounding to nearest (u ≡ ½) is off by
    # 0.25 on average over a uniform spread of fractions.
    assert _mean_rounding_bias(fused.hash_dither) < 0.03
    assert _mean_rounding_bias(lambda index, keys: torch.full(index.shape, 0.5)) > 0.2


def test_the_dither_is_uniform_and_streams_of_two_seeds_are_uncorrelated():
    index = torch.arange(1 << 20)
    first, second = fused.hash_dither(index, SEED), fused.hash_dither(index, fused.draw_seed(None))
    assert abs(float(first.mean()) - 0.5) < 2e-3 and abs(float(first.var()) - 1 / 12) < 1e-3
    histogram = torch.histc(first, 16, 0, 1) / first.numel() * 16
    assert (histogram - 1).abs().max() < 0.02
    assert abs(float(torch.corrcoef(torch.stack([first, second]))[0, 1])) < 5e-3
    assert abs(float(torch.corrcoef(torch.stack([first[1:], first[:-1]]))[0, 1])) < 5e-3


def _step_gradients(config: HOTConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 64, 10))
    inputs = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(2))
    with hot_mode(model, config):
        F.cross_entropy(model(inputs), labels).backward()
    return {name: p.grad for name, p in model.named_parameters()}


def test_fused_and_eager_backward_agree_up_to_the_stochastic_rounding():
    """Same quantizers, different dither streams: each layer's gradient differs by rounding noise
    only (INT4 input gradients: a few steps of 1/7 of the range; far below the gradient's norm)."""
    eager = _step_gradients(HOTConfig(fused_kernels=False))
    compiled = _step_gradients(HOTConfig())
    for name, expected in eager.items():
        error = float((compiled[name] - expected).norm() / expected.norm())
        assert error < 0.5, (name, error)
        assert not torch.equal(compiled[name], expected) or name.endswith("bias"), name


def test_a_failed_compilation_falls_back_to_eager_once_with_a_warning(monkeypatch):
    def broken(name):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(fused, "_compiled", broken)
    monkeypatch.setitem(fused._STATE, "failed", None)
    with pytest.warns(RuntimeWarning, match="torch.compile unavailable"):
        gradients = _step_gradients(HOTConfig())
    assert not fused.available()
    expected = _step_gradients(HOTConfig(fused_kernels=False))  # the eager path, same stream
    for name, value in expected.items():
        assert torch.equal(gradients[name], value), name


@pytest.mark.parametrize("conv", [nn.Conv2d(3, 12, 3, stride=2, padding=1), nn.Conv2d(12, 7, 3, padding=2, dilation=2)])
def test_fused_codes_give_the_same_gradients_through_int_and_float_kernels(conv):
    """One layer, one given output gradient, same seed → same fused codes; torch._int_mm (im2col)
    and float32 conv kernels multiply them exactly (integer sums below 2²⁴), up to float32 sums."""
    inputs = torch.randn(4, conv.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    results = {}
    for gemm in ("int", "float"):
        x = inputs.clone().requires_grad_()
        conv.zero_grad(set_to_none=True)
        with hot_mode(conv, HOTConfig(gemm=gemm)):
            output = conv(x)
            output.backward(torch.randn(output.shape, generator=torch.Generator().manual_seed(1)))
        results[gemm] = (x.grad, conv.weight.grad)
    for got, expected in zip(results["int"], results["float"], strict=True):
        assert float((got - expected).norm() / expected.norm()) < 2e-5
