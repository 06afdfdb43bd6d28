"""θ0 and one adapted model per target → quantized checkpoints, merged model, ONNX, validation report.

    targets = [TargetInputs("mnist", theta_mnist, calib_mnist, test_mnist), ...]
    result = quantize_targets(theta0, targets, recipe, "runs/pipeline", PipelineSettings(),
                              runner=make_runner(use_ray=True))

The per-target quantizations are independent tasks (:mod:`hdrq_plugin.run.distributed`): in
parallel on Ray, or one after another. Each writes its checkpoint atomically, stamped with a key
of everything that determines it (the float model, calibration data, θ0, method, bits, seed,
iterations); a rerun reuses every checkpoint whose key matches and quantizes only the rest, so a
killed run resumes. The merge, the export and the validation then run here (seconds).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .._io import ensure_writable_dir, write_text_atomic
from ..errors import EXIT_TARGETS_FAILED, HDRQPluginError
from ..merge.models import merge_models
from ..progress import stage
from ..ptq.config import METHODS
from ..quantize import quantize_model
from .checkpoint import CheckpointError, ModelRecipe, load_quantized, save_quantized
from .distributed import SequentialRunner, Task, TaskFailure

#: Bump when quantize_target computes differently in a way its key does not capture.
TASK_CODE_VERSION = 1


class TargetsFailedError(HDRQPluginError, RuntimeError):
    """Some targets' quantization tasks failed; the checkpoints of the others are kept."""

    exit_code = EXIT_TARGETS_FAILED


@dataclass(frozen=True)
class PipelineSettings:
    """How every target is quantized and how the quantized models are merged and exported."""

    bits: str = "w4a4"
    method: str = "hdrq"
    iterations: int | None = None  # per unit; None: HDRQConfig.cpu_preset's
    seed: int = 0  # every target's calibration seed (as in the benchmark) and the merge's noise seed
    rounding: str = "noise-sampling"  # merge tie rule (hdrq_plugin.merge.models)
    trials: int = 100  # docs/hdrq_method.md §5: K = 100 draws per noise-sampling merge
    weights: str = "int8"  # ONNX weight storage (hdrq_plugin.export.WEIGHT_STORAGES)
    cpus_per_task: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; one of {METHODS}")
        if self.iterations is not None and self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")


@dataclass(frozen=True)
class TargetInputs:
    """One target: its adapted float model θt, unlabelled calibration images, labelled test data."""

    name: str
    model: nn.Module
    calibration: torch.Tensor  # N×C×H×W
    test: Dataset | None = None

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"target name {self.name!r} must be a plain file name")
        if not isinstance(self.calibration, torch.Tensor) or self.calibration.dim() < 2:
            raise ValueError(f"target {self.name!r}: calibration must be an N×C×H×W tensor")


@dataclass
class PipelineResult:
    checkpoints: dict[str, str]
    merged: str
    onnx: str
    validation: dict
    summary: str
    quantized_now: list[str] = field(default_factory=list)  # the others were reused
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures and bool(self.validation.get("ok"))


