"""NIPQ: learned-bit quantizers, cost terms, the training engine, merging and export of mixed bits."""

import math

import brevitas.nn as qnn
import numpy as np
import onnxruntime as ort
import pytest
import torch
from tiny_models import tiny_resnet

from hdrq_plugin import convert_to_brevitas, merge_models
from hdrq_plugin.export import export_qdq
from hdrq_plugin.merge.models import read_weight_grid
from hdrq_plugin.nipq.cost import NIPQModelError, bops_loss, describe_costs
from hdrq_plugin.nipq.quantizers import (
    LearnedBitWidth,
    NIPQSignedActQuantizer,
    bits_to_logit,
    continuous_bits,
)
from hdrq_plugin.nipq.train import (
    LANDING_BAND_BITS,
    MAX_COST_SCALE,
    NIPQConfig,
    NIPQTarget,
    NIPQTrainingError,
    freeze_bits,
    nipq_train,
    parse_target,
)
from hdrq_plugin.quant.control import set_quant_mode
from hdrq_plugin.run.checkpoint import ModelRecipe, load_quantized, save_quantized

X = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(1))


def nipq_model(seed: int = 0):
    return convert_to_brevitas(tiny_resnet(seed=seed), "nipq-w4a4")


def bit_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LearnedBitWidth)}


# --- the quantizer -----------------------------------------------------------------------------

def _signed_identity(alpha: float, bits: float):
    quant = qnn.QuantIdentity(act_quant=NIPQSignedActQuantizer, return_quant_tensor=False)
    tq = quant.act_quant.fused_activation_quant_proxy.tensor_quant
    tq.scaling_impl.set_truncation(alpha)
    with torch.no_grad():
        tq.msb_clamp_bit_width_impl.theta.fill_(bits_to_logit(bits))
    tq.msb_clamp_bit_width_impl.stochastic_bit_rounding = False
    return quant.train(), tq


def test_noise_forward_has_the_specified_gradients_for_x_alpha_and_bits():
    torch.manual_seed(0)
    quant, tq = _signed_identity(alpha=1.0, bits=4.0)
    x = torch.linspace(-2, 2, 401, requires_grad=True)
    y = quant(x)
    y.sum().backward()
    alpha, b, q = 1.0, 4.0, 2**3 - 1
    step = alpha / q
    inside = x.detach().abs() < alpha
    eps = ((y.detach() - x.detach()) / step)[inside]
    assert bool((eps.abs() <= 0.5 + 1e-5).all())
    assert torch.equal(x.grad, inside.float())  # x: 1 inside, 0 outside
    theta_a = tq.scaling_impl.theta
    d_alpha = x.detach()[~inside].sign().sum() + eps.sum() / q  # ±1 outside, ε·∂Δ/∂α inside
    assert float(theta_a.grad) == pytest.approx(float(d_alpha * torch.sigmoid(theta_a.detach())), rel=1e-4, abs=1e-5)
    d_step_d_b = -alpha * math.log(2) * 2 ** (b - 1) / q**2  # Δ = α/(2^(b-1)-1)
    theta_b = tq.msb_clamp_bit_width_impl.theta
    db_dtheta = 12 * torch.sigmoid(theta_b.detach()) * (1 - torch.sigmoid(theta_b.detach()))
    assert float(theta_b.grad) == pytest.approx(float(eps.sum() * d_step_d_b * db_dtheta), rel=1e-4)


def test_clipped_elements_give_no_bit_gradient():
    quant, tq = _signed_identity(alpha=0.5, bits=4.0)
    x = torch.tensor([3.0, -4.0, 10.0])  # all clipped: y = ±α whatever the width
    quant(x).sum().backward()
    assert float(tq.msb_clamp_bit_width_impl.theta.grad) == 0.0


def test_stochastic_bit_rounding_is_unbiased_and_evaluation_rounds():
    bits = LearnedBitWidth(4, initial_bit_width=None)
    with torch.no_grad():
        bits.theta.fill_(bits_to_logit(4.3))
    torch.manual_seed(0)
    samples = torch.stack([bits() for _ in range(4000)]).detach()
    assert set(samples.tolist()) == {4.0, 5.0}
    # mean of Bernoulli(0.3) + 4 over 4000 draws: 4.3 ± 3σ, σ = sqrt(0.21/4000) = 0.0072
    assert abs(float(samples.mean()) - 4.3) < 3 * math.sqrt(0.21 / 4000)
    assert float(bits.eval()().detach()) == 4.0


