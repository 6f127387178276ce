"""Row operations on batch dicts: TRL's rollout dicts and the micro-batches TRL splits them into.

A batch dict holds per-row entries (tensors whose first dim is the row, or lists with one item per row), batch-level
scalars (0-dim tensors such as `num_items_in_batch`) and None. Taking or stacking rows applies to the per-row entries
only. The scalars are either kept (micro-batches of one generation batch share them) or dropped (rows from different
batches: the caller recomputes them). Stacking tensors of different widths needs the caller's `widen` rule: which side
to pad and with what value depends on the entry (prompts are left-padded, completions right-padded).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Widen = Callable[[str, torch.Tensor, int], torch.Tensor]  # (key, tensor, width) -> the tensor padded to `width`


def is_batch_scalar(value) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim == 0


def take_rows(batch: dict, index: torch.Tensor, keep_scalars: bool = True) -> dict:
    """The rows `index` of every per-row entry; None stays None; scalars are kept (or dropped)."""
    taken = {}
    for key, value in batch.items():
        if value is None or is_batch_scalar(value):
            if value is None or keep_scalars:
                taken[key] = value
        elif isinstance(value, list):
            taken[key] = [value[i] for i in index.tolist()]
        else:
            taken[key] = value.index_select(0, index.to(value.device))
    return taken


def concat_rows(parts: list[dict], widen: Widen | None = None, keep_scalars: bool = True) -> dict:
    """The rows of several batch dicts with the same keys, in order, as one batch dict.

    Scalars are taken from the first part (or dropped). Tensors of different widths (dim 1) are first padded to the
    widest with `widen`; without it they must have equal widths.
    """
    merged = {}
    for key, first in parts[0].items():
        if first is None or is_batch_scalar(first):
            if first is None or keep_scalars:
                merged[key] = first
        elif isinstance(first, list):
            merged[key] = [row for part in parts for row in part[key]]
        else:
            tensors = [part[key] for part in parts]
            width = max(t.size(1) if t.dim() > 1 else 0 for t in tensors)
            if any(t.dim() > 1 and t.size(1) != width for t in tensors):
                if widen is None:
                    raise ValueError(f"Cannot stack {key!r}: widths {[t.size(1) for t in tensors]} differ and no "
                                     "padding rule was given.")
                tensors = [widen(key, t, width) for t in tensors]
            merged[key] = torch.cat(tensors, dim=0)
    return merged
