"""Accuracy on any labelled data and the harmonic mean over targets."""

from __future__ import annotations

import math

import brevitas.nn as qnn
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hdrq_plugin.evaluation import accuracy, harmonic_mean

# Inputs are logits already: an identity model predicts the arg-max of each row.
LOGITS = torch.tensor([[3.0, 1.0], [0.0, 2.0], [5.0, 4.0], [1.0, 9.0]])
LABELS = torch.tensor([0, 1, 1, 1])  # the third prediction (class 0) is wrong


def test_accuracy_is_the_fraction_of_correct_arg_max_predictions():
    assert accuracy(nn.Identity(), TensorDataset(LOGITS, LABELS)) == 0.75


def test_accuracy_accepts_an_iterable_of_batches():
    loader = DataLoader(TensorDataset(LOGITS, LABELS), batch_size=3)
    assert accuracy(nn.Identity(), loader) == 0.75
    assert accuracy(nn.Identity(), [(LOGITS[:1], LABELS[:1]), (LOGITS[1:], LABELS[1:])]) == 0.75


def test_accuracy_does_not_depend_on_the_batch_size():
    data = TensorDataset(LOGITS, LABELS)
    assert accuracy(nn.Identity(), data, batch_size=1) == accuracy(nn.Identity(), data, batch_size=4)


def test_accuracy_evaluates_in_eval_mode_and_restores_training_mode():
    model = nn.Sequential(nn.Dropout(p=0.999))  # would zero almost everything in training mode
    model.train()
    assert accuracy(model, TensorDataset(LOGITS, LABELS)) == 0.75
    assert model.training


def test_accuracy_reads_brevitas_quant_tensor_outputs():
    layer = qnn.QuantIdentity(return_quant_tensor=True)  # 8-bit, default range [-1, 1)
    layer.eval()
    assert accuracy(layer, TensorDataset(LOGITS / 10, LABELS)) == 0.75


def test_accuracy_of_empty_data_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        accuracy(nn.Identity(), [])


def test_accuracy_rejects_batches_without_labels():
    with pytest.raises(TypeError, match="labels"):
        accuracy(nn.Identity(), [LOGITS])


def test_accuracy_rejects_logits_that_do_not_match_the_labels():
    with pytest.raises(ValueError, match="do not match"):
        accuracy(nn.Identity(), [(LOGITS, LABELS[:2])])


@given(st.lists(st.floats(0.01, 1.0), min_size=1, max_size=6))
def test_harmonic_mean_is_n_over_the_sum_of_reciprocals(values):
    assert math.isclose(harmonic_mean(values), len(values) / sum(1 / v for v in values), rel_tol=1e-9)


@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6))
def test_harmonic_mean_lies_between_the_minimum_and_the_arithmetic_mean(values):
    result = harmonic_mean(values)
    assert min(values) - 1e-12 <= result <= sum(values) / len(values) + 1e-12


def test_harmonic_mean_is_zero_when_one_target_fails_completely():
    assert harmonic_mean([0.9, 0.0]) == 0.0


def test_harmonic_mean_of_two_matches_the_papers_formula():
    a, b = 0.6, 0.9
    assert math.isclose(harmonic_mean([a, b]), 2 * a * b / (a + b))


@pytest.mark.parametrize("values", [[], [0.5, -0.1], [float("nan")]])
def test_harmonic_mean_rejects_empty_negative_or_nan_input(values):
    with pytest.raises(ValueError):
        harmonic_mean(values)
