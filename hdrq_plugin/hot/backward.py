"""HOT's backward pass for one Linear / Conv2d: autograd Functions built on :mod:`hdrq_plugin.hot.hadamard`.

Source: Kim et al., "HOT: Hadamard-based Optimized Training", CVPR 2025 (§3). For y = x·wᵀ with
x: L×I, w: O×I, g = ∂loss/∂y: L×O,

* HQ (input gradient, inner dimension O):  g_x = Q₄ˢ(g·H_b) · Q₄ˢᵃʷᵇ(H_b·w) / b
  with H_b the block-diagonal Sylvester Hadamard matrix of block b along O, Q₄ˢ stochastic
  rounding (per tensor or per token, chosen per layer), Q₄ˢᵃʷᵇ round-to-nearest in the SAWB clip.
* HLA (weight gradient, inner dimension L):  g_w = Q₈ˢ(P·g)ᵀ · Q₈ˢᵃʷᵇ(P·x) / n
  with P the block-diagonal low-sequency Walsh projection (rank r of n) along L. Since
  PᵀP/n = Π is an orthogonal projector, this equals gᵀ·Π·x up to quantization.
* ABC: the forward saves Q₈ˢᵃʷᵇ(P·x) (int8, r/n of the rows) instead of the float x.

Convolutions: the input gradient is the same GEMM on im2col rows, folded back (col2im). For
the weight gradient, a 1×1 stride-1 unpadded conv *is* a Linear on channels-last rows and uses
HLA unchanged. For a k×k conv the projection of the im2col matrix would hold k² shifted copies
of x (9/8 of the float input at r/n = 1/2 for 3×3: no saving); here the projection is applied
to x itself along L = batch×height×width (channels-last), the saved buffer is again r/n of the
rows in int8, and at backward x̂ = Pᵀ·Q(P·x)/n = Π·x is re-quantized to INT8 (SAWB) and
correlated with Q₈ˢ(g) over the full L (conv weight gradient on integer codes). The bias
gradient is float (Σ g).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight

from . import fused
from .hadamard import (
    absolute_moments,
    add_uniform_dither_,
    block_hadamard,
    block_hadamard_channels,
    integer_matmul,
    padded_length,
    project_low_sequency,
    quantize_nearest,
    quantize_stochastic,
    reconstruct_low_sequency,
    sawb_clip,
    sawb_clip_from_moments,
    sylvester_hadamard,
)
from .ownership import release


@dataclass
class LayerState:
    """One layer's HOT settings and the shapes of its most recent step (for the report)."""

    name: str
    kind: str  # "linear", "pointwise-conv" or "conv"
    hq_block: int  # block of the Hadamard along the output channels (largest power of two ≤ max dividing O)
    basis: torch.Tensor  # r×n low-sequency Walsh rows for HLA
    grad_input_bits: int
    grad_weight_bits: int
    quantize: bool
    gemm: str  # "int": every GEMM via torch._int_mm; "float" / "bf16": those conv kernels on the codes (HOTConfig)
    per_token_gain: float
    generator: torch.Generator
    fused: bool = False  # one torch.compile kernel per chain where inductor works (fused.py)
    per_token: bool | None = None  # layer-wise quantizer selection; None until the first backward
    selection_errors: tuple[float, float] | None = None  # (per-tensor, per-token) 4-bit MSE of g·H
    rows: int = 0  # L = batch×spatial of the last forward
    stored_rows: int = 0  # rows of the saved projected activation
    saved_activation_bytes: int = 0  # bytes saved for backward besides the weight
    shared_buffers: dict | None = None  # session-wide: input → compressed buffer (None: no sharing)
    shares_buffer_of: str | None = None  # the layer whose buffer of the same input this one reuses
    extra: dict = field(default_factory=dict)

    @property
    def order(self) -> int:
        return self.basis.shape[1]

    @property
    def rank(self) -> int:
        return self.basis.shape[0]


_UNIT = torch.ones(())


def _compress_rows(rows: torch.Tensor, state: LayerState) -> tuple[torch.Tensor, torch.Tensor]:
    """ABC: P·x as int8 codes + scale (or the float projection when quantization is off)."""
    projected = project_low_sequency(rows.float(), state.basis)
    state.rows, state.stored_rows = rows.shape[0], projected.shape[0]
    return _quantize_activation_int8(projected, state)


