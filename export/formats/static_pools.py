"""Adaptive average pools with an output larger than 1, written as the fixed ``AvgPool`` they are
at the example input's size.

torch.onnx's TorchScript exporter writes ``AdaptiveAvgPool{1,2,3}d`` as ``AveragePool`` with
kernel = stride = input / output only when the traced input size is static
(``symbolic_opset9._adaptive_pool``); after an op whose traced shape is symbolic (an SE gate
``x * s.reshape(-1, C, 1, 1)`` under the dynamic batch axis) it raises "adaptive_avg_pool2d,
input size not accessible" (issue 19). An exported file has a fixed spatial size, so the same
rewrite is done before the export on a copy of the model, with Brevitas' own transform
(``brevitas.graph.per_input.AdaptiveAvgPoolToAvgPool``, which reads each pool's input size in a
forward pass). Global pools (output 1) are left alone: they export as ``GlobalAveragePool``
whatever the input size.
"""

from __future__ import annotations

import copy

import torch
from brevitas.graph.per_input import AdaptiveAvgPoolToAvgPool
from torch import nn

from ..errors import ExportError

_ADAPTIVE_AVG_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


def _output_size(pool: nn.Module) -> tuple:
    size = pool.output_size
    dims = _ADAPTIVE_AVG_POOLS.index(type(pool)) + 1
    return tuple(size) if isinstance(size, (tuple, list)) else (size,) * dims


def _is_local(pool: nn.Module) -> bool:
    """An adaptive average pool with a fixed output size that is not 1 everywhere (not a global
    pool; a ``None`` entry, "keep this axis", is left to torch.onnx)."""
    if type(pool) not in _ADAPTIVE_AVG_POOLS:
        return False
    size = _output_size(pool)
    return all(isinstance(s, int) for s in size) and any(s != 1 for s in size)


class _LocalAdaptiveAvgPoolToAvgPool(AdaptiveAvgPoolToAvgPool):
    """Brevitas' transform restricted to local pools (global ones keep their GlobalAveragePool)."""

    def register_hooks(self, model: nn.Module) -> None:
        for module in model.modules():
            if _is_local(module):
                self.hook_handlers.append(module.register_forward_pre_hook(self.hook_fn))

    def replace_modules(self, model: nn.Module, global_avgpool_unit_stride: bool = True) -> None:
        self.input_sizes = {module: tuple(size) for module, size in self.input_size_map.items()}  # kept for errors
        super().replace_modules(model, global_avgpool_unit_stride)


def with_static_pools(model: nn.Module, example_input: torch.Tensor) -> nn.Module:
    """``model`` itself when it has no local adaptive average pool; otherwise a copy in which each
    becomes the ``AvgPool`` that computes it at ``example_input``'s size.

    Raises :class:`ExportError` naming the pool when its input size is not a multiple of its
    output size (ONNX ``AveragePool`` has one kernel and stride per axis, the adaptive pool's
    windows would overlap unevenly; torch.onnx refuses the same case).
    """
    if not any(_is_local(m) for m in model.modules()):
        return model
    static = copy.deepcopy(model).eval()  # the forward that reads sizes must not update statistics
    transform = _LocalAdaptiveAvgPoolToAvgPool()
    try:
        with torch.no_grad():
            transform.apply(static, example_input)
    except RuntimeError as err:  # Brevitas: "Layer called multiple times with different input sizes."
        raise ExportError(f"cannot write the adaptive average pools as fixed AveragePool: {err}") from err
    kept = [(name, m) for name, m in static.named_modules() if m in transform.input_sizes]  # ran, not replaced
    if kept:
        name, pool = kept[0]
        raise ExportError(
            f"{type(pool).__name__} {name!r} maps an input of size "
            f"{transform.input_sizes[pool][-len(_output_size(pool)):]} to "
            f"{pool.output_size}, not a divisor of it; ONNX AveragePool (one kernel and stride per axis) cannot "
            "compute that: export at an input size divisible by the output size, or write the pool as nn.AvgPool "
            "with an explicit kernel")
    return static.train(model.training)
