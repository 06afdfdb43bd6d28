"""The one error family: every error the library raises on purpose derives from :class:`HDRQPluginError`.

Each class also keeps the built-in base it always had (``ValueError`` for bad input,
``TypeError`` for a model of the wrong kind, ``RuntimeError`` for a failed run), so existing
``except ValueError`` code keeps working. ``exit_code`` is what the command line returns for it:
2 bad input, 3 a check failed, 4 some targets failed (their finished work is kept). The CLI reads
it in one place (``hdrq_plugin.cli.exit_code_for``). The classes live with their concept
(``CheckpointError`` in ``run.checkpoint``, ``ExportError`` in ``export.errors``, ...); the top
level re-exports the ones users catch.
"""

from __future__ import annotations

EXIT_BAD_INPUT = 2
EXIT_CHECK_FAILED = 3
EXIT_TARGETS_FAILED = 4


class HDRQPluginError(Exception):
    """Base of every error hdrq-plugin raises; catch it to catch them all."""

    exit_code = EXIT_BAD_INPUT


class InputError(HDRQPluginError, ValueError):
    """Bad input: a file, argument or value the library cannot use (exit 2)."""


class InputTypeError(HDRQPluginError, TypeError):
    """Input of the wrong kind, e.g. a model that is not a ``torch.nn.Module`` (exit 2)."""


class OutputExistsError(HDRQPluginError, FileExistsError):
    """An output path exists (pass ``--overwrite``) or is one of the command's inputs (exit 2)."""


class CheckFailedError(HDRQPluginError, RuntimeError):
    """A check on a produced file or model failed (exit 3)."""

    exit_code = EXIT_CHECK_FAILED



def one_line(err: BaseException | str, limit: int = 300) -> str:
    """A library or torch message folded to one line (they often span dozens)."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
