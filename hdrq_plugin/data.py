"""The user's data, accepted as it is: any iterable of tensors or ``(input, label, ...)`` tuples.

Labels are never used by calibration; they are dropped here, once, for every caller.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator

import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # optional-kernel warnings at Brevitas import
    from brevitas.quant_tensor import QuantTensor


def split_batch(batch, what: str = "calibration data") -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x``, ``(x, y, ...)`` or ``{"input": x, "label": y}`` → ``(x, y or None)``: every form a
    DataLoader yields, read in one place for calibration, training, evaluation and validation."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], labels
    if isinstance(batch, dict) and isinstance(batch.get("input"), torch.Tensor):
        labels = batch.get("label")
        return batch["input"], labels if isinstance(labels, torch.Tensor) else None
    raise TypeError(f"{what} must yield tensors or (input, label) pairs, got {type(batch).__name__}")


def labelled_batch(batch, what: str = "data") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`split_batch` for data that must carry labels (evaluation, barriers)."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"{what}: expected (inputs, labels) batches, got {type(batch).__name__}")
    inputs, labels = split_batch(batch, what)
    if labels is None:
        raise TypeError(f"{what}: expected (inputs, labels) batches, got no label tensor")
    return inputs, labels


def plain_tensor(x):
    """A Brevitas ``QuantTensor`` → its dequantized value; anything else unchanged."""
    return x.value if isinstance(x, QuantTensor) else x


def iterate_inputs(data: Iterable, *, max_batches: int | None = None,
                   check_finite: bool = True) -> Iterator[torch.Tensor]:
    """Yield the input tensors of ``data``, batched (a single sample gains a batch axis).

    Raises ``ValueError`` on NaN/inf values (with the batch index) when ``check_finite``.
    A ``torch.utils.data.Dataset`` of single samples is accepted too.
    """
    if isinstance(data, torch.Tensor):
        data = [data]
    for index, batch in enumerate(data):
        if max_batches is not None and index >= max_batches:
            return
        x, _ = split_batch(batch)
        if x.dim() in (1, 3):  # one sample (e.g. C×H×W from a Dataset): add the batch axis
            x = x.unsqueeze(0)
        if x.numel() == 0:
            raise ValueError(f"calibration batch {index} is empty (shape {tuple(x.shape)})")
        if check_finite and x.is_floating_point() and not torch.isfinite(x).all():
            raise ValueError(f"calibration batch {index} contains NaN or inf values")
        yield x


def collect_inputs(data: Iterable, *, max_samples: int | None = None) -> torch.Tensor:
    """Concatenate the inputs of ``data`` into one tensor (at most ``max_samples`` rows)."""
    chunks, count = [], 0
    for x in iterate_inputs(data):
        chunks.append(x)
        count += x.shape[0]
        if max_samples is not None and count >= max_samples:
            break
    if not chunks:
        raise ValueError("calibration data is empty")
    shapes = {tuple(c.shape[1:]) for c in chunks}
    if len(shapes) > 1:
        raise ValueError(f"calibration inputs have different shapes: {sorted(shapes)}")
    out = torch.cat(chunks)
    return out if max_samples is None else out[:max_samples]
