"""Pseudo-quantization noise and step-size math pinned to docs/hdrq_method.md §3 / §3.1."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from hdrq_plugin.quant.noise import (
    HISTOGRAM_BINS,
    pseudo_quantize,
    rounding_error,
    rounding_error_histogram,
    rounding_noise_like,
    sample_rounding_noise,
    uniform_noise,
)
from hdrq_plugin.quant.step_size import lp_clipping_search, lsq_gradient_scale, step_from_threshold

BITS = st.integers(min_value=2, max_value=8)
SEEDS = st.integers(min_value=0, max_value=2**31 - 1)
STEPS = st.floats(min_value=1e-3, max_value=10.0)
FAST = settings(max_examples=25, deadline=None)


def _signed_range(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _tensor(seed: int, shape=(6, 5, 3), spread: float = 6.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * spread


def _skewed_errors_tensor(step: float, count: int, seed: int) -> torch.Tensor:
    """Values whose rounding errors are far from uniform: concentrated near +0.3 and -0.1."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.randint(-3, 4, (count,), generator=gen).double()
    offsets = torch.where(torch.rand(count, generator=gen) < 0.7, torch.full((count,), -0.3), torch.full((count,), 0.1))
    offsets = offsets + 0.05 * torch.randn(count, generator=gen, dtype=torch.float64)
    return (grid + offsets) * step


@FAST
@given(seed=SEEDS, bits=BITS, step=STEPS)
def test_rounding_error_is_round_minus_value_within_half_a_step(seed, bits, step):
    qmin, qmax = _signed_range(bits)
    x = _tensor(seed) * step
    errors = rounding_error(x, step, qmin, qmax)
    scaled = x / step
    inside = (x > step * qmin) & (x < step * qmax)
    assert torch.equal(errors, torch.round(scaled[inside]) - scaled[inside])
    assert errors.numel() == int(inside.sum())
    assert bool((errors.abs() <= 0.5).all())


@FAST
@given(seed=SEEDS, bits=BITS, step=STEPS)
def test_histogram_counts_every_inside_error_in_its_bin(seed, bits, step):
    qmin, qmax = _signed_range(bits)
    x = _tensor(seed) * step
    errors = rounding_error(x, step, qmin, qmax)
    histogram = rounding_error_histogram(x, step, qmin, qmax)
    assert histogram.shape == (HISTOGRAM_BINS,) and histogram.dtype == torch.int64
    assert torch.equal(histogram, torch.histc(errors, HISTOGRAM_BINS, -0.5, 0.5).long())


def test_clipped_elements_do_not_enter_the_histogram():
    x = torch.tensor([-100.0, -0.26, 0.1, 0.74, 100.0])
    histogram = rounding_error_histogram(x, 1.0, -8, 7)
    assert int(histogram.sum()) == 3


@FAST
@given(seed=SEEDS)
def test_sampled_noise_lies_in_the_bins_of_observed_errors(seed):
    x = _skewed_errors_tensor(0.1, 500, seed)
    histogram = rounding_error_histogram(x, 0.1, -8, 7)
    noise = sample_rounding_noise(histogram, (4000,), dtype=torch.float64)
    assert bool(((noise >= -0.5) & (noise < 0.5)).all())
    bins = ((noise + 0.5) * HISTOGRAM_BINS).long()
    assert bool((histogram[bins] > 0).all())


def test_sampled_noise_follows_the_rounding_error_distribution():
    torch.manual_seed(0)
    x = _skewed_errors_tensor(0.05, 50_000, seed=1)
    errors = rounding_error(x, 0.05, -128, 127)
    noise = rounding_noise_like(x, 0.05, -128, 127)
    # Kolmogorov–Smirnov: the piecewise-uniform approximation differs from the errors' CDF by at
    # most the mass of one 1/256-wide bin, far below what the test detects at this sample size.
    result = stats.ks_2samp(noise.flatten().numpy(), errors.numpy())
    assert result.pvalue > 1e-3, result
    uniform = stats.ks_2samp(uniform_noise((50_000,)).numpy(), errors.numpy())
    assert uniform.pvalue < 1e-6  # the same test does tell a different distribution apart


def test_bin_draws_match_a_multinomial_chi_square():
    torch.manual_seed(3)
    histogram = torch.zeros(HISTOGRAM_BINS, dtype=torch.long)
    histogram[[10, 100, 200, 255]] = torch.tensor([1, 5, 10, 4])
    noise = sample_rounding_noise(histogram, (40_000,), dtype=torch.float64)
    observed = torch.bincount(((noise + 0.5) * HISTOGRAM_BINS).long(), minlength=HISTOGRAM_BINS)[[10, 100, 200, 255]]
    expected = torch.tensor([1, 5, 10, 4], dtype=torch.float64) / 20 * 40_000
    assert stats.chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3


