"""NIPQ quantization-aware training: noise + learned bits, then hard quantization with bits frozen.

Schedule (``docs/nipq_method.md`` "Schedule"): phase 1 trains weights, truncations α and bit-widths
under pseudo-quantization noise with stochastic bit rounding and a cost term (average bits or
BOPs, :mod:`hdrq_plugin.nipq.cost`); phase 2 freezes every bit-width to ``round(b_c)``, switches
the quantizers to LSQ-style STE rounding, re-estimates BatchNorm statistics (when the model
still has BatchNorm; ``convert_to_brevitas`` folds it) and fine-tunes. An optional teacher adds
knowledge distillation (weight 1, as the reference). The same engine with
:meth:`NIPQConfig.uniform_ste` is the uniform-bit LSQ/STE QAT baseline (bits pinned, no noise).

Checkpoints (``checkpoint_dir``) are written atomically at the end of every epoch; a run
started again with the same directory resumes from the last one and, because every epoch
reseeds torch's RNG with ``seed`` and the epoch index, ends with the same weights as an
uninterrupted run (for loaders whose shuffling uses torch's global RNG). A non-finite loss stops
training, restores the last good state (the checkpoint on disk is left as it was) and raises
:class:`NIPQTrainingError` naming the step.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._io import ensure_writable_dir, save_torch_atomic
from ..data import plain_tensor, split_batch
from ..errors import HDRQPluginError, InputError, one_line
from ..progress import progress_bar
from ..quant.control import set_quant_mode
from ..quant.quantizers import PseudoQuantIntQuant, QuantMode
from .budget import NIPQTarget, check_reachable, freeze_bits, parse_target
from .cost import CostModel, CostReport, average_bits_loss, bops_loss, describe_costs
from .landing import freeze_on_remaining_budget, landing_order, landing_steps
from .passes import fit_truncations, inputs_of, labels_of, observe_activation_ranges, reestimate_batchnorm
from .quantizers import LearnedBitWidth, LearnedTruncation

__all__ = ["start_widths_at_budget", "widths_landed", "NIPQConfig", "NIPQTarget", "NIPQResult", "NIPQTrainingError", "nipq_train", "freeze_bits",
           "observe_activation_ranges", "reestimate_batchnorm", "parse_target", "quantize_nipq"]

#: Noise epochs of :func:`quantize_nipq` (and the CLI, demo and benchmarks) with the CPU preset:
#: ≈ 100 steps on a digits target, the widths freezing after 60 % of them (``freeze_fraction``).
CPU_EPOCHS = 10
#: the largest weight land_before_freeze gives the width cost (2**10 × cost_weight): an unbounded
#: doubling reached 1e12 in 50 steps of the demo and swamped the task loss (docs/nipq_method.md §6)
MAX_COST_SCALE = 2.0**10
CHECKPOINT_FORMAT = "hdrq-plugin/nipq-training/v1"
CHECKPOINT_NAME = "nipq_last.pt"
TEACHER_LOGITS = "teacher_logits"  # batch key of the cached distillation targets (TeacherLogits)


class NIPQTrainingError(HDRQPluginError, RuntimeError):
    """Training stopped (non-finite loss); the message names the step and the last good checkpoint."""


class NIPQCheckpointError(InputError):
    """A checkpoint folder holds a checkpoint of another run (seed, settings, data size) or junk."""


@dataclass(frozen=True)
class NIPQConfig:
    """Hyper-parameters; defaults are the reference's (docs/nipq_method.md "Schedule") unless noted."""

    hard_epochs: int = 3  # phase 2, hard quantization with bits frozen (reference: 3)
    lr: float = 0.04  # SGD Nesterov, momentum 0.9 (reference)
    hard_lr: float | None = None  # phase-2 learning rate; None: lr / 10 (ours: a short fine-tune)
    quant_lr: float | None = None  # lr of θ_α; None: lr (the reference trains it with SGD too)
    bits_lr: float | None = None  # lr of θ_b; None: quant_lr
    momentum: float = 0.9
    bits_momentum: float | None = None  # θ_b's momentum; None: momentum (0 damps the widths' overshoot)
    weight_decay: float = 1e-5  # on weights only (reference)
    warmup_epochs: float = 3.0  # linear warm-up, then cosine (reference: 3 of 40 epochs)
    distillation_weight: float = 1.0  # KD from a frozen teacher (reference: weight 1)
    distillation_temperature: float = 1.0
    cost_weight: float = 1.0  # multiplies the average-bit term (the BOPs term carries its own 3)
    bits_unit: float | None = None  # None: Σ numel (module doc of nipq_cost); reference 2^23
    bops_unit: float | None = None  # None: target / 5.3 (the reference's ratio)
    noise: bool = True  # phase 1 under PQN (False: STE, the LSQ baseline)
    learn_bits: bool = True  # False: every learned width pinned to the target (uniform baseline)
    noise_shape: str = "histogram"  # docs/nipq_method.md: the tensor's own rounding-error histogram, or "uniform"
    activation_init: str = "data"  # "data": α from the first batches' max|x|; "reference": 6 / 3
    init_batches: int = 4
    fit_budget: bool = True  # after freezing, close any gap to the budget by measured loss per bit (freeze_bits)
    freeze_fraction: float = 0.6  # ours: widths freeze after this fraction of the noise epochs, so the
    # weights train on at their final widths (docs/nipq_method.md §6; the reference freezes at the end)
    fit_weight_truncations: bool = True  # ours: weight α by L_p clipping at the deployed width, at the start
    # (pinned widths) and when the widths freeze (passes.fit_truncations; docs/nipq_method.md §6)
    ste_after_freeze: bool = True  # ours: once the widths are frozen the weights train with STE rounding
    # (as phase 2), not noise: at 3 bits the noise proxy does not see the rounding dead zone
    # (docs/nipq_method.md §6; optdigits uniform 3 bits: noise to the end 10.8 %)
    start_at_budget: bool = True  # ours: learned widths start at the budget's uniform width, not the
    # reference's 8 bits, so the landing below moves them little (docs/nipq_method.md §6)
    land_start: float | None = 0.3  # ours: from this fraction of the noise steps to the freeze point the
    # widths freeze one at a time, largest share of the budget first, each on the budget left to the
    # free ones (nipq.landing; docs/nipq_method.md §6). None: all freeze (and are projected) at the freeze point
    land_before_freeze: bool = False  # superseded by land_start (opt-in, needs land_start=None), ours: from the freeze point on, the widths freeze at the first
    # step their rounded totals are on the budget (at most it, less than one smallest move below); until
    # then the cost's weight doubles every step, up to MAX_COST_SCALE. The projection runs at the end of
    # phase 1 if they never land. Off by default: they never landed in any measured run, and in the demo
    # (110 steps) the unbounded doubling drove the loss to 1e9 and optdigits from 96.5 to 77.6 %
    # (docs/nipq_method.md §6)
    budget_batches: int = 2  # fixed training batches that measure the loss of each projection move
    seed: int = 0
    # how quantize_model / quantize_nipq run it (nipq_train takes these as arguments)
    epochs: int | None = None  # noise epochs; None: CPU_EPOCHS
    target: Any = None  # average bits (2..8), "w4a4", {"gbops": x} or NIPQTarget; None: the bit spec
    batch_size: int = 128

    def __post_init__(self) -> None:
        if self.hard_epochs < 0 or self.lr <= 0 or self.warmup_epochs < 0:
            raise ValueError(f"hard_epochs/warmup_epochs must be >= 0 and lr > 0: {self}")
        if not math.isfinite(self.cost_weight):  # a negative weight stays: the tests' broken cost (test_nipq.py)
            raise ValueError(f"cost_weight must be a finite number, got {self.cost_weight}")
        if not 0 < self.freeze_fraction <= 1:
            raise ValueError(f"freeze_fraction must be in (0, 1], got {self.freeze_fraction}")
        if self.land_start is not None and not 0 <= self.land_start <= self.freeze_fraction:
            raise ValueError(f"land_start must be in [0, freeze_fraction={self.freeze_fraction}] or None, "
                             f"got {self.land_start}")
        if self.land_start is not None and self.land_before_freeze:
            raise ValueError("land_before_freeze is the older landing: it needs land_start=None")
        if self.activation_init not in ("data", "reference"):
            raise ValueError(f"activation_init must be 'data' or 'reference', got {self.activation_init!r}")

    @classmethod
    def uniform_ste(cls, **changes) -> NIPQConfig:
        """Uniform-bit LSQ/STE QAT with the same schedule: bits pinned at the target, no noise."""
        return cls(**{"noise": False, "learn_bits": False, **changes})

    @classmethod
    def cpu_preset(cls, **changes) -> NIPQConfig:
        """Short fine-tuning of an already trained model on CPU (the digits benchmark).

        Weights lr 0.001 / hard 0.0002: the converted model has BatchNorm folded, and SGD at
        0.01 diverged within 5 steps even in float (measured on the digits zoo); θ_α lr 0.01,
        θ_b lr 0.1 with the reference's momentum 0.9 (ablation in docs/nipq_method.md
        "Schedule": at 0.02 the deployed-width cost had not settled the widths in 30 steps);
        average-bit cost weight 8 (ablation, optdigits avg 3, docs/nipq_method.md "Schedule": 1 let the
        widths drift 0.8 bit off the budget before the landing, 64 collapsed the model); half a
        warm-up epoch, 1 hard epoch (the reference's 0.04 and 40 + 3 epochs are for ImageNet with
        BN unfolded).
        """
        return cls(**{"lr": 0.001, "hard_lr": 0.0002, "quant_lr": 0.01, "bits_lr": 0.1, "cost_weight": 8.0,
                      "warmup_epochs": 0.5, "hard_epochs": 1, **changes})


