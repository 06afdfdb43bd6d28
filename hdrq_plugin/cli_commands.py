"""The ``hdrq`` commands: load the files, check the inputs and outputs before any work starts,
call the library, write the outputs (atomic, never over an input, existing ones only with
``--overwrite``). Argument parsing and the error → exit-code map are in :mod:`hdrq_plugin.cli`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from ._io import check_outputs, file_sha256, remove_stale_temp_files, write_text_atomic
from .errors import EXIT_CHECK_FAILED, InputError

# ---------------------------------------------------------------------------------------------
# loading helpers


def load_any_model(path: str, arch: str | None = None):
    """A quantized or float hdrq checkpoint (or a plain state_dict with ``arch``) → (model, info)."""
    from .run.checkpoint import CheckpointError, load_float_model, load_quantized

    try:
        return load_quantized(path)
    except CheckpointError as quantized_error:
        if "is not a hdrq-plugin/quantized-model" not in str(quantized_error):
            raise
        return load_float_model(path, arch)


def _data_file(spec: str, what: str):
    from .run.checkpoint import read_torch_file

    return read_torch_file(spec, what)


def load_inputs(spec: str):
    """Unlabelled inputs for calibration: a .pt tensor file or ``domain:NAME``."""
    import torch

    if spec.startswith("domain:"):
        from hdrq_examples.domains import load_domain

        return load_domain(spec.split(":", 1)[1]).calib
    payload = _data_file(spec, "calibration data")
    inputs = payload.get("inputs") if isinstance(payload, dict) else payload
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2 or inputs.shape[0] == 0:
        raise InputError(f"{spec} must hold a non-empty N×C×... tensor or {{'inputs': tensor}}")
    if not inputs.is_floating_point():
        raise InputError(f"{spec} holds a {inputs.dtype} tensor; calibration inputs are float images")
    return [inputs[i:i + 1] for i in range(inputs.shape[0])]


def labelled_pair(payload, path) -> tuple:
    """``{'inputs', 'labels'}`` with as many labels as inputs, integer labels."""
    import torch

    if not isinstance(payload, dict) or not {"inputs", "labels"} <= payload.keys():
        raise InputError(f"{path} must hold {{'inputs': tensor, 'labels': tensor}}")
    inputs, labels = payload["inputs"], payload["labels"]
    if not isinstance(inputs, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise InputError(f"{path}: 'inputs' and 'labels' must be tensors")
    if inputs.dim() < 2 or inputs.shape[0] == 0 or not inputs.is_floating_point():
        raise InputError(f"{path}: 'inputs' must be a non-empty float N×C×... tensor")
    if labels.dim() != 1 or labels.shape[0] != inputs.shape[0] or labels.is_floating_point():
        raise InputError(f"{path}: 'labels' must be {inputs.shape[0]} integer class indices (one per input), "
                         f"got {labels.dtype} of shape {tuple(labels.shape)}")
    return inputs, labels


def load_labelled(specs: Sequence[str]) -> dict:
    """Named labelled datasets: ``domain:NAME`` (test split) or .pt with inputs and labels."""
    from torch.utils.data import TensorDataset

    datasets = {}
    for spec in specs:
        if spec.startswith("domain:"):
            from hdrq_examples.domains import load_domain

            name = spec.split(":", 1)[1]
            datasets[name] = load_domain(name).test
            continue
        datasets[Path(spec).stem] = TensorDataset(*labelled_pair(_data_file(spec, "labelled data"), spec))
    return datasets


def calibration_tensor(spec: str):
    """Calibration images of ``spec`` (see :func:`load_inputs`) as one N×C×H×W tensor."""
    import torch

    data = load_inputs(spec)
    if hasattr(data, "tensors"):  # an example domain's calibration split
        return data.tensors[0]
    return torch.cat(list(data))


def _first_sample(dataset):
    first = dataset[0]
    return (first[0] if isinstance(first, (tuple, list)) else first).unsqueeze(0)


def _loader(dataset, batch_size: int = 256):
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def _file_sha256(path: str) -> str | None:
    if str(path).startswith("domain:"):
        return str(path)
    if not Path(path).is_file():
        return None
    return file_sha256(path)


def _finished_before(out: str, run: dict) -> bool:
    """``out`` exists and records the same inputs and settings: a rerun has nothing to do."""
    from .run.checkpoint import read_torch_file

    try:
        payload = read_torch_file(out)
    except InputError:
        return False
    metadata = payload.get("metadata") if isinstance(payload, dict) else None
    return isinstance(metadata, dict) and metadata.get("run") == run


# ---------------------------------------------------------------------------------------------
# commands

def cmd_demo(args) -> int:
    if args.task == "segmentation":
        return _segmentation_demo(args)
    if args.size == "small":  # before any heavy import: an argument error stays fast
        raise InputError("--size small is the segmentation demo's setting (use it with --task segmentation)")
    from hdrq_examples.demo import run_demo

    args.out = args.out or "runs/demo"
    kwargs = {} if args.iterations is None else {"iterations": args.iterations}
    if args.hot:
        kwargs["hot"] = True
    if args.nipq_epochs is not None:
        kwargs["nipq_epochs"] = args.nipq_epochs
    if args.workers is not None:
        if args.workers < 1:
            raise InputError(f"--workers must be >= 1, got {args.workers}")
        kwargs["workers"] = args.workers
    # the demo owns its output folder (report.json/report.md): a rerun replaces its own report
    report = run_demo(bits=args.bits, out=args.out, seed=args.seed, size=args.size, **kwargs)
    print(f"wrote {Path(args.out) / 'report.json'} and report.md ({len(report.rows)} rows)")
    return 0


def _segmentation_demo(args) -> int:
    from hdrq_examples.segmentation_demo import run_segmentation_demo

    if args.hot or args.nipq_epochs:
        raise InputError("--hot and --nipq-epochs apply to the classification demo only")
    args.out = args.out or "runs/demo-segmentation"
    kwargs = {} if args.iterations is None else {"iterations": args.iterations}
    if args.size == "small" and args.iterations is None:
        from hdrq_examples.segmentation_demo import SMALL_ITERATIONS

        kwargs["iterations"] = SMALL_ITERATIONS
    report = run_segmentation_demo(bits=args.bits, out=args.out, seed=args.seed, size=args.size, **kwargs)
    print(f"wrote {Path(args.out) / 'report.json'}, report.md ({len(report.rows)} rows) and "
          f"{len(report.extra['pictures'])} mask pictures")
    return 0


def cmd_quantize(args) -> int:
    from .bitspec import BitSpec
    from .run.checkpoint import load_float_model, save_quantized
    from .run.inputs import check_model_accepts

    spec = BitSpec.parse(args.bits)
    inputs = [args.model, args.calibration, args.source]
    run = {"model": _file_sha256(args.model), "calibration": _file_sha256(args.calibration),
           "source": _file_sha256(args.source) if args.source else None, "method": args.method, "bits": str(spec),
           "weight_range": spec.weight_range,
           "iterations": args.iterations, "seed": args.seed, "target_bits": args.target_bits,
           "target_gbops": args.target_gbops, "epochs": args.epochs} if Path(args.model).is_file() else None
    if run is not None and not args.overwrite and Path(args.out).is_file() and _finished_before(args.out, run):
        print(f"{args.out} is already the result of these inputs and settings; nothing to do")
        return 0
    check_outputs(inputs, [args.out], args.overwrite)
    model, info = load_float_model(args.model, args.arch)
    if args.method == "nipq":
        return _quantize_nipq(args, model, info, spec, run)
    source = load_float_model(args.source, args.arch)[0] if args.source else None
    calibration = load_inputs(args.calibration)
    check_model_accepts(model, calibration[0] if isinstance(calibration, list) else _first_sample(calibration),
                        f"calibration data {args.calibration}")
    from .quantize import quantize_model

    result = quantize_model(model, calibration, bits=spec, method=args.method,
                            source=source, seed=args.seed, iterations=args.iterations)
    sample = calibration[0] if isinstance(calibration, list) else _first_sample(calibration)
    save_quantized(args.out, result.model, recipe=info["recipe"], bits=spec, family=result.family,
                   metadata={"method": args.method, "calibration": args.calibration, "seed": args.seed,
                             "input_shape": [1, *sample.shape[1:]], "run": run})
    print(f"wrote {args.out}")
    return 0


def _quantize_nipq(args, model, info, spec, run) -> int:
    from torch.utils.data import TensorDataset

    from .nipq.train import quantize_nipq
    from .run.checkpoint import save_quantized
    from .run.inputs import check_model_accepts

    if args.target_bits is not None and args.target_gbops is not None:
        raise InputError("give --target-bits or --target-gbops, not both")
    target = ({"gbops": args.target_gbops} if args.target_gbops is not None
              else args.target_bits if args.target_bits is not None else str(spec))
    if args.calibration.startswith("domain:"):
        from hdrq_examples.domains import load_domain

        dataset = load_domain(args.calibration.split(":", 1)[1]).train
    else:
        payload = _data_file(args.calibration, "training data")
        if isinstance(payload, dict) and {"inputs", "labels"} <= payload.keys():
            dataset = TensorDataset(*labelled_pair(payload, args.calibration))
        else:
            # unlabelled: distillation from the float model only
            dataset = TensorDataset(calibration_tensor(args.calibration))
    check_model_accepts(model, _first_sample(dataset), f"training data {args.calibration}")
    epochs = {} if args.epochs is None else {"epochs": args.epochs}
    qmodel, result = quantize_nipq(model, dataset, spec, target=target, seed=args.seed,
                                   checkpoint_dir=args.checkpoint_dir, **epochs)
    save_quantized(args.out, qmodel, recipe=info["recipe"], bits=spec, family="nipq",
                   metadata={"method": "nipq", "calibration": args.calibration, "seed": args.seed,
                             "target": result.target, "cost": result.report.as_dict(),
                             "input_shape": [1, *_first_sample(dataset).shape[1:]], "run": run})
    print(f"{result.target}: average weight bits {result.report.average_weight_bits:.3f}, activation bits "
          f"{result.report.average_act_bits:.3f}, {result.report.gbops:.4g} GBOPs; wrote {args.out}")
    return 0


def cmd_merge(args) -> int:
    from .merge.models import merge_models
    from .run.checkpoint import load_quantized, save_quantized

    check_outputs(args.models, [args.out], args.overwrite)
    if args.coefficients is not None and len(args.coefficients) != len(args.models):
        raise InputError(f"--coefficients has {len(args.coefficients)} values for {len(args.models)} models")
    loaded = [load_quantized(p) for p in args.models]
    models = [m for m, _ in loaded]
    merged = merge_models(models, coefficients=args.coefficients, rounding=args.rounding,
                          trials=args.trials, seed=args.seed)
    info = loaded[0][1]
    save_quantized(args.out, merged, recipe=info["recipe"], bits=info["bits"], family=info["family"],
                   metadata={"method": info.get("method"), "merged_from": list(args.models),
                             "rounding": args.rounding, "seed": args.seed,
                             "input_shape": info.get("input_shape")})
    print(f"wrote {args.out}")
    return 0


def _export_shape(args, info) -> tuple[int, ...]:
    from .run.inputs import parse_input_shape

    if args.input_shape is not None:
        return parse_input_shape(args.input_shape)
    recorded = info.get("input_shape")
    if isinstance(recorded, list) and recorded and all(isinstance(s, int) for s in recorded):
        return parse_input_shape(",".join(map(str, recorded)))
    raise InputError(f"{args.model} records no input shape (it predates hdrq quantize recording it): "
                     "pass --input-shape N,C,H,W, e.g. 1,3,32,32")


def cmd_export(args) -> int:
    import torch

    from hdrq_plugin.export import convert_to_ort_format, export_qdq

    from .run.inputs import check_model_accepts

    out = Path(args.out)
    if out.suffix != ".onnx":
        raise InputError(f"--out {out} must end in .onnx")
    ort_files = [out.with_suffix(".ort"), out.with_name(out.stem + ".required_operators.config")] if args.ort else []
    check_outputs([args.model], [out, *ort_files], args.overwrite)
    model, info = load_any_model(args.model, args.arch)
    example = torch.zeros(_export_shape(args, info))
    check_model_accepts(model, example, "--input-shape")
    metadata = {key: value for key, value in (
        ("method", info.get("method")),
        ("merged_targets", ",".join(map(str, info.get("merged_from") or [])) or None),
        ("source_sha256", info.get("source_sha256"))) if value}
    if not args.ort:
        export_qdq(model, out, example, weights=args.weights, metadata=metadata,
                   overwrite=args.overwrite, saturation_safe=not args.vnni_only)
        print(f"wrote {out}")
        return 0
    # .onnx and .ort as one unit: both are made in a staging folder beside the output, then
    # moved into place; a failing ORT conversion leaves neither
    folder = out.parent if str(out.parent) else Path(".")
    remove_stale_temp_files(folder)
    staging = folder / f".{out.name}.{os.getpid()}.staging"
    try:
        staging.mkdir(parents=True)
        staged = export_qdq(model, staging / out.name, example, weights=args.weights, metadata=metadata,
                            saturation_safe=not args.vnni_only)
        staged_ort = convert_to_ort_format(staged)
        staged_config = staged_ort.with_name(staged_ort.stem + ".required_operators.config")
        for produced, final in ((staged_ort, ort_files[0]), (staged_config, ort_files[1]), (staged, out)):
            os.replace(produced, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {out}\nwrote {ort_files[0]}")
    return 0


def cmd_validate(args) -> int:
    from hdrq_plugin.export import validate

    from .run.inputs import check_model_accepts

    check_outputs([args.onnx, args.model, *args.data], [args.json] if args.json else [], args.overwrite)
    _require_onnx_file(args.onnx)
    model, _ = load_any_model(args.model, args.arch)
    datasets = load_labelled(args.data)
    for name, dataset in datasets.items():
        check_model_accepts(model, _first_sample(dataset), f"data {name}")
    report = validate(args.onnx, model, {name: _loader(ds) for name, ds in datasets.items()})
    text = json.dumps(report.to_dict(), indent=2, default=str)
    if args.json:
        write_text_atomic(args.json, text)
    print(text)
    if not report.ok:
        print(f"hdrq validate: {report.summary()}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    return 0


def _require_onnx_file(path: str) -> None:
    """A readable ONNX model, checked here so a truncated or text file is one line, not a DecodeError."""
    import onnx

    file = Path(path)
    if not file.is_file():
        raise InputError(f"ONNX file {file} {'is a directory' if file.is_dir() else 'does not exist'}")
    try:
        onnx.checker.check_model(onnx.load(file, load_external_data=False))
    except Exception as err:  # protobuf DecodeError, onnx ValidationError, ...
        raise InputError(f"{file} is not a valid ONNX model: {' '.join(str(err).split())[:200]}") from err


def cmd_barrier(args) -> int:
    from torch.utils.data import ConcatDataset

    from .merge.barrier import error_barrier, plot_barrier
    from .run.inputs import check_model_accepts

    json_out = Path(args.out).with_suffix(".json")
    if Path(args.out).suffix.lower() != ".png":
        raise InputError(f"--out {args.out} must end in .png (the JSON goes beside it)")
    check_outputs([args.model_a, args.model_b, *args.data], [args.out, json_out], args.overwrite)
    model_a, _ = load_any_model(args.model_a, args.arch)
    model_b, _ = load_any_model(args.model_b, args.arch)
    dataset = ConcatDataset(list(load_labelled(args.data).values()))
    check_model_accepts(model_a, _first_sample(dataset), "--data")
    result = error_barrier(model_a, model_b, _loader(dataset), steps=args.steps, quantized=args.quantized)
    plot_barrier([result], args.out)
    write_text_atomic(json_out, json.dumps(result.to_dict(), indent=2, default=str))
    print(f"max barrier {result.max_barrier:.4f}; wrote {args.out}")
    return 0


def cmd_quantize_targets(args) -> int:
    from .run.checkpoint import load_float_model
    from .run.distributed import make_runner
    from .run.inputs import check_model_accepts, check_ray_address
    from .run.pipeline import PipelineSettings, TargetInputs, quantize_targets

    names = [name for name, _, _ in args.target]
    unknown = [name for name, _ in args.test if name not in names]
    if unknown:
        raise InputError(f"--test names unknown targets {unknown}; the targets are {names}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; quantize-targets writes into a folder")
    # the folder is the command's own (a rerun resumes in it); no input may live among its outputs
    outputs = [out / "merged.pt", out / "merged.onnx", out / "validation.json", out / "pipeline.json",
               *(out / "quantized" / f"{name}.pt" for name in names)]
    inputs = [args.source, *(m for _, m, _ in args.target), *(c for _, _, c in args.target), *(d for _, d in args.test)]
    check_outputs(inputs, [], overwrite=True)
    resolved = {Path(p).resolve() for p in inputs if p and not str(p).startswith("domain:")}
    clash = [str(p) for p in outputs if p.resolve() in resolved]
    if clash:
        raise InputError(f"refusing to write {clash[0]}: it is an input of this command")
    if args.ray or args.address:
        check_ray_address(args.address or os.environ.get("RAY_ADDRESS"))
    tests = {name: next(iter(load_labelled([spec]).values())) for name, spec in args.test}
    targets, recipes = [], {}
    for name, model_path, calibration in args.target:
        model, info = load_float_model(model_path, args.arch)
        recipes[model_path] = info["recipe"]
        data = calibration_tensor(calibration)
        check_model_accepts(model, data[:1], f"calibration data {calibration}")
        if name in tests:
            check_model_accepts(model, _first_sample(tests[name]), f"test data of {name}")
        targets.append(TargetInputs(name, model, data, tests.get(name)))
    first = next(iter(recipes.values()))
    different = [path for path, recipe in recipes.items() if recipe != first]
    if different:
        raise InputError(f"target models {different} are not of the architecture of {args.target[0][1]}: "
                         "merging needs one architecture")
    source = load_float_model(args.source, args.arch)[0] if args.source else None
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
        return EXIT_CHECK_FAILED
    return 0


COMMANDS = {"demo": cmd_demo, "quantize": cmd_quantize, "merge": cmd_merge, "export": cmd_export,
            "validate": cmd_validate, "barrier": cmd_barrier, "quantize-targets": cmd_quantize_targets}
