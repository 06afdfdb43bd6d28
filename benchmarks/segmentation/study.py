"""Merged mIoU on the digit-scene segmentation benchmark, HDRQ against each baseline, paired by seed.

    .venv/bin/python -m benchmarks.segmentation --size tiny --seeds 0 --iterations 20 --out runs/seg-smoke
    .venv/bin/python -m benchmarks.segmentation --size demo --seeds 0 1 2 --out runs/segmentation

For every seed (zoo and splits unless ``--zoo-seed`` fixes one zoo; reconstruction and merge noise;
the calibration set is always the first ``num_samples`` scenes) each adapted U-Net θt is quantized with its own
target's calibration scenes by every method at every bit width; the quantized models of every two
targets and of all targets are merged by every rule of :data:`MERGE_RULES`: noise sampling (HDRQ's
own rule, docs/hdrq_method.md §5), unbiased half-to-even ties (every baseline's own rule) and the
dequantized average on no grid (the ceiling of any integer merge), each merge with the grid
statistics of its models (ties, codes that differ, the rounding error). The paired table compares
each method under its own rule; the same comparison under one rule for all, and the ceiling, say
whether a difference comes from the rounding of the merge or from the models merged. References
are the float merge and merge-then-quantize (the float merge quantized by HDRQ on the pooled
calibration scenes). Every cell also holds the error barrier of the merged path between the first
two targets' models (per-pixel cross-entropy and pixel accuracy at λ = 0, ¼, ½, ¾, 1; the
references: the float path). Each finished (seed, bits, method) cell is written to
``--out/results.json`` at once, and a rerun skips the cells already there, so a killed run
resumes; runs of other seeds (one per core) are united, and the tables printed, by
``python -m benchmarks.segmentation.tables``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, TensorDataset

from benchmarks.mtda.cells import dequantized_average_model, float_weights, grid_statistics
from benchmarks.mtda.plan import DEQUANTIZED_AVERAGE
from hdrq_examples.segmentation_demo import SIZES
from hdrq_examples.segmentation_metrics import mean_iou
from hdrq_examples.segmentation_scenes import NUM_CLASSES
from hdrq_examples.segmentation_zoo import load_or_build_segmentation_zoo
from hdrq_examples.zoo import merge_subsets
from hdrq_plugin._io import write_text_atomic
from hdrq_plugin.bitspec import BitSpec
from hdrq_plugin.convert.to_brevitas import fold_batchnorm
from hdrq_plugin.errors import HDRQPluginError, InputError
from hdrq_plugin.evaluation import harmonic_mean
from hdrq_plugin.merge.barrier import error_barrier
from hdrq_plugin.merge.float_merge import average_float_models
from hdrq_plugin.merge.models import merge_models
from hdrq_plugin.quantize import quantize_model

METHODS = ("rtn", "adaround", "brecq", "qdrop", "hdrq")
BARRIER_STEPS = 5  # λ = 0, ¼, ½, ¾, 1 between the first two targets' models
MERGE_RULE = {"hdrq": "noise-sampling"}  # every other method: half-to-even
MERGE_RULES = ("noise-sampling", "half-to-even", DEQUANTIZED_AVERAGE)  # every cell merges by each
ALL = "all"


def _pooled(bench, targets) -> TensorDataset:
    """The targets' calibration scenes interleaved, so any prefix stays mixed (as benchmarks.mtda)."""
    parts = [bench.domains[t].calib.tensors for t in targets]
    size = min(len(images) for images, _ in parts)
    images = torch.stack([images[:size] for images, _ in parts], dim=1).flatten(0, 1)
    masks = torch.stack([masks[:size] for _, masks in parts], dim=1).flatten(0, 1)
    return TensorDataset(images, masks)


def _subset_rows(model, bench, subset, **fields) -> list[dict]:
    per_target = {t: mean_iou(model, bench.domains[t].test, NUM_CLASSES) for t in subset}
    label = ALL if len(subset) == len(bench.recipe.target_domains) else "+".join(subset)
    return [{**fields, "merge": label, "miou": per_target, "harmonic_mean": harmonic_mean(list(per_target.values()))}]


