"""Block-wise reconstruction: the objective, the schedules, and the engine on a small trained model."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits
from tiny_models import TinyResNet, tiny_resnet

from hdrq_plugin import BitSpec, convert_to_brevitas
from hdrq_plugin.convert.to_brevitas import compute_layers, set_weight_bit_width
from hdrq_plugin.ptq.calibrate import calibrate_with_report, hdrq_calibrate, hdrq_mode
from hdrq_plugin.ptq.config import HDRQConfig
from hdrq_plugin.ptq.objective import (
    annealed_beta,
    distance_penalty,
    noise_iterations,
    qdrop_mix,
    reconstruction_error,
    warmup_cosine_factor,
)
from hdrq_plugin.ptq.source import SourceMismatchError, folded_weights
from hdrq_plugin.quant.quantizers import (
    HDRQActQuantizer,
    HDRQSignedActQuantizer,
    PseudoQuantIntQuant,
    QuantMode,
)

FEW = 4  # iterations per unit where only the mechanics matter



@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).div(16).unsqueeze(1).expand(-1, 3, -1, -1)
    return images.contiguous(), torch.tensor(data.target)


@pytest.fixture(scope="module")
def trained(digits):
    """A TinyResNet trained for two epochs on sklearn digits (~90 % test accuracy)."""
    images, labels = digits
    torch.manual_seed(0)
    model = TinyResNet(8)
    optimiser = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(2):
        for batch in torch.randperm(1500).split(50):
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model.eval()


@pytest.fixture(scope="module")
def calibration(digits):
    return digits[0][:32]


def converted(model, bits="w4a4"):
    return convert_to_brevitas(model, bits, act_quant=HDRQActQuantizer, signed_act_quant=HDRQSignedActQuantizer)


def quick(method, **overrides):
    return HDRQConfig.for_method(method, **({"iterations": FEW} if method != "rtn" else {}), **overrides)


# --- the objective (pure math) ---------------------------------------------------------------------

def test_reconstruction_error_sums_channels_and_averages_batch_and_space():
    diff = torch.zeros(2, 3, 4, 5)
    diff[0, :, 0, 0] = 1.0  # one position of one sample: error 3 (three channels)
    assert reconstruction_error(diff, torch.zeros_like(diff)).item() == pytest.approx(3 / (2 * 4 * 5))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), p=st.sampled_from([0.25, 0.5, 0.75]))
def test_qdrop_mixing_takes_each_element_from_the_float_input_with_probability_p(seed, p):
    torch.manual_seed(seed)
    quantized, full = torch.zeros(20_000), torch.ones(20_000)
    mixed = qdrop_mix(quantized, full, p)
    assert bool(((mixed == 0) | (mixed == 1)).all())
    assert mixed.mean().item() == pytest.approx(p, abs=0.02)  # 5σ of a binomial mean at n = 20,000


def test_qdrop_mixing_with_probability_zero_is_the_quantized_input():
    x_q = torch.randn(3, 4)
    assert qdrop_mix(x_q, torch.randn(3, 4), 0.0) is x_q


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), weight=st.floats(1e-3, 1.0))
def test_distance_gradient_points_from_the_source_toward_the_weights(seed, weight):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 3, 3, 3, generator=gen).requires_grad_(True)
    src = torch.randn(4, 3, 3, 3, generator=gen)
    distance_penalty([w], [src], weight).backward()
    direction = (w - src).detach()
    # the gradient is λ (W − W_src)/‖W − W_src‖: a descent step moves W straight toward W_src
    assert F.cosine_similarity(w.grad.flatten(), direction.flatten(), dim=0).item() == pytest.approx(1.0, abs=1e-5)
    assert w.grad.norm().item() == pytest.approx(weight, rel=1e-4)


def test_distance_is_the_unsquared_frobenius_norm_summed_over_layers():
    w = [torch.full((2, 2), 3.0), torch.zeros(3)]
    src = [torch.zeros(2, 2), torch.full((3,), 4.0)]
    assert distance_penalty(w, src, 0.5).item() == pytest.approx(0.5 * (6.0 + 4.0 * math.sqrt(3)))


@settings(max_examples=60, deadline=None)
@given(total=st.integers(10, 50_000), step_fraction=st.floats(0, 1))
def test_weight_lr_warms_up_linearly_then_decays_by_cosine(total, step_fraction):
    start = 1e-3  # 1e-7 / 1e-4, docs/hdrq_method.md §4
    warmup = int(0.2 * total)
    step = int(step_fraction * (total - 1))
    factor = warmup_cosine_factor(step, total, 0.2, start)
    assert warmup_cosine_factor(0, total, 0.2, start) == pytest.approx(start if warmup else 1.0)
    assert 0.0 <= factor <= 1.0
    if step < warmup:
        assert factor == pytest.approx(start + (1 - start) * step / warmup)
    else:
        assert factor == pytest.approx(0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))))


def test_beta_stays_at_its_start_during_warmup_then_anneals_to_its_end():
    assert annealed_beta(0, 1000, 0.2, 20, 2) == 20
    assert annealed_beta(199, 1000, 0.2, 20, 2) == 20
    assert annealed_beta(600, 1000, 0.2, 20, 2) == pytest.approx(11)
    assert annealed_beta(1000, 1000, 0.2, 20, 2) == pytest.approx(2)


def test_the_reference_schedule_trains_16000_noise_iterations_of_20000():
    assert noise_iterations(20_000, HDRQConfig().noise_fraction) == 16_000


# --- configurations ---------------------------------------------------------------------------------

def test_the_default_config_is_the_papers_hdrq():
    c = HDRQConfig()
    assert (c.iterations, c.num_samples, c.batch_size) == (20_000, 32, 1)
    assert (c.weight_lr, c.warmup_start_lr, c.act_scale_lr, c.distance_weight) == (1e-4, 1e-7, 4e-5, 0.05)
    assert (c.weight_rounding, c.noise_fraction, c.drop_probability, c.granularity) == ("noise", 0.8, 0.5, "block")


def test_qdrop_is_brecq_plus_input_mixing_and_adaround_is_brecq_per_layer():
    brecq, qdrop, adaround = HDRQConfig.brecq(), HDRQConfig.qdrop(), HDRQConfig.adaround()
    assert qdrop.replace(method="brecq", drop_probability=0.0) == brecq
    assert adaround.replace(method="brecq", granularity="block") == brecq


def test_ablations_are_configurations_of_hdrq():
    assert HDRQConfig.hdrq(noise=False).weight_rounding == "ste"
    assert HDRQConfig.hdrq(distance_weight=0).distance_weight == 0
    assert HDRQConfig.hdrq(noise=False).replace(method="hdrq", weight_rounding="noise") == HDRQConfig()


@pytest.mark.parametrize("change", [{"noise_fraction": 1.5}, {"drop_probability": -0.1}, {"iterations": -1},
                                    {"num_samples": 0}, {"weight_rounding": "stochastic"}, {"weight_lr": 0.0}])
def test_out_of_range_settings_are_rejected(change):
    with pytest.raises((ValueError, TypeError)):
        HDRQConfig(**change)


# --- the engine -----------------------------------------------------------------------------------------

def test_reconstruction_lowers_every_units_error_compared_with_rtn(trained, calibration):
    # every weight at 4 bits: an 8-bit stem's error is its 4-bit output activation's, which
    # reconstruction cannot lower (measured: +5 % after 1,000 iterations; see the report)
    bits = BitSpec(4, 4, edge_weight_bits=None)
    rtn = calibrate_with_report(converted(trained, bits), calibration, source=trained, config=HDRQConfig.rtn())
    hdrq = calibrate_with_report(converted(trained, bits), calibration, source=trained,
                                 config=HDRQConfig.hdrq(iterations=24, weight_lr=1e-3))
    assert [u.name for u in hdrq.units] == [u.name for u in rtn.units]
    for ours, baseline in zip(hdrq.units, rtn.units, strict=True):
        assert ours.error_after < baseline.error_after, ours.name


def test_noise_switches_to_ste_at_the_configured_fraction_and_rounding_is_plain_afterwards(trained, calibration):
    modes: dict[str, list] = {}

    def record(step):
        kinds = {m.quant_mode for m in step.module.modules() if isinstance(m, PseudoQuantIntQuant)}
        assert len(kinds) == 1  # weights and activations of the unit switch together
        modes.setdefault(step.unit, []).append(kinds.pop())

    qmodel = hdrq_calibrate(converted(trained), calibration, source=trained,
                            config=HDRQConfig.hdrq(iterations=20, noise_fraction=0.75), callback=record)
    for unit_modes in modes.values():
        assert unit_modes == [QuantMode.NOISE] * 15 + [QuantMode.STE] * 5
    assert {m.quant_mode for m in qmodel.modules() if isinstance(m, PseudoQuantIntQuant)} == {QuantMode.ROUND}
    assert all(m.drop_probability == 0 for m in qmodel.modules() if isinstance(m, PseudoQuantIntQuant))


def test_the_no_noise_ablation_trains_with_ste_from_the_first_iteration(trained, calibration):
    modes = set()
    hdrq_calibrate(converted(trained), calibration, config=HDRQConfig.hdrq(noise=False, iterations=5),
                   callback=lambda s: modes.update(m.quant_mode for m in s.module.modules()
                                                   if isinstance(m, PseudoQuantIntQuant)))
    assert modes == {QuantMode.STE}


def test_seeded_runs_reproduce_exactly_and_other_seeds_differ(trained, calibration):
    states = [hdrq_calibrate(converted(trained), calibration, source=trained, config=quick("hdrq", seed=s)).state_dict()
              for s in (3, 3, 4)]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any(not torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_labels_are_ignored(trained, calibration, digits):
    labels = digits[1][:32]
    garbage = torch.randint(0, 1000, (32,))
    plain = hdrq_calibrate(converted(trained), [calibration], config=quick("qdrop")).state_dict()
    pairs = hdrq_calibrate(converted(trained), [(calibration[:16], labels[:16]), (calibration[16:], garbage[16:])],
                           config=quick("qdrop")).state_dict()
    assert all(torch.equal(plain[k], pairs[k]) for k in plain)


def test_the_context_manager_form_equals_the_function(trained, calibration):
    direct = hdrq_calibrate(converted(trained), calibration, source=trained, config=quick("hdrq")).state_dict()
    qmodel = converted(trained)
    with torch.no_grad(), hdrq_mode(qmodel, source=trained, config=quick("hdrq")):
        for batch in calibration.split(8):
            qmodel(batch)
    assert all(torch.equal(direct[k], v) for k, v in qmodel.state_dict().items())


def test_distance_term_keeps_weights_closer_to_the_source(trained, calibration):
    source = tiny_resnet(seed=5)  # same architecture, different weights: the pull is visible
    source_weights = folded_weights(source)

    def distance_after(weight):
        qmodel = hdrq_calibrate(converted(trained), calibration, source=source,
                                config=HDRQConfig.hdrq(iterations=12, weight_lr=1e-3, distance_weight=weight))
        return sum((layer.weight - source_weights[name]).norm().item() for name, layer in compute_layers(qmodel))

    assert distance_after(20.0) < distance_after(0.0)


def test_rtn_and_adaround_leave_the_latent_weights_untouched(trained, calibration):
    for method in ("rtn", "brecq"):
        before = {name: layer.weight.detach().clone() for name, layer in compute_layers(converted(trained))}
        qmodel = hdrq_calibrate(converted(trained), calibration, config=quick(method))
        assert all(torch.equal(layer.weight, before[name]) for name, layer in compute_layers(qmodel)), method


def test_per_channel_weight_steps_stay_per_channel_through_reconstruction(trained, calibration):
    qmodel = hdrq_calibrate(converted(trained, "w4a4-per-channel"), calibration, config=quick("hdrq"))
    layer = dict(compute_layers(qmodel))["layer1.0.conv1"]
    assert layer.quant_weight().scale.shape == (layer.out_channels, 1, 1, 1)


# --- bad input -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_calibration_data_is_rejected(trained, calibration, bad):
    data = calibration.clone()
    data[3, 0, 2, 2] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        hdrq_calibrate(converted(trained), data, config=quick("hdrq"))


def test_empty_calibration_data_is_rejected(trained):
    with pytest.raises(ValueError, match="empty"):
        hdrq_calibrate(converted(trained), [], config=quick("hdrq"))


def test_a_calibration_set_smaller_than_num_samples_is_rejected(trained, calibration):
    with pytest.raises(ValueError, match="has 10 samples but config.num_samples is 32"):
        hdrq_calibrate(converted(trained), calibration[:10], config=quick("hdrq"))


def test_a_source_with_another_architecture_is_rejected_naming_the_layer_and_both_shapes(trained, calibration):
    with pytest.raises(SourceMismatchError, match=r"'conv1'.*\(16, 3, 3, 3\).*\(8, 3, 3, 3\)"):
        hdrq_calibrate(converted(trained), calibration, source=TinyResNet(16).eval(), config=quick("hdrq"))


def test_a_float_model_is_rejected_with_the_conversion_to_use(trained, calibration):
    with pytest.raises(TypeError, match="convert_to_brevitas"):
        hdrq_calibrate(trained, calibration, config=quick("hdrq"))


def test_bit_widths_out_of_range_are_rejected_naming_the_layer(trained, calibration):
    qmodel = convert_to_brevitas(trained, "w4a4")
    set_weight_bit_width(dict(compute_layers(qmodel))["layer1.0.conv1"], 12)
    with pytest.raises(ValueError, match=r"'layer1.0.conv1' use 12 bits.*2..8"):
        hdrq_calibrate(qmodel, calibration, config=HDRQConfig.rtn())


def test_reconstruction_needs_hdrq_activation_quantizers(trained, calibration):
    with pytest.raises(TypeError, match="HDRQActQuantizer"):
        hdrq_calibrate(convert_to_brevitas(trained, "w4a4"), calibration, config=quick("hdrq"))
