"""Errors of the exporter and of the onnxruntime validation.

Bad arguments (a non-Brevitas model, a wrong example-input shape, an existing output path)
raise the built-in ``TypeError``/``ValueError``/``FileExistsError``; the classes below are for
what goes wrong with a well-formed request.
"""

from __future__ import annotations

from hdrq_plugin.errors import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, CheckFailedError, HDRQPluginError


class ExportError(HDRQPluginError, RuntimeError):
    """The model cannot be written as a faithful integer ONNX file (unsupported op, float layer)."""


class ExportCheckError(ExportError, CheckFailedError):
    """The written graph runs as another function in onnxruntime than the model in PyTorch: the
    exporter's own check on the example input failed, so no file was left at the path (exit 3,
    like any failed check; an ``ExportError`` all the same for code that catches that)."""

    exit_code = EXIT_CHECK_FAILED


class ValidationError(HDRQPluginError, RuntimeError):
    """An exported file failed validation; the message lists every failed check."""

    exit_code = EXIT_CHECK_FAILED


class NotAnHdrqExportError(ValidationError, ValueError):
    """The ONNX file was not written by ``hdrq_plugin.export`` (it carries no hdrq metadata)."""

    exit_code = EXIT_BAD_INPUT