def _merged_rows(members, bench, subset, rule: str, seed: int, **fields) -> list[dict]:
    """Rows of one merge of ``members`` by ``rule``; the dequantized average (on no grid, the ceiling
    of every integer merge) is evaluated with the weights unquantized, activations still quantized."""
    if rule == DEQUANTIZED_AVERAGE:
        merged = dequantized_average_model(members)
        with float_weights(merged):
            return _subset_rows(merged, bench, subset, rounding=rule, **fields)
    merged = merge_models(members, rounding=rule, seed=seed)
    return _subset_rows(merged, bench, subset, rounding=rule, **fields)


def run_cell(bench, method: str, bits: str, seed: int, iterations: int | None) -> dict:
    """Quantize every target with ``method``, evaluate singles and every merge by every rule of
    :data:`MERGE_RULES` (the paired table reads each method's own rule; the others say whether a
    difference comes from the rounding of the merge or from the models merged)."""
    start = time.perf_counter()
    targets = list(bench.recipe.target_domains)
    quantized, rows = {}, []
    for t in targets:
        result = quantize_model(bench.adapted[t], bench.domains[t].calib, bits=bits, method=method,
                                source=bench.source_model, seed=seed, iterations=iterations)
        quantized[t] = result.model
        rows.append({"stage": "single", "method": method, "target": t,
                     "miou": mean_iou(result.model, bench.domains[t].test, NUM_CLASSES)})
    own = own_rule(method)
    for subset in merge_subsets(targets):
        members = [quantized[t] for t in subset]
        grid = grid_statistics(members)
        for rule in MERGE_RULES:
            rows += _merged_rows(members, bench, subset, rule, seed, stage="merged", method=method,
                                 own_rule=rule == own, grid=grid)
    barrier = _pair_barrier(quantized[targets[0]], quantized[targets[1]], bench, targets, rounding=own, seed=seed)
    return {"rows": rows, "barrier": barrier, "seconds": time.perf_counter() - start}


def _pair_barrier(model_a, model_b, bench, targets, **merge) -> dict:
    """Error barrier (per-pixel cross-entropy, pixel accuracy) of the merged path between the first
    two targets' models, on both targets' test scenes (hdrq_plugin.merge.barrier)."""
    data = ConcatDataset([bench.domains[t].test for t in targets[:2]])
    label = f"{targets[0]} -> {targets[1]}"
    return error_barrier(model_a, model_b, data, steps=BARRIER_STEPS, label=label, **merge).to_dict()


def run_references(bench, bits: str, seed: int, iterations: int | None) -> dict:
    start = time.perf_counter()
    targets = list(bench.recipe.target_domains)
    rows = []
    for subset in merge_subsets(targets):
        float_merged = average_float_models([fold_batchnorm(bench.adapted[t]) for t in subset])
        rows += _subset_rows(float_merged, bench, subset, stage="float-merge", method="fp32")
    merged = average_float_models([bench.adapted[t] for t in targets])
    quantized = quantize_model(merged, _pooled(bench, targets), bits=bits, method="hdrq", source=bench.source_model,
                               seed=seed, iterations=iterations).model
    rows += _subset_rows(quantized, bench, targets, stage="merge-then-quantize", method="hdrq")
    folded = [fold_batchnorm(bench.adapted[t]) for t in targets[:2]]
    return {"rows": rows, "barrier": _pair_barrier(*folded, bench, targets), "seconds": time.perf_counter() - start}


def own_rule(method: str) -> str:
    return MERGE_RULE.get(method, "half-to-even")


def merged_all(cell: dict, rounding: str) -> float:
    """A cell's all-target harmonic mIoU merged by ``rounding`` (``"own"``: the method's own rule)."""
    rows = [r for r in cell["rows"] if r.get("stage") == "merged" and r["merge"] == ALL]
    chosen = [r for r in rows if (r.get("own_rule", True) if rounding == "own" else r.get("rounding") == rounding)]
    if len(chosen) != 1:
        raise KeyError(f"{len(chosen)} all-target rows merged by {rounding!r} in the cell")
    return chosen[0]["harmonic_mean"]


