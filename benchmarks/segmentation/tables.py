"""The segmentation study's markdown tables, from one or more ``results.json`` of
``python -m benchmarks.segmentation`` (e.g. one run per seed on each core):

    .venv/bin/python -m benchmarks.segmentation.tables runs/seg-s0/results.json runs/seg-s1/results.json \
        --out benchmarks/results/segmentation_study.json

The runs' cells are united (a cell found in two files must be the same cell, and every file must
share the study's settings except the zoo timings), the paired tables recomputed and written to
``--out`` (atomically; never one of the inputs), and the tables printed: all-target merges per
seed, paired differences under each merge rule, pair merges, single models, error barriers, and
the merge diagnosis (each rule's all-target mIoU and how far apart the merged models' codes are).
Only numbers are read from the files.
"""

from __future__ import annotations

import argparse
import json
import statistics

from benchmarks.mtda.tables import markdown_table, mean_std, read_result_payloads
from hdrq_plugin._io import write_text_atomic
from hdrq_plugin.bitspec import BitSpec
from hdrq_plugin.errors import InputError

from .study import ALL, MERGE_RULES, METHODS, merged_all, paired_tables

NAMES = {"rtn": "RTN", "adaround": "AdaRound", "brecq": "BRECQ", "qdrop": "QDrop", "hdrq": "HDRQ"}
GRID_STATISTICS = ("tie_fraction", "disagreement", "code_gap", "rounding_error")


def unite(payloads: list[dict]) -> dict:
    """One study from several runs' payloads; refuses runs of different settings or cells that differ."""
    if not payloads:
        raise InputError("no results to unite")

    def comparable(settings: dict) -> dict:
        return {k: v for k, v in settings.items() if not k.startswith("zoo_timings")}

    settings, cells = dict(payloads[0]["settings"]), {}
    for payload in payloads:
        if comparable(payload["settings"]) != comparable(settings):
            raise InputError(f"the runs differ in their settings: {comparable(payload['settings'])} "
                             f"vs {comparable(settings)}")
        settings.update(payload["settings"])
        for key, cell in payload["cells"].items():
            if key in cells and cells[key]["rows"] != cell["rows"]:
                raise InputError(f"cell {key} differs between the runs")
            cells[key] = cell
    return {"settings": settings, "cells": cells, "paired": paired_tables(cells)}


def _points(value: float) -> str:
    return f"{100 * value:.2f}"


