"""Reconstruction units: the pieces of a Brevitas FX model that block-wise PTQ trains one at a time.

A unit is a residual block — a submodule of the *original* float model that has its own
``forward`` (not a ``Sequential``/``ModuleList`` container) and contains Conv/Linear layers —
or, outside any such block, a single Conv/Linear layer (docs/hdrq_method.md §4; BRECQ/QDrop's "block").
With ``granularity="layer"`` every Conv/Linear layer is its own unit (AdaRound).

The original hierarchy is read from the ``nn_module_stack`` metadata FX tracing leaves on each
node (``quantize`` flattens ``Sequential`` containers into plain modules, so the module tree of
the GraphModule itself no longer says where a block starts). Nodes outside any block — the
``QuantIdentity`` quantizers Brevitas inserts (``x_quant``, ``add_quant``), functional adds,
ReLUs, ``flatten`` — join the latest unit among their inputs, except that an inserted node (one
written in no module's forward: an input quantizer, a ``dequantized`` before an add) whose users
all sit in one later unit is that unit's input stage and joins it.

Each unit is a small runnable GraphModule sharing the model's own modules (parameters are the
same objects, not copies). ``torch.fx.passes.split_module`` would do this but fails on Brevitas'
backported-FX graphs (NameError on ``flatten``), hence the hand-built sub-graphs.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..convert.to_brevitas import COMPUTE_LAYERS, UnsupportedLayerError

with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # optional CUDA kernel missing: irrelevant here
    from brevitas.backport import fx as brevitas_fx

#: Layers whose weights the engine reconstructs (the conversion's compute layers).
RECONSTRUCTABLE_LAYERS: tuple[type[nn.Module], ...] = COMPUTE_LAYERS
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
Granularity = Literal["block", "layer"]


@dataclass(frozen=True)
class ReconstructionUnit:
    """One runnable piece of the model, in forward order.

    ``inputs``/``outputs`` are names of values of the whole model's graph: the unit consumes
    ``inputs`` (model inputs or earlier units' outputs) and produces ``outputs`` (used by later
    units or returned by the model). ``module(*inputs)`` returns one value, or a tuple when the
    unit has several outputs; :meth:`run` always returns a tuple.
    """

    name: str
    module: torch.nn.Module
    layers: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    def run(self, *inputs: Any) -> tuple:
        result = self.module(*inputs)
        return tuple(result) if len(self.outputs) > 1 else (result,)

    def layer_modules(self, qmodel: nn.Module) -> list[tuple[str, nn.Module]]:
        """The unit's Conv/Linear layers as ``(qualified name, module)`` of ``qmodel``."""
        return [(name, qmodel.get_submodule(name)) for name in self.layers]


def find_reconstruction_units(qmodel: nn.Module, granularity: Granularity = "block") -> list[ReconstructionUnit]:
    """Split a Brevitas FX GraphModule into reconstruction units, in forward order."""
    graph = _graph_of(qmodel)
    if granularity not in ("block", "layer"):
        raise ValueError(f"granularity must be 'block' or 'layer', got {granularity!r}")
    check_reconstructable(qmodel)
    unit_of, names = _assign_nodes(qmodel, graph, granularity)
    members: list[list] = [[] for _ in names]
    for node in graph.nodes:
        if node in unit_of:
            members[unit_of[node]].append(node)
    return [_build_unit(qmodel, name, nodes) for name, nodes in zip(names, members, strict=True)]


def check_reconstructable(qmodel: nn.Module) -> None:
    """Raise :class:`UnsupportedLayerError` naming the first layer with parameters the engine cannot train."""
    graph = _graph_of(qmodel)
    supported = ", ".join(t.__name__ for t in RECONSTRUCTABLE_LAYERS)
    hint = (f"supported layers with weights: {supported}; parameter-free modules (activations, "
            "quantizers, pooling, reshapes) and functional adds/ReLUs may appear anywhere")
    for node in graph.nodes:
        if node.op == "call_module":
            module = qmodel.get_submodule(node.target)
            if isinstance(module, RECONSTRUCTABLE_LAYERS):
                continue
            if any(p is not None for p in module._parameters.values()):
                raise UnsupportedLayerError(
                    f"layer {node.target!r} of type {type(module).__name__} has parameters the "
                    f"reconstruction engine cannot train; {hint}")
        elif node.op == "get_attr" and isinstance(_attr(qmodel, node.target), nn.Parameter):
            raise UnsupportedLayerError(
                f"parameter {node.target!r} is used by a functional call; {hint}")
    if not any(isinstance(qmodel.get_submodule(n.target), RECONSTRUCTABLE_LAYERS)
               for n in graph.nodes if n.op == "call_module"):
        raise UnsupportedLayerError(f"the model has no layer to reconstruct; {hint}")


def run_units(units: Iterable[ReconstructionUnit], values: dict[str, Any]) -> dict[str, Any]:
    """Run ``units`` in order on named model inputs; return every value they produce, by name."""
    values = dict(values)
    for unit in units:
        missing = [name for name in unit.inputs if name not in values]
        if missing:
            raise KeyError(f"unit {unit.name!r} needs values {missing} that no earlier unit produced")
        values.update(zip(unit.outputs, unit.run(*(values[name] for name in unit.inputs)), strict=True))
    return values