@FAST
@given(seed=SEEDS)
def test_seeded_sampling_reproduces_exactly(seed):
    x = _tensor(seed)
    torch.manual_seed(seed)
    first = rounding_noise_like(x, 0.5, -8, 7)
    torch.manual_seed(seed)
    assert torch.equal(rounding_noise_like(x, 0.5, -8, 7), first)
    gen_a, gen_b = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    assert torch.equal(rounding_noise_like(x, 0.5, -8, 7, generator=gen_a),
                       rounding_noise_like(x, 0.5, -8, 7, generator=gen_b))


@FAST
@given(seed=SEEDS)
def test_uniform_noise_lies_in_half_open_unit_interval_around_zero(seed):
    noise = uniform_noise((1000,), generator=torch.Generator().manual_seed(seed))
    assert bool(((noise >= -0.5) & (noise < 0.5)).all())


def test_noise_of_a_fully_clipped_tensor_is_zero():
    x = torch.tensor([-50.0, 50.0])
    assert torch.equal(rounding_noise_like(x, 1.0, -8, 7), torch.zeros(2))


def test_an_empty_histogram_cannot_be_sampled():
    with pytest.raises(ValueError, match="empty"):
        sample_rounding_noise(torch.zeros(HISTOGRAM_BINS, dtype=torch.long), (3,))