def _mean_std_points(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{100 * mean:+.2f}" + ("" if std is None else f" ± {100 * std:.2f}")


def _widest_first(bits: str) -> tuple[int, int]:
    spec = BitSpec.parse(bits)
    return -spec.weight_bits, -spec.act_bits


def _keys(cells: dict) -> tuple[list[str], list[int], list[str]]:
    bits = sorted({k.split("/")[1] for k in cells}, key=_widest_first)
    seeds = sorted({int(k.split("/")[0]) for k in cells})
    methods = [m for m in METHODS if any(k.endswith(f"/{m}") for k in cells)]
    return bits, seeds, methods


def _rows(cell: dict, **where) -> list[dict]:
    return [r for r in cell["rows"] if all(r.get(k) == v for k, v in where.items())]


def all_target_table(cells: dict) -> str:
    bits_list, seeds, methods = _keys(cells)
    body = []
    for bits in bits_list:
        for seed in seeds:
            ref = cells.get(f"{seed}/{bits}/references")
            refs = ["—", "—"] if ref is None else [
                _points(_rows(ref, stage=stage, merge=ALL)[0]["harmonic_mean"])
                for stage in ("float-merge", "merge-then-quantize")]
            body.append([bits.upper(), seed, *refs] + [
                _points(merged_all(cells[f"{seed}/{bits}/{m}"], "own")) if f"{seed}/{bits}/{m}" in cells else "—"
                for m in methods])
    return markdown_table(["bits", "seed", "float merge", "merge-then-quantize (HDRQ)",
                           *(NAMES[m] for m in methods)], body)


def paired_t(differences: list[float]) -> str:
    """Student's paired t = mean / (std / √n) of per-seed differences (compare with t(n−1, 0.975):
    2.776 for 5 seeds, 4.303 for 3); "—" for one seed or no spread."""
    mean, std = mean_std(differences)
    return "—" if not std else f"{mean / (std / len(differences) ** 0.5):+.2f}"


def paired_markdown(paired: list[dict]) -> str:
    paired = sorted(paired, key=lambda row: _widest_first(row["bits"]))  # stable: baselines keep their order
    body = []
    for row in paired:
        differences = [h - b for h, b in zip(row["hdrq"], row["baseline_miou"], strict=True)]
        body.append([row["bits"].upper(), NAMES[row["baseline"]], ", ".join(f"{100 * d:+.2f}" for d in differences),
                     _mean_std_points(differences), paired_t(differences),
                     f"{row['seeds_won']} of {len(row['seeds'])}"])
    return markdown_table(["bits", "baseline", "per seed", "mean ± std", "paired t", "seeds HDRQ won"], body)


def _mean_over_seeds(cells: dict, seeds: list[int], bits: str, method: str, key: str, **where) -> str:
    values = [r[key] for s in seeds if f"{s}/{bits}/{method}" in cells
              for r in _rows(cells[f"{s}/{bits}/{method}"], **where)]
    return _points(statistics.fmean(values)) if values else "—"


def pair_table(cells: dict) -> str:
    """Two-target merges by each method's own rule, harmonic mIoU, mean over seeds."""
    bits_list, seeds, methods = _keys(cells)
    labels = sorted({r["merge"] for c in cells.values() for r in c["rows"]
                     if r.get("stage") == "merged" and r["merge"] != ALL})
    body = [[bits.upper(), label,
             _mean_over_seeds(cells, seeds, bits, "references", "harmonic_mean", stage="float-merge", merge=label)]
            + [_mean_over_seeds(cells, seeds, bits, m, "harmonic_mean", stage="merged", merge=label, own_rule=True)
               for m in methods]
            for bits in bits_list for label in labels]
    return markdown_table(["bits", "pair", "float merge", *(NAMES[m] for m in methods)], body)


def single_table(cells: dict) -> str:
    bits_list, seeds, methods = _keys(cells)
    targets = list(dict.fromkeys(r["target"] for c in cells.values() for r in c["rows"] if r.get("stage") == "single"))
    body = [[bits.upper(), NAMES[m]] + [_mean_over_seeds(cells, seeds, bits, m, "miou", stage="single", target=t)
                                        for t in targets]
            for bits in bits_list for m in methods]
    return markdown_table(["bits", "method", *targets], body)


def barrier_markdown(cells: dict) -> str:
    """Midpoint barrier (per-pixel cross-entropy) / pixel accuracy at λ = ½, mean over seeds."""
    bits_list, seeds, methods = _keys(cells)
    body = []
    for bits in bits_list:
        row = [bits.upper()]
        for m in ("references", *methods):
            barriers = [cells[f"{s}/{bits}/{m}"]["barrier"] for s in seeds if f"{s}/{bits}/{m}" in cells]
            if not barriers:
                row.append("—")
                continue
            middle = [b["accuracies"][len(b["accuracies"]) // 2] for b in barriers]
            row.append(f"{statistics.fmean(b['midpoint_barrier'] for b in barriers):.3f} / "
                       f"{100 * statistics.fmean(middle):.1f} %")
        body.append(row)
    return markdown_table(["bits", "float path", *(NAMES[m] for m in methods)], body)


def diagnosis_table(cells: dict, scope: str = ALL) -> str:
    """Per method, mean over seeds (and over the pairs when ``scope`` is ``"pairs"``): the merges'
    harmonic mIoU by every rule (the dequantized average is on no grid: the ceiling of any integer
    merge), then the grid statistics of the models merged (benchmarks.mtda.cells.grid_statistics)."""
    bits_list, seeds, methods = _keys(cells)

    def merged(cell, rule):
        return [r for r in _rows(cell, stage="merged", rounding=rule) if (r["merge"] == ALL) == (scope == ALL)]

    body = []
    for bits in bits_list:
        for m in methods:
            chosen = [cells[f"{s}/{bits}/{m}"] for s in seeds if f"{s}/{bits}/{m}" in cells]
            by_rule = [[r["harmonic_mean"] for c in chosen for r in merged(c, rule)] for rule in MERGE_RULES]
            grids = [r["grid"] for c in chosen for r in merged(c, MERGE_RULES[0]) if "grid" in r]
            stats = [statistics.fmean(g[k] for g in grids) if grids else None for k in GRID_STATISTICS]
            body.append([bits.upper(), NAMES[m]] + [_points(statistics.fmean(v)) if v else "—" for v in by_rule]
                        + ["—" if v is None else (f"{100 * v:.2f} %" if k in ("tie_fraction", "disagreement")
                                                  else f"{v:.3f}") for k, v in zip(GRID_STATISTICS, stats, strict=True)])
    return markdown_table(["bits", "method", *MERGE_RULES, "ties", "codes not all equal", "code gap (steps)",
                           "rounding error (RMS steps)"], body)


def markdown_report(study: dict) -> str:
    cells = study["cells"]
    sections = [("All-target merge (every method by its own rule), harmonic mIoU %", all_target_table(cells))]
    for rounding, paired in study["paired"].items():
        if paired:
            title = "each method's own rule" if rounding == "own" else f"every method merged by {rounding}"
            sections.append((f"HDRQ - each baseline, all-target harmonic mIoU points ({title})", paired_markdown(paired)))
    sections += [("Pair merges (own rule), harmonic mIoU %, mean over seeds", pair_table(cells)),
                 ("Single quantized models on their own target, mIoU %, mean over seeds", single_table(cells)),
                 ("Error barrier of the first pair's merged path: midpoint barrier / pixel accuracy at ½",
                  barrier_markdown(cells)),
                 ("Merge diagnosis, all-target merge (mIoU % by rule; grid statistics of the merged models)",
                  diagnosis_table(cells)),
                 ("Merge diagnosis, pair merges (means over the pairs)", diagnosis_table(cells, "pairs"))]
    return "\n\n".join(f"{title}:\n\n{table}" for title, table in sections)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.segmentation.tables",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="results.json files of benchmarks.segmentation runs")
    parser.add_argument("--out", default=None, help="write the united study here (JSON)")
    args = parser.parse_args(argv)
    try:
        payloads = read_result_payloads(args.results, args.out)
        study = unite(payloads)
        print(markdown_report(study))
        if args.out:
            write_text_atomic(args.out, json.dumps(study, indent=2))
    except OSError as err:  # an unwritable --out
        parser.exit(2, f"{parser.prog}: error: cannot write {args.out}: {err}\n")
    except (InputError, KeyError, TypeError, AttributeError, ValueError, IndexError) as err:  # a malformed file
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
