"""HDRQ against each baseline, paired by seed, from a benchmark run's ``results.json`` (issue 13).

    python -m benchmarks.mtda.paired runs/mtda-paired2000/results.json [--baseline benchmarks/results/mtda.json]
        [--bits w4a4] [--output benchmarks/results/mtda_paired2000.json]

For every tie rule and scope (the all-targets merge, the mean over pairs, and each pair), the
merged harmonic mean of HDRQ and of QDrop / BRECQ / AdaRound (mean ± sample std over seeds) and
HDRQ − baseline per seed (same zoo, same calibration data, same merge noise seeds), with the seeds
HDRQ wins. ``--baseline``: the same numbers from another run (e.g. the 300-iteration grid) beside.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hdrq_plugin._io import write_text_atomic

from .tables import format_mean_std, markdown_table, merged_by_seed, paired_difference, wins

BASELINES = ("qdrop", "brecq", "adaround")
RULES = ("noise-sampling", "half-to-even")


def scopes(rows: list[dict], bits: str) -> tuple[str, list[str]]:
    merges = sorted({r["merge"] for r in rows if r.get("stage") == "merged" and r.get("bits") == bits})
    all_targets = max(merges, key=lambda m: len(m.split("+")))
    return all_targets, ["all", "pairs"] + [m for m in merges if len(m.split("+")) == 2]


def by_seed(rows: list[dict], bits: str, scope: str, all_targets: str, quantizer: str, rule: str) -> dict:
    if scope in ("all", "pairs"):
        return merged_by_seed(rows, bits=bits, scope=scope, all_targets=all_targets, quantizer=quantizer,
                              rounding=rule)
    return merged_by_seed(rows, bits=bits, scope="all", all_targets=scope, quantizer=quantizer, rounding=rule)


def paired(rows: list[dict], bits: str) -> list[dict]:
    all_targets, names = scopes(rows, bits)
    out = []
    for rule in RULES:
        for scope in names:
            hdrq = by_seed(rows, bits, scope, all_targets, "hdrq", rule)
            for baseline in BASELINES:
                other = by_seed(rows, bits, scope, all_targets, baseline, rule)
                out.append({"rule": rule, "scope": scope, "baseline": baseline, "hdrq": hdrq, "other": other,
                            "difference": paired_difference(hdrq, other), "wins": wins(hdrq, other)})
    return out


def table(results: list[dict], reference: list[dict] | None) -> str:
    ref = {(r["rule"], r["scope"], r["baseline"]): r for r in reference or []}
    body = []
    for r in results:
        row = [r["rule"], r["scope"], r["baseline"], format_mean_std(r["hdrq"].values()),
               format_mean_std(r["other"].values()), format_mean_std(r["difference"]), r["wins"]]
        if reference is not None:
            old = ref.get((r["rule"], r["scope"], r["baseline"]))
            row.append(f"{format_mean_std(old['difference'])} ({old['wins']})" if old else "—")
        body.append(row)
    header = ["tie rule", "merge", "baseline", "HDRQ", "baseline acc.", "HDRQ − baseline", "seeds won"]
    return markdown_table(header + (["same, other run"] if reference is not None else []), body)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="results.json of a python -m benchmarks.mtda run")
    parser.add_argument("--baseline", help="another run's results.json to set beside it")
    parser.add_argument("--bits", default="w4a4")
    parser.add_argument("--output", default="benchmarks/results/mtda_paired2000.json")
    args = parser.parse_args(argv)
    rows = json.loads(Path(args.results).read_text())["rows"]
    results = paired(rows, args.bits)
    reference = paired(json.loads(Path(args.baseline).read_text())["rows"], args.bits) if args.baseline else None
    print(table(results, reference))
    seeds = sorted({s for r in results for s in r["hdrq"]})
    write_text_atomic(args.output, json.dumps({"results": args.results, "bits": args.bits, "seeds": seeds,
                                               "paired": results, "baseline_run": args.baseline,
                                               "baseline_paired": reference}, indent=1, default=str))
    print(f"seeds: {seeds}; wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
