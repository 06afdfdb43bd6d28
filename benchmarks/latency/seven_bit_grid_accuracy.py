"""Accuracy cost of a saturation-free weight grid for 8-bit layers (issue 22), on the demo's models.

A weight code within ±64 cannot saturate the int16 pair sums of ``vpmaddubsw`` (x86 without VNNI:
2·255·64 = 32,640 ≤ 32,767), so a 7-bit weight grid (codes -64..63, onnxruntime's
``reduce_range``) keeps int8 weights and fast u8s8/VNNI kernels on every CPU. This measures what
that grid costs against the 8-bit grid on the demo's cached zoo (``hdrq demo`` builds it): every
target model quantized with ``--method`` at W8A8 vs the 7-bit grid, and at W4A4 with 8-bit vs
7-bit edge layers, test accuracy per target.

    OMP_NUM_THREADS=1 nice -n 10 python -m benchmarks.latency.seven_bit_grid_accuracy --method rtn
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

SPECS = {
    "w8a8": BitSpec(8, 8), "w8a8 (7-bit grid)": BitSpec(7, 8, edge_weight_bits=7),
    "w4a4": BitSpec(4, 4), "w4a4 (7-bit edges)": BitSpec(4, 4, edge_weight_bits=7),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="rtn")
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or Path(f"benchmarks/results/seven_bit_grid_accuracy_{args.method}.json")
    bench = load_or_build_benchmark(BenchmarkRecipe(seed=args.seed))
    targets = list(bench.recipe.target_domains)
    result = {"method": args.method, "iterations": args.iterations, "load_average_start": os.getloadavg(),
              "float": {t: accuracy(bench.adapted[t], bench.domains[t].test) for t in targets}, "accuracy": {}}
    for label, spec in SPECS.items():
        result["accuracy"][label] = {}
        for t in targets:
            q = quantize_model(bench.adapted[t], bench.domains[t].calib, bits=spec, method=args.method,
                               source=bench.source_model, seed=args.seed, iterations=args.iterations).model
            result["accuracy"][label][t] = accuracy(q, bench.domains[t].test)
        print(label, {t: round(a, 4) for t, a in result["accuracy"][label].items()}, flush=True)
    result["load_average_end"] = os.getloadavg()
    write_text_atomic(out, json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
