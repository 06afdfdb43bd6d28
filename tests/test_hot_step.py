"""HOT over the whole training step: what ReLU, BatchNorm and pools save, buffer sharing, budgets."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hdrq_plugin.hot import activations
from hdrq_plugin.hot.activations import CompressedActivations, pack_mask, unpack_mask
from hdrq_plugin.hot.mode import HOTConfig, hot_mode

# float32 round-off of per-channel sums over ≤ 10⁴ entries (√M·u ≈ 6e-6), with margin
FLOAT32_SUM_RTOL = 2e-5


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _saved_bytes(run) -> int:
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(saved)


def _forward_backward(op, inputs, grad, context):
    x = inputs.clone().requires_grad_()
    with context:
        output = op(x)
    output.backward(grad)
    return output.detach(), x.grad


@pytest.mark.parametrize("count", [1, 7, 8, 13, 64])
def test_packed_masks_round_trip_at_any_length(count):
    mask = torch.rand(count, generator=torch.Generator().manual_seed(count)) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-count // 8)
    assert torch.equal(unpack_mask(packed, mask.shape), mask)


OPS = {
    "F.relu": F.relu,
    "nn.ReLU(inplace)": lambda x: nn.ReLU(inplace=True)(x * 1.0),
    "Tensor.relu": lambda x: x.relu(),
    "relu6": F.relu6,
    "hardtanh": lambda x: F.hardtanh(x, -0.5, 0.75),
    "max_pool 3/2/1": lambda x: F.max_pool2d(x, 3, 2, 1),
    "max_pool dilated": lambda x: F.max_pool2d(x, 2, 1, 0, dilation=2),
    "max_pool ceil": lambda x: F.max_pool2d(x, 3, 2, ceil_mode=True),
    "adaptive avg": lambda x: F.adaptive_avg_pool2d(x, (3, 2)),
}


@pytest.mark.parametrize("name", OPS)
def test_exact_ops_keep_forward_and_gradient_bit_for_bit(name):
    op = OPS[name]
    inputs = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(0)) * 4
    with torch.no_grad():
        grad = torch.randn_like(op(inputs))
    plain = _forward_backward(op, inputs, grad, contextlib.nullcontext())
    compressed = _forward_backward(op, inputs, grad, CompressedActivations())
    assert torch.equal(compressed[0], plain[0])
    assert torch.allclose(compressed[1], plain[1], rtol=0, atol=1e-6)  # overlapping pool windows: order of sums


def test_a_mask_that_drops_the_upper_bound_fails_the_gradient_check(monkeypatch):
    inputs = torch.linspace(-8, 8, 64).reshape(1, 1, 8, 8)
    grad = torch.ones(1, 1, 8, 8)
    plain = _forward_backward(F.relu6, inputs, grad, contextlib.nullcontext())[1]
    original = activations.MaskedReLU.forward

    def broken(ctx, inputs, low, high, inplace):
        return original(ctx, inputs, low, None, inplace) if high is not None else original(ctx, inputs, low, high, inplace)

    monkeypatch.setattr(activations.MaskedReLU, "forward", staticmethod(broken))
    assert not torch.equal(_forward_backward(F.relu6, inputs, grad, CompressedActivations())[1], plain)


def test_relu_and_pools_save_bits_and_bytes_not_floats():
    x = torch.randn(4, 16, 16, 16, requires_grad=True)
    with CompressedActivations():
        assert _saved_bytes(lambda: F.relu(x)) == x.numel() // 8
        assert _saved_bytes(lambda: F.max_pool2d(x, 2)) == x.numel() // 4  # one uint8 per output
        assert _saved_bytes(lambda: F.adaptive_avg_pool2d(x, 1)) == 0
    assert _saved_bytes(lambda: F.relu(x)) == x.numel() * 4  # plain autograd: the float output


@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_gradients_equal_autograd_when_quantization_is_off(training):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6).train(training)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2), bn.bias.normal_(), bn.running_var.uniform_(0.5, 2), bn.running_mean.normal_()
    inputs, grad = torch.randn(4, 6, 5, 5) * 3 + 1, torch.randn(4, 6, 5, 5)
    results = []
    for context in (contextlib.nullcontext(), CompressedActivations(quantize=False)):
        state = {k: v.clone() for k, v in bn.state_dict().items()}
        bn.zero_grad(set_to_none=True)
        output, grad_input = _forward_backward(bn, inputs, grad, context)
        results.append((output, grad_input, bn.weight.grad, bn.bias.grad, bn.running_mean.clone()))
        bn.load_state_dict(state)
    plain, compressed = results
    assert torch.equal(compressed[0], plain[0]) and torch.equal(compressed[4], plain[4])  # forward, running stats
    for got, expected in zip(compressed[1:4], plain[1:4], strict=True):
        assert _relative_error(got, expected) < FLOAT32_SUM_RTOL


def _batchnorm_weight_gradient_error(forget_scale: bool = False, use_fused: bool = False):
    """|Δg_γ| per channel and its bound ½s·Σ|g| (round to nearest: |x̂ − q·s| ≤ s/2)."""
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(5)
    inputs = torch.randn(8, 5, 6, 6) * torch.tensor([0.1, 1, 5, 20, 100]).view(1, 5, 1, 1)
    grad = torch.randn(8, 5, 6, 6)
    bn.zero_grad(set_to_none=True)
    _forward_backward(bn, inputs, grad, contextlib.nullcontext())
    exact = bn.weight.grad.clone()
    normalised = F.batch_norm(inputs, None, None, training=True)
    scale = normalised.abs().amax((0, 2, 3)) / 127
    original = activations.CompressedBatchNorm.backward
    bn.zero_grad(set_to_none=True)
    with pytest.MonkeyPatch.context() as patch:
        if forget_scale:  # the broken variant: takes the int8 codes for x̂
            patch.setattr(activations.CompressedBatchNorm, "backward", staticmethod(
                lambda ctx, g: original(_UnscaledContext(ctx), g)))
        _forward_backward(bn, inputs, grad, CompressedActivations(use_fused=use_fused))
    return (bn.weight.grad - exact).abs(), scale / 2 * grad.abs().sum((0, 2, 3))


class _UnscaledContext:
    def __init__(self, ctx):
        codes, scale, invstd, weight = ctx.saved_tensors
        self.saved_tensors = (codes, torch.ones_like(scale), invstd, weight)
        self.training, self.has_weight, self.has_bias = ctx.training, ctx.has_weight, ctx.has_bias
        self.fused = ctx.fused


@pytest.mark.parametrize("use_fused", [False, True])  # eager chunks / the compiled kernels (fused.py)
def test_batchnorm_int8_weight_gradient_error_is_within_half_a_step_per_entry(use_fused):
    error, bound = _batchnorm_weight_gradient_error(use_fused=use_fused)
    assert bool((error <= bound * (1 + 1e-4) + 1e-6).all())
    assert bool((error > 0).any())


@pytest.mark.parametrize("use_fused", [False, True])
def test_a_batchnorm_that_forgets_the_scale_fails_the_bound(use_fused):
    error, bound = _batchnorm_weight_gradient_error(forget_scale=True, use_fused=use_fused)
    assert not bool((error <= bound * (1 + 1e-4) + 1e-6).all())


def _small_resnet():
    from hdrq_examples.models import ResNetConfig, build_resnet

    torch.manual_seed(0)
    return build_resnet(ResNetConfig(widths=(8, 16, 32))).train()


def test_a_resnet_step_keeps_its_forward_and_saves_under_a_third_of_plain():
    model = _small_resnet()
    inputs, labels = torch.randn(16, 3, 32, 32), torch.arange(16) % 10
    torch.manual_seed(2)
    plain_output = model(inputs)
    plain_bytes = _saved_bytes(lambda: F.cross_entropy(model(inputs), labels))
    with hot_mode(model, HOTConfig()) as session:
        torch.manual_seed(2)
        assert torch.equal(model(inputs), plain_output)
        hot_bytes = _saved_bytes(lambda: F.cross_entropy(model(inputs), labels).backward())
    assert hot_bytes < 0.35 * plain_bytes
    shared = {row["layer"]: row["shares_buffer_of"] for row in session.report() if row["shares_buffer_of"]}
    # each downsampling block's input is read by conv1 and the downsample conv: one buffer
    assert {frozenset(pair) for pair in shared.items()} == {
        frozenset({f"{block}.conv1", f"{block}.downsample.0"}) for block in ("layer2.0", "layer3.0")}
    with hot_mode(model, HOTConfig(compress_activations=False)):
        # the paper's HOT compresses only what Conv2d/Linear keep
        assert _saved_bytes(lambda: F.cross_entropy(model(inputs), labels)) > 1.5 * hot_bytes


def test_a_shared_buffer_is_not_reused_for_a_tensor_changed_in_place():
    conv_a, conv_b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
    model = nn.ModuleDict({"a": conv_a, "b": conv_b})
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    with hot_mode(model, HOTConfig()) as session:
        y = x * 1.0
        first = conv_a(y)
        y.mul_(2)  # a new version: conv_b must compress it anew
        (first.sum() + conv_b(y).sum()).backward()
    assert session.states["b"].shares_buffer_of is None


class _StemWithShortcut(nn.Module):
    """conv → BN → ReLU → max-pool, and the BN output read twice (ReLU and a residual add)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x):
        stem = F.max_pool2d(F.relu(self.bn(self.conv(x))), 3, 2, 1)
        normalised = self.bn2(self.conv2(stem))
        return F.relu(normalised) + normalised


