"""Brevitas quantizers of HDRQ: pseudo-quantization noise, STE rounding and plain rounding.

Use them like any Brevitas quantizer (injector classes, never instances)::

    qnn.QuantConv2d(16, 32, 3, weight_quant=HDRQQuantizer, weight_bit_width=4)
    qnn.QuantConv2d(16, 32, 3, weight_quant=HDRQQuantizer.let(scaling_per_output_channel=True))
    qnn.QuantReLU(act_quant=HDRQActQuantizer, bit_width=4)

Method: ``docs/hdrq_method.md`` §3. Weights are signed ``[-2^(b-1), 2^(b-1)-1]``, activations unsigned
``[0, 2^b-1]`` (after ReLU) or signed; zero point 0. The scale is a learnable parameter that
holds the **step itself** (Brevitas' integer threshold is fixed to 1), as in the reference code,
so Adam's learning rates act on the step as in the paper. It is initialised by the L_p clipping
search of :mod:`hdrq_plugin.quant.step_size` (weights: at the first forward; activations: per batch
under Brevitas ``calibration_mode``, averaged).

Behaviour (the :class:`QuantMode` of each quantizer; helpers in :mod:`hdrq_plugin.quant.control`):

- evaluation (``.eval()``), any mode, and ``ROUND`` in training: ``clamp(round(x/s)) * s``, the
  exact computation of a standard QDQ export;
- ``STE`` (training): the same forward, straight-through gradients (Brevitas ``RoundSte``);
- ``NOISE`` (training): :func:`hdrq_plugin.quant.noise.pseudo_quantize` with noise from the tensor's
  own rounding-error histogram, or uniform.

Activation quantizers in ``STE``/``NOISE`` training also scale their step's gradient by LSQ's
``1/sqrt(numel·qmax)`` and pass their float input element-wise with the QDrop probability.
"""

from __future__ import annotations

import enum
import math

import torch
from brevitas.core.function_wrapper import RoundSte, TensorClamp
from brevitas.core.quant import IntQuant as BrevitasIntQuant
from brevitas.inject import ExtendedInjector
from brevitas.inject.enum import RestrictValueType, ScalingImplType, ScalingPerOutputType, StatsOp
from brevitas.quant import base as quant_base
from brevitas.quant.solver import ActQuantSolver, WeightQuantSolver
from torch import Tensor, nn

from hdrq_plugin.bitspec import MAX_BITS, MIN_BITS
from hdrq_plugin.families import QuantizerFamily
from hdrq_plugin.quant.noise import NOISE_SHAPES, pseudo_quantize, rounding_noise_like
from hdrq_plugin.quant.step_size import CLIPPING_CANDIDATES, LP_NORM, lp_clipping_search, lsq_gradient_scale

__all__ = [
    "QuantMode",
    "HDRQQuantizer",
    "HDRQPerChannelQuantizer",
    "HDRQActQuantizer",
    "HDRQSignedActQuantizer",
    "PseudoQuantIntQuant",
    "LpStepStats",
    "UnitIntScaling",
    "integer_range",
]


class QuantMode(str, enum.Enum):
    """How an HDRQ quantizer rounds in training mode (evaluation always rounds to nearest)."""

    NOISE = "noise"  # pseudo-quantization noise, exact gradients, no STE (docs/hdrq_method.md §3.1)
    STE = "ste"  # round-to-nearest with straight-through gradients (last 20 % of iterations)
    ROUND = "round"  # plain round-to-nearest, as deployed: no noise, no QDrop, no LSQ scaling


def check_bit_width(bit_width: object) -> int:
    """The bit-width as an int, or a ValueError/TypeError naming the supported range."""
    if isinstance(bit_width, Tensor) and bit_width.numel() == 1:
        bit_width = bit_width.item()
    if isinstance(bit_width, float) and bit_width.is_integer():
        bit_width = int(bit_width)
    if not isinstance(bit_width, int) or isinstance(bit_width, bool):
        raise TypeError(f"bit_width must be an integer, got {bit_width!r}")
    if not MIN_BITS <= bit_width <= MAX_BITS:
        raise ValueError(f"bit_width={bit_width} is outside the supported range {MIN_BITS}..{MAX_BITS}")
    return bit_width


def integer_range(bit_width: int, signed: bool, narrow_range: bool = False) -> tuple[int, int]:
    """``(qmin, qmax)``: signed ``[-2^(b-1), 2^(b-1)-1]``, unsigned ``[0, 2^b-1]`` (narrow: one fewer)."""
    bits = check_bit_width(bit_width)
    if signed:
        return -(2 ** (bits - 1)) + int(narrow_range), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1 - int(narrow_range)


class UnitIntScaling(nn.Module):
    """Integer threshold 1: Brevitas' scale parameter then *is* the quantization step."""

    def __init__(self) -> None:  # explicit: Brevitas' injector rejects an inherited *args signature
        super().__init__()

    def forward(self, bit_width: Tensor) -> Tensor:
        return torch.ones_like(bit_width)


