"""Independent tasks (one target's quantization, one benchmark cell) run one after another or on Ray.

    runner = make_runner(use_ray=True)              # local Ray; address=... or $RAY_ADDRESS joins a cluster
    zoo = runner.share(benchmark)                   # once: Ray's object store, not re-pickled per task
    tasks = [Task(f"quantize {t}", quantize_one, (zoo, t), seed=0, num_cpus=1) for t in targets]
    for task, outcome in runner.as_completed(tasks, desc="targets"):
        save(outcome)                               # the caller persists each result as it arrives

The scheduling, retries of killed workers and the object store are Ray's (we do not write a
scheduler). :class:`SequentialRunner` has the same interface, runs in this process and needs no
Ray; :class:`ProcessRunner` runs tasks in a few local worker processes (the standard library's
process pool, started by *spawn*), for the cores of one machine without Ray's start-up cost. Both set the task's torch thread count and seed before calling it, so a task computes the
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
from ..progress import progress_bar, progress_mode, stage

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


def _init_worker(progress: str, parent: int) -> None:
    """A worker's progress: plain log lines, or none where the driver draws bars on a terminal
    (two processes writing bars to one terminal garble both). It dies with its parent."""
    os.environ["HDRQ_PROGRESS"] = progress
    _die_with_parent(parent)


def _die_with_parent(parent: int) -> None:
    """Have Linux send this process SIGTERM when the driver dies (``prctl(PR_SET_PDEATHSIG)``), so
    a killed ``hdrq demo`` leaves no worker training on for minutes; the pool's own shutdown only
    covers a driver that exits normally. Elsewhere, the pool's broken-pipe detection remains."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1  # <linux/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # the driver died before the request took effect
        os._exit(1)


def _run_staged(name: str, function: Callable[..., Any], num_threads: int, seed: int | None, /,
                *args, **kwargs) -> Any:
    """:func:`run_task` inside a worker, announced as a stage: its own start/end lines and
    heartbeats name the task (the driver only sees tasks finish)."""
    with stage(name):
        return run_task(function, num_threads, seed, *args, **kwargs)


class ProcessRunner:
    """Runs tasks in ``workers`` local processes (spawned: no state inherited from the driver).

    Arguments and results travel pickled, so a task's function and values must pickle (a
    Brevitas FX model does not: such tasks write a checkpoint and return its path). Each task
    goes through :func:`run_task` with its own thread count and seed, so a task computes the
    same numbers here as on :class:`SequentialRunner` (tested byte-for-byte). Results are
    yielded as they finish; a caller that needs a fixed order sorts them.
    """

    name = "processes"

    def __init__(self, workers: int = 2) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a whole number >= 1, got {workers!r}")
        self.workers = workers

    def share(self, value: Any) -> Any:
        return value  # pickled into each task that takes it

    def as_completed(self, tasks: Iterable[Task], *, desc: str = "tasks") -> Iterator[tuple[Task, Any]]:
        """Submit every task now (the workers start before the first result is asked for, so the
        caller may do other work meanwhile) and yield ``(task, outcome)`` as they finish."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        tasks = list(tasks)
        if not tasks:
            return iter(())
        mode = progress_mode()
        worker_progress = "off" if mode in ("bars", "off") else "log"
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(max_workers=min(self.workers, len(tasks)), mp_context=context,
                                   initializer=_init_worker, initargs=(worker_progress, os.getpid()))
        try:
            futures = {pool.submit(_run_staged, task.name, task.function, task.num_cpus, task.seed,
                                   *task.args, **task.kwargs): task for task in tasks}
        except BaseException:
            _stop_pool(pool)
            raise
        return _PoolOutcomes(pool, futures, desc)

    def shutdown(self) -> None:
        pass


class _PoolOutcomes:
    """What :meth:`ProcessRunner.as_completed` returns: ``(task, outcome)`` as tasks finish.
    ``close()``, or a loop left early, stops the pool even before the first item was asked for
    (a generator that never started would not run its clean-up, and the interpreter's exit would
    then wait for every queued task)."""

    def __init__(self, pool, futures: dict, desc: str) -> None:
        self._pool = pool
        self._items = self._collect(pool, futures, desc)

    def __iter__(self) -> _PoolOutcomes:
        return self

    def __next__(self) -> tuple[Task, Any]:
        return next(self._items)

    def close(self) -> None:
        self._items.close()
        _stop_pool(self._pool)

    @staticmethod
    def _collect(pool, futures: dict, desc: str) -> Iterator[tuple[Task, Any]]:
        from concurrent.futures import as_completed

        finished = False
        try:
            with _progress(len(futures), desc) as bar:
                for future in as_completed(futures):
                    task = futures[future]
                    try:
                        outcome = future.result()
                    except Exception as err:  # noqa: BLE001 - a task's error (or a dead worker) is a failure
                        outcome = TaskFailure(task.name, f"{type(err).__name__}: {err}", traceback.format_exc())
                    bar.set_postfix_str(task.name)
                    bar.update()
                    yield task, outcome
            finished = True
        finally:
            if finished:
                pool.shutdown(wait=True)
            else:  # interrupted (Ctrl-C, an error in the caller's loop): stop the tasks in flight too
                _stop_pool(pool)


def _stop_pool(pool) -> None:
    """Cancel the queued tasks and terminate the workers now; ``shutdown(wait=True)`` would wait
    for the running tasks (minutes of NIPQ training). Python 3.14's ``terminate_workers`` does
    this; before it, the pool's process table is the only handle on its workers."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=10)


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


def make_runner(use_ray: bool = False, *, address: str | None = None, num_cpus: int | None = None,
                workers: int = 1) -> SequentialRunner | ProcessRunner | RayRunner:
    """:class:`RayRunner` when asked for (``use_ray`` or an ``address``), else :class:`ProcessRunner`
    for ``workers`` > 1, else :class:`SequentialRunner`."""
    if use_ray or address:
        return RayRunner(address, num_cpus=num_cpus)
    return ProcessRunner(workers) if workers > 1 else SequentialRunner()


def default_workers() -> int:
    """Worker processes for independent tasks here: the CPUs this process may use
    (``os.sched_getaffinity``, so a container's or ``taskset``'s limit counts), one thread each."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores)

