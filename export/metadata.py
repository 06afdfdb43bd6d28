"""The ``hdrq.*`` metadata_props every exported file carries: what it holds and where it came from.

ONNX metadata values are strings; lists and dicts are stored as JSON.
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Mapping

import onnx

from .errors import NotAnHdrqExportError
from .model_facts import QuantizationSummary

PREFIX = "hdrq."
FORMAT_KEY = PREFIX + "format"
QDQ_FORMAT = "hdrq-plugin-qdq/1"
FLOAT_FORMAT = "hdrq-plugin-float/1"
# Keys the exporter derives from the model; a caller may not override them.
DERIVED_KEYS = ("format", "weights", "bits", "granularity", "weight_bits", "act_bits",
                "per_channel", "integer_bias", "source_model_sha256", "tool_versions", "saturation_safe")
DEFAULT_USER_METADATA = {"method": "unspecified", "merged_targets": []}
_TOOLS = ("hdrq-plugin", "torch", "brevitas", "onnx", "onnxruntime")


def tool_versions() -> dict[str, str]:
    versions = {}
    for tool in _TOOLS:
        try:
            versions[tool] = importlib.metadata.version(tool)
        except importlib.metadata.PackageNotFoundError:
            versions[tool] = "not installed"  # e.g. hdrq-plugin run from a source checkout
    return versions


def _as_text(key: str, value: object) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, sort_keys=True)
    except TypeError as err:
        raise TypeError(f"metadata[{key!r}] is not JSON-serializable: {err}") from err


def user_metadata_props(metadata: Mapping[str, object] | None) -> dict[str, str]:
    """Caller-supplied entries (``method``, ``merged_targets``, anything else) as ``hdrq.*``."""
    metadata = dict(metadata or {})
    for key in metadata:
        if not isinstance(key, str) or not key or key.startswith(PREFIX):
            raise ValueError(f"metadata keys are plain non-empty strings without {PREFIX!r}, got {key!r}")
        if key in DERIVED_KEYS:
            raise ValueError(f"metadata[{key!r}] is derived from the model and cannot be set")
    merged = {**DEFAULT_USER_METADATA, **metadata}
    return {PREFIX + key: _as_text(key, value) for key, value in merged.items()}


def quantized_metadata_props(summary: QuantizationSummary, weights: str,
                             source_sha256: str) -> dict[str, str]:
    return {
        FORMAT_KEY: QDQ_FORMAT,
        PREFIX + "weights": weights,
        PREFIX + "bits": summary.bits,
        PREFIX + "granularity": summary.granularity,
        PREFIX + "weight_bits": json.dumps(summary.weight_bits),
        PREFIX + "act_bits": json.dumps(summary.act_bits),
        PREFIX + "integer_bias": json.dumps(summary.integer_bias),
        PREFIX + "source_model_sha256": source_sha256,
        PREFIX + "tool_versions": json.dumps(tool_versions(), sort_keys=True),
    }


def float_metadata_props(source_sha256: str) -> dict[str, str]:
    return {
        FORMAT_KEY: FLOAT_FORMAT,
        PREFIX + "source_model_sha256": source_sha256,
        PREFIX + "tool_versions": json.dumps(tool_versions(), sort_keys=True),
    }


def set_metadata(model: onnx.ModelProto, props: Mapping[str, str]) -> None:
    """Add ``props`` to the file's metadata_props, replacing entries of the same key."""
    existing = {entry.key: entry.value for entry in model.metadata_props}
    onnx.helper.set_model_props(model, {**existing, **props})


def read_metadata(model: onnx.ModelProto, source: str = "the ONNX model") -> dict[str, str]:
    """The ``hdrq.*`` entries without their prefix; raise if the file is not one of ours."""
    props = {entry.key[len(PREFIX):]: entry.value for entry in model.metadata_props
             if entry.key.startswith(PREFIX)}
    if "format" not in props:
        raise NotAnHdrqExportError(
            f"{source} was not written by hdrq_plugin.export (no {FORMAT_KEY!r} metadata); "
            "export the model with hdrq_plugin.export.export_qdq")
    return props
