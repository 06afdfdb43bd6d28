"""The benchmark's domains and their fixed, disjoint splits.

Every domain is a set of ``[3, 32, 32]`` float images in [0, 1] with labels 0–9, cut into:

- ``train`` — labelled adaptation data (or source training data),
- ``val``   — labelled, held out, for choosing recipes (never choose on ``test``),
- ``calib`` — the first ``n_calib`` images of a fixed calibration pool, meant to be used without
  labels by post-training quantization (the HDRQ reference uses 32 images),
- ``test``  — for reporting only.

The cut is made once per (domain, seed) from a class-balanced shuffle: test first, then val,
then the calibration pool (up to 256 images), then train. ``n_calib`` only chooses how much of
the pool is returned, so changing it never moves an image between train, val and test.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import TensorDataset

from .fashion import FASHION_CORRUPTIONS, fashion_mnist_available, load_fashion
from .handwritten import load_mnist, load_mnistm, load_optdigits
from .rendered_digits import RenderStyle, render_digits

DOMAIN_NAMES = ("rendered", "mnist", "optdigits", "mnistm")
FASHION_DOMAIN_NAMES = ("fashion",) + tuple(f"fashion-{c}" for c in FASHION_CORRUPTIONS)
RENDERED_DEFAULT_IMAGES = 10_000
CALIB_POOL_MAX = 256  # the largest calibration set we offer; the reference uses 32
TEST_FRACTION, TEST_MAX = 0.3, 1000
VAL_FRACTION, VAL_MAX = 0.1, 500


@dataclass(frozen=True)
class DomainSplits:
    """Disjoint splits of one domain, each a ``TensorDataset(images, labels)``."""

    name: str
    train: TensorDataset
    calib: TensorDataset
    test: TensorDataset
    val: TensorDataset


def available_domains() -> tuple[str, ...]:
    """Digit domains always; the Fashion-MNIST ones when Debian's package is installed."""
    return DOMAIN_NAMES + (FASHION_DOMAIN_NAMES if fashion_mnist_available() else ())


def _domain_seed(name: str, seed: int) -> int:
    # crc32, not hash(): Python salts str hashes per process, and splits must not move.
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _raw_images(
    name: str, seed: int, n_images: int | None, render_style: RenderStyle | None
) -> tuple[torch.Tensor, torch.Tensor]:
    loaders: dict[str, Callable[[], tuple[torch.Tensor, torch.Tensor]]] = {
        "rendered": lambda: render_digits(n_images or RENDERED_DEFAULT_IMAGES, seed=seed, style=render_style),
        "mnist": load_mnist,
        "optdigits": load_optdigits,
        "mnistm": lambda: load_mnistm(seed=seed),
        "fashion": lambda: load_fashion(None, seed=seed),
    }
    for corruption in FASHION_CORRUPTIONS:
        loaders[f"fashion-{corruption}"] = lambda c=corruption: load_fashion(c, seed=seed)
    if name not in loaders:
        raise ValueError(f"unknown domain {name!r}; choose from {DOMAIN_NAMES + FASHION_DOMAIN_NAMES}")
    return loaders[name]()


def class_balanced_order(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random order of ``labels``' indices in which every prefix keeps the class proportions.

    Each sample gets the position ``rank within its (shuffled) class / class size`` plus a jitter
    below ``1 / N``; sorting by it interleaves the classes, so the test, val and calibration
    prefixes all keep the class mix (a stratified split, without scikit-learn).
    """
    shuffled = torch.randperm(len(labels), generator=generator)
    position = torch.empty(len(labels))
    for value in labels.unique():
        members = shuffled[labels[shuffled] == value]
        position[members] = torch.arange(len(members), dtype=torch.float32) / len(members)
    position += torch.rand(len(labels), generator=generator) / len(labels)
    return torch.argsort(position, stable=True)


def split_sizes(n: int) -> dict[str, int]:
    """Sizes of test, val, the calibration pool and train for a domain of ``n`` images."""
    test = min(round(TEST_FRACTION * n), TEST_MAX)
    val = min(round(VAL_FRACTION * n), VAL_MAX)
    calib_pool = min(CALIB_POOL_MAX, n // 6)
    train = n - test - val - calib_pool
    if min(test, val, calib_pool, train) < 1:
        raise ValueError(f"a domain of {n} images is too small to split into train/val/calib/test")
    return {"test": test, "val": val, "calib_pool": calib_pool, "train": train}


def split_indices(labels: torch.Tensor, generator: torch.Generator, n_images: int | None = None) -> dict[str, torch.Tensor]:
    """Disjoint index sets ``test``, ``val``, ``calib_pool`` and ``train`` over ``labels``.

    A class-balanced shuffle is cut in that order; with ``n_images`` only its first ``n_images``
    are used (a class-balanced subset).
    """
    order = class_balanced_order(labels, generator)
    if n_images is not None:
        if n_images > len(order):
            raise ValueError(f"{len(order)} images available, n_images={n_images} asked for more")
        order = order[:n_images]
    parts = {}
    start = 0
    for part, size in split_sizes(len(order)).items():
        parts[part] = order[start : start + size]
        start += size
    return parts


def load_domain(
    name: str,
    *,
    seed: int = 0,
    n_calib: int = 32,
    n_images: int | None = None,
    render_style: RenderStyle | None = None,
) -> DomainSplits:
    """Load domain ``name`` (see :func:`available_domains`) with deterministic disjoint splits.

    ``n_images`` renders that many images for ``rendered`` and keeps a class-balanced subset of
    that size for the fixed-size domains (small recipes for tests); ``None`` uses all of them.
    ``render_style`` varies the ``rendered`` domain (default :class:`RenderStyle`).
    """
    if n_images is not None and n_images <= 0:
        raise ValueError(f"n_images must be positive, got {n_images}")
    images, labels = _raw_images(name, seed, n_images, render_style)
    generator = torch.Generator().manual_seed(_domain_seed(name, seed))
    try:
        parts = split_indices(labels, generator, n_images)
    except ValueError as err:
        raise ValueError(f"domain {name!r}: {err}") from err
    pool = parts.pop("calib_pool")
    if not 1 <= n_calib <= len(pool):
        raise ValueError(f"n_calib must be in 1..{len(pool)} for domain {name!r}, got {n_calib}")
    parts["calib"] = pool[:n_calib]

    def subset(indices: torch.Tensor) -> TensorDataset:
        return TensorDataset(images[indices].contiguous(), labels[indices].contiguous())

    return DomainSplits(name=name, **{part: subset(indices) for part, indices in parts.items()})
