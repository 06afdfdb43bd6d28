"""How long a plan takes, from the CPU seconds of the cells measured so far (pure arithmetic).

Costs are single-thread CPU seconds (the benchmark runs torch with one thread), i.e. the wall time
of one process on an idle core; minutes spent waiting for a busy CPU are not counted.

* Evaluation (a forward pass over test images) costs ``per_image`` seconds, fitted on the merge
  cells, where evaluation is nearly all the work; every cell records how many images it evaluated.
* ``quantize`` (and ``merge-then-quantize``): calibration ``overhead + per_iteration × iterations``
  plus the evaluation of the model on its test split. The overhead is the calibration cost of the
  RTN cells (conversion, step search, activation calibration: nothing trained); ``per_iteration``
  is fitted per method on its measured cells. GPTQ's calibration is a constant.
* ``merge``: ``per_image × served test images × draws``; draws = noise seeds for a stochastic rule
  on an even number of models (odd counts have no ties, mtda.cells.merged_accuracies), else 1.
* ``barrier``: its own per-image cost (merging every λ point included) × steps × pair images.
* ``float``: ``per_image`` × the images it evaluates; ``ort``: the measured mean (its evaluation
  runs in onnxruntime and its export dominates).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence

from .plan import STOCHASTIC_RULES, BenchmarkSettings, Cell, Variant, merge_subsets


def _fmean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _per_image(records: list[dict]) -> float | None:
    return _fmean([r["cpu_seconds"] / r["evaluated_images"] for r in records if r.get("evaluated_images")])


class CostModel:
    """Per-kind costs fitted on finished cell records (``cell``, ``cpu_seconds``, ``evaluated_images``)
    for a plan with ``settings`` whose targets have ``test_sizes`` test images."""

    def __init__(self, records: Sequence[dict], variants: dict[str, Variant], settings: BenchmarkSettings,
                 iterations_of: Callable[[Variant], int], test_sizes: dict[str, int]) -> None:
        self.variants, self.settings, self.iterations_of = variants, settings, iterations_of
        self.test_sizes = test_sizes
        by_kind: dict[str, list[dict]] = defaultdict(list)
        for record in records:
            if "cpu_seconds" in record:
                by_kind[record["cell"]["kind"]].append(record)
        self.per_image = _per_image(by_kind["merge"])
        self.per_barrier_image = _per_image(by_kind["barrier"]) or self.per_image
        quantize = by_kind["quantize"]
        self.overhead = _fmean([r["cpu_seconds"] for r in quantize if r["cell"]["variant"] == "rtn"]) or 0.0
        rates: dict[str, list[float]] = defaultdict(list)
        constant: dict[str, list[float]] = defaultdict(list)
        for record in quantize:
            variant = variants.get(record["cell"]["variant"])
            if variant is None:
                continue
            iterations = record.get("iterations", iterations_of(variant))  # as measured, not as planned
            if variant.method in ("rtn", "gptq") or iterations == 0:
                constant[variant.method].append(record["cpu_seconds"])
            else:
                rates[variant.method].append(max(record["cpu_seconds"] - self.overhead, 0.0) / iterations)
        self.per_iteration = {m: statistics.fmean(v) for m, v in rates.items()}
        self.constant = {m: statistics.fmean(v) for m, v in constant.items()}
        self.merge_then_quantize: dict[str, list[float]] = defaultdict(list)
        for record in by_kind["merge-then-quantize"]:
            self.merge_then_quantize[record["cell"]["variant"]].append(record["cpu_seconds"])
        self.ort_cell = _fmean([r["cpu_seconds"] for r in by_kind["ort"]])

    def calibration_cost(self, variant: Variant) -> float | None:
        """CPU seconds to calibrate one model with ``variant`` (None: no comparable measurement)."""
        if variant.method in ("rtn", "gptq") or self.iterations_of(variant) == 0:
            return self.constant.get(variant.method)
        rate = self.per_iteration.get(variant.method)
        return None if rate is None else self.overhead + rate * self.iterations_of(variant)

    def _evaluation(self, targets: Sequence[str], times: int = 1) -> float | None:
        if self.per_image is None:
            return None
        return self.per_image * times * sum(self.test_sizes[t] for t in targets)

    def cost(self, cell: Cell) -> float | None:
        """Estimated CPU seconds of ``cell`` (None when nothing comparable was measured)."""
        parts: list[float | None]
        if cell.kind == "quantize":
            parts = [self.calibration_cost(self.variants[cell.variant]), self._evaluation(cell.targets)]
        elif cell.kind == "merge-then-quantize":
            measured = self.merge_then_quantize.get(cell.variant)
            calibration = statistics.fmean(measured) if measured else self.calibration_cost(self.variants[cell.variant])
            parts = [calibration, self._evaluation(cell.targets)]
        elif cell.kind == "merge":
            even = len(cell.targets) % 2 == 0
            draws = self.settings.noise_seeds if cell.rule in STOCHASTIC_RULES and even else 1
            parts = [self._evaluation(cell.targets, draws)]
        elif cell.kind == "barrier":
            images = sum(self.test_sizes[t] for t in cell.targets)
            parts = [None if self.per_barrier_image is None
                     else self.per_barrier_image * self.settings.barrier_steps * images]
        elif cell.kind == "float":
            parts = [self._evaluation(cell.targets, 2)]
            for subset in merge_subsets(cell.targets, self.settings.merge_subsets):
                parts.append(self._evaluation(subset))
        else:
            parts = [self.ort_cell]
        return None if any(p is None for p in parts) else sum(parts)


def estimate_plan(cells: Sequence[Cell], model: CostModel) -> dict:
    """Total and per-kind estimated CPU seconds of ``cells``, and the cells nothing measured covers."""
    per_kind: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    unknown: dict[str, int] = defaultdict(int)
    for cell in cells:
        counts[cell.kind] += 1
        cost = model.cost(cell)
        if cost is None:
            unknown[cell.kind] += 1
        else:
            per_kind[cell.kind] += cost
    return {"total_cpu_seconds": sum(per_kind.values()), "per_kind_cpu_seconds": dict(per_kind),
            "cells": dict(counts), "cells_without_estimate": dict(unknown)}
