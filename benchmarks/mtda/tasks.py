"""The benchmark grid as independent tasks (``benchmarks.mtda --ray`` / ``--tasks``): hdrq_plugin.run.distributed.

Two waves: every pending ``quantize`` cell, then every other pending cell (merges and barriers
load the checkpoints the first wave wrote). Each seed's zoo is put in the runner's object store
once and passed to every task by reference. The cell store (mtda.store) stays the source of
truth: only cells without a record are submitted, a quantize task writes its checkpoint
(atomically) before the driver writes its record (atomically) as each task finishes, so a
killed run loses only the cells in flight and a rerun resumes. Ray re-runs a task whose worker
died (hdrq_plugin.run.distributed.DEFAULT_MAX_RETRIES).

On a cluster the ``--out`` folder must be on storage every node sees (checkpoints are written
by the workers, records by the driver).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn
from torch.utils.data import TensorDataset

from hdrq_examples.demo import float_recipe
from hdrq_examples.domains import DomainSplits
from hdrq_examples.zoo import Benchmark
from hdrq_plugin.merge.float_merge import average_float_models
from hdrq_plugin.run.checkpoint import load_quantized, save_quantized
from hdrq_plugin.run.distributed import Task, TaskFailure

from . import cells as cells_
from .ort import ort_quantize_static_accuracies
from .plan import ORT_TYPES, ORT_VARIANTS, BenchmarkSettings, Cell, Variant, iterations_of, merge_subsets


@dataclass(frozen=True)
class CellContext:
    """What a cell needs beside the zoo: small, pickled with each task."""

    settings: BenchmarkSettings
    variants: dict[str, Variant]
    targets: tuple[str, ...]
    splits: tuple[str, ...] = ("test",)
    full_test_sizes: dict[str, int] = field(default_factory=dict)
    workdir: str = "."
    model_path: str | None = None  # quantize: where its checkpoint goes
    input_models: dict[str, str] = field(default_factory=dict)  # merge/barrier: target -> checkpoint


def quantize_record(cell: Cell, bench: Benchmark, ctx: CellContext) -> tuple[nn.Module, str, dict]:
    """θt quantized by the cell's variant and its record (accuracy on its own target, times)."""
    (target,) = cell.targets
    variant = ctx.variants[cell.variant]
    qmodel, family, result = cells_.quantize_cell(bench, variant, cell.bits, target, cell.seed,
                                                   ctx.settings.iterations, ctx.splits)
    result["splits"] = list(ctx.splits)
    result["iterations"] = iterations_of(variant, ctx.settings)  # what the cost model scales from
    return qmodel, family, result


def cell_record(cell: Cell, bench: Benchmark, ctx: CellContext, models: Mapping[str, nn.Module] = ()) -> dict:
    """The record of a cell other than ``quantize``; ``models``: the quantized θt a merge or barrier uses."""
    settings = ctx.settings
    if cell.kind == "float":
        subsets = merge_subsets(ctx.targets, settings.merge_subsets)
        pairs = [s for s in subsets if len(s) == 2]
        pairs = pairs[:1] if settings.barrier_pairs == "first" else pairs
        with cells_.stopwatch(timings := {}):
            result = cells_.float_cell(bench, ctx.targets, subsets, pairs, settings.barrier_steps, cell.seed)
        return {**result, "full_test_sizes": ctx.full_test_sizes, **timings}
    if cell.kind == "merge-then-quantize":
        return cells_.merge_then_quantize_cell(bench, ctx.variants[cell.variant], cell.bits, cell.targets,
                                               cell.seed, settings.iterations)
    if cell.kind == "ort":
        return ort_record(cell, bench, ctx.workdir)
    variant = ctx.variants[cell.variant]
    if cell.kind == "merge":
        result = cells_.merge_cell(models, cell.targets, cell.rule, bench, variant, cell.bits,
                                   noise_seeds=settings.noise_seeds, trials=settings.trials, seed=cell.seed,
                                   splits=ctx.splits)
        result["splits"] = list(ctx.splits)
        return result
    if cell.kind == "barrier":
        return cells_.barrier_cell(models, cell.targets, bench, variant, cell.bits, steps=settings.barrier_steps,
                                   trials=settings.trials, seed=cell.seed)
    raise ValueError(f"cell {cell.name}: no record for kind {cell.kind!r} here")


def ort_record(cell: Cell, bench: Benchmark, workdir: str | Path) -> dict:
    """onnxruntime's quantize_static on the float merge of the cell's targets (pooled calibration)."""
    (weight_type, activation_type), = [(w, a) for bits, w, a in ORT_TYPES if bits == cell.bits]
    calibration = ORT_VARIANTS[cell.variant]
    pool = cells_.pooled_calibration(bench, cell.targets)
    with cells_.stopwatch(timings := {}):
        merged = average_float_models([bench.adapted[t] for t in cell.targets])
        accuracies = ort_quantize_static_accuracies(
            merged, pool, {t: bench.domains[t].test for t in cell.targets}, weight_type=weight_type,
            activation_type=activation_type, calibration_method=calibration, workdir=workdir)
    rows = cells_.accuracy_rows(cell.variant, cell.bits, "merged_ort", accuracies, seed=cell.seed,
                                merge=cells_.merge_label(cell.targets), quantizer=cell.variant,
                                rounding="merge-then-quantize", weight_type=weight_type,
                                activation_type=activation_type, time_s=timings["seconds"])
    return {"rows": rows, **timings}


