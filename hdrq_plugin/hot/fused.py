"""Fused passes of HOT's backward: transform + stochastic rounding + quantize in one loop each.

HOT's backward (Kim et al., CVPR 2025, §3) is, per k×k conv, three chains of elementwise work
around two conv kernels: Q₈ˢ(g) (weight gradient), Q₄ˢ(g·H_b) (input gradient) and Q₈ˢᵃʷᵇ(Π·x)
rebuilt from the saved int8 coefficients. Run op by op in eager torch, each chain made 6–10
passes over a full map plus a Mersenne-twister dither, and on a ResNet-8 they cost more than the
conv kernels (docs/hot_method.md §8). Here each chain is one ``torch.compile`` (inductor, C++ on
CPU) kernel that reads its input once and writes only the codes: no float temporary of the map,
so no chunking either.

* The block Hadamard (b ≤ 16) and the HLA rebuild (rank 8 of 16) are written as broadcast
  products summed over ≤ 16 terms, which inductor unrolls into the same loop
  (``unroll_reductions_threshold``) instead of storing the transformed map.
* The dither is an integer hash (Wellons' ``lowbias32``) of the entry's index and
  two 32-bit keys drawn per call from the layer's generator: deterministic for a seed, no state,
  computed inside the kernel. Its top 16 bits give the same midpoint grid as the eager dither
  (:func:`hdrq_plugin.hot.hadamard.uniform_dither_codes`); the values differ from it.

Compilation happens once per function and dtype on the first backward (shapes are dynamic) and
is cached on disk by inductor; where it is unavailable (no C++ compiler, an inductor error) every
caller falls back to the eager chunked path, once and for the whole process (:func:`available`).
"""

from __future__ import annotations

import functools
import warnings

import torch

_MASK32 = 0xFFFFFFFF
# inductor stores any reduction over more than this many terms; ours are ≤ 16 (HQ block, HLA order)
_OPTIONS = {"unroll_reductions_threshold": 16}

_STATE = {"failed": None}
_RECOMPILE_LIMIT = 64


def _lowbias32(z: torch.Tensor) -> torch.Tensor:
    """Wellons' ``lowbias32`` integer hash (hash-prospector, 2018) on values in [0, 2³²) held in int64.

    Every intermediate stays below 2⁶³: signed overflow is undefined behaviour in the C++ that
    inductor emits, and gcc used it to cut the loop short (only the first vector was written).
    x·0x846ca68b mod 2³² is taken as x·0x046ca68b + (x & 1)·2³¹ (0x846ca68b = 2³¹ + 0x046ca68b).
    """
    z = z ^ (z >> 16)
    z = (z * 0x7FEB352D) & _MASK32
    z = z ^ (z >> 15)
    z = (z * 0x046CA68B + ((z & 1) << 31)) & _MASK32
    return z ^ (z >> 16)


