"""Accuracy reports as tidy rows: ``{"method", "bits", "stage", "target", "accuracy"}``.

One shape for the demo, the benchmark and later issues, so tables and plots are built from the
same rows. Stages: ``float_source``, ``float_adapted``, ``float_merged``, ``single``,
``merged``, ``merged_ort``.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from .._io import write_text_atomic
from ..evaluation import harmonic_mean

STAGES = ("float_source", "float_adapted", "float_merged", "single", "merged", "merged_ort")
HARMONIC_MEAN = "harmonic_mean"  # the pseudo-target that holds a row's harmonic mean over targets


def package_versions(names=("torch", "brevitas", "onnx", "onnxruntime", "numpy", "hdrq-plugin")) -> dict:
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@dataclass
class Report:
    """Rows of accuracies plus timings and the recipe that produced them."""

    recipe: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, method: str, bits: str, stage: str, target: str, accuracy: float, **more: Any) -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; one of {STAGES}")
        if not (isinstance(accuracy, float | int) and math.isfinite(accuracy)):
            raise ValueError(f"accuracy must be a finite number, got {accuracy!r}")
        self.rows.append({"method": method, "bits": bits, "stage": stage, "target": target,
                          "accuracy": float(accuracy), **more})

    def add_per_target(self, method: str, bits: str, stage: str, accuracies: dict[str, float],
                       **more: Any) -> None:
        """Add one row per target and, for several targets, their harmonic mean."""
        for target, acc in accuracies.items():
            self.add(method, bits, stage, target, acc, **more)
        if len(accuracies) > 1:
            self.add(method, bits, stage, HARMONIC_MEAN, harmonic_mean(list(accuracies.values())), **more)

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "versions": package_versions(), "rows": self.rows,
                "timings": self.timings, **self.extra}

    def write(self, folder: str | Path) -> tuple[Path, Path]:
        """Write ``report.json`` and ``report.md`` into ``folder`` (atomically)."""
        folder = Path(folder)
        json_path = write_text_atomic(folder / "report.json", json.dumps(self.to_dict(), indent=2, default=str))
        md_path = write_text_atomic(folder / "report.md", self.to_markdown())
        return json_path, md_path

    def to_markdown(self) -> str:
        """One table per (stage, bits): rows are methods, columns are targets."""
        lines = ["# hdrq-plugin report", ""]
        groups: dict[tuple[str, str], list[dict]] = {}
        for row in self.rows:
            groups.setdefault((row["stage"], row["bits"]), []).append(row)
        for (stage, bits), rows in sorted(groups.items(), key=lambda kv: (STAGES.index(kv[0][0]), kv[0][1])):
            targets = list(dict.fromkeys(r["target"] for r in rows))
            methods = list(dict.fromkeys(r["method"] for r in rows))
            lines += [f"## {stage} ({bits})", "", "| method | " + " | ".join(targets) + " |",
                      "|---" * (len(targets) + 1) + "|"]
            for method in methods:
                cells = {r["target"]: r["accuracy"] for r in rows if r["method"] == method}
                lines.append(f"| {method} | " + " | ".join(
                    f"{100 * cells[t]:.2f}" if t in cells else "" for t in targets) + " |")
            lines.append("")
        if self.timings:
            lines += ["## timings (s)", "", "| step | seconds |", "|---|---|"]
            lines += [f"| {k} | {v:.1f} |" for k, v in self.timings.items()]
            lines.append("")
        for key, value in self.extra.items():
            lines += [f"## {key}", "", "```", json.dumps(value, indent=2, default=str), "```", ""]
        return "\n".join(lines)
