"""The equal-budget tables of issue 21, from one or more JSON files of ``benchmarks.nipq.equal_budget``
(e.g. one run per family and budget on each core):

    .venv/bin/python -m benchmarks.nipq.tables benchmarks/results/nipq_budget5_*.json \\
        --out benchmarks/results/nipq_budget5.json

Per family and budget: single models per target and averaged over targets (mean ± std over seeds,
with each method's deployed average bits), the merged model per target, paired differences with
the seeds won (single and merged), and per NIPQ run the accuracy just before and after the widths
froze. The runs must share their training settings (steps, noise, rates, cost weight, landing);
a (family, budget, method, target, seed, stage) found twice must carry the same result. Only numbers
are read from the files; ``--out`` (atomic, never an input) gets the united rows.
"""

from __future__ import annotations

import argparse
import json

from benchmarks.mtda.tables import markdown_table, mean_std, read_result_payloads
from hdrq_plugin._io import write_text_atomic
from hdrq_plugin.errors import InputError

from .equal_budget import METHODS

#: (a, b): the paired differences a − b the tables give (issue 21's ablation)
PAIRS = (("nipq", "lsq"), ("nipq", "nipq-pinned"), ("nipq-pinned", "lsq"), ("nipq-bops", "lsq"),
         ("nipq", "hdrq"), ("lsq", "hdrq"))

#: settings that make runs comparable (the rest — seeds, methods, targets, output — may differ)
SHARED_SETTINGS = ("epochs", "hard_epochs", "noise", "bits_lr", "quant_lr", "cost_weight", "hdrq_iterations", "land_start",
                   "freeze_fraction", "no_landing", "no_fit_truncations")
KEY = ("family", "bits", "method", "target", "seed", "stage")


def unite(payloads: list[dict]) -> dict:
    """All runs' rows in one list; refuses runs of other settings and a row that two runs disagree on."""
    if not payloads:
        raise InputError("no results to unite")
    shared = {k: payloads[0]["settings"].get(k) for k in SHARED_SETTINGS}
    rows: dict[tuple, dict] = {}
    for payload in payloads:
        theirs = {k: payload["settings"].get(k) for k in SHARED_SETTINGS}
        if theirs != shared:
            raise InputError(f"the runs differ in their settings: {theirs} vs {shared}")
        for row in payload["rows"]:
            row = {"family": payload["settings"].get("family", "resnet"), "bits": payload["settings"]["bits"],
                   "stage": "single", **row}
            key = tuple(row[k] for k in KEY)
            if key in rows and rows[key]["accuracy"] != row["accuracy"]:
                raise InputError(f"{dict(zip(KEY, key, strict=True))} differs between the runs")
            rows[key] = row
    return {"settings": shared, "rows": list(rows.values())}


def _cell(values: list[float], digits: int = 2) -> str:
    if not values:
        return "—"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def _bits(rows: list[dict]) -> str:
    w = [r["learned_weight_bits"] for r in rows if r.get("learned_weight_bits") is not None]
    a = [r["learned_act_bits"] for r in rows if r.get("learned_act_bits") is not None]
    return f"{mean_std(w)[0]:.3f} / {mean_std(a)[0]:.3f}" if w and a else "uniform (spec)"


def _gbops(rows: list[dict]) -> str:
    values = [r["gbops"] for r in rows if r.get("gbops") is not None]
    return f"{mean_std(values)[0]:.4f}" if values else "—"


def _accuracy(rows: list[dict], method: str, target: str | None, seed: int) -> float | None:
    """Points; ``target`` None: the mean over every target of that seed (None if one is missing)."""
    mine = {r["target"]: 100 * r["accuracy"] for r in rows if r["method"] == method and r["seed"] == seed}
    if target is not None:
        return mine.get(target)
    targets = {r["target"] for r in rows}
    return sum(mine.values()) / len(mine) if mine and set(mine) == targets else None


