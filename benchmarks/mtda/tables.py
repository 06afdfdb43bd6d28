"""Pure aggregation of benchmark rows into the numbers and markdown tables of BENCHMARKS.md.

Rows are ``report.json`` rows plus ``seed``, ``merge`` (``"a+b"``), ``quantizer`` and
``rounding``. Every reported number is a mean ± sample standard deviation over seeds of a
per-seed value; per-seed values are:

* single accuracy — the mean over targets of each quantized θt on its own target;
* merged harmonic mean, ``all`` — the harmonic mean over all targets of the all-targets merge;
* merged harmonic mean, ``pairs`` — the mean over every two-target merge of its harmonic mean.

Nothing here chooses anything: every table reports the test split, no setting is picked on it.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from hdrq_plugin.errors import InputError

HARMONIC_MEAN = "harmonic_mean"  # hdrq_plugin.run.report.HARMONIC_MEAN
SCOPES = ("all", "pairs")


def mean_std(values: Iterable[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean of no values is undefined")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def format_mean_std(values: Iterable[float] | None, scale: float = 100.0, digits: int = 1) -> str:
    """``"72.3 ± 1.2"`` (in percent by default), ``"72.3"`` for one value, ``"—"`` for none."""
    values = list(values or [])
    if not values:
        return "—"
    mean, std = mean_std(values)
    text = f"{scale * mean:.{digits}f}"
    return text if std is None else f"{text} ± {scale * std:.{digits}f}"


def read_result_payloads(results, out=None) -> list[dict]:
    """The JSON payloads of benchmark result files, as data only; InputError (one line) when a file
    cannot be read or parsed, or when ``out`` would overwrite one of them (outputs never overwrite
    an input). Shared by the tables commands that unite several runs."""
    inputs = [Path(p).resolve() for p in results]
    if out and Path(out).resolve() in inputs:
        raise InputError(f"--out {out} is one of the inputs; choose another path")
    payloads = []
    for path in inputs:
        try:
            payloads.append(json.loads(path.read_text()))
        except (OSError, ValueError) as err:
            raise InputError(f"cannot read {path}: {err}") from err
    return payloads


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def merge_size(label: str) -> int:
    return len(label.split("+")) if label else 0


def _select(rows: Iterable[dict], **where) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in where.items())]


def by_seed(rows: Iterable[dict]) -> dict[int, list[float]]:
    grouped: dict[int, list[float]] = defaultdict(list)
    for row in rows:
        grouped[row["seed"]].append(row["accuracy"])
    return dict(grouped)


def single_by_seed(rows: Sequence[dict], quantizer: str, bits: str, split: str = "test") -> dict[int, float]:
    """Per seed: mean over targets of ``quantizer``'s single-model accuracy on its own target."""
    selected = _select(rows, stage="single", method=quantizer, bits=bits, split=split)
    return {seed: statistics.fmean(v) for seed, v in by_seed(selected).items()}


