"""gradguard.guard.loss: the step's loss over micro-batches (mean or sum, NaN-safe)."""

from __future__ import annotations

import math

import pytest
import torch

from gradguard.guard.loss import StepLoss


def test_mean_and_sum_of_the_micro_batch_losses():
    values = [torch.tensor(v) for v in (1.0, 2.0, 4.5)]
    acc = StepLoss.first(values[0], "mean")
    for v in values[1:]:
        acc = acc.add(v, "mean")
    assert acc.count == 3 and acc.value().item() == pytest.approx(7.5 / 3)
    acc = StepLoss.first(values[0], "sum").add(values[1], "sum")
    assert acc.value().item() == 3.0


def test_one_value_is_returned_bitwise():
    v = torch.tensor(0.1234567)
    assert torch.equal(StepLoss.first(v, "mean").value(), v)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_nonfinite_micro_batch_makes_the_step_loss_infinite(bad):
    acc = StepLoss.first(torch.tensor(bad), "mean")
    for v in (1.0, 2.0):
        acc = acc.add(torch.tensor(v), "mean")
    assert math.isinf(acc.value().item())
    # inf and -inf together sum to NaN: still recorded as inf (NaN means "no loss")
    both = StepLoss.first(torch.tensor(math.inf), "sum").add(torch.tensor(-math.inf), "sum")
    assert both.value().item() == math.inf


def test_add_returns_a_new_accumulator():
    first = StepLoss.first(torch.tensor(1.0), "mean")
    second = first.add(torch.tensor(3.0), "mean")
    assert first.count == 1 and first.value().item() == 1.0 and second.value().item() == 2.0


def test_bad_reductions():
    with pytest.raises(ValueError, match="reduction must be one of"):
        StepLoss.first(torch.tensor(1.0), "max")
    with pytest.raises(ValueError, match="one reduction per step"):
        StepLoss.first(torch.tensor(1.0), "mean").add(torch.tensor(1.0), "sum")
