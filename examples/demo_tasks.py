"""The demo's per-target quantizations as independent tasks: run on both cores, cached by key.

Every (method, target) quantization of the demo — RTN, HDRQ and NIPQ for each target — depends
only on that target's adapted model, its data and the settings, so they run as tasks of
:mod:`hdrq_plugin.run.distributed` (worker processes; one torch thread each). A task writes its
model as a checkpoint (:func:`hdrq_plugin.run.checkpoint.save_quantized`: a Brevitas FX model does
not pickle) with its test accuracy in the metadata, under a name that is the SHA-256 of everything
that produced it: the zoo recipe's key, the target, the method and its settings, the source code
of ``hdrq_plugin`` and ``hdrq_examples`` and the library versions. A second ``make demo`` reuses
every checkpoint whose key matches; a changed setting, library or line of code misses the cache.
The driver always loads the models from the checkpoints, so a fresh run and a cached one merge,
export and evaluate the very same models.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from torch import nn
from torch.utils.data import Dataset

from hdrq_plugin.errors import HDRQPluginError
from hdrq_plugin.evaluation import accuracy
from hdrq_plugin.progress import timed_stage
from hdrq_plugin.run.checkpoint import CheckpointError, ModelRecipe, load_quantized, save_quantized
from hdrq_plugin.run.distributed import SequentialRunner, Task, TaskFailure, make_runner
from hdrq_plugin.run.pipeline import TargetsFailedError

from .zoo import library_versions

#: Bump when a task computes differently in a way its key does not capture (the source digest
#: already covers this repository's code).
TASK_FORMAT = 1
QUANTIZED_CACHE = "demo-quantized"
#: Longest first (NIPQ trains for epochs, HDRQ reconstructs, RTN only calibrates): on two workers
#: the last task to start is a short one, so neither core idles long at the end.
_COST_RANK = {"nipq": 0, "hdrq": 1}


@dataclass(frozen=True)
class QuantizeJob:
    """One target's quantization by one method (``rtn``, ``hdrq`` or ``nipq``)."""

    method: str
    target: str
    bits: str
    seed: int
    iterations: int | None = None  # rtn / hdrq: reconstruction iterations per unit
    nipq_epochs: int = 0  # nipq: noise epochs

    @property
    def label(self) -> str:
        return f"quantize {self.method} ({self.target})"


@lru_cache(maxsize=1)
def source_digest() -> str:
    """SHA-256 of the Python source of ``hdrq_plugin`` and ``hdrq_examples``: the code version of
    every cached model (any edit, even a comment, makes the next run quantize again)."""
    import hdrq_examples
    import hdrq_plugin

    digest = hashlib.sha256()
    for package in (hdrq_plugin, hdrq_examples):
        root = Path(package.__file__).parent
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{package.__name__}/{path.relative_to(root).as_posix()}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def job_key(job: QuantizeJob, zoo_key: str) -> str:
    """SHA-256 of everything that determines a job's model and its reported figures."""
    versions = {**library_versions(), "brevitas": metadata.version("brevitas"),
                "hdrq-plugin": metadata.version("hdrq-plugin")}
    payload = {"job": asdict(job), "zoo": zoo_key, "code": source_digest(), "format": TASK_FORMAT,
               "versions": versions, "torch_threads": 1}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def run_job(job: QuantizeJob, adapted: nn.Module, source: nn.Module, calib: Dataset, train: Dataset,
            test: Dataset, recipe: ModelRecipe, path: str, key: str) -> dict:
    """The task: quantize, measure the test accuracy, write the checkpoint atomically."""
    start = time.perf_counter()
    extra: dict = {}
    if job.method == "nipq":
        from hdrq_plugin.nipq.train import quantize_nipq

        model, result = quantize_nipq(adapted, train, job.bits, epochs=job.nipq_epochs, seed=job.seed, eval_data=test)
        family = "nipq"
        extra = {"average_weight_bits": result.report.average_weight_bits,
                 "average_act_bits": result.report.average_act_bits,
                 "accuracy_before_freeze": result.accuracy_before_freeze,
                 "accuracy_after_freeze": result.accuracy_after_freeze}
    else:
        from hdrq_plugin.quantize import quantize_model

        result = quantize_model(adapted, calib, bits=job.bits, method=job.method, source=source, seed=job.seed,
                                iterations=job.iterations)
        model, family = result.model, result.family
    info = {"task_key": key, "job": asdict(job), "accuracy": accuracy(model, test), "extra": extra,
            "seconds": time.perf_counter() - start}
    save_quantized(path, model, recipe=recipe, bits=job.bits, family=family, metadata=info)
    return info


