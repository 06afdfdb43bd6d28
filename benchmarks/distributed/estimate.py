"""Wall time of the full default benchmark grid on N workers, from measured per-cell costs.

    python -m benchmarks.distributed.estimate --records runs/mtda-paired2000 runs/distributed-speedup/slice-ray \
        [--workers 64] [--speedup benchmarks/results/distributed_speedup.json]

Per-cell CPU seconds come from :class:`benchmarks.mtda.estimate.CostModel` fitted on the
finished cells of the given cell stores (single-threaded CPU time, which other jobs on a shared
machine barely perturb). The grid runs as ``python -m benchmarks.mtda --ray`` runs it (mtda.tasks):
the zoos are built on the driver first, then wave 1 (every quantize cell) and wave 2 (every other
cell) on N one-CPU workers. Each wave is simulated as Ray schedules it, the tasks taken in plan
order by the first free worker; each task also pays the measured per-task overhead of the runner
(distributed_speedup.json). The lower bound of a wave is max(total / N, its longest task). Cells of
a kind nothing measured (e.g. onnxruntime's when the stores have none) take that kind's mean from
the issue-5 estimate in results/mtda.json.
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
from pathlib import Path

import torch

from benchmarks.mtda.estimate import CostModel
from benchmarks.mtda.plan import BenchmarkSettings, build_plan, iterations_of
from benchmarks.mtda.store import CellStore
from hdrq_examples.zoo import BenchmarkRecipe, cache_path_for
from hdrq_plugin._io import write_text_atomic

#: optdigits has 539 test images, the others 750 (results/mtda.json, full_grid.test_sizes)
DEMO_TEST_SIZES = {"mnist": 750, "optdigits": 539, "mnistm": 750}


def list_schedule(costs: list[float], workers: int) -> float:
    """Makespan when each task, in order, goes to the worker that is free first (Ray's FIFO queue)."""
    free = [0.0] * min(workers, max(len(costs), 1))
    for cost in costs:
        heapq.heapreplace(free, free[0] + cost)
    return max(free) if costs else 0.0


def wave_summary(costs: list[float], workers: int) -> dict:
    total = sum(costs)
    return {"tasks": len(costs), "cpu_s": total, "longest_task_s": max(costs, default=0.0),
            "lower_bound_s": max(total / workers, max(costs, default=0.0)),
            "simulated_s": list_schedule(costs, workers)}


def zoo_build_cpu_seconds(recipe: BenchmarkRecipe, cache_dir: str | None) -> float | None:
    path = cache_path_for(recipe, cache_dir)
    if not path.is_file():
        return None
    timings = torch.load(path, map_location="cpu", weights_only=True)["timings"]
    return timings.get("source_training_cpu_s", 0.0) + timings.get("adaptation_cpu_s", 0.0)


def estimate(records: list[dict], workers: int, task_overhead_s: float, fallback: dict, zoo_s: float) -> dict:
    settings = BenchmarkSettings()
    targets = BenchmarkRecipe().target_domains
    variants, plan = build_plan(settings, targets)
    model = CostModel(records, variants, settings, lambda v: iterations_of(v, settings), DEMO_TEST_SIZES)
    fallback_mean = {kind: fallback["per_kind_cpu_seconds"][kind] / fallback["cells"][kind]
                     for kind in fallback.get("cells", {}) if fallback["cells"][kind]}
    costs, from_fallback = {1: [], 2: []}, {}
    for cell in plan:
        cost = model.cost(cell)
        if cost is None:
            cost = fallback_mean[cell.kind]
            from_fallback[cell.kind] = from_fallback.get(cell.kind, 0) + 1
        costs[1 if cell.kind == "quantize" else 2].append(cost + task_overhead_s)
    waves = {f"wave{n}": wave_summary(c, workers) for n, c in costs.items()}
    seeds = len(settings.seeds)
    total_cpu = sum(sum(c) for c in costs.values())
    return {"workers": workers, "cells": len(plan), "cpu_s": total_cpu, "zoo_builds_s": seeds * zoo_s,
            "task_overhead_s": task_overhead_s, **waves, "cells_from_fallback": from_fallback,
            "wall_s": seeds * zoo_s + sum(w["simulated_s"] for w in waves.values()),
            "wall_lower_bound_s": seeds * zoo_s + sum(w["lower_bound_s"] for w in waves.values()),
            "one_core_s": seeds * zoo_s + total_cpu,
            "fit": {"per_image_s": model.per_image, "per_iteration_s": model.per_iteration,
                    "rtn_overhead_s": model.overhead, "constant_s": model.constant}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", nargs="+", required=True, help="cell stores (benchmarks.mtda --out folders)")
    parser.add_argument("--workers", type=int, nargs="+", default=[64])
    parser.add_argument("--speedup", default="benchmarks/results/distributed_speedup.json",
                        help="benchmarks.distributed.speedup's output: the measured per-task overhead")
    parser.add_argument("--fallback", default="benchmarks/results/mtda.json")
    parser.add_argument("--cache-dir", help="model zoo cache (default $HDRQ_CACHE_DIR)")
    parser.add_argument("--output", default="benchmarks/results/distributed_estimate.json")
    args = parser.parse_args(argv)
    records = [r for folder in args.records for r in CellStore(folder).records()]
    overhead = json.loads(Path(args.speedup).read_text())["overhead"]["ray_per_task_ms"] / 1000
    fallback = json.loads(Path(args.fallback).read_text())["estimate"]["full_grid"]
    zoo_s = zoo_build_cpu_seconds(BenchmarkRecipe(), args.cache_dir)
    if zoo_s is None:
        raise SystemExit("the demo zoo is not cached: build it once (python -m benchmarks.mtda or hdrq demo)")
    results = {str(n): estimate(records, n, overhead, fallback, zoo_s) for n in args.workers}
    print("| workers | CPU h | zoo builds (driver) | wave 1: quantize | wave 2: merges, barriers, … | wall | lower bound |")
    print("|---|---|---|---|---|---|---|")
    for n, r in results.items():
        print(f"| {n} | {r['cpu_s'] / 3600:.1f} | {r['zoo_builds_s'] / 60:.0f} min | {r['wave1']['simulated_s'] / 60:.0f} min "
              f"({r['wave1']['tasks']} tasks) | {r['wave2']['simulated_s'] / 60:.0f} min ({r['wave2']['tasks']} tasks) | "
              f"{r['wall_s'] / 60:.0f} min | {r['wall_lower_bound_s'] / 60:.0f} min |")
    write_text_atomic(args.output, json.dumps({"records": len(records), "stores": args.records, "results": results},
                                              indent=1, sort_keys=True, default=str))
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