class LpStepStats(nn.Module):
    """Brevitas ``scaling_stats_impl`` returning the L_p-optimal step (p = 2.4, 100 candidates).

    Receives the tensor already viewed by Brevitas: flat for per-tensor scaling
    (``stats_reduce_dim=None``), ``(channels, -1)`` for per-channel (``stats_reduce_dim=1``).
    """

    def __init__(
        self,
        bit_width: int,
        signed: bool,
        narrow_range: bool = False,
        stats_reduce_dim: int | None = None,
        lp_norm: float = LP_NORM,
        clipping_candidates: int = CLIPPING_CANDIDATES,
    ) -> None:
        super().__init__()
        self.qmin, self.qmax = integer_range(bit_width, signed, narrow_range)
        if stats_reduce_dim not in (None, 1):
            raise ValueError(
                "LpStepStats supports per-tensor or per-output-channel statistics, "
                f"got reduce dim {stats_reduce_dim}"
            )
        self.stats_reduce_dim = stats_reduce_dim
        self.lp_norm = lp_norm
        self.clipping_candidates = clipping_candidates

    def forward(self, x: Tensor) -> Tensor:
        keep_dim = None if self.stats_reduce_dim is None else 0
        return lp_clipping_search(
            x.detach(), self.qmin, self.qmax, dim=keep_dim, p=self.lp_norm, candidates=self.clipping_candidates
        )


class PseudoQuantIntQuant(BrevitasIntQuant):
    """Brevitas ``IntQuant`` whose training forward follows :class:`QuantMode`.

    Evaluation and ``ROUND`` run Brevitas' own ``IntQuant.forward`` unchanged, so the integers
    are exactly what the QDQ exporter recomputes with ``QuantizeLinear`` (round half to even).
    Assumes a zero zero-point, as every quantizer in this module has.
    """

    def __init__(
        self,
        narrow_range: bool,
        signed: bool,
        input_view_impl: nn.Module,
        bit_width: int,
        float_to_int_impl: nn.Module | None = None,
        tensor_clamp_impl: nn.Module | None = None,
        quant_mode: QuantMode | str = QuantMode.STE,
        noise_shape: str = "histogram",
        drop_probability: float = 0.0,
        lsq_gradient_scaling: bool = False,
    ) -> None:
        float_to_int_impl = RoundSte() if float_to_int_impl is None else float_to_int_impl
        tensor_clamp_impl = TensorClamp() if tensor_clamp_impl is None else tensor_clamp_impl
        super().__init__(narrow_range, signed, input_view_impl, float_to_int_impl, tensor_clamp_impl)
        check_bit_width(bit_width)  # fail when the layer is built, naming the supported range
        self.quant_mode = quant_mode
        self.noise_shape = noise_shape
        self.drop_probability = drop_probability
        self.lsq_gradient_scaling = bool(lsq_gradient_scaling)

    @property
    def quant_mode(self) -> QuantMode:
        return self._quant_mode

    @quant_mode.setter
    def quant_mode(self, mode: QuantMode | str) -> None:
        self._quant_mode = QuantMode(mode)  # raises ValueError naming the bad mode

    @property
    def noise_shape(self) -> str:
        return self._noise_shape

    @noise_shape.setter
    def noise_shape(self, shape: str) -> None:
        if shape not in NOISE_SHAPES:
            raise ValueError(f"noise_shape must be one of {NOISE_SHAPES}, got {shape!r}")
        self._noise_shape = shape

    @property
    def drop_probability(self) -> float:
        return self._drop_probability

    @drop_probability.setter
    def drop_probability(self, probability: float) -> None:
        if not 0.0 <= float(probability) < 1.0:
            raise ValueError(f"drop_probability must be in [0, 1), got {probability}")
        self._drop_probability = float(probability)

    def forward(self, scale: Tensor, zero_point: Tensor, bit_width: Tensor, x: Tensor) -> Tensor:
        if not self.training or self.quant_mode is QuantMode.ROUND:
            if self._no_autograd(scale, zero_point, x) and self._plain_round_and_clamp():
                return self._quantize_in_place(scale, zero_point, bit_width, x)
            return super().forward(scale, zero_point, bit_width, x)
        qmin, qmax = self.min_int(bit_width), self.max_int(bit_width)
        if self.lsq_gradient_scaling:
            scale = lsq_gradient_scale(scale, 1.0 / math.sqrt(x.numel() * float(qmax)))
        if self.quant_mode is QuantMode.NOISE:
            x = self.input_view_impl(x)
            noise = rounding_noise_like(x, scale.detach(), qmin, qmax, shape=self.noise_shape)
            y = pseudo_quantize(x, scale, qmin, qmax, noise)
        else:
            y = super().forward(scale, zero_point, bit_width, x)
            x = self.input_view_impl(x)
        if self.drop_probability > 0.0:
            # QDrop: each element keeps its float value with probability p (docs/hdrq_method.md §4)
            y = torch.where(torch.rand_like(y) < self.drop_probability, x, y)
        return y

    @staticmethod
    def _no_autograd(*tensors: Tensor) -> bool:
        return not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)

    def _plain_round_and_clamp(self) -> bool:
        """Brevitas' own rounding, clamp and no quantization delay: what the in-place path computes
        (a learned rounding such as AdaRound's keeps Brevitas' path)."""
        return (type(self.float_to_int_impl) is RoundSte and type(self.tensor_clamp_impl) is TensorClamp
                and type(self.delay_wrapper.delay_impl).__name__ == "_NoDelay")

    def _quantize_in_place(self, scale: Tensor, zero_point: Tensor, bit_width: Tensor, x: Tensor) -> Tensor:
        """Brevitas ``IntQuant.forward`` op for op, on one buffer: ``(clamp(round(x/s + z)) - z) * s``.

        Inference only (no autograd). Brevitas allocates a tensor per step and clamps with two
        ``torch.where``; activation quantization was two thirds of an evaluation's CPU time (the
        demo's ResNet, 1 thread). Each element sees the same IEEE operations in the same order,
        and ``clamp`` equals the two ``where`` for every value, NaN and -0.0 included, so the
        output is bit-identical (tested against Brevitas' path).
        """
        y = self.input_view_impl(x) / scale
        y.add_(zero_point).round_()  # RoundSte's forward is torch.round (half to even)
        y.clamp_(self.min_int(bit_width), self.max_int(bit_width))
        return y.sub_(zero_point).mul_(scale)

    def extra_repr(self) -> str:
        return (
            f"signed={self.signed}, mode={self.quant_mode.value}, "
            f"noise_shape={self.noise_shape}, drop_probability={self.drop_probability}, "
            f"lsq_gradient_scaling={self.lsq_gradient_scaling}"
        )


