"""CPU seconds per stage of the classification demo (issue 22): what each stage costs, whatever the load.

    HDRQ_CACHE_DIR=/tmp/cache python -m benchmarks.latency.demo_stages --out /tmp/demo

Runs :func:`hdrq_examples.demo.run_demo` with its defaults and prints, per announced stage, the
wall seconds (the report's timings) and this process's CPU seconds (``time.process_time``: all its
threads). Worker processes count under "cpu children". On a shared machine the wall seconds are a share,
and the CPU seconds are the cost to compare. ``--code-digest HEX`` keys the quantized models and the cached figures as
that code version made them, so runs of two trees can share one cache of identical quantizations.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import time


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the demo's output folder")
    parser.add_argument("--code-digest", default=None, help="source digest to key the quantized models with")
    args = parser.parse_args(argv)

    import hdrq_examples.demo as demo
    import hdrq_examples.demo_results as demo_results
    import hdrq_examples.demo_tasks as demo_tasks

    if args.code_digest:  # both modules key with it (demo_results imported the function by name)
        demo_tasks.source_digest = demo_results.source_digest = lambda: args.code_digest
    cpu: dict[str, float] = {}
    announced = demo.timed_stage

    @contextlib.contextmanager
    def timed_stage(timings, name, detail=""):
        start = time.process_time()
        try:
            with announced(timings, name, detail):
                yield
        finally:
            cpu[name] = cpu.get(name, 0.0) + time.process_time() - start

    demo.timed_stage = timed_stage
    load_before, wall, own = os.getloadavg(), time.perf_counter(), time.process_time()
    report = demo.run_demo(out=args.out)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - own,
              "cpu_children_s": children.ru_utime + children.ru_stime,
              "load_before": load_before, "load_after": os.getloadavg(),
              "stage_wall_s": {k: v for k, v in report.timings.items() if not k.startswith("zoo_")},
              "stage_cpu_s": cpu}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
