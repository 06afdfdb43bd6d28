"""PNG plots of the benchmark: merged harmonic mean against bits, barrier curves, iterations.

Matplotlib's object API with the Agg canvas (no pyplot global state), written atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hdrq_plugin._io import atomic_write_path
from hdrq_plugin.merge.barrier import BarrierResult, plot_barrier

from .tables import mean_std, merged_by_seed


def _figure(size=(6.4, 4.0)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, constrained_layout=True)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> Path:
    with atomic_write_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    return path


def _mean_and_error(values) -> tuple[float, float]:
    mean, std = mean_std(values)
    return 100 * mean, 100 * (std or 0.0)


def plot_merged_vs_bits(rows, quantizers: Sequence[str], bits_list: Sequence[str], path: Path, *, rule: str,
                        scope: str, all_targets: str) -> Path:
    """Merged harmonic mean (mean ± std over seeds) against bit-width, one line per quantizer."""
    figure = _figure()
    axes = figure.subplots()
    positions = range(len(bits_list))
    for index, quantizer in enumerate(quantizers):
        points = [(x, merged_by_seed(rows, bits=b, scope=scope, all_targets=all_targets, quantizer=quantizer,
                                     rounding=rule)) for x, b in enumerate(bits_list)]
        points = [(x, _mean_and_error(v.values())) for x, v in points if v]
        if points:
            axes.errorbar([x for x, _ in points], [m for _, (m, _) in points], yerr=[e for _, (_, e) in points],
                          marker="o", capsize=3, label=quantizer, color=f"C{index}")
    float_merge = merged_by_seed(rows, bits="fp32", scope=scope, all_targets=all_targets, stage="float_merged",
                                 method="float-merge")
    if float_merge:
        axes.axhline(_mean_and_error(float_merge.values())[0], color="grey", linestyle="--", label="float merge")
    axes.set_xticks(list(positions), list(bits_list))
    axes.set(xlabel="bits", ylabel="merged harmonic mean (%)",
             title=f"merged models ({'all targets' if scope == 'all' else 'mean over pairs'}, {rule})")
    axes.legend(fontsize="small")
    return _save(figure, path)


def plot_barrier_curves(barriers: Sequence[dict], path: Path) -> Path:
    """The barrier curves given (dicts from mtda.cells.barrier_dict) with hdrq_plugin's own plot."""
    results = [BarrierResult(tuple(b["lambdas"]), tuple(b["losses"]), tuple(b["accuracies"]), b["quantized"],
                             b["label"] or b["method"]) for b in barriers]
    return plot_barrier(results, path)


def plot_iterations(series_by_method: dict[str, list], path: Path, *, bits: str) -> Path:
    """Single accuracy and merged harmonic mean (pairs) against iterations per unit."""
    figure = _figure((9.0, 3.6))
    single_axes, merged_axes = figure.subplots(1, 2)
    for index, (method, series) in enumerate(series_by_method.items()):
        for axes, column in ((single_axes, 1), (merged_axes, 2)):
            points = [(entry[0], _mean_and_error(entry[column])) for entry in series if entry[column]]
            if points:
                axes.errorbar([c for c, _ in points], [m for _, (m, _) in points], yerr=[e for _, (_, e) in points],
                              marker="o", capsize=3, label=method, color=f"C{index}")
    for axes, title in ((single_axes, "single model, own target"), (merged_axes, "merged HM, mean over pairs")):
        axes.set_xscale("log")
        axes.set(xlabel="iterations per unit", ylabel="accuracy (%)", title=f"{title} ({bits})")
        axes.legend(fontsize="small")
    return _save(figure, path)
