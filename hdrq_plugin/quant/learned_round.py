"""AdaRound learned rounding, the weight quantizer of the AdaRound / BRECQ / QDrop baselines.

Source: Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization" (ICML
2020); BRECQ/QDrop use it unchanged (docs/hdrq_method.md §6). Weights are ``s * clamp(floor(W/s) + h(V))``
with the rectified sigmoid ``h(V) = clamp(σ(V)(ζ-γ) + γ, 0, 1)``, ζ = 1.1, γ = -0.1; ``V`` starts
where ``h(V)`` equals the fractional part of ``W/s`` (so the first forward equals ``W``), is
soft while it trains and hard (``h(V) > 0.5``) afterwards; the regulariser
``Σ 1 - |2h(V) - 1|^β`` pushes ``h`` to 0 or 1.

Built on Brevitas' ``LearnedRoundSte`` and ``LearnedRoundHardSigmoid``
(``brevitas.core.function_wrapper.learned_round``). Two things are added, hence the subclass:
``V`` is initialised at the first forward, because the step it depends on comes from the L_p
search that also runs then (Brevitas expects ``V`` at construction); and an explicit frozen
state, because block-wise reconstruction runs later units in training mode while earlier
units must already round hard (Brevitas rounds hard only in evaluation mode).
"""

from __future__ import annotations

import torch
from brevitas import config
from brevitas.core.function_wrapper.learned_round import LearnedRoundSte
from brevitas.core.quant import IntQuant as BrevitasIntQuant
from brevitas.inject.enum import FloatToIntImplType, LearnedRoundImplType
from torch import Tensor

from hdrq_plugin.quant.quantizers import HDRQQuantizer

__all__ = ["AdaRoundSte", "AdaRoundQuantizer", "inverse_rectified_sigmoid"]


def inverse_rectified_sigmoid(h: Tensor, zeta: float = 1.1, gamma: float = -0.1) -> Tensor:
    """``V`` with ``clamp(σ(V)(ζ-γ) + γ, 0, 1) = h`` for ``h`` in [0, 1) (AdaRound's initialisation)."""
    return -torch.log((zeta - gamma) / (h - gamma) - 1)


class AdaRoundSte(LearnedRoundSte):
    """Brevitas learned rounding with a lazy initialisation of ``V`` and a frozen (hard) state.

    ``initialized`` and ``frozen`` are buffers, so both survive a state-dict round trip.
    """

    def __init__(self, learned_round_impl, learned_round_init, input_view_impl, device=None, dtype=None) -> None:
        super().__init__(learned_round_impl, learned_round_init, input_view_impl, device=device, dtype=dtype)
        self.register_buffer("initialized", torch.tensor(False, device=device))
        self.register_buffer("frozen", torch.tensor(False, device=device))

    @property
    def zeta(self) -> float:
        return self.learned_round_impl.learned_round_zeta

    @property
    def gamma(self) -> float:
        return self.learned_round_impl.learned_round_gamma

    @torch.no_grad()
    def initialize_from(self, scaled_weight: Tensor) -> None:
        """Set ``V`` so that ``h(V)`` is the fractional part of ``W/s`` (``scaled_weight``)."""
        if scaled_weight.shape != self.value.shape:
            raise ValueError(f"W/s has shape {tuple(scaled_weight.shape)}, V has {tuple(self.value.shape)}")
        fraction = scaled_weight - torch.floor(scaled_weight)
        self.value.copy_(inverse_rectified_sigmoid(fraction, self.zeta, self.gamma))
        self.initialized.fill_(True)

    def rectified_sigmoid(self) -> Tensor:
        """Soft ``h(V)`` in [0, 1], whatever the training flag."""
        return torch.clamp(torch.sigmoid(self.value) * (self.zeta - self.gamma) + self.gamma, 0.0, 1.0)

    def regularizer(self, beta: float) -> Tensor:
        """``Σ 1 - |2h(V) - 1|^β`` (AdaRound eq. 24)."""
        return (1 - (2 * self.rectified_sigmoid() - 1).abs().pow(beta)).sum()

    def freeze(self) -> None:
        self.frozen.fill_(True)

    def forward(self, x: Tensor) -> Tensor:
        if not bool(self.initialized):
            self.initialize_from(self.input_view_impl(x.detach()))
        if bool(self.frozen) or not self.training:
            up = (self.rectified_sigmoid() > 0.5).to(x.dtype)  # Brevitas' hard rule, h(V) > 0.5
        else:
            up = self.rectified_sigmoid()
        up = self.tensor_slicer(self.input_view_impl(up))
        return self.learned_round_impl.round_forward(x, up)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        loaded_value = prefix + "value" in state_dict
        if loaded_value and prefix + "initialized" not in state_dict:
            self.initialized.fill_(True)  # a V saved without the flag is a trained V
        if config.IGNORE_MISSING_KEYS:  # swapping with init_tensor_quant(preserve_state_dict=True)
            for key in ("initialized", "frozen"):
                if prefix + key in missing_keys:
                    missing_keys.remove(prefix + key)


class AdaRoundQuantizer(HDRQQuantizer):
    """Per-tensor signed weight quantizer with AdaRound rounding and an L_p-searched step."""

    int_quant = BrevitasIntQuant  # rounding goes through float_to_int_impl, never through noise
    float_to_int_impl_type = FloatToIntImplType.LEARNED_ROUND  # exporters then read the integers
    float_to_int_impl = AdaRoundSte
    learned_round_impl_type = LearnedRoundImplType.HARD_SIGMOID  # rectified sigmoid, ζ=1.1, γ=-0.1

