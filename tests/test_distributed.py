"""Per-target quantization and benchmark cells as tasks: Ray and the sequential runner agree, a killed
worker is retried, an interrupted run resumes without redoing finished work."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_resnet
from torch.utils.data import TensorDataset

from hdrq_plugin.cli import EXIT_TASKS_FAILED, main
from hdrq_plugin.export.model_facts import model_sha256
from hdrq_plugin.run.checkpoint import ModelRecipe, save_float_model
from hdrq_plugin.run.distributed import (
    ProcessRunner,
    RayRunner,
    RayUnavailableError,
    SequentialRunner,
    Task,
    TaskFailure,
    make_runner,
)
from hdrq_plugin.run.pipeline import (
    PipelineSettings,
    TargetInputs,
    finished_checkpoint,
    quantize_target,
    quantize_targets,
    target_task_key,
)

TESTS = Path(__file__).resolve().parent
RECIPE = ModelRecipe("tiny_models:tiny_resnet", {"width": 8, "seed": 0})
SETTINGS = PipelineSettings(bits="w4a8", method="hdrq", iterations=4, seed=0, trials=5)
NO_RAY = "Ray is not installed (pip install 'hdrq-plugin[distributed]'); the Ray runner tests need it"


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the whole session: 2 CPUs, no dashboard, workers that import the tests' models."""
    ray = pytest.importorskip("ray", reason=NO_RAY)
    path = os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


def data(seed: int) -> tuple[torch.Tensor, TensorDataset]:
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(40, 3, 16, 16, generator=gen)
    labels = tiny_resnet(seed=1)(inputs[32:]).argmax(1)
    return inputs[:32], TensorDataset(inputs[32:], labels)


def targets() -> list[TargetInputs]:
    return [TargetInputs(name, tiny_resnet(seed=seed), *data(seed)) for name, seed in (("a", 1), ("b", 2))]


def state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_state(path_a: Path, path_b: Path) -> None:
    a, b = state(path_a), state(path_b)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{path_a.name}: tensors differ: {different[:5]}"


@pytest.fixture(scope="module")
def sequential_run(tmp_path_factory):
    """The reference: both targets quantized one after another, merged, exported, validated."""
    out = tmp_path_factory.mktemp("sequential")
    result = quantize_targets(tiny_resnet(seed=0), targets(), RECIPE, out, SETTINGS, runner=SequentialRunner())
    return out, result


def test_sequential_pipeline_writes_every_file_and_a_valid_merge(sequential_run):
    out, result = sequential_run
    assert result.ok, result.failures
    assert result.quantized_now == ["a", "b"]
    for name in ("quantized/a.pt", "quantized/b.pt", "merged.pt", "merged.onnx", "validation.json", "pipeline.json"):
        assert (out / name).is_file(), name


def test_ray_runner_writes_the_same_checkpoints_as_the_sequential_runner(local_ray, sequential_run, tmp_path):
    reference, _ = sequential_run
    result = quantize_targets(tiny_resnet(seed=0), targets(), RECIPE, tmp_path, SETTINGS, runner=RayRunner())
    assert result.ok, result.failures
    for name in ("quantized/a.pt", "quantized/b.pt", "merged.pt"):
        assert_same_state(reference / name, tmp_path / name)


def test_process_runner_writes_the_same_checkpoints_as_the_sequential_runner(sequential_run, tmp_path):
    """Two spawned worker processes, one torch thread per task: the very same tensors as one process."""
    reference, _ = sequential_run
    result = quantize_targets(tiny_resnet(seed=0), targets(), RECIPE, tmp_path, SETTINGS, runner=ProcessRunner(2))
    assert result.ok, result.failures
    assert sorted(result.quantized_now) == ["a", "b"]
    for name in ("quantized/a.pt", "quantized/b.pt", "merged.pt"):
        assert_same_state(reference / name, tmp_path / name)


def raise_value_error(message: str) -> None:
    raise ValueError(message)


