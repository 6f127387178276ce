"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`: DG with a Kondo gate whose survivors
differ between ranks. Each rank writes what it did to <out_dir>/rank<k>.pt. Optional arguments: steps_per_generation
(default: gradient_accumulation_steps = 4) and gate_normalizer (default: all_tokens)."""

import os
import sys

import torch

from conftest import cpu_config, end_distributed_run  # tests/ is on PYTHONPATH (see tests/test_distributed.py)
from trl_ext import DelightConfig, DelightTrainer, demo

out_dir = sys.argv[1]
steps_per_generation = int(sys.argv[2]) if len(sys.argv) > 2 else 4
normalizer = sys.argv[3] if len(sys.argv) > 3 else "all_tokens"
rank = int(os.environ["RANK"])
torch.set_num_threads(1)

kept_per_rollout = []
tokens_per_rollout = []  # (this rank's kept loss tokens, the loss normalizer num_items_in_batch)


class RecordingDelightTrainer(DelightTrainer):
    def _postprocess_rollout(self, inputs, rollout):
        out = super()._postprocess_rollout(inputs, rollout)
        kept_per_rollout.append(int(out["kondo_keep"].sum()))
        kept_tokens = (self.loss_mask(out) * out["kondo_keep"].unsqueeze(1)).sum().item()
        tokens_per_rollout.append((kept_tokens, out["num_items_in_batch"].item()))
        return out


args = cpu_config(
    DelightConfig,
    os.path.join(out_dir, "run"),
    max_steps=4,
    learning_rate=1e-3,
    max_completion_length=6,
    per_device_train_batch_size=2,
    gradient_accumulation_steps=4,  # by default 8 rows per rank per generation batch, 4 micro-steps to pack into
    steps_per_generation=steps_per_generation,
    gate="pass_rate",
    gate_pass_rate=0.3,
    gate_normalizer=normalizer,
    ddp_find_unused_parameters=False,
)
trainer = RecordingDelightTrainer(
    model=demo.student_path("reversal"),  # reversal's per-position reward leaves few all-equal groups
    reward_funcs=[demo.task_reward],
    args=args,
    train_dataset=demo.get_task("reversal").dataset(64, seed=3),
)
trainer.train()
torch.save(
    {
        "world_size": trainer.accelerator.num_processes,
        "kept": kept_per_rollout,
        "tokens": tokens_per_rollout,
        "counters": trainer.gate_counters,
        "history": list(trainer.kondo_gate.history),
        "parameters": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
    },
    os.path.join(out_dir, f"rank{rank}.pt"),
)
end_distributed_run()
