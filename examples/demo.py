"""The offline multi-target demo behind ``hdrq demo`` (and ``make demo``).

source θ0 → adapted θt per target → quantized per target (RTN and HDRQ) → merged on one integer
grid → exported to ONNX (INT8 / INT4) → validated in onnxruntime, with a report of every step.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from torch import nn

from hdrq_plugin._io import ensure_writable_dir, file_sha256
from hdrq_plugin.bitspec import BitSpec
from hdrq_plugin.convert.to_brevitas import fold_batchnorm
from hdrq_plugin.evaluation import accuracy, harmonic_mean
from hdrq_plugin.merge.float_merge import average_float_models
from hdrq_plugin.merge.models import merge_models
from hdrq_plugin.progress import timed_stage
from hdrq_plugin.run.checkpoint import ModelRecipe, save_float_model, save_quantized
from hdrq_plugin.run.distributed import default_workers
from hdrq_plugin.run.report import HARMONIC_MEAN, Report

from .demo_results import ResultCache, cached_rows
from .demo_tasks import QuantizeJob, run_jobs
from .zoo import Benchmark, BenchmarkRecipe, load_or_build_benchmark, merge_subsets

#: the two rounding rules every quantized merge is reported with (docs/hdrq_method.md §5): the biased naive
#: re-rounding of averaged dequantized weights (what not to do) and integer-code averaging
#: with unbiased half-to-even ties (the strong naive baseline)
NAIVE_MERGES = ("naive", "half-to-even")
#: Reconstruction iterations per unit in the demo: a quarter of the CPU preset (2,000), so that the
#: demo takes minutes, not a quarter of an hour, on a laptop. The price, measured on the digits
#: benchmark (BENCHMARKS.md, "accuracy against iterations", W4A4): HDRQ at 300 iterations merges
#: about 4 points worse across all three targets than at 2,000, and equally well on pairs; single
#: models differ by under a point. ``--iterations 2000`` runs the preset.
DEMO_ITERATIONS = 500

#: NIPQ quantization-aware training per target in the demo (noise epochs on the labelled train
#: split; NIPQConfig.cpu_preset adds one hard epoch); 0 leaves NIPQ out. Its rows compare
#: training with learned widths at the same average bits against the post-training methods.
#: 5, not the CPU preset's 10: the three NIPQ tasks bound the demo's wall time, and at 5 the widths
#: still learn for 3 epochs (freeze_fraction 0.6); single models stay within 2 points of 10 epochs
#: (4 epochs lost 2.7 on mnistm; BENCHMARKS.md "Demo and CI wall time", fourth round).
DEMO_NIPQ_EPOCHS = 5


def float_recipe(benchmark: Benchmark) -> ModelRecipe:
    """How a checkpoint rebuilds the zoo's float architecture (either family)."""
    from .classifiers import builder_of

    return ModelRecipe(builder_of(benchmark.recipe.architecture), {"config": benchmark.recipe.architecture.to_dict()})


