"""Does the float merge hold? θ0, each θt and the float merges on every target of a benchmark.

    python -m benchmarks.zoo.float_merge_check [--recipe demo|tiny] [--seed 0] [--split val|test]

Prints one table (accuracy in %): θ0 on every target, each θt on every target (its own target is
the number that matters), the float merge of all targets — once averaging the BatchNorm models
as they are, once averaging the BN-folded models (what a quantized merge sees) — and every
pairwise merge, with the harmonic mean over the targets each model is meant to serve. Choose
recipes on ``--split val``; report on ``test``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import time

# Measured here: with other jobs on the two cores, OpenMP's default busy-waiting made 2-thread
# training 5× slower than 1 thread; passive waiting removes that. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.fx.experimental.optimization import fuse

from hdrq_examples.zoo import Benchmark, BenchmarkRecipe, load_or_build_benchmark
from hdrq_plugin.evaluation import accuracy, harmonic_mean
from hdrq_plugin.merge.float_merge import average_float_models


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An FX copy of ``model`` with every BatchNorm folded into its conv (torch's own ``fuse``)."""
    return fuse(model.eval())


def merge_rows(benchmark: Benchmark, split: str) -> list[tuple[str, dict[str, float], tuple[str, ...]]]:
    """Rows ``(label, {target: accuracy}, targets served)`` for the table."""
    targets = benchmark.recipe.target_domains
    data = {t: getattr(benchmark.domains[t], split) for t in targets}

    def scores(model: nn.Module) -> dict[str, float]:
        return {t: accuracy(model, data[t]) for t in targets}

    rows = [("θ0 (source)", scores(benchmark.source_model), targets)]
    for target, model in benchmark.adapted.items():
        rows.append((f"θ {target}", scores(model), (target,)))
    adapted = [benchmark.adapted[t] for t in targets]
    rows.append(("merge all (BN averaged)", scores(average_float_models(adapted)), targets))
    folded = [fold_batchnorm(m) for m in adapted]
    rows.append(("merge all (BN folded)", scores(average_float_models(folded)), targets))
    for (i, a), (j, b) in itertools.combinations(enumerate(targets), 2):
        merged = average_float_models([adapted[i], adapted[j]])
        rows.append((f"merge {a}+{b}", scores(merged), (a, b)))
    return rows


def format_table(rows: list[tuple[str, dict[str, float], tuple[str, ...]]], targets: tuple[str, ...]) -> str:
    header = f"| model | {' | '.join(targets)} | HM (served) |"
    lines = [header, "|" + "---|" * (len(targets) + 2)]
    for label, accuracies, served in rows:
        cells = [f"{100 * accuracies[t]:.1f}" + ("" if t in served else "*") for t in targets]
        hm = harmonic_mean(accuracies[t] for t in served)
        lines.append(f"| {label} | {' | '.join(cells)} | {100 * hm:.1f} |")
    lines.append("(* = a target the model is not meant to serve; HM is over the served targets)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", choices=("demo", "tiny"), default="demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--cache-dir", default=None, help="default: $HDRQ_CACHE_DIR or ~/.cache/hdrq-plugin")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = BenchmarkRecipe() if args.recipe == "demo" else BenchmarkRecipe.tiny()
    recipe = dataclasses.replace(base, seed=args.seed)
    start = time.perf_counter()
    benchmark = load_or_build_benchmark(recipe, cache_dir=args.cache_dir)
    elapsed = time.perf_counter() - start
    origin = "loaded from cache" if benchmark.from_cache else "built"
    timings = ", ".join(f"{k} {v:.1f}" for k, v in benchmark.timings.items())
    print(f"{origin} {benchmark.cache_path} in {elapsed:.1f} s ({timings}); split={args.split}")
    print(format_table(merge_rows(benchmark, args.split), recipe.target_domains))


if __name__ == "__main__":
    main()
