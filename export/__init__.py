"""ONNX export of Brevitas models (QDQ, true INT4, ORT format) and their onnxruntime validation.

    from hdrq_plugin.export import export_qdq, validate
    export_qdq(model, "model.onnx", example_input=x, weights="int8")
    report = validate("model.onnx", model, {"mnist": test_loader})
    report.raise_if_failed()
"""

from .errors import ExportCheckError, ExportError, NotAnHdrqExportError, ValidationError
from .formats.float_export import export_float
from .formats.int4_loading import int4_session
from .formats.ort_format import convert_to_ort_format
from .formats.qdq import WEIGHT_STORAGES, export_qdq
from .rewrites.int4 import rewrite_weights_to_int4
from .validation.parity import ParityTolerance
from .validation.validate import ValidationReport, validate

__all__ = [
    "ExportCheckError", "ExportError", "NotAnHdrqExportError", "ParityTolerance", "ValidationError",
    "ValidationReport", "WEIGHT_STORAGES", "convert_to_ort_format", "export_float", "export_qdq",
    "int4_session",
    "rewrite_weights_to_int4", "validate",
]
