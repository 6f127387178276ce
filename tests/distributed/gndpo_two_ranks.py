"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2` (gloo, CPU).

Each rank trains GNDPO for a few steps on its slice of every generation batch (groups span ranks) and writes
what it saw to <out_dir>/rank<k>.pt: the normalization statistics and its local clipped scores per rollout,
and a final parameter checksum.
"""

import os
import sys

import torch

from conftest import cpu_config, end_distributed_run  # tests/ is on PYTHONPATH (see tests/test_distributed.py)
from trl_ext import GNDPOConfig, GNDPOTrainer, demo

out_dir = sys.argv[1]
rank = int(os.environ["RANK"])
torch.set_num_threads(1)


class RecordingGNDPOTrainer(GNDPOTrainer):
    rollouts: list = []

    def _postprocess_rollout(self, inputs, rollout):
        out = super()._postprocess_rollout(inputs, rollout)
        result = self.last_advantages
        self.rollouts.append(
            {
                "mean": result.score_moments.mean.item(),
                "var": result.score_moments.var.item(),
                "scores": result.scores.cpu(),
                "mask": self.loss_mask(rollout).cpu(),
                "advantages": result.advantages.cpu(),
            }
        )
        return out


args = cpu_config(
    GNDPOConfig,
    os.path.join(out_dir, "run"),
    per_device_train_batch_size=2,  # with num_generations=4, every group spans both ranks
    gradient_accumulation_steps=2,
    ddp_find_unused_parameters=False,
)
trainer = RecordingGNDPOTrainer(
    model=demo.student_path("arithmetic"),
    reward_funcs=[demo.task_reward],
    args=args,
    train_dataset=demo.get_task("arithmetic").dataset(64, seed=3),
    teacher_model=demo.teacher_path("arithmetic"),
)
trainer.train()
checksum = sum(p.detach().double().sum().item() for p in trainer.model.parameters())
torch.save(
    {
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "rollouts": trainer.rollouts,
        "checksum": checksum,
    },
    os.path.join(out_dir, f"rank{rank}.pt"),
)
end_distributed_run()
