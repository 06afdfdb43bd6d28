"""What the conversion quantizes around each non-compute op of a CNN, and to how many bits.

The README table "Per op, what the conversion quantizes" is this module in prose. In short:

* ReLU and ReLU6 outputs are the unsigned activation grid (``act_bits``); ReLU6 keeps its clamp
  at 6 (Brevitas' ``preprocess_for_quantize`` would turn it into a ReLU by default, which changes
  the float model wherever an activation exceeds 6).
* Hardswish and SiLU are computed in float on an 8-bit requantized input and their output is
  quantized on a signed ``act_bits`` grid (both dip below zero: -0.375 and -0.278), which is
  what the next Conv/Linear reads.
* Sigmoid and Hardsigmoid (squeeze-and-excitation gates) are computed in float on an 8-bit
  input; their output in [0, 1] is quantized unsigned at 8 bits, because it scales a whole
  channel and a 4-bit gate (steps of 1/15) would move every activation of that channel.
* Elementwise multiplies (the SE product), residual adds and concatenations take the float
  values of their inputs: each input keeps its own grid (onnxruntime's QDQ Add/Mul/Concat take
  per-input scales), and the result is requantized by whatever consumes it.
* A concatenation's output gets one quantizer shared by all its consumers (as Brevitas does for
  residual adds), so onnxruntime runs it as one QLinearConcat instead of a float Concat
  requantized once per consumer. That quantizer is unsigned when every input is an unsigned
  activation, seen through indexing (Brevitas' own rule takes a slice for a sign change).
* Resizing (``F.interpolate``, any mode: the decoders of segmentation networks) takes the float
  value of its input and its consumer requantizes, as for adds: bilinear values fall between
  grid points, and onnxruntime has no integer Resize for a QDQ model to reuse a grid with.
* Pooling, flatten and dropout add no quantizer: max pooling keeps the grid, average pooling's
  result is requantized by its consumer, dropout is removed at conversion (:func:`remove_dropout`).

Anything else in ``forward`` (another function, a weight read by a functional call, another
module type) raises :class:`UnsupportedLayerError` / :class:`UnsupportedOpError` naming it.

The 8-bit boundaries only touch values that leave the integer path for a float op; every
Conv/Linear input stays on the ``act_bits`` grid (or 8 bits at the network's edges).
"""

from __future__ import annotations

import operator
import os
import warnings
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import HDRQPluginError

with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # optional CUDA kernel missing: irrelevant here
    import brevitas.nn as qnn
    from brevitas.graph.quantize_impl import are_inputs_unsigned, output_quant_handler
    from brevitas.nn.quant_layer import QuantNonLinearActLayer

#: Float activations evaluated between a quantized input and a quantized output, with the
#: signedness of their output grid and whether that grid is a fixed 8 bits (gates).
FLOAT_ACTIVATIONS: dict[type[nn.Module], tuple[str, bool]] = {
    nn.Hardswish: ("signed", False),
    nn.SiLU: ("signed", False),
    nn.Sigmoid: ("unsigned", True),
    nn.Hardsigmoid: ("unsigned", True),
}
#: Bits of the grids around float ops: the requantized input of a float activation and a gate output.
BOUNDARY_BITS = 8
#: Functions whose inputs are fed as float values, each keeping its own grid.
ELEMENTWISE_FUNCTIONS = (operator.add, torch.add, operator.iadd, operator.mul, torch.mul, operator.imul,
                         torch.cat, torch.concat)


#: Functional activations turned into modules before quantization (Brevitas' own
#: ``TorchFunctionalToModule`` map covers relu/relu6/pools/dropout, not these).
FUNCTIONS_TO_MODULES = ((torch.relu, nn.ReLU), (F.hardswish, nn.Hardswish), (F.silu, nn.SiLU),
                        (torch.sigmoid, nn.Sigmoid), (F.sigmoid, nn.Sigmoid), (F.hardsigmoid, nn.Hardsigmoid))
