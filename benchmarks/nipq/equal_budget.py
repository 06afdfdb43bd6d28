"""NIPQ at equal deployed budget: learned widths against pinned uniform widths, LSQ and HDRQ PTQ.

    python -m benchmarks.nipq.equal_budget --family resnet --targets mnist optdigits mnistm \\
        --seeds 0 1 2 --bits 4 --epochs 4 --hard-epochs 1 --hdrq-iterations 200 \\
        --output benchmarks/results/nipq_budget5_resnet_a4.json

Per target θt of the digits zoo (``hdrq_examples.zoo``; ``--family`` picks the demo's ResNet-8 or
the inverted-residual family, ``hdrq_examples.classifiers``), per seed, with the same train split,
batch order, steps and distillation from θt (rows are the issue-21 ablation):

- ``nipq``: learned widths at an average of ``--bits`` (weights and activations, over the learned
  tensors), the cost on the deployed widths, widths landed largest first from ``land_start`` and
  all frozen at ``freeze_fraction`` of the noise epochs (``--no-landing``: frozen and projected
  there, the method before round 4); the accuracy at the landing's start and just before and
  after freezing, and the bits the landing moved, are recorded;
- ``nipq-bops``: learned widths under a BOPs budget equal to the uniform ``w{bits}a{bits}`` model's
  BOPs (so its uniform rows are the equal-BOPs comparison);
- ``nipq-pinned``: the same noise training with every learned width pinned at ``--bits``;
- ``lsq``: uniform-width LSQ/STE QAT (``NIPQConfig.uniform_ste``) at the same total steps;
- ``hdrq``: HDRQ post-training quantization at ``w{bits}a{bits}`` (``--hdrq-iterations``; 0 skips).

With two or more targets, each method's target models of a seed are then merged
(``merge_models``, noise-sampling rounding; NIPQ's differing widths take the wider) and the merged
model evaluated on every target (rows with ``stage: merged``, with the merged deployed bits); the
NIPQ merges, over the budget wherever the members' widths differ, are then landed back on it
(``stage: merged-landed``, :func:`hdrq_plugin.nipq.widths.land_merged_widths`).

Every row states its deployed average bits over the learned tensors (the first conv, the
classifier and the input stay 8-bit in every method). ``--bits-lr`` overrides θ_b's learning
rate and ``--quant-lr`` θ_α's (the ablations of docs/nipq_method.md §4). Writes JSON atomically and prints a table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from hdrq_plugin import merge_models, quantize_model
from hdrq_plugin._io import ensure_writable_dir, write_text_atomic
from hdrq_plugin.evaluation import accuracy
from hdrq_plugin.nipq.cost import describe_costs
from hdrq_plugin.nipq.train import NIPQConfig, quantize_nipq
from hdrq_plugin.nipq.widths import land_merged_widths

BATCH = 128
METHODS = ("nipq", "nipq-bops", "nipq-pinned", "lsq", "hdrq")


def learned_average(model, example, kind: str) -> float:
    """Deployed average bits over the learned (unpinned) tensors of ``kind``."""
    return float(describe_costs(model, example).average_bits(kind, learned_only=True, deployed=True))


def uniform_gbops(theta, example, bits: int) -> float:
    """GBOPs per sample of the converted model with every learned width at ``bits`` (the BOPs budget)."""
    from hdrq_plugin.convert.to_brevitas import convert_to_brevitas

    model = convert_to_brevitas(theta, f"nipq-w{bits}a{bits}")
    cost = describe_costs(model, example)
    for t in cost.weights + cost.activations:
        if not t.bits.pinned:
            t.bits.freeze(bits)
    return cost.report().gbops


def freeze_move(model, example, result) -> dict:
    """Average bits the freeze moved over the learned tensors (deployed − as learned), per kind."""
    cost = describe_costs(model, example)
    moves = {}
    for kind, before, after in (("weights", result.report_at_freeze.weight_bits, result.report.weight_bits),
                                ("activations", result.report_at_freeze.act_bits, result.report.act_bits)):
        tensors = [t for t in cost._tensors(kind) if not t.bits.pinned]
        total = sum(t.numel for t in tensors)
        moves[kind] = sum((after[t.name] - before[t.name]) * t.numel for t in tensors) / total
    return moves


def nipq_config(args, seed: int, method: str) -> NIPQConfig:
    """The CPU preset with this row's changes (``main`` builds one first, so bad flags fail before the zoo loads)."""
    changes = {"seed": seed, "noise_shape": args.noise, "hard_epochs": args.hard_epochs}
    if args.bits_lr is not None:
        changes["bits_lr"] = args.bits_lr
    if args.quant_lr is not None:
        changes["quant_lr"] = args.quant_lr
    if args.cost_weight is not None:
        changes["cost_weight"] = args.cost_weight
    if method == "nipq-pinned":
        changes["learn_bits"] = False
    if method == "lsq":
        changes.update(noise=False, learn_bits=False)
    if args.no_fit_truncations:
        changes["fit_weight_truncations"] = False
    if args.no_landing:
        changes.update(land_start=None, start_at_budget=False)
    elif args.land_start is not None:
        changes["land_start"] = args.land_start
    if args.freeze_fraction is not None:
        changes["freeze_fraction"] = args.freeze_fraction
    return NIPQConfig.cpu_preset(**changes)


