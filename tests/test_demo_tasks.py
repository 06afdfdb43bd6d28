"""The demo's per-target quantizations: the same models on 1 or 2 workers, reused from the cache by key."""

import dataclasses
import shutil

import pytest
import torch

from hdrq_examples.demo import float_recipe
from hdrq_examples.demo_tasks import QUANTIZED_CACHE, QuantizeJob, job_key, run_jobs
from hdrq_examples.zoo import BenchmarkRecipe, load_or_build_benchmark

JOBS = [QuantizeJob("rtn", "mnist", "w4a4", 0, iterations=4), QuantizeJob("hdrq", "optdigits", "w4a4", 0, iterations=4),
        QuantizeJob("nipq", "mnistm", "w4a4", 0, nipq_epochs=1)]


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tiny_zoo_cache):
    return load_or_build_benchmark(BenchmarkRecipe.tiny(), cache_dir=tiny_zoo_cache(tmp_path_factory.mktemp("zoo")))


@pytest.fixture(scope="module")
def serial(bench, tmp_path_factory):
    """Every job quantized in this process: ``(models, timings, cache folder)``."""
    timings, folder = {}, tmp_path_factory.mktemp("serial")
    return run_jobs(JOBS, bench, float_recipe(bench), folder, 1, timings), timings, folder


def assert_same_models(a, b) -> None:
    for job in JOBS:
        (model_a, family_a, info_a), (model_b, family_b, info_b) = a[job], b[job]
        assert family_a == family_b and info_a["accuracy"] == info_b["accuracy"], job
        sa, sb = model_a.state_dict(), model_b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), job


def test_two_workers_give_the_same_models_and_a_rerun_reuses_them(bench, serial, tmp_path):
    reference, serial_timings, _ = serial
    assert serial_timings["quantize_cached_models"] == 0
    timings = {}
    parallel = run_jobs(JOBS, bench, float_recipe(bench), tmp_path, 2, timings)
    assert timings["quantize_cached_models"] == 0 and timings["quantize_nipq_task_s"] > 0
    assert_same_models(reference, parallel)
    assert {job.method for job in JOBS} == {info["job"]["method"] for _, _, info in parallel.values()}

    again = {}
    rerun = run_jobs(JOBS, bench, float_recipe(bench), tmp_path, 2, again)
    assert again["quantize_cached_models"] == len(JOBS) and "quantize_hdrq_task_s" not in again
    assert_same_models(reference, rerun)


def test_a_changed_setting_or_a_corrupt_file_is_quantized_again(bench, serial, tmp_path):
    other = dataclasses.replace(JOBS[0], iterations=5)
    zoo = bench.recipe.cache_key()
    assert job_key(other, zoo) != job_key(JOBS[0], zoo)
    assert job_key(JOBS[0], zoo) != job_key(JOBS[0], dataclasses.replace(BenchmarkRecipe.tiny(), seed=1).cache_key())
    # the serial fixture's checkpoint of JOBS[0] (run_jobs wrote it), copied, then truncated
    (tmp_path / QUANTIZED_CACHE).mkdir()
    name = f"{job_key(JOBS[0], zoo)[:24]}.pt"
    path = tmp_path / QUANTIZED_CACHE / name
    shutil.copyfile(serial[2] / QUANTIZED_CACHE / name, path)
    path.write_bytes(path.read_bytes()[:100])  # truncated: unreadable, so made again
    timings = {}
    models = run_jobs([JOBS[0], other], bench, float_recipe(bench), tmp_path, 1, timings)
    assert timings["quantize_cached_models"] == 0 and len(list((tmp_path / QUANTIZED_CACHE).glob("*.pt"))) == 2
    assert models[JOBS[0]][2]["accuracy"] == serial[0][JOBS[0]][2]["accuracy"]
