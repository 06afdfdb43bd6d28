"""The zoo's classifier families, built from their configs: one place that maps a config to a model.

``BenchmarkRecipe.architecture`` holds one of these configs; the zoo trains, caches and rebuilds
whichever family it names (:class:`~hdrq_examples.models.ResNetConfig`: the demo's ResNet-8,
:class:`~hdrq_examples.mobilenet.MobileNetConfig`: the inverted-residual family).
"""

from __future__ import annotations

from torch import nn

from .mobilenet import MobileNetConfig, build_mobilenet
from .models import ResNetConfig, build_resnet

ClassifierConfig = ResNetConfig | MobileNetConfig

#: family name (the benchmarks' ``--family``) → default config
FAMILIES: dict[str, ClassifierConfig] = {"resnet": ResNetConfig(), "inverted-residual": MobileNetConfig()}


#: config type → (builder, the name ``hdrq_plugin.architectures`` registers it under)
_BUILDERS = {ResNetConfig: (build_resnet, "hdrq_examples.models:build_resnet"),
             MobileNetConfig: (build_mobilenet, "hdrq_examples.mobilenet:build_mobilenet")}


def _entry(config: ClassifierConfig):
    try:
        return _BUILDERS[type(config)]
    except KeyError:
        raise TypeError(f"no classifier family for {type(config).__name__}") from None


def builder_of(config: ClassifierConfig) -> str:
    """The registered builder (``hdrq_plugin.architectures``) a checkpoint of ``config``'s family names."""
    return _entry(config)[1]


def build_classifier(config: ClassifierConfig) -> nn.Module:
    """A freshly initialised model of ``config``'s family."""
    return _entry(config)[0](config)