def run_one(bench, target: str, seed: int, method: str, args, budgets: dict) -> dict:
    theta, domain = bench.adapted[target], bench.domains[target]
    bits = int(args.bits)
    example = domain.test[0][0][None]
    tic = time.perf_counter()
    if method == "hdrq":
        model = quantize_model(theta, domain.calib, bits=f"w{bits}a{bits}", method="hdrq", source=bench.source_model,
                               seed=seed, iterations=args.hdrq_iterations).model
        return {"method": method, "target": target, "seed": seed, "stage": "single",
                "accuracy": accuracy(model, domain.test), "learned_weight_bits": float(bits),
                "learned_act_bits": float(bits), "seconds": time.perf_counter() - tic}, model
    config = nipq_config(args, seed, method)
    budget = budgets.get(method, float(bits))
    model, result = quantize_nipq(theta, domain.train, f"w{bits}a{bits}", target=budget, epochs=args.epochs,
                                  seed=seed, config=config, batch_size=BATCH, progress=False, eval_data=domain.test)
    row = {"method": method, "target": target, "seed": seed, "stage": "single", "accuracy": accuracy(model, domain.test),
           "learned_weight_bits": learned_average(model, example, "weights"),
           "learned_act_bits": learned_average(model, example, "activations"),
           "average_weight_bits_all": result.report.average_weight_bits,
           "average_act_bits_all": result.report.average_act_bits, "gbops": result.report.gbops,
           "freeze_epoch": result.freeze_epoch, "freeze_step": result.freeze_step,
           "cost_scale_at_freeze": result.cost_scale_at_freeze, "accuracy_before_freeze": result.accuracy_before_freeze,
           "accuracy_after_freeze": result.accuracy_after_freeze, "seconds": time.perf_counter() - tic,
           "budget": budget, "bits_lr": config.bits_lr, "cost_weight": config.cost_weight, "land_start": config.land_start,
           "start_at_budget": config.start_at_budget, "landing_start_step": result.landing_start_step,
           "accuracy_at_landing_start": result.accuracy_at_landing_start, "landing_move": result.landing_move,
           "landing_move_abs": result.landing_move_abs, "widths": {"weights": result.report.weight_bits,
                                                  "activations": result.report.act_bits}}
    if result.report_at_freeze is not None:
        row["at_freeze_all"] = {"average_weight_bits": result.report_at_freeze.average_weight_bits,
                                "average_act_bits": result.report_at_freeze.average_act_bits}
        row["freeze_move"] = freeze_move(model, example, result)
    return row, model