def tensor_sha256(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{data.dtype}|{tuple(data.shape)}|".encode())
    digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def target_task_key(target: TargetInputs, source_digest: str | None, settings: PipelineSettings) -> str:
    """SHA-256 of everything that determines a target's quantized checkpoint."""
    from ..export.model_facts import model_sha256

    payload = {"model": model_sha256(target.model), "calibration": tensor_sha256(target.calibration),
               "source": source_digest, "bits": settings.bits, "method": settings.method,
               "iterations": settings.iterations, "seed": settings.seed, "code": TASK_CODE_VERSION,
               "torch": torch.__version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def quantize_target(model: nn.Module, calibration: torch.Tensor, source: nn.Module | None, *, name: str,
                    bits: str, method: str, seed: int, iterations: int | None, recipe: ModelRecipe,
                    path: str, key: str) -> dict:
    """One task: convert θt, calibrate it on its own data, write its checkpoint (atomically)."""
    start, cpu = time.perf_counter(), time.process_time()
    result = quantize_model(model, calibration, bits=bits, method=method, source=source, seed=seed,
                            iterations=iterations)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    save_quantized(path, result.model, recipe=recipe, bits=bits, family=result.family,
                   metadata={"target": name, "method": method, "seed": seed, "iterations": iterations,
                             "task_key": key, "seconds": seconds, "cpu_seconds": cpu_seconds})
    return {"target": name, "path": path, "seconds": seconds, "cpu_seconds": cpu_seconds}


def finished_checkpoint(path: Path, key: str) -> nn.Module | None:
    """The model at ``path`` if it exists and was made from the same inputs (``key``); else None."""
    if not path.is_file():
        return None
    try:
        model, info = load_quantized(path)
    except (CheckpointError, HDRQPluginError):
        # unreadable, or naming a builder that is not registered (never imported): quantized
        # again, and the atomic write replaces it
        return None
    return model if info.get("task_key") == key else None


def quantize_targets(source: nn.Module | None, targets: list[TargetInputs], recipe: ModelRecipe,
                     out: str | Path, settings: PipelineSettings = PipelineSettings(), *,
                     runner=None) -> PipelineResult:
    """Quantize every target (as tasks of ``runner``), merge them, export and validate the merge.

    ``recipe`` rebuilds the float architecture (checkpoints store it). Writes into ``out``:
    ``quantized/<target>.pt``, ``merged.pt``, ``merged.onnx``, ``validation.json`` and
    ``pipeline.json`` (settings, per-target times, which targets were reused).
    """
    from ..export import export_qdq, validate
    from ..export.model_facts import model_sha256

    if len({t.name for t in targets}) != len(targets) or len(targets) < 2:
        raise ValueError(f"give at least two targets with distinct names, got {[t.name for t in targets]}")
    runner = runner or SequentialRunner()
    out = ensure_writable_dir(out)
    folder = ensure_writable_dir(out / "quantized")
    wall = time.perf_counter()
    source_digest = model_sha256(source) if source is not None else None
    keys = {t.name: target_task_key(t, source_digest, settings) for t in targets}
    paths = {t.name: folder / f"{t.name}.pt" for t in targets}
    models = {t.name: finished_checkpoint(paths[t.name], keys[t.name]) for t in targets}
    todo = [t for t in targets if models[t.name] is None]

    shared_source = runner.share(source) if todo else None
    tasks = [Task(f"quantize {t.name}", quantize_target,
                  (runner.share(t.model), runner.share(t.calibration), shared_source),
                  {"name": t.name, "bits": settings.bits, "method": settings.method, "seed": settings.seed,
                   "iterations": settings.iterations, "recipe": recipe, "path": str(paths[t.name]),
                   "key": keys[t.name]},
                  num_cpus=settings.cpus_per_task, seed=settings.seed) for t in todo]
    timings, failures = {}, []
    for _task, outcome in runner.as_completed(tasks, desc="quantizing targets"):
        if isinstance(outcome, TaskFailure):
            failures.append(str(outcome))
            continue
        timings[outcome["target"]] = {"seconds": outcome["seconds"], "cpu_seconds": outcome["cpu_seconds"]}
    if failures:
        raise TargetsFailedError("quantizing failed for " + "; ".join(failures)
                           + " (the finished targets are kept; rerun to resume)")
    models = {t.name: models[t.name] or load_quantized(paths[t.name])[0] for t in targets}
    quantize_wall = time.perf_counter() - wall

    ordered = [models[t.name] for t in targets]
    with stage(f"merge ({settings.rounding})"):
        merged = merge_models(ordered, rounding=settings.rounding, trials=settings.trials, seed=settings.seed)
    merged_path = save_quantized(out / "merged.pt", merged, recipe=recipe, bits=settings.bits, family="hdrq",
                                 metadata={"method": settings.method, "merged_from": [t.name for t in targets],
                                           "rounding": settings.rounding, "seed": settings.seed})
    example = targets[0].calibration[:1].float()
    with stage(f"export ONNX ({settings.weights})"):
        onnx_path = export_qdq(merged, out / "merged.onnx", example, weights=settings.weights,
                               metadata={"method": settings.method,
                                         "merged_targets": ",".join(t.name for t in targets)}, overwrite=True)
    tests = {t.name: DataLoader(t.test, batch_size=256) for t in targets if t.test is not None}
    if not tests:
        raise ValueError("no target has test data: validation needs labelled data for at least one target")
    with stage("validate in onnxruntime"):
        report = validate(onnx_path, merged, tests)
    validation = report.to_dict()
    write_text_atomic(out / "validation.json", json.dumps(validation, indent=2, default=str))
    summary = {"settings": asdict(settings), "runner": runner.name, "targets": [t.name for t in targets],
               "task_keys": keys, "quantized_now": [t.name for t in todo], "quantize_timings": timings,
               "quantize_wall_seconds": quantize_wall, "wall_seconds": time.perf_counter() - wall,
               "validation_ok": report.ok, "validation_failures": list(report.failures)}
    summary_path = write_text_atomic(out / "pipeline.json", json.dumps(summary, indent=2, default=str))
    return PipelineResult({k: str(v) for k, v in paths.items()}, str(merged_path), str(onnx_path), validation,
                          str(summary_path), [t.name for t in todo], list(report.failures))
