"""Error barriers between two models along their linear interpolation (docs/hdrq_method.md §2).

The interpolation ``θλ = (1−λ)θ1 + λθ2`` is evaluated on a grid of λ. For float models each
point is the float average (:func:`hdrq_plugin.merge.float_merge.average_float_models`); for
quantized models each point is re-merged onto the integer grid with coefficients ``(1−λ, λ)``
(:func:`hdrq_plugin.merge.models.merge_models`), so the curve shows what a deployed merge would get.

Barrier (our convention, see :func:`interpolation_barriers`): the loss above the straight line
between the endpoint losses, ``B(λ) = L(θλ) − ((1−λ)L(θ1) + λL(θ2))``, and ``B = max_λ B(λ)``.
docs/hdrq_method.md §2 writes the baseline as ½(L1 + L2), which is the same line at λ = ½ (reported as
``midpoint_barrier``); the line is the usual choice (Frankle et al., "Linear mode connectivity
and the lottery ticket hypothesis", 2020) because it makes the endpoints' barrier exactly 0 when
their losses differ. The maximum includes the endpoints, so ``B ≥ 0``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .._io import atomic_write_path
from ..data import labelled_batch, plain_tensor
from ..progress import progress_bar
from .models import is_quantized_model, merge_models
from .rules import NOISE_TRIALS

DEFAULT_STEPS = 11  # λ = 0, 0.1, …, 1
_DATASET_BATCH_SIZE = 256  # batching of a Dataset of single samples (as hdrq_plugin.evaluation)


def interpolation_barriers(lambdas: Sequence[float], losses: Sequence[float]) -> tuple[float, ...]:
    """``L(θλ) − ((1−λ)L(θ1) + λL(θ2))`` for each λ; the first/last entries are the endpoints."""
    if len(lambdas) != len(losses) or len(lambdas) < 2:
        raise ValueError(f"need matching λ and loss lists of length ≥ 2, got {len(lambdas)} and {len(losses)}")
    start, end = losses[0], losses[-1]
    return tuple(loss - ((1 - lam) * start + lam * end) for lam, loss in zip(lambdas, losses, strict=True))


@dataclass(frozen=True)
class BarrierResult:
    """Loss and accuracy along the interpolation between two models."""

    lambdas: tuple[float, ...]
    losses: tuple[float, ...]
    accuracies: tuple[float, ...]
    quantized: bool
    label: str = ""

    @property
    def barriers(self) -> tuple[float, ...]:
        return interpolation_barriers(self.lambdas, self.losses)

    @property
    def max_barrier(self) -> float:
        return max(self.barriers)

    @property
    def max_barrier_lambda(self) -> float:
        barriers = self.barriers
        return self.lambdas[barriers.index(max(barriers))]

    @property
    def midpoint_barrier(self) -> float | None:
        """docs/hdrq_method.md §2's ``L(θ½) − ½(L1 + L2)`` when λ = ½ is on the grid, else None."""
        for lam, barrier in zip(self.lambdas, self.barriers, strict=True):
            if abs(lam - 0.5) < 1e-9:
                return barrier
        return None

    def to_dict(self) -> dict:
        """A JSON-ready summary: the curves, the barrier curve and its maximum."""
        return {"label": self.label, "quantized": self.quantized, "lambdas": list(self.lambdas),
                "losses": list(self.losses), "accuracies": list(self.accuracies),
                "barriers": list(self.barriers), "max_barrier": self.max_barrier,
                "max_barrier_lambda": self.max_barrier_lambda, "midpoint_barrier": self.midpoint_barrier}


def _batches(data):
    if isinstance(data, Dataset):
        return DataLoader(data, batch_size=_DATASET_BATCH_SIZE, shuffle=False)
    if iter(data) is data:
        raise TypeError("data is a one-shot iterator; pass something iterable many times "
                        "(a DataLoader, a list of (inputs, labels) batches or a Dataset)")
    return data


