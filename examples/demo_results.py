"""The demo's figures after quantization, cached by key: a rerun evaluates nothing twice.

Merging and evaluating the merged models, the error barrier, the float references and the
onnxruntime validations take most of a cached ``make demo`` (minutes on two cores). Each such
step's figures — report rows, the barrier curves, the validation report — are stored as JSON
under the SHA-256 of everything that produced them: the step's inputs (the quantized models'
task keys, the zoo's key, the exported file's bytes, the seed), the source code of
``hdrq_plugin`` and ``hdrq_examples``, the library versions and the torch thread count. A changed
input, library or line of code misses; a file that is unreadable, foreign or from another key
is recomputed and replaced atomically. Values are plain JSON: a file never chooses code to run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hdrq_plugin._io import atomic_write_path
from hdrq_plugin.run.report import Report

from .demo_tasks import source_digest
from .zoo import library_versions

#: Bump when a step computes differently in a way its key does not capture.
RESULTS_FORMAT = "hdrq-examples/demo-results/v1"
RESULTS_CACHE = "demo-results"


@dataclass(frozen=True)
class ResultCache:
    """JSON results of the demo's steps under ``folder``, keyed by their inputs."""

    folder: Path

    @classmethod
    def under(cls, cache_dir: str | Path) -> ResultCache:
        return cls(Path(cache_dir) / RESULTS_CACHE)

    @staticmethod
    def key(step: str, inputs: dict[str, Any]) -> str:
        """SHA-256 of the step, its inputs, the code and the versions that compute it."""
        versions = library_versions("brevitas", "onnxruntime", "hdrq-plugin")
        payload = {"step": step, "inputs": inputs, "code": source_digest(), "format": RESULTS_FORMAT,
                   "versions": versions, "torch_threads": torch.get_num_threads()}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def path(self, step: str, key: str) -> Path:
        return self.folder / f"{step}-{key[:24]}.json"

    def get_or_compute(self, step: str, inputs: dict[str, Any], compute: Callable[[], Any]) -> tuple[Any, bool]:
        """``(value, from_cache)``: the stored value of ``step`` for ``inputs``, else ``compute()``
        stored atomically."""
        key = self.key(step, inputs)
        path = self.path(step, key)
        try:
            content = json.loads(path.read_text())
            if isinstance(content, dict) and content.get("format") == RESULTS_FORMAT and content.get("key") == key \
                    and "value" in content:
                return content["value"], True
        except (OSError, ValueError):
            pass  # missing, unreadable or not JSON: computed again below
        # stored as report.json shows it (default=str); a miss returns exactly what a hit would
        value = json.loads(json.dumps(compute(), default=str))
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_write_path(path) as tmp:
            Path(tmp).write_text(json.dumps({"format": RESULTS_FORMAT, "key": key, "value": value}))
        return value, False


def cached_rows(report: Report, cache: ResultCache, step: str, inputs: dict[str, Any],
                add_rows: Callable[[Report], None]) -> bool:
    """Append the rows ``add_rows`` adds to a report, computed once per key; True if from the cache."""
    def compute() -> list[dict]:
        scratch = Report(timings=report.timings)  # the step's stage times still go to the report
        add_rows(scratch)
        return scratch.rows

    rows, hit = cache.get_or_compute(step, inputs, compute)
    report.rows.extend(rows)
    return hit


__all__ = ["ResultCache", "cached_rows", "RESULTS_CACHE", "RESULTS_FORMAT"]