def _cached(path: Path, key: str) -> tuple[nn.Module, str, dict] | None:
    """``(model, family, metadata)`` of the checkpoint at ``path`` if it was made under ``key``;
    None when missing, unreadable or made from other inputs (then quantized again, replaced atomically)."""
    if not path.is_file():
        return None
    try:  # the reuse rule of hdrq_plugin.run.pipeline.finished_checkpoint, keeping the metadata
        model, info = load_quantized(path)
    except (CheckpointError, HDRQPluginError):
        return None
    return (model, info["family"], info) if info.get("task_key") == key else None


Hook = tuple[Sequence[QuantizeJob], Callable[[dict[QuantizeJob, tuple[nn.Module, str, dict]]], None]]


def run_jobs(jobs: list[QuantizeJob], bench, recipe: ModelRecipe, cache_dir: Path, workers: int,
             timings: dict[str, float], hooks: Sequence[Hook] = ()) -> dict[QuantizeJob, tuple[nn.Module, str, dict]]:
    """Every job's ``(model, family, metadata)``: from the cache where its key matches, else
    quantized now on ``workers`` processes (one after another in this process for 1).

    ``hooks``: ``(jobs, callback)`` pairs, in order. Each callback runs in this process as soon as
    its jobs' models are ready (at once for none), with those models, while the workers go on
    with the other jobs: work that does not need the slow jobs (NIPQ) overlaps them. The jobs of
    the hooks are queued first; a callback runs after the ones before it, so its output keeps
    the serial order.
    """
    folder = Path(cache_dir) / QUANTIZED_CACHE
    folder.mkdir(parents=True, exist_ok=True)
    zoo_key = bench.recipe.cache_key()
    keys = {job: job_key(job, zoo_key) for job in jobs}
    paths = {job: folder / f"{keys[job][:24]}.pt" for job in jobs}
    models = {job: found for job in jobs if (found := _cached(paths[job], keys[job])) is not None}  # loaded once
    todo = [job for job in jobs if job not in models]
    needed_early = {job for hook_jobs, _ in hooks for job in hook_jobs}
    # hooks' jobs first, then longest first (stable: targets keep their order)
    todo.sort(key=lambda job: (job not in needed_early, _COST_RANK.get(job.method, 2)))
    runner = make_runner(workers=min(workers, len(todo))) if todo else SequentialRunner()
    tasks = [Task(job.label, run_job,
                  (job, bench.adapted[job.target], bench.source_model, bench.domains[job.target].calib,
                   bench.domains[job.target].train, bench.domains[job.target].test, recipe,
                   str(paths[job]), keys[job]), seed=job.seed, num_cpus=1) for job in todo]
    failures = []
    pending_hooks = list(hooks)

    def run_ready_hooks() -> None:
        while pending_hooks and all(job in models for job in pending_hooks[0][0]):
            hook_jobs, callback = pending_hooks.pop(0)
            callback({job: models[job] for job in hook_jobs})

    with timed_stage(timings, "quantize_s", f"{len(todo)} of {len(jobs)} models on {getattr(runner, 'workers', 1)} "
                                            f"worker(s), {len(jobs) - len(todo)} cached"):
        outcomes = runner.as_completed(tasks, desc="quantizing")  # worker processes start here
        try:
            run_ready_hooks()
            for task, outcome in outcomes:
                job = task.args[0]
                if isinstance(outcome, TaskFailure):
                    failures.append(str(outcome))
                    continue
                seconds = timings.get(f"quantize_{job.method}_task_s", 0.0) + outcome["seconds"]
                timings[f"quantize_{job.method}_task_s"] = seconds
                loading = time.perf_counter()
                models[job] = _cached(paths[job], keys[job])
                timings["load_quantized_s"] = timings.get("load_quantized_s", 0.0) + time.perf_counter() - loading
                if models[job] is None:  # replaced or damaged between the write and now
                    failures.append(f"{paths[job]} does not hold {job.label}")
                    del models[job]
                    continue
                run_ready_hooks()
        finally:  # a hook that raised (or Ctrl-C) stops the workers at once, not after their tasks
            if hasattr(outcomes, "close"):
                outcomes.close()
    if failures:
        raise TargetsFailedError("quantizing failed for " + "; ".join(failures))
    timings["quantize_cached_models"] = float(len(jobs) - len(todo))
    return {job: models[job] for job in jobs}


__all__ = ["QuantizeJob", "job_key", "run_job", "run_jobs", "source_digest"]

