"""``hot_mode(model, config)``: train any torch model with HOT's compressed backward pass.

HOT (Kim et al., "HOT: Hadamard-based Optimized Training", CVPR 2025) replaces the backward of
every Conv2d / Linear: HQ (block Hadamard + INT4) for the input gradient, HLA (low-sequency
Walsh projection + INT8) for the weight gradient, the saved activation kept projected in int8
(ABC), and a per-layer choice of per-tensor vs per-token gradient quantizer (LQS) made on the
first backward pass (one calibration batch). The forward pass is untouched (float, exact).

    with hot_mode(model, HOTConfig()) as session:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
    print(session.report())          # per layer: HQ block, HLA rank used, LQS choice, saved bytes

Depthwise / grouped convs, convs with non-zero padding modes or string padding, and subclasses
that override ``forward`` (e.g. Brevitas Quant* layers) keep their float backward and are listed
in ``session.skipped``. Biases keep a float gradient; no parameter is added or removed.
GEMMs (``HOTConfig.gemm``): ``torch._int_mm`` on int8 codes for Linear and 1×1 convs; k×k convs
multiply the same integer codes with oneDNN's bfloat16 conv kernels where the CPU has them (output
rounded once to bf16), else float32 ones (exact) — im2col/col2im for an integer GEMM cost more
than it saves on CPU (docs/hot_method.md §5). ReLU, BatchNorm and pools save compressed tensors
too (``HOTConfig.compress_activations``, §6); ``hdrq_plugin.hot.budget`` measures a step's peak.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .activations import CompressedActivations
from .backward import ConvGeometry, HOTConv2dFunction, HOTLinearFunction, LayerState
from .hadamard import largest_power_of_two_block, low_sequency_basis


@dataclass(frozen=True)
class HOTConfig:
    """HOT's switches; defaults are the paper's (§3–4) unless noted."""

    hq_max_block: int = 16  # HQ block size: largest power of two ≤ 16 dividing O (paper §3.1)
    hla_order: int = 16  # n of the Walsh–Hadamard blocks along L (paper's cost model)
    hla_rank: int = 8  # low-sequency rows kept per block: half (paper §3.2)
    grad_input_bits: int = 4  # HQ operands INT4 (paper §3.1)
    grad_weight_bits: int = 8  # HLA operands and the saved activation INT8 (paper §3.2)
    per_token_gain: float = 0.5  # LQS: per-token when it more than halves the 4-bit error (§3.3)
    quantize: bool = True  # False keeps only the transforms (exact at hla_rank == hla_order)
    # "auto": Linear / 1×1 GEMMs via torch._int_mm, k×k convs via bfloat16 conv kernels on the
    # integer codes where the CPU has them, else float32 ones (im2col + col2im cost more than the
    # GEMM saves on CPU; benchmarks/hot/memory.py); "bf16": that, always; "int": every GEMM via
    # torch._int_mm (convs through im2col); "float": float32 kernels everywhere (exact products).
    gemm: str = "auto"
    seed: int = 0  # stochastic rounding stream
    # ours (docs/hot_method.md §5): ReLU/BatchNorm/pools save masks / int8 / indices too, and
    # layers reading one input share its compressed buffer; False: only Conv2d/Linear as in the paper
    compress_activations: bool = True
    # ours (docs/hot_method.md §8): each k×k conv's transform + stochastic rounding + quantize chains
    # as one torch.compile kernel (compiled on the first backward, cached; eager where unavailable)
    fused_kernels: bool = True

    def __post_init__(self) -> None:
        for name in ("hq_max_block", "hla_order"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"HOTConfig.{name} must be a power of two, got {value}")
        if not 1 <= self.hla_rank <= self.hla_order:
            raise ValueError(f"HOTConfig.hla_rank must be in [1, hla_order={self.hla_order}], got {self.hla_rank}")
        for name in ("grad_input_bits", "grad_weight_bits"):
            if not 2 <= getattr(self, name) <= 8:
                raise ValueError(f"HOTConfig.{name} must be in 2..8 (int8 codes), got {getattr(self, name)}")
        if self.gemm not in ("auto", "int", "float", "bf16"):
            raise ValueError(f"HOTConfig.gemm must be 'auto', 'int', 'float' or 'bf16', got {self.gemm!r}")
        if not 0.0 < self.per_token_gain <= 1.0:
            raise ValueError(f"HOTConfig.per_token_gain must be in (0, 1], got {self.per_token_gain}")


def _skip_reason(module: nn.Module) -> str | None:
    """Why ``module`` keeps its float backward, or None when HOT handles it."""
    if isinstance(module, nn.Linear):
        return None if type(module).forward is nn.Linear.forward else "subclass overrides forward"
    if isinstance(module, nn.Conv2d):
        if type(module).forward is not nn.Conv2d.forward:
            return "subclass overrides forward"
        if module.groups != 1:
            return f"grouped/depthwise conv (groups={module.groups}) stays float"
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return f"padding {module.padding!r} / mode {module.padding_mode!r} stays float"
        return None
    return "not a Conv2d/Linear"


def _resolved_gemm(gemm: str) -> str:
    """"auto" → "bf16" where oneDNN has bfloat16 kernels for this CPU, else "float"."""
    if gemm != "auto":
        return gemm
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float"


class HOTSession:
    """The layers under HOT, their settings and what they did (``report()``)."""

    def __init__(self, model: nn.Module, config: HOTConfig) -> None:
        self.config = config
        self.generator = torch.Generator().manual_seed(config.seed)
        self.states: dict[str, LayerState] = {}
        self.skipped: dict[str, str] = {}
        self.modules: dict[str, nn.Module] = {}
        basis = low_sequency_basis(config.hla_order, config.hla_rank)
        shared_buffers: dict = {}  # one compressed buffer per layer input, shared by its readers
        for name, module in model.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            reason = _skip_reason(module)
            if reason is not None:
                self.skipped[name or "<root>"] = reason
                continue
            out_features = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            kind = "linear" if isinstance(module, nn.Linear) else "conv"
            if kind == "conv" and module.kernel_size == (1, 1) and module.stride == (1, 1) and module.padding == (0, 0):
                kind = "pointwise-conv"
            self.states[name or "<root>"] = LayerState(
                name=name or "<root>", kind=kind,
                hq_block=largest_power_of_two_block(out_features, config.hq_max_block), basis=basis,
                grad_input_bits=config.grad_input_bits, grad_weight_bits=config.grad_weight_bits,
                quantize=config.quantize, gemm=_resolved_gemm(config.gemm),
                per_token_gain=config.per_token_gain, generator=self.generator,
                fused=config.fused_kernels and config.quantize,
                shared_buffers=shared_buffers if config.compress_activations else None,
            )
            self.modules[name or "<root>"] = module

    def report(self) -> list[dict]:
        """One row per HOT layer: HQ block, HLA rank actually used, LQS choice, saved bytes."""
        rows = []
        for name, state in self.states.items():
            effective_rank = state.stored_rows / state.rows if state.rows else None
            rows.append({
                "layer": name, "kind": state.kind, "hq_block": state.hq_block,
                "hla_order": state.order, "hla_rank": state.rank, "rows": state.rows,
                "stored_rows": state.stored_rows,
                "padded_rows": state.stored_rows // state.rank * state.order if state.rows else 0,
                "kept_fraction": effective_rank,  # stored rows / L: rank/n, or more when L was padded
                "per_token": state.per_token, "saved_activation_bytes": state.saved_activation_bytes,
                "shares_buffer_of": state.shares_buffer_of,
            })
        return rows


def _hot_forward(module: nn.Module, state: LayerState):
    if isinstance(module, nn.Linear):
        def forward(inputs: torch.Tensor) -> torch.Tensor:
            if inputs.numel() == 0 or inputs.shape[-1] != module.in_features:
                raise ValueError(
                    f"HOT layer {state.name!r}: input of shape {tuple(inputs.shape)} does not match "
                    f"Linear({module.in_features}, {module.out_features})"
                )
            return HOTLinearFunction.apply(inputs, module.weight, module.bias, state)
        return forward

    geometry = ConvGeometry(tuple(module.stride), tuple(module.padding), tuple(module.dilation))

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        unbatched = inputs.dim() == 3
        batched = inputs.unsqueeze(0) if unbatched else inputs
        if batched.dim() != 4 or batched.shape[1] != module.in_channels or batched.numel() == 0:
            raise ValueError(
                f"HOT layer {state.name!r}: input of shape {tuple(inputs.shape)} does not match "
                f"Conv2d({module.in_channels}, {module.out_channels}) (expected N×{module.in_channels}×H×W)"
            )
        output = HOTConv2dFunction.apply(batched, module.weight, module.bias, geometry, state)
        return output.squeeze(0) if unbatched else output
    return forward


@contextlib.contextmanager
def hot_mode(model: nn.Module, config: HOTConfig | None = None) -> Iterator[HOTSession]:
    """Within the block, every eligible Conv2d/Linear of ``model`` back-propagates with HOT.

    The modules' ``forward`` is swapped for one calling the HOT autograd Function (same output);
    it is restored on exit, even on error. Parameters, buffers and the state dict are unchanged.
    """
    session = HOTSession(model, config or HOTConfig())
    previous = {}
    config = session.config
    activations = (CompressedActivations(config.quantize, config.fused_kernels and config.quantize)
                   if config.compress_activations
                   else contextlib.nullcontext())
    try:
        for name, module in session.modules.items():
            previous[name] = module.__dict__.get("forward")
            module.forward = _hot_forward(module, session.states[name])
        with activations:
            yield session
    finally:
        for name, module in session.modules.items():
            if name not in previous:
                continue
            if previous[name] is None:
                del module.forward
            else:
                module.forward = previous[name]