def test_frozen_bits_are_constant_and_get_no_gradient():
    bits = LearnedBitWidth(4)
    assert float(continuous_bits(bits.theta.detach())) == pytest.approx(8.0)  # the reference start
    bits.freeze(3)
    out = bits.train()()
    assert float(out) == 3.0 and not out.requires_grad and not bits.theta.requires_grad


def test_hard_phase_forward_is_on_the_integer_grid():
    quant, tq = _signed_identity(alpha=1.0, bits=3.0)
    tq.msb_clamp_bit_width_impl.freeze(3)
    set_quant_mode(quant, "ste")
    y = quant(torch.linspace(-2, 2, 101))
    codes = y / (1.0 / 3)
    codes = codes.detach()
    assert torch.allclose(codes, codes.round(), atol=1e-4) and float(codes.abs().max().detach()) == pytest.approx(3.0)


# --- conversion and costs ----------------------------------------------------------------------

def test_nipq_spec_picks_nipq_quantizers_and_pins_the_edges_at_8_bits():
    model = nipq_model()
    cost = describe_costs(model, X)
    assert {t.name for t in cost.weights if t.bits.pinned} == {"conv1.weight", "fc.weight"}
    # 8-bit edge weights on the saturation-free grid (issue 22): 7 bits, codes within +-63
    assert all(float(t.bits.frozen_bits) == 7 for t in cost.weights if t.bits.pinned)
    assert all(float(t.bits.frozen_bits) == 8 for t in cost.activations if t.bits.pinned)
    assert all(not t.bits.is_frozen for t in cost.weights + cost.activations if not t.bits.pinned)
    assert parse_target(None, cost) == NIPQTarget(weight_bits=4.0, act_bits=4.0)
    with pytest.raises(ValueError, match="per tensor"):
        convert_to_brevitas(tiny_resnet(), "nipq-w4a4-per-channel")


def test_bops_take_activation_bits_from_each_layers_input_quantizer():
    model = nipq_model()
    cost = describe_costs(model, X)
    layer = next(lc for lc in cost.layers if lc.name == "layer1.0.conv2")
    assert layer.input_quantizer == "layer1.0.relu.act_quant"  # the ReLU before it, not its output
    for t in cost.weights + cost.activations:
        if not t.bits.pinned:
            t.bits.freeze(6)
    before = float(cost.bops(deployed=True))
    layer.input_bits.freeze(2)  # its input quantizer at 2 bits: this layer's term shrinks 3x
    after = float(cost.bops(deployed=True))
    consumers = [lc for lc in cost.layers if lc.input_bits is layer.input_bits]
    expected = sum(lc.macs * 6 * (6 - 2) for lc in consumers)
    assert before - after == pytest.approx(expected)
    # the reference's bug costed every layer at 32-bit activations: a target between the true
    # minimum and that one is reachable here but would be unreachable with the bug
    low, _ = cost.bops_bounds()
    buggy_low = sum(lc.macs * (float(lc.weight.bits.frozen_bits) if lc.weight.bits.pinned else 2) * 32
                    for lc in cost.layers)
    assert buggy_low > 2 * low


def test_unreachable_bops_target_names_the_minimum_and_bad_bits_are_rejected():
    model = nipq_model()
    low, _ = describe_costs(model, X).bops_bounds()
    with pytest.raises(ValueError, match=f"minimum reachable is {low:.4g}".replace("+", r"\+")):
        nipq_train(model, [(X, Y)], target={"bops": low * 0.5}, epochs=1)
    for bits in (1.5, 9, 16):
        with pytest.raises(ValueError, match="outside 2..8"):
            parse_target(bits)


def test_a_layer_without_nipq_quantizers_is_named():
    model = convert_to_brevitas(tiny_resnet(), "w4a4")
    with pytest.raises(NIPQModelError, match="conv1"):
        describe_costs(model, X)


