"""Seeded random CNNs built from the blocks real models use (issue 19, deliver 6).

A generated model is ``stem -> block -> head``: a 3×3 stem conv, one block of the named type
with its options drawn from the seed (widths, bias, BatchNorm, activation, SE idiom, ...), and a
head drawn from the seed too (global pool + Linear, or flatten + an MLP). Inputs are 3×8×8, so
one case costs seconds on a CPU. ``BLOCK_TYPES`` lists the block types; the conformance runner
crosses them with bit specs and weight storages.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SHAPE = (3, 8, 8)
NUM_CLASSES = 5
#: The activations a block may use (the conversion's op policy serves each differently).
ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "silu": nn.SiLU,
               "sigmoid": nn.Sigmoid}
#: How a squeeze-and-excitation gate ``s`` of shape (N, C) is broadcast over ``x`` (N, C, H, W).
SE_IDIOMS = {
    "index-none": lambda x, s: x * s[:, :, None, None],
    "unsqueeze": lambda x, s: x * s.unsqueeze(-1).unsqueeze(-1),
    "view": lambda x, s: x * s.view(x.size(0), x.size(1), 1, 1),
    "reshape": lambda x, s: x * s.reshape(-1, x.shape[1], 1, 1),
    "expand-as": lambda x, s: x * s[..., None, None].expand_as(x),
    "conv-gate": None,  # 1×1 convs on the pooled map keep (N, C, 1, 1): no reshaping at all
}


def _act(name: str) -> nn.Module:
    return ACTIVATIONS[name]()


class ConvBlock(nn.Module):
    """Conv (with or without bias, with or without BN) then an activation."""

    def __init__(self, channels: int, rng: random.Random, groups: int = 1, kernel: int = 3) -> None:
        super().__init__()
        use_bn = rng.random() < 0.5
        self.conv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=groups,
                              bias=not use_bn and rng.random() < 0.7)
        self.bn = nn.BatchNorm2d(channels) if use_bn else nn.Identity()
        self.act = _act(rng.choice(list(ACTIVATIONS)))

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class DepthwiseSeparable(nn.Module):
    def __init__(self, channels: int, rng: random.Random) -> None:
        super().__init__()
        self.dw = ConvBlock(channels, rng, groups=channels)
        self.pw = ConvBlock(channels, rng, kernel=1)

    def forward(self, x):
        return self.pw(self.dw(x))


class GroupedConv(nn.Module):
    def __init__(self, channels: int, rng: random.Random) -> None:
        super().__init__()
        self.block = ConvBlock(channels, rng, groups=rng.choice([2, 4]))

    def forward(self, x):
        return self.block(x)


class Residual(nn.Module):
    """Bottleneck with a residual add (functional ``+`` or ``torch.add``)."""

    def __init__(self, channels: int, rng: random.Random) -> None:
        super().__init__()
        self.a, self.b = ConvBlock(channels, rng, kernel=1), ConvBlock(channels, rng)
        self.use_torch_add = rng.random() < 0.5
        self.post = nn.ReLU() if rng.random() < 0.5 else nn.Identity()

    def forward(self, x):
        y = self.b(self.a(x))
        return self.post(torch.add(x, y) if self.use_torch_add else x + y)


class Concat(nn.Module):
    def __init__(self, channels: int, rng: random.Random) -> None:
        super().__init__()
        self.a, self.b = ConvBlock(channels // 2, rng, kernel=1), ConvBlock(channels // 2, rng)
        self.reduce = nn.Conv2d(channels, channels // 2, 1)

    def forward(self, x):
        x = self.reduce(x)
        return torch.cat([self.a(x), self.b(x)], dim=1)


class SqueezeExcite(nn.Module):
    """SE gate in one of SE_IDIOMS, with a Sigmoid or Hardsigmoid gate."""

    def __init__(self, channels: int, rng: random.Random) -> None:
        super().__init__()
        self.body = ConvBlock(channels, rng)
        self.idiom = rng.choice(list(SE_IDIOMS))
        if self.idiom == "conv-gate":
            self.fc1, self.fc2 = nn.Conv2d(channels, channels // 2, 1), nn.Conv2d(channels // 2, channels, 1)
        else:
            self.fc1, self.fc2 = nn.Linear(channels, channels // 2), nn.Linear(channels // 2, channels)
        self.gate = nn.Sigmoid() if rng.random() < 0.5 else nn.Hardsigmoid()

    def forward(self, x):
        x = self.body(x)
        if self.idiom == "conv-gate":
            return x * self.gate(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        s = self.gate(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
        return SE_IDIOMS[self.idiom](x, s)


class Pools(nn.Module):
    def __init__(self, channels: int, rng: random.Random) -> None:
        super().__init__()
        self.block = ConvBlock(channels, rng)
        self.pool = rng.choice([nn.MaxPool2d(2), nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(2),
                                nn.MaxPool2d(3, stride=1, padding=1)])

    def forward(self, x):
        return self.pool(self.block(x))


class Functional(nn.Module):
    """The block written with torch.nn.functional calls and tensor methods."""

    def __init__(self, channels: int, rng: random.Random) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(channels, channels, 3, padding=1), nn.Conv2d(channels, channels, 1)
        self.act = rng.choice([F.relu, F.relu6, F.hardswish, F.silu, torch.sigmoid])
        self.pool = rng.choice([lambda x: F.max_pool2d(x, 2), lambda x: F.avg_pool2d(x, 2), lambda x: x])

    def forward(self, x):
        y = self.act(self.conv1(x))
        return self.pool(F.relu(self.conv2(y)) + y)


class Reshapes(nn.Module):
    """view / reshape / flatten / permute between layers (and back)."""

    def __init__(self, channels: int, rng: random.Random) -> None:
        super().__init__()
        self.block = ConvBlock(channels, rng)
        self.form = rng.choice(["permute", "view", "reshape", "flatten-unflatten", "transpose"])

    def forward(self, x):
        y = self.block(x)
        n, c, h, w = y.shape
        if self.form == "permute":
            return y.permute(0, 2, 3, 1).permute(0, 3, 1, 2)
        if self.form == "view":
            return y.view(n, c, h * w).view(n, c, h, w)
        if self.form == "reshape":
            return torch.reshape(y.reshape(n, c * h * w), (n, c, h, w))
        if self.form == "transpose":
            return y.transpose(2, 3)
        return y.flatten(2).reshape(n, c, h, w)


class SplitsAndReductions(nn.Module):
    """chunk / split along channels, mean / sum over dims, broadcasting ``*`` and ``+``."""

    def __init__(self, channels: int, rng: random.Random) -> None:
        super().__init__()
        self.block = ConvBlock(channels, rng)
        self.a, self.b = nn.Conv2d(channels // 2, channels // 2, 1), nn.Conv2d(channels // 2, channels // 2, 3, padding=1)
        self.form = rng.choice(["chunk", "split", "torch-split"])
        self.reduce = rng.choice(["mean", "sum", "none"])

    def forward(self, x):
        y = self.block(x)
        half = y.size(1) // 2
        parts = y.chunk(2, dim=1) if self.form == "chunk" else (
            y.split(half, dim=1) if self.form == "split" else torch.split(y, half, 1))
        out = torch.cat([self.a(parts[0]), self.b(parts[1])], 1)
        if self.reduce == "mean":
            out = out + out.mean(1, keepdim=True)
        elif self.reduce == "sum":
            out = out * torch.sigmoid(out.sum(dim=(2, 3), keepdim=True).squeeze(-1).unsqueeze(-1))
        return out


class LinearStack(nn.Module):
    """Identity body: the model's head is the MLP (Linear -> act -> Linear -> act -> Linear)."""

    def __init__(self, channels: int, rng: random.Random) -> None:
        super().__init__()

    def forward(self, x):
        return x


