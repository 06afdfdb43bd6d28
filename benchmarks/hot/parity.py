"""Accuracy parity of HOT adaptation (run through ``python -m benchmarks.hot.memory --parity``).

θ0 is the demo zoo's cached source model. For every seed, θ0 is adapted to each target with the
zoo's adaptation recipe twice — plain backprop and HOT — with the same data order (seed), and
each set is evaluated on the targets' test splits: own-target accuracy of every θt and the float
merge of all θt (BN-folded weight average, the demo's reference merge). Seed 0 uses the zoo's
own adaptation seeds, so its plain models must equal the cached θt (checked and reported).
Optionally the seed-0 models are quantized with HDRQ W4A4 (short budget) and merged with
noise-sampling, HOT vs plain.
"""

from __future__ import annotations

import statistics
import time

import torch

from hdrq_examples.training import adapt_to_target
from hdrq_examples.zoo import BenchmarkRecipe, load_or_build_benchmark
from hdrq_plugin import average_float_models, merge_models, quantize_model
from hdrq_plugin.convert import fold_batchnorm
from hdrq_plugin.evaluation import accuracy, harmonic_mean

MODES = ("plain", "hot")


def _adapt_all(bench, mode: str, seed: int) -> tuple[dict, float]:
    recipe = bench.recipe
    start = time.process_time()
    adapted = {
        target: adapt_to_target(bench.source_model, bench.domains[target].train, recipe.adaptation,
                                seed=recipe.seed + index + 1000 * seed, desc=f"{mode} {target}",
                                hot=True if mode == "hot" else None)
        for index, target in enumerate(recipe.target_domains, start=1)
    }
    return adapted, time.process_time() - start


def run_parity(seeds: list[int], hdrq_iterations: int = 0) -> dict:
    bench = load_or_build_benchmark(BenchmarkRecipe())
    targets = list(bench.recipe.target_domains)
    tests = {t: bench.domains[t].test for t in targets}
    runs, kept = [], {}
    for seed in seeds:
        for mode in MODES:
            adapted, cpu_s = _adapt_all(bench, mode, seed)
            merged = average_float_models([fold_batchnorm(adapted[t]) for t in targets])
            row = {"seed": seed, "mode": mode, "adaptation_cpu_s": cpu_s,
                   "own_target": {t: accuracy(adapted[t], tests[t]) for t in targets},
                   "float_merge": {t: accuracy(merged, tests[t]) for t in targets}}
            row["float_merge_hm"] = harmonic_mean(row["float_merge"].values())
            if seed == 0 and mode == "plain":
                row["reproduces_zoo"] = all(
                    all(torch.equal(a, b) for a, b in zip(adapted[t].state_dict().values(),
                                                          bench.adapted[t].state_dict().values(), strict=True))
                    for t in targets)
            runs.append(row)
            print(f"seed {seed} {mode}: own {row['own_target']} merge {row['float_merge']}", flush=True)
            if seed == seeds[0]:
                kept[mode] = adapted
    result = {"targets": targets, "seeds": seeds, "runs": runs,
              "source": {t: accuracy(bench.source_model, tests[t]) for t in targets},
              "summary": _summary(runs, targets)}
    if hdrq_iterations > 0:
        result["hdrq_w4a4"] = _hdrq(bench, kept, targets, tests, hdrq_iterations, seeds[0])
    return result


def _mean_sd(values: list[float]) -> list[float]:
    return [statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def _summary(runs: list[dict], targets: list[str]) -> dict:
    summary = {}
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        summary[mode] = {
            "own_target": {t: _mean_sd([r["own_target"][t] for r in mine]) for t in targets},
            "float_merge": {t: _mean_sd([r["float_merge"][t] for r in mine]) for t in targets},
            "float_merge_hm": _mean_sd([r["float_merge_hm"] for r in mine]),
            "adaptation_cpu_s": _mean_sd([r["adaptation_cpu_s"] for r in mine]),
        }
    return summary


def _hdrq(bench, kept: dict, targets, tests, iterations: int, seed: int) -> dict:
    out = {"iterations_per_unit": iterations, "seed": seed}
    for mode, adapted in kept.items():
        start = time.process_time()
        quantized = {t: quantize_model(adapted[t], bench.domains[t].calib, bits="w4a4", method="hdrq",
                                       source=bench.source_model, seed=seed, iterations=iterations).model
                     for t in targets}
        merged = merge_models([quantized[t] for t in targets], rounding="noise-sampling", seed=seed)
        out[mode] = {"single": {t: accuracy(quantized[t], tests[t]) for t in targets},
                     "merged": {t: accuracy(merged, tests[t]) for t in targets},
                     "cpu_s": time.process_time() - start}
        out[mode]["merged_hm"] = harmonic_mean(out[mode]["merged"].values())
        print(f"hdrq w4a4 {mode}: {out[mode]}", flush=True)
    return out


def _pct(pair: list[float]) -> str:
    return f"{100 * pair[0]:.1f} ± {100 * pair[1]:.1f}"


def print_parity(result: dict) -> None:
    targets, summary = result["targets"], result["summary"]
    print(f"\nAccuracy (%) on the test splits, mean ± sd over seeds {result['seeds']}; θ0: "
          + ", ".join(f"{t} {100 * a:.1f}" for t, a in result["source"].items()))
    print("| adaptation | " + " | ".join(f"own {t}" for t in targets) + " | "
          + " | ".join(f"merge {t}" for t in targets) + " | merge HM | adapt CPU s |")
    print("|---" * (2 * len(targets) + 3) + "|")
    for mode in MODES:
        s = summary[mode]
        print(f"| {mode} | " + " | ".join(_pct(s["own_target"][t]) for t in targets) + " | "
              + " | ".join(_pct(s["float_merge"][t]) for t in targets)
              + f" | {_pct(s['float_merge_hm'])} | {s['adaptation_cpu_s'][0]:.0f} |")
    zoo = [r.get("reproduces_zoo") for r in result["runs"] if "reproduces_zoo" in r]
    if zoo:
        print(f"plain seed-0 models equal the cached zoo θt: {zoo[0]}")
    if "hdrq_w4a4" in result:
        h = result["hdrq_w4a4"]
        print(f"\nHDRQ W4A4, {h['iterations_per_unit']} iterations/unit, seed {h['seed']}, noise-sampling merge of all targets")
        print("| adapted with | " + " | ".join(f"single {t}" for t in targets) + " | "
              + " | ".join(f"merged {t}" for t in targets) + " | merged HM |")
        print("|---" * (2 * len(targets) + 2) + "|")
        for mode in MODES:
            r = h[mode]
            print(f"| {mode} | " + " | ".join(f"{100 * r['single'][t]:.1f}" for t in targets) + " | "
                  + " | ".join(f"{100 * r['merged'][t]:.1f}" for t in targets) + f" | {100 * r['merged_hm']:.1f} |")
