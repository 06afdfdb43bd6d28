"""The user's data, accepted as it is: any iterable of tensors or ``(input, label, ...)`` tuples.

Labels are never used by calibration; they are dropped here, once, for every caller.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


def _input_of(batch) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict) and isinstance(batch.get("input"), torch.Tensor):
        return batch["input"]
    raise TypeError(
        "calibration data must yield tensors or (input, label) pairs, got "
        f"{type(batch).__name__}")


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
        x = _input_of(batch)
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
