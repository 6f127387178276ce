"""Re-pack a generation batch's micro-batches so that gate survivors fill as few micro-batches as possible.

TRL splits a generation batch into equal micro-batches (one per accumulation step). After the gate, survivors are
scattered over all of them; packed, they occupy the LAST `compute_chunks` micro-batches of each accumulation
window and the earlier ones carry no work at all, so their forward and backward passes are skipped. Survivors go
last because the last micro-step of a window is where DDP synchronizes gradients, and it must run a real forward.
"""

from __future__ import annotations

import math

import torch


def chunks_needed(num_survivors: int, chunk_size: int) -> int:
    return math.ceil(num_survivors / chunk_size)


def pack_survivors(keep: torch.Tensor, num_chunks: int, compute_chunks: int) -> list[torch.Tensor]:
    """Row indices for each of `num_chunks` micro-batches: the survivors spread evenly over the last
    `compute_chunks` (so every compute chunk gets a survivor when there are enough), the others empty."""
    if not 0 <= compute_chunks <= num_chunks:
        raise ValueError(f"compute_chunks={compute_chunks} must be between 0 and num_chunks={num_chunks}.")
    survivors = torch.nonzero(keep.cpu(), as_tuple=False).flatten()
    empty = torch.zeros(0, dtype=torch.long)
    if compute_chunks == 0:
        if survivors.numel():
            raise ValueError("There are survivors but no compute chunks to hold them.")
        return [empty] * num_chunks
    parts = list(torch.tensor_split(survivors, compute_chunks))
    return [empty] * (num_chunks - compute_chunks) + parts


def survivor_chunk_sizes(num_survivors: int, num_chunks: int, compute_chunks: int) -> list[int]:
    """How many survivors each micro-batch gets from `pack_survivors` when a rank has `num_survivors` of them."""
    keep = torch.ones(num_survivors, dtype=torch.bool)
    return [chunk.numel() for chunk in pack_survivors(keep, num_chunks, compute_chunks)]
