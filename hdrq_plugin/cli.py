"""The ``hdrq`` command line: demo, quantize, merge, export, validate, barrier, quantize-targets.

A face over the library: it parses and bounds the arguments, runs a command of
:mod:`hdrq_plugin.cli_commands`, and turns every failure into one line on stderr and an exit
code, in one place (:func:`exit_code_for`): 2 bad input, 3 a check failed, 4 some targets
failed; anything unexpected is 1, with its traceback written to a file (shown with ``--debug``).
No algorithm lives here.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence

from .errors import (
    EXIT_BAD_INPUT,
    EXIT_CHECK_FAILED,
    EXIT_TARGETS_FAILED,
    HDRQPluginError,
    InputError,
    one_line,
)

# The parser needs only names and bounds (torch-free): ``hdrq --help`` and argument errors answer
# in well under a second; a command imports the library when it runs (``cli_commands``).
from .options import (
    MAX_BARRIER_STEPS,
    MAX_EPOCHS,
    MAX_ITERATIONS,
    MAX_TRIALS,
    METHOD_NAMES,
    RECONSTRUCTION_METHODS,
    ROUNDING_RULES,
    WEIGHT_STORAGES,
    check_count,
    check_seed,
)

EXIT_VALIDATION_FAILED = EXIT_CHECK_FAILED  # old names, one release
EXIT_TASKS_FAILED = EXIT_TARGETS_FAILED


EXIT_UNEXPECTED = 1
BITS_HELP = ("bit spec w<bits>a<bits>[-per-channel][-full-range], e.g. w4a4, w4a8, w8a8; 8-bit weights "
             "use codes -64..63 (fast and exact in int8 on every CPU) unless -full-range")
#: 0.1 names of this module, now in :mod:`.cli_commands`; imported on use (PEP 562).
_COMMAND_HELPERS = ("calibration_tensor", "load_any_model", "load_inputs", "load_labelled")


def __getattr__(name: str):
    if name in _COMMAND_HELPERS:
        from . import cli_commands

        return getattr(cli_commands, name)
    raise AttributeError(f"module 'hdrq_plugin.cli' has no attribute {name!r}")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``hdrq quantize: error: ...``) and exit 2."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0; 0..2**32-1)")


def _add_files(parser: argparse.ArgumentParser, *, overwrite: bool = True) -> None:
    """Options of every command that reads checkpoints (and writes files)."""
    parser.add_argument("--arch", metavar="MODULE:FUNCTION", default=None,
                        help="allow this model builder (imported from your code) for the checkpoints given, and "
                             "build it for a plain state_dict file; checkpoints may only name registered builders")
    if overwrite:
        parser.add_argument("--overwrite", action="store_true",
                            help="replace existing outputs (an output that is an input is always refused)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="hdrq", description="Merge-friendly post-training quantization for Brevitas (HDRQ).")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="offline multi-target digits demo, end to end")
    demo.add_argument("--bits", default="w4a4", help=BITS_HELP)
    demo.add_argument("--out", default=None,
                      help="output folder for report.json/report.md (default runs/demo, runs/demo-segmentation)")
    demo.add_argument("--task", choices=("classification", "segmentation"), default="classification",
                      help="classification (digits, ResNet) or segmentation (digit scenes, U-Net; mIoU and mask PNGs)")
    demo.add_argument("--size", choices=("demo", "small", "tiny"), default="demo",
                      help="benchmark size: 'demo' (default), 'small' (segmentation only: make demo's "
                           "two-minute case) or 'tiny' (seconds; for smoke tests)")
    demo.add_argument("--iterations", type=int, default=None,
                      help="reconstruction iterations per unit (default 500, a quarter of the CPU preset)")
    demo.add_argument("--hot", action="store_true",
                      help="adapt θ0 to each target with HOT back-propagation (Hadamard, INT4/INT8)")
    demo.add_argument("--nipq-epochs", type=int, default=None,
                      help="NIPQ noise epochs per target (default 5; 0 leaves the NIPQ rows out)")
    demo.add_argument("--workers", type=int, default=None,
                      help="processes for the per-target quantizations (default: the usable cores plus one, as the "
                           "driver merges and exports meanwhile; 1: all in this "
                           "process); the models do not depend on it")
    _add_common(demo)

    quant = sub.add_parser("quantize", help="quantize one target model with its calibration data")
    quant.add_argument("model", help="float model checkpoint (hdrq float format)")
    quant.add_argument("--calibration", required=True,
                       help="a .pt file holding an N×C×H×W tensor (or {'inputs': tensor}), or "
                            "domain:NAME for an example domain's calibration split")
    quant.add_argument("--source", help="float source model θ0 checkpoint (distance regulariser)")
    quant.add_argument("--method", default="hdrq",
                       choices=METHOD_NAMES)
    quant.add_argument("--bits", default="w4a4", help=BITS_HELP)
    quant.add_argument("--iterations", type=int, default=None,
                       help="iterations per unit (default: the CPU preset)")
    quant.add_argument("--out", required=True, help="quantized checkpoint to write")
    quant.add_argument("--target-bits", type=float, default=None,
                       help="nipq: average weight and activation bits to learn (2..8; default: --bits)")
    quant.add_argument("--target-gbops", type=float, default=None, help="nipq: a BOPs budget instead, in GBOPs")
    quant.add_argument("--epochs", type=int, default=None,
                       help="nipq: noise epochs (default 10; one hard epoch follows); DATA is labelled training "
                            "data (domain:NAME = its train split), the float model is the teacher")
    quant.add_argument("--checkpoint-dir", default=None, help="nipq: resumable training checkpoints")
    _add_common(quant)
    _add_files(quant)

    merge = sub.add_parser("merge", help="merge quantized target models onto one integer grid")
    merge.add_argument("models", nargs="+", help="quantized checkpoints of one architecture")
    merge.add_argument("--out", required=True)
    merge.add_argument("--rounding", default="noise-sampling",
                       choices=ROUNDING_RULES)
    merge.add_argument("--trials", type=int, default=100)
    merge.add_argument("--coefficients", type=float, nargs="+", default=None)
    _add_common(merge)
    _add_files(merge)

    exp = sub.add_parser("export", help="export a quantized checkpoint to ONNX QDQ")
    exp.add_argument("model")
    exp.add_argument("--out", required=True, help="ONNX file to write")
    exp.add_argument("--weights", default="int8", choices=WEIGHT_STORAGES)
    exp.add_argument("--input-shape", default=None, metavar="N,C,H,W",
                     help="example input shape, comma-separated, e.g. 1,3,32,32 (default: the shape recorded "
                          "by hdrq quantize from the calibration data; the batch axis is dynamic)")
    exp.add_argument("--ort", action="store_true",
                     help="also write the ORT-format model (.ort and its operator config, with the .onnx as one unit)")
    _add_files(exp)
    exp.add_argument("--vnni-only", action="store_true",
                     help="keep full-range 8-bit weights (w8a8-full-range, older checkpoints) as int8: "
                          "fast on x86 CPUs with VNNI, but the file saturates (computes another function) on "
                          "x86 CPUs without VNNI; default weights (codes within +-64) are int8 anyway")

    val = sub.add_parser("validate", help="check an exported ONNX file in onnxruntime")
    val.add_argument("onnx")
    val.add_argument("--model", required=True, help="the quantized checkpoint it was exported from")
    val.add_argument("--data", required=True, nargs="+",
                     help="labelled data: domain:NAME (example test split) or .pt files with "
                          "{'inputs', 'labels'}")
    val.add_argument("--json", help="write the validation report here")
    _add_files(val)

    bar = sub.add_parser("barrier", help="error barrier between two models, with a PNG plot")
    bar.add_argument("model_a")
    bar.add_argument("model_b")
    bar.add_argument("--data", required=True, nargs="+")
    bar.add_argument("--steps", type=int, default=11)
    bar.add_argument("--quantized", action="store_true", help="re-merge every point on the integer grid")
    bar.add_argument("--out", required=True, help="PNG plot to write (JSON beside it)")
    _add_files(bar)
    _add_quantize_targets(sub)
    for command in sub.choices.values():  # also accepted after the command name
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _add_quantize_targets(sub) -> None:
    pipe = sub.add_parser("quantize-targets",
                          help="θ0 + per-target models/data → quantized checkpoints, merge, ONNX, validation")
    pipe.add_argument("--source", help="float source model θ0 checkpoint (distance regulariser)")
    pipe.add_argument("--target", nargs=3, action="append", required=True, metavar=("NAME", "MODEL", "CALIBRATION"),
                      help="a target: its name, its adapted float checkpoint and its calibration data "
                           "(.pt tensor or domain:NAME); repeat for every target")
    pipe.add_argument("--test", nargs=2, action="append", default=[], metavar=("NAME", "DATA"),
                      help="labelled test data of target NAME for the validation (domain:NAME or .pt)")
    pipe.add_argument("--method", default="hdrq", choices=RECONSTRUCTION_METHODS)
    pipe.add_argument("--bits", default="w4a4", help=BITS_HELP)
    pipe.add_argument("--iterations", type=int, default=None, help="iterations per unit (default: the CPU preset)")
    pipe.add_argument("--rounding", default="noise-sampling",
                      choices=ROUNDING_RULES)
    pipe.add_argument("--trials", type=int, default=100)
    pipe.add_argument("--weights", default="int8", choices=WEIGHT_STORAGES)
    pipe.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    pipe.add_argument("--ray", action="store_true", help="run the targets as Ray tasks (needs hdrq-plugin[distributed])")
    pipe.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    pipe.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (default: all)")
    pipe.add_argument("--cpus-per-task", type=int, default=1, help="torch threads per target (default 1)")
    _add_common(pipe)
    _add_files(pipe, overwrite=False)


#: Built-in errors that reach the CLI from bad input (a missing file, an unreadable tensor, a
#: wrong keyword in a user's builder): exit 2 like the library's own bad-input errors.
BAD_INPUT_BUILTINS = (ValueError, TypeError, OSError, ImportError, KeyError)


def exit_code_for(err: BaseException) -> int | None:
    """The one place errors become exit codes: the library's own carry theirs
    (:mod:`hdrq_plugin.errors`); bad-input built-ins give 2; anything else is a bug (None)."""
    if isinstance(err, HDRQPluginError):
        return err.exit_code
    if isinstance(err, BAD_INPUT_BUILTINS):
        return EXIT_BAD_INPUT
    return None


def check_arguments(args) -> None:
    """Bounds on every number a command takes, before any file is read (:mod:`.options`)."""
    if hasattr(args, "seed"):
        check_seed(args.seed)
    check_count("--trials", getattr(args, "trials", None), 1, MAX_TRIALS)
    check_count("--iterations", getattr(args, "iterations", None), 1, MAX_ITERATIONS)
    check_count("--epochs", getattr(args, "epochs", None), 1, MAX_EPOCHS)
    check_count("--nipq-epochs", getattr(args, "nipq_epochs", None), 0, MAX_EPOCHS)
    check_count("--steps", getattr(args, "steps", None), 2, MAX_BARRIER_STEPS)
    check_count("--num-cpus", getattr(args, "num_cpus", None), 1, os.cpu_count() or 1)
    check_count("--cpus-per-task", getattr(args, "cpus_per_task", None), 1, os.cpu_count() or 1)
    for name in ("target_bits", "target_gbops"):
        value = getattr(args, name, None)
        if value is not None and not (value > 0 and value < float("inf")):
            raise InputError(f"--{name.replace('_', '-')} {value} must be a positive finite number")
    coefficients = getattr(args, "coefficients", None)
    if coefficients and not all(c == c and abs(c) < float("inf") for c in coefficients):
        raise InputError("--coefficients must be finite numbers")
    if getattr(args, "arch", None):
        from .architectures import allow_architecture

        allow_architecture(args.arch)


def _write_traceback(err: BaseException) -> str:
    """The full traceback of an unexpected error, in a file the one-line message names."""
    fd, name = tempfile.mkstemp(prefix=f"hdrq-traceback-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".txt")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write("".join(traceback.format_exception(type(err), err, err.__traceback__)))
    return name


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .cli_commands import COMMANDS

    try:
        check_arguments(args)
        return COMMANDS[args.command](args)
    except Exception as err:
        code = exit_code_for(err)
        if code is None:
            if args.debug:
                raise
            where = _write_traceback(err)
            print(f"hdrq {args.command}: unexpected {type(err).__name__}: {one_line(err, 200)} "
                  f"(a bug; traceback in {where}, or rerun with --debug)", file=sys.stderr)
            return EXIT_UNEXPECTED
        # one line, no traceback; writers are atomic and reports are written stage by stage,
        # so everything finished before the failure is already on disk
        label = "error: " if code != EXIT_CHECK_FAILED else ""
        print(f"hdrq {args.command}: {label}{one_line(err, 400)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