def run_demo(bits: str = "w4a4", out: str | Path = "runs/demo", seed: int = 0, size: str = "demo",
             iterations: int | None = DEMO_ITERATIONS, export: bool = True, hot: bool = False,
             nipq_epochs: int = DEMO_NIPQ_EPOCHS, workers: int | None = None) -> Report:
    """Run the whole pipeline and write ``report.json`` / ``report.md`` (and models) into ``out``.

    ``workers``: processes for the per-target quantizations (default: the usable cores plus one, as
    this process merges, evaluates and exports meanwhile; 1: all in this process, serially); the
    models are the same for any count (one torch thread per task).
    """
    spec = BitSpec.parse(bits)
    if isinstance(nipq_epochs, bool) or not isinstance(nipq_epochs, int) or nipq_epochs < 0:
        raise ValueError(f"nipq_epochs must be a whole number >= 0, got {nipq_epochs!r}")
    if iterations is not None and (isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0):
        raise ValueError(f"iterations must be a whole number >= 0 (or None for the CPU preset), got {iterations!r}")
    out = ensure_writable_dir(out)  # fail before minutes of work, not after
    recipe = {"demo": BenchmarkRecipe, "tiny": BenchmarkRecipe.tiny}[size]
    recipe = recipe(seed=seed) if size == "demo" else _with_seed(recipe(), seed)
    if hot:  # adapt every θt with HOT back-propagation (hdrq_plugin.hot.mode); its own cache entry
        recipe = recipe.with_hot_adaptation()
    report = Report(recipe={"benchmark": recipe.to_dict(), "bits": str(spec), "seed": seed,
                            "iterations_per_unit": iterations or "cpu-preset"})
    clock = partial(timed_stage, report.timings)  # times each stage into the report, announces it

    with clock("zoo_s"):
        bench = load_or_build_benchmark(recipe)
    report.timings.update({f"zoo_{k}": v for k, v in bench.timings.items()})
    report.extra["zoo_from_cache"] = bench.from_cache
    targets = list(recipe.target_domains)
    tests = {t: bench.domains[t].test for t in targets}

    # Every per-target quantization (RTN, HDRQ, NIPQ) runs on the worker processes (or comes from
    # the cache). This process meanwhile computes the float references, then — as soon as RTN and
    # HDRQ are done — their merges, the barrier and the exports, while the workers train NIPQ.
    # The rows are added in the serial order (export rows after NIPQ's), so the report is the same.
    methods = ("rtn", "hdrq") + (("nipq",) if nipq_epochs else ())
    jobs = [QuantizeJob(m, t, str(spec), seed, iterations=iterations if m != "nipq" else None,
                        nipq_epochs=nipq_epochs if m == "nipq" else 0) for m in methods for t in targets]
    post_training = [job for job in jobs if job.method != "nipq"]
    export_rows: list[tuple] = []
    export_failures: list[str] = []
    results = ResultCache.under(bench.cache_path.parent)  # the figures below, computed once per input
    zoo_key = recipe.cache_key()

    def float_references(_models) -> None:
        with clock("float_references_s"):
            cached_rows(report, results, "float-references", {"zoo": zoo_key, "targets": targets},
                        lambda rows: _float_reference_rows(rows, bench, targets, tests))
        save_float_model(out / "source.pt", bench.source_model, float_recipe(bench))
        report.write(out)  # every stage below rewrites the report: a late failure keeps the earlier ones

    def merge_barrier_export(models) -> None:
        quantized = _by_method(models)
        for method in ("rtn", "hdrq"):
            for t in targets:
                report.add(method, str(spec), "single", t, quantized[method][t][2]["accuracy"])
        report.write(out)
        inputs = {"quantized": {f"{job.method}/{job.target}": info["task_key"] for job, (_, _, info) in models.items()},
                  "seed": seed, "targets": targets, "bits": str(spec), "zoo": zoo_key}
        merged = {}
        with clock("merges_s"):
            cached_rows(report, results, "merges", inputs,
                        lambda rows: merged.update(hdrq=_merge_rows(rows, quantized, spec, targets, tests, seed, clock)))
            if "hdrq" not in merged:  # figures from the cache; the merged model itself is exported below
                merged["hdrq"] = merge_models([quantized["hdrq"][t][0] for t in targets], rounding="noise-sampling",
                                              seed=seed)
        hdrq_merged = merged["hdrq"]
        report.write(out)
        family = quantized["hdrq"][targets[0]][1]
        save_quantized(out / "merged-hdrq.pt", hdrq_merged, recipe=float_recipe(bench), bits=spec,
                       family=family, metadata={"method": "hdrq", "merged_from": targets,
                                                "rounding": "noise-sampling", "seed": seed})
        _barrier(report, bench, quantized["hdrq"], targets, tests, out, clock, results, inputs)
        report.write(out)
        if export:
            export_failures.extend(_export_and_validate(report, hdrq_merged, spec, targets, tests, out, clock,
                                                        export_rows, results, inputs))

    if workers is None:  # one worker more than cores: this process's work shares the cores with them
        workers = default_workers() + 1 if default_workers() > 1 else 1
    done = run_jobs(jobs, bench, float_recipe(bench), bench.cache_path.parent, workers, report.timings,
                    hooks=[((), float_references), (post_training, merge_barrier_export)])
    report.extra["quantized_from_cache"] = int(report.timings.pop("quantize_cached_models"))
    if nipq_epochs:
        trains = {t: bench.domains[t].train for t in targets}
        _nipq_rows(report, _by_method(done)["nipq"], spec, targets, tests, trains, seed, clock, results)
        report.write(out)
    for row in export_rows:
        report.add(*row[0], **row[1])
    report.write(out)
    if export_failures:
        from hdrq_plugin.export import ValidationError

        raise ValidationError("; ".join(export_failures))
    return report