@dataclass
class NIPQResult:
    """What :func:`nipq_train` did: the final cost, the widths as learned (``round(b_c)`` when they
    froze, before :func:`freeze_bits` closes any gap to the budget), the accuracy (hard-rounded
    evaluation on ``eval_data``, or on the budget batches) just before and just after freezing,
    timings, steps."""

    target: str
    report: CostReport
    report_at_freeze: CostReport | None
    steps: int
    seconds_per_epoch: dict[str, float] = field(default_factory=dict)
    last_loss: float = float("nan")
    checkpoint: str | None = None
    batchnorm_reestimated: int = 0
    freeze_epoch: int = 0  # widths froze in this noise epoch (1-based)
    freeze_step: int = 0  # ... after this many steps
    cost_scale_at_freeze: float = 1.0  # the cost's weight when the widths landed (doubled each step off budget)
    accuracy_before_freeze: float | None = None
    accuracy_after_freeze: float | None = None
    landing_start_step: int | None = None  # the first width froze after this step (land_start); None: no landing
    accuracy_at_landing_start: float | None = None  # hard-rounded, just before the first landing freeze
    landing_move: dict[str, float] = field(default_factory=dict)  # net average bits the landing freezes
    # moved per kind (frozen width − round(b_c) at that step, numel-weighted over the learned tensors)
    landing_move_abs: dict[str, float] = field(default_factory=dict)  # the same, |moves| summed

    @property
    def freeze_drop(self) -> float | None:
        """Accuracy lost by freezing (and projecting) the widths, in fraction of samples."""
        if self.accuracy_before_freeze is None or self.accuracy_after_freeze is None:
            return None
        return self.accuracy_before_freeze - self.accuracy_after_freeze