def _step_gradients(model, inputs, config):
    model.zero_grad(set_to_none=True)
    x = inputs.clone().requires_grad_()
    with contextlib.nullcontext() if config is None else hot_mode(model, config):
        model(x).square().sum().backward()
    return [x.grad] + [p.grad.clone() for p in model.parameters()]


def test_in_place_gradients_match_autograd_and_a_shared_gradient_is_never_overwritten(monkeypatch):
    torch.manual_seed(0)
    model, inputs = _StemWithShortcut().train(), torch.randn(4, 3, 16, 16)
    exact = HOTConfig(quantize=False, hla_rank=16)
    reference = _step_gradients(model, inputs, None)
    for got, want in zip(_step_gradients(model, inputs, exact), reference, strict=True):
        assert _relative_error(got, want) < FLOAT32_SUM_RTOL
    # broken: every received gradient treated as owned, also the one the residual add hands to
    # both of its inputs — the shared gradient is overwritten and the step goes wrong
    monkeypatch.setattr(activations, "take", lambda gradient: gradient.is_contiguous())
    broken = _step_gradients(model, inputs, exact)
    assert max(_relative_error(got, want) for got, want in zip(broken, reference, strict=True)) > 0.01


def test_chunking_does_not_change_the_quantized_input_gradient(monkeypatch):
    from hdrq_plugin.hot import activations as hot_activations
    from hdrq_plugin.hot import backward as hot_backward
    from hdrq_plugin.hot import hadamard as hot_hadamard

    torch.manual_seed(0)
    model, inputs = _StemWithShortcut().train(), torch.randn(8, 3, 16, 16)
    whole = _step_gradients(model, inputs, HOTConfig(seed=3))
    for module in (hot_backward, hot_hadamard, hot_activations):
        monkeypatch.setattr(module, "_CHUNK", 64)  # a few images or rows per chunk
    chunked = _step_gradients(model, inputs, HOTConfig(seed=3))
    # HQ's per-tensor max, the dither stream and every code are the same chunk by chunk
    assert torch.equal(chunked[0], whole[0])
    for got, want in zip(chunked[1:], whole[1:], strict=True):  # SAWB moments summed in another order
        assert _relative_error(got, want) < 0.05
