"""What each benchmark cell computes, from a loaded zoo to rows of accuracies (no caching here).

Rows have the ``report.json`` shape (``method``, ``bits``, ``stage``, ``target``, ``accuracy``)
plus ``seed``, ``merge`` (the merged targets), ``quantizer`` and ``rounding``. Merged accuracies
are measured on every served target's test split, and a merge's harmonic mean is taken of the
per-target means over noise seeds (the reference's "mean per target, then 2ab/(a+b)").
"""

from __future__ import annotations

import dataclasses
import itertools
import time
import warnings
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.data import ConcatDataset, TensorDataset

from hdrq_examples.zoo import Benchmark
from hdrq_plugin.convert.to_brevitas import convert_to_brevitas
from hdrq_plugin.evaluation import accuracy
from hdrq_plugin.merge.barrier import BarrierResult, error_barrier
from hdrq_plugin.merge.float_merge import average_float_models
from hdrq_plugin.merge.models import merge_models, read_weight_grid
from hdrq_plugin.merge.rules import average_dequantized, round_ties_half_to_even
from hdrq_plugin.nipq.train import quantize_nipq
from hdrq_plugin.ptq.config import HDRQConfig
from hdrq_plugin.ptq.gptq import gptq_calibrate
from hdrq_plugin.quant.control import quantized_layers
from hdrq_plugin.quantize import quantize_model
from hdrq_plugin.run.report import Report

from .plan import DEQUANTIZED_AVERAGE, NIPQ_BATCH, STOCHASTIC_RULES, Variant

with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    from brevitas.graph.calibrate import quantization_status_manager


def merge_label(targets: Sequence[str]) -> str:
    return "+".join(targets)


def accuracy_rows(method: str, bits: str, stage: str, accuracies: dict[str, float], *, split: str = "test",
                  **extra) -> list[dict]:
    """Rows for each target and, for several targets, their harmonic mean (Report's rule)."""
    report = Report()
    report.add_per_target(method, bits, stage, accuracies, split=split, **extra)
    return report.rows


@contextmanager
def stopwatch(timings: dict, name: str = "seconds"):
    """Wall-clock and CPU seconds (all threads) of the block, into ``timings``."""
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield timings
    finally:
        timings[name] = time.perf_counter() - wall
        timings[f"cpu_{name}"] = time.process_time() - cpu


# --- float references ---------------------------------------------------------------------------
def float_cell(bench: Benchmark, targets: tuple[str, ...], subsets: list[tuple[str, ...]],
               barrier_pairs: list[tuple[str, ...]], barrier_steps: int, seed: int) -> dict:
    """θ0 on every target, each θt on its own target, the float merge of every subset, float barriers."""
    tests = {t: bench.domains[t].test for t in targets}
    rows = accuracy_rows("source", "fp32", "float_source", {t: accuracy(bench.source_model, tests[t])
                                                            for t in targets}, seed=seed, merge="")
    for t in targets:
        rows += accuracy_rows("adapted", "fp32", "float_adapted", {t: accuracy(bench.adapted[t], tests[t])},
                              seed=seed, merge="")
    for subset in subsets:
        merged = average_float_models([bench.adapted[t] for t in subset])
        rows += accuracy_rows("float-merge", "fp32", "float_merged", {t: accuracy(merged, tests[t]) for t in subset},
                              seed=seed, merge=merge_label(subset))
    barriers = []
    for a, b in barrier_pairs:
        data = ConcatDataset([tests[a], tests[b]])
        result = error_barrier(bench.adapted[a], bench.adapted[b], data, steps=barrier_steps, label="float")
        barriers.append(barrier_dict(result, pair=(a, b), method="float", bits="fp32", seed=seed))
    images = 2 * sum(len(tests[t]) for t in targets) + sum(len(tests[t]) for s in subsets for t in s)
    images += barrier_steps * sum(len(tests[a]) + len(tests[b]) for a, b in barrier_pairs)
    return {"rows": rows, "barriers": barriers, "evaluated_images": images}


def barrier_dict(result: BarrierResult, **context) -> dict:
    return {**context, "pair": list(context.get("pair", ())), **dataclasses.asdict(result),
            "max_barrier": result.max_barrier, "midpoint_barrier": result.midpoint_barrier}


