"""The multi-target benchmark (issue 5): does HDRQ keep merged quantized models accurate?

    .venv/bin/python -m benchmarks.mtda --quick --out runs/mtda-quick     # < 10 min on 2 cores
    .venv/bin/python -m benchmarks.mtda --out runs/mtda                   # the full grid (hours)
    .venv/bin/python -m benchmarks.mtda --out runs/mtda --ray             # its cells as Ray tasks (mtda.tasks)

For every seed (the zoo's seed: source model, adapted models and splits; and the calibration
seed) each adapted model θt is quantized with its own target's 32 calibration images by every
method (RTN, AdaRound, BRECQ, QDrop, HDRQ, Brevitas GPTQ) at every bit-width; the quantized
models of every two targets and of all targets are merged with every tie rule; plus the
references (float merge, dequantized average, naive re-rounding, merge-then-quantize with pooled
calibration data, onnxruntime's ``quantize_static``), the ablations and error barriers.
Settings and their defaults: :class:`mtda.plan.BenchmarkSettings`.

Output in ``--out``: ``results.json`` (report rows + seed + time, the full recipe, settings and
package versions, barrier curves, the full-grid time estimate), ``BENCHMARKS.md`` and
``plots/*.png``. Every finished cell is cached under ``--out`` (mtda.store) and skipped when
the run is repeated, so a killed run resumes; a changed recipe or setting recomputes what it changes.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from hdrq_examples.demo import float_recipe
from hdrq_examples.zoo import Benchmark, BenchmarkRecipe, cache_path_for, load_or_build_benchmark
from hdrq_plugin.ptq.config import HDRQConfig
from hdrq_plugin.run.checkpoint import CheckpointError, load_quantized, save_quantized
from hdrq_plugin.run.distributed import make_runner

from . import tasks as tasks_
from .estimate import CostModel, estimate_plan
from .plan import (
    BenchmarkSettings,
    Cell,
    build_plan,
    cell_key,
    cell_splits,
    iterations_of,
    quantize_cell_for,
)
from .store import CellStore
from .summary import write_outputs

#: zoo recipes by name; "fashion" needs Debian's dataset-fashion-mnist (the zoo says so if absent)
RECIPES = {"demo": BenchmarkRecipe, "tiny": BenchmarkRecipe.tiny, "fashion": BenchmarkRecipe.fashion}


def recipe_for(settings: BenchmarkSettings, seed: int) -> BenchmarkRecipe:
    if settings.recipe not in RECIPES:
        raise ValueError(f"unknown recipe {settings.recipe!r}; one of {sorted(RECIPES)}")
    zoo_seed = seed if settings.zoo_seed is None else settings.zoo_seed
    recipe = dataclasses.replace(RECIPES[settings.recipe](), seed=zoo_seed)
    for assignment in settings.recipe_overrides:
        path, equals, text = assignment.partition("=")
        if not equals:
            raise ValueError(f"recipe override {assignment!r} is not of the form field.sub=JSON")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"recipe override {assignment!r}: {text!r} is not JSON ({err})") from err
        recipe = replace_field(recipe, path.split("."), value, assignment)
    return recipe


def replace_field(config, path: list[str], value, assignment: str):
    """A copy of the (nested, frozen) dataclass ``config`` with the field at ``path`` set to ``value``."""
    name = path[0]
    if not dataclasses.is_dataclass(config) or name not in {f.name for f in dataclasses.fields(config)}:
        raise ValueError(f"recipe override {assignment!r}: {type(config).__name__} has no field {name!r}")
    if len(path) > 1:
        value = replace_field(getattr(config, name), path[1:], value, assignment)
    elif isinstance(value, list):
        value = tuple(value)  # JSON arrays are the recipe's tuples
    return dataclasses.replace(config, **{name: value})


def zoo_fingerprint(recipe: BenchmarkRecipe, cache_dir: str | None) -> str:
    """The recipe's cache key plus a digest of its cached model file, if built: cells computed on
    models that were rebuilt since (e.g. after a code change the recipe does not capture) are
    never reused."""
    path = cache_path_for(recipe, cache_dir)
    if not path.is_file():
        return f"{recipe.cache_key()}:unbuilt"
    return f"{recipe.cache_key()}:{hashlib.sha256(path.read_bytes()).hexdigest()}"


def select_targets(available: tuple[str, ...], wanted: tuple[str, ...] | None) -> tuple[str, ...]:
    if wanted is None:
        return available
    unknown = [t for t in wanted if t not in available]
    if unknown or len(set(wanted)) < 2:
        raise ValueError(f"targets must be at least two distinct targets of the recipe {available}, got {wanted}")
    return tuple(wanted)


def with_test_prefix(bench: Benchmark, images: int | None) -> Benchmark:
    """``bench`` evaluated on the first ``images`` of each test split (a class-balanced prefix,
    hdrq_examples.domains); the models and the other splits are unchanged."""
    if images is None:
        return bench
    if images < 1:
        raise ValueError(f"test_images must be positive, got {images}")
    domains = {name: dataclasses.replace(split, test=TensorDataset(*(t[:images] for t in split.test.tensors)))
               for name, split in bench.domains.items()}
    return dataclasses.replace(bench, domains=domains)


class BenchmarkRun:
    """Runs a plan cell by cell, skipping cached cells; keeps one group's models in memory."""

    def __init__(self, settings: BenchmarkSettings, out: str | Path, *, cache_dir: str | None = None,
                 keep_going: bool = False) -> None:
        self.settings, self.keep_going, self.cache_dir = settings, keep_going, cache_dir
        self.store = CellStore(out)
        self.recipes = {seed: recipe_for(settings, seed) for seed in settings.seeds}
        self.recipe_keys = {seed: zoo_fingerprint(recipe, cache_dir) for seed, recipe in self.recipes.items()}
        targets = {recipe.target_domains for recipe in self.recipes.values()}
        if len(targets) != 1:
            raise ValueError(f"the seeds' recipes disagree on the targets: {targets}")
        self.all_targets = targets.pop()
        self.targets = select_targets(self.all_targets, settings.targets)
        self.full_test_sizes: dict[str, int] = {}
        self.variants, self.plan = build_plan(settings, self.targets)
        self.failures: list[dict] = []
        self._bench: Benchmark | None = None
        self._models: dict[str, torch.nn.Module] = {}
        self._group: tuple | None = None

    def key(self, cell: Cell) -> str:
        return cell_key(cell, self.settings, self.recipe_keys[cell.seed], self.variants)

    def is_finished(self, cell: Cell) -> bool:
        """A record exists and it evaluated every split this run needs (val is added on demand)."""
        record = self.store.get(self.key(cell))
        needed = set(cell_splits(cell, self.variants, self.settings))
        return record is not None and needed <= set(record.get("splits", ["test"]))

    def pending(self) -> list[Cell]:
        return [cell for cell in self.plan if not self.is_finished(cell)]

    def run(self) -> None:
        bar = tqdm(self.plan, desc="benchmark cells", unit="cell", disable=None)
        for cell in bar:
            if self.is_finished(cell):
                continue
            bar.set_postfix_str(cell.name)
            start = time.perf_counter()
            try:
                self.compute(cell)
                if bar.disable:  # no progress bar (not a terminal): one line per computed cell
                    print(f"done {cell.name} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
            except Exception as err:
                if not self.keep_going:
                    raise
                warnings.warn(f"cell {cell.name} failed: {type(err).__name__}: {err}", stacklevel=2)
                self.failures.append({"cell": cell.name, "error": f"{type(err).__name__}: {err}"})

    # --- cells ----------------------------------------------------------------------------------
    def bench(self, seed: int) -> Benchmark:
        if self._bench is None or self._bench.recipe != self.recipes[seed]:
            bench = load_or_build_benchmark(self.recipes[seed], n_calib=self.settings.n_calib,
                                            cache_dir=self.cache_dir)
            if not bench.from_cache:  # new models: cells of this seed get new keys
                self.recipe_keys[seed] = zoo_fingerprint(self.recipes[seed], self.cache_dir)
            self.full_test_sizes = {t: len(bench.domains[t].test) for t in self.all_targets}
            self._bench = with_test_prefix(bench, self.settings.test_images)
        return self._bench

    def compute(self, cell: Cell) -> dict:
        torch.manual_seed(cell.seed)
        bench = self.bench(cell.seed)
        if cell.kind == "quantize":
            return self.quantize(cell)[1]
        models = {}
        if cell.kind in ("merge", "barrier"):
            models = {t: self.quantized(quantize_cell_for(cell, t)) for t in cell.targets}
        return self.store.put(cell, self.key(cell), tasks_.cell_record(cell, bench, self.context(cell), models))

    def context(self, cell: Cell) -> tasks_.CellContext:
        return tasks_.CellContext(self.settings, self.variants, self.targets,
                                  cell_splits(cell, self.variants, self.settings), self.full_test_sizes,
                                  str(self.store.folder))

    def quantize(self, cell: Cell) -> tuple[torch.nn.Module, dict]:
        bench = self.bench(cell.seed)
        qmodel, family, result = tasks_.quantize_record(cell, bench, self.context(cell))
        key = self.key(cell)
        # the checkpoint first: a record always has its model
        save_quantized(self.store.model_path(key), qmodel, recipe=float_recipe(bench), bits=cell.bits,
                       family=family, metadata={"cell": cell.name, "key": key})
        self._remember(cell, key, qmodel)
        return qmodel, self.store.put(cell, key, result)

    def quantized(self, cell: Cell) -> torch.nn.Module:
        """The model of a quantize cell: in memory, from its checkpoint, or computed now."""
        key = self.key(cell)
        if key in self._models:
            return self._models[key]
        if key in self.store:
            try:
                model, _ = load_quantized(self.store.model_path(key))
                self._remember(cell, key, model)
                return model
            except CheckpointError as err:
                warnings.warn(f"{cell.name}: {err}; quantizing again", stacklevel=2)
                self.store.forget(cell, key)
        return self.quantize(cell)[0]

    def _remember(self, cell: Cell, key: str, model: torch.nn.Module) -> None:
        group = (cell.seed, cell.bits, cell.variant)
        if group != self._group:  # the plan runs group by group: earlier models are not needed again
            self._models.clear()
            self._group = group
        self._models[key] = model

    # --- results --------------------------------------------------------------------------------
    def finished_records(self) -> list[dict]:
        return self.store.records([self.key(cell) for cell in self.plan])

    def full_grid_estimate(self) -> dict:
        """The full default grid's cost, from the cells this run measured (mtda.estimate)."""
        records = self.finished_records()
        sizes = self.full_test_sizes or next((r["full_test_sizes"] for r in records if "full_test_sizes" in r), {})
        if set(sizes) != set(self.all_targets):
            return {}  # nothing measured yet
        full = BenchmarkSettings(recipe=self.settings.recipe)
        variants, plan = build_plan(full, self.all_targets)
        model = CostModel(records, {**variants, **self.variants}, full, lambda v: iterations_of(v, full), sizes)
        run_sizes = {t: min(n, self.settings.test_images or n) for t, n in sizes.items()}
        this_run = CostModel(records, self.variants, self.settings, lambda v: iterations_of(v, self.settings),
                             run_sizes)
        return {"full_grid": {"settings": full.to_dict(), "test_sizes": sizes, **estimate_plan(plan, model)},
                "this_run": estimate_plan(self.plan, this_run)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mtda", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/mtda", help="output and cache folder (default runs/mtda)")
    parser.add_argument("--quick", action="store_true", help="W4A4, one seed, short calibration: < 10 min")
    parser.add_argument("--recipe", choices=sorted(RECIPES), help="benchmark recipe (default demo)")
    parser.add_argument("--recipe-set", nargs="+", metavar="FIELD=JSON",
                        help="change the recipe, e.g. source_training.epochs=5 (part of every cache key)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2; --quick: 0)")
    parser.add_argument("--targets", nargs="+", help="a subset of the recipe's targets (default all)")
    parser.add_argument("--test-images", type=int, help="first N test images per target (default all)")
    parser.add_argument("--zoo-seed", type=int, help="one zoo for every seed (seeds then vary calibration only)")
    parser.add_argument("--bits", nargs="+", help="bit-widths, e.g. w4a4 w3a3 (default all four)")
    parser.add_argument("--nipq-epochs", type=int, help="NIPQ noise epochs per target (default 10)")
    parser.add_argument("--methods", nargs="+", help="rtn adaround brecq qdrop hdrq gptq nipq (default: all but nipq, which trains on the train splits)")
    parser.add_argument("--iterations", type=int, help=f"iterations per unit (default {HDRQConfig.cpu_preset().iterations})")
    parser.add_argument("--noise-seeds", type=int, help="re-merges per stochastic rule (default 8; reference 32)")
    parser.add_argument("--ablation-bits", nargs="*", help="bit-widths of the ablations (default w4a4 w3a3)")
    parser.add_argument("--iteration-grid", type=int, nargs="*", help="iterations per unit of the budget sweep")
    parser.add_argument("--iteration-methods", nargs="+", help="methods of the budget sweep (default qdrop hdrq)")
    parser.add_argument("--rules", nargs="+", help="merge rules (default: all five, see mtda.plan.RULES)")
    parser.add_argument("--ablations", nargs="*", help="no-noise no-distance uniform-noise (default all three)")
    parser.add_argument("--distance-grid", type=float, nargs="*", help="λ_D values (default 5e-3 1e-2 5e-2 1e-1)")
    parser.add_argument("--merge-then-quantize", nargs="*", help="methods of the pooled-calibration rows")
    parser.add_argument("--barrier-steps", type=int, help="λ points per barrier (default 11)")
    parser.add_argument("--barrier-pairs", choices=("all", "first"), help="barriers for every pair or the first")
    parser.add_argument("--no-ort", action="store_true", help="skip onnxruntime quantize_static")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    parser.add_argument("--cache-dir", help="model zoo cache (default $HDRQ_CACHE_DIR or ~/.cache/hdrq-plugin)")
    parser.add_argument("--summary", help="where to write the markdown summary (default OUT/BENCHMARKS.md)")
    parser.add_argument("--notes", help="a markdown file whose text heads the summary (findings)")
    parser.add_argument("--plots", help="folder of the PNG plots (default OUT/plots)")
    parser.add_argument("--keep-going", action="store_true", help="record a failing cell and go on")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the outputs from the cache")
    parser.add_argument("--ray", action="store_true",
                        help="run the cells as Ray tasks (hdrq-plugin[distributed]; mtda.tasks)")
    parser.add_argument("--tasks", action="store_true",
                        help="run the cells as tasks one after another: --ray's path without Ray")
    parser.add_argument("--address", help="Ray cluster to join (implies --ray; default $RAY_ADDRESS or a local Ray)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (default: all cores)")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> BenchmarkSettings:
    settings = BenchmarkSettings.quick() if args.quick else BenchmarkSettings()
    changes = {"recipe": args.recipe, "iterations": args.iterations, "noise_seeds": args.noise_seeds,
               "seeds": tuple(args.seeds) if args.seeds else None, "test_images": args.test_images,
               "zoo_seed": args.zoo_seed,
               "recipe_overrides": tuple(args.recipe_set) if args.recipe_set else None,
               "targets": tuple(args.targets) if args.targets else None,
               "bits": tuple(args.bits) if args.bits else None,
               "methods": tuple(args.methods) if args.methods else None, "nipq_epochs": args.nipq_epochs,
               "ablation_bits": tuple(args.ablation_bits) if args.ablation_bits is not None else None,
               "iteration_grid": tuple(args.iteration_grid) if args.iteration_grid is not None else None,
               "ort": False if args.no_ort else None,
               "rules": tuple(args.rules) if args.rules else None,
               "iteration_methods": tuple(args.iteration_methods) if args.iteration_methods else None,
               "ablations": tuple(args.ablations) if args.ablations is not None else None,
               "distance_grid": tuple(args.distance_grid) if args.distance_grid is not None else None,
               "merge_then_quantize": (tuple(args.merge_then_quantize) if args.merge_then_quantize is not None
                                       else None),
               "barrier_steps": args.barrier_steps, "barrier_pairs": args.barrier_pairs}
    return dataclasses.replace(settings, **{k: v for k, v in changes.items() if v is not None})


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # Brevitas' FX backport and torch's TorchScript exporter warn once per converted model.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    settings = settings_from_args(args)
    start = time.perf_counter()
    run = BenchmarkRun(settings, args.out, cache_dir=args.cache_dir, keep_going=args.keep_going)
    pending = len(run.pending())
    print(f"{len(run.plan)} cells, {len(run.plan) - pending} cached in {run.store.folder}, {pending} to run",
          file=sys.stderr)
    if not args.report_only and (args.ray or args.address or args.tasks):
        runner = make_runner(args.ray or bool(args.address), address=args.address, num_cpus=args.num_cpus)
        try:
            counts = tasks_.run_with_runner(run, runner)
        finally:
            runner.shutdown()
        print(f"{runner.name} runner: {counts}", file=sys.stderr)
    elif not args.report_only:
        run.run()
    command = " ".join(["python -m benchmarks.mtda", *sys.argv[1:]])  # how it was run, to rerun it
    paths = write_outputs(run, command=command, wall_seconds=time.perf_counter() - start,
                          summary=args.summary, notes=args.notes, plots_dir=args.plots)
    print("\n".join(str(p) for p in paths), file=sys.stderr)
    return 1 if run.failures else 0


if __name__ == "__main__":
    sys.exit(main())