@functools.lru_cache(maxsize=8)
def _cached_checkpoint(path: str, mtime_ns: int) -> nn.Module:
    # a worker process runs many merges of the same few models: load each once (merges and
    # barriers never modify their inputs); the mtime is in the key so a rewritten file is reloaded
    return load_quantized(path)[0]


def load_checkpoint(path: str) -> nn.Module:
    return _cached_checkpoint(path, Path(path).stat().st_mtime_ns)


def run_cell(bench: Benchmark, cell: Cell, ctx: CellContext) -> dict:
    """One task: a cell's record; a quantize cell writes its checkpoint first (a record always has its model)."""
    if cell.kind == "quantize":
        qmodel, family, result = quantize_record(cell, bench, ctx)
        save_quantized(ctx.model_path, qmodel, recipe=float_recipe(bench), bits=cell.bits, family=family,
                       metadata={"cell": cell.name, "key": Path(ctx.model_path).stem})
        return result
    models = {t: load_checkpoint(path) for t, path in ctx.input_models.items()}
    return cell_record(cell, bench, ctx, models)


def task_view(bench: Benchmark, targets: tuple[str, ...], *, keep_train: bool = False) -> Benchmark:
    """``bench`` without what no cell reads (source domains; train splits unless NIPQ cells train
    on them, ``keep_train``): less to put in the object store."""
    def without_train(split: DomainSplits) -> DomainSplits:
        if keep_train:
            return split
        images, labels = split.train.tensors
        return dataclasses.replace(split, train=TensorDataset(images[:0], labels[:0]))

    return dataclasses.replace(bench, domains={t: without_train(bench.domains[t]) for t in targets})


def run_with_runner(run, runner) -> dict:
    """Run ``run``'s pending cells (an ``mtda.run.BenchmarkRun``) as tasks of ``runner``; returns counts."""
    seeds = sorted({cell.seed for cell in run.pending()})
    shared: dict = {}
    for seed in seeds:  # load (or build) each zoo first: building one changes its cells' keys
        recipe = run.recipes[seed]
        if recipe not in shared:
            shared[recipe] = (runner.share(task_view(run.bench(seed), run.all_targets, keep_train=any(
                v.method == "nipq" for v in run.variants.values()))), dict(run.full_test_sizes))
    pending = run.pending()
    waves = ([c for c in pending if c.kind == "quantize"], [c for c in pending if c.kind != "quantize"])
    counts = {"submitted": 0, "finished": 0, "failed": 0}
    for number, wave in enumerate(waves, start=1):
        tasks, cells = [], {}
        for cell in wave:
            zoo, sizes = shared[run.recipes[cell.seed]]
            try:
                ctx = _context(run, cell, sizes)
            except LookupError as err:  # a model this cell needs failed in the first wave
                _fail(run, cell.name, str(err), counts)
                continue
            tasks.append(Task(cell.name, run_cell, (zoo, cell, ctx), seed=cell.seed))
            cells[cell.name] = cell
        counts["submitted"] += len(tasks)
        for task, outcome in runner.as_completed(tasks, desc=f"benchmark cells, wave {number}/2"):
            if isinstance(outcome, TaskFailure):
                _fail(run, task.name, outcome.error, counts)
                continue
            cell = cells[task.name]
            run.store.put(cell, run.key(cell), outcome)
            counts["finished"] += 1
    if counts["failed"] and not run.keep_going:
        raise RuntimeError(f"{counts['failed']} cells failed: " + "; ".join(f["cell"] for f in run.failures)
                           + " (finished cells are kept; rerun to resume)")
    return counts


def _context(run, cell: Cell, full_test_sizes: dict[str, int]) -> CellContext:
    from .plan import cell_splits, quantize_cell_for

    ctx = CellContext(run.settings, run.variants, run.targets, cell_splits(cell, run.variants, run.settings),
                      full_test_sizes, str(run.store.folder))
    if cell.kind == "quantize":
        return dataclasses.replace(ctx, model_path=str(run.store.model_path(run.key(cell))))
    if cell.kind in ("merge", "barrier"):
        inputs = {}
        for target in cell.targets:
            source = quantize_cell_for(cell, target)
            if run.key(source) not in run.store:
                raise LookupError(f"needs the model of {source.name}, which has no record")
            inputs[target] = str(run.store.model_path(run.key(source)))
        return dataclasses.replace(ctx, input_models=inputs)
    return ctx


def _fail(run, name: str, error: str, counts: dict) -> None:
    run.failures.append({"cell": name, "error": error})
    counts["failed"] += 1