def _by_method(models: dict) -> dict[str, dict[str, tuple]]:
    """method → target → (quantized θt, quantizer family, metadata)."""
    quantized: dict[str, dict[str, tuple]] = {}
    for job, value in models.items():
        quantized.setdefault(job.method, {})[job.target] = value
    return quantized


def _float_reference_rows(report, bench, targets, tests) -> None:
    """θ0 everywhere, θt at home, the float merge everywhere."""
    report.add_per_target("source", "fp32", "float_source",
                          {t: accuracy(bench.source_model, tests[t]) for t in targets})
    for t in targets:
        report.add("adapted", "fp32", "float_adapted", t, accuracy(bench.adapted[t], tests[t]))
    # the reference merge averages BN-folded weights, the space every quantized merge works in;
    # averaging BN statistics separately is reported too (it is what a float-only user does)
    folded = {t: fold_batchnorm(bench.adapted[t]) for t in targets}
    for subset in merge_subsets(targets):
        float_merged = average_float_models([folded[t] for t in subset])
        report.add_per_target(_merge_label("float-merge", subset, targets), "fp32", "float_merged",
                              {t: accuracy(float_merged, tests[t]) for t in subset},
                              merged_targets="+".join(subset))
    bn_averaged = average_float_models([bench.adapted[t] for t in targets])
    report.add_per_target("float-merge-bn-averaged", "fp32", "float_merged",
                          {t: accuracy(bn_averaged, tests[t]) for t in targets})


def _merge_rows(report, quantized, spec, targets, tests, seed, clock) -> nn.Module:
    """Every pair (where ties between two integer codes decide the rounding) and all targets, for
    RTN's two naive rules and HDRQ's; returns HDRQ's noise-sampling merge of all targets."""
    merged_models = {}
    for method, rules in (("rtn", NAIVE_MERGES), ("hdrq", ("noise-sampling", "half-to-even"))):
        for rounding in rules:
            for subset in merge_subsets(targets):
                members = [quantized[method][t][0] for t in subset]
                with clock(f"merge_{method}_{rounding}_s", "+".join(subset)):
                    merged = merge_models(members, rounding=rounding, seed=seed)
                label = _merge_label(f"{method}+{rounding}", subset, targets)
                report.add_per_target(label, str(spec), "merged", {t: accuracy(merged, tests[t]) for t in subset},
                                      merged_targets="+".join(subset))
                merged_models[label] = merged
    return merged_models["hdrq+noise-sampling"]


def _nipq_rows(report, nipq, spec, targets, tests, trains, seed, clock, results: ResultCache) -> None:
    """NIPQ per target at ``spec``'s average bits, and their merge: each tensor at its widest member
    width (over the budget where the widths differ), then landed back on the budget
    (``land_merged_widths``, priced on two labelled train batches of every target)."""
    import itertools

    from torch.utils.data import DataLoader

    from hdrq_plugin.nipq import describe_costs, land_merged_widths

    models = {}
    for t in targets:
        models[t], _family, info = nipq[t]
        report.add("nipq", str(spec), "single", t, info["accuracy"], **info["extra"])

    def merged_rows(rows: Report) -> None:
        merged = merge_models([models[t] for t in targets], rounding="noise-sampling", seed=seed)
        example = tests[targets[0]][0][0][None]

        def add(label: str) -> None:
            cost = describe_costs(merged, example).report()
            rows.add_per_target(label, str(spec), "merged", {t: accuracy(merged, tests[t]) for t in targets},
                                merged_targets="+".join(targets), average_weight_bits=cost.average_weight_bits,
                                average_act_bits=cost.average_act_bits)

        add("nipq+noise-sampling")
        land_merged_widths(merged, str(spec), [batch for t in targets for batch in itertools.islice(
            DataLoader(trains[t], batch_size=128), 2)])
        add("nipq+noise-sampling+landed")

    inputs = {"quantized": {t: nipq[t][2]["task_key"] for t in targets}, "seed": seed, "bits": str(spec),
              "landed": 1}
    with clock("merge_nipq_s"):
        cached_rows(report, results, "nipq-merge", inputs, merged_rows)


def _merge_label(method: str, subset: tuple[str, ...], targets: list[str]) -> str:
    """``method`` for the all-targets merge, ``method [a+b]`` for a subset."""
    return method if len(subset) == len(targets) else f"{method} [{'+'.join(subset)}]"


