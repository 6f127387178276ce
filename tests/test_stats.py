"""Global masked statistics."""

import pytest
import torch

from trl_ext.core.stats import masked_mean, masked_moments


def test_masked_moments_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 50.0, 60.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    moments = masked_moments(values, mask)
    assert moments.count.item() == 4
    assert moments.mean.item() == pytest.approx(2.5)
    assert moments.var.item() == pytest.approx(5.0 / 3.0)  # (2.25 + 0.25 + 0.25 + 2.25) / 3
    assert masked_moments(values, mask, unbiased=False).var.item() == pytest.approx(5.0 / 4.0)
    assert masked_mean(values, mask).item() == pytest.approx(2.5)


def test_masked_moments_ignore_non_finite_values_where_masked():
    values = torch.tensor([1.0, 3.0, float("nan"), float("-inf")])
    moments = masked_moments(values, torch.tensor([1, 1, 0, 0]))
    assert moments.count.item() == 2 and moments.mean.item() == 2.0 and moments.var.item() == 2.0


def test_reduce_sum_combines_processes():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    ones = torch.ones(2)
    local_b = torch.stack([ones.sum(), b.sum(), (b * b).sum()]).double()
    combined = masked_moments(a, ones, reduce_sum=lambda local: local + local_b)
    whole = masked_moments(torch.cat([a, b]), torch.ones(4))
    assert combined.mean.item() == pytest.approx(whole.mean.item())
    assert combined.var.item() == pytest.approx(whole.var.item())
