"""The reconstruction objective, its schedules and QDrop input mixing: pure functions of tensors and steps.

Sources: docs/hdrq_method.md §3.2 (distance regulariser), §4 (loss, learning-rate schedules, noise→STE
switch), §6 (β annealing of the AdaRound rounding regulariser, as in BRECQ/QDrop; the regulariser
itself lives with the AdaRound quantizer, ``hdrq_plugin.quant.control.rounding_regularizer``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = [
    "reconstruction_error",
    "distance_penalty",
    "annealed_beta",
    "warmup_cosine_factor",
    "cosine_factor",
    "noise_iterations",
    "qdrop_mix",
]


def reconstruction_error(output: Tensor, target: Tensor) -> Tensor:
    """``mean over N,H,W of Σ_C (y_q − y_fp)²`` (docs/hdrq_method.md §4; QDrop ``lp_loss`` with p = 2).

    Channels are dimension 1; a ``[N, C]`` output sums over C and averages over N.
    """
    if output.shape != target.shape:
        raise ValueError(f"output shape {tuple(output.shape)} differs from target shape {tuple(target.shape)}")
    if output.dim() < 2:
        raise ValueError(f"expected a batched output [N, C, ...], got shape {tuple(output.shape)}")
    return (output - target).pow(2).sum(dim=1).mean()


def distance_penalty(weights: Iterable[Tensor], sources: Iterable[Tensor], weight: float) -> Tensor:
    """``λ_D · Σ_l ‖W_l − W_l^src‖_F`` — the Frobenius norm, **not squared** (docs/hdrq_method.md §3.2).

    Not squaring keeps the pull toward the source constant in size (``λ_D`` per layer) however
    close the weights already are; its gradient is ``λ_D (W − W_src)/‖W − W_src‖_F``.
    """
    terms = []
    for w, src in zip(weights, sources, strict=True):
        if w.shape != src.shape:
            raise ValueError(f"weight shape {tuple(w.shape)} differs from source shape {tuple(src.shape)}")
        terms.append(torch.linalg.vector_norm(w - src.detach()))
    if not terms:
        raise ValueError("distance_penalty needs at least one layer")
    return weight * torch.stack(terms).sum()


def annealed_beta(step: int, total: int, warmup_fraction: float, start: float, end: float) -> float:
    """β of the rounding penalty: ``start`` during warm-up, then linear to ``end`` (QDrop ``LinearTempDecay``)."""
    begin = warmup_fraction * total
    if step < begin:
        return start
    progress = min(1.0, (step - begin) / max(total - begin, 1))
    return end + (start - end) * (1.0 - progress)


def warmup_cosine_factor(step: int, total: int, warmup_fraction: float, start_factor: float) -> float:
    """Learning-rate multiplier: linear from ``start_factor`` to 1 over the warm-up, then cosine to 0.

    docs/hdrq_method.md §4: weights and weight scales warm up from 1e-7 to 1e-4 (``start_factor`` = 1e-3)
    over the first 20 % of the iterations, then decay with a cosine to 0.
    """
    warmup = int(warmup_fraction * total)
    if step < warmup:
        return start_factor + (1.0 - start_factor) * step / warmup
    return cosine_factor(step - warmup, total - warmup)


def cosine_factor(step: int, total: int) -> float:
    """Cosine decay from 1 to 0 over ``total`` steps (``CosineAnnealingLR`` with ``eta_min=0``)."""
    if total <= 0:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def noise_iterations(total: int, noise_fraction: float) -> int:
    """Iterations trained under pseudo-quantization noise before the switch to STE (16,000 of 20,000)."""
    if not 0.0 <= noise_fraction <= 1.0:
        raise ValueError(f"noise_fraction must be in [0, 1], got {noise_fraction}")
    return int(round(total * noise_fraction))


def qdrop_mix(quantized: Tensor, full_precision: Tensor, drop_probability: float) -> Tensor:
    """QDrop's input mixing: each element is the float one with probability ``p``, else the quantized one.

    docs/hdrq_method.md §4 writes ``where(U < 0.5, x_q, x_fp)``; at p = 0.5 the two readings agree. Uses
    torch's global generator (seeded by the caller).
    """
    if quantized.shape != full_precision.shape:
        raise ValueError(f"shapes differ: {tuple(quantized.shape)} vs {tuple(full_precision.shape)}")
    if not 0.0 <= drop_probability < 1.0:
        raise ValueError(f"drop_probability must be in [0, 1), got {drop_probability}")
    if drop_probability == 0.0:
        return quantized
    return torch.where(torch.rand_like(quantized) < drop_probability, full_precision, quantized)
