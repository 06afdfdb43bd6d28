"""Batched training augmentation: random recolouring, zoom, shift and small rotations.

Issue 2's prototype measured that without recolouring, zoom and shifts a digit model trained
on one domain is at chance on the others; with them the source model transfers well enough
for adaptation and merging to start from a shared, useful θ0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .images import affine_matrices, uniform, warp


@dataclass(frozen=True)
class AugmentConfig:
    """Random transformations applied independently to every training image."""

    recolour: bool = True  # channel shuffle, inversion, grayscale, per-channel gain/offset
    invert_probability: float = 0.5  # targets are both dark-on-light and light-on-dark
    grayscale_probability: float = 0.2
    gain_range: tuple[float, float] = (0.6, 1.4)
    max_offset: float = 0.2
    scale_range: tuple[float, float] = (0.85, 1.15)  # zoom
    max_shift: float = 0.15  # fraction of the half-width: ±2.4 px on 32²
    max_rotation_deg: float = 10.0


def recolour(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Random channel permutation, inversion, grayscale and per-channel gain/offset of ``[N, 3, H, W]``."""
    n = images.shape[0]
    permutation = torch.argsort(torch.rand(n, 3, generator=generator), dim=1)
    out = torch.gather(images, 1, permutation.view(n, 3, 1, 1).expand_as(images))
    inverted = (torch.rand(n, generator=generator) < config.invert_probability).view(n, 1, 1, 1)
    out = torch.where(inverted, 1.0 - out, out)
    gray = (torch.rand(n, generator=generator) < config.grayscale_probability).view(n, 1, 1, 1)
    out = torch.where(gray, out.mean(dim=1, keepdim=True).expand_as(out), out)
    gain = uniform(3 * n, *config.gain_range, generator).view(n, 3, 1, 1)
    offset = uniform(3 * n, -config.max_offset, config.max_offset, generator).view(n, 3, 1, 1)
    return (out * gain + offset).clamp_(0.0, 1.0)


def augment_batch(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Geometric then colour augmentation of a batch; the border is filled with each image's corner colour."""
    n = images.shape[0]
    theta = affine_matrices(
        n, generator, max_rotation_deg=config.max_rotation_deg, scale_range=config.scale_range,
        max_shift=config.max_shift,
    )
    # Warp the difference to the corner colour so that zooming out or shifting does not paint
    # black borders onto light backgrounds (which would be a tell-tale for the domain).
    corner = images[:, :, :1, :1]
    out = warp(images - corner, theta) + corner
    return recolour(out, config, generator) if config.recolour else out