# --- pieces the loop uses ---------------------------------------------------------------------

class TeacherLogits(torch.utils.data.Dataset):
    """``data`` with the frozen teacher's logits attached: ``{"input", "label", "teacher_logits"}``.

    The teacher is in eval mode and the data are not augmented, so its logits for a sample are
    the same every epoch: computing them once saves a teacher forward per step (≈ 12 % of a NIPQ
    step on the digits ResNet, issue 21). They are bit-identical to a per-batch forward on the
    models measured (oneDNN convolutions compute each sample alone); tests/test_nipq.py checks
    that a run with the cache ends with the weights of one without.
    """

    def __init__(self, data, teacher: nn.Module, batch_size: int = 256) -> None:
        from torch.utils.data import DataLoader

        self.data = data
        teacher.eval()
        with torch.no_grad():
            self.logits = torch.cat([plain_tensor(teacher(inputs_of(batch))).detach()
                                     for batch in DataLoader(data, batch_size=batch_size)])
        if len(self.logits) != len(data):
            raise ValueError(f"the teacher gave {len(self.logits)} logits for {len(data)} samples")

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        x, y = split_batch(self.data[index], "training data")
        item = {"input": x, TEACHER_LOGITS: self.logits[index]}
        if y is not None:
            item["label"] = y
        return item


def _task_loss(model: nn.Module, teacher: nn.Module | None, batch, config: NIPQConfig,
               soft: Tensor | None = None) -> Tensor:
    """Cross-entropy and distillation; ``soft``: the teacher's logits when already computed."""
    x, y = inputs_of(batch), labels_of(batch)
    if soft is None and isinstance(batch, dict):
        soft = batch.get(TEACHER_LOGITS)  # cached once by quantize_nipq (TeacherLogits)
    out = model(x)
    out = plain_tensor(out)
    terms = []
    if y is not None:
        terms.append(F.cross_entropy(out, y))
    if teacher is not None and config.distillation_weight > 0:
        if soft is None:
            with torch.no_grad():
                soft = teacher(x)
        t = config.distillation_temperature
        kd = F.kl_div(F.log_softmax(out / t, 1), F.softmax(soft / t, 1), reduction="batchmean") * t * t
        terms.append(config.distillation_weight * kd)
    if not terms:
        raise ValueError("the training batches carry no labels and no teacher was given: nothing to learn from")
    return sum(terms)


def _cost_loss(cost: CostModel, target: NIPQTarget, config: NIPQConfig) -> Tensor:
    if target.bops is not None:
        return bops_loss(cost, target.bops, unit=config.bops_unit)
    terms = [average_bits_loss(cost, kind, bits, unit=config.bits_unit)
             for kind, bits in (("weights", target.weight_bits), ("activations", target.act_bits))
             if bits is not None]
    return config.cost_weight * sum(terms)


