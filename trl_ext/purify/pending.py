"""The RL selector's pending decisions: the previous rollout, kept until the student has been trained on it.

The student's improvement on a prompt can only be measured after the optimizer steps on it, i.e. at the next
rollout. Everything needed is kept GLOBALLY (gathered from every process), so the state is the same on every process
and one copy goes into the checkpoint: token ids padded across processes, plus each process's own widths so that
its rows are re-scored with exactly the padding they were first scored with (left padding shifts positions).
"""

from __future__ import annotations

from typing import Any

import torch

# completion_mask: what the re-scoring forward attends to (as TRL's scoring did); loss_mask: the tokens whose
# log-probs are compared (tool outputs excluded). They differ only in tool-calling rollouts.
ROW_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "loss_mask", "old_seq_logps", "rewards")
PROMPT_KEYS = ("features", "signal", "consensus", "actions")


class PendingDecisions:
    def __init__(self):
        self.batch: dict[str, torch.Tensor] | None = None

    def __bool__(self) -> bool:
        return self.batch is not None

    def store(self, batch: dict[str, torch.Tensor]) -> None:
        missing = set(ROW_KEYS + PROMPT_KEYS + ("widths", "group_size")) - set(batch)
        if missing:
            raise KeyError(f"Pending decisions lack {sorted(missing)}.")
        self.batch = {key: value.detach().cpu() for key, value in batch.items()}

    def clear(self) -> None:
        self.batch = None

    @property
    def world_size(self) -> int:
        return self.batch["widths"].size(0)

    def local_rows(self, rank: int) -> dict[str, torch.Tensor]:
        """This process's rows of the pending rollout, trimmed back to the widths they were scored with."""
        b = self.batch
        rows_per_rank = b["prompt_ids"].size(0) // self.world_size
        rows = slice(rank * rows_per_rank, (rank + 1) * rows_per_rank)
        prompt_width, completion_width = (int(w) for w in b["widths"][rank])
        return {
            "prompt_ids": b["prompt_ids"][rows, b["prompt_ids"].size(1) - prompt_width:],
            "prompt_mask": b["prompt_mask"][rows, b["prompt_mask"].size(1) - prompt_width:],
            "completion_ids": b["completion_ids"][rows, :completion_width],
            "completion_mask": b["completion_mask"][rows, :completion_width],
            "loss_mask": b["loss_mask"][rows, :completion_width],
        }

    def state_dict(self) -> dict[str, Any]:
        return {"batch": None if self.batch is None else dict(self.batch)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch = None if state["batch"] is None else dict(state["batch"])
        if self.batch is not None and "loss_mask" not in self.batch:  # saved before the two masks were kept apart
            self.batch["loss_mask"] = self.batch["completion_mask"]