def run_model_through_units(qmodel: nn.Module, units: list[ReconstructionUnit], *inputs: Any) -> Any:
    """The model's output computed unit by unit (equal to ``qmodel(*inputs)`` by construction)."""
    graph = _graph_of(qmodel)
    placeholders = [n.name for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != len(placeholders):
        raise TypeError(f"the model takes {len(placeholders)} inputs {placeholders}, got {len(inputs)}")
    values = run_units(units, dict(zip(placeholders, inputs, strict=True)))
    output = next(n for n in graph.nodes if n.op == "output")
    return brevitas_fx.map_arg(output.args[0], lambda n: values[n.name])


# --- node → unit assignment -------------------------------------------------------------------

def _graph_of(qmodel: nn.Module):
    graph = getattr(qmodel, "graph", None)
    if graph is None or not hasattr(graph, "nodes"):
        raise TypeError(
            f"expected an FX GraphModule from hdrq_plugin.convert_to_brevitas (Brevitas quantize), "
            f"got {type(qmodel).__name__}")
    return graph


def _attr(module: nn.Module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _stack(node) -> list[tuple[str, type]]:
    """``(qualified path, class)`` of the original modules enclosing ``node``, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    entries = []
    for key, value in stack.items():
        # the backport stores {path: class}; newer torch stores {key: (path, class)}
        path, cls = value if isinstance(value, tuple) else (key, value)
        entries.append((path, cls))
    return entries


def _is_compute(qmodel, node) -> bool:
    return node.op == "call_module" and isinstance(qmodel.get_submodule(node.target), RECONSTRUCTABLE_LAYERS)


def _anchor_path(node, granularity: Granularity) -> str:
    """The unit a Conv/Linear node belongs to: its outermost non-container ancestor (or itself)."""
    if granularity == "layer":
        return node.target
    stack = _stack(node)
    if not stack:
        raise ValueError(
            f"node {node.name!r} carries no nn_module_stack metadata, so residual blocks cannot "
            "be found; trace the model with Brevitas' preprocess_for_quantize, or use "
            "granularity='layer'")
    for path, cls in stack:
        if not issubclass(cls, _CONTAINERS):
            return path
    return node.target


def _assign_nodes(qmodel, graph, granularity: Granularity) -> tuple[dict, list[str]]:
    nodes = list(graph.nodes)
    anchors: dict[str, int] = {}  # unit path → unit index, in order of first Conv/Linear
    unit_of: dict = {}
    layer_unit: dict[str, int] = {}
    for node in nodes:
        if _is_compute(qmodel, node):
            path = _anchor_path(node, granularity)
            index = anchors.setdefault(path, len(anchors))
            if layer_unit.setdefault(node.target, index) != index:
                raise UnsupportedLayerError(
                    f"layer {node.target!r} is called from two units ({list(anchors)[layer_unit[node.target]]!r} "
                    f"and {path!r}); shared layers across units cannot be reconstructed")
            unit_of[node] = index
    fixed = set(unit_of)
    if granularity == "block":  # adds, ReLUs, ... written inside a block's forward belong to it
        for node in nodes:
            if node not in fixed and node.op in ("call_module", "call_function", "call_method"):
                inside = [anchors[p] for p, _ in _stack(node) if p in anchors]
                if inside:
                    unit_of[node] = inside[0]
                    fixed.add(node)

    def latest_input_unit(node):
        units = [unit_of[a] for a in node.all_input_nodes if a in unit_of]
        return max(units) if units else None

    floating = [n for n in nodes if n not in fixed and n.op in ("call_module", "call_function", "call_method")]
    for node in floating:  # join the latest unit among the inputs
        unit = latest_input_unit(node)
        if unit is not None:
            unit_of[node] = unit
    for node in reversed(floating):  # an input quantizer joins the unit it feeds
        user_units = {unit_of.get(u) for u in node.users}
        own = unit_of.get(node)
        if own is None and user_units - {None}:  # fed by model inputs only
            unit_of[node] = min(user_units - {None})
        elif len(user_units) == 1 and not _stack(node):
            (target,) = user_units
            if target is not None and target > own:
                unit_of[node] = target
    for node in nodes:  # no value may flow from a later unit back to an earlier one
        if node in unit_of:
            late = latest_input_unit(node)
            if late is not None and late > unit_of[node]:
                if node in fixed:
                    names = list(anchors)
                    raise ValueError(
                        f"node {node.name!r} of unit {names[unit_of[node]]!r} consumes a value of "
                        f"the later unit {names[late]!r}; the blocks of this model cannot be "
                        "reconstructed in forward order (try granularity='layer')")
                unit_of[node] = late
    for node in floating:
        if node not in unit_of:
            raise ValueError(f"node {node.name!r} depends on no unit and feeds none; cannot place it")
    return unit_of, list(anchors)


# --- sub-graph construction -----------------------------------------------------------------------

def _build_unit(qmodel, name: str, nodes: list) -> ReconstructionUnit:
    graph = type(qmodel.graph)()
    members = set(nodes)
    inputs: list = []
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in members and arg.op != "get_attr" and arg not in inputs:
                inputs.append(arg)
    env = {arg: graph.placeholder(arg.name) for arg in inputs}
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg.op == "get_attr" and arg not in env:  # constants are replicated per unit
                env[arg] = graph.node_copy(arg)
        env[node] = graph.node_copy(node, lambda n: env[n])
    outputs = [n for n in nodes if any(user not in members for user in n.users)]
    if not outputs:
        raise ValueError(f"unit {name!r} produces nothing that the rest of the model uses")
    graph.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[n] for n in outputs))
    module_class = brevitas_fx.GraphModule if isinstance(graph, brevitas_fx.Graph) else torch.fx.GraphModule
    module = module_class(qmodel, graph, class_name=f"Unit_{name.replace('.', '_')}")
    layers = tuple(dict.fromkeys(n.target for n in nodes if _is_compute(qmodel, n)))
    return ReconstructionUnit(name=name, module=module, layers=layers,
                              inputs=tuple(a.name for a in inputs), outputs=tuple(n.name for n in outputs))