def test_bops_target_is_reached_within_2_percent():
    torch.manual_seed(0)
    model = nipq_model()
    cost = describe_costs(model, X)
    low, high = cost.bops_bounds()
    target = low + 0.3 * (high - low)
    params = [m.theta for m in bit_modules(model).values() if m.theta.requires_grad]
    opt = torch.optim.Adam(params, lr=0.05)
    gaps = []
    for _ in range(150):  # the cost term alone drives the rounded widths to the budget and holds them there
        opt.zero_grad()
        bops_loss(cost, target).backward()
        opt.step()
        gaps.append(float(cost.bops(deployed=True)) - target)
    # L1 on the deployed BOPs: a constant pull that flips sign at the budget, so the rounded widths
    # cross it from both sides (Adam moves every width together, so a crossing is several moves)
    assert min(gaps[-50:]) <= 0 <= max(gaps[-50:])
    report = freeze_bits(cost, NIPQTarget(bops=target))
    assert abs(report.bops - target) / target <= 0.02 and report.bops <= target
    assert target - report.bops < _smallest_one_bit_bops_move(cost)  # refilled: no upward move fits


def _smallest_one_bit_bops_move(cost) -> float:
    """BOPs added by the finest single move: one bit more on the width that weighs least (an
    activation width counts once per layer it feeds)."""
    moves: dict[int, float] = {}
    for layer in cost.layers:
        w, a = float(layer.weight.bits.rounded()), float(layer.input_bits.rounded())
        if not layer.weight.bits.pinned:
            moves[id(layer.weight.bits)] = moves.get(id(layer.weight.bits), 0.0) + layer.macs * a
        if not layer.input_bits.pinned:
            moves[id(layer.input_bits)] = moves.get(id(layer.input_bits), 0.0) + layer.macs * w
    return min(moves.values())


def test_the_projection_lowers_the_width_with_least_measured_loss_per_bit_and_refills():
    model = nipq_model()
    cost = describe_costs(model, X)
    learned = [t for t in cost.weights if not t.bits.pinned]
    with torch.no_grad():
        for t in learned:
            t.bits.theta.fill_(bits_to_logit(6.0))
    largest = max(learned, key=lambda t: t.numel)
    def measure_loss() -> float:  # lowering the largest tensor is very costly, the others cheap
        return sum((8 - float(t.bits.rounded())) * (100.0 if t is largest else 1.0) for t in learned)
    report = freeze_bits(cost, NIPQTarget(weight_bits=5.0), measure_loss=measure_loss)
    assert report.weight_bits[largest.name] == 6  # the dearest move per bit is never taken
    average = float(cost.average_bits("weights", learned_only=True, deployed=True))
    total = sum(t.numel for t in learned)
    upward = [t.numel / total for t in learned if report.weight_bits[t.name] < 8]
    assert average <= 5.0 + 1e-9 and 5.0 - average < min(upward)  # on budget, refilled


# --- the training engine -----------------------------------------------------------------------

def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


FAST = NIPQConfig.cpu_preset(hard_epochs=1, init_batches=1)


def test_training_freezes_bits_and_reports_the_cost(tmp_path):
    model = nipq_model()
    result = nipq_train(model, _batches(), target=5, epochs=1, teacher=tiny_resnet(), config=FAST,
                        checkpoint_dir=tmp_path, progress=False)
    assert all(m.is_frozen for m in bit_modules(model).values())
    assert (tmp_path / "nipq_last.pt").is_file() and result.steps == 6
    assert set(result.report.weight_bits) == {t.name for t in describe_costs(model, X).weights}
    assert not model.training


def _learned_average(report, tensors) -> float:
    """Average deployed bits of the learned (unpinned) tensors, from a report's per-tensor widths."""
    learned = [t for t in tensors if not t.bits.pinned]
    widths = {**report.weight_bits, **report.act_bits}
    return sum(widths[t.name] * t.numel for t in learned) / sum(t.numel for t in learned)


def _step(tensors, pick) -> float:
    learned = [t.numel for t in tensors if not t.bits.pinned]
    return pick(learned) / sum(learned)


