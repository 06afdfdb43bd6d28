"""Calibration cost and single-model accuracy of RTN, AdaRound, BRECQ, QDrop, HDRQ and Brevitas GPTQ.

    python -m benchmarks.calibration.cost [--model zoo|handwritten] [--target mnist] [--bits w4a4 w4a8]
        [--seeds 0 1] [--iterations 2000 [500 ...]] [--methods rtn adaround brecq qdrop hdrq gptq]
        [--output benchmarks/results/calibration_cost.json]

Every method quantizes the same float model with the same 32 calibration images and the same
iteration budget per unit; methods run one after another in one process, so machine load hits
them alike, and each time is reported as a ratio to QDrop's (the issue's goal: HDRQ ≤ 1.2×) —
in CPU seconds of the single-threaded process, which other jobs on the machine barely perturb.
HDRQ's per-iteration times in its noise phase and in its STE phase (timestamps from the
engine's callback) give the cost of noise sampling against plain rounding in the same run.

Models: ``zoo`` is the digits benchmark of ``hdrq_examples.zoo`` (θ0 on rendered digits, θt
fine-tuned per target); ``handwritten`` trains the same ResNet-8 here on the optdigits domain (θ0)
and fine-tunes it on the mnist domain (θt), in a few minutes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from hdrq_plugin._io import write_text_atomic
from hdrq_plugin.convert.to_brevitas import convert_to_brevitas
from hdrq_plugin.evaluation import accuracy
from hdrq_plugin.ptq.calibrate import calibrate_with_report
from hdrq_plugin.ptq.config import CPU_ITERATIONS, HDRQConfig
from hdrq_plugin.ptq.gptq import gptq_calibrate
from hdrq_plugin.quant.quantizers import HDRQActQuantizer, HDRQSignedActQuantizer
from hdrq_plugin.quantize import METHOD_NAMES

METHODS = tuple(m for m in METHOD_NAMES if m != "nipq")  # the post-training methods
ABLATIONS = {"hdrq-no-noise": {"noise": False}, "hdrq-no-distance": {"distance_weight": 0.0}}


@dataclass
class Task:
    """One target: θ0, θt, θt's calibration images and its labelled test split."""

    name: str
    source: nn.Module
    target: nn.Module
    calibration: torch.Tensor
    test: TensorDataset


def zoo_task(target: str) -> Task:
    from hdrq_examples.zoo import BenchmarkRecipe, load_or_build_benchmark

    bench = load_or_build_benchmark(BenchmarkRecipe())
    if target not in bench.adapted:
        raise SystemExit(f"unknown target {target!r}; the zoo has {sorted(bench.adapted)}")
    splits = bench.domains[target]
    return Task(f"zoo/{target}", bench.source_model, bench.adapted[target], splits.calib.tensors[0], splits.test)


def handwritten_task(seed: int = 0) -> Task:
    """θ0 trained on the optdigits domain, θt fine-tuned from it on the mnist domain (~2 min).

    The same offline domains as the zoo (``hdrq_examples.domains``) and its ResNet-8, trained
    here with a plain Adam loop; for when the zoo's models are not available.
    """
    from hdrq_examples.domains import load_domain
    from hdrq_examples.models import ResNetConfig, build_resnet

    source_domain, target_domain = load_domain("optdigits", seed=seed), load_domain("mnist", seed=seed)
    torch.manual_seed(seed)
    source = build_resnet(ResNetConfig())
    _train(source, *source_domain.train.tensors, epochs=8, lr=2e-3)
    target = build_resnet(ResNetConfig())
    target.load_state_dict(source.state_dict())
    _train(target, *target_domain.train.tensors, epochs=6, lr=1e-3)
    return Task("handwritten/mnist", source, target, target_domain.calib.tensors[0], target_domain.test)


def _train(model: nn.Module, images, labels, *, epochs: int, lr: float) -> None:
    optimiser = torch.optim.Adam(model.parameters(), lr)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(labels)).split(64):
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()