def merged_by_seed(rows: Sequence[dict], *, bits: str, scope: str, all_targets: str, stage: str = "merged",
                   split: str = "test", **where) -> dict[int, float]:
    """Per seed: the merged harmonic mean (``scope`` all or pairs, module doc) of the rows matching
    ``where`` (e.g. ``quantizer="hdrq", rounding="noise-sampling"`` or ``method="float-merge"``)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    selected = [r for r in _select(rows, stage=stage, bits=bits, target=HARMONIC_MEAN, split=split, **where)
                if (r["merge"] == all_targets if scope == "all" else merge_size(r["merge"]) == 2)]
    return {seed: statistics.fmean(v) for seed, v in by_seed(selected).items()}


def paired_difference(a: dict[int, float], b: dict[int, float]) -> list[float]:
    """``a − b`` for every seed both have (a paired comparison: same zoo, same calibration data)."""
    return [a[s] - b[s] for s in sorted(a.keys() & b.keys())]


def wins(a: dict[int, float], b: dict[int, float]) -> str:
    differences = paired_difference(a, b)
    return f"{sum(d > 0 for d in differences)}/{len(differences)}" if differences else "—"


# --- tables --------------------------------------------------------------------------------------
def merged_table(rows, quantizers: Sequence[str], bits_list: Sequence[str], *, rule: str, scope: str,
                 all_targets: str) -> str:
    """Merged harmonic mean (%) per quantizer (rows) and bit-width (columns), one tie rule."""
    body = [[q] + [format_mean_std(merged_by_seed(rows, bits=b, scope=scope, all_targets=all_targets, quantizer=q,
                                                  rounding=rule).values()) for b in bits_list]
            for q in quantizers]
    return markdown_table(["quantizer"] + list(bits_list), body)


def single_table(rows, quantizers: Sequence[str], bits_list: Sequence[str]) -> str:
    body = [[q] + [format_mean_std(single_by_seed(rows, q, b).values()) for b in bits_list] for q in quantizers]
    return markdown_table(["quantizer"] + list(bits_list), body)


def single_per_target_table(rows, quantizers: Sequence[str], bits: str, targets: Sequence[str]) -> str:
    """Single-model accuracy (%) of each quantizer (rows) on each target (columns) at one bit-width."""
    body = [[q] + [format_mean_std(r["accuracy"] for r in _select(rows, stage="single", method=q, bits=bits,
                                                                   target=t, split="test")) for t in targets]
            for q in quantizers]
    return markdown_table(["quantizer"] + list(targets), body)


def rule_table(rows, quantizers: Sequence[str], rules: Sequence[str], *, bits: str, scope: str,
               all_targets: str) -> str:
    """Merged harmonic mean (%) per quantizer (rows) and tie rule (columns) at one bit-width."""
    body = [[q] + [format_mean_std(merged_by_seed(rows, bits=bits, scope=scope, all_targets=all_targets,
                                                  quantizer=q, rounding=r).values()) for r in rules]
            for q in quantizers]
    return markdown_table(["quantizer"] + list(rules), body)


def comparison_table(rows, pairs: Sequence[tuple[str, str]], bits_list: Sequence[str], *, rule: str, scope: str,
                     all_targets: str) -> str:
    """Paired per-seed differences of merged harmonic means (points), with seeds won."""
    body = []
    for a, b in pairs:
        for bits in bits_list:
            series = [merged_by_seed(rows, bits=bits, scope=scope, all_targets=all_targets, quantizer=q,
                                     rounding=rule) for q in (a, b)]
            differences = paired_difference(*series)
            body.append([f"{a} − {b}", bits, format_mean_std(differences), wins(*series)])
    return markdown_table(["comparison", "bits", "Δ merged HM (points)", "seeds won"], body)


def scopes_for(all_targets: str) -> tuple[str, ...]:
    """With two targets the all-targets merge is the one pair: report it once."""
    return ("pairs",) if merge_size(all_targets) == 2 else SCOPES


def ablation_table(rows, quantizers: Sequence[str], *, bits: str, rules: Sequence[str], all_targets: str,
                   split: str = "test") -> str:
    """Single accuracy and merged harmonic means of each variant at one bit-width, on ``split``."""
    scopes = scopes_for(all_targets)
    header = ["variant", "single"] + [f"{scope} · {rule}" for rule in rules for scope in scopes]
    body = []
    for q in quantizers:
        cells = [format_mean_std(single_by_seed(rows, q, bits, split).values())]
        cells += [format_mean_std(merged_by_seed(rows, bits=bits, scope=scope, all_targets=all_targets, quantizer=q,
                                                 rounding=rule, split=split).values())
                  for rule in rules for scope in scopes]
        body.append([q] + cells)
    return markdown_table(header, body)


def reference_table(rows, bits_list: Sequence[str], *, all_targets: str, methods: Sequence[str]) -> str:
    """Reference rows (float merge, merge-then-quantize, onnxruntime) per scope and bit-width; the
    columns are ``bits_list`` plus any other bit-width a reference row has (onnxruntime's)."""
    present = {r["bits"] for r in rows if r["method"] in methods and r["bits"] != "fp32"}
    bits_list = list(bits_list) + sorted(present - set(bits_list))
    body = []
    for method in methods:
        stage = "float_merged" if method == "float-merge" else ("merged_ort" if method.startswith("ort-")
                                                                  else "merged")
        for scope in scopes_for(all_targets):
            cells = []
            for bits in bits_list:
                b = "fp32" if method == "float-merge" else bits
                cells.append(format_mean_std(merged_by_seed(rows, bits=b, scope=scope, all_targets=all_targets,
                                                            stage=stage, method=method).values()))
            body.append([method, scope] + cells)
    return markdown_table(["reference", "merge"] + list(bits_list), body)


def float_table(rows, targets: Sequence[str]) -> str:
    """θ0 on each target, each θt on its own target (mean ± std over seeds, %)."""
    source = [format_mean_std([r["accuracy"] for r in _select(rows, stage="float_source", target=t)])
              for t in targets]
    adapted = [format_mean_std([r["accuracy"] for r in _select(rows, stage="float_adapted", target=t)])
               for t in targets]
    return markdown_table(["model"] + list(targets), [["θ0 (source)"] + source, ["θt (own target)"] + adapted])


def barrier_table(barriers: Sequence[dict], methods: Sequence[str], bits_list: Sequence[str]) -> str:
    """Error barriers, mean ± std over seeds and pairs: ``B(½) = L(θ½) − ½(L1 + L2)`` (signed; negative
    when the merge is better on the pair's data than its endpoints) and ``max_λ`` of the loss above the
    line between the endpoints (≥ 0: the endpoints are on the grid)."""
    body = []
    for method in methods:
        cells = []
        for bits in bits_list:
            chosen = [b for b in barriers if b["method"] == method and b["bits"] == bits]
            midpoint = [b["midpoint_barrier"] for b in chosen if b.get("midpoint_barrier") is not None]
            maximum = [b["max_barrier"] for b in chosen]
            cells.append("—" if not chosen else
                         f"{format_mean_std(midpoint, scale=1.0, digits=3)} / {format_mean_std(maximum, 1.0, 3)}")
        body.append([method] + cells)
    return markdown_table(["model (B(½) / max)"] + list(bits_list), body)


def timing_table(records: Sequence[dict], quantizers: Sequence[str], reference: str = "qdrop") -> str:
    """Wall and CPU seconds per quantized model, and the CPU-time ratio to ``reference``."""
    seconds: dict[str, list[float]] = defaultdict(list)
    cpu: dict[str, list[float]] = defaultdict(list)
    for record in records:
        cell = record["cell"]
        if cell["kind"] == "quantize":
            seconds[cell["variant"]].append(record["seconds"])
            cpu[cell["variant"]].append(record["cpu_seconds"])
    base = statistics.fmean(cpu[reference]) if cpu.get(reference) else math.nan
    body = []
    for q in quantizers:
        if not seconds.get(q):
            continue
        ratio = statistics.fmean(cpu[q]) / base if math.isfinite(base) else math.nan
        body.append([q, str(len(seconds[q])), format_mean_std(seconds[q], 1.0), format_mean_std(cpu[q], 1.0),
                     "—" if math.isnan(ratio) else f"{ratio:.2f}"])
    return markdown_table(["quantizer", "models", "wall s / model", "CPU s / model", f"CPU × {reference}"], body)


def iteration_series(rows, method: str, iteration_labels: dict[str, int], *, bits: str, rule: str,
                     all_targets: str, split: str = "test") -> list[tuple[int, list[float], list[float], list[float]]]:
    """(iterations, single, pairs HM, all HM) per-seed values of ``method`` at each iteration count."""
    series = []
    for label, count in sorted(iteration_labels.items(), key=lambda kv: kv[1]):
        merged = [list(merged_by_seed(rows, bits=bits, scope=scope, all_targets=all_targets, quantizer=label,
                                      rounding=rule, split=split).values()) for scope in ("pairs", "all")]
        series.append((count, list(single_by_seed(rows, label, bits, split).values()), *merged))
    return series


def iteration_table(series_by_method: dict[str, list], scopes: Sequence[str] = SCOPES) -> str:
    """Single accuracy and merged harmonic means (``scopes``) against iterations per unit."""
    columns = [index for index, scope in ((2, "pairs"), (3, "all")) if scope in scopes]
    body = [[method, str(entry[0]), format_mean_std(entry[1])] + [format_mean_std(entry[i]) for i in columns]
            for method, series in series_by_method.items() for entry in series]
    header = ["method", "iterations / unit", "single"] + [f"merged HM {('pairs', 'all')[i - 2]}" for i in columns]
    return markdown_table(header, body)
