"""The block-wise reconstruction loop shared by HDRQ, QDrop, BRECQ and AdaRound (docs/hdrq_method.md §4, §6).

For each unit, in forward order:

1. ``y_fp`` = the unit's float output (quantization disabled, original weights) on ``x_fp``;
2. train for ``config.iterations`` steps on one random calibration sample per step:
   ``x = where(U < p, x_q, x_fp)`` (QDrop), loss ``mean_{N,H,W} Σ_C (y_q − y_fp)²`` plus
   ``λ_D Σ ‖W − W_src‖_F`` (HDRQ) or the AdaRound rounding penalty (baselines);
   HDRQ trains under pseudo-quantization noise, then STE for the last 20 %;
3. freeze: plain rounding, no noise, no dropping, hard AdaRound rounding;
4. ``y_q`` = the frozen unit's output on ``x_q``, which becomes the next units' ``x_q``.

The quantizers (modes, parameter groups) are driven through :mod:`hdrq_plugin.quant.control`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..data import plain_tensor
from ..progress import progress_bar
from ..quant.control import (
    activation_scale_parameters,
    freeze_rounding,
    rounding_parameters,
    rounding_regularizer,
    set_activation_drop,
    set_noise_shape,
    set_quant_mode,
    weight_scale_parameters,
)
from ..quant.quantizers import QuantMode
from .cache import BoundaryCache, StoredValue
from .config import HDRQConfig
from .objective import (
    annealed_beta,
    cosine_factor,
    distance_penalty,
    noise_iterations,
    qdrop_mix,
    reconstruction_error,
    warmup_cosine_factor,
)
from .units import ReconstructionUnit, find_reconstruction_units, run_model_through_units

with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    from brevitas.graph.calibrate import quantization_status_manager

__all__ = ["IterationRecord", "UnitReport", "ReconstructionReport", "reconstruct"]

_EVAL_CHUNK = 64  # samples per no-grad forward when filling the cache


@dataclass(frozen=True)
class IterationRecord:
    """What one training step did; handed to the ``callback`` of :func:`reconstruct`."""

    unit: str
    step: int
    iterations: int
    loss: float
    reconstruction: float
    regulariser: float
    module: nn.Module  # the unit, in the state it had during this step (modes, drop)


@dataclass(frozen=True)
class UnitReport:
    name: str
    layers: tuple[str, ...]
    iterations: int
    seconds: float
    error_before: float  # mean reconstruction error of the unit on x_q before training
    error_after: float  # the same after freezing (what the next unit sees)


@dataclass
class ReconstructionReport:
    method: str
    units: list[UnitReport] = field(default_factory=list)
    cache_peak_bytes: int = 0
    seconds: float = 0.0


def reconstruct(
    qmodel: nn.Module,
    inputs: Tensor,
    source_weights: dict[str, Tensor],
    config: HDRQConfig,
    *,
    callback: Callable[[IterationRecord], None] | None = None,
) -> ReconstructionReport:
    """Reconstruct every unit of a prepared ``qmodel`` on calibration ``inputs`` (``[N, ...]``).

    ``qmodel`` already carries the method's weight quantizers with initialised steps and
    calibrated activation steps; ``source_weights`` maps each Conv/Linear name to the BN-folded
    source weight of the distance term. Seeding is the caller's business (see ``hdrq_calibrate``).
    """
    start = time.perf_counter()
    qmodel.eval()
    units = find_reconstruction_units(qmodel, config.granularity)
    _check_units_reproduce_model(qmodel, units, inputs[:2])
    placeholders = [n.name for n in qmodel.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ValueError(f"calibration supports models with one input tensor; this one takes {placeholders}")
    cache = BoundaryCache({placeholders[0]: inputs})
    report = ReconstructionReport(method=config.method)
    total = len(units) * config.iterations
    with progress_bar(total=total, desc=f"{config.method} reconstruction", unit="it") as bar:
        for index, unit in enumerate(units):
            unit_start = time.perf_counter()
            x_q, x_fp = cache.inputs_of(unit)
            with _float_mode(unit.module):
                y_fp = _run_over_samples(unit, x_fp)
            error_before = _mean_error(unit, x_q, y_fp)
            if config.reconstructs:
                _train_unit(qmodel, unit, x_q, x_fp, y_fp, source_weights, config, callback, bar)
            _freeze(unit.module)
            y_q = _run_over_samples(unit, x_q)
            report.units.append(UnitReport(
                name=unit.name, layers=unit.layers, iterations=config.iterations if config.reconstructs else 0,
                seconds=time.perf_counter() - unit_start, error_before=error_before,
                error_after=_error_of(y_q, y_fp)))
            cache.advance(unit, y_q, y_fp, units[index + 1:])
    qmodel.eval()
    report.cache_peak_bytes = cache.peak_bytes
    report.seconds = time.perf_counter() - start
    return report


# --- one unit --------------------------------------------------------------------------------------

def _train_unit(qmodel, unit: ReconstructionUnit, x_q, x_fp, y_fp, source_weights, config: HDRQConfig,
                callback, bar) -> None:
    layers = unit.layer_modules(qmodel)
    module = unit.module
    optimisers, schedulers, trained = _optimisers(module, layers, config, unit.name)
    if not trained:
        return  # nothing of this unit is learnable under this config (e.g. no HDRQ act quantizer)
    use_distance = config.trains_latent_weights and config.distance_weight > 0
    sources = [source_weights[name] for name, _ in layers] if use_distance else []
    noisy_steps = noise_iterations(config.iterations, config.noise_fraction) if config.weight_rounding == "noise" else 0
    samples = x_q[0].value.shape[0]

    module.train()
    _keep_dropout_off(module)
    set_noise_shape(module, config.noise_shape)
    set_activation_drop(module, config.drop_probability)
    set_quant_mode(module, QuantMode.NOISE if noisy_steps > 0 else QuantMode.STE)
    with torch.enable_grad(), _requires_grad(trained):  # callers may hold a no_grad() context
        for step in range(config.iterations):
            if step == noisy_steps and noisy_steps > 0:
                set_quant_mode(module, QuantMode.STE)  # docs/hdrq_method.md §4: the last 20 % round with STE
            index = torch.randint(samples, (config.batch_size,))
            inputs = [_mixed_input(q, f, index, config.drop_probability) for q, f in zip(x_q, x_fp, strict=True)]
            outputs = unit.run(*inputs)
            error = sum(reconstruction_error(plain_tensor(o), y.value[index])
                        for o, y in zip(outputs, y_fp, strict=True))
            regulariser = torch.zeros(())
            if use_distance:  # docs/hdrq_method.md §3.2
                regulariser = regulariser + distance_penalty(
                    [layer.weight for _, layer in layers], sources, config.distance_weight)
            if config.learns_rounding and step >= config.warmup_fraction * config.iterations:  # docs/hdrq_method.md §6
                beta = annealed_beta(step, config.iterations, config.warmup_fraction,
                                     config.beta_start, config.beta_end)
                regulariser = regulariser + config.rounding_loss_weight * rounding_regularizer(module, beta)
            loss = error + regulariser
            if not torch.isfinite(loss):
                raise FloatingPointError(f"reconstruction loss of unit {unit.name!r} became {loss.item()} at step {step}")
            for optimiser in optimisers:
                optimiser.zero_grad(set_to_none=True)
            loss.backward()
            for optimiser in optimisers:
                optimiser.step()
            for scheduler in schedulers:
                scheduler.step()
            if callback is not None:
                callback(IterationRecord(unit=unit.name, step=step, iterations=config.iterations, loss=loss.item(),
                                         reconstruction=error.item(), regulariser=regulariser.item(), module=module))
            bar.update(1)
    for param in trained:
        param.grad = None


def _optimisers(module: nn.Module, layers, config: HDRQConfig, unit_name: str):
    """The method's Adam optimisers and schedules (docs/hdrq_method.md §4, §6); returns them and the trained parameters."""
    optimisers, schedulers, trained = [], [], []
    if config.trains_latent_weights:  # HDRQ: latent weights and weight steps, warm-up then cosine
        params = [layer.weight for _, layer in layers] + weight_scale_parameters(module)
        start_factor = config.warmup_start_lr / config.weight_lr
        _add_optimiser(optimisers, schedulers, params, config.weight_lr,
                       lambda step: warmup_cosine_factor(step, config.iterations, config.warmup_fraction, start_factor))
        trained += params
    if config.learns_rounding:  # AdaRound's V, constant lr as in QDrop's recon.py
        params = rounding_parameters(module)
        if not params:
            raise TypeError(f"unit {unit_name!r} has no learned-rounding weight quantizer for {config.method}")
        _add_optimiser(optimisers, schedulers, params, config.rounding_lr, None)
        trained += params
    if config.train_act_scales:  # LSQ activation steps, cosine to 0
        params = activation_scale_parameters(module)
        if params:
            _add_optimiser(optimisers, schedulers, params, config.act_scale_lr,
                           lambda step: cosine_factor(step, config.iterations))
            trained += params
    return optimisers, schedulers, trained