class _HDRQScaling(ExtendedInjector):
    """Mixin pieces shared by every HDRQ quantizer: learnable step from the L_p search."""

    scaling_impl_type = ScalingImplType.PARAMETER_FROM_STATS
    scaling_stats_op = StatsOp.MAX  # selects Brevitas' per-tensor/per-channel views only
    scaling_stats_impl = LpStepStats  # the statistic itself: L_p-optimal step (docs/hdrq_method.md §3)
    int_scaling_impl = UnitIntScaling  # the parameter is the step, as in the reference code
    restrict_scaling_type = RestrictValueType.FP
    scaling_min_val = 1e-10  # Brevitas' own quantizers' floor on the scale
    int_quant = PseudoQuantIntQuant
    quant_mode = QuantMode.STE
    noise_shape = "histogram"  # docs/hdrq_method.md §3.1; "uniform" is the ablation
    drop_probability = 0.0  # QDrop's 0.5 is switched on by the engine during reconstruction


class HDRQQuantizer(_HDRQScaling, quant_base.IntQuant, WeightQuantSolver):
    """Signed per-tensor weight quantizer ``[-2^(b-1), 2^(b-1)-1]`` with a learnable step.

    Per-channel: ``HDRQQuantizer.let(scaling_per_output_channel=True)`` or
    :class:`HDRQPerChannelQuantizer`; the step then has shape ``(out_channels, 1, ..., 1)``.
    """

    bit_width = 4  # the paper's headline weight width (W4A4 / W4A8)
    narrow_range = False  # reference range [-2^(b-1), 2^(b-1)-1] (docs/hdrq_method.md §3)
    scaling_per_output_type = ScalingPerOutputType.TENSOR  # the paper quantizes per tensor
    lsq_gradient_scaling = False  # the reference scales only the activation steps' gradients


class HDRQPerChannelQuantizer(HDRQQuantizer):
    """:class:`HDRQQuantizer` with one step per output channel (our extension of the paper)."""

    scaling_per_output_channel = True


class HDRQActQuantizer(_HDRQScaling, quant_base.UintQuant, ActQuantSolver):
    """Unsigned per-tensor activation quantizer ``[0, 2^b-1]`` (after ReLU), LSQ-scaled step."""

    bit_width = 8  # Brevitas' default activation width; the bit spec sets the real one
    scaling_per_output_type = ScalingPerOutputType.TENSOR
    collect_stats_steps = 300  # Brevitas' default; calibration_mode extends it to every batch
    lsq_gradient_scaling = True  # LSQ 1/sqrt(numel·qmax) on the step (docs/hdrq_method.md §3.1)


class HDRQSignedActQuantizer(_HDRQScaling, quant_base.IntQuant, ActQuantSolver):
    """Signed per-tensor activation quantizer ``[-2^(b-1), 2^(b-1)-1]`` for inputs that can be negative."""

    bit_width = 8
    narrow_range = False
    scaling_per_output_type = ScalingPerOutputType.TENSOR
    collect_stats_steps = 300
    lsq_gradient_scaling = True


#: The family every reconstruction method ends in (AdaRound-style models are baked onto it).
HDRQ_FAMILY = QuantizerFamily("hdrq", HDRQQuantizer, HDRQActQuantizer, HDRQSignedActQuantizer)