def _train_to_budget(cost_weight: float, **changes):
    model = nipq_model()
    config = NIPQConfig.cpu_preset(hard_epochs=1, init_batches=1, warmup_epochs=0, freeze_fraction=0.75,
                                   bits_lr=0.1, cost_weight=cost_weight, **changes)
    result = nipq_train(model, _batches(10), target=5, epochs=4, teacher=tiny_resnet(), config=config,
                        progress=False)
    return result, describe_costs(model, X)


def _learned_widths_on_budget(result, cost, target=5.0) -> bool:
    """The rounded widths as learned (before any projection) sit on the budget, within one move of
    the largest tensor (the coarsest a single width can change the average)."""
    return all(abs(_learned_average(result.report_at_freeze, tensors) - target) <= _step(tensors, max)
               for tensors in (cost.weights, cost.activations))


def _freeze_move(result, tensors) -> float:
    return abs(_learned_average(result.report, tensors) - _learned_average(result.report_at_freeze, tensors))


@pytest.mark.parametrize("start_at_budget", [True, False], ids=["start-at-budget", "start-at-8-bits"])
def test_the_cost_lands_the_rounded_widths_on_the_budget_and_freezing_keeps_them_there(capsys, start_at_budget):
    result, cost = _train_to_budget(1.0, start_at_budget=start_at_budget, land_before_freeze=True, land_start=None)
    assert _learned_widths_on_budget(result, cost)
    for tensors in (cost.weights, cost.activations):  # the freeze moves ≤ 0.05 bit or one smallest step
        assert _freeze_move(result, tensors) <= max(_step(tensors, min), LANDING_BAND_BITS) + 1e-9
    for tensors in (cost.weights, cost.activations):  # deployed: at most the budget, and refilled
        deployed = _learned_average(result.report, tensors)
        widths = {**result.report.weight_bits, **result.report.act_bits}
        total = sum(t.numel for t in tensors if not t.bits.pinned)
        upward = [t.numel / total for t in tensors if not t.bits.pinned and widths[t.name] < 8]
        assert deployed <= 5.0 + 1e-9
        assert not upward or 5.0 - deployed < min(upward)  # no one-bit move up still fits
    assert result.freeze_epoch >= 3 and result.freeze_step >= 30 and result.accuracy_before_freeze is not None
    out = capsys.readouterr().out
    assert "widths frozen at step" in out and "acc" in out and "deployed w" in out


@pytest.mark.parametrize("cost_weight, changes", [
    (0.0, {"start_at_budget": False, "land_before_freeze": False, "land_start": None}),
    (-1.0, {"start_at_budget": False, "land_before_freeze": True, "land_start": None})], ids=["cost-off-from-8-bits", "sign-flipped"])
def test_a_broken_cost_leaves_the_learned_widths_off_the_budget(cost_weight, changes):
    result, cost = _train_to_budget(cost_weight, **changes)
    assert not _learned_widths_on_budget(result, cost)
    assert any(_freeze_move(result, tensors) > max(_step(tensors, min), LANDING_BAND_BITS)
               for tensors in (cost.weights, cost.activations))
    assert result.cost_scale_at_freeze <= MAX_COST_SCALE  # a cost that never lands stops doubling


def test_the_defaults_start_at_the_budget_and_land_largest_first_before_the_freeze():
    """The demo and `hdrq quantize --method nipq` run the defaults: widths from the budget, landed
    over 30-60 % of the noise steps (tests/test_nipq_landing.py); the doubling cost is off."""
    config = NIPQConfig.cpu_preset()
    assert config.start_at_budget and config.land_start == 0.3 and config.freeze_fraction == 0.6
    assert not config.land_before_freeze