@FAST
@given(seed=SEEDS, bits=BITS, step=STEPS)
def test_pseudo_quantize_forward_adds_scaled_noise_inside_and_saturates_when_clipped(seed, bits, step):
    qmin, qmax = _signed_range(bits)
    x = _tensor(seed, spread=2.0 ** bits) * step
    noise = uniform_noise(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    y = pseudo_quantize(x, step, qmin, qmax, noise)
    high, low = x >= step * qmax, x <= step * qmin
    inside = ~(high | low)
    assert torch.equal(y[inside], (x + noise * step)[inside])
    assert bool((y[high] == step * qmax).all()) and bool((y[low] == step * qmin).all())


@FAST
@given(seed=SEEDS, bits=BITS, step=STEPS)
def test_pseudo_quantize_gradients_are_the_spec(seed, bits, step):
    """dy/dx = 1 inside, 0 clipped; dy/ds = n inside, qmax / qmin where clipped (per element)."""
    qmin, qmax = _signed_range(bits)
    x = (_tensor(seed, spread=2.0 ** bits) * step).requires_grad_()
    s = torch.full_like(x, step).requires_grad_()  # one step per element: per-element dy/ds
    noise = uniform_noise(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    pseudo_quantize(x, s, qmin, qmax, noise).sum().backward()
    high, low = (x >= s * qmax).detach(), (x <= s * qmin).detach()
    inside = ~(high | low)
    assert torch.equal(x.grad, inside.double())
    expected = torch.where(high, float(qmax), torch.where(low, float(qmin), noise))
    assert torch.allclose(s.grad, expected, rtol=0, atol=1e-12)


def test_clipping_is_decided_on_x_not_on_x_plus_noise():
    x = torch.tensor([6.8, -7.8])  # inside [-8, 7] with step 1; noise pushes them past the bounds
    y = pseudo_quantize(x, 1.0, -8, 7, torch.tensor([0.45, -0.45]))
    assert torch.allclose(y, torch.tensor([7.25, -8.25]))


def test_pseudo_quantize_broadcasts_a_per_channel_step():
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    s = torch.tensor([0.1, 0.2, 0.3, 0.4]).reshape(4, 1, 1, 1).requires_grad_()
    noise = torch.zeros_like(x)
    pseudo_quantize(x, s, -8, 7, noise).sum().backward()
    assert s.grad.shape == (4, 1, 1, 1)


def test_pseudo_quantize_rejects_noise_of_another_shape():
    with pytest.raises(ValueError, match="noise shape"):
        pseudo_quantize(torch.zeros(3), 1.0, -8, 7, torch.zeros(4))


def test_non_positive_steps_are_rejected():
    with pytest.raises(ValueError, match="positive"):
        rounding_error(torch.zeros(3), torch.tensor(0.0), -8, 7)


# --- step size -------------------------------------------------------------------------------

def _lp_error(x, step, qmin, qmax, p=2.4):
    return (torch.clamp(torch.round(x / step), qmin, qmax) * step - x).abs().pow(p).mean()


@FAST
@given(seed=SEEDS, bits=BITS)
def test_lp_search_returns_the_best_of_the_hundred_candidates(seed, bits):
    qmin, qmax = _signed_range(bits)
    x = _tensor(seed, shape=(200,), spread=1.0)
    step = lp_clipping_search(x, qmin, qmax)
    candidates = [step_from_threshold(x.abs().max() * i / 100, qmin, qmax) for i in range(1, 101)]
    best = min(_lp_error(x, c, qmin, qmax) for c in candidates)
    assert any(torch.isclose(step, c) for c in candidates)
    assert _lp_error(x, step, qmin, qmax) <= best * (1 + 1e-9)


@FAST
@given(seed=SEEDS, bits=BITS)
def test_per_channel_search_equals_searching_each_channel(seed, bits):
    qmin, qmax = _signed_range(bits)
    w = _tensor(seed, shape=(4, 3, 3, 3), spread=1.0)
    per_channel = lp_clipping_search(w, qmin, qmax, dim=0)
    assert torch.equal(per_channel, torch.stack([lp_clipping_search(c, qmin, qmax) for c in w]))


def test_unsigned_search_spans_zero_to_the_maximum():
    x = torch.linspace(-5, 3, 1000, dtype=torch.float64)
    step = lp_clipping_search(x, 0, 15)
    assert 0 < float(step) * 15 <= 3.0 + 1e-12


def test_lp_search_rejects_non_finite_values():
    with pytest.raises(ValueError, match="NaN"):
        lp_clipping_search(torch.tensor([1.0, float("nan")]), -8, 7)


def test_lsq_gradient_scale_keeps_the_value_and_scales_the_gradient():
    s = torch.tensor(0.3, requires_grad=True)
    scaled = lsq_gradient_scale(s, 1 / math.sqrt(100 * 7))
    assert scaled.item() == pytest.approx(0.3)
    (scaled * 2).backward()
    assert s.grad.item() == pytest.approx(2 / math.sqrt(700))


def test_a_strided_error_estimate_finds_nearly_the_step_of_the_full_search():
    x = torch.relu(torch.randn(8, 16, 32, 32, generator=torch.Generator().manual_seed(0)))
    full = lp_clipping_search(x, 0, 15, max_error_elements=None)
    strided = lp_clipping_search(x, 0, 15, max_error_elements=1 << 15)
    assert torch.isclose(strided, full, rtol=0.05)


def _autograd_pseudo_quantize(x, step, qmin, qmax, noise, swap=False):
    """The nested-where expression whose autograd the hand-written backward replaces (``swap``:
    a deliberately wrong one, the bounds' roles exchanged)."""
    upper, lower = (step * qmin, step * qmax) if swap else (step * qmax, step * qmin)
    return torch.where(x >= upper, upper, torch.where(x <= lower, lower, x + noise * step))


def _gradients(fn, step_shape):
    g = torch.Generator().manual_seed(3)
    x = (2 * torch.randn(4, 6, 5, 5, generator=g)).requires_grad_()
    step = (0.2 + torch.rand(step_shape, generator=g)).requires_grad_()
    qmin, qmax = torch.tensor(-7.0, requires_grad=True), torch.tensor(7.0, requires_grad=True)
    noise = torch.rand(x.shape, generator=g) - 0.5
    y = fn(x, step, qmin, qmax, noise)
    (y * torch.randn(y.shape, generator=g)).sum().backward()
    return y.detach(), [t.grad for t in (x, step, qmin, qmax)]


@pytest.mark.parametrize("step_shape", [(), (4, 1, 1, 1)])
def test_hand_written_backward_matches_autograd_of_the_where_expression(step_shape):
    y, grads = _gradients(pseudo_quantize, step_shape)
    y_ref, grads_ref = _gradients(_autograd_pseudo_quantize, step_shape)
    assert torch.equal(y, y_ref)  # the same forward expression: bit-identical
    assert torch.equal(grads[0], grads_ref[0])  # dy/dx is a mask: exact
    for got, want in zip(grads[1:], grads_ref[1:], strict=True):  # float32 sums in another order
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    _, broken = _gradients(lambda *a: _autograd_pseudo_quantize(*a, swap=True), step_shape)
    assert not torch.allclose(grads[1], broken[1], rtol=1e-3)  # the comparison sees a wrong backward
