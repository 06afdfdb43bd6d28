"""What the rest of a HOT training step saves: ReLU, ReLU6/hardtanh, BatchNorm and pools.

HOT (Kim et al., CVPR 2025, §3.4 "activation buffer compression") compresses what Conv2d/Linear
keep for backward. On a ResNet that alone saves nothing for the whole step: ReLU keeps its float
output (the next conv's input), BatchNorm its float input, max-pool an int64 index per output and
the global average pool its float input (docs/hot_method.md §5). Here, inside ``hot_mode``:

* ReLU / ReLU6 / hardtanh keep a bit mask of where the gradient passes (exact backward, 1/32 of
  the float bytes);
* BatchNorm keeps its normalised input x̂ = (x − μ)·σ⁻¹ as int8 with one scale per channel
  (max-scaled, round to nearest; float when ``HOTConfig.quantize`` is off) and rebuilds the
  gradient from it;
* max-pool keeps the argmax's position inside its window as uint8 (exact backward);
* adaptive average pooling keeps nothing (its gradient needs only the input's shape).

Residual adds, flatten and means save nothing in autograd already. The forward outputs are the
ones torch computes (same kernels), so the forward pass stays bit-identical. The interception is
a ``TorchFunctionMode`` because models call ``F.relu`` as often as ``nn.ReLU``; it acts only when
autograd records (grad enabled, an input requires grad), so ``torch.no_grad`` evaluation and the
backward pass itself run the plain ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import fused
from .ownership import release, take

_CHUNK = 1 << 18  # entries (a multiple of 8): float32 temporaries of 1 MiB at a time
_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as bits, eight per uint8 (torch has no packed bool; one byte per bit otherwise)."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8).to(torch.uint8) * _BIT_WEIGHTS).sum(1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_mask`."""
    count = 1
    for size in shape:
        count *= size
    bits = packed.unsqueeze(1).bitwise_and(_BIT_WEIGHTS).ne_(0)
    return bits.reshape(-1)[:count].reshape(shape)