def paired_table(cells: dict, rounding: str = "own") -> list[dict]:
    """Per bits and method: HDRQ's all-target harmonic mIoU minus the method's, paired by seed,
    both merged by ``rounding`` (``"own"``: each by its own rule, the study's headline)."""
    table = []
    for bits in sorted({c.split("/")[1] for c in cells}):
        seeds = sorted({int(c.split("/")[0]) for c in cells if f"/{bits}/hdrq" in c})
        for method in METHODS[:-1]:
            paired = [s for s in seeds if f"{s}/{bits}/{method}" in cells]
            if not paired:
                continue
            hdrq = [merged_all(cells[f"{s}/{bits}/hdrq"], rounding) for s in paired]
            baseline = [merged_all(cells[f"{s}/{bits}/{method}"], rounding) for s in paired]
            diffs = [h - b for h, b in zip(hdrq, baseline, strict=True)]
            table.append({"bits": bits, "baseline": method, "rounding": rounding, "seeds": paired, "hdrq": hdrq,
                          "baseline_miou": baseline, "mean_difference": statistics.fmean(diffs),
                          "std_difference": statistics.stdev(diffs) if len(diffs) > 1 else None,
                          "seeds_won": sum(d > 0 for d in diffs)})
    return table


def paired_tables(cells: dict) -> dict[str, list[dict]]:
    """The headline (each method's own rule) and the same comparison under each single rule that
    every method cell merged by (cells of earlier rounds hold their own rule only)."""
    def merged_by(cell):
        return {r.get("rounding") for r in cell["rows"] if r.get("stage") == "merged" and r["merge"] == ALL}

    method_cells = [cell for key, cell in cells.items() if not key.endswith("/references")]
    rules = [rule for rule in MERGE_RULES if all(rule in merged_by(cell) for cell in method_cells)]
    return {rounding: paired_table(cells, rounding) for rounding in ("own", *rules)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.segmentation", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="demo")
    parser.add_argument("--bits", nargs="+", default=["w4a4", "w3a3"])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--zoo-seed", type=int, default=None,
                        help="one zoo for every seed (then seeds vary calibration, reconstruction and merge "
                             "noise only: the paired design when a zoo per seed does not fit the time)")
    parser.add_argument("--iterations", type=int, default=200, help="reconstruction iterations per unit")
    parser.add_argument("--out", default="runs/segmentation")
    args = parser.parse_args(argv)
    try:  # every argument checked before the zoo loads (minutes): one line and exit code 2
        for bits in args.bits:
            BitSpec.parse(bits)
        if args.iterations < 1 or min(args.seeds) < 0:
            raise InputError(f"need --iterations >= 1 and seeds >= 0, got {args.iterations} and {args.seeds}")
    except (HDRQPluginError, ValueError) as err:  # BitSpec: ValueError for a bad width
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    # our own earlier output (resume); only numbers are read from it
    cells = json.loads(results_path.read_text())["cells"] if results_path.is_file() else {}
    settings = {"size": args.size, "iterations": args.iterations, "zoo_seed": args.zoo_seed, "merge_rule": MERGE_RULE,
                "default_merge_rule": "half-to-even"}
    for seed in args.seeds:
        bench = load_or_build_segmentation_zoo(SIZES[args.size](seed=seed if args.zoo_seed is None else args.zoo_seed))
        settings[f"zoo_timings_seed{seed}"] = bench.timings
        for bits in args.bits:
            jobs = [("references", run_references)] + [(m, None) for m in args.methods]
            for name, job in jobs:
                key = f"{seed}/{bits}/{name}"
                if key in cells:
                    continue
                print(f"[{time.strftime('%H:%M:%S')}] {key}", flush=True)
                cells[key] = job(bench, bits, seed, args.iterations) if job else \
                    run_cell(bench, name, bits, seed, args.iterations)
                payload = {"settings": settings, "cells": cells, "paired": paired_tables(cells)}
                write_text_atomic(results_path, json.dumps(payload, indent=2))
    for row in paired_table(cells):
        print(f"{row['bits']} HDRQ - {row['baseline']}: {100 * row['mean_difference']:+.2f} mIoU points "
              f"over seeds {row['seeds']} (won {row['seeds_won']})")
    print(f"every table: python -m benchmarks.segmentation.tables {results_path}")
    return 0
