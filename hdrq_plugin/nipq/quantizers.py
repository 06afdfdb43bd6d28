"""Brevitas quantizers of NIPQ: learnable truncation α and a learned bit-width per tensor.

Source: NIPQ (CVPR 2023, arXiv 2206.00820) and its reference code, as specified in
``docs/nipq_method.md``. Use them like any Brevitas quantizer (injector classes, never instances)::

    qnn.QuantConv2d(16, 32, 3, weight_quant=NIPQWeightQuantizer)
    qnn.QuantReLU(act_quant=NIPQActQuantizer)
    convert_to_brevitas(model, "nipq-w4a4")          # picks all three, see hdrq_plugin.convert.to_brevitas

Per tensor (docs/nipq_method.md "Quantizer"):

- continuous bit-width ``b_c = 2 + 12·σ(θ_b)``; training: ``b = round(b_c + U(−½, ½))`` with the
  gradient passed straight through to θ_b; evaluation: ``round(b_c)``; frozen: a fixed integer
  (a buffer, no gradient). Used bits are clamped to 2..8, what the exporter represents.
- truncation ``α = softplus(θ_α)``; signed step ``Δ = α / (2^(b−1) − 1)`` (narrow range
  ``±(2^(b−1)−1)``), unsigned ``Δ = α / (2^b − 1)``.
- forward: the one PQN implementation, :func:`hdrq_plugin.quant.noise.pseudo_quantize`, through
  :class:`hdrq_plugin.quant.quantizers.PseudoQuantIntQuant` (mode ``NOISE``): clip to the range,
  ``x + ε·Δ`` inside. Because Δ is computed from α and b by Brevitas' ``RescalingIntQuant``
  (``scale = α / int_threshold(b)``), autograd gives the spec's gradients: x: 1 inside, 0
  outside; α: ±1 outside, ε·∂Δ/∂α inside; b: ε·∂Δ/∂b inside (0 outside, where ``Δ·qmax = α``).
- hard phase (mode ``STE``, bits frozen): LSQ-style fake quantization, STE rounding.

Evaluation always runs Brevitas' own ``IntQuant`` forward, so export and merging see a plain
integer grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from brevitas import config as brevitas_config
from brevitas.inject import ExtendedInjector
from brevitas.inject.enum import BitWidthImplType, RestrictValueType, ScalingImplType, ScalingPerOutputType
from brevitas.quant import base as quant_base
from brevitas.quant.solver import ActQuantSolver, WeightQuantSolver
from torch import Tensor, nn

from hdrq_plugin.bitspec import MAX_BITS, MIN_BITS
from hdrq_plugin.quant.quantizers import PseudoQuantIntQuant, QuantMode

__all__ = [
    "NIPQ_BIT_RANGE",
    "LearnedBitWidth",
    "LearnedTruncation",
    "NIPQWeightQuantizer",
    "NIPQActQuantizer",
    "NIPQSignedActQuantizer",
    "continuous_bits",
    "bits_to_logit",
    "pin_learned_bits",
]

NIPQ_BIT_RANGE = (2.0, 12.0)  # b_c = 2 + 12·σ(θ_b) (docs/nipq_method.md, reference code)
REFERENCE_INITIAL_BITS = 8  # θ_b = 0 at start (docs/nipq_method.md)
UNSIGNED_ACT_TRUNCATION = 6.0  # θ_α init 6 for unsigned activations (docs/nipq_method.md, reference code)
SIGNED_ACT_TRUNCATION = 3.0  # θ_α init 3 for signed activations (docs/nipq_method.md, reference code)
SAMPLE_ELEMENTS = 1 << 15  # elements per batch kept for the Lp clipping search (fit_truncations)


def continuous_bits(theta: Tensor) -> Tensor:
    """``b_c = 2 + 12·σ(θ_b)`` (docs/nipq_method.md)."""
    low, span = NIPQ_BIT_RANGE
    return low + span * torch.sigmoid(theta)


def bits_to_logit(bits: float) -> float:
    """θ_b giving ``b_c = bits`` (inverse of :func:`continuous_bits`)."""
    low, span = NIPQ_BIT_RANGE
    if not low < bits < low + span:
        raise ValueError(f"a continuous bit-width must lie in ({low}, {low + span}), got {bits}")
    p = (bits - low) / span
    return math.log(p / (1.0 - p))


def inverse_softplus(value: float) -> float:
    """θ with ``softplus(θ) = value`` (value > 0), computed stably for large values."""
    if not value > 0:
        raise ValueError(f"a truncation bound must be positive, got {value}")
    return value + math.log(-math.expm1(-value))


def _forgive_missing(module: nn.Module, prefix: str, missing_keys: list[str]) -> None:
    """Brevitas swaps quantizers with ``IGNORE_MISSING_KEYS`` set: our own keys may then be absent
    (docs/toolchain_notes.md, "Brevitas quantizers")."""
    if brevitas_config.IGNORE_MISSING_KEYS:
        for key in list(module.state_dict(keep_vars=True)):
            if prefix + key in missing_keys:
                missing_keys.remove(prefix + key)


def _straight_through(value: Tensor, target: Tensor) -> Tensor:
    """``target`` forward, gradient of ``value`` backward."""
    return value + (target - value).detach()


class LearnedBitWidth(nn.Module):
    """Brevitas ``bit_width_impl`` of NIPQ: learned continuous bits, stochastic rounding, freezing.

    ``bit_width`` (the injector attribute a bit spec sets) is the *nominal* width, the default
    average-bit target of :func:`hdrq_plugin.nipq.train.nipq_train`; learning starts at
    ``initial_bit_width``, the reference's 8 bits (θ_b = 0), or at ``bit_width`` when None.
    A bit-width set explicitly on a layer (the 8-bit edge layers) is pinned with :meth:`freeze`.
    """

    def __init__(self, bit_width: int, initial_bit_width: int | None = REFERENCE_INITIAL_BITS,
                 stochastic_bit_rounding: bool = True) -> None:
        super().__init__()
        start = bit_width if initial_bit_width is None else initial_bit_width
        self.nominal_bits = int(bit_width)  # the bit spec's width: the default average-bit target
        self.theta = nn.Parameter(torch.tensor(bits_to_logit(float(start))))
        # 0 = learned; otherwise the frozen integer bit-width (kept in the state dict)
        self.register_buffer("frozen_bits", torch.tensor(0.0))
        self.stochastic_bit_rounding = bool(stochastic_bit_rounding)
        self.pinned = False  # set by pin_learned_bits: a fixed width (edge layer), never learned

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *rest) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *rest)
        _forgive_missing(self, prefix, missing_keys)
        # requires_grad is not in a state dict: a width frozen before the save stays frozen, so a
        # resumed run rebuilds the optimizer's param groups exactly as they were saved
        self.theta.requires_grad_(not self.is_frozen)

    @property
    def is_frozen(self) -> bool:
        return bool(self.frozen_bits > 0)

    def continuous(self) -> Tensor:
        """``b_c`` with its gradient to θ_b (the frozen value, without gradient, once frozen)."""
        if self.is_frozen:
            return self.frozen_bits.clone()
        return continuous_bits(self.theta)

    def rounded(self) -> Tensor:
        """``round(b_c)`` clamped to the exported range 2..8 (the evaluation bit-width)."""
        if self.is_frozen:
            return self.frozen_bits.clone()
        return torch.round(continuous_bits(self.theta.detach())).clamp(MIN_BITS, MAX_BITS)

    @torch.no_grad()
    def freeze(self, bits: int | None = None) -> int:
        """Fix the bit-width (default ``round(b_c)``); returns it. θ_b then gets no gradient."""
        value = int(self.rounded().item()) if bits is None else int(bits)
        if not MIN_BITS <= value <= MAX_BITS:
            raise ValueError(f"frozen bit-width {value} is outside {MIN_BITS}..{MAX_BITS}")
        self.frozen_bits.fill_(float(value))
        low, span = NIPQ_BIT_RANGE  # θ_b follows (inside the open range) so b_c reads the same
        self.theta.copy_(torch.tensor(bits_to_logit(min(max(value, low + 1e-3), low + span - 1e-3))))
        self.theta.requires_grad_(False)
        return value

    @torch.no_grad()
    def unfreeze(self) -> None:
        self.frozen_bits.fill_(0.0)
        self.theta.requires_grad_(True)

    def forward(self) -> Tensor:
        if self.is_frozen:
            return self.frozen_bits.clone()
        b_c = continuous_bits(self.theta)
        if self.training and self.stochastic_bit_rounding:
            noisy = b_c + (torch.rand((), device=b_c.device) - 0.5)
        else:
            noisy = b_c
        # round and clamp forward; the gradient goes straight through to θ_b (docs/nipq_method.md)
        return _straight_through(b_c, torch.round(noisy.detach()).clamp(MIN_BITS, MAX_BITS))

    def extra_repr(self) -> str:
        state = f"frozen={int(self.frozen_bits)}" if self.is_frozen else f"b_c={float(self.continuous().detach()):.3f}"
        return f"{state}, stochastic_bit_rounding={self.stochastic_bit_rounding}"


class LearnedTruncation(nn.Module):
    """Brevitas ``scaling_impl`` of NIPQ: ``α = softplus(θ_α)``, returning the step ``α / int_threshold``.

    Weights start at ``max|W|`` (``truncation_init=None``; the reference's signed max is a bug
    for tensors whose largest magnitude is negative); activations at the spec's constants.
    """

    def __init__(self, truncation_init: float | None = None) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(inverse_softplus(truncation_init or 1.0)))
        # weights: set from max|W| at the first forward (Brevitas builds layers on the meta
        # device and loads the weights afterwards), like Brevitas' parameter-from-stats scaling
        self.init_done = truncation_init is not None
        self.observing = False  # set by hdrq_plugin.nipq.train.observe_activation_ranges
        self.observed: list[float] = []
        self.sampling = False  # set by hdrq_plugin.nipq.passes.fit_truncations
        self.samples: list[Tensor] = []

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *rest) -> None:
        present = prefix + "theta" in state_dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *rest)
        _forgive_missing(self, prefix, missing_keys)
        if present:
            self.init_done = True

    def truncation(self) -> Tensor:
        return F.softplus(self.theta)

    @torch.no_grad()
    def set_truncation(self, alpha: float | Tensor) -> None:
        self.theta.copy_(torch.tensor(inverse_softplus(float(alpha))))

    def forward(self, x: Tensor, threshold: Tensor | None = None) -> Tensor:
        if not self.init_done:
            self.set_truncation(max(float(x.detach().abs().max()), 1e-8))
            self.init_done = True
        if self.observing:
            self.observed.append(float(x.detach().abs().max()))
        if self.sampling:  # the largest element and an even stride: what the Lp search reads
            flat = x.detach().reshape(-1)
            stride = max(1, flat.numel() // SAMPLE_ELEMENTS)
            self.samples.append(torch.cat([flat[flat.abs().argmax()].reshape(1), flat[::stride]]))
        alpha = F.softplus(self.theta)
        return alpha if threshold is None else alpha / threshold


class _NIPQPieces(ExtendedInjector):
    """What every NIPQ quantizer shares: learned bits and truncation over the shared PQN IntQuant."""

    bit_width_impl_type = BitWidthImplType.PARAMETER  # read by Brevitas' solvers (learned bits)
    bit_width_impl = LearnedBitWidth
    bit_width = 4  # nominal width (the default target); learning starts at initial_bit_width
    initial_bit_width = REFERENCE_INITIAL_BITS
    stochastic_bit_rounding = True
    scaling_impl_type = ScalingImplType.PARAMETER  # read by Brevitas' solvers (learned scale)
    scaling_impl = LearnedTruncation
    restrict_scaling_type = RestrictValueType.FP  # int threshold 2^(b-1)-1 / 2^b-1, not a power of two
    scaling_per_output_type = ScalingPerOutputType.TENSOR  # one α per tensor (docs/nipq_method.md)
    int_quant = PseudoQuantIntQuant  # the one PQN implementation (hdrq_plugin.quant.noise)
    quant_mode = QuantMode.NOISE  # phase 1; nipq_train switches to STE with bits frozen
    noise_shape = "histogram"  # docs/nipq_method.md: histogram of the tensor's own rounding error
    drop_probability = 0.0
    lsq_gradient_scaling = False  # switched on for the hard phase (LSQ)


class NIPQWeightQuantizer(_NIPQPieces, quant_base.IntQuant, WeightQuantSolver):
    """Signed narrow-range weight quantizer ``±(2^(b−1)−1)``, ``Δ = α/(2^(b−1)−1)``, α from max|W|."""

    narrow_range = True
    truncation_init = None  # max|W| of the tracked weight


class NIPQActQuantizer(_NIPQPieces, quant_base.UintQuant, ActQuantSolver):
    """Unsigned activation quantizer ``[0, 2^b−1]``, ``Δ = α/(2^b−1)``, α starts at 6 (θ_α ≈ 6)."""

    truncation_init = UNSIGNED_ACT_TRUNCATION


class NIPQSignedActQuantizer(_NIPQPieces, quant_base.IntQuant, ActQuantSolver):
    """Signed narrow-range activation quantizer ``±(2^(b−1)−1)``, α starts at 3."""

    narrow_range = True
    truncation_init = SIGNED_ACT_TRUNCATION


def pin_learned_bits(module: nn.Module, bits: int) -> int:
    """Freeze every NIPQ bit-width under ``module`` (a quantizer proxy) at ``bits``; returns how many."""
    learned = [m for m in module.modules() if isinstance(m, LearnedBitWidth)]
    for m in learned:
        m.freeze(bits)
        m.pinned = True
    return len(learned)