class MaskedReLU(torch.autograd.Function):
    """y = relu(x) or hardtanh(x, lo, hi); saves the packed mask lo < x < hi (exact backward)."""

    @staticmethod
    def forward(ctx, inputs, low, high, inplace):
        packed = _packed_passes(inputs.detach(), low, high)  # before an in-place op overwrites x
        if high is None:
            output = torch.relu_(inputs) if inplace else torch.relu(inputs)
        else:
            output = F.hardtanh(inputs, low, high, inplace=inplace)
        if inplace:
            ctx.mark_dirty(inputs)
        ctx.shape = output.shape
        ctx.save_for_backward(packed)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        (packed,) = ctx.saved_tensors
        grad = grad_output.contiguous().view(-1)
        grad_input = grad if take(grad_output) else torch.empty_like(grad)
        # a chunk at a time: the unpacked bool mask never exists at full size
        for start in range(0, grad.numel(), _CHUNK):
            stop = min(start + _CHUNK, grad.numel())
            bits = unpack_mask(packed[start // 8:-(-stop // 8)], torch.Size([-(-stop // 8) * 8 - start // 8 * 8]))
            torch.mul(grad[start:stop], bits[:stop - start], out=grad_input[start:stop])
        return release(grad_input.view(ctx.shape)), None, None, None


def _packed_passes(inputs: torch.Tensor, low: float, high: float | None) -> torch.Tensor:
    """pack_mask(low < x < high), a chunk at a time (no bool map of the whole input)."""
    flat = inputs.reshape(-1)
    packed = torch.empty(-(-flat.numel() // 8), dtype=torch.uint8)
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start:start + _CHUNK]
        passes = chunk > low if high is None else (chunk > low) & (chunk < high)
        packed[start // 8:start // 8 + packed_length(chunk.numel())] = pack_mask(passes)
    return packed


def packed_length(count: int) -> int:
    return -(-count // 8)


def _per_channel_view(vector: torch.Tensor, dims: int) -> torch.Tensor:
    return vector.reshape(1, -1, *([1] * (dims - 2)))


class CompressedBatchNorm(torch.autograd.Function):
    """F.batch_norm's output; saves x̂ as int8 per channel (or float) for the backward.

    Backward (Ioffe & Szegedy 2015, §3): with M elements per channel, g_β = Σg, g_γ = Σg·x̂ and,
    in training mode, g_x = γσ⁻¹(g − g_β/M − x̂·g_γ/M); with running statistics g_x = γσ⁻¹·g.
    """

    @staticmethod
    def forward(ctx, inputs, running_mean, running_var, weight, bias, training, momentum, eps, quantize,
                use_fused=False):
        output, mean, invstd = torch.native_batch_norm(
            inputs, weight, bias, running_mean, running_var, training, momentum, eps)
        if not training:  # native_batch_norm returns empty statistics in eval mode
            mean, invstd = running_mean, torch.rsqrt(running_var + eps)
        dims = inputs.dim()
        mean_v, invstd_v = _per_channel_view(mean, dims), _per_channel_view(invstd, dims)
        if quantize:  # max |x̂| per channel from the channel's min and max: no |x̂| temporary
            reduce = [d for d in range(dims) if d != 1]
            magnitude = torch.maximum(inputs.detach().amax(reduce) - mean, mean - inputs.detach().amin(reduce))
            scale = (magnitude * invstd / 127).clamp_min_(torch.finfo(torch.float32).tiny)
            normalised = torch.empty(inputs.shape, dtype=torch.int8)
            gain = invstd_v / _per_channel_view(scale, dims)
        else:
            scale = torch.ones(inputs.shape[1])
            normalised, gain = torch.empty(inputs.shape, dtype=torch.float32), invstd_v
        for rows in _row_chunks(inputs):  # a chunk at a time: no float x̂ of the whole map
            codes = (inputs.detach()[rows] - mean_v).mul_(gain)
            normalised[rows] = codes.round_().clamp_(-127, 127) if quantize else codes
        ctx.training, ctx.has_weight, ctx.has_bias = training, weight is not None, bias is not None
        ctx.fused = use_fused and quantize
        ctx.save_for_backward(normalised, scale, invstd, weight)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        codes, scale, invstd, weight = ctx.saved_tensors
        dims = grad_output.dim()
        gain = invstd if weight is None else invstd * weight
        reduce = [d for d in range(dims) if d != 1]
        count = grad_output.numel() // grad_output.shape[1]
        # fused (fused.py): Σg and Σg·code in one compiled pass, g_x in another, no chunk loop
        use_fused = ctx.fused and grad_output.is_contiguous() and fused.available()
        sums = fused.call("bn_sums", grad_output.view(grad_output.shape[0], grad_output.shape[1], -1),
                          codes.view(grad_output.shape[0], grad_output.shape[1], -1)) if use_fused else None
        if sums is not None:
            grad_bias, grad_weight = sums
        else:
            grad_bias = grad_output.sum(reduce)
            grad_weight = torch.zeros_like(grad_bias)  # Σ g·x̂ = scale·Σ g·code, a chunk at a time
            for rows in _row_chunks(grad_output):
                grad_weight += (grad_output[rows] * codes[rows]).sum(reduce)
        grad_weight = grad_weight * scale
        gain_v = _per_channel_view(gain, dims)
        # in place when the gradient is one that a HOT backward just allocated (ownership.py)
        owned = take(grad_output)
        grad_input = grad_output if owned else torch.empty_like(
            grad_output, memory_format=torch.contiguous_format)
        if ctx.training:  # g_x = γσ⁻¹(g − Σg/M − x̂·Σg·x̂/M), a chunk at a time
            shift = _per_channel_view(grad_bias / count, dims)
            slope = _per_channel_view(grad_weight * scale / count, dims)
            done = None
            if use_fused and sums is not None:  # written into grad_input: in place when owned
                done = (fused.call("bn_grad_in_place", grad_input, codes, shift, slope, gain_v) if owned
                        else fused.call("bn_grad_into", grad_input, grad_output, codes, shift, slope, gain_v))
            if done is None:
                for rows in _row_chunks(grad_output):
                    grad_input[rows] = (grad_output[rows] - shift).sub_(codes[rows] * slope).mul_(gain_v)
        else:
            torch.mul(grad_output, gain_v, out=grad_input)
        return (release(grad_input), None, None, grad_weight if ctx.has_weight else None,
                grad_bias if ctx.has_bias else None, None, None, None, None, None)


def _row_chunks(tensor: torch.Tensor):
    """Slices along dim 0 of about :data:`_CHUNK` entries each (at least one row)."""
    step = max(1, _CHUNK // max(tensor[0].numel(), 1))
    for start in range(0, tensor.shape[0], step):
        yield slice(start, min(start + step, tensor.shape[0]))


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class WindowIndexMaxPool2d(torch.autograd.Function):
    """F.max_pool2d's output; saves the argmax's offset inside its window (uint8), not int64 indices."""

    @staticmethod
    def forward(ctx, inputs, kernel, stride, padding, dilation, ceil_mode):
        output, indices = F.max_pool2d(inputs, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
        width = inputs.shape[-1]
        starts_h, starts_w = _window_starts(output.shape, stride, padding)
        offset_h = (indices // width - starts_h) // dilation[0]
        offset_w = (indices % width - starts_w) // dilation[1]
        del indices
        local = (offset_h * kernel[1] + offset_w).to(torch.uint8)
        ctx.geometry, ctx.input_shape = (kernel, stride, padding, dilation), inputs.shape
        ctx.save_for_backward(local)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        (local,) = ctx.saved_tensors
        kernel, stride, padding, dilation = ctx.geometry
        height, width = ctx.input_shape[-2:]
        starts_h, starts_w = _window_starts(grad_output.shape, stride, padding)
        grad_input = grad_output.new_zeros(*ctx.input_shape[:-2], height * width)
        for rows in _row_chunks(grad_output):  # int64 indices of a chunk at a time, not of the map
            offsets = local[rows].long()
            indices = (starts_h + (offsets // kernel[1]) * dilation[0]).mul_(width)
            indices += starts_w + (offsets % kernel[1]) * dilation[1]
            del offsets
            grad_input[rows].scatter_add_(-1, indices.flatten(-2), grad_output[rows].flatten(-2))
        return release(grad_input.view(ctx.input_shape)), None, None, None, None, None


def _window_starts(output_shape, stride, padding):
    out_h, out_w = output_shape[-2:]
    starts_h = (torch.arange(out_h) * stride[0] - padding[0]).view(out_h, 1)
    starts_w = (torch.arange(out_w) * stride[1] - padding[1]).view(1, out_w)
    return starts_h, starts_w


class ShapeOnlyAdaptiveAvgPool2d(torch.autograd.Function):
    """F.adaptive_avg_pool2d's output; keeps only the input's shape (autograd keeps the input)."""

    @staticmethod
    def forward(ctx, inputs, output_size):
        ctx.input_shape, ctx.dtype = inputs.shape, inputs.dtype
        return torch._C._nn.adaptive_avg_pool2d(inputs, output_size)

    @staticmethod
    def backward(ctx, grad_output):
        # the kernel reads only the shape of ``self``: an uninitialised tensor is never touched
        shape_only = grad_output.new_empty(ctx.input_shape)
        return torch.ops.aten._adaptive_avg_pool2d_backward(grad_output, shape_only), None


def _records(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


class CompressedActivations(TorchFunctionMode):
    """While active, the ops above save compressed tensors for backward (module docstring)."""

    def __init__(self, quantize: bool = True, use_fused: bool = False) -> None:
        super().__init__()
        self.quantize, self.use_fused = quantize, use_fused
        self.handlers = {
            F.relu: self._relu, torch.relu: self._relu, torch.Tensor.relu: self._relu,
            torch.relu_: self._relu_inplace, torch.Tensor.relu_: self._relu_inplace,
            F.relu6: self._relu6, F.hardtanh: self._hardtanh,
            F.batch_norm: self._batch_norm, F.max_pool2d: self._max_pool2d,
            F.adaptive_avg_pool2d: self._adaptive_avg_pool2d,
        }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = self.handlers.get(func)
        if handler is not None:
            result = handler(*args, **kwargs)
            if result is not NotImplemented:
                return result
        return func(*args, **kwargs)

    @staticmethod
    def _relu(inputs, inplace=False):
        if not _records(inputs):
            return NotImplemented
        return MaskedReLU.apply(inputs, 0.0, None, inplace)

    @staticmethod
    def _relu_inplace(inputs):
        return CompressedActivations._relu(inputs, inplace=True)

    @staticmethod
    def _relu6(inputs, inplace=False):
        return CompressedActivations._hardtanh(inputs, 0.0, 6.0, inplace)

    @staticmethod
    def _hardtanh(inputs, min_val=-1.0, max_val=1.0, inplace=False):
        if not _records(inputs):
            return NotImplemented
        return MaskedReLU.apply(inputs, float(min_val), float(max_val), inplace)

    def _batch_norm(self, inputs, running_mean, running_var, weight=None, bias=None, training=False,
                    momentum=0.1, eps=1e-5):
        if not _records(inputs, weight, bias) or inputs.dim() < 2 or (not training and running_mean is None):
            return NotImplemented
        if training and running_mean is not None and momentum is None:
            return NotImplemented  # cumulative averaging needs num_batches_tracked: leave it to torch
        return CompressedBatchNorm.apply(inputs, running_mean, running_var, weight, bias, training,
                                         momentum, eps, self.quantize, self.use_fused)

    @staticmethod
    def _max_pool2d(inputs, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                    return_indices=False):
        kernel = _pair(kernel_size)
        if not _records(inputs) or return_indices or inputs.dim() != 4 or kernel[0] * kernel[1] > 256:
            return NotImplemented
        stride = kernel if stride is None or (not isinstance(stride, int) and len(stride) == 0) else _pair(stride)
        return WindowIndexMaxPool2d.apply(inputs, kernel, stride, _pair(padding), _pair(dilation), ceil_mode)

    @staticmethod
    def _adaptive_avg_pool2d(inputs, output_size):
        if not _records(inputs):
            return NotImplemented
        return ShapeOnlyAdaptiveAvgPool2d.apply(inputs, output_size)
