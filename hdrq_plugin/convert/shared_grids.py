"""One grid per activation: a layer reads an already quantized activation on that activation's grid.

Brevitas' ``layer_handler`` gives every ``QuantLinear`` its own (signed) input quantizer, because
a Linear usually follows pooling, whose output is off any grid. After a ReLU, a requantizer or a
gate, though, the Linear's input is already on an integer grid, and a second quantizer there
rounds the same tensor twice: the ONNX file then holds ``Q -> DQ -> Q -> DQ`` with two scales.
That is a correct file, but onnxruntime's ``DoubleQDQPairsRemover`` (ORT_ENABLE_EXTENDED and
above) merges the two pairs into one and the fused QGemm runs at the merged input scale while its
Int32 bias stays quantized for the old one: a different function (issue 19, measured top-1
agreement 10/64 on a W8A8 MLP head). Re-rounding an integer grid also only adds error.

So a compute layer whose input comes from an enabled activation quantizer, directly or through
ops that only move values (flatten, view/reshape, max pooling), loses its own input quantizer
and reads the producer's codes, as a Conv already does after a ReLU.
"""

from __future__ import annotations

import operator
import warnings

import torch
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # optional CUDA kernel missing: irrelevant here
    import brevitas.nn as qnn
    from brevitas.nn.mixin.act import QuantInputMixin
    from brevitas.nn.quant_layer import QuantNonLinearActLayer

#: Ops that keep every value (and so the grid) of their first argument.
GRID_KEEPING_FUNCTIONS = (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, operator.getitem)
GRID_KEEPING_METHODS = ("flatten", "view", "reshape", "squeeze", "unsqueeze", "contiguous")
GRID_KEEPING_MODULES = (nn.Flatten, nn.Identity, nn.MaxPool1d, nn.MaxPool2d)


def _grid_keeping(graph_model: torch.fx.GraphModule, node) -> bool:
    if node.op == "call_function":
        return node.target in GRID_KEEPING_FUNCTIONS
    if node.op == "call_method":
        return node.target in GRID_KEEPING_METHODS
    return node.op == "call_module" and isinstance(graph_model.get_submodule(node.target), GRID_KEEPING_MODULES)


def quantizing_producer(graph_model: torch.fx.GraphModule, node) -> str | None:
    """The activation quantizer module whose codes reach ``node``'s first input unchanged, if any."""
    node_type = type(node)  # Brevitas traces with its backported FX Node, not torch.fx.Node
    source = node.args[0] if node.args else None
    while isinstance(source, node_type):
        if source.op == "call_module":
            module = graph_model.get_submodule(source.target)
            if isinstance(module, (QuantNonLinearActLayer, qnn.QuantIdentity)):
                enabled = module.act_quant.is_quant_enabled and module.return_quant_tensor
                return source.target if enabled else None
        if not _grid_keeping(graph_model, source):
            return None
        source = source.args[0] if source.args else None
    return None


def share_activation_grids(graph_model: torch.fx.GraphModule) -> dict[str, str]:
    """Drop the input quantizer of every compute layer that reads an already quantized activation.

    Returns ``{layer: producer}`` for the layers changed. Run after Brevitas' ``layer_handler``.
    """
    shared = {}
    for node in graph_model.graph.nodes:
        if node.op != "call_module":
            continue
        layer = graph_model.get_submodule(node.target)
        proxy = getattr(layer, "input_quant", None)
        if not isinstance(layer, QuantInputMixin) or proxy is None or not proxy.is_quant_enabled:
            continue
        producer = quantizing_producer(graph_model, node)
        if producer is not None:
            QuantInputMixin.__init__(layer, None)  # Brevitas' own "no input quantizer" proxy
            shared[node.target] = producer
    return shared