def run_method(task: Task, method: str, bits: str, seed: int, iterations: int) -> dict:
    """Quantize θt with ``method``; calibration wall time, per-phase iteration times, accuracy."""
    torch.manual_seed(seed)
    cpu_start = time.process_time()  # CPU seconds: robust to other jobs sharing the machine
    if method == "gptq":  # Brevitas GPTQ on the conversion's parameter-scaled quantizers
        qmodel = convert_to_brevitas(task.target, bits)
        start = time.perf_counter()
        gptq_calibrate(qmodel, task.calibration)
        seconds, phases, cache = time.perf_counter() - start, {}, None
    else:
        base, overrides = (("hdrq", ABLATIONS[method]) if method in ABLATIONS else (method, {}))
        config = HDRQConfig.for_method(base, seed=seed, **overrides)
        if config.reconstructs:
            config = config.replace(iterations=iterations)
        qmodel = convert_to_brevitas(task.target, bits, act_quant=HDRQActQuantizer,
                                     signed_act_quant=HDRQSignedActQuantizer)
        stamps: list[tuple[str, float]] = []
        noisy = round(config.iterations * config.noise_fraction) if config.weight_rounding == "noise" else 0

        def callback(step):
            stamps.append(("noise" if step.step < noisy else "ste", time.process_time()))

        start = time.perf_counter()  # the whole calibration: quantizer swap, activation steps, reconstruction
        report = calibrate_with_report(qmodel, task.calibration, source=task.source, config=config, callback=callback)
        seconds, phases, cache = time.perf_counter() - start, _phase_times(stamps), report.cache_peak_bytes
    cpu_seconds = time.process_time() - cpu_start
    return {"task": task.name, "method": method, "bits": bits, "seed": seed,
            "iterations": iterations if method not in ("rtn", "gptq") else 0,
            "seconds": seconds, "cpu_seconds": cpu_seconds, "accuracy": accuracy(qmodel, task.test), "phase_ms": phases,
            "cache_peak_bytes": cache}


def _phase_times(stamps: list[tuple[str, float]]) -> dict[str, float]:
    """Median CPU milliseconds per iteration in each phase (first step of each phase excluded)."""
    gaps: dict[str, list[float]] = {}
    for (_, before), (phase, now) in zip(stamps, stamps[1:], strict=False):
        gaps.setdefault(phase, []).append(1e3 * (now - before))
    return {phase: statistics.median(values) for phase, values in gaps.items() if values}


def table(rows: list[dict]) -> str:
    lines = [f"{'task':<18}{'bits':<6}{'seed':>5} {'method':<17}{'iters':>6}{'acc %':>8}{'wall s':>8}"
             f"{'cpu s':>8}{'cpu×QDrop':>10}{'ms/it noise':>12}{'ms/it STE':>10}"]
    for row in rows:
        ratio = row.get("cpu_vs_qdrop")
        lines.append(
            f"{row['task']:<18}{row['bits']:<6}{row['seed']:>5} {row['method']:<17}{row['iterations']:>6}"
            f"{100 * row['accuracy']:>8.2f}{row['seconds']:>8.1f}{row['cpu_seconds']:>8.1f}"
            f"{(f'{ratio:.2f}' if ratio else '—'):>10}"
            f"{row['phase_ms'].get('noise', float('nan')):>12.2f}{row['phase_ms'].get('ste', float('nan')):>10.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("zoo", "handwritten"), default="zoo")
    parser.add_argument("--target", default="mnist", help="zoo target domain")
    parser.add_argument("--bits", nargs="+", default=["w4a4"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--iterations", type=int, nargs="+", default=[CPU_ITERATIONS],
                        help="per unit; several values sweep the budget (default: the CPU preset)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS + tuple(ABLATIONS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default="benchmarks/results/calibration_cost.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # Brevitas' FX backport on torch 2.13

    task = zoo_task(args.target) if args.model == "zoo" else handwritten_task()
    float_accuracy = accuracy(task.target, task.test)
    print(f"{task.name}: float θt accuracy {100 * float_accuracy:.2f} %", flush=True)
    rows = []
    for bits, seed, iterations in itertools.product(args.bits, args.seeds, args.iterations):
        group = []
        for method in args.methods:
            if method in ("rtn", "gptq") and iterations != args.iterations[0]:
                continue  # no iteration budget: measured once
            row = run_method(task, method, bits, seed, iterations)
            print(f"  {bits} seed {seed} {method:<16} {iterations:>5} it {100 * row['accuracy']:6.2f} %"
                  f"  {row['seconds']:7.1f} s", flush=True)
            group.append(row)
        qdrop = next((r for r in group if r["method"] == "qdrop"), None)
        for row in group:
            row["time_vs_qdrop"] = row["seconds"] / qdrop["seconds"] if qdrop else None
            row["cpu_vs_qdrop"] = row["cpu_seconds"] / qdrop["cpu_seconds"] if qdrop else None
        rows += group
    print(table(rows))
    result = {"task": task.name, "float_accuracy": float_accuracy, "threads": args.threads,
              "machine": platform.platform(), "torch": torch.__version__, "rows": rows,
              "argv": sys.argv[1:] if argv is None else list(argv)}
    write_text_atomic(args.output, json.dumps(result, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
