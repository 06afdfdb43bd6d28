"""Ray against the sequential runner on this machine: per-task overhead, the per-target pipeline, a benchmark slice.

    python -m benchmarks.distributed.speedup [--iterations 200] [--num-cpus 2] [--skip-slice]
        [--output benchmarks/results/distributed_speedup.json]

Side by side in one process, on the demo zoo (hdrq_examples.zoo, built once and cached):

* overhead: ``ray.init``, putting the zoo in the object store, the first task (worker start-up:
  a fresh process imports torch and Brevitas) and the per-task cost of trivial tasks that read
  the shared zoo, against the same tasks on the sequential runner;
* pipeline: ``quantize_targets`` (3 targets, HDRQ, W4A4) sequential, then on a local Ray with
  ``--num-cpus``; wall times, their ratio, and whether both wrote identical checkpoints;
* slice: a small benchmark grid (mtda.tasks) through both runners into fresh cell stores
  (kept in ``--workdir``: their per-cell costs feed ``benchmarks.distributed.estimate``).

Wall times on a shared machine move with its load: both runners are timed in the same run, one
after the other, and the load average is recorded beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

from benchmarks.mtda.plan import BenchmarkSettings
from benchmarks.mtda.run import BenchmarkRun
from benchmarks.mtda.tasks import run_with_runner, task_view
from hdrq_examples.demo import float_recipe
from hdrq_examples.zoo import BenchmarkRecipe, load_or_build_benchmark
from hdrq_plugin._io import write_text_atomic
from hdrq_plugin.run.distributed import RayRunner, SequentialRunner, Task, import_ray
from hdrq_plugin.run.pipeline import PipelineSettings, TargetInputs, quantize_targets

SLICE = BenchmarkSettings(targets=("mnist", "optdigits"), test_images=250, seeds=(0,), bits=("w4a4",),
                          methods=("rtn", "hdrq", "gptq"), iterations=100, rules=("noise-sampling", "half-to-even"),
                          noise_seeds=2, trials=30, ablation_bits=(), ablations=(), distance_grid=(),
                          iteration_grid=(), merge_then_quantize=(), ort=False, barrier_steps=3,
                          barrier_pairs="first")


def count_test_images(bench) -> int:
    """A trivial task: it only reads the shared zoo."""
    return sum(len(split.test) for split in bench.domains.values())


def nothing() -> None:
    """An empty task: what the runner itself costs."""


def time_tasks(runner, zoo, count: int) -> float:
    tasks = ([Task(f"trivial {i}", count_test_images, (zoo,)) for i in range(count)] if zoo is not None
             else [Task(f"empty {i}", nothing) for i in range(count)])
    start = time.perf_counter()
    for _ in runner.as_completed(tasks, desc="trivial tasks"):
        pass
    return time.perf_counter() - start


def overhead(bench, runner: RayRunner, count: int) -> dict:
    view = task_view(bench, bench.recipe.target_domains)
    start = time.perf_counter()
    zoo = runner.share(view)
    put_s = time.perf_counter() - start
    first_s = time_tasks(runner, zoo, 2)  # the workers' first tasks: process start-up and imports
    ray_s = time_tasks(runner, zoo, count)
    sequential_s = time_tasks(SequentialRunner(), view, count)
    ray_empty_s = time_tasks(runner, None, count)
    size = sum(t.numel() * t.element_size() for split in view.domains.values()
               for t in (*split.calib.tensors, *split.test.tensors, *split.val.tensors))
    return {"put_zoo_s": put_s, "zoo_tensor_bytes": size, "first_two_tasks_s": first_s, "tasks": count,
            "ray_per_task_ms": 1000 * ray_s / count, "sequential_per_task_ms": 1000 * sequential_s / count,
            "ray_per_empty_task_ms": 1000 * ray_empty_s / count}


def pipeline(bench, runner: RayRunner, iterations: int, workdir: Path) -> dict:
    targets = [TargetInputs(t, bench.adapted[t], bench.domains[t].calib.tensors[0], bench.domains[t].test)
               for t in bench.recipe.target_domains]
    settings = PipelineSettings(bits="w4a4", method="hdrq", iterations=iterations, seed=0)
    result = {}
    for name, chosen in (("sequential", SequentialRunner()), ("ray", runner)):
        start = time.perf_counter()
        outcome = quantize_targets(bench.source_model, targets, float_recipe(bench), workdir / name, settings,
                                   runner=chosen)
        summary = json.loads(Path(outcome.summary).read_text())
        result[name] = {"wall_s": time.perf_counter() - start, "quantize_wall_s": summary["quantize_wall_seconds"],
                        "target_cpu_s": {t: v["cpu_seconds"] for t, v in summary["quantize_timings"].items()},
                        "validation_ok": outcome.ok, "load_average": os.getloadavg()[0]}
    result["identical_checkpoints"] = all(
        _same(workdir / "sequential" / "quantized" / f"{t.name}.pt", workdir / "ray" / "quantized" / f"{t.name}.pt")
        for t in targets)
    result["speedup_quantize"] = result["sequential"]["quantize_wall_s"] / result["ray"]["quantize_wall_s"]
    result["speedup_total"] = result["sequential"]["wall_s"] / result["ray"]["wall_s"]
    result["settings"] = {"targets": [t.name for t in targets], "method": "hdrq", "bits": "w4a4",
                          "iterations": iterations}
    return result


def _same(a: Path, b: Path) -> bool:
    left, right = (torch.load(p, map_location="cpu", weights_only=True)["state_dict"] for p in (a, b))
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def benchmark_slice(runner: RayRunner, workdir: Path) -> dict:
    result = {}
    for name, chosen in (("sequential", SequentialRunner()), ("ray", runner)):
        run = BenchmarkRun(SLICE, workdir / f"slice-{name}")
        start = time.perf_counter()
        counts = run_with_runner(run, chosen)
        result[name] = {"wall_s": time.perf_counter() - start, "cells": counts["finished"],
                        "cells_cpu_s": sum(r.get("cpu_seconds", 0.0) for r in run.finished_records()),
                        "load_average": os.getloadavg()[0]}
    result["speedup"] = result["sequential"]["wall_s"] / result["ray"]["wall_s"]
    result["settings"] = SLICE.to_dict()
    return result


def table(report: dict) -> str:
    def row(label: str, sequential, ray, ratio) -> str:
        return f"| {label} | {sequential} | {ray} | {ratio} |"

    o = report["overhead"]
    lines = [row("measurement", "sequential", "Ray", "ratio"), "|---|---|---|---|",
             row("per empty task (ms)", "—", f"{o['ray_per_empty_task_ms']:.2f}", "—"),
             row("per task reading the shared zoo (ms)", f"{o['sequential_per_task_ms']:.2f}",
                 f"{o['ray_per_task_ms']:.2f}", "—"),
             row("ray.init / put zoo / first 2 tasks (s)", "—",
                 f"{report['ray_init_s']:.1f} / {o['put_zoo_s']:.2f} / {o['first_two_tasks_s']:.1f}", "—")]
    if "pipeline" in report:
        p = report["pipeline"]
        for label, key, ratio in (("pipeline: quantize 3 targets (s)", "quantize_wall_s", "speedup_quantize"),
                                  ("pipeline: + merge, export, validate (s)", "wall_s", "speedup_total")):
            lines.append(row(label, f"{p['sequential'][key]:.1f}", f"{p['ray'][key]:.1f}", f"{p[ratio]:.2f}×"))
    if "slice" in report:
        s = report["slice"]
        lines.append(row(f"benchmark slice, {s['ray']['cells']} cells (s)", f"{s['sequential']['wall_s']:.1f}",
                         f"{s['ray']['wall_s']:.1f}", f"{s['speedup']:.2f}×"))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200, help="HDRQ iterations per unit in the pipeline")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray (default 2: this machine)")
    parser.add_argument("--trivial-tasks", type=int, default=40)
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--skip-slice", action="store_true")
    parser.add_argument("--output", default="benchmarks/results/distributed_speedup.json")
    parser.add_argument("--workdir", default="runs/distributed-speedup",
                        help="emptied, then holds both runs' files (the slice's cell stores feed benchmarks.distributed.estimate)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.set_num_threads(1)
    bench = load_or_build_benchmark(BenchmarkRecipe())
    start = time.perf_counter()
    runner = RayRunner(num_cpus=args.num_cpus)
    report = {"ray_init_s": time.perf_counter() - start, "num_cpus": args.num_cpus,
              "ray": import_ray().__version__, "torch": torch.__version__, "python": platform.python_version(),
              "cores": os.cpu_count(),
              "command": " ".join(["python -m benchmarks.distributed.speedup", *sys.argv[1:]])}
    try:
        report["overhead"] = overhead(bench, runner, args.trivial_tasks)
        workdir = Path(args.workdir)
        shutil.rmtree(workdir, ignore_errors=True)  # fresh stores: nothing may be reused from a cache
        if not args.skip_pipeline:
            report["pipeline"] = pipeline(bench, runner, args.iterations, workdir)
        if not args.skip_slice:
            report["slice"] = benchmark_slice(runner, workdir)
    finally:
        runner.shutdown()
    print(table(report))
    write_text_atomic(args.output, json.dumps(report, indent=1, sort_keys=True))
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