#: Calls that keep a QuantTensor on its grid (Brevitas' ``QuantTensor`` implements them, and
#: Brevitas' ``are_inputs_quantized_and_aligned`` looks through them: a Conv after them gets no
#: requantizer, so they must keep passing the quantized tensor on).
GRID_PRESERVING_FUNCTIONS = (torch.flatten, torch.reshape, torch.transpose, getattr)
GRID_PRESERVING_METHODS = ("flatten", "view", "reshape", "permute", "t", "size", "dim", "contiguous")
#: Calls that move, slice, broadcast or reduce values between layers. ``QuantTensor`` implements
#: none of them (``x[:, :, None, None]`` raises TypeError, ``.unsqueeze`` AttributeError), so
#: the conversion feeds them the float value of their input (:func:`float_value_call`); Brevitas
#: does not look through them, so whatever consumes their result gets its own requantizer.
FLOAT_VALUE_FUNCTIONS = (*ELEMENTWISE_FUNCTIONS, operator.getitem, torch.squeeze, torch.unsqueeze,
                         torch.permute, torch.chunk, torch.split, torch.mean, torch.sum,
                         # arithmetic: on sizes (``x.size(1) // 2``) or scaling values (``x / 6``)
                         operator.sub, operator.truediv, operator.floordiv, operator.neg,
                         # resizing (U-Net/DeepLab decoders): bilinear makes off-grid values, so
                         # every mode is fed the float value and its consumer requantizes
                         F.interpolate)
FLOAT_VALUE_METHODS = ("add", "add_", "mul", "mul_", "squeeze", "unsqueeze", "expand", "expand_as",
                       "chunk", "split", "mean", "sum", "transpose")
#: Functions that make constants (``x - torch.tensor([1.0], device=x.device)``); exported as such.
CONSTANT_FUNCTIONS = (torch.tensor, torch.zeros, torch.ones, torch.full)
#: Functions and tensor methods a traced model may call besides modules.
SUPPORTED_FUNCTIONS = (*GRID_PRESERVING_FUNCTIONS, *FLOAT_VALUE_FUNCTIONS, *CONSTANT_FUNCTIONS)
SUPPORTED_METHODS = (*GRID_PRESERVING_METHODS, *FLOAT_VALUE_METHODS)


def float_value_call(node) -> bool:
    """Whether ``node`` is a call whose tensor inputs the conversion feeds as float values."""
    return (node.op == "call_function" and node.target in FLOAT_VALUE_FUNCTIONS) or \
        (node.op == "call_method" and node.target in FLOAT_VALUE_METHODS)


_SPATIAL_DIMS = ((2, 3), (3, 2), (-2, -1), (-1, -2))


