"""The segmentation zoo: θ0 trained on ``seg-source`` scenes, one θt per target, cached.

The same contract as the classification zoo (:mod:`.zoo`): the cache file's name is a hash of
the recipe, the code revision and the library versions; an unreadable or mismatched file is
rebuilt with a warning, never trusted (``torch.load(weights_only=True)``, strict state dicts);
writes are atomic.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hdrq_plugin._io import atomic_write_path

from .segmentation_loss import SegmentationLoss
from .segmentation_models import SEGMENTATION_MODELS, build_segmentation_model
from .segmentation_scenes import (
    BACKGROUND,
    NUM_CLASSES,
    SCENE_SIZE,
    SOURCE_DOMAIN,
    TARGET_DOMAINS,
    SceneSplits,
    load_scene_domain,
)
from .training import TrainConfig, adapt_to_target, train_classifier
from .zoo import default_cache_dir, library_versions, read_zoo_cache

CACHE_FORMAT = 1
CODE_REVISION = 2  # bump when scene generation or training changes in a way the recipe does not capture


def _source_training() -> TrainConfig:
    # Adam at 3e-3, cosine to zero, 15 epochs of 3000 scenes (measured on the source test scenes,
    # SegmentationLoss's defaults: 600 scenes x 12 epochs of plain CE 0.09-0.14 mIoU, 2000 x 15 of
    # background-weighted CE 0.59, 3000 x 15 with Dice 0.67; BENCHMARKS.md, segmentation section)
    return TrainConfig(epochs=15, lr=3e-3, batch_size=32, optimizer="adam", weight_decay=0.0, augment=None)


def _adaptation() -> TrainConfig:
    return TrainConfig(epochs=3, lr=1e-3, batch_size=32, optimizer="adam", weight_decay=0.0, augment=None)


@dataclass(frozen=True)
class SegmentationRecipe:
    """Everything that determines the scenes and the zoo's weights."""

    model: str = "unet"
    width: int = 16  # first-stage channels (build_segmentation_model)
    target_domains: tuple[str, ...] = TARGET_DOMAINS
    scenes: dict[str, int] = field(default_factory=lambda: {"train": 3000, "calib": 64, "val": 100, "test": 200})
    size: int = SCENE_SIZE
    source_training: TrainConfig = field(default_factory=_source_training)
    adaptation: TrainConfig = field(default_factory=_adaptation)
    loss: SegmentationLoss = field(default_factory=lambda: SegmentationLoss(NUM_CLASSES, BACKGROUND))
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_domains", tuple(self.target_domains))
        if self.model not in SEGMENTATION_MODELS:
            raise ValueError(f"model must be one of {SEGMENTATION_MODELS}, got {self.model!r}")
        if not self.target_domains or SOURCE_DOMAIN in self.target_domains:
            raise ValueError(f"targets must be non-empty and exclude {SOURCE_DOMAIN}: {self.target_domains}")
        if self.size % 4:
            raise ValueError(f"size must be a multiple of 4 (two 2x downsamplings), got {self.size}")

    @classmethod
    def small(cls, **changes) -> SegmentationRecipe:
        """``make demo``'s segmentation case: a half-width U-Net (8/16/32 channels), 512 training
        scenes per domain, short training; the whole pipeline in about two minutes on two cores."""
        return cls(**{"width": 8, "scenes": {"train": 512, "calib": 32, "val": 16, "test": 32},
                      "source_training": dataclasses.replace(_source_training(), epochs=8),
                      "adaptation": dataclasses.replace(_adaptation(), epochs=2), **changes})

    @classmethod
    def tiny(cls, **changes) -> SegmentationRecipe:
        """Builds in seconds, for tests."""
        return cls(**{"scenes": {"train": 48, "calib": 32, "val": 8, "test": 16}, "size": 32,
                      "source_training": dataclasses.replace(_source_training(), epochs=2),
                      "adaptation": dataclasses.replace(_adaptation(), epochs=1), **changes})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def cache_key(self) -> str:
        payload = {"recipe": self.to_dict(), "cache_format": CACHE_FORMAT, "code_revision": CODE_REVISION,
                   "python": platform.python_version_tuple()[:2], "versions": library_versions()}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class SegmentationBenchmark:
    recipe: SegmentationRecipe
    source_model: nn.Module
    adapted: dict[str, nn.Module]
    domains: dict[str, SceneSplits]  # source and targets
    timings: dict[str, float]
    cache_path: Path
    from_cache: bool


def load_scenes(recipe: SegmentationRecipe) -> dict[str, SceneSplits]:
    return {name: load_scene_domain(name, seed=recipe.seed, scenes=recipe.scenes, size=recipe.size)
            for name in (SOURCE_DOMAIN, *recipe.target_domains)}


def _fresh_model(recipe: SegmentationRecipe) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        return build_segmentation_model(recipe.model, NUM_CLASSES, width=recipe.width)


def _read_cache(path: Path, recipe: SegmentationRecipe):
    return read_zoo_cache(path, CACHE_FORMAT, recipe.cache_key(), recipe.target_domains,
                          lambda: build_segmentation_model(recipe.model, NUM_CLASSES, width=recipe.width),
                          "segmentation cache")


def load_or_build_segmentation_zoo(recipe: SegmentationRecipe | None = None, *,
                                   cache_dir: str | os.PathLike | None = None,
                                   rebuild: bool = False) -> SegmentationBenchmark:
    """Scenes of every domain, θ0 trained on the source and θt adapted per target (cached)."""
    recipe = recipe or SegmentationRecipe()
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"segmentation-{recipe.cache_key()[:20]}.pt"
    start = time.perf_counter()
    domains = load_scenes(recipe)
    timings = {"data_s": time.perf_counter() - start}
    cached = None if rebuild else _read_cache(path, recipe)
    if cached is not None:
        source, adapted, built = cached
        return SegmentationBenchmark(recipe, source, adapted, domains, {**built, **timings}, path, True)
    start = time.perf_counter()
    source = _fresh_model(recipe)
    train_classifier(source, domains[SOURCE_DOMAIN].train, recipe.source_training, seed=recipe.seed,
                     desc="source θ0", loss=recipe.loss)  # the classification loop, a per-pixel loss
    timings["source_training_s"] = time.perf_counter() - start
    start = time.perf_counter()
    adapted = {target: adapt_to_target(source, domains[target].train, recipe.adaptation, seed=recipe.seed + i,
                                       desc=f"adapt {target}", loss=recipe.loss)
               for i, target in enumerate(recipe.target_domains, start=1)}
    timings["adaptation_s"] = time.perf_counter() - start
    content = {"format": CACHE_FORMAT, "key": recipe.cache_key(), "recipe_json": json.dumps(recipe.to_dict(), default=str),
               "source": source.state_dict(), "adapted": {t: m.state_dict() for t, m in adapted.items()},
               "timings": timings}
    with atomic_write_path(path) as tmp:
        torch.save(content, tmp)
    return SegmentationBenchmark(recipe, source.eval(), adapted, domains, timings, path, False)