@torch.no_grad()
def evaluate_loss_and_accuracy(model: nn.Module, data, loss: Callable = F.cross_entropy) -> tuple[float, float]:
    """Mean per-sample loss (``loss(logits, labels)`` is a batch mean) and accuracy in [0, 1].

    Dense outputs (``[N, C, H, W]`` logits, ``[N, H, W]`` labels: segmentation) give the mean
    per-pixel loss and the pixel accuracy: every sample has the same number of pixels.
    """
    was_training = model.training
    model.eval()
    total_loss, correct, count, labelled = 0.0, 0, 0, 0
    try:
        for index, batch in enumerate(_batches(data)):
            inputs, labels = labelled_batch(batch, f"batch {index}")
            logits = plain_tensor(model(inputs))
            total_loss += float(loss(logits, labels)) * labels.shape[0]
            correct += int((logits.argmax(dim=1) == labels).sum())
            count += int(labels.shape[0])
            labelled += int(labels.numel())  # = count for one label per sample
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("the evaluation data is empty")
    return total_loss / count, correct / labelled


def error_barrier(model_a: nn.Module, model_b: nn.Module, data: Dataset | Iterable, *,
                  steps: int = DEFAULT_STEPS, quantized: bool | None = None,
                  loss: Callable = F.cross_entropy, rounding: str = "noise-sampling",
                  trials: int = NOISE_TRIALS, seed: int = 0, label: str = "") -> BarrierResult:
    """Loss/accuracy curve of the interpolation from ``model_a`` (λ = 0) to ``model_b`` (λ = 1).

    ``quantized`` states which interpolation is meant (float average, or each point re-merged
    onto the integer grid with ``rounding``/``trials``/``seed`` as in :func:`merge_models`);
    ``None`` infers it from the models, a value that contradicts them is an error. ``data`` is a
    re-iterable of ``(inputs, labels)`` batches or a Dataset of samples.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 2:
        raise ValueError(f"steps must be an integer ≥ 2, got {steps!r}")
    kinds = {is_quantized_model(model_a), is_quantized_model(model_b)}
    if len(kinds) > 1:
        raise TypeError("model_a and model_b must both be quantized (Brevitas) or both float")
    is_quantized = kinds.pop()
    if quantized is not None and bool(quantized) != is_quantized:
        raise TypeError(f"quantized={quantized} but the models are {'quantized' if is_quantized else 'float'}")
    lambdas = tuple(float(v) for v in torch.linspace(0.0, 1.0, steps, dtype=torch.float64))
    losses, accuracies = [], []
    for lam in progress_bar(lambdas, desc="error barrier", unit="point"):
        point = merge_models([model_a, model_b], (1.0 - lam, lam), rounding=rounding, trials=trials, seed=seed)
        point_loss, point_accuracy = evaluate_loss_and_accuracy(point, data, loss)
        losses.append(point_loss)
        accuracies.append(point_accuracy)
    return BarrierResult(lambdas, tuple(losses), tuple(accuracies), is_quantized, label)


def plot_barrier(results: BarrierResult | Sequence[BarrierResult], path: str | Path) -> Path:
    """Write a PNG of loss (with each straight-line baseline) and accuracy against λ, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend state
    from matplotlib.figure import Figure

    results = [results] if isinstance(results, BarrierResult) else list(results)
    if not results or not all(isinstance(r, BarrierResult) for r in results):
        raise TypeError("plot_barrier needs a BarrierResult or a non-empty sequence of them")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"plot_barrier writes PNG files; {path} does not end in .png")
    figure = Figure(figsize=(9, 3.6), constrained_layout=True)
    FigureCanvasAgg(figure)
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    for index, result in enumerate(results):
        name = result.label or ("quantized" if result.quantized else "float")
        colour = f"C{index}"
        loss_axes.plot(result.lambdas, result.losses, "o-", color=colour,
                       label=f"{name} (B = {result.max_barrier:.3f})")
        loss_axes.plot([0.0, 1.0], [result.losses[0], result.losses[-1]], "--", color=colour, alpha=0.6)
        accuracy_axes.plot(result.lambdas, [100 * a for a in result.accuracies], "o-", color=colour, label=name)
    loss_axes.set(xlabel="λ (0 = model A, 1 = model B)", ylabel="loss", title="loss along the interpolation")
    accuracy_axes.set(xlabel="λ (0 = model A, 1 = model B)", ylabel="accuracy (%)", title="accuracy")
    loss_axes.legend(fontsize="small")
    accuracy_axes.legend(fontsize="small")
    with atomic_write_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    return path
