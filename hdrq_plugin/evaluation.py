"""Classification accuracy of any model on any labelled data, and the harmonic mean over targets.

The HDRQ paper (§4) reports each target's accuracy and their harmonic mean, which punishes a
merged model that serves one target well and another badly.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .data import labelled_batch, plain_tensor
from .progress import progress_bar


def _batches(data: Dataset | Iterable, batch_size: int) -> Iterable:
    if isinstance(data, Dataset):  # per-sample (x, y) items: batch them
        return DataLoader(data, batch_size=batch_size, shuffle=False)
    return data  # already an iterable of (x, y) batches, e.g. a DataLoader


def accuracy(model: nn.Module, data: Dataset | Iterable, batch_size: int = 256) -> float:
    """Fraction in [0, 1] of samples whose arg-max prediction equals the label.

    ``data`` is either a ``torch.utils.data.Dataset`` of ``(image, label)`` samples (batched here
    with ``batch_size``) or any iterable of ``(images, labels)`` batches such as a DataLoader.
    The model runs in eval mode without gradients; its previous mode is restored.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        with torch.no_grad():
            for batch in progress_bar(_batches(data, batch_size), desc="accuracy", unit="batch", leave=False):
                inputs, labels = labelled_batch(batch, "accuracy data")
                logits = plain_tensor(model(inputs))
                if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
                    raise ValueError(f"logits of shape {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
                correct += int((logits.argmax(dim=1) == labels).sum())
                total += int(labels.shape[0])
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("accuracy of an empty data set is undefined")
    return correct / total


def harmonic_mean(values: Iterable[float]) -> float:
    """Harmonic mean ``n / Σ 1/v`` of non-negative values (0 if any value is 0)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("harmonic mean of no values is undefined")
    bad = [v for v in values if math.isnan(v) or v < 0]
    if bad:
        raise ValueError(f"harmonic mean needs non-negative numbers, got {bad}")
    return statistics.harmonic_mean(values)