# --- quantization -------------------------------------------------------------------------------
def quantize_variant(variant: Variant, bits: str, model: nn.Module, calibration, source: nn.Module,
                     seed: int, iterations: int | None, num_samples: int | None = None,
                     train=None) -> tuple[nn.Module, str]:
    """Quantize one float model with ``variant``; returns ``(model, quantizer family)``.

    NIPQ trains on ``train`` (the target's labelled train split) instead of ``calibration``.
    """
    if variant.method == "nipq":
        if train is None or len(train) == 0:
            raise ValueError(f"variant {variant.label!r} (NIPQ training) needs the target's labelled train split")
        qmodel, _ = quantize_nipq(model, train, bits, epochs=variant.epochs, seed=seed, batch_size=NIPQ_BATCH,
                                  config=variant.nipq_config(seed), progress=False)
        return qmodel, "nipq"
    config = variant.config(seed, iterations)
    if config is None:  # Brevitas GPTQ on Brevitas' own quantizers (parameter scales, see gptq.py)
        torch.manual_seed(seed)
        qmodel = convert_to_brevitas(model, bits)
        gptq_calibrate(qmodel, calibration, num_samples=num_samples or HDRQConfig().num_samples)
        return qmodel, "rtn"
    if num_samples is not None:
        config = config.replace(num_samples=num_samples)
    result = quantize_model(model, calibration, config, bits=bits, source=source)
    return result.model, result.family


def quantize_cell(bench: Benchmark, variant: Variant, bits: str, target: str, seed: int,
                  iterations: int | None, splits: Sequence[str] = ("test",)) -> tuple[nn.Module, str, dict]:
    """θ_target quantized with its own calibration split; its accuracy on its own target's ``splits``."""
    timings: dict = {}
    with stopwatch(timings):  # the calibration time the benchmark reports
        qmodel, family = quantize_variant(variant, bits, bench.adapted[target], bench.domains[target].calib,
                                          bench.source_model, seed, iterations, train=bench.domains[target].train)
    rows, images = [], 0
    with stopwatch(timings, "eval_seconds"):
        for split in splits:
            data = getattr(bench.domains[target], split)
            rows += accuracy_rows(variant.label, bits, "single", {target: accuracy(qmodel, data)}, split=split,
                                  seed=seed, merge="", quantizer=variant.label, time_s=timings["seconds"])
            images += len(data)
    return qmodel, family, {"rows": rows, "family": family, "evaluated_images": images, **timings}


def pooled_calibration(bench: Benchmark, targets: Sequence[str]) -> TensorDataset:
    """The targets' calibration splits interleaved (t1[0], t2[0], t1[1], …): any prefix stays mixed."""
    splits = [bench.domains[t].calib.tensors for t in targets]
    size = min(len(images) for images, _ in splits)
    images = torch.stack([images[:size] for images, _ in splits], dim=1).flatten(0, 1)
    labels = torch.stack([labels[:size] for _, labels in splits], dim=1).flatten(0, 1)
    return TensorDataset(images, labels)  # labels are never read by calibration


def merge_then_quantize_cell(bench: Benchmark, variant: Variant, bits: str, subset: tuple[str, ...],
                             seed: int, iterations: int | None) -> dict:
    """Float merge of ``subset``, then quantized with the pooled calibration data of its targets."""
    timings: dict = {}
    pool = pooled_calibration(bench, subset)
    with stopwatch(timings):
        merged = average_float_models([bench.adapted[t] for t in subset])
        qmodel, _ = quantize_variant(variant, bits, merged, pool, bench.source_model, seed, iterations,
                                     num_samples=len(pool))
    with stopwatch(timings, "eval_seconds"):
        accuracies = {t: accuracy(qmodel, bench.domains[t].test) for t in subset}
    rows = accuracy_rows(f"float-merge→{variant.label}", bits, "merged", accuracies, seed=seed,
                         merge=merge_label(subset), quantizer=variant.label, rounding="merge-then-quantize",
                         time_s=timings["seconds"])
    images = sum(len(bench.domains[t].test) for t in subset)
    return {"rows": rows, "evaluated_images": images, **timings}


# --- merging ------------------------------------------------------------------------------------
def tie_fraction(models: Sequence[nn.Module]) -> float:
    """Fraction of quantized weights whose code average sits on a grid midpoint (docs/hdrq_method.md §5)."""
    return grid_statistics(models)["tie_fraction"]


@torch.no_grad()
def grid_statistics(models: Sequence[nn.Module]) -> dict[str, float]:
    """How far apart the models' integer weights are, over every quantized weight element:
    ``tie_fraction`` (code average on a midpoint), ``disagreement`` (codes not all equal),
    ``code_gap`` (mean |I_a − I_b| over model pairs, in steps) and ``rounding_error`` (RMS of the
    half-to-even merge minus the dequantized average Σ c_t I_t s_t, in merged-grid steps: what any
    integer merge adds to the off-grid average; docs/hdrq_method.md §5)."""
    layers = [dict(m.named_modules()) for m in models]
    sums = dict.fromkeys(("tie_fraction", "disagreement", "code_gap", "rounding_error"), 0.0)
    total = 0
    for name, _ in quantized_layers(models[0]):
        grids = [read_weight_grid(modules[name], name) for modules in layers]
        codes, scales = [g.codes for g in grids], [g.scale for g in grids]
        merged = round_ties_half_to_even(codes, scales, qmin=grids[0].qmin, qmax=grids[0].qmax)
        error = (merged.dequantized() - average_dequantized(codes, scales)) / merged.scale
        stacked = torch.stack(codes)
        pairs = list(itertools.combinations(range(len(codes)), 2))
        sums["tie_fraction"] += float(merged.ties.sum())
        sums["disagreement"] += float((stacked != stacked[0]).any(0).sum())
        sums["code_gap"] += sum(float((stacked[a] - stacked[b]).abs().sum()) for a, b in pairs) / max(len(pairs), 1)
        sums["rounding_error"] += float((error.to(torch.float64) ** 2).sum())
        total += stacked[0].numel()
    if not total:
        return dict.fromkeys(sums, 0.0)
    stats = {key: value / total for key, value in sums.items()}
    stats["rounding_error"] **= 0.5
    return stats


