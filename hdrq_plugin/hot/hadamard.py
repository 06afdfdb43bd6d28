"""Pure transforms of HOT (Kim et al., "HOT: Hadamard-based Optimized Training", CVPR 2025).

Hadamard matrices, the block-diagonal Hadamard transform used by HQ (Hadamard quantization of
the input-gradient GEMM), the low-sequency Walsh–Hadamard projection used by HLA (Hadamard
low-rank approximation of the weight-gradient GEMM), the SAWB clip, stochastic rounding and
signed INT4/INT8 quantization to integer codes, and the integer GEMM. No autograd, no modules,
no loops over layers: :mod:`hdrq_plugin.hot.mode` builds the backward pass from these pieces.

Conventions: a matrix operand is ``(rows, features)``; transforms act along one named axis.
A Sylvester Hadamard matrix H of order n satisfies H·Hᵀ = n·I and H = Hᵀ, so
``(g·H)(H·w) / n = g·w`` exactly (the identity HQ relies on). A block-diagonal H applies one
n×n block to each run of n consecutive entries.
"""

from __future__ import annotations

import functools
import math

import torch

from . import fused as _fused

SAWB_COEFFICIENTS = (12.1, 12.2)  # HOT paper §3 / reference utils/quant_matmul.py sawb_quantizer


@functools.lru_cache(maxsize=16)
def _hadamard_cached(order: int) -> torch.Tensor:
    matrix = torch.ones(1, 1)
    while matrix.shape[0] < order:  # Sylvester: H_2n = [[H, H], [H, -H]]
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix


def _check_power_of_two(order: int, what: str) -> None:
    if order < 1 or order & (order - 1):
        raise ValueError(f"{what} must be a power of two ≥ 1, got {order}")


def sylvester_hadamard(order: int) -> torch.Tensor:
    """The ``order``×``order`` Sylvester Hadamard matrix (entries ±1, H·Hᵀ = order·I)."""
    _check_power_of_two(order, "Hadamard order")
    return _hadamard_cached(order).clone()


def sequency_ordered_walsh(order: int) -> torch.Tensor:
    """Walsh–Hadamard rows sorted by sequency (number of sign changes), row 0 constant."""
    matrix = sylvester_hadamard(order)
    sign_changes = (matrix[:, 1:] != matrix[:, :-1]).sum(1)
    return matrix[torch.argsort(sign_changes, stable=True)]


def low_sequency_basis(order: int, rank: int) -> torch.Tensor:
    """The ``rank`` lowest-sequency Walsh rows (rank×order); Sᵀ·S/order is an orthogonal projector."""
    if not 1 <= rank <= order:
        raise ValueError(f"HLA rank must be in [1, {order}], got {rank}")
    return sequency_ordered_walsh(order)[:rank].clone()


def largest_power_of_two_block(length: int, max_block: int) -> int:
    """Largest power of two ≤ ``max_block`` dividing ``length`` (HQ's block along the channels)."""
    if length < 1:
        raise ValueError(f"length must be positive, got {length}")
    _check_power_of_two(max_block, "max_block")
    block = 1
    while block < max_block and length % (block * 2) == 0:
        block *= 2
    return block


