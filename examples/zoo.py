"""The model zoo: θ0 trained on the source domain(s), one θt fine-tuned from θ0 per target, cached.

The cache file's name is a hash of the whole recipe (domains, sizes, architecture, seed, both
training configs) plus the versions of the libraries that produce the data and the weights, so
a changed recipe or library never reuses stale models. A cache file that cannot be read or
does not match is rebuilt (with a warning), never trusted and never fatal. Files are written
atomically, so an interrupted build leaves no half-written cache behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import platform
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import ConcatDataset, TensorDataset

from hdrq_plugin._io import atomic_write_path
from hdrq_plugin.hot.mode import HOTConfig
from hdrq_plugin.progress import progress_bar, stage

from .augment import AugmentConfig
from .classifiers import ClassifierConfig, build_classifier
from .domains import FASHION_DOMAIN_NAMES, RENDERED_DEFAULT_IMAGES, DomainSplits, load_domain
from .models import ResNetConfig
from .rendered_digits import RenderStyle
from .training import TrainConfig, adapt_to_target, train_source

CACHE_FORMAT = 1
# Bump when domain generation or training code changes in a way the recipe does not capture.
CODE_REVISION = 1
_VERSIONED_PACKAGES = ("torch", "numpy", "pillow", "scikit-learn", "mlxtend")


def _default_source_training() -> TrainConfig:
    # Chosen on the val splits (benchmarks/float_merge_check.py): Adam beat SGD (lr 0.1) by 20
    # points on the rendered val split at this budget; colour augmentation is off because the
    # rendered source already has random colours (with it, θ0 transferred worse). More epochs
    # merge better (5 → 8: harmonic mean of the 3-way merge 75 → 79) but cost time; 6 fits the
    # demo's 3-minute budget on two idle cores.
    return TrainConfig(
        epochs=6, lr=2e-3, batch_size=64, optimizer="adam", weight_decay=0.0, warmup_fraction=0.1,
        augment=AugmentConfig(recolour=False),
    )


def _default_adaptation() -> TrainConfig:
    # Gentle: two epochs (≈40 steps). Longer or stronger adaptation raised each θt on its own
    # target but widened the gap to the float merge (an earlier prototype saw the same).
    return TrainConfig(epochs=2, lr=1e-3, batch_size=64, optimizer="adam", weight_decay=0.0, augment=None)


@dataclass(frozen=True)
class BenchmarkRecipe:
    """Everything that determines the domains and the zoo's weights."""

    source_domains: tuple[str, ...] = ("rendered",)  # many synthetic digits, like the paper's GTA5 source
    target_domains: tuple[str, ...] = ("mnist", "optdigits", "mnistm")
    rendered_images: int = RENDERED_DEFAULT_IMAGES  # size of the rendered domain when it is used
    render_style: RenderStyle = field(default_factory=RenderStyle)
    max_images_per_domain: int | None = None  # class-balanced cap on every domain (small recipes)
    architecture: ClassifierConfig = field(default_factory=ResNetConfig)  # hdrq_examples.classifiers
    source_training: TrainConfig = field(default_factory=_default_source_training)
    adaptation: TrainConfig = field(default_factory=_default_adaptation)
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "source_domains", tuple(self.source_domains))
        object.__setattr__(self, "target_domains", tuple(self.target_domains))
        if not self.source_domains or not self.target_domains:
            raise ValueError("a benchmark needs at least one source and one target domain")
        overlap = set(self.source_domains) & set(self.target_domains)
        if overlap:
            raise ValueError(f"domains {sorted(overlap)} are both source and target")
        if len(set(self.target_domains)) != len(self.target_domains):
            raise ValueError(f"duplicate target domains in {self.target_domains}")

    @classmethod
    def tiny(cls) -> BenchmarkRecipe:
        """A recipe that builds in seconds, for tests: few images, narrow network, short training."""
        return cls(
            rendered_images=400,
            max_images_per_domain=240,
            architecture=ResNetConfig(widths=(8, 16, 32)),
            source_training=TrainConfig(epochs=1, lr=0.05, batch_size=64),
            adaptation=TrainConfig(epochs=1, lr=0.01, batch_size=64, augment=None),
        )

    @classmethod
    def fashion(cls, **changes) -> BenchmarkRecipe:
        """Fashion-MNIST as the source, its noise / blur / contrast corruptions as the targets.

        Needs Debian's ``dataset-fashion-mnist`` (see :func:`hdrq_examples.domains.available_domains`).
        """
        return cls(source_domains=FASHION_DOMAIN_NAMES[:1], target_domains=FASHION_DOMAIN_NAMES[1:], **changes)

    def images_for(self, domain: str) -> int | None:
        """How many images :func:`load_domain` is asked for in ``domain``."""
        if domain == "rendered":
            cap = self.max_images_per_domain
            return self.rendered_images if cap is None else min(cap, self.rendered_images)
        return self.max_images_per_domain

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_hot_adaptation(self, hot: HOTConfig | bool = True) -> BenchmarkRecipe:
        """This recipe with every θt adapted by HOT back-propagation (a different cache entry)."""
        return dataclasses.replace(self, adaptation=dataclasses.replace(self.adaptation, hot=hot))

    def cache_key(self) -> str:
        """SHA-256 of the recipe, the code revision and the library versions."""
        payload = {
            "recipe": _without_plain_backprop(self.to_dict()),
            "cache_format": CACHE_FORMAT,
            "code_revision": CODE_REVISION,
            "python": platform.python_version_tuple()[:2],
            "versions": library_versions(),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _without_plain_backprop(recipe: dict) -> dict:
    """The recipe dict without ``hot: None`` entries: plain-backprop recipes keep the cache keys
    they had before HOT existed, while any HOT setting changes the key."""
    for training in ("source_training", "adaptation"):
        if recipe[training].get("hot", "absent") is None:
            recipe[training] = {k: v for k, v in recipe[training].items() if k != "hot"}
    return recipe


def merge_subsets(targets: Sequence[str], which: str = "pairs+all") -> list[tuple[str, ...]]:
    """The target subsets a multi-target evaluation merges: every pair and (for more than two
    targets) all of them together; ``which`` keeps only the ``"pairs"`` or the ``"all"`` merge."""
    if which not in ("pairs", "all", "pairs+all"):
        raise ValueError(f"merge_subsets must be 'pairs', 'all' or 'pairs+all', got {which!r}")
    subsets = list(itertools.combinations(targets, 2)) if "pairs" in which else []
    if "all" in which and (len(targets) > 2 or not subsets):
        subsets.append(tuple(targets))
    return subsets


def library_versions(*more: str) -> dict[str, str]:
    """Installed versions of the packages a cached result depends on (and of ``more``); "absent" if not installed."""
    versions = {}
    for package in (*_VERSIONED_PACKAGES, *more):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    return versions


@dataclass
class Benchmark:
    """A source model, its adapted models and the domains they were trained on."""

    recipe: BenchmarkRecipe
    source_model: nn.Module
    adapted: dict[str, nn.Module]  # target name → θt
    domains: dict[str, DomainSplits]  # every source and target domain
    timings: dict[str, float]  # seconds of the original build (plus "load_s" when cached)
    cache_path: Path
    from_cache: bool


def default_cache_dir() -> Path:
    """``$HDRQ_CACHE_DIR`` if set, else ``~/.cache/hdrq-plugin``."""
    return Path(os.environ.get("HDRQ_CACHE_DIR") or Path.home() / ".cache" / "hdrq-plugin")


def cache_path_for(recipe: BenchmarkRecipe, cache_dir: str | os.PathLike | None = None) -> Path:
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return folder / f"benchmark-{recipe.cache_key()[:20]}.pt"


def load_domains(recipe: BenchmarkRecipe, n_calib: int = 32) -> dict[str, DomainSplits]:
    """The recipe's source and target domains, split with the recipe's seed."""
    names = recipe.source_domains + recipe.target_domains
    return {
        name: load_domain(
            name, seed=recipe.seed, n_calib=n_calib, n_images=recipe.images_for(name), render_style=recipe.render_style
        )
        for name in names
    }


def load_keyed_cache(path: Path, cache_format: str, key: str) -> dict:
    """A cache file's content: tensors and plain containers only (``weights_only``: a file never
    chooses code to run), refused with ValueError unless it carries ``cache_format`` and ``key``."""
    content = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(content, dict) or content.get("format") != cache_format or content.get("key") != key:
        raise ValueError("format or recipe key does not match")
    return content


def read_zoo_cache(path: Path, cache_format: str, key: str, targets: Sequence[str],
                   build: Callable[[], nn.Module], what: str = "model cache"):
    """``(source, {target: adapted}, timings)`` from a zoo cache file, or None (after a warning)
    when the file is missing, unreadable or made for another recipe; ``build()`` gives an
    untrained model of the recipe's architecture (the classification and segmentation zoos
    share this reader)."""
    if not path.is_file():
        return None

    def from_state(state: dict[str, torch.Tensor]) -> nn.Module:
        model = build()
        model.load_state_dict(state)  # strict: a missing or misshapen entry is a corrupt cache
        return model.eval()

    try:
        content = load_keyed_cache(path, cache_format, key)
        if set(content["adapted"]) != set(targets):
            raise ValueError(f"targets {sorted(content['adapted'])} do not match the recipe")
        adapted = {t: from_state(content["adapted"][t]) for t in targets}
        return from_state(content["source"]), adapted, dict(content["timings"])
    except Exception as err:  # noqa: BLE001 - any unreadable cache is rebuilt, whatever the cause
        warnings.warn(f"{what} {path} is unusable ({type(err).__name__}: {err}); rebuilding it", stacklevel=3)
        return None


def _read_cache(path: Path, recipe: BenchmarkRecipe) -> tuple[nn.Module, dict[str, nn.Module], dict] | None:
    """The cached models, or None (after a warning) when the file is unreadable or does not match."""
    return read_zoo_cache(path, CACHE_FORMAT, recipe.cache_key(), recipe.target_domains,
                          lambda: build_classifier(recipe.architecture))


def _write_cache(path: Path, recipe: BenchmarkRecipe, source: nn.Module, adapted: dict[str, nn.Module], timings: dict) -> None:
    content = {
        "format": CACHE_FORMAT,
        "key": recipe.cache_key(),
        "recipe_json": json.dumps(recipe.to_dict(), sort_keys=True),
        "source": source.state_dict(),
        "adapted": {target: model.state_dict() for target, model in adapted.items()},
        "timings": timings,
    }
    with atomic_write_path(path) as tmp:
        torch.save(content, tmp)


def build_models(recipe: BenchmarkRecipe, domains: dict[str, DomainSplits]) -> tuple[nn.Module, dict[str, nn.Module], dict]:
    """Train θ0 on the union of the source domains' train splits, then adapt it to each target."""
    # Wall-clock and CPU seconds (all threads): the CPU time shows the cost on a shared machine.
    timings = {}
    wall, cpu = time.perf_counter(), time.process_time()
    source_data = ConcatDataset([domains[name].train for name in recipe.source_domains])
    with stage("zoo: train the source model"):
        source = train_source(source_data, recipe.architecture, recipe.source_training, seed=recipe.seed)
    timings["source_training_s"] = time.perf_counter() - wall
    timings["source_training_cpu_s"] = time.process_time() - cpu
    adapted = {}
    wall, cpu = time.perf_counter(), time.process_time()
    for index, target in enumerate(progress_bar(recipe.target_domains, desc="adapting", unit="target", leave=False), start=1):
        with stage(f"zoo: adapt to {target}"):
            adapted[target] = adapt_to_target(
                source, domains[target].train, recipe.adaptation, seed=recipe.seed + index, desc=f"adapt {target}"
            )
    timings["adaptation_s"] = time.perf_counter() - wall
    timings["adaptation_cpu_s"] = time.process_time() - cpu
    return source, adapted, timings


#: Format of the generated-domains cache (the rendered, blended and split images of every domain).
DOMAINS_CACHE_FORMAT = "hdrq-examples/domains/v1"


def domains_cache_path(recipe: BenchmarkRecipe, n_calib: int, cache_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """Where the recipe's generated domains are cached, and their key (the recipe's key and ``n_calib``)."""
    key = hashlib.sha256(f"{recipe.cache_key()}|domains|n_calib={n_calib}".encode()).hexdigest()
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return folder / f"domains-{key[:20]}.pt", key


def load_or_make_domains(recipe: BenchmarkRecipe, n_calib: int = 32,
                         cache_dir: str | os.PathLike | None = None) -> tuple[dict[str, DomainSplits], bool]:
    """:func:`load_domains`, cached: rendering and blending the digits takes tens of seconds, reading
    the tensors back a fraction of one. Returns ``(domains, from_cache)``; an unreadable or foreign
    cache file is regenerated (after a warning) and replaced atomically."""
    path, key = domains_cache_path(recipe, n_calib, cache_dir)
    names = recipe.source_domains + recipe.target_domains
    if path.is_file():
        try:
            content = load_keyed_cache(path, DOMAINS_CACHE_FORMAT, key)
            domains = {}
            for name in names:
                parts = content["domains"][name]
                if set(parts) != {"train", "calib", "test", "val"}:
                    raise ValueError(f"domain {name!r} has parts {sorted(parts)}")
                domains[name] = DomainSplits(name=name, **{
                    part: TensorDataset(*_checked_pair(images, labels)) for part, (images, labels) in parts.items()})
            return domains, True
        except Exception as err:  # noqa: BLE001 - any unreadable cache is regenerated, whatever the cause
            warnings.warn(f"domain cache {path} is unusable ({type(err).__name__}: {err}); regenerating it", stacklevel=2)
    domains = load_domains(recipe, n_calib=n_calib)
    content = {"format": DOMAINS_CACHE_FORMAT, "key": key,
               "domains": {name: {part: list(getattr(split, part).tensors) for part in ("train", "calib", "test", "val")}
                           for name, split in domains.items()}}
    with atomic_write_path(path) as tmp:
        torch.save(content, tmp)
    return domains, False


def _checked_pair(images, labels) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor) and len(images) == len(labels)):
        raise ValueError("a split is not an (images, labels) pair of equal length")
    return images, labels


def load_or_build_benchmark(
    recipe: BenchmarkRecipe | None = None,
    *,
    n_calib: int = 32,
    cache_dir: str | os.PathLike | None = None,
    rebuild: bool = False,
) -> Benchmark:
    """Load the recipe's domains and its models from the cache, training and caching them if needed.

    ``n_calib`` only sets the size of each domain's calibration split; it is not part of the
    cache key because it does not change any model.
    """
    recipe = recipe or BenchmarkRecipe()
    path = cache_path_for(recipe, cache_dir)
    start = time.perf_counter()
    domains, _ = load_or_make_domains(recipe, n_calib, cache_dir)
    data_seconds = time.perf_counter() - start
    cached = None if rebuild else _read_cache(path, recipe)
    if cached is not None:
        source, adapted, timings = cached
        timings = {**timings, "data_s": data_seconds, "load_s": time.perf_counter() - start - data_seconds}
        return Benchmark(recipe, source, adapted, domains, timings, path, from_cache=True)
    source, adapted, timings = build_models(recipe, domains)
    timings["data_s"] = data_seconds
    _write_cache(path, recipe, source, adapted, timings)
    return Benchmark(recipe, source, adapted, domains, timings, path, from_cache=False)