def merged_rows(bench, models: dict, seed: int, method: str, budget=None) -> list[dict]:
    """``method``'s target models of ``seed`` merged (noise sampling), evaluated on every target.

    NIPQ merges take each tensor's widest member width (``stage: merged``, over the budget when the
    members' allocations differ); with ``budget`` the merged widths are then landed back on it
    (``land_merged_widths``, priced on two labelled train batches of every target) and evaluated
    again (``stage: merged-landed``).
    """
    targets = sorted(models)
    merged = merge_models([models[t] for t in targets], rounding="noise-sampling", seed=seed)
    example = bench.domains[targets[0]].test[0][0][None]

    def rows(stage: str) -> list[dict]:
        bits = {"learned_weight_bits": None, "learned_act_bits": None, "gbops": None}
        if method != "hdrq":  # HDRQ's grid is uniform at the spec's width
            bits = {"learned_weight_bits": learned_average(merged, example, "weights"),
                    "learned_act_bits": learned_average(merged, example, "activations"),
                    "gbops": describe_costs(merged, example).report().gbops}
        return [{"method": method, "target": t, "seed": seed, "stage": stage, "members": targets,
                 "accuracy": accuracy(merged, bench.domains[t].test), **bits} for t in targets]

    out = rows("merged")
    if budget is not None:
        batches = [(x, y) for t in targets for x, y in itertools.islice(
            DataLoader(bench.domains[t].train, batch_size=BATCH), 2)]
        land_merged_widths(merged, budget, batches)
        out += rows("merged-landed")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.nipq.equal_budget", description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="resnet", choices=("resnet", "inverted-residual"),
                        help="the zoo's model family (hdrq_examples.classifiers)")
    parser.add_argument("--targets", nargs="+", default=["optdigits"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 5, 6, 7, 8))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--hard-epochs", type=int, default=1)
    parser.add_argument("--noise", default="uniform", choices=("uniform", "histogram"))
    parser.add_argument("--bits-lr", type=float, default=None, help="θ_b's learning rate (ablation)")
    parser.add_argument("--quant-lr", type=float, default=None, help="θ_α's learning rate (ablation)")
    parser.add_argument("--cost-weight", type=float, default=None, help="the average-bit cost's weight (ablation)")
    parser.add_argument("--hdrq-iterations", type=int, default=0)
    parser.add_argument("--no-fit-truncations", action="store_true",
                        help="weight α from max|W| only (the method before issue 21's second round)")
    parser.add_argument("--land-start", type=float, default=None,
                        help="fraction of the noise steps where the landing window opens (default: NIPQConfig's)")
    parser.add_argument("--freeze-fraction", type=float, default=None,
                        help="fraction of the noise epochs after which the widths freeze and STE takes over "
                             "(default: NIPQConfig's; ablation)")
    parser.add_argument("--no-landing", action="store_true",
                        help="widths from 8 bits, frozen and projected at freeze_fraction (the default before round 4)")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    from hdrq_examples.classifiers import FAMILIES
    from hdrq_examples.zoo import BenchmarkRecipe, load_or_build_benchmark

    try:  # bad flags fail here, in one line, before the zoo loads
        nipq_config(args, args.seeds[0], "nipq")
        unknown = sorted(set(args.targets) - set(BenchmarkRecipe().target_domains))
        if unknown:
            raise ValueError(f"unknown targets {unknown}; the zoo's are {list(BenchmarkRecipe().target_domains)}")
        if args.epochs < 1 or args.hard_epochs < 0 or args.hdrq_iterations < 0:
            raise ValueError("--epochs must be >= 1, --hard-epochs and --hdrq-iterations >= 0")
        ensure_writable_dir(Path(args.output).resolve().parent)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    bench = load_or_build_benchmark(BenchmarkRecipe(architecture=FAMILIES[args.family]))
    # the learned-width budgets; BOPs depend on the architecture only, so any target's θt gives them
    first = args.targets[0]
    budgets = {"nipq": float(args.bits), "nipq-bops": {"gbops": uniform_gbops(
        bench.adapted[first], bench.domains[first].test[0][0][None], args.bits)}}
    rows, tic = [], time.perf_counter()
    result = {"settings": vars(args), "machine": platform.platform(), "torch": torch.__version__, "rows": rows}
    for seed in args.seeds:
        models: dict[str, dict] = {}
        for target in args.targets:
            for method in args.methods:
                if method == "hdrq" and args.hdrq_iterations <= 0:
                    continue
                row, models.setdefault(method, {})[target] = run_one(bench, target, seed, method, args, budgets)
                rows.append({"family": args.family, "bits": args.bits, **row})
                print(f"[{seed}] {method:11s} {target:9s} acc {100 * row['accuracy']:.2f}  "
                      f"w {row['learned_weight_bits']:.3f} a {row['learned_act_bits']:.3f}  ({row['seconds']:.0f} s)",
                      flush=True)
                result["wall_seconds"] = time.perf_counter() - tic
                write_text_atomic(args.output, json.dumps(result, indent=1))  # after every run: partial results survive
        for method, by_target in models.items():
            if len(by_target) > 1:
                merged = merged_rows(bench, by_target, seed, method, budgets.get(method))
                rows.extend({"family": args.family, "bits": args.bits, **r} for r in merged)
                for stage in ("merged", "merged-landed"):
                    mine = [r for r in merged if r["stage"] == stage]
                    if mine:
                        print(f"[{seed}] {method:11s} {stage:13s} w {mine[0]['learned_weight_bits'] or args.bits:.3f} "
                              f"a {mine[0]['learned_act_bits'] or args.bits:.3f}  " + "  ".join(
                                  f"{r['target']} {100 * r['accuracy']:.2f}" for r in mine), flush=True)
        result["wall_seconds"] = time.perf_counter() - tic
        write_text_atomic(args.output, json.dumps(result, indent=1))
    from .tables import markdown_report, unite

    print(markdown_report(unite([result])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
