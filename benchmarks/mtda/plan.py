"""The multi-target benchmark's grid: which cells exist, in which order, under which cache key.

A *cell* is the smallest unit of work whose result is cached (issue 5): quantizing one adapted
model θt with one method (``quantize``), merging the quantized models of a subset of targets
with one tie rule (``merge``), an error barrier between two of them (``barrier``), the float
references of one seed (``float``), "float merge, then quantize with pooled calibration data"
(``merge-then-quantize``) and onnxruntime's own ``quantize_static`` on the float merge (``ort``).

A *variant* is a quantizer configuration: a method of the reconstruction engine plus
:class:`HDRQConfig` overrides — so every ablation (no noise, no distance term, λ_D, iterations
per unit) is a variant like any method. Brevitas GPTQ is the one variant outside the engine.

Cache keys are SHA-256 digests of everything that determines a cell's result: the cell, the
variant's full resolved config, the benchmark recipe's own cache key (which covers the recipe,
the code revision of the zoo and library versions) and the measurement settings that cell uses.
A changed recipe, config or setting therefore never reuses a stale result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from hdrq_examples.zoo import merge_subsets  # noqa: F401 - re-exported: the plan's merges
from hdrq_plugin.bitspec import BitSpec
from hdrq_plugin.merge.rules import NOISE_TRIALS, ROUNDING_RULES
from hdrq_plugin.nipq.train import CPU_EPOCHS as NIPQ_EPOCHS
from hdrq_plugin.nipq.train import NIPQConfig
from hdrq_plugin.ptq.config import METHODS, HDRQConfig
from hdrq_plugin.quantize import METHOD_NAMES

#: Bump when a cell's computation changes in a way its key does not capture.
CELL_CODE_VERSION = 1

MAIN_METHODS = tuple(m for m in METHOD_NAMES if m != "nipq")  # every PTQ method of quantize_model
#: Methods outside the reconstruction engine: Brevitas GPTQ, and NIPQ quantization-aware training
#: (hdrq_plugin.nipq.train; it trains on the target's labelled train split, not the 32 calibration
#: images, so it is not in the default grid: ``--methods ... nipq`` adds its rows).
OUTSIDE_ENGINE = ("gptq", "nipq")
SELECTABLE_METHODS = MAIN_METHODS + ("nipq",)
# NIPQ_EPOCHS (hdrq_plugin.nipq.train.CPU_EPOCHS): noise epochs per target; cpu_preset adds a hard epoch.
NIPQ_BATCH = 128
ALL_BITS = ("w8a8", "w4a8", "w4a4", "w3a3")
#: Merge rules: hdrq_plugin.merge.models's four, plus the off-grid average of the dequantized weights
#: (the non-deployable ceiling of any re-rounding rule, docs/hdrq_method.md §5).
DEQUANTIZED_AVERAGE = "dequantized-average"
RULES = (*ROUNDING_RULES, DEQUANTIZED_AVERAGE)
STOCHASTIC_RULES = ("noise-sampling", "random")
ABLATION_RULES = ("noise-sampling", "half-to-even")
REFERENCE_NOISE_SEEDS = 32  # docs/hdrq_method.md §5: the reference re-merges with 32 seeds
DEFAULT_DISTANCE = HDRQConfig().distance_weight
#: onnxruntime quantize_static configurations: (label, bits, weight type, activation type).
ORT_TYPES = (("w8a8", "QInt8", "QUInt8"), ("w4a8", "QInt4", "QUInt8"), ("w4a4", "QInt4", "QUInt4"))
#: onnxruntime's calibration methods. Measured with 1.32: quantize_static's Entropy calibration
#: builds 128-bin histograms with 128 quantized bins (it exposes no option to change either), which
#: leaves one candidate threshold, the full range: it gives exactly MinMax's scales. Percentile
#: (99.999 %) is the one that clips.
ORT_CALIBRATIONS = ("MinMax", "Entropy", "Percentile")
ORT_VARIANTS = {f"ort-{method.lower()}": method for method in ORT_CALIBRATIONS}
KINDS = ("float", "quantize", "merge", "barrier", "merge-then-quantize", "ort")


@dataclass(frozen=True)
class Variant:
    """A quantizer: ``method`` (an engine method or ``"gptq"``) with config ``overrides``."""

    label: str
    method: str
    overrides: tuple[tuple[str, object], ...] = ()
    iterations: int | None = None  # iterations per unit; None: the run's setting
    epochs: int = NIPQ_EPOCHS  # NIPQ only: noise epochs on the train split
    validate: bool = False  # also evaluated on the val splits: ablations are what one would choose from

    def __post_init__(self) -> None:
        if self.method not in METHODS + OUTSIDE_ENGINE:
            raise ValueError(f"variant {self.label!r}: unknown method {self.method!r}")

    def config(self, seed: int, iterations: int | None) -> HDRQConfig | None:
        """The engine config at ``seed`` (None for GPTQ and NIPQ, which run outside the engine)."""
        if self.method in OUTSIDE_ENGINE:
            return None
        overrides = {"seed": seed}
        iterations = self.iterations if self.iterations is not None else iterations
        if iterations is not None and self.method != "rtn":
            overrides["iterations"] = iterations
        return HDRQConfig.cpu_preset(self.method, **overrides).replace(**dict(self.overrides))

    def describe(self, seed: int, iterations: int | None) -> dict:
        """Everything that determines this variant's models (part of every cache key)."""
        config = self.config(seed, iterations)
        if self.method == "nipq":
            # the config's own epochs/batch_size fields are unused here (quantize_nipq gets them
            # as arguments): the variant's values go last so they are what the key holds
            return {**dataclasses.asdict(self.nipq_config(seed)), "method": "nipq", "epochs": self.epochs,
                    "batch_size": NIPQ_BATCH}
        if config is None:
            return {"method": "gptq", "num_samples": HDRQConfig().num_samples, "act_order": True, "seed": seed}
        return dataclasses.asdict(config)

    def nipq_config(self, seed: int) -> NIPQConfig:
        return NIPQConfig.cpu_preset(seed=seed, **dict(self.overrides))


