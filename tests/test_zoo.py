"""The model zoo: cached by recipe, reused, rebuilt when corrupt, deterministic."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hdrq_examples.models import ResNetConfig
from hdrq_examples.rendered_digits import RenderStyle
from hdrq_examples.zoo import (
    BenchmarkRecipe,
    cache_path_for,
    domains_cache_path,
    load_domains,
    load_or_build_benchmark,
    load_or_make_domains,
)

TINY = BenchmarkRecipe.tiny()


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("zoo")
    return load_or_build_benchmark(TINY, cache_dir=cache_dir), cache_dir


def test_a_build_has_one_adapted_model_per_target_and_all_domains(built):
    benchmark, _ = built
    assert not benchmark.from_cache
    assert set(benchmark.adapted) == set(TINY.target_domains)
    assert set(benchmark.domains) == set(TINY.source_domains + TINY.target_domains)
    assert benchmark.cache_path.is_file()


def test_adapted_models_move_away_from_the_source_and_leave_it_untouched(built):
    benchmark, cache_dir = built
    reloaded = load_or_build_benchmark(TINY, cache_dir=cache_dir)
    assert _same_weights(benchmark.source_model, reloaded.source_model)
    for model in benchmark.adapted.values():
        assert not _same_weights(model, benchmark.source_model)


def test_a_second_load_reuses_the_cache(built):
    benchmark, cache_dir = built
    again = load_or_build_benchmark(TINY, cache_dir=cache_dir)
    assert again.from_cache
    for target in TINY.target_domains:
        assert _same_weights(again.adapted[target], benchmark.adapted[target])


def test_a_corrupt_cache_file_is_rebuilt_with_a_warning(built, tmp_path, tiny_zoo_cache):
    benchmark, _ = built
    tiny_zoo_cache(tmp_path)  # the domains come from their cache; the zoo file is the one corrupted
    path = cache_path_for(TINY, tmp_path)
    assert path.is_file()
    path.write_bytes(b"this is not a torch file")
    with pytest.warns(UserWarning, match="unusable"):
        rebuilt = load_or_build_benchmark(TINY, cache_dir=tmp_path)
    assert not rebuilt.from_cache
    assert _same_weights(rebuilt.source_model, benchmark.source_model)
    assert load_or_build_benchmark(TINY, cache_dir=tmp_path).from_cache  # and the file was repaired


def test_two_builds_of_one_recipe_give_identical_weights(built, tmp_path):
    benchmark, _ = built
    second = load_or_build_benchmark(TINY, cache_dir=tmp_path, rebuild=True)
    assert not second.from_cache
    assert _same_weights(second.source_model, benchmark.source_model)
    for target in TINY.target_domains:
        assert _same_weights(second.adapted[target], benchmark.adapted[target])


def test_the_cache_key_changes_with_any_part_of_the_recipe():
    variants = [
        dataclasses.replace(TINY, seed=1),
        dataclasses.replace(TINY, architecture=ResNetConfig(widths=(8, 16, 24))),
        dataclasses.replace(TINY, adaptation=dataclasses.replace(TINY.adaptation, lr=0.02)),
        dataclasses.replace(TINY, target_domains=("mnist", "optdigits")),
        dataclasses.replace(TINY, render_style=RenderStyle(elastic_strength=0.1)),
    ]
    keys = {TINY.cache_key()} | {variant.cache_key() for variant in variants}
    assert len(keys) == 1 + len(variants)


def test_a_domain_cannot_be_both_source_and_target():
    with pytest.raises(ValueError, match="both source and target"):
        BenchmarkRecipe(source_domains=("mnist",), target_domains=("mnist", "optdigits"))


def _same_domains(a, b) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(x, y) for name in a for part in ("train", "calib", "test", "val")
        for x, y in zip(getattr(a[name], part).tensors, getattr(b[name], part).tensors, strict=True))


def test_generated_domains_are_cached_and_read_back_identical(built):
    """The second load reads the domains' tensors back instead of rendering them again: equal
    to a fresh generation, bit for bit; another calibration size is another entry."""
    benchmark, cache_dir = built
    path, _ = domains_cache_path(TINY, 32, cache_dir)
    assert path.is_file()
    cached, from_cache = load_or_make_domains(TINY, 32, cache_dir)
    assert from_cache and _same_domains(cached, load_domains(TINY, n_calib=32))
    assert _same_domains(benchmark.domains, cached)
    assert domains_cache_path(TINY, 16, cache_dir)[0] != path


def test_a_corrupt_domain_cache_is_regenerated_with_a_warning(built, tmp_path):
    benchmark, _ = built
    path, _ = domains_cache_path(TINY, 32, tmp_path)
    path.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unusable"):
        domains, from_cache = load_or_make_domains(TINY, 32, tmp_path)
    assert not from_cache and _same_domains(domains, benchmark.domains)
    assert load_or_make_domains(TINY, 32, tmp_path)[1]  # and the file was repaired
