"""Mean intersection-over-union, the segmentation metric of the HDRQ paper's §4 tables.

IoU of class c = TP / (TP + FP + FN) over all pixels of a test set (one confusion matrix for the
whole set, as Cityscapes/GTA benchmarks compute it, not a mean of per-image IoUs); mIoU is the
mean over classes that occur in the ground truth or the predictions. Merges are summarised by
the harmonic mean over targets, as for classification (:func:`hdrq_plugin.evaluation.harmonic_mean`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hdrq_plugin.data import plain_tensor


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[num_classes, num_classes]`` counts, rows = ground truth, columns = prediction."""
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} differ in shape")
    labels, predictions = labels.reshape(-1).long(), predictions.reshape(-1).long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    return torch.bincount(labels * num_classes + predictions, minlength=num_classes**2).view(num_classes, num_classes)


def iou_per_class(confusion: torch.Tensor) -> torch.Tensor:
    """IoU of every class; NaN for a class absent from both the labels and the predictions."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


def mean_iou_from_confusion(confusion: torch.Tensor) -> float:
    iou = iou_per_class(confusion)
    present = ~torch.isnan(iou)
    if not present.any():
        raise ValueError("no pixel was counted: the data is empty")
    return float(iou[present].mean())


@torch.no_grad()
def mean_iou(model: nn.Module, data: Dataset | Iterable, num_classes: int, batch_size: int = 64) -> float:
    """mIoU in [0, 1] of ``model``'s per-pixel argmax on ``(images, masks)`` data."""
    batches = DataLoader(data, batch_size=batch_size) if isinstance(data, Dataset) else data
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for images, masks in batches:
        confusion += confusion_matrix(plain_tensor(model(images)).argmax(1), masks, num_classes)
    return mean_iou_from_confusion(confusion)