@dataclass(frozen=True)
class Cell:
    """One cached unit of work. ``targets``: the quantized target, or the targets merged."""

    kind: str
    seed: int
    bits: str = "fp32"
    variant: str = ""
    targets: tuple[str, ...] = ()
    rule: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown cell kind {self.kind!r}; one of {KINDS}")

    @property
    def name(self) -> str:
        parts = [self.kind, self.variant, self.bits, f"seed {self.seed}", "+".join(self.targets), self.rule]
        return " ".join(p for p in parts if p)


@dataclass(frozen=True)
class BenchmarkSettings:
    """What a run covers and how it measures; the defaults are the full grid of issue 5."""

    recipe: str = "demo"  # a zoo recipe: BenchmarkRecipe() ("demo"), .tiny() or .fashion() (mtda.run.RECIPES)
    recipe_overrides: tuple[str, ...] = ()  # "field.sub=JSON" changes to the recipe, e.g. "source_training.epochs=5"
    targets: tuple[str, ...] | None = None  # a subset of the recipe's targets (None: all of them)
    test_images: int | None = None  # evaluate on the first N test images per target (None: all)
    seeds: tuple[int, ...] = (0, 1, 2)  # issue 5: at least 3 seeds (zoo, splits and calibration)
    zoo_seed: int | None = None  # None: each seed builds its own zoo; an int: one zoo, seeds vary calibration
    bits: tuple[str, ...] = ALL_BITS
    methods: tuple[str, ...] = MAIN_METHODS
    iterations: int | None = None  # per unit; None: HDRQConfig.cpu_preset's CPU_ITERATIONS
    rules: tuple[str, ...] = RULES
    noise_seeds: int = 8  # re-merges per stochastic rule (reference: 32, REFERENCE_NOISE_SEEDS)
    trials: int = NOISE_TRIALS  # docs/hdrq_method.md §5: K = 100 draws per noise-sampling merge
    n_calib: int = 32  # docs/hdrq_method.md §4: 32 calibration images per target
    ablation_bits: tuple[str, ...] = ("w4a4", "w3a3")
    ablations: tuple[str, ...] = ("no-noise", "no-distance", "uniform-noise")
    distance_grid: tuple[float, ...] = (5e-3, 1e-2, 5e-2, 1e-1)  # docs/hdrq_method.md §3.2: the reference's grid
    iteration_grid: tuple[int, ...] = (250, 500, 1000, 2000, 4000)
    iteration_methods: tuple[str, ...] = ("qdrop", "hdrq")
    nipq_epochs: int = NIPQ_EPOCHS  # NIPQ's noise epochs when "nipq" is among the methods
    merge_then_quantize: tuple[str, ...] = ("rtn", "hdrq")
    ort: bool = True
    barrier_steps: int = 11  # λ = 0, 0.1, …, 1
    barrier_pairs: str = "all"  # "all" pairs or only the "first"
    merge_subsets: str = "pairs+all"  # every two-target merge and the all-targets merge

    def __post_init__(self) -> None:
        for name in ("seeds", "bits", "methods", "rules"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        for bits in self.bits + self.ablation_bits:
            BitSpec.parse(bits)  # raises on a malformed spec, naming it
        for name, allowed in (("methods", SELECTABLE_METHODS), ("rules", RULES), ("iteration_methods", METHODS),
                              ("merge_then_quantize", MAIN_METHODS)):
            unknown = [v for v in getattr(self, name) if v not in allowed]
            if unknown:
                raise ValueError(f"{name}: unknown {unknown}; choose from {allowed}")
        if self.nipq_epochs < 1:
            raise ValueError(f"nipq_epochs must be >= 1, got {self.nipq_epochs}")
        if self.noise_seeds < 1 or self.trials < 1 or self.barrier_steps < 2 or self.n_calib < 1:
            raise ValueError("noise_seeds, trials and n_calib must be >= 1 and barrier_steps >= 2")
        if self.barrier_pairs not in ("all", "first"):
            raise ValueError(f"barrier_pairs must be 'all' or 'first', got {self.barrier_pairs!r}")

    @classmethod
    def quick(cls) -> BenchmarkSettings:
        """The ``--quick`` run, under 10 minutes on 2 cores (measured: 4 min 11 s with the zoo cached): two
        targets (one merge), W4A4, one seed, 100 iterations per unit, 250 test images per target,
        2 noise seeds × 30 trials, no ablations, one 3-point barrier per method."""
        return cls(targets=("mnist", "optdigits"), test_images=250, seeds=(0,), bits=("w4a4",),
                   methods=("rtn", "brecq", "qdrop", "hdrq", "gptq"), iterations=100,
                   rules=("noise-sampling", "half-to-even", "naive", DEQUANTIZED_AVERAGE), noise_seeds=2, trials=30,
                   ablation_bits=(), ablations=(), distance_grid=(), iteration_grid=(),
                   merge_then_quantize=("rtn",), barrier_steps=3, barrier_pairs="first")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def main_variants(methods: tuple[str, ...], nipq_epochs: int = NIPQ_EPOCHS) -> dict[str, Variant]:
    return {m: Variant(m, m, epochs=nipq_epochs) if m == "nipq" else Variant(m, m) for m in methods}


def ablation_variants(settings: BenchmarkSettings) -> dict[str, Variant]:
    """HDRQ without each ingredient, the λ_D grid, and accuracy against iterations per unit."""
    variants = {}
    named = {
        "no-noise": Variant("hdrq-no-noise", "hdrq", (("weight_rounding", "ste"), ("method", "hdrq-no-noise")),
                            validate=True),
        "no-distance": Variant("hdrq-no-distance", "hdrq", (("distance_weight", 0.0), ("method", "hdrq-no-distance")),
                               validate=True),
        "uniform-noise": Variant("hdrq-uniform-noise", "hdrq", (("noise_shape", "uniform"),
                                                                ("method", "hdrq-uniform-noise")), validate=True),
    }
    for name in settings.ablations:
        if name not in named:
            raise ValueError(f"unknown ablation {name!r}; one of {sorted(named)}")
        variants[named[name].label] = named[name]
    for weight in settings.distance_grid:
        if weight != DEFAULT_DISTANCE:  # the default is the hdrq variant itself
            label = f"hdrq-lambda{weight:g}"
            variants[label] = Variant(label, "hdrq", (("distance_weight", weight), ("method", label)), validate=True)
    default_iterations = settings.iterations or HDRQConfig.cpu_preset("hdrq").iterations
    for method in settings.iteration_methods:
        for count in settings.iteration_grid:
            if count != default_iterations:
                label = f"{method}-{count}it"
                variants[label] = Variant(label, method, (("method", label),), iterations=count, validate=True)
    return variants


def build_plan(settings: BenchmarkSettings, targets: tuple[str, ...]) -> tuple[dict[str, Variant], list[Cell]]:
    """All variants and the cells of a run, in execution order (each seed's zoo is loaded once)."""
    main = main_variants(settings.methods, settings.nipq_epochs)
    ablations = ablation_variants(settings)
    subsets = merge_subsets(targets, settings.merge_subsets)
    pairs = [s for s in subsets if len(s) == 2]
    barrier_pairs = pairs[:1] if settings.barrier_pairs == "first" else pairs
    # float and onnxruntime cells depend on the zoo only: with one zoo for every seed, run them once
    zoo_seeds = settings.seeds[:1] if settings.zoo_seed is not None else settings.seeds
    cells: list[Cell] = []
    for seed in settings.seeds:
        if seed in zoo_seeds:
            cells.append(Cell("float", seed, targets=targets))
        for bits in settings.bits:
            groups = [(v, settings.rules, barrier_pairs) for v in main.values()]
            if bits in settings.ablation_bits:
                rules = tuple(r for r in ABLATION_RULES if r in settings.rules) or settings.rules[:1]
                groups += [(v, rules, []) for v in ablations.values()]
            for variant, rules, barrier_for in groups:
                cells += [Cell("quantize", seed, bits, variant.label, (t,)) for t in targets]
                cells += [Cell("merge", seed, bits, variant.label, s, rule) for s in subsets for rule in rules]
                cells += [Cell("barrier", seed, bits, variant.label, p, "noise-sampling") for p in barrier_for]
            cells += [Cell("merge-then-quantize", seed, bits, m, s) for m in settings.merge_then_quantize
                      for s in subsets]
        if settings.ort and seed in zoo_seeds:
            cells += [Cell("ort", seed, bits, label, s) for label in ORT_VARIANTS for bits, _, _ in ORT_TYPES
                      for s in subsets]
    return {**main, **ablations}, cells


def cell_key(cell: Cell, settings: BenchmarkSettings, recipe_key: str, variants: dict[str, Variant]) -> str:
    """SHA-256 of everything that determines ``cell``'s result (see the module doc)."""
    payload: dict = {"cell": dataclasses.asdict(cell), "recipe": recipe_key, "code": CELL_CODE_VERSION,
                     "n_calib": settings.n_calib, "test_images": settings.test_images}
    if cell.kind in ("quantize", "merge", "barrier", "merge-then-quantize"):
        payload["variant"] = variants[cell.variant].describe(cell.seed, settings.iterations)
        # Every record reports the test split; val rows are extra, added to a record when a run
        # needs them (mtda.run.BenchmarkRun.is_finished), so they are not part of the key.
        payload["splits"] = ["test"]
    if cell.kind == "merge" and cell.rule in STOCHASTIC_RULES:
        payload["noise"] = {"noise_seeds": settings.noise_seeds, "trials": settings.trials}
    if cell.kind == "barrier":
        payload["barrier"] = {"steps": settings.barrier_steps, "trials": settings.trials}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def cell_splits(cell: Cell, variants: dict[str, Variant], settings: BenchmarkSettings) -> tuple[str, ...]:
    """The splits a cell evaluates: test always; val too for the ablations and, at the ablation
    bit-widths, for the variants they are compared with (HDRQ and the iteration sweep's methods)."""
    variant = variants.get(cell.variant)
    if variant is None or cell.kind not in ("quantize", "merge"):
        return ("test",)
    compared = cell.bits in settings.ablation_bits and cell.variant in ("hdrq", *settings.iteration_methods)
    return ("test", "val") if variant.validate or compared else ("test",)


def iterations_of(variant: Variant, settings: BenchmarkSettings) -> int:
    """Iterations per unit ``variant`` trains for in a run with ``settings`` (0: nothing trained)."""
    config = variant.config(0, settings.iterations)
    return 0 if config is None else config.iterations


def quantize_cell_for(cell: Cell, target: str) -> Cell:
    """The ``quantize`` cell that produces the model of ``target`` a merge or barrier cell needs."""
    return Cell("quantize", cell.seed, cell.bits, cell.variant, (target,))