def test_process_runner_reports_a_raising_task_and_finishes_the_others(monkeypatch, capfd):
    monkeypatch.setenv("HDRQ_PROGRESS", "log")  # as in a CI log: each worker announces its task
    tasks = [Task("bad", raise_value_error, ("broken input",)), Task("good", max, (3, 4))]
    outcomes = {task.name: outcome for task, outcome in ProcessRunner(2).as_completed(tasks)}
    assert outcomes["good"] == 4
    assert isinstance(outcomes["bad"], TaskFailure) and outcomes["bad"].error == "ValueError: broken input"
    out = capfd.readouterr().out
    assert "good: started" in out and "good: done in" in out and "bad: failed after" in out
    with pytest.raises(ValueError, match="workers"):
        ProcessRunner(0)
    assert isinstance(make_runner(workers=2), ProcessRunner) and isinstance(make_runner(workers=1), SequentialRunner)


def test_another_seed_gives_another_checkpoint(sequential_run, tmp_path):
    """The identity above is not vacuous: the checkpoint does depend on the task's seed."""
    reference, _ = sequential_run
    target = targets()[0]
    quantize_target(target.model, target.calibration, tiny_resnet(seed=0), name="a", bits=SETTINGS.bits,
                    method=SETTINGS.method, seed=1, iterations=SETTINGS.iterations, recipe=RECIPE,
                    path=str(tmp_path / "a.pt"), key="seed 1")
    a, b = state(reference / "quantized/a.pt"), state(tmp_path / "a.pt")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def die_on_first_attempt(marker: str, *args, **kwargs):
    """A task whose worker process is killed (SIGKILL) half a second into its first attempt, while it
    calibrates (or, on a fast machine, before it could return): the first attempt never finishes."""
    if not os.path.exists(marker):
        Path(marker).touch()
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGKILL)).start()
        quantize_target(*args, **{**kwargs, "path": marker + ".pt"})
        time.sleep(60)
    return quantize_target(*args, **kwargs)


def _dying_task(marker: Path, out: Path) -> Task:
    target = targets()[0]
    return Task("quantize a", die_on_first_attempt,
                (str(marker), target.model, target.calibration, tiny_resnet(seed=0)),
                {"name": "a", "bits": SETTINGS.bits, "method": SETTINGS.method, "seed": SETTINGS.seed,
                 "iterations": SETTINGS.iterations, "recipe": RECIPE, "path": str(out), "key": "a"},
                seed=SETTINGS.seed)


def test_a_worker_killed_mid_task_is_retried_and_gives_the_same_checkpoint(local_ray, sequential_run, tmp_path):
    reference, _ = sequential_run
    out = tmp_path / "a.pt"
    [(_, outcome)] = list(RayRunner().as_completed([_dying_task(tmp_path / "died", out)]))
    assert not isinstance(outcome, TaskFailure), outcome
    assert (tmp_path / "died").exists()  # it did die once
    assert_same_state(reference / "quantized/a.pt", out)


