"""``HDRQConfig``: one reconstruction engine, configured as HDRQ, QDrop, BRECQ, AdaRound or RTN.

The methods differ by a few switches (docs/hdrq_method.md §6):

============  ============  ==========  ==========  ============  ===========
method        unit          weights     rounding    input mixing  regulariser
============  ============  ==========  ==========  ============  ===========
RTN           —             —           nearest     —             —
AdaRound      layer         V (h(V))    learned     off           rounding
BRECQ         block         V (h(V))    learned     off           rounding
QDrop         block         V (h(V))    learned     p = 0.5       rounding
HDRQ          block         W and s     noise→STE   p = 0.5       distance
============  ============  ==========  ==========  ============  ===========

Every reconstruction method also learns the activation steps (LSQ). Ablations are configs too:
``HDRQConfig.hdrq(noise=False)`` (STE from the first iteration), ``HDRQConfig.hdrq(distance_weight=0)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from ..options import RECONSTRUCTION_METHODS

WeightRounding = Literal["nearest", "noise", "ste", "learned"]
NoiseShape = Literal["histogram", "uniform"]
Granularity = Literal["block", "layer"]

#: Iterations per unit of :meth:`HDRQConfig.cpu_preset`, chosen by measurement
#: (benchmarks/calibration_cost.py --model handwritten: ResNet-8 32/64/128 adapted optdigits → mnist,
#: W4A4, two seeds; float 93.7 %, RTN 21–22 %). QDrop / HDRQ test accuracy: 250 it 90.8 / 92.3 (one
#: seed), 500 it 90.7 / 91.9, 1,000 it 92.5 / 91.3, 2,000 it 93.7 / 93.1 — within a point of the
#: float model only at 2,000, a tenth of the GPU budget, about 2 CPU-minutes per model on one core.
CPU_ITERATIONS = 2000
METHODS = RECONSTRUCTION_METHODS  # the names live in hdrq_plugin.options (torch-free, for the CLI)


@dataclass(frozen=True)
class HDRQConfig:
    """Block-wise reconstruction settings; the defaults are HDRQ's (docs/hdrq_method.md §3–§4).

    ``weight_rounding`` says what is trained: ``"noise"`` and ``"ste"`` train the latent
    weights and the weight scales (``"noise"``: pseudo-quantization noise for the first
    ``noise_fraction`` of the iterations, then round-to-nearest with STE); ``"learned"`` trains
    AdaRound's rounding variables with the rounding penalty; ``"nearest"`` trains nothing (RTN).
    """

    method: str = "hdrq"  # label for reports
    weight_rounding: WeightRounding = "noise"  # docs/hdrq_method.md §3.1: PQN replaces AdaRound
    noise_shape: NoiseShape = "histogram"  # docs/hdrq_method.md §3.1: sampled from the tensor's rounding-error histogram
    noise_fraction: float = 0.8  # docs/hdrq_method.md §4: PQN for 16,000 of 20,000 iterations, then STE
    granularity: Granularity = "block"  # docs/hdrq_method.md §4: residual blocks; stem and head single layers
    iterations: int = 20_000  # docs/hdrq_method.md §4: reference iterations per unit (a GPU budget)
    num_samples: int = 32  # docs/hdrq_method.md §4: reference calibration set, 32 images
    batch_size: int = 1  # docs/hdrq_method.md §4: reference batch, one image per iteration
    drop_probability: float = 0.5  # docs/hdrq_method.md §4: QDrop's p: an element takes its float value (inputs, activations)
    weight_lr: float = 1e-4  # docs/hdrq_method.md §4: Adam on latent weights and weight scales
    warmup_fraction: float = 0.2  # docs/hdrq_method.md §4 / §6: lr warm-up (HDRQ) and rounding-loss warm-up (AdaRound)
    warmup_start_lr: float = 1e-7  # docs/hdrq_method.md §4: linear warm-up from 1e-7
    act_scale_lr: float = 4e-5  # docs/hdrq_method.md §4: Adam on activation steps, cosine to 0 (qdrop_config.yaml scale_lr)
    train_act_scales: bool = True  # docs/hdrq_method.md §6: every baseline learns LSQ activation steps
    rounding_lr: float = 1e-3  # QDrop recon.py: Adam with its default lr on AdaRound's V
    distance_weight: float = 0.05  # docs/hdrq_method.md §3.2: λ_D (ablation grid 5e-3, 1e-2, 5e-2, 1e-1)
    rounding_loss_weight: float = 0.01  # docs/hdrq_method.md §6: BRECQ/QDrop rounding-penalty weight
    beta_start: float = 20.0  # docs/hdrq_method.md §6: β annealed 20 → 2 ...
    beta_end: float = 2.0  # ... after the 20 % warm-up
    seed: int = 0  # every random draw (sample order, QDrop masks, noise) derives from it

    def __post_init__(self) -> None:
        _choice("weight_rounding", self.weight_rounding, ("nearest", "noise", "ste", "learned"))
        _choice("noise_shape", self.noise_shape, ("histogram", "uniform"))
        _choice("granularity", self.granularity, ("block", "layer"))
        for name in ("noise_fraction", "warmup_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if not 0.0 <= self.drop_probability < 1.0:
            raise ValueError(f"drop_probability must be in [0, 1), got {self.drop_probability}")
        for name in ("iterations", "num_samples", "batch_size", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {value!r}")
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")
        for name in ("num_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("weight_lr", "warmup_start_lr", "act_scale_lr", "rounding_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("distance_weight", "rounding_loss_weight", "beta_start", "beta_end"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.warmup_start_lr > self.weight_lr:
            raise ValueError(f"warmup_start_lr {self.warmup_start_lr} exceeds weight_lr {self.weight_lr}")

    # --- what the switches imply ---------------------------------------------------------------
    @property
    def trains_latent_weights(self) -> bool:
        return self.weight_rounding in ("noise", "ste") and self.iterations > 0

    @property
    def learns_rounding(self) -> bool:
        return self.weight_rounding == "learned" and self.iterations > 0

    @property
    def reconstructs(self) -> bool:
        return self.weight_rounding != "nearest" and self.iterations > 0

    def replace(self, **changes) -> HDRQConfig:
        return dataclasses.replace(self, **changes)

    # --- methods -------------------------------------------------------------------------------
    @classmethod
    def rtn(cls, **overrides) -> HDRQConfig:
        """Round-to-nearest with L_p-searched (MSE) scales; nothing is trained."""
        return cls(**{"method": "rtn", "weight_rounding": "nearest", "iterations": 0,
                      "drop_probability": 0.0, "distance_weight": 0.0, "train_act_scales": False,
                      **overrides})

    @classmethod
    def adaround(cls, **overrides) -> HDRQConfig:
        """AdaRound: learned rounding, reconstructed layer by layer on quantized inputs."""
        return cls(**{"method": "adaround", "weight_rounding": "learned", "granularity": "layer",
                      "drop_probability": 0.0, "distance_weight": 0.0, **overrides})

    @classmethod
    def brecq(cls, **overrides) -> HDRQConfig:
        """BRECQ: AdaRound reconstructed block by block."""
        return cls(**{"method": "brecq", "weight_rounding": "learned", "granularity": "block",
                      "drop_probability": 0.0, "distance_weight": 0.0, **overrides})

    @classmethod
    def qdrop(cls, **overrides) -> HDRQConfig:
        """QDrop: BRECQ plus random mixing of quantized and float activations (p = 0.5)."""
        return cls(**{"method": "qdrop", "weight_rounding": "learned", "granularity": "block",
                      "drop_probability": 0.5, "distance_weight": 0.0, **overrides})

    @classmethod
    def hdrq(cls, *, noise: bool = True, **overrides) -> HDRQConfig:
        """HDRQ; ``noise=False`` is the ablation without PQN (STE from the first iteration)."""
        defaults = {"method": "hdrq" if noise else "hdrq-no-noise",
                    "weight_rounding": "noise" if noise else "ste"}
        if overrides.get("distance_weight", None) == 0 and noise:
            defaults["method"] = "hdrq-no-distance"
        return cls(**{**defaults, **overrides})

    @classmethod
    def for_method(cls, name: str, **overrides) -> HDRQConfig:
        """The config of a method by name: ``rtn``, ``adaround``, ``brecq``, ``qdrop`` or ``hdrq``."""
        _choice("method", name, METHODS)
        return getattr(cls, name)(**overrides)

    @classmethod
    def cpu_preset(cls, method: str = "hdrq", **overrides) -> HDRQConfig:
        """A method's config at the CPU budget: :data:`CPU_ITERATIONS` (2,000) iterations per unit.

        The reference 20,000 iterations per unit are a GPU budget. The preset keeps every other
        setting of the paper (32 samples, batch 1, schedules as fractions of the run); 500
        iterations cost a quarter and lost 1–3 points at W4A4 in the measurement above.
        """
        if method != "rtn":
            overrides = {"iterations": CPU_ITERATIONS, **overrides}
        return cls.for_method(method, **overrides)


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
