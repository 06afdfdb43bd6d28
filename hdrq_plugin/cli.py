"""The ``hdrq`` command line: demo, quantize, merge, export, validate, barrier, quantize-targets.

A face over the library: it parses arguments, loads and saves files, and turns failures into
one-line messages with a non-zero exit code. No algorithm lives here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_TARGETS_FAILED, HDRQPluginError
from .export.formats.qdq import WEIGHT_STORAGES
from .merge.rules import ROUNDING_RULES
from .ptq.config import METHODS as RECONSTRUCTION_METHODS
from .quantize import METHOD_NAMES

EXIT_VALIDATION_FAILED = EXIT_CHECK_FAILED  # old names, one release
EXIT_TASKS_FAILED = EXIT_TARGETS_FAILED


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hdrq", description="Merge-friendly post-training quantization for Brevitas (HDRQ).")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="offline multi-target digits demo, end to end")
    demo.add_argument("--bits", default="w4a4", help="bit spec, e.g. w4a4, w4a8, w4a4-per-channel")
    demo.add_argument("--out", default="runs/demo", help="output folder for report.json/report.md")
    demo.add_argument("--size", choices=("demo", "tiny"), default="demo",
                      help="benchmark size: 'demo' (default) or 'tiny' (seconds; for smoke tests)")
    demo.add_argument("--iterations", type=int, default=None,
                      help="reconstruction iterations per unit (default 500, a quarter of the CPU preset)")
    demo.add_argument("--hot", action="store_true",
                      help="adapt θ0 to each target with HOT back-propagation (Hadamard, INT4/INT8)")
    demo.add_argument("--nipq-epochs", type=int, default=None,
                      help="NIPQ noise epochs per target (default 10; 0 leaves the NIPQ rows out)")
    _add_common(demo)

    quant = sub.add_parser("quantize", help="quantize one target model with its calibration data")
    quant.add_argument("model", help="float model checkpoint (hdrq float format)")
    quant.add_argument("--calibration", required=True,
                       help="a .pt file holding an N×C×H×W tensor (or {'inputs': tensor}), or "
                            "domain:NAME for an example domain's calibration split")
    quant.add_argument("--source", help="float source model θ0 checkpoint (distance regulariser)")
    quant.add_argument("--method", default="hdrq",
                       choices=METHOD_NAMES)
    quant.add_argument("--bits", default="w4a4")
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

    merge = sub.add_parser("merge", help="merge quantized target models onto one integer grid")
    merge.add_argument("models", nargs="+", help="quantized checkpoints of one architecture")
    merge.add_argument("--out", required=True)
    merge.add_argument("--rounding", default="noise-sampling",
                       choices=ROUNDING_RULES)
    merge.add_argument("--trials", type=int, default=100)
    merge.add_argument("--coefficients", type=float, nargs="+", default=None)
    _add_common(merge)

    exp = sub.add_parser("export", help="export a quantized checkpoint to ONNX QDQ")
    exp.add_argument("model")
    exp.add_argument("--out", required=True, help="ONNX file to write")
    exp.add_argument("--weights", default="int8", choices=WEIGHT_STORAGES)
    exp.add_argument("--input-shape", default="1,3,32,32", help="example input shape")
    exp.add_argument("--ort", action="store_true", help="also write the ORT-format model")
    exp.add_argument("--overwrite", action="store_true")
    exp.add_argument("--vnni-only", action="store_true",
                     help="keep 8-bit weights as int8: fastest on x86 CPUs with VNNI, but the file "
                          "saturates (computes another function) on x86 CPUs without VNNI")

    val = sub.add_parser("validate", help="check an exported ONNX file in onnxruntime")
    val.add_argument("onnx")
    val.add_argument("--model", required=True, help="the quantized checkpoint it was exported from")
    val.add_argument("--data", required=True, nargs="+",
                     help="labelled data: domain:NAME (example test split) or .pt files with "
                          "{'inputs', 'labels'}")
    val.add_argument("--json", help="write the validation report here")

    bar = sub.add_parser("barrier", help="error barrier between two models, with a PNG plot")
    bar.add_argument("model_a")
    bar.add_argument("model_b")
    bar.add_argument("--data", required=True, nargs="+")
    bar.add_argument("--steps", type=int, default=11)
    bar.add_argument("--quantized", action="store_true", help="re-merge every point on the integer grid")
    bar.add_argument("--out", required=True, help="PNG plot to write (JSON beside it)")
    _add_quantize_targets(sub)
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
    pipe.add_argument("--bits", default="w4a4")
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


# ---------------------------------------------------------------------------------------------
# loading helpers

def load_any_model(path: str):
    """A quantized or float hdrq checkpoint → (model, info)."""
    from .run.checkpoint import CheckpointError, load_float_model, load_quantized

    try:
        return load_quantized(path)
    except CheckpointError as quantized_error:
        if "is not a hdrq-plugin/quantized-model" not in str(quantized_error):
            raise
        return load_float_model(path)


def load_inputs(spec: str):
    """Unlabelled inputs for calibration: a .pt tensor file or ``domain:NAME``."""
    import torch

    if spec.startswith("domain:"):
        from hdrq_examples.domains import load_domain

        return load_domain(spec.split(":", 1)[1]).calib
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"calibration data {path} does not exist")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    inputs = payload.get("inputs") if isinstance(payload, dict) else payload
    if not isinstance(inputs, torch.Tensor):
        raise ValueError(f"{path} must hold a tensor or {{'inputs': tensor}}")
    return [inputs[i:i + 1] for i in range(inputs.shape[0])]


def load_labelled(specs: Sequence[str]) -> dict:
    """Named labelled datasets: ``domain:NAME`` (test split) or .pt with inputs and labels."""
    import torch
    from torch.utils.data import TensorDataset

    datasets = {}
    for spec in specs:
        if spec.startswith("domain:"):
            from hdrq_examples.domains import load_domain

            name = spec.split(":", 1)[1]
            datasets[name] = load_domain(name).test
            continue
        path = Path(spec)
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or not {"inputs", "labels"} <= payload.keys():
            raise ValueError(f"{path} must hold {{'inputs': tensor, 'labels': tensor}}")
        datasets[path.stem] = TensorDataset(payload["inputs"], payload["labels"])
    return datasets


def _loader(dataset, batch_size: int = 256):
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


# ---------------------------------------------------------------------------------------------
# commands

def cmd_demo(args) -> int:
    from hdrq_examples.demo import run_demo

    kwargs = {} if args.iterations is None else {"iterations": args.iterations}
    if args.hot:
        kwargs["hot"] = True
    if args.nipq_epochs is not None:
        kwargs["nipq_epochs"] = args.nipq_epochs
    report = run_demo(bits=args.bits, out=args.out, seed=args.seed, size=args.size, **kwargs)
    print(f"wrote {Path(args.out) / 'report.json'} and report.md ({len(report.rows)} rows)")
    return 0


def cmd_quantize(args) -> int:
    from .quantize import quantize_model
    from .run.checkpoint import load_float_model, save_quantized

    model, info = load_float_model(args.model)
    if args.method == "nipq":
        return _quantize_nipq(args, model, info)
    source = load_float_model(args.source)[0] if args.source else None
    result = quantize_model(model, load_inputs(args.calibration), bits=args.bits, method=args.method,
                            source=source, seed=args.seed, iterations=args.iterations)
    save_quantized(args.out, result.model, recipe=info["recipe"], bits=args.bits, family=result.family,
                   metadata={"method": args.method, "calibration": args.calibration,
                             "seed": args.seed})
    print(f"wrote {args.out}")
    return 0


def _quantize_nipq(args, model, info) -> int:
    import torch
    from torch.utils.data import TensorDataset

    from .bitspec import BitSpec
    from .nipq.train import quantize_nipq
    from .run.checkpoint import save_quantized

    if args.target_bits is not None and args.target_gbops is not None:
        raise ValueError("give --target-bits or --target-gbops, not both")
    spec = BitSpec.parse(args.bits)
    target = ({"gbops": args.target_gbops} if args.target_gbops is not None
              else args.target_bits if args.target_bits is not None else str(spec))
    if args.calibration.startswith("domain:"):
        from hdrq_examples.domains import load_domain

        dataset = load_domain(args.calibration.split(":", 1)[1]).train
    else:
        payload = torch.load(args.calibration, map_location="cpu", weights_only=True)
        if isinstance(payload, dict) and {"inputs", "labels"} <= payload.keys():
            dataset = TensorDataset(payload["inputs"], payload["labels"])
        else:
            inputs = payload.get("inputs") if isinstance(payload, dict) else payload
            if not isinstance(inputs, torch.Tensor):
                raise ValueError(f"{args.calibration} must hold a tensor or {{'inputs', 'labels'}}")
            dataset = TensorDataset(inputs)  # unlabelled: distillation from the float model only
    epochs = {} if args.epochs is None else {"epochs": args.epochs}
    qmodel, result = quantize_nipq(model, dataset, spec, target=target, seed=args.seed,
                                   checkpoint_dir=args.checkpoint_dir, **epochs)
    save_quantized(args.out, qmodel, recipe=info["recipe"], bits=spec, family="nipq",
                   metadata={"method": "nipq", "calibration": args.calibration, "seed": args.seed,
                             "target": result.target, "cost": result.report.as_dict()})
    print(f"{result.target}: average weight bits {result.report.average_weight_bits:.3f}, activation bits "
          f"{result.report.average_act_bits:.3f}, {result.report.gbops:.4g} GBOPs; wrote {args.out}")
    return 0


def cmd_merge(args) -> int:
    from .merge.models import merge_models
    from .run.checkpoint import load_quantized, save_quantized

    loaded = [load_quantized(p) for p in args.models]
    models = [m for m, _ in loaded]
    merged = merge_models(models, coefficients=args.coefficients, rounding=args.rounding,
                          trials=args.trials, seed=args.seed)
    info = loaded[0][1]
    save_quantized(args.out, merged, recipe=info["recipe"], bits=info["bits"], family=info["family"],
                   metadata={"method": info.get("method"), "merged_from": list(args.models),
                             "rounding": args.rounding, "seed": args.seed})
    print(f"wrote {args.out}")
    return 0


def cmd_export(args) -> int:
    import torch

    from hdrq_plugin.export import convert_to_ort_format, export_qdq

    model, info = load_any_model(args.model)
    shape = tuple(int(s) for s in args.input_shape.split(","))
    metadata = {key: value for key, value in (
        ("method", info.get("method")),
        ("merged_targets", ",".join(map(str, info.get("merged_from") or [])) or None),
        ("source_sha256", info.get("source_sha256"))) if value}
    export_qdq(model, args.out, torch.zeros(shape), weights=args.weights, metadata=metadata,
               overwrite=args.overwrite, saturation_safe=not args.vnni_only)
    print(f"wrote {args.out}")
    if args.ort:
        ort_path = convert_to_ort_format(args.out)
        print(f"wrote {ort_path}")
    return 0


def cmd_validate(args) -> int:
    from hdrq_plugin.export import validate

    from ._io import write_text_atomic

    model, _ = load_any_model(args.model)
    datasets = {name: _loader(ds) for name, ds in load_labelled(args.data).items()}
    report = validate(args.onnx, model, datasets)
    text = json.dumps(report.to_dict(), indent=2, default=str)
    if args.json:
        write_text_atomic(args.json, text)
    print(text)
    if not report.ok:
        print(f"hdrq validate: {report.summary()}", file=sys.stderr)
        return EXIT_VALIDATION_FAILED
    return 0


def cmd_barrier(args) -> int:
    from ._io import write_text_atomic
    from .merge.barrier import error_barrier, plot_barrier

    model_a, _ = load_any_model(args.model_a)
    model_b, _ = load_any_model(args.model_b)
    datasets = load_labelled(args.data)
    from torch.utils.data import ConcatDataset

    data = _loader(ConcatDataset(list(datasets.values())))
    result = error_barrier(model_a, model_b, data, steps=args.steps, quantized=args.quantized)
    plot_barrier([result], args.out)
    write_text_atomic(Path(args.out).with_suffix(".json"),
                      json.dumps(result.to_dict(), indent=2, default=str))
    print(f"max barrier {result.max_barrier:.4f}; wrote {args.out}")
    return 0


def calibration_tensor(spec: str):
    """Calibration images of ``spec`` (see :func:`load_inputs`) as one N×C×H×W tensor."""
    import torch

    data = load_inputs(spec)
    if hasattr(data, "tensors"):  # an example domain's calibration split
        return data.tensors[0]
    return torch.cat(list(data))


def cmd_quantize_targets(args) -> int:
    from .run.checkpoint import load_float_model
    from .run.distributed import make_runner
    from .run.pipeline import PipelineSettings, TargetInputs, quantize_targets

    names = [name for name, _, _ in args.target]
    unknown = [name for name, _ in args.test if name not in names]
    if unknown:
        raise ValueError(f"--test names unknown targets {unknown}; the targets are {names}")
    tests = {name: next(iter(load_labelled([spec]).values())) for name, spec in args.test}
    targets, recipes = [], {}
    for name, model_path, calibration in args.target:
        model, info = load_float_model(model_path)
        recipes[model_path] = info["recipe"]
        targets.append(TargetInputs(name, model, calibration_tensor(calibration), tests.get(name)))
    first = next(iter(recipes.values()))
    different = [path for path, recipe in recipes.items() if recipe != first]
    if different:
        raise ValueError(f"target models {different} are not of the architecture of {args.target[0][1]}: "
                         "merging needs one architecture")
    source = load_float_model(args.source)[0] if args.source else None
    settings = PipelineSettings(bits=args.bits, method=args.method, iterations=args.iterations, seed=args.seed,
                                rounding=args.rounding, trials=args.trials, weights=args.weights,
                                cpus_per_task=args.cpus_per_task)
    runner = make_runner(args.ray, address=args.address, num_cpus=args.num_cpus)
    try:
        result = quantize_targets(source, targets, first, args.out, settings, runner=runner)
    finally:
        runner.shutdown()
    reused = [n for n in names if n not in result.quantized_now]
    print(f"quantized {', '.join(result.quantized_now) or 'nothing'}"
          + (f" (reused {', '.join(reused)})" if reused else "")
          + f"; wrote {result.merged}, {result.onnx}, {Path(args.out) / 'validation.json'}, {result.summary}")
    if not result.ok:
        print("validation FAILED: " + "; ".join(result.failures), file=sys.stderr)
        return EXIT_VALIDATION_FAILED
    return 0


COMMANDS = {"demo": cmd_demo, "quantize": cmd_quantize, "merge": cmd_merge, "export": cmd_export,
            "validate": cmd_validate, "barrier": cmd_barrier, "quantize-targets": cmd_quantize_targets}


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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except Exception as err:
        code = exit_code_for(err)
        if code is None:
            raise
        # one line, no traceback; writers are atomic and reports are written stage by stage,
        # so everything finished before the failure is already on disk
        label = "error: " if code != EXIT_CHECK_FAILED else ""
        print(f"hdrq {args.command}: {label}{err}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