def test_without_retries_a_killed_worker_is_reported_as_a_failure_and_writes_nothing(local_ray, tmp_path):
    out = tmp_path / "a.pt"
    [(_, outcome)] = list(RayRunner(max_retries=0).as_completed([_dying_task(tmp_path / "died", out)]))
    assert isinstance(outcome, TaskFailure) and outcome.name == "quantize a"
    assert not out.exists() and not list(tmp_path.glob(".a.pt.*"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The reference's inputs as files: float checkpoints and calibration / test .pt files."""
    folder = tmp_path_factory.mktemp("files")
    save_float_model(folder / "source.pt", tiny_resnet(seed=0), RECIPE)
    for target in targets():
        save_float_model(folder / f"{target.name}.pt", target.model, RECIPE)
        torch.save({"inputs": target.calibration}, folder / f"calib-{target.name}.pt")
        inputs, labels = target.test.tensors
        torch.save({"inputs": inputs, "labels": labels}, folder / f"test-{target.name}.pt")
    torch.save({"inputs": targets()[1].calibration[:4]}, folder / "calib-too-small.pt")
    return folder


def _cli(ws: Path, out: Path, calib_b: str) -> list[str]:
    return ["quantize-targets", "--source", str(ws / "source.pt"),
            "--target", "a", str(ws / "a.pt"), str(ws / "calib-a.pt"),
            "--target", "b", str(ws / "b.pt"), str(ws / calib_b),
            "--test", "a", str(ws / "test-a.pt"), "--test", "b", str(ws / "test-b.pt"),
            "--bits", SETTINGS.bits, "--iterations", str(SETTINGS.iterations), "--trials", str(SETTINGS.trials),
            "--out", str(out)]


def test_a_failed_target_keeps_the_finished_one_and_a_rerun_quantizes_only_the_missing_one(
        workspace, sequential_run, tmp_path, capsys):
    reference, _ = sequential_run
    assert main(_cli(workspace, tmp_path, "calib-too-small.pt")) == EXIT_TASKS_FAILED
    assert "quantize b" in capsys.readouterr().err
    kept = tmp_path / "quantized/a.pt"
    assert kept.is_file() and not (tmp_path / "quantized/b.pt").exists() and not (tmp_path / "merged.pt").exists()
    (tmp_path / "quantized/.b.pt.half-written.tmp").write_bytes(b"\x00killed")  # what a kill leaves at worst
    written = kept.stat().st_mtime_ns

    assert main(_cli(workspace, tmp_path, "calib-b.pt")) == 0
    assert "quantized b (reused a)" in capsys.readouterr().out
    assert kept.stat().st_mtime_ns == written  # not recomputed, not rewritten
    for name in ("quantized/a.pt", "quantized/b.pt", "merged.pt"):  # and the CLI's files equal the API's
        assert_same_state(reference / name, tmp_path / name)


def test_a_checkpoint_is_reused_only_for_the_inputs_and_settings_that_made_it(sequential_run):
    reference, _ = sequential_run
    target = targets()[0]
    source = model_sha256(tiny_resnet(seed=0))
    key = target_task_key(target, source, SETTINGS)
    assert finished_checkpoint(reference / "quantized/a.pt", key) is not None
    changed = [target_task_key(target, source, dataclasses.replace(SETTINGS, iterations=5)),
               target_task_key(target, source, dataclasses.replace(SETTINGS, seed=1)),
               target_task_key(dataclasses.replace(target, calibration=target.calibration + 1e-3), source, SETTINGS),
               target_task_key(target, None, SETTINGS)]
    assert key not in changed
    assert finished_checkpoint(reference / "quantized/a.pt", changed[0]) is None


def test_asking_for_ray_without_the_extra_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without Ray looks like to import
    with pytest.raises(RayUnavailableError, match=r"hdrq-plugin\[distributed\]"):
        make_runner(use_ray=True)
    assert isinstance(make_runner(use_ray=False), SequentialRunner)


# --- the benchmark grid through the same runner ---------------------------------------------------
@pytest.mark.slow  # ~20-30 s on the 2 shared cores: the tiny zoo's data, 5 cells, a resumed cell
def test_benchmark_cells_run_as_ray_tasks_and_a_rerun_computes_only_the_missing_cell(local_ray, tmp_path):
    from benchmarks.mtda.plan import BenchmarkSettings
    from benchmarks.mtda.run import BenchmarkRun
    from benchmarks.mtda.tasks import run_with_runner

    settings = BenchmarkSettings(recipe="tiny", targets=("mnist", "mnistm"), test_images=16, seeds=(0,),
                                 bits=("w4a4",), methods=("gptq",), rules=("half-to-even",), noise_seeds=1, trials=2,
                                 ablation_bits=(), merge_then_quantize=(), ort=False, barrier_steps=2,
                                 barrier_pairs="first")
    run = BenchmarkRun(settings, tmp_path)
    assert run_with_runner(run, RayRunner()) == {"submitted": 5, "finished": 5, "failed": 0}
    assert BenchmarkRun(settings, tmp_path).pending() == []
    assert len(list((tmp_path / "models").glob("*.pt"))) == 2  # one checkpoint per quantize cell

    merge = next(c for c in run.plan if c.kind == "merge")
    before = [(r["target"], r["accuracy"]) for r in run.store.get(run.key(merge))["rows"]]
    run.store.forget(merge, run.key(merge))  # as if killed before its record was written
    assert BenchmarkRun(settings, tmp_path).pending() == [merge]  # what a restarted run sees
    assert run_with_runner(run, RayRunner()) == {"submitted": 1, "finished": 1, "failed": 0}
    assert [(r["target"], r["accuracy"]) for r in run.store.get(run.key(merge))["rows"]] == before


def test_the_cluster_estimate_gives_each_task_to_the_first_free_worker():
    from benchmarks.distributed.estimate import list_schedule, wave_summary

    assert list_schedule([16.0, 16.0, 18.0], workers=2) == 34.0  # the third target waits for a worker
    assert list_schedule([5.0] * 64, workers=64) == 5.0
    assert list_schedule([], workers=64) == 0.0
    wave = wave_summary([240.0] + [1.0] * 100, workers=64)
    assert wave["lower_bound_s"] == 240.0 and wave["simulated_s"] == 240.0  # one long task bounds the wave


ORPHAN_DRIVER = '''
import os, signal, sys, time
from hdrq_plugin.run.distributed import ProcessRunner, Task

# a command started in the background of a non-interactive shell (CI, nohup ... &) inherits SIGINT
# ignored, and Python then installs no KeyboardInterrupt handler: restore the one a terminal's
# Ctrl-C meets, so the test checks the runner, not how the test suite was launched
signal.signal(signal.SIGINT, signal.default_int_handler)

def sleep_long(folder, name):
    path = os.path.join(folder, name + ".pid")
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    time.sleep(300)

if __name__ == "__main__":
    tasks = [Task(n, sleep_long, (sys.argv[1], n)) for n in ("a", "b")]
    for _ in ProcessRunner(2).as_completed(tasks):
        pass
'''


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has finished; only its exit status is left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_killing_the_driver_kills_its_worker_processes(tmp_path, sig):
    import subprocess

    script = tmp_path / "driver.py"
    script.write_text(ORPHAN_DRIVER)
    driver = subprocess.Popen([sys.executable, str(script), str(tmp_path)],
                              env={**os.environ, "HDRQ_PROGRESS": "off", "OMP_NUM_THREADS": "1"})
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(pids) < 2 and time.monotonic() < deadline and driver.poll() is None:
            pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
            time.sleep(0.2)
        assert len(pids) == 2, "the workers never started their tasks"
        driver.send_signal(sig)
        driver.wait(timeout=60)
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in pids), "a worker outlived its driver"
    finally:
        if driver.poll() is None:
            driver.kill()
        for pid in pids:  # the workers this test started, if the check above failed
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def write_pid_and_sleep(folder: str, name: str) -> None:
    path = Path(folder) / f"{name}.pid"
    path.with_suffix(".tmp").write_text(str(os.getpid()))
    os.replace(path.with_suffix(".tmp"), path)
    time.sleep(300)


def test_closing_the_outcomes_before_asking_for_one_stops_the_workers(tmp_path):
    """The demo's driver may fail in its own work before it asks for any result: closing the
    iterator must still stop the tasks (else the interpreter's exit waits for all of them)."""
    outcomes = ProcessRunner(2).as_completed([Task(n, write_pid_and_sleep, (str(tmp_path), n)) for n in "ab"])
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(pids) < 2 and time.monotonic() < deadline:
            pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
            time.sleep(0.2)
        assert len(pids) == 2, "the workers never started their tasks"
        outcomes.close()
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in pids), "a worker kept running after close()"
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
