"""Merging integer weight tensors onto one grid: the pure math of docs/hdrq_method.md §5.

Every quantized model t holds, per layer, integer codes ``I_t`` on a grid with step ``s_t``
(``Q_t = I_t·s_t``). A merge with coefficients ``c_t`` (summing to 1) produces one grid:

    merged scale   s_m = Σ c_t s_t
    averaged value u   = Σ c_t Q_t / s_m        (the dequantized average, in merged-grid steps)
    code average   ū   = Σ c_t I_t              (the same average taken on the integer codes)

and merged codes = ``round(u)`` everywhere except at **ties**.

Why ties are defined on the codes (docs/hdrq_method.md §5): two adapted models never have identical scales.
Where ū sits exactly on a grid midpoint (two models: ``I1 + I2`` odd), the averaged value u is
off the midpoint only by ``u − ū = Σ c_t I_t (s_t/s_m − 1)``, whose sign is fixed by which model
has the larger scale. Plain re-rounding of u therefore sends every tie toward the larger-scale
model — a biased mix, not an average (docs/hdrq_method.md §5 measured 15–25 points of harmonic-mean
accuracy lost at W4A4; our digits runs: 13 points). Ties must be found on ū, where no scale can
bias them.

**Tie rule for any number of models and any coefficients (our generalisation; the reference
code handles two models at λ = ½ only).** An element is a tie when its code average ū lies on a
grid midpoint, ``|frac(ū) − ½| ≤ tie_tolerance``; the tolerance only absorbs floating-point
rounding of the coefficients (ū is computed in float64), so with two models and λ = ½ the rule
is exactly "``I1 + I2`` is odd". With three equally weighted models ū is a multiple of ⅓, never
a midpoint: no code average is undecided, so nothing needs breaking (a wider band would turn
ordinary roundings into coin tosses). Non-uniform coefficients give ties wherever Σ c_t I_t
lands on a midpoint (e.g. 0.3·0 + 0.7·5 = 3.5); ``tie_tolerance`` can be widened by a caller
who wants a band.

A tie is resolved between the two grid points that bracket its averaged value, ``floor(u)``
and ``floor(u) + 1``. These are ``⌊ū⌋`` and ``⌈ū⌉`` whenever the scale mismatch moves u by less
than half a step (two models: ``|I1 − I2|·|s1 − s2| / (2(s1 + s2)) < ½``, e.g. any 4-bit codes
with scales within 5 %, or codes one apart at any scale ratio); when it moves u
further (8-bit codes on grids far apart) the bracket follows u, so a tie never lands farther
from the averaged value than its non-tie neighbours. The rules:

* ``half-to-even`` — the even one of the two (no sampling: deterministic and unbiased over a
  tensor, since half the midpoints have an even lower neighbour);
* ``random`` — one draw of the noise below (docs/hdrq_method.md §5 "one random draw");
* ``noise-sampling`` — the reference rule: K draws of noise ``n_t ~ U(−½, ½)·s_t`` on the tie
  elements of every model; a draw rounds ``Σ c_t (Q_t − n_t) / s_m``; it is kept when, for every
  model t, ``|cos(R − Q_t, mid − Q_t)|`` over the whole tensor (``mid = Σ c_t Q_t``, the average
  the merge tries to reach; ``(Q1 + Q2)/2`` in the reference) improves on the best draw so far
  (by more than float64 noise); the first draw is always kept.

``naive_rerounding`` (round u everywhere) is kept only as the reference for what not to do, and
``average_dequantized`` (Σ c_t Q_t, off any grid) as the non-deployable ceiling.
:func:`noise_sampling_two_models` is the two-model reference rule written as in docs/hdrq_method.md §5; the
general rule reduces to it (tested).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..options import ROUNDING_RULES  # noqa: F401 (the rules' names; torch-free for the CLI)

TIE_TOLERANCE = 1e-6  # float64 slack on a code midpoint; codes are ≤ 2^8, coefficients O(1)
NOISE_TRIALS = 100  # docs/hdrq_method.md §5: reference K = 100 (its BRECQ merge uses 30)
_COEFFICIENT_SUM_TOLERANCE = 1e-6
# A draw must beat the best cosine by more than float64 summation noise, so that equivalent
# draws summed in a different order are never mistaken for improvements.
_COSINE_MARGIN = 1e-12


@dataclass(frozen=True)
class IntegerMerge:
    """One merged tensor: integer ``codes`` (int64) on the grid of step ``scale``; ``ties`` marks
    the elements whose code average sat on a grid midpoint."""

    codes: Tensor
    scale: Tensor
    ties: Tensor

    def dequantized(self) -> Tensor:
        return self.codes.to(self.scale.dtype) * self.scale


def normalize_coefficients(coefficients: Sequence[float] | None, count: int) -> tuple[float, ...]:
    """Return the merge coefficients as floats that sum to 1 (uniform ``1/count`` when None).

    Coefficients are not rescaled silently: ones that do not sum to 1 are an error (task
    arithmetic with a source model is how a merge of a different total is expressed).
    """
    if count < 1:
        raise ValueError("a merge needs at least one model")
    if coefficients is None:
        return (1.0 / count,) * count
    values = tuple(float(c) for c in coefficients)
    if len(values) != count:
        raise ValueError(f"got {len(values)} coefficients for {count} models")
    if not all(math.isfinite(c) for c in values):
        raise ValueError(f"coefficients must be finite, got {values}")
    if abs(sum(values) - 1.0) > _COEFFICIENT_SUM_TOLERANCE:
        raise ValueError(f"coefficients must sum to 1, got {values} (sum {sum(values):.6g})")
    return values


def _checked(codes: Sequence[Tensor], scales: Sequence[Tensor], coefficients) -> tuple:
    if len(codes) != len(scales):
        raise ValueError(f"got {len(codes)} code tensors and {len(scales)} scales")
    coefficients = normalize_coefficients(coefficients, len(codes))
    shape = codes[0].shape
    for index, (code, scale) in enumerate(zip(codes, scales, strict=True)):
        if code.shape != shape:
            raise ValueError(f"code tensor {index} has shape {tuple(code.shape)}, expected {tuple(shape)}")
        if code.is_floating_point() and not torch.equal(code, code.round()):
            raise ValueError(f"code tensor {index} holds non-integer values")
        if torch.broadcast_shapes(scale.shape, shape) != shape:
            raise ValueError(f"scale {index} of shape {tuple(scale.shape)} does not broadcast to {tuple(shape)}")
        if not (scale > 0).all():
            raise ValueError(f"scale {index} has non-positive entries")
    # Models with coefficient 0 take no part (their noise and cosine would be meaningless).
    kept = [i for i, c in enumerate(coefficients) if c != 0.0]
    return ([codes[i].to(torch.float64) for i in kept], [scales[i].to(torch.float64) for i in kept],
            [coefficients[i] for i in kept])


def merge_scales(scales: Sequence[Tensor], coefficients: Sequence[float]) -> Tensor:
    """``s_m = Σ c_t s_t``; an error where it is not positive (possible with negative coefficients)."""
    merged = sum(c * s for c, s in zip(coefficients, scales, strict=True))
    if not (merged > 0).all():
        raise ValueError("the merged scale Σ c_t s_t is not positive everywhere; check the coefficients")
    return merged


def average_codes(codes: Sequence[Tensor], coefficients: Sequence[float]) -> Tensor:
    """``ū = Σ c_t I_t`` in float64: the average taken on the integer codes, free of any scale."""
    return sum(c * i.to(torch.float64) for c, i in zip(coefficients, codes, strict=True))


def average_dequantized(codes: Sequence[Tensor], scales: Sequence[Tensor],
                        coefficients: Sequence[float] | None = None) -> Tensor:
    """``Σ c_t I_t s_t``: the average of the dequantized weights, on no grid (the ceiling a
    deployable merge can only approach)."""
    codes, scales, coefficients = _checked(codes, scales, coefficients)
    return sum(c * i * s for c, i, s in zip(coefficients, codes, scales, strict=True))


def find_ties(codes: Sequence[Tensor], coefficients: Sequence[float] | None = None,
              tolerance: float = TIE_TOLERANCE) -> Tensor:
    """Elements whose code average ``Σ c_t I_t`` lies on a grid midpoint (see the module doc)."""
    coefficients = normalize_coefficients(coefficients, len(codes))
    average = average_codes(codes, coefficients)
    return ((average - average.floor()) - 0.5).abs() <= tolerance


def _averaged_value(codes, scales, coefficients, merged_scale) -> Tensor:
    """``u = Σ c_t I_t s_t / s_m``, the dequantized average measured in merged-grid steps."""
    return sum(c * i * s for c, i, s in zip(coefficients, codes, scales, strict=True)) / merged_scale


def _clamp_codes(codes: Tensor, qmin: int, qmax: int) -> Tensor:
    return codes.clamp(qmin, qmax).to(torch.int64)


def naive_rerounding(codes: Sequence[Tensor], scales: Sequence[Tensor],
                     coefficients: Sequence[float] | None = None, *, qmin: int, qmax: int) -> IntegerMerge:
    """Round the averaged dequantized value everywhere — the thing NOT to do (module doc)."""
    codes, scales, coefficients = _checked(codes, scales, coefficients)
    merged_scale = merge_scales(scales, coefficients)
    value = _averaged_value(codes, scales, coefficients, merged_scale)
    ties = find_ties(codes, coefficients)
    return IntegerMerge(_clamp_codes(torch.round(value), qmin, qmax), merged_scale, ties)


def round_ties_half_to_even(codes: Sequence[Tensor], scales: Sequence[Tensor],
                            coefficients: Sequence[float] | None = None, *, qmin: int, qmax: int,
                            tie_tolerance: float = TIE_TOLERANCE) -> IntegerMerge:
    """Nearest grid point for every element; each tie goes to the even one of its two neighbours."""
    codes, scales, coefficients = _checked(codes, scales, coefficients)
    merged_scale = merge_scales(scales, coefficients)
    value = _averaged_value(codes, scales, coefficients, merged_scale)
    ties = find_ties(codes, coefficients, tie_tolerance)
    lower = value.floor()
    even = torch.where(torch.remainder(lower, 2) == 0, lower, lower + 1)
    merged = torch.where(ties, even, torch.round(value))
    return IntegerMerge(_clamp_codes(merged, qmin, qmax), merged_scale, ties)


def _abs_cosine(dot: Tensor, norm_a_sq: Tensor, norm_b_sq: Tensor) -> Tensor:
    """|cos| from a dot product and squared norms; 0 where a vector is zero (never "improves")."""
    denominator = (norm_a_sq * norm_b_sq).sqrt()
    return torch.where(denominator > 0, dot.abs() / denominator.clamp_min(1e-300), torch.zeros_like(dot))


def round_ties_by_noise_sampling(codes: Sequence[Tensor], scales: Sequence[Tensor],
                                 coefficients: Sequence[float] | None = None, *, qmin: int, qmax: int,
                                 trials: int = NOISE_TRIALS, generator: torch.Generator | None = None,
                                 tie_tolerance: float = TIE_TOLERANCE) -> IntegerMerge:
    """Noise-sampling rounding with the cosine filter, for any number of models (module doc).

    Only tie elements receive noise, so only they can differ from :func:`round_ties_half_to_even`.
    Each draw costs O(#ties): the cosines' sums over non-tie elements are computed once.
    """
    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive integer, got {trials!r}")
    codes, scales, coefficients = _checked(codes, scales, coefficients)
    merged_scale = merge_scales(scales, coefficients)
    value = _averaged_value(codes, scales, coefficients, merged_scale)
    ties = find_ties(codes, coefficients, tie_tolerance)
    merged = torch.round(value).clamp(qmin, qmax)
    if not ties.any():
        return IntegerMerge(_clamp_codes(merged, qmin, qmax), merged_scale, ties)

    shape = value.shape
    dequantized = [i * s for i, s in zip(codes, scales, strict=True)]
    target = sum(c * q for c, q in zip(coefficients, dequantized, strict=True))  # "mid" of docs/hdrq_method.md §5
    merged_scale_full = merged_scale.expand(shape)
    # Non-tie parts of the dot products and norms of every model, fixed across draws.
    fixed = [(((merged * merged_scale_full - q) * (target - q))[~ties].sum(),
              ((merged * merged_scale_full - q) ** 2)[~ties].sum(),
              ((target - q) ** 2).sum()) for q in dequantized]
    tie_value = value[ties]
    tie_lower = tie_value.floor()
    tie_scales = [s.expand(shape)[ties] for s in scales]
    tie_dequantized = [q[ties] for q in dequantized]
    tie_target = target[ties]
    tie_merged_scale = merged_scale_full[ties]

    best_codes, best_cosines = None, None
    for _ in range(trials):
        noise = sum(c * (torch.rand(tie_value.shape, generator=generator, dtype=torch.float64) - 0.5) * s
                    for c, s in zip(coefficients, tie_scales, strict=True))
        # round(u − Σ c n / s_m), restricted to the two bracketing grid points (it never leaves
        # them when all coefficients are positive; negative ones could push it further).
        draw = tie_lower + ((tie_value - noise / tie_merged_scale) > tie_lower + 0.5).to(torch.float64)
        draw = draw.clamp(qmin, qmax)
        merged_tie = draw * tie_merged_scale
        cosines = torch.stack([
            _abs_cosine(dot + ((merged_tie - q) * (tie_target - q)).sum(),
                        norm_r + ((merged_tie - q) ** 2).sum(), norm_mid)
            for (dot, norm_r, norm_mid), q in zip(fixed, tie_dequantized, strict=True)])
        if best_cosines is None or bool((cosines > best_cosines + _COSINE_MARGIN).all()):
            best_codes, best_cosines = draw, cosines
    merged = merged.clone()
    merged[ties] = best_codes
    return IntegerMerge(_clamp_codes(merged, qmin, qmax), merged_scale, ties)


def merge_integer_weights(codes: Sequence[Tensor], scales: Sequence[Tensor],
                          coefficients: Sequence[float] | None = None, *, qmin: int, qmax: int,
                          rounding: str = "noise-sampling", trials: int = NOISE_TRIALS,
                          generator: torch.Generator | None = None,
                          tie_tolerance: float = TIE_TOLERANCE) -> IntegerMerge:
    """Merge integer tensors with one of :data:`ROUNDING_RULES` (``random`` = one noise draw)."""
    for index, code in enumerate(codes):
        if code.numel() and (code.min() < qmin or code.max() > qmax):
            raise ValueError(f"code tensor {index} leaves the integer range [{qmin}, {qmax}]")
    if rounding == "noise-sampling":
        return round_ties_by_noise_sampling(codes, scales, coefficients, qmin=qmin, qmax=qmax,
                                            trials=trials, generator=generator, tie_tolerance=tie_tolerance)
    if rounding == "random":
        return round_ties_by_noise_sampling(codes, scales, coefficients, qmin=qmin, qmax=qmax,
                                            trials=1, generator=generator, tie_tolerance=tie_tolerance)
    if rounding == "half-to-even":
        return round_ties_half_to_even(codes, scales, coefficients, qmin=qmin, qmax=qmax,
                                       tie_tolerance=tie_tolerance)
    if rounding == "naive":
        return naive_rerounding(codes, scales, coefficients, qmin=qmin, qmax=qmax)
    raise ValueError(f"unknown rounding {rounding!r}; choose one of {', '.join(ROUNDING_RULES)}")


def noise_sampling_two_models(codes_1: Tensor, codes_2: Tensor, scale_1: Tensor, scale_2: Tensor,
                              lam: float = 0.5, *, trials: int = NOISE_TRIALS,
                              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """The reference two-model rule, line by line as in docs/hdrq_method.md §5; returns (codes, scale).

    ``lam`` weighs model 1. Ties are "``I1 + I2`` odd", the reference's definition, which is a
    midpoint only at λ = ½. Computes in float64 and draws noise in the same order as
    :func:`round_ties_by_noise_sampling` (model 1 then model 2, tie elements only, per draw).
    """
    i1, i2 = codes_1.to(torch.float64), codes_2.to(torch.float64)
    s1, s2 = scale_1.to(torch.float64), scale_2.to(torch.float64)
    q1, q2 = i1 * s1, i2 * s2
    s_m = lam * s1 + (1 - lam) * s2
    tie = torch.remainder(i1 + i2, 2) == 1
    mid = lam * q1 + (1 - lam) * q2
    s1_full, s2_full = s1.expand(i1.shape), s2.expand(i1.shape)
    best, best_c = None, None
    for _ in range(trials):
        n1, n2 = torch.zeros_like(i1), torch.zeros_like(i2)
        n1[tie] = (torch.rand(int(tie.sum()), generator=generator, dtype=torch.float64) - 0.5) * s1_full[tie]
        n2[tie] = (torch.rand(int(tie.sum()), generator=generator, dtype=torch.float64) - 0.5) * s2_full[tie]
        r = s_m * torch.round((lam * (q1 - n1) + (1 - lam) * (q2 - n2)) / s_m)
        c = torch.stack([torch.nn.functional.cosine_similarity((r - q).flatten(), (mid - q).flatten(), dim=0).abs()
                         for q in (q1, q2)])
        if best_c is None or bool((c > best_c + _COSINE_MARGIN).all()):
            best, best_c = r, c
    return torch.round(best / s_m).to(torch.int64), s_m