BLOCK_TYPES: dict[str, type[nn.Module]] = {
    "conv": ConvBlock, "depthwise": DepthwiseSeparable, "grouped": GroupedConv, "residual": Residual,
    "concat": Concat, "se-gate": SqueezeExcite, "pools": Pools, "functional": Functional,
    "reshapes": Reshapes, "splits-reductions": SplitsAndReductions, "linear-stack": LinearStack,
}


class GeneratedNet(nn.Module):
    def __init__(self, block: str, seed: int, channels: int = 8) -> None:
        super().__init__()
        rng = random.Random(seed)
        self.stem = nn.Conv2d(INPUT_SHAPE[0], channels, 3, padding=1)
        self.stem_act = _act(rng.choice(list(ACTIVATIONS)))
        self.block = BLOCK_TYPES[block](channels, rng)
        mlp = block == "linear-stack" or rng.random() < 0.3
        if mlp:  # flatten + MLP head: Linear stacks with activations between them
            hidden = rng.choice([12, 16])
            self.head = nn.Sequential(
                nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * channels, hidden, bias=rng.random() < 0.8),
                _act(rng.choice(list(ACTIVATIONS))), nn.Linear(hidden, hidden), nn.ReLU(),
                nn.Linear(hidden, NUM_CLASSES))
        else:
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, NUM_CLASSES))

    def forward(self, x):
        return self.head(self.block(self.stem_act(self.stem(x))))


@dataclass(frozen=True)
class ModelCase:
    block: str
    seed: int

    def build(self) -> nn.Module:
        torch.manual_seed(self.seed)
        model = GeneratedNet(self.block, self.seed)
        for module in model.modules():  # non-trivial BN statistics, so folding matters
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
        return model.eval()


def generate(count: int, seed: int = 0) -> list[ModelCase]:
    """``count`` model cases, cycling through BLOCK_TYPES, each with its own derived seed."""
    names = list(BLOCK_TYPES)
    return [ModelCase(names[i % len(names)], seed * 100_003 + i) for i in range(count)]
