"""Float CNN → Brevitas model, the Brevitas way (``preprocess_for_quantize`` + ``quantize``).

Every method in this project starts from the same conversion so that the quantized models of
different targets share one architecture, one set of module names and one quantizer layout —
the precondition for merging them. BatchNorm is folded by Brevitas' ``MergeBatchNorm`` pass;
cross-layer equalisation is *off*, because it rescales each model's channels differently and
would break the alignment that weight averaging relies on.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..bitspec import BitSpec, split_quantizer_prefix
from ..data import iterate_inputs, plain_tensor
from ..families import QuantizerFamily, family_for_prefix, loaded_families
from ..quant.control import quantized_layers
from .op_policy import (
    BOUNDARY_BITS,
    FLOAT_ACTIVATIONS,
    QuantReLU6,
    SignedActivationGrid,
    UnsignedActivationGrid,
    UnsupportedLayerError,
    UnsupportedOpError,
    check_supported_calls,
    float_value_call,
    forward_source_lines,
    functions_to_modules,
    quantize_concat_outputs,
    quantize_float_activation_outputs,
    remove_dropout,
    spatial_means_to_pools,
    widen_float_activation_inputs,
)
from .shared_grids import share_activation_grids

with warnings.catch_warnings():
    # Brevitas warns at import when an optional CUDA Hadamard kernel is missing; irrelevant here.
    warnings.simplefilter("ignore", UserWarning)
    import brevitas.nn as qnn
    from brevitas import config as brevitas_config
    from brevitas.core.scaling import ScalingImplType
    from brevitas.fx import Tracer as BackportTracer
    from brevitas.fx.brevitas_tracer import _symbolic_trace
    from brevitas.fx.value_tracer import UnsetValueException
    from brevitas.graph.calibrate import calibration_mode
    from brevitas.graph.quantize import (
        COMPUTE_LAYER_MAP,
        QUANT_ACT_MAP,
        UNSIGNED_ACT_TUPLE,
        preprocess_for_quantize,
    )
    from brevitas.graph.quantize_impl import (
        act_handler,
        add_output_quant_handler,
        inp_placeholder_handler,
        layer_handler,
    )
    from brevitas.quant import (
        Int8ActPerTensorFloat,
        Int8WeightPerChannelFloat,
        Int8WeightPerTensorFloat,
        Int32Bias,
        Uint8ActPerTensorFloat,
    )

#: Leaf module types the conversion knows how to handle (compute layers, folded BN, activations
#: (op_policy says what is quantized around each), and shape/pooling/dropout ops).
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear,
    nn.BatchNorm1d, nn.BatchNorm2d,
    nn.ReLU, nn.ReLU6, *FLOAT_ACTIVATIONS,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.Flatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    SignedActivationGrid, UnsignedActivationGrid,
)
COMPUTE_LAYERS = (qnn.QuantConv1d, qnn.QuantConv2d, qnn.QuantConvTranspose2d, qnn.QuantLinear)

#: Default weight quantizers: Brevitas' per-tensor / per-channel float-scale quantizers with the
#: scale turned into a learnable parameter initialised from max-abs statistics, so merges and
#: reconstruction can read and set it; full signed range [-2^(b-1), 2^(b-1)-1] (docs/hdrq_method.md §3).
RTNWeightPerTensor = Int8WeightPerTensorFloat.let(
    scaling_impl_type=ScalingImplType.PARAMETER_FROM_STATS, narrow_range=False)
RTNWeightPerChannel = Int8WeightPerChannelFloat.let(
    scaling_impl_type=ScalingImplType.PARAMETER_FROM_STATS, narrow_range=False)


def check_supported(model: nn.Module) -> None:
    """Raise :class:`UnsupportedLayerError` naming the first unsupported leaf layer."""
    for name, module in model.named_modules():
        if list(module.children()):
            continue
        if not type(module).__module__.startswith("torch.nn") and not isinstance(module, SUPPORTED_LAYERS):
            continue  # the user's own module: FX traces through its forward, and the graph is checked
        if not isinstance(module, SUPPORTED_LAYERS):
            supported = ", ".join(sorted(t.__name__ for t in SUPPORTED_LAYERS))
            raise UnsupportedLayerError(
                f"layer {name!r} of type {type(module).__name__} is not supported by the "
                f"conversion; supported layers: {supported} (plus, in forward: residual adds, "
                "multiplies, torch.cat, flatten/view/mean and the torch.nn.functional forms of these "
                "activations and pools); replace it with one of them or quantize it by hand with "
                "brevitas.nn")


def _with_bits(quant, bits: int):
    return quant.let(bit_width=bits)


def convert_to_brevitas(
    model: nn.Module,
    bits: str | BitSpec,
    *,
    weight_quant=None,
    act_quant=None,
    signed_act_quant=None,
    input_bits: int = 8,
) -> torch.fx.GraphModule:
    """Return a Brevitas copy of a float CNN: BN folded, weights and activations quantized.

    ``bits`` is a :class:`BitSpec` or a spec string (``"w4a8"``, ``"w4a4-per-channel"``);
    ``"nipq-w4a4"`` defaults the three quantizers to NIPQ's (learned per-tensor bits, w4a4 the
    default average target of ``nipq_train``; the edge layers and the input are pinned at 8).
    ``weight_quant`` / ``act_quant`` (unsigned, after ReLU) / ``signed_act_quant`` (network
    input, residual adds) are Brevitas quantizer classes; their bit width is set from ``bits``.
    The first conv and the last linear layer get ``bits.edge_weight_bits`` weight bits and the
    network input ``input_bits`` (image pixels are 8-bit data), the reference policy of
    BRECQ/QDrop/HDRQ. Biases use ``Int32Bias`` so onnxruntime reproduces the model exactly.
    The float model is not modified. Activation scales still need calibration
    (:func:`calibrate_activations`).
    """
    prefix, bits = split_quantizer_prefix(bits)
    spec = BitSpec.parse(bits)
    if prefix is not None:  # e.g. "nipq-w4a4": that family's quantizers are the defaults
        family = family_for_prefix(prefix)
        if spec.per_channel and not family.per_channel:
            raise ValueError(f"{family.name} quantizers are per-tensor (one learned width and truncation "
                             f"per tensor); {spec} is per-channel")
        defaults = family.quantizers()
        weight_quant = defaults.get("weight_quant") if weight_quant is None else weight_quant
        act_quant = defaults.get("act_quant") if act_quant is None else act_quant
        signed_act_quant = defaults.get("signed_act_quant") if signed_act_quant is None else signed_act_quant
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if any(isinstance(m, COMPUTE_LAYERS) for m in model.modules()):
        raise TypeError("the model already contains Brevitas quantized layers; convert the float model")
    check_supported(model)

    if weight_quant is None:
        weight_quant = RTNWeightPerChannel if spec.per_channel else RTNWeightPerTensor
    elif spec.per_channel:
        weight_quant = weight_quant.let(scaling_per_output_channel=True)
    # Brevitas injector classes are falsy: test for None, never use `or`
    if act_quant is None:
        act_quant = Uint8ActPerTensorFloat
    if signed_act_quant is None:
        signed_act_quant = Int8ActPerTensorFloat

    float_copy = _deepcopy_eval(model)
    try:
        graph_model = _trace_and_fold(float_copy)
    except Exception as err:  # FX tracing errors are long; say what is needed first
        advice = ("; index the parts of chunk/split (parts[0], parts[1]) instead of iterating over them"
                  if "cannot be iterated" in str(err) else "")
        raise TypeError(
            f"could not trace {type(model).__name__} with torch.fx ({type(err).__name__}: {err}); "
            f"the conversion needs an FX-traceable model (no data-dependent control flow){advice}") from err
    _reject_functional_parameters(graph_model)
    _check_traced(graph_model, float_copy)

    layer_kwargs = {"weight_quant": _with_bits(weight_quant, spec.weight_bits),
                    "bias_quant": Int32Bias}
    compute_map = dict(COMPUTE_LAYER_MAP)
    compute_map[nn.Conv1d] = (qnn.QuantConv1d, {**layer_kwargs, "return_quant_tensor": True})
    compute_map[nn.Conv2d] = (qnn.QuantConv2d, {**layer_kwargs, "return_quant_tensor": True})
    compute_map[nn.ConvTranspose2d] = (qnn.QuantConvTranspose2d, {**layer_kwargs, "return_quant_tensor": True})
    unsigned = _with_bits(act_quant, spec.act_bits)
    signed = _with_bits(signed_act_quant, spec.act_bits)
    # A Linear usually follows pooling/flatten, whose output is off the activation grid, so it
    # owns a (signed: the conversion cannot know the sign) input quantizer, as in Brevitas' map.
    compute_map[nn.Linear] = (qnn.QuantLinear, {
        **layer_kwargs, "input_quant": signed, "return_quant_tensor": False})
    act_map = dict(QUANT_ACT_MAP)
    act_map[nn.ReLU] = (qnn.QuantReLU, {"act_quant": unsigned, "return_quant_tensor": True})
    act_map[nn.ReLU6] = (QuantReLU6, {"act_quant": unsigned, "return_quant_tensor": True})
    act_map.pop(nn.Sigmoid, None)  # gates: float op between quantizers (op_policy)
    # where an adopted Brevitas model had an activation quantizer of its own (adopt_brevitas_model)
    act_map[SignedActivationGrid] = (qnn.QuantIdentity, {"act_quant": signed, "return_quant_tensor": True})
    act_map[UnsignedActivationGrid] = (qnn.QuantIdentity, {"act_quant": unsigned, "return_quant_tensor": True})
    identity_map = {
        "signed": (qnn.QuantIdentity, {"act_quant": signed, "return_quant_tensor": True}),
        "unsigned": (qnn.QuantIdentity, {"act_quant": unsigned, "return_quant_tensor": True}),
    }
    # requantize_layer_handler_output=False: the logits stay float (as in BRECQ/QDrop/HDRQ);
    # every other layer output already meets a quantized activation or residual quantizer.
    qmodel = _quantize_graph(graph_model, identity_map, compute_map, act_map,
                             gate_quant=_with_bits(act_quant, BOUNDARY_BITS))

    layers = compute_layers(qmodel)
    if not layers:
        raise UnsupportedLayerError("the model has no Conv or Linear layer to quantize")
    if spec.edge_weight_bits is not None:
        for _, layer in (layers[0], layers[-1]):
            set_weight_bit_width(layer, spec.edge_weight_bits)
        # the classifier's own input quantizer follows the same 8-bit edge policy
        if getattr(layers[-1][1], "input_quant", None) is not None and layers[-1][1].input_quant.is_quant_enabled:
            _set_proxy_bits(layers[-1][1].input_quant, spec.edge_weight_bits)
    _set_input_bits(qmodel, input_bits)
    qmodel.eval()
    with torch.no_grad():  # materialise the learnable weight scales from the float weights now
        for _, layer in layers:
            layer.quant_weight()
    return qmodel


def fold_batchnorm(model: nn.Module) -> torch.fx.GraphModule:
    """A float copy of ``model`` with BatchNorm folded into the preceding convs (Brevitas pass).

    The float counterpart of what :func:`convert_to_brevitas` quantizes: merging folded float
    models is the reference every quantized merge is compared with.
    """
    return _trace_and_fold(_deepcopy_eval(model))


def _trace_and_fold(model: nn.Module) -> torch.fx.GraphModule:
    """Brevitas' FX trace with BatchNorm folded (MergeBatchNorm) and cross-layer equalisation off
    (it would rescale each target's model differently, and merged layers must share one basis).

    Brevitas 0.13's backported tracer calls a pytree API that torch 2.13 deprecates, once per
    trace; that FutureWarning says nothing to our users, so only it is silenced.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*treespec\.children_specs.* is deprecated", category=FutureWarning)
        # relu6_to_relu=False: ReLU6 keeps its clamp (op_policy)
        graph_model = preprocess_for_quantize(_symbolic_trace(_Tracer(), model, None), trace_model=False, equalize_iters=0,
                                              merge_bn=True, relu6_to_relu=False)
    return functions_to_modules(spatial_means_to_pools(remove_dropout(graph_model)))


class _Tracer(BackportTracer):
    """Brevitas' tracer (what ``preprocess_for_quantize`` traces with), with the activation-grid
    markers of adopted Brevitas models kept as leaf modules (they live outside ``torch.nn``)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, SignedActivationGrid) or super().is_leaf_module(m, module_qualified_name)

    # Brevitas patches torch.tensor/zeros/ones/... during a trace to record them with their value,
    # which only its value tracer can compute (``symbolic_trace`` fails on ``torch.tensor([1.0],
    # device=x.device)``, as in the bnn_pynq models); here they are recorded without one.
    def unpack_arg(self, arg):
        raise UnsetValueException

    def create_proxy(self, *args, value=None, **kwargs):
        return super().create_proxy(*args, **kwargs)


def _check_traced(graph_model: torch.fx.GraphModule, float_model: nn.Module) -> None:
    """The traced graph may hold modules made from functional calls (``F.leaky_relu`` becomes a
    LeakyReLU): check those too, and every remaining function or method call."""
    try:
        check_supported(graph_model)
    except UnsupportedLayerError as err:
        raise UnsupportedLayerError(f"{err} (found after tracing: it may come from a functional call)") from None
    try:
        check_supported_calls(graph_model)
    except UnsupportedOpError:  # again, with the line of forward that made the call
        check_supported_calls(graph_model, forward_source_lines(float_model))


def _reject_functional_parameters(graph_model: torch.fx.GraphModule) -> None:
    """A weight read by a functional call (``F.conv2d(x, self.weight)``) would stay float."""
    for node in graph_model.graph.nodes:
        if node.op == "get_attr":
            value = graph_model
            for part in node.target.split("."):
                value = getattr(value, part)
            if isinstance(value, nn.Parameter):
                users = ", ".join(f"{u.op} {getattr(u.target, '__name__', u.target)}" for u in node.users)
                raise UnsupportedLayerError(
                    f"parameter {node.target!r} is used by a functional call ({users}); the conversion "
                    "quantizes layers, not functions: hold the weight in an nn.Conv2d/nn.Linear module")


def _quantize_graph(graph_model, identity_map, compute_map, act_map, gate_quant) -> torch.fx.GraphModule:
    """Brevitas' ``quantize()`` pipeline without its residual-alignment pass.

    ``residual_handler`` makes both inputs of every residual add share ONE quantizer (needed by
    fixed-point dataflow back-ends, not by onnxruntime, whose QDQ adds take any scales). That
    shared quantizer is called twice per forward, so calibration averages the ranges of the
    residual branch and the shortcut and clips the larger one: measured on a small ResNet,
    W8A8 logits were 16 % off the float model with it. Without it every compute layer output is
    requantized by its own quantizer (so onnxruntime still fuses it into QLinearConv), and the
    logits, which feed no quantizer, stay float as in BRECQ/QDrop/HDRQ. Float activations
    (Hardswish, SiLU, gates) get their quantizers from :mod:`.op_policy`.
    """
    prev = brevitas_config.IGNORE_MISSING_KEYS
    brevitas_config.IGNORE_MISSING_KEYS = True
    try:
        graph_model.eval()
        graph_model = inp_placeholder_handler(graph_model, input_quantizer=identity_map["signed"])
        graph_model = act_handler(graph_model, layer_map=act_map)
        graph_model = quantize_float_activation_outputs(graph_model, identity_map, gate_quant)
        graph_model = add_output_quant_handler(graph_model, identity_map, act_map, UNSIGNED_ACT_TUPLE)
        graph_model = quantize_concat_outputs(graph_model, identity_map, act_map, UNSIGNED_ACT_TUPLE)
        graph_model = layer_handler(graph_model, layer_map=compute_map, requantize_output=True,
                                    quant_identity_map=identity_map, quant_act_map=act_map,
                                    unsigned_act_tuple=UNSIGNED_ACT_TUPLE)
        share_activation_grids(graph_model)  # one grid per activation (shared_grids.py)
        widen_float_activation_inputs(graph_model, _set_proxy_bits)
        _drop_output_quantizers(graph_model)
        _dequantize_elementwise_inputs(graph_model)
        _return_plain_outputs(graph_model)
    finally:
        brevitas_config.IGNORE_MISSING_KEYS = prev
    return graph_model


def _drop_output_quantizers(graph_model: torch.fx.GraphModule) -> None:
    """Remove requantizers whose only user is the graph output (keep the logits in float), also
    through the resize that brings a segmentation network's logits to the input size.

    A convolution's logits (a segmentation head) keep theirs at ``BOUNDARY_BITS``, the 8-bit edge
    policy of the network input: onnxruntime's integer conv (QLinearConv) needs a quantized
    output, unlike QGemm, so a float-output head would stay a float Conv; at ``act_bits`` a
    4-bit logit grid would cost what the classification policy avoids.
    """
    output = next(n for n in graph_model.graph.nodes if n.op == "output")
    for node in [_through_output_resizes(n) for n in output.all_input_nodes]:
        if node.op == "call_module" and isinstance(graph_model.get_submodule(node.target), qnn.QuantIdentity) \
                and len(node.users) == 1:
            producer = node.all_input_nodes[0]
            if producer.op == "call_module" and isinstance(graph_model.get_submodule(producer.target),
                                                           (qnn.QuantConv1d, qnn.QuantConv2d, qnn.QuantConvTranspose2d)):
                _set_proxy_bits(graph_model.get_submodule(node.target).act_quant, BOUNDARY_BITS)
                continue
            node.replace_all_uses_with(node.all_input_nodes[0])
            graph_model.graph.erase_node(node)
            graph_model.delete_submodule(node.target)
    graph_model.graph.lint()
    graph_model.recompile()


def _through_output_resizes(node):
    """The node a chain of single-use ``F.interpolate`` (and its ``dequantized`` input) reads."""
    while node.op == "call_function" and node.target in (F.interpolate, dequantized) and len(node.users) == 1 \
            and node.args and hasattr(node.args[0], "op"):
        node = node.args[0]
    return node


def _return_plain_outputs(graph_model: torch.fx.GraphModule) -> None:
    """The modules producing the graph's outputs return plain tensors.

    Brevitas' ``DisableLastReturnQuantTensor`` switches off the last module in graph order that
    returns a QuantTensor, which is not the output layer when that one already returns a plain
    tensor (a Linear classifier): it would strip the quantized activation feeding the classifier.
    """
    output = next(n for n in graph_model.graph.nodes if n.op == "output")
    for node in output.all_input_nodes:
        module = graph_model.get_submodule(node.target) if node.op == "call_module" else None
        if getattr(module, "return_quant_tensor", False):
            module.return_quant_tensor = False


def dequantized(x):
    """The float value of a QuantTensor (identity for plain tensors); FX-wrapped below."""
    return plain_tensor(x)


def _dequantize_elementwise_inputs(graph_model: torch.fx.GraphModule) -> None:
    """Feed adds, multiplies, concatenations and the tensor methods QuantTensor lacks
    (op_policy's ``FLOAT_VALUE_*``) with float values.

    Brevitas' QuantTensor addition and concatenation demand equal scales; onnxruntime does not
    (QDQ Add/Mul/Concat take one scale per input). The result is requantized by its consumer.
    """
    node_type = type(next(iter(graph_model.graph.nodes)))  # Brevitas traces with its backported FX Node
    for node in list(graph_model.graph.nodes):
        if not float_value_call(node):
            continue

        def wrap(arg, node=node):
            with graph_model.graph.inserting_before(node):
                return graph_model.graph.call_function(dequantized, (arg,))

        node.args = tuple(_map_nodes(a, wrap, node_type) for a in node.args)
        node.kwargs = {k: _map_nodes(v, wrap, node_type) for k, v in node.kwargs.items()}
    graph_model.graph.lint()
    graph_model.recompile()


def _map_nodes(value, fn, node_type):
    if isinstance(value, node_type):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_map_nodes(v, fn, node_type) for v in value)
    return value


def _deepcopy_eval(model: nn.Module) -> nn.Module:
    import copy

    clone = copy.deepcopy(model)
    clone.eval()
    return clone


def compute_layers(qmodel: nn.Module) -> list[tuple[str, nn.Module]]:
    """Quantized Conv/Linear layers in forward (graph) order, with their qualified names."""
    return quantized_layers(qmodel, enabled_only=False, forward_order=True)


def set_weight_bit_width(layer: nn.Module, bit_width: int) -> None:
    """Re-inject ``layer``'s weight quantizer with another bit width, keeping its state."""
    _set_proxy_bits(layer.weight_quant, bit_width)


def _set_proxy_bits(proxy: nn.Module, bit_width: int) -> None:
    proxy.quant_injector = proxy.quant_injector.let(bit_width=bit_width)
    proxy.init_tensor_quant()
    for family in loaded_families():  # e.g. NIPQ: a width set explicitly is fixed, not learned
        if family.on_bit_width_set is not None:
            family.on_bit_width_set(proxy, bit_width)


def _set_input_bits(qmodel: torch.fx.GraphModule, bit_width: int) -> None:
    for node in qmodel.graph.nodes:
        if node.op == "placeholder":
            for user in node.users:
                if user.op == "call_module":
                    quant = qmodel.get_submodule(user.target)
                    if isinstance(quant, qnn.QuantIdentity):
                        _set_proxy_bits(quant.act_quant, bit_width)


@torch.no_grad()
def calibrate_activations(qmodel: nn.Module, data: Iterable, *, max_batches: int | None = None) -> nn.Module:
    """Set activation scales from data with Brevitas' ``calibration_mode`` (the RTN baseline).

    ``data`` is any iterable of input tensors or ``(input, label)`` pairs; labels are ignored.
    """
    qmodel.eval()
    seen = 0
    with calibration_mode(qmodel):
        for batch in iterate_inputs(data, max_batches=max_batches):
            qmodel(batch)
            seen += 1
    if seen == 0:
        raise ValueError("calibration data is empty")
    qmodel.eval()
    return qmodel


#: Brevitas' own quantizers (stats-initialised parameter scales, ``calibration_mode`` activations):
#: what :func:`convert_to_brevitas` uses when no quantizer is given.
RTN_FAMILY = QuantizerFamily("rtn", None, None, None)