@torch.no_grad()
def dequantized_average_model(models: Sequence[nn.Module]) -> nn.Module:
    """The merged model whose weights are Σ c_t I_t s_t, on no grid (evaluate it with
    :func:`float_weights`): the ceiling of any re-rounding rule (docs/hdrq_method.md §5)."""
    merged = merge_models(models, rounding="half-to-even")  # averages activation scales and biases
    members = [dict(m.named_modules()) for m in models]
    for name, layer in quantized_layers(merged):
        grids = [read_weight_grid(modules[name], name) for modules in members]
        average = average_dequantized([g.codes for g in grids], [g.scale for g in grids])
        layer.weight.copy_(average.reshape(layer.weight.shape).to(layer.weight.dtype))
    return merged.eval()


def float_weights(model: nn.Module):
    """Brevitas' own switch: weights (and the biases quantized from their scale) run unquantized,
    activations stay quantized."""
    return quantization_status_manager(model, disable_weight_quant=True, disable_bias_quant=True)


def merged_accuracies(models: Sequence[nn.Module], rule: str, datasets: dict, *, noise_seeds: int, trials: int,
                      seed: int) -> tuple[dict, dict]:
    """Accuracy on each of ``datasets`` of the merge with ``rule``, the mean over ``noise_seeds``
    re-merges for the stochastic rules; merges without any tie are deterministic: evaluated once."""
    ties = tie_fraction(models)
    info = {"tie_fraction": ties, "noise_seeds": 1, "evaluated_images": sum(len(d) for d in datasets.values())}
    if rule == DEQUANTIZED_AVERAGE:
        model = dequantized_average_model(models)
        with float_weights(model):
            return {key: accuracy(model, data) for key, data in datasets.items()}, info
    draws = noise_seeds if rule in STOCHASTIC_RULES and ties > 0 else 1
    totals = dict.fromkeys(datasets, 0.0)
    per_draw = []
    for draw in range(draws):
        merged = merge_models(models, rounding=rule, trials=trials, seed=1000 * seed + draw)
        scores = {key: accuracy(merged, data) for key, data in datasets.items()}
        per_draw.append([[*key, value] for key, value in scores.items()])
        for key, value in scores.items():
            totals[key] += value / draws
    info.update(noise_seeds=draws, per_noise_seed=per_draw, evaluated_images=draws * info["evaluated_images"])
    return totals, info


def merge_cell(models: dict[str, nn.Module], subset: tuple[str, ...], rule: str, bench: Benchmark,
               variant: Variant, bits: str, *, noise_seeds: int, trials: int, seed: int,
               splits: Sequence[str] = ("test",)) -> dict:
    """The merge of ``subset``'s quantized models with ``rule``, evaluated on every served target."""
    timings: dict = {}
    datasets = {(split, t): getattr(bench.domains[t], split) for split in splits for t in subset}
    with stopwatch(timings):
        accuracies, info = merged_accuracies([models[t] for t in subset], rule, datasets, noise_seeds=noise_seeds,
                                             trials=trials, seed=seed)
    rows = []
    for split in splits:
        rows += accuracy_rows(f"{variant.label}+{rule}", bits, "merged", {t: accuracies[split, t] for t in subset},
                              split=split, seed=seed, merge=merge_label(subset), quantizer=variant.label,
                              rounding=rule, noise_seeds=info["noise_seeds"], time_s=timings["seconds"])
    return {"rows": rows, **info, **timings}


def barrier_cell(models: dict[str, nn.Module], pair: tuple[str, str], bench: Benchmark, variant: Variant,
                 bits: str, *, steps: int, trials: int, seed: int) -> dict:
    timings: dict = {}
    a, b = pair
    data = ConcatDataset([bench.domains[a].test, bench.domains[b].test])
    with stopwatch(timings):
        result = error_barrier(models[a], models[b], data, steps=steps, quantized=True, rounding="noise-sampling",
                               trials=trials, seed=seed, label=f"{variant.label} {bits}")
    return {"barriers": [barrier_dict(result, pair=pair, method=variant.label, bits=bits, seed=seed)],
            "evaluated_images": steps * len(data), **timings}
