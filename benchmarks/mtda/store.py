"""The benchmark's resumable cache: one JSON file per finished cell, written atomically.

``OUT/cells/<kind>-<key>.json`` holds a finished cell's record (its rows, its timing, anything
else it measured); ``OUT/models/<key>.pt`` the quantized model a ``quantize`` cell produced, for
the merges that need it. A killed run loses at most the cells in flight: every file appears
complete or not at all (hdrq_plugin._io.atomic_write_path), and a rerun skips every cell whose
key (mtda.plan.cell_key: recipe, config and settings) already has a record. A record that cannot
be read is reported and recomputed, never trusted.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from hdrq_plugin._io import ensure_writable_dir, write_text_atomic

from .plan import Cell

RECORD_FORMAT = "hdrq-plugin/mtda-cell/v1"


class CellStore:
    """Records of finished cells under ``folder``, looked up by cache key."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = ensure_writable_dir(folder)
        self.cells_dir = ensure_writable_dir(self.folder / "cells")
        self.models_dir = ensure_writable_dir(self.folder / "models")
        self._records: dict[str, dict] = {}
        for path in sorted(self.cells_dir.glob("*.json")):
            record = _read_record(path)
            if record is not None:
                self._records[record["key"]] = record

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: str) -> dict | None:
        return self._records.get(key)

    def put(self, cell: Cell, key: str, result: dict) -> dict:
        """Store ``result`` (JSON-serialisable) as the record of ``cell`` under ``key``, atomically."""
        record = {"format": RECORD_FORMAT, "key": key, "cell": _cell_dict(cell), **result}
        text = json.dumps(record, indent=1, sort_keys=True, allow_nan=False)
        write_text_atomic(self.record_path(cell, key), text)
        self._records[key] = json.loads(text)
        return self._records[key]

    def forget(self, cell: Cell, key: str) -> None:
        """Drop a record (e.g. its model checkpoint turned out unreadable) so it is recomputed."""
        self._records.pop(key, None)
        self.record_path(cell, key).unlink(missing_ok=True)

    def record_path(self, cell: Cell, key: str) -> Path:
        return self.cells_dir / f"{cell.kind}-{key[:24]}.json"

    def model_path(self, key: str) -> Path:
        return self.models_dir / f"{key[:24]}.pt"

    def records(self, keys: list[str] | None = None) -> list[dict]:
        """Records of ``keys`` (those finished, in that order), or every record."""
        if keys is None:
            return list(self._records.values())
        return [self._records[k] for k in keys if k in self._records]


def _cell_dict(cell: Cell) -> dict:
    return {"kind": cell.kind, "seed": cell.seed, "bits": cell.bits, "variant": cell.variant,
            "targets": list(cell.targets), "rule": cell.rule}


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("format") != RECORD_FORMAT or not isinstance(record.get("key"), str):
            raise ValueError("not a benchmark cell record")
        if not path.name.endswith(f"{record['key'][:24]}.json"):
            raise ValueError("file name does not match its key")
        return record
    except (OSError, ValueError) as err:
        warnings.warn(f"ignoring unreadable benchmark record {path} ({err}); the cell will be recomputed",
                      stacklevel=3)
        return None
