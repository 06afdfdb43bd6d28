"""Shared test set-up, and ``--cpu-durations``: CPU seconds per test and per file.

Wall-clock ``--durations`` mislead on a shared machine (a test waits for the CPU); the CPU time of
the worker process and of the children it waited for (setup + call + teardown, every thread) is
what a test costs. Under pytest-xdist
each worker measures its own tests and the controller adds them up.
"""

import os
import resource
import shutil
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from filelock import FileLock  # a dependency of torch
from hypothesis import settings as hypothesis_settings
from tiny_models import tiny_resnet

from hdrq_plugin import register_architecture

# the tests' own model, allowed the way a user allows theirs: checkpoints may only name registered builders
register_architecture(tiny_resnet)

# Hypothesis fails an example that runs longer than 200 ms by default: a timing check, which fails
# correct results on two shared cores (seen: a 7-value mean/std example at 280 ms under load,
# test_mtda_benchmark.py). No deadline here; what a test computes is checked, not how fast.
hypothesis_settings.register_profile("shared-cpu", deadline=None)
hypothesis_settings.load_profile("shared-cpu")

#: The costliest files, most CPU seconds first (``--cpu-durations``, children included; BENCHMARKS.md,
#: issue 22: the mean of two full runs of 2026-12-07, 1,070 CPU s each). With ``make test``'s
#: ``--dist loadfile --no-loadscope-reorder`` xdist hands files out in collection order, so these
#: start first and no long file is left for one core at the end: longest-first on two workers
#: gives 535 / 535 CPU s from these figures. A scheduling hint only: a file not listed runs after
#: these, in its usual order. (A worker's children are counted when they are reaped, so a file
#: that reaps another's, e.g. torch.compile's, shows them: test_hot_step read 34 then 2 CPU s.)
COSTLIEST_FIRST = (
    "test_demo.py",  # 200: two tiny demos from an empty result cache (parallel and --workers 1)
    "test_hot.py",  # 74 here with a warm torch.compile cache; 80 measured with a cold one
    "test_demo_tasks.py",
    "test_conformance.py",
    "test_segmentation_demo.py",
    "test_mtda_benchmark.py",
    "test_hot_budget.py",
    "test_distributed.py",
    "test_nipq.py",
    "test_adopt_brevitas.py",
    "test_segmentation_models.py",
    "test_nipq_resume.py",
    "test_hot_fused.py",
    "test_block_models.py",
    "test_cli_fuzz.py",
    "test_segmentation_study.py",
    "test_block_models_se.py",
    "test_tensor_methods.py",
    "test_one_grid.py",
    "test_hot_step.py",
    "test_export.py",
    "test_reconstruction.py",
    "test_untrusted_files.py",
    "test_cli.py",
)

#: The tiny recipe's files (generated domains, trained zoo) in a cache folder, as
#: ``load_or_build_benchmark(BenchmarkRecipe.tiny())`` writes them: ``domains-*.pt``, ``benchmark-*.pt``.
_TINY_ZOO_FILES = ("domains-*.pt", "benchmark-*.pt")

_CPU_KEY = "cpu_s"
_PHASE_START = pytest.StashKey[float]()
_cpu_per_test: dict[str, float] = defaultdict(float)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The test models are tiny and overhead-bound: a second thread only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_zoo_files(tmp_path_factory) -> Path:
    """A folder with the tiny recipe's domains and zoo, built once per run for every file and every
    xdist worker (the first to ask builds under a file lock; the others wait and read). Several
    files each built the same ~5 CPU s of rendering and training before; what they check about
    the build itself stays in tests/test_zoo.py, which builds its own."""
    from hdrq_examples.zoo import BenchmarkRecipe, load_or_build_benchmark

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, shared by its workers (each has its own popen-gwN below it)
    folder = root / "tiny-zoo"
    with FileLock(root / "tiny-zoo.lock"):
        if not (folder / "built").is_file():
            load_or_build_benchmark(BenchmarkRecipe.tiny(), cache_dir=folder)
            (folder / "built").touch()
    return folder


@pytest.fixture(scope="session")
def tiny_zoo_cache(tiny_zoo_files):
    """``seed(folder)``: ``folder`` (made if missing) with its own copies of the tiny zoo's files,
    so a test's cache starts with the zoo built and nothing else (no quantized model, no
    result); copies, not links, as tests corrupt and rewrite their cache files."""
    def seed(folder: Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for pattern in _TINY_ZOO_FILES:
            for path in tiny_zoo_files.glob(pattern):
                shutil.copyfile(path, folder / path.name)
        return folder

    return seed


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(COSTLIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order otherwise kept


def pytest_addoption(parser):
    parser.addoption("--cpu-durations", type=int, default=None, metavar="N",
                     help="after the run, list the N tests and every file by CPU seconds (setup + call + teardown)")


def _cpu_seconds() -> float:
    """This process's CPU time plus that of its finished children (spawned workers, qemu)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _start_phase(item):
    item.stash[_PHASE_START] = _cpu_seconds()


# tryfirst: the clock starts before any other plugin's setup/teardown work in the phase
pytest_runtest_setup = pytest.hookimpl(tryfirst=True)(_start_phase)
pytest_runtest_call = pytest.hookimpl(tryfirst=True)(_start_phase)
pytest_runtest_teardown = pytest.hookimpl(tryfirst=True)(_start_phase)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach the phase's CPU seconds to its report (user_properties travel from xdist workers)."""
    outcome = yield
    start = item.stash.get(_PHASE_START, None)
    if start is not None:
        outcome.get_result().user_properties.append((_CPU_KEY, _cpu_seconds() - start))


def pytest_runtest_logreport(report):
    for key, value in report.user_properties:
        if key == _CPU_KEY:
            _cpu_per_test[report.nodeid] += value


def pytest_terminal_summary(terminalreporter, config):
    count = config.getoption("--cpu-durations")
    if count is None or not _cpu_per_test:
        return
    per_file: dict[str, float] = defaultdict(float)
    for nodeid, seconds in _cpu_per_test.items():
        per_file[nodeid.split("::")[0]] += seconds
    write = terminalreporter.write_line
    terminalreporter.section(f"CPU seconds: {count or 'all'} slowest tests")
    ranked = sorted(_cpu_per_test.items(), key=lambda kv: -kv[1])
    for nodeid, seconds in ranked[:count or None]:
        write(f"{seconds:9.2f}s  {nodeid}")
    terminalreporter.section("CPU seconds per file")
    for path, seconds in sorted(per_file.items(), key=lambda kv: -kv[1]):
        write(f"{seconds:9.2f}s  {path}")
    write(f"{sum(per_file.values()):9.2f}s  total")
