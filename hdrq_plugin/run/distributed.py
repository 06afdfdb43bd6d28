"""Independent tasks (one target's quantization, one benchmark cell) run one after another or on Ray.

    runner = make_runner(use_ray=True)              # local Ray; address=... or $RAY_ADDRESS joins a cluster
    zoo = runner.share(benchmark)                   # once: Ray's object store, not re-pickled per task
    tasks = [Task(f"quantize {t}", quantize_one, (zoo, t), seed=0, num_cpus=1) for t in targets]
    for task, outcome in runner.as_completed(tasks, desc="targets"):
        save(outcome)                               # the caller persists each result as it arrives

The scheduling, retries of killed workers and the object store are Ray's (we do not write a
scheduler). :class:`SequentialRunner` has the same interface, runs in this process and needs no
Ray. Both set the task's torch thread count and seed before calling it, so a task computes the
same numbers on either runner. Resuming is the caller's job: it submits only the tasks whose
result is not already stored, and writes each result atomically when it arrives (a killed run
loses the tasks in flight, nothing else).
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import HDRQPluginError
from ..progress import progress_bar, stage

#: Ray re-runs a task whose worker process died (killed, out of memory) this many times; a task
#: that raises is not retried (a deterministic error would only fail again).
DEFAULT_MAX_RETRIES = 2


class RayUnavailableError(HDRQPluginError, ImportError):
    """Ray was asked for but the ``distributed`` extra is not installed."""


@dataclass(frozen=True)
class Task:
    """``function(*args, **kwargs)`` on ``num_cpus`` cores with torch seeded by ``seed``.

    ``function`` must be importable by name (a module-level function): Ray ships it by reference.
    Arguments returned by :meth:`SequentialRunner.share` / :meth:`RayRunner.share` are passed by
    reference and must be top-level ``args`` (Ray resolves only those).
    """

    name: str
    function: Callable[..., Any]
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    num_cpus: int = 1
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.num_cpus, int) or self.num_cpus < 1:
            raise ValueError(f"task {self.name!r}: num_cpus must be a whole number >= 1, got {self.num_cpus!r}")


@dataclass
class TaskFailure:
    """What :meth:`as_completed` yields in place of a result when a task raised (after retries)."""

    name: str
    error: str
    details: str = ""

    def __str__(self) -> str:
        return f"{self.name}: {self.error}"


def run_task(function: Callable[..., Any], num_threads: int, seed: int | None, /, *args, **kwargs) -> Any:
    """Call ``function`` with torch limited to ``num_threads`` threads and seeded with ``seed``.

    Both runners go through here, so a task sees the same thread count and RNG state on either.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            return function(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def _progress(total: int, desc: str):
    return progress_bar(total=total, desc=desc, unit="task")


class SequentialRunner:
    """Runs tasks one after another in this process: no Ray, same interface as :class:`RayRunner`."""

    name = "sequential"

    def share(self, value: Any) -> Any:
        return value  # one process: already shared

    def as_completed(self, tasks: Iterable[Task], *, desc: str = "tasks") -> Iterator[tuple[Task, Any]]:
        tasks = list(tasks)
        with _progress(len(tasks), desc) as bar:
            for task in tasks:
                bar.set_postfix_str(task.name)
                try:
                    with stage(task.name):
                        outcome = run_task(task.function, task.num_cpus, task.seed, *task.args, **task.kwargs)
                except Exception as err:  # noqa: BLE001 - reported to the caller like a Ray task failure
                    outcome = TaskFailure(task.name, f"{type(err).__name__}: {err}", traceback.format_exc())
                bar.update()
                yield task, outcome

    def shutdown(self) -> None:
        pass


class RayRunner:
    """Runs tasks as Ray tasks: a local Ray by default, a cluster with ``address`` or ``$RAY_ADDRESS``.

    A local Ray is started with ``num_cpus`` (default: every core), no dashboard and worker logs
    kept out of the terminal; it is shut down by :meth:`shutdown`. When Ray is already
    initialised (a test fixture, a notebook), that instance is used and left running.
    """

    name = "ray"

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None,
                 max_retries: int = DEFAULT_MAX_RETRIES, runtime_env: dict | None = None) -> None:
        ray = import_ray()
        self.max_retries = max_retries
        self._started_here = not ray.is_initialized()
        if self._started_here:
            address = address or os.environ.get("RAY_ADDRESS") or None
            if address is None:  # a local instance sized for the host
                # local workers import what this process imports (e.g. a repository's benchmarks/)
                runtime_env = runtime_env or {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}}
                ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)
            else:  # a cluster's resources and Python environment are the cluster's (install hdrq-plugin there)
                ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
        self._remote = ray.remote(run_task)

    def share(self, value: Any) -> Any:
        """Put ``value`` in Ray's object store once; tasks receive the reference."""
        return import_ray().put(value)

    def as_completed(self, tasks: Iterable[Task], *, desc: str = "tasks") -> Iterator[tuple[Task, Any]]:
        ray = import_ray()
        tasks = list(tasks)
        pending = {}
        for task in tasks:
            ref = self._remote.options(num_cpus=task.num_cpus, max_retries=self.max_retries,
                                       name=task.name).remote(task.function, task.num_cpus, task.seed,
                                                              *task.args, **task.kwargs)
            pending[ref] = task
        with _progress(len(tasks), desc) as bar:
            while pending:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                task = pending.pop(ref)
                try:
                    outcome = ray.get(ref)
                except Exception as err:  # noqa: BLE001 - RayTaskError wraps the task's own exception
                    cause = getattr(err, "cause", None) or err
                    outcome = TaskFailure(task.name, f"{type(cause).__name__}: {cause}", str(err))
                bar.set_postfix_str(task.name)
                bar.update()
                yield task, outcome

    def shutdown(self) -> None:
        if self._started_here:
            import_ray().shutdown()


def import_ray():
    """The ``ray`` module, or a clear error naming the extra to install."""
    try:
        import ray
    except ImportError as err:
        raise RayUnavailableError(
            "Ray is not installed: pip install 'hdrq-plugin[distributed]' (or run without --ray)") from err
    return ray


def make_runner(use_ray: bool = False, *, address: str | None = None,
                num_cpus: int | None = None) -> SequentialRunner | RayRunner:
    """:class:`RayRunner` when asked for (``use_ray`` or an ``address``), else :class:`SequentialRunner`."""
    if use_ray or address:
        return RayRunner(address, num_cpus=num_cpus)
    return SequentialRunner()