def test_resumed_training_ends_with_the_same_weights(tmp_path):
    class Interrupting(list):
        def __init__(self, batches, after):
            super().__init__(batches)
            self.after, self.seen = after, 0

        def __iter__(self):
            for batch in super().__iter__():
                if self.seen == self.after:
                    raise KeyboardInterrupt
                self.seen += 1
                yield batch

    straight = nipq_model()
    nipq_train(straight, _batches(), target=5, epochs=2, config=FAST, progress=False)
    resumed = nipq_model()
    with pytest.raises(KeyboardInterrupt):  # stopped in epoch 2, after the epoch-1 checkpoint
        nipq_train(resumed, Interrupting(_batches(), after=5), target=5, epochs=2, config=FAST,
                   checkpoint_dir=tmp_path, progress=False)
    resumed = nipq_model()
    nipq_train(resumed, _batches(), target=5, epochs=2, config=FAST, checkpoint_dir=tmp_path, progress=False)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_nan_loss_stops_keeps_the_checkpoint_and_names_the_step(tmp_path):
    class NanAt(list):
        # passes: cost probe, budget batches, activation-range init, epoch 0, epoch 1 -> NaN in epoch 1, batch 1
        passes = 0

        def __iter__(self):
            self.passes += 1
            for index, (x, y) in enumerate(super().__iter__()):
                yield (torch.full_like(x, float("nan")) if (self.passes, index) == (5, 1) else x), y

    model = nipq_model()
    with pytest.raises(NIPQTrainingError, match=r"at step 4 \(epoch 1, batch 1\)"):
        nipq_train(model, NanAt(_batches(3)), target=5, epochs=2, config=FAST, checkpoint_dir=tmp_path,
                   progress=False)
    saved = torch.load(tmp_path / "nipq_last.pt", weights_only=True)
    assert saved["epoch"] == 1  # the last good checkpoint, not overwritten
    for key, value in model.state_dict().items():  # and the model is back at that state
        assert torch.equal(value, saved["model"][key]), key


# --- merging, checkpoints and export -----------------------------------------------------------

def _trained(seed: int, widths: dict[str, int]):
    model = nipq_model(seed)
    model.eval()
    for name, module in bit_modules(model).items():
        if not module.pinned:
            module.freeze(widths.get(name, 4))
    with torch.no_grad():
        model(X)
    return model


def test_merging_nipq_models_with_different_widths_takes_the_wider():
    name = "layer1.0.conv1.weight_quant.tensor_quant.msb_clamp_bit_width_impl"
    narrow, wide = _trained(0, {name: 3}), _trained(1, {name: 6})
    merged = merge_models([narrow, wide], rounding="half-to-even")
    grid = read_weight_grid(dict(merged.named_modules())["layer1.0.conv1"])
    assert grid.bit_width == 6 and int(grid.codes.abs().max()) <= 31
    assert read_weight_grid(dict(narrow.named_modules())["layer1.0.conv1"]).bit_width == 3  # inputs untouched
    # widening alone is lossless for weights: a model merged with itself at another width
    self_merge = merge_models([narrow, narrow], rounding="half-to-even")
    for layer in ("layer1.0.conv1", "layer2.0.conv2"):
        a = read_weight_grid(dict(narrow.named_modules())[layer])
        b = read_weight_grid(dict(self_merge.named_modules())[layer])
        assert torch.equal(a.codes, b.codes) and torch.allclose(a.scale, b.scale)


def test_a_merged_model_over_budget_lands_back_on_it_by_measured_loss():
    """Widening puts the merge over the members' 4-bit average; landing brings the deployed widths back
    to at most the budget and less than one smallest move below, moving the cheapest tensors."""
    from hdrq_plugin.nipq.widths import land_merged_widths

    names = ["layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.conv2"]  # 576, 576, 1152, 2304 weights
    key = "{}.weight_quant.tensor_quant.msb_clamp_bit_width_impl".format
    bits = {key(names[0]): 6, key(names[1]): 6, key(names[3]): 3}  # +2·576·2 − 2304: on 4 bits on average
    swapped = {key(names[2]): 6, key(names[3]): 3}  # +2·1152 − 2304
    a, b = _trained(0, bits), _trained(1, swapped)
    x = X[:1]
    for member in (a, b):
        assert describe_costs(member, x).average_bits("weights", learned_only=True, deployed=True) <= 4.0 + 1e-6
    merged = merge_models([a, b], rounding="half-to-even")
    cost = describe_costs(merged, x)
    assert cost.average_bits("weights", learned_only=True, deployed=True) > 4.4  # widened: 6 where either had 6
    batches = [(X, Y), (X.flip(0), Y.flip(0))]
    land_merged_widths(merged, 4, batches)
    weights = [t for t in describe_costs(merged, x).weights if not t.bits.pinned]
    average = sum(int(t.bits.frozen_bits) * t.numel for t in weights) / sum(t.numel for t in weights)
    smallest = min(t.numel for t in weights) / sum(t.numel for t in weights)
    assert 4.0 - smallest <= average <= 4.0 + 1e-9
    with torch.no_grad():  # the landed model runs on the grids it reports
        for layer in names:
            grid = read_weight_grid(dict(merged.named_modules())[layer])
            assert int(grid.codes.abs().max()) <= 2 ** (grid.bit_width - 1) - 1
    with pytest.raises(ValueError, match="labelled batches"):
        land_merged_widths(merged, 4, [])


