"""Full (unsharded) copies of a sharded model's tensors for checkpoints, and loading them back into the shards.

Trainer state such as an EMA teacher lives in modules that DeepSpeed ZeRO-3 partitions and FSDP2 shards (DTensor
parameters): each process holds a piece, so saving the main process's `state_dict()` would keep only its piece.
The same holds for copying one sharded module's weights into another's (the reference reset, pi_ref <- pi_theta).
Every function here is collective under ZeRO-3 and FSDP2: every process must call it, in the same order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _gathered(params: list[torch.nn.Parameter], zero3: bool, modifier_rank: int | None):
    """ZeRO-3: the full parameters inside the context (written back from `modifier_rank` on exit)."""
    if not zero3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def full_tensors(
    tensors: Callable[[], list[torch.Tensor]], params: list[torch.nn.Parameter], zero3: bool, keep: bool
) -> list[torch.Tensor] | None:
    """CPU copies of the full values of `tensors()` (read while ZeRO-3's `params` are gathered; FSDP2's DTensors
    gathered one by one). Returns them where `keep` (the process that writes the checkpoint), None elsewhere."""
    copies = []
    with torch.no_grad(), _gathered(params, zero3, modifier_rank=None):
        for tensor in tensors():
            full = tensor.full_tensor() if _is_dtensor(tensor) else tensor
            copies.append(full.detach().cpu().clone() if keep else None)
    return copies if keep else None


def load_full_tensors(
    tensors: Callable[[], list[torch.Tensor]], params: list[torch.nn.Parameter], zero3: bool,
    values: list[torch.Tensor],
) -> None:
    """Copy full `values` (as `full_tensors` returned them, on every process) into `tensors()`, each process into
    its own shard."""
    with torch.no_grad(), _gathered(params, zero3, modifier_rank=0):
        targets = tensors()
        if len(targets) != len(values):
            raise ValueError(f"The checkpoint holds {len(values)} tensors for {len(targets)}: was it saved with "
                             "another model or LoRA configuration?")
        for target, value in zip(targets, values):
            if _is_dtensor(target):
                from torch.distributed.tensor import distribute_tensor

                local = distribute_tensor(value.to(target.device, target.dtype), target.device_mesh,
                                          target.placements)
                target.to_local().copy_(local.to_local())
            else:
                target.copy_(value.to(target.device, target.dtype))


def copy_full_tensors(pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]], zero3: bool) -> None:
    """`target <- source` for every (source, target) pair of parameters, wherever they are sharded: under ZeRO-3 each
    pair is gathered, copied and partitioned again (one pair at a time, so only two full parameters are ever
    materialized); FSDP2 DTensors with the same layout copy shard to shard, other layouts go through the full value."""
    with torch.no_grad():
        for source, target in pairs:
            with _gathered([source, target], zero3, modifier_rank=0):
                if not _is_dtensor(target):
                    target.copy_(source.full_tensor() if _is_dtensor(source) else source)
                elif (_is_dtensor(source) and source.device_mesh == target.device_mesh
                      and source.placements == target.placements and source.shape == target.shape):
                    target.to_local().copy_(source.to_local())
                else:
                    from torch.distributed.tensor import distribute_tensor

                    full = source.full_tensor() if _is_dtensor(source) else source
                    local = distribute_tensor(full.to(target.device, target.dtype), target.device_mesh,
                                              target.placements)
                    target.to_local().copy_(local.to_local())