def _add_optimiser(optimisers, schedulers, params, lr, factor) -> None:
    optimiser = torch.optim.Adam(params, lr=lr)
    optimisers.append(optimiser)
    if factor is not None:
        # LambdaLR on our pure schedule functions: SequentialLR cannot express a zero-length warm-up
        schedulers.append(torch.optim.lr_scheduler.LambdaLR(optimiser, factor))


def _mixed_input(x_q: StoredValue, x_fp: StoredValue, index: Tensor, drop_probability: float) -> Any:
    """The unit's input for one step: QDrop-mixed values with x_q's quantization metadata,
    which the layers' integer biases need."""
    if drop_probability <= 0.0:
        return x_q.rows(index, training=True)
    mixed = qdrop_mix(x_q.value[index], x_fp.value[index], drop_probability)
    return x_q.rows(index, training=True, value=mixed)


def _freeze(module: nn.Module) -> None:
    """After its reconstruction a unit computes exactly as deployed (docs/hdrq_method.md §4)."""
    set_quant_mode(module, QuantMode.ROUND)
    set_activation_drop(module, 0.0)
    freeze_rounding(module)
    module.eval()


# --- helpers -------------------------------------------------------------------------------------

@torch.no_grad()
def _run_over_samples(unit: ReconstructionUnit, inputs: list[StoredValue]) -> list[StoredValue]:
    was_training = unit.module.training
    unit.module.eval()
    samples = inputs[0].value.shape[0]
    chunks = []
    for start in range(0, samples, _EVAL_CHUNK):
        index = torch.arange(start, min(start + _EVAL_CHUNK, samples))
        chunks.append(unit.run(*(x.rows(index, training=False) for x in inputs)))
    unit.module.train(was_training)
    return [StoredValue.from_batches([chunk[i] for chunk in chunks]) for i in range(len(unit.outputs))]