def _project_map(maps: torch.Tensor, state: LayerState) -> torch.Tensor:
    """HLA's projection of an N×C×H×W map along L = N·H·W, kept as N×C×(H·W/n)×r (H·W % n == 0).

    The channels-last rows of :func:`_compress_rows` group n consecutive pixels of one image,
    which are n consecutive entries of each NCHW plane: the same coefficients, obtained by one
    GEMM on the map as it is (no channels-last copy, no batched GEMM of tiny blocks).
    """
    rank, order = state.basis.shape
    batch, channels, height, width = maps.shape
    projected = maps.float().reshape(-1, order) @ state.basis.t()
    state.rows, state.stored_rows = batch * height * width, batch * height * width // order * rank
    return projected.view(batch, channels, height * width // order, rank)


def _reconstruct_map(codes: torch.Tensor, scale: torch.Tensor, state: LayerState, shape) -> torch.Tensor:
    """Π·x as an N×C×H×W map from :func:`_project_map`'s (quantized) coefficients: Sᵀ·c / n."""
    coefficients = _dequantize(codes, scale).view(-1, state.rank)
    return (coefficients @ (state.basis / state.order)).view(shape)


def _reconstructed_map_codes(codes: torch.Tensor, scale: torch.Tensor, state: LayerState, shape,
                             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Q₈ˢᵃʷᵇ(Π·x) as an N×C×H×W map of codes in ``dtype``, a chunk of images at a time.

    Same values as quantizing :func:`_reconstruct_map`'s whole map, without that float map: a
    first pass over the chunks gathers the SAWB statistics (max|x|, Σ|x|, Σx²), a second
    rebuilds each chunk again and rounds it into the codes.
    """
    basis = state.basis / state.order
    count = math.prod(shape)
    levels = 2 ** (state.grad_weight_bits - 1) - 1
    if state.fused and fused.available():  # one kernel per pass, no float map (fused.py)
        factor = scale / state.order
        moments = fused.call("rebuild_moments", codes, factor, state.basis)
        if moments is not None:
            peak, total_abs, total_square = moments
            clip = sawb_clip_from_moments(peak, total_abs / count, (total_square / count).sqrt())
            input_scale = (clip / levels).clamp_min(torch.finfo(torch.float32).tiny)
            out = fused.call("rebuild_codes", codes, factor, state.basis, input_scale, levels, dtype)
            if out is not None:
                return out.view(shape), input_scale

    def rebuild(rows):
        return (_dequantize(codes[rows], scale).view(-1, state.rank) @ basis).view(-1, *shape[1:])

    # a map of one chunk is rebuilt once and kept (time, no extra memory); a larger one by chunks
    whole = rebuild(slice(None)) if count <= _CHUNK else None

    def rebuilt(rows):
        return whole[rows] if whole is not None else rebuild(rows)

    peak, total_abs, total_square = torch.zeros(()), torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for rows in _image_chunks(codes, math.prod(shape[1:])):
        chunk_peak, chunk_abs, chunk_square = absolute_moments(rebuilt(rows))
        peak = torch.maximum(peak, chunk_peak)
        total_abs += chunk_abs.double()
        total_square += chunk_square.double()
    clip = sawb_clip_from_moments(peak, (total_abs / count).float(), (total_square / count).sqrt().float())
    input_scale = (clip / levels).clamp_min(torch.finfo(torch.float32).tiny)
    out = torch.empty(shape, dtype=dtype)
    for rows in _image_chunks(codes, math.prod(shape[1:])):
        out[rows] = torch.div(rebuilt(rows), input_scale).round_().clamp_(-levels, levels)
    return out, input_scale


def _compress_input(inputs: torch.Tensor, state: LayerState, channel_dim: int,
                    as_map: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """ABC of a layer input (channels-last rows, or a map: :func:`_project_map`), shared by every
    HOT layer reading that tensor.

    A ResNet block input feeds conv1 and the downsample conv: plain autograd keeps it once, ABC
    would keep two identical int8 buffers. The cache holds only weak references, checks the
    tensor object and its version counter, and so never outlives the graph that saved the buffer.
    """
    cache = state.shared_buffers
    key = (inputs.data_ptr(), tuple(inputs.shape), tuple(inputs.stride()), channel_dim, as_map)
    if cache is not None:
        entry = cache.get(key)
        if entry is not None:
            source, version, codes, scale, owner, rows, stored_rows = entry
            codes, scale = codes(), scale()
            if source() is inputs and version == inputs._version and codes is not None and scale is not None:
                state.rows, state.stored_rows, state.shares_buffer_of = rows, stored_rows, owner
                state.saved_activation_bytes = 0
                return codes, scale
    if as_map:
        codes, scale = _quantize_activation_int8(_project_map(inputs.detach(), state), state)
    else:
        channels_last_rows = inputs.detach().movedim(channel_dim, -1).reshape(-1, inputs.shape[channel_dim])
        codes, scale = _compress_rows(channels_last_rows, state)
        del channels_last_rows
    state.shares_buffer_of = None
    state.saved_activation_bytes = codes.numel() * codes.element_size() + scale.numel() * scale.element_size()
    if cache is not None:
        for stale in [k for k, value in cache.items() if value[0]() is None or value[2]() is None]:
            del cache[stale]
        cache[key] = (weakref.ref(inputs), inputs._version, weakref.ref(codes), weakref.ref(scale),
                      state.name, state.rows, state.stored_rows)
    return codes, scale


def _dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """codes·scale with one float temporary (in place on the float copy of the codes)."""
    return codes.to(torch.float32, copy=True).mul_(scale)


def _select_quantizer(rows: torch.Tensor, state: LayerState) -> None:
    """LQS (HOT §3.3): per-token when it cuts the 4-bit error of g·H by more than ``per_token_gain``."""
    levels = 2 ** (state.grad_input_bits - 1) - 1
    errors = []
    for magnitude in (rows.abs().max(), rows.abs().amax(1, keepdim=True)):
        scale = (magnitude / levels).clamp_min(torch.finfo(torch.float32).tiny)
        errors.append(float((torch.round(rows / scale) * scale - rows).square().mean()))
    state.selection_errors = (errors[0], errors[1])
    state.per_token = errors[1] < state.per_token_gain * errors[0]


def hq_operands(grad_rows: torch.Tensor, weight_matrix: torch.Tensor, state: LayerState):
    """HQ's two operands (g·H_b, H_b·w) as (codes, scale) pairs: INT4 stochastic / INT4 SAWB.

    With quantization off they are the float transformed matrices with unit scales.
    """
    block = state.hq_block
    grad_h = block_hadamard(grad_rows.float(), block, dim=1)
    weight_h = block_hadamard(weight_matrix.float(), block, dim=0)
    if not state.quantize:
        return (grad_h, _UNIT), (weight_h, _UNIT)
    if state.per_token is None:
        _select_quantizer(grad_h, state)
    grad = quantize_stochastic(grad_h, state.grad_input_bits, per_row=bool(state.per_token), generator=state.generator)
    return grad, quantize_nearest(weight_h, sawb_clip(weight_h), state.grad_input_bits)


def hq_input_gradient(grad_rows: torch.Tensor, weight_matrix: torch.Tensor, state: LayerState) -> torch.Tensor:
    """HQ: g·w through the block Hadamard along O, both operands INT4 (L×I result, float32)."""
    (grad_codes, grad_scale), (weight_codes, weight_scale) = hq_operands(grad_rows, weight_matrix, state)
    product = _matmul(grad_codes, weight_codes, state)
    return product * (grad_scale * weight_scale / state.hq_block)


def _matmul(left: torch.Tensor, right: torch.Tensor, state: LayerState) -> torch.Tensor:
    if left.dtype == torch.int8:
        return integer_matmul(left, right, use_int_mm=state.gemm != "float")
    return left @ right


def hla_weight_gradient(grad_rows: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, state: LayerState) -> torch.Tensor:
    """HLA: (P·g)ᵀ·(P·x)/n with P·x already saved (O×I result, float32); g quantized to INT8."""
    projected_grad = project_low_sequency(grad_rows.float(), state.basis)
    grad_codes, grad_scale = _quantize_grad_int8(projected_grad, state)
    return _matmul(grad_codes.t(), codes, state) * (grad_scale * scale / state.order)


def _quantize_grad_int8(rows: torch.Tensor, state: LayerState, dtype: torch.dtype = torch.int8):
    if not state.quantize:
        return rows, _UNIT
    return quantize_stochastic(rows, state.grad_weight_bits, per_row=False, generator=state.generator, dtype=dtype,
                               fused=state.fused)


def _quantize_activation_int8(values: torch.Tensor, state: LayerState, dtype: torch.dtype = torch.int8,
                              overwrite: bool = False):
    if not state.quantize:
        return values, _UNIT
    return quantize_nearest(values, sawb_clip(values), state.grad_weight_bits, dtype, overwrite)


class HOTLinearFunction(torch.autograd.Function):
    """y = F.linear(x, w, b) exactly; backward by HQ + HLA from the compressed saved input."""

    @staticmethod
    def forward(ctx, inputs, weight, bias, state: LayerState):
        output = F.linear(inputs, weight, bias)
        codes, scale = _compress_input(inputs, state, -1)
        ctx.state, ctx.input_shape, ctx.input_dtype, ctx.has_bias = state, inputs.shape, inputs.dtype, bias is not None
        ctx.save_for_backward(codes, scale, weight)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        codes, scale, weight = ctx.saved_tensors
        state = ctx.state
        grad_rows = grad_output.reshape(-1, grad_output.shape[-1])
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = hq_input_gradient(grad_rows, weight, state).reshape(ctx.input_shape).to(ctx.input_dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = hla_weight_gradient(grad_rows, codes, scale, state).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(0).to(weight.dtype)
        return grad_input, grad_weight, grad_bias, None


@dataclass(frozen=True)
class ConvGeometry:
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @property
    def pointwise_identity(self) -> bool:
        return self.stride == (1, 1) and self.padding == (0, 0)


class HOTConv2dFunction(torch.autograd.Function):
    """y = F.conv2d(x, w, b, …) exactly (groups = 1); backward by HQ + HLA (see module docstring)."""

    @staticmethod
    def forward(ctx, inputs, weight, bias, geometry: ConvGeometry, state: LayerState):
        output = F.conv2d(inputs, weight, bias, geometry.stride, geometry.padding, geometry.dilation)
        pointwise = weight.shape[2:] == (1, 1) and geometry.pointwise_identity
        ctx.as_map = not pointwise and inputs.shape[2] * inputs.shape[3] % state.order == 0
        codes, scale = _compress_input(inputs, state, 1, ctx.as_map)
        ctx.state, ctx.geometry, ctx.has_bias = state, geometry, bias is not None
        ctx.input_shape, ctx.input_dtype = inputs.shape, inputs.dtype
        ctx.save_for_backward(codes, scale, weight)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        codes, scale, weight = ctx.saved_tensors
        state, geometry = ctx.state, ctx.geometry
        batch, channels, height, width = ctx.input_shape
        out_channels, _, kernel_h, kernel_w = weight.shape
        kernel = (kernel_h, kernel_w)
        grad_input = grad_weight = grad_bias = None
        conv_args = (geometry.stride, geometry.padding, geometry.dilation)
        on_columns = state.gemm == "int"  # im2col + torch._int_mm; else float conv kernels on the codes
        # "bf16": the same integer codes through bfloat16 conv kernels (AMX/AVX512-BF16 on x86);
        # codes |q| ≤ 127 are exact in bf16 and products accumulate in float32, the result is
        # rounded to bf16 once (relative 2⁻⁸, far below the INT4/INT8 quantization error).
        kernel_dtype = torch.bfloat16 if state.gemm == "bf16" and state.quantize else torch.float32
        # The gradient is transformed and quantized as an N×O×H×W map (channels are dim 1, so HQ's
        # block Hadamard and LQS's per-pixel scales need no channels-last copy); every GEMM mode
        # then reads the same codes.
        grad_output = grad_output.contiguous()
        # the weight gradient first: its temporaries are freed before the input gradient exists
        if ctx.needs_input_grad[1]:
            if kernel == (1, 1) and geometry.pointwise_identity:
                grad_rows = grad_output.permute(0, 2, 3, 1).reshape(-1, out_channels)  # (B·H·W) × O
                matrix = hla_weight_gradient(grad_rows, codes, scale, state)
            else:
                codes_dtype = torch.int8 if on_columns else kernel_dtype
                if ctx.as_map and state.quantize:
                    input_map, input_scale = _reconstructed_map_codes(codes, scale, state, ctx.input_shape, codes_dtype)
                    projected = None
                elif ctx.as_map:
                    projected = _reconstruct_map(codes, scale, state, ctx.input_shape)
                else:
                    projected = reconstruct_low_sequency(_dequantize(codes, scale), state.basis, batch * height * width)
                if projected is not None:
                    input_codes, input_scale = _quantize_activation_int8(  # x̂ = Π·x, INT8 SAWB
                        projected, state, codes_dtype, overwrite=True)
                    del projected
                    input_map = input_codes.to(kernel_dtype)
                    if not ctx.as_map:
                        input_map = _rows_to_map(input_map, ctx.input_shape)
                    del input_codes
                input_map = input_map.to(kernel_dtype)
                grad_codes, grad_scale = _quantize_grad_int8(grad_output.float(), state, kernel_dtype)
                if on_columns:
                    columns = F.unfold(input_map, kernel, geometry.dilation, geometry.padding, geometry.stride)
                    columns = columns.transpose(1, 2).reshape(-1, columns.shape[1])  # (B·Ho·Wo) × C·k²
                    grad_rows = grad_codes.permute(0, 2, 3, 1).reshape(-1, out_channels)
                    if state.quantize:
                        columns, grad_rows = columns.to(torch.int8), grad_rows.to(torch.int8)
                    matrix = _matmul(grad_rows.t(), columns, state) * (grad_scale * input_scale)
                else:
                    matrix = conv2d_weight(input_map, weight.shape, grad_codes, *conv_args)
                    matrix = matrix.to(torch.float32).mul_(grad_scale * input_scale)
                del input_map, grad_codes
            grad_weight = matrix.reshape(weight.shape).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            weight_h = block_hadamard(weight.reshape(out_channels, -1).float(), state.hq_block, dim=0)
            if not state.quantize:
                (grad_codes, grad_scale), (weight_codes, weight_scale) = (
                    (block_hadamard_channels(grad_output.float(), state.hq_block), _UNIT), (weight_h, _UNIT))
            else:
                grad_codes, grad_scale = hq_gradient_codes(
                    grad_output, state, torch.int8 if on_columns else kernel_dtype, dequantize_per_token=not on_columns)
                weight_codes, weight_scale = quantize_nearest(weight_h, sawb_clip(weight_h), state.grad_input_bits)
            del weight_h
            if on_columns:
                rows = grad_codes.permute(0, 2, 3, 1).reshape(-1, out_channels)  # (B·Ho·Wo) × O
                if grad_scale.numel() > 1:
                    grad_scale = grad_scale.permute(0, 2, 3, 1).reshape(-1, 1)
                columns = _matmul(rows, weight_codes, state) * (grad_scale * weight_scale / state.hq_block)
                columns = columns.reshape(batch, -1, columns.shape[1]).transpose(1, 2)  # B × C·k² × Ho·Wo
                grad_input = F.fold(columns, (height, width), kernel, geometry.dilation, geometry.padding, geometry.stride)
            else:
                grad_input = conv2d_input(ctx.input_shape, weight_codes.to(kernel_dtype).reshape(weight.shape),
                                          grad_codes, *conv_args)
                grad_input = _scaled_float(grad_input, grad_scale * weight_scale / state.hq_block, state.fused)
            del grad_codes
            grad_input = release(grad_input.to(ctx.input_dtype))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_output.sum((0, 2, 3)).to(weight.dtype)
        return grad_input, grad_weight, grad_bias, None, None


def hq_gradient_codes(grad_output: torch.Tensor, state: LayerState, dtype: torch.dtype,
                      dequantize_per_token: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """HQ's gradient operand Q₄ˢ(g·H_b) of an N×O×H×W map, a chunk of images at a time.

    The transform and the quantizer are fused per chunk, so neither g·H_b nor a float copy exists
    at full size (they were the largest temporaries of the backward); per tensor, the max is taken
    in a first pass over the chunks (the transform runs twice). LQS's calibration (the layer's
    first backward) sees the whole g·H_b. Per token with ``dequantize_per_token`` the result is
    codes·scale in ``dtype`` (unit scale): conv kernels take one scale per tensor.
    """
    levels = 2 ** (state.grad_input_bits - 1) - 1
    block = state.hq_block
    if state.per_token is None:
        grad_h = block_hadamard_channels(grad_output.float(), block)
        _select_quantizer(grad_h, state)
        del grad_h
    per_token = bool(state.per_token)
    if state.fused and fused.available():
        result = _fused_hq_gradient_codes(grad_output, state, dtype, per_token, dequantize_per_token)
        if result is not None:
            return result
    # a map of one chunk is transformed once and kept (time, no extra memory); a larger one by chunks
    whole = block_hadamard_channels(grad_output.float(), block) if grad_output.numel() <= _CHUNK else None

    def transformed(rows):
        return whole[rows] if whole is not None else block_hadamard_channels(grad_output[rows].float(), block)

    scale = None
    if not per_token:
        magnitude = torch.zeros(())
        for rows in _image_chunks(grad_output):
            low, high = torch.aminmax(transformed(rows))
            magnitude = torch.maximum(magnitude, torch.maximum(-low, high))
        scale = (magnitude / levels).clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.empty(grad_output.shape, dtype=dtype)
    row_scales = torch.empty(grad_output.shape[0], 1, *grad_output.shape[2:]) if per_token else None
    for rows in _image_chunks(grad_output):
        grad_h = transformed(rows)
        if per_token:
            chunk_scale = torch.maximum(grad_h.amax(1, keepdim=True), grad_h.amin(1, keepdim=True).neg_())
            chunk_scale = chunk_scale.div_(levels).clamp_min_(torch.finfo(torch.float32).tiny)
            row_scales[rows] = chunk_scale
        else:
            chunk_scale = scale
        quantized = torch.div(grad_h, chunk_scale)  # never in place: a block of 1 returns g itself
        del grad_h
        add_uniform_dither_(quantized, state.generator).floor_().clamp_(-levels, levels)
        codes[rows] = quantized.mul_(chunk_scale) if per_token and dequantize_per_token else quantized
    if per_token:
        return (codes, _UNIT) if dequantize_per_token else (codes, row_scales)
    return codes, scale


def _fused_hq_gradient_codes(grad_output, state, dtype, per_token, dequantize_per_token):
    """:func:`hq_gradient_codes` as two compiled passes (max, then transform + dither + round);
    the transformed map is never stored. None when compilation is unavailable."""
    levels = 2 ** (state.grad_input_bits - 1) - 1
    maps = grad_output.reshape(grad_output.shape[0], grad_output.shape[1], -1)
    hadamard = sylvester_hadamard(state.hq_block)
    peak = fused.call("hq_peak", maps, hadamard, per_token)
    if peak is None:
        return None
    scale = (peak / levels).clamp_min(torch.finfo(torch.float32).tiny)
    dequantize = per_token and dequantize_per_token
    codes = fused.call("hq_codes", maps, hadamard, scale, fused.draw_seed(state.generator), levels, dequantize, dtype)
    if codes is None:
        return None
    codes = codes.view(grad_output.shape)
    if not per_token:
        return codes, scale
    return (codes, _UNIT) if dequantize else (codes, scale.view(grad_output.shape[0], 1, *grad_output.shape[2:]))


_CHUNK = 1 << 20  # entries: float32 temporaries of 4 MiB per chunk


def _image_chunks(maps: torch.Tensor, image_size: int | None = None):
    """Slices of images (dim 0) of about :data:`_CHUNK` entries each (at least one image);
    ``image_size`` is the entries per image of the temporaries when they are not ``maps``'s."""
    step = max(1, _CHUNK // max(image_size or maps[0].numel(), 1))
    for start in range(0, maps.shape[0], step):
        yield slice(start, min(start + step, maps.shape[0]))


def _scaled_float(values: torch.Tensor, factor: torch.Tensor, use_fused: bool = False) -> torch.Tensor:
    """values·factor as float32 (in place when ``values`` already is float32)."""
    if values.dtype == torch.float32:
        return values.mul_(factor)
    if use_fused and fused.available():  # one pass, no chunk temporaries (the result is float32 anyway)
        result = fused.call("scaled_float", values, factor)
        if result is not None:
            return result
    result = torch.empty(values.shape, dtype=torch.float32)
    for rows in _image_chunks(values):
        result[rows] = values[rows].float().mul_(factor)
    return result


def _rows_to_map(rows: torch.Tensor, shape) -> torch.Tensor:
    """Channels-last rows (B·H·W) × C back to an N×C×H×W map."""
    batch, channels, height, width = shape
    return rows.reshape(batch, height, width, channels).permute(0, 3, 1, 2)


def predicted_saved_bytes(rows: int, features: int, order: int, rank: int, quantize: bool = True) -> int:
    """Bytes ABC saves for one layer: ⌈L/n⌉·r rows × features in int8 (float32 when off) + a scale."""
    stored_rows = padded_length(rows, order) // order * rank
    return stored_rows * features * (1 if quantize else 4) + 4
