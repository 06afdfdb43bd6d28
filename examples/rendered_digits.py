"""Synthetic digits rendered with Pillow, in any quantity — the benchmark's synthetic source.

Like the synthetic GTA5 source of the HDRQ paper's segmentation experiment (and SynthDigits in
the digit-adaptation literature), the point is an unlimited, label-perfect source that differs
from the handwritten targets. Pillow renders each glyph once (its embedded font,
``ImageFont.load_default(size=...)``, at several sizes and stroke widths); the per-image
variation — rotation, shear, zoom, shift, elastic distortion, neighbouring digits as clutter,
colours, textured background, blur and noise — is applied to whole batches in torch from a
seeded generator, so rendering 10,000 images takes seconds and is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from ._optional import require
from .images import (
    IMAGE_SIZE,
    affine_matrices,
    gaussian_blur,
    luminance,
    random_contrasting_colours,
    smooth_displacement,
    uniform,
    warp,
)

CANVAS = 2 * IMAGE_SIZE  # glyphs are rendered and warped at 2× and averaged down: smooth edges


@dataclass(frozen=True)
class RenderStyle:
    """How varied the rendered digits are (ranges are uniform unless noted)."""

    font_sizes: tuple[int, ...] = (48, 56, 64)  # on the 64² canvas: digits 17–23 px tall on 32², like MNIST's 20
    stroke_widths: tuple[int, ...] = (0, 1, 2, 3)  # 0 = the font's own weight, larger = bolder
    max_rotation_deg: float = 15.0
    max_shear_deg: float = 15.0  # italic-like slant
    scale_range: tuple[float, float] = (0.85, 1.15)
    max_shift: float = 0.12  # fraction of the half-width
    elastic_strength: float = 0.08  # coarse-field std in grid units; turns print into "handwriting"
    # Chance of a partly visible digit on each side (SVHN-like clutter). Off by default: with it the
    # source transferred worse to the handwritten targets within the demo's training budget.
    neighbour_probability: float = 0.0
    min_contrast: float = 0.3  # luminance gap between digit and background
    plain_probability: float = 0.0  # share of gray-on-gray images, like MNIST/optdigits (measured: no better merges)
    background_texture: float = 0.15  # strength of the multi-scale colour texture behind the digit
    foreground_texture: float = 0.1  # and on the digit itself (MNIST-M digits are textured)
    blur_probability: float = 0.3
    max_noise_std: float = 0.05


@lru_cache(maxsize=8)
def _glyph_bank(font_sizes: tuple[int, ...], stroke_widths: tuple[int, ...]) -> torch.Tensor:
    """Masks ``[10, len(font_sizes)·len(stroke_widths), 1, 64, 64]`` of each digit, centred, in [0, 1]."""
    image_module = require("PIL.Image", "pillow", "rendered digits")
    draw_module = require("PIL.ImageDraw", "pillow", "rendered digits")
    font_module = require("PIL.ImageFont", "pillow", "rendered digits")
    masks = []
    for digit in range(10):
        variants = []
        for size in font_sizes:
            font = font_module.load_default(size=size)
            if not isinstance(font, font_module.FreeTypeFont):
                raise ImportError("rendered digits need Pillow built with FreeType: pip install --force-reinstall pillow")
            for stroke in stroke_widths:
                image = image_module.new("L", (CANVAS, CANVAS), 0)
                draw_module.Draw(image).text(
                    (CANVAS / 2, CANVAS / 2), str(digit), fill=255, font=font, anchor="mm",
                    stroke_width=stroke, stroke_fill=255,
                )
                variants.append(torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8))
        masks.append(torch.stack(variants))
    bank = torch.stack(masks).float().div_(255.0)
    return bank.view(10, -1, 1, CANVAS, CANVAS)


def _random_glyphs(labels: torch.Tensor, bank: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    variant = torch.randint(bank.shape[1], (len(labels),), generator=generator)
    return bank[labels, variant]


def _neighbour_clutter(n: int, bank: torch.Tensor, style: RenderStyle, generator: torch.Generator) -> torch.Tensor:
    """Random digits placed just left and right of the centre, each present with some probability."""
    clutter = torch.zeros(n, 1, CANVAS, CANVAS)
    for side in (-1.0, 1.0):
        present = torch.rand(n, generator=generator) < style.neighbour_probability
        glyphs = _random_glyphs(torch.randint(10, (n,), generator=generator), bank, generator)
        theta = torch.eye(2, 3).repeat(n, 1, 1)
        theta[:, 0, 2] = -side * uniform(n, 1.05, 1.35, generator)  # grid maps output → input
        theta[:, 1, 2] = uniform(n, -0.1, 0.1, generator)
        clutter = torch.maximum(clutter, warp(glyphs, theta) * present.view(n, 1, 1, 1))
    return clutter


def random_texture(n: int, amplitude: float, generator: torch.Generator) -> torch.Tensor:
    """Colour texture ``[n, 3, 32, 32]``: random fields at 4², 8² and 16², upsampled and summed.

    Each scale gets its own random strength, so some images are smooth gradients and others
    are busy, photo-like clutter (without using any photo: the MNIST-M target owns those).
    """
    texture = torch.zeros(n, 3, IMAGE_SIZE, IMAGE_SIZE)
    for size in (4, 8, 16):
        strength = amplitude * torch.rand(n, 1, 1, 1, generator=generator)
        field = torch.randn(n, 3, size, size, generator=generator) * strength
        texture += F.interpolate(field, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic", align_corners=True)
    return texture


def render_digits(n: int, seed: int = 0, style: RenderStyle | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Render ``n`` digit images ``[n, 3, 32, 32]`` in [0, 1] with balanced labels ``[n]`` (int64)."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    style = style or RenderStyle()
    generator = torch.Generator().manual_seed(seed)
    bank = _glyph_bank(tuple(style.font_sizes), tuple(style.stroke_widths))
    labels = torch.arange(n) % 10
    labels = labels[torch.randperm(n, generator=generator)]

    mask = torch.maximum(_random_glyphs(labels, bank, generator), _neighbour_clutter(n, bank, style, generator))
    theta = affine_matrices(
        n, generator, max_rotation_deg=style.max_rotation_deg, max_shear_deg=style.max_shear_deg,
        scale_range=style.scale_range, max_shift=style.max_shift,
    )
    mask = warp(mask, theta, smooth_displacement(n, CANVAS, style.elastic_strength, generator))
    mask = F.avg_pool2d(mask, 2).clamp(0.0, 1.0)

    foreground, background = random_contrasting_colours(n, generator, style.min_contrast)
    # Some images are plain gray digits on a gray background, as in MNIST and optdigits.
    plain = (torch.rand(n, generator=generator) < style.plain_probability).view(n, 1)
    foreground = torch.where(plain, luminance(foreground).view(n, 1).expand(n, 3), foreground)
    background = torch.where(plain, luminance(background).view(n, 1).expand(n, 3), background)
    background_image = background.view(n, 3, 1, 1) + random_texture(n, style.background_texture, generator)
    foreground_image = foreground.view(n, 3, 1, 1) + random_texture(n, style.foreground_texture, generator)
    images = background_image * (1.0 - mask) + foreground_image * mask

    blurred = torch.rand(n, generator=generator) < style.blur_probability
    if blurred.any():
        images[blurred] = gaussian_blur(images[blurred], sigma=0.8)
    noise_std = uniform(n, 0.0, style.max_noise_std, generator).view(n, 1, 1, 1)
    images = images + noise_std * torch.randn(images.shape, generator=generator)
    return images.clamp_(0.0, 1.0), labels