def block_hadamard(matrix: torch.Tensor, block: int, dim: int) -> torch.Tensor:
    """``matrix`` times the block-diagonal Hadamard matrix along ``dim`` (no normalisation).

    Laid out so that torch runs one GEMM (last axis: rows·H) or one batched GEMM over large
    slabs (other axes: H·slab, as it stands in memory); moving the axis last first made torch
    loop over thousands of 16×16 products with a copy each (the largest cost of HOT's backward).
    """
    dim = dim % matrix.dim()
    size = matrix.shape[dim]
    if size % block:
        raise ValueError(f"Hadamard block {block} does not divide axis {dim} of length {size}")
    if block == 1:
        return matrix
    hadamard = _hadamard_cached(block).to(matrix.dtype)
    if dim == matrix.dim() - 1:
        grouped = matrix.contiguous().view(-1, block)
        return (grouped @ hadamard).view(matrix.shape)  # H symmetric: x·H = (H·x)ᵀ
    prefix = math.prod(matrix.shape[:dim])
    grouped = matrix.contiguous().view(prefix * (size // block), block, -1)
    return (hadamard @ grouped).view(matrix.shape)


def padded_length(length: int, block: int) -> int:
    """``length`` rounded up to a multiple of ``block`` (zero rows add nothing to gᵀ·x)."""
    return math.ceil(length / block) * block


def project_low_sequency(rows: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """HLA projection along the rows: (L, C) → (⌈L/n⌉·rank, C), zero-padding L to a multiple of n.

    Each run of n consecutive rows is replaced by its ``rank`` low-sequency Walsh coefficients.
    """
    rank, order = basis.shape
    length = rows.shape[0]
    padded = padded_length(length, order)
    if padded != length:
        rows = torch.cat([rows, rows.new_zeros(padded - length, *rows.shape[1:])])
    grouped = rows.reshape(padded // order, order, -1)
    return (basis.to(rows.dtype) @ grouped).reshape(padded // order * rank, *rows.shape[1:])


def reconstruct_low_sequency(coefficients: torch.Tensor, basis: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of :func:`project_low_sequency` on its range: Sᵀ·c / n, cut back to ``length`` rows."""
    rank, order = basis.shape
    groups = coefficients.shape[0] // rank
    if groups * rank != coefficients.shape[0] or groups * order < length:
        raise ValueError(f"{coefficients.shape[0]} coefficient rows do not fit length {length} at rank {rank}/{order}")
    grouped = coefficients.reshape(groups, rank, -1)
    rows = (basis.t().to(coefficients.dtype) @ grouped) / order
    return rows.reshape(groups * order, *coefficients.shape[1:])[:length]


def sawb_clip(values: torch.Tensor) -> torch.Tensor:
    """SAWB clip c₁·√mean(x²) − c₂·mean|x| (Choi et al. 2018, coefficients of the HOT code).

    The formula is negative for flat magnitudes (√mean(x²) ≈ mean|x|) and can exceed max|x|;
    both cases fall back to max|x|, so the clip is always a usable positive range.
    """
    peak, total_abs, total_square = absolute_moments(values)
    count = max(values.numel(), 1)
    return sawb_clip_from_moments(peak, total_abs / count, (total_square / count).sqrt())


def absolute_moments(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max|x|, Σ|x|, Σx²) as float32 scalars, without a full-size temporary.

    torch's CPU ``vector_norm`` was the slowest step of the SAWB clip (∞-norm 10×, 1-norm 2×
    slower than ``aminmax`` and ``abs().sum()`` on a chunk); Σx² is a BLAS dot product.
    """
    flat = values.float().reshape(-1)
    if flat.numel() == 0:
        zero = torch.zeros(())
        return zero, zero, zero
    low, high = torch.aminmax(flat)
    total_abs = sum(flat[start:start + _CHUNK].abs().sum() for start in range(0, flat.numel(), _CHUNK))
    return torch.maximum(-low, high), total_abs, torch.dot(flat, flat)


def sawb_clip_from_moments(peak: torch.Tensor, mean_abs: torch.Tensor, rms: torch.Tensor) -> torch.Tensor:
    """:func:`sawb_clip` from max|x|, mean|x| and √mean(x²) (for callers that gather them by chunks)."""
    c1, c2 = SAWB_COEFFICIENTS
    clip = c1 * rms - c2 * mean_abs
    return torch.where((clip > 0) & (clip < peak), clip, peak)


def _levels(bits: int) -> int:
    if not 2 <= bits <= 8:
        raise ValueError(f"integer quantization supports 2..8 bits, got {bits}")
    return 2 ** (bits - 1) - 1  # symmetric, narrow range: INT4 → ±7, INT8 → ±127


_CHUNK = 1 << 20  # entries: 4 MiB of float32 temporaries live at a time


def _row_chunks(count: int, row_size: int):
    """Slices of ``count`` rows holding about :data:`_CHUNK` entries each (at least one row)."""
    step = max(1, _CHUNK // max(row_size, 1))
    for start in range(0, count, step):
        yield slice(start, min(start + step, count))


def quantize_nearest(values: torch.Tensor, clip: torch.Tensor, bits: int,
                     dtype: torch.dtype = torch.int8, overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip to ±clip and round to nearest: (codes, scale) with values ≈ codes·scale.

    ``dtype`` holds the integer codes (int8, or bfloat16 / float32 for kernels taking those).
    Works a chunk of rows at a time into the codes, so no float copy of ``values`` is made (the
    backward's largest temporaries were these copies); ``overwrite`` is accepted for callers that
    no longer need ``values`` and has no other effect.
    """
    del overwrite
    levels = _levels(bits)
    scale = (clip / levels).clamp_min(torch.finfo(torch.float32).tiny).float()
    codes = torch.empty(values.shape, dtype=dtype)
    if values.dim() == 0 or values.numel() == 0:
        return codes.copy_(torch.div(values.float(), scale).round_().clamp_(-levels, levels)), scale
    for rows in _row_chunks(values.shape[0], values[0].numel()):
        codes[rows] = torch.div(values[rows].float(), scale).round_().clamp_(-levels, levels)
    return codes, scale


def uniform_dither_codes(shape: torch.Size, generator: torch.Generator | None) -> torch.Tensor:
    """k ~ U{−2¹⁵ … 2¹⁵−1} as int16: u = (k + 2¹⁵ + ½)·2⁻¹⁶ is the dither of stochastic rounding.

    torch's CPU generator is a Mersenne twister; ``torch.rand`` draws one 32-bit number per
    entry and was the largest single cost of HOT's backward (3.7× slower than drawing 64-bit
    words and splitting each into four 16-bit values, as here). The midpoint grid keeps
    E[u] = ½ exactly; rounding u to 2⁻¹⁶ changes the rounding probabilities by at most 2⁻¹⁷.
    """
    count = math.prod(shape)
    words = torch.randint(-2**63, 2**63 - 1, (math.ceil(count / 4),), generator=generator, dtype=torch.int64)
    return words.view(torch.int16)[:count].reshape(shape)


def uniform_dither(shape: torch.Size, generator: torch.Generator | None) -> torch.Tensor:
    """u of :func:`uniform_dither_codes` as float32 in [0, 1)."""
    return uniform_dither_codes(shape, generator).float().add_(32768.5).mul_(2.0**-16)


def add_uniform_dither_(values: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """values += u (:func:`uniform_dither`) in place, without a float dither tensor."""
    return values.add_(32768.5 * 2.0**-16).add_(uniform_dither_codes(values.shape, generator), alpha=2.0**-16)


def quantize_stochastic(
    values: torch.Tensor, bits: int, *, per_row: bool, generator: torch.Generator | None,
    dtype: torch.dtype = torch.int8, overwrite: bool = False, fused: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max-scaled stochastic rounding (floor(x/s + u), u ~ U[0, 1)): unbiased, |error| < s.

    ``per_row`` gives every row (a token of an L×O matrix, a pixel of an N×C×H×W map: everything
    but dim 1) its own scale; otherwise one scale per tensor. ``dtype`` holds the integer codes
    (int8, or bfloat16 / float32 for kernels that take those: |codes| ≤ 127 are exact in all
    three). A chunk of rows at a time goes into the codes: no float copy of ``values`` and no
    full-size dither is ever live; ``overwrite`` is accepted and has no other effect. ``fused``:
    the max and then dither + round + clip in one compiled pass each, the dither from
    :func:`hdrq_plugin.hot.fused.hash_dither` (eager as here where compilation is unavailable).
    """
    del overwrite
    levels = _levels(bits)
    if fused and not per_row and _fused.available():
        peak = _fused.call("abs_peak", values)
        if peak is not None:
            scale = (peak / levels).clamp_min(torch.finfo(torch.float32).tiny)
            codes = _fused.call("stochastic_codes", values, scale, _fused.draw_seed(generator), levels, dtype)
            if codes is not None:
                return codes, scale
    if per_row:  # max(−min, max): no |x| temporary
        magnitude = torch.maximum(values.amax(dim=1, keepdim=True), values.amin(dim=1, keepdim=True).neg_())
    else:
        low, high = torch.aminmax(values)  # one pass, no |x| temporary
        magnitude = torch.maximum(-low, high)
    scale = (magnitude.float() / levels).clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.empty(values.shape, dtype=dtype)
    for rows in _row_chunks(values.shape[0], values[0].numel()):
        chunk = torch.div(values[rows].float(), scale[rows] if per_row else scale)
        add_uniform_dither_(chunk, generator)
        codes[rows] = chunk.floor_().clamp_(-levels, levels)
    return codes, scale


def block_hadamard_channels(maps: torch.Tensor, block: int) -> torch.Tensor:
    """:func:`block_hadamard` along dim 1 of an N×C×… map (channels stay where they are)."""
    return block_hadamard(maps, block, dim=1)


def integer_matmul(left: torch.Tensor, right: torch.Tensor, *, use_int_mm: bool) -> torch.Tensor:
    """Exact product of two int8 code matrices as float32.

    ``torch._int_mm`` (int8×int8→int32) was 3–21× faster than float32 ``@`` of the same codes
    on an x86 CPU at 1×1-conv shapes, on par at a 10-class head (benchmarks/hot_memory.py
    measures it per run); the float path multiplies the same integers in float32, exact while
    partial sums stay below 2²⁴.
    """
    if use_int_mm:
        return torch._int_mm(left.contiguous(), right.contiguous()).float()
    return left.float() @ right.float()