def hash_dither(index: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """u ∈ (0, 1) on the 2⁻¹⁶ midpoint grid: top 16 bits of lowbias32(((i + s₀) mod 2³²) ⊕ s₁).

    ``seed`` holds (s₀, s₁), two 32-bit keys drawn per call; the xor keeps two calls' streams from
    being shifted copies of one another. ``index`` < 2³² entries. (One hash round: a second one
    cost 60 % more time in the quantize kernel.)
    """
    z = _lowbias32(((index + seed[0]) & _MASK32) ^ seed[1])
    return (z >> 16).to(torch.float32).add(0.5).mul(2.0**-16)


def _block_hadamard(maps: torch.Tensor, hadamard: torch.Tensor) -> torch.Tensor:
    """An N×C×M map times the block-diagonal Hadamard matrix along C, as an unrollable sum."""
    batch, channels, pixels = maps.shape
    block = hadamard.shape[0]
    grouped = maps.reshape(batch, channels // block, block, 1, pixels)
    return (grouped * hadamard.view(1, 1, block, block, 1)).sum(2).reshape(batch, channels, pixels)


def _hq_peak(maps, hadamard, per_token: bool):
    transformed = _block_hadamard(maps.float(), hadamard).abs()
    return transformed.amax(1, keepdim=True) if per_token else transformed.amax()


def _hq_codes(maps, hadamard, scale, seed, levels: int, dequantize: bool, dtype: torch.dtype):
    transformed = _block_hadamard(maps.float(), hadamard)
    index = torch.arange(transformed.numel(), dtype=torch.int64).view(transformed.shape)
    codes = torch.floor(transformed / scale + hash_dither(index, seed)).clamp(-levels, levels)
    return (codes * scale if dequantize else codes).to(dtype)


def _stochastic_codes(values, scale, seed, levels: int, dtype: torch.dtype):
    index = torch.arange(values.numel(), dtype=torch.int64).view(values.shape)
    codes = torch.floor(values.float() / scale + hash_dither(index, seed))
    return codes.clamp(-levels, levels).to(dtype)


def _abs_peak(values):
    return values.float().abs().amax()


def _rebuild(codes, factor, basis):
    """Π·x = Sᵀ·codes·(scale/n) per run of n pixels: (…, r) int8 coefficients → (…, n) floats.

    ``basis`` is S (±1) and ``factor`` scale/n: the sums of r codes times ±1 are integers, exact
    in float32 in any order, so every kernel (whatever its vectorisation) rebuilds the same values.
    """
    return (codes.float().unsqueeze(-1) * basis).sum(-2) * factor


def _rebuild_moments(codes, factor, basis):
    rebuilt = _rebuild(codes, factor, basis)
    return rebuilt.abs().amax(), rebuilt.abs().sum(), (rebuilt * rebuilt).sum()


def _rebuild_codes(codes, factor, basis, input_scale, levels: int, dtype: torch.dtype):
    rebuilt = _rebuild(codes, factor, basis)
    return torch.round(rebuilt / input_scale).clamp(-levels, levels).to(dtype)


def _scaled_float(values, factor):
    return values.float() * factor


def _bn_sums(grad, codes):
    """BatchNorm backward's Σg and Σg·code per channel of N×C×M maps, one pass."""
    return grad.sum((0, 2)), (grad * codes.float()).sum((0, 2))


def _bn_grad_in_place(grad, codes, shift, slope, gain):
    """g ← (g − shift − code·slope)·gain in g's own memory (torch.compile writes mutated inputs in place)."""
    return grad.copy_((grad - shift - codes.float() * slope) * gain)


def _bn_grad_into(out, grad, codes, shift, slope, gain):
    return out.copy_((grad - shift - codes.float() * slope) * gain)


@functools.cache
def _compiled(name: str):
    function = {"hq_peak": _hq_peak, "hq_codes": _hq_codes, "stochastic_codes": _stochastic_codes,
                "abs_peak": _abs_peak, "rebuild_moments": _rebuild_moments,
                "rebuild_codes": _rebuild_codes, "scaled_float": _scaled_float,
                "bn_sums": _bn_sums, "bn_grad_in_place": _bn_grad_in_place, "bn_grad_into": _bn_grad_into}[name]
    return torch.compile(function, dynamic=True, fullgraph=True, options=_OPTIONS)


def available() -> bool:
    """False once a compilation has failed in this process (then every caller runs eager)."""
    return _STATE["failed"] is None


def call(name: str, *args):
    """The compiled ``name`` on ``args``, or None when compilation is unavailable (see module doc)."""
    if not available():
        return None
    try:
        # one specialisation per dtype / rank / flag (shapes are dynamic): more than dynamo's default 8
        with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
            return _compiled(name)(*args)
    except Exception as error:  # noqa: BLE001 - any inductor/compiler failure means: run eager
        _STATE["failed"] = f"{type(error).__name__}: {error}"
        warnings.warn(f"HOT: torch.compile unavailable, eager backward from now on ({_STATE['failed'][:200]})",
                      RuntimeWarning, stacklevel=2)
        return None


def draw_seed(generator: torch.Generator | None) -> torch.Tensor:
    """Two 32-bit keys for :func:`hash_dither` from the layer's stream (int64, each in [0, 2³²))."""
    return torch.randint(0, 1 << 32, (2,), generator=generator, dtype=torch.int64)