def group_tables(rows: list[dict], family: str, bits: int) -> str:
    """The tables of one family and budget."""
    mine = [r for r in rows if r["family"] == family and r["bits"] == bits]
    targets = sorted({r["target"] for r in mine})
    seeds = sorted({r["seed"] for r in mine})
    columns = [*targets, "mean over targets"]
    out = []
    landed = [r for r in mine if r["stage"] == "merged-landed"]
    stages = {"single": [r for r in mine if r["stage"] == "single"],
              "merged": [r for r in mine if r["stage"] == "merged"]}
    if landed:  # learned-width merges landed on the budget beside the uniform methods' merges (already on it)
        methods = {r["method"] for r in landed}
        stages["merged, on the budget"] = landed + [r for r in stages["merged"] if r["method"] not in methods]
    for stage, staged in stages.items():
        body = []
        for method in METHODS:
            of_method = [r for r in staged if r["method"] == method]
            if not of_method:
                continue
            cells = []
            for target in [*targets, None]:
                values = [_accuracy(staged, method, target, s) for s in seeds]
                cells.append(_cell([v for v in values if v is not None]))
            theirs = sorted({r["seed"] for r in of_method})
            body.append([method if theirs == seeds else f"{method} (seeds {', '.join(map(str, theirs))})",
                         _bits(of_method), _gbops(of_method), *cells])
        if body:
            title = {"single": "single models", "merged": "merged models (NIPQ: each tensor at its widest member width)",
                     }.get(stage, "merged models, on the budget (NIPQ merges landed back on it)")
            out += [f"**{title}** (accuracy %, mean ± std over seeds {seeds}; deployed average bits over "
                    "the learned tensors)", "",
                    markdown_table(["method", "deployed w / a bits", "GBOPs", *columns], body), ""]
        pairs = []
        for a, b in PAIRS:
            cells = []
            for target in [*targets, None]:
                diffs = [x - y for x, y in ((_accuracy(staged, a, target, s), _accuracy(staged, b, target, s))
                                            for s in seeds) if x is not None and y is not None]
                cells.append("—" if not diffs else f"{mean_std(diffs)[0]:+.2f}" + (
                    f" ± {mean_std(diffs)[1]:.2f}" if len(diffs) > 1 else "")
                    + f" ({sum(d > 0 for d in diffs)}/{len(diffs)})")
            if any(c != "—" for c in cells):
                pairs.append([f"{a} − {b}", *cells])
        if pairs:
            out += [f"**{stage}, paired differences** (points, mean ± std over seeds, seeds the first is ahead)", "",
                    markdown_table(["pair", *columns], pairs), ""]
    freeze = []
    for r in sorted(mine, key=lambda r: (r["method"], r["target"], r["seed"])):
        if r["stage"] != "single" or r.get("accuracy_before_freeze") is None or r["method"] == "lsq":
            continue
        moved = r.get("freeze_move") or {}
        freeze.append([r["method"], r["target"], r["seed"],
                       f"{100 * r['accuracy_before_freeze']:.2f} → {100 * r['accuracy_after_freeze']:.2f} "
                       f"({100 * (r['accuracy_after_freeze'] - r['accuracy_before_freeze']):+.2f})",
                       f"{moved.get('weights', 0.0):+.3f} / {moved.get('activations', 0.0):+.3f}",
                       f"{100 * r['accuracy']:.2f}"])
    if freeze:
        out += ["**freezing, per run** (accuracy on the test set just before → after the widths froze; the "
                "average bits the freeze moved, weights / activations)", "",
                markdown_table(["method", "target", "seed", "before → after (points)", "freeze moved", "final %"],
                               freeze), ""]
    return "\n".join(out)


def markdown_report(united: dict) -> str:
    rows = united["rows"]
    parts = []
    for family in sorted({r["family"] for r in rows}):
        for bits in sorted({r["bits"] for r in rows if r["family"] == family}, reverse=True):
            bops = any(r["method"] == "nipq-bops" and r["family"] == family and r["bits"] == bits for r in rows)
            parts += [f"### {family}, average {bits} bits"
                      + (f" (nipq-bops: a BOPs budget, the uniform W{bits}A{bits} model's)" if bops else ""), "",
                      group_tables(rows, family, bits)]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.nipq.tables", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="JSON files of benchmarks.nipq.equal_budget runs")
    parser.add_argument("--out", default=None, help="write the united rows here (JSON)")
    args = parser.parse_args(argv)
    try:
        payloads = read_result_payloads(args.results, args.out)
        united = unite(payloads)
        report = markdown_report(united)
        if args.out:
            try:
                write_text_atomic(args.out, json.dumps(united, indent=1))
            except OSError as err:
                raise InputError(f"cannot write {args.out}: {err}") from err
        print(report)
    except (InputError, KeyError, TypeError, AttributeError, ValueError, IndexError) as err:  # a malformed file
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
