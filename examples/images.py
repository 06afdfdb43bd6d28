"""Batched image helpers shared by the domains and the training augmentation (torch only).

Every domain ends as float32 tensors of shape ``[N, 3, 32, 32]`` in ``[0, 1]``. Geometry is
done with ``torch.nn.functional.affine_grid`` / ``grid_sample`` on whole batches, randomness
comes from an explicit ``torch.Generator`` so that every image is reproducible from a seed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IMAGE_SIZE = 32


def uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` draws from U[low, high)."""
    return low + (high - low) * torch.rand(n, generator=generator)


def gray_to_rgb(gray: torch.Tensor, box: int, mode: str = "bilinear") -> torch.Tensor:
    """Resize ``[N, H, W]`` gray images in [0, 1] to ``box``², centre them on a 32² canvas, copy to 3 channels."""
    if gray.dim() != 3:
        raise ValueError(f"gray images must have shape [N, H, W], got {tuple(gray.shape)}")
    if not 0 < box <= IMAGE_SIZE:
        raise ValueError(f"box must be in 1..{IMAGE_SIZE}, got {box}")
    x = gray.float().unsqueeze(1)
    if x.shape[-2:] != (box, box):
        antialias = mode in ("bilinear", "bicubic") and x.shape[-1] > box
        kwargs = {"align_corners": False, "antialias": antialias} if mode != "nearest" else {}
        x = F.interpolate(x, size=(box, box), mode=mode, **kwargs)
    before = (IMAGE_SIZE - box) // 2
    after = IMAGE_SIZE - box - before
    x = F.pad(x, (before, after, before, after))
    return x.clamp(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()


def affine_matrices(
    n: int,
    generator: torch.Generator,
    *,
    max_rotation_deg: float = 0.0,
    max_shear_deg: float = 0.0,
    scale_range: tuple[float, float] = (1.0, 1.0),
    max_shift: float = 0.0,
) -> torch.Tensor:
    """Random ``[n, 2, 3]`` matrices for ``affine_grid`` (output → input coordinates in [-1, 1]).

    ``scale > 1`` zooms in (the content grows); ``max_shift`` is a fraction of the half-width.
    """
    angle = torch.deg2rad(uniform(n, -max_rotation_deg, max_rotation_deg, generator))
    shear = torch.tan(torch.deg2rad(uniform(n, -max_shear_deg, max_shear_deg, generator)))
    inv_scale = 1.0 / uniform(n, scale_range[0], scale_range[1], generator)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # rotation · shear (x += shear·y), scaled by 1/scale because the grid maps output → input
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cos * inv_scale
    theta[:, 0, 1] = (cos * shear - sin) * inv_scale
    theta[:, 1, 0] = sin * inv_scale
    theta[:, 1, 1] = (sin * shear + cos) * inv_scale
    theta[:, 0, 2] = uniform(n, -max_shift, max_shift, generator)
    theta[:, 1, 2] = uniform(n, -max_shift, max_shift, generator)
    return theta


def smooth_displacement(n: int, size: int, strength: float, generator: torch.Generator) -> torch.Tensor:
    """A random smooth ``[n, size, size, 2]`` displacement field (elastic distortion).

    Simard et al., "Best practices for CNNs applied to visual document analysis" (2003), blur a
    random field; here a coarse 4×4 field is upsampled bicubically, which is the same idea.
    """
    coarse = torch.randn(n, 2, 4, 4, generator=generator) * strength
    field = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)
    return field.permute(0, 2, 3, 1)


def warp(images: torch.Tensor, theta: torch.Tensor, displacement: torch.Tensor | None = None) -> torch.Tensor:
    """Resample ``[N, C, H, W]`` images through affine matrices (and an optional displacement)."""
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    if displacement is not None:
        grid = grid + displacement
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Depthwise Gaussian blur of ``[N, C, H, W]`` images with reflect padding."""
    if sigma <= 0:
        return images
    radius = max(1, math.ceil(2.5 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel_1d = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel_1d = kernel_1d / kernel_1d.sum()
    channels = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    horizontal = kernel_1d.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    vertical = kernel_1d.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    out = F.conv2d(padded, horizontal, groups=channels)
    return F.conv2d(out, vertical, groups=channels)


def luminance(rgb: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma of ``[..., 3]`` colours."""
    return rgb @ torch.tensor([0.299, 0.587, 0.114])


def random_contrasting_colours(n: int, generator: torch.Generator, min_contrast: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` (foreground, background) RGB pairs whose luminances differ by at least ``min_contrast``."""
    foreground = torch.rand(n, 3, generator=generator)
    background = torch.rand(n, 3, generator=generator)
    for _ in range(100):  # rejection sampling; each round keeps about half of the failures
        weak = (luminance(foreground) - luminance(background)).abs() < min_contrast
        if not weak.any():
            break
        count = int(weak.sum())
        foreground[weak] = torch.rand(count, 3, generator=generator)
        background[weak] = torch.rand(count, 3, generator=generator)
    else:  # pragma: no cover - probability ~2^-100
        raise RuntimeError("could not draw contrasting colours")
    return foreground, background