def remove_dropout(graph_model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Drop every dropout and ``nn.Identity`` module call: the quantized model is an inference
    model (Brevitas' ``RemoveStochasticModules`` only removes stochastic depth), and an identity
    between a layer and the output would get a requantizer of its own."""
    graph = graph_model.graph
    for node in list(graph.nodes):
        module = graph_model.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, nn.modules.dropout._DropoutNd) or type(module) is nn.Identity:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            graph_model.delete_submodule(node.target)
    graph.lint()
    graph_model.recompile()
    return graph_model


def functions_to_modules(graph_model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Replace functional activations (FUNCTIONS_TO_MODULES) by module calls on their input.

    Hand-written rather than Brevitas' ``FnToModule``: that one forwards every keyword
    (``torch.sigmoid(x, out=None)`` as traced), which the modules do not accept; the keywords
    these functions take (``out``, ``inplace``) do not change an eval-mode result.
    """
    graph = graph_model.graph
    mapping = dict(FUNCTIONS_TO_MODULES)
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in mapping:
            continue
        name = node.name
        while hasattr(graph_model, name):
            name += "_"
        _replace_with_module(graph_model, node, name, mapping[node.target]())
    graph.lint()
    graph_model.recompile()
    return graph_model


def _replace_with_module(graph_model: torch.fx.GraphModule, node, name: str, module: nn.Module) -> None:
    """Swap a call node for a call of ``module`` (registered as ``name``) on its first argument."""
    graph_model.add_module(name, module)
    with graph_model.graph.inserting_before(node):
        module_node = graph_model.graph.call_module(name, (node.args[0],))
    module_node.meta = dict(node.meta)
    node.replace_all_uses_with(module_node)
    graph_model.graph.erase_node(node)


def spatial_means_to_pools(graph_model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``x.mean((2, 3), keepdim=True)`` (the usual SE squeeze) -> ``nn.AdaptiveAvgPool2d(1)``.

    Brevitas' ``MeanMethodToAdaptiveAvgPool2d`` rewrites only the ``keepdim=False`` form.
    """
    graph = graph_model.graph
    for node in list(graph.nodes):
        is_mean = (node.op == "call_method" and node.target == "mean") or \
                  (node.op == "call_function" and node.target is torch.mean)
        if not is_mean:
            continue
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        if not keepdim or not isinstance(dims, (tuple, list)) or tuple(dims) not in _SPATIAL_DIMS:
            continue
        _replace_with_module(graph_model, node, f"{node.name}_pool", nn.AdaptiveAvgPool2d(1))
    graph.lint()
    graph_model.recompile()
    return graph_model


def check_supported_calls(graph_model: torch.fx.GraphModule, source_lines: dict[str, str] | None = None) -> None:
    """Raise naming the first function or method call the conversion cannot quantize.

    ``source_lines`` maps graph node names to the line of ``forward`` that made them, where known.
    """
    source_lines = source_lines or {}
    for node in graph_model.graph.nodes:
        if node.op == "call_function" and node.target not in SUPPORTED_FUNCTIONS:
            name = f"{getattr(node.target, '__module__', '')}.{getattr(node.target, '__name__', node.target)}"
            raise UnsupportedOpError(node.name, name, source_lines.get(node.name))
        if node.op == "call_method" and node.target not in SUPPORTED_METHODS:
            raise UnsupportedOpError(node.name, f"Tensor.{node.target}", source_lines.get(node.name))


def forward_source_lines(model: nn.Module) -> dict[str, str]:
    """Graph node name -> ``file, line N: code`` of the ``forward`` line that made it.

    Brevitas' tracer records no stack traces; a plain ``torch.fx`` trace with
    ``record_stack_traces`` names call nodes the same way (one name per call, in call order), so
    its lines are matched by name. Empty when the model does not trace with plain ``torch.fx``.
    """
    tracer = torch.fx.Tracer()
    tracer.record_stack_traces = True
    try:
        graph = tracer.trace(model)
    except Exception:  # only a better message is at stake; the conversion's own trace decides
        return {}
    torch_dir = os.path.dirname(torch.__file__)
    lines = {}
    for node in graph.nodes:
        trace = [line.strip() for line in (node.stack_trace or "").strip().splitlines()]
        user = [i for i, line in enumerate(trace) if line.startswith("File ") and torch_dir not in line]
        if user:
            last = user[-1]
            code = trace[last + 1] if last + 1 < len(trace) and not trace[last + 1].startswith("File ") else ""
            lines[node.name] = f"{trace[last].removeprefix('File ')}: {code}" if code else trace[last].removeprefix("File ")
    return lines


class UnsupportedLayerError(HDRQPluginError, TypeError):
    """The float model contains a layer the conversion cannot quantize."""


class UnsupportedOpError(UnsupportedLayerError):
    """A function or method call in ``forward`` that the conversion cannot quantize."""

    def __init__(self, node: str, op: str, source_line: str | None = None) -> None:
        where = f" at {source_line}" if source_line else ""
        methods = sorted(set(GRID_PRESERVING_METHODS + FLOAT_VALUE_METHODS) - {"t", "dim", "size"})
        super().__init__(
            f"op {op} (graph node {node!r}){where} is not supported by the conversion; write it as one of "
            f"the supported modules ({', '.join(sorted(t.__name__ for t in FLOAT_ACTIVATIONS))}, ReLU, "
            f"ReLU6, pooling, Flatten, Dropout), as add/mul/cat, indexing with slices and None, or one "
            f"of the tensor methods {', '.join(methods)}")


class SignedActivationGrid(nn.Identity):
    """Marks where a Brevitas model quantized an activation on a signed grid (a ``QuantIdentity``
    whose quantizer is the nonlinearity, as in the bnn_pynq models): the conversion puts a signed
    activation quantizer here, and :func:`hdrq_plugin.convert.adopt_brevitas_model` its bit width."""

    def __init__(self, bits: int = 8) -> None:
        super().__init__()
        self.bits = bits


class UnsignedActivationGrid(SignedActivationGrid):
    """The same on an unsigned grid."""


class ReLU6Clamp(nn.Module):
    """``min(max(x, 0), 6)``. Not an ``nn.ReLU6``: Brevitas disables any ``nn.Hardtanh`` subclass
    given as ``act_impl`` next to a quantizer, on the assumption that the quantizer clamps there."""

    def __init__(self) -> None:  # explicit: Brevitas' injector rejects an inherited *args signature
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x)


class QuantReLU6(QuantNonLinearActLayer):
    """ReLU6 followed by an unsigned activation quantizer (Brevitas' ``QuantReLU`` drops the clamp).

    Exported as ``Clip(0, 6) -> QuantizeLinear``; :mod:`hdrq_plugin.export.rewrites.integer_path` removes
    the Clip whenever the grid saturates at or below 6, so onnxruntime fuses the conv before it.
    """

    def __init__(self, act_quant=None, input_quant=None, return_quant_tensor: bool = False, **kwargs) -> None:
        QuantNonLinearActLayer.__init__(
            self, act_impl=ReLU6Clamp, passthrough_act=False, input_quant=input_quant, act_quant=act_quant,
            return_quant_tensor=return_quant_tensor, **kwargs)


def quantize_float_activation_outputs(graph_model: torch.fx.GraphModule, identity_map: dict,
                                      gate_quant) -> torch.fx.GraphModule:
    """Insert a quantizer after every float activation (FLOAT_ACTIVATIONS), named ``<node>_quant``.

    ``identity_map`` holds Brevitas' ``signed``/``unsigned`` QuantIdentity specs at ``act_bits``;
    ``gate_quant`` is the unsigned 8-bit quantizer class for Sigmoid/Hardsigmoid gates. Run it
    before Brevitas' ``layer_handler``, so a Conv that reads the activation sees a quantized input.
    """
    graph = graph_model.graph
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        module = graph_model.get_submodule(node.target)
        kind = FLOAT_ACTIVATIONS.get(type(module))
        if kind is None:
            continue
        sign, is_gate = kind
        quant_class, kwargs = identity_map[sign]
        if is_gate:
            kwargs = {**kwargs, "act_quant": gate_quant}
        name = f"{node.name}_quant"
        graph_model.add_module(name, quant_class(**kwargs))
        users = list(node.users)
        with graph.inserting_after(node):
            quant_node = graph.call_module(name, (node,))
        quant_node.meta = dict(node.meta)  # same enclosing block, for reconstruction units
        for user in users:
            user.replace_input_with(node, quant_node)
    graph.lint()
    graph_model.recompile()
    return graph_model


def _unsigned_through_indexing(graph_model: torch.fx.GraphModule, node: torch.fx.Node, act_map: dict,
                               unsigned_act_tuple: tuple) -> bool:
    """Whether every input of ``node`` is an unsigned activation, seen through indexing.

    Brevitas' ``are_inputs_unsigned`` treats ``operator.getitem`` as sign-changing, so a slice of
    a ReLU output (a U-Net cropping its up-convolution to an odd-sized skip) would make the concat
    requantize on a signed grid, one bit lost. A slice selects values and keeps their sign.
    """
    sources = []
    for source in node.all_input_nodes:
        while source.op == "call_function" and source.target is operator.getitem:
            source = source.args[0]
        sources.append(source)
    # Brevitas' own rule, asked about the sliced values' sources (it reads only ``all_input_nodes``)
    return are_inputs_unsigned(graph_model, SimpleNamespace(all_input_nodes=sources), [], act_map, unsigned_act_tuple)


def quantize_concat_outputs(graph_model: torch.fx.GraphModule, identity_map: dict, act_map: dict,
                            unsigned_act_tuple: tuple) -> torch.fx.GraphModule:
    """One requantizer after every ``torch.cat`` (Brevitas' ``output_quant_handler``, the rule it
    applies to adds: unsigned when every input is, else signed)."""
    rewriters: list = []
    for node in graph_model.graph.nodes:
        if node.op == "call_function" and node.target in (torch.cat, torch.concat):
            node_map = identity_map
            if _unsigned_through_indexing(graph_model, node, act_map, unsigned_act_tuple):
                node_map = {**identity_map, "signed": identity_map["unsigned"]}
            output_quant_handler(graph_model, node, rewriters, is_sign_preserving=True,
                                 quant_identity_map=node_map, quant_act_map=act_map,
                                 unsigned_act_tuple=unsigned_act_tuple)
    for rewriter in rewriters:
        graph_model = rewriter.apply(graph_model)
    return graph_model


def widen_float_activation_inputs(graph_model: torch.fx.GraphModule, set_bits) -> list[str]:
    """Give the requantizer Brevitas put in front of each float activation ``BOUNDARY_BITS`` bits.

    Those values only feed a float op (they cost no multiply-accumulate), so a narrow grid there
    would add rounding error for nothing. Returns the names of the widened quantizers.
    """
    widened = []
    for node in graph_model.graph.nodes:
        if node.op != "call_module" or not isinstance(graph_model.get_submodule(node.target), qnn.QuantIdentity):
            continue
        users = list(node.users)
        if users and all(u.op == "call_module" and type(graph_model.get_submodule(u.target)) in FLOAT_ACTIVATIONS
                         for u in users):
            set_bits(graph_model.get_submodule(node.target).act_quant, BOUNDARY_BITS)
            widened.append(node.target)
    return widened
