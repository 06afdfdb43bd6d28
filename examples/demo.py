"""The offline multi-target demo behind ``hdrq demo`` (and ``make demo``).

source θ0 → adapted θt per target → quantized per target (RTN and HDRQ) → merged on one integer
grid → exported to ONNX (INT8 / INT4) → validated in onnxruntime, with a report of every step.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from hdrq_plugin._io import ensure_writable_dir
from hdrq_plugin.bitspec import BitSpec
from hdrq_plugin.convert.to_brevitas import fold_batchnorm
from hdrq_plugin.evaluation import accuracy, harmonic_mean
from hdrq_plugin.merge.float_merge import average_float_models
from hdrq_plugin.merge.models import merge_models
from hdrq_plugin.nipq.train import CPU_EPOCHS as NIPQ_CPU_EPOCHS
from hdrq_plugin.progress import timed_stage
from hdrq_plugin.quantize import quantize_model
from hdrq_plugin.run.checkpoint import ModelRecipe, save_float_model, save_quantized
from hdrq_plugin.run.report import HARMONIC_MEAN, Report

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
DEMO_NIPQ_EPOCHS = NIPQ_CPU_EPOCHS


def float_recipe(benchmark: Benchmark) -> ModelRecipe:
    return ModelRecipe("hdrq_examples.models:build_resnet",
                       {"config": benchmark.recipe.architecture.to_dict()})


def run_demo(bits: str = "w4a4", out: str | Path = "runs/demo", seed: int = 0, size: str = "demo",
             iterations: int | None = DEMO_ITERATIONS, export: bool = True, hot: bool = False,
             nipq_epochs: int = DEMO_NIPQ_EPOCHS) -> Report:
    """Run the whole pipeline and write ``report.json`` / ``report.md`` (and models) into ``out``."""
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

    # float references: θ0 everywhere, θt at home, the float merge everywhere
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
    save_float_model(out / "source.pt", bench.source_model, float_recipe(bench))
    report.write(out)  # every stage below rewrites the report: a late failure keeps the earlier ones

    quantized: dict[str, dict[str, tuple]] = {}  # method → target → (quantized θt, quantizer family)
    for method in ("rtn", "hdrq"):
        quantized[method] = {}
        for t in targets:
            with clock(f"quantize_{method}_s", t):
                result = quantize_model(bench.adapted[t], bench.domains[t].calib, bits=spec, method=method,
                                        source=bench.source_model, seed=seed, iterations=iterations)
            report.add(method, str(spec), "single", t, accuracy(result.model, tests[t]))
            quantized[method][t] = (result.model, result.family)
            report.write(out)

    # every pair (where ties between two integer codes decide the rounding) and all targets
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
        report.write(out)
    hdrq_merged = merged_models["hdrq+noise-sampling"]
    family = quantized["hdrq"][targets[0]][1]
    save_quantized(out / "merged-hdrq.pt", hdrq_merged, recipe=float_recipe(bench), bits=spec,
                   family=family, metadata={"method": "hdrq", "merged_from": targets,
                                            "rounding": "noise-sampling", "seed": seed})

    if nipq_epochs:
        _nipq_rows(report, bench, spec, targets, tests, seed, nipq_epochs, clock)
        report.write(out)
    _barrier(report, bench, quantized["hdrq"], targets, tests, out, clock)
    report.write(out)
    if export:
        _export_and_validate(report, hdrq_merged, spec, targets, tests, out, clock)
    return report


def _nipq_rows(report, bench, spec, targets, tests, seed, epochs, clock) -> None:
    """NIPQ per target at ``spec``'s average bits, and their merge (differing widths take the wider)."""
    from hdrq_plugin.nipq.train import quantize_nipq

    models = {}
    for t in targets:
        with clock("quantize_nipq_s", t):
            models[t], result = quantize_nipq(bench.adapted[t], bench.domains[t].train, spec, epochs=epochs,
                                              seed=seed, eval_data=tests[t])
        report.add("nipq", str(spec), "single", t, accuracy(models[t], tests[t]),
                   average_weight_bits=result.report.average_weight_bits,
                   average_act_bits=result.report.average_act_bits,
                   accuracy_before_freeze=result.accuracy_before_freeze,
                   accuracy_after_freeze=result.accuracy_after_freeze)
    with clock("merge_nipq_s"):
        merged = merge_models([models[t] for t in targets], rounding="noise-sampling", seed=seed)
    report.add_per_target("nipq+noise-sampling", str(spec), "merged", {t: accuracy(merged, tests[t]) for t in targets},
                          merged_targets="+".join(targets))


def _merge_label(method: str, subset: tuple[str, ...], targets: list[str]) -> str:
    """``method`` for the all-targets merge, ``method [a+b]`` for a subset."""
    return method if len(subset) == len(targets) else f"{method} [{'+'.join(subset)}]"


def _with_seed(recipe: BenchmarkRecipe, seed: int) -> BenchmarkRecipe:
    import dataclasses

    return dataclasses.replace(recipe, seed=seed)


def _barrier(report, bench, hdrq_models, targets, tests, out, clock) -> None:
    """Float and quantized error barriers between the first two targets' models (a PNG)."""
    from torch.utils.data import ConcatDataset

    from hdrq_plugin.merge.barrier import error_barrier, plot_barrier

    if len(targets) < 2:
        return
    pair = targets[:2]
    data = ConcatDataset([tests[t] for t in pair])
    with clock("barrier_s"):
        float_curve = error_barrier(bench.adapted[pair[0]], bench.adapted[pair[1]], data, steps=6)
        quant_curve = error_barrier(hdrq_models[pair[0]][0], hdrq_models[pair[1]][0], data, steps=6, quantized=True)
    plot_barrier([float_curve, quant_curve], out / "barrier.png")
    report.extra["barrier"] = {"pair": pair, "float": float_curve.to_dict(), "hdrq": quant_curve.to_dict()}


def _export_and_validate(report, merged, spec, targets, tests, out, clock) -> None:
    """Export the merged HDRQ model to INT8 (or 4-bit-in-int8) and true INT4 and check them in ORT.

    Every file is validated and reported (rows, and the whole validation under
    ``validation``) before any failure is raised, so the report always holds every figure.
    """
    from torch.utils.data import DataLoader

    from hdrq_plugin.export import ExportCheckError, ValidationError, export_qdq, validate

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
        with clock(f"validate_{weights}_s"):
            result = validate(path, merged, loaders)
        report.extra["validation"][weights] = result.to_dict()
        label = f"hdrq+noise-sampling[{weights}]"
        for t in targets:  # each target's row carries its own agreement with PyTorch
            report.add(label, str(spec), "merged_ort", t, result.accuracy[t]["onnxruntime"],
                       top1_agreement=result.top1_agreement[t], validation_ok=result.ok)
        report.add(label, str(spec), "merged_ort", HARMONIC_MEAN,
                   harmonic_mean([result.accuracy[t]["onnxruntime"] for t in targets]), validation_ok=result.ok)
        report.write(out)
        if not result.ok:
            failed.append(result.summary())
    if failed:
        raise ValidationError("; ".join(failed))


__all__ = ["run_demo", "float_recipe"]