def _error_of(outputs: list[StoredValue], targets: list[StoredValue]) -> float:
    return float(sum(reconstruction_error(o.value, t.value) for o, t in zip(outputs, targets, strict=True)))


def _mean_error(unit, x_q, y_fp) -> float:
    return _error_of(_run_over_samples(unit, x_q), y_fp)


class _float_mode(quantization_status_manager):
    """Quantization off (weights, biases, activations): the BN-folded float computation."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module, disable_act_quant=True, disable_weight_quant=True, disable_bias_quant=True)


class _requires_grad:
    """Make ``params`` trainable for the duration, restoring the caller's flags afterwards."""

    def __init__(self, params) -> None:
        self.params = params
        self.saved = [p.requires_grad for p in params]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(True)

    def __exit__(self, *exc):
        for p, flag in zip(self.params, self.saved, strict=True):
            p.requires_grad_(flag)


def _keep_dropout_off(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()


@torch.no_grad()
def _check_units_reproduce_model(qmodel: nn.Module, units: list[ReconstructionUnit], example: Tensor) -> None:
    """Fail early if the unit split changed the computation (it must not, by construction)."""
    expected = plain_tensor(qmodel(example))
    got = plain_tensor(run_model_through_units(qmodel, units, example))
    if not torch.equal(expected, got):
        raise RuntimeError(
            f"running the {len(units)} reconstruction units in sequence differs from the model "
            f"(max abs diff {(expected - got).abs().max().item():.3g}); please report this model")