def test_checkpoint_round_trip_keeps_per_layer_bits(tmp_path):
    name = "layer2.0.conv1.weight_quant.tensor_quant.msb_clamp_bit_width_impl"
    model = _trained(0, {name: 3})
    path = save_quantized(tmp_path / "q.pt", model, recipe=ModelRecipe("tiny_models:tiny_resnet"), bits="w4a4",
                          family="nipq")
    loaded, _ = load_quantized(path)
    assert float(bit_modules(loaded)[name].frozen_bits) == 3
    assert torch.equal(loaded(X), model(X))


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_mixed_precision_export_runs_exactly_in_onnxruntime(tmp_path, weights):
    name = "layer2.0.conv1.weight_quant.tensor_quant.msb_clamp_bit_width_impl"
    model = _trained(0, {name: 3, "layer1.0.conv2.weight_quant.tensor_quant.msb_clamp_bit_width_impl": 6})
    path = export_qdq(model, tmp_path / "m.onnx", X[:1], weights=weights)
    import json

    import onnx
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    bits = json.loads(meta["hdrq.weight_bits"])
    assert bits["layer2.0.conv1"] == 3 and bits["layer1.0.conv2"] == 6 and bits["conv1"] == 7  # saturation-free edge
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"input": X.numpy()})[0]
    with torch.no_grad():
        ref = model(X).numpy()
    # Int32Bias makes onnxruntime's integer path equal Brevitas up to float32 summation order
    assert np.abs(out - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


# --- command line ------------------------------------------------------------------------------

def test_cli_quantize_nipq_writes_a_checkpoint_that_exports_and_rejects_bad_targets(tmp_path, capsys):
    from hdrq_plugin.cli import EXIT_BAD_INPUT, main
    from hdrq_plugin.run.checkpoint import save_float_model

    recipe = ModelRecipe("tiny_models:tiny_resnet", {"width": 8, "seed": 0})
    save_float_model(tmp_path / "float.pt", recipe.build(), recipe)
    torch.save({"inputs": X}, tmp_path / "unlabelled.pt")  # distillation from the float model only
    out = tmp_path / "q.pt"
    assert main(["quantize", str(tmp_path / "float.pt"), "--calibration", str(tmp_path / "unlabelled.pt"),
                 "--method", "nipq", "--target-bits", "5", "--epochs", "1", "--out", str(out)]) == 0
    model, info = load_quantized(out)
    assert info["family"] == "nipq" and info["cost"]["average_weight_bits"] <= 8
    assert main(["export", str(out), "--out", str(tmp_path / "q.onnx"), "--input-shape", "1,3,16,16"]) == 0
    code = main(["quantize", str(tmp_path / "float.pt"), "--calibration", str(tmp_path / "unlabelled.pt"),
                 "--method", "nipq", "--target-bits", "9", "--out", str(tmp_path / "bad.pt")])
    assert code == EXIT_BAD_INPUT and "outside 2..8" in capsys.readouterr().err
    assert not (tmp_path / "bad.pt").exists()


def _hand_built_model_with_batchnorm():
    """What a Brevitas user writes by hand: NIPQ quantizers and BatchNorm kept unfolded."""
    from hdrq_plugin.nipq.quantizers import NIPQActQuantizer, NIPQWeightQuantizer

    torch.manual_seed(0)
    return torch.nn.Sequential(
        qnn.QuantConv2d(3, 6, 3, padding=1, weight_quant=NIPQWeightQuantizer, input_quant=NIPQSignedActQuantizer,
                        return_quant_tensor=False),
        torch.nn.BatchNorm2d(6),
        qnn.QuantReLU(act_quant=NIPQActQuantizer, return_quant_tensor=False),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        qnn.QuantLinear(6, 10, bias=True, weight_quant=NIPQWeightQuantizer, input_quant=NIPQActQuantizer,
                        return_quant_tensor=False))


def test_batchnorm_statistics_are_reestimated_with_the_quantized_forward():
    from hdrq_plugin.nipq.train import reestimate_batchnorm

    model = _hand_built_model_with_batchnorm()
    norm = model[1]
    norm.running_mean.fill_(5.0)
    norm.running_var.fill_(9.0)  # stale statistics, as after training under noise
    batches = _batches(n=4, seed=3)
    set_quant_mode(model, "ste")
    for m in bit_modules(model).values():
        m.freeze()  # deterministic widths: train-mode and eval-mode forwards are the same grid
    assert reestimate_batchnorm(model, batches) == 1
    model.eval()
    with torch.no_grad():  # the hard-quantized conv outputs over all batches, computed independently
        conv_out = torch.cat([model[0](x) for x, _ in batches])
    per_channel = conv_out.transpose(0, 1).reshape(6, -1)
    torch.testing.assert_close(norm.running_mean, per_channel.mean(1), rtol=1e-5, atol=1e-5)
    # BatchNorm's running variance is the unbiased one of each batch, averaged over the batches
    batch_vars = torch.stack([c.transpose(0, 1).reshape(6, -1).var(1, unbiased=True) for c in conv_out.split(8)])
    torch.testing.assert_close(norm.running_var, batch_vars.mean(0), rtol=1e-5, atol=1e-5)
    assert norm.momentum == 0.1  # the user's momentum is given back


def test_training_reestimates_batchnorm_before_the_hard_phase():
    model = _hand_built_model_with_batchnorm()
    result = nipq_train(model, _batches(), target=5, epochs=1, config=FAST, progress=False)
    assert result.batchnorm_reestimated == 1
    folded = nipq_model()
    assert nipq_train(folded, _batches(), target=5, epochs=1, teacher=tiny_resnet(), config=FAST,
                      progress=False).batchnorm_reestimated == 0  # convert_to_brevitas folds BN


def test_frozen_widths_leave_the_optimizer_even_when_groups_have_equal_sizes():
    from hdrq_plugin.nipq.train import _drop_frozen_bits

    weights = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))]
    thetas = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))]
    opt = torch.optim.SGD([{"params": weights}, {"params": thetas}], lr=0.1, momentum=0.9)
    for theta in thetas:
        theta.requires_grad_(False)
    _drop_frozen_bits(opt)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"] == weights


