"""The segmentation zoo's training loss: class-weighted cross-entropy plus a soft Dice term.

Background covers about 80 % of a digit scene's pixels, so plain per-pixel cross-entropy is
minimised early by painting digit *shapes* and learns digit *classes* slowly: the zoo's first
models (plain CE) reached 0.09–0.14 mIoU. Two standard remedies, both measured on the source
scenes (BENCHMARKS.md, segmentation section):

- a smaller weight on the background class in the cross-entropy (class-weighted CE, as
  ENet's and SegNet's class balancing; Paszke et al. 2016 §5, Badrinarayanan et al. 2017 §4);
- a soft Dice term averaged over classes (Milletari et al., "V-Net", 2016, §3; Sudre et al.
  2017), which scores every class by its overlap whatever its pixel count — the loss-side
  mirror of mIoU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SegmentationLoss:
    """``CE(weight: background_weight on ``background``, 1 elsewhere) + dice_weight · (1 − mean soft Dice)``."""

    num_classes: int
    background: int
    background_weight: float = 0.2
    dice_weight: float = 1.0
    smooth: float = 1.0  # Dice's additive smoothing: a class absent from a batch and its predictions scores 1

    def __post_init__(self) -> None:
        if not 0 <= self.background < self.num_classes:
            raise ValueError(f"background class {self.background} is not in 0..{self.num_classes - 1}")
        if self.background_weight <= 0 or self.dice_weight < 0 or self.smooth <= 0:
            raise ValueError(f"background_weight and smooth must be positive, dice_weight non-negative: {self}")

    def __call__(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        weight = torch.ones(self.num_classes, dtype=logits.dtype, device=logits.device)
        weight[self.background] = self.background_weight
        loss = F.cross_entropy(logits, masks, weight=weight)
        if self.dice_weight:
            loss = loss + self.dice_weight * (1.0 - soft_dice(logits, masks, self.num_classes, self.smooth).mean())
        return loss


def soft_dice(logits: torch.Tensor, masks: torch.Tensor, num_classes: int, smooth: float = 1.0) -> torch.Tensor:
    """Per-class soft Dice ``(2·Σ p·y + s) / (Σ p + Σ y + s)`` over a batch ``[N, C, H, W]`` / ``[N, H, W]``."""
    probabilities = logits.softmax(dim=1)
    one_hot = F.one_hot(masks, num_classes).permute(0, 3, 1, 2).to(probabilities.dtype)
    overlap = (probabilities * one_hot).sum(dim=(0, 2, 3))
    total = probabilities.sum(dim=(0, 2, 3)) + one_hot.sum(dim=(0, 2, 3))
    return (2.0 * overlap + smooth) / (total + smooth)


__all__ = ["SegmentationLoss", "soft_dice"]
