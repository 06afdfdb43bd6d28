"""Accuracy cost of a saturation-free weight grid for 8-bit layers (issue 22), on the demo's models.

A weight code within ±64 cannot saturate the int16 pair sums of ``vpmaddubsw`` (x86 without VNNI:
2·255·64 = 32,640 ≤ 32,767), so a 7-bit weight grid (codes -64..63, onnxruntime's
``reduce_range``) keeps int8 weights and fast u8s8/VNNI kernels on every CPU. This measures what
that grid costs against the full 8-bit grid on the demo's cached zoo (``hdrq demo`` builds it):
every target model quantized with ``--method`` at W8A8 and W4A4 (whose first and last layers are
the 8-bit ones), before the default changed (``-full-range``) and after (the saturation-free
default), test accuracy per target, for each seed in ``--seeds``; the seed drives the
quantization (HDRQ's noise, data order), before and after share it (paired differences).

    OMP_NUM_THREADS=1 nice -n 10 python -m benchmarks.latency.seven_bit_grid_accuracy --method hdrq --iterations 100 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from hdrq_examples.zoo import BenchmarkRecipe, load_or_build_benchmark
from hdrq_plugin import BitSpec, quantize_model
from hdrq_plugin._io import write_text_atomic
from hdrq_plugin.evaluation import accuracy

#: model -> (before: the full 8-bit grid, after: the saturation-free default)
PAIRS = {
    "w8a8": (BitSpec(8, 8, weight_range="full"), BitSpec(8, 8)),
    "w4a4": (BitSpec(4, 4, weight_range="full"), BitSpec(4, 4)),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="rtn")
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--models", nargs="+", choices=list(PAIRS), default=list(PAIRS))
    parser.add_argument("--zoo-seed", type=int, default=0, help="the demo's zoo (float models) seed")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or Path(f"benchmarks/results/seven_bit_grid_accuracy_{args.method}.json")
    bench = load_or_build_benchmark(BenchmarkRecipe(seed=args.zoo_seed))
    targets = list(bench.recipe.target_domains)
    result = {"method": args.method, "iterations": args.iterations, "seeds": args.seeds,
              "load_average_start": os.getloadavg(),
              "float": {t: accuracy(bench.adapted[t], bench.domains[t].test) for t in targets}, "accuracy": {},
              "paired_difference_after_minus_before": {}}
    for model, specs in ((m, PAIRS[m]) for m in args.models):
        runs = {}
        for when, spec in zip(("before (full 8-bit grid)", "after (saturation-free default)"), specs, strict=True):
            runs[when] = {t: [] for t in targets}
            for seed in args.seeds:
                for t in targets:
                    q = quantize_model(bench.adapted[t], bench.domains[t].calib, bits=spec, method=args.method,
                                       source=bench.source_model, seed=seed, iterations=args.iterations).model
                    runs[when][t].append(accuracy(q, bench.domains[t].test))
            print(model, when, {t: [round(a, 4) for a in accs] for t, accs in runs[when].items()}, flush=True)
        result["accuracy"][model] = runs
        before, after = runs.values()
        diffs = {t: [a - b for a, b in zip(after[t], before[t], strict=True)] for t in targets}
        result["paired_difference_after_minus_before"][model] = {
            "per_target_per_seed": diffs,
            "mean_over_targets_and_seeds": sum(sum(d) for d in diffs.values()) / sum(len(d) for d in diffs.values())}
    result["load_average_end"] = os.getloadavg()
    write_text_atomic(out, json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
