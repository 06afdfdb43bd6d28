"""The benchmark's outputs: ``results.json``, the markdown summary and the PNG plots."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from hdrq_plugin._io import write_text_atomic
from hdrq_plugin.run.report import Report

from . import plots, tables
from .plan import DEQUANTIZED_AVERAGE, ORT_VARIANTS, iterations_of, main_variants

MAIN_RULE, UNBIASED_RULE = "noise-sampling", "half-to-even"
COMPARISONS = (("hdrq", "qdrop"), ("hdrq", "brecq"), ("hdrq", "rtn"))


def results_report(run, command: str, wall_seconds: float) -> Report:
    """Report rows of every finished cell plus recipe, settings, versions, barriers and timings."""
    records = run.finished_records()
    report = Report(recipe={"settings": run.settings.to_dict(), "command": command,
                            "benchmark_recipes": {str(s): r.to_dict() for s, r in run.recipes.items()},
                            "recipe_keys": {str(s): k for s, k in run.recipe_keys.items()},
                            "variants": {label: v.describe(0, run.settings.iterations)
                                         for label, v in run.variants.items()}})
    for record in records:
        for row in record.get("rows", []):
            report.add(**row)
    report.timings = {"this_invocation_wall_s": wall_seconds,
                      "cells_wall_s": sum(r.get("seconds", 0.0) for r in records),
                      "cells_cpu_s": sum(r.get("cpu_seconds", 0.0) for r in records)}
    report.extra = {"barriers": [b for r in records for b in r.get("barriers", [])],
                    "cells": {"planned": len(run.plan), "finished": len(records)},
                    "failures": run.failures, "estimate": run.full_grid_estimate(),
                    "merge_info": [{"cell": r["cell"], "tie_fraction": r["tie_fraction"],
                                    "noise_seeds": r["noise_seeds"]} for r in records if "tie_fraction" in r]}
    return report


def write_outputs(run, *, command: str, wall_seconds: float, summary: str | None = None,
                  notes: str | None = None, plots_dir: str | None = None) -> list[Path]:
    """``OUT/results.json``, the summary (default ``OUT/BENCHMARKS.md``) and the plots (default
    ``OUT/plots``); the summary links the plots relative to its own folder."""
    out = run.store.folder
    report = results_report(run, command, wall_seconds)
    results = write_text_atomic(out / "results.json", json.dumps(report.to_dict(), indent=1, default=str))
    plot_paths = write_plots(run, report, Path(plots_dir) if plots_dir else out / "plots")
    summary_path = Path(summary) if summary else out / "BENCHMARKS.md"
    notes_text = Path(notes).read_text(encoding="utf-8") if notes else ""
    write_text_atomic(summary_path, summary_markdown(run, report, plot_paths, summary_path.parent, notes_text))
    return [results, summary_path, *plot_paths]


def _quantizers(run) -> list[str]:
    return list(main_variants(run.settings.methods, run.settings.nipq_epochs))


def _ablation_labels(run) -> list[str]:
    return ["hdrq"] + [label for label in run.variants if label.startswith("hdrq-") and not label.endswith("it")]


def _iteration_labels(run, method: str) -> dict[str, int]:
    return {label: iterations_of(v, run.settings) for label, v in run.variants.items()
              if v.method == method and (label == method or label.startswith(f"{method}-") and label.endswith("it"))}


def write_plots(run, report: Report, folder: Path) -> list[Path]:
    rows, all_targets = report.rows, "+".join(run.targets)
    quantizers = _quantizers(run)
    paths = []
    for scope in tables.scopes_for(all_targets):
        if any(r["stage"] == "merged" for r in rows):
            paths.append(plots.plot_merged_vs_bits(rows, quantizers, run.settings.bits,
                                                   folder / f"merged_hm_vs_bits_{scope}.png", rule=MAIN_RULE,
                                                   scope=scope, all_targets=all_targets))
    barriers = report.extra["barriers"]
    for bits in run.settings.bits:
        seed, chosen = run.settings.seeds[0], [b for b in barriers if b["bits"] in (bits, "fp32")]
        pairs = [b["pair"] for b in chosen if b["method"] == "float" and b["seed"] == seed]
        if pairs:
            curves = [b for b in chosen if b["pair"] == pairs[0] and b["seed"] == seed]
            if len(curves) > 1:
                paths.append(plots.plot_barrier_curves(curves, folder / f"barrier_{bits}.png"))
    series = {m: tables.iteration_series(rows, m, _iteration_labels(run, m), bits=b, rule=MAIN_RULE,
                                         all_targets=all_targets, split="val")
              for m in run.settings.iteration_methods for b in run.settings.ablation_bits[:1]}
    if any(len(s) > 1 for s in series.values()) and run.settings.ablation_bits:
        paths.append(plots.plot_iterations(series, folder / "iterations_val.png",
                                           bits=f"{run.settings.ablation_bits[0]}, val"))
    return paths


def summary_markdown(run, report: Report, plot_paths: list[Path], base: Path, notes: str) -> str:
    rows, settings, all_targets = report.rows, run.settings, "+".join(run.targets)
    quantizers, bits_list = _quantizers(run), settings.bits
    estimate = report.extra["estimate"]
    lines = ["# Multi-target benchmark (python -m benchmarks.mtda)", ""]
    if notes:
        lines += [notes.strip(), ""]
    lines += [f"Generated {time.strftime('%Y-%m-%d %H:%M')} by `{report.recipe['command']}`; "
              f"{report.extra['cells']['finished']}/{report.extra['cells']['planned']} cells finished; "
              f"recipe `{settings.recipe}`, targets {', '.join(run.targets)}, seeds {list(settings.seeds)}, "
              f"iterations per unit {settings.iterations or 'CPU preset'}, {settings.noise_seeds} noise seeds "
              f"× {settings.trials} trials per stochastic merge. Numbers: accuracy (%) on the test splits (val "
              "where a table says so), "
              "mean ± sample std over seeds; HM = harmonic mean over the merged targets; *pairs* = mean over "
              "every two-target merge, *all* = the all-targets merge. Nothing was chosen on a test split.", ""]
    lines += ["## Float references", "", tables.float_table(rows, run.targets), ""]
    for rule in (MAIN_RULE, UNBIASED_RULE):
        if rule not in settings.rules:
            continue
        for scope in tables.scopes_for(all_targets):
            lines += [f"## Merged HM, {scope}, ties by {rule}", "",
                      tables.merged_table(rows, quantizers, bits_list, rule=rule, scope=scope,
                                          all_targets=all_targets), ""]
    comparisons = [c for c in COMPARISONS if all(q in quantizers for q in c)]
    if comparisons:
        for scope in tables.scopes_for(all_targets):
            lines += [f"## Paired differences ({scope}, {MAIN_RULE})", "",
                      tables.comparison_table(rows, comparisons, bits_list, rule=MAIN_RULE, scope=scope,
                                              all_targets=all_targets), ""]
    lines += ["## Single-model accuracy (each θt quantized, on its own target; mean over targets)", "",
              tables.single_table(rows, quantizers, bits_list), ""]
    for bits in bits_list:
        lines += [f"## Single-model accuracy per target at {bits} (each θt on its own target)", "",
                  tables.single_per_target_table(rows, quantizers, bits, run.targets), ""]
    for bits in bits_list:
        lines += [f"## Tie rules at {bits} (pairs; `{DEQUANTIZED_AVERAGE}`: the off-grid average of the "
                  "dequantized weights, not deployable, what every re-rounding rule approximates)", "",
                  tables.rule_table(rows, quantizers, settings.rules, bits=bits, scope="pairs",
                                    all_targets=all_targets), ""]
    references = ["float-merge"] + [f"float-merge→{m}" for m in settings.merge_then_quantize]
    references += list(ORT_VARIANTS) if settings.ort else []
    lines += ["## References: merge first, then quantize (pooled calibration data)", "",
              "`ort-*`: onnxruntime `quantize_static` (QDQ; w8a8 = QInt8/QUInt8, w4a8 = QInt4/QUInt8, "
              "w4a4 = QInt4/QUInt4; first conv, last linear and input at 8 bits) on the float merge's "
              "FP32 ONNX file, evaluated in onnxruntime. Its Entropy calibration equals MinMax in "
              "onnxruntime 1.32 (128 histogram bins = 128 quantized bins: one candidate threshold).", "",
              tables.reference_table(rows, bits_list, all_targets=all_targets, methods=references), ""]
    rules = [r for r in (MAIN_RULE, UNBIASED_RULE) if r in settings.rules]
    for bits in settings.ablation_bits:
        if bits not in bits_list:
            continue
        for split, purpose in (("val", "val splits: the numbers to choose a setting from"),
                               ("test", "test splits: reporting only")):
            lines += [f"## HDRQ ablations at {bits}, {purpose}", "",
                      tables.ablation_table(rows, _ablation_labels(run), bits=bits, rules=rules,
                                            all_targets=all_targets, split=split), ""]
    if settings.ablation_bits and settings.iteration_grid:
        bits = settings.ablation_bits[0]
        for split in ("val", "test"):
            series = {m: tables.iteration_series(rows, m, _iteration_labels(run, m), bits=bits, rule=MAIN_RULE,
                                                 all_targets=all_targets, split=split)
                      for m in settings.iteration_methods}
            lines += [f"## Accuracy against iterations per unit ({bits}, {MAIN_RULE}, {split} splits)", "",
                      tables.iteration_table(series, tables.scopes_for(all_targets)), ""]
    barrier_methods = ["float"] + quantizers
    lines += ["## Error barriers on the union of the pair's test splits (B(½) signed / max over λ ≥ 0)", "",
              tables.barrier_table(report.extra["barriers"], barrier_methods, ["fp32"] + list(bits_list)), ""]
    lines += ["## Calibration time", "", tables.timing_table(run.finished_records(), list(run.variants)), ""]
    lines += _estimate_lines(estimate, report)
    if plot_paths:
        lines += ["## Plots", ""] + [f"![{p.stem}]({os.path.relpath(p, base)})" for p in plot_paths] + [""]
    if report.extra["failures"]:
        lines += ["## Failed cells", ""] + [f"- {f['cell']}: {f['error']}" for f in report.extra["failures"]] + [""]
    return "\n".join(lines)


def _estimate_lines(estimate: dict, report: Report) -> list[str]:
    if not estimate:
        return ["## Time", "", "No cell has been measured yet.", ""]
    full, this = estimate["full_grid"], estimate["this_run"]
    hours = full["total_cpu_seconds"] / 3600
    missing = ", ".join(f"{n} {k}" for k, n in full["cells_without_estimate"].items()) or "none"
    per_kind = ", ".join(f"{k} {v / 3600:.1f} h" for k, v in full["per_kind_cpu_seconds"].items())
    return ["## Time", "",
            f"This invocation: {report.timings['this_invocation_wall_s'] / 60:.1f} min wall; all finished cells: "
            f"{report.timings['cells_wall_s'] / 60:.1f} min wall, {report.timings['cells_cpu_s'] / 60:.1f} min CPU "
            f"(this plan estimated at {this['total_cpu_seconds'] / 60:.1f} CPU min).", "",
            f"Full default grid ({sum(full['cells'].values())} cells: "
            f"{', '.join(f'{n} {k}' for k, n in full['cells'].items())}): about **{hours:.1f} h** of single-thread "
            f"CPU time from the cells measured here ({per_kind}; cells without a measurement to scale from: "
            f"{missing}; full test splits: {full['test_sizes']} images). Two processes on the two cores halve "
            "the wall time.", ""]
