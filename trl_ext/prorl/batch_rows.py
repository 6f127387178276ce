"""Row operations on TRL rollout dicts: mask rows, concatenate rounds, pick rows, gather rows over processes (and
pick rows of TRL's completions table alongside).

A rollout dict (what `GRPOTrainer._generate_and_score_completions` returns) holds per-row tensors whose widths
depend on the batch: prompts are left-padded, completions right-padded. Combining rows from several generation
rounds (or processes) means padding every tensor to a common width on the correct side, with the value TRL pads
with, so that padding stays invisible to the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core import rows

PAD_TOKEN = "pad_token"  # placeholder replaced by the tokenizer's pad id

# key -> (side the padding goes on, padding value). Keys absent here cannot be merged safely.
ROW_LAYOUT: dict[str, tuple[str, float | str]] = {
    "prompt_ids": ("left", PAD_TOKEN),
    "prompt_mask": ("left", 0),
    "completion_ids": ("right", PAD_TOKEN),
    "completion_mask": ("right", 0),
    "tool_mask": ("right", 1),  # TRL pads tool masks with 1; the completion mask hides the padding anyway
    "old_per_token_logps": ("right", 0.0),
    "ref_per_token_logps": ("right", 0.0),
    "sampling_per_token_logps": ("right", 0.0),
    "importance_sampling_ratio": ("right", 0.0),
    "advantages": ("right", 0.0),  # (B,) from TRL, (B, T) from trainers with per-token advantages
}
# Batch-level entries recomputed after rows change.
BATCH_KEYS = ("num_items_in_batch",)


def check_mergeable(rollout: dict) -> None:
    """Raise for a rollout entry whose rows we do not know how to pad and move (e.g. multimodal inputs)."""
    unknown = sorted(k for k, v in rollout.items() if v is not None and k not in ROW_LAYOUT and k not in BATCH_KEYS)
    if unknown:
        raise NotImplementedError(
            f"dynamic_sampling='refill' cannot merge rollout entries {unknown} across generation rounds (only "
            f"{sorted(ROW_LAYOUT)} are supported, i.e. text rollouts). Use dynamic_sampling='filter', which masks "
            "uninformative groups in place."
        )


def _pad_value(value, pad_token_id: int):
    return pad_token_id if value == PAD_TOKEN else value


def pad_to_width(tensor: torch.Tensor, width: int, side: str, value) -> torch.Tensor:
    """Pad dim 1 of a (B, W, ...) tensor to `width` on `side`; (B,) and wide-enough tensors are returned as is."""
    if tensor.dim() < 2 or tensor.size(1) >= width:
        return tensor
    amount = width - tensor.size(1)
    pad = [0, 0] * (tensor.dim() - 2) + ([amount, 0] if side == "left" else [0, amount])
    return F.pad(tensor, pad, value=value)


def concat_rows(rollouts: list[dict], pad_token_id: int) -> dict:
    """Stack the rows of several rollouts (same keys), padding each tensor to the widest one on its side. Batch-level
    entries are dropped: the caller recomputes them for the new rows."""
    keys = {k for k, v in rollouts[0].items() if v is not None and k not in BATCH_KEYS}
    for rollout in rollouts:
        check_mergeable(rollout)
        present = {k for k, v in rollout.items() if v is not None and k not in BATCH_KEYS}
        if present != keys:
            raise ValueError(f"rollouts to merge have different entries: {sorted(present)} vs {sorted(keys)}")

    def widen(key: str, tensor: torch.Tensor, width: int) -> torch.Tensor:
        side, value = ROW_LAYOUT[key]
        return pad_to_width(tensor, width, side, _pad_value(value, pad_token_id))

    present_only = [{k: v for k, v in r.items() if k in keys} for r in rollouts]
    return rows.concat_rows(present_only, widen=widen, keep_scalars=False)


def take_rows(rollout: dict, index: torch.Tensor) -> dict:
    """The rows `index` of every per-row tensor (batch-level entries are dropped: recompute them)."""
    return rows.take_rows({k: v for k, v in rollout.items() if v is not None and k not in BATCH_KEYS}, index)


def take_table_rows(tables: list[dict], index: torch.Tensor) -> dict:
    """Rows `index` of several rounds' column tables (column key -> one value per row, every column of a table
    equally long) concatenated in order, as `take_rows` picks tensor rows. A column that a round lacks (first logged
    by a later round) reads None there."""
    sizes = [len(next(iter(table.values()))) for table in tables]
    names = sorted({name for table in tables for name in table})
    concatenated = {name: [v for table, size in zip(tables, sizes) for v in table.get(name, [None] * size)]
                    for name in names}
    return {name: [values[i] for i in index.tolist()] for name, values in concatenated.items()}


def mask_rows(rollout: dict, keep: torch.Tensor) -> dict:
    """Zero the loss mask (and advantage) of the rows where `keep` is False; the rows stay, so shapes do not change.

    This is how TRL itself removes truncated completions (`mask_truncated_completions`): the completion mask also
    serves as the attention mask of the completion, and masked rows add nothing to the loss or its normalizer.
    """
    out = dict(rollout)
    keep = keep.to(rollout["completion_mask"].device)
    row = keep.view(-1, 1)
    out["completion_mask"] = rollout["completion_mask"] * row.to(rollout["completion_mask"].dtype)
    if rollout.get("tool_mask") is not None:
        out["tool_mask"] = rollout["tool_mask"] * row.to(rollout["tool_mask"].dtype)
    advantages = rollout["advantages"]
    out["advantages"] = advantages * (row if advantages.dim() == 2 else keep).to(advantages.dtype)
    return out


def gather_rows(rollout: dict, accelerator, pad_token_id: int) -> dict:
    """All processes' rows of a rollout, in process order, on every process (identity for a single process).

    Each tensor is first padded to the widest width over processes (on its own side), since a gather needs equal
    shapes.
    """
    check_mergeable(rollout)
    if accelerator.num_processes == 1:
        return {k: v for k, v in rollout.items() if v is not None and k not in BATCH_KEYS}
    gathered = {}
    for key, tensor in rollout.items():
        if tensor is None or key in BATCH_KEYS:
            continue
        side, value = ROW_LAYOUT[key]
        if tensor.dim() > 1:
            tensor = accelerator.pad_across_processes(
                tensor, dim=1, pad_index=_pad_value(value, pad_token_id), pad_first=side == "left"
            )
        gathered[key] = accelerator.gather(tensor)
    return gathered
