"""The integer codes of every quantized activation, read on both sides of an export.

Parity between onnxruntime and Brevitas is checked where the two compute on the same integer
grid: the output of every activation quantizer. On the ONNX side these are the activation
``QuantizeLinear`` nodes (followed by Brevitas' ``Clip`` for sub-8-bit grids), whose outputs
are added as extra graph outputs of a second session (the computation is unchanged: the fused
integer kernels write those very tensors). On the PyTorch side they are the outputs of every
enabled Brevitas activation-quantizer proxy, read with forward hooks. The two lists are
aligned by execution order and every pair must have the same scale, so a misaligned pair is
an error, never a silent comparison of unrelated tensors.

Codes are compared *centred*: ``q - zero_point``, so the uint8+128 storage of signed grids
(:mod:`.unsigned_grids`) compares equal to Brevitas' signed integers.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch
from brevitas.proxy.runtime_quant import ActQuantProxyFromInjectorBase
from brevitas.quant_tensor import QuantTensor
from onnx import numpy_helper
from torch import nn

from ..errors import ValidationError
from ..graph_facts import consumers, initializers
from ..rewrites.integer_path import COPIED_QUANTIZE_SUFFIXES
from .ort_runtime import DEPLOYED_LEVEL, session_options

_SCALE_RTOL = 1e-6  # scales are the same float32 numbers on both sides; this only absorbs printing


@dataclass(frozen=True)
class QuantizeSite:
    """One activation QuantizeLinear of the ONNX graph: where its codes are read, on what grid."""

    node: str
    codes_tensor: str  # the QuantizeLinear output, or the Clip after it
    scale: float
    zero_point: int


def activation_quantize_sites(model: onnx.ModelProto) -> list[QuantizeSite]:
    """Activation QuantizeLinear nodes in graph (= execution) order; weights are initializers."""
    graph = model.graph
    inits, users = initializers(graph), consumers(graph)
    sites = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits or node.name.endswith(COPIED_QUANTIZE_SUFFIXES):
            continue  # weights are initializers; copies before a reshape repeat the quantizer after it
        scale = numpy_helper.to_array(inits[node.input[1]]) if node.input[1] in inits else None
        if scale is None or scale.size != 1:
            raise ValidationError(f"activation QuantizeLinear {node.name!r} has no constant per-tensor scale")
        zero_point = (numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2]
                      else np.zeros((), np.uint8))
        codes = node.output[0]
        following = users.get(codes, [])
        if len(following) == 1 and following[0].op_type == "Clip":
            codes = following[0].output[0]
        sites.append(QuantizeSite(node.name or codes, codes, float(scale.reshape(-1)[0]),
                                  int(zero_point.reshape(-1)[0])))
    return sites


class OnnxCodeReader:
    """The file as deployed, plus a second session that also returns every activation's codes.

    The output is taken from the untouched file: extra graph outputs can change which
    fusions onnxruntime applies (an int8 QuantizeLinear that is a graph output is not turned
    into uint8, so the layer after it runs another kernel), so the instrumented session is used
    for codes only, to locate where the two sides part.
    """

    def __init__(self, path: str | os.PathLike, threads: int, level: str = DEPLOYED_LEVEL) -> None:
        model = onnx.load(str(path))
        self.sites = activation_quantize_sites(model)
        self.path, self.level = str(path), level
        options = session_options(threads, level=level)
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        present = {output.name for output in model.graph.output}
        for site in self.sites:
            if site.codes_tensor not in present:
                model.graph.output.append(onnx.ValueInfoProto(name=site.codes_tensor))
                present.add(site.codes_tensor)
        self._instrumented = ort.InferenceSession(model.SerializeToString(), options,
                                                  providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self._names = [output.name for output in self._instrumented.get_outputs()]

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """Output of the deployed graph, output of the instrumented twin, and the twin's centred
        codes (int16) of every activation quantizer."""
        output = self.session.run(None, {self.input_name: x})[0]
        values = dict(zip(self._names, self._instrumented.run(None, {self.input_name: x}), strict=True))
        codes = [values[site.codes_tensor].astype(np.int16) - np.int16(site.zero_point) for site in self.sites]
        return output, values[self._names[0]], codes


@dataclass
class CapturedActivation:
    """One activation-quantizer call of the Brevitas model on a batch."""

    name: str
    scale: torch.Tensor
    codes: np.ndarray  # centred integer codes, int16
    grid_value: torch.Tensor | None  # the pre-rounding value in steps, when asked for


def _enabled_activation_proxies(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, ActQuantProxyFromInjectorBase) and module.is_quant_enabled:
            yield name, module


class EnoughActivations(Exception):
    """Raised by :func:`capture_activation_codes` once ``stop_after`` quantizers have run: the
    rest of the forward is not needed (e.g. a float64 run read only up to a sample's first
    diverging layer)."""


@contextlib.contextmanager
def capture_activation_codes(model: nn.Module, keep_grid_values: bool = False,
                             stop_after: int | None = None) -> Iterator[list[CapturedActivation]]:
    """Record every enabled activation quantizer's output codes while the block runs the model.

    ``keep_grid_values`` also records ``activation(x) / scale``, the value the quantizer rounds
    (for QuantReLU-style proxies the fused activation is applied first), in the model's dtype.
    ``stop_after``: raise :class:`EnoughActivations` out of the forward once that many are recorded.
    """
    records: list[CapturedActivation] = []

    def hook(proxy, inputs, output):
        if not isinstance(output, QuantTensor):
            return
        scale = output.scale.detach()
        codes = torch.round(output.value.detach() / scale)
        grid_value = None
        if keep_grid_values:
            x = inputs[0].value if isinstance(inputs[0], QuantTensor) else inputs[0]
            fused = getattr(proxy, "fused_activation_quant_proxy", None)
            activation = getattr(fused, "activation_impl", None)
            x = activation(x) if activation is not None else x
            grid_value = (x.detach() / scale).to(torch.float64)
        records.append(CapturedActivation(proxy._hdrq_name, scale, codes.to(torch.int16).numpy(), grid_value))
        if stop_after is not None and len(records) >= stop_after:
            raise EnoughActivations

    handles = []
    for name, proxy in _enabled_activation_proxies(model):
        proxy._hdrq_name = name
        handles.append(proxy.register_forward_hook(hook))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def alignment_problems(captured: list[CapturedActivation], sites: list[QuantizeSite]) -> list[str]:
    """Why the Brevitas calls and the ONNX QuantizeLinear nodes do not pair up (empty: they do).

    A different count means the file has another structure; a different scale means the file
    quantizes that activation on another grid than the model does (an export error).
    """
    if len(captured) != len(sites):
        return [f"the model ran {len(captured)} activation quantizers but the file has {len(sites)} "
                "activation QuantizeLinear nodes (a different structure)"]
    problems = []
    for record, site in zip(captured, sites, strict=True):
        scale = record.scale.reshape(-1)
        if scale.numel() != 1 or not np.isclose(float(scale[0]), site.scale, rtol=_SCALE_RTOL, atol=0.0):
            problems.append(f"activation scale of {record.name} is {scale.tolist()} in the model but "
                            f"{site.scale:.9g} in the file (node {site.node})")
    return problems