def _optimizer(model: nn.Module, lr: float, quant_lr: float, bits_lr: float, config: NIPQConfig) -> torch.optim.Optimizer:
    """SGD Nesterov (reference); weight decay on the weights only; θ_α and θ_b in their own groups."""
    truncations = [m.theta for m in model.modules() if isinstance(m, LearnedTruncation)]
    bit_widths = [m.theta for m in model.modules() if isinstance(m, LearnedBitWidth)]
    quant_ids = {id(p) for p in truncations + bit_widths}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in quant_ids]
    groups = [{"params": weights, "lr": lr, "weight_decay": config.weight_decay, "base_lr": lr}]
    bits_momentum = config.momentum if config.bits_momentum is None else config.bits_momentum
    for params, group_lr, momentum in ((truncations, quant_lr, config.momentum), (bit_widths, bits_lr, bits_momentum)):
        params = [p for p in params if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": group_lr, "weight_decay": 0.0, "base_lr": group_lr,
                           "momentum": momentum})
    return torch.optim.SGD(groups, lr=lr, momentum=config.momentum, nesterov=True)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine to zero (the reference schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def _task_loss_eval(model: nn.Module, teacher: nn.Module | None, batches, config: NIPQConfig,
                    soft: list) -> float:
    """Mean task loss over ``batches``, hard-rounded (eval mode): the price of a projection move."""
    was = model.training
    model.eval()
    try:
        return sum(float(_task_loss(model, teacher, batch, config, s)) for batch, s in zip(batches, soft, strict=True)
                   ) / len(batches)
    finally:
        model.train(was)


@torch.no_grad()
def _accuracy(model: nn.Module, batches) -> float | None:
    """Top-1 over labelled ``batches``, hard-rounded (eval mode); None without labels."""
    was = model.training
    model.eval()
    try:
        correct = seen = 0
        for batch in batches:
            y = labels_of(batch)
            if y is None:
                return None
            correct += int((plain_tensor(model(inputs_of(batch))).argmax(1) == y).sum())
            seen += len(y)
        return correct / seen if seen else None
    finally:
        model.train(was)


def _freeze_widths(model, teacher, cost: CostModel, target: NIPQTarget, config: NIPQConfig, budget_batches,
                   eval_batches, epoch: int, epochs: int, step: int = 0, alpha_widths: dict | None = None) -> dict:
    """Freeze the widths (closing any gap to the budget by measured loss per bit), print the deployed
    widths and the accuracy before and after, and return them for :class:`NIPQResult`."""
    learned = cost.report()  # round(b_c): the widths as learned
    learned_line = _budgeted_bits(cost)
    before = _accuracy(model, eval_batches)
    with torch.no_grad():  # the teacher's logits are the same for every candidate move
        soft = [batch[TEACHER_LOGITS] if isinstance(batch, dict) and TEACHER_LOGITS in batch
                else None if teacher is None else teacher(inputs_of(batch)) for batch in budget_batches]
    def measure_loss() -> float:
        return _task_loss_eval(model, teacher, budget_batches, config, soft)
    freeze_bits(cost, target, fit_budget=config.fit_budget and config.learn_bits, measure_loss=measure_loss)
    if config.learn_bits and config.fit_weight_truncations:  # α at the deployed grid, not the noise proxy's
        fit_truncations(model, budget_batches[:1], batches=1, activations=False, fitted_at=alpha_widths)
    deployed = cost.report()
    after = _accuracy(model, eval_batches)
    print(f"nipq: widths frozen at step {step} (noise epoch {epoch}/{epochs}): learned {learned_line} "
          f"({learned.gbops:.4g} GBOPs), acc {_pct(before)} -> deployed {_budgeted_bits(cost)} "
          f"({deployed.gbops:.4g} GBOPs), acc {_pct(after)}", flush=True)
    return {"report_at_freeze": learned.as_dict(), "accuracy_before_freeze": before,
            "accuracy_after_freeze": after, "freeze_epoch": epoch, "freeze_step": step}


@torch.no_grad()
def start_widths_at_budget(cost: CostModel, target: NIPQTarget) -> dict[str, float]:
    """Set every learned width's ``b_c`` to the budget's uniform width (per kind for average bits;
    for BOPs the one width, found by bisection, whose uniform model spends the budget). Returns
    the widths set. Pinned (edge) widths are left alone."""
    from .quantizers import bits_to_logit

    def set_all(tensors, bits: float) -> None:
        for t in tensors:
            if not t.bits.pinned and not t.bits.is_frozen:
                t.bits.theta.fill_(bits_to_logit(min(max(bits, 2.0 + 1e-3), 8.0)))

    if target.bops is not None:
        tensors = cost.weights + cost.activations
        low, high = 2.0, 8.0
        for _ in range(40):
            mid = (low + high) / 2
            set_all(tensors, mid)
            low, high = (mid, high) if float(cost.bops()) < target.bops else (low, mid)
        set_all(tensors, low)
        return {"weights": low, "activations": low}
    chosen = {}
    for kind, bits in (("weights", target.weight_bits), ("activations", target.act_bits)):
        if bits is not None:
            set_all(cost._tensors(kind), float(bits))
            chosen[kind] = float(bits)
    return chosen


def _one_bit_moves(cost: CostModel, target: NIPQTarget) -> dict[str, float]:
    """Per budgeted quantity, the smallest change one learned width moving one bit up can make."""
    moves = {}
    if target.bops is not None:
        learned = {id(t.bits): t.bits for t in cost.weights + cost.activations if not t.bits.pinned}
        per_bit = dict.fromkeys(learned, 0.0)
        for layer in cost.layers:  # d(macs·b_w·b_a)/db_w = macs·b_a, and the other way round
            if id(layer.weight.bits) in per_bit:
                per_bit[id(layer.weight.bits)] += layer.macs * float(layer.input_bits.rounded())
            if id(layer.input_bits) in per_bit:
                per_bit[id(layer.input_bits)] += layer.macs * float(layer.weight.bits.rounded())
        moves["bops"] = min((v for v in per_bit.values() if v > 0), default=0.0)
    for kind, bits in (("weights", target.weight_bits), ("activations", target.act_bits)):
        numel = [t.numel for t in cost._tensors(kind) if not t.bits.pinned]
        if bits is not None and numel:
            moves[kind] = min(numel) / sum(numel)
    return moves


LANDING_BAND_BITS = 0.05  # issue 21: freezing may move the average by at most this (or one smallest move)
LANDING_BAND_BOPS = 0.01  # the same for a BOPs budget, as a fraction of it


def widths_landed(cost: CostModel, target: NIPQTarget) -> bool:
    """The rounded learned widths are on the budget: at most it and within one smallest one-bit move
    or ``LANDING_BAND_BITS`` (BOPs: ``LANDING_BAND_BOPS`` of it) below, whichever is wider — what the
    projection's refill then closes by moves no larger. Per kind for average bits, all widths for BOPs.
    (One smallest move alone is a band a gradient step rarely hits: on the digits ResNet it is 0.2 %
    of the weights, 28-step runs never landed in it.)"""
    moves = _one_bit_moves(cost, target)
    if "bops" in moves:
        moves["bops"] = max(moves["bops"], LANDING_BAND_BOPS * target.bops)
    moves = {k: (v if k == "bops" else max(v, LANDING_BAND_BITS)) for k, v in moves.items()}
    with torch.no_grad():
        if target.bops is not None:
            spent = float(cost.bops(deployed=True))
            return spent <= target.bops * (1 + 1e-9) and target.bops - spent < moves["bops"]
        for kind, bits in (("weights", target.weight_bits), ("activations", target.act_bits)):
            if kind in moves:
                spent = float(cost.average_bits(kind, learned_only=True, deployed=True))
                if not (spent <= bits + 1e-9 and bits - spent < moves[kind] - 1e-12):
                    return False
    return True


def _budgeted_bits(cost: CostModel) -> str:
    """Rounded average bits over the learned tensors (what the budget counts), then over all tensors:
    the pinned 8-bit edges lift the second (a 4-bit budget printed 4.055 over all activations)."""
    def average(kind: str, learned_only: bool) -> str:
        try:
            return f"{float(cost.average_bits(kind, learned_only=learned_only, deployed=True)):.3f}"
        except ValueError:  # no learned tensor of this kind
            return "-"
    with torch.no_grad():
        return (f"w {average('weights', True)} a {average('activations', True)} "
                f"[all tensors w {average('weights', False)} a {average('activations', False)}]")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"


def _drop_frozen_bits(optimizer: torch.optim.Optimizer) -> None:
    """Remove parameters that no longer train (frozen θ_b) from the optimizer, as a resumed run
    builds it (:func:`_optimizer` takes only trainable parameters)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not p.requires_grad:
                optimizer.state.pop(p, None)
        group["params"] = [p for p in group["params"] if p.requires_grad]
    # by identity: groups hold tensors, so list.remove's == would compare them
    optimizer.param_groups[:] = [group for group in optimizer.param_groups if group["params"]]


def _enter_hard_phase(model: nn.Module, data) -> int:
    _set_phase(model, noise=False)
    return reestimate_batchnorm(model, data)


def _set_phase(model: nn.Module, *, noise: bool) -> None:
    set_quant_mode(model, QuantMode.NOISE if noise else QuantMode.STE)
    for m in model.modules():
        if isinstance(m, PseudoQuantIntQuant):
            m.lsq_gradient_scaling = not noise  # LSQ step-gradient scaling in the STE phase


def _save(path: Path, payload: dict) -> None:
    save_torch_atomic(path, payload)


def _restore_model(model: nn.Module, saved: dict, path: Path) -> None:
    """Load a training checkpoint's state, and which widths are pinned (a Python attribute of
    modules that Brevitas re-creates on load, so not in the state dict)."""
    try:
        model.load_state_dict(saved["model"], strict=True)
    except (KeyError, RuntimeError) as err:
        raise NIPQCheckpointError(f"{path} does not fit this model ({one_line(err, 120)}); "
                                  "use another checkpoint_dir") from err
    pinned = set(saved.get("pinned") or [])
    for name, module in model.named_modules():
        if isinstance(module, LearnedBitWidth):
            module.pinned = name in pinned


def _load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign file: torch raises many types
        raise NIPQCheckpointError(f"NIPQ checkpoint {path} is unreadable ({one_line(err, 120)}); "
                                  "delete it or use another checkpoint_dir") from err


def nipq_train(model: nn.Module, train_loader, *, target=None, epochs: int = 1, teacher: nn.Module | None = None,
               config: NIPQConfig | None = None, checkpoint_dir: str | Path | None = None,
               progress: bool | None = None, eval_data=None) -> NIPQResult:
    """Train a NIPQ-converted model in place (``convert_to_brevitas(float_model, "nipq-w4a4")``).

    ``train_loader``: a re-iterable of ``(input, label)`` batches (or inputs alone with a
    ``teacher``) with a length. ``target``: see :func:`parse_target`. ``epochs``: phase 1
    (noise, learned bits until ``config.freeze_fraction`` of them, then fixed widths);
    ``config.hard_epochs`` follow. ``eval_data``: labelled batches on which the accuracy before and
    after freezing is printed (default: the budget batches, the first training batches). Returns
    an :class:`NIPQResult`; the model ends in eval mode with every bit-width frozen.
    """
    config = config or NIPQConfig()
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    hard_epochs = int(config.hard_epochs)
    try:
        steps_per_epoch = len(train_loader)
    except TypeError:
        raise TypeError("train_loader needs a length (a DataLoader or a list of batches)") from None
    if steps_per_epoch == 0:
        raise ValueError("train_loader is empty")
    path = None if checkpoint_dir is None else ensure_writable_dir(checkpoint_dir) / CHECKPOINT_NAME
    saved = _load_checkpoint(path) if path is not None and path.is_file() else None
    if saved is not None:
        if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
            raise NIPQCheckpointError(f"{path} is not a NIPQ training checkpoint; use another checkpoint_dir")
        _restore_model(model, saved, path)
    # after the restore: Brevitas rebuilds its quantizer modules when a state dict is loaded, so
    # the cost model must hold the modules that are trained, not the ones they replaced
    cost = describe_costs(model, inputs_of(next(iter(train_loader))))
    target = parse_target(target, cost)
    check_reachable(cost, target)
    if not config.learn_bits:
        if target.bops is not None:
            raise ValueError("the uniform baseline (learn_bits=False) needs an average-bit target, not BOPs")
        for kind, bits in (("weights", target.weight_bits), ("activations", target.act_bits)):
            for t in cost._tensors(kind):
                if not t.bits.pinned and bits is not None:
                    t.bits.freeze(int(round(bits)))
    for m in model.modules():
        if isinstance(m, PseudoQuantIntQuant):
            m.noise_shape = config.noise_shape
    if teacher is not None:
        teacher.eval()

    budget_batches = list(itertools.islice(train_loader, max(1, config.budget_batches)))
    eval_batches = budget_batches if eval_data is None else eval_data
    freeze_epoch = min(epochs, max(1, math.ceil(config.freeze_fraction * epochs)))
    start_epoch, frozen, bn_layers, cost_scale = 0, None, 0, 1.0
    landing = {"accuracy_at_start": None, "move": {}, "move_abs": {}}
    alpha_widths: dict[str, int] = {}  # the width each weight α was last fitted at (passes.fit_truncations)
    if saved is not None:
        run = {"target": asdict(target), "epochs": epochs, "hard_epochs": hard_epochs,
               "config": asdict(config), "steps_per_epoch": steps_per_epoch}
        differ = [k for k in run if saved.get(k) != run[k]]
        if differ == ["config"]:
            differ = [f"config.{k}" for k in run["config"] if (saved.get("config") or {}).get(k) != run["config"][k]]
        if differ:
            raise NIPQCheckpointError(f"{path} is a checkpoint of another run ({', '.join(differ)} differ); "
                                      "use another checkpoint_dir or the same settings")
        start_epoch = int(saved["epoch"])
        frozen = saved.get("frozen")
        cost_scale = float(saved.get("cost_scale", 1.0))
        landing = saved.get("landing") or landing
        alpha_widths = saved.get("alpha_widths") or alpha_widths
    else:
        if config.activation_init == "data":
            torch.manual_seed(config.seed)
            observe_activation_ranges(model, train_loader, batches=config.init_batches)
        if config.learn_bits and config.start_at_budget:
            start_widths_at_budget(cost, target)
        if config.fit_weight_truncations:
            fit_truncations(model, budget_batches[:1], batches=1, activations=False, fitted_at=alpha_widths)

    total_epochs = epochs + hard_epochs
    hard = start_epoch >= epochs
    _set_phase(model, noise=config.noise and not hard and not (frozen and config.ste_after_freeze))
    lr = config.hard_lr if hard else config.lr
    lr = (config.lr / 10 if lr is None else lr)
    quant_lr = lr if hard or config.quant_lr is None else config.quant_lr
    optimizer = _optimizer(model, lr, quant_lr, quant_lr if config.bits_lr is None else config.bits_lr, config)
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
    doubling = config.learn_bits and config.land_before_freeze
    # the landing window (nipq.landing): widths freeze largest first over [land_from, the freeze point)
    schedule, land_from = [], None
    if config.learn_bits and config.land_start is not None:
        land_until = freeze_epoch * steps_per_epoch
        land_from = min(land_until, max(1, round(config.land_start * epochs * steps_per_epoch)))
        order = landing_order(cost, target)
        schedule = [(at, t) for at, t in zip(landing_steps(len(order), land_from, land_until), order, strict=True)
                    if at < land_until]  # an empty window leaves them all to the freeze
    numel = {kind: sum(t.numel for t in cost._tensors(kind) if not t.bits.pinned) for kind in ("weights", "activations")}

    def land_due(step: int) -> None:
        """Freeze the widths scheduled at or before ``step`` on the budget left to the free ones."""
        due = [t for at, t in schedule if at <= step and not t.bits.is_frozen]
        if not due:
            return
        if step == land_from and landing["accuracy_at_start"] is None:
            landing["accuracy_at_start"] = _accuracy(model, eval_batches)
            print(f"nipq: landing from step {land_from} to {freeze_epoch * steps_per_epoch}: {len(schedule)} widths "
                  f"freeze largest first, acc {_pct(landing['accuracy_at_start'])}", flush=True)
        for t in due:
            width, rounded = freeze_on_remaining_budget(cost, target, t)
            kind = "weights" if any(t is w for w in cost.weights) else "activations"
            landing["move"][kind] = landing["move"].get(kind, 0.0) + (width - rounded) * t.numel / numel[kind]
            landing["move_abs"][kind] = landing["move_abs"].get(kind, 0.0) + abs(width - rounded) * t.numel / numel[kind]
        _drop_frozen_bits(optimizer)
        if config.fit_weight_truncations:  # a weight that landed off its fitted width gets α re-fitted now
            fit_truncations(model, budget_batches[:1], batches=1, activations=False, fitted_at=alpha_widths)

    def freeze_now(epoch: int, step: int) -> dict:
        state = _freeze_widths(model, teacher, cost, target, config, budget_batches, eval_batches, epoch + 1,
                               epochs, step, alpha_widths)
        _drop_frozen_bits(optimizer)
        if config.ste_after_freeze and config.noise:
            _set_phase(model, noise=False)
        if schedule:
            moved = ", ".join(f"{kind[0]} {landing['move'].get(kind, 0.0):+.3f} (|moves| {landing['move_abs'].get(kind, 0.0):.3f})"
                              for kind in ("weights", "activations"))
            print(f"nipq: the landing (steps {land_from}-{step}) moved {moved} average bits; acc at its start "
                  f"{_pct(landing['accuracy_at_start'])}, after the freeze {_pct(state['accuracy_after_freeze'])}",
                  flush=True)
        return {**state, "cost_scale": cost_scale}

    last_good = {k: v.clone() for k, v in model.state_dict().items()}
    timings: dict[str, list[float]] = {"noise" if config.noise else "ste": [], "hard": []}
    step, loss_value = start_epoch * steps_per_epoch, float("nan")
    bar = progress_bar(total=total_epochs * steps_per_epoch, initial=step, desc="nipq", unit="step",
                       disable=None if progress is None else not progress, leave=False)
    try:
        for epoch in range(start_epoch, total_epochs):
            hard = epoch >= epochs
            phase_start, phase_steps = (epochs, hard_epochs) if hard else (0, epochs)
            total = phase_steps * steps_per_epoch
            warmup = 0 if hard else round(config.warmup_epochs * steps_per_epoch)
            torch.manual_seed(config.seed * 100_003 + epoch)  # same order and noise when resumed
            model.train()
            tic = time.perf_counter()
            for index, batch in enumerate(train_loader):
                phase_step = (epoch - phase_start) * steps_per_epoch + index
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * _lr_factor(phase_step, total, warmup)
                loss = _task_loss(model, teacher, batch, config)
                if not hard and config.learn_bits and frozen is None:
                    loss = loss + cost_scale * _cost_loss(cost, target, config)
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    model.load_state_dict(last_good)
                    where = f"the checkpoint {path} (end of epoch {start_epoch if saved is None else epoch})" \
                        if path is not None and path.is_file() else "the state at the start of this epoch"
                    raise NIPQTrainingError(
                        f"NIPQ loss became {loss_value} at step {step} (epoch {epoch}, batch {index}); training "
                        f"stopped and the model was restored to {where}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                bar.update()
                if schedule and frozen is None and not hard:
                    land_due(step)
                if doubling and frozen is None and not hard and step >= freeze_epoch * steps_per_epoch:
                    if widths_landed(cost, target) or step == epochs * steps_per_epoch:
                        frozen = freeze_now(epoch, step)
                    else:  # not on the budget yet: a stronger pull (docs/nipq_method.md §6)
                        if cost_scale < MAX_COST_SCALE:  # one line per doubling, none once capped
                            now = cost.report()
                            cost_scale = min(2.0 * cost_scale, MAX_COST_SCALE)
                            print(f"nipq: step {step}: rounded widths off the budget (w {now.average_weight_bits:.3f} "
                                  f"a {now.average_act_bits:.3f}, {now.gbops:.4g} GBOPs, all tensors); cost weight "
                                  f"x{cost_scale:g}", flush=True)
                bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
            timings["hard" if hard else next(iter(timings))].append(time.perf_counter() - tic)
            if epoch + 1 == freeze_epoch and not doubling:  # widths freeze; the weights train on at them
                frozen = freeze_now(epoch, step)
            if epoch + 1 == epochs:  # end of phase 1: hard quantization from here on
                bn_layers = _enter_hard_phase(model, train_loader)
                hard_lr = config.lr / 10 if config.hard_lr is None else config.hard_lr
                optimizer = _optimizer(model, hard_lr, hard_lr, hard_lr, config)
            last_good = {k: v.clone() for k, v in model.state_dict().items()}
            if path is not None:
                _save(path, {"format": CHECKPOINT_FORMAT, "epoch": epoch + 1, "target": asdict(target),
                             "epochs": epochs, "hard_epochs": hard_epochs,
                             "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "frozen": frozen, "cost_scale": cost_scale, "landing": landing,
                             "alpha_widths": alpha_widths,
                             "config": asdict(config), "steps_per_epoch": steps_per_epoch,
                             "pinned": [n for n, m in model.named_modules()
                                        if isinstance(m, LearnedBitWidth) and m.pinned]})
    finally:
        bar.close()
    model.eval()
    final = cost.report()
    print(f"nipq: done ({target.describe()}): deployed {_budgeted_bits(cost)} "
          f"({final.gbops:.4g} GBOPs), acc {_pct(_accuracy(model, eval_batches))}", flush=True)
    print("nipq: deployed widths: " + " ".join(f"{name}={bits}" for name, bits in
                                              {**final.weight_bits, **final.act_bits}.items()), flush=True)
    frozen = frozen or {}
    at_freeze = frozen.get("report_at_freeze")
    return NIPQResult(
        target=target.describe(), report=final, report_at_freeze=None if at_freeze is None else CostReport(**at_freeze),
        steps=step, seconds_per_epoch={k: sum(v) / len(v) for k, v in timings.items() if v},
        last_loss=loss_value, checkpoint=None if path is None else str(path), batchnorm_reestimated=bn_layers,
        freeze_epoch=int(frozen.get("freeze_epoch", 0)), accuracy_before_freeze=frozen.get("accuracy_before_freeze"),
        accuracy_after_freeze=frozen.get("accuracy_after_freeze"), freeze_step=int(frozen.get("freeze_step", 0)),
        cost_scale_at_freeze=float(frozen.get("cost_scale", 1.0)), landing_start_step=land_from,
        accuracy_at_landing_start=landing["accuracy_at_start"], landing_move=dict(landing["move"]),
        landing_move_abs=dict(landing["move_abs"]))


def quantize_nipq(model: nn.Module, train_data, bits="w4a4", *, target=None, epochs: int | None = None, seed: int = 0,
                  config: NIPQConfig | None = None, batch_size: int | None = None,
                  checkpoint_dir: str | Path | None = None, progress: bool | None = None,
                  eval_data=None) -> tuple[nn.Module, NIPQResult]:
    """A float model → a NIPQ-trained Brevitas model, the way the CLI, demo and benchmarks run it.

    ``convert_to_brevitas(model, "nipq-" + bits)`` (BN folded, edges pinned at 8 bits), then
    :func:`nipq_train` on shuffled batches of ``train_data`` (a dataset of ``(input, label)`` or
    of inputs alone) with distillation from ``model`` itself. ``target`` defaults to ``bits``'
    nominal widths; ``config`` to :meth:`NIPQConfig.cpu_preset` at ``seed``. ``eval_data``: a
    labelled dataset on which the accuracy before and after freezing the widths is printed.
    """
    from torch.utils.data import DataLoader

    from ..bitspec import BitSpec
    from ..convert.to_brevitas import convert_to_brevitas

    spec = BitSpec.parse(str(bits))
    config = config or NIPQConfig.cpu_preset(seed=seed)
    target = config.target if target is None else target
    epochs = (CPU_EPOCHS if config.epochs is None else config.epochs) if epochs is None else epochs
    batch_size = config.batch_size if batch_size is None else batch_size
    # before the seed: iterating a DataLoader draws from torch's global RNG
    train_data = TeacherLogits(train_data, model)
    torch.manual_seed(seed)
    qmodel = convert_to_brevitas(model, f"nipq-{spec}")
    # shuffled with torch's global RNG, which nipq_train reseeds every epoch: a resumed run sees
    # the same batches as an uninterrupted one
    loader = DataLoader(train_data, batch_size=batch_size, shuffle=True)
    result = nipq_train(qmodel, loader, target=str(spec) if target is None else target, epochs=epochs,
                        teacher=model, config=config, checkpoint_dir=checkpoint_dir, progress=progress,
                        eval_data=None if eval_data is None else DataLoader(eval_data, batch_size=256))
    return qmodel, result
