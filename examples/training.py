"""Train the source model θ0 and fine-tune one θt per target from it (supervised, on CPU).

One loop serves both: mini-batch SGD or Adam on cross-entropy, a per-step learning-rate
schedule (linear warm-up, then cosine to zero — Goyal et al. 2017; Loshchilov & Hutter 2017),
optional batched augmentation, and all randomness (initialisation, shuffling, augmentation)
drawn from the given seed so that a recipe always yields the same weights on one machine.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, TensorDataset

from hdrq_plugin.hot.budget import BatchFit, fit_batch_to_budget
from hdrq_plugin.hot.mode import HOTConfig, hot_mode
from hdrq_plugin.progress import progress_bar

from .augment import AugmentConfig, augment_batch
from .classifiers import ClassifierConfig, build_classifier


@dataclass(frozen=True)
class TrainConfig:
    """One training or adaptation run."""

    epochs: float  # fractional epochs allowed: steps = round(epochs · batches per epoch)
    lr: float
    batch_size: int = 128
    optimizer: str = "sgd"  # "sgd" (momentum 0.9, Nesterov) or "adam"
    weight_decay: float = 5e-4  # He et al. 2016 CIFAR setting
    warmup_fraction: float = 0.0  # share of the steps with a linear warm-up from 0
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)
    freeze_batchnorm_stats: bool = False  # keep θ0's running statistics while fine-tuning
    hot: HOTConfig | None = None  # back-propagate Conv2d/Linear with HOT (hdrq_plugin.hot.mode); None: plain

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.lr <= 0 or self.batch_size <= 0:
            raise ValueError(f"epochs, lr and batch_size must be positive: {self}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.hot is True:
            object.__setattr__(self, "hot", HOTConfig())
        elif self.hot is False:
            object.__setattr__(self, "hot", None)
        elif self.hot is not None and not isinstance(self.hot, HOTConfig):
            raise TypeError(f"hot must be a HOTConfig, True/False or None, got {type(self.hot).__name__}")


def dataset_tensors(data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of a TensorDataset, a ConcatDataset of them, or any (x, y) Dataset."""
    if isinstance(data, TensorDataset):
        return data.tensors[0], data.tensors[1]
    if isinstance(data, ConcatDataset):
        parts = [dataset_tensors(part) for part in data.datasets]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    images, labels = zip(*DataLoader(data, batch_size=512), strict=True)
    return torch.cat(images), torch.cat(labels)


def _learning_rate_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay
    )


def _train_mode(model: nn.Module, freeze_batchnorm_stats: bool) -> None:
    model.train()
    if freeze_batchnorm_stats:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (outputs, labels) -> scalar


def train_classifier(model: nn.Module, data: Dataset, config: TrainConfig, *, seed: int, desc: str = "train",
                     loss: LossFunction = F.cross_entropy) -> float:
    """Train ``model`` in place on ``data``; returns the mean loss of the last epoch's batches.

    ``loss`` replaces plain cross-entropy (the segmentation zoo weighs its classes, :mod:`.segmentation_loss`).
    """
    images, labels = dataset_tensors(data)
    if len(images) == 0:
        raise ValueError(f"{desc}: no training data")
    generator = torch.Generator().manual_seed(seed)
    batches_per_epoch = math.ceil(len(images) / config.batch_size)
    total_steps = max(1, round(config.epochs * batches_per_epoch))
    warmup = round(config.warmup_fraction * total_steps)
    optimizer = _make_optimizer(model, config)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _learning_rate_factor(s, total_steps, warmup))
    _train_mode(model, config.freeze_batchnorm_stats)
    # HOT's stochastic-rounding stream follows the run's seed, so seeds differ in rounding too.
    hot = dataclasses.replace(config.hot, seed=config.hot.seed + seed) if config.hot is not None else None
    with hot_mode(model, hot) if hot is not None else contextlib.nullcontext():
        recent_losses = _run_steps(model, images, labels, config, optimizer, schedule, generator, desc, loss)
    model.eval()
    return sum(recent_losses) / len(recent_losses)


def _run_steps(model, images, labels, config, optimizer, schedule, generator, desc, loss_fn) -> list[float]:
    """The SGD loop of :func:`train_classifier`; returns the losses of the last epoch's batches."""
    batches_per_epoch = math.ceil(len(images) / config.batch_size)
    total_steps = max(1, round(config.epochs * batches_per_epoch))
    recent_losses: list[float] = []
    order = torch.empty(0, dtype=torch.long)
    with progress_bar(total=total_steps, desc=desc, unit="step", leave=False) as progress:
        for step in range(total_steps):
            position = (step % batches_per_epoch) * config.batch_size
            if position == 0:
                order = torch.randperm(len(images), generator=generator)
                recent_losses = []
            batch = order[position : position + config.batch_size]
            x, y = images[batch], labels[batch]
            if config.augment is not None:
                x = augment_batch(x, config.augment, generator)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            recent_losses.append(loss.item())
            progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            progress.update()
    return recent_losses


def train_source(data: Dataset, architecture: ClassifierConfig, config: TrainConfig, *, seed: int) -> nn.Module:
    """A fresh model of ``architecture``'s family (initialised from ``seed``) trained on the source data: θ0."""
    with torch.random.fork_rng(devices=[]):  # do not disturb the caller's global RNG
        torch.manual_seed(seed)
        model = build_classifier(architecture)
    train_classifier(model, data, config, seed=seed, desc="source θ0")
    return model


def adapt_to_target(
    source: nn.Module, data: Dataset, config: TrainConfig, *, seed: int, desc: str = "adapt",
    hot: bool | HOTConfig | None = None, memory_budget: int | None = None,
    loss: LossFunction = F.cross_entropy,
) -> nn.Module:
    """A copy of ``source`` fine-tuned on one target's labelled ``data``: θt (``source`` is untouched).

    ``hot=True`` (or a :class:`HOTConfig`) back-propagates with HOT; ``None`` keeps ``config.hot``.
    ``memory_budget`` (bytes) replaces ``config.batch_size`` by the largest batch whose measured
    training-step peak fits it (:func:`fit_adaptation_batch`); the model records the fit as
    ``model.batch_fit``.
    """
    if hot is not None:
        config = dataclasses.replace(config, hot=hot)
    fit = None
    if memory_budget is not None:
        config, fit = fit_adaptation_batch(source, data, config, memory_budget)
    model = copy.deepcopy(source)
    train_classifier(model, data, config, seed=seed, desc=desc, loss=loss)
    if fit is not None:
        model.batch_fit = fit
    return model


def fit_adaptation_batch(source: nn.Module, data: Dataset, config: TrainConfig,
                         memory_budget: int) -> tuple[TrainConfig, BatchFit]:
    """``config`` with the largest batch (≤ the data) whose one-step peak fits ``memory_budget`` bytes.

    The peak is measured on ``source`` with ``config.hot`` (hdrq_plugin.hot.budget): live tensor
    bytes of a forward + backward, gradients included, optimizer state not (plain SGD keeps a
    momentum buffer the size of the parameters; Adam two).
    """
    images, labels = dataset_tensors(data)
    fit = fit_batch_to_budget(source, images, labels, memory_budget, config.hot)
    return dataclasses.replace(config, batch_size=fit.batch_size), fit