def _pinned_model(bits: int):
    model = nipq_model()
    for m in bit_modules(model).values():
        if not m.pinned:
            m.freeze(bits)
    return model.eval()


def _weight_rounding_error(model) -> float:
    """Σ over layers of the relative error of the deployed (hard-rounded) weights."""
    errors = []
    for m in model.modules():
        if isinstance(m, (qnn.QuantConv2d, qnn.QuantLinear)) and "LearnedTruncation" in repr(m.weight_quant):
            errors.append(float((m.quant_weight().value - m.weight).norm() / m.weight.norm()))
    return sum(errors)


def test_weight_truncations_are_fitted_at_the_deployed_width_not_at_max():
    """At 3 bits α = max|W| leaves most weights in the rounding dead zone (the optdigits collapse of
    the pinned 3-bit rows, docs/nipq_method.md §6); fit_truncations puts α at the L_p clipping."""
    from hdrq_plugin.nipq.passes import fit_truncations
    from hdrq_plugin.nipq.quantizers import LearnedTruncation

    model = _pinned_model(3)
    model(X)  # weights' α from max|W| at the first forward
    at_max = _weight_rounding_error(model)
    acts_before = {n: float(m.truncation()) for n, m in model.named_modules()
                   if isinstance(m, LearnedTruncation) and ".weight_quant." not in f".{n}."}
    assert fit_truncations(model, [X], activations=False) > 0
    fitted = _weight_rounding_error(model)
    assert fitted < 0.9 * at_max
    assert acts_before == {n: float(m.truncation()) for n, m in model.named_modules()
                           if isinstance(m, LearnedTruncation) and ".weight_quant." not in f".{n}."}
    assert fit_truncations(model, [X], activations=False) > 0  # idempotent: the search sees the same weights
    assert _weight_rounding_error(model) == pytest.approx(fitted, rel=1e-6)


