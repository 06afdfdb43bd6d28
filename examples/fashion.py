"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, with corrupted target domains.

Xiao et al., "Fashion-MNIST" (2017, MIT licence): 70,000 28×28 clothing images in 10 classes.
Debian installs them as IDX files under ``/usr/share/datasets/fashion-mnist`` (override with
``$HDRQ_FASHION_MNIST_DIR``); nothing here downloads them. When they are absent the fashion
domains are simply not offered (:func:`fashion_mnist_available`).

The source is clean Fashion-MNIST; the targets are corruptions in the spirit of Hendrycks &
Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions" (2019): Gaussian
noise, Gaussian blur and reduced contrast. The source takes the first 10,000 images of the
training file, each corrupted target its own 3,000-image slice of the test file, so no target
image is a corrupted copy of a source image and no two targets share an image.
"""

from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .images import gaussian_blur, gray_to_rgb

DEFAULT_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_CORRUPTIONS = ("noise", "blur", "contrast")
# Images per domain: 10,000 clean for the source, 3,000 per corrupted target.
SOURCE_IMAGES = 10_000
TARGET_IMAGES = 3_000
# Severities roughly at level 3 of Hendrycks & Dietterich's CIFAR-10-C settings.
NOISE_STD = 0.2
BLUR_SIGMA = 1.2
CONTRAST_FACTOR = 0.3


def fashion_mnist_dir() -> Path:
    return Path(os.environ.get("HDRQ_FASHION_MNIST_DIR", DEFAULT_FASHION_DIR))


def fashion_mnist_available() -> bool:
    """True when all four Fashion-MNIST IDX files are installed."""
    folder = fashion_mnist_dir()
    return all((folder / name).is_file() for pair in FASHION_FILES.values() for name in pair)


def _read_idx(path: Path) -> np.ndarray:
    """Read a gzip'd IDX file (LeCun's MNIST format: magic, big-endian sizes, uint8 data)."""
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte data
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: expected {shape}, found {data.size} values")
    return data.reshape(shape)


@lru_cache(maxsize=4)
def _read_fashion(folder: Path, part: str) -> tuple[torch.Tensor, torch.Tensor]:
    image_file, label_file = FASHION_FILES[part]
    gray = torch.from_numpy(_read_idx(folder / image_file).astype(np.float32) / 255.0)
    return gray, torch.from_numpy(_read_idx(folder / label_file).astype(np.int64))


def corrupt(images: torch.Tensor, corruption: str, generator: torch.Generator) -> torch.Tensor:
    """Apply one of :data:`FASHION_CORRUPTIONS` to ``[N, 3, H, W]`` images in [0, 1]."""
    if corruption == "noise":
        noise = torch.randn(images.shape, generator=generator) * NOISE_STD
        return (images + noise).clamp(0.0, 1.0)
    if corruption == "blur":
        return gaussian_blur(images, BLUR_SIGMA).clamp(0.0, 1.0)
    if corruption == "contrast":
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        return (mean + (images - mean) * CONTRAST_FACTOR).clamp(0.0, 1.0)
    raise ValueError(f"unknown corruption {corruption!r}; choose from {FASHION_CORRUPTIONS}")


def load_fashion(corruption: str | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean Fashion-MNIST (``corruption=None``) or one corrupted target, as ``[N, 3, 32, 32]``."""
    if corruption is not None and corruption not in FASHION_CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; choose from {FASHION_CORRUPTIONS}")
    if not fashion_mnist_available():
        raise FileNotFoundError(
            f"Fashion-MNIST is not installed in {fashion_mnist_dir()}: "
            "apt-get install dataset-fashion-mnist (or set HDRQ_FASHION_MNIST_DIR)"
        )
    if corruption is None:
        gray, labels = _read_fashion(fashion_mnist_dir(), "train")
        start, stop = 0, SOURCE_IMAGES
    else:
        gray, labels = _read_fashion(fashion_mnist_dir(), "test")
        start = FASHION_CORRUPTIONS.index(corruption) * TARGET_IMAGES
        stop = start + TARGET_IMAGES
    images = gray_to_rgb(gray[start:stop], 28)
    if corruption is not None:
        images = corrupt(images, corruption, torch.Generator().manual_seed(seed))
    return images, labels[start:stop].clone()
