"""Masked batch statistics that are global: over every process and every micro-batch of a generation batch.

A statistic of "the batch" is reduced from per-process moments (sum, sum of squares, count) with one
all-reduce, so it is identical on every rank and independent of how rows are split across processes
or gradient-accumulation micro-batches. The reduction is passed in as a function, which keeps these
functions pure: tests simulate several ranks by summing moments by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

ReduceSum = Callable[[torch.Tensor], torch.Tensor]


def local_reduce(moments: torch.Tensor) -> torch.Tensor:
    """The reduction of a single process: nothing to add."""
    return moments


@dataclass(frozen=True)
class MaskedMoments:
    """Global mean and variance of the masked entries of a tensor."""

    count: torch.Tensor  # number of valid entries (float64, 0-dim)
    mean: torch.Tensor  # (float64, 0-dim); 0 when count == 0
    var: torch.Tensor  # unbiased (Bessel) variance when `unbiased`, else population variance; 0 when count <= 1

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()


def masked_moments(
    values: torch.Tensor, mask: torch.Tensor, reduce_sum: ReduceSum = local_reduce, unbiased: bool = True
) -> MaskedMoments:
    """Mean and variance of `values` where `mask` is non-zero, reduced over processes with `reduce_sum`.

    Moments are accumulated in float64 so that the sum-of-squares form stays accurate for large batches.
    """
    valid = mask != 0
    weights = valid.to(torch.float64)
    x = values.to(torch.float64)
    x = torch.where(valid, x, torch.zeros_like(x))  # selected, not multiplied: a NaN where masked stays out
    local = torch.stack([weights.sum(), x.sum(), (x * x).sum()])
    count, total, total_sq = reduce_sum(local).unbind()
    safe_count = count.clamp(min=1.0)
    mean = total / safe_count
    pop_var = (total_sq / safe_count - mean * mean).clamp(min=0.0)
    if unbiased:
        var = torch.where(count > 1, pop_var * count / (count - 1).clamp(min=1.0), torch.zeros_like(pop_var))
    else:
        var = pop_var
    return MaskedMoments(count=count, mean=mean, var=var)


def masked_mean(
    values: torch.Tensor, mask: torch.Tensor, reduce_sum: ReduceSum = local_reduce
) -> torch.Tensor:
    """Global mean of the masked entries (0 when there are none)."""
    return masked_moments(values, mask, reduce_sum, unbiased=False).mean


def accelerator_reduce_sum(accelerator) -> ReduceSum:
    """A `reduce_sum` that all-reduces across the processes of an `accelerate.Accelerator`."""

    def reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
        if accelerator.num_processes == 1:
            return tensor
        # gloo and NCCL both reduce float64; move to the accelerator's device for NCCL.
        return accelerator.reduce(tensor.to(accelerator.device), reduction="sum")

    return reduce_sum