def test_nipq_train_fits_weight_truncations_at_the_pinned_width():
    torch.manual_seed(0)
    runs = {}
    for fit in (True, False):
        model = nipq_model()
        config = NIPQConfig(learn_bits=False, hard_epochs=0, lr=1e-9, quant_lr=1e-9, bits_lr=1e-9,
                            fit_weight_truncations=fit, warmup_epochs=0)
        nipq_train(model, [(X, Y)], target=3.0, epochs=1, config=config, progress=False)
        runs[fit] = _weight_rounding_error(model.eval())
    assert runs[True] < 0.9 * runs[False]


@pytest.mark.parametrize("ste_after_freeze", [True, False])
def test_training_after_the_freeze_rounds_with_ste(ste_after_freeze):
    """Once the widths are frozen the weights train on the deployed grid (docs/nipq_method.md §6)."""
    from hdrq_plugin.quant.quantizers import PseudoQuantIntQuant, QuantMode

    torch.manual_seed(0)
    model = nipq_model()
    quantizer = next(m for m in model.modules() if isinstance(m, PseudoQuantIntQuant))
    modes = []
    quantizer.register_forward_pre_hook(lambda m, _args: modes.append(m.quant_mode) if m.training else None)
    config = NIPQConfig(hard_epochs=0, freeze_fraction=0.5, warmup_epochs=0, ste_after_freeze=ste_after_freeze)
    nipq_train(model, [(X, Y)], target=4.0, epochs=2, config=config, progress=False)
    training = modes[-1:]  # the one step of epoch 2, after the freeze at epoch 1
    assert modes[0] is QuantMode.NOISE
    assert training == [QuantMode.STE if ste_after_freeze else QuantMode.NOISE]


def _quantize_with_and_without_cached_logits(corrupt: bool = False):
    from torch.utils.data import DataLoader, TensorDataset

    from hdrq_plugin.nipq import train as nipq_train_module

    g = torch.Generator().manual_seed(5)
    data = TensorDataset(torch.randn(24, 3, 16, 16, generator=g), torch.randint(0, 10, (24,), generator=g))
    config = NIPQConfig.cpu_preset(hard_epochs=1, init_batches=1, batch_size=8, noise_shape="uniform")
    teacher = tiny_resnet(seed=0).eval()
    cached_class = nipq_train_module.TeacherLogits
    if corrupt:  # a cache that pairs each sample with another sample's logits
        class Shifted(cached_class):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.logits = self.logits.roll(1, 0)
        nipq_train_module.TeacherLogits = Shifted
    try:
        cached, _ = nipq_train_module.quantize_nipq(teacher, data, "w4a4", epochs=2, seed=0, config=config,
                                                    progress=False)
    finally:
        nipq_train_module.TeacherLogits = cached_class
    torch.manual_seed(0)  # what quantize_nipq does, with the teacher run at every step instead
    plain = convert_to_brevitas(teacher, "nipq-w4a4")
    nipq_train(plain, DataLoader(data, batch_size=8, shuffle=True), target="w4a4", epochs=2, teacher=teacher,
               config=config, progress=False)
    return cached.state_dict(), plain.state_dict()


@pytest.mark.parametrize("corrupt", [False, True])
def test_cached_teacher_logits_train_the_same_model_as_a_teacher_forward_per_step(corrupt):
    cached, plain = _quantize_with_and_without_cached_logits(corrupt)
    same = all(torch.equal(cached[k], plain[k]) for k in plain)
    assert same != corrupt
