"""Pseudo-quantization noise (PQN): rounding replaced by noise shaped like the rounding error.

Source: HDRQ (ICML 2025, arXiv 2505.23651) §3 and its reference code; the same mechanism is
NIPQ's (CVPR 2023, arXiv 2206.00820). Specification: ``docs/hdrq_method.md`` §3.1.

For a tensor ``x`` with step ``s`` and integer range ``[qmin, qmax]``::

    e = clamp(round(x/s), qmin, qmax) - x/s          over the elements inside the range
    n ~ 256-bin histogram of e  (bin drawn multinomially, uniform within the bin)
    y = s*qmax  where x >= s*qmax ;  s*qmin  where x <= s*qmin ;  x + n*s  elsewhere

Training under zero-mean noise of variance ~s^2/12 adds (s^2/24)·tr(H) to the expected loss,
so it favours flat minima without any explicit Hessian term.

Pure tensor functions: no modules, no Brevitas, no global state besides torch's RNG (pass
``generator=None`` to use the global one, so ``torch.manual_seed`` reproduces a run exactly).
``step``, ``qmin`` and ``qmax`` may be Python numbers or tensors broadcastable to ``x``; when they
are tensors that require grad (NIPQ's learned truncation and bit-width), gradients flow.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

HISTOGRAM_BINS = 256  # reference code: 256 bins on [-0.5, 0.5] (docs/hdrq_method.md §3.1)
ERROR_RANGE = (-0.5, 0.5)  # round-to-nearest error in units of the step

Number = float | int
Bound = Number | Tensor

__all__ = [
    "HISTOGRAM_BINS",
    "inside_range",
    "rounding_error",
    "rounding_error_histogram",
    "sample_rounding_noise",
    "uniform_noise",
    "rounding_noise_like",
    "pseudo_quantize",
]


def _check_step(step: Bound) -> None:
    if isinstance(step, Tensor):
        if not torch.is_floating_point(step):
            raise TypeError(f"step must be a floating-point tensor, got dtype {step.dtype}")
        if bool((step.detach() <= 0).any()):
            raise ValueError(f"step must be positive everywhere, got min {step.detach().min().item()}")
    elif not step > 0:
        raise ValueError(f"step must be positive, got {step}")


def _require_float(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def inside_range(x: Tensor, step: Bound, qmin: Bound, qmax: Bound) -> Tensor:
    """Boolean mask of the elements that are not clipped: ``s*qmin < x < s*qmax``.

    Clipping is decided on ``x`` itself, never on ``x + noise`` (docs/hdrq_method.md §3.1).
    """
    return (x > step * qmin) & (x < step * qmax)


@torch.no_grad()
def rounding_error(x: Tensor, step: Bound, qmin: Bound, qmax: Bound) -> Tensor:
    """Round-to-nearest error ``round(x/s) - x/s`` of the inside elements, flattened, in [-0.5, 0.5].

    Clipped elements are left out: their error is a clipping error, not a rounding error.
    """
    _require_float(x)
    _check_step(step)
    scaled = (x / step).expand_as(x)
    scaled = scaled[inside_range(x, step, qmin, qmax).expand_as(x)]
    # round(v) - v is exact in floating point (Sterbenz), so the result never leaves [-0.5, 0.5]
    return torch.round(scaled) - scaled


def _error_bins(errors: Tensor, bins: int) -> Tensor:
    """Bin index of each error on [-0.5, 0.5] (torch.histc's convention: 0.5 falls in the last bin)."""
    low, high = ERROR_RANGE
    return ((errors - low) * (bins / (high - low))).long().clamp_(0, bins - 1)


@torch.no_grad()
def rounding_error_histogram(x: Tensor, step: Bound, qmin: Bound, qmax: Bound, bins: int = HISTOGRAM_BINS) -> Tensor:
    """Counts (int64, length ``bins``) of :func:`rounding_error` in equal bins on [-0.5, 0.5].

    Computed without gathering the inside elements (clipped ones are counted in an extra bin
    that is dropped), which keeps a histogram per training iteration cheap on CPU.
    """
    _require_float(x)
    _check_step(step)
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive int, got {bins!r}")
    scaled = (x / step).expand_as(x)
    inside = inside_range(x, step, qmin, qmax).expand_as(x)
    index = _error_bins(torch.round(scaled) - scaled, bins)
    index = torch.where(inside, index, bins)  # clipped elements go to an extra bin, dropped below
    return torch.bincount(index.flatten(), minlength=bins + 1)[:bins]


def _check_shape(shape: Sequence[int] | torch.Size) -> torch.Size:
    try:
        return torch.Size(shape)
    except TypeError as err:
        raise TypeError(f"shape must be a sequence of ints, got {shape!r}") from err


def _sorted_bins(counts: Tensor, total: int) -> Tensor:
    """``[0]*counts[0] + [1]*counts[1] + ...`` as int32, built as a cumulative sum of bin starts.

    Equivalent to ``repeat_interleave(arange(bins), counts)``, which takes ~15 ms on two busy
    CPU threads where this takes ~0.05 ms (measured on a 2-core x86 CPU).
    """
    boundaries = torch.cumsum(counts, 0).clamp_(max=total)
    starts = torch.zeros(total + 1, dtype=torch.int32, device=counts.device)
    starts.index_add_(0, boundaries, torch.ones_like(boundaries, dtype=torch.int32))
    return torch.cumsum(starts[:total], 0, dtype=torch.int32)


@torch.no_grad()
def sample_rounding_noise(
    histogram: Tensor,
    shape: Sequence[int] | torch.Size,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Noise distributed as ``histogram``: bin ``k`` drawn with probability count_k / total, then
    uniform within the bin, ``n = (k + U[0,1)) / bins - 0.5`` (docs/hdrq_method.md §3.1); no gradient.

    The bin draw has the law of ``torch.multinomial(histogram, n, replacement=True)``, written as
    a uniform pick among the ``total`` counted errors (one ``randint`` and a gather), which is
    several times faster than ``torch.multinomial`` on CPU.
    """
    if not isinstance(histogram, Tensor) or histogram.dim() != 1:
        raise ValueError(f"histogram must be a 1-D tensor of counts, got {getattr(histogram, 'shape', histogram)!r}")
    counts = histogram.long()
    if not torch.equal(counts.to(histogram.dtype), histogram) or bool((counts < 0).any()):
        raise ValueError("histogram must hold non-negative integer counts (see rounding_error_histogram)")
    total = int(counts.sum())
    if total == 0:
        raise ValueError("histogram is empty: no element lies inside the quantization range")
    size = _check_shape(shape)
    bins = counts.numel()
    device = histogram.device
    sorted_bins = _sorted_bins(counts, total)  # a uniform index into it is a multinomial draw
    k = sorted_bins.index_select(0, torch.randint(total, (size.numel(),), generator=generator, device=device))
    within = torch.rand(size.numel(), generator=generator, device=device, dtype=dtype)
    return ((k.to(dtype) + within) / bins - 0.5).reshape(size)


@torch.no_grad()
def uniform_noise(
    shape: Sequence[int] | torch.Size,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Textbook PQN ``U[-0.5, 0.5)`` (the special case NIPQ reports works about as well)."""
    size = _check_shape(shape)
    return torch.rand(size, generator=generator, dtype=dtype, device=device) - 0.5


NOISE_SHAPES = ("histogram", "uniform")


@torch.no_grad()
def rounding_noise_like(
    x: Tensor,
    step: Bound,
    qmin: Bound,
    qmax: Bound,
    *,
    shape: str = "histogram",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Noise for every element of ``x``: from ``x``'s own rounding-error histogram, or uniform.

    When every element is clipped there is no rounding error to imitate; the noise is then
    unused by :func:`pseudo_quantize` (clipped outputs ignore it) and zeros are returned.
    """
    _require_float(x)
    if shape == "uniform":
        return uniform_noise(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    if shape != "histogram":
        raise ValueError(f"noise shape must be one of {NOISE_SHAPES}, got {shape!r}")
    histogram = rounding_error_histogram(x, step, qmin, qmax)
    if int(histogram.sum()) == 0:
        return torch.zeros_like(x)
    return sample_rounding_noise(histogram, x.shape, generator=generator, dtype=x.dtype)


def _reduce_to(grad: Tensor, like: Tensor) -> Tensor:
    """``grad`` summed over the dimensions ``like`` was broadcast along (autograd's sum_to_size)."""
    return grad.sum() if like.dim() == 0 else grad.sum_to_size(like.shape)


def _dot_to(grad: Tensor, factor: Tensor, like: Tensor) -> Tensor:
    """``(grad·factor)`` reduced to ``like``'s shape; one fused pass for a per-tensor bound."""
    if like.numel() == 1:
        return torch.dot(grad.reshape(-1), factor.reshape(-1)).reshape(like.shape)
    return (grad * factor).sum_to_size(like.shape)


class _PseudoQuantize(torch.autograd.Function):
    """:func:`pseudo_quantize` with a hand-written backward.

    Autograd of the two nested ``torch.where`` spent ~45 % of a NIPQ training step on CPU (four
    full-size ``where`` and three reductions per quantizer in the backward; torch.profiler on the
    digits ResNet, issue 21). This backward keeps one bool mask per bound and computes the same
    gradients in three fused passes. The forward is the same expression, so outputs are bit-identical;
    gradients to the step and bounds differ from autograd's only in float summation order.
    """

    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, qmin: Tensor, qmax: Tensor, noise: Tensor) -> Tensor:
        upper, lower = step * qmax, step * qmin
        above, below = x >= upper, x <= lower
        y = torch.where(above, upper, torch.where(below, lower, x + noise * step))
        ctx.save_for_backward(step, qmin, qmax, noise, above, below)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        step, qmin, qmax, noise, above, below = ctx.saved_tensors
        clipped = above | below  # where both hold (a zero step), where() picked the upper bound
        grad_inside = grad.masked_fill(clipped, 0.0)
        grad_x = grad_inside if ctx.needs_input_grad[0] else None
        grad_step = grad_qmin = grad_qmax = None
        if any(ctx.needs_input_grad[1:4]):
            below = below & ~above
            grad_upper = _dot_to(grad, above.to(grad.dtype), step * qmax)  # dL/d(step·qmax)
            grad_lower = _dot_to(grad, below.to(grad.dtype), step * qmin)
            if ctx.needs_input_grad[1]:
                grad_step = _reduce_to(_dot_to(grad_inside, noise, step * qmax) + grad_upper * qmax
                                       + grad_lower * qmin, step)
            if ctx.needs_input_grad[2]:
                grad_qmin = _reduce_to(grad_lower * step, qmin)
            if ctx.needs_input_grad[3]:
                grad_qmax = _reduce_to(grad_upper * step, qmax)
        return grad_x, grad_step, grad_qmin, grad_qmax, None


def pseudo_quantize(x: Tensor, step: Bound, qmin: Bound, qmax: Bound, noise: Tensor) -> Tensor:
    """Fake-quantize ``x`` with additive noise instead of rounding (docs/hdrq_method.md §3.1).

    Forward: ``s*qmax`` where ``x >= s*qmax``, ``s*qmin`` where ``x <= s*qmin``, ``x + n*s``
    elsewhere. Gradients (exact, no straight-through estimator): ``dy/dx`` = 1 inside, 0 where
    clipped; ``dy/ds`` = ``n`` inside, ``qmax`` / ``qmin`` where clipped. ``noise`` is in units of
    the step and is treated as a constant.
    """
    _require_float(x)
    _require_float(noise, "noise")
    if noise.shape != x.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from x shape {tuple(x.shape)}")
    bounds = [b if isinstance(b, Tensor) else torch.tensor(float(b), dtype=x.dtype, device=x.device)
              for b in (step, qmin, qmax)]
    if any(b.dim() > x.dim() for b in bounds):
        raise ValueError("step, qmin and qmax must broadcast to x")
    return _PseudoQuantize.apply(x, *bounds, noise.detach())
