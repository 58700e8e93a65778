"""Metrics on inputs small enough to check on paper (Surprise's test_accuracy style)."""
from __future__ import annotations

import math

import pytest
import torch

from mfutils.metrics import mae, rmse


def test_rmse_matches_a_hand_computation():
    # errors 1, -2, 0, 3 -> squared 1, 4, 0, 9 -> mean 3.5
    pred = torch.tensor([4.0, 1.0, 3.0, 5.0])
    target = torch.tensor([3.0, 3.0, 3.0, 2.0])
    assert rmse(pred, target) == pytest.approx(math.sqrt(3.5))


def test_mae_matches_a_hand_computation():
    pred = torch.tensor([4.0, 1.0, 3.0, 5.0])
    target = torch.tensor([3.0, 3.0, 3.0, 2.0])
    assert mae(pred, target) == pytest.approx((1 + 2 + 0 + 3) / 4)


def test_two_value_example_from_the_docstring():
    assert rmse(torch.tensor([3.0, 4.0]), torch.tensor([4.0, 2.0])) == pytest.approx(math.sqrt(2.5))
    assert mae(torch.tensor([3.0, 4.0]), torch.tensor([4.0, 2.0])) == pytest.approx(1.5)


def test_perfect_predictions_score_zero():
    x = torch.tensor([1.0, 2.5, 5.0])
    assert rmse(x, x) == 0.0 and mae(x, x) == 0.0


def test_metrics_return_python_floats_for_any_float_dtype():
    value = rmse(torch.tensor([1.0], dtype=torch.float16), torch.tensor([2.0], dtype=torch.float64))
    assert type(value) is float and value == pytest.approx(1.0)


@pytest.mark.parametrize("metric", [rmse, mae])
def test_empty_input_raises(metric):
    with pytest.raises(ValueError, match=rf"{metric.__name__}\(\): pred and target are empty \(shape \(0,\)\)"):
        metric(torch.tensor([]), torch.tensor([]))


@pytest.mark.parametrize("metric", [rmse, mae])
def test_shape_mismatch_raises_with_both_shapes(metric):
    with pytest.raises(ValueError, match=r"same shape; got pred \(3,\) and target \(2,\)"):
        metric(torch.zeros(3), torch.zeros(2))
