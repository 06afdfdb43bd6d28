"""How a quantization step is chosen (L_p clipping search) and learned (LSQ gradient scaling).

Sources: the L_p search is the reference code's MSE observer used by QDrop and HDRQ (p = 2.4,
100 candidate thresholds ``max|x|·i/100``, i = 1..100; docs/hdrq_method.md §3); LSQ gradient scaling is
Esser et al., "Learned Step Size Quantization" (ICLR 2020), factor ``1/sqrt(numel·qmax)``.

Brevitas ships an MSE scale search (``brevitas.core.stats.MSE``), but it minimises the L2 error
over a different candidate grid; the methods we reproduce use L_p with p = 2.4, hence this one.
Pure tensor functions: no modules, no Brevitas.
"""

from __future__ import annotations

import torch
from torch import Tensor

LP_NORM = 2.4  # reference MSEObserver.p (QDrop/HDRQ code, docs/hdrq_method.md §3)
CLIPPING_CANDIDATES = 100  # reference MSEObserver.num
MAX_ERROR_ELEMENTS = 1 << 18  # per row; larger activation batches are strided (see lp_clipping_search)
_MAX_CANDIDATE_ELEMENTS = 1 << 24  # bounds the search's temporary memory (~64 MiB of float32)

__all__ = ["LP_NORM", "CLIPPING_CANDIDATES", "step_from_threshold", "lp_clipping_search", "lsq_gradient_scale"]


def step_from_threshold(threshold: Tensor, qmin: int, qmax: int) -> Tensor:
    """Step that maps the clipping range to the integer range, as the reference observer does.

    Signed (``qmin < 0``): the range [-t, t] spans ``qmax - qmin`` steps, ``s = 2t/(qmax - qmin)``.
    Unsigned (``qmin = 0``): [0, t], ``s = t/qmax``.
    """
    if qmin < 0:
        return 2 * threshold / (qmax - qmin)
    return threshold / (qmax - qmin)


def _check_range(qmin: int, qmax: int) -> None:
    if not (isinstance(qmin, int) and isinstance(qmax, int)) or qmin >= qmax or qmin > 0:
        raise ValueError(f"integer range must satisfy qmin <= 0 < qmax, got [{qmin}, {qmax}]")


@torch.no_grad()
def lp_clipping_search(
    x: Tensor,
    qmin: int,
    qmax: int,
    *,
    dim: int | None = None,
    p: float = LP_NORM,
    candidates: int = CLIPPING_CANDIDATES,
    max_error_elements: int | None = MAX_ERROR_ELEMENTS,
) -> Tensor:
    """Step minimising ``mean |fake_quant(x) - x|^p`` over thresholds ``max|x|·i/candidates``.

    The thresholds come from the whole tensor; the error of each candidate is measured on at
    most ``max_error_elements`` evenly strided elements per row (``None``: all). A calibration
    batch of activations has millions of elements and 100 candidates each, which made the
    search most of the RTN calibration time; a strided subsample estimates the same mean.

    ``dim=None`` searches one step for the whole tensor (a scalar); ``dim=d`` keeps dimension
    ``d`` (e.g. 0 for per-output-channel weights) and returns one step per slice along it.
    For an unsigned range (``qmin = 0``) only the positive side is considered. A tensor of zeros
    gets the smallest positive float step so that the result is always a valid step.
    """
    if not isinstance(x, Tensor) or not torch.is_floating_point(x):
        raise TypeError("x must be a floating-point tensor")
    if x.numel() == 0:
        raise ValueError("cannot search a step for an empty tensor")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or inf; a clipping threshold cannot be searched")
    _check_range(qmin, qmax)
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    rows = x.reshape(1, -1) if dim is None else x.movedim(dim, 0).reshape(x.shape[dim], -1)
    absmax = rows.clamp(min=0).amax(dim=1) if qmin == 0 else rows.abs().amax(dim=1)
    if max_error_elements is not None and rows.shape[1] > max_error_elements:
        rows = rows[:, :: -(-rows.shape[1] // max_error_elements)]
    fractions = torch.arange(1, candidates + 1, dtype=x.dtype, device=x.device) / candidates
    best_error = torch.full_like(absmax, float("inf"))
    best_step = step_from_threshold(absmax, qmin, qmax)
    chunk = max(1, _MAX_CANDIDATE_ELEMENTS // rows.numel())
    for start in range(0, candidates, chunk):
        steps = step_from_threshold(absmax[None, :] * fractions[start : start + chunk, None], qmin, qmax)
        steps = steps.clamp(min=torch.finfo(x.dtype).tiny)[:, :, None]  # (candidate, row, 1)
        quantized = torch.clamp(torch.round(rows / steps), qmin, qmax) * steps
        error = (quantized - rows).abs().pow(p).mean(dim=2)  # (candidate, row)
        chunk_error, chunk_index = error.min(dim=0)
        better = chunk_error < best_error  # strict: ties keep the earlier (smaller) threshold
        best_error = torch.where(better, chunk_error, best_error)
        best_step = torch.where(better, steps[chunk_index, torch.arange(rows.shape[0]), 0], best_step)
    best_step = best_step.clamp(min=torch.finfo(x.dtype).tiny)
    return best_step.reshape(()) if dim is None else best_step


def lsq_gradient_scale(step: Tensor, factor: float) -> Tensor:
    """``step`` in the forward pass, ``factor ×`` its gradient in the backward pass (LSQ).

    LSQ's ``g = 1/sqrt(numel·qmax)`` keeps the step's update commensurate with the weights'.
    """
    scaled = step * factor
    return (step - scaled).detach() + scaled