def _with_seed(recipe: BenchmarkRecipe, seed: int) -> BenchmarkRecipe:
    import dataclasses

    return dataclasses.replace(recipe, seed=seed)


def _barrier(report, bench, hdrq_models, targets, tests, out, clock, results: ResultCache, inputs: dict) -> None:
    """Float and quantized error barriers between the first two targets' models (a PNG)."""
    from torch.utils.data import ConcatDataset

    from hdrq_plugin.merge.barrier import BarrierResult, error_barrier, plot_barrier

    if len(targets) < 2:
        return
    pair = targets[:2]
    data = ConcatDataset([tests[t] for t in pair])

    def curves() -> dict:
        float_curve = error_barrier(bench.adapted[pair[0]], bench.adapted[pair[1]], data, steps=6)
        quant_curve = error_barrier(hdrq_models[pair[0]][0], hdrq_models[pair[1]][0], data, steps=6, quantized=True)
        return {"float": float_curve.to_dict(), "hdrq": quant_curve.to_dict()}

    with clock("barrier_s"):
        found, _ = results.get_or_compute("barrier", {**inputs, "pair": pair, "steps": 6}, curves)
    plot_barrier([BarrierResult(tuple(c["lambdas"]), tuple(c["losses"]), tuple(c["accuracies"]), c["quantized"],
                                c["label"]) for c in (found["float"], found["hdrq"])], out / "barrier.png")
    report.extra["barrier"] = {"pair": pair, **found}


def _export_and_validate(report, merged, spec, targets, tests, out, clock, rows: list, results: ResultCache,
                         inputs: dict) -> list[str]:
    """Export the merged HDRQ model to INT8 (or 4-bit-in-int8) and true INT4 and check them in ORT.

    Every file is validated (the whole validation under ``validation``); its report rows are
    appended to ``rows`` as ``(args, kwargs)`` of :meth:`Report.add` for the caller to add in
    the serial order, and the failures are returned, to be raised once every figure is reported.
    A validation is reused for the same file bytes, merge inputs and data (marked ``from_cache``).
    """
    from torch.utils.data import DataLoader

    from hdrq_plugin.export import ExportCheckError, export_qdq, validate

    example = tests[targets[0]][0][0].unsqueeze(0)
    fast = "int8" if spec.weight_bits == 8 else "int4-in-int8"
    files = {fast: out / f"merged-hdrq-{fast}.onnx"}
    if spec.weight_bits <= 4:
        files["int4"] = out / "merged-hdrq-int4.onnx"
    loaders = {t: DataLoader(tests[t], batch_size=256) for t in targets}
    report.extra["validation"] = {}
    failed = []
    for weights, path in files.items():
        try:
            with clock(f"export_{weights}_s"):
                export_qdq(merged, path, example, weights=weights, overwrite=True,
                           metadata={"method": "hdrq", "merged_targets": ",".join(targets)})
        except ExportCheckError as err:  # the exporter's own check refused the file: record, go on
            report.extra["validation"][weights] = {"ok": False, "path": str(path), "refused": str(err)}
            report.write(out)
            failed.append(str(err))
            continue
        def validated(path=path) -> dict:
            result = validate(path, merged, loaders)
            return {"report": result.to_dict(), "ok": result.ok, "summary": result.summary()}

        with clock(f"validate_{weights}_s"):
            found, hit = results.get_or_compute(f"validate-{weights}", {**inputs, "onnx": file_sha256(path)},
                                                validated)
        # a hit may come from another --out folder: the report names this run's file
        report.extra["validation"][weights] = {**found["report"], "onnx_path": str(path), "from_cache": hit}
        label = f"hdrq+noise-sampling[{weights}]"
        accuracy_ort = {t: found["report"]["accuracy"][t]["onnxruntime"] for t in targets}
        for t in targets:  # each target's row carries its own agreement with PyTorch
            rows.append(((label, str(spec), "merged_ort", t, accuracy_ort[t]),
                         {"top1_agreement": found["report"]["top1_agreement"][t], "validation_ok": found["ok"]}))
        rows.append(((label, str(spec), "merged_ort", HARMONIC_MEAN, harmonic_mean(list(accuracy_ort.values()))),
                     {"validation_ok": found["ok"]}))
        report.write(out)
        if not found["ok"]:
            failed.append(found["summary"])
    return failed


__all__ = ["run_demo", "float_recipe"]
