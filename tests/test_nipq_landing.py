"""NIPQ landing: widths freeze largest first, each on the budget left to the free ones (nipq.landing)."""

import pytest
import torch
from test_nipq import X, _batches, nipq_model
from tiny_models import tiny_resnet

from hdrq_plugin.nipq.cost import describe_costs
from hdrq_plugin.nipq.landing import freeze_on_remaining_budget, landing_order, landing_steps
from hdrq_plugin.nipq.passes import fit_truncations
from hdrq_plugin.nipq.quantizers import bits_to_logit
from hdrq_plugin.nipq.train import NIPQConfig, NIPQTarget, nipq_train


def _learned(tensors):
    return [t for t in tensors if not t.bits.pinned]


def _average(tensors) -> float:
    learned = _learned(tensors)
    return sum(float(t.bits.rounded()) * t.numel for t in learned) / sum(t.numel for t in learned)


def _smallest_step(tensors) -> float:
    numel = [t.numel for t in _learned(tensors)]
    return min(numel) / sum(numel)


def test_the_order_is_largest_share_first_and_the_steps_spread_over_the_window():
    cost = describe_costs(nipq_model(), X)
    order = landing_order(cost, NIPQTarget(weight_bits=4.0, act_bits=4.0))
    assert len(order) == len(_learned(cost.weights)) + len(_learned(cost.activations))
    shares = [t.numel / sum(u.numel for u in _learned(cost.weights if t in cost.weights else cost.activations))
              for t in order]
    assert shares == sorted(shares, reverse=True)
    assert landing_steps(4, 10, 18) == [10, 12, 14, 16]
    assert landing_steps(5, 10, 12) == [10, 10, 10, 11, 11]  # several a step when the window is short
    assert landing_steps(3, 12, 12) == [12, 12, 12]  # no window: all at the freeze


@pytest.mark.parametrize("start, budget", [(6.4, 4.0), (3.6, 5.0), (4.5, 4.0)])
def test_freezing_in_order_on_the_remaining_budget_lands_at_most_one_smallest_step_below(start, budget):
    """Every free width b_c sits off the budget (above, below, on a rounding tie): freezing them in
    landing order ends at most the budget and less than one smallest one-bit move below it."""
    cost = describe_costs(nipq_model(), X)
    learned = _learned(cost.weights)
    with torch.no_grad():
        for i, t in enumerate(learned):  # spread round start so the roundings differ
            t.bits.theta.fill_(bits_to_logit(start + 0.3 * ((i % 3) - 1)))
    target = NIPQTarget(weight_bits=budget)
    for t in landing_order(cost, target):
        freeze_on_remaining_budget(cost, target, t)
    average = _average(cost.weights)
    assert average <= budget + 1e-9
    assert budget - average < _smallest_step(cost.weights)


def test_a_bops_budget_is_met_from_below():
    cost = describe_costs(nipq_model(), X)
    low, high = cost.bops_bounds()
    target = NIPQTarget(bops=low + 0.3 * (high - low))
    for t in landing_order(cost, target):
        freeze_on_remaining_budget(cost, target, t)
    spent = float(cost.bops(deployed=True))
    assert spent <= target.bops and spent >= 0.9 * target.bops


def _train(cost_weight: float, **changes):
    """Widths from 8 bits and no cost pull (``cost_weight=0``): only the landing can put them on
    the budget before the freeze."""
    model = nipq_model()
    config = NIPQConfig.cpu_preset(hard_epochs=1, init_batches=1, warmup_epochs=0, start_at_budget=False,
                                   cost_weight=cost_weight, **changes)
    result = nipq_train(model, _batches(10), target=4, epochs=4, teacher=tiny_resnet(), config=config,
                        progress=False)
    return result, describe_costs(model, X)


def _final_freeze_move(result, tensors) -> float:
    learned = _learned(tensors)
    widths_then = {**result.report_at_freeze.weight_bits, **result.report_at_freeze.act_bits}
    widths_now = {**result.report.weight_bits, **result.report.act_bits}
    return abs(sum((widths_now[t.name] - widths_then[t.name]) * t.numel for t in learned)) / sum(t.numel for t in learned)


def test_the_landing_puts_the_widths_on_the_budget_before_the_freeze(capsys):
    result, cost = _train(0.0)
    assert result.landing_start_step == 12 and result.freeze_step == 30  # 0.3 and 0.75 of 40 steps
    for tensors in (cost.weights, cost.activations):
        assert _final_freeze_move(result, tensors) <= _smallest_step(tensors) + 1e-9  # the freeze moves ≤ 1 step
        assert 4.0 - _smallest_step(tensors) < _average(tensors) <= 4.0 + 1e-9
    assert result.landing_move["weights"] < -1.0  # from 8 bits to 4: the landing did the moving
    out = capsys.readouterr().out
    assert "nipq: landing from step 12" in out and "the landing (steps 12-30) moved" in out


def test_without_the_landing_the_freeze_has_to_move_the_widths():
    """The same run with the landing off: the measure above fails (the projection moves bits)."""
    result, cost = _train(0.0, land_start=None)
    assert result.landing_start_step is None and not result.landing_move
    assert _final_freeze_move(result, cost.weights) > 1.0


def test_the_landing_window_must_end_by_the_freeze():
    with pytest.raises(ValueError, match="land_start"):
        NIPQConfig(land_start=0.8, freeze_fraction=0.6)
    with pytest.raises(ValueError, match="land_before_freeze"):
        NIPQConfig(land_before_freeze=True)


def test_weight_truncations_are_refitted_only_where_the_width_moved():
    """A weight α keeps what it learned unless its width left the one it was fitted at."""
    model = nipq_model()
    fitted_at: dict[str, int] = {}
    assert fit_truncations(model, [X], batches=1, activations=False, fitted_at=fitted_at) == len(fitted_at) > 1
    assert fit_truncations(model, [X], batches=1, activations=False, fitted_at=fitted_at) == 0
    cost = describe_costs(model, X)
    moved = max(_learned(cost.weights), key=lambda t: t.numel)
    moved.bits.freeze(int(moved.bits.rounded()) - 1)
    assert fit_truncations(model, [X], batches=1, activations=False, fitted_at=fitted_at) == 1


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), float("-inf")])
def test_a_cost_weight_that_is_not_a_number_is_refused(weight):
    with pytest.raises(ValueError, match="cost_weight"):
        NIPQConfig(cost_weight=weight)
    NIPQConfig(cost_weight=0.0)  # no pull at all is a valid ablation
